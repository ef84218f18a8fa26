"""Performance-aware synchronisation: how many batches each DiLoCo worker runs per outer round.

In DiLoCo every training worker runs ``H`` inner steps (batches), then sends its
pseudo-gradient to the parameter server, which waits for all of them before the outer step. With
workers of different speeds the fast ones then idle at every synchronisation: with speeds 1:1:3
and a fixed ``H``, the two fast workers wait two thirds of the time.

:class:`SyncPlanner` keeps the *amount* of work per round and moves it to where it is done
fastest (the idea of performance-aware / heterogeneous DiLoCo schedules; see Douillard et al.,
"DiLoCo: Distributed Low-Communication Training of Language Models", arXiv:2311.08105, and
"Asynchronous Local-SGD Training for Language Modeling", arXiv:2401.09135, for the effect of
uneven step counts). A round's budget is ``B = H × n`` batches, ``n`` the workers taking part in
it, split so that every worker reaches its synchronisation point at the same moment.

The model, recomputed at every report of worker ``w`` (round ``r``, ``d_w`` batches done in it,
measured time of its last batch):

* each worker ``i`` has an exponential moving average ``s_i`` of its seconds per batch
  (``s_i ← α·x + (1−α)·s_i``) and speed ``v_i = 1 / s_i``;
* its position now is projected from its last report: ``p_i = min(d_i + (now − t_i)·v_i, g_i)``
  (``t_i`` the time of that report, ``g_i`` the target it was given: a worker never runs past
  its target). A worker whose report reached its target has synchronised (``p_i = d_i``, no
  longer running); one that moved on to a later round has a final count; one that finished the
  round before and has not reported this one yet is about to start it (``p_i = 0``, running);
* the remaining budget ``R = B − Σ p_i`` is used up by the running workers at their speeds at
  ``T = max(R, 0) / Σ_running v_i`` seconds from now;
* so ``w`` runs ``target_w = d_w + round(v_w · T)`` batches in all, never fewer than
  ``d_w`` and never fewer than 1 per round.

Everyone reaches its target at ``now + T``; the rounding leaves the round's total within ``± n``
of ``B``. Until every worker of the round has a measurement the targets are ``H``. With
``perf_aware=False`` every worker runs exactly ``H`` per round (the DiLoCo baseline).

Rounds: a worker's ``round`` is the number of synchronisations it has completed; a worker that
reports a later round has finished the earlier one, with the count it was told to reach. A
worker told to synchronise (its target is what it has done) keeps that target for the rest of the
round, whatever it reports while it waits; only a report of a new batch updates its average.
Workers join and leave between rounds; a replacement joins at whatever round it first reports.
The planner is pure logic with an injectable clock (``now``), so it is tested by simulation.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

__all__ = ["SyncPlanner"]

log = logging.getLogger("hypha.scheduler.sync")

#: Default weight of a new measurement in the moving average of seconds per batch.
SMOOTHING = 0.3


@dataclass
class _Worker:
    seconds: float | None = None  #: moving average of seconds per batch; None: not measured
    round: int | None = None  #: the latest round it reported; None: not reported yet
    done: int = 0  #: batches done in ``round`` at its last report
    at: float = 0.0  #: clock time of its last report
    target: int | None = None  #: batches it was told to run in ``round``
    finals: dict[int, int] = field(default_factory=dict)  #: round → batches it ran there
    warned: bool = False  #: a bad ``batch_seconds`` was logged already

    @property
    def synced(self) -> bool:
        """It reached its target in its current round: it is synchronising, no longer running."""
        return self.target is not None and self.done >= self.target


class SyncPlanner:
    """Decides how many batches each training worker runs in each outer round.

    ``batches_per_round`` is ``H``, the nominal number of batches per worker and round;
    ``perf_aware`` splits each round's ``H × n`` batches by the workers' measured speeds so
    that all of them synchronise at once; ``smoothing`` is the weight of a new measurement in
    the moving average of seconds per batch; ``now`` is the clock (seconds).
    """

    def __init__(self, batches_per_round: int, perf_aware: bool = True, *,
                 smoothing: float = SMOOTHING,
                 now: Callable[[], float] = time.monotonic) -> None:
        if isinstance(batches_per_round, bool) or not isinstance(batches_per_round, int) \
                or batches_per_round < 1:
            raise ValueError(f"Invalid batches_per_round: {batches_per_round!r} (expected an "
                             "integer >= 1)")
        if not isinstance(perf_aware, bool):
            raise ValueError(f"Invalid perf_aware: {perf_aware!r} (expected True or False)")
        if isinstance(smoothing, bool) or not isinstance(smoothing, int | float) \
                or not 0 < smoothing <= 1:
            raise ValueError(f"Invalid smoothing: {smoothing!r} (expected a number in (0, 1])")
        self.batches_per_round = batches_per_round
        self.perf_aware = perf_aware
        self.smoothing = float(smoothing)
        self._now = now
        self._workers: dict[str, _Worker] = {}

    # -- membership --------------------------------------------------------------------------------
    def join(self, worker: str) -> None:
        """``worker`` takes part from the round it first reports."""
        if worker in self._workers:
            raise ValueError(f"worker {worker} has joined already")
        self._workers[worker] = _Worker()

    def leave(self, worker: str) -> None:
        """``worker`` is gone (its job ended or it was lost); the rounds go on without it."""
        if self._workers.pop(worker, None) is None:
            raise ValueError(f"worker {worker} has not joined (or has left already)")

    def __contains__(self, worker: object) -> bool:
        return worker in self._workers

    def participants(self, round: int | None = None) -> list[str]:
        """The workers that have joined (sorted); with ``round``, those taking part in it:
        running it, finished with it, or done with the round before and about to start it."""
        if round is None:
            return sorted(self._workers)
        return sorted(self._members(round))

    def seconds_per_batch(self, worker: str) -> float | None:
        """The moving average of ``worker``'s seconds per batch (None until measured)."""
        return self._get(worker).seconds

    def instruction(self, worker: str) -> tuple[int, int] | None:
        """The last ``(round, batches)`` given to ``worker``, or None before its first report."""
        state = self._get(worker)
        if state.round is None or state.target is None:
            return None
        return state.round, state.target

    # -- reports -----------------------------------------------------------------------------------
    def report(self, worker: str, round: int, round_step: int,
               batch_seconds: float | None = None) -> tuple[int, int]:
        """``worker`` has completed ``round`` synchronisations and run ``round_step`` batches
        since the last one, the last taking ``batch_seconds`` (None: not measured). Returns
        ``(round, batches)``: run ``batches`` batches in all in ``round``, then synchronise."""
        state = self._get(worker)
        for name, value in (("round", round), ("round_step", round_step)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"worker {worker}: {name} must be an integer >= 0, got "
                                 f"{value!r}")
        if state.round is not None and round < state.round:
            raise ValueError(f"worker {worker} reported round {round} after round "
                             f"{state.round}; rounds only go forward")
        # NOTE: a job also reports while it waits at the parameter server, and at the start of
        # a round before its first batch, repeating its last batch's time: only a report of a
        # new batch is a new measurement.
        if round_step > 0 and (state.round != round or round_step > state.done):
            self._measure(worker, state, batch_seconds)
        if state.round == round and state.synced and round_step <= state.done:
            # told to synchronise at ``done``, it did: reports while it waits change nothing
            assert state.target is not None
            return round, state.target
        now = self._now()
        if state.round is not None and round > state.round:
            # NOTE: it synchronised at the count it was told (it may not have reported the
            # batches in between).
            state.finals[state.round] = max(state.done, state.target or 0)
            state.target = None
        state.round, state.done, state.at = round, round_step, now
        target = self._plan(worker, state, round, now)
        state.target = target
        self._forget_old_rounds()
        return round, target

    def _measure(self, worker: str, state: _Worker, batch_seconds: float | None) -> None:
        if batch_seconds is None:
            return
        if isinstance(batch_seconds, bool) or not isinstance(batch_seconds, int | float) \
                or not math.isfinite(batch_seconds) or batch_seconds <= 0:
            if not state.warned:
                log.warning("worker %s reported batch_seconds=%r; expected a positive number "
                            "of seconds, ignoring it (and any further bad values)", worker,
                            batch_seconds)
                state.warned = True
            return
        a = self.smoothing
        state.seconds = (float(batch_seconds) if state.seconds is None
                         else a * batch_seconds + (1 - a) * state.seconds)

    def _plan(self, worker: str, state: _Worker, round: int, now: float) -> int:
        done, h = state.done, self.batches_per_round
        if not self.perf_aware:
            return max(h, done)
        members = self._members(round)
        if any(self._workers[m].seconds is None for m in members):
            return max(h, done, 1)
        budget = h * len(members)
        used, speed = 0.0, 0.0
        for name in members:
            other = self._workers[name]
            assert other.seconds is not None
            if name == worker:
                used += done
                speed += 1 / other.seconds
            elif other.round is not None and other.round > round:  # finished this round
                used += other.finals.get(round, 0)
            elif other.round == round and other.synced:
                used += other.done
            elif other.round == round:  # running it
                elapsed = max(now - other.at, 0.0)
                position = other.done + elapsed / other.seconds
                if other.target is not None:
                    position = min(position, other.target)
                used += position
                speed += 1 / other.seconds
            else:  # done with the round before, about to start this one
                speed += 1 / other.seconds
        assert state.seconds is not None
        remaining = max(budget - used, 0.0)
        until = remaining / speed if speed > 0 else 0.0
        return max(done + round_half_up(until / state.seconds), done, 1)

    def _members(self, round: int) -> list[str]:
        members = []
        for name, state in self._workers.items():
            if state.round is None:
                continue
            if state.round == round or round in state.finals:
                members.append(name)
            elif state.round == round - 1 and state.synced:
                members.append(name)
        return members

    def _forget_old_rounds(self) -> None:
        current = [s.round for s in self._workers.values() if s.round is not None]
        oldest = min(current, default=0)
        for state in self._workers.values():
            for r in [r for r in state.finals if r < oldest]:
                del state.finals[r]

    def _get(self, worker: str) -> _Worker:
        state = self._workers.get(worker)
        if state is None:
            raise ValueError(f"worker {worker} has not joined this run")
        return state


def round_half_up(x: float) -> int:
    """``x`` rounded to the nearest integer, halves up (Python's ``round`` rounds halves to even,
    which would make a worker's target depend on parity)."""
    return math.floor(x + 0.5)
