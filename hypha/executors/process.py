"""The process executor: runs any training script as a child process beside its job bridge.

::

    executor = ProcessExecutor([sys.executable, "train.py", "--bridge", "{SOCKET_PATH}"])
    async with trio.open_nursery() as nursery:
        job = await nursery.start(executor.run, spec, work_dir, on_status)
        ...
        job.stop()  # or cancel the nursery: SIGTERM to the process group, SIGKILL after a grace

For each job it writes the spec to ``<work_dir>/.hypha/job.json``, binds the bridge socket, then
starts the command in the work dir, in a new session (so it and everything it starts form one
process group that is stopped as a whole), with ``{SOCKET_PATH}``, ``{WORK_DIR}`` and
``{JOB_JSON}`` substituted in its arguments and ``HYPHA_SOCKET_PATH``, ``HYPHA_WORK_DIR`` and
``HYPHA_JOB_JSON`` in its environment. Its stdout and stderr go, line by line, to
``<work_dir>/.hypha/job.log`` and to the ``hypha.executors.process`` logger.

States, reported through ``on_status``: ``starting`` → ``running`` → ``finished`` (exit 0) |
``failed`` (non-zero exit, with the exit code and the last lines of stderr; or a start or
executor error, with a message) | ``stopped`` (``stop()`` or cancellation).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Literal

import trio

from hypha.executors._paths import AtomicFile, private_dir
from hypha.executors.bridge import (
    DEFAULT_KEEPALIVE_INTERVAL,
    PRIVATE_DIR,
    BridgeBackend,
    JobBridge,
)
from hypha.executors.local import LocalBackend

__all__ = [
    "DEFAULT_GRACE_PERIOD",
    "JobStartError",
    "JobState",
    "JobStatus",
    "ProcessExecutor",
    "RunningJob",
    "expand_command",
]

log = logging.getLogger(__name__)

DEFAULT_GRACE_PERIOD = 10.0  # seconds between SIGTERM and SIGKILL
JOB_JSON_NAME = "job.json"
LOG_NAME = "job.log"
_MAX_LINE_BYTES = 64 * 1024  # a longer line without a newline is logged in pieces
_DRAIN_TIMEOUT = 2.0  # how long to wait for the last output after the process has exited
_TEMPLATE = re.compile(r"\{(SOCKET_PATH|WORK_DIR|JOB_JSON)\}")

JobState = Literal["starting", "running", "finished", "failed", "stopped"]


@dataclass(frozen=True)
class JobStatus:
    """One state transition of a job. ``exit_code`` is negative for a signal (-15: SIGTERM)."""

    job_id: str
    state: JobState
    exit_code: int | None = None
    message: str = ""
    stderr_tail: tuple[str, ...] = ()


class JobStartError(RuntimeError):
    """The command could not be started (not found, not executable, ...)."""


@dataclass
class RunningJob:
    """What ``await nursery.start(executor.run, ...)`` returns once the process runs."""

    job_id: str
    pid: int
    work_dir: Path
    socket_path: Path
    log_path: Path
    _stop: trio.CancelScope = field(repr=False)

    def stop(self) -> None:
        """Stop the job (SIGTERM, then SIGKILL after the grace period); ``run`` then reports
        ``stopped`` and returns instead of raising."""
        self._stop.cancel()


def _check_runnable(program: str, env: Mapping[str, str], cwd: Path) -> None:
    """Raise FileNotFoundError/PermissionError before anything starts, with the program named."""
    if os.sep in program:
        path = Path(program) if os.path.isabs(program) else cwd / program
        if not path.is_file():
            raise FileNotFoundError(2, "No such file or directory", program)
        if not os.access(path, os.X_OK):
            raise PermissionError(13, "Permission denied", program)
    elif shutil.which(program, path=env.get("PATH", os.defpath)) is None:
        raise FileNotFoundError(2, "No such file or directory", program)


def expand_command(command: Sequence[str], values: Mapping[str, str]) -> list[str]:
    """Substitute ``{SOCKET_PATH}``, ``{WORK_DIR}`` and ``{JOB_JSON}`` in each argument.

    One pass per argument: text that a value brings in is never substituted again (a work dir
    named ``a{JOB_JSON}`` stays as it is), and any other ``{NAME}`` is left alone."""
    return [_TEMPLATE.sub(lambda match: values[match.group(1)], arg) for arg in command]


def _describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


def _signal_group(pgid: int, sig: int) -> bool:
    """Signal a process group; False when it has no processes left."""
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        return False
    except PermissionError as error:  # a member changed its user (setuid): not ours to kill
        log.warning("cannot signal process group %d: %s", pgid, error)
        return False
    return True


def _only_cancelled(error: BaseException) -> bool:
    if isinstance(error, trio.Cancelled):
        return True
    if isinstance(error, BaseExceptionGroup):
        return error.split(trio.Cancelled)[1] is None
    return False


def _write_job_json(meta: Path, spec: str) -> Path:
    with AtomicFile(meta / JOB_JSON_NAME) as out:
        out.file.write(spec.encode())
        return out.commit()


def _open_log(meta: Path) -> BinaryIO:
    fd = os.open(meta / LOG_NAME,
                 os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    return os.fdopen(fd, "ab")


class ProcessExecutor:
    """Runs ``command`` (a list of arguments, with templates) for each job; see the module doc.

    ``env`` is added to the worker's environment (or replaces it with ``inherit_env=False``);
    ``grace_period`` is the time between SIGTERM and SIGKILL when a job is stopped;
    ``stderr_tail`` the number of stderr lines a ``failed`` status carries.
    """

    def __init__(self, command: Sequence[str], env: Mapping[str, str] | None = None, *,
                 grace_period: float = DEFAULT_GRACE_PERIOD, inherit_env: bool = True,
                 stderr_tail: int = 20,
                 keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL) -> None:
        if (isinstance(command, str) or not command
                or not all(isinstance(arg, str) for arg in command)):
            raise ValueError(f"Invalid command: expected a non-empty list of strings, got "
                             f"{command!r}")
        env = dict(env or {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ValueError("Invalid env: keys and values must be strings")
        if not (math.isfinite(grace_period) and grace_period >= 0):
            raise ValueError(f"Invalid grace_period: {grace_period}")
        if stderr_tail < 0:
            raise ValueError(f"Invalid stderr_tail: {stderr_tail}")
        if not keepalive_interval > 0:
            raise ValueError(f"Invalid keepalive_interval: {keepalive_interval}")
        self.command = list(command)
        self.env = env
        self.grace_period = grace_period
        self.inherit_env = inherit_env
        self.stderr_tail = stderr_tail
        self.keepalive_interval = keepalive_interval

    async def run(self, job: Mapping[str, Any], work_dir: Path,
                  on_status: Callable[[JobStatus], None], *,
                  backend: BridgeBackend | None = None,
                  task_status: Any = trio.TASK_STATUS_IGNORED,
                  ) -> JobStatus:
        """Run one job to its end; returns (and reports) the final status.

        ``job`` is the JSON-serialisable job spec; its ``"id"`` names the job (the work dir's
        name when it has none). ``work_dir`` must exist (see ``JobWorkspace``). ``backend``
        defaults to a :class:`LocalBackend` of the work dir. ``on_status`` is called on every
        transition and must not block (push to a memory channel with ``send_nowait`` to do
        async work). On cancellation the job is stopped, ``stopped`` reported, and the
        cancellation propagates; on a start or executor error ``failed`` is reported and the
        error raised.
        """
        job_id = str(job["id"]) if "id" in job else Path(work_dir).name
        try:
            spec = json.dumps(dict(job), indent=2, sort_keys=True)
        except (TypeError, ValueError) as error:
            raise ValueError(f"job {job_id}: the spec is not JSON-serialisable: {error}") from None
        attempt = _Attempt(self, job_id, spec, Path(work_dir), on_status)
        attempt.report("starting")
        try:
            final = await attempt.run(backend, task_status)
        except BaseException as error:
            if _only_cancelled(error):
                code = attempt.exit_code
                attempt.report("stopped", exit_code=code, message="cancelled" if code is None
                               else f"cancelled; {_describe_exit(code)}")
            else:
                attempt.report("failed", exit_code=attempt.exit_code,
                               message=f"{type(error).__name__}: {error}")
            raise
        attempt.publish(final)
        return final


class _Attempt:
    """The state of one run of one job."""

    def __init__(self, executor: ProcessExecutor, job_id: str, spec: str, work_dir: Path,
                 on_status: Callable[[JobStatus], None]) -> None:
        self.executor = executor
        self.job_id = job_id
        self.spec = spec
        self.work_dir = work_dir
        self.on_status = on_status
        self.tail: deque[str] = deque(maxlen=executor.stderr_tail)
        self.process: trio.Process | None = None

    @property
    def exit_code(self) -> int | None:
        return None if self.process is None else self.process.returncode

    def status(self, state: JobState, *, exit_code: int | None = None,
               message: str = "") -> JobStatus:
        tail = tuple(self.tail) if state in ("failed", "stopped") else ()
        return JobStatus(self.job_id, state, exit_code, message, tail)

    def report(self, state: JobState, *, exit_code: int | None = None,
               message: str = "") -> None:
        self.publish(self.status(state, exit_code=exit_code, message=message))

    def publish(self, status: JobStatus) -> None:
        log.info("job %s: %s%s", self.job_id, status.state,
                 f" ({status.message})" if status.message else "")
        self.on_status(status)

    async def run(self, backend: BridgeBackend | None,
                  task_status: Any) -> JobStatus:
        executor = self.executor
        root = self.work_dir.resolve(strict=True)
        if not root.is_dir():
            raise NotADirectoryError(f"work dir {self.work_dir} is not a directory")
        meta = private_dir(root / PRIVATE_DIR)
        job_json = await trio.to_thread.run_sync(_write_job_json, meta, self.spec)
        bridge = JobBridge(root, backend or LocalBackend(root), job_id=self.job_id,
                           keepalive_interval=executor.keepalive_interval)
        socket_path = bridge.bind()
        values = {"SOCKET_PATH": str(socket_path), "WORK_DIR": str(root),
                  "JOB_JSON": str(job_json)}
        argv = expand_command(executor.command, values)
        env = dict(os.environ) if executor.inherit_env else {}
        env.update(executor.env)
        env.update({f"HYPHA_{name}": value for name, value in values.items()})
        log_file = await trio.to_thread.run_sync(_open_log, meta)
        try:
            try:
                _check_runnable(argv[0], env, root)
                process = await trio.lowlevel.open_process(
                    argv, cwd=root, env=env, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            except OSError as error:
                raise JobStartError(f"cannot start {argv[0]!r}: "
                                    f"{error.strerror or error}") from error
            self.process = process
            try:
                return await self._supervise(process, bridge, socket_path, meta, log_file,
                                             task_status)
            finally:
                with trio.CancelScope(shield=True):
                    for pipe in (process.stdout, process.stderr):
                        if pipe is not None:
                            await pipe.aclose()
        finally:
            bridge.close()
            log_file.close()

    async def _supervise(self, process: trio.Process, bridge: JobBridge, socket_path: Path,
                         meta: Path, log_file: BinaryIO,
                         task_status: Any) -> JobStatus:
        stop = trio.CancelScope()
        drained = [trio.Event(), trio.Event()]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(bridge.serve)
            assert process.stdout is not None and process.stderr is not None
            nursery.start_soon(self._pump, process.stdout, "stdout", log_file, drained[0])
            nursery.start_soon(self._pump, process.stderr, "stderr", log_file, drained[1])
            self.report("running", message=f"pid {process.pid}")
            task_status.started(RunningJob(self.job_id, process.pid, self.work_dir,
                                           socket_path, meta / LOG_NAME, stop))
            try:
                with stop:
                    await process.wait()
            finally:
                with trio.CancelScope(shield=True):
                    await self._end_group(process)
            with trio.move_on_after(_DRAIN_TIMEOUT):
                for event in drained:
                    await event.wait()
            nursery.cancel_scope.cancel()  # the bridge, and pumps on pipes an escapee holds
        code = process.returncode
        assert code is not None
        if stop.cancelled_caught:
            return self.status("stopped", exit_code=code, message="stopped; "
                               + _describe_exit(code))
        if code == 0:
            return self.status("finished", exit_code=0, message=_describe_exit(0))
        return self.status("failed", exit_code=code, message=_describe_exit(code))

    async def _end_group(self, process: trio.Process) -> None:
        """Stop the process if it still runs, then whatever is left of its process group."""
        pgid = process.pid  # start_new_session: the process leads its own group
        if process.returncode is None:
            grace = self.executor.grace_period
            log.info("job %s: stopping pid %d (SIGTERM, SIGKILL after %.1f s)", self.job_id,
                     pgid, grace)
            _signal_group(pgid, signal.SIGTERM)
            with trio.move_on_after(grace):
                await process.wait()
                while _signal_group(pgid, 0):  # give its children the same grace
                    await trio.sleep(0.05)
            if process.returncode is None:
                log.warning("job %s: pid %d outlived SIGTERM by %.1f s; killing it",
                            self.job_id, pgid, grace)
        if _signal_group(pgid, signal.SIGKILL):
            log.info("job %s: killed what was left of process group %d", self.job_id, pgid)
        await process.wait()

    async def _pump(self, stream: trio.abc.ReceiveStream, name: str, log_file: BinaryIO,
                    done: trio.Event) -> None:
        try:
            pending = b""
            async for chunk in stream:
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                if len(pending) > _MAX_LINE_BYTES:
                    lines.append(pending)
                    pending = b""
                self._emit(name, lines, log_file)
            if pending:
                self._emit(name, [pending], log_file)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            pass
        finally:
            done.set()

    def _emit(self, name: str, lines: list[bytes], log_file: BinaryIO) -> None:
        # NOTE: plain blocking writes: a buffered append to a local file costs about what the
        # logging call beside it does, and a thread hop per line would cost more.
        for raw in lines:
            text = raw.decode("utf-8", "replace").rstrip("\r")
            log_file.write(f"[{name}] {text}\n".encode())
            log.info("job %s %s: %s", self.job_id, name, text)
            if name == "stderr":
                self.tail.append(text)
        log_file.flush()
