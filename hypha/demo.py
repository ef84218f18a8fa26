"""``python -m hypha.demo``: the codec on a real pseudo-gradient, in a few seconds.

Trains a tiny byte-level language model for a few dozen AdamW steps on text that ships with
every Python install (standard-library sources), takes the DiLoCo pseudo-gradient
(start weights − trained weights), and sends it through every codec: bytes, bits per parameter,
error, and how much error feedback recovers over repeated rounds.
"""

from __future__ import annotations

import argparse
import sysconfig
import time
from pathlib import Path

import torch
from torch import nn

import hypha
from hypha import compress, ops

__all__ = ["main", "pseudo_gradient"]

_TEXT_FILES = ("textwrap.py", "string.py", "argparse.py", "dataclasses.py")


def _corpus() -> torch.Tensor:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    data = b"".join((stdlib / name).read_bytes() for name in _TEXT_FILES if (stdlib / name).exists())
    if len(data) < 10_000:
        raise RuntimeError(f"found too little standard-library text under {stdlib}")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def pseudo_gradient(steps: int = 60, context: int = 16, seed: int = 0) -> list[torch.Tensor]:
    """Trains a small next-byte MLP for ``steps`` AdamW steps; returns θ_start − θ_end."""
    torch.manual_seed(seed)
    data = _corpus()
    model = nn.Sequential(
        nn.Embedding(256, 32),
        nn.Flatten(),
        nn.Linear(32 * context, 512),
        nn.GELU(),
        nn.Linear(512, 256),
    )
    start = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        idx = torch.randint(0, data.numel() - context - 1, (64,))
        x = torch.stack([data[i : i + context] for i in idx.tolist()])
        y = data[idx + context]
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [s - p.detach() for s, p in zip(start, model.parameters(), strict=True)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m hypha.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60, help="AdamW steps of the tiny model")
    args = parser.parse_args(argv)

    ext = hypha._ext.extension()
    where = f"hypha._C ({ext.simd_path()})" if ext is not None else "pure-torch reference"
    print(f"hypha {hypha.__version__}: kernels from {where}")
    t0 = time.perf_counter()
    delta = pseudo_gradient(args.steps)
    n = sum(d.numel() for d in delta)
    norm = torch.cat([d.reshape(-1) for d in delta]).double().norm()
    print(f"pseudo-gradient of a {n:,}-parameter byte-level model after {args.steps} AdamW steps "
          f"({time.perf_counter() - t0:.1f} s)\n")
    header = f"{'codec':<11} {'bytes':>10} {'bits/param':>10} {'rel. error':>10} {'encode ms':>9} {'decode ms':>9}"
    print(header)
    print("-" * len(header))
    for name in ["fp32", "bf16", "int8", "int4", "int2", "int4+zstd", "int2+zstd"]:
        t = time.perf_counter()
        payload = compress.encode(delta, name)
        t_enc = time.perf_counter() - t
        t = time.perf_counter()
        out = compress.decode(payload)
        t_dec = time.perf_counter() - t
        err = torch.cat([(a - b).reshape(-1) for a, b in zip(delta, out, strict=True)]).double().norm()
        print(f"{name:<11} {len(payload):>10,} {compress.bits_per_param(payload):>10.3f} "
              f"{float(err / norm):>10.4f} {t_enc * 1e3:>9.1f} {t_dec * 1e3:>9.1f}")

    # error feedback: send the same pseudo-gradient for several rounds at int2; what the
    # receiver has accumulated approaches rounds * delta, the residual stays bounded.
    flat = torch.cat([d.reshape(-1) for d in delta])
    ef = torch.zeros_like(flat)
    received = torch.zeros_like(flat)
    print("\nint2 with error feedback, the same pseudo-gradient sent repeatedly:")
    for rnd in range(1, 9):
        q = ops.encode_delta(flat, None, ef, bits=2)
        ops.dequantize_accumulate_(received, q)
        rel = float((received - rnd * flat).norm() / (rnd * flat.norm()))
        if rnd in (1, 2, 4, 8):
            print(f"  after {rnd} round(s): error of the running sum {rel:.4f}")


if __name__ == "__main__":
    main()
