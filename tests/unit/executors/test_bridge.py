"""The job bridge over a real Unix socket, with an h11 client: routes, limits, confinement, and
send/receive between two bridges through the loopback backend."""

from __future__ import annotations

import json
import os
import random
import shutil
import stat
import subprocess
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import h11
import pytest
import trio

from hypha.executors import (
    MAX_BODY_BYTES,
    BridgeError,
    FetchRequest,
    IncomingFile,
    JobBridge,
    LocalBackend,
    Loopback,
    deliver,
)
from tests.unit.executors._http import event_stream, request

pytestmark = pytest.mark.timeout(30)


@asynccontextmanager
async def serving(work_dir: Path, backend: Any, **kwargs: Any) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        path = await nursery.start(JobBridge(work_dir, backend, job_id="job-1", **kwargs).serve)
        yield path
        nursery.cancel_scope.cancel()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "w").mkdir()
    return tmp_path / "w"


async def test_health_and_socket_mode(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            assert path == work.resolve() / ".hypha" / "bridge.sock"
            info = os.lstat(path)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            reply = await request(path, "GET", "/health")
            assert (reply.status, reply.json) == (200, {"ok": True, "job_id": "job-1"})
            assert reply.headers["content-type"] == "application/json"
        assert not path.exists()  # removed when the bridge stops


async def test_a_long_work_dir_gets_a_short_private_socket(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    with trio.fail_after(10):
        async with serving(deep, LocalBackend(deep)) as path:
            assert len(os.fsencode(str(path))) <= 107
            assert not path.is_relative_to(deep)
            assert stat.S_IMODE(os.lstat(path).st_mode) == 0o600
            assert stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
            assert (await request(path, "GET", "/health")).status == 200
        assert not path.parent.exists()


async def test_a_stale_socket_is_replaced_but_other_files_are_not(work: Path) -> None:
    (work / ".hypha").mkdir(mode=0o700)
    os.chmod(work / ".hypha", 0o700)
    (work / ".hypha" / "bridge.sock").write_text("not a socket")
    with pytest.raises(Exception, match="exists and is not a socket"):
        JobBridge(work, LocalBackend(work), job_id="j").bind()
    (work / ".hypha" / "bridge.sock").unlink()
    first = JobBridge(work, LocalBackend(work), job_id="j")
    first.bind()
    first._listener.sock.close()  # type: ignore[union-attr]  # a crash leaves the file
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            assert (await request(path, "GET", "/health")).status == 200


async def test_a_shared_private_dir_is_refused(work: Path) -> None:
    (work / ".hypha").mkdir()
    os.chmod(work / ".hypha", 0o755)
    with pytest.raises(Exception, match="not private"):
        JobBridge(work, LocalBackend(work), job_id="j").bind()


async def test_fetch_a_local_file(work: Path, tmp_path: Path) -> None:
    (work / "in.txt").write_text("inside")
    data = tmp_path / "datasets"
    data.mkdir()
    (data / "shard.bin").write_bytes(bytes(range(256)) * 100)
    backend = LocalBackend(work, allowed_dirs=[data])
    with trio.fail_after(10):
        async with serving(work, backend) as path:
            reply = await request(path, "POST", "/resources/fetch",
                                  {"source": "path", "path": "in.txt", "dest": "copy/in.txt"})
            assert (reply.status, reply.json) == (200, {"path": "copy/in.txt", "size": 6})
            assert (work / "copy" / "in.txt").read_text() == "inside"
            reply = await request(path, "POST", "/resources/fetch",
                                  {"source": "path", "path": str(data / "shard.bin"),
                                   "dest": "./data//shard.bin"})
            assert (reply.status, reply.json) == (200, {"path": "data/shard.bin",
                                                        "size": 25600})
            assert (work / "data" / "shard.bin").read_bytes() == (data / "shard.bin").read_bytes()


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"dest": "../escape.txt"}, 400, "dest '../escape.txt' contains a '..' component"),
    ({"dest": "/tmp/escape.txt"}, 400, "is absolute; give a path relative to the work"),
    ({"dest": "a\u0000b"}, 400, "contains a NUL byte"),
    ({"dest": "out/link/escape.txt"}, 403, "resolves outside the work directory"),
    ({"dest": "leaf"}, 403, "resolves outside the work directory"),
    ({"dest": "subdir"}, 400, "is an existing directory"),
    ({"dest": ".hypha/job.json"}, 403, "reserved for the worker"),
    ({"dest": "x", "path": "../outside/secret"}, 400, "path '../outside/secret' contains a"),
    ({"dest": "x", "path": "out/link/secret"}, 403, "resolves outside the work directory"),
    ({"dest": "x", "path": "/etc/passwd"}, 403,
     "'/etc/passwd' is outside the work directory and the allowed directories"),
    ({"dest": "x", "path": "missing.txt"}, 404, "not found"),
    ({"dest": "x", "path": "subdir"}, 400, "is not a regular file"),
])
async def test_fetch_refuses_paths_outside(work: Path, tmp_path: Path, body: dict[str, str],
                                           status: int, message: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("secret")
    (work / "in.txt").write_text("inside")
    (work / "out").mkdir()
    (work / "out" / "link").symlink_to(outside)
    (work / "leaf").symlink_to(outside / "planted")
    (work / "subdir").mkdir()
    request_body = {"source": "path", "path": "in.txt", **body}
    backend = LocalBackend(work)
    backend.counts = Counter()  # type: ignore[attr-defined]  # as the worker's backend has
    with trio.fail_after(10):
        async with serving(work, backend) as path:
            reply = await request(path, "POST", "/resources/fetch", request_body)
    assert reply.status == status, reply.body
    assert message in reply.json["error"]
    assert backend.counts == {f"bridge {status}": 1}  # type: ignore[attr-defined]
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    assert not (tmp_path / "escape.txt").exists()


async def test_network_sources_need_a_network(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            for body in ({"source": "peer", "peer": "12D3Koo", "path": "w.bin", "dest": "w"},
                         {"source": "data", "dataset": "mnist", "slice": 2, "dest": "w"}):
                reply = await request(path, "POST", "/resources/fetch", body)
                assert reply.status == 501
                assert "not available without a network" in reply.json["error"]
            reply = await request(path, "POST", "/resources/send",
                                  {"path": ".hypha/bridge.sock", "peers": ["p"]})
            assert reply.status == 400  # a socket is not a regular file
            (work / "f").write_text("x")
            reply = await request(path, "POST", "/resources/send", {"path": "f", "peers": ["p"]})
            assert reply.status == 501
            assert "not available without a network" in reply.json["error"]


@pytest.mark.parametrize(("body", "message"), [
    (b"{not json", "request body is not valid JSON"),
    (b"[1, 2]", "expected a JSON object, got list"),
    (b"", "expected a JSON object as the request body"),
    (b"\xff\xfe", "not valid JSON"),
    ({"source": "path", "path": "a"}, "missing 'dest'"),
    ({"source": "ftp", "dest": "a"}, "source must be 'peer', 'data' or 'path'"),
    ({"source": "path", "dest": "a", "colour": 1}, "unknown field(s) 'colour'"),
    ({"source": "path", "dest": "a"}, "source 'path' needs a 'path'"),
    ({"source": "peer", "dest": "a", "path": "x"}, "needs a 'peer'"),
    ({"source": "data", "dest": "a"}, "needs a 'dataset'"),
    ({"source": "data", "dest": "a", "dataset": "d", "slice": -1}, "non-negative integer"),
    ({"source": "data", "dest": "a", "dataset": "d", "slice": True}, "non-negative integer"),
    ({"source": "path", "dest": 3, "path": "a"}, "dest must be a string"),
    ({"source": "path", "dest": "a", "path": ""}, "path must be a non-empty string"),
])
async def test_malformed_requests_are_refused(work: Path, body: object, message: str) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            reply = await request(path, "POST", "/resources/fetch", body)
    assert reply.status == 400, reply.body
    assert message in reply.json["error"]


async def test_body_size_limit(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            reply = await request(path, "POST", "/resources/fetch", b"x" * (MAX_BODY_BYTES + 1))
            assert reply.status == 413
            assert f"the limit is {MAX_BODY_BYTES}" in reply.json["error"]
            reply = await request(path, "POST", "/resources/fetch",
                                  chunks=[b" " * 16384] * 5)  # no Content-Length
            assert reply.status == 413
            assert "over the limit" in reply.json["error"]
            # exactly at the limit is read and parsed
            pad = {"source": "path", "dest": "a", "pad": ""}
            pad["pad"] = "x" * (MAX_BODY_BYTES - len(json.dumps(pad)))
            reply = await request(path, "POST", "/resources/fetch", pad)
            assert reply.status == 400
            assert "unknown field(s) 'pad'" in reply.json["error"]
            assert (await request(path, "GET", "/health")).status == 200  # still serving


async def test_unknown_routes_and_methods(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            reply = await request(path, "GET", "/nope")
            assert reply.status == 404
            assert "no endpoint '/nope'" in reply.json["error"]
            assert (await request(path, "GET", "/health/")).status == 404
            reply = await request(path, "GET", "/resources/fetch")
            assert reply.status == 405
            assert reply.headers["allow"] == "POST"
            assert "takes POST, not GET" in reply.json["error"]
            reply = await request(path, "DELETE", "/health")
            assert reply.status == 405


@asynccontextmanager
async def two_bridges(tmp_path: Path) -> AsyncIterator[tuple[Path, Path, Path, Path]]:
    loopback = Loopback()
    dirs = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        dirs.append(tmp_path / name)
    with LocalBackend(dirs[0], peer_id="peer-a", loopback=loopback) as a, \
            LocalBackend(dirs[1], peer_id="peer-b", loopback=loopback) as b:
        async with serving(dirs[0], a) as socket_a, serving(dirs[1], b) as socket_b:
            yield dirs[0], socket_a, dirs[1], socket_b


async def test_send_and_receive_between_two_bridges(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with two_bridges(tmp_path) as (dir_a, socket_a, dir_b, socket_b):
            (dir_a / "out").mkdir()
            (dir_a / "out" / "model.bin").write_bytes(b"weights" * 1000)
            async with event_stream(socket_b) as events:
                assert events.status == 200
                assert events.headers["content-type"].startswith("text/event-stream")
                assert await events.next_comment() == "connected"
                for expected in ("incoming/model.bin", "incoming/model-1.bin"):
                    reply = await request(socket_a, "POST", "/resources/send",
                                          {"path": "out/model.bin", "peers": ["peer-b"]})
                    assert (reply.status, reply.json) == (200, {"sent_to": ["peer-b"]})
                    kind, event = await events.next_event()
                    assert kind == "message"
                    assert event == {"path": expected, "peer": "peer-a", "name": "model.bin",
                                     "size": 7000}
                    assert (dir_b / expected).read_bytes() == b"weights" * 1000
                reply = await request(socket_a, "POST", "/resources/send",
                                      {"path": "out/model.bin", "peers": ["peer-b"],
                                       "name": "renamed.bin"})
                assert reply.status == 200
                assert (await events.next_event())[1]["path"] == "incoming/renamed.bin"
            assert sorted(p.name for p in (dir_b / "incoming").iterdir()) == [
                "model-1.bin", "model.bin", "renamed.bin"]


async def test_files_wait_for_a_stream_and_streams_end_with_the_backend(
        tmp_path: Path) -> None:
    loopback = Loopback()
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "f").write_text("early")
    with trio.fail_after(10):
        with LocalBackend(tmp_path / "a", peer_id="a", loopback=loopback) as a:
            b = LocalBackend(tmp_path / "b", peer_id="b", loopback=loopback)
            async with serving(tmp_path / "a", a) as socket_a, \
                    serving(tmp_path / "b", b) as socket_b:
                reply = await request(socket_a, "POST", "/resources/send",
                                      {"path": "f", "peers": ["b"]})
                assert reply.status == 200
                async with event_stream(socket_b, method="GET") as events:
                    assert (await events.next_event())[1]["path"] == "incoming/f"
                    b.close()
                    assert await events.ended()
                reply = await request(socket_a, "POST", "/resources/send",
                                      {"path": "f", "peers": ["b"]})
                assert reply.status == 502  # b has left the loopback
                assert "not reachable" in reply.json["error"]


async def test_keepalive_comments(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work), keepalive_interval=0.05) as path:
            async with event_stream(path) as events:
                assert await events.next_comment() == "connected"
                assert await events.next_comment() == "keepalive"
                assert await events.next_comment() == "keepalive"


async def test_open_streams_are_cut_when_the_bridge_stops(work: Path) -> None:
    """Cancelling the bridge closes the connection without the final chunk, so a client sees
    an error ("the bridge went away"), not a clean end ("no more files")."""
    stopped = trio.CancelScope()
    cut = False

    async def bridge(task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        with stopped:
            await JobBridge(work, LocalBackend(work), job_id="j").serve(task_status=task_status)

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            path = await nursery.start(bridge)
            async with event_stream(path) as events:
                assert await events.next_comment() == "connected"
                stopped.cancel()
                with pytest.raises(h11.RemoteProtocolError, match="incomplete chunked read"):
                    await events.ended()
                cut = True
    assert cut
    assert not path.exists()


async def test_send_strategies_over_the_bridge(tmp_path: Path) -> None:
    with trio.fail_after(10):
        async with two_bridges(tmp_path) as (dir_a, socket_a, dir_b, _):
            (dir_a / "f").write_text("x")

            async def send(**body: Any) -> Any:
                return await request(socket_a, "POST", "/resources/send", {"path": "f", **body})

            reply = await send(peers=["ghost", "peer-b"], strategy="one")
            assert (reply.status, reply.json) == (200, {"sent_to": ["peer-b"]})
            reply = await send(peers=["peer-b", "ghost"], strategy="all")
            assert reply.status == 502
            assert reply.json["sent_to"] == ["peer-b"]
            assert list(reply.json["failed"]) == ["ghost"]
            assert "sent to 1 of 2 peers" in reply.json["error"]
            reply = await send(peers=["ghost"], strategy="random")
            assert reply.status == 502
            assert "no peer could be reached: ghost" in reply.json["error"]
            assert len(list((dir_b / "incoming").iterdir())) == 2


@pytest.mark.parametrize(("body", "status", "message"), [
    ({"path": "missing", "peers": ["p"]}, 404, "does not exist in the work directory"),
    ({"path": "d", "peers": ["p"]}, 400, "is not a regular file"),
    ({"path": "../f", "peers": ["p"]}, 400, "'..' component"),
    ({"path": "f", "peers": []}, 400, "peers must be a non-empty list"),
    ({"path": "f", "peers": "p"}, 400, "peers must be a non-empty list"),
    ({"path": "f", "peers": [""]}, 400, "peers must be a non-empty list"),
    ({"path": "f", "peers": ["p"] * 1025}, 400, "at most 1024 peers"),
    ({"path": "f", "peers": ["p"], "strategy": "some"}, 400, "strategy must be one of"),
    ({"path": "f", "peers": ["p"], "name": "a/b"}, 400, "must be a plain file name"),
    ({"peers": ["p"]}, 400, "missing 'path'"),
])
async def test_send_refuses_bad_requests(tmp_path: Path, body: dict[str, object], status: int,
                                         message: str) -> None:
    with trio.fail_after(10):
        async with two_bridges(tmp_path) as (dir_a, socket_a, _, _):
            (dir_a / "f").write_text("x")
            (dir_a / "d").mkdir()
            reply = await request(socket_a, "POST", "/resources/send", body)
    assert reply.status == status, reply.body
    assert message in reply.json["error"]


class _ScriptedBackend:
    """A backend whose fetch raises a given error, or blocks until cancelled."""

    def __init__(self, error: BaseException | None) -> None:
        self.error = error
        self.cancelled = trio.Event()
        self.started = trio.Event()

    async def fetch(self, request: FetchRequest, dest: Path) -> int:
        self.started.set()
        if self.error is not None:
            raise self.error
        try:
            await trio.sleep_forever()
        finally:
            self.cancelled.set()
        return 0

    async def send(self, path: Path, peers: list[str], strategy: str, name: str) -> list[str]:
        raise BridgeError(501, "no sending here")

    async def incoming(self) -> AsyncIterator[IncomingFile]:
        raise BridgeError(503, "the network is down")
        yield  # pragma: no cover


@pytest.mark.parametrize(("error", "status", "message"), [
    (BridgeError(502, "peer hung up"), 502, "peer hung up"),
    (FileNotFoundError(2, "No such file", "w.bin"), 404, "not found: w.bin"),
    (BridgeError(501, "no datasets here"), 501, "no datasets here"),
    (TimeoutError("peer too slow"), 504, "peer too slow"),
    (trio.TooSlowError(), 504, "timed out"),
    (PermissionError(13, "denied", "x"), 403, "permission denied: x"),
    (RuntimeError("bug"), 500, "internal error: RuntimeError: bug"),
])
async def test_backend_errors_map_to_statuses(work: Path, error: BaseException, status: int,
                                              message: str) -> None:
    fetch = {"source": "peer", "peer": "p", "path": "w.bin", "dest": "w.bin"}
    with trio.fail_after(10):
        async with serving(work, _ScriptedBackend(error)) as path:
            reply = await request(path, "POST", "/resources/fetch", fetch)
    assert reply.status == status
    assert reply.json["error"] == message


async def test_stream_errors_are_reported_in_the_stream(work: Path) -> None:
    with trio.fail_after(10):
        async with serving(work, _ScriptedBackend(None)) as path:
            async with event_stream(path) as events:
                assert await events.next_event() == ("error", {"error": "the network is down",
                                                               "status": 503})
                assert await events.ended()


async def test_a_client_that_goes_away_cancels_its_fetch(work: Path) -> None:
    backend = _ScriptedBackend(None)
    fetch = {"source": "peer", "peer": "p", "path": "w.bin", "dest": "w.bin"}
    with trio.fail_after(10):
        async with serving(work, backend) as path:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(request, path, "POST", "/resources/fetch", fetch)
                await backend.started.wait()
                nursery.cancel_scope.cancel()  # closes the client's connection
            await backend.cancelled.wait()
            assert (await request(path, "GET", "/health")).status == 200


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_can_talk_to_it(work: Path) -> None:
    (work / "f").write_text("x")
    with trio.fail_after(10):
        async with serving(work, LocalBackend(work)) as path:
            result = await trio.run_process(
                ["curl", "-s", "--unix-socket", str(path), "-H", "Content-Type: application/json",
                 "-d", '{"source": "path", "path": "f", "dest": "g"}',
                 "http://bridge/resources/fetch"], capture_stdout=True,
                stderr=subprocess.STDOUT)
    assert json.loads(result.stdout) == {"path": "g", "size": 1}


async def test_deliver_strategies() -> None:
    tried: list[str] = []

    async def send_one(peer: str) -> None:
        tried.append(peer)
        if peer.startswith("bad"):
            raise ConnectionError(f"{peer} is down")

    assert await deliver(["a", "b", "c"], "all", send_one) == ["a", "b", "c"]
    assert sorted(tried) == ["a", "b", "c"]
    tried.clear()
    assert await deliver(["bad1", "a", "b"], "one", send_one) == ["a"]
    assert tried == ["bad1", "a"]
    picks = {(await deliver(["a", "b", "c"], "random", send_one, rng=random.Random(seed)))[0]
             for seed in range(20)}
    assert picks == {"a", "b", "c"}
    with pytest.raises(BridgeError) as caught:
        await deliver(["bad1", "bad2"], "random", send_one)
    assert caught.value.status == 502
    assert caught.value.details["failed"] == {"bad1": "ConnectionError: bad1 is down",
                                              "bad2": "ConnectionError: bad2 is down"}
    with pytest.raises(BridgeError, match="strategy must be one of"):
        await deliver(["a"], "broadcast", send_one)
    with pytest.raises(BridgeError, match="no peers"):
        await deliver([], "all", send_one)
