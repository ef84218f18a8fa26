"""Multi-node tests on 127.0.0.1; each builds its own throw-away PKI in tmp_path."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.net._pki import PKI


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")
