"""Files a peer serves, in one process: the scheduler serves ``[job] files`` to the workers it
leases, a process job fetches them through its job bridge (``source: "peer"``), and every path
that leaves the served directory, or names nothing, is refused with the reason."""

from __future__ import annotations

import hashlib
import json
import random
import sys
import textwrap
from contextlib import AsyncExitStack
from pathlib import Path

import pytest
import trio
from libp2p.peer.id import ID

from hypha.executors import BridgeError, FetchRequest
from hypha.executors.network import ANNOUNCE_WAIT, NetworkBackend, StreamRouter
from hypha.files import FileServer
from hypha.messages import PROTOCOLS, FetchFile, encode
from hypha.net import Network, RemoteError, open_network
from hypha.scheduler.allocator import Requirements
from hypha.scheduler.node import SchedulerNode
from hypha.worker.arbiter import Pricing
from tests.integration._market import (
    SMALL,
    TRAIN,
    start_hub,
    start_worker,
    wait_connected,
    wait_subscribed,
)
from tests.unit.messages._samples import PEER, PEER2
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
FLEXIBLE = Pricing("flexible", 1.0, 0.5)
WEIGHTS = 5 << 20

#: Fetches two files the scheduler serves and checks them; then paths that must be refused.
#: argv: a JSON file of {served path: SHA-256}.
FETCHING_JOB = """
import hashlib, json, os, sys
sys.path.insert(0, {examples!r})
from bridge_client import BridgeClient, BridgeError

digests = json.load(open(sys.argv[1]))
job = json.load(open(os.environ["HYPHA_JOB_JSON"]))
peer = job["config"]["files_peer"]
assert peer == job["scheduler"], job
bridge = BridgeClient(timeout=60)

for path, dest in (("weights.bin", "model/weights.bin"), ("nested/sub/config.json", "config.json")):
    reply = bridge.fetch(dest, source="peer", peer=peer, path=path)
    data = open(dest, "rb").read()
    assert reply["size"] == len(data), (reply, len(data))
    assert hashlib.sha256(data).hexdigest() == digests[path], path

def refused(status, reason, path):
    try:
        bridge.fetch("refused/file.bin", source="peer", peer=peer, path=path)
    except BridgeError as error:
        assert error.status == status and reason in error.message, (path, error)
        print("refused", path, error.status, error.message)
    else:
        raise SystemExit(f"not refused: {{path}}")
    assert not os.path.exists("refused"), path

refused(400, "contains a '..' component", "../secret")
refused(400, "is absolute", "/etc/passwd")
refused(403, "resolves outside the served directory", "escape")
refused(403, "resolves outside the served directory", "nested/escape/secret")
refused(404, "there is no file 'missing.bin' in the served directory", "missing.bin")
refused(400, "'nested' is not a regular file", "nested")
print("fetched and refused as expected")
"""


def served(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A served directory: 5 MiB of random weights, a nested file, and symlinks out of it to a
    secret beside it."""
    root = tmp_path / "served"
    (root / "nested" / "sub").mkdir(parents=True)
    (root / "weights.bin").write_bytes(random.Random(7).randbytes(WEIGHTS))
    (root / "nested" / "sub" / "config.json").write_text(json.dumps({"lr": 3e-4}))
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "secret").write_text("not to be served")
    (root / "escape").symlink_to(secret / "secret")
    (root / "nested" / "escape").symlink_to(secret)
    digests = {p: hashlib.sha256((root / p).read_bytes()).hexdigest()
               for p in ("weights.bin", "nested/sub/config.json")}
    return root, digests


async def _node(stack: AsyncExitStack, pki: PKI, hub: Network, name: str) -> Network:
    _, files = pki.node(name)
    return await stack.enter_async_context(
        open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))


async def test_a_job_fetches_the_files_its_scheduler_serves(pki: PKI, tmp_path: Path) -> None:
    root, digests = served(tmp_path)
    (tmp_path / "digests.json").write_text(json.dumps(digests))
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(FETCHING_JOB.format(examples=str(EXAMPLES))))
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        worker = await start_worker(
            stack, nursery, pki, hub, "w", FLEXIBLE, work_dir=tmp_path / "work",
            command=[sys.executable, str(job), str(tmp_path / "digests.json")])
        scheduler = SchedulerNode(await _node(stack, pki, hub, "sched"),
                                  Requirements(SMALL, TRAIN, 2.0, 3.0), workers=1,
                                  files=root)
        intruder = await _node(stack, pki, hub, "intruder")
        with trio.fail_after(90):
            await wait_connected(worker.net, scheduler.net, intruder, hub=hub)
            await wait_subscribed(hub, [worker.net], [scheduler.net])
            await nursery.start(scheduler.run)
            # a peer the scheduler holds no lease on is refused, whatever it asks for
            with pytest.raises(RemoteError, match=f"forbidden: peer {intruder.peer_id} may not "
                                                  "fetch files from this node"):
                await intruder.request(scheduler.net.peer_id, PROTOCOLS["file-fetch"],
                                       encode(FetchFile(path="weights.bin")))
            await scheduler.finished.wait()
        assert not scheduler.failed, {s.state: s.message for s in scheduler.statuses.values()}
        files = scheduler.files
        assert files is not None
        assert files.files_sent == 2 and files.bytes_sent == WEIGHTS + len(
            (root / "nested" / "sub" / "config.json").read_bytes())
        assert files.transfers_failed == 0 and files.refused == 7
        assert worker.node.jobs.data_counts["files fetched"] == 2
        nursery.cancel_scope.cancel()


async def test_a_fetch_checks_what_it_receives(pki: PKI, tmp_path: Path) -> None:
    """At the backend level: a file whose bytes do not match the announced SHA-256 is not
    written; a busy server answers 503; a peer serving nothing, 502."""
    root, digests = served(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        server_net = await _node(stack, pki, hub, "server")
        worker_net = await _node(stack, pki, hub, "worker")
        server = FileServer(server_net, root, max_transfers=1)
        await nursery.start(server.run)
        router = StreamRouter()
        router.install(worker_net)
        backend = NetworkBackend(worker_net, router, job_id="0" * 32, scheduler=hub.peer_id,
                                 work_dir=work)
        await nursery.start(backend.run)

        def fetch(path: str, dest: str, peer: Network = server_net) -> FetchRequest:
            return FetchRequest(source="peer", dest=dest, path=path, peer=str(peer.peer_id))

        with trio.fail_after(60):
            await wait_connected(server_net, worker_net, hub=hub)
            size = await backend.fetch(fetch("weights.bin", "w.bin"), work / "w.bin")
            assert size == WEIGHTS
            assert hashlib.sha256((work / "w.bin").read_bytes()).hexdigest() == digests[
                "weights.bin"]
            # the server announces a digest the bytes do not have (as if the file changed)
            [key] = [k for k, v in server._digests.items() if v == digests["weights.bin"]]
            server._digests[key] = "0" * 64
            with pytest.raises(BridgeError) as corrupt:
                await backend.fetch(fetch("weights.bin", "bad.bin"), work / "bad.bin")
            assert corrupt.value.status == 502, corrupt.value.message
            assert "does not match the announced" in corrupt.value.message
            assert not (work / "bad.bin").exists()
            assert [p.name for p in work.iterdir() if p.name != ".hypha"] == ["w.bin"]
            while server._active:  # the failed transfer ends on the server too
                await trio.sleep(0.01)
            # busy: every transfer slot is taken
            server._active = server.max_transfers
            with pytest.raises(BridgeError) as busy:
                await backend.fetch(fetch("weights.bin", "busy.bin"), work / "busy.bin")
            assert busy.value.status == 503 and "busy: 1 transfers in progress" in \
                busy.value.message, busy.value.message
            server._active = 0
            # a peer that serves no files (the hub) cannot answer
            with pytest.raises(BridgeError) as nobody:
                await backend.fetch(fetch("weights.bin", "x.bin", hub), work / "x.bin")
            assert nobody.value.status == 502, nobody.value.message
        # NOTE: the stream itself was intact: only the requester knows the file was not
        assert server.files_sent == 2 and server.transfers_failed == 0 and router.refused == 0
        await backend.aclose()
        nursery.cancel_scope.cancel()


class _Incoming:
    """Enough of an IncomingTensorStream for the router."""

    def __init__(self, peer: ID, name: str) -> None:
        self.peer = peer
        self.name = name
        self.refused: str | None = None

    async def refuse(self, reason: str) -> None:
        self.refused = reason


async def test_a_fetched_files_stream_waits_for_the_fetch_to_learn_its_name(
        autojump_clock: trio.abc.Clock) -> None:
    """The server may open the stream before the requester has read its answer: the router
    holds it while a fetch from that peer waits for its answer, and no longer."""
    router = StreamRouter()
    peer, other = ID.from_base58(PEER), ID.from_base58(PEER2)
    early, stray = _Incoming(peer, "file-fetch:aa"), _Incoming(peer, "file-fetch:bb")
    async with trio.open_nursery() as nursery:
        with router.expect_announced(peer, "file-fetch:") as expected:
            nursery.start_soon(router.handle, early)
            nursery.start_soon(router.handle, stray)
            await trio.sleep(1)
            # a stream from another peer is not held for this fetch
            elsewhere = _Incoming(other, "file-fetch:aa")
            await router.handle(elsewhere)  # type: ignore[arg-type]
            assert elsewhere.refused is not None and "no fetch of" in elsewhere.refused
            assert early.refused is None and stray.refused is None
            expected.announce("file-fetch:aa")
            assert await expected.wait() is early  # type: ignore[comparison-overlap]
            await trio.sleep(0)
            assert stray.refused is not None and "no fetch of 'file-fetch:bb'" in stray.refused
            with pytest.raises(ValueError, match="once"):
                expected.announce("file-fetch:aa")
        # a fetch that never learns its name holds a stream for ANNOUNCE_WAIT at most
        with router.expect_announced(peer, "file-fetch:"):
            late = _Incoming(peer, "file-fetch:cc")
            start = trio.current_time()
            await router.handle(late)  # type: ignore[arg-type]
            assert trio.current_time() - start == pytest.approx(ANNOUNCE_WAIT)
            assert late.refused is not None
    assert router.refused == 3 and not router._unnamed and not router._expected
