"""DiLoCo as a drop-in torch optimizer.

DiLoCo (Douillard et al., "DiLoCo: Distributed Low-Communication Training of Language Models",
2023, https://arxiv.org/abs/2311.08105) lets every worker train alone for ``sync_every`` inner
steps, then averages the workers' *pseudo-gradients* (global copy minus local parameters) and
applies them to the global copy with an outer Nesterov step (lr 0.7, momentum 0.9 in the paper).
Streaming DiLoCo (Douillard et al., "Streaming DiLoCo with overlapping communication: Towards a
Distributed Free Lunch", 2025, https://arxiv.org/abs/2501.18512) syncs the parameters in
fragments, in rotation, and lets each fragment's exchange overlap the next inner steps.

Here the pseudo-gradients are compressed with error feedback by :mod:`hypha.compress`. The outer
step runs in one of two modes, chosen by ``comm``:

* a :class:`~hypha.optim.Transport`: the outer step is sharded, every rank is the parameter
  server of ``1/world_size`` of the parameters;
* a :class:`~hypha.optim.ServerLink`: a central parameter server
  (:class:`~hypha.optim.OuterServer`) holds the outer momentum and runs the step; each worker
  pushes its pseudo-gradient and applies the server's update.

See docs/design/2026-11-23-diloco-optimizer.md for the rounds, the bytes and the memory.
"""

from __future__ import annotations

import concurrent.futures
import math
import secrets
import struct
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hypha import ops
from hypha.compress import (
    DEFAULT_CHUNK_ELEMS,
    Codec,
    DeltaWriter,
    NonFiniteError,
    parse_codec,
)
from hypha.optim._exchange import Exchange, ExchangeError, ServerExchange, all_finite
from hypha.optim._layout import Layout, Segment
from hypha.optim._link import ServerLink
from hypha.optim._transport import DistTransport, Transport

__all__ = ["DiLoCo", "DiLoCoStats", "ExchangeError"]

_STATE_VERSION = 1
#: ``DiLoCo.mode``: the outer step sharded over the ranks, or run by a central parameter server
SHARDED, SERVER = "sharded", "server"


@dataclass
class DiLoCoStats:
    inner_steps: int = 0
    #: fragment exchanges completed (one per fragment per ``sync_every`` steps)
    outer_rounds: int = 0
    #: rounds this worker sat out because its parameters held NaN/Inf
    skipped_rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    #: encoding the pseudo-gradients (on the training thread, at the sync step)
    encode_seconds: float = 0.0
    #: wall time of the exchanges (waiting for peers included), and the part of it the training
    #: loop waited for; the loop's cost of DiLoCo is encode_seconds + blocked_seconds
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


class DiLoCo(torch.optim.Optimizer):
    """DiLoCo around any torch optimizer: ``opt = DiLoCo(torch.optim.AdamW(...), comm)``.

    Every ``sync_every`` calls of :meth:`step` (each runs the inner optimizer), the worker's
    pseudo-gradient ``global − local + error_feedback`` is compressed with ``codec`` (``"int2"``,
    ``"int4"``, ``"int8"``, ``"bf16"`` or ``"fp32"``, optionally ``"+zstd"``), exchanged through
    ``comm``, averaged over the workers and applied to the fp32 global copy with an outer Nesterov
    step (``outer_lr`` 0.7, ``outer_momentum`` 0.9 as in the DiLoCo paper); the local parameters
    then restart from the global copy. All ranks apply the same dequantized update, so their global
    copies are bit-identical.

    With a :class:`~hypha.optim.ServerLink` as ``comm`` the outer step runs on a central parameter
    server (``mode == "server"``): at construction the worker takes the server's global model and
    round (its own parameters are overwritten, and the settings the server knows must match);
    each round pushes the pseudo-gradient of fragment ``round % fragments`` and applies the
    server's update. The worker keeps no outer momentum (``outer_lr`` / ``outer_momentum`` in
    its groups are unused; the server's apply). ``rank`` is 0 and ``world_size`` 1.

    Args:
        inner: the optimizer that trains the local parameters; DiLoCo shares its
            ``param_groups`` (so LR schedulers keep working) and adds ``outer_lr`` and
            ``outer_momentum`` to each group.
        comm: a :class:`~hypha.optim.Transport` or a :class:`~hypha.optim.ServerLink` (the caller
            keeps it and closes it); ``None`` means a ``DistTransport`` over the initialised
            ``torch.distributed`` world, which :meth:`close` closes.
        sync_every: inner steps between two syncs of the same parameters (H in the paper).
            ``None``: rounds start only when the caller calls :meth:`sync`.
        error_feedback: keep what the codec dropped and add it to the next pseudo-gradient
            (Seide et al. 2014; Karimireddy et al. 2019). ``None``: on for lossy codecs.
        fragments: Streaming DiLoCo: sync the parameters in this many fragments, one every
            ``sync_every / fragments`` steps.
        overlap_steps: inner steps that run while a fragment is exchanged, before its update is
            merged (at most ``sync_every / fragments``). ``None``: 0 with one fragment (the
            exchange blocks), 1 with several.
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
        comm: Transport | ServerLink | None = None,
        *,
        sync_every: int | None = 100,
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
        if sync_every is not None and (
            not isinstance(sync_every, int) or isinstance(sync_every, bool) or sync_every < 1
        ):
            raise ValueError(
                f"Invalid sync_every: {sync_every!r} (a positive number of inner steps, or None "
                "to start rounds with sync())"
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
        if sync_every is not None and sync_every % fragments:
            raise ValueError(
                f"sync_every ({sync_every}) must be a multiple of fragments ({fragments}): one fragment "
                "is synced every sync_every / fragments steps"
            )
        if overlap_steps is None:
            overlap_steps = 0 if fragments == 1 else 1
        if not isinstance(overlap_steps, int) or isinstance(overlap_steps, bool):
            bad_overlap = True
        elif sync_every is None:
            bad_overlap = overlap_steps < 0
        else:
            bad_overlap = not 0 <= overlap_steps <= sync_every // fragments
        if bad_overlap:
            if sync_every is None:
                raise ValueError(f"Invalid overlap_steps: {overlap_steps!r} (a non-negative int)")
            raise ValueError(
                f"Invalid overlap_steps: {overlap_steps!r} (an int in [0, sync_every / fragments = "
                f"{sync_every // fragments}])"
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
            comm = DistTransport()
        if not isinstance(comm, Transport | ServerLink):
            raise TypeError(
                f"comm must be a hypha.optim.Transport or ServerLink, got {type(comm).__name__}"
            )
        self.mode = SERVER if isinstance(comm, ServerLink) else SHARDED

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
        if isinstance(comm, ServerLink):
            # NOTE: rank 0 of world 1, but the update is not applied in place: it comes from
            # the server
            self.rank, self.world_size = 0, 1
        else:
            self.rank, self.world_size = comm.rank, comm.world_size
        self.layout = Layout([p.numel() for p in self._params], fragments, self.world_size, align)

        for p in self._params:
            st = self.state[p]
            st["global"] = p.detach().to(torch.float32, copy=True).contiguous()
            if error_feedback:
                st["error_feedback"] = torch.zeros_like(st["global"])
        # the outer momentum of this rank's shards; none in server mode (it lives on the server)
        owned = self.layout.owned[self.rank] if self.mode == SHARDED else 0
        self._outer_momentum = torch.zeros(owned, dtype=torch.float32, device=self.device)
        self._step = 0
        self._round = 0
        self._pending: _Pending | None = None
        self._failed: BaseException | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        globals_ = [self.state[p]["global"] for p in self._params]
        efs = [self.state[p]["error_feedback"] for p in self._params] if error_feedback else None
        self._exchange: Exchange | ServerExchange
        if isinstance(comm, ServerLink):
            # NOTE: workers of a server have no rank to tell their stochastic rounding apart, so
            # each draws a salt (kept in its checkpoint, so a resumed worker rounds the same way)
            self._seed_salt = secrets.randbits(64)
            self._exchange = ServerExchange(
                comm,
                self.layout,
                self.codec,
                params=self._params,
                globals_=globals_,
                error_feedback=efs,
                chunk_elems=chunk_elems,
                timeout=self.timeout,
                backend=backend,
                device=self.device,
                sender=struct.pack("<Q", self._seed_salt),
            )
        else:
            self._seed_salt = 0
            self._exchange = Exchange(
                comm,
                self.layout,
                self.codec,
                params=self._params,
                globals_=globals_,
                error_feedback=efs,
                momentum=self._outer_momentum,
                hyper=self._hyper,
                chunk_elems=chunk_elems,
                timeout=self.timeout,
                backend=backend,
            )
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

    def _hyper(self, i: int) -> tuple[float, float]:
        group = self._group_of[i]
        return float(group["outer_lr"]), float(group["outer_momentum"])

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Only during construction: the layout every rank agreed on is fixed after it."""
        if hasattr(self, "layout"):
            raise RuntimeError(
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
        """The fp32 global copies, in the order of the inner optimizer's ``param_groups``
        (which may differ from ``model.parameters()``; ``opt.state[p]["global"]`` is the copy of
        ``p``). With an exchange in flight its fragment may be mid-update: call
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
        a fragment's outer round. It merges a round started ``overlap_steps`` steps ago."""
        self._check_usable()
        with torch.enable_grad():
            loss = self.inner.step(closure) if closure is not None else self.inner.step()
        self._step += 1
        self.stats.inner_steps = self._step
        t = self._step
        # NOTE: a NonFiniteError (nonfinite="raise") waits until this step's round has started:
        # the peers start it at this step whatever happens here
        error = None
        if self._pending is not None and self._pending.due <= t:
            error = self._finish_pending()
        if self.sync_every is not None and t % (self.sync_every // self.fragments) == 0:
            # NOTE: the same fragment as ``(t // interval - 1) % fragments`` while every round
            # starts here; a worker of a parameter server that joined late starts at the server's
            # round, so its rotation follows the round, not its step count
            self._start_round(self._round % self.fragments)
            if self.overlap_steps == 0:
                error = self._finish_pending() or error
        if error is not None:
            raise error
        return loss

    @torch.no_grad()
    def sync(self) -> None:
        """Starts the next outer round now, on the next fragment in rotation (``sync_every=None``
        only). With ``overlap_steps=0`` the round is finished and merged into the local
        parameters before this returns; otherwise it is merged ``overlap_steps`` calls of
        :meth:`step` later. A round still in flight from the previous call is finished and merged
        first. With a :class:`~hypha.optim.Transport` every rank must call it at the same point."""
        if self.sync_every is not None:
            raise RuntimeError(
                f"sync() starts rounds by hand, for DiLoCo(..., sync_every=None); with "
                f"sync_every={self.sync_every} they start from step()"
            )
        self._check_usable()
        error = None
        if self._pending is not None:
            error = self._finish_pending()
        self._start_round(self._round % self.fragments)
        if self.overlap_steps == 0:
            error = self._finish_pending() or error
        if error is not None:
            raise error

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
                f"{self._who()}: a previous outer round failed ({self._failed}); the global copies no "
                "longer agree. Reload a checkpoint on every rank (or reconnect to the parameter "
                "server with a new DiLoCo)."
            ) from self._failed

    def _who(self) -> str:
        return f"rank {self.rank}" if self.mode == SHARDED else "this worker"

    def _start_round(self, fragment: int) -> None:
        assert self._pending is None, "one exchange in flight at most"
        round_ = self._round
        self._round += 1
        t0 = time.perf_counter()
        payloads = self._exchange.encode(fragment, round_)
        self.stats.encode_seconds += time.perf_counter() - t0
        abstained = payloads is None
        self._pending = _Pending(
            fragment,
            round_,
            self._step + self.overlap_steps,
            abstained,
            self.overlap_steps == 0,
            None,
        )
        if self.overlap_steps == 0:
            self._pending.future = concurrent.futures.Future()
            try:
                self._pending.future.set_result(self._exchange.run(fragment, round_, payloads))
            except BaseException as exc:
                self._pending.future.set_exception(exc)
        else:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(1, "hypha-diloco")
            self._pending.future = self._executor.submit(
                self._exchange.run, fragment, round_, payloads
            )

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
                f"{self._who()}: outer round {pending.round} (fragment {pending.fragment}) failed: {exc}"
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

    def _finish_pending(self) -> NonFiniteError | None:
        """Waits for the exchange in flight and merges it; returns the error to raise when this
        worker sat the round out and ``nonfinite="raise"``."""
        pending = self._pending
        assert pending is not None
        if pending.future is not None:
            self._wait(pending)
        self._pending = None
        if not pending.abstained:
            self._merge(pending.fragment, self.merge_alpha, reset_inner=False)
        else:
            # NOTE: restart every fragment, not just this one: NaN left in any parameter spreads
            # to all of them at the next inner step. No other exchange is in flight here.
            for fragment in range(self.fragments):
                self._merge(fragment, 0.0, reset_inner=True)
            self.stats.skipped_rounds += 1
            message = (
                f"{self._who()}: parameters held NaN/Inf at inner step {pending.due - self.overlap_steps}; "
                f"this worker sat out outer round {pending.round} (fragment {pending.fragment}) "
                "and restarted from the global model"
            )
            if self.nonfinite == "raise":
                return NonFiniteError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)
        return None

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
        """Every rank starts from rank 0's parameters (as DDP does) after checking that its
        settings agree with rank 0's; a worker of a parameter server starts from the server's
        global model and round."""
        if isinstance(self._exchange, ServerExchange):
            self._round = self._exchange.receive_initial(self._settings())
            return
        if self.world_size == 1:
            return
        if self.rank == 0:
            self._exchange.send_initial(self._settings())
        else:
            self._exchange.receive_initial(self._settings())

    # --- checkpoints --------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the same trajectory: the global copies, error feedback,
        this rank's outer-momentum shard (empty in server mode), the inner optimizer, the
        counters, the mode. Each rank saves its own (the shards differ). Waits for an exchange in
        flight."""
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
                "mode": self.mode,
                "seed_salt": self._seed_salt,
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
                "stats": dict(self.stats.__dict__),
            },
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restores :meth:`state_dict` output saved by the same rank with the same settings.

        In server mode the global copies and the round stay those this worker took from the
        server (the server is the authority on the global model: a stale copy would diverge from
        it for good); the rest (error feedback, inner optimizer, step counter, a round awaiting
        its merge) comes from the checkpoint, with a warning when the checkpoint is from another
        round than the server's."""
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
        mode = meta.get("mode", SHARDED)  # checkpoints from before server mode are sharded
        if mode != self.mode:
            how = {
                SHARDED: "sharded mode (comm was a Transport: the ranks share the outer step)",
                SERVER: "server mode (comm was a ServerLink: a parameter server runs the outer step)",
            }
            raise ValueError(
                f"the checkpoint was made in {how.get(mode, repr(mode))}; this optimizer is in "
                f"{how[self.mode]}. Load it into a DiLoCo with the same kind of comm."
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
                if not all_finite(value):
                    raise ValueError(f"parameter {i} {key} holds NaN/Inf in the checkpoint")
            new_states[i] = saved
        momentum = meta.get("outer_momentum")
        if not isinstance(momentum, torch.Tensor) or momentum.shape != self._outer_momentum.shape:
            raise ValueError("the checkpoint's outer_momentum does not match this rank's shard")
        if not all_finite(momentum):
            raise ValueError("the checkpoint's outer_momentum holds NaN/Inf")
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
                if key == "global" and self.mode == SERVER:
                    continue  # the server's, taken at construction
                self.state[p][key].copy_(value)
        self._outer_momentum.copy_(momentum)
        self._step = int(meta["step"])
        if self.mode == SERVER:
            if int(meta["round"]) != self._round:
                warnings.warn(
                    f"the checkpoint is from outer round {meta['round']}, the parameter server is "
                    f"at round {self._round}: the global model stays the server's; error "
                    "feedback and the inner optimizer come from the checkpoint",
                    RuntimeWarning,
                    stacklevel=2,
                )
            salt = meta.get("seed_salt")
            if isinstance(salt, int) and 0 <= salt < 2**64:
                self._seed_salt = salt
                assert isinstance(self._exchange, ServerExchange)
                self._exchange.set_sender(struct.pack("<Q", salt))
        else:
            self._round = int(meta["round"])
        pending = meta["pending"]
        self._pending = (
            None
            if pending is None
            else _Pending(
                pending["fragment"],
                pending["round"],
                pending["due"],
                pending["abstained"],
                False,
                None,
            )
        )
        self.stats = DiLoCoStats(**meta["stats"])
        self._failed = None
