"""``/hypha/dispatch-job/1`` and ``/hypha/stop-job/1``: scheduler → worker, starting and stopping
jobs.

Once it holds a lease on a worker, the scheduler sends :class:`DispatchJob` naming the lease and
the job: which executor runs it, its configuration, and the resources (model weights, data
slices, files) the job fetches. The worker checks that the lease is its own and alive and that it
has the executor, answers :class:`JobAccepted` and starts the job, reporting progress over
``/hypha/job-status/1``; otherwise it rejects the call (``RequestRejected``) with the reason.
:class:`StopJob` ends a job early; the worker answers :class:`JobStopped` once it is stopped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

from hypha.messages._codec import MaxItems, Message, Text
from hypha.messages._common import DatasetName, Executor, Id, PeerId
from hypha.net import Protocol

__all__ = [
    "DISPATCH_JOB",
    "STOP_JOB",
    "ConfigValue",
    "DispatchJob",
    "Fetch",
    "FetchSource",
    "JobAccepted",
    "JobSpec",
    "JobStopped",
    "StopJob",
]

FetchSource = Literal["peer", "data", "path"]
#: One value of a job's configuration.
ConfigValue = Annotated[str, Text(4096)] | int | float | bool


class Fetch(Message):
    """One resource a job needs before it starts, by where it comes from (``source``):

    * ``"peer"``: the file ``path`` served by ``peer`` (model weights from the scheduler or a
      parameter server);
    * ``"data"``: slices of ``dataset`` from a data node, stored under ``path`` in the job's
      work directory; ``peer``, when given, is the scheduler that hands out the slices;
    * ``"path"``: ``path`` on the worker itself (or a URI it can read).
    """

    source: FetchSource
    peer: PeerId | None = None
    path: Annotated[str, Text(1024, pattern=r"[^\x00]*", hint="a string of at most 1024 "
                                                                  "characters, no NUL")]
    dataset: DatasetName | None = None

    def _validate(self) -> None:
        if self.source == "peer" and self.peer is None:
            raise self._error("peer", "missing; allowed: a peer id when source is 'peer'")
        if self.source == "data" and self.dataset is None:
            raise self._error("dataset", "missing; allowed: a dataset name when source is 'data'")
        if self.source != "data" and self.dataset is not None:
            raise self._error("dataset", f"got {self.dataset!r}; allowed: None when source is "
                              f"{self.source!r}")
        if self.source == "path" and self.peer is not None:
            raise self._error("peer", "got a peer id; allowed: None when source is 'path'")


class JobSpec(Message):
    """What to run: job ``id`` on ``executor``, with ``config`` and the ``resources`` it
    fetches first."""

    id: Id
    executor: Executor
    config: Annotated[Mapping[Annotated[str, Text(64, min_len=1)], ConfigValue], MaxItems(256)]
    resources: Annotated[Sequence[Fetch], MaxItems(256)]


class DispatchJob(Message, max_size=1 << 20):
    """Run ``job`` under lease ``lease_id``."""

    lease_id: Id
    job: JobSpec


class JobAccepted(Message):
    """The worker took job ``job_id`` and is starting it."""

    job_id: Id


class StopJob(Message):
    """Stop job ``job_id``, for ``reason`` (kept in the worker's log and the job's status)."""

    job_id: Id
    reason: Annotated[str, Text(1024)]


class JobStopped(Message):
    """Job ``job_id`` is no longer running (it may have finished before the request came)."""

    job_id: Id


DISPATCH_JOB = Protocol("dispatch-job", "1", max_request=DispatchJob.MAX_SIZE,
                        max_response=JobAccepted.MAX_SIZE)
STOP_JOB = Protocol("stop-job", "1", max_request=StopJob.MAX_SIZE,
                    max_response=JobStopped.MAX_SIZE)
