"""hypha.messages' public surface: exports, protocol ids and limits, ids, docstrings."""

from __future__ import annotations

import re
import types

import pytest

import hypha.messages as M
from hypha.net import Protocol
from tests.unit.messages._samples import MESSAGE_TYPES

MODULES = ["data_slice", "dispatch_job", "file_fetch", "health", "job_status", "metrics",
           "renew_lease", "round_plan", "worker_offer", "worker_request"]


def test_exports() -> None:
    public = {name for name in dir(M) if not name.startswith("_")}
    not_exported = {"annotations", "MappingProxyType", "Final", "Protocol", *MODULES}
    assert sorted(M.__all__) == sorted(public - not_exported)
    assert len(set(M.__all__)) == len(M.__all__)
    for name in M.__all__:
        assert getattr(M, name) is not None


def test_message_types() -> None:
    assert sorted(c.__name__ for c in MESSAGE_TYPES) == sorted([
        "DataSliceAssignment", "DataSliceDone", "DataSliceRecorded", "DataSliceRequest",
        "DispatchJob", "Executor", "Fetch", "FetchFile", "FetchSlice", "FileComing", "Health",
        "HealthCheck", "JobAccepted", "JobSpec", "JobStatus", "JobStopped", "LeaseRenewed",
        "MetricsReceived", "MetricsReport", "OfferReceived", "RenewLease", "Resources",
        "RoundPlan", "RoundPlanRequest", "SliceComing", "StatusReceived", "StopJob",
        "WorkerOffer", "WorkerRequest",
    ])


# request type, response type of every protocol
RPCS: dict[str, tuple[type[M.Message], type[M.Message]]] = {
    "worker-offer": (M.WorkerOffer, M.OfferReceived),
    "renew-lease": (M.RenewLease, M.LeaseRenewed),
    "dispatch-job": (M.DispatchJob, M.JobAccepted),
    "stop-job": (M.StopJob, M.JobStopped),
    "job-status": (M.JobStatus, M.StatusReceived),
    "metrics": (M.MetricsReport, M.MetricsReceived),
    "data-slice": (M.DataSliceRequest, M.DataSliceAssignment),
    "data-slice-done": (M.DataSliceDone, M.DataSliceRecorded),
    "data-fetch": (M.FetchSlice, M.SliceComing),
    "file-fetch": (M.FetchFile, M.FileComing),
    "health": (M.HealthCheck, M.Health),
    "round-plan": (M.RoundPlanRequest, M.RoundPlan),
}


def test_protocols() -> None:
    assert sorted(M.PROTOCOLS) == sorted(RPCS)
    for name, protocol in M.PROTOCOLS.items():
        assert isinstance(protocol, Protocol)
        assert protocol.id == f"/hypha/{name}/1"
        request, response = RPCS[name]
        assert (protocol.max_request, protocol.max_response) == (request.MAX_SIZE,
                                                                response.MAX_SIZE)
    assert M.PROTOCOLS["dispatch-job"].max_request == 1 << 20
    assert M.PROTOCOLS["worker-offer"].max_request == 64 << 10
    assert M.PROTOCOLS is M.PROTOCOLS and isinstance(M.PROTOCOLS, types.MappingProxyType)
    assert M.DISPATCH_JOB is M.PROTOCOLS["dispatch-job"]


def test_worker_topic_and_advertisement_limit() -> None:
    assert M.WORKER_TOPIC == "hypha/worker"
    assert M.WorkerRequest.MAX_SIZE == 16 << 10


def test_new_id() -> None:
    ids = {M.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    M.OfferReceived(request_id=M.new_id())


@pytest.mark.parametrize("module", MODULES)
def test_modules_say_who_sends_what(module: str) -> None:
    mod = getattr(M, module)
    doc = mod.__doc__ or ""
    assert "→" in doc, module
    if module != "worker_request":
        assert re.search(r"``/hypha/[a-z-]+/1``", doc), module
    for name in mod.__all__:
        assert name in M.__all__, f"{module}.{name} is not exported from hypha.messages"


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_every_message_is_documented(cls: type[M.Message]) -> None:
    assert cls.__doc__ and not cls.__doc__.startswith(f"{cls.__name__}(")
