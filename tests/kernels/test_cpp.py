"""The C++ CPU kernels (hypha._C, backend="cpp") against the pure-torch reference, bit for bit.

Every op is compared with ``hypha.ops._reference`` on fresh random inputs and odd sizes, for every
bit width, several block sizes, round-to-nearest and stochastic rounding (seeds and offsets), on
the default SIMD path and on every other path this CPU supports. Codes, scales and outputs must be
bit-identical (NaN matches NaN). The boundary checks of hypha._C are tested for their error types
and messages.

The extension is required here: when hypha._C is not importable these tests fail (they do not
skip), since the build always produces it.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

import hypha.ops as ops
from hypha.ops import _reference as ref

try:
    from hypha import _C
except ImportError as exc:  # reported by the `ext` fixture: every test fails, none skips
    _C = None
    _IMPORT_ERROR = str(exc)
    _PATHS: list[str] = ["unbuilt"]
else:
    _IMPORT_ERROR = ""
    _PATHS = list(_C._simd_paths())

BITS = (8, 4, 2)
BLOCK_SIZES = (16, 64, 128, 4096)
SIZES = (1, 15, 16, 17, 127, 1000, 5 * 123 * 123, (1 << 20) + 3)
# (stochastic, seed, offset)
MODES = ((False, 0, 0), (True, 1, 0), (True, 0xDEADBEEF12345, 2**32 - 100))


@pytest.fixture(scope="module")
def ext():
    if _C is None:
        pytest.fail(
            f"hypha._C is not importable ({_IMPORT_ERROR}); build it with "
            "`pip install --no-build-isolation -e .`"
        )
    if "cpp" not in ops.available_backends("cpu"):
        pytest.fail("hypha._C imports but hypha.ops does not offer the 'cpp' backend")
    return _C


@pytest.fixture(params=_PATHS)
def simd_path(request, ext):
    """Runs a test on one SIMD path, restoring the default afterwards."""
    previous = ext._set_simd_path(request.param)
    yield request.param
    ext._set_simd_path(previous)


# --- helpers ------------------------------------------------------------------------------------


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Bit equality (NaN == NaN with any payload), listing the first mismatches on failure."""
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    got, want = got.reshape(-1), want.reshape(-1)
    assert got.numel() == want.numel(), f"{what}: {got.numel()} elements != {want.numel()}"
    if got.dtype == torch.float32:
        bad = (got.view(torch.int32) != want.view(torch.int32)) & ~(
            torch.isnan(got) & torch.isnan(want)
        )
    else:
        bad = got != want
    if bool(bad.any()):
        idx = bad.nonzero().reshape(-1)[:8]
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {got.numel()} elements differ; first at indices "
            f"{idx.tolist()}: got {got[idx].tolist()}, want {want[idx].tolist()}"
        )


def random_input(n: int, seed: int) -> torch.Tensor:
    """Normal values whose scale varies by orders of magnitude between stretches."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g)
    if n >= 64:
        stretch = torch.exp(torch.randn((n + 63) // 64, generator=g) * 4).repeat_interleave(64)
        x = x * stretch[:n]
    return x


def check_quantize(x: torch.Tensor, bits: int, bs: int, stochastic: bool, seed: int, offset: int):
    what = f"n={x.numel()} bits={bits} bs={bs} sr={stochastic} seed={seed} offset={offset}"
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    got = ops.quantize(x, bits, bs, backend="cpp", **kw)
    want = ref.quantize(x, bits, bs, **kw)
    assert_same(got.codes, want.codes, f"quantize codes {what}")
    assert_same(got.scales, want.scales, f"quantize scales {what}")
    assert_same(ops.dequantize(want, backend="cpp"), ref.dequantize(want), f"dequantize {what}")
    acc = torch.randn(x.numel())
    acc_want = acc.clone()
    ops.dequantize_accumulate_(acc, want, backend="cpp")
    ref.dequantize_accumulate_(acc_want, want)
    assert_same(acc, acc_want, f"dequantize_accumulate {what}")


def check_encode_delta(n, bits, bs, stochastic, seed, offset, with_local, with_ef, data_seed):
    what = f"n={n} bits={bits} bs={bs} sr={stochastic} local={with_local} ef={with_ef}"
    g = random_input(n, data_seed)
    local = g + 0.01 * random_input(n, data_seed + 1) if with_local else None
    ef = 1e-3 * random_input(n, data_seed + 2) if with_ef else None
    ef_ref = ef.clone() if ef is not None else None
    kw = {"stochastic": stochastic, "seed": seed, "offset": offset}
    got = ops.encode_delta(g, local, ef, bits, bs, backend="cpp", **kw)
    want = ref.encode_delta(g, local, ef_ref, bits, bs, **kw)
    assert_same(got.codes, want.codes, f"encode_delta codes {what}")
    assert_same(got.scales, want.scales, f"encode_delta scales {what}")
    if ef is not None:
        assert_same(ef, ef_ref, f"encode_delta error feedback {what}")


# --- the extension ------------------------------------------------------------------------------


def test_extension_is_built(ext, monkeypatch):
    monkeypatch.delenv(ops.ENV_BACKEND, raising=False)
    assert ops.select_backend(torch.device("cpu")) == "cpp"
    assert ext.simd_path() in ("avx512", "avx2", "sse2", "generic")
    assert ext.simd_path() in _PATHS
    assert isinstance(ext.has_cuda(), bool)


# --- quantize / dequantize / dequantize_accumulate ----------------------------------------------


def _quantize_cases():
    names = {MODES[0]: "rtn", MODES[1]: "sr", MODES[2]: "sr-offset"}
    for n, bits, bs, mode in itertools.product(SIZES, BITS, BLOCK_SIZES, MODES):
        if n == SIZES[-1] and mode[0] and bs != 128:
            continue  # the largest size rounds stochastically at one block size only (slow ref)
        yield pytest.param(n, bits, bs, mode, id=f"n{n}-bits{bits}-bs{bs}-{names[mode]}")


@pytest.mark.parametrize(("n", "bits", "bs", "mode"), list(_quantize_cases()))
def test_quantize_matches_reference(ext, n, bits, bs, mode):
    check_quantize(random_input(n, n * 7 + bits), bits, bs, *mode)


@pytest.mark.parametrize("bits", BITS)
def test_every_simd_path_matches_reference(simd_path, bits):
    for n, bs, mode in itertools.product((1, 17, 1000, 5 * 123 * 123), BLOCK_SIZES, MODES):
        check_quantize(random_input(n, n + bs), bits, bs, *mode)
    for variant in range(4):
        check_encode_delta(70001, bits, 64, variant % 2 == 1, 5, 9, variant & 1, variant & 2, 3)
    p, m, g = (random_input(70001, s) for s in (1, 2, 3))
    p2, m2 = p.clone(), m.clone()
    ops.nesterov_(p, m, g, 0.05, 0.9, backend="cpp")
    ref.nesterov_(p2, m2, g, 0.05, 0.9)
    assert_same(p, p2, f"nesterov param on {simd_path}")
    assert_same(m, m2, f"nesterov momentum on {simd_path}")


def test_stochastic_offset_and_slicing(ext):
    """Quantizing in block-aligned slices with matching offsets gives the codes of the whole."""
    x = random_input(128 * 40 + 5, 11)
    for bits, offset in itertools.product(BITS, (0, 2**32 - 64, 2**64 - 256)):
        whole = ops.quantize(x, bits, 128, stochastic=True, seed=3, offset=offset, backend="cpp")
        parts = [
            ops.quantize(
                x[a:b],
                bits,
                128,
                stochastic=True,
                seed=3,
                offset=(offset + a) % 2**64,
                backend="cpp",
            )
            for a, b in ((0, 128 * 16), (128 * 16, 128 * 17), (128 * 17, x.numel()))
        ]
        assert_same(torch.cat([p.codes for p in parts]), whole.codes, f"slices bits={bits}")
        want = ref.quantize(x, bits, 128, stochastic=True, seed=3, offset=offset)
        assert_same(whole.codes, want.codes, f"offset {offset} bits={bits}")


def test_stochastic_rounding_is_unbiased(ext):
    n, bs = 1 << 20, 4096
    x = torch.full((n,), 0.2)
    x[::bs] = 1.5  # 2 bits: scale 1, codes 1 or 2 with P(2) = 0.7 -> E[dequant] = 0.2
    for seed in (1, 2):
        q = ops.quantize(x, 2, bs, stochastic=True, seed=seed, backend="cpp")
        d = ops.dequantize(q, backend="cpp")
        mask = torch.ones(n, dtype=torch.bool)
        mask[::bs] = False
        assert abs(d[mask].double().mean().item() - 0.2) < 3e-3


def test_dequantize_accumulate_subtracts_with_negated_scales(ext):
    x = random_input(5000, 1)
    q = ops.quantize(x, 4, 64, backend="cpp")
    neg = ref.QTensor(q.codes, -q.scales, q.numel, q.bits, q.block_size)
    acc = random_input(5000, 2)
    want = acc - ref.dequantize(q)
    ops.dequantize_accumulate_(acc, neg, backend="cpp")
    assert_same(acc, want, "acc - dequant via negated scales")


# --- encode_delta -------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["local+ef", "local", "ef", "none"])
@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("n", SIZES)
def test_encode_delta_matches_reference(ext, n, bits, variant):
    with_local, with_ef = "local" in variant, "ef" in variant
    i = SIZES.index(n) + BITS.index(bits)
    bs = BLOCK_SIZES[i % len(BLOCK_SIZES)]
    stochastic, seed, offset = MODES[i % len(MODES)]
    check_encode_delta(n, bits, bs, stochastic, seed, offset, with_local, with_ef, n + bits)


def test_encode_delta_error_feedback_identity(ext):
    """delta == dequant(q) + ef_new up to one rounding, and the ef update is the reference's."""
    n = 10_000
    g, local, ef = random_input(n, 1), random_input(n, 2), 1e-3 * random_input(n, 3)
    delta = (g - local) + ef
    q = ops.encode_delta(g, local, ef, 4, 128, backend="cpp")
    dq = ops.dequantize(q, backend="cpp")
    err = ((dq.double() + ef.double()) - delta.double()).abs()
    tol = (delta.double().abs() + dq.double().abs()) * 2.0**-24
    assert bool((err <= tol).all())


# --- nesterov -----------------------------------------------------------------------------------


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize(("lr", "mu"), [(0.7, 0.9), (1e-3, 0.99), (0.1, 0.0), (0.0, 0.5)])
def test_nesterov_matches_reference(ext, n, lr, mu):
    p, m, g = random_input(n, 1), random_input(n, 2), random_input(n, 3)
    p2, m2 = p.clone(), m.clone()
    ops.nesterov_(p, m, g, lr, mu, backend="cpp")
    ref.nesterov_(p2, m2, g, lr, mu)
    assert_same(m, m2, f"momentum n={n} lr={lr} mu={mu}")
    assert_same(p, p2, f"param n={n} lr={lr} mu={mu}")


@pytest.mark.parametrize("n", (17, 1000, (1 << 20) + 3))
def test_nesterov_matches_torch_sgd(ext, n):
    # Unit-scale data: torch's SGD may fuse multiply-adds, so it agrees to a few ulps only.
    lr, mu = 0.7, 0.9
    gen = torch.Generator().manual_seed(n)
    p0 = torch.randn(n, generator=gen)
    param = torch.nn.Parameter(p0.clone())
    opt = torch.optim.SGD([param], lr=lr, momentum=mu, nesterov=True)
    p, m = p0.clone(), torch.zeros(n)
    for _ in range(3):
        g = torch.randn(n, generator=gen)
        param.grad = g.clone()
        opt.step()
        ops.nesterov_(p, m, g, lr, mu, backend="cpp")
    torch.testing.assert_close(p, param.detach(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(m, opt.state[param]["momentum_buffer"], rtol=1e-6, atol=1e-6)


# --- threads ------------------------------------------------------------------------------------


def test_thread_count_does_not_change_results(ext):
    n = (1 << 20) + 3
    x, local = random_input(n, 1), random_input(n, 2)
    saved = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            q = ops.quantize(x, 4, 128, stochastic=True, seed=9, backend="cpp")
            ef = torch.zeros(n)
            e = ops.encode_delta(x, local, ef, 2, 64, backend="cpp")
            acc = local.clone()
            ops.dequantize_accumulate_(acc, q, backend="cpp")
            p, m = x.clone(), local.clone()
            ops.nesterov_(p, m, local, 0.1, 0.9, backend="cpp")
            outs.append((q.codes, q.scales, e.codes, ef, acc, p, m))
    finally:
        torch.set_num_threads(saved)
    for other in outs[1:]:
        for a, b in zip(outs[0], other, strict=True):
            assert_same(b, a, "results with a different thread count")


# --- special values -----------------------------------------------------------------------------


@pytest.mark.parametrize("bits", BITS)
@pytest.mark.parametrize("stochastic", (False, True))
def test_special_values_match_reference(ext, bits, stochastic):
    n, bs = 64 * 12 + 9, 64
    x = random_input(n, 4)
    x[0:64] = 3.0e38  # huge block (absmax near FLT_MAX)
    x[70] = -torch.finfo(torch.float32).max
    x[128:192] = torch.linspace(-1, 1, 64) * 1e-39  # denormals: tiny absmax, scale 0
    x[192:256] = 0.0
    x[256:320] = 2.0**-120 * torch.linspace(-1, 1, 64)  # absmax exactly 2**-120: not tiny
    x[320:384] = torch.linspace(-1, 1, 64) * 1e-36  # absmax just above 2**-120
    x[400] = math.nan
    x[470] = math.inf
    x[540] = -math.inf
    x[600] = -math.nan
    x[601] = math.inf
    x[-1] = math.nan  # in the partial last block
    check_quantize(x, bits, bs, stochastic, 7, 3)
    q = ops.quantize(x, bits, bs, stochastic=stochastic, seed=7, backend="cpp")
    assert bool(torch.isnan(q.scales[[6, 9, 12]]).all())
    assert bool((q.scales[[2, 3]] == 0).all())
    assert bool(torch.isinf(q.scales[[7, 8]]).all())
    for with_local, with_ef in itertools.product((False, True), repeat=2):
        g = x.clone()
        local = torch.where(torch.isfinite(x), x * 0.5, x) if with_local else None
        ef = torch.full((n,), 1e-3) if with_ef else None
        ef_ref = ef.clone() if ef is not None else None
        got = ops.encode_delta(g, local, ef, bits, bs, stochastic=stochastic, seed=1, backend="cpp")
        want = ref.encode_delta(g, local, ef_ref, bits, bs, stochastic=stochastic, seed=1)
        assert_same(got.codes, want.codes, "encode_delta codes with special values")
        assert_same(got.scales, want.scales, "encode_delta scales with special values")
        if ef is not None:
            assert_same(ef, ef_ref, "encode_delta ef with special values")
    p, m = x.clone(), torch.where(torch.isnan(x), 0.0, x)
    p2, m2 = p.clone(), m.clone()
    ops.nesterov_(p, m, x, 0.1, 0.9, backend="cpp")
    ref.nesterov_(p2, m2, x, 0.1, 0.9)
    assert_same(p, p2, "nesterov param with special values")
    assert_same(m, m2, "nesterov momentum with special values")


def test_empty_tensors(ext):
    x = torch.empty(0)
    q = ops.quantize(x, 4, 16, backend="cpp")
    assert q.codes.numel() == 0 and q.scales.numel() == 0
    assert ops.dequantize(q, backend="cpp").numel() == 0
    ext.quantize(x, 4, 16, False, 0, 0, q.codes, q.scales)
    ext.nesterov(x, torch.empty(0), torch.empty(0), 0.1, 0.9)


# --- boundary checks of hypha._C ----------------------------------------------------------------


def _q_args(n=100, bits=8, bs=16):
    x = torch.randn(n)
    codes = torch.empty(ref.packed_nbytes(n, bits), dtype=torch.uint8)
    scales = torch.empty(ref.num_blocks(n, bs))
    return x, codes, scales


def test_error_wrong_dtype(ext):
    x, codes, scales = _q_args()
    with pytest.raises(
        TypeError,
        match=r"expected x to be a contiguous float32 tensor, got a "
        r"contiguous float64 tensor",
    ):
        ext.quantize(x.double(), 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(
        TypeError,
        match=r"expected x to be a contiguous float32 tensor, got a "
        r"non-contiguous float16 tensor",
    ):
        ext.quantize(torch.randn(200).half()[::2], 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(TypeError, match="expected codes to be a contiguous uint8 tensor"):
        ext.quantize(x, 8, 16, False, 0, 0, codes.to(torch.int8), scales)
    with pytest.raises(TypeError, match="expected scales to be a contiguous float32 tensor"):
        ext.dequantize(codes, scales.double(), 100, 8, 16, torch.empty(100))
    with pytest.raises(TypeError, match="expected grad to be a contiguous float32 tensor"):
        ext.nesterov(torch.zeros(4), torch.zeros(4), torch.zeros(4, dtype=torch.bfloat16), 0.1, 0.9)


def test_error_non_contiguous(ext):
    x, codes, scales = _q_args()
    with pytest.raises(
        ValueError,
        match=r"expected x to be a contiguous float32 tensor, got a "
        r"non-contiguous float32 tensor.*\.contiguous\(\)",
    ):
        ext.quantize(torch.randn(200)[::2], 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(
        ValueError,
        match=r"expected param to be a contiguous float32 tensor, got "
        r"a non-contiguous float32 tensor.*written in place",
    ):
        ext.nesterov(torch.randn(10)[::2], torch.randn(5), torch.randn(5), 0.1, 0.9)
    with pytest.raises(ValueError, match="expected error_feedback to be a contiguous"):
        ext.encode_delta(x, None, torch.zeros(200)[::2], 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(ValueError, match="expected acc to be a contiguous"):
        ext.dequantize_accumulate(codes, scales, 100, 8, 16, torch.zeros(100, 2)[:, 0])
    # the public API refuses a non-contiguous in-place argument too
    with pytest.raises(ValueError, match="contiguous"):
        ops.encode_delta(x, None, torch.zeros(200)[::2], 8, 16, backend="cpp")


def test_error_wrong_sizes(ext):
    x, codes, scales = _q_args()
    with pytest.raises(ValueError, match=r"codes to have packed_nbytes\(numel=100, bits=8\) = 100"):
        ext.quantize(x, 8, 16, False, 0, 0, codes[:99], scales)
    with pytest.raises(ValueError, match=r"scales to have num_blocks\(numel=100, block_size=16\)"):
        ext.quantize(x, 8, 16, False, 0, 0, codes, scales[:6])
    with pytest.raises(ValueError, match="codes to have packed_nbytes"):
        ext.quantize(x, 4, 16, False, 0, 0, codes, scales)  # 8-bit sized codes for 4 bits
    with pytest.raises(ValueError, match="expected out to have numel = 100 elements, got 99"):
        ext.dequantize(codes, scales, 100, 8, 16, torch.empty(99))
    with pytest.raises(ValueError, match="expected local to have"):
        ext.encode_delta(x, torch.zeros(99), None, 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(ValueError, match="expected momentum to have"):
        ext.nesterov(torch.zeros(4), torch.zeros(5), torch.zeros(4), 0.1, 0.9)
    with pytest.raises(ValueError, match="numel must be >= 0"):
        ext.dequantize(codes, scales, -1, 8, 16, torch.empty(0))


@pytest.mark.parametrize("bits", (0, 1, 3, 16, -8))
def test_error_bad_bits(ext, bits):
    x, codes, scales = _q_args()
    with pytest.raises(ValueError, match=f"bits must be 8, 4 or 2, got {bits}"):
        ext.quantize(x, bits, 16, False, 0, 0, codes, scales)
    with pytest.raises(ValueError, match="bits must be 8, 4 or 2"):
        ext.dequantize_accumulate(codes, scales, 100, bits, 16, torch.zeros(100))


@pytest.mark.parametrize("bs", (0, 8, 48, 100, 8192, -16))
def test_error_bad_block_size(ext, bs):
    x, codes, scales = _q_args()
    with pytest.raises(
        ValueError, match=rf"block_size must be a power of two in \[16, 4096\], got {bs}"
    ):
        ext.quantize(x, 8, bs, False, 0, 0, codes, scales)
    with pytest.raises(ValueError, match="block_size must be a power of two"):
        ext.encode_delta(x, None, None, 8, bs, False, 0, 0, codes, scales)


def test_error_key_and_offset_ranges(ext):
    x, codes, scales = _q_args()
    ext.quantize(x, 8, 16, True, 2**32 - 1, 2**64 - 1, codes, scales)  # the extremes are valid
    with pytest.raises(ValueError, match=r"key must be in \[0, 2\*\*32\), got 4294967296"):
        ext.quantize(x, 8, 16, True, 2**32, 0, codes, scales)
    with pytest.raises(ValueError, match="key must be in"):
        ext.quantize(x, 8, 16, True, -1, 0, codes, scales)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 2\*\*64\)"):
        ext.quantize(x, 8, 16, True, 0, 2**64, codes, scales)
    with pytest.raises(ValueError, match="offset must be in"):
        ext.encode_delta(x, None, None, 8, 16, True, 0, -5, codes, scales)
    with pytest.raises(TypeError, match="expected key to be an int"):
        ext.quantize(x, 8, 16, True, 1.5, 0, codes, scales)


def test_error_devices_and_aliasing(ext):
    x, codes, scales = _q_args()
    meta_codes = torch.empty(codes.shape, dtype=torch.uint8, device="meta")
    meta_scales = torch.empty(scales.shape, device="meta")
    with pytest.raises(
        ValueError,
        match="expected all tensors on the same device, but codes is on meta and x is on cpu",
    ):
        ext.quantize(x, 8, 16, False, 0, 0, meta_codes, meta_scales)
    with pytest.raises(ValueError, match="tensors on meta are not supported"):
        ext.quantize(x.to("meta"), 8, 16, False, 0, 0, meta_codes, meta_scales)
    with pytest.raises(ValueError, match="error_feedback and global_ share memory"):
        ext.encode_delta(x, None, x, 8, 16, False, 0, 0, codes, scales)
    with pytest.raises(ValueError, match="param and grad share memory"):
        ext.nesterov(x, torch.zeros(100), x, 0.1, 0.9)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_tensors(ext):
    x, codes, scales = (t.cuda() for t in _q_args())
    if ext.has_cuda():
        ext.quantize(x, 8, 16, False, 0, 0, codes, scales)
    else:
        with pytest.raises(RuntimeError, match="built without CUDA support"):
            ext.quantize(x, 8, 16, False, 0, 0, codes, scales)
