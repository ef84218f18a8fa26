"""Runs DiLoCo workers as threads of the test process (LocalTransport) and collects results."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from hypha.optim import DiLoCo, LocalTransport, Transport

IN, OUT = 13, 3


_INIT_LOCK = threading.Lock()


def make_model(seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Odd sizes on purpose: tensors of 13x37, 37, 3x37, 3 elements."""
    # NOTE: nn.Linear draws from the global RNG: worker threads must not interleave here
    with _INIT_LOCK:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(IN, 37), nn.Tanh(), nn.Linear(37, OUT)).to(dtype)


def batch(
    rank: int, step: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, IN, generator=g)
    return x.to(device, dtype), torch.sin(x[:, :OUT] * 2).to(device, dtype)


def train(model: nn.Module, opt: torch.optim.Optimizer, rank: int, steps: range) -> list[float]:
    losses = []
    p = next(model.parameters())
    for step in steps:
        x, y = batch(rank, step, p.dtype, str(p.device))
        loss = ((model(x) - y) ** 2).float().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


@dataclass
class Worker:
    rank: int
    model: nn.Module
    opt: DiLoCo
    losses: list[float] = field(default_factory=list)

    def globals(self) -> list[torch.Tensor]:
        self.opt.synchronize()
        return [g.clone() for g in self.opt.global_parameters()]

    def locals(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.model.parameters()]


def run_threads(fn: Callable[[int], Any], n: int, timeout: float = 120) -> list[Any]:
    """fn(rank) in n threads; re-raises the first exception; fails on a hang."""
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def target(rank: int) -> None:
        try:
            results[rank] = fn(rank)
        except BaseException as exc:
            errors[rank] = exc

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
        if t.is_alive():
            raise TimeoutError(f"a worker thread hung for {timeout} s")
    for exc in errors:
        if exc is not None:
            raise exc
    return results


def run_workers(
    n: int,
    steps: int,
    *,
    comms: list[Transport] | None = None,
    dtype: torch.dtype = torch.float32,
    lr: float = 1e-2,
    eps: float = 1e-8,
    device: str = "cpu",
    **kwargs: Any,
) -> list[Worker]:
    """n workers, each seeded differently (DiLoCo makes them start from rank 0's parameters),
    trained for ``steps`` inner steps on their own data; the optimizers are left open."""
    comms = comms if comms is not None else LocalTransport.create(n)

    def work(rank: int) -> Worker:
        model = make_model(seed=rank, dtype=dtype).to(device)
        opt = DiLoCo(torch.optim.AdamW(model.parameters(), lr=lr, eps=eps), comms[rank], **kwargs)
        w = Worker(rank, model, opt)
        w.losses = train(model, opt, rank, range(steps))
        return w

    return run_threads(work, n)


def assert_identical(tensors: list[list[torch.Tensor]]) -> None:
    for rank, ts in enumerate(tensors[1:], start=1):
        for i, (a, b) in enumerate(zip(tensors[0], ts, strict=True)):
            if not torch.equal(a, b):
                diff = (a.float() - b.float()).abs().max().item()
                raise AssertionError(
                    f"tensor {i}: rank {rank} differs from rank 0 (max |diff| {diff})"
                )
