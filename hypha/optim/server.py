"""A central parameter server for DiLoCo: the outer step in one place.

In this mode (docs/design/2026-11-23-diloco-optimizer.md, "Central parameter server") the
workers do not shard the outer step among themselves. A round of fragment ``round % fragments``:

1. every worker pushes its compressed pseudo-gradient of the whole fragment (or an abstention)
   through its :class:`~hypha.optim.ServerLink`;
2. the server decodes each contribution as its bytes arrive and adds every verified chunk to one
   accumulator at once, counting per chunk how many contributions delivered it; no payload is
   ever held whole;
3. when the caller decides the round is over (it owns the waiting and the timeout), the server
   averages each chunk over the contributions that delivered it, runs the fused outer Nesterov
   step, and encodes ``new − global`` into one update; it applies those bytes to its own global
   copy exactly as every worker applies them to theirs, so all copies stay bit-identical.

:class:`OuterServer` is the state and the arithmetic: no networking, no threads; call it from one
thread at a time (a trio worker thread is fine). :class:`LocalParameterServer` drives one on a
thread of this process for workers connected by :class:`LocalServerLink` (tests, a laptop).

The partial-contribution rule: every codec chunk carries its own CRC and is verified on its own,
so a contribution cut off mid-stream (or refused at a malformed or non-finite chunk) still counts
for the chunks it delivered before that point, and for no other. Each chunk is averaged over the
contributions that delivered it; a chunk nobody delivered gets no outer step (its momentum is
untouched and its update is 0).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from hypha import ops
from hypha._files import replace_atomically
from hypha.compress import (
    DEFAULT_CHUNK_ELEMS,
    Chunk,
    Codec,
    CodecError,
    DeltaWriter,
    iter_encode,
    parse_codec,
)
from hypha.optim._exchange import (
    _ENVELOPE,
    _INIT,
    _SETTINGS_LEN,
    _SHARD,
    _SHARD_NONE,
    _UPDATE,
    _UPDATE_NONE,
    ExchangeError,
    _add,
    _ShardDecoder,
    all_finite,
    check_envelope,
    pack_envelope,
)
from hypha.optim._layout import Layout
from hypha.optim._link import ServerLink

__all__ = [
    "Contribution",
    "LocalParameterServer",
    "LocalServerLink",
    "OuterServer",
    "RoundStats",
    "ServerRound",
]

_STATE_VERSION = 1
_CLOSED = object()  # end-of-stream marker in a LocalServerLink's update queue
_STOP = object()  # tells the LocalParameterServer thread to stop


@dataclass(frozen=True)
class RoundStats:
    """What one closed round saw."""

    round: int
    fragment: int
    #: complete pseudo-gradients
    contributors: int
    #: incomplete ones (cut off, or refused part-way) that delivered at least one chunk
    partial: int
    #: workers that sat the round out (their parameters held NaN/Inf)
    abstained: int
    #: contributions refused with ExchangeError (bad envelope, malformed bytes, NaN/Inf values)
    failed: int
    #: bytes fed to the round's contributions, envelopes included
    bytes_received: int
    #: chunks in the fragment's plan, and how many of them got an outer step
    chunks: int
    chunks_updated: int
    #: bytes of the update (envelope included)
    update_bytes: int


class OuterServer:
    """The global model and outer momentum of a DiLoCo run, and its outer step.

    ``params`` give the initial global model (copied to fp32 on ``device``, by default theirs);
    ``codec``, ``fragments`` and ``chunk_elems`` must match the workers' (they check at join,
    see :meth:`settings`). Round ``r`` syncs fragment ``r % fragments``, with
    ``outer_lr`` / ``outer_momentum`` (attributes: change them between rounds to schedule them).

    Memory: the fp32 global copy and the fp32 outer momentum (one copy each), one fp32
    accumulator the size of the largest fragment, one count per chunk of a fragment, and three
    chunk-sized scratch buffers. Contributions are never held whole: each keeps at most one
    chunk being decoded. The update a round produces (``bits/param`` × the fragment) is held until
    the caller has sent it; :meth:`initial_payload` makes one fp32 copy per joining worker.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        codec: str | Codec = "int2",
        fragments: int = 1,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        device: torch.device | str | None = None,
        backend: str | None = None,
    ) -> None:
        params = list(params)
        if not params:
            raise ValueError("OuterServer needs at least one parameter tensor")
        for i, p in enumerate(params):
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"params[{i}] must be a torch.Tensor, got {type(p).__name__}")
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(f"params[{i}] has dtype {p.dtype}; expected a float tensor")
        self.codec = parse_codec(codec)
        if not isinstance(fragments, int) or isinstance(fragments, bool) or fragments < 1:
            raise ValueError(f"Invalid fragments: {fragments!r} (a positive int)")
        _check_hyper(outer_lr, outer_momentum)
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {ops.BACKENDS}, or None)")
        DeltaWriter([], self.codec, chunk_elems=chunk_elems)  # checks chunk_elems
        self.fragments, self.chunk_elems, self.backend = fragments, chunk_elems, backend
        self.outer_lr, self.outer_momentum = float(outer_lr), float(outer_momentum)
        self.device = torch.device(device) if device is not None else params[0].device
        self._globals = [
            p.detach().to(device=self.device, dtype=torch.float32, copy=True).contiguous()
            for p in params
        ]
        for i, g in enumerate(self._globals):
            if not all_finite(g):
                raise ValueError(f"params[{i}] holds NaN/Inf")
        align = self.codec.block_size if self.codec.quantized else 1
        self.layout = Layout([g.numel() for g in self._globals], fragments, 1, align)
        self._momentum = torch.zeros(self.layout.total, dtype=torch.float32, device=self.device)
        largest = max(self.layout.shards[f][0].numel for f in range(fragments))
        self._acc = torch.zeros(largest, dtype=torch.float32, device=self.device)
        n = min(chunk_elems, max(largest, 1))
        self._scratch = torch.empty((3, n), dtype=torch.float32, device=self.device)
        self._round = 0
        #: the update of the last round closed (``round - 1``), as sent: a server resumed from a
        #: checkpoint sends it again to workers that may not have received it
        self.last_update: bytes | None = None
        self._open: ServerRound | None = None

    @property
    def round(self) -> int:
        """The next round to close (0 at the start)."""
        return self._round

    @property
    def fragment(self) -> int:
        """The fragment round :attr:`round` syncs."""
        return self._round % self.fragments

    def settings(self) -> dict[str, Any]:
        """What a joining worker must match (its ``DiLoCo`` checks the keys it has), and the
        round it joins at."""
        return {**self._fixed_settings(), "round": self._round}

    def _fixed_settings(self) -> dict[str, Any]:
        return {
            "codec": str(self.codec),
            "block_size": self.codec.block_size,
            "chunk_elems": self.chunk_elems,
            "fragments": self.fragments,
            "numels": list(self.layout.numels),
        }

    def global_tensors(self) -> list[torch.Tensor]:
        """The fp32 global parameters, shaped like the ``params`` given at construction. These
        are the server's live tensors, not copies: read them between rounds, clone them to keep
        them, never write them (the workers' copies would no longer match)."""
        return list(self._globals)

    def initial_payload(self) -> list[bytes]:
        """What a joining worker's ``ServerLink.pull_initial`` returns: the envelope (kind
        ``_INIT``, the current fragment and round), the settings JSON (a little-endian u32 length,
        then the UTF-8 text of :meth:`settings`), then the global parameters as an fp32 payload
        of one flat tensor per parameter. A snapshot: later rounds do not change it."""
        text = json.dumps(self.settings()).encode()
        head = pack_envelope(_INIT, self.fragment, self._round) + _SETTINGS_LEN.pack(len(text))
        body = iter_encode(
            [g.view(-1) for g in self._globals], "fp32", chunk_elems=self.chunk_elems
        )
        return [head + text, *body]

    def open_round(self) -> ServerRound:
        """Starts collecting contributions to round :attr:`round`; one round is open at a time."""
        if self._open is not None:
            raise RuntimeError(
                f"round {self._open.round} is still open: close() or discard() it first"
            )
        self._open = ServerRound(self)
        return self._open

    # --- checkpoints --------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The global parameters, the outer momentum, the round, the hyper-parameters and the
        settings, on the CPU. An open round is not part of it: a checkpoint taken while a round
        is open is the state before that round."""
        return {
            "version": _STATE_VERSION,
            "settings": self._fixed_settings(),
            "round": self._round,
            "outer_lr": self.outer_lr,
            "outer_momentum": self.outer_momentum,
            "globals": [g.to("cpu", copy=True) for g in self._globals],
            "momentum": self._momentum.to("cpu", copy=True),
            "last_update": None if self.last_update is None
            else torch.frombuffer(bytearray(self.last_update), dtype=torch.uint8),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output made with the same settings; the hyper-parameters
        come from the checkpoint (as ``torch.optim.Optimizer.load_state_dict`` restores its
        groups). Checks everything before changing anything."""
        if self._open is not None:
            raise RuntimeError(f"round {self._open.round} is open: close() or discard() it first")
        try:
            version, settings = state["version"], state["settings"]
            round_, globals_, momentum = state["round"], state["globals"], state["momentum"]
            lr, mu = state["outer_lr"], state["outer_momentum"]
        except (KeyError, TypeError):
            raise ValueError(
                "not an OuterServer state_dict (expected keys version, settings, round, "
                "outer_lr, outer_momentum, globals, momentum)"
            ) from None
        if version != _STATE_VERSION:
            raise ValueError(
                f"OuterServer state_dict version {version!r}, this build reads {_STATE_VERSION}"
            )
        ours = self._fixed_settings()
        if not isinstance(settings, dict) or settings != ours:
            theirs = settings if isinstance(settings, dict) else {}
            keys = sorted(set(ours) | set(theirs))
            raise ValueError(
                "the checkpoint was made with other settings: "
                + ", ".join(
                    f"{k}: the checkpoint has {theirs.get(k)!r}, this server {ours.get(k)!r}"
                    for k in keys
                    if theirs.get(k) != ours.get(k)
                )
            )
        if not isinstance(round_, int) or isinstance(round_, bool) or round_ < 0:
            raise ValueError(f"the checkpoint's round is {round_!r}, expected an int >= 0")
        _check_hyper(lr, mu)
        if not isinstance(globals_, list | tuple) or len(globals_) != len(self._globals):
            raise ValueError(
                f"the checkpoint holds {len(globals_) if isinstance(globals_, list | tuple) else 'no'} "
                f"global tensors, this server {len(self._globals)}"
            )
        for i, (saved, g) in enumerate(zip(globals_, self._globals, strict=True)):
            _check_saved(f"global tensor {i}", saved, g)
        _check_saved("momentum", momentum, self._momentum)
        last = state.get("last_update")
        if last is not None and (not isinstance(last, torch.Tensor) or last.dtype != torch.uint8
                                 or last.dim() != 1):
            raise ValueError("the checkpoint's last_update is not a 1-D uint8 tensor")
        for saved, g in zip(globals_, self._globals, strict=True):
            g.copy_(saved)
        self._momentum.copy_(momentum)
        self._round = round_
        self.outer_lr, self.outer_momentum = float(lr), float(mu)
        self.last_update = None if last is None else last.cpu().numpy().tobytes()

    def save(self, path: str | os.PathLike[str]) -> None:
        """Writes :meth:`state_dict` to ``path`` atomically: a temporary file in the same
        directory, flushed and fsynced, then renamed over ``path``, then the directory fsynced.
        If anything fails, ``path`` keeps its previous content and the temporary file is
        removed."""
        state = self.state_dict()
        replace_atomically(path, lambda f: torch.save(state, f))

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], params: Sequence[torch.Tensor], **kwargs: Any
    ) -> OuterServer:
        """A server built like ``OuterServer(params, **kwargs)`` (``params`` give the shapes;
        their values are replaced) restored from the checkpoint :meth:`save` wrote at ``path``.
        A checkpoint made with other settings is refused with a ValueError naming them."""
        server = cls(params, **kwargs)
        state = torch.load(os.fspath(path), map_location=server.device, weights_only=True)
        server.load_state_dict(state)
        return server


def _check_hyper(lr: object, mu: object) -> None:
    if not isinstance(lr, int | float) or isinstance(lr, bool) or not (0.0 <= lr < math.inf):
        raise ValueError(f"Invalid outer_lr: {lr}")
    if not isinstance(mu, int | float) or isinstance(mu, bool) or not (0.0 <= mu < 1.0):
        raise ValueError(f"Invalid outer_momentum: {mu} (expected 0 <= momentum < 1)")


def _check_saved(name: str, saved: object, like: torch.Tensor) -> None:
    if not isinstance(saved, torch.Tensor) or saved.shape != like.shape:
        got = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise ValueError(f"the checkpoint's {name} is {got}, expected shape {tuple(like.shape)}")
    if not all_finite(saved.to(torch.float32)):
        raise ValueError(f"the checkpoint's {name} holds NaN/Inf")


class ServerRound:
    """The contributions to one round of an :class:`OuterServer` (from :meth:`~OuterServer.open_round`).

    Contributions may be fed in any order and interleaved; each verified chunk goes into the
    accumulator as soon as it is complete. :meth:`close` applies the outer step and returns the
    update, :meth:`discard` drops the round (the server's state is untouched; the same round can
    be opened again)."""

    def __init__(self, server: OuterServer) -> None:
        self.server = server
        self.round, self.fragment = server.round, server.fragment
        self.shard = server.layout.shards[self.fragment][0]
        key = struct.pack("<Q", self.round) + b"hypha-ps"
        self._writer = DeltaWriter(
            self.shard.shapes,
            server.codec,
            chunk_elems=server.chunk_elems,
            seed=int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little"),
            backend=server.backend,
        )
        self._plan = list(self._writer.plan())
        starts = [0]
        for seg in self.shard.segments:
            starts.append(starts[-1] + seg.numel)
        self._offset = [starts[ti] + start for ti, _, start, _ in self._plan]
        self._index = {(ti, ci): k for k, (ti, ci, _, _) in enumerate(self._plan)}
        #: contributions that delivered each chunk of the plan
        self.counts = [0] * len(self._plan)
        self._acc = server._acc[: self.shard.numel]
        self._acc.zero_()
        self._contributions: dict[str, Contribution] = {}
        self.closed = False

    def contribution(self, sender: str) -> Contribution:
        """A new contribution from ``sender`` (any name unique in this round)."""
        self._check_open()
        if not isinstance(sender, str):
            raise TypeError(f"sender must be a str, got {type(sender).__name__}")
        if sender in self._contributions:
            raise ValueError(f"{sender!r} already contributed to round {self.round}")
        c = Contribution(self, sender)
        self._contributions[sender] = c
        return c

    @property
    def contributions(self) -> list[Contribution]:
        return list(self._contributions.values())

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError(f"round {self.round} is closed")

    def _accumulate(self, chunk: Chunk, where: str) -> None:
        """Adds a verified chunk to the accumulator, or refuses all of it (NaN/Inf)."""
        k = self._index.get((chunk.tensor, chunk.index))
        if k is None or self._plan[k][3] != chunk.numel:  # the decoder checks this; be sure
            raise ExchangeError(
                f"{where}: chunk {chunk.index} of tensor {chunk.tensor} is out of plan"
            )
        values = self.server._scratch[0, : chunk.numel]
        if chunk.q is not None:
            ops.dequantize(chunk.q, out=values, backend=self.server.backend)
        else:
            assert chunk.raw is not None
            values.copy_(chunk.raw)
        if not all_finite(values):
            raise ExchangeError(
                f"{where}: chunk {chunk.index} of tensor {chunk.tensor} holds NaN/Inf values; "
                "refused (nothing of it was added)"
            )
        lo = self._offset[k]
        self._acc[lo : lo + chunk.numel].add_(values)
        self.counts[k] += 1

    def discard(self) -> None:
        """Drops the round: nothing changes on the server, which can open the same round again."""
        self._check_open()
        self.closed = True
        self.server._open = None

    def close(self) -> tuple[list[bytes], RoundStats]:
        """Averages each chunk over the contributions that delivered it, runs the outer Nesterov
        step on those chunks, and returns the update every worker must apply (the pieces of one
        payload: the envelope with the codec header, then one piece per chunk) with the round's
        statistics. The server has applied the same bytes to its own global copy; its round
        advances. When no contribution delivered a chunk, the update is an ``_UPDATE_NONE``
        envelope alone and nothing changes but the round."""
        self._check_open()
        self.closed = True
        server = self.server
        try:
            if any(self.counts):
                pieces, updated = self._step()
            else:
                pieces, updated = [pack_envelope(_UPDATE_NONE, self.fragment, self.round)], 0
        finally:
            server._open = None
        server._round += 1
        server.last_update = b"".join(pieces)
        cs = self._contributions.values()
        stats = RoundStats(
            round=self.round,
            fragment=self.fragment,
            contributors=sum(c.complete and not c.abstained for c in cs),
            partial=sum(not c.complete and c.chunks > 0 for c in cs),
            abstained=sum(c.abstained and c.error is None for c in cs),  # a refused one failed
            failed=sum(c.error is not None for c in cs),
            bytes_received=sum(c.bytes_received for c in cs),
            chunks=len(self._plan),
            chunks_updated=updated,
            update_bytes=sum(len(p) for p in pieces),
        )
        return pieces, stats

    def _step(self) -> tuple[list[bytes], int]:
        server, writer = self.server, self._writer
        lr, mu = server.outer_lr, server.outer_momentum
        pieces = [pack_envelope(_UPDATE, self.fragment, self.round) + writer.header()]
        own = _ShardDecoder(self.shard.shapes, server.codec, "own update", server.device)
        own.feed(writer.header())
        updated = 0
        for k, (ti, ci, start, numel) in enumerate(self._plan):
            seg = self.shard.segments[ti]
            lo = seg.start + start
            g = server._globals[seg.param].view(-1)[lo : lo + numel]
            new = server._scratch[1, :numel]
            new.copy_(g)
            if self.counts[k]:
                acc = self._acc[self._offset[k] : self._offset[k] + numel]
                acc.div_(self.counts[k])
                at = self.shard.owner_offset + self._offset[k]
                momentum = server._momentum[at : at + numel]
                # the step of Exchange._outer_step, on a scratch copy of the momentum too: a step
                # that would not be finite (sums that overflow) is not taken at all
                mom = server._scratch[2, :numel]
                mom.copy_(momentum)
                ops.nesterov_(new, mom, acc, lr, mu, backend=server.backend)
                if all_finite(new) and all_finite(mom):
                    momentum.copy_(mom)
                    updated += 1
                else:
                    new.copy_(g)
            # NOTE: no error feedback on the update. Measured on bench/convergence.py (int2, seed
            # 0, fp32 DiLoCo 1.8847): owner error feedback 1.9603 (+4.0%), none 1.8861 (+0.07%),
            # stochastic rounding and none 1.9113. A residual held back by the server reaches the
            # global model rounds later, behind the outer momentum; without it the rounding
            # error is one round's, and the next pseudo-gradients see and correct it.
            body = writer.chunk(ti, ci, new, g, None)
            pieces.append(body)
            for own_chunk in own.feed(body):  # apply exactly the bytes the workers apply
                _add(g, own_chunk)
        own.finish()
        return pieces, updated


class _ChunkSink(_ShardDecoder):
    """Hands each chunk on the moment it is verified.

    NOTE: ``StreamDecoder.feed`` returns the chunks a piece completed as one list, and an error
    later in the same piece would lose the verified chunks before it; handing them on one at a
    time makes the partial-contribution rule independent of how the bytes were split."""

    def __init__(self, contribution: Contribution) -> None:
        rnd = contribution._round
        super().__init__(
            rnd.shard.shapes,
            rnd.server.codec,
            contribution._where,
            rnd.server.device,
            chunk_elems=rnd.server.chunk_elems,
        )
        self._contribution = contribution

    def _step(self, item: memoryview, out: list[Chunk]) -> None:
        super()._step(item, out)
        while out:
            self._contribution._take(out.pop(0))


class Contribution:
    """One worker's pseudo-gradient for a :class:`ServerRound`, fed as its bytes arrive.

    The first bytes are the envelope (kind ``_SHARD``, or ``_SHARD_NONE`` for an abstention,
    for this round and fragment); the codec payload follows, checked against the fragment's
    shapes, codec, chunk size and block size. Any error raises :class:`ExchangeError` and the
    contribution refuses further bytes; the chunks it delivered before stay counted."""

    def __init__(self, round_: ServerRound, sender: str) -> None:
        self.sender = sender
        self._round = round_
        self._where = f"contribution from {sender!r} to round {round_.round}"
        self._head = bytearray()
        self._decoder: _ChunkSink | None = None
        #: the worker sat the round out
        self.abstained = False
        self.bytes_received = 0
        #: chunks added to the round's accumulator
        self.chunks = 0
        #: why the contribution was refused, if it was
        self.error: ExchangeError | None = None

    @property
    def complete(self) -> bool:
        """The whole payload (or an abstention) arrived, and none of it was refused."""
        if self.error is not None:
            return False
        return self.abstained or (self._decoder is not None and self._decoder.done)

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        """The next bytes of the contribution, split anywhere."""
        if self.error is not None:
            raise ExchangeError(f"{self._where}: already refused ({self.error})")
        if self._round.closed:
            raise ExchangeError(f"{self._where}: the round is closed")
        mv = memoryview(data).cast("B")
        self.bytes_received += len(mv)
        try:
            self._feed(mv)
        except ExchangeError as exc:
            self.error = exc
            raise
        except CodecError as exc:
            self.error = ExchangeError(f"{self._where}: {exc}")
            raise self.error from exc

    def _feed(self, mv: memoryview) -> None:
        if self._decoder is None and not self.abstained:
            need = _ENVELOPE.size - len(self._head)
            self._head += mv[:need]
            mv = mv[need:]
            if len(self._head) < _ENVELOPE.size:
                return
            rnd = self._round
            kind, _, _ = check_envelope(
                self._head,
                (_SHARD, _SHARD_NONE),
                rnd.fragment,
                rnd.round,
                repr(self.sender),
                f"the parameter server (round {rnd.round})",
            )
            if kind == _SHARD_NONE:
                self.abstained = True
            else:
                self._decoder = _ChunkSink(self)
        if self.abstained:
            if len(mv):
                raise ExchangeError(f"{self._where}: {len(mv)} bytes after an abstention")
            return
        assert self._decoder is not None
        self._decoder.feed(mv)

    def _take(self, chunk: Chunk) -> None:
        self._round._accumulate(chunk, self._where)
        self.chunks += 1

    def finish(self) -> None:
        """Raises ExchangeError unless the whole payload arrived (the chunks that did stay
        counted: see the module's partial-contribution rule)."""
        if self.error is not None:
            raise ExchangeError(f"{self._where}: refused ({self.error})")
        if self.complete:
            return
        if self._decoder is None:
            raise ExchangeError(
                f"{self._where}: truncated: {len(self._head)} of the envelope's "
                f"{_ENVELOPE.size} bytes arrived"
            )
        try:
            self._decoder.finish()
        except CodecError as exc:
            self.error = ExchangeError(f"{self._where}: {exc}")
            raise self.error from exc


# --- one process: a server thread and in-process links ------------------------------------------


class LocalParameterServer:
    """Runs an :class:`OuterServer` on a thread of this process, for workers connected with
    :meth:`connect` (tests, simulating a run on one machine).

    Per round it waits for ``workers`` contributions, or for ``timeout`` seconds after the first
    one, closes the round with what came, and hands the update to every connected link. A push
    for a round that is already closed is dropped (recorded in :attr:`late`); the worker still
    receives that round's update. Refused contributions are recorded in :attr:`errors`, the
    statistics of every round in :attr:`history`.
    """

    def __init__(self, server: OuterServer, workers: int, timeout: float = 60.0) -> None:
        if not isinstance(workers, int) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"Invalid workers: {workers!r} (a positive int)")
        if not (timeout > 0):
            raise ValueError(f"Invalid timeout: {timeout} (seconds, > 0)")
        self.server, self.workers, self.timeout = server, workers, float(timeout)
        self.history: list[RoundStats] = []
        self.errors: list[tuple[int, str, Exception]] = []
        self.late: list[tuple[int, str]] = []
        #: set when the server thread died (it closes every link)
        self.failure: BaseException | None = None
        self._inbox: queue.Queue[Any] = queue.Queue()
        self._links: dict[str, LocalServerLink] = {}
        self._lock = threading.Lock()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="hypha-local-ps", daemon=True)
        self._thread.start()

    def connect(self, name: str | None = None) -> LocalServerLink:
        """A link for one worker; ``name`` (unique) identifies its contributions."""
        with self._lock:
            if self._stopped:
                raise ConnectionError("the local parameter server is stopped")
            name = name if name is not None else f"worker-{len(self._links)}"
            if name in self._links:
                raise ValueError(f"a worker named {name!r} is already connected")
            link = LocalServerLink(self, name)
            self._links[name] = link
            return link

    def close(self) -> None:
        """Stops the thread (an open round is discarded) and closes every link."""
        self._inbox.put(_STOP)
        self._thread.join(timeout=60)
        self._shut()

    def __enter__(self) -> LocalParameterServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- called by the links ---------------------------------------------------------------------

    def _initial(self, link: LocalServerLink) -> list[bytes]:
        """The server's model for ``link``; updates queued before it are dropped, atomically with
        the snapshot, so the link's next update is the one of the round it joins at."""
        with self._lock:
            if self._stopped:
                raise ConnectionError("the local parameter server is stopped")
            while True:
                try:
                    link._updates.get_nowait()
                except queue.Empty:
                    break
            return self.server.initial_payload()

    def _disconnect(self, link: LocalServerLink) -> None:
        with self._lock:
            self._links.pop(link.name, None)

    # --- the server thread -----------------------------------------------------------------------

    def _shut(self) -> None:
        with self._lock:
            self._stopped = True
            for link in self._links.values():
                link._updates.put(_CLOSED)

    def _run(self) -> None:
        try:
            while self._serve_round():
                pass
        except BaseException as exc:  # reported to every worker as a closed connection
            self.failure = exc
        finally:
            self._shut()

    def _serve_round(self) -> bool:
        """Collects and closes one round; False once told to stop."""
        rnd: ServerRound | None = None
        deadline: float | None = None
        while rnd is None or len(rnd.contributions) < self.workers:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._inbox.get(timeout=wait)
            except queue.Empty:
                break
            if item is _STOP:
                if rnd is not None:
                    rnd.discard()
                return False
            sender, round_, pieces = item
            if round_ < self.server.round:
                self.late.append((round_, sender))
                continue
            if rnd is None:
                rnd = self.server.open_round()
                deadline = time.monotonic() + self.timeout
            try:
                contribution = rnd.contribution(sender)
            except ValueError as exc:  # the same worker twice
                self.errors.append((rnd.round, sender, exc))
                continue
            try:
                for piece in pieces:
                    contribution.feed(piece)
                contribution.finish()
            except ExchangeError as exc:
                self.errors.append((rnd.round, sender, exc))
        assert rnd is not None
        with self._lock:
            update, stats = rnd.close()
            self.history.append(stats)
            for link in self._links.values():
                link._updates.put((stats.round, update))
        return True


class LocalServerLink(ServerLink):
    """A worker's :class:`~hypha.optim.ServerLink` to a :class:`LocalParameterServer` in the same
    process (from :meth:`LocalParameterServer.connect`)."""

    def __init__(self, driver: LocalParameterServer, name: str) -> None:
        super().__init__()
        self.name = name
        self._driver = driver
        self._updates: queue.Queue[Any] = queue.Queue()

    def _check_open(self) -> None:
        if self.closed:
            raise ConnectionError(f"{self.name}: the link is closed")

    def push(self, round_: int, payload: Iterable[bytes]) -> None:
        self._check_open()
        pieces = [bytes(p) for p in payload]
        self.bytes_sent += sum(len(p) for p in pieces)
        self._driver._inbox.put((self.name, round_, pieces))

    def pull(self, round_: int, timeout: float) -> Iterator[bytes]:
        self._check_open()
        try:
            item = self._updates.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(
                f"{self.name}: no update of round {round_} from the parameter server within "
                f"{timeout} s"
            ) from None
        if item is _CLOSED:
            self._updates.put(_CLOSED)  # later calls see it too
            raise ConnectionError(f"{self.name}: the local parameter server stopped")
        return self._count(item[1])

    def pull_initial(self, timeout: float) -> Iterator[bytes]:
        self._check_open()
        return self._count(self._driver._initial(self))

    def _count(self, pieces: list[bytes]) -> Iterator[bytes]:
        for piece in pieces:
            self.bytes_received += len(piece)
            yield piece

    def close(self) -> None:
        if not self.closed:
            self._driver._disconnect(self)
        super().close()
