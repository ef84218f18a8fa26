"""hypha.ops: the reference semantics, argument checks, backend selection, and the fallback when
the extension is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from hypha import ops
from hypha.ops import _reference as R


def test_hash_tensor_form_matches_integer_form() -> None:
    # the tensor form splits the 32-bit multiplies to stay inside int64; check it on edge values
    # and random ones against plain Python integers
    vals = [0, 1, 2, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, *torch.randint(0, 2**32, (1000,)).tolist()]
    assert R.hash32(torch.tensor(vals)).tolist() == [R._hash32_int(v) for v in vals]
    assert R._hash32_int(0) == 0 and R._hash32_int(1) != 1
    assert R.seed_key(0) == R._hash32_int(R._hash32_int(0x9E3779B9))
    assert R.seed_key(2**64 - 1) != R.seed_key(2**32 - 1)
    with pytest.raises(ValueError, match="seed"):
        R.seed_key(-1)


def test_uniform_stream_is_in_range_and_offset_invariant() -> None:
    u = R.uniform(100_000, seed=5)
    assert 0.0 <= float(u.min()) and float(u.max()) < 1.0
    assert abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(R.uniform(10, 5, offset=99_990), u[99_990:])
    assert not torch.equal(R.uniform(10, 6), u[:10])


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_layout_little_end_first(bits: int) -> None:
    per = 8 // bits
    codes = torch.randint(0, 1 << bits, (37,), dtype=torch.uint8)
    packed = R.pack(codes, bits)
    assert packed.numel() == R.packed_nbytes(37, bits)
    for i in range(37):
        assert (int(packed[i // per]) >> ((i % per) * bits)) & ((1 << bits) - 1) == int(codes[i])
    if 37 % per:  # unused high bits of the last byte are zero
        assert int(packed[-1]) >> ((37 % per) * bits) == 0
    assert torch.equal(R.unpack(packed, 37, bits), codes)


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_quantize_hand_values(bits: int) -> None:
    mid = ((1 << bits) - 1) / 2
    x = torch.zeros(16)
    x[0], x[1], x[2] = 1.0, -1.0, 0.0
    q = R.quantize(x, bits, 16)
    codes = R.unpack(q.codes, 16, bits)
    assert float(q.scales[0]) == pytest.approx(1.0 / mid, rel=1e-7)
    assert int(codes[0]) == (1 << bits) - 1 and int(codes[1]) == 0
    assert int(codes[2]) == 1 << (bits - 1)  # 0 lands on the upper middle level (ties up)
    y = R.dequantize(q)
    assert float(y[0]) == pytest.approx(1.0) and float(y[1]) == pytest.approx(-1.0)


def test_zero_and_tiny_blocks_decode_to_zero() -> None:
    x = torch.zeros(64)
    x[32:] = 2.0**-125
    q = R.quantize(x, 4, 32)
    assert torch.equal(q.scales, torch.zeros(2))
    assert torch.equal(R.dequantize(q), torch.zeros(64))


def test_nan_and_inf_reach_the_scale() -> None:
    x = torch.ones(64)
    x[3] = float("nan")
    x[40] = float("inf")
    s = R.quantize(x, 8, 32).scales
    assert bool(s[0].isnan()) and bool(s[1].isinf())


@pytest.mark.parametrize("bits", [4, 2])
def test_stochastic_rounding_is_unbiased(bits: int) -> None:
    x = torch.full((64 * 2000,), 0.3)
    x[::64] = 1.0  # fixes each block's absmax at 1.0
    y = R.dequantize(R.quantize(x, bits, 64, stochastic=True, seed=11)).view(-1, 64)[:, 1:]
    assert abs(float(y.mean()) - 0.3) < 2e-3
    rtn = R.dequantize(R.quantize(x, bits, 64)).view(-1, 64)[:, 1:]
    assert abs(float(rtn.mean()) - 0.3) > abs(float(y.mean()) - 0.3)


def test_nesterov_matches_torch_sgd() -> None:
    p, m = torch.randn(1000), torch.zeros(1000)
    p_ref = p.clone().requires_grad_()
    opt = torch.optim.SGD([p_ref], lr=0.7, momentum=0.9, nesterov=True)
    for step in range(5):
        g = torch.randn(1000, generator=torch.Generator().manual_seed(step))
        ops.nesterov_(p, m, g, 0.7, 0.9, backend="reference")
        p_ref.grad = g
        opt.step()
        # torch fuses g + mu*m and p - lr*d with FMA on AVX2+ CPUs; we round each step, so the
        # two differ by a few ulps of the operands (|p|, |lr*d| ~ 1..5, ulp ~ 2.4e-7..4.8e-7)
        torch.testing.assert_close(p, p_ref.detach(), rtol=1e-6, atol=2e-6)
        torch.testing.assert_close(m, opt.state[p_ref]["momentum_buffer"], rtol=0, atol=0)


# --- the public API: argument checks and dispatch --------------------------------------------------


def test_argument_checks_say_what_is_wrong() -> None:
    x = torch.randn(100)
    with pytest.raises(ValueError, match="bits must be one of"):
        ops.quantize(x, bits=3)
    with pytest.raises(ValueError, match="power of two"):
        ops.quantize(x, block_size=100)
    with pytest.raises(TypeError, match=r"float32 tensor, got torch\.float64"):
        ops.quantize(x.double())
    with pytest.raises(TypeError, match=r"torch\.Tensor"):
        ops.quantize([1.0, 2.0])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="offset"):
        ops.quantize(x, offset=-1)
    q = ops.quantize(x, 4, 16)
    with pytest.raises(ValueError, match="acc must hold 100"):
        ops.dequantize_accumulate_(torch.zeros(99), q)
    with pytest.raises(ValueError, match="contiguous"):
        ops.dequantize_accumulate_(torch.zeros(200)[::2], q)
    with pytest.raises(ValueError, match="codes must be a uint8 tensor of 50 bytes"):
        ops.dequantize(q._replace(codes=q.codes[:-1]))
    with pytest.raises(ValueError, match="scales must be a float32 tensor of 7"):
        ops.dequantize(q._replace(scales=q.scales[:-1]))
    with pytest.raises(ValueError, match="local has 99 elements"):
        ops.encode_delta(x, torch.randn(99), None)
    with pytest.raises(ValueError, match="Invalid learning rate"):
        ops.nesterov_(torch.zeros(3), torch.zeros(3), torch.zeros(3), lr=-1.0, momentum=0.9)
    with pytest.raises(ValueError, match="Invalid momentum"):
        ops.nesterov_(torch.zeros(3), torch.zeros(3), torch.zeros(3), lr=1.0, momentum=float("nan"))


def test_backend_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    with pytest.raises(ValueError, match="unknown backend 'fast'"):
        ops.select_backend(cpu, "fast")
    with pytest.raises(RuntimeError, match="cannot run on cpu"):
        ops.select_backend(cpu, "cuda")
    monkeypatch.setenv(ops.ENV_BACKEND, "reference")
    assert ops.select_backend(cpu) == "reference"
    assert "reference" in ops.available_backends(cpu)


def test_empty_tensors() -> None:
    q = ops.quantize(torch.empty(0))
    assert q.codes.numel() == 0 and q.scales.numel() == 0
    assert ops.dequantize(q).numel() == 0
    ops.nesterov_(torch.empty(0), torch.empty(0), torch.empty(0), 0.7, 0.9)


def test_public_api_is_explicit() -> None:
    exported = {n for n in dir(ops) if not n.startswith("_")}
    assert set(ops.__all__) <= exported
    assert {"quantize", "dequantize", "dequantize_accumulate_", "encode_delta", "nesterov_"} <= set(
        ops.__all__
    )


def test_missing_extension_warns_once_and_falls_back() -> None:
    code = textwrap.dedent(
        """
        import sys, warnings
        sys.modules["hypha._C"] = None  # makes `import hypha._C` fail as if it were not built
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import hypha
            import hypha.ops as ops
            import hypha.compress
            import torch
            q = ops.quantize(torch.randn(1000), bits=4)
            assert ops.select_backend(torch.device("cpu")) == "reference"
        msgs = [str(w.message) for w in caught if "hypha._C is not built" in str(w.message)]
        assert len(msgs) == 1, msgs
        assert not hypha.extension_available()
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_import_hypha_alone_loads_the_built_extension() -> None:
    # hypha._C links against libtorch; importing hypha first (no torch yet) must still load it
    code = "import hypha; assert hypha.extension_available(), hypha._ext.extension_error(); print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_out_buffers_are_reused_and_checked(backend: str) -> None:
    x, g, local = torch.randn(1000), torch.randn(1000), torch.randn(1000)
    out = ops.quantize(torch.zeros(1000), 4, 64, backend=backend)
    q = ops.quantize(x, 4, 64, stochastic=True, seed=3, out=out, backend=backend)
    assert q.codes.data_ptr() == out.codes.data_ptr() and q.scales.data_ptr() == out.scales.data_ptr()
    fresh = ops.quantize(x, 4, 64, stochastic=True, seed=3, backend=backend)
    assert torch.equal(q.codes, fresh.codes) and torch.equal(q.scales, fresh.scales)
    ef_a, ef_b = torch.zeros(1000), torch.zeros(1000)
    a = ops.encode_delta(g, local, ef_a, 4, 64, out=out, backend=backend)
    b = ops.encode_delta(g, local, ef_b, 4, 64, backend=backend)
    assert torch.equal(a.codes, b.codes) and torch.equal(ef_a, ef_b) and a.codes is out.codes
    with pytest.raises(ValueError, match="out holds 1000 4-bit values in blocks of 64, the op produces 1000 2-bit"):
        ops.quantize(x, 2, 64, out=out, backend=backend)
    with pytest.raises(ValueError, match="codes must be a uint8 tensor"):
        ops.quantize(x, 4, 64, out=out._replace(codes=out.codes[:10]), backend=backend)
