"""A real DiLoCo pseudo-gradient to benchmark the codec on, instead of random data.

A tiny byte-level transformer language model (:class:`hypha.models.GPT`, ~1.45M parameters:
3 layers, d=192) is trained with AdamW on the source text of the Python standard library (the
top-level ``*.py`` files of ``sysconfig.get_paths()["stdlib"]``, in sorted order: present on every
Python install, no download). DiLoCo-style: ``pretrain_steps`` steps to get past the initialisation, snapshot
``theta0``, ``inner_steps`` more steps (one outer round), then ``delta = theta0 - theta`` for every
parameter. Everything is seeded, so the same settings give the same deltas on the same
Python/torch; the result is cached in ``/tmp`` (never in the repository) keyed by a hash of the
settings, the training text and the versions.

Run it directly to print the statistics of the pseudo-gradient::

    python bench/_pseudograd.py
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hypha.models import GPT, GPTConfig

__all__ = ["PGConfig", "PseudoGrad", "pseudo_gradient", "stdlib_text", "tile"]

CACHE_DIR = Path(tempfile.gettempdir()) / "hypha-bench-cache"


@dataclass(frozen=True)
class PGConfig:
    d_model: int = 192
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 768
    context: int = 64
    batch: int = 8
    pretrain_steps: int = 150  # before the snapshot theta0
    inner_steps: int = 100  # H: the inner steps of one DiLoCo round
    lr: float = 2e-3
    warmup_steps: int = 20  # linear lr warm-up at the start of pre-training
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    grad_clip: float = 1.0
    text_bytes: int = 2_000_000
    seed: int = 0
    threads: int = 2


@dataclass
class PseudoGrad:
    names: list[str]
    deltas: list[torch.Tensor]  # fp32, parameter shapes, delta = theta0 - theta
    flat: torch.Tensor  # the deltas flattened and concatenated, fp32
    info: dict[str, object]

    @property
    def numel(self) -> int:
        return self.flat.numel()


# --- data ---------------------------------------------------------------------------------------


def stdlib_text(max_bytes: int) -> bytes:
    """The first ``max_bytes`` of the top-level stdlib ``.py`` files, concatenated in name order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = bytearray()
    for path in sorted(root.glob("*.py")):
        try:
            out += path.read_bytes()
        except OSError:
            continue
        if len(out) >= max_bytes:
            break
    if len(out) < 100_000:
        raise RuntimeError(f"found only {len(out)} bytes of stdlib source under {root}")
    return bytes(out[:max_bytes])


# --- training -----------------------------------------------------------------------------------


def _key(cfg: PGConfig, text: bytes) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(dataclasses.asdict(cfg), sort_keys=True).encode())
    h.update(hashlib.sha256(text).digest())
    h.update(f"{torch.__version__}|{platform.python_version()}|{platform.machine()}|v3".encode())
    return h.hexdigest()[:16]


def _train(cfg: PGConfig, text: bytes, log: bool) -> PseudoGrad:
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8).to(torch.long)
    split = int(len(data) * 0.95)
    train, val = data[:split], data[split:]
    gen = torch.Generator().manual_seed(cfg.seed)

    def batch(src: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ix = torch.randint(0, len(src) - cfg.context - 1, (cfg.batch,), generator=gen)
        x = torch.stack([src[i : i + cfg.context] for i in ix.tolist()])
        y = torch.stack([src[i + 1 : i + 1 + cfg.context] for i in ix.tolist()])
        return x, y

    model = GPT(
        GPTConfig(
            d_model=cfg.d_model,
            n_layers=cfg.n_layers,
            n_heads=cfg.n_heads,
            d_ff=cfg.d_ff,
            context=cfg.context,
        )
    )
    opt = torch.optim.AdamW(model.param_groups(cfg.weight_decay), lr=cfg.lr, betas=cfg.betas)

    # a fixed held-out batch (the last 5% of the text), the same before and after the round
    vix = torch.randint(
        0, len(val) - cfg.context - 1, (128,), generator=torch.Generator().manual_seed(cfg.seed + 1)
    )
    vx = torch.stack([val[i : i + cfg.context] for i in vix.tolist()])
    vy = torch.stack([val[i + 1 : i + 1 + cfg.context] for i in vix.tolist()])

    @torch.no_grad()
    def val_loss() -> float:
        model.eval()
        loss = float(F.cross_entropy(model(vx).flatten(0, 1), vy.flatten()))
        model.train()
        return loss

    def step(i: int) -> float:
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, (i + 1) / max(cfg.warmup_steps, 1))
        x, y = batch(train)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        return loss.item()

    model.train()
    for i in range(cfg.pretrain_steps):
        loss = step(i)
        if log and (i + 1) % 50 == 0:
            print(f"  pretrain step {i + 1}/{cfg.pretrain_steps}: loss {loss:.3f}", file=sys.stderr)
    loss0 = val_loss()
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    for i in range(cfg.inner_steps):
        loss = step(cfg.pretrain_steps + i)
        if log and (i + 1) % 50 == 0:
            print(f"  inner step {i + 1}/{cfg.inner_steps}: loss {loss:.3f}", file=sys.stderr)
    loss1 = val_loss()
    names, deltas = [], []
    for n, p in model.named_parameters():
        names.append(n)
        deltas.append((theta0[n] - p.detach()).to(torch.float32).contiguous())
    flat = torch.cat([d.reshape(-1) for d in deltas])
    info: dict[str, object] = {
        "params": flat.numel(),
        "tensors": len(deltas),
        "val_loss_theta0": round(loss0, 4),
        "val_loss_theta": round(loss1, 4),
        "train_seconds": round(time.perf_counter() - t_start, 1),
        "config": dataclasses.asdict(cfg),
    }
    return PseudoGrad(names, deltas, flat, info)


def pseudo_gradient(
    cfg: PGConfig | None = None, *, cache: bool = True, log: bool = True
) -> PseudoGrad:
    """Trains (or loads from the /tmp cache) the tiny LM and returns its pseudo-gradient."""
    cfg = cfg or PGConfig()
    text = stdlib_text(cfg.text_bytes)
    key = _key(cfg, text)
    path = CACHE_DIR / f"pseudograd-{key}.pt"
    if cache and path.exists():
        try:
            blob = torch.load(path, weights_only=True)
            deltas = [t.to(torch.float32) for t in blob["deltas"]]
            info = json.loads(blob["info"])
            info["cached"] = str(path)
            flat = torch.cat([d.reshape(-1) for d in deltas])
            return PseudoGrad(list(blob["names"]), deltas, flat, info)
        except Exception as exc:  # a corrupt or foreign cache file: retrain
            print(f"  ignoring pseudo-gradient cache {path}: {exc}", file=sys.stderr)
    if log:
        print(
            f"training the tiny LM for the pseudo-gradient ({cfg.pretrain_steps} + "
            f"{cfg.inner_steps} AdamW steps on {len(text) / 1e6:.1f} MB of stdlib source)...",
            file=sys.stderr,
        )
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        pg = _train(cfg, text, log)
    finally:
        torch.set_num_threads(threads)
    pg.info["cached"] = None
    if cache:
        try:
            CACHE_DIR.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            torch.save({"names": pg.names, "deltas": pg.deltas, "info": json.dumps(pg.info)}, tmp)
            tmp.replace(path)
        except OSError as exc:
            print(f"  could not cache the pseudo-gradient in {path}: {exc}", file=sys.stderr)
    return pg


def tile(deltas: list[torch.Tensor], min_numel: int) -> tuple[list[torch.Tensor], int]:
    """The list of tensors repeated (same tensor objects, as if the model had k times the
    layers) until it holds at least ``min_numel`` elements; returns (tensors, k)."""
    n = sum(t.numel() for t in deltas)
    k = max(1, -(-min_numel // n))
    return deltas * k, k


def describe(pg: PseudoGrad) -> str:
    x = pg.flat
    rms = float(x.pow(2).mean().sqrt())
    kurt = float((x / rms).pow(4).mean()) if rms > 0 else float("nan")
    absmax = float(x.abs().max())
    lines = [
        f"pseudo-gradient: {pg.numel:,} params in {len(pg.deltas)} tensors; "
        f"val loss {pg.info['val_loss_theta0']} -> {pg.info['val_loss_theta']} over the round; "
        f"trained in {pg.info['train_seconds']} s"
        + (f" (cached: {pg.info['cached']})" if pg.info.get("cached") else ""),
        f"  ||delta|| = {float(x.norm()):.4g}, rms {rms:.3g}, absmax {absmax:.3g} "
        f"(absmax/rms {absmax / rms:.1f}), kurtosis {kurt:.1f} (gaussian: 3)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--no-cache", action="store_true", help="retrain even when cached")
    args = ap.parse_args()
    pg = pseudo_gradient(cache=not args.no_cache)
    print(describe(pg))
    for name, d in zip(pg.names, pg.deltas, strict=True):
        print(f"  {name:28s} {tuple(d.shape)!s:14s} rms {float(d.pow(2).mean().sqrt()):.3g}")
