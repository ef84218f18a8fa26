"""The allocation market in one process: advertisements, offers, leases, dispatch, replacement."""

from __future__ import annotations

import json
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from hypha.messages import (
    PROTOCOLS,
    MetricsReceived,
    MetricsReport,
    RoundPlan,
    RoundPlanRequest,
    decode,
    encode,
)
from hypha.net import Network, RemoteError
from hypha.scheduler.allocator import Requirements
from hypha.scheduler.node import PARAMETER_SERVER, TRAIN, DiLoCo, Held, SchedulerNode
from hypha.worker.arbiter import Pricing
from tests.integration._market import (
    PS,
    SMALL,
    Worker,
    start_hub,
    start_scheduler,
    start_worker,
    wait_connected,
    wait_subscribed,
)
from tests.integration._market import TRAIN as TRAIN_EXECUTOR
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(180)


async def test_a_scheduler_leases_three_of_four_workers_at_the_right_prices(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        prices = {"cheap": Pricing("flexible", 1.0, 0.5), "fair": Pricing("flexible", 1.5, 0.5),
                  "whole": Pricing("whole", 2.5, 0.5), "dear": Pricing("flexible", 5.0, 0.5)}
        workers = {name: await start_worker(stack, nursery, pki, hub, name, p, work_dir=tmp_path)
                   for name, p in prices.items()}
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=3, bid=2.0,
                                          max_price=3.0)
        with trio.fail_after(60):
            await wait_connected(scheduler.net, *(w.net for w in workers.values()), hub=hub)
            await wait_subscribed(hub, [w.net for w in workers.values()], [scheduler.net])
            await nursery.start(scheduler.run)
            await scheduler.all_leased.wait()
            while len([h for h in scheduler.held.values() if h.job_id]) < 3:
                await trio.sleep(0.02)
        by_worker = {str(h.worker): h for h in scheduler.held.values()}
        ids = {name: str(w.net.peer_id) for name, w in workers.items()}
        assert set(by_worker) == {ids["cheap"], ids["fair"], ids["whole"]}
        # flexible workers offer exactly what was asked, at the bid; "whole" its machine at
        # max(bid, price); "dear" (price 5 > bid 2) never offered
        assert by_worker[ids["cheap"]].offer.price == 2.0
        assert by_worker[ids["fair"]].offer.price == 2.0
        assert by_worker[ids["whole"]].offer.price == 2.5
        assert by_worker[ids["cheap"]].offer.resources == scheduler.requirements.resources
        assert by_worker[ids["whole"]].offer.resources == workers["whole"].arbiter.total
        assert workers["dear"].node.offers_sent == 0
        # every leased worker runs the job and reported it
        with trio.fail_after(30):
            while len([s for s in scheduler.statuses.values() if s.state == "running"]) < 3:
                await trio.sleep(0.05)
        nursery.cancel_scope.cancel()


async def test_offers_below_the_floor_are_never_made(pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        # the worker asks 0.1/h but will not go below 3/h; the scheduler bids 2
        worker = await start_worker(stack, nursery, pki, hub, "proud",
                                    Pricing("whole", 0.1, 3.0), work_dir=tmp_path)
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=10.0, dispatch=False)
        with trio.fail_after(60):
            await wait_connected(scheduler.net, worker.net, hub=hub)
            await wait_subscribed(hub, [worker.net], [scheduler.net])
            scheduler.serve()
            got = await scheduler.allocate(1)
        # whole: max(bid 2, price 0.1) = 2 < floor 3 -> no offer at all
        assert got == [] and worker.node.offers_sent == 0
        nursery.cancel_scope.cancel()


async def test_two_schedulers_competing_for_one_worker_get_one_lease_between_them(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        worker = await start_worker(stack, nursery, pki, hub, "only",
                                    Pricing("whole", 1.0, 0.5), work_dir=tmp_path,
                                    batch_window=0.3)
        first = await start_scheduler(stack, pki, hub, "s1", workers=1, bid=2.0, max_price=5.0,
                                      dispatch=False)
        second = await start_scheduler(stack, pki, hub, "s2", workers=1, bid=3.0, max_price=5.0,
                                       dispatch=False)
        with trio.fail_after(60):
            await wait_connected(first.net, second.net, worker.net, hub=hub)
            await wait_subscribed(hub, [worker.net], [first.net, second.net])
            first.serve()
            second.serve()
            results: dict[str, list[object]] = {}

            async def allocate(name: str, scheduler) -> None:  # type: ignore[no-untyped-def]
                results[name] = await scheduler.allocate(1)

            async with trio.open_nursery() as both:
                both.start_soon(allocate, "s1", first)
                both.start_soon(allocate, "s2", second)
        # one "whole" machine, offered once: to the better bid of the batch
        assert len(results["s1"]) + len(results["s2"]) == 1
        assert len(results["s2"]) == 1
        assert len(worker.arbiter.leases()) == 1
        nursery.cancel_scope.cancel()


async def test_a_dead_worker_is_replaced_and_an_abandoned_lease_expires(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        a = await start_worker(stack, nursery, pki, hub, "a", Pricing("flexible", 1.0, 0.5),
                               work_dir=tmp_path)
        b = await start_worker(stack, nursery, pki, hub, "b", Pricing("flexible", 1.2, 0.5),
                               work_dir=tmp_path)
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=3.0, lease_ttl=2.0)
        with trio.fail_after(60):
            await wait_connected(scheduler.net, a.net, b.net, hub=hub)
            await wait_subscribed(hub, [a.net, b.net], [scheduler.net])
            scope = trio.CancelScope()

            async def run_scheduler(task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
                with scope:
                    await scheduler.run(task_status=task_status)

            await nursery.start(run_scheduler)
            await scheduler.all_leased.wait()
            [held] = scheduler.held.values()
            first, other = (a, b) if held.worker == a.net.peer_id else (b, a)
            # the worker dies: its network goes away
            first.scope.cancel()
            await first.net.aclose()
            while not any(h.worker == other.net.peer_id and h.job_id
                          for h in scheduler.held.values()):
                await trio.sleep(0.05)
            assert str(first.net.peer_id) in scheduler.lost
            # now the scheduler dies: the worker's lease expires and frees its resources
            scope.cancel()
            assert other.arbiter.leases()
            while other.arbiter.leases() or other.arbiter.free() != other.arbiter.total:
                await trio.sleep(0.1)
            while other.node.jobs.jobs_under(held.offer.lease_id):
                await trio.sleep(0.1)
        nursery.cancel_scope.cancel()


# -- DiLoCo: a parameter server and training workers ----------------------------------------------
#: a job that records its job.json in argv[2], then runs until the file argv[1] exists
_UNTIL = ("import json, os, pathlib, sys, time\n"
          "spec = json.loads(pathlib.Path(os.environ['HYPHA_JOB_JSON']).read_text())\n"
          "out = pathlib.Path(sys.argv[2], spec['id'] + '.json')\n"
          "out.with_suffix('.tmp').write_text(json.dumps(spec))\n"
          "out.with_suffix('.tmp').replace(out)\n"
          "while not os.path.exists(sys.argv[1]):\n"
          "    time.sleep(0.05)\n")


def _until(flag: Path, configs: Path) -> list[str]:
    return [sys.executable, "-c", _UNTIL, str(flag), str(configs)]


async def _diloco_market(stack: AsyncExitStack, nursery: trio.Nursery, pki: PKI, tmp_path: Path,
                         *, workers: int, trainers: int, lease_ttl: float = 30.0
                         ) -> tuple[SchedulerNode, dict[str, Worker]]:
    configs = tmp_path / "configs"
    configs.mkdir()
    hub = await start_hub(stack, pki)
    nodes = {f"w{i}": await start_worker(
        stack, nursery, pki, hub, f"w{i}", Pricing("flexible", 1.0 + i / 10, 0.5),
        work_dir=tmp_path, command=_until(tmp_path / "train-done", configs),
        ps_command=_until(tmp_path / "ps-done", configs)) for i in range(workers)}
    diloco = DiLoCo(Requirements(SMALL, PS, 2.0, 3.0), rounds=4, sync_batches=20,
                    round_timeout=5.0)
    scheduler = await start_scheduler(stack, pki, hub, "sched", workers=trainers, bid=2.0,
                                      max_price=3.0, lease_ttl=lease_ttl, diloco=diloco,
                                      metrics_log=tmp_path / "events.jsonl",
                                      job_config={"lr": "0.1"})
    with trio.fail_after(60):
        await wait_connected(scheduler.net, *(w.net for w in nodes.values()), hub=hub)
        await wait_subscribed(hub, [w.net for w in nodes.values()], [scheduler.net])
    return scheduler, nodes


def _job(held: Held) -> str:
    assert held.job_id is not None, f"no job dispatched to {held.worker} yet"
    return held.job_id


async def _all_running(scheduler: SchedulerNode, count: int) -> None:
    with trio.fail_after(60):
        while len([h for h in scheduler.held.values() if h.job_id is not None
                   and (s := scheduler.statuses.get(h.job_id)) is not None
                   and s.state == "running"]) < count:
            await trio.sleep(0.05)


async def _report(net: Network, scheduler: SchedulerNode, job_id: str,
                  **values: float) -> MetricsReceived:
    report = MetricsReport(job_id=job_id, step=1, values=values, time=time.time())
    with trio.fail_after(10):
        reply = await net.request(scheduler.net.peer_id, PROTOCOLS["metrics"], encode(report))
    answer: MetricsReceived = decode(MetricsReceived, reply)
    return answer


async def _ask_plan(net: Network, scheduler: SchedulerNode, job_id: str,
                    round_: int = 0) -> RoundPlan:
    with trio.fail_after(10):
        reply = await net.request(scheduler.net.peer_id, PROTOCOLS["round-plan"],
                                  encode(RoundPlanRequest(job_id=job_id, round=round_)))
    plan: RoundPlan = decode(RoundPlan, reply)
    return plan


async def test_a_diloco_run_leases_a_parameter_server_and_trainers_and_plans_the_rounds(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        scheduler, nodes = await _diloco_market(stack, nursery, pki, tmp_path, workers=4,
                                                trainers=3)
        by_peer = {w.net.peer_id: w for w in nodes.values()}
        await nursery.start(scheduler.run)
        with trio.fail_after(60):
            await scheduler.all_leased.wait()
        await _all_running(scheduler, 4)

        # one parameter server, three trainers, four distinct peers
        held = list(scheduler.held.values())
        [ps] = [h for h in held if h.role == PARAMETER_SERVER]
        trainers = [h for h in held if h.role == TRAIN]
        assert len(trainers) == 3
        assert len({h.worker for h in held}) == 4
        assert scheduler.parameter_server == ps.worker
        me = str(scheduler.net.peer_id)

        # the two configurations, as the jobs received them (each job writes its own down
        # once it runs)
        with trio.fail_after(30):
            while len(list((tmp_path / "configs").glob("*.json"))) < 4:
                await trio.sleep(0.05)
        def received(job_id: str) -> tuple[dict[str, object], dict[str, str]]:
            spec = json.loads((tmp_path / "configs" / f"{job_id}.json").read_text())
            assert spec["id"] == job_id
            return dict(spec["config"]), spec["executor"]

        config, executor = received(_job(ps))
        assert executor == {"kind": "parameter-server", "name": "diloco", "runtime": "python"}
        assert config == {"lr": "0.1", "role": "parameter-server", "rounds": 4,
                          "round_timeout": 5.0, "workers": 3, "scheduler": me}
        for trainer in trainers:
            config, executor = received(_job(trainer))
            assert executor == {"kind": TRAIN_EXECUTOR.kind, "name": "train",
                                "runtime": "python"}
            assert config == {"lr": "0.1", "role": "train", "parameter_server": str(ps.worker),
                              "rounds": 4, "sync_batches": 20}

        # the round plan: for the parameter server's worker and job only
        ps_net = by_peer[ps.worker].net
        plan = await _ask_plan(ps_net, scheduler, _job(ps), 2)
        assert plan == RoundPlan(round=2, workers=sorted(str(t.worker) for t in trainers),
                                 timeout=5.0)
        a, b, c = trainers
        with pytest.raises(RemoteError, match="not this scheduler's running parameter-server"):
            await _ask_plan(by_peer[a.worker].net, scheduler, _job(ps))
        with pytest.raises(RemoteError, match="not this scheduler's running parameter-server"):
            await _ask_plan(ps_net, scheduler, _job(a))

        # metrics: a trainer is told its round's batches and where the parameter server is
        answer = await _report(by_peer[a.worker].net, scheduler, _job(a),
                               round=0, round_step=1, batch_seconds=0.5, loss=3.0)
        assert answer == MetricsReceived(job_id=_job(a), round=0, batches=20,
                                         parameter_server=str(ps.worker))
        await _report(by_peer[b.worker].net, scheduler, _job(b),
                      round=0, round_step=1, batch_seconds=0.5)
        slow = await _report(by_peer[c.worker].net, scheduler, _job(c),
                             round=0, round_step=1, batch_seconds=1.5)
        fast = await _report(by_peer[a.worker].net, scheduler, _job(a),
                             round=0, round_step=2, batch_seconds=0.5)
        # perf-aware: the 60 batches of the round go 3:3:1 (c is three times slower)
        assert slow.batches is not None and fast.batches is not None
        assert slow.batches < 20 < fast.batches
        assert abs(2 * fast.batches + slow.batches - 60) <= 3
        targets = {tuple(sample.labels.values()): sample.value
                   for metric in scheduler.collect_metrics()
                   if metric.name == "hypha_scheduler_sync_batches"
                   for sample in metric.samples}
        assert targets[(str(c.worker), "0")] == slow.batches
        # other reports: the parameter server's get a plain answer, a half position is refused
        answer = await _report(ps_net, scheduler, _job(ps), round=1.0,
                               contributors=3.0)
        assert answer == MetricsReceived(job_id=_job(ps))
        with pytest.raises(RemoteError, match="'round' and 'round_step' come together"):
            await _report(by_peer[a.worker].net, scheduler, _job(a),
                          round=0)
        with pytest.raises(RemoteError, match="must be a whole number"):
            await _report(by_peer[a.worker].net, scheduler, _job(a),
                          round=0, round_step=2.5)
        with pytest.raises(RemoteError, match="is not yours"):
            await _report(by_peer[a.worker].net, scheduler, _job(b),
                          round=0, round_step=1)

        # the run ends when the trainers and the parameter server have all finished
        (tmp_path / "train-done").touch()
        with trio.fail_after(30):
            while len([j for j, (role, state) in scheduler.ended.items()
                       if role == TRAIN and state == "finished"]) < 3:
                await trio.sleep(0.05)
        await trio.sleep(0.2)
        assert not scheduler.finished.is_set()
        (tmp_path / "ps-done").touch()
        with trio.fail_after(30):
            await scheduler.finished.wait()
        assert not scheduler.failed

        # the event log: one JSON object per line
        lines = [json.loads(line) for line in
                 (tmp_path / "events.jsonl").read_text().splitlines()]
        leases = [e for e in lines if e["event"] == "lease"]
        assert sorted(e["role"] for e in leases) == [PARAMETER_SERVER, TRAIN, TRAIN, TRAIN]
        metrics = [e for e in lines if e["event"] == "metrics"]
        assert metrics[0] == {"time": metrics[0]["time"], "event": "metrics", "job": _job(a),
                              "worker": str(a.worker), "role": "train", "step": 1,
                              "values": {"round": 0.0, "round_step": 1.0,
                                         "batch_seconds": 0.5, "loss": 3.0}}
        assert any(e["role"] == PARAMETER_SERVER for e in metrics)
        statuses = [(e["job"], e["state"]) for e in lines if e["event"] == "status"]
        for h in held:
            assert (h.job_id, "running") in statuses and (h.job_id, "finished") in statuses
        assert {tuple(sorted(e)) for e in lines if e["event"] == "status"} == {
            ("event", "job", "message", "role", "state", "time", "worker")}
        nursery.cancel_scope.cancel()


async def test_a_lost_parameter_server_is_replaced_and_the_trainers_are_told(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        scheduler, nodes = await _diloco_market(stack, nursery, pki, tmp_path, workers=4,
                                                trainers=2, lease_ttl=2.0)
        by_peer = {w.net.peer_id: w for w in nodes.values()}
        await nursery.start(scheduler.run)
        await _all_running(scheduler, 3)
        [ps] = [h for h in scheduler.held.values() if h.role == PARAMETER_SERVER]
        trainer = next(h for h in scheduler.held.values() if h.role == TRAIN)
        trainer_net = by_peer[trainer.worker].net
        answer = await _report(trainer_net, scheduler, _job(trainer),
                               round=0, round_step=1, batch_seconds=0.1)
        assert answer.parameter_server == str(ps.worker)

        # the parameter server's worker dies: its network goes away
        dead = by_peer[ps.worker]
        dead.scope.cancel()
        await dead.net.aclose()
        with trio.fail_after(60):
            while scheduler.parameter_server in (None, ps.worker):
                await trio.sleep(0.05)
        new = scheduler.parameter_server
        assert new is not None
        assert str(ps.worker) in scheduler.lost
        assert new not in {h.worker for h in scheduler.held.values() if h.role == TRAIN}
        await _all_running(scheduler, 3)
        answer = await _report(trainer_net, scheduler, _job(trainer),
                               round=0, round_step=2, batch_seconds=0.1)
        assert answer.parameter_server == str(new)
        # the replacement asks for plans; the dead one's job is no longer ours
        [ps2] = [h for h in scheduler.held.values() if h.role == PARAMETER_SERVER]
        plan = await _ask_plan(by_peer[new].net, scheduler, _job(ps2))
        assert len(plan.workers) == 2
        lost = [json.loads(line) for line in
                (tmp_path / "events.jsonl").read_text().splitlines()
                if json.loads(line)["event"] == "lost"]
        assert [(e["worker"], e["role"], e["job"]) for e in lost] == [
            (str(ps.worker), PARAMETER_SERVER, ps.job_id)]
        nursery.cancel_scope.cancel()
