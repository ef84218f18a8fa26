"""A job's work directory: ``<base>/hypha-<job uuid>``, mode 0700, removed when the job ends.

::

    async with JobWorkspace(base_dir, job_id) as work_dir:
        await executor.run(spec, work_dir, on_status)
"""

from __future__ import annotations

import logging
import os
import shutil
import stat
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any

import trio

__all__ = ["JobWorkspace", "WorkspaceError"]

log = logging.getLogger(__name__)


class WorkspaceError(RuntimeError):
    """The work directory cannot be created where it was asked for."""


def _make_writable_and_retry(function: Any, path: str, exc_info: Any) -> None:
    """rmtree's error hook: a script may leave read-only directories behind."""
    parent = os.path.dirname(path)
    try:
        os.chmod(parent, 0o700)
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, 0o700)
    except OSError:
        pass
    function(path)


class JobWorkspace:
    """Creates ``hypha-<job_id>`` under ``base_dir`` (0700), and removes it on cleanup unless
    ``keep``. ``job_id`` must be a UUID, which also keeps it a safe directory name.

    ``base_dir`` is created (0700) when missing; it is refused when it is not a directory, or
    when it is world-writable without the sticky bit (anyone could then rename our job
    directory away and put theirs in its place)."""

    def __init__(self, base_dir: Path | str, job_id: uuid.UUID | str, *,
                 keep: bool = False) -> None:
        try:
            self.job_id = job_id if isinstance(job_id, uuid.UUID) else uuid.UUID(str(job_id))
        except ValueError:
            raise ValueError(f"Invalid job id: {job_id!r} (expected a UUID)") from None
        self.base_dir = Path(base_dir)
        self.path = self.base_dir / f"hypha-{self.job_id}"
        self.keep = keep

    def create(self) -> Path:
        """Create the directory; returns its path."""
        try:
            self.base_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except FileExistsError:
            raise WorkspaceError(f"work base {self.base_dir} is not a directory") from None
        except OSError as error:
            raise WorkspaceError(f"cannot create work base {self.base_dir}: "
                                 f"{error.strerror}") from None
        info = os.stat(self.base_dir)
        if not stat.S_ISDIR(info.st_mode):
            raise WorkspaceError(f"work base {self.base_dir} is not a directory")
        if info.st_mode & stat.S_IWOTH and not info.st_mode & stat.S_ISVTX:
            raise WorkspaceError(f"work base {self.base_dir} is world-writable without the "
                                 "sticky bit, so other users could replace job directories; "
                                 f"use a private directory (chmod 700 {self.base_dir})")
        try:
            os.mkdir(self.path, 0o700)
        except FileExistsError:
            raise WorkspaceError(f"work dir {self.path} already exists (a job with this id "
                                 "ran here before?)") from None
        os.chmod(self.path, 0o700)  # mkdir's mode is filtered by the umask
        log.debug("job %s: work dir %s", self.job_id, self.path)
        return self.path

    def cleanup(self) -> None:
        """Remove the directory and everything in it (unless ``keep``); symlinks inside are
        removed, never followed."""
        if self.keep:
            log.info("job %s: keeping work dir %s", self.job_id, self.path)
            return
        if not os.path.lexists(self.path):
            return
        # NOTE: `onerror` rather than 3.12's `onexc`: the package supports Python 3.11.
        shutil.rmtree(self.path, onerror=_make_writable_and_retry)

    def __enter__(self) -> Path:
        return self.create()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()

    async def __aenter__(self) -> Path:
        return await trio.to_thread.run_sync(self.create)

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(self.cleanup)
