"""Blockwise absmax quantization in Triton: quantize, dequantize, dequantize_accumulate and the
fused pseudo-gradient encode (encode_delta).

``hypha.ops._reference`` defines every op bit for bit; these kernels reproduce it:

* absmax is an integer max over ``bits(x) & 0x7fffffff``, which orders non-negative floats like
  their values and puts every NaN above +Inf, so a NaN propagates as in ``torch.amax``;
* ``scale = absmax / mid`` and ``inv = mid / absmax`` use ``div_rn`` (IEEE division; plain ``/``
  on fp32 lowers to an approximate division on NVIDIA GPUs), both 0 when absmax < 2**-120;
* ``t = x * inv`` then ``t + off``, never fused (see ``_launch.FP_OPTIONS``);
* the stochastic offset is ``mid + u`` with ``u = (lowbias32((offset + i) ^ key) >> 8) * 2**-24``
  computed in uint32 arithmetic, ``i`` the element's index within the call.

Tiling. Quantize/encode: one program owns ``ROWS`` whole quantization blocks, a (ROWS, BLOCK)
tile of ``_ENCODE_TILE`` elements (16 KB of fp32 per input tensor, up to 64 KB moved with local
and error feedback), reduces absmax along axis 1, and packs ``PER = 8 // BITS`` codes per byte by
reshaping the codes to (ROWS, BLOCK // PER, PER), shifting and summing the last axis. Dequantize:
a (ROWS, BLOCK) tile of ``_DECODE_TILE`` elements (32 KB of fp32 out), one scale per row, each
element reading its byte at ``i // PER``. Offsets are int64 so tensors past 2**31 elements work.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import (
    as_i32,
    cdiv,
    check_tensors,
    launch,
    num_warps_for,
    rows_per_program,
)

__all__ = ["dequantize", "dequantize_accumulate", "encode_delta", "quantize"]

#: Elements per quantize/encode program (a power of two >= the largest block size, 4096).
_ENCODE_TILE = 4096
#: Elements per dequantize program.
_DECODE_TILE = 8192

#: Blocks with absmax below this are all-zero (``mid / absmax`` would overflow).
_TINY_ABSMAX = tl.constexpr(2.0**-120)
#: u = (h >> 8) * 2**-24 is exact in fp32.
_INV_2_24 = tl.constexpr(2.0**-24)


def _constants(bits: int) -> dict[str, float | int]:
    levels = (1 << bits) - 1
    return {
        "BITS": bits,
        "PER": 8 // bits,
        "LEVELS": levels,
        "MID": levels / 2.0,  # exact in fp32: 127.5, 7.5, 1.5
        "RTN_OFF": float(1 << (bits - 1)),
    }


@triton.jit
def _lowbias32(x):
    """The lowbias32 hash on uint32 values (wrapping multiplies, logical shifts)."""
    x = x ^ (x >> 16)
    x = x * tl.full(x.shape, 0x7FEB352D, tl.uint32)
    x = x ^ (x >> 15)
    x = x * tl.full(x.shape, 0x846CA68B, tl.uint32)
    x = x ^ (x >> 16)
    return x


@triton.jit(do_not_specialize=["key", "offset"])
def _encode_kernel(
    g_ptr,
    l_ptr,
    ef_ptr,
    codes_ptr,
    scales_ptr,
    n,
    nbytes,
    key,
    offset,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    LEVELS: tl.constexpr,
    MID: tl.constexpr,
    RTN_OFF: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    HAS_LOCAL: tl.constexpr,
    HAS_EF: tl.constexpr,
    STOCHASTIC: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)  # int64 block indices
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * BLOCK + cols[None, :]  # int64 element indices
    mask = offs < n

    # delta = (g - l) + ef; padding is 0 and so adds 0 to absmax.
    x = tl.load(g_ptr + offs, mask=mask, other=0.0)
    if HAS_LOCAL:
        x = x - tl.load(l_ptr + offs, mask=mask, other=0.0)
    if HAS_EF:
        x = x + tl.load(ef_ptr + offs, mask=mask, other=0.0)

    # absmax over the int32 pattern: orders |x| and puts NaN above Inf.
    mag = x.to(tl.int32, bitcast=True) & 0x7FFFFFFF
    absmax = tl.max(mag, axis=1).to(tl.float32, bitcast=True)
    tiny = absmax < _TINY_ABSMAX  # NaN compares False and propagates
    scale = tl.where(tiny, 0.0, tl.math.div_rn(absmax, tl.full((ROWS,), MID, tl.float32)))
    safe = tl.where(tiny, 1.0, absmax)  # no division by zero in the discarded lanes
    inv = tl.where(tiny, 0.0, tl.math.div_rn(tl.full((ROWS,), MID, tl.float32), safe))

    t = x * inv[:, None]
    if STOCHASTIC:
        idx = offs.to(tl.uint32) + offset.to(tl.uint32, bitcast=True)  # (offset + i) mod 2**32
        h = _lowbias32(idx ^ key.to(tl.uint32, bitcast=True))
        u = (h >> 8).to(tl.float32) * _INV_2_24
        t = t + (MID + u)
    else:
        t = t + RTN_OFF
    c = tl.floor(t)
    c = tl.where(t == t, c, 0.0)  # NaN -> 0
    c = tl.minimum(tl.maximum(c, 0.0), LEVELS)  # +-Inf clamp to L / 0
    q = tl.where(mask, c.to(tl.int32), 0)  # padding packs as 0 bits

    tl.store(scales_ptr + rows, scale, mask=rows * BLOCK < n)
    if PER == 1:
        tl.store(codes_ptr + offs, q.to(tl.uint8), mask=mask)
    else:
        q3 = tl.reshape(q, (ROWS, BLOCK // PER, PER), can_reorder=False)
        shifts = tl.arange(0, PER) * BITS
        packed = tl.sum(q3 << shifts[None, None, :], axis=2)
        boffs = rows[:, None] * (BLOCK // PER) + tl.arange(0, BLOCK // PER)[None, :]
        tl.store(codes_ptr + boffs, packed.to(tl.uint8), mask=boffs < nbytes)

    if HAS_EF:
        deq = (c.to(tl.float32) - MID) * scale[:, None]
        tl.store(ef_ptr + offs, x - deq, mask=mask)


@triton.jit
def _decode_kernel(
    codes_ptr,
    scales_ptr,
    out_ptr,
    n,
    BITS: tl.constexpr,
    PER: tl.constexpr,
    LEVELS: tl.constexpr,
    MID: tl.constexpr,
    BLOCK: tl.constexpr,
    ROWS: tl.constexpr,
    ACCUMULATE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    offs = rows[:, None] * BLOCK + cols[None, :]
    mask = offs < n

    scale = tl.load(scales_ptr + rows, mask=rows * BLOCK < n, other=0.0)
    if PER == 1:
        c = tl.load(codes_ptr + offs, mask=mask, other=0).to(tl.int32)
    else:
        byte = tl.load(codes_ptr + offs // PER, mask=mask, other=0).to(tl.int32)
        c = (byte >> ((cols % PER) * BITS)[None, :]) & LEVELS
    v = (c.to(tl.float32) - MID) * scale[:, None]
    if ACCUMULATE:
        v = tl.load(out_ptr + offs, mask=mask, other=0.0) + v
    tl.store(out_ptr + offs, v, mask=mask)


# --- launchers ----------------------------------------------------------------------------------


def _encode(
    g: torch.Tensor,
    local: torch.Tensor | None,
    ef: torch.Tensor | None,
    bits: int,
    block_size: int,
    stochastic: bool,
    key: int,
    offset: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    device = check_tensors(x=g, local=local, error_feedback=ef, codes=codes, scales=scales)
    n = g.numel()
    if n == 0:
        return
    rows = rows_per_program(block_size, _ENCODE_TILE)
    launch(
        _encode_kernel,
        cdiv(n, rows * block_size),
        device,
        g,
        g if local is None else local,  # unused when HAS_LOCAL is False
        g if ef is None else ef,  # unused when HAS_EF is False
        codes,
        scales,
        n,
        codes.numel(),
        as_i32(key),
        as_i32(offset),
        num_warps=num_warps_for(rows * block_size),
        BLOCK=block_size,
        ROWS=rows,
        HAS_LOCAL=local is not None,
        HAS_EF=ef is not None,
        STOCHASTIC=bool(stochastic),
        **_constants(bits),
    )


def _decode(
    codes: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    bits: int,
    block_size: int,
    out: torch.Tensor,
    accumulate: bool,
) -> None:
    device = check_tensors(codes=codes, scales=scales, out=out)
    if numel == 0:
        return
    rows = rows_per_program(block_size, _DECODE_TILE)
    consts = _constants(bits)
    del consts["RTN_OFF"]
    launch(
        _decode_kernel,
        cdiv(numel, rows * block_size),
        device,
        codes,
        scales,
        out,
        numel,
        num_warps=num_warps_for(rows * block_size),
        BLOCK=block_size,
        ROWS=rows,
        ACCUMULATE=accumulate,
        **consts,
    )


# --- public API (the low-level signatures hypha.ops dispatches to) ------------------------------


def quantize(
    x: torch.Tensor,
    bits: int,
    block_size: int,
    stochastic: bool,
    key: int,
    offset: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """Quantizes the flat float32 ``x`` into the preallocated ``codes`` (uint8, packed) and
    ``scales`` (float32, one per block). ``key`` is the uint32 stream key, ``offset`` the
    stream index of element 0 (only its low 32 bits matter)."""
    _encode(x, None, None, bits, block_size, stochastic, key, offset, codes, scales)


def dequantize(
    codes: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    bits: int,
    block_size: int,
    out: torch.Tensor,
) -> None:
    """out[i] = (code_i - mid) * scale_{i // block_size} for the first ``numel`` elements."""
    _decode(codes, scales, numel, bits, block_size, out, accumulate=False)


def dequantize_accumulate(
    codes: torch.Tensor,
    scales: torch.Tensor,
    numel: int,
    bits: int,
    block_size: int,
    acc: torch.Tensor,
) -> None:
    """acc[i] = acc[i] + (code_i - mid) * scale_{i // block_size}, in place."""
    _decode(codes, scales, numel, bits, block_size, acc, accumulate=True)


def encode_delta(
    global_: torch.Tensor,
    local: torch.Tensor | None,
    ef: torch.Tensor | None,
    bits: int,
    block_size: int,
    stochastic: bool,
    key: int,
    offset: int,
    codes: torch.Tensor,
    scales: torch.Tensor,
) -> None:
    """delta = (global - local) + ef; quantize(delta) into ``codes``/``scales``;
    ef <- delta - dequant (in place). ``local`` None: delta = global + ef; ``ef`` None: no error
    feedback."""
    _encode(global_, local, ef, bits, block_size, stochastic, key, offset, codes, scales)
