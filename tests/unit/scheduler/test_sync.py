"""Performance-aware synchronisation, by discrete-event simulation on a mock clock.

Each simulated worker runs batches of a fixed duration, reports after every batch and follows
the planner's answer; the parameter server closes a round when every worker of it has reached
its target (the baseline DiLoCo behaviour: it waits for all).
"""

from __future__ import annotations

import heapq
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from hypha.scheduler.sync import SyncPlanner, round_half_up

H = 30
SPEEDS = {"fast1": 1.0, "fast2": 1.0, "slow": 3.0}  # seconds per batch: one worker 3× slower


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@dataclass
class Round:
    number: int
    start: float
    end: float
    done: dict[str, int]  #: batches each worker ran
    reached: dict[str, float]  #: when each worker reached its target

    @property
    def wall(self) -> float:
        return self.end - self.start

    def idle(self, worker: str) -> float:
        """The fraction of the round ``worker`` waited for the last one."""
        return (self.end - self.reached[worker]) / self.wall


def simulate(planner: SyncPlanner, clock: Clock, rounds: int,
             speeds: Callable[[int], dict[str, float]], *, jitter: float = 0.0,
             poll: bool = False, first_round: int = 0, start: float = 0.0) -> list[Round]:
    """Run ``rounds`` rounds; ``speeds(r)`` gives round ``r``'s workers and their seconds per
    batch (workers that appear join, workers that disappear leave, between rounds). With
    ``poll``, workers waiting at the parameter server report again (their last batch's time
    too) whenever another worker finishes a batch, and every worker reports once at the start
    of a round, before its first batch (as the training executor does)."""
    rng = random.Random(0)
    result: list[Round] = []
    for r in range(first_round, first_round + rounds):
        workers = speeds(r)
        for name in planner.participants():
            if name not in workers:
                planner.leave(name)
        for name in workers:
            if name not in planner:
                planner.join(name)

        def duration(name: str) -> float:
            return workers[name] * (1 + rng.uniform(-jitter, jitter))  # noqa: B023

        events = []
        last: dict[str, float] = {}
        clock.t = start
        for name in sorted(workers):
            if poll:
                planner.report(name, r, 0, workers[name])
            d = duration(name)
            events.append((start + d, name, d))
        heapq.heapify(events)
        done = dict.fromkeys(workers, 0)
        reached: dict[str, float] = {}
        while events:
            t, name, d = heapq.heappop(events)
            clock.t = t
            done[name] += 1
            last[name] = d
            got_round, target = planner.report(name, r, done[name], d)
            assert got_round == r
            assert target >= done[name] and target >= 1
            if poll:
                for waiting in reached:
                    assert planner.report(waiting, r, done[waiting], last[waiting]) == (
                        r, done[waiting])
            if done[name] >= target:
                reached[name] = t
            else:
                d = duration(name)
                heapq.heappush(events, (t + d, name, d))
        end = max(reached.values())
        result.append(Round(r, start, end, done, reached))
        start = end
    return result


def planner_at(clock: Clock, *, perf_aware: bool = True, h: int = H) -> SyncPlanner:
    return SyncPlanner(h, perf_aware, now=clock)


# -- the simulation: 3 workers, speeds 1:1:3 -----------------------------------------------------
@pytest.mark.parametrize("poll", [False, True])
def test_perf_aware_keeps_the_fast_workers_busy(poll: bool) -> None:
    clock = Clock()
    rounds = simulate(planner_at(clock), clock, 6, lambda r: SPEEDS, poll=poll)
    for rnd in rounds[1:]:
        for fast in ("fast1", "fast2"):
            assert rnd.idle(fast) < 0.10, (rnd.number, fast, rnd)
    for rnd in rounds:
        assert abs(sum(rnd.done.values()) - 3 * H) <= 3, rnd
        # the work follows the speeds: the slow worker does about a seventh of it
        assert rnd.done["slow"] == pytest.approx(3 * H / 7, abs=1)
    # and the round takes 3H / (1 + 1 + 1/3) seconds instead of 3H
    assert rounds[-1].wall == pytest.approx(3 * H * 3 / 7, rel=0.05)


def test_without_perf_aware_everyone_runs_h_and_the_fast_workers_idle() -> None:
    clock = Clock()
    rounds = simulate(planner_at(clock, perf_aware=False), clock, 4, lambda r: SPEEDS)
    for rnd in rounds:
        assert rnd.done == dict.fromkeys(SPEEDS, H)
        assert rnd.wall == pytest.approx(3 * H)
        for fast in ("fast1", "fast2"):
            assert rnd.idle(fast) == pytest.approx(2 / 3, abs=0.02)
        assert rnd.idle("slow") == 0


def test_noisy_batch_times_still_balance() -> None:
    clock = Clock()
    rounds = simulate(planner_at(clock), clock, 6, lambda r: SPEEDS, jitter=0.2)
    for rnd in rounds[1:]:
        assert max(rnd.idle(w) for w in SPEEDS) < 0.10, rnd
        assert abs(sum(rnd.done.values()) - 3 * H) <= 3, rnd


def test_a_worker_that_slows_down_gets_less_work_in_the_same_round() -> None:
    clock = Clock()
    planner = planner_at(clock)
    rounds = simulate(planner, clock, 5,
                      lambda r: SPEEDS if r < 2 else {**SPEEDS, "fast2": 3.0})
    late = rounds[-1]
    assert late.done["fast2"] == pytest.approx(late.done["slow"], abs=1)
    assert late.done["fast1"] == pytest.approx(3 * late.done["slow"], abs=2)
    assert max(late.idle(w) for w in SPEEDS) < 0.10
    assert planner.seconds_per_batch("fast2") == pytest.approx(3.0)


# -- membership ------------------------------------------------------------------------------------
def test_workers_leave_and_join_between_rounds() -> None:
    clock = Clock()
    planner = planner_at(clock)

    def speeds(r: int) -> dict[str, float]:
        if r < 2:
            return SPEEDS
        if r < 4:  # fast2 is lost; the round goes on with two workers
            return {"fast1": 1.0, "slow": 3.0}
        return {"fast1": 1.0, "slow": 3.0, "new": 2.0}  # a replacement, twice as slow

    rounds = simulate(planner, clock, 6, speeds)
    two, three = rounds[3], rounds[5]
    assert set(two.done) == {"fast1", "slow"}
    assert abs(sum(two.done.values()) - 2 * H) <= 2
    assert max(two.idle(w) for w in two.done) < 0.10
    assert abs(sum(three.done.values()) - 3 * H) <= 3
    assert max(three.idle(w) for w in three.done) < 0.10
    assert three.done["new"] == pytest.approx(three.done["fast1"] / 2, abs=1)
    assert planner.participants() == ["fast1", "new", "slow"]


def test_a_replacement_joins_at_the_round_it_reports() -> None:
    clock = Clock()
    planner = planner_at(clock)
    planner.join("a")
    planner.join("b")
    planner.report("a", 5, 1, 1.0)
    planner.report("b", 5, 1, 1.0)
    planner.join("late")
    assert planner.participants(5) == ["a", "b"]  # joined, not yet in any round
    assert planner.instruction("late") is None
    clock.t = 1.0
    assert planner.report("late", 5, 0, 1.0)[0] == 5
    assert planner.participants(5) == ["a", "b", "late"]
    assert planner.participants(4) == []


def test_membership_errors_are_clear() -> None:
    planner = SyncPlanner(H, True)
    planner.join("a")
    with pytest.raises(ValueError, match="worker a has joined already"):
        planner.join("a")
    with pytest.raises(ValueError, match="worker b has not joined"):
        planner.leave("b")
    with pytest.raises(ValueError, match="worker b has not joined this run"):
        planner.report("b", 0, 1, 1.0)
    planner.leave("a")
    assert "a" not in planner and planner.participants() == []
    with pytest.raises(ValueError, match="has left already"):
        planner.leave("a")


# -- measurements ----------------------------------------------------------------------------------
def test_targets_are_h_until_every_worker_of_the_round_is_measured() -> None:
    clock = Clock()
    planner = planner_at(clock)
    planner.join("a")
    planner.join("b")
    clock.t = 1.0
    assert planner.report("a", 0, 1, 1.0) == (0, H)  # b has not reported yet: not in the round
    assert planner.report("b", 0, 1, None) == (0, H)  # b in the round, not measured
    clock.t = 2.0
    assert planner.report("a", 0, 2, 1.0) == (0, H)
    assert planner.seconds_per_batch("b") is None
    clock.t = 4.0
    _, target = planner.report("b", 0, 2, 2.0)  # now both are measured: b is half as fast
    assert target < H
    clock.t = 5.0
    _, target_a = planner.report("a", 0, 5, 1.0)
    assert target_a > H
    assert abs(target + target_a - 2 * H) <= 2


def test_non_positive_batch_seconds_are_ignored_with_one_warning(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    planner = planner_at(clock)
    planner.join("a")
    with caplog.at_level(logging.WARNING, logger="hypha.scheduler.sync"):
        planner.report("a", 0, 1, 0.0)
        planner.report("a", 0, 2, -1.5)
        planner.report("a", 0, 3, float("inf"))
    assert planner.seconds_per_batch("a") is None
    warnings = [r for r in caplog.records if "batch_seconds" in r.getMessage()]
    assert len(warnings) == 1 and "expected a positive number" in warnings[0].getMessage()
    planner.report("a", 0, 4, 2.0)
    planner.report("a", 0, 5, -1.0)  # ignored: the average is untouched
    assert planner.seconds_per_batch("a") == 2.0


def test_the_average_follows_the_smoothing() -> None:
    planner = SyncPlanner(H, True, smoothing=0.5, now=Clock())
    planner.join("a")
    planner.report("a", 0, 1, 2.0)
    planner.report("a", 0, 2, 4.0)
    assert planner.seconds_per_batch("a") == pytest.approx(3.0)


# -- targets and rounds ----------------------------------------------------------------------------
def test_a_target_is_never_below_what_was_done() -> None:
    clock = Clock()
    planner = planner_at(clock, h=10)
    planner.join("fast")
    planner.join("slow")
    planner.report("fast", 0, 1, 1.0)
    planner.report("slow", 0, 1, 10.0)
    clock.t = 1.0
    # the slow worker ran far more than its share (it did not follow the plan)
    assert planner.report("slow", 0, 15, 10.0) == (0, 15)
    assert planner.report("fast", 0, 3, 1.0)[1] >= 3
    # without perf-aware too
    off = planner_at(clock, perf_aware=False, h=10)
    off.join("a")
    assert off.report("a", 0, 12, 1.0) == (0, 12)
    assert off.report("a", 1, 0, 1.0) == (1, 10)


def test_at_least_one_batch_per_round() -> None:
    clock = Clock()
    planner = planner_at(clock, h=1)
    planner.join("fast")
    planner.join("slow")
    assert planner.report("fast", 0, 1, 0.01) == (0, 1)
    assert planner.report("slow", 0, 1, 100.0) == (0, 1)
    # round 1: the fast worker could use the whole budget before the slow one runs a batch
    assert planner.report("fast", 1, 1, 0.01) == (1, 2)
    assert planner.report("slow", 1, 0, 100.0) == (1, 1)


def test_reports_while_waiting_change_nothing() -> None:
    clock = Clock()
    planner = planner_at(clock, h=10)
    planner.join("a")
    planner.join("b")
    planner.report("a", 0, 1, 1.0)
    planner.report("b", 0, 1, 1.0)
    clock.t = 9.0
    assert planner.report("a", 0, 10, 1.0) == (0, 10)  # told to synchronise
    clock.t = 30.0  # b is far behind its projection: a would get more work, but it has synced
    assert planner.report("a", 0, 10, 5.0) == (0, 10)
    assert planner.seconds_per_batch("a") == 1.0  # a repeated batch time is not a measurement
    assert planner.report("b", 0, 2, 1.0) == (0, 10)  # b does the rest of the 20


def test_reporting_a_later_round_finishes_the_earlier_one() -> None:
    clock = Clock()
    planner = planner_at(clock, h=10)
    for name in ("a", "b"):
        planner.join(name)
        planner.report(name, 0, 1, 1.0)
    clock.t = 9.0
    assert planner.report("a", 0, 10, 1.0) == (0, 10)  # reached its target: synchronising
    assert planner.instruction("a") == (0, 10)
    assert planner.participants(1) == ["a"]  # about to start round 1
    clock.t = 10.0
    assert planner.report("a", 1, 1, 1.0)[0] == 1  # moved on: its 10 are final in round 0
    assert planner.participants(0) == ["a", "b"]
    assert planner.participants(1) == ["a"]
    # b, still in round 0 (and behind), gets what a did not use: 20 - 10 = 10 in all
    assert planner.report("b", 0, 2, 1.0) == (0, 10)
    with pytest.raises(ValueError, match="reported round 0 after round 1; rounds only go "
                                         "forward"):
        planner.report("a", 0, 3, 1.0)


@pytest.mark.parametrize(("args", "message"), [
    ((0, True), "Invalid batches_per_round: 0 (expected an integer >= 1)"),
    ((2.5, True), "Invalid batches_per_round: 2.5"),
    ((True, True), "Invalid batches_per_round: True"),
    ((10, "yes"), "Invalid perf_aware: 'yes' (expected True or False)"),
])
def test_bad_settings_are_refused(args: tuple[object, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SyncPlanner(*args)  # type: ignore[arg-type]


@pytest.mark.parametrize("smoothing", [0, 1.5, -0.1, True])
def test_bad_smoothing_is_refused(smoothing: float) -> None:
    with pytest.raises(ValueError, match=r"Invalid smoothing: .* \(expected a number in"):
        SyncPlanner(10, True, smoothing=smoothing)


@pytest.mark.parametrize(("round", "step", "message"), [
    (-1, 0, "round must be an integer >= 0, got -1"),
    (0, -2, "round_step must be an integer >= 0, got -2"),
    (0, 1.5, "round_step must be an integer >= 0, got 1.5"),
    (True, 0, "round must be an integer >= 0, got True"),
])
def test_bad_reports_are_refused(round: int, step: int, message: str) -> None:
    planner = SyncPlanner(10, True)
    planner.join("a")
    with pytest.raises(ValueError, match=f"worker a: {message}"):
        planner.report("a", round, step, 1.0)


def test_rounding_is_half_up() -> None:
    assert [round_half_up(x) for x in (0.5, 1.5, 2.5, 2.49, -0.5)] == [1, 2, 3, 2, 0]
