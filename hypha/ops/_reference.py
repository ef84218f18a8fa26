"""Pure-torch reference implementations of the compression kernels.

These functions *define* what every op means; the C++ (``hypha._C``), CUDA and Triton
(``hypha.kernels``) implementations must agree with them. ``docs/kernels.md`` states the same
definitions in prose. Every floating-point step below is a single IEEE fp32 operation in a fixed
order, with no fused multiply-add, so that a compiled backend can reproduce the result bit for
bit. Where torch itself would fuse (``add(..., alpha=)`` uses FMA on AVX2 CPUs) the code is
written as separate operations on purpose.

Blockwise quantization at ``bits`` in {8, 4, 2}: with ``L = 2**bits - 1`` and ``mid = L / 2``,

* ``absmax`` of a block is the largest ``|x|`` in it (NaN if any element is NaN);
* ``scale = absmax / mid`` and ``inv = mid / absmax`` (both 0 when ``absmax < 2**-120``);
* ``code = clamp(floor(x * inv + off), 0, L)`` with ``off = 2**(bits-1)`` (round to nearest,
  ties up) or ``off = mid + u`` (stochastic, ``u`` from a counter-based hash of the seed and the
  element's index, so the result does not depend on how a tensor is split into calls);
* ``dequant(code) = (code - mid) * scale``.

Codes are packed densely, little end first: element ``i`` occupies bits
``(i % per_byte) * bits`` of byte ``i // per_byte``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

__all__ = [
    "MAX_BLOCK_SIZE",
    "MIN_BLOCK_SIZE",
    "SUPPORTED_BITS",
    "TINY_ABSMAX",
    "QTensor",
    "check_quant_args",
    "dequantize",
    "dequantize_accumulate_",
    "encode_delta",
    "hash32",
    "nesterov_",
    "num_blocks",
    "pack",
    "packed_nbytes",
    "quantize",
    "seed_key",
    "uniform",
    "unpack",
]

#: Blocks whose absmax is below this are treated as all-zero: ``mid / absmax`` would overflow.
TINY_ABSMAX = 2.0**-120
SUPPORTED_BITS = (8, 4, 2)
MIN_BLOCK_SIZE = 16
MAX_BLOCK_SIZE = 4096

_M32 = 0xFFFFFFFF


class QTensor(NamedTuple):
    """A blockwise-quantized flat tensor: packed codes plus one fp32 scale per block."""

    codes: torch.Tensor  # uint8, packed_nbytes(numel, bits) bytes
    scales: torch.Tensor  # float32, num_blocks(numel, block_size) values
    numel: int
    bits: int
    block_size: int


def check_quant_args(bits: int, block_size: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits!r}")
    if (
        not isinstance(block_size, int)
        or block_size < MIN_BLOCK_SIZE
        or block_size > MAX_BLOCK_SIZE
        or block_size & (block_size - 1)
    ):
        raise ValueError(
            f"block_size must be a power of two in [{MIN_BLOCK_SIZE}, {MAX_BLOCK_SIZE}], "
            f"got {block_size!r}"
        )


def packed_nbytes(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def num_blocks(numel: int, block_size: int) -> int:
    return (numel + block_size - 1) // block_size


def _levels(bits: int) -> int:
    return (1 << bits) - 1


def _mid(bits: int) -> float:
    return _levels(bits) / 2.0


# --- the counter-based random stream used by stochastic rounding -------------------------------


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 ``x`` in [0, 2**32), without int64 overflow."""
    lo = x * (c & 0xFFFF)
    hi = ((x * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & _M32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash (C. Wellons) on int64 tensors holding uint32 values."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def _hash32_int(x: int) -> int:
    x &= _M32
    x ^= x >> 16
    x = (x * 0x7FEB352D) & _M32
    x ^= x >> 15
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def seed_key(seed: int) -> int:
    """Mixes a 64-bit seed into the 32-bit key of the random stream."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed!r}")
    return _hash32_int((seed & _M32) ^ _hash32_int((seed >> 32) ^ 0x9E3779B9))


def uniform(numel: int, seed: int, offset: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """u_i in [0, 1) for elements offset .. offset+numel-1: (hash32((idx mod 2**32) ^ key) >> 8) * 2**-24."""
    key = seed_key(seed)
    idx = (torch.arange(numel, dtype=torch.int64, device=device) + (offset & _M32)) & _M32
    h = hash32(idx ^ key)
    return (h >> 8).to(torch.float32) * (2.0**-24)


# --- packing ------------------------------------------------------------------------------------


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Packs uint8 codes (each < 2**bits) densely; the last byte's unused bits are zero."""
    if bits == 8:
        return codes.to(torch.uint8).clone()
    per = 8 // bits
    n = codes.numel()
    padded = torch.zeros(math.ceil(n / per) * per, dtype=torch.int32, device=codes.device)
    padded[:n] = codes.reshape(-1).to(torch.int32)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (padded.view(-1, per) << shifts).sum(dim=1).to(torch.uint8)


def unpack(packed: torch.Tensor, numel: int, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed[:numel].clone()
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.int32, device=packed.device) * bits
    codes = (packed.to(torch.int32).view(-1, 1) >> shifts) & _levels(bits)
    return codes.reshape(-1)[:numel].to(torch.uint8)


# --- ops ----------------------------------------------------------------------------------------


def _blocks(x: torch.Tensor, block_size: int) -> torch.Tensor:
    """Flat fp32 view padded with zeros to a whole number of blocks, shaped (blocks, block_size)."""
    n = x.numel()
    nb = num_blocks(n, block_size)
    flat = x.reshape(-1).to(torch.float32)
    if nb * block_size != n:
        flat = torch.cat([flat, flat.new_zeros(nb * block_size - n)])
    return flat.view(nb, block_size)


def quantize(
    x: torch.Tensor,
    bits: int,
    block_size: int,
    *,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> QTensor:
    """Blockwise absmax quantization of ``x`` (flattened) to packed ``bits``-bit codes."""
    check_quant_args(bits, block_size)
    n = x.numel()
    levels, mid = _levels(bits), _mid(bits)
    xb = _blocks(x, block_size)
    absmax = xb.abs().amax(dim=1) if n else xb.new_zeros(0)
    tiny = absmax < TINY_ABSMAX
    zero = torch.zeros_like(absmax)
    # NOTE: torch.full_like(...) / absmax, not `mid / absmax`: a Python scalar divided by a
    # tensor is computed as reciprocal() * scalar in torch, which rounds twice.
    scale = torch.where(tiny, zero, absmax / mid)
    inv = torch.where(tiny, zero, torch.full_like(absmax, mid) / absmax)
    t = xb * inv[:, None]
    if stochastic:
        u = uniform(xb.numel(), seed, offset, device=x.device).view_as(xb)
        t = t + (torch.full_like(u, mid) + u)
    else:
        t = t + float(1 << (bits - 1))
    t = torch.nan_to_num(torch.floor(t), nan=0.0, posinf=float(levels), neginf=0.0)
    codes = t.clamp_(0, levels).to(torch.uint8).reshape(-1)[:n]
    return QTensor(pack(codes, bits), scale, n, bits, block_size)


def dequantize(q: QTensor) -> torch.Tensor:
    """(code - mid) * scale for every element, as a flat fp32 tensor of q.numel values."""
    check_quant_args(q.bits, q.block_size)
    codes = unpack(q.codes, q.numel, q.bits).to(torch.float32)
    scales = q.scales.repeat_interleave(q.block_size)[: q.numel]
    return (codes - _mid(q.bits)) * scales


def dequantize_accumulate_(acc: torch.Tensor, q: QTensor) -> torch.Tensor:
    """acc += dequant(q), in place, acc a float32 tensor of q.numel elements.

    To subtract a quantized update exactly (x - v), pass a QTensor with negated scales:
    (c - mid) * (-s) is exactly -((c - mid) * s) in IEEE arithmetic.
    """
    flat = acc.view(-1)
    flat.add_(dequantize(q))
    return acc


def encode_delta(
    global_: torch.Tensor,
    local: torch.Tensor | None,
    error_feedback: torch.Tensor | None,
    bits: int,
    block_size: int,
    *,
    stochastic: bool = False,
    seed: int = 0,
    offset: int = 0,
) -> QTensor:
    """The fused pseudo-gradient encode: delta = (global - local) + ef; q = quantize(delta);
    ef <- delta - dequant(q) (in place). ``local`` None means delta = global + ef; ``error_feedback``
    None means no error feedback."""
    delta = global_.reshape(-1).to(torch.float32)
    delta = delta - local.reshape(-1).to(torch.float32) if local is not None else delta.clone()
    if error_feedback is not None:
        delta = delta + error_feedback.reshape(-1)
    q = quantize(delta, bits, block_size, stochastic=stochastic, seed=seed, offset=offset)
    if error_feedback is not None:
        error_feedback.view(-1).copy_(delta - dequantize(q))
    return q


def nesterov_(
    param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, mu: float
) -> None:
    """The outer Nesterov step, in place; the same update as torch.optim.SGD(nesterov=True):

    m <- mu * m + g;  p <- p - lr * (g + mu * m)

    ``lr`` and ``mu`` are rounded to fp32 first; each product and sum is rounded separately.
    """
    lr32 = float(torch.tensor(lr, dtype=torch.float32))
    mu32 = float(torch.tensor(mu, dtype=torch.float32))
    m = momentum.view(-1)
    g = grad.reshape(-1)
    m.mul_(mu32).add_(g)
    d = g + m * mu32
    param.view(-1).sub_(d * lr32)
