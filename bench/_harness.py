"""The shared benchmark harness: timing, tables, and recording results.

Benchmarks only define their setup (closures to time, rows to report); this module does the rest,
the same way for every script:

* :func:`measure` times several candidates side by side in one run: each is warmed up, then the
  candidates are timed round-robin (so slow drifts of a noisy machine hit all of them alike), and
  the median of the repeats is reported. Very short calls are repeated inside one sample; CUDA is
  synchronised around every sample (or timed with CUDA events).
* :class:`Table` prints aligned rows as they are produced; :class:`Recorder` appends every table
  of a run to ``<results-dir>/<name>.md`` (a ``## <date> <commit> <machine>`` section) and
  ``<results-dir>/<name>.jsonl`` (one JSON object per row, with the same metadata).
* :func:`add_common_args` gives every script the same flags (``--quick``, ``--repeats``,
  ``--results-dir``, ...).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "DEFAULT_RESULTS_DIR",
    "ROOT",
    "Column",
    "Recorder",
    "Table",
    "Timing",
    "add_common_args",
    "fmt_bytes",
    "fmt_size",
    "measure",
    "mem_available",
    "metadata",
    "parse_sizes",
    "pct",
    "recorder",
    "sig",
    "sync",
    "times",
    "timing_kwargs",
]

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_RESULTS_DIR = ROOT / "bench" / "results"


# --- timing -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Seconds per call: the median over ``n`` samples, each the mean of ``inner`` calls."""

    median: float
    min: float
    max: float
    n: int
    inner: int

    @property
    def spread(self) -> float:
        """(max - min) / median over the samples: how noisy this measurement was."""
        return (self.max - self.min) / self.median if self.median > 0 else float("nan")

    @classmethod
    def from_samples(cls, samples: Sequence[float], inner: int) -> Timing:
        return cls(statistics.median(samples), min(samples), max(samples), len(samples), inner)


def sync(device: torch.device | str | None) -> None:
    """Waits for queued device work (CUDA); a no-op on CPU."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _sample(
    fn: Callable[[], object], inner: int, device: torch.device | None, events: bool
) -> float:
    """Seconds per call of ``fn``, averaged over ``inner`` back-to-back calls."""
    if events and device is not None and device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sync(device)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    sync(device)
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    sync(device)
    return (time.perf_counter() - t0) / inner


def measure(
    fns: Mapping[str, Callable[[], object]],
    *,
    device: torch.device | str | None = None,
    warmup: int = 2,
    repeats: int = 7,
    min_repeats: int = 3,
    budget_s: float = 10.0,
    warmup_s: float = 2.0,
    min_sample_s: float = 0.02,
    cuda_events: bool = False,
) -> dict[str, Timing]:
    """Times every candidate in ``fns`` side by side; returns ``{name: Timing}``.

    Each candidate gets up to ``warmup`` untimed calls (at least one; later ones are skipped
    once ``warmup_s`` is spent), which also estimate its cost. Calls shorter than
    ``min_sample_s`` are batched so one sample lasts about that long. A candidate gets
    ``repeats`` samples, fewer (but never below ``min_repeats``) when they would take more than
    ``budget_s`` in total. The samples are taken round-robin across the candidates.
    """
    dev = torch.device(device) if device is not None else None
    inner: dict[str, int] = {}
    reps: dict[str, int] = {}
    for name, fn in fns.items():
        spent, est = 0.0, 0.0
        for _ in range(max(1, warmup)):
            est = _sample(fn, 1, dev, cuda_events)
            spent += est
            if spent >= warmup_s:
                break
        est = max(est, 1e-9)
        inner[name] = max(1, min(10_000, math.ceil(min_sample_s / est)))
        per_sample = est * inner[name]
        reps[name] = max(min_repeats, min(repeats, int(budget_s // per_sample)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for r in range(max(reps.values(), default=0)):
        for name, fn in fns.items():
            if r < reps[name]:
                samples[name].append(_sample(fn, inner[name], dev, cuda_events))
    return {name: Timing.from_samples(samples[name], inner[name]) for name in fns}


# --- sizes and memory ---------------------------------------------------------------------------

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}


def parse_sizes(text: str) -> list[int]:
    """``"1M,4M,16M"`` -> element counts (binary units: 1M = 2**20); plain integers allowed."""
    out = []
    for part in text.split(","):
        part = part.strip().upper()
        if not part:
            continue
        unit = part[-1] if part[-1] in _UNITS and not part[-1].isdigit() else ""
        num = part[:-1] if unit else part
        out.append(int(float(num) * _UNITS[unit]))
    return out


def fmt_size(n: int) -> str:
    """Element count in the units of :func:`parse_sizes`: 16777216 -> ``"16M"``."""
    for unit in ("G", "M", "K"):
        if n >= _UNITS[unit] and n % _UNITS[unit] == 0:
            return f"{n // _UNITS[unit]}{unit}"
    return str(n)


def fmt_bytes(n: float) -> str:
    for unit, div in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def mem_available(device: torch.device | str = "cpu") -> int:
    """Bytes that can still be allocated on ``device`` (MemAvailable on CPU)."""
    dev = torch.device(device)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 62  # unknown: do not skip anything


# --- metadata -----------------------------------------------------------------------------------


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "--no-optional-locks", "-C", str(ROOT), *args],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def commit() -> str:
    """``git rev-parse --short HEAD``, plus ``-dirty`` when the tree (outside bench/results) has
    uncommitted or untracked changes."""
    head = _git("rev-parse", "--short", "HEAD")
    if not head:
        return "unknown"
    status = _git(
        "status", "--porcelain", "--untracked-files=normal", "--", ".", ":(exclude)bench/results"
    )
    return head + ("-dirty" if status else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def metadata(device: torch.device | str = "cpu") -> dict[str, Any]:
    """Date, commit and machine of a run; every recorded row carries these fields."""
    dev = torch.device(device)
    meta: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit(),
        "cpu": cpu_model(),
        "cores": cpu_cores(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": dev.type,
    }
    machine = f"{meta['cpu']}, {meta['cores']} cores, torch {meta['torch']}"
    if dev.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(dev)
        meta["cuda"] = torch.version.cuda
        machine = f"{meta['gpu']} (CUDA {meta['cuda']}); host {machine}"
    meta["machine"] = machine
    meta["argv"] = " ".join(shlex.quote(a) for a in ["python", *sys.argv])
    return meta


# --- tables -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column: ``key`` in the row dicts, its header, and how to format the value: a format
    spec (``".2f"``), a callable, or None for ``str``. None values print as ``-``."""

    key: str
    header: str
    fmt: str | Callable[[Any], str] | None = None
    width: int = 0

    def format(self, value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, str) or self.fmt is None:
            return str(value)
        if callable(self.fmt):
            return self.fmt(value)
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return format(value, self.fmt)


def sig(digits: int = 3) -> Callable[[Any], str]:
    """A formatter to ``digits`` significant digits, without exponents for usual magnitudes."""

    def f(v: Any) -> str:
        v = float(v)
        if v == 0 or not math.isfinite(v):
            return str(v) if not math.isfinite(v) else "0"
        mag = math.floor(math.log10(abs(v)))
        if mag >= digits + 3 or mag < -4:
            return f"{v:.{digits - 1}e}"
        return f"{v:.{max(0, digits - 1 - mag)}f}"

    return f


def pct(v: Any) -> str:
    return f"{100 * float(v):.0f}%"


def times(v: Any) -> str:
    return f"{float(v):.2f}x"


class Table:
    """Rows of a fixed set of columns, printed aligned as they come (``stream``), recorded by a
    :class:`Recorder`. ``add`` takes the raw values; the JSONL gets them unformatted."""

    def __init__(
        self, name: str, columns: Sequence[Column], *, title: str = "", stream: bool = True
    ) -> None:
        self.name = name
        self.title = title
        self.columns = list(columns)
        self.rows: list[dict[str, Any]] = []
        self.stream = stream
        self._widths = [max(len(c.header), c.width, 4) for c in self.columns]
        self._printed_header = False

    def _line(self, cells: Sequence[str]) -> str:
        out = []
        for i, (cell, w) in enumerate(zip(cells, self._widths, strict=True)):
            out.append(cell.ljust(w) if i == 0 else cell.rjust(w))
        return "  ".join(out).rstrip()

    def print_header(self) -> None:
        if self.title:
            print(f"\n{self.title}")
        head = self._line([c.header for c in self.columns])
        print(head)
        print("-" * len(head), flush=True)
        self._printed_header = True

    def add(self, **row: Any) -> dict[str, Any]:
        self.rows.append(row)
        if self.stream:
            if not self._printed_header:
                self.print_header()
            cells = [c.format(row.get(c.key)) for c in self.columns]
            print(self._line(cells), flush=True)
        return row

    def text(self) -> str:
        """The whole table, columns sized to their contents."""
        cells = [[c.header for c in self.columns]] + [
            [c.format(r.get(c.key)) for c in self.columns] for r in self.rows
        ]
        widths = [max(len(row[i]) for row in cells) for i in range(len(self.columns))]
        lines = []
        for j, row in enumerate(cells):
            parts = [
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ]
            lines.append("  ".join(parts).rstrip())
            if j == 0:
                lines.append("-" * len(lines[0]))
        return "\n".join(lines)

    def print(self) -> None:
        """Prints the title and the whole table (for tables not streamed row by row)."""
        if self.title:
            print(f"\n{self.title}")
        print(self.text(), flush=True)

    def markdown(self) -> str:
        head = "| " + " | ".join(c.header for c in self.columns) + " |"
        rule = "|" + "|".join(":---" if i == 0 else "---:" for i in range(len(self.columns))) + "|"
        body = [
            "| "
            + " | ".join(c.format(r.get(c.key)).replace("|", "\\|") for c in self.columns)
            + " |"
            for r in self.rows
        ]
        return "\n".join([head, rule, *body])


@dataclass
class Recorder:
    """Collects the tables and notes of one benchmark run and appends them to the results."""

    name: str
    results_dir: Path | None  # None: print only, record nothing
    device: torch.device | str = "cpu"
    meta: dict[str, Any] = field(default_factory=dict)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.meta = metadata(self.device)
        print(
            f"# {self.name}: {self.meta['date']}  {self.meta['commit']}  {self.meta['machine']}  "
            f"({self.meta['threads']} torch threads)",
            flush=True,
        )

    def table(self, name: str, columns: Sequence[Column], *, title: str = "") -> Table:
        t = Table(name, columns, title=title)
        self.tables.append(t)
        return t

    def note(self, text: str) -> None:
        """Prints ``text`` and keeps it for the markdown section."""
        print(text, flush=True)
        self.notes.append(text)

    def save(self) -> None:
        if self.results_dir is None:
            print("\n(results not recorded: --no-save)")
            return
        self.results_dir.mkdir(parents=True, exist_ok=True)
        md = self.results_dir / f"{self.name}.md"
        jsonl = self.results_dir / f"{self.name}.jsonl"
        m = self.meta
        parts = [
            f"## {m['date']} {m['commit']} {m['machine']}",
            "",
            f"`{m['argv']}` ({m['threads']} torch threads, Python {m['python']})",
        ]
        for t in self.tables:
            parts += ["", f"### {t.name}", ""] + ([t.title, ""] if t.title else []) + [t.markdown()]
        if self.notes:
            parts += [""] + [f"- {n}" for n in self.notes]
        new_file = not md.exists() or md.stat().st_size == 0
        with md.open("a") as f:
            if new_file:
                f.write(f"# {self.name}\n\nAppended by `bench/{self.name}.py`; newest last.\n\n")
            f.write("\n".join(parts) + "\n\n")
        with jsonl.open("a") as f:
            for t in self.tables:
                for row in t.rows:
                    f.write(
                        json.dumps(
                            {"bench": self.name, "table": t.name, **m, **row}, default=_json_default
                        )
                        + "\n"
                    )
        print(f"\nrecorded: {_rel(md)}, {_rel(jsonl)}")


def _json_default(v: Any) -> Any:
    if isinstance(v, Timing):
        return {"median": v.median, "min": v.min, "max": v.max, "n": v.n, "inner": v.inner}
    if isinstance(v, Path | torch.device | torch.dtype):
        return str(v)
    raise TypeError(f"not JSON serialisable: {type(v).__name__}")


def _rel(p: Path) -> str:
    try:
        return str(p.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(p)


# --- command line -------------------------------------------------------------------------------


def add_common_args(ap: argparse.ArgumentParser) -> None:
    """The flags every benchmark shares."""
    g = ap.add_argument_group("harness")
    g.add_argument(
        "--quick", action="store_true", help="small sizes and fewer repeats (smoke test)"
    )
    g.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed samples per candidate (default 7; 3 with --quick)",
    )
    g.add_argument("--warmup", type=int, default=2, help="untimed calls before timing (default 2)")
    g.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds of timed samples per candidate; slow candidates get fewer repeats, never below 3 "
        "(default 10; 2 with --quick)",
    )
    g.add_argument(
        "--cuda-events", action="store_true", help="time CUDA with events instead of wall clock"
    )
    g.add_argument(
        "--results-dir",
        type=Path,
        default=DEFAULT_RESULTS_DIR,
        help="where <name>.md and <name>.jsonl are appended (default bench/results)",
    )
    g.add_argument("--no-save", action="store_true", help="print only, record nothing")


def timing_kwargs(args: argparse.Namespace, device: torch.device | str | None) -> dict[str, Any]:
    """The :func:`measure` keyword arguments for the parsed common flags."""
    repeats = args.repeats if args.repeats is not None else (3 if args.quick else 7)
    budget = args.budget if args.budget is not None else (2.0 if args.quick else 10.0)
    return {
        "device": device,
        "warmup": args.warmup,
        "repeats": repeats,
        "min_repeats": min(3, repeats),
        "budget_s": budget,
        "cuda_events": args.cuda_events,
    }


def recorder(name: str, args: argparse.Namespace, device: torch.device | str = "cpu") -> Recorder:
    return Recorder(name, None if args.no_save else Path(args.results_dir), device)
