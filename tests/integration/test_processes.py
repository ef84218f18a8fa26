"""The market with real OS processes: a gateway, workers and schedulers, as users run them.

Each node is ``python -m hypha.<role> run`` with its settings in ``HYPHA_*`` variables and flags;
the tests read what happened from the nodes' logs (the lines a user reads too).
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import trio

from hypha.certutil import load_certificates
from hypha.net import peer_id_from_certificate
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(240)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Node:
    name: str
    proc: trio.Process
    lines: list[str] = field(default_factory=list)
    peer_id: str = ""
    _buf: str = ""

    async def pump(self) -> None:
        assert self.proc.stderr is not None
        while True:
            data = await self.proc.stderr.receive_some(65536)
            if not data:
                return
            self._buf += data.decode(errors="replace")
            *done, self._buf = self._buf.split("\n")
            self.lines.extend(done)

    async def wait_for(self, pattern: str, *, count: int = 1) -> list[re.Match[str]]:
        regex = re.compile(pattern)
        while True:
            found = [m for m in (regex.search(line) for line in self.lines) if m]
            if len(found) >= count:
                return found
            if self.proc.returncode is not None:
                raise AssertionError(f"{self.name} exited {self.proc.returncode} before "
                                     f"{pattern!r}:\n" + "\n".join(self.lines[-40:]))
            await trio.sleep(0.05)

    def log(self) -> str:
        return "\n".join(self.lines[-60:])


class Cluster:
    def __init__(self, pki: PKI, tmp: Path, nursery: trio.Nursery) -> None:
        self.pki = pki
        self.tmp = tmp
        self.nursery = nursery
        self.nodes: list[Node] = []

    def env(self, name: str) -> dict[str, str]:
        _, files = self.pki.node(name)
        return {**os.environ, "HYPHA_NO_EXTENSION": "1", "PYTHONUNBUFFERED": "1",
                "HYPHA_TLS_CERT": str(files.cert), "HYPHA_TLS_KEY": str(files.key),
                "HYPHA_TLS_TRUST": str(files.trust), "HYPHA_TLS_CRL": str(self.pki.crl)}

    async def start(self, role: str, name: str, *args: str) -> Node:
        env = self.env(name)
        cmd = [sys.executable, "-m", f"hypha.{role}", "run", "--listen", "/ip4/127.0.0.1/tcp/0",
               *args]
        proc = await self.nursery.start(lambda **kw: trio.run_process(
            cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE, check=False, **kw))
        node = Node(name, proc)
        node.peer_id = str(peer_id_from_certificate(
            load_certificates(self.pki.directory / f"{name}.pem")[0]))
        self.nursery.start_soon(node.pump)
        self.nodes.append(node)
        return node

    async def gateway(self) -> str:
        node = await self.start("gateway", "gateway")
        [match] = await node.wait_for(r"peers bootstrap from: (\S+)")
        return match.group(1)

    async def worker(self, gateway: str, name: str, *, price: float, strategy: str = "flexible",
                     floor: float = 0.5) -> Node:
        job = self.tmp / "job.py"  # the job: runs until stopped
        job.write_text("import time\ntime.sleep(600)\n")
        args = ["--network-bootstrap", gateway, "--executor-command", sys.executable, str(job),
                "--pricing-price", str(price), "--pricing-strategy", strategy,
                "--pricing-floor", str(floor), "--jobs-work-dir", str(self.tmp / name),
                "--jobs-batch-window", "0.05"]
        node = await self.start("worker", name, *args)
        await node.wait_for(r"bootstrapped from")
        return node

    async def scheduler(self, gateway: str, name: str, *args: str) -> Node:
        return await self.start("scheduler", name, "--network-bootstrap", gateway,
                                "--job-cpu", "1", "--job-memory", "64MiB",
                                "--job-storage", "1MiB", *args)

    async def stop_all(self) -> None:
        """SIGTERM every node (a clean stop: workers stop their jobs), SIGKILL what lingers."""
        live = [n for n in self.nodes if n.proc.returncode is None]
        for node in live:
            node.proc.send_signal(signal.SIGTERM)
        with trio.CancelScope(shield=True), trio.move_on_after(15):
            for node in live:
                await node.proc.wait()
        for node in live:
            if node.proc.returncode is None:
                node.proc.send_signal(signal.SIGKILL)


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie nobody reaped yet counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


async def _scrape(url: str) -> str:
    return await trio.to_thread.run_sync(
        lambda: urllib.request.urlopen(url, timeout=10).read().decode())


def _leases(node: Node) -> dict[str, float]:
    """worker peer id -> price, from the scheduler's 'leased ... from X at P/h' lines."""
    out = {}
    for line in node.lines:
        m = re.search(r"leased .* from (\S+) at ([0-9.]+)/h", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


async def test_processes_allocate_expire_and_replace(pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(pki, tmp_path, nursery)
        try:
            with trio.fail_after(180):
                gateway = await cluster.gateway()
                workers = {
                    "cheap": await cluster.worker(gateway, "cheap", price=1.0),
                    "fair": await cluster.worker(gateway, "fair", price=1.5),
                    "whole": await cluster.worker(gateway, "whole", price=2.5, strategy="whole"),
                    "dear": await cluster.worker(gateway, "dear", price=5.0),
                }
                sched = await cluster.scheduler(
                    gateway, "sched", "--job-workers", "3", "--job-bid", "2",
                    "--job-max-price", "3", "--job-lease-ttl", "3", "--metrics-port", "0")
                await sched.wait_for(r"job \S+ on \S+: running", count=3)
                # the scheduler's Prometheus metrics show the three leased workers
                [url] = await sched.wait_for(r"metrics at (http://\S+)")
                body = await _scrape(url.group(1))
                workers_by_state = re.findall(r'hypha_scheduler_workers\{state="\w+"\} (\S+)',
                                              body)
                assert sum(map(float, workers_by_state)) == 3.0, body
                leases = _leases(sched)
                ids = {name: node.peer_id for name, node in workers.items()}
                # 3 of 4 at the right prices: flexible at the bid, whole at max(bid, price)
                assert leases == {ids["cheap"]: 2.0, ids["fair"]: 2.0, ids["whole"]: 2.5}, \
                    sched.log()
                # the dear worker (price 5 > bid 2) never offered
                assert not [ln for ln in workers["dear"].lines if "offered" in ln]

                # a worker dies: the scheduler notices at the next renewal (the only worker left,
                # "dear", will not offer at the bid, so it keeps advertising)
                workers["fair"].proc.send_signal(signal.SIGKILL)
                await sched.wait_for(rf"lost job worker {ids['fair']}")

                # the scheduler dies: every worker's lease expires and frees its resources
                sched.proc.send_signal(signal.SIGKILL)
                for name in ("cheap", "whole"):
                    await workers[name].wait_for(r"lease \S+ of scheduler \S+ expired: freeing")
        finally:
            await cluster.stop_all()


async def test_a_dead_worker_is_replaced_by_a_new_lease(pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(pki, tmp_path, nursery)
        try:
            with trio.fail_after(180):
                gateway = await cluster.gateway()
                a = await cluster.worker(gateway, "a", price=1.0)
                b = await cluster.worker(gateway, "b", price=1.2)
                sched = await cluster.scheduler(
                    gateway, "sched", "--job-workers", "1", "--job-bid", "2",
                    "--job-max-price", "3", "--job-lease-ttl", "2")
                await sched.wait_for(r"job \S+ on \S+: running")
                [first] = _leases(sched)
                dead, alive = (a, b) if first == a.peer_id else (b, a)
                job = (await dead.wait_for(r"job \S+: running \(pid (\d+)\)"))[0]
                dead.proc.send_signal(signal.SIGKILL)
                await sched.wait_for(rf"lost job worker {dead.peer_id}")
                # NOTE: a SIGKILLed worker cannot stop its job, which runs in its own session;
                # reap it here (see the closing note of issue 5: no issue covers this yet)
                if _alive(int(job.group(1))):
                    os.killpg(int(job.group(1)), signal.SIGKILL)
                await sched.wait_for(rf"leased .* from {alive.peer_id}")
                await sched.wait_for(rf"job \S+ on {alive.peer_id}: running")
        finally:
            await cluster.stop_all()


async def test_no_offer_below_the_floor_and_one_lease_for_two_competing_schedulers(
        pki: PKI, tmp_path: Path) -> None:
    async with trio.open_nursery() as nursery:
        cluster = Cluster(pki, tmp_path, nursery)
        try:
            with trio.fail_after(180):
                gateway = await cluster.gateway()
                # asks 0.1/h but never goes below 3/h: a bid of 2 gets nothing from it
                proud = await cluster.worker(gateway, "proud", price=0.1, strategy="whole",
                                             floor=3.0)
                # one whole machine that two schedulers both want
                only = await cluster.worker(gateway, "only", price=1.0, strategy="whole")
                low = await cluster.scheduler(gateway, "low", "--job-workers", "1",
                                              "--job-bid", "2", "--job-max-price", "2.5")
                high = await cluster.scheduler(gateway, "high", "--job-workers", "1",
                                               "--job-bid", "2.2", "--job-max-price", "2.5")
                # exactly one of them leases "only" (the better bid when both advertisements
                # fall in one batch of the worker, else the first); the other keeps advertising
                while len(_leases(low)) + len(_leases(high)) < 1:
                    await trio.sleep(0.1)
                # the loser advertises again and gets nothing: the machine is leased whole
                loser = high if _leases(low) else low
                await loser.wait_for(r"advertisement \S+ \(job\): \d+ offer", count=2)
                leases = {**_leases(low), **_leases(high)}
                assert set(leases) == {only.peer_id}, (low.log(), high.log())
                assert len(_leases(low)) + len(_leases(high)) == 1
                # the proud worker saw every advertisement and offered nothing
                assert not [ln for ln in proud.lines if "offered" in ln], proud.log()
                assert proud.peer_id not in leases
        finally:
            await cluster.stop_all()


FETCHER = '''\
import json, os, sys
sys.path.insert(0, {examples!r})
from bridge_client import BridgeClient, BridgeError

job = json.load(open(os.environ["HYPHA_JOB_JSON"]))
bridge = BridgeClient()
got = bridge.fetch("data/slice.safetensors", source="data", dataset=job["config"]["dataset"])
size = os.path.getsize("data/slice.safetensors")
for dest in ("../escape", "/tmp/escape", ".hypha/x"):
    try:
        bridge.fetch(dest, source="data", dataset=job["config"]["dataset"])
    except BridgeError as exc:
        assert 400 <= exc.status < 500, exc
        print("refused", dest, exc.status, exc.message, flush=True)
    else:
        sys.exit("traversal to " + dest + " was allowed")
print("fetched", size, flush=True)
'''


async def test_a_process_job_fetches_a_data_slice_through_the_bridge(pki: PKI,
                                                                     tmp_path: Path) -> None:
    from hypha.data.prepare import prepare_text

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(bytes(range(32, 127)) * 400)
    prepare_text([corpus], "tiny", tmp_path / "datasets", slice_tokens=4096, seq_len=64)
    script = tmp_path / "fetch.py"
    script.write_text(FETCHER.format(examples=str(ROOT / "examples")))
    async with trio.open_nursery() as nursery:
        cluster = Cluster(pki, tmp_path, nursery)
        try:
            with trio.fail_after(180):
                gateway = await cluster.gateway()
                data = await cluster.start("data", "datanode", "--network-bootstrap", gateway,
                                           "--data-datasets", str(tmp_path / "datasets/tiny"))
                await data.wait_for(r"bootstrapped from")
                worker = await cluster.start(
                    "worker", "w", "--network-bootstrap", gateway,
                    "--executor-command", sys.executable, str(script),
                    "--jobs-work-dir", str(tmp_path / "work"), "--jobs-keep-work-dirs")
                sched = await cluster.scheduler(gateway, "sched", "--job-workers", "1",
                                                "--job-bid", "2", "--job-max-price", "3",
                                                "--job-dataset", "tiny")
                await sched.wait_for(r"job \S+ on \S+: finished")
                logs = "\n".join(worker.lines)
                # the scheduler assigned a slice, the data node streamed it, the bridge wrote it
                assert re.search(r"slice \d+ of tiny \(epoch 0, \d+ bytes\) handed over", logs)
                assert "stdout: fetched" in logs, worker.log()
                assert logs.count("stdout: refused") == 3, worker.log()
                # nothing escaped the work directory
                assert not (tmp_path / "escape").exists() and not Path("/tmp/escape").exists()
                [job_dir] = (tmp_path / "work").glob("hypha-*")
                assert (job_dir / "data" / "slice.safetensors").stat().st_size > 0
        finally:
            await cluster.stop_all()
