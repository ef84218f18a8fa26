"""The parameter-server executor on real networks in one process: a stand-in scheduler answers its
round plans, stand-in trainers send it raw contributions over tensor streams and receive the
global model and the updates as files, as a training job's bridge would."""

from __future__ import annotations

import math
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.peer.id import ID

from hypha.compress import iter_encode
from hypha.executors.network import NetworkBackend, StreamRouter
from hypha.executors.parameter_server import CHECKPOINT_NAME, ParameterServerExecutor
from hypha.executors.process import JobStatus as ExecutorStatus
from hypha.messages import (
    PROTOCOLS,
    MetricsReceived,
    MetricsReport,
    RoundPlan,
    RoundPlanRequest,
    decode,
    encode,
    new_id,
)
from hypha.models import load_model, training_parameters
from hypha.net import Network, RequestRejected, open_network
from hypha.optim import OuterServer
from hypha.optim._exchange import _SHARD, pack_envelope
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(120)

MODEL = "gpt:tiny"


def _numels() -> list[int]:
    torch.manual_seed(0)
    return [p.numel() for p in training_parameters(load_model(MODEL))]


def _contribution(round_: int, numels: list[int], scale: float, codec: str = "int2",
                  ) -> bytes:
    """A worker's payload for ``round_``: the envelope, then its pseudo-gradient."""
    gen = torch.Generator().manual_seed(round_ * 100 + int(scale * 10))
    delta = [scale * torch.randn(n, generator=gen) * 1e-3 for n in numels]
    return pack_envelope(_SHARD, 0, round_) + b"".join(iter_encode(delta, codec))


class Scheduler:
    """Answers the PS's round plans (only for its job) and records its metrics."""

    def __init__(self, net: Network, ps_job: str, timeout: float) -> None:
        self.net = net
        self.ps_job = ps_job
        self.workers: list[str] = []
        self.timeout = timeout
        self.plans: list[int] = []
        self.reports: list[MetricsReport] = []
        net.serve(PROTOCOLS["round-plan"], self.on_plan)
        net.serve(PROTOCOLS["metrics"], self.on_metrics)

    async def on_plan(self, peer: ID, data: bytes) -> bytes:
        request = decode(RoundPlanRequest, data)
        if request.job_id != self.ps_job:
            raise RequestRejected("not my parameter server")
        self.plans.append(request.round)
        return encode(RoundPlan(round=request.round, workers=sorted(self.workers),
                                timeout=self.timeout))

    async def on_metrics(self, peer: ID, data: bytes) -> bytes:
        report = decode(MetricsReport, data)
        self.reports.append(report)
        return encode(MetricsReceived(job_id=report.job_id))


class Trainer:
    """A network with a job backend of the scheduler, as a worker running a training job has."""

    def __init__(self, net: Network, scheduler: ID, work_dir: Path) -> None:
        self.net = net
        self.router = StreamRouter()
        self.router.install(net)
        work_dir.mkdir()
        self.backend = NetworkBackend(net, self.router, job_id=new_id(), scheduler=scheduler,
                                      work_dir=work_dir)
        self.files: dict[str, Path] = {}
        self.arrived = trio.Event()

    async def collect(self) -> None:
        async for file in self.backend.incoming():
            self.files[file.name] = file.path
            self.arrived.set()
            self.arrived = trio.Event()

    async def wait_for(self, name: str) -> Path:
        with trio.fail_after(30):
            while name not in self.files:
                await self.arrived.wait()
        return self.files[name]

    async def send(self, ps: ID, name: str, data: bytes) -> list[str]:
        path = self.backend.work_dir / name
        path.write_bytes(data)
        return await self.backend.send(path, [str(ps)], "all", name)


async def _connect(nets: list[Network]) -> None:
    for i, a in enumerate(nets):
        for b in nets[i + 1:]:
            await a.dial(f"{b.addrs[0]}/p2p/{b.peer_id}")


def _decode_update(path: Path, numels: list[int]) -> list[torch.Tensor]:
    from hypha.compress import decode as decode_payload

    data = path.read_bytes()
    return [t.reshape(-1) for t in decode_payload(data[20:])] if len(data) > 20 else []


async def test_rounds_stragglers_strangers_and_bad_bytes(pki: PKI, tmp_path: Path) -> None:
    numels = _numels()
    async with AsyncExitStack() as stack:
        nets = []
        for name in ("ps", "sched", "a", "b", "stranger"):
            _, files = pki.node(name)
            nets.append(await stack.enter_async_context(open_network(pki.settings(files))))
        async with trio.open_nursery() as nursery:
            await _exercise(nets, tmp_path, numels, nursery)
            nursery.cancel_scope.cancel()


async def _exercise(nets: list[Network], tmp_path: Path, numels: list[int],
                    nursery: trio.Nursery) -> None:
    ps_net, sched_net, a_net, b_net, stranger_net = nets
    await _connect(nets)
    ps_job = new_id()
    scheduler = Scheduler(sched_net, ps_job, timeout=1.0)
    a = Trainer(a_net, sched_net.peer_id, tmp_path / "a")
    b = Trainer(b_net, sched_net.peer_id, tmp_path / "b")
    stranger = Trainer(stranger_net, sched_net.peer_id, tmp_path / "stranger")
    scheduler.workers = [str(a_net.peer_id), str(b_net.peer_id)]
    for t in (a, b, stranger):
        await nursery.start(t.backend.run)
        nursery.start_soon(t.collect)

    # the parameter server's job, as the worker's job manager runs it
    router = StreamRouter()
    router.install(ps_net)
    work_dir = tmp_path / "ps"
    work_dir.mkdir()
    backend = NetworkBackend(ps_net, router, job_id=ps_job, scheduler=sched_net.peer_id,
                             work_dir=work_dir)
    await nursery.start(backend.run)
    statuses: list[ExecutorStatus] = []
    spec: dict[str, Any] = {"id": ps_job, "scheduler": str(sched_net.peer_id), "config": {
        "rounds": 2, "model": MODEL, "codec": "int2", "round_timeout": 30.0}}
    done = trio.Event()

    async def run_ps() -> None:
        await ParameterServerExecutor().run(spec, work_dir, statuses.append, backend=backend)
        done.set()

    nursery.start_soon(run_ps)

    # both named trainers get the global model (round 0) as a file
    initial_a = (await a.wait_for("global-0")).read_bytes()
    assert (await b.wait_for("global-0")).read_bytes() == initial_a
    assert "global-0" not in stranger.files

    # round 0: a's contribution is good; b's is malformed; the round closes 1 s (the plan's
    # timeout) after a's completed, with a alone
    await a.send(ps_net.peer_id, "delta-0", _contribution(0, numels, 1.0))
    bad = bytearray(_contribution(0, numels, 2.0))
    bad[0:4] = b"XXXX"
    with pytest.raises(Exception, match=r"speaks b.XXXX"):
        await b.send(ps_net.peer_id, "delta-0", bytes(bad))
    update_a = (await a.wait_for("update-0")).read_bytes()
    assert (await b.wait_for("update-0")).read_bytes() == update_a
    checkpoint = work_dir / CHECKPOINT_NAME
    assert checkpoint.exists()

    # a stranger the scheduler did not name is refused; a's late round-0 contribution is
    # read and dropped (its send succeeds: it has the update already)
    with pytest.raises(Exception, match=r"did not name"):
        await stranger.send(ps_net.peer_id, "delta-1", _contribution(1, numels, 1.0))
    assert await a.send(ps_net.peer_id, "delta-0", _contribution(0, numels, 3.0)) \
        == [str(ps_net.peer_id)]

    # round 1: both contribute; it closes without waiting for the timeout
    with trio.fail_after(20):
        async with trio.open_nursery() as senders:
            senders.start_soon(a.send, ps_net.peer_id, "delta-1", _contribution(1, numels, 1.0))
            senders.start_soon(b.send, ps_net.peer_id, "delta-1", _contribution(1, numels, 2.0))
        await a.wait_for("update-1")
        await done.wait()
    assert [s.state for s in statuses] == ["starting", "running", "finished"]

    # the checkpoint holds round 2, and its global model is the initial one plus exactly the
    # two updates every trainer applied
    torch.manual_seed(0)
    params = [p.detach() for p in training_parameters(load_model(MODEL))]
    server = OuterServer.load(checkpoint, params, codec="int2")
    assert server.round == 2
    start = [p.reshape(-1).clone() for p in params]
    for name in ("update-0", "update-1"):
        for g, u in zip(start, _decode_update(a.files[name], numels), strict=True):
            g += u
    for got, want in zip(server.global_tensors(), start, strict=True):
        torch.testing.assert_close(got.reshape(-1), want, rtol=0, atol=1e-6)
    # one metrics report per round, with who came
    rounds = {int(r.values["round"]): r.values for r in scheduler.reports}
    assert rounds[1]["contributors"] == 1 and rounds[1]["refused"] >= 1
    assert rounds[2]["contributors"] == 2
    assert all(math.isfinite(v) for r in rounds.values() for v in r.values())


# --- bad payloads over the network --------------------------------------------------------------


def _deltas(numels: list[int], seed: int, scale: float = 1e-3) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen) * scale for n in numels]


def _payload(deltas: list[torch.Tensor], codec: str, round_: int = 0,
             allow_nonfinite: bool = False) -> bytes:
    from hypha.compress import encode

    return pack_envelope(_SHARD, 0, round_) + encode(deltas, codec,
                                                     allow_nonfinite=allow_nonfinite)


def _flip(data: bytes) -> bytes:
    bad = bytearray(data)
    bad[len(bad) * 3 // 5] ^= 0x40  # inside a chunk's body: its CRC-32 no longer matches
    return bytes(bad)


def _nan(numels: list[int], codec: str) -> bytes:
    deltas = _deltas(numels, 2)
    deltas[3][7] = float("nan")
    return _payload(deltas, codec, allow_nonfinite=True)


#: name → (the server's codec, the bad payload from the good one's deltas, what the refusal says)
BAD_PAYLOADS: dict[str, tuple[str, Any, str]] = {
    "bit flip in a chunk": ("int2", lambda n: _flip(_payload(_deltas(n, 2), "int2")),
                            r"CRC|checksum"),
    "truncated": ("int2", lambda n: _payload(_deltas(n, 2), "int2")[:-100], r"ends|incomplete|"
                  r"truncated|before"),
    "oversized (bytes after the payload)": ("int2", lambda n: _payload(_deltas(n, 2), "int2")
                                            + b"\x00" * 4096, r"trailing|after|unexpected"),
    "wrong shapes": ("int2", lambda n: _payload(_deltas(n[:-1], 2), "int2"), r"tensors"),
    "wrong codec": ("int2", lambda n: _payload(_deltas(n, 2), "int4"), r"int4"),
    "NaN in a chunk": ("fp32", lambda n: _nan(n, "fp32"), r"NaN|Inf|finite"),
    "out of step (a round-1 payload as delta-0)": (
        "int2", lambda n: _payload(_deltas(n, 2), "int2", round_=1), r"out of step|round 1"),
}


@pytest.mark.parametrize("kind", list(BAD_PAYLOADS))
async def test_a_bad_payload_is_refused_counted_and_changes_nothing_else(
        kind: str, pki: PKI, tmp_path: Path) -> None:
    codec, make_bad, reason = BAD_PAYLOADS[kind]
    numels = _numels()
    good, bad = _payload(_deltas(numels, 1), codec), make_bad(numels)
    async with AsyncExitStack() as stack:
        nets = []
        for name in ("ps", "sched", "a", "b"):
            _, files = pki.node(name)
            nets.append(await stack.enter_async_context(open_network(pki.settings(files))))
        ps_net, sched_net, a_net, b_net = nets
        await _connect(nets)
        ps_job = new_id()
        scheduler = Scheduler(sched_net, ps_job, timeout=0.5)
        scheduler.workers = [str(a_net.peer_id), str(b_net.peer_id)]
        async with trio.open_nursery() as nursery:
            a = Trainer(a_net, sched_net.peer_id, tmp_path / "a")
            b = Trainer(b_net, sched_net.peer_id, tmp_path / "b")
            for t in (a, b):
                await nursery.start(t.backend.run)
                nursery.start_soon(t.collect)
            router = StreamRouter()
            router.install(ps_net)
            work_dir = tmp_path / "ps"
            work_dir.mkdir()
            backend = NetworkBackend(ps_net, router, job_id=ps_job,
                                     scheduler=sched_net.peer_id, work_dir=work_dir)
            await nursery.start(backend.run)
            spec: dict[str, Any] = {"id": ps_job, "scheduler": str(sched_net.peer_id),
                                    "config": {"rounds": 1, "model": MODEL, "codec": codec}}
            statuses: list[ExecutorStatus] = []
            nursery.start_soon(lambda: ParameterServerExecutor().run(
                spec, work_dir, statuses.append, backend=backend))
            await a.wait_for("global-0")
            with pytest.raises(Exception, match=reason):
                await b.send(ps_net.peer_id, "delta-0", bad)
            await a.send(ps_net.peer_id, "delta-0", good)
            await a.wait_for("update-0")
            with trio.fail_after(20):
                while not statuses or statuses[-1].state != "finished":
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    # counted in the round's report
    [report] = scheduler.reports
    assert report.values["refused"] == 1 and report.values["contributors"] == 1
    # the global model is what the documented rule gives for these bytes: the bad payload's
    # chunks that were verified before the fault count, nothing else of it does
    torch.manual_seed(0)
    params = [p.detach() for p in training_parameters(load_model(MODEL))]
    reference = OuterServer([p.clone() for p in params], codec=codec)
    rnd = reference.open_round()
    trusted = rnd.contribution("b")
    try:
        trusted.feed(bad)
        trusted.finish()
    except Exception:
        pass
    c = rnd.contribution("a")
    c.feed(good)
    c.finish()
    rnd.close()
    server = OuterServer.load(tmp_path / "ps" / CHECKPOINT_NAME, params, codec=codec)
    for got, want in zip(server.global_tensors(), reference.global_tensors(), strict=True):
        assert torch.equal(got, want)
