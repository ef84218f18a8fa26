"""End to end: DiLoCo over a whole local Hypha network, and what performance-aware synchronisation
buys when one worker is slow.

Each run is ``python -m hypha up`` (:func:`hypha.up.run`): a throw-away PKI, a gateway, a data node
serving the Python standard library's sources (every 20th file held out for evaluation), a worker
offering the parameter-server executor, three training workers and a scheduler with the DiLoCo
job, every one a separate OS process on 127.0.0.1 speaking mTLS. The trainers run the byte-level
GPT (``--model``, default ``gpt``: 867,072 parameters, context 64) with AdamW, batches of 8, and
send int2 pseudo-gradients with error feedback; the parameter server averages what came and
applies the outer Nesterov step (lr 0.7, momentum 0.9). Every run has the same token budget:
``--rounds`` x ``--sync-batches`` x 3 workers x 8 x 64 tokens.

The runs, side by side in one invocation:

* ``equal``: three equal workers, performance-aware synchronisation on;
* ``slow, sync off``: worker 0 throttled 3x (``HYPHA_THROTTLE=3``: it sleeps twice its compute
  time after every batch, and reports the slow speed), every worker runs the same
  ``--sync-batches`` per round, so the two fast ones wait at the parameter server;
* ``slow, sync on``: the same, with the scheduler telling each worker how many batches to run so
  that all reach the round's end together (the round's budget stays 3 x ``--sync-batches``).

Reported per run: the final held-out loss of the global model (the parameter server's checkpoint,
1024 windows of 64 bytes), wall time of the training (from the scheduler's start to its exit),
bytes on the wire per worker (pseudo-gradients sent; updates and the initial model received), and
each worker's idle share: the time it spent blocked in synchronisation (from pushing its
pseudo-gradient until the update was applied) over its wall time. The same model trained alone
for the same tokens is measured once, in the first run.

Target (issue 6): with the throttled worker present and performance-aware synchronisation on, the
fast workers idle less than 10% of the wall time.

This machine has 2 cores for 3 trainers, a parameter server and 3 more nodes, so absolute times
are slow and noisy; the ratios between the runs are the point.

    python bench/e2e.py                 # ~10 minutes
    python bench/e2e.py --quick         # smoke test: tiny model, 3 rounds
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import Column, add_common_args, fmt_bytes, pct, recorder, sig
from hypha.up import UpOptions, run

TARGET_IDLE = 0.10


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--sync-batches", type=int, default=40)
    ap.add_argument("--model", default="gpt")
    ap.add_argument("--throttle", type=float, default=3.0)
    ap.add_argument("--runs", default="equal,slow-off,slow-on",
                    help="comma-separated subset of equal, slow-off, slow-on")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.sync_batches, args.model = 3, 10, "gpt:tiny"
    rec = recorder("e2e", args)
    table = rec.table("runs", [
        Column("run", "run", None, 16),
        Column("perf_aware", "perf-aware sync", None, 15),
        Column("eval_loss", "eval loss", sig(4), 9),
        Column("baseline", "alone, same tokens", sig(4), 18),
        Column("wall", "train wall s", sig(3), 12),
        Column("bytes", "bytes/worker", fmt_bytes, 12),
        Column("idle_fast", "idle, fast workers", pct, 18),
        Column("idle_slow", "idle, slow worker", pct, 17),
        Column("target", f"fast idle < {TARGET_IDLE:.0%}", None, 16),
    ])
    runs = {"equal": ({}, True), "slow-off": ({0: args.throttle}, False),
            "slow-on": ({0: args.throttle}, True)}
    wanted = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = sorted(set(wanted) - set(runs))
    if unknown:
        ap.error(f"unknown run(s) {unknown}; choose from {sorted(runs)}")
    plot_dir = None if args.no_save else Path(args.results_dir)
    for i, name in enumerate(wanted):
        throttle, perf_aware = runs[name]
        options = UpOptions(workers=3, rounds=args.rounds, sync_batches=args.sync_batches,
                            model=args.model, throttle=throttle, perf_aware=perf_aware,
                            baseline=i == 0, progress=False, eval_sequences=1024,
                            plot=None if plot_dir is None else plot_dir / f"e2e-{name}.png")
        result = run(options)
        # idle shares are keyed by node name; worker-0 is the throttled one
        shares = list(result.idle_share.values())
        slow = result.idle_share.get("worker-0") if throttle else None
        fast = [v for k, v in result.idle_share.items() if not (throttle and k == "worker-0")]
        idle_fast = max(fast) if fast else max(shares, default=0.0)
        target = "-"
        if throttle and perf_aware:
            target = "pass" if idle_fast < TARGET_IDLE else "miss"
        table.add(
            run=name, perf_aware="on" if perf_aware else "off", eval_loss=result.eval_loss,
            baseline=result.baseline_eval_loss if result.baseline_eval_loss is not None else "-",
            wall=result.train_seconds,
            bytes=result.bytes_sent_per_worker + result.bytes_received_per_worker,
            idle_fast=idle_fast, idle_slow=slow if slow is not None else "-", target=target)
        rec.note(f"{name}: idle shares {', '.join(f'{k} {v:.1%}' for k, v in sorted(result.idle_share.items()))}; "
                 f"tokens {result.tokens:,}; plot {result.plot}")
    rec.note(f"budget: {args.rounds} rounds x {args.sync_batches} batches x 3 workers x 8 x 64 "
             f"tokens; model {args.model}; codec int2 + error feedback; throttle {args.throttle}x "
             "on worker 0 in the slow runs")
    rec.save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
