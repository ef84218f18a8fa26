"""Mutation fuzzing of everything that parses bytes from peers.

Four targets, each a function of untrusted bytes that must either accept them or refuse them with
its documented error, and nothing else:

========== ========================================================== ========================
target     what runs on each input                                    allowed error
========== ========================================================== ========================
codec      ``compress.decode(data, limits=SMALL)`` and a              ``CodecError``
           ``StreamDecoder(SMALL)`` fed the same bytes split into
           random pieces; both must agree (accept or refuse, and the
           same tensors, bit for bit)
messages   ``messages.decode(T, data)`` for every message type of the ``MessageError``
           catalogue; what decodes must encode and decode to itself
server     ``OuterServer(...).open_round().contribution(name)``       ``ExchangeError``
           ``.feed(pieces...)`` then ``.finish()``; 1-4 contributions
           per round, then ``close()``, after which the global
           parameters and the momentum must be finite
slices     ``data.slices.load_slice_bytes(data, manifest)`` (a text   ``DatasetError``
           and an image manifest)
========== ========================================================== ========================

Any other exception, an input that takes more than ``slow_s`` seconds of CPU (default 1 s), a
Python-level hang (``hang_s`` of CPU, interrupted by a SIGPROF timer), a decoded result beyond the
decode limits, resident memory growing more than ``MAX_RSS_GROWTH`` over the run, or a worker
process that dies (a crash in C code) is a :class:`Finding`: it is kept with its input and the
plan that made it, and saved under ``<results>/fuzz-findings/``.

Engine: a seeded mutation loop, not atheris. The inputs are valid payloads (the seed corpus:
real encodings of several codecs and shapes, hypothesis-drawn messages of every type, contributions
for five server configurations, real slices) changed by a *plan*: a few ``(kind, a, b, c)``
operations (bit flips; bytes and 1/2/4/8-byte integers set to interesting values -- 0, 0x7f,
0x80, 0xff, 2**31, 2**32 - 1, 2**63, -1 as unsigned; small arithmetic; truncation; extension;
insertion; deletion; duplication and swapping of ranges; splicing and crossing with another seed;
random bytes; and per-target structure-aware edits that repair what hides the deep checks: codec
CRCs and lengths, zstd frames (a body is decompressed, edited and compressed again), the server's
envelope, msgpack structure, the SafeTensors JSON header and its length). The same plans are
drawn from ``random.Random`` for the long runs (deterministic per seed and shard) and from
hypothesis strategies (:func:`plans`) in the unit tests, where a failure shrinks to a minimal plan.
NOTE: atheris 3.0.0 installs from a cp311 wheel and runs here, but it drives libFuzzer's own loop
(one target per process, exit on the first uncaught exception, no per-target counts), and its
coverage guidance needs the Python decoders instrumented. The decoders' deep checks sit behind
CRCs, zstd frames and length fields that byte-level mutation rarely gets right, so repairing them
(the structure-aware operations) is what reaches those checks; and ``make test`` runs this engine
with hypothesis, already a dev dependency, and nothing else.

Use::

    from bench._fuzz import run_all
    report = run_all(inputs=1_000_000, seed=0)          # all cores; report.rows, report.ok
"""

from __future__ import annotations

import collections
import concurrent.futures as cf
import contextlib
import gc
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import random
import re
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_WEIGHTS",
    "TARGETS",
    "Finding",
    "FuzzReport",
    "Plan",
    "Seed",
    "ShardResult",
    "Target",
    "Violation",
    "fuzz",
    "make_target",
    "message_types",
    "mutate",
    "plans",
    "random_plan",
    "replay",
    "run_all",
    "save_findings",
]

#: An input whose decoding takes more CPU seconds than this is a finding.
SLOW_S = 1.0
#: CPU seconds after which an input is interrupted as a hang.
HANG_S = 10.0
#: Growth of the process's peak resident memory over a run that counts as a finding.
MAX_RSS_GROWTH = 1 << 30
#: Share of the inputs each target gets in :func:`run_all`: even, so that 10^6 inputs give every
#: target 250k (the server and the codec cost 10x a message or a slice per input; see
#: bench/results/fuzz.md).
DEFAULT_WEIGHTS: dict[str, float] = {"codec": 0.25, "messages": 0.25, "server": 0.25, "slices": 0.25}
#: Inputs per shard (one task of a worker process).
SHARD = 10_000
#: Bytes of an input shown in a report (the saved file has all of it).
SHOW_BYTES = 256


class Violation(Exception):
    """An oracle or a resource bound failed on an input the target did not refuse."""


class _Hang(BaseException):
    """Raised by the SIGPROF timer in an input that ran past ``hang_s`` CPU seconds (a
    BaseException: the targets' ``except Exception`` must not catch it)."""


# ------------------------------------------------------------------------------------------------
# mutations

#: An operation of a plan: (kind, a, b, c), the three arguments taken modulo what they index.
Op = tuple[int, int, int, int]


@dataclass(frozen=True)
class Plan:
    """How one input is made: the seed it starts from, the operations, and ``aux``, which drives
    the target's own choices (how the bytes are split into pieces, when the server's round
    closes)."""

    seed: int
    ops: tuple[Op, ...]
    aux: int

    def to_json(self) -> dict[str, Any]:
        return {"seed": self.seed, "ops": [list(op) for op in self.ops], "aux": self.aux}


INTERESTING_8 = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0xFE, 0x40, 0x10, 0x20, 0xC0, 0xC1, 0x90)
INTERESTING_INTS = (
    0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 0x7F, 0x80, 0xFF, 0x100, 0x7FFF, 0x8000, 0xFFFF,
    0x10000, 1 << 20, 1 << 24, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 1 << 32, 1 << 40,
    0x7FFFFFFFFFFFFFFF, 0x8000000000000000, 0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFE,
)
_WIDTHS = (1, 2, 4, 8)

(K_FLIP, K_BYTE, K_INT, K_ARITH, K_TRUNC, K_EXTEND, K_INSERT, K_DELETE, K_DUP, K_SWAP, K_SPLICE,
 K_CROSS, K_RANDOM, K_STRUCT) = range(14)
N_KINDS = 14
KIND_NAMES = ("flip", "byte", "int", "arith", "truncate", "extend", "insert", "delete",
              "duplicate", "swap", "splice", "cross", "random", "struct")


def _rand_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _apply(data: bytes, op: Op, corpus: Sequence[bytes],
           structural: Callable[[bytes, int, int, int], bytes | None]) -> bytes:
    kind, a, b, c = op
    n = len(data)
    if kind == K_STRUCT:
        out = structural(data, a, b, c)
        if out is not None:
            return out
        kind = K_INT  # not parseable any more: a byte-level edit instead
    if kind == K_RANDOM:
        return _rand_bytes(b, a % 512)
    if kind == K_SPLICE:
        other = corpus[c % len(corpus)]
        return data[: a % (n + 1)] + other[b % (len(other) + 1) :]
    if kind == K_EXTEND:
        extra = _rand_bytes(c, b % 64) if a & 1 else data[-(b % 64 + 1):] * (1 + c % 4)
        return data + extra
    if kind == K_INSERT:
        i = a % (n + 1)
        return data[:i] + _rand_bytes(c, 1 + b % 16) + data[i:]
    if n == 0:
        return bytes([b & 0xFF]) if kind != K_TRUNC else data
    if kind == K_FLIP:
        buf = bytearray(data)
        for k in range(1 + b % 3):
            bit = (a + k * c) % (8 * n)
            buf[bit >> 3] ^= 1 << (bit & 7)
        return bytes(buf)
    if kind == K_BYTE:
        buf = bytearray(data)
        buf[a % n] = INTERESTING_8[b % len(INTERESTING_8)] if c & 3 else c >> 2 & 0xFF
        return bytes(buf)
    if kind == K_INT:
        width = _WIDTHS[b % 4]
        value = INTERESTING_INTS[c % len(INTERESTING_INTS)] & ((1 << 8 * width) - 1)
        i = a % n
        raw = value.to_bytes(width, "big" if b >> 2 & 7 == 0 else "little")
        return data[:i] + raw[: n - i] + data[i + width :]
    if kind == K_ARITH:
        width = _WIDTHS[b % 3]  # 1, 2 or 4 bytes, little-endian
        i = a % n
        if i + width > n:
            i = max(0, n - width)
            width = min(width, n)
        delta = 1 + c % 16
        value = int.from_bytes(data[i : i + width], "little")
        value = (value + (delta if c & 16 else -delta)) % (1 << 8 * width)
        return data[:i] + value.to_bytes(width, "little") + data[i + width :]
    if kind == K_TRUNC:
        return data[: a % n]
    if kind == K_DELETE:
        i = a % n
        return data[:i] + data[i + 1 + b % 64 :]
    if kind == K_DUP:
        i = a % n
        piece = data[i : i + 1 + b % 128]
        j = c % (n + 1)
        return data[:j] + piece + data[j:]
    if kind == K_SWAP:
        i, j = sorted((a % n, c % n))
        size = min(1 + b % 64, j - i, n - j)
        if size <= 0:
            return data
        return data[:i] + data[j : j + size] + data[i + size : j] + data[i : i + size] + data[j + size :]
    if kind == K_CROSS:  # a range of another seed written over this one
        other = corpus[c % len(corpus)]
        if not other:
            return data
        j = b % len(other)
        piece = other[j : j + 1 + (b >> 12) % 256]
        i = a % n if a & 1 else min(j, n - 1)  # at random, or at the same offset
        return data[:i] + piece + data[i + len(piece) :]
    raise AssertionError(f"unknown mutation kind {kind}")


def mutate(data: bytes, ops: Sequence[Op], corpus: Sequence[bytes],
           structural: Callable[[bytes, int, int, int], bytes | None] | None = None) -> bytes:
    """``data`` changed by each operation in turn (``corpus``: the other seeds, for splices)."""
    fn = structural or (lambda _d, _a, _b, _c: None)
    for op in ops:
        data = _apply(data, op, corpus, fn)
    return data


def random_plan(rng: random.Random, n_seeds: int) -> Plan:
    """A plan as the long runs draw it: 1 operation half the time, up to 8 (havoc) rarely;
    structure-aware edits are a third of the operations, whole random inputs 2%."""
    r = rng.random()
    count = 1 if r < 0.5 else 2 if r < 0.75 else 3 if r < 0.88 else 4 if r < 0.96 else rng.randint(5, 8)
    ops = []
    for _ in range(count):
        u = rng.random()
        kind = (K_STRUCT if u < 0.33 else K_RANDOM if u < 0.35 else
                rng.choice((K_FLIP, K_FLIP, K_BYTE, K_INT, K_INT, K_ARITH, K_TRUNC, K_EXTEND,
                            K_INSERT, K_DELETE, K_DUP, K_SWAP, K_SPLICE, K_CROSS)))
        ops.append((kind, rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32)))
    return Plan(rng.randrange(n_seeds), tuple(ops), rng.getrandbits(32))


def plans(n_seeds: int, max_ops: int = 4) -> Any:
    """A hypothesis strategy of plans (shrinks to fewer, simpler operations)."""
    from hypothesis import strategies as st

    u32 = st.integers(0, 2**32 - 1)
    op = st.tuples(st.integers(0, N_KINDS - 1), u32, u32, u32)
    return st.builds(Plan, st.integers(0, n_seeds - 1),
                     st.lists(op, min_size=1, max_size=max_ops).map(tuple), u32)


# ------------------------------------------------------------------------------------------------
# targets


@dataclass(frozen=True)
class Seed:
    """A valid input and what the target needs beside it (a message type, a manifest, ...)."""

    data: bytes
    ctx: Any = None


class Target(ABC):
    """A decoder under test, with its seed corpus. ``run`` returns None when the input was
    accepted, the error when it was refused with one of ``allowed``, and raises anything else
    (a :class:`Violation` when an oracle or a bound fails)."""

    name = ""
    allowed: tuple[type[BaseException], ...] = ()

    def __init__(self) -> None:
        self.seeds = self.make_seeds()
        self.corpus = [s.data for s in self.seeds]
        #: observations that are not findings, counted per shard (reported as notes)
        self.stats: collections.Counter[str] = collections.Counter()

    @abstractmethod
    def make_seeds(self) -> list[Seed]:
        """Valid inputs to mutate, with what running them needs."""

    def structural(self, data: bytes, a: int, b: int, c: int) -> bytes | None:
        return None

    def input(self, plan: Plan) -> tuple[bytes, Any]:
        seed = self.seeds[plan.seed % len(self.seeds)]
        return mutate(seed.data, plan.ops, self.corpus, self.structural), seed.ctx

    @abstractmethod
    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        """None when accepted, the allowed error when refused; raises anything else."""

    def reset(self) -> None:  # noqa: B027 (optional hook: most targets keep no state)
        """Called after an input raised something unexpected (state may be half-updated)."""

    def refusal(self, exc: BaseException) -> str:
        """A refusal's kind, for counting how many different checks the inputs reached."""
        return re.sub(r"\d+", "N", f"{type(exc).__name__}: {exc}")[:60]

    def end(self) -> None:  # noqa: B027 (optional hook)
        """Called when a shard ends: checks still pending (the server's last round)."""


def _pieces(data: bytes, aux: int) -> list[bytes]:
    """``data`` split at random points (``aux`` chooses): whole, a few pieces, or tiny ones."""
    mode = aux % 8
    if mode < 2 or len(data) < 2:
        return [data]
    rng = random.Random(aux)
    if mode == 7:  # 1- to 3-byte pieces
        out, i = [], 0
        while i < len(data):
            step = rng.randint(1, 3)
            out.append(data[i : i + step])
            i += step
        return out
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(mode))
    bounds = [0, *cuts, len(data)]
    return [data[x:y] for x, y in itertools.pairwise(bounds)]


# --- the codec -------------------------------------------------------------------------------

_FIXED = struct.Struct("<4sHBBIIIII")
_CHUNK = struct.Struct("<IIII")


@dataclass
class _Parts:
    """A codec payload taken apart (tolerantly: whatever follows the last whole chunk is
    ``trailing``), to be edited and put back with valid checksums."""

    fixed: bytearray
    table: bytearray
    hcrc: int
    chunks: list[tuple[list[int], bytearray]]
    trailing: bytes

    def build(self, fix_crc: bool) -> bytes:
        head = bytes(self.fixed) + bytes(self.table)
        out = bytearray(head + struct.pack("<I", zlib.crc32(head) if fix_crc else self.hcrc))
        for fields, body in self.chunks:
            tensor, index, body_len, crc = fields
            if fix_crc:
                crc, body_len = zlib.crc32(body), len(body)
            out += _CHUNK.pack(tensor & 0xFFFFFFFF, index & 0xFFFFFFFF, body_len & 0xFFFFFFFF,
                               crc & 0xFFFFFFFF) + body
        return bytes(out) + self.trailing


def _split_codec(payload: bytes) -> _Parts | None:
    if len(payload) < _FIXED.size + 4:
        return None
    fixed = bytearray(payload[: _FIXED.size])
    table_len = _FIXED.unpack(fixed)[7]
    pos = _FIXED.size + table_len
    if pos + 4 > len(payload):
        return None
    table = bytearray(payload[_FIXED.size : pos])
    (hcrc,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    chunks = []
    while pos + _CHUNK.size <= len(payload):
        fields = list(_CHUNK.unpack_from(payload, pos))
        end = pos + _CHUNK.size + fields[2]
        if end > len(payload):
            break
        chunks.append((fields, bytearray(payload[pos + _CHUNK.size : end])))
        pos = end
    return _Parts(fixed, table, hcrc, chunks, payload[pos:])


def _interesting(c: int) -> int:
    return INTERESTING_INTS[c % len(INTERESTING_INTS)]


_SCALE_VALUES = (math.nan, math.inf, -math.inf, -1.0, -0.0, 0.0, 3.4e38, 1e-45, 1e30, 1.0)


def _edit_body(body: bytearray, zstd: bool, a: int, b: int, c: int) -> bytearray:
    """An edit inside a chunk body; a zstd body is decompressed, edited and compressed again
    (so the edit reaches the checks after decompression)."""
    import zstandard

    raw = body
    if zstd:
        try:  # a frame that an earlier edit made claim gigabytes is left as it is
            declared = zstandard.frame_content_size(bytes(body))
            if declared > 1 << 20:
                raise zstandard.ZstdError("too large")
            raw = bytearray(zstandard.ZstdDecompressor().decompress(bytes(body),
                                                                    max_output_size=1 << 20))
        except zstandard.ZstdError:
            zstd = False
    if raw:
        if b % 3 == 0 and len(raw) >= 4:  # a block scale (the body starts with them)
            i = 4 * ((a % len(raw)) // 4) if a & 1 else 0
            i = min(i, len(raw) - 4)
            struct.pack_into("<f", raw, i, _SCALE_VALUES[c % len(_SCALE_VALUES)])
        elif b % 3 == 1:  # the last byte (padding bits of packed codes)
            raw[-1] = INTERESTING_8[c % len(INTERESTING_8)]
        else:
            raw[a % len(raw)] = c & 0xFF
    if zstd:
        level = 1 + c % 3
        return bytearray(zstandard.ZstdCompressor(level=level, write_content_size=bool(a & 2))
                         .compress(bytes(raw)))
    return raw


def codec_structural(payload: bytes, a: int, b: int, c: int) -> bytes | None:
    """A structure-aware edit of a codec payload; the CRCs and body lengths are repaired unless
    ``c % 7 == 0``."""
    parts = _split_codec(payload)
    if parts is None:
        return None
    region = a % 7
    zstd = bool(parts.fixed[7] & 1)
    if region == 0:  # a field of the fixed header
        names = 9
        idx = b % names
        values = list(_FIXED.unpack(parts.fixed))
        if idx == 0:
            values[0] = bytes(_rand_bytes(c, 4)) if c & 1 else b"HYDC"
        else:
            width = {1: 16, 2: 8, 3: 8}.get(idx, 32)
            values[idx] = _interesting(c) & ((1 << width) - 1) if c & 8 else (
                values[idx] + (1 if c & 16 else -1)) % (1 << width)
        parts.fixed = bytearray(_FIXED.pack(*values))
    elif region == 1 and parts.table:  # the tensor table: a dtype, an ndim or a dimension
        i = (a >> 3) % len(parts.table)
        if b & 1 and i + 8 <= len(parts.table):
            struct.pack_into("<Q", parts.table, i, _interesting(c))
        else:
            parts.table[i] = INTERESTING_8[c % len(INTERESTING_8)] if c & 1 else c >> 1 & 0xFF
    elif region == 2 and parts.chunks:  # a chunk's framing fields
        fields = parts.chunks[(a >> 3) % len(parts.chunks)][0]
        k = b % 4
        fields[k] = _interesting(c) & 0xFFFFFFFF if c & 1 else (fields[k] + (1 if c & 2 else -1)) % (1 << 32)
        if k >= 2:  # keep the edited length or crc: do not repair them
            return parts.build(fix_crc=False)
    elif region in (3, 4) and parts.chunks:  # inside a body
        fields, body = parts.chunks[(a >> 3) % len(parts.chunks)]
        parts.chunks[(a >> 3) % len(parts.chunks)] = (fields, _edit_body(body, zstd, a >> 8, b, c))
    elif region == 5 and parts.chunks:  # drop, duplicate or swap whole chunks
        i = (a >> 3) % len(parts.chunks)
        j = b % len(parts.chunks)
        op = c % 3
        if op == 0:
            del parts.chunks[i]
        elif op == 1:
            parts.chunks.insert(j, parts.chunks[i])
        else:
            parts.chunks[i], parts.chunks[j] = parts.chunks[j], parts.chunks[i]
    elif region == 6:  # trailing data, or a chunk more than the header announces
        parts.trailing = _rand_bytes(c, b % 32) if a & 8 else _CHUNK.pack(
            b % 4, c % 4, 4, 0) + b"\x00" * 4
    else:
        return None
    return parts.build(fix_crc=c % 7 != 0)


class CodecTarget(Target):
    """``compress.decode`` and ``StreamDecoder`` under small :class:`DecodeLimits`."""

    name = "codec"

    def __init__(self) -> None:
        from hypha import compress

        self.C = compress
        self.limits = compress.DecodeLimits(max_tensors=64, max_ndim=8, max_total_elems=1 << 16,
                                            max_chunk_elems=1 << 12)
        self.allowed = (compress.CodecError,)
        lim = self.limits
        # the longest header, or the longest chunk: fp32 values, as a zstd frame at its bound
        body = 4 * lim.max_chunk_elems
        self.max_buffer = max(28 + lim.max_tensors * (2 + 8 * lim.max_ndim) + 4,
                              16 + body + (body >> 7) + 1024)
        super().__init__()

    def make_seeds(self) -> list[Seed]:
        import torch

        C = self.C
        g = torch.Generator().manual_seed(1234)
        lists = [
            [torch.randn(100, generator=g), torch.randn(3, 7, generator=g).half(), torch.randn(0),
             torch.randn(33, generator=g).bfloat16()],
            [torch.randn(2, 3, 5, generator=g) * 1e30, torch.zeros(17), torch.randn(1, generator=g)],
            [torch.randn(200, generator=g) * 1e-3],
            [torch.randn(4, 0, 3), torch.randn(65, generator=g).half() * 100],
            [],
        ]
        specs = [("fp32", 32), ("bf16+zstd", 48), ("int8", 32), ("int4+zstd", 64), ("int2", 16),
                 ("int2+zstd", 32), ("int8+zstd", 48), ("bf16", 16), ("int4", 32), ("fp32+zstd", 64)]
        seeds = []
        for k, (spec, chunk) in enumerate(specs):
            quantized = spec.startswith("int")
            codec = C.parse_codec(spec, block_size=16, stochastic=k % 3 == 0) if quantized else spec
            ts = lists[k % len(lists)]
            seeds.append(Seed(C.encode(ts, codec, chunk_elems=chunk)))
        return seeds

    def structural(self, data: bytes, a: int, b: int, c: int) -> bytes | None:
        return codec_structural(data, a, b, c)

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        import torch

        C = self.C
        whole: list[Any] | BaseException
        try:
            whole = C.decode(data, limits=self.limits)
        except C.CodecError as exc:
            whole = exc
        dec = C.StreamDecoder(self.limits)
        chunks: list[Any] = []
        streamed: BaseException | None = None
        try:
            for piece in _pieces(data, aux):
                chunks.extend(dec.feed(piece))
                # NOTE: private state, read to check the documented bound: the decoder waits
                # for (and buffers) at most one header or one chunk of the limits' size
                if max(dec._need, len(dec._buf)) > self.max_buffer:
                    raise Violation(f"the decoder waits for {dec._need} bytes and holds "
                                    f"{len(dec._buf)}; one chunk under {self.limits} is at most "
                                    f"{self.max_buffer}")
            header = dec.finish()
        except C.CodecError as exc:
            streamed = exc
        if isinstance(whole, BaseException) != (streamed is not None):
            raise Violation(f"decode() {'refused' if isinstance(whole, BaseException) else 'accepted'}"
                            f" but StreamDecoder {'refused' if streamed else 'accepted'} "
                            f"({whole if isinstance(whole, BaseException) else streamed})")
        if isinstance(whole, BaseException):
            return whole
        self._check(whole, header, chunks)
        if not all(bool(torch.isfinite(t).all()) for t in whole):
            # NOTE: not a finding: decode() refuses NaN/Inf in fp32/bf16 bodies only; finite
            # block scales times codes can still overflow (and fp16 outputs above 65504)
            self.stats["accepted payloads that decode to NaN/Inf values"] += 1
        return None

    def _check(self, tensors: list[Any], header: Any, chunks: list[Any]) -> None:
        import torch

        lim = self.limits
        if len(tensors) > lim.max_tensors or sum(t.numel() for t in tensors) > lim.max_total_elems:
            raise Violation(f"decoded {len(tensors)} tensors of {sum(t.numel() for t in tensors)} "
                            f"elements, beyond {lim}")
        for t, info in zip(tensors, header.tensors, strict=True):
            if tuple(t.shape) != tuple(info.shape) or t.dtype != info.dtype:
                raise Violation(f"decoded {tuple(t.shape)} {t.dtype}, the header says "
                                f"{info.shape} {info.dtype}")
        # the chunks the stream handed out rebuild exactly what decode() returned
        flat = [torch.zeros(t.numel(), dtype=torch.float32) for t in tensors]
        for ch in chunks:
            if ch.numel > lim.max_chunk_elems:
                raise Violation(f"a chunk of {ch.numel} elements, beyond {lim}")
            flat[ch.tensor][ch.start : ch.start + ch.numel] = ch.values()
        for i, (t, f) in enumerate(zip(tensors, flat, strict=True)):
            a = t.reshape(-1).contiguous().view(torch.uint8)
            b = f.to(t.dtype).contiguous().view(torch.uint8)
            if not torch.equal(a, b):
                raise Violation(f"tensor {i}: decode() and the streamed chunks differ")


# --- the messages ----------------------------------------------------------------------------

#: Values put into decoded message maps by the structure-aware edits.
MSG_JUNK: tuple[Any, ...] = (
    None, True, False, 0, -1, 1, 2**63 - 1, -(2**63), 2**64 - 1, 2**63, math.nan, math.inf,
    -math.inf, -0.0, 1e308, 5e-324, 0.5, "", "x", "x" * 1000, "\x00", "é" * 300, "process",
    "peer", "ok", "worker", "0123456789abcdef0123456789abcdef",
    "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA", b"", b"\x00\xff", [], [1, 2, 3],
    [[[[[]]]]], {}, {"a": 1}, {"": None}, {"v": 1}, list(range(40)),
    {str(i): i for i in range(40)},
)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a decoded msgpack or JSON tree."""
    out: list[tuple[Any, Any]] = []
    todo = [node]
    while todo:
        n = todo.pop()
        if isinstance(n, dict):
            for k, v in n.items():
                out.append((n, k))
                todo.append(v)
        elif isinstance(n, list):
            for i, v in enumerate(n):
                out.append((n, i))
                todo.append(v)
    return out


def _edit_tree(tree: Any, a: int, b: int, c: int, junk: Sequence[Any]) -> Any:
    """Replaces, deletes or adds one value somewhere in a tree of dicts and lists."""
    slots = _slots(tree)
    value = junk[b % len(junk)]
    if isinstance(value, list | dict):
        value = json.loads(json.dumps(value))  # a fresh copy
    if not slots:
        return value if c & 1 else tree
    container, key = slots[a % len(slots)]
    op = c % 6
    if op == 0 and isinstance(container, dict):  # a key more
        container[f"k{c >> 3 & 0xF}" if c & 8 else "v"] = value
    elif op == 1:  # a value less
        del container[key]
    elif op == 2 and isinstance(container, list):  # one item more
        container.insert(key, container[key])
    elif op == 3 and isinstance(container, dict):  # a renamed key
        container[str(key)[:-1] or "x"] = container.pop(key)
    else:
        container[key] = value
    return tree


class MessagesTarget(Target):
    """``messages.decode(T, data)`` for every message type of the catalogue."""

    name = "messages"

    def __init__(self) -> None:
        import hypha.messages as M

        self.M = M
        self.allowed = (M.MessageError,)
        self.types = message_types()
        super().__init__()

    def make_seeds(self) -> list[Seed]:
        M = self.M
        examples = _drawn_messages(self.types, per_type=6)
        seeds = []
        for cls in self.types:
            for message in examples[cls]:
                with contextlib.suppress(M.MessageError):  # a draw over the size limit
                    seeds.append(Seed(M.encode(message), cls))
        return seeds

    def structural(self, data: bytes, a: int, b: int, c: int) -> bytes | None:
        import msgpack

        try:
            tree = msgpack.unpackb(data, raw=False, strict_map_key=False, use_list=True)
        except Exception:
            return None
        tree = _edit_tree(tree, a, b, c, MSG_JUNK)
        try:
            return msgpack.packb(tree, use_bin_type=True)
        except Exception:
            return None

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        M = self.M
        cls = ctx if aux % 4 else self.types[aux // 4 % len(self.types)]  # sometimes another type
        try:
            message = M.decode(cls, data)
        except M.MessageError as exc:
            return exc
        if type(message) is not cls:
            raise Violation(f"decode({cls.__name__}) returned a {type(message).__name__}")
        again = M.decode(cls, M.encode(message))
        if again != message:
            raise Violation(f"{cls.__name__}: decode(encode(m)) != m for m = {message!r:.300}")
        return None


def message_types() -> list[type]:
    """Every message class of the catalogue: the Message subclasses defined in hypha.messages
    (found in the schema registry, so a new module's types are fuzzed without a change here)."""
    import hypha.messages as M
    from hypha.messages import _codec

    found = {cls for cls in _codec._SCHEMAS
             if cls.__module__ == "hypha.messages" or cls.__module__.startswith("hypha.messages.")}
    found |= {v for v in vars(M).values()
              if isinstance(v, type) and issubclass(v, M.Message) and v is not M.Message}
    return sorted(found, key=lambda c: (c.__module__, c.__qualname__))


def _drawn_messages(types: Sequence[type], per_type: int) -> dict[type, list[Any]]:
    """Valid messages of each type: the hand-written sample and ``per_type`` drawn by the
    hypothesis strategies of tests/unit/messages/_samples.py (a fixed seed: the corpus is the
    same in every process and every run)."""
    from tests.unit.messages._samples import SAMPLES, messages

    out: dict[type, list[Any]] = {}
    for k, cls in enumerate(types):
        drawn = _draw(messages(cls), per_type, 20261123 + k)
        out[cls] = ([SAMPLES[cls]] if cls in SAMPLES else []) + drawn
    return out


def _draw(strategy: Any, n: int, seed: int) -> list[Any]:
    """Up to ``n`` values of a hypothesis strategy, the same for the same ``seed`` (draws that
    fail with a ValueError, e.g. a message whose cross-field rules the strategy does not know,
    are skipped)."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hseed
    from hypothesis import strategies as st

    out: list[Any] = []

    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @hseed(seed)
    @given(st.data())
    def collect(data: Any) -> None:
        with contextlib.suppress(ValueError):
            out.append(data.draw(strategy))

    collect()
    return out


# --- the parameter server ----------------------------------------------------------------------

_SERVER_SHAPES = [(5, 7), (1,), (37,), (3, 4, 5)]
_SERVER_CODECS = [("fp32", None, 32), ("bf16", 1, 32), ("int8", None, 32), ("int4", 1, 64),
                  ("int2", None, 32)]


class ServerTarget(Target):
    """Contributions to an :class:`OuterServer` round, 1-4 per round, then ``close()``."""

    name = "server"

    def __init__(self) -> None:
        import torch

        from hypha.compress import Codec
        from hypha.optim import ExchangeError, OuterServer
        from hypha.optim._exchange import _ENVELOPE, _SHARD, _SHARD_NONE, all_finite, pack_envelope

        self.torch, self.Codec, self.OuterServer = torch, Codec, OuterServer
        self.all_finite = all_finite
        self.envelope = _ENVELOPE
        self._kinds = (_SHARD, _SHARD_NONE, pack_envelope)
        self.allowed = (ExchangeError,)
        self.servers: list[Any] = []
        self.rounds: list[Any] = []
        self.pending: list[list[bytes]] = []
        self.closed = 0
        self._build()
        super().__init__()

    def _build(self) -> None:
        torch = self.torch
        g = torch.Generator().manual_seed(7)
        params = [torch.randn(s, generator=g) for s in _SERVER_SHAPES]
        self.servers = []
        for name, zstd, chunk in _SERVER_CODECS:
            codec = self.Codec(name, zstd_level=zstd, block_size=16 if name.startswith("int") else 128)
            self.servers.append(self.OuterServer(params, codec=codec, chunk_elems=chunk))
        self.rounds = [None] * len(self.servers)
        self.pending = [[] for _ in self.servers]

    def make_seeds(self) -> list[Seed]:
        from hypha import compress

        torch = self.torch
        shard_kind, none_kind, pack_envelope = self._kinds
        g = torch.Generator().manual_seed(11)
        seeds = []
        for i, server in enumerate(self.servers):
            shapes = server.layout.shards[0][0].shapes
            env = pack_envelope(shard_kind, 0, 0)
            for scale in (0.01, 1.0, 1e30):
                deltas = [torch.randn(s, generator=g) * scale for s in shapes]
                seeds.append(Seed(env + compress.encode(deltas, server.codec,
                                                        chunk_elems=server.chunk_elems), i))
            zeros = [torch.zeros(s) for s in shapes]
            seeds.append(Seed(env + compress.encode(zeros, server.codec,
                                                    chunk_elems=server.chunk_elems), i))
            seeds.append(Seed(pack_envelope(none_kind, 0, 0), i))
        return seeds

    def structural(self, data: bytes, a: int, b: int, c: int) -> bytes | None:
        size = self.envelope.size
        if len(data) < size:
            return None
        if a % 3 == 0:  # a field of the envelope: magic, version, kind, fragment, sender, round
            fields = list(self.envelope.unpack(data[:size]))
            k = b % 6
            if k == 0:
                fields[0] = _rand_bytes(c, 4) if c & 1 else b"HYDC"
            else:
                width = {1: 8, 2: 8, 3: 16, 4: 32, 5: 64}[k]
                fields[k] = (_interesting(c) if c & 1 else fields[k] + (1 if c & 2 else -1)) % (1 << width)
            return self.envelope.pack(*fields) + data[size:]
        rest = codec_structural(data[size:], a // 3, b, c)
        return None if rest is None else data[:size] + rest

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        ExchangeError = self.allowed[0]
        i = ctx % len(self.servers)
        server = self.servers[i]
        if self.rounds[i] is None:
            self.rounds[i] = server.open_round()
        rnd = self.rounds[i]
        size = self.envelope.size
        if data[12:size] == bytes(8):  # the seeds' round 0 becomes the server's round
            data = data[:12] + struct.pack("<Q", server.round) + data[size:]
        self.pending[i].append(data)
        contribution = rnd.contribution(f"peer-{len(self.pending[i])}")
        refused: BaseException | None = None
        try:
            for piece in _pieces(data, aux):
                contribution.feed(piece)
            contribution.finish()
        except ExchangeError as exc:
            refused = exc
        if refused is None and not contribution.complete:
            raise Violation("finish() returned but the contribution is not complete")
        if aux >> 3 & 3 == 0 or len(self.pending[i]) >= 4:
            self._close(i)
        return refused

    def _close(self, i: int) -> None:
        server, rnd = self.servers[i], self.rounds[i]
        self.rounds[i] = None
        contributions = len(self.pending[i])
        self.pending[i] = []
        _pieces_out, stats = rnd.close()
        self.closed += 1
        for k, g in enumerate(server.global_tensors()):
            if not self.all_finite(g):
                raise Violation(f"after close(), global tensor {k} holds NaN/Inf")
        if not self.all_finite(server._momentum):
            raise Violation("after close(), the outer momentum holds NaN/Inf")
        if stats.contributors + stats.failed + stats.abstained > contributions:
            # (an abstention followed by bytes is refused: failed, not also abstained)
            raise Violation(f"round stats count more than {contributions} contributions: {stats}")

    def reset(self) -> None:
        self._build()

    def refusal(self, exc: BaseException) -> str:
        text = re.sub(r"^contribution from '[^']*' to round \d+: ", "", str(exc))
        return re.sub(r"\d+", "N", text)[:60]

    def end(self) -> None:
        for i, rnd in enumerate(self.rounds):
            if rnd is not None:
                self._close(i)


# --- data slices -----------------------------------------------------------------------------

JSON_JUNK: tuple[Any, ...] = (
    None, True, 0, -1, 1, 2**31, 2**63, 2**64, -(2**63), 1.5, 1e308, -0.0, "", "U8", "I64",
    "F32", "BOOL", "tokens", "images", "labels", "__metadata__", [], [0], [1, 0], [0, 2**64],
    [-1, 3], [1, 17], [0, 0], {}, {"dtype": "U8"}, [[[[[[[[[[]]]]]]]]]], "x" * 500,
)


class SlicesTarget(Target):
    """``data.slices.load_slice_bytes(data, manifest)`` for a text and an image dataset."""

    name = "slices"

    def __init__(self) -> None:
        from hypha.data.slices import DatasetError, load_slice_bytes

        self.load = load_slice_bytes
        self.allowed = (DatasetError,)
        super().__init__()

    def make_seeds(self) -> list[Seed]:
        import numpy as np

        from hypha.data import Dataset, prepare_images, prepare_text

        seeds = []
        with tempfile.TemporaryDirectory(prefix="hypha-fuzz-") as tmp:
            root = Path(tmp)
            (root / "t.txt").write_bytes(bytes(range(32, 127)) * 8)
            prepare_text([root / "t.txt"], "t", root / "out", slice_tokens=64, seq_len=16)
            images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
            np.savez(root / "i.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
            prepare_images(root / "i.npz", "i", root / "out", slice_examples=4)
            for name in ("t", "i"):
                ds = Dataset.open(root / "out" / name)
                for k in range(min(ds.num_slices, 3)):
                    seeds.append(Seed(ds.slice_bytes(k), ds.manifest))
        return seeds

    def structural(self, data: bytes, a: int, b: int, c: int) -> bytes | None:
        """An edit of the JSON header (a value replaced, removed or added), its length fixed
        unless ``c % 5 == 0``."""
        if len(data) < 8:
            return None
        (n,) = struct.unpack("<Q", data[:8])
        if n > len(data) - 8 or n > 1 << 16:
            return None
        try:
            header = json.loads(data[8 : 8 + n])
        except (ValueError, RecursionError):
            return None
        header = _edit_tree(header, a, b, c, JSON_JUNK)
        raw = json.dumps(header, separators=(",", ":") if a & 1 else (", ", ": ")).encode()
        if b & 8:  # padding, as safetensors writers do
            raw += b" " * (c % 8)
        length = len(raw) if c % 5 else n
        return struct.pack("<Q", length) + raw + data[8 + n :]

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        try:
            tensors = self.load(data, ctx)
        except self.allowed as exc:
            return exc
        expected = set(ctx.tensors)
        if set(tensors) != expected:
            raise Violation(f"load_slice_bytes returned {sorted(tensors)}, expected {sorted(expected)}")
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        if nbytes > len(data):
            raise Violation(f"{nbytes} bytes of tensors from {len(data)} bytes of input")
        return None


TARGETS: dict[str, type[Target]] = {
    "codec": CodecTarget,
    "messages": MessagesTarget,
    "server": ServerTarget,
    "slices": SlicesTarget,
}

_BUILT: dict[str, Target] = {}


def _target_class(name: str) -> type[Target]:
    if name in TARGETS:
        return TARGETS[name]
    module, _, attr = name.partition(":")
    if attr:  # "package.module:Class": a target defined elsewhere (the engine's own tests)
        import importlib

        cls = getattr(importlib.import_module(module), attr)
        if isinstance(cls, type) and issubclass(cls, Target):
            return cls
    raise ValueError(f"unknown fuzz target {name!r}; expected one of {sorted(TARGETS)} or "
                     "'module:TargetSubclass'")


def make_target(name: str) -> Target:
    """The target ``name`` with its seed corpus (built once per process)."""
    if name not in _BUILT:
        _BUILT[name] = _target_class(name)()
    return _BUILT[name]


# ------------------------------------------------------------------------------------------------
# running


@dataclass
class Finding:
    """An input a target mishandled."""

    target: str
    kind: str  # exception | violation | slow | hang | memory | crash
    error: str  # one line: the exception type and message
    data: bytes
    plan: Plan | None
    traceback: str = ""
    cpu_ms: float = 0.0
    count: int = 1  # inputs with the same signature in the run
    note: str = ""

    @property
    def signature(self) -> str:
        """What makes two findings the same bug: target, kind, exception type, and where it was
        raised (the innermost frame)."""
        where = ""
        frames = re.findall(r'File "([^"]+)", line (\d+)', self.traceback)
        if frames:
            where = f"{Path(frames[-1][0]).name}:{frames[-1][1]}"
        kind_of_error = self.error.split(":", 1)[0]
        if self.kind in ("slow", "hang", "memory", "crash"):
            kind_of_error = ""
        return f"{self.target}/{self.kind}/{kind_of_error}/{where}"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target, "kind": self.kind, "error": self.error,
            "count": self.count, "cpu_ms": round(self.cpu_ms, 3), "note": self.note,
            "plan": self.plan.to_json() if self.plan else None, "size": len(self.data),
            "hex": self.data[:SHOW_BYTES].hex() + ("..." if len(self.data) > SHOW_BYTES else ""),
            "traceback": self.traceback,
        }

    def describe(self) -> str:
        head = self.data[:64].hex() + ("..." if len(self.data) > 64 else "")
        return (f"[{self.target}] {self.kind}: {self.error} (x{self.count}; input of "
                f"{len(self.data)} bytes: {head})")


@dataclass
class ShardResult:
    target: str
    inputs: int = 0
    valid: int = 0
    refused: int = 0
    seconds: float = 0.0
    slowest_ms: float = 0.0
    slowest_plan: Plan | None = None
    refusals: collections.Counter[str] = field(default_factory=collections.Counter)
    findings: list[Finding] = field(default_factory=list)
    stats: collections.Counter[str] = field(default_factory=collections.Counter)


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    text = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= 300 else text[:300] + "..."


@contextlib.contextmanager
def _hang_guard(hang_s: float) -> Iterator[Callable[[], None]]:
    """Arms a SIGPROF timer for each input (``arm()``), so that an input running past ``hang_s``
    CPU seconds raises :class:`_Hang`. Only in the main thread (signals); elsewhere a no-op."""
    import threading

    if threading.current_thread() is not threading.main_thread() or hang_s <= 0:
        yield lambda: None
        return

    def on_signal(_signum: int, _frame: Any) -> None:
        raise _Hang(f"still running after {hang_s} s of CPU")

    previous = signal.signal(signal.SIGPROF, on_signal)
    try:
        yield lambda: signal.setitimer(signal.ITIMER_PROF, hang_s)
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)


def fuzz(
    target: str | Target,
    inputs: int,
    seed: int | str = 0,
    *,
    shard: int = 0,
    skip: Collection[int] = (),
    slow_s: float = SLOW_S,
    hang_s: float = HANG_S,
    journal: str | None = None,
) -> ShardResult:
    """Runs ``inputs`` mutated inputs through one target, in this process: the plans that
    ``random.Random(f"{seed}/{target}/{shard}")`` draws (deterministic), but for the indices in
    ``skip``. ``journal``: a file where each input is written before it runs, so that the input
    that kills the process can be found."""
    t = make_target(target) if isinstance(target, str) else target
    label = target if isinstance(target, str) else t.name
    rng = random.Random(f"{seed}/{t.name}/{shard}")
    out = ShardResult(label)
    seen: dict[str, Finding] = {}
    fd = os.open(journal, os.O_WRONLY | os.O_CREAT, 0o600) if journal else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rss_flagged = False
    clock, cpu = time.perf_counter, time.process_time

    def record(f: Finding) -> None:
        if f.signature in seen:
            seen[f.signature].count += 1
        else:
            seen[f.signature] = f
            out.findings.append(f)

    for s in t.seeds:  # warm-up (lazy imports, first calls into torch): not timed or counted
        with contextlib.suppress(Exception):
            t.run(s.data, s.ctx, 0)
    # NOTE: the heap built so far (torch, the corpus) is frozen out of the cyclic GC, whose
    # full collections over it otherwise land on random inputs as 50-100 ms "slow" ones
    gc.collect()
    gc.freeze()
    t.stats.clear()
    started = clock()
    try:
        with _hang_guard(hang_s) as arm:
            for i in range(inputs):
                plan = random_plan(rng, len(t.seeds))
                if i in skip:
                    continue
                data, ctx = t.input(plan)
                if fd is not None:
                    blob = json.dumps({"target": label, "shard": shard, "i": i,
                                       "plan": plan.to_json(), "hex": data.hex()}).encode()
                    os.pwrite(fd, blob, 0)
                    os.ftruncate(fd, len(blob))
                c0 = cpu()
                arm()
                try:
                    refused = t.run(data, ctx, plan.aux)
                except _Hang as exc:
                    t.reset()
                    record(Finding(label, "hang", str(exc), data, plan,
                                   "".join(traceback.format_exception(exc)[-6:]),
                                   1000 * (cpu() - c0)))
                    continue
                except Exception as exc:
                    t.reset()
                    kind = "violation" if isinstance(exc, Violation) else "exception"
                    record(Finding(label, kind, _one_line(exc), data, plan,
                                   "".join(traceback.format_exception(exc)[-12:]),
                                   1000 * (cpu() - c0)))
                    continue
                finally:
                    if hang_s > 0:
                        signal.setitimer(signal.ITIMER_PROF, 0)
                ms = 1000 * (cpu() - c0)
                out.inputs += 1
                if refused is None:
                    out.valid += 1
                else:
                    out.refused += 1
                    if len(out.refusals) < 5000:
                        out.refusals[t.refusal(refused)] += 1
                if ms > out.slowest_ms:
                    out.slowest_ms, out.slowest_plan = ms, plan
                if ms > 1000 * slow_s:
                    record(Finding(label, "slow", f"{ms:.0f} ms of CPU (limit {slow_s} s)",
                                   data, plan, cpu_ms=ms))
                if not rss_flagged and i % 64 == 0:
                    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
                    if grown > MAX_RSS_GROWTH:
                        rss_flagged = True
                        record(Finding(label, "memory", f"peak RSS grew by {grown >> 20} MiB",
                                       data, plan, note="the input that crossed the bound"))
            try:
                t.end()
            except Exception as exc:
                t.reset()
                record(Finding(label, "violation" if isinstance(exc, Violation) else "exception",
                               _one_line(exc), b"", None,
                               "".join(traceback.format_exception(exc)[-12:]),
                               note="at the end of the shard (the server's last round)"))
    finally:
        gc.unfreeze()
        if fd is not None:
            os.close(fd)
    # the inputs that raised count too
    out.inputs += sum(f.count for f in out.findings if f.kind in ("exception", "violation", "hang"))
    out.seconds = clock() - started
    out.stats = collections.Counter(t.stats)
    return out


def replay(target: str, plan: Plan) -> tuple[bytes, BaseException | None]:
    """Rebuilds the input of ``plan`` and runs it once (to reproduce a finding):
    (input, the allowed error or None); raises what the target raises."""
    t = make_target(target)
    data, ctx = t.input(plan)
    return data, t.run(data, ctx, plan.aux)


# --- many processes ----------------------------------------------------------------------------


def _worker_init() -> None:
    # one thread per process: the processes share the cores (torch reads these when imported)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(1)
    # NOTE: a worker that dies must not leave a core dump per crash in the working directory
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _shard_task(target: str, n: int, seed: int | str, shard: int, skip: frozenset[int],
                slow_s: float, hang_s: float, journal_dir: str) -> ShardResult:
    journal = os.path.join(journal_dir, f"journal-{os.getpid()}.json")
    return fuzz(target, n, seed, shard=shard, skip=skip, slow_s=slow_s, hang_s=hang_s,
                journal=journal)


def _replay_task(target: str, hex_data: str, plan: dict[str, Any]) -> None:
    """Runs one input in a fresh process (does it crash it?)."""
    _worker_init()
    t = make_target(target)
    data = bytes.fromhex(hex_data)
    seed_ctx = t.seeds[plan["seed"] % len(t.seeds)].ctx
    with contextlib.suppress(Exception):
        t.run(data, seed_ctx, plan["aux"])
        t.end()


def _crash_findings(journal_dir: str, ctx: Any, timeout_s: float) -> list[tuple[Finding, dict[str, Any]]]:
    """After the pool broke: replays the last input of every worker in a fresh process; those
    that kill it (or hang it) are findings."""
    out = []
    for path in sorted(Path(journal_dir).glob("journal-*.json")):
        try:
            entry = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        path.unlink(missing_ok=True)
        proc = ctx.Process(target=_replay_task, args=(entry["target"], entry["hex"], entry["plan"]))
        proc.start()
        proc.join(timeout_s)
        if proc.is_alive():
            proc.kill()
            proc.join()
            kind, error = "hang", f"a worker stopped responding (> {timeout_s:.0f} s)"
        elif proc.exitcode != 0:
            code = proc.exitcode or 0
            name = signal.Signals(-code).name if code < 0 else f"exit status {code}"
            kind, error = "crash", f"the process died: {name}"
        else:
            continue
        p = entry["plan"]
        plan = Plan(p["seed"], tuple((op[0], op[1], op[2], op[3]) for op in p["ops"]), p["aux"])
        out.append((Finding(entry["target"], kind, error, bytes.fromhex(entry["hex"]), plan,
                            note=f"shard {entry['shard']} input {entry['i']}"), entry))
    return out


@dataclass
class FuzzReport:
    """What :func:`run_all` found: ``rows`` (one per target, then ``total``; the columns of
    bench/fuzz.py), ``findings`` (deduplicated), and where they were saved."""

    rows: list[dict[str, Any]]
    findings: list[Finding]
    wall_s: float
    saved: list[Path] = field(default_factory=list)
    #: observations that are not findings ("codec: 12 accepted payloads that decode to ...")
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    @property
    def inputs(self) -> int:
        return sum(r["inputs"] for r in self.rows if r["target"] != "total")


def _split(inputs: int, weights: dict[str, float]) -> dict[str, int]:
    total = sum(weights.values())
    counts = {name: int(inputs * w / total) for name, w in weights.items()}
    first = next(iter(counts))
    counts[first] += inputs - sum(counts.values())
    return counts


def run_all(
    inputs: int = 1_000_000,
    seed: int | str = 0,
    *,
    targets: Sequence[str] | None = None,
    weights: dict[str, float] | None = None,
    jobs: int | None = None,
    slow_s: float = SLOW_S,
    hang_s: float = HANG_S,
    results_dir: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> FuzzReport:
    """Fuzzes ``targets`` (default all) with ``inputs`` mutated inputs in all, split by
    ``weights``, on ``jobs`` processes (default: the usable cores; 1 runs in this process).
    Findings are saved under ``results_dir/fuzz-findings/`` when ``results_dir`` is given."""
    names = list(targets or TARGETS)
    for name in names:
        _target_class(name)  # fails early on a bad name
    w = {n: (weights or DEFAULT_WEIGHTS).get(n, 1.0) for n in names}
    counts = _split(inputs, w)
    jobs = jobs or len(os.sched_getaffinity(0))
    tasks = []
    for name in names:
        n = counts[name]
        per = max(1, min(SHARD, math.ceil(n / jobs)))
        for k, lo in enumerate(range(0, n, per)):
            tasks.append((name, min(per, n - lo), k))
    started = time.perf_counter()
    results: list[ShardResult] = []
    crashes: list[Finding] = []
    if jobs == 1:
        for name, n, k in tasks:
            results.append(fuzz(name, n, seed, shard=k, slow_s=slow_s, hang_s=hang_s))
            if progress:
                progress(f"{name} shard {k}: {n} inputs")
    else:
        results, crashes = _run_pool(tasks, seed, jobs, slow_s, hang_s, progress)
    wall = time.perf_counter() - started
    rows, findings = _summarise(names, results, crashes, wall)
    notes = []
    for name in names:
        stats: collections.Counter[str] = collections.Counter()
        for r in results:
            if r.target == name:
                stats.update(r.stats)
        notes += [f"{name}: {n} {what}" for what, n in sorted(stats.items())]
    report = FuzzReport(rows, findings, wall, notes=notes)
    if results_dir is not None and findings:
        report.saved = save_findings(findings, Path(results_dir) / "fuzz-findings")
    return report


def _run_pool(tasks: list[tuple[str, int, int]], seed: int | str, jobs: int, slow_s: float,
              hang_s: float, progress: Callable[[str], None] | None,
              ) -> tuple[list[ShardResult], list[Finding]]:
    ctx = multiprocessing.get_context("spawn")
    results: list[ShardResult] = []
    crashes: list[Finding] = []
    todo = {(name, k): (name, n, k, frozenset[int]()) for name, n, k in tasks}
    # a shard that has not finished after this long is taken for a hang in C code
    shard_timeout = max(600.0, 20 * hang_s)
    with tempfile.TemporaryDirectory(prefix="hypha-fuzz-journal-") as journal_dir:
        while todo:
            broken = False
            with cf.ProcessPoolExecutor(jobs, mp_context=ctx, initializer=_worker_init) as pool:
                futures = {pool.submit(_shard_task, name, n, seed, k, skip, slow_s, hang_s,
                                       journal_dir): key
                           for key, (name, n, k, skip) in todo.items()}
                pending = set(futures)
                while pending:
                    done, pending = cf.wait(pending, timeout=shard_timeout,
                                            return_when=cf.FIRST_COMPLETED)
                    if not done:  # stuck: stop the workers, find the input in the journals
                        for proc in list(getattr(pool, "_processes", {}).values()):
                            proc.kill()
                        broken = True
                        break
                    for fut in done:
                        key = futures[fut]
                        try:
                            res = fut.result()
                        except cf.process.BrokenProcessPool:
                            broken = True
                            continue
                        results.append(res)
                        todo.pop(key, None)
                        if progress:
                            progress(f"{res.target} shard {key[1]}: {res.inputs} inputs, "
                                     f"{res.inputs / max(res.seconds, 1e-9):.0f}/s")
                    if broken:
                        break
                if broken:
                    for proc in list(getattr(pool, "_processes", {}).values()):
                        proc.kill()
            if not broken:
                break
            found = _crash_findings(journal_dir, ctx, max(60.0, 3 * hang_s))
            if not found:
                raise RuntimeError("the fuzzing workers died, and replaying their last inputs "
                                   "did not reproduce it")
            for finding, entry in found:
                crashes.append(finding)
                key = (entry["target"], entry["shard"])
                if key in todo:  # run the shard again, without the input that killed it
                    name, n, k, skip = todo[key]
                    todo[key] = (name, n, k, skip | {entry["i"]})
    return results, crashes


def _summarise(names: Sequence[str], results: Sequence[ShardResult], crashes: Sequence[Finding],
               wall: float) -> tuple[list[dict[str, Any]], list[Finding]]:
    by_sig: dict[str, Finding] = {}
    for f in [*(f for r in results for f in r.findings), *crashes]:
        if f.signature in by_sig:
            by_sig[f.signature].count += f.count
        else:
            by_sig[f.signature] = f
    findings = list(by_sig.values())
    rows = []
    for name in names:
        rs = [r for r in results if r.target == name]
        # the inputs that killed a worker count too
        n = sum(r.inputs for r in rs) + sum(1 for f in crashes if f.target == name)
        secs = sum(r.seconds for r in rs)
        kinds: collections.Counter[str] = collections.Counter()
        for r in rs:
            kinds.update(r.refusals)
        rows.append({
            "target": name,
            "inputs": n,
            "valid": sum(r.valid for r in rs),
            "refused": sum(r.refused for r in rs),
            "findings": sum(f.count for f in findings if f.target == name),
            "distinct": sum(1 for f in findings if f.target == name),
            "refusal_kinds": len(kinds),
            "inputs_per_s": n / secs if secs else 0.0,
            "slowest_ms": max((r.slowest_ms for r in rs), default=0.0),
        })
    total_inputs = sum(r["inputs"] for r in rows)
    rows.append({
        "target": "total",
        "inputs": total_inputs,
        "valid": sum(r["valid"] for r in rows),
        "refused": sum(r["refused"] for r in rows),
        "findings": sum(r["findings"] for r in rows),
        "distinct": len(findings),
        "refusal_kinds": sum(r["refusal_kinds"] for r in rows),
        "inputs_per_s": total_inputs / wall if wall else 0.0,  # wall time, all processes
        "slowest_ms": max((r["slowest_ms"] for r in rows), default=0.0),
    })
    return rows, findings


def save_findings(findings: Sequence[Finding], directory: Path) -> list[Path]:
    """Writes each finding as ``<target>-<kind>-<hash>.bin`` (the input) and ``.json`` (what
    happened, the plan that reproduces it, the traceback)."""
    directory.mkdir(parents=True, exist_ok=True)
    saved = []
    for f in findings:
        digest = hashlib.sha1(f.signature.encode() + f.data).hexdigest()[:12]
        stem = directory / f"{f.target}-{f.kind}-{digest}"
        stem.with_suffix(".bin").write_bytes(f.data)
        stem.with_suffix(".json").write_text(json.dumps(f.to_json(), indent=2) + "\n")
        saved.append(stem.with_suffix(".json"))
    return saved
