"""Every rule a message enforces, built in code and decoded from bytes, with the error it gives."""

from __future__ import annotations

import copy
import pickle
import re
from collections.abc import Callable
from typing import Any

import msgpack
import pytest

import hypha.messages as M
from tests.unit.messages._samples import ID1, PEER, PROCESS, RESOURCES, SAMPLES, raw


def _decode_mutated(cls: type[M.Message], mutate: Callable[[dict[str, Any]], None]) -> None:
    wire = copy.deepcopy(raw(SAMPLES[cls]))
    mutate(wire)
    M.decode(cls, msgpack.packb(wire))


def _set(path: str, value: object) -> Callable[[dict[str, Any]], None]:
    """A mutation setting a dotted path (``resources.memory``, ``executors.0.name``)."""
    *parents, last = path.split(".")

    def mutate(wire: dict[str, Any]) -> None:
        node: Any = wire
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        node[int(last) if isinstance(node, list) else last] = value

    return mutate


def _delete(name: str) -> Callable[[dict[str, Any]], None]:
    return lambda wire: wire.pop(name)


LONG = "x" * 1025
DECODE_CASES = [
    # unknown and missing fields
    (M.WorkerOffer, _set("bogus", 1),
     "WorkerOffer: unknown field 'bogus'; allowed fields: request_id, worker, resources, "
     "executors, price, lease_id, lease_expires"),
    (M.WorkerOffer, _set("resources.disk", 1),
     "WorkerOffer: resources: unknown field 'disk'; allowed fields: cpu, memory, storage, gpu"),
    (M.HealthCheck, _set("status", "ok"),
     "HealthCheck: unknown field 'status'; allowed fields: none"),
    (M.WorkerOffer, _delete("price"), "WorkerOffer: price: missing; allowed: a finite number > 0"),
    (M.JobStatus, _delete("exit_code"),  # optional fields are still on the wire (as nil)
     "JobStatus: exit_code: missing; allowed: an integer in [-255, 255], or None"),
    # wrong types
    (M.WorkerOffer, _set("price", "cheap"),
     "WorkerOffer: price: got a string ('cheap'); allowed: a finite number > 0"),
    (M.WorkerOffer, _set("resources", [1, 2]),
     "WorkerOffer: resources: got a list of 2 items; allowed: a Resources"),
    (M.WorkerOffer, _set("executors", {"kind": "process"}),
     "WorkerOffer: executors: got a map of 1 entry; allowed: a list of at most 32 items"),
    (M.WorkerOffer, _set("request_id", None),
     "WorkerOffer: request_id: got None; allowed: an id of 32 lower-case hex digits"),
    (M.Health, _set("uptime", None), "Health: uptime: got None; allowed: a finite number >= 0"),
    (M.JobSpec, _set("config.model", [1]),
     "JobSpec: config['model']: got a list of 1 item; allowed: a string of at most 4096 "
     "characters, a 64-bit integer, a finite number or a bool (true or false)"),
    # bool is not an int (nor a float)
    (M.WorkerOffer, _set("resources.gpu", True),
     "WorkerOffer: resources.gpu: got a bool (True); allowed: an integer >= 0"),
    (M.MetricsReport, _set("step", False),
     "MetricsReport: step: got a bool (False); allowed: an integer >= 0"),
    (M.WorkerOffer, _set("price", True),
     "WorkerOffer: price: got a bool (True); allowed: a finite number > 0"),
    (M.JobStatus, _set("exit_code", True),
     "JobStatus: exit_code: got a bool (True); allowed: an integer in [-255, 255]"),
    # floats are finite
    (M.WorkerOffer, _set("price", float("nan")),
     "WorkerOffer: price: got nan; allowed: a finite number > 0"),
    (M.WorkerOffer, _set("resources.cpu", float("inf")),
     "WorkerOffer: resources.cpu: got inf; allowed: a finite number >= 0"),
    (M.MetricsReport, _set("values.loss", float("-inf")),
     "MetricsReport: values['loss']: got -inf; allowed: a finite number"),
    (M.JobSpec, _set("config.lr", float("nan")), "JobSpec: config['lr']: got nan"),
    # ranges
    (M.WorkerOffer, _set("resources.memory", -1),
     "WorkerOffer: resources.memory: got -1; allowed: an integer >= 0"),
    (M.WorkerOffer, _set("resources.cpu", -0.5),
     "WorkerOffer: resources.cpu: got -0.5; allowed: a finite number >= 0"),
    (M.WorkerOffer, _set("price", 0.0), "WorkerOffer: price: got 0.0; allowed: a finite number > 0"),
    (M.WorkerRequest, _set("lease_ttl", 3600.5),
     "WorkerRequest: lease_ttl: got 3600.5; allowed: a finite number > 0 and <= 3600"),
    (M.RenewLease, _set("ttl", 0), "RenewLease: ttl: got 0.0; allowed: a finite number > 0 and "
     "<= 3600"),
    (M.WorkerRequest, _set("deadline", -1.0),
     "WorkerRequest: deadline: got -1.0; allowed: a finite number >= 0"),
    (M.JobStatus, _set("exit_code", 256),
     "JobStatus: exit_code: got 256; allowed: an integer in [-255, 255]"),
    (M.JobStatus, _set("exit_code", -256), "JobStatus: exit_code: got -256"),
    (M.MetricsReport, _set("step", 2**64 - 1),  # msgpack's uint64: beyond a signed 64-bit int
     "MetricsReport: step: got 18446744073709551615; allowed: an integer >= 0"),
    # strings: length, pattern, enums
    (M.StopJob, _set("reason", LONG),
     "StopJob: reason: got 'xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx'... (1025 characters); "
     "allowed: a string of at most 1024 characters"),
    (M.JobSpec, _set("config.model", "y" * 4097), "JobSpec: config['model']: got 'yyy"),
    (M.Health, _set("version", ""),
     "Health: version: got ''; allowed: a string of 1-64 characters"),
    (M.JobStatus, _set("state", "done"),
     "JobStatus: state: got 'done'; allowed: one of 'starting', 'running', 'finished', "
     "'failed', 'stopped'"),
    (M.Health, _set("role", "Worker"), "Health: role: got 'Worker'; allowed: one of 'gateway'"),
    (M.WorkerOffer, _set("executors.1.name", "Diloco PS"),
     "WorkerOffer: executors[1].name: got 'Diloco PS'; allowed: a string of 1-64 characters "
     "matching [a-z0-9._-]{1,64}"),
    (M.WorkerOffer, _set("executors.0.kind", "thread"),
     "WorkerOffer: executors[0].kind: got 'thread'; allowed: one of 'process', "
     "'parameter-server'"),
    (M.DataSliceRequest, _set("dataset", "FineWeb"), "DataSliceRequest: dataset: got 'FineWeb'"),
    (M.DispatchJob, _set("job.resources.0.path", "a\x00b"),
     "DispatchJob: job.resources[0].path: got 'a\\x00b'; allowed: a string of at most 1024 "
     "characters, no NUL"),
    # peer ids and ids
    (M.WorkerOffer, _set("worker", "12D3KooW0OIl" + "a" * 20),  # 0, O, I, l are not base58
     "WorkerOffer: worker: got '12D3KooW0OIlaaaaaaaaaaaaaaaaaaaa'; allowed: a base58 peer id "
     "(20-128 characters of [1-9A-HJ-NP-Za-km-z])"),
    (M.WorkerOffer, _set("worker", "12D3KooW"), "WorkerOffer: worker: got '12D3KooW'"),
    (M.WorkerOffer, _set("worker", PEER + "\n"), "WorkerOffer: worker: got '12D3KooWD3eck"),
    (M.WorkerOffer, _set("worker", "1" * 129), "WorkerOffer: worker: got '1111111111111111111111"
     "111111111111111111'... (129 characters)"),
    (M.WorkerOffer, _set("request_id", ID1.upper()),
     "WorkerOffer: request_id: got '0123456789ABCDEF0123456789ABCDEF'; allowed: an id of 32 "
     "lower-case hex digits (uuid4().hex)"),
    (M.WorkerOffer, _set("lease_id", ID1[:-1]), "WorkerOffer: lease_id: got '0123456789abcdef0"),
    (M.WorkerOffer, _set("lease_id", "g" * 32), "WorkerOffer: lease_id: got 'gggg"),
    # lists and maps: sizes, keys
    (M.WorkerOffer, _set("executors", [raw(PROCESS)] * 33),
     "WorkerOffer: executors: got 33 items; allowed: a list of at most 32 items"),
    (M.MetricsReport, _set("values", {f"m{i}": 1.0 for i in range(129)}),
     "MetricsReport: values: got 129 entries; allowed: a map of at most 128 entries"),
    (M.MetricsReport, _set("values", {"bad key": 1.0}),
     "MetricsReport: values: got the key 'bad key'; allowed: keys that are a string of 1-64 "
     "characters matching [A-Za-z0-9_./-]{1,64}"),
    (M.MetricsReport, _set("values", {"k" * 65: 1.0}), "MetricsReport: values: got the key 'kkk"),
    (M.JobSpec, _set("config", {"": 1}), "JobSpec: config: got the key ''; allowed: keys that"),
    (M.JobSpec, _set("resources", [{"source": "path", "peer": None, "path": "x",
                                    "dataset": None}] * 257),
     "JobSpec: resources: got 257 items; allowed: a list of at most 256 items"),
    # cross-field rules, reached through nesting
    (M.DispatchJob, _set("job.resources.0.peer", None),
     "DispatchJob: job.resources[0].peer: missing; allowed: a peer id when source is 'peer'"),
    (M.DispatchJob, _set("job.resources.1.dataset", None),
     "DispatchJob: job.resources[1].dataset: missing; allowed: a dataset name when source"),
    (M.DispatchJob, _set("job.resources.3.peer", PEER),
     "DispatchJob: job.resources[3].peer: got a peer id; allowed: None when source is 'path'"),
    # the schema version
    (M.Health, _set("v", 2),
     "Health: v: unsupported schema version 2 (this node reads version 1); allowed: 1"),
    (M.Health, _set("v", 0), "Health: v: unsupported schema version 0"),
    (M.Health, _set("v", "1"), "Health: v: got a string ('1') as the schema version; allowed: 1"),
    (M.Health, _set("v", True), "Health: v: got a bool (True) as the schema version"),
    (M.Health, _set("v", 1.0), "Health: v: got a float (1.0) as the schema version"),
    (M.Health, _delete("v"), "Health: v: missing schema version; allowed: 1"),
]


@pytest.mark.parametrize(("cls", "mutate", "message"), DECODE_CASES,
                         ids=[f"{i}-{c[0].__name__}" for i, c in enumerate(DECODE_CASES)])
def test_decode_refuses(cls: type[M.Message], mutate: Callable[[dict[str, Any]], None],
                        message: str) -> None:
    with pytest.raises(M.MessageError) as info:
        _decode_mutated(cls, mutate)
    assert str(info.value).startswith(message)
    assert isinstance(info.value, ValueError)
    assert info.value.message_type == cls.__name__


def _packed(obj: object) -> bytes:
    return msgpack.packb(obj)


HEALTH = dict(raw(SAMPLES[M.Health]))
BYTES_CASES = [
    # not a map at the top
    (M.WorkerOffer, _packed(5), r"WorkerOffer: got an integer \(5\) at the top level; allowed: "
     "a map$"),
    (M.WorkerOffer, _packed("hello"), r"WorkerOffer: got a string \('hello'\) at the top level"),
    (M.WorkerOffer, _packed([1, 2]), "WorkerOffer: got a list of 2 items at the top level"),
    (M.WorkerOffer, _packed(None), "WorkerOffer: got None at the top level"),
    (M.HealthCheck, _packed([]), r"HealthCheck: not valid msgpack for this message \(0 exceeds "
     r"max_array_len\(0\)\)|HealthCheck: got a list"),
    # keys must be unique strings
    (M.Health, _packed({1: 2}), r"Health: got a map key that is an integer \(1\); allowed: "
     "string keys"),
    (M.Health, _packed({b"v": 1}), r"Health: not valid msgpack for this message \(1 exceeds "
     r"max_bin_len\(0\)\)"),  # no binary anywhere, keys included
    (M.Health, b"\x82\xa1v\x01\xa1v\x01", "Health: got the key 'v' twice in one map; allowed: "
     "unique keys"),
    (M.Health, _packed({**HEALTH, "status": "ok"}).replace(b"\x85", b"\x86") + b"\xa6status\xa2ok",
     "Health: got the key 'status' twice"),
    # no binary or extension types, no trailing or missing bytes
    (M.Health, _packed({**HEALTH, "version": b"0.1.0"}), "Health: not valid msgpack for this "
     r"message \(5 exceeds max_bin_len\(0\)\)"),
    (M.Health, _packed({**HEALTH, "version": msgpack.ExtType(1, b"x")}),
     "Health: not valid msgpack for this message"),
    (M.Health, _packed(HEALTH) + b"\x00", r"Health: not valid msgpack for this message \(unpack"),
    (M.Health, _packed(HEALTH)[:-1], r"Health: not valid msgpack for this message \(Unpack "
     "failed: incomplete input\\)"),
    (M.Health, b"", "Health: not valid msgpack for this message"),
    (M.Health, b"\xc1", "Health: not valid msgpack for this message"),  # the never-used byte
    (M.Health, b"\x81\xa1v\xa3\xed\xa0\x80",  # a UTF-8-encoded surrogate
     r"Health: not valid msgpack for this message \('utf-8' codec can't decode"),
    # size limits, from the length alone
    (M.WorkerOffer, b"\x00" * (64 << 10 | 1),
     "WorkerOffer: got 65537 bytes; allowed: at most 65536 bytes"),
    (M.WorkerRequest, b"\x00" * (16 << 10 | 1),
     "WorkerRequest: got 16385 bytes; allowed: at most 16384 bytes"),
    (M.DispatchJob, b"\x00" * ((1 << 20) + 1),
     "DispatchJob: got 1048577 bytes; allowed: at most 1048576 bytes"),
    # a string, list or map longer than any the schema allows is refused by the parser
    (M.Health, _packed({**HEALTH, "version": "9" * 300}),
     r"Health: version: got '9999999999999999999999999999999999999999'\.\.\. \(300 characters\)"),
    (M.Health, _packed({**HEALTH, "version": "9" * 1000}), r"Health: not valid msgpack for this "
     r"message \(1000 exceeds max_str_len\(512\)\)"),
    (M.WorkerOffer, _packed({"v": 1, "executors": [0] * 65}),
     r"WorkerOffer: not valid msgpack for this message \(65 exceeds max_array_len\(64\)\)"),
    (M.Health, _packed({f"k{i}": 0 for i in range(30)}),
     r"Health: not valid msgpack for this message \(30 exceeds max_map_len\(16\)\)"),
    # nesting: no more maps and lists than the schema holds, and never deeper than msgpack's stack
    (M.DispatchJob, b"\x91" * 600 + b"\x90",
     r"DispatchJob: got more than 522 maps and lists; allowed: far fewer"),
    (M.MetricsReport, b"\x81\xa1v" + b"\x91" * 20 + b"\x01",
     r"MetricsReport: got more than 16 maps and lists"),
    (M.WorkerOffer, _packed({"v": 1, "executors": [[{}] * 16] * 16}),  # wide, not deep
     r"WorkerOffer: got more than 70 maps and lists"),
    (M.DispatchJob, b"\x91" * 5000 + b"\x90",
     "DispatchJob: got msgpack nested deeper than the parser's stack"),
    (M.DispatchJob, _packed({**raw(SAMPLES[M.DispatchJob]), "lease_id": [[[[[["x"]]]]]]}),
     r"DispatchJob: lease_id: got a list of 1 item; allowed: an id of 32"),
]


@pytest.mark.parametrize(("cls", "data", "message"), BYTES_CASES,
                         ids=[f"{i}-{c[0].__name__}" for i, c in enumerate(BYTES_CASES)])
def test_decode_refuses_bytes(cls: type[M.Message], data: bytes, message: str) -> None:
    with pytest.raises(M.MessageError, match="^" + message):
        M.decode(cls, data)


def test_decode_takes_only_bytes() -> None:
    with pytest.raises(TypeError, match="decode\\(\\) takes bytes, not str"):
        M.decode(M.Health, "{}")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is not a hypha message type"):
        M.decode(dict, b"\x80")  # type: ignore[type-var]


R = RESOURCES
CONSTRUCT_CASES: list[tuple[Callable[[], object], str]] = [
    (lambda: M.Resources(cpu=-1), "Resources: cpu: got -1.0; allowed: a finite number >= 0"),
    (lambda: M.Resources(memory=-(1 << 30)), "Resources: memory: got -1073741824; allowed: an "
     "integer >= 0"),
    (lambda: M.Resources(gpu=True), r"Resources: gpu: got a bool \(True\); allowed: an integer"),
    (lambda: M.Resources(memory=1.5),  # type: ignore[arg-type]
     r"Resources: memory: got a float \(1\.5\); allowed: an integer >= 0"),
    (lambda: M.Resources(memory=1 << 63), "Resources: memory: got 9223372036854775808; "
     "allowed: an integer >= 0"),
    (lambda: M.Resources(memory=10**400), "Resources: memory: got an integer of 1329 bits"),
    (lambda: M.Resources(cpu=10**400), "Resources: cpu: got an integer of 1329 bits"),
    (lambda: M.Resources(cpu=float("nan")), "Resources: cpu: got nan"),
    (lambda: M.Resources(cpu="2"),  # type: ignore[arg-type]
     r"Resources: cpu: got a string \('2'\)"),
    (lambda: M.Executor(kind="process", name="x", runtime="python 3"),
     r"Executor: runtime: got 'python 3'; allowed: a string of 1-64 characters matching "
     r"\[A-Za-z0-9\._\+-\]\{1,64\}"),
    (lambda: M.WorkerOffer(request_id=ID1, worker=PEER, resources={"cpu": 1},  # type: ignore[arg-type]
                           executors=[], price=1.0, lease_id=ID1, lease_expires=0.0),
     r"WorkerOffer: resources: got a map of 1 entry; allowed: a Resources"),
    (lambda: M.WorkerOffer(request_id=ID1, worker=PEER, resources=R, executors="process",  # type: ignore[arg-type]
                           price=1.0, lease_id=ID1, lease_expires=0.0),
     r"WorkerOffer: executors: got a string \('process'\); allowed: a list of at most 32"),
    (lambda: M.WorkerOffer(request_id=ID1, worker=PEER, resources=R, executors=[R],  # type: ignore[list-item]
                           price=1.0, lease_id=ID1, lease_expires=0.0),
     r"WorkerOffer: executors\[0\]: got a Resources; allowed: an Executor"),
    (lambda: M.MetricsReport(job_id=ID1, step=0, values={1: 1.0}, time=0.0),  # type: ignore[dict-item]
     r"MetricsReport: values: got the key an integer \(1\); allowed: keys that are"),
    (lambda: M.MetricsReport(job_id=ID1, step=0, values=[("a", 1.0)], time=0.0),  # type: ignore[arg-type]
     "MetricsReport: values: got a list of 1 item; allowed: a map of at most 128 entries"),
    (lambda: M.StopJob(job_id=ID1, reason="\udc80"),
     "StopJob: reason: got a string that is not valid Unicode"),
    (lambda: M.Fetch(source="peer", path="w"), "Fetch: peer: missing; allowed: a peer id when "
     "source is 'peer'"),
    (lambda: M.Fetch(source="data", path="d"), "Fetch: dataset: missing"),
    (lambda: M.Fetch(source="peer", peer=PEER, path="w", dataset="x"),
     "Fetch: dataset: got 'x'; allowed: None when source is 'peer'"),
    (lambda: M.Fetch(source="url", path="w"),  # type: ignore[arg-type]
     "Fetch: source: got 'url'; allowed: one of 'peer', 'data', 'path'"),
    (lambda: M.encode(M.DispatchJob(lease_id=ID1, job=M.JobSpec(
        id=ID1, executor=PROCESS, config={f"k{i}": "x" * 4096 for i in range(256)},
        resources=[]))),
     r"DispatchJob: encodes to 10\d{5} bytes; allowed: at most 1048576 bytes"),
]


@pytest.mark.parametrize(("build", "message"), CONSTRUCT_CASES,
                         ids=[str(i) for i in range(len(CONSTRUCT_CASES))])
def test_construction_refuses(build: Callable[[], object], message: str) -> None:
    with pytest.raises(M.MessageError, match="^" + message):
        build()


def test_boundaries_are_inclusive_where_documented() -> None:
    M.RenewLease(lease_id=ID1, ttl=3600)
    M.JobStatus(job_id=ID1, lease_id=ID1, state="failed", exit_code=-255, time=0)
    M.JobStatus(job_id=ID1, lease_id=ID1, state="failed", exit_code=255, time=0)
    M.StopJob(job_id=ID1, reason="é" * 1024)  # characters, not bytes
    M.Resources(memory=(1 << 63) - 1)
    M.Executor(kind="process", name="a" * 64, runtime="r" * 64)
    M.WorkerOffer(request_id=ID1, worker="1" * 20, resources=R, executors=[PROCESS] * 32,
                  price=1e-9, lease_id=ID1, lease_expires=0)
    M.MetricsReport(job_id=ID1, step=0, values={f"m{i}": 0.0 for i in range(128)}, time=0)
    big = M.JobSpec(id=ID1, executor=PROCESS, config={"k" * 64: "x"}, resources=[
        M.Fetch(source="path", path="p" * 1024)] * 256)
    job = M.DispatchJob(lease_id=ID1, job=big)
    assert M.decode(M.DispatchJob, M.encode(job)) == job


def test_message_error_is_structured_and_pickles() -> None:
    with pytest.raises(M.MessageError) as info:
        _decode_mutated(M.WorkerOffer, _set("resources.memory", -1))
    err = info.value
    assert (err.message_type, err.path) == ("WorkerOffer", "resources.memory")
    assert err.problem == "got -1; allowed: an integer >= 0"
    again = pickle.loads(pickle.dumps(err))
    assert type(again) is M.MessageError and str(again) == str(err)


def test_error_messages_stay_short_whatever_the_input() -> None:
    with pytest.raises(M.MessageError) as info:
        _decode_mutated(M.JobStatus, _set("message", "é" * 5000))
    assert len(str(info.value)) < 200
    assert re.search(r"\(5000 characters\)", str(info.value))


def test_the_sync_instruction_and_the_round_plan_check_themselves() -> None:
    job, peer = "a" * 32, "12D3KooWabcdefghijkmnopqrstuvwxyz"
    with pytest.raises(M.MessageError, match="come together"):
        M.MetricsReceived(job_id=job, round=1)
    with pytest.raises(M.MessageError, match="come together"):
        M.MetricsReceived(job_id=job, batches=3, parameter_server=peer)
    with pytest.raises(M.MessageError, match="batches"):
        M.MetricsReceived(job_id=job, round=1, batches=0, parameter_server=peer)
    with pytest.raises(M.MessageError, match="lists a peer twice"):
        M.RoundPlan(round=0, workers=[peer, peer], timeout=1.0)
    for timeout in (0.0, -1.0, 86401.0):
        with pytest.raises(M.MessageError, match="timeout"):
            M.RoundPlan(round=0, workers=[peer], timeout=timeout)
    assert M.decode(M.RoundPlan, M.encode(M.RoundPlan(round=2, workers=[peer], timeout=5.0))) \
        == M.RoundPlan(round=2, workers=[peer], timeout=5.0)
