"""One rank's side of DiLoCo's outer rounds: the messages and the sharded outer step.

A round of one fragment, on rank ``r`` of ``N`` (docs/design/2026-11-23-diloco-optimizer.md):

1. ``r`` sends shard ``j`` of its encoded pseudo-gradient to rank ``j`` (or an abstention);
2. as the owner of shard ``r``, it merges the ``N`` contributions chunk by chunk in rank order,
   averages them, runs the fused Nesterov step on a scratch copy of the global chunk, and encodes
   ``new - global`` into its update, which it sends to every peer and applies to its own global
   copy from the same bytes;
3. it applies every other owner's update to its global copy.

Every payload opens with an envelope (kind, fragment, round, sender) so a peer that is out of
step is named, and is decoded by a :class:`~hypha.compress.StreamDecoder` that checks it carries
exactly the expected tensors: malformed bytes raise, they are never applied.

:class:`ServerExchange` is a worker's side of the other mode, a central parameter server reached
through a :class:`~hypha.optim.ServerLink` (the server itself is :mod:`hypha.optim.server`): the
worker pushes one payload over the whole fragment and applies the update the server sends back.
The envelope is the same; its sender field is 0 both ways (workers have no rank there, the server
names each contribution itself).
"""

from __future__ import annotations

import hashlib
import json
import math
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

from hypha import ops
from hypha.compress import (
    Chunk,
    Codec,
    CodecError,
    DecodeLimits,
    DeltaWriter,
    Header,
    NonFiniteError,
    StreamDecoder,
    iter_encode,
    iter_encode_delta,
    parse_codec,
)
from hypha.compress._encode import all_finite
from hypha.optim._layout import Layout, Shard
from hypha.optim._link import ServerLink
from hypha.optim._transport import Transport

__all__ = ["Exchange", "ExchangeError", "ServerExchange", "all_finite"]

#: Opens every payload: magic, version, kind, fragment, sender, round.
_ENVELOPE = struct.Struct("<4sBBHIQ")
_MAGIC = b"HYDL"
_VERSION = 1
_INIT, _SHARD, _SHARD_NONE, _UPDATE, _UPDATE_NONE = range(5)
#: Pieces of a payload that are ready together go out as messages of about this size: each
#: message costs a round trip or two in torch.distributed (a length, then the body).
MESSAGE_BYTES = 4 << 20
#: The parameter server's initial message: the envelope, then this length, then the settings JSON.
_SETTINGS_LEN = struct.Struct("<I")
#: A settings object larger than this is refused (it lists one number per parameter tensor).
_MAX_SETTINGS_BYTES = 16 << 20

_KIND_NAMES = {
    _INIT: "initial parameters",
    _SHARD: "pseudo-gradient shard",
    _SHARD_NONE: "abstention",
    _UPDATE: "outer update",
    _UPDATE_NONE: "empty outer update",
}


class ExchangeError(RuntimeError):
    """An outer round failed (a timeout, a peer gone, malformed bytes, a peer out of step).

    Peers no longer agree on the global model, so the optimizer refuses further steps: reload a
    checkpoint on every rank."""


def pack_envelope(kind: int, fragment: int, round_: int, sender: int = 0) -> bytes:
    return _ENVELOPE.pack(_MAGIC, _VERSION, kind, fragment, sender, round_)


def check_envelope(
    head: bytes | bytearray | memoryview,
    kinds: tuple[int, ...],
    fragment: int | None,
    round_: int | None,
    who: str,
    me: str,
) -> tuple[int, int, int]:
    """Parses an envelope from ``who`` (``me`` is the reader, for the message); returns its kind,
    fragment and round. ``fragment`` / ``round_`` None accept any. Raises ExchangeError naming
    what came and what was expected."""
    if len(head) < _ENVELOPE.size:
        raise ExchangeError(f"{me}: {who} sent {len(head)} bytes where an envelope belongs")
    magic, version, kind, frag, _sender, rnd = _ENVELOPE.unpack(bytes(head[: _ENVELOPE.size]))
    if magic != _MAGIC or version != _VERSION:
        raise ExchangeError(
            f"{me}: {who} speaks {bytes(magic)!r} v{version}, not DiLoCo v{_VERSION}"
        )
    if (
        kind not in kinds
        or (fragment is not None and frag != fragment)
        or (round_ is not None and rnd != round_)
    ):
        expect = " or ".join(_KIND_NAMES[k] for k in kinds)
        got = _KIND_NAMES.get(kind, f"kind {kind}")
        where = "" if round_ is None else f" for round {round_}"
        where += "" if fragment is None else f" fragment {fragment}"
        raise ExchangeError(
            f"{me}: {who} is out of step: it sent {got} for round {rnd} fragment {frag}, "
            f"expected {expect}{where}"
        )
    return kind, frag, rnd


def batch_messages(first: bytes, pieces: Iterable[bytes]) -> Iterator[bytearray]:
    """``first`` (an envelope) and ``pieces`` joined into messages of about ``MESSAGE_BYTES``;
    a piece is never split."""
    batch = bytearray(first)
    for piece in pieces:
        if len(batch) + len(piece) > MESSAGE_BYTES:
            yield batch
            batch = bytearray()
        batch += piece
    yield batch


class _Pieces:
    """Reads a payload that arrives as pieces split anywhere: a few bytes at its start
    (:meth:`read`), then the rest piece by piece (:meth:`rest`)."""

    def __init__(self, pieces: Iterable[bytes | bytearray | memoryview], who: str) -> None:
        self._it = iter(pieces)
        self._buf = bytearray()
        self._who = who

    def read(self, n: int) -> bytes:
        while len(self._buf) < n:
            piece = next(self._it, None)
            if piece is None:
                raise CodecError(
                    f"{self._who} ended after {len(self._buf)} bytes, expected at least {n}"
                )
            self._buf += piece
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def rest(self) -> Iterator[bytes | bytearray | memoryview]:
        if self._buf:
            head, self._buf = self._buf, bytearray()
            yield head
        yield from self._it


def _add(dst: torch.Tensor, chunk: Chunk) -> None:
    """dst += the chunk's values, for ``dst`` exactly the chunk's elements."""
    if chunk.q is not None:
        ops.dequantize_accumulate_(dst, chunk.q)
    else:
        assert chunk.raw is not None
        dst.add_(chunk.raw)


class _ShardDecoder(StreamDecoder):
    """A StreamDecoder that checks the payload against the shard it must carry."""

    def __init__(
        self,
        shapes: Sequence[tuple[int, ...]],
        codec: Codec,
        where: str,
        device: torch.device,
        chunk_elems: int | None = None,
    ) -> None:
        total = sum(math.prod(s) for s in shapes)
        limits = DecodeLimits(max_total_elems=max(total, 1), max_tensors=max(len(shapes), 1))
        super().__init__(limits, device=device)
        self._shapes, self._codec, self._where = list(shapes), codec, where
        # NOTE: between ranks the initial settings check pins chunk_elems and the block size; a
        # parameter server checks them on every payload (its chunks must follow its own plan)
        self._chunk_elems = chunk_elems

    def _on_header(self, header: Header) -> None:
        got = [tuple(t.shape) for t in header.tensors]
        if got != self._shapes:
            raise CodecError(
                f"{self._where}: the payload carries {len(got)} tensors {got[:3]}..., expected "
                f"{len(self._shapes)} {self._shapes[:3]}... (the peer's model or DiLoCo settings "
                "differ from this one)"
            )
        if header.codec != self._codec.name:
            raise CodecError(
                f"{self._where}: the peer encodes with {header.codec}, this rank with "
                f"{self._codec.name}"
            )
        if self._chunk_elems is not None:
            theirs = (header.chunk_elems, header.block_size)
            ours = (self._chunk_elems, self._codec.block_size if self._codec.quantized else 0)
            if theirs != ours:
                raise CodecError(
                    f"{self._where}: chunks of {theirs[0]} elements in blocks of {theirs[1]}, "
                    f"expected {ours[0]} in blocks of {ours[1]}"
                )


class _Encoder:
    """A worker's pseudo-gradient, encoded on the training thread: ``params`` are the local
    parameters, ``globals_`` and ``error_feedback`` their fp32 global copies and error feedback
    (flat views are taken per segment); ``sender`` tells this worker's stochastic rounding apart
    from the others'."""

    def __init__(
        self,
        layout: Layout,
        codec: Codec,
        params: Sequence[torch.Tensor],
        globals_: Sequence[torch.Tensor],
        error_feedback: Sequence[torch.Tensor] | None,
        chunk_elems: int,
        backend: str | None,
        sender: bytes,
    ) -> None:
        self.layout, self.codec, self._sender = layout, codec, sender
        self.params, self.globals = list(params), list(globals_)
        self.error_feedback = None if error_feedback is None else list(error_feedback)
        self.chunk_elems, self.backend = chunk_elems, backend

    def set_sender(self, sender: bytes) -> None:
        self._sender = sender

    def _initial_decoder(self, what: str, device: torch.device) -> _ShardDecoder:
        """The decoder of an initial model: fp32, one flat tensor per parameter."""
        return _ShardDecoder([(p.numel(),) for p in self.params], parse_codec("fp32"), what,
                             device)

    def _take_initial(self, chunks: Iterable[Chunk]) -> None:
        """The initial model's chunks into the global copies."""
        for chunk in chunks:
            g = self.globals[chunk.tensor].view(-1)
            g[chunk.start : chunk.start + chunk.numel].copy_(chunk.values())

    def _start_from_globals(self) -> None:
        for p, g in zip(self.params, self.globals, strict=True):
            p.detach().copy_(g.view_as(p))

    def _local(self, i: int) -> torch.Tensor:
        p = self.params[i].detach()
        return p.view(-1) if p.is_contiguous() else p.reshape(-1)

    def encode(self, fragment: int, round_: int) -> list[list[bytes]] | None:
        """This worker's pseudo-gradient of ``fragment`` as one payload per owner, encoded now
        (the inner steps that follow change the parameters); the error feedback moves. None,
        with nothing moved, when the fragment's parameters hold NaN/Inf."""
        if not all(
            all_finite(self.params[i].detach()) for i in self.layout.fragment_params(fragment)
        ):
            return None
        payloads = []
        for shard in self.layout.shards[fragment]:
            segs = shard.segments
            efs = self.error_feedback
            payload = iter_encode_delta(
                [self.globals[s.param].view(-1)[s.start : s.stop] for s in segs],
                [self._local(s.param)[s.start : s.stop] for s in segs],
                None if efs is None else [efs[s.param].view(-1)[s.start : s.stop] for s in segs],
                self.codec,
                chunk_elems=self.chunk_elems,
                seed=self._seed(round_, shard.owner),
                check_finite=False,  # checked above, before any error feedback moved
                backend=self.backend,
            )
            payloads.append(list(payload))
        return payloads

    def _seed(self, round_: int, stream: int) -> int:
        """Stochastic-rounding seed: distinct per round, sender and stream; the same on a rerun."""
        key = struct.pack("<Q", round_) + self._sender + struct.pack("<I", stream)
        return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little")


class Exchange(_Encoder):
    """Runs outer rounds for one rank.

    ``params`` are the local parameters, ``globals_`` and ``error_feedback`` their fp32 global
    copies and error feedback (flat views are taken per segment); ``momentum`` is this rank's
    flat outer-momentum shard, laid out as ``layout`` says; ``hyper(i)`` returns the
    current ``(outer_lr, outer_momentum)`` of parameter ``i``.
    """

    def __init__(
        self,
        comm: Transport,
        layout: Layout,
        codec: Codec,
        *,
        params: Sequence[torch.Tensor],
        globals_: Sequence[torch.Tensor],
        error_feedback: Sequence[torch.Tensor] | None,
        momentum: torch.Tensor,
        hyper: Callable[[int], tuple[float, float]],
        chunk_elems: int,
        timeout: float,
        backend: str | None,
    ) -> None:
        super().__init__(
            layout,
            codec,
            params,
            globals_,
            error_feedback,
            chunk_elems,
            backend,
            # the seed key a rank has always used: "<QII" of round, rank, stream
            struct.pack("<I", comm.rank),
        )
        self.comm = comm
        self.rank, self.world_size = comm.rank, comm.world_size
        self.momentum, self.hyper = momentum, hyper
        self.timeout = timeout
        self.device = momentum.device
        # world size 1: nobody to send the update to, so it is applied exactly, in place
        self.direct = self.world_size == 1
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None

    # --- messages -------------------------------------------------------------------------------

    def _send(
        self, peer: int, kind: int, fragment: int, round_: int, pieces: Sequence[bytes] = ()
    ) -> None:
        """The envelope and ``pieces`` as few messages of about ``MESSAGE_BYTES``."""
        envelope = pack_envelope(kind, fragment, round_, self.rank)
        for message in batch_messages(envelope, pieces):
            self.comm.send(peer, message)

    def _open(
        self, peer: int, kinds: tuple[int, ...], fragment: int, round_: int
    ) -> tuple[int, memoryview]:
        """Reads a payload's first message from ``peer``; returns the envelope's kind and the
        bytes after the envelope."""
        msg = memoryview(self.comm.recv(peer, self.timeout))
        me, who = f"rank {self.rank}", f"rank {peer}"
        kind, _, _ = check_envelope(msg, kinds, fragment, round_, who, me)
        sender = _ENVELOPE.unpack(msg[: _ENVELOPE.size])[4]
        if sender != peer:
            raise ExchangeError(f"{me}: a message from {who} says it is from rank {sender}")
        rest = msg[_ENVELOPE.size :]
        if kind in (_SHARD_NONE, _UPDATE_NONE) and len(rest):
            raise ExchangeError(f"rank {self.rank}: rank {peer} sent data after an empty payload")
        return kind, rest

    def _chunks(
        self, peer: int, decoder: StreamDecoder, pieces: Sequence[bytes | memoryview] = ()
    ) -> Iterator[Chunk]:
        """The verified chunks of a payload: ``pieces`` (this rank's own payload, or what came
        with a peer's envelope), then, from a peer, one message at a time until it is complete."""
        for piece in pieces:
            yield from decoder.feed(piece)
        if peer != self.rank:
            while not decoder.done:
                yield from decoder.feed(self.comm.recv(peer, self.timeout))
        decoder.finish()

    # --- a round (on the exchange thread when it overlaps training) ---------------------------

    def run(self, fragment: int, round_: int, payloads: list[list[bytes]] | None) -> float:
        """One round of ``fragment`` with this worker's ``payloads`` (None: it abstains);
        returns its wall time. Any failure raises ExchangeError."""
        t0 = time.perf_counter()
        try:
            self._round(fragment, round_, payloads)
            self.comm.flush(self.timeout)
        except ExchangeError:
            raise
        except (CodecError, TimeoutError, ConnectionError, NonFiniteError, ValueError) as exc:
            raise ExchangeError(
                f"rank {self.rank}: outer round {round_} (fragment {fragment}) failed: {exc}"
            ) from exc
        return time.perf_counter() - t0

    def _round(self, fragment: int, round_: int, payloads: list[list[bytes]] | None) -> None:
        shards = self.layout.shards[fragment]
        mine = shards[self.rank]
        peers = [j for j in range(self.world_size) if j != self.rank]
        # 1. my pseudo-gradient shards to their owners
        for j in peers:
            if payloads is None:
                self._send(j, _SHARD_NONE, fragment, round_)
            else:
                self._send(j, _SHARD, fragment, round_, payloads[j])
        # 2. as the owner of my shard: everyone's contributions (rank order), the outer step
        streams = []
        for i in range(self.world_size):
            if i == self.rank:
                if payloads is None:
                    continue
                first: Sequence[bytes | memoryview] = payloads[i]
            else:
                kind, rest = self._open(i, (_SHARD, _SHARD_NONE), fragment, round_)
                if kind == _SHARD_NONE:
                    continue
                first = [rest]
            decoder = _ShardDecoder(mine.shapes, self.codec, f"shard from rank {i}", self.device)
            streams.append(self._chunks(i, decoder, first))
        self._outer_step(mine, fragment, round_, streams, peers)
        # 3. the other owners' updates into my global copy
        for j in peers:
            kind, rest = self._open(j, (_UPDATE, _UPDATE_NONE), fragment, round_)
            if kind == _UPDATE_NONE:
                continue
            decoder = _ShardDecoder(
                shards[j].shapes, self.codec, f"update from rank {j}", self.device
            )
            for chunk in self._chunks(j, decoder, [rest]):
                seg = shards[j].segments[chunk.tensor]
                chunk.accumulate_into(self.globals[seg.param].view(-1)[seg.start : seg.stop])

    def _scratch_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None:
            n = min(self.chunk_elems, max(self.layout.total, 1))
            self._scratch = (
                torch.empty(n, dtype=torch.float32, device=self.device),
                torch.empty(n, dtype=torch.float32, device=self.device),
            )
        return self._scratch

    def _outer_step(
        self,
        shard: Shard,
        fragment: int,
        round_: int,
        streams: list[Iterator[Chunk]],
        peers: list[int],
    ) -> None:
        n = len(streams)
        if n == 0 or shard.numel == 0:
            for j in peers:
                self._send(j, _UPDATE_NONE, fragment, round_)
            for stream in streams:  # an empty shard still has payloads to read to their end
                for _ in stream:
                    pass
            return
        # the update's chunks follow the same plan as the contributions' (same shapes, chunking)
        writer = DeltaWriter(
            shard.shapes,
            self.codec if not self.direct else "fp32",
            chunk_elems=self.chunk_elems,
            seed=self._seed(round_, self.world_size + 1),
            backend=self.backend,
        )
        own: StreamDecoder | None = None
        if not self.direct:
            header = writer.header()
            for j in peers:
                self._send(j, _UPDATE, fragment, round_, [header])
            own = _ShardDecoder(shard.shapes, self.codec, "own update", self.device)
            own.feed(header)
        acc_buf, new_buf = self._scratch_buffers()
        offsets = [0]
        for seg in shard.segments:
            offsets.append(offsets[-1] + seg.numel)
        for ti, ci, start, numel in writer.plan():
            seg = shard.segments[ti]
            acc = acc_buf[:numel]
            acc.zero_()
            for stream in streams:  # rank order: the same sum on every run
                chunk = next(stream)
                if (chunk.tensor, chunk.start, chunk.numel) != (ti, start, numel):
                    raise ExchangeError(
                        f"rank {self.rank}: chunk {chunk.index} of tensor {chunk.tensor} is out of plan"
                    )
                _add(acc, chunk)
            acc.div_(n)
            lr, mu = self.hyper(seg.param)
            lo = shard.owner_offset + offsets[ti] + start
            mom = self.momentum[lo : lo + numel]
            g = self.globals[seg.param].view(-1)[seg.start + start : seg.start + start + numel]
            if own is None:
                ops.nesterov_(g, mom, acc, lr, mu, backend=self.backend)
                continue
            new = new_buf[:numel]
            new.copy_(g)
            ops.nesterov_(new, mom, acc, lr, mu, backend=self.backend)
            # NOTE: no error feedback on the update. Measured on bench/convergence.py (int2, seed
            # 0, fp32 DiLoCo 1.8847): owner error feedback 1.9603 (+4.0%), none 1.8861 (+0.07%),
            # stochastic rounding and none 1.9113. A residual held back by the owner reaches the
            # global model rounds later, behind the outer momentum; without it the rounding
            # error is one round's, and the next pseudo-gradients see and correct it.
            body = writer.chunk(ti, ci, new, g, None)
            for j in peers:
                self.comm.send(j, body)
            for own_chunk in own.feed(body):  # apply exactly the bytes the others apply
                _add(g, own_chunk)
        for stream in streams:  # each payload must end where the plan does
            for extra in stream:
                raise ExchangeError(
                    f"rank {self.rank}: unexpected chunk {extra.index} of tensor {extra.tensor}"
                )
        if own is not None:
            own.finish()

    # --- the start of training --------------------------------------------------------------------

    def send_initial(self, settings: dict[str, Any]) -> None:
        """Rank 0: its settings and parameters (fp32, lossless) to every peer, chunk by chunk."""
        peers = range(1, self.world_size)
        for j in peers:
            self._send(j, _INIT, 0, 0, [json.dumps(settings).encode()])
        for piece in iter_encode([p.detach().reshape(-1) for p in self.params], "fp32"):
            for j in peers:
                self.comm.send(j, piece)
        self.comm.flush(self.timeout)

    def receive_initial(self, settings: dict[str, Any]) -> None:
        """Other ranks: checks rank 0's settings against ``settings``, then takes its parameters
        into the global copies and the local parameters."""
        try:
            _, rest = self._open(0, (_INIT,), 0, 0)
            theirs = json.loads(bytes(rest))
            if not isinstance(theirs, dict):
                raise CodecError(f"rank 0 sent settings {theirs!r}")
            diff = {k: (theirs.get(k), v) for k, v in settings.items() if theirs.get(k) != v}
            if diff:
                raise ValueError(
                    f"rank {self.rank}: DiLoCo settings differ from rank 0's: "
                    + ", ".join(
                        f"{k}: rank 0 has {a!r}, this rank {b!r}" for k, (a, b) in diff.items()
                    )
                )
            decoder = self._initial_decoder("initial parameters", self.device)
            self._take_initial(self._chunks(0, decoder))
        except (
            CodecError,
            TimeoutError,
            ConnectionError,
            json.JSONDecodeError,
            UnicodeDecodeError,
        ) as exc:
            raise ExchangeError(
                f"rank {self.rank}: receiving the initial parameters failed: {exc}"
            ) from exc
        self._start_from_globals()


class ServerExchange(_Encoder):
    """Runs outer rounds for one worker against a central parameter server.

    The layout has one shard per fragment (world size 1): the worker encodes its pseudo-gradient
    of the whole fragment into one payload, pushes it through ``link``, and applies the update the
    server pulls back to its global copies, chunk by chunk as it arrives. ``sender`` (8 bytes)
    seeds this worker's stochastic rounding apart from the other workers'.
    """

    def __init__(
        self,
        link: ServerLink,
        layout: Layout,
        codec: Codec,
        *,
        params: Sequence[torch.Tensor],
        globals_: Sequence[torch.Tensor],
        error_feedback: Sequence[torch.Tensor] | None,
        chunk_elems: int,
        timeout: float,
        backend: str | None,
        device: torch.device,
        sender: bytes,
    ) -> None:
        if layout.world_size != 1:
            raise ValueError(f"a parameter-server layout has world_size 1, got {layout.world_size}")
        super().__init__(
            layout, codec, params, globals_, error_feedback, chunk_elems, backend, sender
        )
        self.link, self.timeout, self.device = link, timeout, device

    def run(self, fragment: int, round_: int, payloads: list[list[bytes]] | None) -> float:
        """One round of ``fragment`` with this worker's payload (None: it abstains); returns its
        wall time. Any failure raises ExchangeError."""
        t0 = time.perf_counter()
        try:
            self._round(fragment, round_, payloads)
        except ExchangeError:
            raise
        except (CodecError, TimeoutError, ConnectionError, ValueError) as exc:
            raise ExchangeError(
                f"outer round {round_} (fragment {fragment}) with the parameter server failed: "
                f"{exc}"
            ) from exc
        return time.perf_counter() - t0

    def _round(self, fragment: int, round_: int, payloads: list[list[bytes]] | None) -> None:
        if payloads is None:
            self.link.push(round_, [pack_envelope(_SHARD_NONE, fragment, round_)])
        else:
            (payload,) = payloads
            envelope = pack_envelope(_SHARD, fragment, round_)
            self.link.push(round_, [bytes(m) for m in batch_messages(envelope, payload)])
        stream = _Pieces(self.link.pull(round_, self.timeout), "the parameter server's update")
        kind, _, _ = check_envelope(
            stream.read(_ENVELOPE.size),
            (_UPDATE, _UPDATE_NONE),
            fragment,
            round_,
            "the parameter server",
            "this worker",
        )
        shard = self.layout.shards[fragment][0]
        if kind == _UPDATE_NONE:
            for piece in stream.rest():
                if len(piece):
                    raise ExchangeError("the parameter server sent data after an empty update")
            return
        decoder = _ShardDecoder(
            shard.shapes,
            self.codec,
            "update from the parameter server",
            self.device,
            chunk_elems=self.chunk_elems,
        )
        for piece in stream.rest():
            for chunk in decoder.feed(piece):
                seg = shard.segments[chunk.tensor]
                chunk.accumulate_into(self.globals[seg.param].view(-1)[seg.start : seg.stop])
        decoder.finish()

    def receive_initial(self, settings: dict[str, Any]) -> int:
        """Takes the server's global model into the global copies and the local parameters,
        after checking the server's settings against the keys of ``settings`` it has; returns
        the server's round (the next one it will close)."""
        try:
            stream = _Pieces(self.link.pull_initial(self.timeout), "the parameter server's model")
            _, _, round_ = check_envelope(
                stream.read(_ENVELOPE.size),
                (_INIT,),
                None,
                None,
                "the parameter server",
                "this worker",
            )
            (size,) = _SETTINGS_LEN.unpack(stream.read(_SETTINGS_LEN.size))
            if size > _MAX_SETTINGS_BYTES:
                raise CodecError(f"the server announces {size} bytes of settings")
            theirs = json.loads(stream.read(size))
            if not isinstance(theirs, dict):
                raise CodecError(f"the server sent settings {theirs!r}")
            if theirs.get("round") != round_:
                raise CodecError(
                    f"the server's settings say round {theirs.get('round')!r}, its envelope "
                    f"{round_}"
                )
            needed = ("codec", "block_size", "chunk_elems", "fragments", "numels")
            missing = [k for k in needed if k not in theirs]
            if missing:
                raise CodecError(f"the server's settings lack {', '.join(missing)}")
            diff = {
                k: (theirs[k], v) for k, v in settings.items() if k in theirs and theirs[k] != v
            }
            if diff:
                raise ValueError(
                    "DiLoCo settings differ from the parameter server's: "
                    + ", ".join(
                        f"{k}: the server has {a!r}, this worker {b!r}"
                        for k, (a, b) in diff.items()
                    )
                )
            decoder = self._initial_decoder("initial parameters from the server", self.device)
            for piece in stream.rest():
                self._take_initial(decoder.feed(piece))
            decoder.finish()
        except (
            CodecError,
            TimeoutError,
            ConnectionError,
            json.JSONDecodeError,
            UnicodeDecodeError,
        ) as exc:
            raise ExchangeError(
                f"receiving the global model from the parameter server failed: {exc}"
            ) from exc
        self._start_from_globals()
        return int(round_)
