"""The data path in one process: a data node announces a dataset, the scheduler finds it and hands
out its slices, a process job fetches them through its job bridge (with prefetch), and the
slices of a dead worker go to its replacement. Also: jobs exchanging files over the network."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, cast

import pytest
import trio

from hypha.data import Dataset, DatasetError, SliceState
from hypha.data.node import DataNode, DatasetInfo, dataset_key, open_datasets
from hypha.data.prepare import prepare_text
from hypha.executors import BridgeError
from hypha.executors.network import NetworkBackend, StreamRouter
from hypha.messages import (
    PROTOCOLS,
    DataSliceAssignment,
    DataSliceDone,
    DataSliceRecorded,
    DataSliceRequest,
    JobStatus,
    Message,
    StatusReceived,
    WorkerOffer,
    decode,
    encode,
    new_id,
)
from hypha.net import Network, RemoteError, TensorStreamError, open_network
from hypha.scheduler.node import Held
from hypha.worker.arbiter import Pricing
from tests.integration._market import (
    SMALL,
    TRAIN,
    start_data_node,
    start_hub,
    start_scheduler,
    start_worker,
    wait_connected,
    wait_subscribed,
)
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(180)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
SEQ_LEN = 16
FLEXIBLE = Pricing("flexible", 1.0, 0.5)

#: The job: refused requests first (none may cost a slice), then two slices, each checked
#: against the manifest. argv: manifest, a directory outside the work dir.
FETCHING_JOB = """
import hashlib, json, os, sys
sys.path.insert(0, {examples!r})
from bridge_client import BridgeClient, BridgeError
from safetensors.numpy import load

manifest = json.load(open(sys.argv[1]))
outside = sys.argv[2]
job = json.load(open(os.environ["HYPHA_JOB_JSON"]))
dataset = job["config"]["dataset"]
assert job["config"]["scheduler"] == job["scheduler"], job
bridge = BridgeClient(timeout=60)

def refused(status, **request):
    try:
        bridge.fetch(**request)
    except BridgeError as error:
        assert error.status == status, (request, error)
    else:
        raise SystemExit(f"not refused: {{request}}")

os.symlink(outside, "link")
refused(400, dest="../escape", source="data", dataset=dataset)
refused(400, dest=os.path.join(outside, "abs"), source="data", dataset=dataset)
refused(403, dest="link/slice.safetensors", source="data", dataset=dataset)
refused(403, dest=".hypha/job.json", source="data", dataset=dataset)
refused(400, dest="copy", source="path", path="../../escape")
refused(403, dest="copy", source="path", path=sys.argv[1])
refused(502, dest="copy", source="peer", peer=job["scheduler"], path="weights")  # serves no files
refused(400, dest="x", source="data", dataset="Not A Name")

by_digest = {{s["sha256"]: i for i, s in enumerate(manifest["slices"])}}
got = []
for n in range(2):
    reply = bridge.fetch(f"data/slice-{{n}}.safetensors", source="data", dataset=dataset)
    data = open(reply["path"], "rb").read()
    assert reply["size"] == len(data), reply
    got.append(by_digest[hashlib.sha256(data).hexdigest()])
    tokens = load(data)["tokens"]
    assert tokens.dtype.name == "uint8" and tokens.shape[1] == {seq_len} + 1, tokens.shape
assert got[0] != got[1], got
assert os.listdir(outside) == [], os.listdir(outside)
print("fetched slices", got)
"""

#: Fetches argv[2] slices, each of them checked against the manifest (argv[1]).
EPOCHS_JOB = """
import hashlib, json, os, sys
sys.path.insert(0, {examples!r})
from bridge_client import BridgeClient
manifest = json.load(open(sys.argv[1]))
by_digest = {{s["sha256"]: i for i, s in enumerate(manifest["slices"])}}
dataset = json.load(open(os.environ["HYPHA_JOB_JSON"]))["config"]["dataset"]
bridge = BridgeClient(timeout=60)
got = []
for n in range(int(sys.argv[2])):
    reply = bridge.fetch("data/current.safetensors", source="data", dataset=dataset)
    got.append(by_digest[hashlib.sha256(open(reply["path"], "rb").read()).hexdigest()])
for start in range(0, len(got) - 1, len(by_digest)):  # each epoch: every slice once
    epoch = got[start:start + len(by_digest)]
    assert len(set(epoch)) == len(epoch), got
print("fetched slices", got)
"""

#: Fetches one slice, then trains on it forever.
SLOW_JOB = """
import json, os, sys, time
sys.path.insert(0, {examples!r})
from bridge_client import BridgeClient
job = json.load(open(os.environ["HYPHA_JOB_JSON"]))
BridgeClient(timeout=60).fetch("data/s.safetensors", source="data", dataset=job["config"]["dataset"])
time.sleep(600)
"""


def tiny_dataset(tmp_path: Path, name: str = "tiny", *, slices: int = 7) -> Path:
    """A text dataset of ``slices`` slices (1620 bytes of text)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir(exist_ok=True)
    (corpus / "a.txt").write_text("".join(f"line {i:2d} of the tiny corpus\n" for i in range(60)))
    manifest = prepare_text([corpus], name, tmp_path / "datasets", seq_len=SEQ_LEN,
                            slice_tokens={7: 16 * SEQ_LEN, 2: 64 * SEQ_LEN}[slices])
    assert manifest.num_slices == slices
    return tmp_path / "datasets" / name


def script(tmp_path: Path, name: str, template: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(template.format(examples=str(EXAMPLES), seq_len=SEQ_LEN)))
    return path


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


async def test_a_process_job_fetches_slices_through_its_bridge(pki: PKI, tmp_path: Path) -> None:
    dataset = tiny_dataset(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    job = script(tmp_path, "job.py", FETCHING_JOB)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        data = await start_data_node(stack, nursery, pki, hub, "data", [dataset])
        worker = await start_worker(
            stack, nursery, pki, hub, "w", FLEXIBLE, work_dir=tmp_path / "work",
            command=[sys.executable, str(job), str(dataset / "manifest.json"), str(outside)])
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=3.0, dataset="tiny")
        before = files_under(tmp_path)
        with trio.fail_after(90):
            await wait_connected(data.net, worker.net, scheduler.net, hub=hub)
            await wait_subscribed(hub, [worker.net], [scheduler.net])
            await data.announced.wait()
            await nursery.start(scheduler.run)
            await scheduler.finished.wait()
            tracker = scheduler.tracker
            assert tracker is not None
            while tracker.stats.in_flight:  # the last prefetch is given back with the job's end
                await trio.sleep(0.05)
        statuses = {s.state: s.message for s in scheduler.statuses.values()}
        assert not scheduler.failed, statuses
        assert tracker.n_slices == len(json.loads((dataset / "manifest.json").read_text())[
            "slices"])
        # two slices were used (ASSIGNED, then USED once the job asked for the next one or
        # finished); what the worker prefetched beyond them went back to AVAILABLE
        stats = tracker.stats
        assert stats.used == 2 and stats.used_total == 2, stats
        assert stats.assigned_total - stats.used_total == stats.released_total, stats
        assert [tracker.state(i) for i in range(tracker.n_slices)].count(SliceState.USED) == 2
        assert scheduler.messages["slice used"] == 2
        counts = worker.node.jobs.data_counts
        assert counts["slices fetched"] == 2 and counts["prefetch used"] == 1, counts
        assert counts["slices prefetched"] >= 1, counts
        assert data.slices_sent >= 2 and data.transfers_failed == 0
        # nothing written outside the work dir, and the work dir is gone
        assert files_under(tmp_path) == before
        assert list(outside.iterdir()) == []
        nursery.cancel_scope.cancel()


async def test_a_job_goes_through_epochs_and_waits_for_free_slices(
        pki: PKI, tmp_path: Path) -> None:
    """Two slices, five fetches: the prefetch at the end of an epoch finds none free, the next
    fetch marks the last one used, which starts the next epoch."""
    dataset = tiny_dataset(tmp_path, slices=2)
    job = script(tmp_path, "epochs.py", EPOCHS_JOB)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        data = await start_data_node(stack, nursery, pki, hub, "data", [dataset])
        worker = await start_worker(
            stack, nursery, pki, hub, "w", FLEXIBLE, work_dir=tmp_path / "work",
            command=[sys.executable, str(job), str(dataset / "manifest.json"), "5"])
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=3.0, dataset="tiny")
        with trio.fail_after(90):
            await wait_connected(data.net, worker.net, scheduler.net, hub=hub)
            await wait_subscribed(hub, [worker.net], [scheduler.net])
            await data.announced.wait()
            await nursery.start(scheduler.run)
            await scheduler.finished.wait()
            tracker = scheduler.tracker
            assert tracker is not None
            while tracker.stats.in_flight:
                await trio.sleep(0.05)
        assert not scheduler.failed, [s.message for s in scheduler.statuses.values()]
        stats = tracker.stats
        assert stats.epoch == 2 and stats.used == 1 and stats.used_total == 5, stats
        counts = worker.node.jobs.data_counts
        assert counts["slices fetched"] == 5 and counts["prefetch used"] == 2, counts
        nursery.cancel_scope.cancel()


async def test_a_dead_workers_slices_go_to_its_replacement(pki: PKI, tmp_path: Path) -> None:
    dataset = tiny_dataset(tmp_path)
    job = script(tmp_path, "slow.py", SLOW_JOB)
    command = [sys.executable, str(job)]
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        data = await start_data_node(stack, nursery, pki, hub, "data", [dataset])
        a = await start_worker(stack, nursery, pki, hub, "a", FLEXIBLE, command=command,
                               work_dir=tmp_path / "work")
        b = await start_worker(stack, nursery, pki, hub, "b", Pricing("flexible", 1.2, 0.5),
                               command=command, work_dir=tmp_path / "work")
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=3.0, lease_ttl=2.0, dataset="tiny")
        with trio.fail_after(90):
            await wait_connected(data.net, a.net, b.net, scheduler.net, hub=hub)
            await wait_subscribed(hub, [a.net, b.net], [scheduler.net])
            await data.announced.wait()
            await nursery.start(scheduler.run)
            tracker = await scheduler.find_dataset()
            await scheduler.all_leased.wait()
            [held] = scheduler.held.values()
            first, other = (a, b) if held.worker == a.net.peer_id else (b, a)
            # the job fetched a slice and prefetched the next: both are ASSIGNED to it
            while len(tracker.assigned_to(str(first.net.peer_id))) < 2:
                await trio.sleep(0.05)
            taken = [x.slice for x in tracker.assigned_to(str(first.net.peer_id))]
            # the worker dies holding them
            first.scope.cancel()
            await first.net.aclose()
            while str(first.net.peer_id) not in scheduler.lost:
                await trio.sleep(0.05)
            assert not tracker.assigned_to(str(first.net.peer_id))
            # its replacement gets them first (released slices are first in line)
            while len(tracker.assigned_to(str(other.net.peer_id))) < 2:
                await trio.sleep(0.05)
        assert {x.slice for x in tracker.assigned_to(str(other.net.peer_id))} == set(taken)
        assert all(tracker.state(s) is SliceState.ASSIGNED for s in taken)
        stats = tracker.stats
        assert stats.released_total == 2 and stats.reassigned_total == 2, stats
        assert stats.used_total == 0, stats
        nursery.cancel_scope.cancel()


async def test_the_scheduler_hands_slices_only_to_its_jobs_and_takes_them_back(
        pki: PKI, tmp_path: Path) -> None:
    """At the SchedulerNode level, over RPC: only the worker running a job may ask for its
    slices; a slice reported done is USED; a job that fails gives back what it still holds."""
    dataset = tiny_dataset(tmp_path)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        data = await start_data_node(stack, nursery, pki, hub, "data", [dataset])
        scheduler = await start_scheduler(stack, pki, hub, "sched", workers=1, bid=2.0,
                                          max_price=3.0, dataset="tiny", dispatch=False)
        worker = await _node(stack, pki, hub, "worker")
        intruder = await _node(stack, pki, hub, "intruder")
        scheduler.serve()
        job, lease = new_id(), new_id()
        offer = WorkerOffer(request_id=new_id(), worker=str(worker.peer_id), resources=SMALL,
                            executors=[TRAIN], price=2.0, lease_id=lease, lease_expires=0.0)
        scheduler.held[lease] = Held(worker.peer_id, offer, 0.0, job_id=job, state="dispatched")

        async def call(net: Network, protocol: str, message: Message, reply: type) -> Any:
            with trio.fail_after(10):
                return decode(reply, await net.request(scheduler.net.peer_id,
                                                       PROTOCOLS[protocol], encode(message)))

        with trio.fail_after(60):
            await wait_connected(data.net, scheduler.net, worker, intruder, hub=hub)
            await data.announced.wait()
            tracker = await scheduler.find_dataset()
            ask = DataSliceRequest(job_id=job, dataset="tiny")
            with pytest.raises(RemoteError, match="is not yours"):
                await call(intruder, "data-slice", ask, DataSliceAssignment)
            with pytest.raises(RemoteError, match="uses dataset 'tiny', not 'other'"):
                await call(worker, "data-slice", DataSliceRequest(job_id=job, dataset="other"),
                           DataSliceAssignment)
            first = await call(worker, "data-slice", ask, DataSliceAssignment)
            assert first.provider == str(data.net.peer_id) and first.epoch == 0
            assert tracker.state(first.slice) is SliceState.ASSIGNED
            done = DataSliceDone(job_id=job, dataset="tiny", slice=first.slice, epoch=0)
            with pytest.raises(RemoteError, match="is not yours"):
                await call(intruder, "data-slice-done", done, DataSliceRecorded)
            await call(worker, "data-slice-done", done, DataSliceRecorded)
            assert tracker.state(first.slice) is SliceState.USED
            second = await call(worker, "data-slice", ask, DataSliceAssignment)
            third = await call(worker, "data-slice", ask, DataSliceAssignment)
            # two held at once is the most (the slice being trained on and the prefetched one)
            with pytest.raises(RemoteError, match="already holds 2 slices"):
                await call(worker, "data-slice", ask, DataSliceAssignment)
            await call(worker, "job-status", JobStatus(job_id=job, lease_id=lease,
                                                       state="failed", time=0.0),
                       StatusReceived)
        assert tracker.state(second.slice) is SliceState.AVAILABLE
        assert tracker.state(third.slice) is SliceState.AVAILABLE
        assert tracker.stats.released_total == 2 and tracker.stats.used_total == 1
        nursery.cancel_scope.cancel()


async def test_the_dataset_record_is_in_the_dht(pki: PKI, tmp_path: Path) -> None:
    dataset = tiny_dataset(tmp_path)
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        data = await start_data_node(stack, nursery, pki, hub, "data", [dataset])
        with trio.fail_after(60):
            await wait_connected(data.net, hub=hub)
            await data.announced.wait()
            record = await hub.get(dataset_key("tiny"))
            providers = await hub.find_providers(dataset_key("tiny"))
        assert record is not None
        info = DatasetInfo.from_bytes(record, name="tiny")
        assert info == DatasetInfo.of(next(iter(data.datasets.values())))
        assert data.net.peer_id in {p.peer_id for p in providers}
        with pytest.raises(ValueError, match="names 'tiny'"):
            DatasetInfo.from_bytes(record, name="other")
        nursery.cancel_scope.cancel()


async def _node(stack: AsyncExitStack, pki: PKI, hub: Network, name: str) -> Network:
    _, files = pki.node(name)
    return await stack.enter_async_context(
        open_network(pki.settings(files, bootstrap=(str(hub.addrs[0]),))))


async def test_jobs_of_one_scheduler_send_each_other_files(pki: PKI, tmp_path: Path) -> None:
    """Two workers' backends: a file sent to a peer lands under the receiving job's incoming/;
    a send to a peer that runs no job of that scheduler fails with the reason."""
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        sender_net = await _node(stack, pki, hub, "sender")
        receiver_net = await _node(stack, pki, hub, "receiver")
        scheduler = (await _node(stack, pki, hub, "sched")).peer_id
        backends = {}
        for name, net in (("sender", sender_net), ("receiver", receiver_net)):
            router = StreamRouter()
            router.install(net)
            work_dir = tmp_path / name
            work_dir.mkdir()
            backends[name] = NetworkBackend(net, router, job_id="0" * 32, scheduler=scheduler,
                                            work_dir=work_dir)
            await nursery.start(backends[name].run)
        (tmp_path / "sender" / "delta.bin").write_bytes(b"\x01\x02" * 300_000)
        with trio.fail_after(30):
            await wait_connected(sender_net, receiver_net, hub=hub)
            sent = await backends["sender"].send(tmp_path / "sender" / "delta.bin",
                                                 [str(receiver_net.peer_id)], "all", "delta.bin")
            assert sent == [str(receiver_net.peer_id)]
            files = backends["receiver"].incoming()
            got = await files.__anext__()
            await files.aclose()  # type: ignore[attr-defined]
        assert got.path == (tmp_path / "receiver" / "incoming" / "delta.bin").resolve()
        assert got.peer == str(sender_net.peer_id) and got.size == 600_000
        assert got.path.read_bytes() == b"\x01\x02" * 300_000
        # streams nobody waits for are refused: a slice no fetch asked this peer for, and
        # names the router does not know
        for name, reason in (("slice:tiny:0", "no fetch of 'slice:tiny:0' from you"),
                             ("weights", "takes no tensor stream named 'weights'")):
            with trio.fail_after(30):
                out = await sender_net.open_tensor_stream(receiver_net.peer_id, name)
                with pytest.raises(TensorStreamError, match=reason):
                    await out.close()
        # the receiver's job ends: a second file has nowhere to go
        await backends["receiver"].aclose()
        with trio.fail_after(30), pytest.raises(BridgeError) as refused:
            await backends["sender"].send(tmp_path / "sender" / "delta.bin",
                                          [str(receiver_net.peer_id)], "one", "again.bin")
        assert refused.value.status == 502 and "no job of scheduler" in refused.value.message
        assert not (tmp_path / "receiver" / "incoming" / "again.bin").exists()
        nursery.cancel_scope.cancel()


def test_a_data_node_refuses_names_it_cannot_announce(tmp_path: Path) -> None:
    path = tiny_dataset(tmp_path, "Upper")  # prepare allows upper case; the network does not
    with pytest.raises(DatasetError, match="cannot be announced"):
        open_datasets([path])
    with pytest.raises(ValueError, match="cannot be announced"):
        DataNode(cast(Network, None), [Dataset.open(path)])


async def _read_until(proc: trio.Process, pattern: str, seen: list[str]) -> re.Match[str]:
    assert proc.stderr is not None
    buf = ""
    while True:
        data = await proc.stderr.receive_some(4096)
        if not data:
            raise AssertionError("the data node exited:\n" + "".join(seen) + buf)
        buf += data.decode()
        *lines, buf = buf.split("\n")
        for line in lines:
            seen.append(line + "\n")
            match = re.search(pattern, line)
            if match:
                return match


async def test_the_data_node_process_announces_its_dataset(pki: PKI, tmp_path: Path) -> None:
    """``python -m hypha.data init`` then ``run``, as a user runs it."""
    dataset = tiny_dataset(tmp_path)
    _, files = pki.node("data")
    config = tmp_path / "hypha-data.toml"
    env = {**os.environ, "HYPHA_NO_EXTENSION": "1", "PYTHONUNBUFFERED": "1",
           "HYPHA_TLS_CERT": str(files.cert), "HYPHA_TLS_KEY": str(files.key),
           "HYPHA_TLS_TRUST": str(files.trust)}
    init = subprocess.run([sys.executable, "-m", "hypha.data", "init", "--config", str(config)],
                          cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert init.returncode == 0, init.stderr
    assert "[data]" in config.read_text()
    # without datasets (or a gateway) it refuses to start, with one line saying why
    empty = subprocess.run([sys.executable, "-m", "hypha.data", "run", "--config", str(config),
                            "--network-bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/"
                            "12D3KooWLSbc4xRPraQbYj2Nry7PCgo1tx5XUCXFv4B2ZMv6AvVE"],
                           cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    assert empty.returncode == 2 and "data.datasets is empty" in empty.stderr, empty.stderr
    seen: list[str] = []
    async with trio.open_nursery() as nursery, AsyncExitStack() as stack:
        hub = await start_hub(stack, pki)
        proc = await nursery.start(lambda **kw: trio.run_process(
            [sys.executable, "-m", "hypha.data", "--config", str(config), "--listen",
             "/ip4/127.0.0.1/tcp/0", "--network-bootstrap", str(hub.addrs[0]),
             "--data-datasets", str(dataset)],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, check=False, **kw))
        try:
            with trio.fail_after(60):
                await _read_until(proc, r"announced dataset tiny under /hypha/dataset/tiny", seen)
                record = await hub.get(dataset_key("tiny"))
                providers = await hub.find_providers(dataset_key("tiny"))
            assert record is not None
            assert DatasetInfo.from_bytes(record, name="tiny").num_slices == len(
                Dataset.open(dataset))
            assert len(providers) == 1
        finally:
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode == 0, "".join(seen)
