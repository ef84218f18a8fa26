"""JobWorkspace: a private per-job directory under a checked base, removed afterwards."""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path

import pytest

from hypha.executors import JobWorkspace, WorkspaceError

JOB = uuid.UUID("12345678-1234-5678-1234-567812345678")


def test_create_and_cleanup(tmp_path: Path) -> None:
    workspace = JobWorkspace(tmp_path / "base" / "jobs", str(JOB))
    with workspace as path:
        assert path == tmp_path / "base" / "jobs" / f"hypha-{JOB}"
        assert stat.S_IMODE(path.stat().st_mode) == 0o700
        assert stat.S_IMODE((tmp_path / "base" / "jobs").stat().st_mode) == 0o700
        (path / "sub").mkdir()
        (path / "sub" / "f").write_text("x")
        (path / "outside").symlink_to(tmp_path)  # removed, never followed
        os.chmod(path / "sub", 0o500)  # a script may leave read-only directories behind
    assert not path.exists()
    assert (tmp_path / "base").exists()
    workspace.cleanup()  # idempotent


async def test_async_use_and_keep(tmp_path: Path) -> None:
    async with JobWorkspace(tmp_path, JOB, keep=True) as path:
        (path / "f").write_text("x")
    assert (path / "f").read_text() == "x"


def test_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="expected a UUID"):
        JobWorkspace(tmp_path, "../../etc")
    (tmp_path / "file").write_text("")
    with pytest.raises(WorkspaceError, match="is not a directory"):
        JobWorkspace(tmp_path / "file", JOB).create()
    (tmp_path / "open").mkdir()
    os.chmod(tmp_path / "open", 0o777)
    with pytest.raises(WorkspaceError, match="world-writable without the sticky bit"):
        JobWorkspace(tmp_path / "open", JOB).create()
    os.chmod(tmp_path / "open", 0o1777)  # like /tmp: fine, the job dir itself is private
    JobWorkspace(tmp_path / "open", JOB).create()
    with pytest.raises(WorkspaceError, match="already exists"):
        JobWorkspace(tmp_path / "open", JOB).create()
