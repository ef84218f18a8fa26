"""Shared by the kernel tests: the replayable seed, the input generator, and the bit-for-bit
comparison that reports mismatching elements."""

from __future__ import annotations

import os
import random
import zlib

import pytest
import torch

from hypha import ops

#: Fresh inputs every run; set HYPHA_TEST_SEED to replay one (failure messages print it).
SEED = int(os.environ.get("HYPHA_TEST_SEED", random.randrange(2**32)))

#: (seed, offset) pairs: zero, a stream that wraps past 2**32 inside the call, 64-bit extremes.
STREAMS = [(0, 0), (2**63 + 5, 2**32 - 7), (2**64 - 1, 2**64 - 1), (12345, 3_000_000_017)]


def gen(*key: object) -> torch.Generator:
    """A generator seeded from SEED and the test's parameters (stable across processes)."""
    return torch.Generator().manual_seed(zlib.crc32(repr((SEED, *key)).encode()))


def make_input(n: int, g: torch.Generator) -> torch.Tensor:
    """Normal values whose scale changes every 16 elements (2**-20 .. 2**20), with some 16-element
    chunks of small integers (ties at .5 for RTN), all-zero chunks and chunks below 2**-120."""
    x = torch.randn(n, generator=g)
    chunks = (n + 15) // 16
    scale = torch.exp2(torch.randint(-20, 21, (chunks,), generator=g).float())
    x = x * scale.repeat_interleave(16)[:n]
    kind = torch.randint(0, 8, (chunks,), generator=g).repeat_interleave(16)[:n]
    ints = torch.randint(-255, 256, (n,), generator=g).float()
    x = torch.where(kind == 0, ints, x)
    x = torch.where(kind == 1, torch.zeros_like(x), x)
    x = torch.where(kind == 2, x * 2.0**-130, x)
    return x


def assert_same(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Bit-for-bit equality (any NaN equals any NaN); the message lists mismatching indices."""
    a = actual.detach().cpu().reshape(-1)
    e = expected.detach().cpu().reshape(-1)
    assert a.dtype == e.dtype, f"{what}: dtype {a.dtype} != {e.dtype}"
    assert a.numel() == e.numel(), f"{what}: {a.numel()} elements, expected {e.numel()}"
    if a.dtype == torch.float32:
        bad = (a.view(torch.int32) != e.view(torch.int32)) & ~(a.isnan() & e.isnan())
    else:
        bad = a != e
    idx = bad.nonzero().flatten()
    if idx.numel():
        first = idx[:10].tolist()

        def show(t: torch.Tensor) -> list[str]:
            if t.dtype == torch.float32:
                bits = t.view(torch.int32)
                return [f"{t[i].item()!r} ({bits[i].item() & 0xFFFFFFFF:#010x})" for i in first]
            return [repr(t[i].item()) for i in first]

        pytest.fail(
            f"{what}: {idx.numel()} of {a.numel()} elements differ (HYPHA_TEST_SEED={SEED}); "
            f"first indices {first}: got {show(a)}, expected {show(e)}"
        )


def assert_q_same(q: ops.QTensor, r: ops.QTensor, what: str, device: str | None = None) -> None:
    assert (q.numel, q.bits, q.block_size) == (r.numel, r.bits, r.block_size), what
    if device is not None:
        assert q.codes.device.type == device and q.scales.device.type == device, what
    assert_same(q.codes, r.codes, f"{what} codes")
    assert_same(q.scales, r.scales, f"{what} scales")


def check_stochastic_stream(backend: str, device: torch.device, seed: int, offset: int, bits: int) -> None:
    """One seed/offset pair of the stochastic-rounding stream: codes and scales match the reference."""
    from hypha.ops import _reference as ref

    x = make_input(1000, gen("s", seed, offset, bits))
    kw = {"stochastic": True, "seed": seed, "offset": offset}
    r = ref.quantize(x, bits, 64, **kw)
    q = ops.quantize(x.to(device), bits, 64, backend=backend, **kw)
    assert_q_same(q, r, f"quantize(bits={bits}, {kw})")


def check_slices_match_whole(backend: str, device: torch.device) -> None:
    """Quantizing block-aligned slices with matching offsets gives the whole tensor's codes."""
    x = make_input(4 * 128 + 40, gen("slices")).to(device)
    kw = {"stochastic": True, "seed": 7, "backend": backend}
    whole = ops.quantize(x, 4, 128, offset=99, **kw)
    parts = [
        ops.quantize(x[a:b], 4, 128, offset=99 + a, **kw)
        for a, b in [(0, 256), (256, 384), (384, x.numel())]
    ]
    assert_same(torch.cat([p.codes.cpu() for p in parts]), whole.codes, "sliced codes")
    assert_same(torch.cat([p.scales.cpu() for p in parts]), whole.scales, "sliced scales")
