"""hypha.messages: the control-plane message catalogue.

One module per protocol, each with its request/response types, its versioned protocol id and who
sends it to whom:

=========================  =================  ====================================================
module                     protocol           messages
=========================  =================  ====================================================
``worker_request``         Gossipsub topic    scheduler → all: WorkerRequest
                           ``hypha/worker``
``worker_offer``           worker-offer/1     worker → scheduler: WorkerOffer → OfferReceived
``renew_lease``            renew-lease/1      scheduler → worker: RenewLease → LeaseRenewed
``dispatch_job``           dispatch-job/1     scheduler → worker: DispatchJob → JobAccepted
                           stop-job/1         scheduler → worker: StopJob → JobStopped
``job_status``             job-status/1       worker → scheduler: JobStatus → StatusReceived
``metrics``                metrics/1          worker → scheduler: MetricsReport → MetricsReceived
``data_slice``             data-slice/1       worker → scheduler: DataSliceRequest → DataSliceAssignment
                           data-slice-done/1  worker → scheduler: DataSliceDone → DataSliceRecorded
                           data-fetch/1       worker → data node: FetchSlice → SliceComing
``file_fetch``             file-fetch/1       any → a node serving files: FetchFile → FileComing
``health``                 health/1           any → any: HealthCheck → Health
``round_plan``             round-plan/1       parameter server → scheduler: RoundPlanRequest → RoundPlan
=========================  =================  ====================================================

Messages are frozen keyword-only dataclasses that check themselves when built and when decoded
(:class:`MessageError`, a ``ValueError``, names the message, the field path, what was wrong and
what is allowed). :func:`encode` gives msgpack bytes, :func:`decode` reads untrusted ones::

    async def on_offer(peer: ID, data: bytes) -> bytes:
        try:
            offer = decode(WorkerOffer, data)
        except MessageError as exc:
            raise RequestRejected(str(exc)) from None
        ...
        return encode(OfferReceived(request_id=offer.request_id))

    network.serve(PROTOCOLS["worker-offer"], on_offer)

``_codec`` holds the schema framework (its docstring lists the field types and the wire form).
"""

from types import MappingProxyType
from typing import Final

from hypha.messages._codec import (
    DEFAULT_MAX_SIZE,
    SCHEMA_VERSION,
    MaxItems,
    Message,
    MessageError,
    Range,
    Text,
    decode,
    encode,
)
from hypha.messages._common import (
    GIB,
    MAX_LEASE_TTL,
    DatasetName,
    Executor,
    ExecutorKind,
    Id,
    LeaseTTL,
    PeerId,
    Resources,
    Timestamp,
    new_id,
)
from hypha.messages.data_slice import (
    DATA_FETCH,
    DATA_SLICE,
    DATA_SLICE_DONE,
    DataSliceAssignment,
    DataSliceDone,
    DataSliceRecorded,
    DataSliceRequest,
    FetchSlice,
    SliceComing,
)
from hypha.messages.dispatch_job import (
    DISPATCH_JOB,
    STOP_JOB,
    ConfigValue,
    DispatchJob,
    Fetch,
    FetchSource,
    JobAccepted,
    JobSpec,
    JobStopped,
    StopJob,
)
from hypha.messages.file_fetch import FILE_FETCH, FetchFile, FileComing
from hypha.messages.health import HEALTH, Health, HealthCheck, HealthStatus, Role
from hypha.messages.job_status import JOB_STATUS, JobState, JobStatus, StatusReceived
from hypha.messages.metrics import METRICS, MetricName, MetricsReceived, MetricsReport
from hypha.messages.renew_lease import RENEW_LEASE, LeaseRenewed, RenewLease
from hypha.messages.round_plan import ROUND_PLAN, RoundPlan, RoundPlanRequest
from hypha.messages.worker_offer import WORKER_OFFER, OfferReceived, WorkerOffer
from hypha.messages.worker_request import WORKER_TOPIC, WorkerRequest
from hypha.net import Protocol

#: Every request/response protocol of the control plane, by name (``PROTOCOLS["metrics"].id``
#: is ``/hypha/metrics/1``).
PROTOCOLS: Final = MappingProxyType[str, Protocol]({p.name: p for p in (
    WORKER_OFFER, RENEW_LEASE, DISPATCH_JOB, STOP_JOB, JOB_STATUS, METRICS, DATA_SLICE,
    DATA_SLICE_DONE, DATA_FETCH, FILE_FETCH, HEALTH, ROUND_PLAN)})

__all__ = [
    "DATA_FETCH",
    "DATA_SLICE",
    "DATA_SLICE_DONE",
    "DEFAULT_MAX_SIZE",
    "DISPATCH_JOB",
    "FILE_FETCH",
    "GIB",
    "HEALTH",
    "JOB_STATUS",
    "MAX_LEASE_TTL",
    "METRICS",
    "PROTOCOLS",
    "RENEW_LEASE",
    "ROUND_PLAN",
    "SCHEMA_VERSION",
    "STOP_JOB",
    "WORKER_OFFER",
    "WORKER_TOPIC",
    "ConfigValue",
    "DataSliceAssignment",
    "DataSliceDone",
    "DataSliceRecorded",
    "DataSliceRequest",
    "DatasetName",
    "DispatchJob",
    "Executor",
    "ExecutorKind",
    "Fetch",
    "FetchFile",
    "FetchSlice",
    "FetchSource",
    "FileComing",
    "Health",
    "HealthCheck",
    "HealthStatus",
    "Id",
    "JobAccepted",
    "JobSpec",
    "JobState",
    "JobStatus",
    "JobStopped",
    "LeaseRenewed",
    "LeaseTTL",
    "MaxItems",
    "Message",
    "MessageError",
    "MetricName",
    "MetricsReceived",
    "MetricsReport",
    "OfferReceived",
    "PeerId",
    "Range",
    "RenewLease",
    "Resources",
    "Role",
    "RoundPlan",
    "RoundPlanRequest",
    "SliceComing",
    "StatusReceived",
    "StopJob",
    "Text",
    "Timestamp",
    "WorkerOffer",
    "WorkerRequest",
    "decode",
    "encode",
    "new_id",
]
