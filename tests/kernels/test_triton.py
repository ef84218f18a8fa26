"""The Triton kernels (hypha.kernels, through hypha.ops with backend="triton") against the pure-torch
reference, bit for bit.

Without a GPU the kernels run on the CPU under Triton's numpy interpreter (TRITON_INTERPRET=1, set
below before triton is imported). On a GPU machine run with TRITON_INTERPRET=0 to test the compiled
kernels on CUDA tensors; the reference is always computed on the CPU.

Inputs are fresh random tensors for every run; set HYPHA_TEST_SEED to replay one (failure messages
print the seed in use).
"""

from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import warnings
from contextlib import contextmanager

import numpy as np
import pytest
import torch

try:
    import triton  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    pytest.fail(
        "tests/kernels/test_triton.py needs triton (`pip install triton` or "
        f"`pip install -e '.[triton]'`): {exc}",
        pytrace=False,
    )

from hypha import ops
from hypha.ops import _reference as ref
from tests.kernels._common import (
    STREAMS,
    assert_q_same,
    assert_same,
    check_slices_match_whole,
    check_stochastic_stream,
    make_input,
)
from tests.kernels._common import gen as _gen

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DEVICE = torch.device("cpu" if INTERPRET else "cuda")

SIZES = [1, 15, 16, 17, 1000, 5 * 123 * 123, 100_003]
BITS = [8, 4, 2]
BLOCKS = [16, 64, 128, 4096]


@pytest.fixture(scope="module", autouse=True)
def _triton_backend() -> None:
    if not INTERPRET and not torch.cuda.is_available():
        pytest.fail("TRITON_INTERPRET is not 1 and there is no CUDA device", pytrace=False)
    backends = ops.available_backends(DEVICE)
    if "triton" not in backends:
        pytest.fail(
            f"the triton backend is not available on {DEVICE} (available: {backends}); "
            f"importing hypha.kernels failed with: {ops._triton_error}. Install the package with "
            "`pip install --no-build-isolation -e .`",
            pytrace=False,
        )


# --- helpers ------------------------------------------------------------------------------------


def to_dev(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(DEVICE)


@contextmanager
def quiet_numpy():
    """The interpreter computes with numpy, which warns on inf * 0 and the like."""
    with np.errstate(all="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        yield


# --- quantize / dequantize ----------------------------------------------------------------------


def _quantize_cases() -> list[tuple[int, int, int, bool]]:
    """Every (n, bits, block, rounding) for the small sizes; the two large sizes (many programs,
    slow under the interpreter) split RTN and stochastic between them for each (bits, block)."""
    cases = []
    for n in SIZES:
        for bits in BITS:
            for block_size in BLOCKS:
                for stochastic in (False, True):
                    flip = BITS.index(bits) + BLOCKS.index(block_size) + (n == 100_003)
                    if n > 50_000 and stochastic != (flip % 2 == 1):
                        continue
                    cases.append((n, bits, block_size, stochastic))
    return cases


@pytest.mark.parametrize("n,bits,block_size,stochastic", _quantize_cases())
def test_quantize_dequantize(n: int, bits: int, block_size: int, stochastic: bool) -> None:
    gen = _gen("q", n, bits, block_size, stochastic)
    x = make_input(n, gen)
    seed, offset = STREAMS[(n + bits + block_size) % len(STREAMS)]
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    what = f"quantize(n={n}, bits={bits}, block={block_size}, {kw})"

    r = ref.quantize(x, bits, block_size, **kw)
    q = ops.quantize(to_dev(x), bits, block_size, backend="triton", **kw)
    assert_q_same(q, r, what)

    expected = ref.dequantize(r)
    assert_same(ops.dequantize(q, backend="triton"), expected, f"de{what}")
    acc = torch.randn(n, generator=gen)
    got = ops.dequantize_accumulate_(to_dev(acc.clone()), q, backend="triton")
    assert_same(got, acc + expected, f"dequantize_accumulate after {what}")


@pytest.mark.parametrize("seed,offset", STREAMS)
@pytest.mark.parametrize("bits", BITS)
def test_stochastic_streams(seed: int, offset: int, bits: int) -> None:
    check_stochastic_stream("triton", DEVICE, seed, offset, bits)


def test_stochastic_slices_match_whole() -> None:
    check_slices_match_whole("triton", DEVICE)


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", [False, True])
def test_quantize_special_values(bits: int, stochastic: bool) -> None:
    """NaN propagates to its block's scale, Inf blocks, -0.0, subnormals, fp32 extremes,
    absmax just above and below 2**-120."""
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
    ]
    x = torch.tensor([v for b in blocks for v in b] + [float("nan"), 1.0, 2.0], dtype=torch.float32)
    kw = {"stochastic": stochastic, "seed": 3, "offset": 11}
    with quiet_numpy():
        r = ref.quantize(x, bits, 16, **kw)
        q = ops.quantize(to_dev(x), bits, 16, backend="triton", **kw)
        assert_q_same(q, r, f"special-value quantize(bits={bits}, {kw})")
        assert_same(ops.dequantize(q, backend="triton"), ref.dequantize(r), "special dequantize")


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("block_size", [16, 4096])
def test_dequantize_arbitrary_codes(bits: int, block_size: int) -> None:
    """Any packed bytes (including set padding bits) and any scales, negative and special."""
    n = 5 * 123 * 123
    gen = _gen("dq", bits, block_size)
    codes = torch.randint(0, 256, (ops.packed_nbytes(n, bits),), generator=gen, dtype=torch.uint8)
    scales = torch.randn(ops.num_blocks(n, block_size), generator=gen)
    scales[0] = -0.0
    scales[-1] = float("inf")
    if scales.numel() > 2:
        scales[1] = float("nan")
    q = ops.QTensor(codes, scales, n, bits, block_size)
    qd = ops.QTensor(to_dev(codes), to_dev(scales), n, bits, block_size)
    acc = torch.randn(n, generator=gen)
    with quiet_numpy():
        expected = ref.dequantize(q)
        assert_same(ops.dequantize(qd, backend="triton"), expected, "dequantize")
        got = ops.dequantize_accumulate_(to_dev(acc.clone()), qd, backend="triton")
        assert_same(got, acc + expected, "dequantize_accumulate")


# --- encode_delta -------------------------------------------------------------------------------


def _encode_cases() -> list[tuple[int, int, int, bool, bool, bool]]:
    """Every combination up to n = 12_293 (4 programs); at n = 100_003 (25 programs) one block
    size for each of the (local, ef) variants that reads more than one tensor."""
    cases = []
    for n in [1, 17, 1000, 12_293, 100_003]:
        for bits in BITS:
            for block_size in [16, 128, 4096]:
                for has_local in (False, True):
                    for has_ef in (False, True):
                        for stochastic in (False, True):
                            if n == 100_003 and (block_size, has_local, has_ef) not in (
                                (16, True, True),
                                (128, False, True),
                                (4096, True, False),
                            ):
                                continue
                            cases.append((n, bits, block_size, has_local, has_ef, stochastic))
    return cases


@pytest.mark.parametrize("n,bits,block_size,has_local,has_ef,stochastic", _encode_cases())
def test_encode_delta(
    n: int, bits: int, block_size: int, has_local: bool, has_ef: bool, stochastic: bool
) -> None:
    gen = _gen("enc", n, bits, block_size, has_local, has_ef, stochastic)
    g = make_input(n, gen)
    local = g - make_input(n, gen) * 0.01 if has_local else None
    ef = make_input(n, gen) * 0.001 if has_ef else None
    seed, offset = STREAMS[(n + bits) % len(STREAMS)]
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    what = f"encode_delta(n={n}, bits={bits}, block={block_size}, local={has_local}, ef={has_ef}, {kw})"

    ef_ref = None if ef is None else ef.clone()
    r = ref.encode_delta(g, local, ef_ref, bits, block_size, **kw)
    ef_dev = to_dev(ef)
    q = ops.encode_delta(to_dev(g), to_dev(local), ef_dev, bits, block_size, backend="triton", **kw)
    assert_q_same(q, r, what)
    if ef is not None:
        assert ef_dev is not None and ef_ref is not None
        assert_same(ef_dev, ef_ref, f"{what} error feedback")


# --- nesterov -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 15, 17, 1000, 100_003])
@pytest.mark.parametrize("lr,mu", [(0.1, 0.9), (1e-3, 0.0), (0.7, 0.95), (0.3, 1.7)])
def test_nesterov(n: int, lr: float, mu: float) -> None:
    gen = _gen("nest", n, lr, mu)
    p, m, g = (make_input(n, gen) for _ in range(3))
    pr, mr = p.clone(), m.clone()
    ref.nesterov_(pr, mr, g, lr, mu)
    pd, md = to_dev(p), to_dev(m)
    ops.nesterov_(pd, md, to_dev(g), lr, mu, backend="triton")
    assert_same(md, mr, f"nesterov(n={n}, lr={lr}, mu={mu}) momentum")
    assert_same(pd, pr, f"nesterov(n={n}, lr={lr}, mu={mu}) param")


# --- launch options -----------------------------------------------------------------------------


def test_launch_disables_fp_fusion() -> None:
    """Every launch passes enable_fp_fusion=False, an option the GPU backends know."""
    from hypha.kernels import _launch

    seen: dict[str, object] = {}

    class FakeKernel:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.update(kwargs, grid=grid)

            return run

    _launch.launch(FakeKernel(), 3, torch.device("meta"), num_warps=4, BLOCK=16)
    assert seen == {"grid": (3,), "num_warps": 4, "enable_fp_fusion": False, "BLOCK": 16}

    from triton.backends.nvidia.compiler import CUDAOptions

    assert "enable_fp_fusion" in CUDAOptions.__dataclass_fields__


def test_exports() -> None:
    import hypha.kernels as k

    assert sorted(k.__all__) == [
        "dequantize",
        "dequantize_accumulate",
        "encode_delta",
        "nesterov",
        "quantize",
    ]
