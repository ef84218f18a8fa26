"""Property-based tests and a fuzz run of the decoder: any bytes either decode or raise
CodecError; nothing crashes, hangs or raises another exception type."""

from __future__ import annotations

import collections
import random
import re
import struct

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hypha import compress as C
from tests.unit.compress._payload import split

FUZZ_CASES = 100_000
_SMALL = C.DecodeLimits(max_total_elems=1 << 16, max_chunk_elems=1 << 12)

codecs = st.sampled_from(["fp32", "bf16", "int8", "int4", "int2"])
dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
shapes = st.lists(st.integers(0, 70), min_size=0, max_size=3).map(tuple)


@st.composite
def tensor_lists(draw) -> list[torch.Tensor]:
    seed = draw(st.integers(0, 2**31))
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape, dtype in draw(st.lists(st.tuples(shapes, dtypes), min_size=0, max_size=4)):
        # magnitudes across the range each dtype can hold (fp16 overflows past 65504)
        scales = [1e-3, 1.0, 100.0] if dtype == torch.float16 else [1e-30, 1e-3, 1.0, 1e30]
        out.append((torch.randn(shape, generator=g) * draw(st.sampled_from(scales))).to(dtype))
    return out


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ts=tensor_lists(), codec=codecs, zstd=st.booleans(), chunk_blocks=st.integers(1, 8),
       stochastic=st.booleans())
def test_round_trip_property(ts, codec, zstd, chunk_blocks, stochastic) -> None:
    spec = C.parse_codec(codec + ("+zstd" if zstd else ""), block_size=16,
                         stochastic=stochastic and codec.startswith("int"))
    payload = C.encode(ts, spec, chunk_elems=16 * chunk_blocks)
    out = C.decode(payload)
    assert [o.shape for o in out] == [t.shape for t in ts]
    assert [o.dtype for o in out] == [t.dtype for t in ts]
    if codec == "fp32":
        assert all(torch.equal(o, t) for o, t in zip(out, ts, strict=True))
    for o, t in zip(out, ts, strict=True):
        if t.numel():
            scale = t.float().abs().max()
            assert float((o.float() - t.float()).abs().max()) <= float(scale) * 0.7 + 1e-30
    # streaming in tiny pieces (one byte at a time for small payloads) gives the same chunks
    dec = C.StreamDecoder()
    step = 1 if len(payload) < 2000 else 13
    n = sum(len(dec.feed(payload[i : i + step])) for i in range(0, len(payload), step))
    dec.finish()
    assert n == sum((t.numel() + 16 * chunk_blocks - 1) // (16 * chunk_blocks) for t in ts)


def _decode_or_codec_error(data: bytes) -> list[torch.Tensor] | C.CodecError:
    try:
        return C.decode(data, limits=_SMALL)
    except C.CodecError as exc:
        return exc


@settings(max_examples=300, deadline=None)
@given(data=st.binary(max_size=400))
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    assert isinstance(_decode_or_codec_error(data), (list, C.CodecError))
    assert isinstance(_decode_or_codec_error(b"HYDC\x01\x00" + data), (list, C.CodecError))


def _seed_payloads() -> list[bytes]:
    g = torch.Generator().manual_seed(1234)
    ts = [torch.randn(100, generator=g), torch.randn(3, 7, generator=g).half(), torch.randn(0),
          torch.randn(33, generator=g).bfloat16()]
    out = []
    for codec in ["int2", "int4+zstd", "int8", "fp32", "bf16+zstd", "int2+zstd"]:
        spec = C.parse_codec(codec, block_size=16) if codec.startswith("int") else C.parse_codec(codec)
        out.append(C.encode(ts, spec, chunk_elems=32))
    return out


@settings(max_examples=300, deadline=None)
@given(which=st.integers(0, 5), edits=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)),
                                                min_size=1, max_size=4), fix=st.booleans())
def test_mutated_payloads_property(which, edits, fix) -> None:
    payload = _seed_payloads()[which]
    _check_mutant(_mutate_bytes(payload, edits, fix))


def _mutate_bytes(payload: bytes, edits, fix: bool) -> bytes:
    parts = split(payload)
    if fix and parts.chunks:
        # edit inside structure and fix checksums, to get past the CRCs
        for pos, val in edits:
            region = pos % 3
            if region == 0:
                parts.fixed[pos % len(parts.fixed)] = val
            elif region == 1 and parts.table:
                parts.table[pos % len(parts.table)] = val
            else:
                _, body = parts.chunks[pos % len(parts.chunks)]
                if body:
                    body[pos % len(body)] = val
        return parts.build()
    data = bytearray(payload)
    for pos, val in edits:
        data[pos % len(data)] = val
    return bytes(data)


def _check_mutant(data: bytes) -> str:
    result = _decode_or_codec_error(data)
    if isinstance(result, C.CodecError):
        assert str(result), "an error must say what is wrong"
        return re.sub(r"\d+", "N", str(result))[:60]
    assert all(isinstance(t, torch.Tensor) for t in result)
    assert sum(t.numel() for t in result) <= _SMALL.max_total_elems
    return "decoded"


def test_fuzz_100k_mutated_payloads() -> None:
    """At least 10^5 mutated payloads: random byte flips, truncations, splices, duplicated and
    dropped ranges, and structure-aware edits with repaired checksums (so mutations reach the
    checks behind the CRCs). Only CodecError may come out."""
    rng = random.Random(20261123)
    seeds = _seed_payloads()
    outcomes: collections.Counter[str] = collections.Counter()
    for i in range(FUZZ_CASES):
        payload = seeds[i % len(seeds)]
        kind = rng.randrange(8)
        if kind == 0:  # bit flips
            data = bytearray(payload)
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
            mutant = bytes(data)
        elif kind == 1:  # truncation
            mutant = payload[: rng.randrange(len(payload))]
        elif kind == 2:  # splice of two payloads
            other = seeds[rng.randrange(len(seeds))]
            cut = rng.randrange(len(payload))
            mutant = payload[:cut] + other[rng.randrange(len(other)) :]
        elif kind == 3:  # duplicate or drop a range
            a = rng.randrange(len(payload))
            b = min(len(payload), a + rng.randint(1, 64))
            mutant = payload[:b] + payload[a:] if rng.random() < 0.5 else payload[:a] + payload[b:]
        elif kind == 4:  # random garbage after a valid header prefix
            cut = rng.randrange(40)
            mutant = payload[:cut] + rng.randbytes(rng.randint(0, 200))
        else:  # structure-aware edits with checksums repaired
            edits = [(rng.randrange(10_000), rng.randrange(256)) for _ in range(rng.randint(1, 3))]
            if kind == 7:  # interesting values into 32-bit fields
                parts = split(payload)
                val = rng.choice([0, 1, 0xFFFFFFFF, 0x7FFFFFFF, 1 << 20, 1 << 31])
                if rng.random() < 0.5:
                    off = rng.randrange(0, len(parts.fixed) - 3)
                    struct.pack_into("<I", parts.fixed, off, val)
                elif parts.chunks:
                    fields = parts.chunks[rng.randrange(len(parts.chunks))][0]
                    fields[rng.randrange(2)] = val
                mutant = parts.build()
            else:
                mutant = _mutate_bytes(payload, edits, fix=True)
        outcomes[_check_mutant(mutant)] += 1
    assert sum(outcomes.values()) == FUZZ_CASES
    # the fuzzer must reach many distinct checks, not just the checksums
    distinct_errors = [k for k in outcomes if k != "decoded"]
    assert len(distinct_errors) >= 20, outcomes.most_common()
    for deep in ["block scales", "padding bits", "zstd", "expected chunk", "unknown dtype"]:
        assert any(deep in k for k in distinct_errors), (deep, outcomes.most_common())
