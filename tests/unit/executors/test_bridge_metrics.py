"""``POST /metrics``: the bridge's checks, the local backend's answer, and the network backend's
forwarding to the scheduler (latest wins, never blocks, never fails the script)."""

from __future__ import annotations

import json
import math
import typing
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import pytest
import trio
import trio.testing
from libp2p.peer.id import ID

from hypha.executors import BridgeError, JobBridge, LocalBackend
from hypha.executors.bridge import MAX_METRICS, METRIC_NAME
from hypha.executors.local import Report
from hypha.executors.network import METRICS_INTERVAL, NetworkBackend, StreamRouter
from hypha.messages import (
    PROTOCOLS,
    MessageError,
    MetricsReceived,
    MetricsReport,
    decode,
    encode,
)
from hypha.messages.metrics import MetricName
from hypha.net import DialError, Network
from tests.unit.executors._http import request

pytestmark = pytest.mark.timeout(30)

JOB = "0123456789abcdef0123456789abcdef"
SERVER = ID(b"\x00\x24" + bytes(range(36))).to_base58()


@asynccontextmanager
async def serving(work_dir: Path, backend: Any) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        path = await nursery.start(JobBridge(work_dir, backend, job_id=JOB).serve)
        yield path
        nursery.cancel_scope.cancel()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


def test_the_bridge_limits_are_the_messages_limits() -> None:
    """The bridge checks what MetricsReport will: the same name pattern and item limit."""
    assert METRIC_NAME.pattern == typing.get_args(MetricName)[1].pattern

    def report(values: dict[str, float]) -> MetricsReport:
        return MetricsReport(job_id=JOB, step=0, values=values, time=0.0)

    report({f"m{i}": 1.0 for i in range(MAX_METRICS)})
    with pytest.raises(MessageError):
        report({f"m{i}": 1.0 for i in range(MAX_METRICS + 1)})
    for name in ("loss", "train/tokens_per_s", "a.b-c_d", "x" * 64):
        assert METRIC_NAME.fullmatch(name)
        report({name: 1.0})
    for name in ("", "bad name", "x" * 65, "é"):
        assert not METRIC_NAME.fullmatch(name)
        with pytest.raises(MessageError):
            report({name: 1.0})


async def test_a_report_reaches_the_backend_and_the_instruction_comes_back(work: Path) -> None:
    backend = LocalBackend(work, instruction={"round": 2, "batches": 40,
                                              "parameter_server": SERVER})
    with trio.fail_after(10):
        async with serving(work, backend) as path:
            reply = await request(path, "POST", "/metrics",
                                  {"step": 7, "values": {"loss": 2.5, "train/tokens_per_s": 1e5,
                                                         "round": 2}})
            assert reply.status == 200, reply.body
            assert reply.json == {"round": 2, "batches": 40, "parameter_server": SERVER}
            backend.instruction = {"round": None, "batches": None, "parameter_server": None}
            empty = await request(path, "POST", "/metrics", {"step": 8, "values": {}})
            assert empty.json == {"round": None, "batches": None, "parameter_server": None}
    assert list(backend.reports) == [
        Report(7, {"loss": 2.5, "train/tokens_per_s": 1e5, "round": 2.0}), Report(8, {})]
    assert all(isinstance(v, float) for v in backend.reports[0].values.values())


async def test_the_local_backend_answers_nothing_by_default(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            reply = await request(path, "POST", "/metrics", {"step": 0, "values": {"loss": 1}})
    assert (reply.status, reply.json) == (200, {"round": None, "batches": None,
                                                "parameter_server": None})


MANY = {f"m{i}": 1.0 for i in range(MAX_METRICS + 1)}


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "request body is not valid JSON"),
    (b"", "expected a JSON object as the request body"),
    ([1, 2], "expected a JSON object, got list"),
    ({"values": {}}, "missing 'step'"),
    ({"step": -1, "values": {}}, "step must be an integer from 0 to"),
    ({"step": True, "values": {}}, "step must be an integer from 0 to 9223372036854775807, "
                                   "got True"),
    ({"step": 1.5, "values": {}}, "step must be an integer"),
    ({"step": "3", "values": {}}, "step must be an integer"),
    ({"step": 1 << 64, "values": {}}, "step must be an integer"),
    ({"step": 1}, "values must be a JSON object of metric name → number, got nothing"),
    ({"step": 1, "values": [1]}, "values must be a JSON object of metric name → number, got "
                                 "list"),
    (b'{"step": 1, "values": {"loss": NaN}}', "value of 'loss' must be finite, got nan"),
    (b'{"step": 1, "values": {"loss": Infinity}}', "value of 'loss' must be finite"),
    (b'{"step": 1, "values": {"loss": 1e999}}', "value of 'loss' must be finite"),
    ({"step": 1, "values": {"loss": 10 ** 400}}, "value of 'loss' must be finite"),
    ({"step": 1, "values": {"loss": "2.5"}}, "value of 'loss' must be a number, got '2.5'"),
    ({"step": 1, "values": {"loss": True}}, "value of 'loss' must be a number, got True"),
    ({"step": 1, "values": {"loss": None}}, "value of 'loss' must be a number"),
    ({"step": 1, "values": {"bad name": 1}}, "metric name 'bad name' is not 1-64 characters"),
    ({"step": 1, "values": {"": 1}}, "metric name '' is not"),
    ({"step": 1, "values": {"x" * 65: 1}}, "is not 1-64 characters"),
    ({"step": 1, "values": MANY}, f"at most {MAX_METRICS} values per report, got "
                                  f"{MAX_METRICS + 1}"),
    ({"step": 1, "values": {}, "job": "x"}, "unknown field(s) 'job'; expected step, values"),
])
async def test_malformed_reports_are_refused(work: Path, body: object, message: str) -> None:
    backend = LocalBackend(work)
    with trio.fail_after(10):
        async with serving(work, backend) as path:
            reply = await request(path, "POST", "/metrics", body)
    assert reply.status == 400, reply.body
    assert message in reply.json["error"], reply.json
    assert not backend.reports


async def test_metrics_takes_only_post(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            reply = await request(path, "GET", "/metrics")
    assert reply.status == 405 and reply.headers["allow"] == "POST"


def test_local_backend_arguments(work: Path) -> None:
    with pytest.raises(ValueError, match="max_reports"):
        LocalBackend(work, max_reports=0)
    backend = LocalBackend(work, max_reports=2)
    for step in range(3):
        trio.run(backend.report, step, {"loss": 1.0})
    assert [r.step for r in backend.reports] == [1, 2]


# --- the network backend -----------------------------------------------------------------------


class FakeNet:
    """The part of a Network that metrics use: ``request`` to the scheduler."""

    def __init__(self) -> None:
        self.peer_id = ID(b"\x00\x24" + bytes(36))
        self.reports: list[MetricsReport] = []
        self.gate: trio.Event | None = None  #: when set, requests wait for it
        self.failure: Exception | None = None
        self.answer: dict[str, Any] = {"round": 1, "batches": 30, "parameter_server": SERVER}
        self.wrong_job = False

    async def request(self, peer: ID, protocol: Any, payload: bytes) -> bytes:
        assert protocol is PROTOCOLS["metrics"]
        report = decode(MetricsReport, payload)
        self.reports.append(report)
        if self.gate is not None:
            await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        job = "f" * 32 if self.wrong_job else report.job_id
        return encode(MetricsReceived(job_id=job, **self.answer))


@asynccontextmanager
async def network_backend(work: Path, net: FakeNet) -> AsyncIterator[NetworkBackend]:
    backend = NetworkBackend(cast(Network, net), StreamRouter(), job_id=JOB,
                             scheduler=ID(b"\x00\x24" + bytes([7] * 36)), work_dir=work,
                             counts=Counter())
    async with trio.open_nursery() as nursery:
        await nursery.start(backend.run)
        yield backend
        await backend.aclose()


async def _until(condition: Any) -> None:
    while not condition():
        await trio.sleep(0.01)


async def test_reports_go_out_in_the_background_and_the_latest_wins(
        work: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    net.gate = trio.Event()
    async with network_backend(work, net) as backend:
        none = {"round": None, "batches": None, "parameter_server": None}
        # the first report is in flight, held by the scheduler: the calls do not wait for it
        assert await backend.report(1, {"loss": 3.0}) == none
        await _until(lambda: len(net.reports) == 1)
        assert await backend.report(2, {"loss": 2.9}) == none
        assert await backend.report(3, {"loss": 2.8}) == none
        assert await backend.report(3, {"loss": 2.7}) == none  # the same step again is fine
        net.gate.set()
        await _until(lambda: len(net.reports) == 2)
        await _until(lambda: backend.counts["metrics sent"] == 2)
        # the reports in between were replaced by the latest
        assert [(r.step, dict(r.values)) for r in net.reports] == [
            (1, {"loss": 3.0}), (3, {"loss": 2.7})]
        assert all(r.job_id == JOB for r in net.reports)
        assert await backend.report(4, {}) == {"round": 1, "batches": 30,
                                               "parameter_server": SERVER}
        await _until(lambda: backend.counts["metrics sent"] == 3)
        # the scheduler's latest answer is the instruction, even when it has none
        net.answer = {"round": None, "batches": None, "parameter_server": None}
        await backend.report(5, {})
        await _until(lambda: backend.counts["metrics sent"] == 4)
        assert await backend.report(6, {}) == none
        with pytest.raises(BridgeError) as back:
            await backend.report(5, {"loss": 1.0})
        assert back.value.status == 400 and "step 5 goes back" in back.value.message
    assert backend.counts["metrics reported"] == 7
    assert backend.counts["metrics failed"] == 0


async def test_reports_are_spaced_out(work: Path, autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    async with network_backend(work, net) as backend:
        t0 = trio.current_time()
        for step in range(5):
            await backend.report(step, {"loss": 1.0})
            await _until(lambda: len(net.reports) >= 1)
        await _until(lambda s=step: net.reports[-1].step == s)
        assert len(net.reports) <= 2
        for before, after in zip(net.reports, net.reports[1:], strict=False):
            assert after.time >= before.time
        assert trio.current_time() - t0 >= METRICS_INTERVAL


async def test_a_failing_scheduler_never_fails_the_script(
        work: Path, autojump_clock: trio.testing.MockClock,
        caplog: pytest.LogCaptureFixture) -> None:
    net = FakeNet()
    async with network_backend(work, net) as backend:
        await backend.report(0, {"loss": 1.0})
        await _until(lambda: backend.counts["metrics sent"] == 1)
        instruction = {"round": 1, "batches": 30, "parameter_server": SERVER}
        net.failure = DialError("scheduler unreachable")
        for step in range(1, 4):
            assert await backend.report(step, {"loss": 1.0}) == instruction
            await _until(lambda s=step: backend.counts["metrics failed"] == s)
        # a scheduler that answers for another job is a failure too
        net.failure, net.wrong_job = None, True
        assert await backend.report(4, {}) == instruction
        await _until(lambda: backend.counts["metrics failed"] == 4)
        # one that does not answer in time
        net.wrong_job, net.gate = False, trio.Event()
        assert await backend.report(5, {}) == instruction
        await _until(lambda: backend.counts["metrics failed"] == 5)
        net.gate = None
    warnings = [r for r in caplog.records if "could not be sent" in r.getMessage()]
    assert len(warnings) == 1, "rate-limited: one warning a minute"
    assert "scheduler unreachable" in warnings[0].getMessage()
    assert backend.counts["metrics sent"] == 1


async def test_finish_sends_the_last_report(work: Path,
                                            autojump_clock: trio.testing.MockClock) -> None:
    net = FakeNet()
    async with network_backend(work, net) as backend:
        await backend.report(1, {"loss": 1.0})
        await _until(lambda: len(net.reports) == 1)
        await backend.report(9, {"loss": 0.5})  # waits out METRICS_INTERVAL
        await backend.finish()
        assert [r.step for r in net.reports] == [1, 9]
        await trio.sleep(1)
        assert [r.step for r in net.reports] == [1, 9]  # not sent twice


async def test_a_report_the_message_refuses_is_a_400(work: Path) -> None:
    net = FakeNet()
    async with network_backend(work, net) as backend:
        with pytest.raises(BridgeError) as refused:
            await backend.report(0, {"loss": math.nan})
    assert refused.value.status == 400 and "cannot be sent" in refused.value.message
    assert json.dumps(refused.value.message)
