"""The short fault matrix (tests/integration/_faults.py): each fault injected into a small DiLoCo
run on a local network of real processes, and the outcome the issue expects. bench/faults.py runs
the full matrix and records it."""

from __future__ import annotations

from pathlib import Path

import pytest

from hypha.up import _processes_under
from tests.integration._faults import SCENARIOS

pytestmark = pytest.mark.timeout(600)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_fault(name: str, tmp_path: Path) -> None:
    root = tmp_path / "run"
    row = SCENARIOS[name](root, 1)
    failed = [check for check, ok in row.checks.items() if not ok]
    assert row.ok and not failed, f"{row.fault}: {failed} failed; observed: {row.observed}"
    # whatever was killed and restarted, nothing outlives the run
    assert _processes_under(root) == []
