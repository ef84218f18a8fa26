"""How long does the allocation market take to lease N workers, and how many messages does it cost?

One process, one trio loop: a hub (a gateway's network, forwarding the ``hypha/worker`` topic),
N light workers (each its own ``open_network`` + ``WorkerNode`` + ``Arbiter``: flexible pricing,
asking prices spread from half the bid to the bid, batch window 0.02 s, a ``JobManager`` that is
never dispatched to) bootstrapped from the hub, and one ``SchedulerNode`` (``dispatch=False``) that
wants all N. Every node is a full py-libp2p host on 127.0.0.1 with mTLS, so N + 2 hosts share one
Python thread: on a small machine this is the worst case (a deployment has one host per machine);
the CPU the process spends during an allocation is reported beside its wall time.

The network is built once per size and settles (every worker connected to the hub and subscribed,
the hub's subscription known to the scheduler, two Gossipsub heartbeats). A first allocation is
"cold" (each worker still has to find the scheduler in the DHT and dial it; reported in a note),
then ``WARMUP`` untimed ones, then the start-up heap is frozen out of the cyclic GC (``gc.freeze``;
``--no-freeze`` to see why). For each offer window (``--windows``: the scheduler's default 0.5 s,
and 0.2 s; round-robin so that drift hits both) ``--repeats`` allocations are timed, each one
``SchedulerNode.allocate(N)`` on a fresh scheduler, from just before the advertisement is published
until it returns with its leases accepted:

* **last offer**: advertisement to the N-th offer (offers are timestamped as ``_on_offer`` takes
  them): what the market itself needs;
* **window**: the fixed wait ``allocate`` spends collecting offers: it never returns sooner;
* **accept**: from the first acceptance (after choosing) until every chosen lease is renewed.

"reached" counts the workers that had the advertisement before the window closed (its deadline);
only they can offer. When one round leases fewer than N, the scheduler's retry policy is followed
(``RETRY`` backoff, as ``SchedulerNode._fill``) and "all-N" is the time until N leases were held.
Between repeats every lease is released through ``Arbiter.release`` and the benchmark waits three
heartbeats so that late gossip about the advertisement is counted with it.

The hub is built as the gateway builds its network: its Gossipsub mesh is wide enough for every
subscriber (``GATEWAY_GOSSIP_DEGREE``). ``--hub-mesh narrow`` (run for sizes above Gossipsub's
D_hi = 12) shows why: with an ordinary node's D = 6, D_hi = 12 the hub prunes its mesh to 6
workers once more than 12 join, and the rest, knowing nobody but the hub, hear an advertisement
only through IHAVE gossip (6 random peers per 1 s heartbeat, for 3 heartbeats), too late for the
window or never: 14 of 32 reached in the first measurement, before the gateway was widened.

Messages per allocation: the advertisement (1 publish per round) and its Gossipsub copies (to the
hub and to each worker, counted where they arrive, duplicates included), the IHAVE / IWANT gossip
about it, the offers (``WorkerOffer`` RPCs) and the renewals that accept them (``RenewLease``
RPCs); an RPC's reply is not counted separately. Heartbeat GRAFT / PRUNE traffic and the cold
round's DHT look-ups and dials are not counted.

    python bench/alloc.py                  # 8 and 32 workers, windows 0.5 and 0.2 s, 5 repeats
    python bench/alloc.py --quick          # 8 workers, 2 repeats
    python bench/alloc.py --profile        # + where the loop's CPU goes in one allocation
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import logging
import os
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections import Counter
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import trio

from hypha.gateway.node import GATEWAY_GOSSIP_DEGREE
from hypha.messages import WORKER_TOPIC, WorkerOffer
from hypha.net import Network, open_network
from hypha.scheduler.allocator import Requirements
from hypha.scheduler.node import RETRY, Held, SchedulerNode
from hypha.worker.arbiter import Pricing
from tests.integration._market import (
    SMALL,
    TRAIN,
    Worker,
    start_hub,
    start_worker,
    wait_connected,
    wait_subscribed,
)
from tests.unit.net._pki import PKI

#: The scheduler's bid per hour; workers ask between half of it and all of it.
BID = 2.0
MAX_PRICE = 3.0
#: Seconds a worker collects advertisements before deciding (the node's default is 0.2 s).
BATCH_WINDOW = 0.02
#: Issue target: all leases held within this many seconds for TARGET_WORKERS workers.
TARGET_S = 1.0
TARGET_WORKERS = 32
#: Untimed allocations after the cold one, before timing (connections, caches, DHT settle).
WARMUP = 2
#: Rounds of advertising (the first plus retries) before a repeat gives up on leasing all N.
MAX_ROUNDS = 3
#: Seconds between heartbeats (``NetworkSettings.gossip_heartbeat``'s default).
HEARTBEAT = 1.0
#: The Gossipsub degrees hypha.net gives every node (D and D_hi; see Network.__init__).
GOSSIP_D, GOSSIP_D_HI = 6, 12


class _GCPauses:
    """Seconds the cyclic garbage collector stopped the loop (``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self.longest = 0.0
        self._start = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.total += pause
            self.longest = max(self.longest, pause)


GC_PAUSES = _GCPauses()


class _Tally(logging.Handler):
    """Counts log records instead of printing them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


LIBP2P_ERRORS = _Tally()


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- instrumentation --------------------------------------------------------------------------


class _Counting:
    """Gossipsub traffic about the advertisement topic as it arrives at the hub and the workers.

    NOTE: py-libp2p exposes no counters, so this wraps three of its methods on these nodes' own
    instances (``Pubsub.push_msg``, ``GossipSub.handle_ihave`` / ``handle_iwant``); benchmark
    only, nothing in hypha/ is touched.
    """

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.arrivals: dict[bytes, dict[int, float]] = {}  # message data -> node -> first copy

    def attach(self, net: Network, role: str) -> None:
        pubsub, gossip = net._pubsub, net._gossip
        push, ihave, iwant = pubsub.push_msg, gossip.handle_ihave, gossip.handle_iwant

        async def push_msg(forwarder: Any, msg: Any) -> None:
            if WORKER_TOPIC in msg.topicIDs:
                self.counts[f"copy to {role}"] += 1
                if role == "worker":
                    seen = self.arrivals.setdefault(msg.data, {})
                    seen.setdefault(id(net), time.perf_counter())
            await push(forwarder, msg)

        async def handle_ihave(msg: Any, sender: Any) -> None:
            if msg.topicID == WORKER_TOPIC:
                self.counts["ihave"] += 1
            await ihave(msg, sender)

        async def handle_iwant(msg: Any, sender: Any) -> None:
            self.counts["iwant"] += 1
            await iwant(msg, sender)

        pubsub.push_msg = push_msg  # type: ignore[method-assign, assignment]
        gossip.handle_ihave = handle_ihave  # type: ignore[method-assign, assignment]
        gossip.handle_iwant = handle_iwant  # type: ignore[method-assign, assignment]


class _PublishClock:
    """The scheduler's network, noting when ``publish`` returned; everything else passes."""

    def __init__(self, net: Network) -> None:
        self._net = net
        self.published: float | None = None
        self.first: bytes | None = None  # the first advertisement published

    def __getattr__(self, name: str) -> Any:
        return getattr(self._net, name)

    async def publish(self, topic: str, data: bytes) -> None:
        await self._net.publish(topic, data)
        if self.first is None:
            self.first, self.published = data, time.perf_counter()


class _TimedScheduler(SchedulerNode):
    """A :class:`SchedulerNode` that timestamps the offers it takes and its acceptances."""

    def __init__(self, net: Network, requirements: Requirements, **kwargs: Any) -> None:
        self.clock = _PublishClock(net)
        super().__init__(self.clock, requirements, **kwargs)  # type: ignore[arg-type]
        self.offer_times: list[float] = []  # offers taken within the window
        self.late = 0  # offers refused: their advertisement had closed
        self.accept_started: float | None = None

    async def _on_offer(self, peer: Any, data: bytes) -> bytes:
        arrived = time.perf_counter()
        try:
            reply = await super()._on_offer(peer, data)
        except Exception:
            self.late += 1
            raise
        self.offer_times.append(arrived)
        return reply

    async def _accept(self, offer: WorkerOffer) -> Held | None:
        if self.accept_started is None:
            self.accept_started = time.perf_counter()
        return await super()._accept(offer)


# --- one allocation ---------------------------------------------------------------------------


async def _allocate_all(workers: list[Worker], scheduler_net: Network, window: float,
                        counting: _Counting, profile: cProfile.Profile | None = None
                        ) -> dict[str, Any]:
    """Leases all workers with a fresh scheduler; returns the timings and counts."""
    n = len(workers)
    node = _TimedScheduler(scheduler_net, Requirements(SMALL, TRAIN, BID, MAX_PRICE),
                           workers=n, offer_window=window, dispatch=False)
    node.serve()
    counts0 = counting.counts.copy()
    sent0 = sum(w.node.offers_sent for w in workers)
    cpu0, gc0 = _cpu(), GC_PAUSES.total
    if profile is not None:
        profile.enable()
    t0 = time.perf_counter()
    got = await node.allocate(n)
    t1 = time.perf_counter()
    if profile is not None:
        profile.disable()
    cpu, gc_s = _cpu() - cpu0, GC_PAUSES.total - gc0
    first = {
        "alloc": t1 - t0,
        "leased": len(got),
        "publish": (node.clock.published or t0) - t0,
        # the N-th offer; with fewer than N, the last one taken (the offers column says how many)
        "last offer": (max(node.offer_times) - t0) if node.offer_times else None,
        "offers": len(node.offer_times),
        "accept": (t1 - node.accept_started) if node.accept_started is not None else 0.0,
        "cpu": cpu,
        "gc": gc_s,
    }
    # Too few leased: advertise again for the rest, with the scheduler's backoff (as _fill does).
    held, rounds = len(got), 1
    delay, cap = RETRY
    while held < n and rounds < MAX_ROUNDS:
        await trio.sleep(delay)
        delay = min(delay * 2, cap)
        held += len(await node.allocate(n - held))
        rounds += 1
    all_n = time.perf_counter() - t0 if held >= n else None
    # release every lease: the next repeat starts from idle workers
    for w in workers:
        for lease in w.arbiter.leases():
            w.arbiter.release(lease.key)
    # let the hub's gossip about the advertisement (IHAVE for 3 heartbeats) run out
    await trio.sleep(3 * HEARTBEAT)
    counts = counting.counts - counts0
    arrived = sorted(t - t0 for t in counting.arrivals.get(node.clock.first or b"", {}).values())
    counting.arrivals.clear()  # the retries' advertisements too
    return {
        **first,
        "reached": sum(1 for t in arrived if t < window),  # in time to answer
        "reached ever": len(arrived),
        "last reached": arrived[-1] if len(arrived) >= n else None,
        "rounds": rounds,
        "late": node.late,  # offers refused in any round: their advertisement had closed
        "all": all_n,
        "held": held,
        "offers sent": sum(w.node.offers_sent for w in workers) - sent0,
        "offers received": node.messages["offer received"],
        "renewals": node.messages["renewal"],
        "advertisements": node.messages["advertisement sent"],
        "copies": counts["copy to hub"] + counts["copy to worker"],
        "ihave": counts["ihave"],
        "iwant": counts["iwant"],
    }


# --- one network ------------------------------------------------------------------------------


async def _run_network(n: int, hub_mesh: str, windows: list[float], repeats: int, pki: PKI,
                       work_dir: Path, profile: bool, freeze: bool
                       ) -> tuple[dict[float, list[dict[str, Any]]], dict[str, Any]]:
    """Builds a hub, ``n`` workers and a scheduler, and times ``repeats`` allocations per
    offer window. ``hub_mesh="narrow"``: the hub gets an ordinary node's Gossipsub degrees."""
    counting = _Counting()
    tag = f"{n}{'n' if hub_mesh == 'narrow' else ''}"
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        t_build = time.perf_counter()
        hub = await start_hub(stack, pki)
        if hub_mesh == "narrow":
            # NOTE: what-if, benchmark only: an ordinary node's degrees (NetworkSettings'
            # default D = 6, D_lo = 4, D_hi = 12) on the hub, as before the gateway was widened.
            gossip = hub._gossip
            gossip.degree, gossip.degree_low, gossip.degree_high = 6, 4, 12
        counting.attach(hub, "hub")
        workers: list[Worker] = []
        for i in range(n):
            price = BID * (0.5 + 0.5 * i / max(1, n - 1))  # flexible: offers at the bid anyway
            w = await start_worker(stack, nursery, pki, hub, f"w{tag}-{i}",
                                   Pricing("flexible", price, 0.1), work_dir=work_dir,
                                   batch_window=BATCH_WINDOW)
            counting.attach(w.net, "worker")
            workers.append(w)
        _, files = pki.node(f"sched{tag}")
        scheduler_net = await stack.enter_async_context(
            open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))
        with trio.fail_after(120):
            await wait_connected(scheduler_net, *(w.net for w in workers), hub=hub)
            await wait_subscribed(hub, [w.net for w in workers], [scheduler_net])
        await trio.sleep(2 * HEARTBEAT)  # the hub's mesh for the topic settles at its heartbeats
        mesh = len(hub._gossip.mesh.get(WORKER_TOPIC, ()))
        errors0 = LIBP2P_ERRORS.count
        build_s = time.perf_counter() - t_build
        print(f"  {n} workers, hub mesh {hub_mesh} ({mesh} workers in it): network built and "
              f"settled in {build_s:.1f} s", flush=True)
        cold = await _allocate_all(workers, scheduler_net, windows[0], counting)
        print(f"  cold allocation (window {windows[0]:g} s): {cold['offers']} offers in the "
              f"window ({cold['late']} late in all rounds); {cold['leased']}/{n} leased in "
              f"round 1, {cold['held']} after {cold['rounds']} round(s)", flush=True)
        for _ in range(WARMUP):
            await _allocate_all(workers, scheduler_net, windows[0], counting)
        if freeze:
            # NOTE: a full collection of N + 2 hosts' heap (and torch's, imported by the harness)
            # stops the one loop for 0.2-0.7 s at a random moment (measured): longer than a
            # 0.2 s window, so that round got no offers at all. A long-running node would
            # freeze its start-up heap the same way; --no-freeze shows it, and "gc" in the
            # per-allocation lines counts what remains.
            gc.collect()
            gc.freeze()
        await trio.sleep(2 * HEARTBEAT)
        results: dict[float, list[dict[str, Any]]] = {w: [] for w in windows}
        prof = cProfile.Profile() if profile else None
        for rep in range(repeats):
            for window in windows:
                r = await _allocate_all(workers, scheduler_net, window, counting,
                                        prof if (rep == 0 and window == windows[0]) else None)
                results[window].append(r)
                last = f"{r['last offer']:.3f}" if r["last offer"] is not None else "-"
                print(f"  [{rep + 1}/{repeats}] window {window:g} s: alloc {r['alloc']:.3f} s "
                      f"(last offer {last}, accept {r['accept']:.3f}; cpu {r['cpu']:.2f}, gc "
                      f"{r['gc']:.2f}); reached {r['reached']} in time ({r['reached ever']} "
                      f"ever), {r['offers']} offers, {r['leased']} leased, {r['held']} after "
                      f"{r['rounds']} round(s); {r['copies']} gossip copies, {r['ihave']} ihave, "
                      f"{r['iwant']} iwant", flush=True)
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(
                r"hypha/|libp2p/(pubsub|host|network|tools)|_tls|_yamux|msgpack", 30)
            print(f"\n  profile of one {n}-worker allocation (hub mesh {hub_mesh}, window "
                  f"{windows[0]:g} s), by cumulative time:\n{out.getvalue()}", flush=True)
        nursery.cancel_scope.cancel()
    gc.unfreeze()
    return results, {"build": build_s, "cold": cold, "mesh": mesh,
                     "libp2p errors": LIBP2P_ERRORS.count - errors0}


# --- driver -----------------------------------------------------------------------------------


def _median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in rows if r[key] is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> None:
    from bench._harness import Column, add_common_args, recorder, sig

    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default=None,
                        help="worker counts (default 8,32; 8 with --quick)")
    parser.add_argument("--windows", default="0.5,0.2",
                        help="offer windows in seconds (default 0.5 = the scheduler's, 0.2)")
    parser.add_argument("--hub-mesh", default="gateway,narrow",
                        help="'gateway' (the gateway's wide Gossipsub mesh) and/or 'narrow' "
                             "(what-if: an ordinary node's degrees on the hub; run only for "
                             f"sizes > {GOSSIP_D_HI})")
    parser.add_argument("--no-freeze", action="store_true",
                        help="leave the start-up heap to the cyclic GC (default: gc.freeze() it)")
    parser.add_argument("--profile", action="store_true",
                        help="profile the first timed allocation of each network (cProfile)")
    add_common_args(parser)
    args = parser.parse_args(argv)
    sizes = [int(s) for s in (args.sizes or ("8" if args.quick else "8,32")).split(",")
             if s.strip()]
    windows = [float(w) for w in args.windows.split(",") if w.strip()]
    meshes = [m.strip() for m in args.hub_mesh.split(",") if m.strip()]
    if set(meshes) - {"gateway", "narrow"}:
        parser.error(f"--hub-mesh: expected 'gateway' and/or 'narrow', got {args.hub_mesh!r}")
    repeats = args.repeats if args.repeats is not None else (2 if args.quick else 5)

    for name in ("libp2p", "async_service", "multiaddr"):
        logging.getLogger(name).setLevel(logging.ERROR)
    # py-libp2p logs DHT stream failures at ERROR (many during the cold round): counted, not shown
    libp2p_log = logging.getLogger("libp2p")
    libp2p_log.addHandler(LIBP2P_ERRORS)
    libp2p_log.propagate = False
    # late offers and expired holds are counted here; their warnings would only be noise
    for name in ("hypha.worker", "hypha.scheduler", "hypha.net"):
        logging.getLogger(name).setLevel(logging.ERROR)

    gc.callbacks.append(GC_PAUSES)
    rec = recorder("alloc", args)
    runs: list[tuple[int, str]] = [(n, m) for n in sizes for m in meshes
                                   if m == "gateway" or n > GOSSIP_D_HI]
    results: dict[tuple[int, str], tuple[dict[float, list[dict[str, Any]]], dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        pki = PKI(Path(tmp) / "pki")
        for n, mesh in runs:
            results[n, mesh] = trio.run(_run_network, n, mesh, windows, repeats, pki,
                                        Path(tmp) / "work", args.profile, not args.no_freeze)

    table = rec.table("allocation", [
        Column("workers", "workers", None, 7),
        Column("hub mesh", "hub mesh", None, 8),
        Column("window", "offer window s", sig(2), 14),
        Column("reached", "reached", sig(3), 7),
        Column("offers", "offers/alloc", sig(3), 12),
        Column("leased", "leased", sig(3), 6),
        Column("alloc", "median alloc s", sig(3), 14),
        Column("last offer", "median last-offer s", sig(3), 19),
        Column("accept", "median accept s", sig(3), 15),
        Column("all", "median all-N s", sig(3), 14),
        Column("cpu", "cpu s/alloc", sig(3), 11),
        Column("messages", "messages/alloc", sig(3), 14),
        Column("target", f"< {TARGET_S:g} s", None, 6),
    ], title=f"one process, one trio loop (hub + N workers + scheduler, {os.cpu_count()} cores); "
             f"medians of {repeats} allocations after a cold one; batch window {BATCH_WINDOW} s")
    msgs = rec.table("messages", [
        Column("workers", "workers", None, 7),
        Column("hub mesh", "hub mesh", None, 8),
        Column("window", "offer window s", sig(2), 14),
        Column("advertisements", "adverts", sig(3), 7),
        Column("copies", "gossip copies", sig(3), 13),
        Column("ihave", "ihave", sig(3), 5),
        Column("iwant", "iwant", sig(3), 5),
        Column("offers", "offers", sig(3), 6),
        Column("late", "late offers", sig(3), 11),
        Column("renewals", "renewals", sig(3), 8),
        Column("messages", "total", sig(3), 6),
    ], title="messages per allocation, all rounds of it (medians; an RPC's reply is not counted "
             "separately; heartbeat GRAFT/PRUNE not counted)")
    print()
    for (n, mesh), (by_window, _info) in results.items():
        for window in windows:
            rows = by_window[window]
            for r in rows:
                r["messages"] = (r["advertisements"] + r["copies"] + r["ihave"] + r["iwant"]
                                 + r["offers received"] + r["renewals"])
            complete = all(r["all"] is not None for r in rows)
            all_n = _median(rows, "all") if complete else None
            verdict = "pass" if all_n is not None and all_n < TARGET_S else "miss"
            table.add(workers=n, window=window, alloc=_median(rows, "alloc"), **{
                "hub mesh": mesh, "reached": _median(rows, "reached"),
                "offers": _median(rows, "offers"), "leased": _median(rows, "leased"),
                "last offer": _median(rows, "last offer"), "accept": _median(rows, "accept"),
                "all": all_n, "cpu": _median(rows, "cpu"), "messages": _median(rows, "messages"),
                "target": verdict if n >= TARGET_WORKERS else f"({verdict})"})
    print()
    for (n, mesh), (by_window, _info) in results.items():
        for window in windows:
            rows = by_window[window]
            msgs.add(workers=n, window=window, offers=_median(rows, "offers received"), **{
                "hub mesh": mesh, **{k: _median(rows, k) for k in (
                    "advertisements", "copies", "ihave", "iwant", "late", "renewals",
                    "messages")}})
    print()
    for (n, mesh), (by_window, info) in results.items():
        cold = info["cold"]
        gc_max = max(r["gc"] for rows in by_window.values() for r in rows)
        rec.note(f"{n} workers, hub mesh {mesh}: built and settled in {info['build']:.1f} s "
                 f"({info['mesh']} workers in the hub's mesh); the cold first allocation "
                 f"(window {windows[0]:g} s: workers still look the scheduler up in the DHT and "
                 f"dial it) got {cold['offers']} offers in its window ({cold['late']} came "
                 f"late in its rounds) and leased {cold['leased']}/{n}, {cold['held']} after "
                 f"{cold['rounds']} round(s); then {WARMUP} untimed allocations. py-libp2p logged "
                 f"{info['libp2p errors']} errors (not shown) from the cold round on; GC "
                 f"stopped the loop for at most {gc_max * 1e3:.0f} ms in a timed allocation.")
    rec.note("'reached': workers that had the advertisement before the window closed (its "
             "deadline); 'alloc': one allocate(N) call, from before the advertisement is "
             "published until its leases are accepted: the offer window plus 'accept'; "
             "'last-offer': advertisement to the last offer taken (the N-th when 'offers/alloc' "
             "is N); 'all-N': until N leases were held, retrying as the scheduler does "
             f"({RETRY[0]:g} s backoff, doubling, at most {MAX_ROUNDS} rounds; '-' if never).")
    rec.note(f"hub mesh 'gateway' is the gateway's Gossipsub (D={GATEWAY_GOSSIP_DEGREE}: every "
             f"subscriber in its mesh); 'narrow' is a what-if, an ordinary node's D={GOSSIP_D}, "
             f"D_hi={GOSSIP_D_HI} on the hub, as before the gateway was widened.")
    rec.note(f"All hosts share one Python thread on {os.cpu_count()} cores: 'cpu s/alloc' is "
             "the whole process's CPU during allocate(), against its wall time in 'alloc'. "
             f"Target: all leases held in < {TARGET_S:g} s for {TARGET_WORKERS} workers "
             "(smaller sizes in parentheses).")
    rec.save()


if __name__ == "__main__":
    main()
