"""One representative value of every message type, and strategies that draw any valid one."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

import hypha.messages as M
from hypha.messages import _codec as C

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
PEER2 = "QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"
ID1 = "0123456789abcdef0123456789abcdef"
ID2 = "fedcba9876543210fedcba9876543210"
T0 = 1_790_000_000.25

RESOURCES = M.Resources(cpu=3.5, memory=24 << 30, storage=200 << 30, gpu=1)
PROCESS = M.Executor(kind="process", name="train", runtime="python3.11")
PS = M.Executor(kind="parameter-server", name="diloco-ps", runtime="torch-2.13")
JOB = M.JobSpec(
    id=ID2,
    executor=PROCESS,
    config={"model": "gpt2-small", "lr": 3e-4, "inner_steps": 500, "bf16": True, "empty": ""},
    resources=[
        M.Fetch(source="peer", peer=PEER2, path="weights/model.safetensors"),
        M.Fetch(source="data", dataset="fineweb-edu.10b", path="data/"),
        M.Fetch(source="data", peer=PEER, dataset="fineweb-edu.10b", path="data/"),
        M.Fetch(source="path", path="/opt/hypha/train.py"),
    ],
)

SAMPLES: dict[type[M.Message], M.Message] = {s.__class__: s for s in [
    RESOURCES,
    PROCESS,
    M.WorkerRequest(id=ID1, scheduler=PEER, resources=RESOURCES, executor=PROCESS, bid=2.5,
                    deadline=T0 + 5, lease_ttl=30.0),
    M.WorkerOffer(request_id=ID1, worker=PEER2, resources=RESOURCES, executors=[PROCESS, PS],
                  price=2.25, lease_id=ID2, lease_expires=T0 + 30),
    M.OfferReceived(request_id=ID1),
    M.RenewLease(lease_id=ID2, ttl=3600.0),
    M.LeaseRenewed(lease_id=ID2, expires=T0 + 3600),
    M.Fetch(source="peer", peer=PEER, path="weights/model.safetensors"),
    JOB,
    M.DispatchJob(lease_id=ID1, job=JOB),
    M.JobAccepted(job_id=ID2),
    M.StopJob(job_id=ID2, reason="lease expired — rescheduling"),
    M.JobStopped(job_id=ID2),
    M.JobStatus(job_id=ID2, lease_id=ID1, state="failed", message="CUDA out of memory",
                exit_code=-9, time=T0),
    M.StatusReceived(job_id=ID2),
    M.MetricsReport(job_id=ID2, step=1500,
                    values={"loss": 2.875, "train/tokens_per_s": 41_000.0, "lr": 3e-4},
                    time=T0),
    M.MetricsReceived(job_id=ID2, round=3, batches=41, parameter_server=PEER2),
    M.RoundPlanRequest(job_id=ID2, round=3),
    M.RoundPlan(round=3, workers=[PEER, PEER2], timeout=60.0),
    M.DataSliceRequest(job_id=ID2, dataset="fineweb-edu.10b"),
    M.DataSliceAssignment(dataset="fineweb-edu.10b", slice=17, epoch=2, provider=PEER),
    M.DataSliceDone(job_id=ID2, dataset="fineweb-edu.10b", slice=17, epoch=2),
    M.DataSliceRecorded(dataset="fineweb-edu.10b", slice=17),
    M.FetchSlice(dataset="fineweb-edu.10b", slice=17),
    M.SliceComing(dataset="fineweb-edu.10b", slice=17, size=512 << 20,
                  stream="fineweb-edu.10b/17"),
    M.FetchFile(path="weights/model.safetensors"),
    M.FileComing(path="weights/model.safetensors", size=5 << 20, sha256="ab" * 32,
                 stream="file-fetch:00112233445566778899aabbccddeeff"),
    M.HealthCheck(),
    M.Health(status="ok", role="worker", version="0.1.0", uptime=12.5),
]}

#: Every message class the package exports.
MESSAGE_TYPES = sorted((getattr(M, name) for name in M.__all__
                        if isinstance(getattr(M, name), type)
                        and issubclass(getattr(M, name), M.Message)
                        and getattr(M, name) is not M.Message), key=lambda c: c.__name__)


def _spec(spec: C._Spec) -> st.SearchStrategy[Any]:
    """Any valid value of one field (short strings and lists, to keep examples cheap)."""
    if isinstance(spec, C._Str):
        text = spec.text
        if spec.regex is not None and text.pattern != r"[^\x00]*":
            return st.from_regex(spec.regex, fullmatch=True).filter(
                lambda s: text.min_len <= len(s) <= text.max_len)
        alphabet = st.characters(codec="utf-8", exclude_characters="\x00")
        return st.text(alphabet, min_size=text.min_len, max_size=min(text.max_len, 24))
    if isinstance(spec, C._Int):
        return st.integers(spec.lo, spec.hi)
    if isinstance(spec, C._Float):
        b = spec.bounds
        return st.floats(min_value=b.gt if b.ge is None else b.ge,
                         max_value=b.lt if b.le is None else b.le,
                         exclude_min=b.gt is not None, exclude_max=b.lt is not None,
                         allow_nan=False, allow_infinity=False)
    if isinstance(spec, C._Bool):
        return st.booleans()
    if isinstance(spec, C._Choice):
        return st.sampled_from(spec.choices)
    if isinstance(spec, C._Nested):
        return messages(spec.cls)
    if isinstance(spec, C._List):
        return st.lists(_spec(spec.item), max_size=min(spec.max_items, 3))
    if isinstance(spec, C._Map):
        return st.dictionaries(_spec(spec.key), _spec(spec.value),
                               max_size=min(spec.max_items, 4))
    if isinstance(spec, C._Optional):
        return st.none() | _spec(spec.inner)
    if isinstance(spec, C._Scalars):
        return st.one_of([_spec(s) for s in spec.options.values()])
    raise AssertionError(f"no strategy for {spec!r}")


def _fields(cls: type[M.Message]) -> dict[str, st.SearchStrategy[Any]]:
    return {name: _spec(spec) for name, spec in C._SCHEMAS[cls].fields.items()}


def messages(cls: type[M.Message]) -> st.SearchStrategy[Any]:
    """Any valid message of type ``cls``."""
    if cls is M.Fetch:  # its fields depend on one another
        f = _fields(M.Fetch)
        return st.one_of(
            st.builds(M.Fetch, source=st.just("peer"), peer=f["peer"].filter(bool),
                      path=f["path"]),
            st.builds(M.Fetch, source=st.just("data"), peer=f["peer"], path=f["path"],
                      dataset=f["dataset"].filter(bool)),
            st.builds(M.Fetch, source=st.just("path"), path=f["path"]),
        )
    if cls is M.MetricsReceived:  # the instruction's three fields come together
        f = _fields(M.MetricsReceived)
        return st.one_of(
            st.builds(M.MetricsReceived, job_id=f["job_id"]),
            st.builds(M.MetricsReceived, job_id=f["job_id"], round=f["round"].filter(
                lambda r: r is not None), batches=f["batches"].filter(lambda b: b is not None),
                parameter_server=f["parameter_server"].filter(lambda p: p is not None)),
        )
    if cls is M.RoundPlan:  # the workers are distinct
        f = _fields(M.RoundPlan)
        return st.builds(M.RoundPlan, round=f["round"], timeout=f["timeout"],
                         workers=f["workers"].map(lambda ws: list(dict.fromkeys(ws))))
    return st.builds(cls, **_fields(cls))


def raw(message: M.Message) -> dict[str, Any]:
    """A message's wire form as plain Python data, to be mutated and packed again."""
    import msgpack

    out: dict[str, Any] = msgpack.unpackb(M.encode(message))
    return out
