"""The scheduler's slice tracker: epochs, prefetch limit, dead workers, refusals, persistence."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import pytest

from hypha.data import NoSliceAvailable, SliceState, SliceTracker, TrackerError


def run_epoch(t: SliceTracker, workers: list[str]) -> list[int]:
    """Round-robin workers through one epoch (assign, then done); return the slices in order."""
    epoch = t.epoch
    order = []
    i = 0
    while t.epoch == epoch:
        w = workers[i % len(workers)]
        s, e = t.assign(w)
        assert e == epoch and t.state(s) is SliceState.ASSIGNED
        order.append(s)
        t.done(w, s, e)
        i += 1
    return order


def test_full_epoch_cycle() -> None:
    t = SliceTracker("ds", 20, seed=3)
    first = run_epoch(t, ["a", "b", "c"])
    assert sorted(first) == list(range(20))  # every slice exactly once
    assert first != sorted(first)  # shuffled
    assert t.epoch == 1 and t.stats.available == 20 and t.stats.used == 0
    assert all(t.state(s) is SliceState.AVAILABLE for s in range(20))
    second = run_epoch(t, ["a"])
    assert sorted(second) == list(range(20)) and second != first  # a new shuffle each epoch
    assert run_epoch(SliceTracker("ds", 20, seed=3), ["z"]) == first  # deterministic by seed
    assert run_epoch(SliceTracker("ds", 20, seed=4), ["z"]) != first
    st = t.stats
    assert (st.epoch, st.assigned_total, st.used_total, st.released_total) == (2, 40, 40, 0)


def test_one_slice_dataset() -> None:
    t = SliceTracker("one", 1)
    for epoch in range(3):
        assert t.assign("w") == (0, epoch)
        with pytest.raises(NoSliceAvailable, match=r"epoch 1?[0-9] starts when"):
            t.assign("v")
        t.done("w", 0, epoch)


def test_prefetch_limit() -> None:
    t = SliceTracker("ds", 10, max_assigned_per_worker=2)
    a1, _ = t.assign("a", job="j1")
    a2, _ = t.assign("a", job="j1")  # prefetching the next one is fine
    assert a1 != a2
    with pytest.raises(
        TrackerError, match=r"worker 'a' already holds 2 slices .*max_assigned"
    ) as e:
        t.assign("a")
    assert not isinstance(e.value, NoSliceAvailable)
    assert [x.slice for x in t.assigned_to("a")] == [a1, a2]
    assert t.holder(a1) is not None and t.holder(a1).job == "j1"  # type: ignore[union-attr]
    t.done("a", a1, 0)
    a3, _ = t.assign("b")
    assert t.assign("a")[0] not in (a1, a2, a3)


def test_no_slice_available_until_done() -> None:
    t = SliceTracker("ds", 2)
    s0, _ = t.assign("a")
    s1, _ = t.assign("b")
    with pytest.raises(
        NoSliceAvailable, match="no slice of 'ds' is available in epoch 0: 2 assigned"
    ):
        t.assign("c")
    t.done("a", s0, 0)
    # the epoch's last slice is still b's: the next epoch begins with the one nobody holds
    assert t.assign("c") == (s0, 1)
    with pytest.raises(NoSliceAvailable, match="available in epoch 1: 2 assigned"):
        t.assign("d")
    t.done("b", s1, 0)  # done with epoch 0: it joins epoch 1
    assert t.assign("d") == (s1, 1)


def test_epochs_overlap_at_their_boundary() -> None:
    """A worker never waits for another's slice at an epoch's end (in DiLoCo the other may be
    waiting for it), and every slice is still trained once per epoch."""
    t = SliceTracker("ds", 5, seed=2)
    seen: dict[int, list[int]] = {0: [], 1: [], 2: []}
    slow, _ = t.assign("slow")
    seen[0].append(slow)
    while True:  # the fast worker goes on while the slow one keeps its slice
        s, e = t.assign("fast")
        seen[e].append(s)
        t.done("fast", s, e)
        if e == 1 and len(seen[1]) == 4:
            break
    assert t.epoch == 1 and t.state(slow) is SliceState.ASSIGNED
    assert sorted(seen[0]) == list(range(5)) and slow not in seen[1]
    # the snapshot keeps the epoch each slice was handed out in
    back = SliceTracker.restore(t.snapshot())
    assert back.snapshot() == t.snapshot()
    assert back.holder(slow).epoch == 0  # type: ignore[union-attr]
    t.done("slow", slow, 0)  # done with epoch 0: it joins epoch 1, the last one to go
    s, e = t.assign("fast")
    assert (s, e) == (slow, 1)
    t.done("fast", s, e)
    assert t.epoch == 2 and sorted(seen[1] + [slow]) == list(range(5))
    # a slice held past two boundaries does not stop the others either; it joins the newest
    # epoch when done (so it is trained fewer times than the rest)
    v = SliceTracker("ds", 3)
    kept, _ = v.assign("slow")
    for _ in range(5):  # epoch 0: 2 slices, epoch 1: 2, epoch 2: the first
        s, e = v.assign("fast")
        v.done("fast", s, e)
    assert v.epoch == 2 and v.holder(kept).epoch == 0  # type: ignore[union-attr]
    v.done("slow", kept, 0)
    assert v.state(kept) is SliceState.AVAILABLE
    # a held slice of the old epoch that is released joins the new epoch first in line
    u = SliceTracker("ds", 3)
    held, _ = u.assign("dead")
    for _ in range(2):
        s, e = u.assign("w")
        u.done("w", s, e)
    s, e = u.assign("w")
    assert e == 1 and s != held
    assert u.release_worker("dead") == [held]
    assert u.assign("x") == (held, 1)
    # a slice done in an epoch it was not handed out in is refused
    with pytest.raises(TrackerError, match="a past epoch"):
        u.done("x", held, 0)


def test_release_dead_worker() -> None:
    t = SliceTracker("ds", 6, seed=1)
    held = [t.assign("dead")[0], t.assign("dead")[0]]
    other, _ = t.assign("alive")
    assert t.release_worker("dead") == held
    assert all(t.state(s) is SliceState.AVAILABLE for s in held)
    assert t.holder(held[0]) is None and t.assigned_to("dead") == []
    # released slices are handed out first, so the epoch can still finish
    assert [t.assign("new")[0], t.assign("new")[0]] == held
    assert t.stats.released_total == 2 and t.stats.reassigned_total == 2
    with pytest.raises(
        TrackerError, match=r"worker 'dead' .* does not hold it: it is assigned to worker 'new'"
    ):
        t.done("dead", held[0], 0)
    assert t.release_worker("nobody") == []
    t.done("alive", other, 0)


def test_release_one_job() -> None:
    t = SliceTracker("ds", 6)
    s1, _ = t.assign("w", job="j1")
    s2, _ = t.assign("w", job="j2")
    assert t.release_worker("w", job="j1") == [s1]
    assert [a.slice for a in t.assigned_to("w")] == [s2]
    with pytest.raises(TrackerError, match="it is available"):
        t.done("w", s1, 0)


def test_done_refusals() -> None:
    t = SliceTracker("ds", 3)
    s, e = t.assign("a")
    with pytest.raises(
        TrackerError, match=f"worker 'b' reported slice {s} .* it is assigned to worker 'a'"
    ):
        t.done("b", s, e)
    with pytest.raises(TrackerError, match="a future epoch"):
        t.done("a", s, 1)
    with pytest.raises(TrackerError, match="there is no slice 3"):
        t.done("a", 3, 0)
    with pytest.raises(TrackerError, match="there is no slice True"):
        t.done("a", True, 0)  # type: ignore[arg-type]
    with pytest.raises(TrackerError, match="epoch must be an integer"):
        t.done("a", s, -1)
    with pytest.raises(TrackerError, match="worker must be a non-empty string"):
        t.done("", s, 0)
    t.done("a", s, e)
    with pytest.raises(TrackerError, match="it is already used"):
        t.done("a", s, e)
    run_epoch(t, ["a"])
    assert t.epoch == 1
    s2, _ = t.assign("a")
    with pytest.raises(
        TrackerError, match=f"slice {s2} of epoch 0 done, a past epoch: 'ds' is at epoch 1"
    ):
        t.done("a", s2, 0)


def test_constructor_refusals() -> None:
    for kwargs, message in [
        ({"dataset": "", "n_slices": 1}, "dataset must be a non-empty string"),
        ({"dataset": "d", "n_slices": 0}, "n_slices must be an integer >= 1"),
        ({"dataset": "d", "n_slices": 2.0}, "n_slices must be an integer"),
        ({"dataset": "d", "n_slices": 2, "seed": -1}, "seed must be an integer >= 0"),
        ({"dataset": "d", "n_slices": 2, "max_assigned_per_worker": 0}, "max_assigned_per_worker"),
    ]:
        with pytest.raises(TrackerError, match=message):
            SliceTracker(**kwargs)
    with pytest.raises(TrackerError, match="job must be a string"):
        SliceTracker("d", 1).assign("w", job=3)  # type: ignore[arg-type]


def busy_tracker() -> SliceTracker:
    """Mid-epoch 1 with slices assigned, used, released and available."""
    t = SliceTracker("ds", 8, seed=5)
    run_epoch(t, ["a", "b"])
    s, e = t.assign("a", job="j")
    t.done("a", s, e)
    t.assign("a", job="j")
    t.assign("b")
    t.assign("c")
    t.release_worker("c")
    t.assign("b")
    return t


def test_snapshot_round_trip() -> None:
    t = busy_tracker()
    snap = t.snapshot()
    back = SliceTracker.restore(json.loads(json.dumps(snap)), dataset="ds", n_slices=8)
    assert back.snapshot() == snap and back.stats == t.stats
    assert repr(back) == repr(t)
    # and they go on the same way
    for tracker in (t, back):
        tracker.release_worker("a")
        tracker.release_worker("b")
    assert run_epoch(t, ["x", "y"]) == run_epoch(back, ["x", "y"])
    assert t.snapshot() == back.snapshot()


def _mutate(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if p.isdigit() else d[p]  # type: ignore[index]
        d[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return apply


def _steal_slice(d: dict[str, Any]) -> None:
    d["available"].pop()


def _duplicate_slice(d: dict[str, Any]) -> None:
    d["available"].append(d["used"][0])


def _overfill_worker(d: dict[str, Any]) -> None:
    d["assigned"].append({"slice": d["available"].pop(), "worker": "b", "job": None})


def _all_used(d: dict[str, Any]) -> None:
    d["used"] = list(range(8))
    d["available"], d["assigned"], d["released"] = [], [], []


BAD_SNAPSHOTS: list[tuple[str, Callable[[dict[str, Any]], None], str]] = [
    ("unknown-key", _mutate("extra", 1), "snapshot: unknown key 'extra'"),
    ("format", _mutate("format", "x"), "not a slice tracker snapshot"),
    ("version", _mutate("version", 2), "version 2 is not supported"),
    ("n-slices", _mutate("n_slices", 0), "snapshot: n_slices must be an integer >= 1"),
    ("epoch", _mutate("epoch", -1), r"snapshot.epoch: expected an integer >= 0"),
    ("slice-range", _mutate("available.0", 99), r"snapshot.available\[0\]: expected a slice 0..7"),
    ("slice-type", _mutate("used.0", "1"), r"snapshot.used\[0\]: expected a slice"),
    ("lost", _steal_slice, r"every slice exactly once \(in several: \[\]; in none: \[\d\]\)"),
    ("twice", _duplicate_slice, r"in several: \[\d\]"),
    ("over-limit", _overfill_worker, "worker 'b' holds more than max_assigned_per_worker=2"),
    ("worker", _mutate("assigned.0.worker", ""), r"assigned\[0\].worker: expected a non-empty"),
    ("job", _mutate("assigned.0.job", 5), r"assigned\[0\].job: expected a string or null"),
    ("assigned-key", _mutate("assigned.0.lease", 1), r"assigned\[0\]: unknown key 'lease'"),
    (
        "released",
        _mutate("released", [0, 1, 2, 3, 4, 5, 6, 7]),
        "released: must list only available",
    ),
    ("all-used", _all_used, "every slice is used but the next epoch has not begun"),
    ("counters", _mutate("counters.used", -1), r"counters.used: expected an integer >= 0"),
    ("counters-low", _mutate("counters.assigned", 0), "fewer assignments than"),
    ("not-a-list", _mutate("used", {}), "snapshot.used: expected a list, got dict"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [b[1:] for b in BAD_SNAPSHOTS], ids=[b[0] for b in BAD_SNAPSHOTS]
)
def test_corrupted_snapshot_refused(mutate: Callable[[dict[str, Any]], None], message: str) -> None:
    snap = copy.deepcopy(busy_tracker().snapshot())
    mutate(snap)
    with pytest.raises(TrackerError, match=message):
        SliceTracker.restore(snap)


def test_snapshot_of_another_dataset_refused() -> None:
    snap = busy_tracker().snapshot()
    with pytest.raises(TrackerError, match="it tracks dataset 'ds', not 'other'"):
        SliceTracker.restore(snap, dataset="other")
    with pytest.raises(TrackerError, match="it tracks 8 slices of 'ds', the dataset has 9"):
        SliceTracker.restore(snap, n_slices=9)
    with pytest.raises(TrackerError, match="expected an object, got list"):
        SliceTracker.restore([])


def test_stats_as_dict() -> None:
    t = busy_tracker()
    d = t.stats.as_dict()
    assert set(d) == {
        "epoch",
        "available",
        "in_flight",
        "used",
        "assigned_total",
        "used_total",
        "released_total",
        "reassigned_total",
    }
    assert d["available"] + d["in_flight"] + d["used"] == 8
    assert d["epoch"] == 1 and d["released_total"] == 1
