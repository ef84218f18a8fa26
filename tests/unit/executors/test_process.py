"""The process executor running small Python scripts that talk to their bridge through
examples/bridge_client.py."""

from __future__ import annotations

import json
import os
import sys
import textwrap
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio

from hypha.executors import (
    JobStartError,
    JobStatus,
    JobWorkspace,
    LocalBackend,
    ProcessExecutor,
    expand_command,
)

pytestmark = pytest.mark.timeout(30)

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def script(tmp_path: Path, body: str, *args: str) -> list[str]:
    path = tmp_path / f"script-{uuid.uuid4().hex[:8]}.py"
    path.write_text(textwrap.dedent(body))
    return [sys.executable, str(path), *args]


def executor(command: list[str], **kwargs: Any) -> ProcessExecutor:
    return ProcessExecutor(command, {"PYTHONPATH": str(EXAMPLES)}, **kwargs)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state not in ("Z", "X")  # a zombie waits for its parent to reap it: it is gone


async def wait_for(condition: Any, what: str, timeout: float = 10) -> None:
    with trio.move_on_after(timeout):
        while not condition():
            await trio.sleep(0.02)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return JobWorkspace(tmp_path / "jobs", uuid.uuid4()).create()


async def test_a_script_fetches_through_the_bridge_and_finishes(work: Path,
                                                                 tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "shard.txt").write_text("tokens")
    command = script(tmp_path, """
        import json, os, sys
        from bridge_client import BridgeClient, BridgeError
        bridge = BridgeClient()
        spec = json.load(open(os.environ["HYPHA_JOB_JSON"]))
        assert bridge.health() == {"ok": True, "job_id": spec["id"]}, bridge.health()
        got = bridge.fetch("inputs/shard.txt", path=sys.argv[1])
        print("fetched", got["path"], got["size"])
        try:
            bridge.fetch("../escape", path=sys.argv[1])
        except BridgeError as error:
            print("refused", error.status, file=sys.stderr)
        print("cwd", os.getcwd() == os.environ["HYPHA_WORK_DIR"])
    """, str(data / "shard.txt"))
    statuses: list[JobStatus] = []
    job = {"id": "job-7", "model": "tiny"}
    with trio.fail_after(20):
        final = await executor(command).run(
            job, work, statuses.append, backend=LocalBackend(work, allowed_dirs=[data]))
    assert [s.state for s in statuses] == ["starting", "running", "finished"]
    assert final == statuses[-1]
    assert (final.exit_code, final.job_id) == (0, "job-7")
    assert (work / "inputs" / "shard.txt").read_text() == "tokens"
    log = (work / ".hypha" / "job.log").read_text().splitlines()
    assert "[stdout] fetched inputs/shard.txt 6" in log
    assert "[stderr] refused 400" in log
    assert "[stdout] cwd True" in log
    assert json.loads((work / ".hypha" / "job.json").read_text()) == job
    assert not (work / ".hypha" / "bridge.sock").exists()


async def test_a_failing_script_reports_its_exit_code_and_stderr_tail(work: Path,
                                                                       tmp_path: Path) -> None:
    command = script(tmp_path, """
        import sys
        for i in range(10):
            print(f"warning {i}", file=sys.stderr)
        print("unterminated last words", end="", file=sys.stderr)
        sys.exit(3)
    """)
    statuses: list[JobStatus] = []
    with trio.fail_after(20):
        final = await executor(command, stderr_tail=4).run({"id": "j"}, work, statuses.append)
    assert [s.state for s in statuses] == ["starting", "running", "failed"]
    assert final.exit_code == 3
    assert final.message == "exited with code 3"
    assert final.stderr_tail == ("warning 7", "warning 8", "warning 9",
                                 "unterminated last words")


async def test_cancellation_stops_the_whole_process_group(work: Path, tmp_path: Path) -> None:
    command = script(tmp_path, """
        import subprocess, sys, time
        child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
        open("grandchild.pid", "w").write(str(child.pid))
        print("ready", flush=True)
        time.sleep(60)
    """)
    statuses: list[JobStatus] = []
    with trio.fail_after(20):
        with trio.CancelScope() as scope:
            async with trio.open_nursery() as nursery:
                job = await nursery.start(executor(command, grace_period=5).run, {"id": "j"},
                                          work, statuses.append)
                await wait_for(lambda: (work / "grandchild.pid").exists(), "the grandchild")
                grandchild = int((work / "grandchild.pid").read_text())
                assert alive(job.pid) and alive(grandchild)
                scope.cancel()
        assert scope.cancelled_caught
        assert [s.state for s in statuses] == ["starting", "running", "stopped"]
        assert statuses[-1].exit_code == -15
        assert statuses[-1].message == "cancelled; killed by signal 15 (SIGTERM)"
        assert not alive(job.pid)
        await wait_for(lambda: not alive(grandchild), "the grandchild to die")
        with pytest.raises(ProcessLookupError):
            os.killpg(job.pid, 0)


async def test_a_script_that_ignores_sigterm_is_killed_after_the_grace_period(
        work: Path, tmp_path: Path) -> None:
    command = script(tmp_path, """
        import signal, time
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print("ready", flush=True)
        time.sleep(60)
    """)
    statuses: list[JobStatus] = []
    result: list[JobStatus] = []

    async def run(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        result.append(await executor(command, grace_period=0.3).run(
            {"id": "j"}, work, statuses.append, task_status=task_status))

    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            job = await nursery.start(run)
            await wait_for(lambda: "ready" in (work / ".hypha" / "job.log").read_text(),
                           "the script")
            started = trio.current_time()
            job.stop()  # run() returns: the caller asked for it, nothing to propagate
        assert trio.current_time() - started >= 0.3
    assert [s.state for s in statuses] == ["starting", "running", "stopped"]
    assert result == [statuses[-1]]
    assert result[0].exit_code == -9
    assert "SIGKILL" in result[0].message


async def test_templates_are_substituted_once(tmp_path: Path) -> None:
    base = tmp_path / "base{JOB_JSON}"  # a value with braces must not be substituted again
    work = JobWorkspace(base, uuid.uuid4()).create()
    command = script(tmp_path, """
        import json, os, sys
        env = {k: v for k, v in os.environ.items() if k.startswith("HYPHA_")}
        json.dump({"argv": sys.argv[1:], "env": env}, open("seen.json", "w"))
    """, "{WORK_DIR}", "--socket={SOCKET_PATH}", "{JOB_JSON}", "{OTHER}", "{{WORK_DIR}}",
        "{work_dir}")
    with trio.fail_after(20):
        final = await executor(command).run({"id": "j"}, work, lambda status: None)
    assert final.state == "finished"
    seen = json.loads((work / "seen.json").read_text())
    root = str(work.resolve())
    socket_path = seen["env"]["HYPHA_SOCKET_PATH"]  # this work dir is too long to hold it
    assert socket_path.endswith("/bridge.sock") and not socket_path.startswith(root)
    assert seen["argv"] == [root, f"--socket={socket_path}", f"{root}/.hypha/job.json",
                            "{OTHER}", "{" + root + "}", "{work_dir}"]
    assert seen["env"] == {"HYPHA_WORK_DIR": root, "HYPHA_SOCKET_PATH": socket_path,
                           "HYPHA_JOB_JSON": f"{root}/.hypha/job.json"}


def test_expand_command() -> None:
    values = {"SOCKET_PATH": "/s{WORK_DIR}", "WORK_DIR": "/w", "JOB_JSON": "/j"}
    assert expand_command(["{SOCKET_PATH}", "a{WORK_DIR}b{JOB_JSON}", "{X}", "{SOCKET_PATH"],
                          values) == ["/s{WORK_DIR}", "a/wb/j", "{X}", "{SOCKET_PATH"]


async def test_a_command_that_cannot_start_fails(work: Path) -> None:
    statuses: list[JobStatus] = []
    with trio.fail_after(10), pytest.raises(JobStartError, match="cannot start '/no/such'"):
        await ProcessExecutor(["/no/such"]).run({"id": "j"}, work, statuses.append)
    assert [s.state for s in statuses] == ["starting", "failed"]
    assert "No such file" in statuses[-1].message
    assert not (work / ".hypha" / "bridge.sock").exists()


async def test_the_script_sends_and_receives_through_the_client(tmp_path: Path) -> None:
    """Two jobs on one loopback: the sender's script sends, the receiver's script reads the
    SSE stream with the example client."""
    from hypha.executors import Loopback

    loopback = Loopback()
    work_a = JobWorkspace(tmp_path / "jobs", uuid.uuid4()).create()
    work_b = JobWorkspace(tmp_path / "jobs", uuid.uuid4()).create()
    receiver = script(tmp_path, """
        from bridge_client import BridgeClient
        for event in BridgeClient().receive():
            print("got", event["path"], event["peer"], open(event["path"]).read(), flush=True)
            break
    """)
    sender = script(tmp_path, """
        from bridge_client import BridgeClient
        open("note.txt", "w").write("hello b")
        print(BridgeClient().send("note.txt", ["b"], strategy="one"))
    """)
    done: list[JobStatus] = []
    with trio.fail_after(20), LocalBackend(work_a, peer_id="a", loopback=loopback) as a, \
            LocalBackend(work_b, peer_id="b", loopback=loopback) as b:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(executor(receiver).run, backend=b), {"id": "b"},
                                work_b, done.append)
            await executor(sender).run({"id": "a"}, work_a, done.append, backend=a)
    finals = {s.job_id: s for s in done if s.state not in ("starting", "running")}
    assert finals["a"].state == finals["b"].state == "finished"
    assert "[stdout] ['b']" in (work_a / ".hypha" / "job.log").read_text()
    assert "[stdout] got incoming/note.txt a hello b" in (
        work_b / ".hypha" / "job.log").read_text()


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ([], {}, "Invalid command"),
    ("python train.py", {}, "Invalid command"),
    ([sys.executable, 3], {}, "Invalid command"),
    ([sys.executable], {"grace_period": -1}, "Invalid grace_period"),
    ([sys.executable], {"grace_period": float("inf")}, "Invalid grace_period"),
    ([sys.executable], {"stderr_tail": -1}, "Invalid stderr_tail"),
    ([sys.executable], {"keepalive_interval": 0}, "Invalid keepalive_interval"),
])
def test_bad_arguments_are_refused(args: Any, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ProcessExecutor(args, **kwargs)


async def test_an_unserialisable_spec_is_refused(work: Path) -> None:
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        await ProcessExecutor([sys.executable]).run({"id": "j", "x": object()}, work,
                                                    lambda status: None)
