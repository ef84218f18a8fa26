"""``/hypha/metrics/1``: worker → scheduler, training metrics of a running job.

The worker forwards what its job reports (loss, throughput, time per batch ...) as
:class:`MetricsReport`; the scheduler answers :class:`MetricsReceived`, keeps the values for the
user and uses the timings to decide when workers synchronise.

For a DiLoCo training job the answer also carries the scheduler's instruction (performance-aware
synchronisation): in outer round ``round`` the job runs ``batches`` batches in all (counted from
its last synchronisation) before it sends its pseudo-gradient to ``parameter_server``. A job
reports its position with the values ``round`` (synchronisations completed) and ``round_step``
(batches since the last one) and its speed with ``batch_seconds``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from hypha.messages._codec import MaxItems, Message, Range, Text
from hypha.messages._common import Id, PeerId, Timestamp
from hypha.net import Protocol

__all__ = ["METRICS", "MetricName", "MetricsReceived", "MetricsReport"]

#: A metric's name: ``loss``, ``train/tokens_per_s``.
MetricName = Annotated[str, Text(64, min_len=1, pattern=r"[A-Za-z0-9_./-]{1,64}")]


class MetricsReport(Message):
    """Job ``job_id`` measured ``values`` at training step ``step``, at ``time`` (Unix
    seconds)."""

    job_id: Id
    step: Annotated[int, Range(ge=0)]
    values: Annotated[Mapping[MetricName, float], MaxItems(128)]
    time: Timestamp


class MetricsReceived(Message):
    """The scheduler recorded the report of job ``job_id``; for a DiLoCo training job, it also
    says when to synchronise: run ``batches`` batches in outer round ``round`` (counted from the
    job's last synchronisation), then send the pseudo-gradient to ``parameter_server``. All
    three are None for other jobs (and until the scheduler knows its parameter server)."""

    job_id: Id
    round: Annotated[int, Range(ge=0)] | None = None
    batches: Annotated[int, Range(ge=1, le=1 << 32)] | None = None
    parameter_server: PeerId | None = None

    def _validate(self) -> None:
        given = [x is not None for x in (self.round, self.batches, self.parameter_server)]
        if any(given) and not all(given):
            raise self._error("round", "round, batches and parameter_server come together "
                              "(all set, or none)")


METRICS = Protocol("metrics", "1", max_request=MetricsReport.MAX_SIZE,
                   max_response=MetricsReceived.MAX_SIZE)
