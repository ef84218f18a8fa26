"""One DiLoCo outer step, ours against torchft's: wall time and the bytes each worker sends.

Both systems run the same job in the same invocation, one after the other, on the same machine:
``--workers`` processes on 127.0.0.1 (default 4; each with ``--threads`` torch threads), each
training its own copy of the same model with AdamW (lr 1e-3, batch ``--batch`` of random
regression data, a different stream per worker) and syncing every ``--sync-every`` inner steps
with an outer Nesterov SGD step (lr 0.7, momentum 0.9). The model is a residual stack of
pre-LayerNorm ``Linear(d, d)`` + GELU blocks (d = 1024; 512 below 8M parameters) sized to
``--sizes`` (default 10M and 100M parameters, binary units), initialised from the same seed
everywhere. Its pseudo-gradients compress like a real language model's (int2+zstd: about 1.65
bits per parameter, as on bench/_pseudograd.py's), which matters for the bytes: the codec's
zstd stage gains more on smoother data.

* **ours** (``hypha.optim.DiLoCo`` + ``DistTransport``): ``torch.distributed`` with gloo over
  TCP; every worker is the parameter server of 1/N of the parameters; pseudo-gradients are
  compressed by ``--codecs`` (default int2+zstd, int4, and fp32 as a reference point).
* **torchft** (``torchft`` 0.2.0, ``torchft.local_sgd.DiLoCo`` as its docs use it): a
  ``LighthouseServer`` in the launcher process, every worker its own replica group (one
  ``Manager`` with a ``ProcessGroupGloo``, its own ``TCPStore``, synchronous quorum,
  ``init_sync=False`` since all copies start from the same seed), the whole model one fragment,
  outer ``torch.optim.SGD(lr=0.7, momentum=0.9, nesterov=True)``, its defaults otherwise: an
  fp32 all-reduce per parameter tensor (gloo's ring), no quantization (torchft's quantized
  all-reduce needs CUDA and Triton).

**Outer step time**: every round runs ``sync_every - 1`` inner steps, then the forward and
backward of the last one; then all workers meet at a barrier (a ``multiprocessing.Barrier``,
shared memory, no TCP), each times the ``step()`` call that triggers the sync (the last inner
step's AdamW update included, for both systems: for torchft the sync runs in a post-hook of the
inner optimizer's ``step()``, with its quorum and commit RPCs), and all meet again. A round's
time is the slowest worker's. A launch (fresh processes) runs ``--warmup`` untimed rounds
(default 1; torchft forms its first quorum and its process group there) and ``--repeats`` timed
ones (default 3); every system runs ``--passes`` launches (default 2), the passes in alternating
order (torchft, ours..., then ours..., torchft) so a slow drift of the machine hits all alike; the
table gives the median over all timed rounds, and the CPU time each worker spent in the step
(``getrusage``, all its threads). Before each launch the script measures for a second how busy
other processes keep the machine, and flags rows whose launches found it busy.

**Bytes sent per worker**: measured, not computed. Every worker snapshots the kernel's
per-socket TCP counters of all its own sockets (``getsockopt(TCP_INFO)``:
``tcpi_bytes_sent``, see bench/_netbytes.py, self-checked on a known transfer at start-up)
between the first two barriers and again after the last one, so the count holds everything the
worker put on TCP during the step: payloads, framing, and for torchft its quorum and
should-commit RPCs and lighthouse heartbeats (small). The table gives the mean over workers
(median over rounds); "own count" is the same quantity as the system sees it: ours, the
transport's ``bytes_sent``; torchft, the ring all-reduce model 2 (N-1)/N x 4 bytes x params. The
``lo`` interface's transmitted bytes over the step / N (all processes, headers included) are
recorded in the JSONL as a machine-wide cross-check.

Targets (issue): ours sends >= 16x fewer bytes per worker than torchft and its outer step is
faster. Note: on loopback the "link" is memory-speed, so compression buys little time here;
the time comparison is mostly encode/decode cost against a memcpy-speed all-reduce.

torchft is not a project dependency: ``make bench-sync`` installs it (``--no-deps``, so the
project's CPU torch stays untouched, plus its pure-Python OpenTelemetry dependencies) into the
ignored ``.bench-deps/``, which this script appends to ``sys.path`` (``--deps`` to point
elsewhere). Without it, the torchft rows are skipped with a note.

    python bench/sync.py --quick --results-dir /tmp/benchsmoke      # smoke test
    python bench/sync.py                                             # full run, recorded
    python bench/sync.py --sizes 10M --codecs int2+zstd --systems hypha
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import logging
import math
import multiprocessing as mp
import os
import queue
import resource
import socket
import statistics
import sys
import threading
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path[0] is bench/, where kernels.py would shadow the repo's kernels/.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from bench import _harness as h  # noqa: E402
from bench import _netbytes  # noqa: E402

DEFAULT_SIZES = "10M,100M"
QUICK_SIZES = "1M"
DEFAULT_CODECS = "int2+zstd,int4,fp32"
DEFAULT_DEPS = _ROOT / ".bench-deps"
TORCHFT_VERSION = "0.2.0"
#: targets of the issue: ours sends at least this many times fewer bytes than torchft ...
TARGET_BYTES_RATIO = 16.0
#: ... and its outer step is faster (speed-up above this)
TARGET_SPEEDUP = 1.0
#: fp32 copies of the parameters one worker holds at its peak, to decide whether N workers fit
#: in memory (model, grad, 2 AdamW moments + the system's own: torchft backup, pseudo-gradient,
#: outer momentum, local copy; ours global copy, error feedback, 2/N shards); rounded up.
MEM_COPIES = {"torchft": 9, "hypha": 7}
#: other processes busier than this (cores) before a launch: its times get a warning
BUSY_WARN = 0.25
TIMEOUT_S = 1800.0  # one launch (all rounds of one system at one size)


# --- the model and the inner steps (identical for both systems) -------------------------------


class Block(nn.Module):
    """A pre-LayerNorm residual block, as in a transformer's MLP: without the norm, a deep stack
    trains its late blocks so little that their pseudo-gradients compress far better than a
    real model's (int2+zstd: 0.7 bits/param at 100M instead of about 1.65, the figure of
    bench/_pseudograd.py's language model)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nn.functional.gelu(self.lin(self.ln(x)))


def _block_params(d: int) -> int:
    return d * d + 3 * d  # Linear weight + bias, LayerNorm weight + bias


def model_shape(n: int) -> tuple[int, int]:
    """(width, blocks) of the residual MLP closest to ``n`` parameters."""
    d = 1024 if n >= 8 << 20 else 512
    return d, max(1, round(n / _block_params(d)))


def make_model(n: int) -> nn.Sequential:
    d, blocks = model_shape(n)
    torch.manual_seed(0)  # the same initial parameters on every worker, for both systems
    return nn.Sequential(*(Block(d) for _ in range(blocks)))


def n_params(n: int) -> int:
    d, blocks = model_shape(n)
    return blocks * _block_params(d)


class Batches:
    """Random regression batches, a different stream per worker, the same in every run."""

    def __init__(self, rank: int, d: int, batch: int) -> None:
        self.gen = torch.Generator().manual_seed(1000 + rank)
        self.d, self.batch = d, batch

    def loss(self, model: nn.Module) -> torch.Tensor:
        x = torch.randn(self.batch, self.d, generator=self.gen)
        y = torch.randn(self.batch, self.d, generator=self.gen)
        return torch.nn.functional.mse_loss(model(x), y)


def params_digest(model: nn.Module) -> str:
    """Hash of the parameter bytes: equal on every worker after a sync."""
    d = hashlib.blake2b(digest_size=8)
    for p in model.parameters():
        d.update(p.detach().contiguous().numpy().tobytes())
    return d.hexdigest()


# --- one worker process -----------------------------------------------------------------------


def _cpu_seconds() -> float:
    """User + system CPU time of this process, all its threads (gloo's, torchft's) included."""
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class _Round:
    """The measurements of one worker around one outer step."""

    def __init__(self, barrier: Any, timeout: float) -> None:
        self.barrier, self.timeout = barrier, timeout
        self.rec: dict[str, Any] = {}

    def __enter__(self) -> _Round:
        self.barrier.wait(self.timeout)  # everyone finished its inner steps
        self.lo0 = _netbytes.loopback_tx_bytes()
        self.snap0 = _netbytes.snapshot()
        self.barrier.wait(self.timeout)  # everyone took its "before" snapshot
        self.cpu0 = _cpu_seconds()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:
            return
        seconds = time.perf_counter() - self.t0
        cpu = _cpu_seconds() - self.cpu0
        self.barrier.wait(self.timeout)  # everyone's step returned: all bytes delivered
        delta = _netbytes.snapshot() - self.snap0
        self.rec.update(
            seconds=seconds,
            cpu_s=cpu,
            tcp_sent=delta.sent,
            tcp_acked=delta.acked,
            tcp_received=delta.received,
            lo_tx=_netbytes.loopback_tx_bytes() - self.lo0,
        )


def _worker(
    system: str,
    rank: int,
    world: int,
    cfg: dict[str, Any],
    barrier: Any,
    results: Any,
) -> None:
    try:
        torch.set_num_threads(cfg["threads"])
        run = _run_hypha if system == "hypha" else _run_torchft
        out = run(rank, world, cfg, barrier)
        out["rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["rank"] = rank
        results.put(out)
    except BaseException:
        results.put({"rank": rank, "error": traceback.format_exc()})
        barrier.abort()  # release the others from the barrier: the launch has failed


def _train_rounds(
    cfg: dict[str, Any],
    rank: int,
    model: nn.Module,
    step: Any,
    zero_grad: Any,
    barrier: Any,
    extra: Any = None,
) -> list[dict[str, Any]]:
    """Runs warm-up + timed rounds; returns the records of the timed ones."""
    batches = Batches(rank, model_shape(cfg["size"])[0], cfg["batch"])
    rounds = []
    for r in range(cfg["warmup"] + cfg["rounds"]):
        for _ in range(cfg["sync_every"] - 1):
            batches.loss(model).backward()
            step()
            zero_grad()
        batches.loss(model).backward()
        before = extra() if extra else {}
        with _Round(barrier, cfg["barrier_timeout"]) as rnd:
            step()  # the sync_every-th inner step: triggers the outer step
        zero_grad()
        if r >= cfg["warmup"]:
            after = extra() if extra else {}
            rnd.rec.update({k: after[k] - before[k] for k in before})
            rounds.append(rnd.rec)
    return rounds


def _run_hypha(rank: int, world: int, cfg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    import torch.distributed as dist

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # "hypha._C is not built"
        from hypha.optim import DiLoCo, DistTransport

    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{cfg['port']}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=cfg["barrier_timeout"]),
    )
    try:
        model = make_model(cfg["size"])
        inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
        comm = DistTransport()
        opt = DiLoCo(inner, comm, sync_every=cfg["sync_every"], codec=cfg["codec"], timeout=600.0)

        def counters() -> dict[str, Any]:
            return {
                "own_sent": comm.bytes_sent,
                "exchange_s": opt.stats.exchange_seconds,
                "outer_rounds": opt.stats.outer_rounds,
            }

        with opt:
            rounds = _train_rounds(cfg, rank, model, opt.step, opt.zero_grad, barrier, counters)
            assert all(r["outer_rounds"] == 1 for r in rounds), "a timed step did not sync"
            digest = params_digest(model)
        comm.close()
        return {
            "rounds": rounds,
            "digest": digest,
            "params": sum(p.numel() for p in model.parameters()),
        }
    finally:
        dist.destroy_process_group()


def _run_torchft(rank: int, world: int, cfg: dict[str, Any], barrier: Any) -> dict[str, Any]:
    import torch.distributed as dist

    _add_deps(cfg["deps"])
    logging.getLogger("torchft").setLevel(logging.ERROR)  # "no NCCL flight recorder" warnings
    from torchft.local_sgd import DiLoCo
    from torchft.manager import Manager
    from torchft.process_group import ProcessGroupGloo

    timeout = datetime.timedelta(seconds=600)
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    model = make_model(cfg["size"])
    inner = torch.optim.AdamW(model.parameters(), lr=1e-3)
    outer = torch.optim.SGD(model.parameters(), lr=0.7, momentum=0.9, nesterov=True)
    manager = Manager(
        pg=ProcessGroupGloo(timeout=timeout),
        load_state_dict=lambda sd: (
            model.load_state_dict(sd["model"]),
            inner.load_state_dict(sd["optim"]),
        ),
        state_dict=lambda: {"model": model.state_dict(), "optim": inner.state_dict()},
        min_replica_size=world,
        use_async_quorum=False,  # DiLoCo requires it
        timeout=timeout,
        quorum_timeout=timeout,
        connect_timeout=datetime.timedelta(seconds=60),
        rank=0,  # every worker is a replica group of one process
        world_size=1,
        store_addr="127.0.0.1",
        store_port=store.port,
        lighthouse_addr=cfg["lighthouse"],
        replica_id=f"bench_{rank}",
        hostname="127.0.0.1",
        init_sync=False,  # all replicas start from the same seed
    )
    try:

        def counters() -> dict[str, Any]:
            return {"manager_step": manager.current_step()}

        with DiLoCo(manager, [model], inner, outer, sync_every=cfg["sync_every"]):
            rounds = _train_rounds(cfg, rank, model, inner.step, inner.zero_grad, barrier, counters)
        assert all(r["manager_step"] == 1 for r in rounds), "torchft did not commit a timed step"
        digest = params_digest(model)
        return {
            "rounds": rounds,
            "digest": digest,
            "params": sum(p.numel() for p in model.parameters()),
        }
    finally:
        manager.shutdown(wait=False)


# --- the launcher -----------------------------------------------------------------------------


def _add_deps(deps: str) -> None:
    """Makes the bench-only packages importable, after the project's own (so torchft's pure
    Python dependencies never shadow the venv's)."""
    if deps and deps not in sys.path:
        sys.path.append(deps)


def torchft_available(deps: str) -> str | None:
    """None if torchft TORCHFT_VERSION imports, else why not."""
    _add_deps(deps)
    try:
        import torchft
        from torchft._torchft import LighthouseServer  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install
        return f"torchft not importable ({exc.__class__.__name__}: {exc}); run `make bench-sync`"
    import importlib.metadata as md

    try:
        version = md.version("torchft")
    except md.PackageNotFoundError:
        version = getattr(torchft, "__version__", "unknown")
    if version != TORCHFT_VERSION:
        return f"torchft {version} found, the benchmark is pinned to {TORCHFT_VERSION}"
    return None


def busy_cores(seconds: float = 1.0) -> float:
    """How many cores the machine kept busy over ``seconds`` (from /proc/stat): measured between
    launches, it is the load of other processes, which would skew the times."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]) - idle, sum(v[:8])

    try:
        b0, t0 = sample()
        time.sleep(seconds)
        b1, t1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    return (b1 - b0) / max(1, t1 - t0) * h.cpu_cores()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(system: str, world: int, cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs ``world`` worker processes of ``system``; returns their results, by rank."""
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(world)
    results = ctx.Queue()
    cfg = dict(cfg, port=_free_port())
    lighthouse = None
    if system == "torchft":
        from torchft._torchft import LighthouseServer

        lighthouse = LighthouseServer(bind="[::]:0", min_replicas=world)
        port = lighthouse.address().rsplit(":", 1)[1]
        cfg["lighthouse"] = f"http://127.0.0.1:{port}"
    procs = [
        ctx.Process(target=_worker, args=(system, r, world, cfg, barrier, results), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    out: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while len(out) < world:
            try:
                res = results.get(timeout=5)
                out[res["rank"]] = res
                if "error" in res:
                    break
            except queue.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead or time.monotonic() > deadline:
                    why = f"exit code {dead[0].exitcode}" if dead else f"over {TIMEOUT_S:.0f} s"
                    out[-1] = {"rank": -1, "error": f"a worker died without a report ({why})"}
                    break
    finally:
        failed = any("error" in r for r in out.values())
        if failed:
            barrier.abort()
        for p in procs:
            p.join(timeout=60 if not failed else 10)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
        if lighthouse is not None:
            lighthouse.shutdown()
    errors = [r["error"] for r in out.values() if "error" in r]
    if errors:
        raise RuntimeError(f"{system} failed:\n{errors[0]}")
    return [out[r] for r in range(world)]


def summarise(launches: list[list[dict[str, Any]]], system: str, world: int) -> dict[str, Any]:
    """One table row from the workers' records of one or more launches of the same config."""
    per_round = [
        [w["rounds"][i] for w in res] for res in launches for i in range(len(res[0]["rounds"]))
    ]
    n_rounds = len(per_round)
    res = [w for launch in launches for w in launch]
    step_s = [max(r["seconds"] for r in rnd) for rnd in per_round]
    sent = [statistics.fmean(r["tcp_sent"] for r in rnd) for rnd in per_round]
    params = res[0]["params"]
    row: dict[str, Any] = {
        "params": params,
        "workers": world,
        "step_s": statistics.median(step_s),
        "step_s_min": min(step_s),
        "step_s_max": max(step_s),
        "rounds": n_rounds,
        "cpu_s": statistics.median(statistics.fmean(r["cpu_s"] for r in rnd) for rnd in per_round),
        "sent": statistics.median(sent),
        "sent_max_worker": max(r["tcp_sent"] for rnd in per_round for r in rnd),
        "received": statistics.median(
            statistics.fmean(r["tcp_received"] for r in rnd) for rnd in per_round
        ),
        "lo_tx_per_worker": statistics.median(
            statistics.fmean(r["lo_tx"] for r in rnd) / world for rnd in per_round
        ),
        "rss": max(w["rss_kib"] for w in res) * 1024,
        "consistent": all(len({w["digest"] for w in launch}) == 1 for launch in launches),
        "passes": len(launches),
    }
    row["bytes_per_param"] = row["sent"] / params
    if system == "hypha":
        row["own"] = statistics.median(
            statistics.fmean(r["own_sent"] for r in rnd) for rnd in per_round
        )
        row["exchange_s"] = statistics.median(
            max(r["exchange_s"] for r in rnd) for rnd in per_round
        )
    else:
        row["own"] = 2 * (world - 1) / world * 4 * params  # ring all-reduce of fp32
    row["tcp_over_own"] = row["sent"] / row["own"] if row["own"] else float("nan")
    return row


def _progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class _Heartbeat:
    """Prints a dot to stderr every 30 s while a launch runs (full runs take minutes)."""

    def __enter__(self) -> _Heartbeat:
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(30):
            print(".", end="", file=sys.stderr, flush=True)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--sizes",
        default=None,
        help=f"parameter counts (default {DEFAULT_SIZES}; {QUICK_SIZES} with --quick)",
    )
    ap.add_argument("--workers", type=int, default=4, help="worker processes (default 4)")
    ap.add_argument(
        "--codecs", default=DEFAULT_CODECS, help=f"our codecs (default {DEFAULT_CODECS})"
    )
    ap.add_argument("--systems", default="torchft,hypha", help="which systems (default both)")
    ap.add_argument("--sync-every", type=int, default=4, help="inner steps per round (default 4)")
    ap.add_argument("--batch", type=int, default=8, help="inner batch size (default 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    ap.add_argument(
        "--deps",
        type=Path,
        default=DEFAULT_DEPS,
        help="where torchft is installed (default .bench-deps)",
    )
    ap.add_argument(
        "--passes",
        type=int,
        default=None,
        help="launches per system and size, in alternating order, rounds pooled (default 2; "
        "1 with --quick)",
    )
    h.add_common_args(ap)
    ap.set_defaults(warmup=1)
    args = ap.parse_args()
    if args.sync_every < 1 or args.workers < 2:
        ap.error("--sync-every must be >= 1 and --workers >= 2")
    sizes = h.parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    codecs = [c.strip() for c in args.codecs.split(",") if c.strip()]
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    if bad := set(systems) - {"torchft", "hypha"}:
        ap.error(f"unknown systems {sorted(bad)} (torchft, hypha)")
    rounds = args.repeats if args.repeats is not None else (1 if args.quick else 3)
    if args.passes is None:
        args.passes = 1 if args.quick else 2
    if args.passes < 1 or rounds < 1:
        ap.error("--passes and --repeats must be >= 1")
    deps = str(args.deps.resolve())

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on 127.0.0.1 in every worker
    os.environ.setdefault("RUST_LOG", "warn")  # torchft's lighthouse / manager logs
    _netbytes.self_check()

    rec = h.recorder("sync", args)
    rec.note(
        f"TCP byte counters self-checked on this kernel ({os.uname().release}): a known 8 MiB "
        "transfer over 127.0.0.1 counted exactly"
        + (", agreeing with `ss -ti`" if _netbytes.shutil.which("ss") else "")
        + "."
    )
    if "torchft" in systems and (why := torchft_available(deps)):
        rec.note(f"torchft rows skipped: {why}.")
        systems = [s for s in systems if s != "torchft"]
    if "hypha" in systems:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                import hypha.optim  # noqa: F401
        except ImportError as exc:
            rec.note(f"hypha rows skipped: hypha.optim not importable ({exc}).")
            systems = [s for s in systems if s != "hypha"]
    if not systems:
        rec.save()
        return

    table = rec.table(
        "outer step",
        [
            h.Column("system", "system"),
            h.Column("codec", "codec"),
            h.Column("params", "params", lambda v: f"{v / 1e6:.1f}M"),
            h.Column("workers", "N"),
            h.Column("step_s", "outer step s", h.sig(3)),
            h.Column("spread", "min-max s"),
            h.Column("cpu_s", "CPU s", h.sig(3)),
            h.Column("sent", "sent/worker", h.fmt_bytes),
            h.Column("bytes_per_param", "B/param", h.sig(3)),
            h.Column("own", "own count", h.fmt_bytes),
            h.Column("bytes_ratio", "x fewer B", h.times),
            h.Column("speedup", "speed-up", h.times),
            h.Column("target", "target"),
            h.Column("rss", "peak RSS", h.fmt_bytes),
        ],
        title=(
            "Outer step (median over rounds, slowest worker) and bytes sent per worker during it "
            "(measured: kernel TCP counters, mean over workers). CPU s: CPU time of a worker during "
            "the step (all threads, mean over workers). own count: ours, the transport's "
            "bytes_sent; torchft, the ring all-reduce model 2(N-1)/N x 4 B x params. x fewer B and "
            "speed-up: against torchft at the same size. target: >= 16x fewer bytes and faster."
        ),
    )
    base_cfg = {
        "sync_every": args.sync_every,
        "batch": args.batch,
        "threads": args.threads,
        "warmup": args.warmup,
        "rounds": rounds,
        "barrier_timeout": 900.0,
        "deps": deps,
    }
    threads_total = args.workers * args.threads
    if threads_total > h.cpu_cores():
        rec.note(
            f"{args.workers} workers x {args.threads} torch threads share {h.cpu_cores()} cores: "
            "compute phases are oversubscribed alike for both systems."
        )
    for size in sizes:
        params = n_params(size)
        world = args.workers
        need = max(MEM_COPIES[s] for s in systems) * 4 * params + (600 << 20)
        while world > 2 and world * need > 0.85 * h.mem_available():
            world -= 1
        if world != args.workers:
            rec.note(
                f"{params / 1e6:.0f}M params: {world} workers instead of {args.workers} "
                f"(about {h.fmt_bytes(need)} per worker, {h.fmt_bytes(h.mem_available())} available)."
            )
        runs = [("torchft", "fp32 (default)")] if "torchft" in systems else []
        runs += [("hypha", c) for c in codecs] if "hypha" in systems else []
        done: dict[tuple[str, str], list[list[dict[str, Any]]]] = {run: [] for run in runs}
        background: dict[tuple[str, str], float] = dict.fromkeys(runs, 0.0)
        spent: dict[tuple[str, str], float] = dict.fromkeys(runs, 0.0)
        failed: set[tuple[str, str]] = set()
        for p in range(args.passes):
            # alternate the order, so a slow drift of the machine hits every system alike
            for run in runs if p % 2 == 0 else runs[::-1]:
                if run in failed:
                    continue
                system, codec = run
                cfg = dict(base_cfg, size=size, codec=codec)
                busy = busy_cores()
                background[run] = max(background[run], busy)
                _progress(
                    f"[sync] pass {p + 1}/{args.passes}: {system} {codec} {params / 1e6:.1f}M "
                    f"params, {world} workers (other load before: {busy:.2f} cores) ..."
                )
                t0 = time.perf_counter()
                try:
                    with _Heartbeat():
                        res = launch(system, world, cfg)
                except RuntimeError as exc:
                    rec.note(f"{system} {codec} at {params / 1e6:.1f}M failed: {str(exc)[-2000:]}")
                    failed.add(run)
                    continue
                spent[run] += time.perf_counter() - t0
                done[run].append(res)
                step = max(max(r["seconds"] for r in w["rounds"]) for w in res)
                _progress(
                    f"[sync]   done in {time.perf_counter() - t0:.0f} s (slowest step {step:.3g} s)"
                )
        rows = []
        for run in runs:
            if run in failed or not done[run]:
                continue
            system, codec = run
            row = summarise(done[run], system, world)
            row.update(system=system if system == "torchft" else "ours", codec=codec)
            row["spread"] = f"{row['step_s_min']:.3g}-{row['step_s_max']:.3g}"
            row.update(launch_s=spent[run], sync_every=args.sync_every, background=background[run])
            row.update(threads=args.threads, batch=args.batch)
            if not row["consistent"]:
                rec.note(
                    f"{system} {codec} {params / 1e6:.1f}M: workers' parameters DIFFER after the sync"
                )
            if background[run] > BUSY_WARN:
                rec.note(
                    f"{system} {codec} {params / 1e6:.1f}M: other processes kept "
                    f"{background[run]:.2f} cores busy before a launch: its times are unreliable "
                    "(target marked *)."
                )
            rows.append(row)
        base = next((r for r in rows if r["system"] == "torchft"), None)
        for row in rows:
            if base is not None and row is not base:
                row["bytes_ratio"] = base["sent"] / row["sent"] if row["sent"] else math.inf
                row["speedup"] = base["step_s"] / row["step_s"]
                ok = row["bytes_ratio"] >= TARGET_BYTES_RATIO and row["speedup"] > TARGET_SPEEDUP
                noisy = max(row["background"], base["background"]) > BUSY_WARN
                row["target"] = ("pass" if ok else "miss") + ("*" if noisy else "")
                row["bytes_target"] = row["bytes_ratio"] >= TARGET_BYTES_RATIO
                row["time_target"] = row["speedup"] > TARGET_SPEEDUP
            table.add(**row)
    rec.note(
        "TCP counts are payload bytes (no TCP/IP headers), everything each worker process put on "
        "TCP during the step; torchft's include its quorum/commit RPCs and heartbeats. "
        "torchft runs without quantization (its quantized all-reduce needs CUDA + Triton)."
    )
    rec.save()


if __name__ == "__main__":
    main()
