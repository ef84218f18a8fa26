"""The central parameter server: OuterServer against a pure-torch reference, DiLoCo workers that
stay bit-identical with it, contributions split and interleaved anyhow, late joiners, malformed
and partial contributions, fragment rotation, manual sync(), and checkpoints."""

from __future__ import annotations

import copy
import os
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import pytest
import torch
from torch import nn

import hypha.optim
from hypha import compress
from hypha.compress._format import CHUNK
from hypha.optim import (
    DiLoCo,
    ExchangeError,
    LocalParameterServer,
    LocalTransport,
    OuterServer,
    ServerLink,
)
from hypha.optim._exchange import (
    _ENVELOPE,
    _SHARD,
    _SHARD_NONE,
    _UPDATE,
    _UPDATE_NONE,
    pack_envelope,
)
from tests.unit.optim._run import IN, OUT, make_model, run_threads, train
from tests.unit.optim.test_diloco import reference_diloco

pytestmark = pytest.mark.timeout(120)

#: odd on purpose: none is a multiple of the quantizer block (128) or of the chunk (256), one
#: holds a single element, and the first spans three chunks
SHAPES = [(5, 123), (1,), (37,), (3, 7, 11), (130,)]
CHUNK_ELEMS = 256
#: fp32 results compared with a float64 reference: a round rounds each element a few times
#: (the sum, the Nesterov step, the update sent as new - g and added back to g, the last two
#: roundings of |g| ~ 1), so a few fp32 ulps of values of order 1 per round
RTOL, ATOL = 4e-6, 1e-7


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh random inputs on every run; the seed is printed (pytest shows it on a failure)."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator().manual_seed(seed)


def make_params(gen: torch.Generator) -> list[torch.Tensor]:
    return [torch.randn(s, generator=gen) for s in SHAPES]


def make_server(params: list[torch.Tensor], **kwargs: Any) -> OuterServer:
    kwargs = {"codec": "fp32", "chunk_elems": CHUNK_ELEMS, **kwargs}
    return OuterServer(params, **kwargs)


def segment_deltas(
    server: OuterServer, gen: torch.Generator, scale: float = 0.01
) -> list[torch.Tensor]:
    """A random pseudo-gradient of the server's current fragment, one flat tensor per segment."""
    shard = server.layout.shards[server.fragment][0]
    return [torch.randn(seg.numel, generator=gen) * scale for seg in shard.segments]


def contribution(
    server: OuterServer,
    deltas: list[torch.Tensor],
    *,
    codec: str | None = None,
    kind: int = _SHARD,
    round_: int | None = None,
    fragment: int | None = None,
    chunk_elems: int = CHUNK_ELEMS,
    allow_nonfinite: bool = False,
) -> bytes:
    envelope = pack_envelope(
        kind,
        server.fragment if fragment is None else fragment,
        server.round if round_ is None else round_,
    )
    return envelope + compress.encode(
        deltas,
        codec or str(server.codec),
        chunk_elems=chunk_elems,
        allow_nonfinite=allow_nonfinite,
    )


def run_round(
    server: OuterServer, payloads: Iterable[tuple[str, bytes]], finish: bool = True
) -> tuple[list[bytes], Any]:
    rnd = server.open_round()
    for sender, data in payloads:
        c = rnd.contribution(sender)
        c.feed(data)
        if finish:
            c.finish()
    return rnd.close()


def snapshot(server: OuterServer) -> dict[str, Any]:
    return copy.deepcopy(server.state_dict())


def assert_same_state(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert a["round"] == b["round"]
    for i, (x, y) in enumerate(zip(a["globals"], b["globals"], strict=True)):
        assert torch.equal(x, y), f"global {i}: max diff {(x - y).abs().max()}"
    assert torch.equal(a["momentum"], b["momentum"]), "the momentum differs"


def chunk_offsets(payload: bytes) -> list[int]:
    """Where each chunk frame starts in a codec payload, and where the last one ends."""
    offset = compress.read_header(payload).nbytes
    out = []
    while offset + CHUNK.size <= len(payload):
        out.append(offset)
        _, _, body_len, _ = CHUNK.unpack_from(payload, offset)
        offset += CHUNK.size + body_len
    return [*out, offset]


def split(data: bytes, gen: torch.Generator) -> list[bytes]:
    """``data`` in random pieces: single bytes, empty pieces, pieces across chunk boundaries."""
    pieces, at = [], 0
    while at < len(data):
        n = int(torch.randint(0, 200, (1,), generator=gen))
        pieces.append(data[at : at + n])
        at += n
    return pieces


class Reference:
    """The outer step in float64, plain torch: per chunk, the mean ``d`` of the contributions
    that delivered it, then ``v = mu v + d; p -= lr (mu v + d)`` (hypha/ops/_reference.py's
    nesterov_, torch.optim.SGD(nesterov=True))."""

    def __init__(self, server: OuterServer) -> None:
        self.server = server
        self.globals = [g.double().view(-1).clone() for g in server.global_tensors()]
        self.momentum = torch.zeros(server.layout.total, dtype=torch.float64)

    def round(self, contributions: list[tuple[list[torch.Tensor], int | None]]) -> None:
        """Each contribution: its segment deltas, and how many chunks of it were delivered
        (None: all)."""
        server = self.server
        shard = server.layout.shards[server.fragment][0]
        lr, mu = server.outer_lr, server.outer_momentum
        k, base = 0, 0
        for ti, seg in enumerate(shard.segments):
            for start in range(0, seg.numel, server.chunk_elems):
                stop = min(start + server.chunk_elems, seg.numel)
                got = [d[ti][start:stop].double() for d, n in contributions if n is None or k < n]
                if got:
                    d = sum(got) / len(got)
                    at = shard.owner_offset + base + start
                    v = self.momentum[at : at + stop - start]
                    v.mul_(mu).add_(d)
                    self.globals[seg.param][seg.start + start : seg.start + stop] -= lr * (
                        mu * v + d
                    )
                k += 1
            base += seg.numel

    def check(self) -> None:
        for i, (got, want) in enumerate(
            zip(self.server.global_tensors(), self.globals, strict=True)
        ):
            torch.testing.assert_close(
                got.view(-1).double(),
                want,
                rtol=RTOL,
                atol=ATOL,
                msg=lambda m, i=i: f"global {i}: {m}",
            )
        torch.testing.assert_close(
            self.server.state_dict()["momentum"].double(), self.momentum, rtol=RTOL, atol=ATOL
        )


# --- the server alone ----------------------------------------------------------------------------


def test_fp32_round_matches_the_reference(gen: torch.Generator) -> None:
    server = make_server(make_params(gen), outer_lr=0.7, outer_momentum=0.9)
    ref = Reference(server)
    for r in range(4):
        deltas = [segment_deltas(server, gen) for _ in range(3)]
        ref.round([(d, None) for d in deltas])
        pieces, stats = run_round(
            server, [(f"w{i}", contribution(server, d)) for i, d in enumerate(deltas)]
        )
        assert stats.round == r and stats.contributors == 3 and stats.partial == 0
        assert stats.chunks == stats.chunks_updated == 1 + 1 + 1 + 1 + 3  # 615 elems = 3 chunks
        assert stats.update_bytes == sum(map(len, pieces))
        assert pieces[0][: _ENVELOPE.size] == pack_envelope(_UPDATE, 0, r)
        ref.check()
    assert server.round == 4


@pytest.mark.parametrize("codec", ["fp32", "int2", "int8+zstd"])
def test_split_pieces_give_the_same_round(codec: str, gen: torch.Generator) -> None:
    """Pieces split anywhere, senders one after the other: bit for bit the same round."""
    params = make_params(gen)
    a, b = make_server(params, codec=codec), make_server(params, codec=codec)
    deltas = [segment_deltas(a, gen) for _ in range(3)]
    payloads = [(f"w{i}", contribution(a, d)) for i, d in enumerate(deltas)]
    whole, _ = run_round(a, payloads)
    rnd = b.open_round()
    for sender, data in payloads:
        c = rnd.contribution(sender)
        for piece in split(data, gen):
            c.feed(memoryview(piece))
        assert c.complete
        c.finish()
    pieces, stats = rnd.close()
    assert b"".join(pieces) == b"".join(whole)
    assert stats.contributors == 3
    assert_same_state(snapshot(a), snapshot(b))


def test_interleaved_senders_give_the_same_round(gen: torch.Generator) -> None:
    """Senders interleaved piece by piece: the sum of a chunk runs in arrival order, so fp32
    results agree with sequential feeding up to the order of a 3-term fp32 sum (an ulp or two of
    the partial sums) — well within the reference tolerance."""
    params = make_params(gen)
    a, b = make_server(params), make_server(params)
    ref = Reference(a)
    deltas = [segment_deltas(a, gen) for _ in range(3)]
    payloads = [(f"w{i}", contribution(a, d)) for i, d in enumerate(deltas)]
    run_round(a, payloads)
    rnd = b.open_round()
    queues = {s: split(data, gen) for s, data in payloads}
    contribs = {s: rnd.contribution(s) for s, _ in payloads}
    while queues:
        names = sorted(queues)
        s = names[int(torch.randint(0, len(names), (1,), generator=gen))]
        contribs[s].feed(queues[s].pop(0))
        if not queues[s]:
            del queues[s]
    for c in contribs.values():
        c.finish()
    _, stats = rnd.close()
    assert stats.contributors == 3
    ref.round([(d, None) for d in deltas])
    ref.check()
    sa, sb = snapshot(a), snapshot(b)
    for x, y in zip(sa["globals"], sb["globals"], strict=True):
        torch.testing.assert_close(x, y, rtol=RTOL, atol=ATOL)


def test_no_contribution_is_an_empty_update(gen: torch.Generator) -> None:
    server = make_server(make_params(gen))
    before = snapshot(server)
    pieces, stats = server.open_round().close()
    assert pieces == [pack_envelope(_UPDATE_NONE, 0, 0)]
    assert (stats.contributors, stats.chunks_updated, server.round) == (0, 0, 1)
    # abstentions, and a contribution refused at its envelope, deliver nothing either
    rnd = server.open_round()
    rnd.contribution("sick").feed(pack_envelope(_SHARD_NONE, 0, 1))
    with pytest.raises(ExchangeError, match="speaks"):
        rnd.contribution("junk").feed(b"JUNK" + bytes(40))
    pieces, stats = rnd.close()
    assert pieces == [pack_envelope(_UPDATE_NONE, 0, 1)]
    assert (stats.abstained, stats.failed, stats.contributors) == (1, 1, 0)
    after = snapshot(server)
    assert after["round"] == 2
    before["round"] = 2
    assert_same_state(before, after)


def test_partial_contributions_count_for_the_chunks_they_delivered(gen: torch.Generator) -> None:
    server = make_server(make_params(gen))
    ref = Reference(server)
    full, cut = segment_deltas(server, gen), segment_deltas(server, gen)
    data = contribution(server, cut)
    body = data[_ENVELOPE.size :]
    offsets = chunk_offsets(body)
    # cut off in the middle of chunk 2 (the third of tensor 0): chunks 0 and 1 arrived
    cut_at = _ENVELOPE.size + offsets[2] + 10
    rnd = server.open_round()
    rnd.contribution("full").feed(contribution(server, full))
    partial = rnd.contribution("partial")
    partial.feed(data[:cut_at])
    assert not partial.complete and partial.chunks == 2
    with pytest.raises(ExchangeError, match="truncated"):
        partial.finish()
    _, stats = rnd.close()
    assert (stats.contributors, stats.partial, stats.failed) == (1, 1, 1)
    assert rnd.counts[:3] == [2, 2, 1] and set(rnd.counts[3:]) == {1}
    ref.round([(full, None), (cut, 2)])
    ref.check()

    # a round where only a partial contribution came: the chunks nobody delivered get no step,
    # their momentum is untouched and their global values do not move by a bit
    before = snapshot(server)
    only = segment_deltas(server, gen)
    data = contribution(server, only)
    cut_at = _ENVELOPE.size + chunk_offsets(data[_ENVELOPE.size :])[1] + 3
    rnd = server.open_round()
    rnd.contribution("partial").feed(data[:cut_at])
    _, stats = rnd.close()
    assert (stats.partial, stats.chunks_updated) == (1, 1)
    ref.round([(only, 1)])
    ref.check()
    after = snapshot(server)
    first = CHUNK_ELEMS  # chunk 0 is the first 256 elements of tensor 0
    assert torch.equal(after["globals"][0].view(-1)[first:], before["globals"][0].view(-1)[first:])
    for x, y in zip(after["globals"][1:], before["globals"][1:], strict=True):
        assert torch.equal(x, y)
    assert torch.equal(after["momentum"][first:], before["momentum"][first:])
    assert not torch.equal(after["momentum"][:first], before["momentum"][:first])


def _nan_fp32(server: OuterServer, deltas: list[torch.Tensor]) -> bytes:
    bad = [d.clone() for d in deltas]
    bad[0][CHUNK_ELEMS + 44] = float("nan")  # tensor 0, chunk 1
    return contribution(server, bad, allow_nonfinite=True)


def _overflowing_int8(server: OuterServer, deltas: list[torch.Tensor]) -> bytes:
    """Valid bytes (CRC and all) whose chunk 1 decodes to ±inf: a block scale of 3e38."""
    data = bytearray(contribution(server, deltas))
    at = _ENVELOPE.size + chunk_offsets(bytes(data[_ENVELOPE.size :]))[1]
    tensor, index, body_len, _ = CHUNK.unpack_from(data, at)
    body = bytearray(data[at + CHUNK.size : at + CHUNK.size + body_len])
    body[0:4] = struct.pack("<f", 3e38)
    CHUNK.pack_into(data, at, tensor, index, body_len, zlib.crc32(body))
    data[at + CHUNK.size : at + CHUNK.size + body_len] = body
    return bytes(data)


def _bad_cases() -> list[
    tuple[str, str, Callable[[OuterServer, list[torch.Tensor]], bytes], str, int]
]:
    """(name, server codec, bad payload, error, chunks of it that count)."""
    return [
        ("bad magic", "int2", lambda s, d: b"HYDX" + contribution(s, d)[4:], "speaks", 0),
        ("wrong round", "int2", lambda s, d: contribution(s, d, round_=7), "round 7", 0),
        ("wrong fragment", "int2", lambda s, d: contribution(s, d, fragment=1), "fragment 1", 0),
        ("wrong kind", "int2", lambda s, d: contribution(s, d, kind=_UPDATE), "outer update", 0),
        ("wrong shapes", "int2", lambda s, d: contribution(s, d[:-1]), "carries 4 tensors", 0),
        ("wrong codec", "int2", lambda s, d: contribution(s, d, codec="int4"), "int4", 0),
        (
            "wrong chunking",
            "int2",
            lambda s, d: contribution(s, d, chunk_elems=128),
            "chunks of 128",
            0,
        ),
        ("trailing bytes", "fp32", lambda s, d: contribution(s, d) + b"!", "trailing", 7),
        (
            "bytes after abstention",
            "fp32",
            lambda s, d: pack_envelope(_SHARD_NONE, 0, 0) + b"x",
            "after an abstention",
            0,
        ),
        ("NaN in an fp32 chunk", "fp32", _nan_fp32, "NaN/Inf", 1),
        ("overflowing int8 chunk", "int8", _overflowing_int8, "NaN/Inf", 1),
    ]


@pytest.mark.parametrize(
    ("name", "codec", "make_bad", "match", "counted"),
    _bad_cases(),
    ids=[c[0] for c in _bad_cases()],
)
@pytest.mark.parametrize("pieces", ["whole", "split"])
def test_malformed_contributions_are_refused(
    pieces: str,
    name: str,
    codec: str,
    make_bad: Callable[[OuterServer, list[torch.Tensor]], bytes],
    match: str,
    counted: int,
    gen: torch.Generator,
) -> None:
    """Each is refused with an ExchangeError that says what is wrong, and the round closes as if
    the bad chunk (and everything after it) had never been sent, however the bytes were split
    (in one piece, the chunks before the bad one still count)."""
    params = make_params(gen)
    fragments = 2 if name == "wrong fragment" else 1
    hit, clean = (make_server(params, codec=codec, fragments=fragments) for _ in range(2))
    good = [segment_deltas(hit, gen) for _ in range(2)]
    bad_deltas = segment_deltas(hit, gen)
    bad = make_bad(hit, bad_deltas)

    rnd = hit.open_round()
    for i, d in enumerate(good):
        rnd.contribution(f"good{i}").feed(contribution(hit, d))
    c = rnd.contribution("bad")
    with pytest.raises(ExchangeError, match=match):
        for piece in [bad] if pieces == "whole" else split(bad, gen):
            c.feed(piece)
        c.finish()
    assert c.error is not None and not c.complete and c.chunks == counted
    with pytest.raises(ExchangeError, match="already refused"):
        c.feed(b"")
    hit_update, stats = rnd.close()
    assert stats.failed == 1 and stats.contributors == 2

    # the same round without the bad bytes: the good ones, then what of the bad one counted
    rnd = clean.open_round()
    for i, d in enumerate(good):
        rnd.contribution(f"good{i}").feed(contribution(clean, d))
    if counted:
        offsets = chunk_offsets(bad[_ENVELOPE.size :])
        rnd.contribution("bad").feed(bad[: _ENVELOPE.size + offsets[counted]])
    clean_update, _ = rnd.close()
    assert b"".join(hit_update) == b"".join(clean_update)
    assert_same_state(snapshot(hit), snapshot(clean))


def test_round_misuse(gen: torch.Generator) -> None:
    server = make_server(make_params(gen))
    rnd = server.open_round()
    with pytest.raises(RuntimeError, match="still open"):
        server.open_round()
    rnd.contribution("a")
    with pytest.raises(ValueError, match="'a' already contributed"):
        rnd.contribution("a")
    late = rnd.contribution("late")
    rnd.close()
    with pytest.raises(ExchangeError, match="closed"):
        late.feed(pack_envelope(_SHARD, 0, 0))
    with pytest.raises(RuntimeError, match="closed"):
        rnd.contribution("b")
    again = server.open_round()
    again.discard()  # nothing changes, the same round opens again
    assert server.round == 1 and server.open_round().round == 1


def test_fragments_rotate(gen: torch.Generator) -> None:
    server = make_server(make_params(gen), fragments=2)
    ref = Reference(server)
    for r in range(4):
        assert server.fragment == r % 2
        before = snapshot(server)
        deltas = [segment_deltas(server, gen) for _ in range(2)]
        ref.round([(d, None) for d in deltas])
        run_round(server, [(f"w{i}", contribution(server, d)) for i, d in enumerate(deltas)])
        ref.check()
        # nothing outside the fragment moved
        after = snapshot(server)
        touched = [torch.zeros(g.numel(), dtype=torch.bool) for g in after["globals"]]
        for seg in server.layout.fragment_segments(r % 2):
            touched[seg.param][seg.start : seg.stop] = True
        for i, (x, y) in enumerate(zip(after["globals"], before["globals"], strict=True)):
            assert torch.equal(x.view(-1)[~touched[i]], y.view(-1)[~touched[i]])
        shard = server.layout.shards[1 - r % 2][0]
        lo = shard.owner_offset
        assert torch.equal(
            after["momentum"][lo : lo + shard.numel], before["momentum"][lo : lo + shard.numel]
        )


def test_server_arguments() -> None:
    p = [torch.zeros(3)]
    for kwargs, error, match in [
        ({"codec": "int3"}, ValueError, "unknown codec"),
        ({"fragments": 0}, ValueError, "Invalid fragments"),
        ({"outer_lr": -1.0}, ValueError, "Invalid outer_lr"),
        ({"outer_momentum": 1.0}, ValueError, "Invalid outer_momentum"),
        ({"chunk_elems": 100, "codec": "int4"}, ValueError, "multiple of the block size"),
        ({"backend": "gpu"}, ValueError, "Invalid backend"),
    ]:
        with pytest.raises(error, match=match):
            OuterServer(p, **kwargs)
    with pytest.raises(ValueError, match="at least one"):
        OuterServer([])
    with pytest.raises(TypeError, match=r"dtype torch\.int64"):
        OuterServer([torch.zeros(3, dtype=torch.int64)])
    with pytest.raises(ValueError, match="NaN/Inf"):
        OuterServer([torch.tensor([1.0, float("inf")])])
    with pytest.raises(ValueError, match="Invalid workers"):
        LocalParameterServer(OuterServer(p), workers=0)


def test_exports() -> None:
    for name in (
        "OuterServer",
        "ServerRound",
        "Contribution",
        "RoundStats",
        "LocalServerLink",
        "LocalParameterServer",
        "ServerLink",
    ):
        assert name in hypha.optim.__all__ and hasattr(hypha.optim, name)
    assert all(hasattr(hypha.optim, name) for name in hypha.optim.__all__)


# --- checkpoints ---------------------------------------------------------------------------------


def test_checkpoint_round_trip(tmp_path: Any, gen: torch.Generator) -> None:
    params = make_params(gen)
    server = make_server(params, codec="int4", fragments=2, outer_lr=0.5)
    assert server.last_update is None
    for _ in range(3):
        last, _ = run_round(server, [("w", contribution(server, segment_deltas(server, gen)))])
    # the last round's update is kept, as sent, so a resumed server can send it again
    assert server.last_update == b"".join(last)
    path = tmp_path / "ps.pt"
    server.save(path)
    like = [torch.zeros(s) for s in SHAPES]  # only the shapes count
    restored = OuterServer.load(path, like, codec="int4", fragments=2, chunk_elems=CHUNK_ELEMS)
    assert (restored.round, restored.fragment, restored.outer_lr) == (3, 1, 0.5)
    assert restored.last_update == server.last_update
    assert_same_state(snapshot(server), snapshot(restored))
    assert restored.initial_payload() == server.initial_payload()
    # and the next round is the same on both
    d = segment_deltas(server, gen)
    a, _ = run_round(server, [("w", contribution(server, d))])
    b, _ = run_round(restored, [("w", contribution(restored, d))])
    assert a == b
    assert_same_state(snapshot(server), snapshot(restored))
    assert os.listdir(tmp_path) == ["ps.pt"]


def test_checkpoint_with_other_settings_is_refused(tmp_path: Any, gen: torch.Generator) -> None:
    params = make_params(gen)
    path = tmp_path / "ps.pt"
    make_server(params, codec="int4").save(path)
    with pytest.raises(
        ValueError, match=r"codec: the checkpoint has 'int4', this server 'int2'"
    ) as e:
        OuterServer.load(path, params, codec="int2", fragments=2, chunk_elems=CHUNK_ELEMS)
    assert "fragments: the checkpoint has 1, this server 2" in str(e.value)
    assert "chunk_elems" not in str(e.value)
    with pytest.raises(ValueError, match="numels"):
        OuterServer.load(path, params[:-1], codec="int4", chunk_elems=CHUNK_ELEMS)
    server = make_server(params, codec="int4")
    state = server.state_dict()
    for edit, match in [
        (lambda s: s.update(version=9), "version 9"),
        (lambda s: s.update(round=-1), "round is -1"),
        (lambda s: s["globals"].pop(), "holds 4 global tensors"),
        (lambda s: s["globals"].__setitem__(1, torch.zeros(2)), "global tensor 1"),
        (lambda s: s["momentum"].__setitem__(0, float("nan")), "momentum holds NaN"),
        (lambda s: s.pop("momentum"), "not an OuterServer state_dict"),
        (lambda s: s.update(outer_momentum=2.0), "Invalid outer_momentum"),
    ]:
        broken = copy.deepcopy(state)
        edit(broken)
        with pytest.raises(ValueError, match=match):
            server.load_state_dict(broken)
    assert_same_state(snapshot(server), state)
    server.open_round()
    with pytest.raises(RuntimeError, match="open"):
        server.load_state_dict(state)


@pytest.mark.parametrize("failure", ["torch.save", "fsync", "replace"])
def test_a_failed_save_leaves_the_checkpoint_alone(
    failure: str, tmp_path: Any, monkeypatch: pytest.MonkeyPatch, gen: torch.Generator
) -> None:
    server = make_server(make_params(gen))
    path = tmp_path / "ps.pt"
    server.save(path)
    good = path.read_bytes()
    run_round(server, [("w", contribution(server, segment_deltas(server, gen)))])

    def boom(*args: Any, **kwargs: Any) -> None:
        if failure == "torch.save":
            args[1].write(b"half a checkpoint")
        raise OSError(f"injected {failure} failure")

    target = {"torch.save": (torch, "save"), "fsync": (os, "fsync"), "replace": (os, "replace")}
    monkeypatch.setattr(*target[failure], boom)
    with pytest.raises(OSError, match="injected"):
        server.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == good
    assert os.listdir(tmp_path) == ["ps.pt"]  # no temporary file left behind
    assert (
        OuterServer.load(path, make_params(gen), codec="fp32", chunk_elems=CHUNK_ELEMS).round == 0
    )


# --- DiLoCo workers and a server ---------------------------------------------------------------


class OddModel(nn.Module):
    """13x37, 37, 3x37, 3 and a 1-element gain: odd sizes on purpose."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w1 = nn.Parameter(torch.randn(37, IN, generator=g) * 0.3)
        self.b1 = nn.Parameter(torch.randn(37, generator=g) * 0.1)
        self.w2 = nn.Parameter(torch.randn(OUT, 37, generator=g) * 0.3)
        self.b2 = nn.Parameter(torch.randn(OUT, generator=g) * 0.1)
        self.gain = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ self.w1.T + self.b1) @ self.w2.T + self.b2) * self.gain


def worker(link: ServerLink | LocalTransport, seed: int, **kwargs: Any) -> tuple[OddModel, DiLoCo]:
    model = OddModel(seed)
    kwargs = {"chunk_elems": CHUNK_ELEMS, "timeout": 30.0, **kwargs}
    return model, DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), link, **kwargs)


def assert_matches_server(opts: list[DiLoCo], server: OuterServer) -> None:
    for rank, opt in enumerate(opts):
        for i, (a, b) in enumerate(
            zip(opt.global_parameters(), server.global_tensors(), strict=True)
        ):
            assert torch.equal(a, b), f"worker {rank} tensor {i}: max diff {(a - b).abs().max()}"


@pytest.mark.parametrize(
    ("codec", "fragments", "overlap"),
    [("int2", 1, 0), ("fp32", 1, 0), ("int4+zstd", 2, 1)],
)
def test_workers_stay_bit_identical_with_the_server(
    codec: str, fragments: int, overlap: int
) -> None:
    n, rounds, interval = 3, 4, 2
    server = OuterServer(
        list(OddModel(0).parameters()), codec=codec, fragments=fragments, chunk_elems=CHUNK_ELEMS
    )
    with LocalParameterServer(server, workers=n, timeout=30) as ps:
        links = [ps.connect(f"w{r}") for r in range(n)]
        opts: list[DiLoCo] = []
        models: list[OddModel] = []
        for r in range(n):
            model, opt = worker(
                links[r],
                seed=r + 1,
                codec=codec,
                sync_every=interval * fragments,
                fragments=fragments,
                overlap_steps=overlap,
            )
            models.append(model)
            opts.append(opt)
            # every worker starts from the server's model, whatever its own seed
            assert_matches_server([opt], server)
            assert all(
                torch.equal(p, g)
                for p, g in zip(model.parameters(), opt.global_parameters(), strict=True)
            )
        mismatches: list[str] = []

        def check() -> None:
            try:
                assert_matches_server(opts, server)
            except AssertionError as exc:
                mismatches.append(str(exc))

        barrier = threading.Barrier(n, action=check)

        def work(rank: int) -> None:
            for r in range(rounds):
                train(models[rank], opts[rank], rank, range(r * interval, (r + 1) * interval))
                opts[rank].synchronize()
                barrier.wait(timeout=60)

        run_threads(work, n)
    assert mismatches == []
    assert ps.errors == [] and ps.late == []
    assert [(s.round, s.fragment, s.contributors) for s in ps.history] == [
        (r, r % fragments, n) for r in range(rounds)
    ]
    assert server.round == rounds
    for opt in opts:
        assert opt.stats.outer_rounds == rounds
        assert opt.stats.bytes_sent > 0 and opt.stats.bytes_received > 0


def test_fp32_workers_follow_plain_diloco() -> None:
    """fp32: the server's model is DiLoCo written out in plain torch (rank-order mean there,
    arrival order here: the same up to fp32 summation order, see RTOL)."""
    n, steps, sync_every = 3, 8, 4
    server = OuterServer(list(make_model(seed=0).parameters()), codec="fp32")
    with LocalParameterServer(server, workers=n, timeout=30) as ps:
        links = [ps.connect() for _ in range(n)]

        def work(rank: int) -> None:
            model = make_model(seed=rank + 5)
            opt = DiLoCo(
                torch.optim.AdamW(model.parameters(), lr=1e-2),
                links[rank],
                sync_every=sync_every,
                codec="fp32",
            )
            train(model, opt, rank, range(steps))

        run_threads(work, n)
    expected = reference_diloco(n, steps, sync_every)
    for got, want in zip(server.global_tensors(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_late_joiner_starts_from_the_server() -> None:
    server = OuterServer(
        list(OddModel(0).parameters()), codec="int4", fragments=2, chunk_elems=CHUNK_ELEMS
    )
    kwargs: dict[str, Any] = {"codec": "int4", "sync_every": 4, "fragments": 2, "overlap_steps": 0}
    with LocalParameterServer(server, workers=2, timeout=30) as ps:
        links = [ps.connect() for _ in range(3)]
        early = [worker(links[r], seed=r + 1, **kwargs) for r in range(2)]
        run_threads(lambda r: train(*early[r], r, range(6)), 2)  # rounds 0, 1, 2
        assert server.round == 3
        model, opt = worker(links[2], seed=99, **kwargs)
        assert opt.state_dict()["diloco"]["round"] == 3
        assert_matches_server([opt], server)
        for p, g in zip(model.parameters(), server.global_tensors(), strict=True):
            assert torch.equal(p.detach(), g)
        ps.workers = 3
        everyone = [*early, (model, opt)]
        start = [6, 6, 0]
        run_threads(lambda r: train(*everyone[r], r, range(start[r], start[r] + 4)), 3)
        assert_matches_server([o for _, o in everyone], server)
    # the joiner's first round was round 3, fragment 1, in step with the others
    assert [(s.round, s.fragment, s.contributors) for s in ps.history[3:]] == [
        (3, 1, 3),
        (4, 0, 3),
    ]
    assert ps.errors == []


def test_a_nan_worker_abstains(gen: torch.Generator) -> None:
    server = OuterServer(list(OddModel(0).parameters()), codec="int8", chunk_elems=CHUNK_ELEMS)
    with LocalParameterServer(server, workers=2, timeout=30) as ps:
        pair = [worker(ps.connect(), seed=r, codec="int8", sync_every=2) for r in range(2)]
        train(*pair[0], 0, range(1))
        train(*pair[1], 1, range(1))
        with torch.no_grad():
            pair[1][0].w1.view(-1)[3] = float("nan")

        # NOTE: warnings are process-wide state: catch them here, not in the worker thread
        with pytest.warns(RuntimeWarning, match="this worker: parameters held NaN/Inf"):
            run_threads(lambda r: train(*pair[r], r, range(1, 2)), 2)
        assert_matches_server([o for _, o in pair], server)
        model = pair[1][0]
        for p, g in zip(model.parameters(), server.global_tensors(), strict=True):
            assert torch.equal(p.detach(), g)  # restarted from the global model
    assert (ps.history[0].contributors, ps.history[0].abstained) == (1, 1)


def test_the_local_server_closes_a_round_after_its_timeout(gen: torch.Generator) -> None:
    server = make_server(make_params(gen))
    with LocalParameterServer(server, workers=3, timeout=0.2) as ps:
        links = [ps.connect() for _ in range(3)]
        for link in links[:2]:
            link.push(0, [contribution(server, segment_deltas(server, gen))])
        t0 = time.monotonic()
        update = b"".join(links[0].pull(0, timeout=10))
        assert time.monotonic() - t0 < 5
        assert update[: _ENVELOPE.size] == pack_envelope(_UPDATE, 0, 0)
        # the third worker's push came too late: dropped, but it gets the round's update too
        links[2].push(0, [contribution(server, segment_deltas(server, gen), round_=0)])
        assert b"".join(links[2].pull(0, timeout=10)) == update
        deadline = time.monotonic() + 10
        while not ps.late and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ps.late == [(0, "worker-2")]
        assert links[0].bytes_received == len(update)
    assert ps.history[0].contributors == 2
    with pytest.raises(ConnectionError, match="stopped"):
        links[0].pull(1, timeout=1)


# --- manual sync() -------------------------------------------------------------------------------


def _train_syncing(model: OddModel, opt: DiLoCo, rank: int, steps: int, every: int) -> None:
    for step in range(steps):
        train(model, opt, rank, range(step, step + 1))
        if (step + 1) % every == 0:
            opt.sync()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "int4", "sync_every": 3},
        {"codec": "int2", "sync_every": 4, "fragments": 2, "overlap_steps": 1},
    ],
)
def test_manual_sync_with_a_transport_is_sync_every(kwargs: dict[str, Any]) -> None:
    """sync() every k steps runs exactly the rounds sync_every=k * fragments would."""
    n, steps = 2, 12
    every = kwargs["sync_every"] // kwargs.get("fragments", 1)

    def run(manual: bool) -> list[tuple[list[torch.Tensor], list[torch.Tensor]]]:
        comms = LocalTransport.create(n)

        def work(rank: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            opts = {**kwargs, "sync_every": None} if manual else kwargs
            model, opt = worker(comms[rank], seed=rank, **opts)
            if manual:
                _train_syncing(model, opt, rank, steps, every)
            else:
                train(model, opt, rank, range(steps))
            opt.synchronize()
            assert opt.stats.outer_rounds == steps // every
            return [g.clone() for g in opt.global_parameters()], [
                p.detach().clone() for p in model.parameters()
            ]

        return run_threads(work, n)

    for (g1, l1), (g2, l2) in zip(run(False), run(True), strict=True):
        assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
        assert all(torch.equal(a, b) for a, b in zip(l1, l2, strict=True))


def test_manual_sync_with_a_server() -> None:
    def run(manual: bool) -> tuple[OuterServer, OddModel, DiLoCo]:
        server = OuterServer(list(OddModel(0).parameters()), codec="int2", chunk_elems=CHUNK_ELEMS)
        with LocalParameterServer(server, workers=1, timeout=30) as ps:
            model, opt = worker(
                ps.connect(), seed=1, codec="int2", sync_every=None if manual else 3
            )
            if manual:
                for step in range(9):
                    train(model, opt, 0, range(step, step + 1))
                    if step % 3 == 2:
                        opt.sync()  # overlap 0: merged when it returns
                        for p, g in zip(model.parameters(), opt.global_parameters(), strict=True):
                            assert torch.equal(p.detach(), g)
            else:
                train(model, opt, 0, range(9))
        return server, model, opt

    (s1, m1, o1), (s2, m2, o2) = run(False), run(True)
    assert s1.round == s2.round == 3
    assert_matches_server([o1, o2], s1)
    for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_manual_sync_arguments() -> None:
    comm = LocalTransport.create(1)[0]
    _, opt = worker(comm, 0, sync_every=None, fragments=3)
    assert (opt.fragments, opt.overlap_steps, opt.merge_alpha) == (3, 1, 0.5)
    model, opt = worker(comm, 0, sync_every=None)
    train(model, opt, 0, range(10))
    assert opt.stats.outer_rounds == 0  # step() never starts a round
    _, opt = worker(comm, 0, sync_every=None, overlap_steps=50)
    assert opt.overlap_steps == 50
    with pytest.raises(ValueError, match="Invalid overlap_steps: -1 \\(a non-negative int\\)"):
        worker(comm, 0, sync_every=None, overlap_steps=-1)
    with pytest.raises(ValueError, match="Invalid sync_every: 0"):
        worker(comm, 0, sync_every=0)
    _, opt = worker(comm, 0, sync_every=5)
    with pytest.raises(RuntimeError, match="sync_every=None"):
        opt.sync()


# --- the worker's side of the protocol -------------------------------------------------------------


class ScriptedLink(ServerLink):
    """A server that answers from a script: its initial model, then the given updates."""

    def __init__(self, initial: list[bytes], updates: list[list[bytes]] | None = None) -> None:
        super().__init__()
        self.initial, self.updates = initial, list(updates or [])
        self.pushed: list[tuple[int, bytes]] = []

    def push(self, round_: int, payload: Iterable[bytes]) -> None:
        self.pushed.append((round_, b"".join(payload)))

    def pull(self, round_: int, timeout: float) -> Iterator[bytes]:
        if not self.updates:
            raise TimeoutError(f"no update of round {round_} within {timeout} s")
        return iter(self.updates.pop(0))

    def pull_initial(self, timeout: float) -> Iterator[bytes]:
        return iter(self.initial)


def test_join_checks_the_servers_settings() -> None:
    server = OuterServer(list(OddModel(0).parameters()), codec="int4", fragments=2)
    with pytest.raises(ValueError, match="codec: the server has 'int4', this worker 'int2'") as e:
        worker(
            ScriptedLink(server.initial_payload()),
            1,
            codec="int2",
            sync_every=4,
            fragments=2,
            chunk_elems=1 << 20,
        )
    assert "fragments" not in str(e.value)
    other = OuterServer([torch.zeros(7)], codec="int4")
    with pytest.raises(ValueError, match="numels") as e:
        worker(ScriptedLink(other.initial_payload()), 1, codec="int4", chunk_elems=1 << 20)
    assert "chunk_elems" not in str(e.value)
    for bad, match in [
        ([b"HYDX" + server.initial_payload()[0][4:]], "speaks"),
        ([server.initial_payload()[0][:30]], "ended after"),
        (server.initial_payload()[:-1], "truncated"),
    ]:
        with pytest.raises(ExchangeError, match=match):
            worker(
                ScriptedLink(bad), 1, codec="int4", sync_every=4, fragments=2, chunk_elems=1 << 20
            )


def test_a_bad_update_fails_the_worker(gen: torch.Generator) -> None:
    server = OuterServer(list(OddModel(0).parameters()), codec="int4", chunk_elems=CHUNK_ELEMS)
    good = b"".join(server.initial_payload())
    pieces = split(good, gen)  # the initial model may come in any pieces too

    def update(round_: int) -> list[bytes]:
        s = OuterServer(list(OddModel(0).parameters()), codec="int4", chunk_elems=CHUNK_ELEMS)
        for _ in range(round_):
            s.open_round().close()
        rnd = s.open_round()
        rnd.contribution("w").feed(contribution(s, segment_deltas(s, gen)))
        return rnd.close()[0]

    ok = update(0)
    for updates, match in [
        ([update(1)], "out of step: it sent outer update for round 1"),
        ([[ok[0][:-3]]], "truncated"),
        ([[ok[0], bytes([ok[1][0] ^ 1]) + ok[1][1:], *ok[2:]]], "out of order|checksum|body of"),
        ([[*ok, b"x"]], "trailing"),
        ([[pack_envelope(_UPDATE_NONE, 0, 0) + b"x"]], "after an empty update"),
        ([], "no update of round 0"),
    ]:
        link = ScriptedLink(pieces, updates)
        model, opt = worker(link, 1, codec="int4", sync_every=2)
        with pytest.raises(ExchangeError, match=match):
            train(model, opt, 0, range(2))
        assert link.pushed[0][0] == 0
        assert link.pushed[0][1][: _ENVELOPE.size] == pack_envelope(_SHARD, 0, 0)
        with pytest.raises(ExchangeError, match="a previous outer round failed"):
            train(model, opt, 0, range(2, 3))
    # and the good update goes through
    link = ScriptedLink(pieces, [ok])
    model, opt = worker(link, 1, codec="int4", sync_every=2)
    train(model, opt, 0, range(2))
    assert opt.stats.outer_rounds == 1


# --- worker checkpoints in server mode -------------------------------------------------------------


def test_worker_checkpoints_record_the_mode() -> None:
    server = OuterServer(list(OddModel(0).parameters()), codec="int4")
    _, in_server_mode = worker(
        ScriptedLink(server.initial_payload()), 1, codec="int4", chunk_elems=1 << 20
    )
    _, sharded = worker(LocalTransport.create(1)[0], 1, codec="int4", chunk_elems=1 << 20)
    assert in_server_mode.mode == "server" and sharded.mode == "sharded"
    assert in_server_mode.state_dict()["diloco"]["outer_momentum"].numel() == 0
    with pytest.raises(
        ValueError, match=r"made in server mode .* this optimizer is in sharded mode"
    ):
        sharded.load_state_dict(in_server_mode.state_dict())
    with pytest.raises(
        ValueError, match=r"made in sharded mode .* this optimizer is in server mode"
    ):
        in_server_mode.load_state_dict(sharded.state_dict())


def test_worker_and_server_resume_the_same_trajectory(tmp_path: Any) -> None:
    kwargs: dict[str, Any] = {"codec": "int2", "sync_every": 2}
    params = list(OddModel(0).parameters())

    def serve(server: OuterServer) -> LocalParameterServer:
        return LocalParameterServer(server, workers=1, timeout=30)

    straight = OuterServer(params, codec="int2", chunk_elems=CHUNK_ELEMS)
    with serve(straight) as ps:
        model, opt = worker(ps.connect(), 1, **kwargs)
        train(model, opt, 0, range(8))
        expected_locals = [p.detach().clone() for p in model.parameters()]

    first = OuterServer(params, codec="int2", chunk_elems=CHUNK_ELEMS)
    with serve(first) as ps:
        model, opt = worker(ps.connect(), 1, **kwargs)
        train(model, opt, 0, range(4))
        first.save(tmp_path / "ps.pt")
        saved_model = copy.deepcopy(model.state_dict())
        saved_opt = copy.deepcopy(opt.state_dict())

    resumed = OuterServer.load(tmp_path / "ps.pt", params, codec="int2", chunk_elems=CHUNK_ELEMS)
    with serve(resumed) as ps:
        model, opt = worker(ps.connect(), 7, **kwargs)
        model.load_state_dict(saved_model)
        opt.load_state_dict(saved_opt)
        train(model, opt, 0, range(4, 8))
    assert_matches_server([opt], straight)
    assert_same_state(snapshot(resumed), snapshot(straight))
    for a, b in zip(model.parameters(), expected_locals, strict=True):
        assert torch.equal(a.detach(), b)

    # a checkpoint from another round than the server's: the global model stays the server's
    with serve(straight) as ps:
        model, opt = worker(ps.connect(), 7, **kwargs)
        with pytest.warns(
            RuntimeWarning,
            match="checkpoint is from outer round 2, the parameter server is at round 4",
        ):
            opt.load_state_dict(saved_opt)
        assert_matches_server([opt], straight)
        assert opt.state_dict()["diloco"]["round"] == 4
