"""The fault matrix: does Hypha keep training through machines dying, links breaking and hostile
input, and keep intruders out?

Three parts, in one run, recorded together (bench/results/faults.md, faults.jsonl):

* **Faults** (tests/integration/_faults.py): a DiLoCo run on a local network of real processes
  (``hypha.up.LocalNetwork``: gateway, data node, parameter server, trainers, scheduler, every one
  an OS process speaking mTLS), a fault injected at a named point, and the expected outcome
  checked from the logs, the scheduler's metrics log and /proc: kill -9 a trainer, the parameter
  server, the scheduler; a network partition (network namespaces; skipped, and said so, where
  they cannot be created); a 10x straggler; a worker joining mid-run. ``--scale`` lengthens the
  runs (more rounds). Reported: rounds lost, bytes wasted, recovery time.
* **Bad input**: the test modules that feed each kind of hostile input to real nodes (payloads to
  a live parameter server, malformed messages, floods, bad certificates, lease misuse, job-bridge
  paths), run with pytest; a row is its kind, what must happen, and what the tests observed.
* **Fuzzing** (bench/_fuzz.py): the codec decoder, every message decoder, the parameter server's
  contribution path and the data-slice loader on ``--inputs`` mutated inputs (10^6 by default).

Exit status 1 when any row fails: a failure is a bug to fix, not a row to document.

    python bench/faults.py                 # the full matrix, ~10 minutes
    python bench/faults.py --quick         # scale 1, 20k fuzz inputs
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._harness import ROOT, Column, add_common_args, recorder, sig

#: (input, expected outcome, pytest targets that check it)
BAD_INPUT: list[tuple[str, str, list[str]]] = [
    ("payloads: bit flip, truncated, oversized, wrong shapes, wrong codec, NaN, out of step, "
     "replayed (late), non-member",
     "refused with the reason to the sender, logged, counted in the round's report; the global "
     "model is what the partial-contribution rule gives",
     ["tests/integration/test_parameter_server.py", "tests/unit/optim/test_server.py"]),
    ("messages: malformed, unknown versions, huge fields",
     "MessageError naming the message and field; the RPC answers an error, the node goes on",
     ["tests/unit/messages", "tests/integration/test_network.py"]),
    ("floods: >10^4 requests/s from one peer",
     "throttled per peer (rate limited, counted); other peers still served",
     ["tests/integration/test_flood.py", "tests/unit/net/test_admission.py"]),
    ("certificates: none, self-signed, other CA, expired, revoked (also by a CRL reload while "
     "connected), a peer ID not matching the key",
     "handshake refused, the reason logged on both sides; never a stream",
     ["tests/integration/test_security.py", "tests/unit/net/test_tls.py"]),
    ("leases: renewing another scheduler's lease, dispatching without a lease",
     "RequestRejected with the reason; nothing changes",
     ["tests/integration/test_market.py"]),
    ("job bridge: absolute paths, '..', escaping symlinks, oversized requests",
     "4xx with a message; nothing written outside the work directory",
     ["tests/unit/executors/test_bridge.py", "tests/unit/executors/test_paths.py",
      "tests/unit/executors/test_bridge_metrics.py"]),
]


def run_pytest(targets: list[str]) -> tuple[bool, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           *targets], cwd=ROOT, capture_output=True, text=True,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    summary = next((line for line in reversed(proc.stdout.splitlines())
                    if re.search(r"\d+ (passed|failed)", line)), proc.stdout[-200:])
    return proc.returncode == 0, summary.strip("= "), time.monotonic() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=int, default=2, help="rounds multiplier of the fault runs")
    ap.add_argument("--inputs", type=int, default=1_000_000, help="fuzzing inputs in all")
    ap.add_argument("--parts", default="faults,input,fuzz")
    add_common_args(ap)
    args = ap.parse_args()
    if args.quick:
        args.scale, args.inputs = 1, 20_000
    parts = {p.strip() for p in args.parts.split(",")}
    rec = recorder("faults", args)
    ok = True

    if "faults" in parts:
        from tests.integration._faults import SCENARIOS, Unavailable

        table = rec.table("faults", [
            Column("fault", "fault", None, 44),
            Column("expected", "expected", None, 30),
            Column("observed", "observed", None, 30),
            Column("rounds_lost", "rounds lost", None, 11),
            Column("bytes_wasted", "bytes wasted", None, 12),
            Column("recovery_s", "recovery s", sig(3), 10),
            Column("result", "result", None, 7),
        ])
        for name, scenario in SCENARIOS.items():
            with tempfile.TemporaryDirectory(prefix=f"hypha-fault-{name}-") as tmp:
                try:
                    row = scenario(Path(tmp) / "run", args.scale)
                except Unavailable as exc:
                    table.add(fault=name, expected="-", observed=f"skipped: {exc}",
                              rounds_lost="-", bytes_wasted="-", recovery_s=0.0,
                              result="skipped")
                    continue
                except Exception as exc:  # a scenario that could not finish is a failure
                    ok = False
                    table.add(fault=name, expected="-", observed=f"{type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]}", rounds_lost="-",
                              bytes_wasted="-", recovery_s=0.0, result="FAIL")
                    continue
            ok &= row.ok
            failed = [c for c, good in row.checks.items() if not good]
            table.add(fault=row.fault, expected=row.expected,
                      observed=row.observed + (f" (failed: {', '.join(failed)})" if failed
                                               else ""),
                      rounds_lost=row.rounds_lost, bytes_wasted=row.bytes_wasted,
                      recovery_s=row.recovery_s, result="pass" if row.ok else "FAIL")

    if "input" in parts:
        table = rec.table("bad input", [
            Column("input", "input", None, 44),
            Column("expected", "expected", None, 30),
            Column("observed", "observed (the tests that check it)", None, 40),
            Column("seconds", "s", sig(3), 6),
            Column("result", "result", None, 7),
        ])
        for what, expected, targets in BAD_INPUT:
            good, summary, seconds = run_pytest(targets)
            ok &= good
            table.add(input=what, expected=expected,
                      observed=f"{summary} ({', '.join(targets)})", seconds=seconds,
                      result="pass" if good else "FAIL")

    if "fuzz" in parts:
        from bench._fuzz import run_all

        report = run_all(inputs=args.inputs, seed=0,
                         results_dir=None if args.no_save else str(args.results_dir))
        table = rec.table("fuzzing", [
            Column("target", "target", None, 9),
            Column("inputs", "inputs", None, 8),
            Column("valid", "valid", None, 7),
            Column("refused", "refused", None, 8),
            Column("findings", "findings", None, 8),
            Column("inputs_per_s", "inputs/s", sig(3), 9),
            Column("slowest_ms", "slowest ms", sig(3), 10),
        ])
        for row in report.rows:
            table.add(**{k: row.get(k) for k in ("target", "inputs", "valid", "refused",
                                                  "findings", "inputs_per_s", "slowest_ms")})
        ok &= report.ok
        for note in report.notes:
            rec.note(f"fuzzing: {note}")

    rec.note(f"fault runs: a tiny GPT, 2-3 trainers, rounds x {args.scale}; every node an OS "
             "process on 127.0.0.1 (the partition: one network namespace per node)")
    rec.note("result: all pass" if ok else "result: FAILURES (see the rows)")
    rec.save()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
