"""Compression kernels with one API over four implementations.

Every op has a pure-torch reference (``hypha.ops._reference``) that defines it, a C++ CPU kernel
and a CUDA kernel in the compiled extension ``hypha._C``, and a Triton kernel in
``hypha.kernels``. The public functions here check arguments, allocate outputs and dispatch:

* CPU tensors run the C++ kernels (the reference when the extension is not built);
* CUDA tensors run the CUDA kernels when the extension was built with CUDA, else Triton, else the
  reference.

``backend=`` (or the ``HYPHA_BACKEND`` environment variable) forces one of ``"reference"``,
``"cpp"``, ``"cuda"`` or ``"triton"``; an explicit argument wins over the environment.
"""

from __future__ import annotations

import os
from types import ModuleType
from typing import Any

import torch

from hypha._ext import extension
from hypha.ops import _reference as reference
from hypha.ops._reference import (
    MAX_BLOCK_SIZE,
    MIN_BLOCK_SIZE,
    SUPPORTED_BITS,
    QTensor,
    check_quant_args,
    num_blocks,
    packed_nbytes,
    seed_key,
)

__all__ = [
    "BACKENDS",
    "DEFAULT_BLOCK_SIZE",
    "ENV_BACKEND",
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "SUPPORTED_BITS",
    "QTensor",
    "available_backends",
    "dequantize",
    "dequantize_accumulate_",
    "encode_delta",
    "nesterov_",
    "num_blocks",
    "packed_nbytes",
    "quantize",
    "reference",
    "select_backend",
]

#: Environment variable that forces a backend for every op.
ENV_BACKEND = "HYPHA_BACKEND"
BACKENDS = ("reference", "cpp", "cuda", "triton")

#: Elements per fp32 scale, chosen by the sweep in bench/blocksize.py on a real pseudo-gradient
#: (bench/results/blocksize.md): 128 minimises error-dB + (dB per bit) x bits/param at 8, 4 and
#: 2 bits alike; 64 costs 0.25 bit more per value, 256 loses 0.8-0.9 dB.
DEFAULT_BLOCK_SIZE = 128

_triton_module: ModuleType | None = None
_triton_error: str | None = None


def _triton() -> ModuleType | None:
    """hypha.kernels, imported on first use (importing triton costs ~1 s)."""
    global _triton_module, _triton_error
    if _triton_module is None and _triton_error is None:
        try:
            import hypha.kernels as mod
        except ImportError as exc:
            _triton_error = str(exc)
        else:
            _triton_module = mod
    return _triton_module


def _triton_runs_on(device: torch.device) -> bool:
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """The backends that can run ops on tensors of ``device`` in this process."""
    device = torch.device(device)
    ext = extension()
    names = ["reference"]
    if device.type == "cpu" and ext is not None:
        names.append("cpp")
    if device.type == "cuda" and ext is not None and ext.has_cuda():
        names.append("cuda")
    if _triton_runs_on(device) and _triton() is not None:
        names.append("triton")
    return names


def select_backend(device: torch.device, backend: str | None = None) -> str:
    """The backend an op on ``device`` uses: explicit argument, then HYPHA_BACKEND, then auto."""
    requested = backend or os.environ.get(ENV_BACKEND) or None
    if requested is not None:
        if requested not in BACKENDS:
            raise ValueError(f"unknown backend {requested!r}; expected one of {BACKENDS}")
        if requested not in available_backends(device):
            raise RuntimeError(
                f"backend {requested!r} cannot run on {device.type} tensors here; available: "
                f"{available_backends(device)}"
            )
        return requested
    ext = extension()
    if device.type == "cpu":
        return "cpp" if ext is not None else "reference"
    if device.type == "cuda":
        if ext is not None and ext.has_cuda():
            return "cuda"
        if _triton() is not None:
            return "triton"
    return "reference"


def _impl(name: str) -> Any:
    if name in ("cpp", "cuda"):
        return extension()
    if name == "triton":
        return _triton()
    raise AssertionError(name)


# --- argument checks ----------------------------------------------------------------------------


def _check_f32(name: str, t: torch.Tensor, *, writable: bool = False) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.float32:
        raise TypeError(f"{name} must be a float32 tensor, got {t.dtype}")
    if writable and not t.is_contiguous():
        raise ValueError(f"{name} is updated in place and must be contiguous")


def _same(name: str, t: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if t.numel() != ref.numel():
        raise ValueError(f"{name} has {t.numel()} elements but {ref_name} has {ref.numel()}")
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")


def _check_q(q: QTensor) -> None:
    check_quant_args(q.bits, q.block_size)
    if q.codes.dtype != torch.uint8 or q.codes.numel() != packed_nbytes(q.numel, q.bits):
        raise ValueError(
            f"codes must be a uint8 tensor of {packed_nbytes(q.numel, q.bits)} bytes for "
            f"{q.numel} {q.bits}-bit values, got {q.codes.dtype} with {q.codes.numel()}"
        )
    if q.scales.dtype != torch.float32 or q.scales.numel() != num_blocks(q.numel, q.block_size):
        raise ValueError(
            f"scales must be a float32 tensor of {num_blocks(q.numel, q.block_size)} values, got "
            f"{q.scales.dtype} with {q.scales.numel()}"
        )
    if q.codes.device != q.scales.device:
        raise ValueError(f"codes are on {q.codes.device} but scales on {q.scales.device}")


def _check_seed(seed: int, offset: int) -> None:
    if not 0 <= offset < 2**64:
        raise ValueError(f"offset must be in [0, 2**64), got {offset!r}")
    seed_key(seed)  # validates the range


def _out_q(
    out: QTensor | None, numel: int, bits: int, block_size: int, device: torch.device
) -> QTensor:
    """``out`` checked against what the op produces, or freshly allocated outputs."""
    if out is None:
        return QTensor(
            torch.empty(packed_nbytes(numel, bits), dtype=torch.uint8, device=device),
            torch.empty(num_blocks(numel, block_size), dtype=torch.float32, device=device),
            numel,
            bits,
            block_size,
        )
    if (out.numel, out.bits, out.block_size) != (numel, bits, block_size):
        raise ValueError(
            f"out holds {out.numel} {out.bits}-bit values in blocks of {out.block_size}, the op "
            f"produces {numel} {bits}-bit values in blocks of {block_size}"
        )
    _check_q(out)
    if out.codes.device != device or not (out.codes.is_contiguous() and out.scales.is_contiguous()):
        raise ValueError(f"out must be contiguous tensors on {device}")
    return out


def _copy_q(src: QTensor, dst: QTensor) -> QTensor:
    dst.codes.copy_(src.codes)
    dst.scales.copy_(src.scales)
    return dst


# --- public ops ---------------------------------------------------------------------------------


def quantize(
    x: torch.Tensor,
    bits: int = 8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
    out: QTensor | None = None,
    backend: str | None = None,
) -> QTensor:
    """Blockwise absmax quantization of the flattened float32 ``x`` to packed ``bits``-bit codes.

    ``stochastic=True`` rounds up with probability equal to the fractional part (unbiased),
    drawing from a counter-based stream keyed by ``seed``; element ``i`` uses stream index
    ``offset + i``, so quantizing a tensor in slices (with matching offsets) gives the same codes
    as quantizing it whole.

    ``out`` receives the result when given (a QTensor of matching numel, bits and block size,
    e.g. from an earlier call): reusing buffers avoids allocating, and first touching, fresh
    output pages on every call, which costs more than the kernel itself for large tensors.
    """
    check_quant_args(bits, block_size)
    _check_f32("x", x)
    _check_seed(seed, offset)
    name = select_backend(x.device, backend)
    q = _out_q(out, x.numel(), bits, block_size, x.device)
    if name == "reference":
        r = reference.quantize(
            x, bits, block_size, stochastic=stochastic, seed=seed, offset=offset
        )
        return r if out is None else _copy_q(r, q)
    if x.numel():
        _impl(name).quantize(
            x.contiguous(), bits, block_size, stochastic, seed_key(seed), offset, q.codes, q.scales
        )
    return q


def dequantize(
    q: QTensor, *, out: torch.Tensor | None = None, backend: str | None = None
) -> torch.Tensor:
    """(code - mid) * scale for every element: a flat float32 tensor of ``q.numel`` values."""
    _check_q(q)
    if out is None:
        out = torch.empty(q.numel, dtype=torch.float32, device=q.codes.device)
    _check_f32("out", out, writable=True)
    if out.numel() != q.numel or out.device != q.codes.device:
        raise ValueError(
            f"out must hold {q.numel} elements on {q.codes.device}, got {out.numel()} on "
            f"{out.device}"
        )
    name = select_backend(out.device, backend)
    if name == "reference":
        out.view(-1).copy_(reference.dequantize(q))
    elif q.numel:
        _impl(name).dequantize(q.codes, q.scales, q.numel, q.bits, q.block_size, out)
    return out


def dequantize_accumulate_(
    acc: torch.Tensor, q: QTensor, *, backend: str | None = None
) -> torch.Tensor:
    """acc += dequant(q) in place; what the aggregator runs on each chunk as it arrives."""
    _check_q(q)
    _check_f32("acc", acc, writable=True)
    if acc.numel() != q.numel or acc.device != q.codes.device:
        raise ValueError(
            f"acc must hold {q.numel} elements on {q.codes.device}, got {acc.numel()} on "
            f"{acc.device}"
        )
    name = select_backend(acc.device, backend)
    if name == "reference":
        reference.dequantize_accumulate_(acc, q)
    elif q.numel:
        _impl(name).dequantize_accumulate(q.codes, q.scales, q.numel, q.bits, q.block_size, acc)
    return acc


def encode_delta(
    global_: torch.Tensor,
    local: torch.Tensor | None,
    error_feedback: torch.Tensor | None,
    bits: int = 8,
    block_size: int = DEFAULT_BLOCK_SIZE,
    *,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
    out: QTensor | None = None,
    backend: str | None = None,
) -> QTensor:
    """The fused pseudo-gradient encode, one read of each input:

    delta = (global - local) + error_feedback;  q = quantize(delta);
    error_feedback <- delta - dequant(q)  (in place)

    ``local=None`` encodes ``global + error_feedback``; ``error_feedback=None`` turns error
    feedback off. ``out`` receives the result when given, as in :func:`quantize`.
    """
    check_quant_args(bits, block_size)
    _check_f32("global_", global_)
    _check_seed(seed, offset)
    if local is not None:
        _check_f32("local", local)
        _same("local", local, "global_", global_)
    if error_feedback is not None:
        _check_f32("error_feedback", error_feedback, writable=True)
        _same("error_feedback", error_feedback, "global_", global_)
    name = select_backend(global_.device, backend)
    q = _out_q(out, global_.numel(), bits, block_size, global_.device)
    if name == "reference":
        r = reference.encode_delta(
            global_,
            local,
            error_feedback,
            bits,
            block_size,
            stochastic=stochastic,
            seed=seed,
            offset=offset,
        )
        return r if out is None else _copy_q(r, q)
    if global_.numel():
        _impl(name).encode_delta(
            global_.contiguous(),
            None if local is None else local.contiguous(),
            error_feedback,
            bits,
            block_size,
            stochastic,
            seed_key(seed),
            offset,
            q.codes,
            q.scales,
        )
    return q


def nesterov_(
    param: torch.Tensor,
    momentum_buffer: torch.Tensor,
    grad: torch.Tensor,
    lr: float,
    momentum: float,
    *,
    backend: str | None = None,
) -> None:
    """The fused outer Nesterov step, in place, as torch.optim.SGD(nesterov=True) defines it:

    m <- momentum * m + g;  p <- p - lr * (g + momentum * m)
    """
    _check_f32("param", param, writable=True)
    _check_f32("momentum_buffer", momentum_buffer, writable=True)
    _check_f32("grad", grad)
    _same("momentum_buffer", momentum_buffer, "param", param)
    _same("grad", grad, "param", param)
    if not (lr >= 0.0 and lr < float("inf")):
        raise ValueError(f"Invalid learning rate: {lr}")
    if not (momentum >= 0.0 and momentum < float("inf")):
        raise ValueError(f"Invalid momentum value: {momentum}")
    name = select_backend(param.device, backend)
    if name == "reference":
        reference.nesterov_(param, momentum_buffer, grad, lr, momentum)
    elif param.numel():
        _impl(name).nesterov(param, momentum_buffer, grad.contiguous(), float(lr), float(momentum))
