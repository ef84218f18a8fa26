"""``/hypha/metrics/1``: worker → scheduler, training metrics of a running job.

The worker forwards what its job reports (loss, throughput, time per batch ...) as
:class:`MetricsReport`; the scheduler answers :class:`MetricsReceived`, keeps the values for the
user and uses the timings to decide when workers synchronise.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated

from hypha.messages._codec import MaxItems, Message, Range, Text
from hypha.messages._common import Id, Timestamp
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
    """The scheduler recorded the report of job ``job_id``."""

    job_id: Id


METRICS = Protocol("metrics", "1", max_request=MetricsReport.MAX_SIZE,
                   max_response=MetricsReceived.MAX_SIZE)
