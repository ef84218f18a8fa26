"""The CUDA kernels (csrc/cuda, through hypha.ops with backend="cuda") against the pure-torch
reference, bit for bit.

These tests need a CUDA device and the extension built with CUDA (``pip install
--no-build-isolation -e .`` on a machine with nvcc and a CUDA build of torch). Without a CUDA device
the whole module is skipped (reported as skipped, never as passed); with one, a missing CUDA
backend is a failure. The reference is always computed on the CPU.

Inputs are fresh random tensors for every run; set HYPHA_TEST_SEED to replay one (failure messages
print the seed in use).
"""

from __future__ import annotations

import zlib

import pytest
import torch

from hypha import ops
from hypha.ops import _reference as ref
from tests.kernels._common import (
    SEED,
    STREAMS,
    assert_same,
    check_slices_match_whole,
    check_stochastic_stream,
    make_input,
)
from tests.kernels._common import assert_q_same as _assert_q_same
from tests.kernels._common import gen as _gen


def assert_q_same(q: ops.QTensor, r: ops.QTensor, what: str) -> None:
    _assert_q_same(q, r, what, device="cuda")

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        not torch.cuda.is_available(),
        reason="needs a CUDA device (torch.cuda.is_available() is False): the CUDA kernels cannot "
        "run on this machine",
    ),
]

DEVICE = torch.device("cuda")

BIG = (1 << 22) + 3
SIZES = [1, 15, 16, 17, 1000, 5 * 123 * 123, BIG]
BITS = [8, 4, 2]
BLOCKS = [16, 64, 128, 4096]
ALL_BLOCKS = [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]  # each has its own thread mapping


@pytest.fixture(scope="module", autouse=True)
def _cuda_backend() -> None:
    backends = ops.available_backends(DEVICE)
    if "cuda" not in backends:
        from hypha._ext import extension, extension_error

        ext = extension()
        why = (
            f"hypha._C is not loaded: {extension_error()}"
            if ext is None
            else "hypha._C was built without CUDA (has_cuda() is False)"
        )
        pytest.fail(
            f"a CUDA device is present but the cuda backend is not available (available: "
            f"{backends}); {why}. Rebuild with `pip install --no-build-isolation -e .` where nvcc "
            "and a CUDA build of torch are installed.",
            pytrace=False,
        )


# --- helpers ------------------------------------------------------------------------------------


def to_dev(t: torch.Tensor | None, misalign: int = 0) -> torch.Tensor | None:
    """t on the GPU; with misalign > 0, as a contiguous view that starts `misalign` elements into
    its storage (so its data pointer is not 16-byte aligned and the kernels take their unaligned
    paths)."""
    if t is None:
        return None
    if not misalign:
        return t.to(DEVICE)
    buf = torch.zeros(t.numel() + misalign, dtype=t.dtype, device=DEVICE)
    view = buf[misalign:]
    view.copy_(t.reshape(-1))
    return view


def _stream(n: int, bits: int, block_size: int) -> tuple[int, int]:
    return STREAMS[(n + bits + block_size) % len(STREAMS)]


# --- quantize / dequantize ----------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_dequantize(n: int, bits: int, block_size: int, stochastic: bool) -> None:
    gen = _gen("q", n, bits, block_size, stochastic)
    x = make_input(n, gen)
    seed, offset = _stream(n, bits, block_size)
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    what = f"quantize(n={n}, bits={bits}, block={block_size}, {kw})"

    r = ref.quantize(x, bits, block_size, **kw)
    q = ops.quantize(to_dev(x), bits, block_size, backend="cuda", **kw)
    assert_q_same(q, r, what)

    expected = ref.dequantize(r)
    assert_same(ops.dequantize(q, backend="cuda"), expected, f"de{what}")
    acc = torch.randn(n, generator=gen)
    got = ops.dequantize_accumulate_(to_dev(acc.clone()), q, backend="cuda")
    assert_same(
        got, ref.dequantize_accumulate_(acc.clone(), r), f"dequantize_accumulate after {what}"
    )


@pytest.mark.parametrize("block_size", ALL_BLOCKS)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", [100_003, 3 * 4096 + 4])
def test_every_block_size(n: int, bits: int, block_size: int) -> None:
    """Every supported block size (each has its own thread mapping), both roundings."""
    x = make_input(n, _gen("allb", n, bits, block_size))
    for stochastic in (False, True):
        kw = {"stochastic": stochastic, "seed": 99, "offset": 2**32 - 1000}
        what = f"quantize(n={n}, bits={bits}, block={block_size}, {kw})"
        r = ref.quantize(x, bits, block_size, **kw)
        q = ops.quantize(to_dev(x), bits, block_size, backend="cuda", **kw)
        assert_q_same(q, r, what)
        assert_same(ops.dequantize(q, backend="cuda"), ref.dequantize(r), f"de{what}")


@pytest.mark.parametrize("seed,offset", STREAMS)
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_streams(seed: int, offset: int, bits: int) -> None:
    check_stochastic_stream("cuda", DEVICE, seed, offset, bits)


def test_stochastic_slices_match_whole() -> None:
    check_slices_match_whole("cuda", DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", [16, 4096])
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_special_values(bits: int, block_size: int, stochastic: bool) -> None:
    """NaN propagates to its block's scale, Inf blocks, -0.0, subnormals, fp32 extremes,
    absmax just above and below 2**-120 (a subnormal scale)."""
    tiny = 2.0**-120
    blocks = [
        [float("nan"), 1.0, -2.0] + [0.5] * 13,
        [float("inf"), -1.0, 3.0] + [0.0] * 13,
        [float("-inf"), float("inf"), 1e30, -1e-30] + [2.0] * 12,
        [-0.0] * 16,
        [1e-45, -1e-44, 1e-40, -1.1754942e-38] + [0.0] * 12,
        [3.4028235e38, -3.4028235e38, 1e38, -1.0] + [0.0] * 12,
        [tiny, -tiny * 0.5] + [0.0] * 14,
        [tiny * 0.999, -tiny * 0.75] + [0.0] * 14,
        [tiny * 1.001, -tiny] + [0.0] * 14,
        [-tiny * 3.7, tiny * 1.5, -tiny * 0.1, 1e-44] + [tiny * 2.9] * 12,
    ]
    special = torch.tensor([v for b in blocks for v in b], dtype=torch.float32)
    x = torch.cat([special, torch.tensor([float("nan"), 1.0, 2.0])])
    if block_size > 16:
        # A NaN-free block holding the other special values, a block whose absmax is just above
        # 2**-120 (subnormal scale), then everything again, with the NaN block, at a boundary.
        a = torch.cat([special[16:], torch.zeros(block_size - special.numel() + 16)])
        b = (torch.rand(block_size, generator=_gen("svb", bits)) * 2 - 1) * tiny
        b[block_size // 2] = tiny * 1.001
        x = torch.cat([a, b, x])
    kw = {"stochastic": stochastic, "seed": 3, "offset": 11}
    what = f"special-value quantize(bits={bits}, block={block_size}, {kw})"
    r = ref.quantize(x, bits, block_size, **kw)
    q = ops.quantize(to_dev(x), bits, block_size, backend="cuda", **kw)
    assert_q_same(q, r, what)
    assert_same(ops.dequantize(q, backend="cuda"), ref.dequantize(r), f"de{what}")
    ef = torch.randn(x.numel(), generator=_gen("sv", bits, block_size)) * tiny
    ef_ref, ef_dev = ef.clone(), to_dev(ef)
    r = ref.encode_delta(x, None, ef_ref, bits, block_size, **kw)
    q = ops.encode_delta(to_dev(x), None, ef_dev, bits, block_size, backend="cuda", **kw)
    assert_q_same(q, r, f"encode_delta {what}")
    assert ef_dev is not None
    assert_same(ef_dev, ef_ref, f"encode_delta {what} error feedback")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", [16, 128, 4096])
def test_dequantize_arbitrary_codes(bits: int, block_size: int) -> None:
    """Any packed bytes (including set padding bits) and any scales, negative, subnormal and
    special."""
    n = 5 * 123 * 123
    gen = _gen("dq", bits, block_size)
    codes = torch.randint(0, 256, (ops.packed_nbytes(n, bits),), generator=gen, dtype=torch.uint8)
    scales = torch.randn(ops.num_blocks(n, block_size), generator=gen)
    scales[0] = -0.0
    scales[-1] = float("inf")
    if scales.numel() > 3:
        scales[1] = float("nan")
        scales[2] = 2.0**-127
        scales[3] = -(2.0**-140)
    q = ops.QTensor(codes, scales, n, bits, block_size)
    qd = ops.QTensor(to_dev(codes), to_dev(scales), n, bits, block_size)
    acc = torch.randn(n, generator=gen)
    expected = ref.dequantize(q)
    assert_same(ops.dequantize(qd, backend="cuda"), expected, "dequantize")
    got = ops.dequantize_accumulate_(to_dev(acc.clone()), qd, backend="cuda")
    assert_same(got, ref.dequantize_accumulate_(acc.clone(), q), "dequantize_accumulate")


@pytest.mark.parametrize("n", [1, 5, 17, 1000, 100_003])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("misalign", [1, 2, 3])
def test_unaligned_pointers(n: int, bits: int, misalign: int) -> None:
    """Inputs, outputs, codes and error feedback at data pointers that are not 16-byte aligned
    (views into a larger buffer) take the scalar paths and give the same bits."""
    gen = _gen("mis", n, bits, misalign)
    g, local = make_input(n, gen), make_input(n, gen)
    ef = make_input(n, gen) * 0.01
    kw = {"stochastic": bool(misalign & 1), "seed": 5, "offset": 77}
    what = f"unaligned(n={n}, bits={bits}, misalign={misalign})"

    r = ref.quantize(g, bits, 64, **kw)
    q = ops.quantize(to_dev(g, misalign), bits, 64, backend="cuda", **kw)
    assert_q_same(q, r, f"quantize {what}")

    ef_ref, ef_dev = ef.clone(), to_dev(ef, misalign)
    r = ref.encode_delta(g, local, ef_ref, bits, 64, **kw)
    q = ops.encode_delta(
        to_dev(g, misalign), to_dev(local, misalign + 1), ef_dev, bits, 64, backend="cuda", **kw
    )
    assert_q_same(q, r, f"encode_delta {what}")
    assert ef_dev is not None
    assert_same(ef_dev, ef_ref, f"encode_delta {what} error feedback")

    # Codes at an odd byte address, out / acc misaligned.
    qd = ops.QTensor(to_dev(r.codes, misalign), to_dev(r.scales, misalign), n, bits, 64)
    out = to_dev(torch.full((n,), 7.0), misalign)
    assert out is not None
    ops.dequantize(qd, out=out, backend="cuda")
    assert_same(out, ref.dequantize(r), f"dequantize {what}")
    acc = torch.randn(n, generator=gen)
    acc_dev = to_dev(acc, misalign)
    assert acc_dev is not None
    ops.dequantize_accumulate_(acc_dev, qd, backend="cuda")
    assert_same(
        acc_dev, ref.dequantize_accumulate_(acc.clone(), r), f"dequantize_accumulate {what}"
    )

    p, m, gr = make_input(n, gen), make_input(n, gen), make_input(n, gen)
    pr, mr = p.clone(), m.clone()
    ref.nesterov_(pr, mr, gr, 0.1, 0.9)
    pd, md = to_dev(p, misalign), to_dev(m, misalign + 1)
    assert pd is not None and md is not None
    ops.nesterov_(pd, md, to_dev(gr, misalign + 2), 0.1, 0.9, backend="cuda")
    assert_same(md, mr, f"nesterov {what} momentum")
    assert_same(pd, pr, f"nesterov {what} param")


def test_empty() -> None:
    q = ops.quantize(torch.empty(0, device=DEVICE), 4, 128, backend="cuda")
    assert q.codes.numel() == 0 and q.scales.numel() == 0
    assert ops.dequantize(q, backend="cuda").numel() == 0


def test_side_stream() -> None:
    """The ops run on the current stream: results produced on a side stream are complete once that
    stream is synchronised."""
    n = BIG
    x = make_input(n, _gen("stream"))
    kw = {"stochastic": True, "seed": 1, "offset": 2}
    r = ref.quantize(x, 8, 128, **kw)
    xd = to_dev(x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        q = ops.quantize(xd, 8, 128, backend="cuda", **kw)
        out = ops.dequantize(q, backend="cuda")
    side.synchronize()
    assert_q_same(q, r, "quantize on a side stream")
    assert_same(out, ref.dequantize(r), "dequantize on a side stream")


# --- encode_delta -------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", BLOCKS)
@pytest.mark.parametrize("has_local", [False, True])
@pytest.mark.parametrize("has_ef", [False, True])
@pytest.mark.parametrize("stochastic", [False, True])
def test_encode_delta(
    n: int, bits: int, block_size: int, has_local: bool, has_ef: bool, stochastic: bool
) -> None:
    gen = _gen("enc", n, bits, block_size, has_local, has_ef, stochastic)
    g = make_input(n, gen)
    local = g - make_input(n, gen) * 0.01 if has_local else None
    ef = make_input(n, gen) * 0.001 if has_ef else None
    seed, offset = _stream(n, bits, block_size)
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    what = f"encode_delta(n={n}, bits={bits}, block={block_size}, local={has_local}, ef={has_ef}, {kw})"

    ef_ref = None if ef is None else ef.clone()
    r = ref.encode_delta(g, local, ef_ref, bits, block_size, **kw)
    ef_dev = to_dev(ef)
    q = ops.encode_delta(to_dev(g), to_dev(local), ef_dev, bits, block_size, backend="cuda", **kw)
    assert_q_same(q, r, what)
    if ef is not None:
        assert ef_dev is not None and ef_ref is not None
        assert_same(ef_dev, ef_ref, f"{what} error feedback")


# --- nesterov -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("lr,mu", [(0.1, 0.9), (1e-3, 0.0), (0.7, 0.95), (0.3, 1.7)])
def test_nesterov(n: int, lr: float, mu: float) -> None:
    gen = _gen("nest", n, lr, mu)
    p, m, g = (make_input(n, gen) for _ in range(3))
    pr, mr = p.clone(), m.clone()
    ref.nesterov_(pr, mr, g, lr, mu)
    pd, md = to_dev(p), to_dev(m)
    assert pd is not None and md is not None
    ops.nesterov_(pd, md, to_dev(g), lr, mu, backend="cuda")
    assert_same(md, mr, f"nesterov(n={n}, lr={lr}, mu={mu}) momentum")
    assert_same(pd, pr, f"nesterov(n={n}, lr={lr}, mu={mu}) param")


# --- more than 2**31 elements (64-bit indexing) -------------------------------------------------


def _need_gib(gib: float) -> None:
    free, _ = torch.cuda.mem_get_info()
    if free < gib * 2**30:
        pytest.skip(f"needs {gib} GiB of free GPU memory, {free / 2**30:.1f} GiB free")


def _windows(n: int, block_size: int) -> list[tuple[int, int]]:
    """Block-aligned element windows: the start, across index 2**31, the (partial) tail."""
    w = 4 * block_size
    starts = [0, (2**31 // block_size - 2) * block_size, (n // block_size - 3) * block_size]
    return [(s, min(s + w, n)) for s in starts]


@pytest.mark.slow
@pytest.mark.parametrize("bits,block_size", [(4, 128), (2, 4096), (8, 16)])
def test_more_than_2_31_elements(bits: int, block_size: int) -> None:
    n = 2**31 + 2**20 + 5
    _need_gib(2 * n * 4 / 2**30 + 4)
    gen = torch.Generator(device=DEVICE).manual_seed(zlib.crc32(repr((SEED, "big", bits)).encode()))
    x = torch.randn(n, device=DEVICE, generator=gen)
    kw = {"stochastic": True, "seed": 11, "offset": 2**32 - 2**30}
    q = ops.quantize(x, bits, block_size, backend="cuda", **kw)
    torch.cuda.synchronize()
    acc = torch.randn(n, device=DEVICE, generator=gen)
    acc_before = {w: acc[w[0] : w[1]].to("cpu", copy=True) for w in _windows(n, block_size)}
    ops.dequantize_accumulate_(acc, q, backend="cuda")
    for s, e in _windows(n, block_size):
        what = f"n={n} bits={bits} block={block_size} elements [{s}, {e})"
        r = ref.quantize(
            x[s:e].cpu(), bits, block_size, stochastic=True, seed=11, offset=kw["offset"] + s
        )
        b0, b1 = s * bits // 8, (e * bits + 7) // 8
        assert_same(q.codes[b0:b1], r.codes, f"codes {what}")
        assert_same(
            q.scales[s // block_size : (e + block_size - 1) // block_size],
            r.scales,
            f"scales {what}",
        )
        expected = ref.dequantize_accumulate_(acc_before[(s, e)].clone(), r)
        assert_same(acc[s:e], expected, f"dequantize_accumulate {what}")
    del x, acc, q
    torch.cuda.empty_cache()


@pytest.mark.slow
def test_nesterov_more_than_2_31_elements() -> None:
    n = 2**31 + 2**20 + 5
    _need_gib(3 * n * 4 / 2**30 + 2)
    gen = torch.Generator(device=DEVICE).manual_seed(SEED)
    p, m, g = (torch.randn(n, device=DEVICE, generator=gen) for _ in range(3))
    windows = _windows(n, 1024)
    before = {w: tuple(t[w[0] : w[1]].to("cpu", copy=True) for t in (p, m, g)) for w in windows}
    ops.nesterov_(p, m, g, 0.25, 0.9, backend="cuda")
    for (s, e), (pw, mw, gw) in before.items():
        ref.nesterov_(pw, mw, gw, 0.25, 0.9)
        assert_same(m[s:e], mw, f"nesterov momentum [{s}, {e})")
        assert_same(p[s:e], pw, f"nesterov param [{s}, {e})")
    del p, m, g
    torch.cuda.empty_cache()
