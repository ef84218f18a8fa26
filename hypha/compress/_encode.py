"""Encoding tensors (and fused pseudo-gradients) into the chunked wire format."""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from hypha import ops
from hypha.compress._errors import NonFiniteError
from hypha.compress._format import (
    CHUNK,
    DEFAULT_CHUNK_ELEMS,
    DTYPE_CODES,
    Codec,
    Header,
    TensorInfo,
    parse_codec,
)

__all__ = ["DeltaWriter", "encode", "encode_delta", "iter_encode", "iter_encode_delta"]

_GOLDEN64 = 0x9E3779B97F4A7C15


def tensor_seed(seed: int, index: int) -> int:
    """The stochastic-rounding seed of tensor ``index``: tensors get independent streams."""
    return (seed + (index + 1) * _GOLDEN64) % 2**64


def _check_chunk_elems(chunk_elems: int, spec: Codec) -> None:
    if not isinstance(chunk_elems, int) or chunk_elems < 1 or chunk_elems > 1 << 24:
        raise ValueError(f"chunk_elems must be an int in [1, 2**24], got {chunk_elems!r}")
    if spec.quantized and chunk_elems % spec.block_size:
        raise ValueError(
            f"chunk_elems ({chunk_elems}) must be a multiple of the block size ({spec.block_size})"
        )


def _info(name: str, t: torch.Tensor) -> TensorInfo:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in DTYPE_CODES:
        raise TypeError(
            f"{name} has dtype {t.dtype}; the codec carries float32, float16 and bfloat16 tensors"
        )
    return TensorInfo(t.dtype, tuple(t.shape))


def all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` holds no NaN/Inf (used by hypha.optim too)."""
    # A sum is a pure streaming read; only when it is not finite (a non-finite element, or an
    # overflow of the sum itself) do we pay for the exact elementwise check.
    if t.numel() == 0 or bool(torch.isfinite(t.sum(dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())


def _nonfinite(name: str, t: torch.Tensor) -> NonFiniteError:
    bad = (~torch.isfinite(t.reshape(-1))).nonzero()
    first = int(bad[0]) if bad.numel() else -1
    return NonFiniteError(
        f"{name} holds {bad.numel()} NaN/Inf values (first at flat index {first}); refusing to "
        "encode. Check the training run for divergence, or pass allow_nonfinite=True with the "
        "fp32/bf16 codecs to send them as they are."
    )


class _Framer:
    """Turns chunk bodies into framed, checksummed, optionally zstd-compressed chunks."""

    def __init__(self, spec: Codec) -> None:
        self._zstd = None
        if spec.zstd_level is not None:
            import zstandard

            self._zstd = zstandard.ZstdCompressor(level=spec.zstd_level, write_content_size=True)

    def frame(self, tensor: int, index: int, parts: Sequence[bytes | memoryview]) -> bytes:
        body: bytes | memoryview
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        if self._zstd is not None:
            body = self._zstd.compress(body)
        return CHUNK.pack(tensor, index, len(body), zlib.crc32(body)) + body


def _raw_parts(piece: torch.Tensor, codec: str) -> list[memoryview]:
    dtype = torch.float32 if codec == "fp32" else torch.bfloat16
    values = piece.to(dtype).cpu().contiguous()
    if dtype == torch.bfloat16:
        values = values.view(torch.int16)
    return [values.numpy().view(np.uint8).data]


def _q_parts(q: ops.QTensor) -> list[memoryview]:
    scales = q.scales.cpu()
    codes = q.codes.cpu()
    return [scales.numpy().view(np.uint8).data, codes.numpy().data]


def _check_scales(q: ops.QTensor, name: str, start: int) -> None:
    if q.numel and not bool(torch.isfinite(q.scales).all()):
        block = int((~torch.isfinite(q.scales)).nonzero()[0])
        raise NonFiniteError(
            f"{name} holds NaN/Inf in elements {start + block * q.block_size}.."
            f"{start + (block + 1) * q.block_size - 1}; refusing to encode"
        )


def iter_encode(
    tensors: Sequence[torch.Tensor],
    codec: str | Codec = "int8",
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
    allow_nonfinite: bool = False,
    backend: str | None = None,
) -> Iterator[bytes]:
    """Yields the payload piece by piece: the header, then one framed chunk at a time, so a
    sender can put bytes on the wire while the next chunk is being quantized."""
    spec = parse_codec(codec)
    _check_chunk_elems(chunk_elems, spec)
    tensors = list(tensors)
    infos = tuple(_info(f"tensors[{i}]", t) for i, t in enumerate(tensors))
    if allow_nonfinite and spec.quantized:
        raise ValueError(f"{spec.name} cannot represent NaN/Inf; allow_nonfinite needs fp32/bf16")
    header = Header(
        codec=spec.name,
        zstd=spec.zstd_level is not None,
        stochastic=spec.stochastic,
        block_size=spec.block_size if spec.quantized else 0,
        chunk_elems=chunk_elems,
        tensors=infos,
    )
    yield header.pack()
    framer = _Framer(spec)
    for ti, t in enumerate(tensors):
        flat = t.detach().reshape(-1)
        name = f"tensors[{ti}]"
        for ci, start in enumerate(range(0, flat.numel(), chunk_elems)):
            piece = flat[start : start + chunk_elems]
            if spec.quantized:
                q = ops.quantize(
                    piece.to(torch.float32),
                    spec.bits,
                    spec.block_size,
                    stochastic=spec.stochastic,
                    seed=tensor_seed(seed, ti),
                    offset=start,
                    backend=backend,
                )
                _check_scales(q, name, start)
                parts = _q_parts(q)
            else:
                if not allow_nonfinite and not all_finite(piece):
                    raise _nonfinite(name, flat)
                parts = _raw_parts(piece, spec.name)
            yield framer.frame(ti, ci, parts)


def encode(
    tensors: Sequence[torch.Tensor],
    codec: str | Codec = "int8",
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
    allow_nonfinite: bool = False,
    backend: str | None = None,
) -> bytes:
    """Encodes ``tensors`` (float32/float16/bfloat16, any shape, CPU or CUDA) into one payload.

    ``codec`` is ``"fp32"`` (lossless), ``"bf16"``, ``"int8"``, ``"int4"`` or ``"int2"``,
    optionally with ``"+zstd"``; or a :class:`Codec`. NaN/Inf raise :class:`NonFiniteError`.
    """
    return b"".join(
        iter_encode(
            tensors,
            codec,
            chunk_elems=chunk_elems,
            seed=seed,
            allow_nonfinite=allow_nonfinite,
            backend=backend,
        )
    )


def iter_encode_delta(
    globals_: Sequence[torch.Tensor],
    locals_: Sequence[torch.Tensor],
    error_feedback: Sequence[torch.Tensor] | None,
    codec: str | Codec = "int8",
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
    check_finite: bool = True,
    backend: str | None = None,
) -> Iterator[bytes]:
    """Encodes the pseudo-gradients ``global - local + error_feedback`` with the fused kernel,
    updating ``error_feedback`` in place to what the quantizer left behind.

    ``globals_`` and ``error_feedback`` are float32; ``locals_`` may be any float dtype (it is
    read chunk by chunk). With ``check_finite`` (the default) every input is checked before any
    error feedback is touched, so a NaN raises :class:`NonFiniteError` and changes nothing.
    The payload's tensors are float32 with the shapes of ``globals_``.
    """
    spec = parse_codec(codec)
    _check_chunk_elems(chunk_elems, spec)
    globals_, locals_ = list(globals_), list(locals_)
    efs = list(error_feedback) if error_feedback is not None else None
    if len(locals_) != len(globals_) or (efs is not None and len(efs) != len(globals_)):
        raise ValueError(
            f"got {len(globals_)} global, {len(locals_)} local and "
            f"{'no' if efs is None else len(efs)} error-feedback tensors; they must match"
        )
    for i, g in enumerate(globals_):
        _info(f"globals_[{i}]", g)
        _info(f"locals_[{i}]", locals_[i])
        if g.dtype != torch.float32:
            raise TypeError(f"globals_[{i}] must be float32 (the fp32 master copy), got {g.dtype}")
        if locals_[i].shape != g.shape:
            raise ValueError(f"locals_[{i}] has shape {tuple(locals_[i].shape)}, expected {tuple(g.shape)}")
        if efs is not None:
            e = efs[i]
            if e.dtype != torch.float32 or e.shape != g.shape or not e.is_contiguous():
                raise ValueError(
                    f"error_feedback[{i}] must be a contiguous float32 tensor of shape "
                    f"{tuple(g.shape)}, got {e.dtype} {tuple(e.shape)}"
                )
    if check_finite:
        named = [("globals_", globals_), ("locals_", locals_)] + ([("error_feedback", efs)] if efs else [])
        for group, ts in named:
            for i, t in enumerate(ts):
                if not all_finite(t):
                    raise _nonfinite(f"{group}[{i}]", t)
    writer = DeltaWriter(
        [tuple(g.shape) for g in globals_], spec, chunk_elems=chunk_elems, seed=seed, backend=backend
    )
    yield writer.header()
    flat: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None
    for ti, ci, start, numel in writer.plan():
        if ci == 0:  # reshape once per tensor (a non-contiguous local is copied here)
            ef = efs[ti].view(-1) if efs is not None else None
            flat = (globals_[ti].detach().reshape(-1), locals_[ti].detach().reshape(-1), ef)
        assert flat is not None
        gf, lf, ef = flat
        end = start + numel
        ep = ef[start:end] if ef is not None else None
        yield writer.chunk(ti, ci, gf[start:end], lf[start:end].to(torch.float32), ep)


class DeltaWriter:
    """Writes a pseudo-gradient payload one chunk at a time, for a producer that computes each
    chunk just before it is encoded (the DiLoCo owner runs the outer step of a chunk, then encodes
    it, then moves on): :meth:`header` first, then :meth:`chunk` for every entry of :meth:`plan`,
    in that order. The payload carries float32 tensors of the given shapes.

    ``chunk`` encodes ``global - local + ef`` (``ef`` may be None) and updates ``ef`` in place to
    what the codec left behind; it checks nothing for NaN/Inf beyond the block scales, so callers
    check their inputs first (as :func:`iter_encode_delta` does).
    """

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        codec: str | Codec = "int8",
        *,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        seed: int = 0,
        backend: str | None = None,
    ) -> None:
        self.spec = spec = parse_codec(codec)
        _check_chunk_elems(chunk_elems, spec)
        self.seed = seed
        self.backend = backend
        self._header = Header(
            codec=spec.name,
            zstd=spec.zstd_level is not None,
            stochastic=spec.stochastic,
            block_size=spec.block_size if spec.quantized else 0,
            chunk_elems=chunk_elems,
            tensors=tuple(TensorInfo(torch.float32, tuple(s)) for s in shapes),
        )
        self._framer = _Framer(spec)

    def header(self) -> bytes:
        return self._header.pack()

    def plan(self) -> Iterator[tuple[int, int, int, int]]:
        """``(tensor, index, start, numel)`` of every chunk, in wire order."""
        h = self._header
        for ti in range(len(h.tensors)):
            for ci in range(h.chunks_of(ti)):
                yield ti, ci, ci * h.chunk_elems, h.chunk_numel(ti, ci)

    def chunk(
        self,
        tensor: int,
        index: int,
        global_: torch.Tensor,
        local: torch.Tensor,
        ef: torch.Tensor | None,
    ) -> bytes:
        """The framed chunk ``index`` of tensor ``tensor`` from float32 pieces of its elements."""
        spec, h = self.spec, self._header
        start = index * h.chunk_elems
        if global_.numel() != h.chunk_numel(tensor, index):
            raise ValueError(
                f"chunk {index} of tensor {tensor} has {h.chunk_numel(tensor, index)} elements, "
                f"got {global_.numel()}"
            )
        if spec.quantized:
            q = ops.encode_delta(
                global_,
                local,
                ef,
                spec.bits,
                spec.block_size,
                stochastic=spec.stochastic,
                seed=tensor_seed(self.seed, tensor),
                offset=start,
                backend=self.backend,
            )
            _check_scales(q, f"pseudo-gradient {tensor}", start)
            parts = _q_parts(q)
        else:
            delta = global_ - local
            if ef is not None:
                delta = delta + ef
            parts = _raw_parts(delta, spec.name)
            if ef is not None:
                sent = delta if spec.name == "fp32" else delta.to(torch.bfloat16).to(torch.float32)
                ef.copy_(delta - sent)
        return self._framer.frame(tensor, index, parts)


def encode_delta(
    globals_: Sequence[torch.Tensor],
    locals_: Sequence[torch.Tensor],
    error_feedback: Sequence[torch.Tensor] | None,
    codec: str | Codec = "int8",
    *,
    chunk_elems: int = DEFAULT_CHUNK_ELEMS,
    seed: int = 0,
    check_finite: bool = True,
    backend: str | None = None,
) -> bytes:
    """:func:`iter_encode_delta` joined into one payload."""
    return b"".join(
        iter_encode_delta(
            globals_,
            locals_,
            error_feedback,
            codec,
            chunk_elems=chunk_elems,
            seed=seed,
            check_finite=check_finite,
            backend=backend,
        )
    )
