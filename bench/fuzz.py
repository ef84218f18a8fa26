"""Do the decoders of peers' bytes hold up against 10^6 malformed inputs?

Runs the mutation fuzzer of ``bench/_fuzz.py`` over its four targets -- the delta codec
(``compress.decode`` and ``StreamDecoder``, which must agree), every control-plane message type
(``messages.decode``), the parameter server's contribution path (``OuterServer`` rounds, whose
global parameters must stay finite) and data slices (``load_slice_bytes``) -- with ``--inputs``
mutated inputs in all (default 10^6, split evenly), on every usable core. Each input must be
accepted or refused with the target's documented error (``CodecError``, ``MessageError``,
``ExchangeError``, ``DatasetError``); anything else, an input slower than ``--slow`` CPU seconds,
a decoded result beyond the decode limits, or a crashed worker is a finding.

Per target the table reports the inputs, how many were accepted (valid) and refused, the
findings, how many different refusals the inputs reached (a rough measure of how deep they got),
inputs per second per core and the slowest input (CPU ms); the total row gives the wall-clock
rate over all processes. Findings are listed after the table and saved, each with its input and
the plan that reproduces it, under ``<results-dir>/fuzz-findings/``; the script then exits 1.

    python bench/fuzz.py                       # 10^6 inputs (a few minutes on 2 cores)
    python bench/fuzz.py --quick               # 20k inputs, a smoke test
    python bench/fuzz.py --targets codec --inputs 200000 --seed 7
    python bench/fuzz.py --replay bench/results/fuzz-findings/codec-exception-0123456789ab.json

Results: ``bench/results/fuzz.{md,jsonl}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import _fuzz as F
from bench._harness import Column, add_common_args, recorder, sig

QUICK_INPUTS = 20_000


def replay_file(path: Path) -> int:
    """Runs a saved finding's input again; prints what the target does with it."""
    info = json.loads(path.read_text())
    data = path.with_suffix(".bin").read_bytes()
    target = F.make_target(info["target"])
    plan = info.get("plan")
    ctx = target.seeds[plan["seed"] % len(target.seeds)].ctx if plan else target.seeds[0].ctx
    print(f"{info['target']}: {len(data)} bytes, recorded as {info['kind']}: {info['error']}")
    try:
        refused = target.run(data, ctx, plan["aux"] if plan else 0)
        target.end()
    except Exception:
        traceback.print_exc()
        return 1
    print("accepted" if refused is None else f"refused: {refused}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--inputs", type=int, default=None,
                    help=f"mutated inputs in all (default 1000000; {QUICK_INPUTS} with --quick)")
    ap.add_argument("--seed", default="0", help="the run's seed: the same seed, the same inputs")
    ap.add_argument("--targets", default=",".join(F.TARGETS),
                    help=f"comma-separated, of {', '.join(F.TARGETS)}")
    ap.add_argument("--jobs", type=int, default=None, help="processes (default: usable cores)")
    ap.add_argument("--slow", type=float, default=F.SLOW_S,
                    help="CPU seconds after which an input is a finding (default %(default)s)")
    ap.add_argument("--hang", type=float, default=F.HANG_S,
                    help="CPU seconds after which an input is interrupted (default %(default)s)")
    ap.add_argument("--replay", type=Path, default=None,
                    help="run a saved finding (its .json) again and exit")
    add_common_args(ap)
    args = ap.parse_args(argv)
    if args.replay is not None:
        return replay_file(args.replay)
    inputs = args.inputs if args.inputs is not None else (QUICK_INPUTS if args.quick else 10**6)
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]

    rec = recorder("fuzz", args)
    findings_dir = None if args.no_save else Path(args.results_dir)
    report = F.run_all(inputs, args.seed, targets=targets, jobs=args.jobs, slow_s=args.slow,
                       hang_s=args.hang, results_dir=findings_dir)
    table = rec.table("targets", [
        Column("target", "target"),
        Column("inputs", "inputs", "d"),
        Column("valid", "valid", "d"),
        Column("refused", "refused", "d"),
        Column("findings", "findings", "d"),
        Column("refusal_kinds", "refusal kinds", "d"),
        Column("inputs_per_s", "inputs/s", sig(3)),
        Column("slowest_ms", "slowest ms", sig(3)),
    ], title=f"{report.inputs} mutated inputs, seed {args.seed}: inputs/s per core "
             "(total: wall clock, all processes); slowest input in CPU ms")
    for row in report.rows:
        table.add(**row)
    for note in report.notes:
        rec.note(f"{note} (not a finding)")
    rec.note(f"engine: seeded structure-aware mutation loop (bench/_fuzz.py), {report.wall_s:.0f} s "
             f"wall on {args.jobs or len(os.sched_getaffinity(0))} processes")
    if report.findings:
        ft = rec.table("findings", [
            Column("target", "target"),
            Column("kind", "kind"),
            Column("count", "inputs", "d"),
            Column("error", "error", lambda s: s if len(s) <= 90 else s[:90] + "..."),
            Column("size", "input bytes", "d"),
            Column("file", "saved as"),
        ], title="findings (one per signature: target, kind, exception type, where raised)")
        files = report.saved or [None] * len(report.findings)
        for f, path in zip(report.findings, files, strict=True):
            ft.add(target=f.target, kind=f.kind, count=f.count, error=f.error, size=len(f.data),
                   file=str(path.name) if path else None)
        for f in report.findings:
            print(f"\n{f.describe()}\n  plan: {f.plan}\n{f.traceback}")
    else:
        rec.note("no findings")
    rec.save()
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
