"""Bad input and failed peers: malformed bytes, a peer out of step, a peer that never answers or
leaves, NaN in a worker's parameters, mismatched settings, bad checkpoints. Each gets a clear
error; nothing is applied half-way without the optimizer saying so."""

from __future__ import annotations

import copy
import time
from typing import Any

import pytest
import torch

from hypha.compress import NonFiniteError
from hypha.optim import DiLoCo, ExchangeError, LocalTransport
from hypha.optim._transport import Buffer
from tests.unit.optim._run import (
    Worker,
    assert_identical,
    make_model,
    run_threads,
    run_workers,
    train,
)

pytestmark = pytest.mark.timeout(120)


class Corrupting(LocalTransport):
    """Flips a byte near the end of every message this rank sends once armed."""

    def _send(self, peer: int, data: Buffer) -> int:
        data = bytes(data)
        self.sent = getattr(self, "sent", 0) + 1
        if len(data) > 40 and getattr(self, "armed", False):
            k = len(data) - 5  # inside the body of the message's last chunk
            data = data[:k] + bytes([data[k] ^ 0x40]) + data[k + 1 :]
        return super()._send(peer, data)


def start(n: int, comms: list[Any] | None = None, **kwargs: Any) -> list[Worker]:
    return run_workers(n, 0, comms=comms, **kwargs)


def steps(workers: list[Worker], rng: range) -> list[Any]:
    """Trains every worker over ``rng``; returns each worker's exception (or None)."""

    def one(rank: int) -> BaseException | None:
        try:
            train(workers[rank].model, workers[rank].opt, rank, rng)
        except BaseException as exc:
            return exc
        return None

    return run_threads(one, len(workers))


def test_corrupted_bytes_fail_the_round_on_every_rank() -> None:
    comms = Corrupting.create(2)
    workers = start(2, comms, codec="int4", sync_every=3, timeout=2.0)
    assert steps(workers, range(3)) == [None, None]
    comms[1].armed = True  # type: ignore[attr-defined]
    before = workers[0].globals()
    errors = steps(workers, range(3, 6))
    assert isinstance(errors[0], ExchangeError) and "checksum mismatch" in str(errors[0])
    assert isinstance(errors[1], ExchangeError)  # rank 0 never sent its update: a timeout
    # rank 0 failed while merging rank 1's shard, before touching its global copy
    assert_identical([before, [g.clone() for g in workers[0].opt.global_parameters()]])
    for w in workers:
        with pytest.raises(ExchangeError, match="Reload a checkpoint"):
            train(w.model, w.opt, w.rank, range(6, 7))
        with pytest.raises(ExchangeError, match="Reload a checkpoint"):
            w.opt.state_dict()


def test_a_peer_out_of_step_is_named() -> None:
    workers = start(2, codec="int8", sync_every=2, timeout=2.0)
    assert steps(workers, range(2)) == [None, None]
    old = copy.deepcopy(workers[1].opt.state_dict())
    assert steps(workers, range(2, 4)) == [None, None]
    workers[1].opt.load_state_dict(old)  # rank 1 goes back one round; rank 0 does not
    errors = steps(workers, range(4, 6))
    assert all(isinstance(e, ExchangeError) for e in errors)
    assert "rank 1 is out of step: it sent pseudo-gradient shard for round 1" in str(errors[0])


def test_a_silent_peer_times_out() -> None:
    workers = start(2, codec="int4", sync_every=2, timeout=0.3)
    t0 = time.monotonic()
    with pytest.raises(ExchangeError, match=r"nothing from rank 1 within 0\.3 s"):
        train(workers[0].model, workers[0].opt, 0, range(2))  # rank 1 never steps
    assert time.monotonic() - t0 < 10


def test_a_peer_that_leaves() -> None:
    comms = LocalTransport.create(2)
    workers = start(2, comms, codec="int4", sync_every=2, timeout=5.0)
    comms[1].close()
    with pytest.raises(ExchangeError, match="rank 1 closed its transport"):
        train(workers[0].model, workers[0].opt, 0, range(2))


def poison(worker: Worker) -> None:
    with torch.no_grad():
        next(worker.model.parameters()).view(-1)[5] = float("nan")


@pytest.mark.parametrize("fragments", [1, 2])
def test_nan_worker_sits_the_round_out(fragments: int) -> None:
    workers = start(3, codec="int4", sync_every=4, fragments=fragments)
    assert steps(workers, range(3)) == [None, None, None]
    poison(workers[2])  # the NaN spreads through rank 2's next inner step; its sync sees it
    with pytest.warns(RuntimeWarning, match="rank 2: parameters held NaN/Inf"):
        assert steps(workers, range(3, 8)) == [None, None, None]
    assert_identical([w.globals() for w in workers])
    assert all(torch.isfinite(g).all() for g in workers[0].globals())
    assert [w.opt.stats.skipped_rounds >= 1 for w in workers] == [False, False, True]


def test_nan_worker_restarts_from_the_global_model() -> None:
    workers = start(2, codec="int8", sync_every=2)
    assert steps(workers, range(1)) == [None, None]
    poison(workers[1])
    with pytest.warns(RuntimeWarning, match="sat out outer round 0"):
        errors = steps(workers, range(1, 2))
    assert errors == [None, None]
    w = workers[1]
    for p, g in zip(w.model.parameters(), w.globals(), strict=True):
        assert torch.equal(p.detach(), g)  # restarted from the global copy
        assert p not in w.opt.inner.state  # and so did its inner optimizer state
    # the global model is rank 0's update alone, and the run goes on
    assert steps(workers, range(2, 6)) == [None, None]
    assert_identical([x.globals() for x in workers])


def test_nan_with_nonfinite_raise() -> None:
    workers = start(2, codec="int8", sync_every=2, nonfinite="raise")
    assert steps(workers, range(1)) == [None, None]
    poison(workers[0])
    errors = steps(workers, range(1, 2))
    assert errors[1] is None
    assert isinstance(errors[0], NonFiniteError) and "sat out outer round 0" in str(errors[0])
    assert_identical([x.globals() for x in workers])  # the round itself completed everywhere


def test_settings_must_agree_with_rank_0() -> None:
    comms = LocalTransport.create(2)

    def make(rank: int) -> BaseException | None:
        model = make_model(rank) if rank == 0 else torch.nn.Linear(13, 5)
        try:
            DiLoCo(
                torch.optim.SGD(model.parameters(), lr=0.1),
                comms[rank],
                sync_every=10 + rank,
                timeout=5,
            )
        except ValueError as exc:
            return exc
        return None

    errors = run_threads(make, 2)
    assert errors[0] is None
    assert "sync_every: rank 0 has 10, this rank 11" in str(errors[1])
    assert "numels" in str(errors[1])


def test_bad_checkpoints_are_refused_and_change_nothing() -> None:
    (w,) = run_workers(1, 4, codec="int4", sync_every=2)
    good = copy.deepcopy(w.opt.state_dict())
    snapshot = copy.deepcopy(w.opt.state_dict())

    def broken(edit: Any) -> dict[str, Any]:
        sd = copy.deepcopy(good)
        edit(sd)
        return sd

    cases = [
        ({"state": {}}, "not a DiLoCo state_dict"),
        (broken(lambda sd: sd["diloco"].update(version=99)), "version 99"),
        (broken(lambda sd: sd["diloco"].update(rank=3)), "belongs to rank 3"),
        (
            broken(lambda sd: sd["diloco"]["settings"].update(sync_every=7)),
            "different parameters or DiLoCo settings",
        ),
        (broken(lambda sd: sd["state"][0].pop("error_feedback")), "missing or has other keys"),
        (broken(lambda sd: sd["state"][1].update(**{"global": torch.zeros(5)})), "expected shape"),
        (
            broken(lambda sd: sd["state"][2]["global"].view(-1).__setitem__(0, float("nan"))),
            "NaN/Inf",
        ),
        (
            broken(lambda sd: sd["diloco"].update(outer_momentum=torch.zeros(3))),
            "outer_momentum does not match",
        ),
        (broken(lambda sd: sd["param_groups"][0].update(outer_lr=-1)), "Invalid outer_lr"),
        (
            broken(lambda sd: sd["param_groups"].append({"params": []})),
            "parameter groups do not match",
        ),
    ]
    for sd, match in cases:
        with pytest.raises(ValueError, match=match):
            w.opt.load_state_dict(sd)
    after = w.opt.state_dict()
    for i in snapshot["state"]:
        for key, value in snapshot["state"][i].items():
            assert torch.equal(after["state"][i][key], value)
    assert torch.equal(after["diloco"]["outer_momentum"], snapshot["diloco"]["outer_momentum"])
    assert after["inner"]["state"][0]["step"] == snapshot["inner"]["state"][0]["step"]
    w.opt.load_state_dict(good)  # and a good one still loads


def test_nonfinite_raise_does_not_desynchronise_streaming() -> None:
    """The merge that raises and the next fragment's start fall on the same step: the raising
    rank still starts that round, so its peers do not wait for it."""
    workers = start(
        2, codec="int8", sync_every=4, fragments=2, overlap_steps=2, nonfinite="raise", timeout=5.0
    )
    assert steps(workers, range(1)) == [None, None]
    poison(workers[0])
    errors = steps(workers, range(1, 4))  # step 2 starts fragment 0; step 4 merges it, starts 1
    assert isinstance(errors[0], NonFiniteError) and errors[1] is None

    def keep_going(rank: int) -> list[str]:
        seen = []
        for step in range(4, 12):
            try:
                train(workers[rank].model, workers[rank].opt, rank, range(step, step + 1))
            except NonFiniteError as exc:
                seen.append(str(exc))
        return seen

    seen = run_threads(keep_going, 2)
    assert seen[1] == []
    assert_identical([w.globals() for w in workers])
    assert all(torch.isfinite(g).all() for g in workers[1].globals())
    # rank 0 restarted from the global model, fragment by fragment: it is healthy again
    assert all(torch.isfinite(p).all() for p in workers[0].model.parameters())
