"""The short fault matrix (tests/integration/_faults.py): each fault injected into a small DiLoCo
run on a local network of real processes, and the outcome the issue expects. bench/faults.py runs
the full matrix and records it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from hypha.up import _processes_under
from tests.integration import _netns
from tests.integration._faults import SCENARIOS, Unavailable

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(name: str, tmp_path: Path) -> None:
    root = tmp_path / "run"
    try:
        row = SCENARIOS[name](root, 1)
    except Unavailable as exc:  # e.g. partition without network namespaces (not root)
        pytest.skip(f"{name}: {exc}")
    failed = [check for check, ok in row.checks.items() if not ok]
    assert row.ok and not failed, f"{row.fault}: {failed} failed; observed: {row.observed}"
    # whatever was killed and restarted, nothing outlives the run
    assert _processes_under(root) == []


def _namespaces_or_skip() -> None:
    reason = _netns.available()
    if reason is not None:
        pytest.skip(f"network namespaces are not available: {reason}")


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_partition_namespaces_removed_after_an_error(error: type[BaseException]) -> None:
    _namespaces_or_skip()
    with pytest.raises(error):
        with _netns.Namespaces(["a", "b"]) as spaces:
            spaces.cut("a")
            raise error("in the middle of the run")
    assert spaces.leftovers() == []


def test_partition_namespaces_removed_when_set_up_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    _namespaces_or_skip()
    run = _netns._run

    def interrupted(*argv: str, check: bool = True) -> Any:
        if "addr" in argv and "add" in argv:  # the bridge, a namespace and a veth pair exist
            raise KeyboardInterrupt
        return run(*argv, check=check)

    spaces = _netns.Namespaces(["a", "b"])
    monkeypatch.setattr(_netns, "_run", interrupted)
    with pytest.raises(KeyboardInterrupt):
        spaces.__enter__()
    monkeypatch.undo()
    assert spaces.leftovers() == []
