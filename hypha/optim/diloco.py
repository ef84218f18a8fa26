"""DiLoCo as a drop-in torch optimizer.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023, https://arxiv.org/abs/2311.08105) lets every worker train alone for ``sync_every`` inner
steps, then averages the workers' *pseudo-gradients* (global copy minus local parameters) and
applies them to the global copy with an outer Nesterov step (lr 0.7, momentum 0.9 in the paper).
Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", 2025, https://arxiv.org/abs/2501.18512) syncs the parameters in
fragments, in rotation, and lets each fragment's exchange overlap the next inner steps.

Here the pseudo-gradients are compressed with error feedback by :mod:`hypha.compress` and the
outer step is sharded: every rank is the parameter server of ``1/world_size`` of the parameters
(see docs/design/2026-11-23-diloco-optimizer.md for the round, the bytes and the memory).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import math
import struct
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
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
from hypha.compress._format import DEFAULT_CHUNK_ELEMS
from hypha.optim._layout import Layout, Segment, Shard
from hypha.optim._transport import Transport

__all__ = ["DiLoCo", "DiLoCoStats", "ExchangeError"]

#: Message envelope that opens every payload: magic, version, kind, fragment, sender, round.
_ENVELOPE = struct.Struct("<4sBBHIQ")
_MAGIC = b"HYDL"
_VERSION = 1
_INIT, _SHARD, _SHARD_NONE, _UPDATE, _UPDATE_NONE = range(5)
_KIND_NAMES = {
    _INIT: "initial parameters",
    _SHARD: "pseudo-gradient shard",
    _SHARD_NONE: "abstention",
    _UPDATE: "outer update",
    _UPDATE_NONE: "empty outer update",
}

_STATE_VERSION = 1


class ExchangeError(RuntimeError):
    """An outer round failed (a timeout, a peer gone, malformed bytes, a peer out of step).

    Peers no longer agree on the global model, so the optimizer refuses further steps: reload a
    checkpoint on every rank."""


@dataclass
class DiLoCoStats:
    inner_steps: int = 0
    #: fragment exchanges completed (one per fragment per ``sync_every`` steps)
    outer_rounds: int = 0
    #: rounds this worker sat out because its parameters held NaN/Inf
    skipped_rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    #: wall time of the exchanges, and the part of it the training loop waited for
    exchange_seconds: float = 0.0
    blocked_seconds: float = 0.0


@dataclass
class _Pending:
    fragment: int
    round: int
    due: int  # inner step after which the fragment is merged into the local parameters
    abstained: bool
    inline: bool  # exchanged on the training thread: all of it was blocking
    #: None once finished (or when restored from a checkpoint)
    future: concurrent.futures.Future[float] | None


def _all_finite(t: torch.Tensor) -> bool:
    return (
        t.numel() == 0
        or bool(torch.isfinite(t.sum(dtype=torch.float32)))
        or bool(torch.isfinite(t).all())
    )


class _ShardDecoder(StreamDecoder):
    """A StreamDecoder that checks the payload against the shard it must carry."""

    def __init__(
        self, shapes: Sequence[tuple[int, ...]], codec: Codec, where: str, **kw: Any
    ) -> None:
        total = sum(math.prod(s) for s in shapes)
        super().__init__(
            DecodeLimits(max_total_elems=max(total, 1), max_tensors=max(len(shapes), 1)), **kw
        )
        self._shapes, self._codec, self._where = list(shapes), codec, where

    def _on_header(self, header: Header) -> None:
        got = [tuple(t.shape) for t in header.tensors]
        if got != self._shapes:
            raise CodecError(
                f"{self._where}: payload carries tensors {got[:4]}..., expected {self._shapes[:4]}... "
                "(the peer's model or DiLoCo settings differ from this one)"
            )
        if header.codec != self._codec.name:
            raise CodecError(
                f"{self._where}: peer encodes with {header.codec}, this rank with {self._codec.name}"
            )


class DiLoCo(torch.optim.Optimizer):
    """DiLoCo around any torch optimizer: ``opt = DiLoCo(torch.optim.AdamW(...), comm)``.

    Every ``sync_every`` calls of :meth:`step` (each runs the inner optimizer), the worker's
    pseudo-gradient ``global − local + error_feedback`` is compressed with ``codec`` (``"int2"``,
    ``"int4"``, ``"int8"``, ``"bf16"`` or ``"fp32"``, optionally ``"+zstd"``), exchanged through
    ``comm``, averaged over the workers and applied to the fp32 global copy with an outer Nesterov
    step (``outer_lr`` 0.7, ``outer_momentum`` 0.9 as in the DiLoCo paper); the local parameters
    then restart from the global copy. All ranks apply the same dequantized update, so their global
    copies are bit-identical.

    Args:
        inner: the optimizer that trains the local parameters; DiLoCo shares its
            ``param_groups`` (so LR schedulers keep working) and adds ``outer_lr`` and
            ``outer_momentum`` to each group.
        comm: a :class:`~hypha.optim.Transport`; ``None`` means a ``DistTransport`` over the
            initialised ``torch.distributed`` default group.
        sync_every: inner steps between two syncs of the same parameters (H in the paper).
        error_feedback: keep what the codec dropped and add it to the next pseudo-gradient
            (Seide et al. 2014; Karimireddy et al. 2019). ``None``: on for lossy codecs.
        fragments: Streaming DiLoCo: sync the parameters in this many fragments, one every
            ``sync_every / fragments`` steps.
        overlap_steps: inner steps that run while a fragment is exchanged, before its update is
            merged. ``None``: 0 with one fragment (the exchange blocks), 1 with several.
        merge_alpha: at the merge, local = alpha * local + (1 - alpha) * global. ``None``: 0
            without overlap, 0.5 with it (Streaming DiLoCo).
        nonfinite: what a worker whose parameters hold NaN/Inf at a sync does: ``"skip"`` sits
            the round out (the others average without it), warns, and restarts its local
            parameters and their inner-optimizer state from the global copy; ``"raise"`` sits the
            round out and then raises :class:`~hypha.compress.NonFiniteError`.
        chunk_elems: elements per codec chunk (the unit of streaming and of scratch memory).
        timeout: seconds to wait for any one message from a peer before the round fails.
        backend: kernel backend for :mod:`hypha.ops` (``None``: the fastest available).
    """

    def __init__(
        self,
        inner: torch.optim.Optimizer,
        comm: Transport | None = None,
        *,
        sync_every: int = 100,
        outer_lr: float = 0.7,
        outer_momentum: float = 0.9,
        codec: str | Codec = "int4",
        error_feedback: bool | None = None,
        fragments: int = 1,
        overlap_steps: int | None = None,
        merge_alpha: float | None = None,
        nonfinite: str = "skip",
        chunk_elems: int = DEFAULT_CHUNK_ELEMS,
        timeout: float = 600.0,
        backend: str | None = None,
    ) -> None:
        if not isinstance(inner, torch.optim.Optimizer):
            raise TypeError(f"inner must be a torch.optim.Optimizer, got {type(inner).__name__}")
        if isinstance(inner, DiLoCo):
            raise TypeError("inner is already a DiLoCo optimizer")
        if not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1:
            raise ValueError(
                f"Invalid sync_every: {sync_every!r} (a positive number of inner steps)"
            )
        if not (0.0 <= outer_lr < math.inf):
            raise ValueError(f"Invalid outer_lr: {outer_lr}")
        if not (0.0 <= outer_momentum < 1.0):
            raise ValueError(
                f"Invalid outer_momentum: {outer_momentum} (expected 0 <= momentum < 1)"
            )
        self.codec = parse_codec(codec)
        if error_feedback is None:
            error_feedback = self.codec.name != "fp32"
        elif not isinstance(error_feedback, bool):
            raise TypeError(f"error_feedback must be True, False or None, got {error_feedback!r}")
        if error_feedback and self.codec.name == "fp32":
            raise ValueError(
                "error_feedback needs a lossy codec; fp32 sends the pseudo-gradient exactly"
            )
        if not isinstance(fragments, int) or isinstance(fragments, bool) or fragments < 1:
            raise ValueError(f"Invalid fragments: {fragments!r} (a positive int)")
        if sync_every % fragments:
            raise ValueError(
                f"sync_every ({sync_every}) must be a multiple of fragments ({fragments}): one fragment "
                "is synced every sync_every / fragments steps"
            )
        interval = sync_every // fragments
        if overlap_steps is None:
            overlap_steps = 0 if fragments == 1 else 1
        if (
            not isinstance(overlap_steps, int)
            or isinstance(overlap_steps, bool)
            or not 0 <= overlap_steps <= interval
        ):
            raise ValueError(
                f"Invalid overlap_steps: {overlap_steps!r} (an int in [0, sync_every / fragments = {interval}])"
            )
        if merge_alpha is None:
            merge_alpha = 0.0 if overlap_steps == 0 else 0.5
        if not (0.0 <= merge_alpha < 1.0):
            raise ValueError(f"Invalid merge_alpha: {merge_alpha} (expected 0 <= alpha < 1)")
        if nonfinite not in ("skip", "raise"):
            raise ValueError(f"nonfinite must be 'skip' or 'raise', got {nonfinite!r}")
        if not (timeout > 0):
            raise ValueError(f"Invalid timeout: {timeout} (seconds, > 0)")
        if backend is not None and backend not in ops.BACKENDS:
            raise ValueError(f"Invalid backend: {backend!r} (one of {ops.BACKENDS}, or None)")
        # the codec checks chunk_elems against its block size
        DeltaWriter([], self.codec, chunk_elems=chunk_elems)

        own_comm = comm is None
        if comm is None:
            import torch.distributed as dist

            if not (dist.is_available() and dist.is_initialized()):
                raise ValueError(
                    "DiLoCo needs comm=: a Transport (LocalTransport, PipeTransport, DistTransport), "
                    "or torch.distributed initialised (torchrun) for the default DistTransport"
                )
            from hypha.optim._transport import DistTransport

            comm = DistTransport()
        if not isinstance(comm, Transport):
            raise TypeError(f"comm must be a hypha.optim.Transport, got {type(comm).__name__}")

        self.inner = inner
        super().__init__(
            inner.param_groups, {"outer_lr": outer_lr, "outer_momentum": outer_momentum}
        )
        # NOTE: share the inner optimizer's group list itself (Optimizer.__init__ copied it), so
        # an LR scheduler on either object changes the lr the inner optimizer uses.
        self.param_groups = inner.param_groups
        for group in self.param_groups:
            self._check_group(group)

        self.comm = comm
        self._own_comm = own_comm
        self.sync_every = sync_every
        self.error_feedback = error_feedback
        self.fragments = fragments
        self.overlap_steps = overlap_steps
        self.merge_alpha = float(merge_alpha)
        self.nonfinite = nonfinite
        self.chunk_elems = chunk_elems
        self.timeout = float(timeout)
        self.backend = backend
        self.stats = DiLoCoStats()

        self._params: list[torch.Tensor] = [p for g in self.param_groups for p in g["params"]]
        self._group_of: list[dict[str, Any]] = [g for g in self.param_groups for _ in g["params"]]
        if not self._params:
            raise ValueError("the inner optimizer has no parameters")
        devices = {p.device for p in self._params}
        if len(devices) > 1:
            raise ValueError(
                f"DiLoCo needs all parameters on one device, got {sorted(map(str, devices))}"
            )
        for i, p in enumerate(self._params):
            if p.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                raise TypeError(
                    f"parameter {i} has dtype {p.dtype}; DiLoCo trains float32/float16/bfloat16"
                )
        self.device = devices.pop()
        align = self.codec.block_size if self.codec.quantized else 1
        self.layout = Layout([p.numel() for p in self._params], fragments, comm.world_size, align)
        self.rank, self.world_size = comm.rank, comm.world_size
        # world size 1: nobody to send the update to, so it is applied exactly, in place
        self._direct = self.world_size == 1

        for p in self._params:
            st = self.state[p]
            st["global"] = p.detach().to(torch.float32, copy=True).contiguous()
            if error_feedback:
                st["error_feedback"] = torch.zeros_like(st["global"])
        owned = self.layout.owned[self.rank]
        self._outer_momentum = torch.zeros(owned, dtype=torch.float32, device=self.device)
        self._outer_ef = (
            torch.zeros(owned, dtype=torch.float32, device=self.device)
            if error_feedback and not self._direct
            else None
        )
        self._step = 0
        self._round = 0
        self._pending: _Pending | None = None
        self._failed: BaseException | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._scratch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._sync_initial()
        # stats count the rounds' traffic, not the initial broadcast
        self._bytes0 = (comm.bytes_sent, comm.bytes_received)

    # --- torch.optim conventions --------------------------------------------------------------

    @staticmethod
    def _check_group(group: dict[str, Any]) -> None:
        lr, mu = group.get("outer_lr"), group.get("outer_momentum")
        if not isinstance(lr, int | float) or not (0.0 <= lr < math.inf):
            raise ValueError(f"Invalid outer_lr: {lr}")
        if not isinstance(mu, int | float) or not (0.0 <= mu < 1.0):
            raise ValueError(f"Invalid outer_momentum: {mu}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if hasattr(self, "layout"):
            raise NotImplementedError(
                "DiLoCo fixes its parameters at construction (every rank must agree on the layout); "
                "add the group to the inner optimizer before wrapping it"
            )
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def __setstate__(self, state: dict[str, Any]) -> None:
        raise TypeError("DiLoCo holds a live connection; pickle its state_dict() instead")

    def __getstate__(self) -> dict[str, Any]:
        raise TypeError("DiLoCo holds a live connection; pickle its state_dict() instead")

    def __enter__(self) -> DiLoCo:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def global_parameters(self) -> list[torch.Tensor]:
        """The fp32 global copies, aligned with the parameters (evaluate the global model with
        these). With an exchange in flight, its fragment may be mid-update: call
        :meth:`synchronize` first."""
        return [self.state[p]["global"] for p in self._params]

    def close(self) -> None:
        """Waits for an exchange in flight, stops the exchange thread, closes a transport that
        DiLoCo created itself."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._own_comm:
            self.comm.close()

    # --- the training-loop side -----------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One inner step; every ``sync_every / fragments`` steps it also starts (or finishes)
        a fragment's outer round."""
        self._check_usable()
        with torch.enable_grad():
            loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._step += 1
        self.stats.inner_steps = self._step
        t = self._step
        if self._pending is not None and self._pending.due <= t:
            self._finish_pending()
        interval = self.sync_every // self.fragments
        if t % interval == 0:
            fragment = (t // interval - 1) % self.fragments
            self._start_round(fragment)
            if self.overlap_steps == 0:
                self._finish_pending()
        return loss

    def synchronize(self) -> None:
        """Waits for the exchange in flight (if any) to reach the global copy; its merge into the
        local parameters still happens at its step."""
        self._check_usable()
        pending = self._pending
        if pending is not None and pending.future is not None:
            self._wait(pending)

    def _check_usable(self) -> None:
        if self._failed is not None:
            raise ExchangeError(
                f"rank {self.rank}: a previous outer round failed ({self._failed}); the ranks no "
                "longer agree on the global model. Reload a checkpoint on every rank."
            ) from self._failed

    def _start_round(self, fragment: int) -> None:
        assert self._pending is None, "one exchange in flight at most"
        round_ = self._round
        self._round += 1
        payloads = self._encode(fragment, round_)
        abstained = payloads is None
        self._pending = _Pending(
            fragment, round_, self._step + self.overlap_steps, abstained, self.overlap_steps == 0, None
        )
        if self.overlap_steps == 0:
            self._pending.future = concurrent.futures.Future()
            try:
                self._pending.future.set_result(self._exchange(fragment, round_, payloads))
            except BaseException as exc:
                self._pending.future.set_exception(exc)
        else:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, "hypha-diloco")
            self._pending.future = self._executor.submit(self._exchange, fragment, round_, payloads)

    def _wait(self, pending: _Pending) -> None:
        assert pending.future is not None
        t0 = time.perf_counter()
        try:
            seconds = pending.future.result()
        except BaseException as exc:
            self._failed = exc
            self._pending = None
            if isinstance(exc, ExchangeError):
                raise
            raise ExchangeError(
                f"rank {self.rank}: outer round {pending.round} (fragment {pending.fragment}) failed: {exc}"
            ) from exc
        finally:
            self.stats.blocked_seconds += time.perf_counter() - t0
            self.stats.bytes_sent = self.comm.bytes_sent - self._bytes0[0]
            self.stats.bytes_received = self.comm.bytes_received - self._bytes0[1]
        pending.future = None
        self.stats.exchange_seconds += seconds
        if pending.inline:
            self.stats.blocked_seconds += seconds
        self.stats.outer_rounds += 1

    def _finish_pending(self) -> None:
        pending = self._pending
        assert pending is not None
        if pending.future is not None:
            self._wait(pending)
        self._pending = None
        self._merge(
            pending.fragment, 0.0 if pending.abstained else self.merge_alpha, pending.abstained
        )
        if pending.abstained:
            self.stats.skipped_rounds += 1
            message = (
                f"rank {self.rank}: parameters held NaN/Inf at inner step {pending.due - self.overlap_steps}; "
                f"this worker sat out outer round {pending.round} and restarted fragment "
                f"{pending.fragment} from the global model"
            )
            if self.nonfinite == "raise":
                raise NonFiniteError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    # --- local parameters -----------------------------------------------------------------------

    def _merge(self, fragment: int, alpha: float, reset_inner: bool) -> None:
        """local <- alpha * local + (1 - alpha) * global over the fragment's elements."""
        by_param: dict[int, list[Segment]] = {}
        for seg in self.layout.fragment_segments(fragment):
            by_param.setdefault(seg.param, []).append(seg)
        for i, segs in by_param.items():
            p = self._params[i].detach()
            g = self.state[self._params[i]]["global"].view(-1)
            flat = p.view(-1) if p.is_contiguous() else p.reshape(-1)
            for seg in segs:
                dst, src = flat[seg.start : seg.stop], g[seg.start : seg.stop]
                if alpha == 0.0:
                    dst.copy_(src)
                else:
                    dst.copy_(dst.to(torch.float32).mul_(alpha).add_(src, alpha=1.0 - alpha))
            if not p.is_contiguous():
                p.copy_(flat.view_as(p))
            if reset_inner:
                self.inner.state.pop(self._params[i], None)

    def _encode(self, fragment: int, round_: int) -> list[list[bytes]] | None:
        """The worker's pseudo-gradient of ``fragment``, one payload per owner, encoded now (the
        inner steps that follow change the local parameters). None when it holds NaN/Inf."""
        for i in self.layout.fragment_params(fragment):
            if not _all_finite(self._params[i].detach()):
                return None
        payloads = []
        for shard in self.layout.shards[fragment]:
            globals_, locals_, efs = [], [], []
            for seg in shard.segments:
                p = self._params[seg.param]
                st = self.state[p]
                globals_.append(st["global"].view(-1)[seg.start : seg.stop])
                flat = p.detach().view(-1) if p.is_contiguous() else p.detach().reshape(-1)
                locals_.append(flat[seg.start : seg.stop])
                if self.error_feedback:
                    efs.append(st["error_feedback"].view(-1)[seg.start : seg.stop])
            payloads.append(
                list(
                    iter_encode_delta(
                        globals_,
                        locals_,
                        efs if self.error_feedback else None,
                        self.codec,
                        chunk_elems=self.chunk_elems,
                        seed=self._seed(round_, shard.owner),
                        check_finite=False,  # checked above, before any error feedback moved
                        backend=self.backend,
                    )
                )
            )
        return payloads

    def _seed(self, round_: int, shard: int) -> int:
        """Stochastic-rounding seed: distinct per round, sender and shard, the same on a rerun."""
        digest = hashlib.blake2b(
            struct.pack("<QII", round_, self.rank, shard), digest_size=8
        ).digest()
        return int.from_bytes(digest, "little")

    # --- the exchange (runs on the exchange thread when overlapped) ------------------------------

    def _send_payload(
        self, peer: int, kind: int, fragment: int, round_: int, pieces: list[bytes]
    ) -> None:
        self.comm.send(peer, _ENVELOPE.pack(_MAGIC, _VERSION, kind, fragment, self.rank, round_))
        for piece in pieces:
            self.comm.send(peer, piece)

    def _open(self, peer: int, kinds: tuple[int, ...], fragment: int, round_: int) -> int:
        """Reads a payload's envelope from ``peer``; returns its kind."""
        msg = self.comm.recv(peer, self.timeout)
        if len(msg) != _ENVELOPE.size:
            raise ExchangeError(
                f"rank {self.rank}: rank {peer} sent {len(msg)} bytes where an envelope belongs"
            )
        magic, version, kind, frag, sender, rnd = _ENVELOPE.unpack(msg)
        if magic != _MAGIC or version != _VERSION:
            raise ExchangeError(
                f"rank {self.rank}: rank {peer} speaks {magic!r} v{version}, not DiLoCo v{_VERSION}"
            )
        if sender != peer or kind not in kinds or frag != fragment or rnd != round_:
            expect = " or ".join(_KIND_NAMES[k] for k in kinds)
            got = _KIND_NAMES.get(kind, f"kind {kind}")
            raise ExchangeError(
                f"rank {self.rank}: rank {peer} is out of step: it sent {got} for round {rnd} "
                f"fragment {frag} (from rank {sender}), expected {expect} for round {round_} "
                f"fragment {fragment}"
            )
        return kind

    def _chunks(self, source: Callable[[], bytes], decoder: StreamDecoder) -> Iterator[Chunk]:
        while not decoder.done:
            yield from decoder.feed(source())
        decoder.finish()

    def _source(self, peer: int, pieces: list[bytes] | None) -> Callable[[], bytes]:
        if peer == self.rank:
            assert pieces is not None
            it = iter(pieces)
            return lambda: next(it)
        return lambda: self.comm.recv(peer, self.timeout)

    def _scratch_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._scratch is None:
            n = min(self.chunk_elems, max(self.layout.total, 1))
            self._scratch = (
                torch.empty(n, dtype=torch.float32, device=self.device),
                torch.empty(n, dtype=torch.float32, device=self.device),
            )
        return self._scratch

    def _exchange(self, fragment: int, round_: int, payloads: list[list[bytes]] | None) -> float:
        t0 = time.perf_counter()
        try:
            self._exchange_inner(fragment, round_, payloads)
            self.comm.flush(self.timeout)
        except ExchangeError:
            raise
        except (CodecError, TimeoutError, ConnectionError, NonFiniteError, ValueError) as exc:
            raise ExchangeError(
                f"rank {self.rank}: outer round {round_} (fragment {fragment}) failed: {exc}"
            ) from exc
        return time.perf_counter() - t0

    def _exchange_inner(
        self, fragment: int, round_: int, payloads: list[list[bytes]] | None
    ) -> None:
        shards = self.layout.shards[fragment]
        mine = shards[self.rank]
        # 1. my pseudo-gradient shards to their owners
        for j in range(self.world_size):
            if j != self.rank:
                if payloads is None:
                    self._send_payload(j, _SHARD_NONE, fragment, round_, [])
                else:
                    self._send_payload(j, _SHARD, fragment, round_, payloads[j])
        # 2. as owner of my shard: merge everyone's contributions, outer step, broadcast
        streams: list[Iterator[Chunk]] = []
        for i in range(self.world_size):
            if i == self.rank:
                if payloads is None:
                    continue
                source = self._source(i, payloads[i])
            else:
                if self._open(i, (_SHARD, _SHARD_NONE), fragment, round_) == _SHARD_NONE:
                    continue
                source = self._source(i, None)
            decoder = _ShardDecoder(
                mine.shapes, self.codec, f"shard from rank {i}", device=self.device
            )
            streams.append(self._chunks(source, decoder))
        self._outer_step(mine, fragment, round_, streams)
        # 3. everyone else's outer updates into my global copy
        for j in range(self.world_size):
            if j == self.rank:
                continue
            if self._open(j, (_UPDATE, _UPDATE_NONE), fragment, round_) == _UPDATE_NONE:
                continue
            decoder = _ShardDecoder(
                shards[j].shapes, self.codec, f"update from rank {j}", device=self.device
            )
            for chunk in self._chunks(self._source(j, None), decoder):
                self._apply(shards[j], chunk)

    def _apply(self, shard: Shard, chunk: Chunk) -> None:
        seg = shard.segments[chunk.tensor]
        g = self.state[self._params[seg.param]]["global"].view(-1)[seg.start : seg.stop]
        chunk.accumulate_into(g)

    def _outer_step(
        self, shard: Shard, fragment: int, round_: int, streams: list[Iterator[Chunk]]
    ) -> None:
        peers = [j for j in range(self.world_size) if j != self.rank]
        n = len(streams)
        if n == 0 or shard.numel == 0:
            for j in peers:
                self._send_payload(j, _UPDATE_NONE, fragment, round_, [])
            for stream in streams:  # an empty shard still has a payload to read to its end
                for _ in stream:
                    pass
            return
        writer = None
        if not self._direct:
            writer = DeltaWriter(
                shard.shapes,
                self.codec,
                chunk_elems=self.chunk_elems,
                seed=self._seed(round_, self.world_size + 1),
                backend=self.backend,
            )
            header = writer.header()
            for j in peers:
                self._send_payload(j, _UPDATE, fragment, round_, [header])
            own = _ShardDecoder(shard.shapes, self.codec, "own update", device=self.device)
            own.feed(header)
        acc_buf, new_buf = self._scratch_buffers()
        offsets = [0]
        for seg in shard.segments:
            offsets.append(offsets[-1] + seg.numel)
        plan = (
            writer.plan()
            if writer is not None
            else DeltaWriter(shard.shapes, "fp32", chunk_elems=self.chunk_elems).plan()
        )
        for ti, ci, start, numel in plan:
            seg = shard.segments[ti]
            acc = acc_buf[:numel]
            acc.zero_()
            for stream in streams:  # rank order: the sum is the same on every run
                chunk = next(stream)
                if (chunk.tensor, chunk.start, chunk.numel) != (ti, start, numel):
                    raise ExchangeError(
                        f"rank {self.rank}: chunk {chunk.index} of tensor {chunk.tensor} out of plan"
                    )
                _add(acc, chunk)
            acc.div_(n)
            group = self._group_of[seg.param]
            lr, mu = float(group["outer_lr"]), float(group["outer_momentum"])
            lo = shard.owner_offset + offsets[ti] + start
            mom = self._outer_momentum[lo : lo + numel]
            g = self.state[self._params[seg.param]]["global"].view(-1)[
                seg.start + start : seg.start + start + numel
            ]
            if writer is None:
                ops.nesterov_(g, mom, acc, lr, mu, backend=self.backend)
                continue
            new = new_buf[:numel]
            new.copy_(g)
            ops.nesterov_(new, mom, acc, lr, mu, backend=self.backend)
            ef = self._outer_ef[lo : lo + numel] if self._outer_ef is not None else None
            body = writer.chunk(ti, ci, new, g, ef)
            for j in peers:
                self.comm.send(j, body)
            for own_chunk in own.feed(body):  # apply exactly the bytes the others apply
                _add(g, own_chunk)
        for stream in streams:  # each payload must end where the plan does
            for extra in stream:
                raise ExchangeError(
                    f"rank {self.rank}: unexpected chunk {extra.index} of tensor {extra.tensor}"
                )
        if writer is not None:
            own.finish()

    # --- the initial broadcast --------------------------------------------------------------------

    def _settings(self) -> dict[str, Any]:
        return {
            "sync_every": self.sync_every,
            "fragments": self.fragments,
            "overlap_steps": self.overlap_steps,
            "codec": str(self.codec),
            "block_size": self.codec.block_size,
            "error_feedback": self.error_feedback,
            "chunk_elems": self.chunk_elems,
            "numels": list(self.layout.numels),
        }

    def _sync_initial(self) -> None:
        """Every rank starts from rank 0's parameters (as DDP does), and checks that its
        settings agree with rank 0's."""
        if self.world_size == 1:
            return
        try:
            if self.rank == 0:
                settings = json.dumps(self._settings()).encode()
                pieces = [settings, *iter_encode([p.detach().reshape(-1) for p in self._params], "fp32")]
                for j in range(1, self.world_size):
                    self._send_payload(j, _INIT, 0, 0, pieces)
                self.comm.flush(self.timeout)
                return
            self._open(0, (_INIT,), 0, 0)
            theirs = json.loads(self.comm.recv(0, self.timeout))
            mine = self._settings()
            diff = {k: (theirs.get(k), v) for k, v in mine.items() if theirs.get(k) != v}
            if diff:
                raise ValueError(
                    f"rank {self.rank}: DiLoCo settings differ from rank 0's: "
                    + ", ".join(
                        f"{k}: rank 0 has {a!r}, this rank {b!r}" for k, (a, b) in diff.items()
                    )
                )
            shapes = [(p.numel(),) for p in self._params]
            decoder = _ShardDecoder(
                shapes, parse_codec("fp32"), "initial parameters", device=self.device
            )
            for chunk in self._chunks(self._source(0, None), decoder):
                g = self.state[self._params[chunk.tensor]]["global"].view(-1)
                g[chunk.start : chunk.start + chunk.numel].copy_(chunk.values())
        except (CodecError, TimeoutError, ConnectionError, json.JSONDecodeError) as exc:
            raise ExchangeError(
                f"rank {self.rank}: receiving the initial parameters failed: {exc}"
            ) from exc
        for p in self._params:
            p.detach().copy_(self.state[p]["global"].view_as(p))

    # --- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same trajectory: the global copies, error feedback,
        this rank's outer momentum and error-feedback shards, the inner optimizer, the counters.
        Each rank saves its own (the shards differ). Waits for an exchange in flight."""
        self.synchronize()
        index = {id(p): i for i, p in enumerate(self._params)}
        groups = []
        for group in self.param_groups:
            packed = {k: v for k, v in group.items() if k != "params"}
            packed["params"] = [index[id(p)] for p in group["params"]]
            groups.append(packed)
        pending = self._pending
        return {
            "state": {
                i: {k: v.clone() for k, v in self.state[p].items()}
                for i, p in enumerate(self._params)
            },
            "param_groups": groups,
            "inner": self.inner.state_dict(),
            "diloco": {
                "version": _STATE_VERSION,
                "rank": self.rank,
                "settings": self._settings(),
                "layout": self.layout.describe(),
                "step": self._step,
                "round": self._round,
                "pending": None
                if pending is None
                else {
                    "fragment": pending.fragment,
                    "round": pending.round,
                    "due": pending.due,
                    "abstained": pending.abstained,
                },
                "outer_momentum": self._outer_momentum.clone(),
                "outer_error_feedback": None if self._outer_ef is None else self._outer_ef.clone(),
                "stats": dict(self.stats.__dict__),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output saved by the same rank with the same settings."""
        if self._pending is not None and self._pending.future is not None:
            self._wait(self._pending)
        try:
            meta = state_dict["diloco"]
            states, groups = state_dict["state"], state_dict["param_groups"]
            inner = state_dict["inner"]
        except (KeyError, TypeError):
            raise ValueError(
                "not a DiLoCo state_dict (expected keys state, param_groups, inner, diloco)"
            ) from None
        if meta.get("version") != _STATE_VERSION:
            raise ValueError(
                f"DiLoCo state_dict version {meta.get('version')!r}, this build reads {_STATE_VERSION}"
            )
        if meta["layout"] != self.layout.describe() or meta["settings"] != self._settings():
            raise ValueError(
                "the checkpoint was made with different parameters or DiLoCo settings: "
                f"{meta['settings']} on {meta['layout']['world_size']} ranks, this optimizer has "
                f"{self._settings()} on {self.world_size}"
            )
        if meta["rank"] != self.rank:
            raise ValueError(
                f"the checkpoint belongs to rank {meta['rank']}, this is rank {self.rank}"
            )
        if len(groups) != len(self.param_groups) or any(
            len(a["params"]) != len(b["params"])
            for a, b in zip(groups, self.param_groups, strict=True)
        ):
            raise ValueError("the checkpoint's parameter groups do not match the optimizer's")
        new_states: dict[int, dict[str, torch.Tensor]] = {}
        for i, p in enumerate(self._params):
            saved = states.get(i, states.get(str(i)))
            if saved is None or set(saved) != set(self.state[p]):
                raise ValueError(
                    f"the checkpoint's state of parameter {i} is missing or has other keys"
                )
            for key, value in saved.items():
                if not isinstance(value, torch.Tensor) or value.shape != self.state[p][key].shape:
                    raise ValueError(
                        f"parameter {i} {key}: expected shape {tuple(self.state[p][key].shape)}"
                    )
                if not _all_finite(value):
                    raise ValueError(f"parameter {i} {key} holds NaN/Inf in the checkpoint")
            new_states[i] = saved
        for name, mine_buf in (
            ("outer_momentum", self._outer_momentum),
            ("outer_error_feedback", self._outer_ef),
        ):
            saved_buf = meta[name]
            if (saved_buf is None) != (mine_buf is None) or (
                saved_buf is not None and mine_buf is not None and saved_buf.shape != mine_buf.shape
            ):
                raise ValueError(f"the checkpoint's {name} does not match this rank's shard")
        for saved_group in groups:
            self._check_group(saved_group)
        self.inner.load_state_dict(inner)
        # NOTE: inner.load_state_dict replaced the group dicts; share them again.
        self.param_groups = self.inner.param_groups
        for group, saved_group in zip(self.param_groups, groups, strict=True):
            for key in ("outer_lr", "outer_momentum"):
                group[key] = saved_group[key]
        self._group_of = [g for g in self.param_groups for _ in g["params"]]
        for i, p in enumerate(self._params):
            for key, value in new_states[i].items():
                self.state[p][key].copy_(value)
        self._outer_momentum.copy_(meta["outer_momentum"])
        if self._outer_ef is not None:
            self._outer_ef.copy_(meta["outer_error_feedback"])
        self._step, self._round = int(meta["step"]), int(meta["round"])
        pending = meta["pending"]
        self._pending = (
            None
            if pending is None
            else _Pending(
                pending["fragment"], pending["round"], pending["due"], pending["abstained"], False, None
            )
        )
        self.stats = DiLoCoStats(**meta["stats"])
        self._failed = None


def _add(dst: torch.Tensor, chunk: Chunk) -> None:
    """dst += the chunk's values, for ``dst`` exactly the chunk's elements."""
    if chunk.q is not None:
        ops.dequantize_accumulate_(dst, chunk.q)
    else:
        assert chunk.raw is not None
        dst.add_(chunk.raw)
