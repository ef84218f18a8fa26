"""Convergence: does compressing DiLoCo's pseudo-gradients cost model quality, and how much
traffic does it save against data-parallel training?

**Setup.** 4 workers train the same small GPT (bench/_gpt.py: a byte-level transformer, by
default d_model 128, 4 layers, 4 heads, MLP 512, context 64: 867,072 parameters) on the source
text of the Python standard library (4.7 MB, present on every install; 16 KiB blocks, every 20th
held out for evaluation, the others dealt round-robin into 4 disjoint worker shards). Every run
uses the same seed, the same initial model, the same data order (batch ``t`` of worker ``r`` is
the same everywhere), the same inner optimizer (AdamW, peak lr 2e-3 with a 64-step linear
warm-up and a cosine decay to 10%, betas (0.9, 0.95), weight decay 0.1 on matrices, gradient
clipping at 1.0) and the same token budget (``--steps`` 1280 inner steps x ``--batch`` 8
sequences x 64 bytes x 4 workers = 2.6M tokens, about half an epoch). The runs:

* ``ddp``: the DDP equivalent, computed exactly in-process: every step, the 4 workers' gradients
  on their own batches are averaged (then clipped, as DDP + clipping does) and one AdamW step
  updates the one model.
* ``fp32``, ``bf16``, ``int8``, ``int4``, ``int2``: ``hypha.optim.DiLoCo`` around each worker's
  AdamW, ``sync_every`` H = ``--sync-every`` (default 160, so 8 rounds), outer lr 0.7, momentum
  0.9 (the defaults), the pseudo-gradients sent with that codec, error feedback on for the lossy
  ones; ``int2-noef``: int2 without error feedback; ``int4-frag4``: Streaming DiLoCo, int4, the
  parameters synced in 4 fragments (one every H/4 steps, each exchange overlapping one step).
  ``--zstd`` appends ``+zstd`` to the int codecs. The workers are threads of this process, joined
  by ``LocalTransport``; each has its own model copy, AdamW and DiLoCo. At the end the script
  checks that the 4 workers' global copies are bit-identical.
* ``solo`` (only on request, ``--runs ...,solo``): worker 0 alone, no communication, a quarter
  of the tokens: the floor that DiLoCo's averaging has to beat.

The global model (``DiLoCo.global_parameters()``; for DDP the model) is evaluated on held-out
text whenever it changes: every H steps (every H/4 with 4 fragments; DDP every H/4 too) on a
quarter of the evaluation windows (the curves), and at the end on all ``--eval-seqs`` (1024
windows of 64 bytes, evenly spaced over the held-out text): the "eval loss" of the table, in
nats per byte.

The inner lr, 2e-3, is the best of {1e-3, 2e-3, 4e-3} for DiLoCo fp32 (final loss 1.938, 1.885,
1.945); the DDP equivalent prefers 4e-3 (1.630, 1.533, 1.490), so at 2e-3 the comparison with
DDP, if anything, flatters DiLoCo.

**Bytes.** "bytes/worker" is what one worker sends during training, averaged over the workers.
DiLoCo: measured, the growth of the transport's ``bytes_sent`` (payload, codec headers and
framing: every byte DiLoCo hands the transport) from after the optimizer's construction to the
end; the one-off broadcast of rank 0's initial parameters at construction is left out, as DDP's
own initial broadcast is. DDP: nothing is sent in-process, so it is counted as a ring all-reduce
of the fp32 gradients, 2(N-1)/N x 4 bytes x params per step per worker (N = 4: 6 bytes per
parameter per step). "bits/param/round" = 8 x bytes/worker / rounds / params, a round being one
sync of all the parameters (H steps for DiLoCo, 1 step for DDP, which gives 48); it includes the
2(N-1)/N = 1.5 topology factor of the sharded exchange (shards to their owners, then the owners'
updates back), so int2 at 2.25 codec bits per parameter (2 bits + an fp32 scale per 128) shows
about 3.4. "traffic vs DDP" = DDP's bytes/worker / the run's, at the same token budget.

**Targets** (pass/miss printed and recorded; one-sided: being better always passes): int2 with
error feedback ends at most 1% above DiLoCo fp32's eval loss; DiLoCo fp32 at most 2% above the
DDP equivalent's; int2 traffic (with and without error feedback) at least 2000x below DDP. The
last fixes H: the ratio is 48 H / (1.5 x int2's bits per parameter) = about 32 H / 2.3, so
H >= 141; H = 160 gives about 2260x.

**Time.** Measured with ``--timing`` on a 2-core AMD EPYC (torch 2.13, CPU), seconds per inner
step of all 4 workers: 4 threads with 1 torch thread each 87 ms (93 ms with at most 2 computing
at once, ``--concurrency 2``); one thread running the workers in turn 110 ms with 2 torch
threads (and 3.5 s when other processes load the cores: OpenMP's spinning threads collapse) or
163 ms with 1. So DiLoCo runs as 4 threads with 1 torch thread each, no limit; the DDP
equivalent computes the 4 gradients on 2 threads, each on its own replica of the model (78 ms a
step; 155 ms on one thread). One evaluation on 1024 windows takes 2 s. A run takes 2 to 2.5
minutes; the whole benchmark took 17 to 18 minutes (recorded runs).

matplotlib (optional) draws ``<results-dir>/convergence.png``: eval loss against tokens, and
against bytes sent per worker (log x). Without it the script says so and writes the table.

    python bench/convergence.py --quick --results-dir /tmp/benchsmoke   # smoke test, < 1 minute
    python bench/convergence.py                                         # full run, ~17 minutes
    python bench/convergence.py --runs ddp,fp32,int2 --steps 640        # a subset
    python bench/convergence.py --timing                                # step-time study
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import math
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
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
from bench._gpt import GPT, Corpus, GPTConfig, Stream, load_corpus, num_params  # noqa: E402

WORKERS = 4


@dataclass(frozen=True)
class RunSpec:
    name: str
    label: str
    codec: str | None = None  # None: the DDP equivalent
    error_feedback: bool | None = None
    fragments: int = 1
    workers: int = WORKERS  # DDP: whose gradients are averaged (1: worker 0 alone)
    default: bool = True  # in the default set of runs


RUNS = {
    r.name: r
    for r in (
        RunSpec("ddp", "DDP equivalent"),
        RunSpec("fp32", "DiLoCo fp32", "fp32"),
        RunSpec("bf16", "DiLoCo bf16", "bf16", True),
        RunSpec("int8", "DiLoCo int8", "int8", True),
        RunSpec("int4", "DiLoCo int4", "int4", True),
        RunSpec("int2", "DiLoCo int2, error feedback", "int2", True),
        RunSpec("int2-noef", "DiLoCo int2, no error feedback", "int2", False),
        RunSpec("int4-frag4", "Streaming DiLoCo int4, 4 fragments", "int4", True, 4),
        # a reference, not in the default set: what one worker reaches with no communication
        RunSpec("solo", "worker 0 alone (no communication)", workers=1, default=False),
    )
}


DEFAULT_MODEL = GPTConfig(d_model=128, n_layers=4, n_heads=4, d_ff=512, context=64)


@dataclass(frozen=True)
class Setup:
    model: GPTConfig = DEFAULT_MODEL
    batch: int = 8  # sequences per worker per step
    steps: int = 1280  # inner steps per worker (the token budget)
    sync_every: int = 160  # H
    lr: float = 2e-3
    warmup: int = 64
    min_lr_ratio: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    text_bytes: int = 5_000_000
    eval_seqs: int = 1024
    seed: int = 0
    zstd: bool = False
    concurrency: int = 0  # DiLoCo worker threads computing at once; 0: no limit
    ddp_threads: int = 2  # threads computing the DDP gradients (on model replicas)

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by all workers together in one inner step."""
        return WORKERS * self.batch * self.model.context

    def lr_at(self, t: int) -> float:
        """Learning rate of inner step ``t`` (0-based): linear warm-up, cosine to min_lr_ratio."""
        if t < self.warmup:
            return self.lr * (t + 1) / self.warmup
        frac = (t - self.warmup) / max(1, self.steps - self.warmup)
        cos = 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * cos)

    def codec(self, spec: RunSpec) -> str:
        assert spec.codec is not None
        return spec.codec + ("+zstd" if self.zstd and spec.codec.startswith("int") else "")


QUICK = Setup(
    model=GPTConfig(d_model=64, n_layers=2, n_heads=4, d_ff=256, context=32),
    batch=4,
    steps=48,
    sync_every=16,
    warmup=8,
    text_bytes=1_000_000,
    eval_seqs=128,
)


@dataclass
class Result:
    spec: RunSpec
    final_loss: float = math.nan
    bytes_per_worker: float = 0.0  # training traffic, mean over workers
    rounds: int = 0  # full syncs of all parameters
    seconds: float = 0.0
    blocked_seconds: float = 0.0  # DiLoCo: time the workers waited on exchanges (mean)
    # (inner step, bytes sent per worker so far, eval loss)
    curve: list[tuple[int, float, float]] = field(default_factory=list)


# --- shared pieces ------------------------------------------------------------------------------


def make_model(setup: Setup) -> GPT:
    torch.manual_seed(setup.seed)
    return GPT(setup.model)


def make_inner(model: GPT, setup: Setup) -> torch.optim.AdamW:
    return torch.optim.AdamW(
        model.param_groups(setup.weight_decay), lr=setup.lr_at(0), betas=setup.betas
    )


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


class Evaluator:
    """The held-out loss of a set of parameters, on a private model copy: ``loss(params)`` on
    ``eval_seqs`` held-out windows (the final loss), ``loss(params, curve=True)`` on an evenly
    spaced quarter of them (the points of the curves, which are many)."""

    def __init__(self, setup: Setup, corpus: Corpus) -> None:
        self.model = GPT(setup.model)
        self.model.eval()
        ctx = setup.model.context
        self.batches = corpus.eval_batches(ctx, setup.eval_seqs)
        self.curve_batches = corpus.eval_batches(ctx, max(1, setup.eval_seqs // 4))

    @torch.no_grad()
    def loss(self, params: list[torch.Tensor], curve: bool = False) -> float:
        """Mean loss (nats per byte) with ``params`` in the order of :meth:`GPT.param_groups`
        (the order of the inner optimizer's parameters, hence of
        ``DiLoCo.global_parameters()``)."""
        mine = [p for g in self.model.param_groups(0.0) for p in g["params"]]
        assert [p.shape for p in mine] == [p.shape for p in params]
        for dst, src in zip(mine, params, strict=True):
            dst.copy_(src)
        total, count = 0.0, 0
        for x, y in self.curve_batches if curve else self.batches:
            total += float(self.model.loss(x, y)) * y.numel()
            count += y.numel()
        return total / count


def group_order(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for g in opt.param_groups for p in g["params"]]


# --- the runs -----------------------------------------------------------------------------------


def run_ddp(setup: Setup, corpus: Corpus, spec: RunSpec, log: Callable[[str], None]) -> Result:
    """The DDP equivalent: every step the 4 workers' gradients are averaged and one AdamW step
    updates the one model. ``ddp_threads`` threads compute the gradients (thread i those of
    workers i, i + k, ... on its replica of the model); their sum is divided by N."""
    torch.set_num_threads(1)
    model = make_model(setup)
    opt = make_inner(model, setup)
    params = group_order(opt)
    step = DDPStep(model, setup, corpus, workers=spec.workers)
    evaluator = Evaluator(setup, corpus)
    n = spec.workers
    per_step = 2 * (n - 1) / n * 4 * num_params(model)  # ring all-reduce, fp32
    every = max(1, setup.sync_every // 4)
    res = Result(spec, rounds=setup.steps)
    res.curve.append((0, 0.0, evaluator.loss(params, curve=True)))
    t0 = time.perf_counter()
    try:
        for t in range(setup.steps):
            set_lr(opt, setup.lr_at(t))
            step.gradients(t)
            nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            step.broadcast()
            if (t + 1) % every == 0 or t + 1 == setup.steps:
                res.curve.append((t + 1, per_step * (t + 1), evaluator.loss(params, curve=True)))
                log(f"step {t + 1}: eval loss {res.curve[-1][2]:.4f}")
    finally:
        step.close()
    res.seconds = time.perf_counter() - t0
    res.bytes_per_worker = per_step * setup.steps
    res.final_loss = evaluator.loss(params)
    return res


class DDPStep:
    """The averaged gradient of the 4 workers' batches of step ``t`` in ``model.grad``, computed
    by ``setup.ddp_threads`` threads on replicas of the model."""

    def __init__(
        self,
        model: GPT,
        setup: Setup,
        corpus: Corpus,
        steps: int | None = None,
        workers: int = WORKERS,
    ) -> None:
        self.n = workers
        self.k = max(1, min(setup.ddp_threads, workers))
        self.model = model
        self.replicas = [model] + [copy.deepcopy(model) for _ in range(self.k - 1)]
        self.streams = [
            Stream(
                corpus.shards[r],
                r,
                steps or setup.steps,
                setup.batch,
                setup.model.context,
                setup.seed,
            )
            for r in range(workers)
        ]
        self.pool = ThreadPoolExecutor(self.k, "ddp") if self.k > 1 else None

    def _grad(self, i: int, t: int) -> None:
        m = self.replicas[i]
        for r in range(i, self.n, self.k):
            x, y = self.streams[r].batch(t)
            (m.loss(x, y) / self.n).backward()  # the sum over workers of grad / N: their mean

    def gradients(self, t: int) -> None:
        if self.pool is None:
            self._grad(0, t)
            return
        for f in [self.pool.submit(self._grad, i, t) for i in range(self.k)]:
            f.result()
        with torch.no_grad():
            for rep in self.replicas[1:]:
                for p, q in zip(self.model.parameters(), rep.parameters(), strict=True):
                    assert p.grad is not None and q.grad is not None
                    p.grad += q.grad
                    q.grad = None

    @torch.no_grad()
    def broadcast(self) -> None:
        """The updated parameters to the replicas."""
        for rep in self.replicas[1:]:
            for p, q in zip(self.model.parameters(), rep.parameters(), strict=True):
                q.copy_(p)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()


def run_diloco(setup: Setup, corpus: Corpus, spec: RunSpec, log: Callable[[str], None]) -> Result:
    """4 worker threads, each with its own model, AdamW and DiLoCo, joined by LocalTransport."""
    from hypha.optim import DiLoCo, LocalTransport

    torch.set_num_threads(1)
    comms = LocalTransport.create(WORKERS)
    # at most `concurrency` workers compute at once (0: no limit); the gate is released before
    # DiLoCo.step(), so a worker waiting for its peers at a sync never holds it
    gate = threading.Semaphore(setup.concurrency or WORKERS)
    evaluator = Evaluator(setup, corpus)
    every = setup.sync_every // spec.fragments
    res = Result(spec, rounds=setup.steps // setup.sync_every)
    sent = [0.0] * WORKERS
    blocked = [0.0] * WORKERS
    # built here: torch's global RNG (the initialisation) is not for concurrent threads
    models = [make_model(setup) for _ in range(WORKERS)]
    digests = [""] * WORKERS  # of the final global copies, which must be bit-identical
    errors: list[BaseException] = []

    def worker(rank: int) -> None:
        comm = comms[rank]
        opt = None
        try:
            model = models[rank]
            inner = make_inner(model, setup)
            opt = DiLoCo(
                inner,
                comm,
                sync_every=setup.sync_every,
                codec=setup.codec(spec),
                error_feedback=spec.error_feedback,
                fragments=spec.fragments,
                timeout=300.0,
            )
            start = comm.bytes_sent  # after the initial broadcast from rank 0
            stream = Stream(
                corpus.shards[rank], rank, setup.steps, setup.batch, setup.model.context, setup.seed
            )
            if rank == 0:
                with gate:
                    res.curve.append((0, 0.0, evaluator.loss(opt.global_parameters(), curve=True)))
            for t in range(setup.steps):
                set_lr(opt, setup.lr_at(t))
                x, y = stream.batch(t)
                with gate:
                    model.loss(x, y).backward()
                    nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
                opt.step()  # outside the gate: a sync waits for the other workers
                opt.zero_grad(set_to_none=True)
                if rank == 0 and ((t + 1) % every == 0 or t + 1 == setup.steps):
                    opt.synchronize()  # the fragment in flight reaches the global copy
                    with gate:
                        loss = evaluator.loss(opt.global_parameters(), curve=True)
                    res.curve.append((t + 1, comm.bytes_sent - start, loss))
                    log(f"step {t + 1}: eval loss {loss:.4f}, sent {h.fmt_bytes(res.curve[-1][1])}")
            opt.synchronize()
            sent[rank] = comm.bytes_sent - start
            blocked[rank] = opt.stats.blocked_seconds
            digest = hashlib.sha256()
            for g in opt.global_parameters():
                digest.update(g.contiguous().view(torch.uint8).numpy().tobytes())
            digests[rank] = digest.hexdigest()
            if rank == 0:
                with gate:
                    res.final_loss = evaluator.loss(opt.global_parameters())
        except BaseException as exc:
            errors.append(exc)
            traceback.print_exc()
        finally:
            if opt is not None:
                opt.close()
            comm.close()  # a failed worker releases its peers (ConnectionError) at once

    t0 = time.perf_counter()
    threads = [
        threading.Thread(target=worker, args=(r,), name=f"worker{r}") for r in range(WORKERS)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    res.seconds = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{spec.name}: a worker failed: {errors[0]!r}") from errors[0]
    res.bytes_per_worker = sum(sent) / WORKERS
    res.blocked_seconds = sum(blocked) / WORKERS
    res.curve.sort()
    if len(set(digests)) != 1:
        raise RuntimeError(f"{spec.name}: the workers' global copies differ at the end")
    return res


# --- the step-time study (--timing) -------------------------------------------------------------


def time_strategies(setup: Setup, corpus: Corpus, steps: int) -> list[dict[str, Any]]:
    """Seconds per inner step of all 4 workers (forward, backward, clipping, AdamW; no DiLoCo:
    its exchanges are a small part of a round) for each way of running them."""
    cores = h.cpu_cores()
    warm = 3

    def worker_loop(rank: int, gate: threading.Semaphore | None, out: list[float]) -> None:
        model = make_model(setup)
        opt = make_inner(model, setup)
        stream = Stream(
            corpus.shards[rank], rank, steps + warm, setup.batch, setup.model.context, 0
        )
        for t in range(steps + warm):
            if t == warm:
                out[rank] = time.perf_counter()
            x, y = stream.batch(t)
            if gate is not None:
                gate.acquire()
            model.loss(x, y).backward()
            nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
            if gate is not None:
                gate.release()
            opt.step()
            opt.zero_grad(set_to_none=True)

    def threaded(limit: int | None) -> float:
        torch.set_num_threads(1)
        gate = threading.Semaphore(limit) if limit else None
        starts = [0.0] * WORKERS
        threads = [
            threading.Thread(target=worker_loop, args=(r, gate, starts)) for r in range(WORKERS)
        ]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        return (time.perf_counter() - max(starts)) / steps

    def sequential(threads: int) -> float:
        torch.set_num_threads(threads)
        model = make_model(setup)
        opts = [make_inner(model, setup) for _ in range(WORKERS)]  # the AdamW cost of 4 workers
        streams = [
            Stream(corpus.shards[r], r, steps + warm, setup.batch, setup.model.context, 0)
            for r in range(WORKERS)
        ]
        for t in range(steps + warm):
            if t == warm:
                t0 = time.perf_counter()
            for opt, stream in zip(opts, streams, strict=True):
                x, y = stream.batch(t)
                model.loss(x, y).backward()
                nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
        return (time.perf_counter() - t0) / steps

    def ddp(k: int) -> float:
        torch.set_num_threads(1)
        model = make_model(setup)
        opt = make_inner(model, setup)
        step = DDPStep(model, replace(setup, ddp_threads=k), corpus, steps + warm)
        try:
            for t in range(steps + warm):
                if t == warm:
                    t0 = time.perf_counter()
                step.gradients(t)
                nn.utils.clip_grad_norm_(model.parameters(), setup.grad_clip)
                opt.step()
                opt.zero_grad(set_to_none=True)
                step.broadcast()
        finally:
            step.close()
        return (time.perf_counter() - t0) / steps

    def evaluation() -> float:
        torch.set_num_threads(1)
        ev = Evaluator(setup, corpus)
        params = [p for g in ev.model.param_groups(0.0) for p in g["params"]]
        ev.loss(params)
        t0 = time.perf_counter()
        ev.loss(params)
        return time.perf_counter() - t0

    rows: list[dict[str, Any]] = []
    cases: list[tuple[str, Callable[[], float]]] = [
        (f"{WORKERS} threads x 1 torch thread, unrestricted", lambda: threaded(None)),
        *[
            (f"{WORKERS} threads x 1 torch thread, <= {k} computing", lambda k=k: threaded(k))
            for k in sorted({1, 2, cores} - {WORKERS})
            if k <= cores
        ],
        (f"1 thread, workers in turn, {cores} torch threads", lambda: sequential(cores)),
        ("1 thread, workers in turn, 1 torch thread", lambda: sequential(1)),
        *[
            (f"DDP step (4 gradients, 1 AdamW), {k} threads x 1 torch thread", lambda k=k: ddp(k))
            for k in sorted({1, cores})
        ],
    ]
    for name, fn in cases:
        rows.append({"strategy": name, "step_s": fn(), "unit": "per step of all 4 workers"})
    rows.append(
        {"strategy": "evaluation (1 torch thread)", "step_s": evaluation(), "unit": "per eval"}
    )
    return rows


# --- report -------------------------------------------------------------------------------------


def rel(a: float | None, b: float | None) -> float | None:
    """a / b - 1, None when either is missing."""
    if a is None or b is None or not (math.isfinite(a) and math.isfinite(b)) or b == 0:
        return None
    return a / b - 1


def signed_pct(v: Any) -> str:
    return f"{100 * float(v):+.2f}%"


def ratio(v: Any) -> str:
    return f"{float(v):,.0f}x" if float(v) >= 10 else f"{float(v):.2f}x"


COLUMNS = [
    h.Column("label", "run", width=36),
    h.Column("eval_loss", "eval loss", ".4f"),
    h.Column("vs_ddp", "vs DDP", signed_pct),
    h.Column("vs_fp32", "vs fp32", signed_pct),
    h.Column("bytes_per_worker", "bytes/worker", h.fmt_bytes),
    h.Column("bits_per_param_round", "bits/param/round", h.sig(3)),
    h.Column("traffic_ratio", "traffic vs DDP", ratio),
    h.Column("seconds", "time s", ".0f"),
]


def row_of(res: Result, setup: Setup, params: int, results: dict[str, Result]) -> dict[str, Any]:
    ddp_bytes = 2 * (WORKERS - 1) / WORKERS * 4 * params * setup.steps
    ddp, fp32 = results.get("ddp"), results.get("fp32")
    spec = res.spec
    tokens_per_step = setup.tokens_per_step * spec.workers // WORKERS
    return {
        "run": spec.name,
        "label": spec.label,
        "codec": setup.codec(spec)
        if spec.codec
        else ("fp32 all-reduce" if spec.workers > 1 else None),
        "error_feedback": spec.error_feedback,
        "fragments": spec.fragments,
        "eval_loss": res.final_loss,
        "vs_ddp": rel(res.final_loss, ddp.final_loss if ddp else None),
        "vs_fp32": rel(res.final_loss, fp32.final_loss if fp32 else None),
        "bytes_per_worker": res.bytes_per_worker,
        "bits_per_param_round": 8 * res.bytes_per_worker / max(res.rounds, 1) / params,
        "traffic_ratio": ddp_bytes / res.bytes_per_worker if res.bytes_per_worker else None,
        "seconds": res.seconds,
        "blocked_seconds": res.blocked_seconds,
        "rounds": res.rounds,
        "params": params,
        "steps": setup.steps,
        "sync_every": setup.sync_every if spec.codec else 1,
        "tokens": setup.steps * tokens_per_step,
        # (inner step, tokens of all workers, bytes sent per worker so far, eval loss)
        "curve": [(t, t * tokens_per_step, b, loss) for t, b, loss in res.curve],
    }


def targets(rows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    out = []

    def add(target: str, value: float | None, fmt: Callable[[Any], str], ok: bool | None) -> None:
        out.append(
            {
                "target": target,
                "value": value,
                "measured": "-" if value is None else fmt(value),
                "result": "n/a (run missing)" if ok is None else ("pass" if ok else "miss"),
            }
        )

    if "int2" in rows:
        v = rows["int2"]["vs_fp32"]
        add(
            "int2 + error feedback: eval loss <= DiLoCo fp32's + 1%",
            v,
            signed_pct,
            None if v is None else v <= 0.01,
        )
    if "fp32" in rows:
        v = rows["fp32"]["vs_ddp"]
        add(
            "DiLoCo fp32: eval loss <= DDP equivalent's + 2% (equal tokens)",
            v,
            signed_pct,
            None if v is None else v <= 0.02,
        )
    for name in ("int2", "int2-noef"):
        if name in rows:
            v = rows[name]["traffic_ratio"]
            add(
                f"{rows[name]['label']}: traffic >= 2000x below DDP",
                v,
                ratio,
                None if v is None else v >= 2000,
            )
    return out


def plot(rows: list[dict[str, Any]], setup: Setup, path: Path) -> str:
    """Writes the two-panel PNG; returns a line saying what happened."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "matplotlib is not installed: no plot (pip install matplotlib, then rerun); "
            "the table is complete without it"
        )
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    tail = []
    for row in rows:
        curve = row["curve"]
        tokens = [c[1] for c in curve]
        sent = [c[2] for c in curve]
        loss = [c[3] for c in curve]
        style: dict[str, Any] = {}
        if row["run"] == "ddp":
            style = {"color": "black", "linewidth": 2}
        elif row["run"] == "solo":
            style = {"color": "grey", "linestyle": "--"}
        ax1.plot(tokens, loss, marker=".", label=row["label"], **style)
        pts = [(b, v) for b, v in zip(sent, loss, strict=True) if b > 0]
        if pts:
            ax2.plot(*zip(*pts, strict=True), marker=".", label=row["label"], **style)
        tail += loss[len(loss) // 4 :]
    if tail:  # zoom on the part where the runs differ, not on the initial ln(256)
        lo, hi = min(tail), max(tail)
        for ax in (ax1, ax2):
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    ax1.set_xlabel("tokens seen (all the workers of the run)")
    ax1.set_ylabel("held-out loss (nats/byte)")
    ax1.set_title(f"eval loss vs tokens (H = {setup.sync_every})")
    ax2.set_xscale("log")
    ax2.set_xlabel("bytes sent per worker (DDP: ring all-reduce, fp32)")
    ax2.set_ylabel("held-out loss (nats/byte)")
    ax2.set_title("eval loss vs bytes sent per worker")
    for ax in (ax1, ax2):
        ax.grid(True, alpha=0.3)
    ax1.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    tmp.replace(path)
    return f"plot: {path}"


# --- main ---------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--runs",
        default=",".join(n for n, r in RUNS.items() if r.default),
        help=f"comma-separated subset of {','.join(RUNS)} (default: all but solo, a reference "
        "run of worker 0 alone)",
    )
    ap.add_argument("--steps", type=int, help="inner steps per worker (default 1280; 48 --quick)")
    ap.add_argument("--sync-every", type=int, help="H, inner steps per round (default 160)")
    ap.add_argument("--batch", type=int, help="sequences per worker per step (default 8)")
    ap.add_argument("--lr", type=float, help="peak inner AdamW lr (default 2e-3)")
    ap.add_argument("--eval-seqs", type=int, help="held-out windows per evaluation (default 1024)")
    ap.add_argument("--seed", type=int, help="model init and data order (default 0)")
    ap.add_argument("--zstd", action="store_true", help="int codecs with +zstd")
    ap.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="DiLoCo worker threads computing at once (default 0: no limit; see --timing)",
    )
    ap.add_argument("--plot", type=Path, help="PNG path (default <results-dir>/convergence.png)")
    ap.add_argument(
        "--timing", action="store_true", help="time the ways of running the 4 workers, then exit"
    )
    h.add_common_args(ap)
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    setup = QUICK if args.quick else Setup()
    overrides = {
        "steps": args.steps,
        "sync_every": args.sync_every,
        "batch": args.batch,
        "lr": args.lr,
        "eval_seqs": args.eval_seqs,
        "seed": args.seed,
    }
    setup = replace(
        setup,
        **{k: v for k, v in overrides.items() if v is not None},
        zstd=args.zstd,
        concurrency=args.concurrency if args.concurrency is not None else setup.concurrency,
        ddp_threads=h.cpu_cores(),
    )
    names = [n.strip() for n in args.runs.split(",") if n.strip()]
    unknown = [n for n in names if n not in RUNS]
    if unknown:
        sys.exit(f"unknown runs {unknown}; choose from {','.join(RUNS)}")
    specs = [RUNS[n] for n in RUNS if n in names]  # in the canonical order: ddp, fp32 first
    if setup.steps % setup.sync_every:
        sys.exit(f"--steps ({setup.steps}) must be a multiple of --sync-every ({setup.sync_every})")
    if any(s.fragments > 1 for s in specs) and setup.sync_every % 4:
        sys.exit(f"--sync-every ({setup.sync_every}) must be a multiple of 4 (int4-frag4)")

    t_start = time.perf_counter()
    rec = h.recorder("convergence", args)
    corpus = load_corpus(WORKERS, setup.text_bytes)
    params = num_params(make_model(setup))
    m = setup.model
    rec.note(
        f"model: byte-level GPT, d_model {m.d_model}, {m.n_layers} layers, {m.n_heads} heads, "
        f"MLP {m.d_ff}, context {m.context}: {params:,} parameters. Data: {corpus.text_bytes:,} "
        f"bytes of stdlib source, {WORKERS} shards of ~{len(corpus.shards[0]):,} bytes, "
        f"{len(corpus.heldout):,} held out; eval on {setup.eval_seqs} held-out windows."
    )
    if args.timing:
        steps = 10 if args.quick else 30
        table = rec.table(
            "timing",
            [
                h.Column("strategy", "strategy", width=50),
                h.Column("step_s", "seconds", lambda v: f"{1e3 * v:.1f} ms"),
                h.Column("unit", "per"),
            ],
            title=f"Step time of the {WORKERS} workers (batch {setup.batch} x {m.context}, "
            f"mean over {steps} steps after 3 warm-up)",
        )
        rows = time_strategies(setup, corpus, steps)
        for row in rows:
            table.add(**row)
        diloco = min(r["step_s"] for r in rows if "threads x 1" in r["strategy"])
        ddp = min(r["step_s"] for r in rows if r["strategy"].startswith("DDP"))
        full = rows[-1]["step_s"]  # curve points cost a quarter: a quarter of the windows
        points = 2 * (setup.steps // max(1, setup.sync_every // 4) + 1)  # ddp, int4-frag4
        points += 6 * (setup.steps // setup.sync_every + 1)  # the other DiLoCo runs
        estimate = setup.steps * (7 * diloco + ddp) + points * full / 4 + 8 * full
        rec.note(
            f"estimate for the 8 runs of {setup.steps} steps: {estimate / 60:.1f} min (DiLoCo "
            "at the fastest threaded strategy, exchanges not counted)"
        )
        rec.save()
        return

    rec.note(
        f"budget: {setup.steps} inner steps x {WORKERS} workers x {setup.batch} x {m.context} = "
        f"{setup.steps * setup.tokens_per_step:,} tokens per run; H = {setup.sync_every} "
        f"({setup.steps // setup.sync_every} rounds); AdamW lr {setup.lr:g} (warm-up "
        f"{setup.warmup}, cosine to {setup.min_lr_ratio:g}x), betas {setup.betas}, weight decay "
        f"{setup.weight_decay:g}, clip {setup.grad_clip:g}; outer lr 0.7, momentum 0.9; "
        + (
            f"at most {setup.concurrency} DiLoCo workers computing at once."
            if setup.concurrency
            else "DiLoCo workers: 4 threads, 1 torch thread, no limit."
        )
    )
    rec.note(
        "bytes/worker: DiLoCo measured on the transport (training only: the initial broadcast of "
        "rank 0's parameters is left out); DDP counted as a ring all-reduce of fp32 gradients, "
        "2(N-1)/N x 4 B x params per step. bits/param/round = 8 x bytes/worker / rounds / "
        "params (round: H steps for DiLoCo, 1 step for DDP)."
    )
    try:
        import hypha.optim  # noqa: F401
    except Exception as exc:  # not written yet, or broken: run what does not need it
        dropped = [s.name for s in specs if s.codec is not None]
        specs = [s for s in specs if s.codec is None]
        rec.note(f"hypha.optim does not import ({exc!r}): skipped {','.join(dropped)}")

    table = rec.table(
        "runs",
        COLUMNS,
        title=f"Final held-out loss after {setup.steps * setup.tokens_per_step:,} tokens, "
        f"{WORKERS} workers",
    )
    results: dict[str, Result] = {}
    rows: dict[str, dict[str, Any]] = {}
    for spec in specs:
        print(f"\n[{spec.name}] {spec.label}", flush=True)
        run = run_ddp if spec.codec is None else run_diloco

        def log(msg: str, name: str = spec.name) -> None:
            print(f"  [{name}] {msg}", flush=True)

        try:
            results[spec.name] = res = run(setup, corpus, spec, log)
        except Exception as exc:
            rec.note(f"{spec.name}: failed: {exc!r}")
            continue
        # the relative columns need DDP and fp32, which run first
        rows[spec.name] = table.add(**row_of(res, setup, params, results))
    tt = rec.table(
        "targets",
        [
            h.Column("target", "target", width=60),
            h.Column("measured", "measured"),
            h.Column("result", "result"),
        ],
    )
    for row in targets(rows):
        tt.add(**row)
    plot_path = args.plot or (None if args.no_save else Path(args.results_dir) / "convergence.png")
    if plot_path is not None and rows:
        rec.note(plot(list(rows.values()), setup, plot_path).replace(str(h.ROOT) + "/", ""))
    rec.note(f"total wall time: {(time.perf_counter() - t_start) / 60:.1f} min")
    rec.save()


if __name__ == "__main__":
    main()
