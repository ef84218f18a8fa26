"""The delta codec: round trips, streaming, error feedback, and every rejection path."""

from __future__ import annotations

import random
import resource
import struct
import zlib

import pytest
import torch

from hypha import compress as C
from hypha.ops import _reference as R
from tests.unit.compress._payload import set_fixed, split

CODECS = ["fp32", "bf16", "int8", "int4", "int2"]
ALL_CODECS = CODECS + [c + "+zstd" for c in CODECS]


def _tensors(seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(37, 129, generator=g),  # odd shape, spans blocks and chunks
        torch.randn(5, 123, 123, generator=g).to(torch.bfloat16),
        torch.randn(1, generator=g).to(torch.float16),
        torch.randn(3, 0, 2, generator=g),  # empty
        torch.tensor(2.5),  # 0-dim
    ]


@pytest.mark.parametrize("codec", ALL_CODECS)
def test_round_trip_shapes_dtypes_and_error_bound(codec: str) -> None:
    ts = _tensors()
    out = C.decode(C.encode(ts, codec, chunk_elems=4096))
    assert [o.shape for o in out] == [t.shape for t in ts]
    assert [o.dtype for o in out] == [t.dtype for t in ts]
    spec = C.parse_codec(codec)
    for t, o in zip(ts, out, strict=True):
        if t.numel() == 0:
            continue
        x, y = t.float().reshape(-1), o.float().reshape(-1)
        if spec.name == "fp32":
            assert torch.equal(x, y)
        elif spec.name == "bf16":
            assert torch.equal(y, t.to(torch.bfloat16).float().reshape(-1).to(o.dtype).float())
        else:
            # RTN: every value is within half a step (absmax / (2 mid)) of its block's absmax
            mid = ((1 << spec.bits) - 1) / 2
            nb = R.num_blocks(x.numel(), spec.block_size)
            pad = torch.zeros(nb * spec.block_size)
            pad[: x.numel()] = x
            step = pad.view(nb, -1).abs().amax(1) / mid
            bound = (step / 2).repeat_interleave(spec.block_size)[: x.numel()]
            # plus the rounding of the output dtype for half-precision tensors
            slack = 1e-6 + ((x.abs() + bound) * 2**-7 if t.dtype != torch.float32 else 0)
            err = (x - y).abs()
            assert bool((err <= bound * 1.0001 + slack).all()), f"max excess {(err - bound).max()}"


@pytest.mark.parametrize("codec", ["int8", "int4", "int2"])
@pytest.mark.parametrize("stochastic", [False, True])
def test_decode_is_exactly_the_reference_dequantization(codec: str, stochastic: bool) -> None:
    x = torch.randn(10_000)
    spec = C.Codec(codec, stochastic=stochastic, block_size=64)
    out = C.decode(C.encode([x], spec, chunk_elems=640, seed=7))[0]
    from hypha.compress._encode import tensor_seed

    q = R.quantize(x, spec.bits, 64, stochastic=stochastic, seed=tensor_seed(7, 0))
    assert torch.equal(out, R.dequantize(q))


@pytest.mark.parametrize("codec", ["int4", "int2+zstd"])
def test_chunking_does_not_change_the_result(codec: str) -> None:
    x = [torch.randn(50_000), torch.randn(333)]
    spec = C.parse_codec(codec, stochastic=True)
    a = C.decode(C.encode(x, spec, chunk_elems=128, seed=3))
    b = C.decode(C.encode(x, spec, chunk_elems=1 << 20, seed=3))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))


def test_streaming_in_random_pieces_equals_whole() -> None:
    ts = _tensors(1)
    payload = C.encode(ts, "int4+zstd", chunk_elems=1024)
    rng = random.Random(0)
    dec = C.StreamDecoder()
    chunks = []
    pos = 0
    while pos < len(payload):
        step = rng.choice([1, 2, 7, 100, 5000])
        chunks += dec.feed(payload[pos : pos + step])
        pos += step
    header = dec.finish()
    assert dec.done and header.total_elems == sum(t.numel() for t in ts)
    whole = list(C.iter_chunks(payload))
    assert [(c.tensor, c.index, c.start, c.numel) for c in chunks] == [
        (c.tensor, c.index, c.start, c.numel) for c in whole
    ]
    assert all(torch.equal(a.values(), b.values()) for a, b in zip(chunks, whole, strict=True))


def test_iter_chunks_reads_file_like_and_iterables(tmp_path) -> None:
    x = [torch.randn(5000)]
    payload = C.encode(x, "int8", chunk_elems=1024)
    path = tmp_path / "p.bin"
    path.write_bytes(payload)
    with path.open("rb") as f:
        a = C.decode(f)[0]
    b = C.decode(iter([payload[:10], payload[10:]]))[0]
    assert torch.equal(a, b)


def test_bits_per_param_reports_the_wire() -> None:
    x = [torch.randn(1 << 16)]
    for codec, expected in [("fp32", 32), ("bf16", 16), ("int8", 8.25), ("int4", 4.25), ("int2", 2.25)]:
        bpp = C.bits_per_param(C.encode(x, codec))
        assert expected <= bpp < expected + 0.05, (codec, bpp)
    assert C.bits_per_param(C.encode([torch.zeros(1 << 16)], "int2+zstd")) < 0.2


def test_zstd_level_is_configurable() -> None:
    x = [torch.randn(1 << 14)]
    a = C.encode(x, "int8+zstd:1")
    b = C.encode(x, "int8+zstd:19")
    assert torch.equal(C.decode(a)[0], C.decode(b)[0])
    with pytest.raises(ValueError, match="zstd level"):
        C.parse_codec("int8+zstd:99")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("int3", "unknown codec"),
        ("int8+lz4", "unknown entropy stage"),
        ("int8+zstd:x", "bad zstd level"),
    ],
)
def test_bad_codec_specs(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        C.parse_codec(spec)


def test_bad_encode_arguments() -> None:
    with pytest.raises(ValueError, match="block_size"):
        C.Codec("int8", block_size=100)
    with pytest.raises(ValueError, match="multiple of the block size"):
        C.encode([torch.randn(10)], C.Codec("int8", block_size=64), chunk_elems=100)
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        C.encode([torch.arange(10)], "int8")
    with pytest.raises(ValueError, match="stochastic"):
        C.Codec("fp32", stochastic=True)
    with pytest.raises(ValueError, match="allow_nonfinite"):
        C.encode([torch.randn(10)], "int8", allow_nonfinite=True)


@pytest.mark.parametrize("codec", ALL_CODECS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nonfinite_input_is_refused(codec: str, bad: float) -> None:
    x = torch.randn(3000)
    x[2222] = bad
    with pytest.raises(C.NonFiniteError, match="NaN/Inf"):
        C.encode([torch.randn(10), x], codec, chunk_elems=1024)


def test_nonfinite_allowed_for_lossless_codecs() -> None:
    x = torch.tensor([1.0, float("nan"), float("inf")])
    y = C.decode(C.encode([x], "fp32", allow_nonfinite=True), allow_nonfinite=True)[0]
    assert torch.equal(x.isnan(), y.isnan()) and y[2] == float("inf")
    with pytest.raises(C.CodecError, match="NaN/Inf"):
        C.decode(C.encode([x], "fp32", allow_nonfinite=True))


# --- the fused pseudo-gradient path ---------------------------------------------------------------


@pytest.mark.parametrize("codec", ["int8", "int4", "int2", "int2+zstd", "bf16", "fp32"])
def test_encode_delta_error_feedback_identity(codec: str) -> None:
    g = [torch.randn(4097), torch.randn(17, 3)]
    local = [t - 0.01 * torch.randn_like(t) for t in g]
    ef = [0.001 * torch.randn_like(t) for t in g]
    delta = [(a - b) + e for a, b, e in zip(g, local, ef, strict=True)]
    payload = C.encode_delta(g, local, ef, codec, chunk_elems=1024)
    sent = C.decode(payload)
    for d, s, e in zip(delta, sent, ef, strict=True):
        # what went on the wire plus what stayed behind is the whole pseudo-gradient
        assert torch.allclose(s + e, d, rtol=0, atol=1e-7), (s + e - d).abs().max()
    assert [s.dtype for s in sent] == [torch.float32, torch.float32]


def test_encode_delta_matches_reference_kernel_bit_for_bit() -> None:
    g, local, ef = torch.randn(5000), torch.randn(5000), torch.randn(5000) * 0.01
    ef_ref = ef.clone()
    payload = C.encode_delta([g], [local], [ef], "int2", chunk_elems=1024)
    from hypha.compress._encode import tensor_seed

    qs = [
        R.encode_delta(g[s : s + 1024], local[s : s + 1024], ef_ref[s : s + 1024], 2, 128,
                       seed=tensor_seed(0, 0), offset=s)
        for s in range(0, 5000, 1024)
    ]
    expected = torch.cat([R.dequantize(q) for q in qs])
    assert torch.equal(C.decode(payload)[0], expected)
    assert torch.equal(ef, ef_ref)


def test_encode_delta_takes_bf16_locals() -> None:
    g = torch.randn(3000)
    local = g.to(torch.bfloat16)
    ef = torch.zeros(3000)
    sent = C.decode(C.encode_delta([g], [local], [ef], "int8"))[0]
    assert torch.allclose(sent + ef, g - local.float(), atol=1e-7)


def test_encode_delta_nan_changes_nothing() -> None:
    g = [torch.randn(3000), torch.randn(3000)]
    local = [t.clone() for t in g]
    local[1][2999] = float("nan")
    ef = [torch.randn(3000), torch.randn(3000)]
    before = [e.clone() for e in ef]
    with pytest.raises(C.NonFiniteError, match=r"locals_\[1\].*first at flat index 2999"):
        C.encode_delta(g, local, ef, "int2", chunk_elems=1024)
    assert all(torch.equal(a, b) for a, b in zip(ef, before, strict=True))


def test_encode_delta_argument_checks() -> None:
    g = [torch.randn(10)]
    with pytest.raises(ValueError, match="must match"):
        C.encode_delta(g, [], None, "int8")
    with pytest.raises(ValueError, match="shape"):
        C.encode_delta(g, [torch.randn(11)], None, "int8")
    with pytest.raises(ValueError, match="error_feedback"):
        C.encode_delta(g, [torch.randn(10)], [torch.zeros(10, dtype=torch.float64)], "int8")
    with pytest.raises(TypeError, match="float32"):
        C.encode_delta([torch.randn(10).half()], [torch.randn(10)], None, "int8")


def test_decode_accumulate_adds_chunk_by_chunk() -> None:
    xs = [torch.randn(3000), torch.randn(7, 11)]
    accs = [torch.ones(3000), torch.ones(7, 11)]
    for codec in ["int4", "bf16+zstd", "fp32"]:
        payload = C.encode(xs, codec, chunk_elems=1024)
        expected = [a + d for a, d in zip(accs, C.decode(payload), strict=True)]
        C.decode_accumulate(payload, accs)
        assert all(torch.equal(a, e) for a, e in zip(accs, expected, strict=True))


def test_decode_accumulate_rejects_mismatched_accumulators_before_touching_them() -> None:
    payload = C.encode([torch.randn(100)], "int8")
    acc = torch.zeros(99)
    with pytest.raises(C.CodecError, match="accumulator"):
        C.decode_accumulate(payload, [acc])
    assert not acc.any()
    with pytest.raises(C.CodecError, match="1 tensors, expected 2"):
        C.decode_accumulate(payload, [torch.zeros(100), torch.zeros(1)])
    with pytest.raises(ValueError, match="float32"):
        C.decode_accumulate(payload, [torch.zeros(100, dtype=torch.float64)])


# --- malformed input: each rejection path, with a clear message ------------------------------------


def _payload(codec: str = "int4", n: int = 3000) -> bytes:
    return C.encode([torch.randn(n), torch.randn(2, 50)], codec, chunk_elems=1024)


def _raises(payload: bytes, match: str, **kwargs) -> None:
    with pytest.raises(C.CodecError, match=match):
        C.decode(payload, **kwargs)


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"magic": b"NOPE"}, "not a Hypha codec payload"),
        ({"version": 2}, "unsupported wire format version 2"),
        ({"codec": 9}, "unknown codec id 9"),
        ({"flags": 0x80}, "unknown flags"),
        ({"reserved": 1}, "reserved header field"),
        ({"block": 100}, "invalid block size 100"),
        ({"block": 8192}, "invalid block size"),
        ({"chunk_elems": 1000}, "not a multiple of block size"),
        ({"chunk_elems": 0}, "chunk size 0"),
        ({"chunk_elems": 1 << 30}, "chunk size"),
        ({"ntensors": 1 << 20}, "tensors declared"),
        ({"table_len": 10_000}, "too long"),
        ({"ntensors": 3}, "table ends inside tensor 2"),
        ({"ntensors": 1}, "trailing bytes"),
    ],
)
def test_malformed_headers(fields: dict, match: str) -> None:
    parts = split(_payload())
    set_fixed(parts, **fields)
    _raises(parts.build(), match)


def test_header_fields_of_unquantized_codecs() -> None:
    parts = split(_payload("fp32"))
    set_fixed(parts, block=128)
    _raises(parts.build(), "carries no block size")
    parts = split(_payload("fp32"))
    set_fixed(parts, flags=2)
    _raises(parts.build(), "stochastic flag")


def test_table_entries() -> None:
    parts = split(_payload())
    parts.table[0] = 7
    _raises(parts.build(), "unknown dtype code 7")
    parts = split(_payload())
    parts.table[1] = 40
    _raises(parts.build(), "40 dimensions")
    parts = split(_payload())
    struct.pack_into("<Q", parts.table, 2, 1 << 40)
    _raises(parts.build(), "more than 2147483648 elements")


def test_limits_bound_what_the_header_may_declare() -> None:
    payload = _payload()
    _raises(payload, "more than 1000 elements", limits=C.DecodeLimits(max_total_elems=1000))
    _raises(payload, "2 tensors declared", limits=C.DecodeLimits(max_tensors=1))
    _raises(payload, "chunk size 1024", limits=C.DecodeLimits(max_chunk_elems=512))


def test_a_huge_declared_tensor_allocates_nothing() -> None:
    # a header claiming 2**31 fp32 elements (8 GiB), followed by nothing
    parts = split(_payload("fp32"))
    set_fixed(parts, ntensors=1, table_len=10)
    parts.table = bytearray(struct.pack("<BBQ", 0, 1, 1 << 31))
    parts.chunks = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _raises(parts.build(), "truncated payload")
    grown_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown_kib < 64 * 1024, f"decoder grew by {grown_kib} KiB on a bare header"


def test_header_checksum() -> None:
    payload = bytearray(_payload())
    payload[30] ^= 1  # inside the tensor table
    _raises(bytes(payload), "header checksum mismatch")


def test_chunk_checksum_and_framing() -> None:
    parts = split(_payload())
    parts.chunks[1][1][5] ^= 0x10
    _raises(parts.build(fix_crc=False), "chunk 1 of tensor 0: checksum mismatch")
    parts = split(_payload())
    parts.chunks[1], parts.chunks[2] = parts.chunks[2], parts.chunks[1]
    _raises(parts.build(), "chunks out of order")
    parts = split(_payload())
    parts.chunks.insert(1, parts.chunks[0])
    _raises(parts.build(), "expected chunk 1 of tensor 0, got chunk 0")
    parts = split(_payload())
    parts.chunks[0][1].extend(b"xx")
    _raises(parts.build(), "body of .* bytes, expected")


def test_trailing_and_truncated_data() -> None:
    payload = _payload()
    _raises(payload + b"\0", "trailing data")
    dec = C.StreamDecoder()
    dec.feed(payload)
    with pytest.raises(C.CodecError, match="trailing data"):
        dec.feed(b"x")
    for cut in range(len(payload)):
        if cut % 97 and cut > 100:
            continue  # every header prefix and a sample of the rest
        _raises(payload[:cut], "truncated payload")


def test_decoder_refuses_input_after_an_error() -> None:
    dec = C.StreamDecoder()
    with pytest.raises(C.CodecError):
        dec.feed(b"XXXX" + bytes(40))
    with pytest.raises(C.CodecError, match="already failed"):
        dec.feed(_payload())


def _rewrite_body(codec: str, edit) -> bytes:
    parts = split(_payload(codec))
    edit(parts.chunks[0][1])
    return parts.build()


def test_hostile_values_in_valid_frames() -> None:
    # NaN scale (first scale of int4 chunk)
    _raises(_rewrite_body("int4", lambda b: struct.pack_into("<f", b, 0, float("nan"))),
            "scales must be finite")
    _raises(_rewrite_body("int4", lambda b: struct.pack_into("<f", b, 4, -1.0)),
            "non-negative")
    _raises(_rewrite_body("fp32", lambda b: struct.pack_into("<f", b, 8, float("inf"))),
            "NaN/Inf")
    # padding bits of the last byte: 2 x 50 = 100 int2 values -> 25 bytes, no padding; use 3001
    payload = C.encode([torch.randn(3001)], "int2", chunk_elems=1024)
    parts = split(payload)
    parts.chunks[-1][1][-1] |= 0xC0
    _raises(parts.build(), "padding bits")


def test_zstd_frames_are_checked() -> None:
    def garbage(body: bytearray) -> None:
        body[:] = b"\x28\xb5\x2f\xfd" + bytes(20)

    _raises(_rewrite_body("int4+zstd", garbage), "zstd")

    import zstandard

    def lying_size(body: bytearray) -> None:
        body[:] = zstandard.ZstdCompressor().compress(bytes(10))

    _raises(_rewrite_body("int4+zstd", lying_size), "declares 10 bytes")

    def bomb(body: bytearray) -> None:  # no content size, inflates past the chunk
        c = zstandard.ZstdCompressor(write_content_size=False)
        body[:] = c.compress(bytes(1 << 22))

    _raises(_rewrite_body("int4+zstd", bomb), "zstd")


def test_codec_error_is_a_value_error_and_documented() -> None:
    assert issubclass(C.CodecError, ValueError)
    assert issubclass(C.NonFiniteError, C.CodecError)
    assert "CodecError" in C.__all__


def test_public_api_is_explicit() -> None:
    import hypha.compress

    exported = {n for n in dir(hypha.compress) if not n.startswith("_")}
    assert set(hypha.compress.__all__) <= exported
    assert {"encode", "decode", "StreamDecoder", "decode_accumulate", "CodecError"} <= set(
        hypha.compress.__all__
    )


def test_crc_helper_round_trips() -> None:
    # guards the test helper itself: split/build of an untouched payload is the identity
    payload = _payload("int2+zstd")
    assert split(payload).build() == payload
    assert zlib.crc32(payload) == zlib.crc32(split(payload).build(fix_crc=False))
