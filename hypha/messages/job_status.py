"""``/hypha/job-status/1``: worker → scheduler, how a dispatched job is doing.

The worker sends :class:`JobStatus` when a job changes state (``starting`` → ``running`` →
``finished``, ``failed`` or ``stopped``) and may repeat the current state as a heartbeat; the
scheduler answers :class:`StatusReceived`. ``exit_code`` is the process's exit status once it
has one (negative: killed by that signal).
"""

from __future__ import annotations

from typing import Annotated, Literal

from hypha.messages._codec import Message, Range, Text
from hypha.messages._common import Id, Timestamp
from hypha.net import Protocol

__all__ = ["JOB_STATUS", "JobState", "JobStatus", "StatusReceived"]

JobState = Literal["starting", "running", "finished", "failed", "stopped"]


class JobStatus(Message):
    """Job ``job_id`` (under lease ``lease_id``) entered ``state`` at ``time`` (Unix seconds)."""

    job_id: Id
    lease_id: Id
    state: JobState
    message: Annotated[str, Text(4096)] = ""
    exit_code: Annotated[int, Range(ge=-255, le=255)] | None = None
    time: Timestamp


class StatusReceived(Message):
    """The scheduler recorded the status of job ``job_id``."""

    job_id: Id


JOB_STATUS = Protocol("job-status", "1", max_request=JobStatus.MAX_SIZE,
                      max_response=StatusReceived.MAX_SIZE)
