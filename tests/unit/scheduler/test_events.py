"""The scheduler's JSON-lines event log and the checks of a DiLoCo run's settings."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from hypha.messages import Executor
from hypha.scheduler.allocator import Requirements
from hypha.scheduler.node import DiLoCo, EventLog
from tests.integration._market import PS, SMALL, TRAIN


def test_events_are_appended_one_json_object_per_line(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text('{"event": "earlier run"}\n')
    events = EventLog(path, clock=lambda: 12.5)
    events.write("metrics", job="j", worker="w", role="train", step=3, values={"loss": 2.0})
    # line-buffered: on disk before the log is closed
    assert json.loads(path.read_text().splitlines()[1]) == {
        "time": 12.5, "event": "metrics", "job": "j", "worker": "w", "role": "train",
        "step": 3, "values": {"loss": 2.0}}
    events.write("status", job="j", worker="w", role="train", state="running", message="")
    events.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["event"] for line in lines] == ["earlier run", "metrics", "status"]


def test_a_failing_log_is_reported_once_and_never_raises(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    events = EventLog(tmp_path / "gone" / "events.jsonl")
    with caplog.at_level(logging.ERROR, logger="hypha.scheduler"):
        events.write("lease", job=None, worker="w", role="train", lease="l", price=1.0)
        events.write("lost", job=None, worker="w", role="train", lease="l", reason="x")
        events.write("metrics", values={"bad": float("nan")})
    errors = [r for r in caplog.records if "cannot append to the metrics log" in r.message]
    assert len(errors) == 1
    # once the directory is there, writing works again
    (tmp_path / "gone").mkdir()
    events.write("lease", job=None, worker="w", role="train", lease="l", price=1.0)
    events.close()
    assert len((tmp_path / "gone" / "events.jsonl").read_text().splitlines()) == 1


def test_no_path_writes_nothing() -> None:
    events = EventLog(None)
    events.write("lease", job=None)
    events.close()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"rounds": 0}, "rounds must be an integer >= 1, got 0"),
    ({"sync_batches": 0}, "sync_batches must be an integer in"),
    ({"round_timeout": 0.0}, r"round_timeout must be seconds in \(0, 86400\], got 0.0"),
    ({"round_timeout": float("inf")}, "round_timeout must be seconds"),
    ({"perf_aware": 1}, "perf_aware must be True or False, got 1"),
])
def test_bad_diloco_settings_are_refused(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DiLoCo(Requirements(SMALL, PS, 1.0, 2.0), **kwargs)  # type: ignore[arg-type]


def test_the_parameter_server_needs_its_executor_kind() -> None:
    with pytest.raises(ValueError, match="must be of kind 'parameter-server', got 'process'"):
        DiLoCo(Requirements(SMALL, TRAIN, 1.0, 2.0))
    assert DiLoCo(Requirements(SMALL, Executor(kind="parameter-server", name="x",
                                               runtime="y"), 1.0, 2.0)).rounds == 10


def test_the_package_exports() -> None:
    import hypha.scheduler.node as node
    import hypha.scheduler.sync as sync

    assert sync.__all__ == ["SyncPlanner"]
    for name in node.__all__:
        assert hasattr(node, name)
