"""The allocation market in one process: advertisements, offers, leases, dispatch, replacement."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio

from hypha.worker.arbiter import Pricing
from tests.integration._market import (
    start_hub,
    start_scheduler,
    start_worker,
    wait_connected,
    wait_subscribed,
)
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
