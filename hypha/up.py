"""``python -m hypha up`` (``make run``): a whole Hypha network on 127.0.0.1, training a GPT.

It starts, as separate OS processes, everything a real deployment has:

* a throw-away PKI made with ``hypha certutil`` (a root, an org, one certificate per node) in a
  temporary directory;
* a gateway (bootstrap address, DHT anchor, relay);
* a data node serving the prepared real-text corpus (the Python standard library's sources, split
  by file into a training set and a held-out evaluation set);
* one worker offering the built-in parameter-server executor, and ``--workers`` training workers
  whose process executor is ``python -m hypha.executors.train``;
* a scheduler with the DiLoCo job: it leases the parameter server and the trainers through the
  market, hands out the data slices and decides when the trainers synchronise.

While it trains, a progress line shows the outer round, the trainers' loss, tokens per second and
the bytes on the wire. After every round it evaluates the parameter server's checkpoint of the
global model on the held-out text. At the end it trains the same model alone, in this process,
for the same number of tokens, and prints both eval losses, the bytes on the wire per worker and
the wall time, and writes a PNG of eval loss against tokens and against bytes.

Everything it started is stopped when it ends, fails or gets Ctrl-C: every node gets SIGTERM
(a worker stops its jobs), then SIGKILL after a grace period, then any process still running
from the run's directory (a job whose worker died) is killed too.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["RunResult", "UpOptions", "main", "run"]

ROLES = ("gateway", "data", "worker", "scheduler")
#: Seconds a node gets between SIGTERM and SIGKILL.
STOP_GRACE = 15.0
#: Seconds to wait for a node's start-up line.
START_TIMEOUT = 90.0
TRAIN_DATASET = "stdlib-train"
EVAL_DATASET = "stdlib-eval"
#: Every EVAL_EVERY-th source file of the corpus is held out for evaluation.
EVAL_EVERY = 20


@dataclass
class UpOptions:
    """What ``python -m hypha up`` runs (its flags)."""

    workers: int = 3
    codec: str = "int2"
    rounds: int = 10
    sync_batches: int = 50
    batch_size: int = 8
    seq_len: int = 64
    model: str = "gpt"
    lr: float = 2e-3
    outer_lr: float = 0.7
    outer_momentum: float = 0.9
    perf_aware: bool = True
    #: worker index (0-based) → slow-down factor (HYPHA_THROTTLE of its jobs)
    throttle: dict[int, float] = field(default_factory=dict)
    corpus: str = "python-stdlib"
    slice_tokens: int = 1 << 16
    eval_sequences: int = 512
    seed: int = 0
    round_timeout: float = 120.0
    baseline: bool = True
    directory: Path | None = None  #: keep everything here (default: a temporary directory)
    plot: Path | None = None  #: default: <directory>/loss.png, or ./hypha-up-loss.png
    json_out: Path | None = None
    progress: bool = True
    timeout: float = 3600.0

    def check(self) -> None:
        from hypha.compress import parse_codec

        positive = {"workers": self.workers, "rounds": self.rounds,
                    "sync_batches": self.sync_batches, "batch_size": self.batch_size,
                    "seq_len": self.seq_len, "eval_sequences": self.eval_sequences}
        for key, value in positive.items():
            if value < 1:
                raise ValueError(f"--{key.replace('_', '-')} must be at least 1, got {value}")
        for key in ("lr", "round_timeout", "timeout"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"--{key.replace('_', '-')} must be positive, got {value}")
        if self.slice_tokens < self.seq_len:
            raise ValueError(f"--slice-tokens {self.slice_tokens} is below --seq-len "
                             f"{self.seq_len}")
        parse_codec(self.codec)
        for index, factor in self.throttle.items():
            if not 0 <= index < self.workers:
                raise ValueError(f"--throttle {index}={factor}: worker index must be in "
                                 f"0..{self.workers - 1}")
            if not (math.isfinite(factor) and factor >= 1):
                raise ValueError(f"--throttle {index}={factor}: the factor must be >= 1")


@dataclass
class RoundPoint:
    round: int
    tokens: int
    bytes_per_worker: float
    eval_loss: float
    wall: float


@dataclass
class RunResult:
    """What a run measured (``--json`` writes it)."""

    options: dict[str, Any]
    eval_loss: float
    baseline_eval_loss: float | None
    tokens: int
    wall_seconds: float
    train_seconds: float
    bytes_sent_per_worker: float
    bytes_received_per_worker: float
    idle_share: dict[str, float]
    rounds: list[RoundPoint]
    baseline_curve: list[tuple[int, float]]
    plot: str | None


class RunFailed(RuntimeError):
    """A node failed or the run did not finish; the message says which and why."""


# ------------------------------------------------------------------------------------------------
# processes


@dataclass
class Node:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def tail(self, lines: int = 20) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def wait_for(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while True:
            found = regex.search(self.text())
            if found:
                return found
            if self.proc.poll() is not None:
                raise RunFailed(f"{self.name} exited with status {self.proc.returncode} before "
                                f"it was ready; its log ({self.log}):\n{self.tail()}")
            if time.monotonic() > deadline:
                raise RunFailed(f"{self.name} was not ready within {timeout:.0f} s; its log "
                                f"({self.log}):\n{self.tail()}")
            time.sleep(0.05)


class Cluster:
    """The run's processes; :meth:`stop` leaves none behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.pki = root / "pki"
        self.logs = root / "logs"
        self.nodes: list[Node] = []

    def make_pki(self, names: Sequence[str]) -> None:
        """A root CA, an org CA (with its empty CRL) and a certificate per node, by running
        ``hypha certutil`` exactly as a user would."""
        from hypha.certutil.__main__ import main as certutil

        self.pki.mkdir(parents=True)
        calls = [["root", "--name", "root", "--out-dir", str(self.pki)],
                 ["org", "--name", "org", "--ca", str(self.pki / "root"),
                  "--out-dir", str(self.pki)]]
        calls += [["node", "-n", name, "--ca", str(self.pki / "org"), "--out-dir", str(self.pki)]
                  for name in names]
        for argv in calls:
            with contextlib.redirect_stdout(io.StringIO()) as said:  # one line per file it wrote
                status = certutil(argv)
            if status != 0:
                raise RunFailed(f"hypha certutil {' '.join(argv)} failed: {said.getvalue()}")

    def config(self, name: str, sections: dict[str, dict[str, list[str]]]) -> Path:
        """A TOML config file for node ``name`` holding the list settings (argument lists are
        awkward as flags: ``-m`` would read as one)."""
        path = self.root / "config" / f"{name}.toml"
        path.parent.mkdir(exist_ok=True)
        lines = []
        for section, values in sections.items():
            lines.append(f"[{section}]")
            lines += [f"{key} = {json.dumps(value)}" for key, value in values.items()]
        path.write_text("\n".join(lines) + "\n")
        return path

    def start(self, role: str, name: str, args: Sequence[str],
              env: dict[str, str] | None = None, *, prefix: Sequence[str] = (),
              host: str = "127.0.0.1") -> Node:
        """Start node ``name`` listening on ``host``. ``prefix`` goes before the command (e.g.
        ``ip netns exec <ns>``, which execs the node: its pid and session stay the node's)."""
        self.logs.mkdir(exist_ok=True)
        log = self.logs / f"{name}.log"
        environment = {**os.environ, "PYTHONUNBUFFERED": "1",
                       "HYPHA_TLS_CERT": str(self.pki / f"{name}.pem"),
                       "HYPHA_TLS_KEY": str(self.pki / f"{name}.key"),
                       "HYPHA_TLS_TRUST": str(self.pki / "root.pem"),
                       "HYPHA_TLS_CRL": str(self.pki / "org.crl.pem"), **(env or {})}
        command = [*prefix, sys.executable, "-m", f"hypha.{role}", "run", "--listen",
                   f"/ip4/{host}/tcp/0", *args]
        with open(log, "wb") as out:
            # NOTE: a session of its own: Ctrl-C in the terminal reaches only this process, which
            # stops the nodes in order instead of all of them at once.
            proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    env=environment, start_new_session=True)
        node = Node(name, proc, log)
        self.nodes.append(node)
        return node

    def peer_names(self) -> dict[str, str]:
        """Peer id → node name, from the certificates."""
        from hypha.certutil import load_certificates
        from hypha.net import peer_id_from_certificate

        return {str(peer_id_from_certificate(load_certificates(pem)[0])): pem.stem
                for pem in self.pki.glob("*.pem")
                if pem.stem not in ("root", "org") and not pem.name.endswith(".crl.pem")}

    def check_alive(self) -> None:
        for node in self.nodes:
            if node.proc.poll() is not None and node.name != "scheduler":
                raise RunFailed(f"{node.name} exited with status {node.proc.returncode}; its "
                                f"log ({node.log}):\n{node.tail()}")

    def stop(self) -> list[str]:
        """SIGTERM every node (the scheduler first, the gateway last), SIGKILL what lingers,
        then kill any process still running from this run's directory. Returns what had to be
        killed."""
        killed: list[str] = []
        # a second Ctrl-C must not cut the clean-up short
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            self._stop(killed)
        finally:
            signal.signal(signal.SIGINT, previous)
        return killed

    def _stop(self, killed: list[str]) -> None:
        for node in reversed(self.nodes):
            if node.proc.poll() is None:
                _signal_group(node.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE
        for node in reversed(self.nodes):
            try:
                node.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                killed.append(node.name)
                _signal_group(node.proc.pid, signal.SIGKILL)
                node.proc.wait()
        for pid in _processes_under(self.root):
            killed.append(f"pid {pid}")
            _signal_group(pid, signal.SIGKILL, own_group=False)


def _signal_group(pid: int, sig: int, *, own_group: bool = True) -> None:
    try:
        if own_group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _processes_under(root: Path) -> list[int]:
    """Processes of this user whose command line or working directory is under ``root``."""
    found = []
    me = os.getpid()
    marker = str(root.resolve()) + os.sep  # worker-1/ is not worker-10/
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                errors="replace")
            cwd = os.readlink(entry / "cwd")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and (marker in cmdline or (cwd + os.sep).startswith(marker)):
            found.append(int(entry.name))
    return found


class LocalNetwork:
    """The nodes of a local DiLoCo run in ``cluster`` (see the module doc): :meth:`prepare` the
    PKI and the data, :meth:`start` the gateway, the data node, the parameter server's worker
    and the trainers, then :meth:`start_scheduler`. ``spare_ps`` more workers offer the
    parameter-server executor (replacements); :meth:`add_trainer` starts another training
    worker at any time; :meth:`kill` kills a node as a machine dies (its jobs too). The
    scheduler keeps the parameter server's checkpoint in :attr:`checkpoint_dir`.

    ``placement`` (node name → (command prefix, listen host), or ``None``) puts a node
    elsewhere, e.g. in a network namespace of its own; by default every node runs here and
    listens on 127.0.0.1."""

    def __init__(self, options: UpOptions, cluster: Cluster, *, spare_ps: int = 0,
                 lease_ttl: float = 10.0, extra_trainers: int = 0,
                 initial_trainers: int | None = None,
                 placement: Callable[[str], tuple[Sequence[str], str] | None] | None = None,
                 ) -> None:
        self.placement = placement
        self.options = options
        self.cluster = cluster
        self.root = cluster.root
        self.lease_ttl = lease_ttl
        self.ps_names = ["ps", *(f"ps-{i + 1}" for i in range(spare_ps))]
        self.trainers = [f"worker-{i}" for i in range(options.workers + extra_trainers)]
        self.names = ["gateway", "data", *self.ps_names, *self.trainers, "scheduler"]
        self.metrics_log = self.root / "metrics.jsonl"
        self.checkpoint_dir = self.root / "checkpoints"
        self.train_dir = self.root / "datasets" / TRAIN_DATASET
        self.eval_dir = self.root / "datasets" / EVAL_DATASET
        self.nodes: dict[str, Node] = {}
        self.bootstrap = ""
        #: training workers :meth:`start` starts (the others: :meth:`add_trainer`)
        self.initial_trainers = options.workers if initial_trainers is None else initial_trainers

    @property
    def checkpoint(self) -> Path:
        return self.checkpoint_dir / "checkpoint.pt"

    def prepare(self) -> None:
        self.cluster.make_pki(self.names)
        prepare_data(self.options, self.root / "datasets")

    def start(self) -> None:
        gateway = self._start("gateway", "gateway", [])
        self.bootstrap = gateway.wait_for(r"peers bootstrap from: (\S+)").group(1)
        data = self._start("data", "data", ["--network-bootstrap", self.bootstrap,
                                            "--data-datasets", str(self.train_dir),
                                            str(self.eval_dir)])
        data.wait_for(rf"announced dataset {TRAIN_DATASET}\b")
        started = [self.start_ps(name) for name in self.ps_names]
        started += [self.add_trainer(name, wait=False)
                    for name in self.trainers[:self.initial_trainers]]
        for node in started:
            node.wait_for(r"bootstrapped from")

    def _worker_args(self, name: str) -> list[str]:
        (self.root / name).mkdir(exist_ok=True)
        return ["--network-bootstrap", self.bootstrap, "--jobs-batch-window", "0.05",
                "--pricing-price", "1", "--pricing-strategy", "flexible",
                "--jobs-work-dir", str(self.root / name)]

    def start_ps(self, name: str) -> Node:
        return self._start("worker", name, [*self._worker_args(name),
                                            "--executor-parameter-server"])

    def add_trainer(self, name: str, *, wait: bool = True) -> Node:
        """Start training worker ``name`` (one of :attr:`trainers`)."""
        index = self.trainers.index(name)
        config = self.cluster.config(name, {"executor": {
            "command": [sys.executable, "-m", "hypha.executors.train", "{JOB_JSON}"],
            "env": ["OMP_NUM_THREADS=1",
                    f"HYPHA_THROTTLE={self.options.throttle.get(index, 1.0)}"]}})
        node = self._start("worker", name, ["--config", str(config), *self._worker_args(name)])
        if wait:
            node.wait_for(r"bootstrapped from")
        return node

    def start_scheduler(self) -> Node:
        o = self.options
        settings = {"model": o.model, "model_seed": o.seed, "codec": o.codec,
                    "batch_size": o.batch_size, "lr": o.lr, "outer_lr": o.outer_lr,
                    "outer_momentum": o.outer_momentum}
        return self._start("scheduler", "scheduler", [
            "--network-bootstrap", self.bootstrap, "--job-workers", str(o.workers),
            "--job-parameter-server", "--job-cpu", "0.1", "--job-memory", "64MiB",
            "--job-storage", "1MiB", "--job-ps-cpu", "0.1", "--job-ps-memory", "64MiB",
            "--job-ps-storage", "1MiB", "--job-dataset", TRAIN_DATASET,
            "--job-rounds", str(o.rounds), "--job-sync-batches", str(o.sync_batches),
            "--job-perf-aware" if o.perf_aware else "--no-job-perf-aware",
            "--job-round-timeout", str(o.round_timeout), "--job-metrics-log",
            str(self.metrics_log), "--job-checkpoint-dir", str(self.checkpoint_dir),
            "--job-lease-ttl", str(self.lease_ttl),
            "--config", str(self.cluster.config("scheduler", {"job": {
                "settings": [f"{k}={v}" for k, v in settings.items()]}}))])

    def _start(self, role: str, name: str, args: list[str]) -> Node:
        placed = self.placement(name) if self.placement is not None else None
        prefix, host = placed if placed is not None else ((), "127.0.0.1")
        node = self.cluster.start(role, name, args, prefix=prefix, host=host)
        self.nodes[name] = node
        return node

    def kill(self, name: str) -> None:
        """SIGKILL node ``name`` and every process of its jobs, as when its machine dies."""
        node = self.nodes[name]
        _signal_group(node.proc.pid, signal.SIGKILL)
        node.proc.wait()
        for pid in _processes_under(self.root / name):
            _signal_group(pid, signal.SIGKILL, own_group=False)


# ------------------------------------------------------------------------------------------------
# data, evaluation, the baseline


def prepare_data(options: UpOptions, out: Path) -> tuple[Path, Path]:
    """The corpus as two datasets: every EVAL_EVERY-th file held out for evaluation."""
    from hypha.data.prepare import builtin_corpus_files, prepare_text

    files = builtin_corpus_files(options.corpus)
    held = files[EVAL_EVERY - 1::EVAL_EVERY]
    train = [f for f in files if f not in set(held)]
    prepare_text(train, TRAIN_DATASET, out, slice_tokens=options.slice_tokens,
                 seq_len=options.seq_len)
    prepare_text(held, EVAL_DATASET, out, slice_tokens=options.slice_tokens,
                 seq_len=options.seq_len)
    return out / TRAIN_DATASET, out / EVAL_DATASET


class Evaluator:
    """Mean cross-entropy (nats per byte) of a model on fixed held-out sequences."""

    def __init__(self, options: UpOptions, eval_dir: Path) -> None:
        import torch

        from hypha.data.slices import Dataset

        dataset = Dataset.open(eval_dir)
        tokens = torch.cat([dataset.slice(i)["tokens"] for i in range(len(dataset))])
        count = min(options.eval_sequences, len(tokens))
        picks = torch.linspace(0, len(tokens) - 1, count).long()
        self.sequences = tokens[picks].long()
        self.options = options

    def loss(self, model: Any) -> float:
        import torch

        model.eval()
        total = 0.0
        with torch.no_grad():
            for batch in self.sequences.split(128):
                x, y = batch[:, :-1], batch[:, 1:]
                total += float(_loss(model, x, y)) * len(batch)
        model.train()
        return total / len(self.sequences)


def _loss(model: Any, x: Any, y: Any) -> Any:
    import torch.nn.functional as F

    if hasattr(model, "loss"):
        return model.loss(x, y)
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten())


def _model(options: UpOptions) -> Any:
    import torch

    from hypha.models import load_model

    torch.manual_seed(options.seed)
    return load_model(options.model)


def load_checkpoint(path: Path, options: UpOptions) -> tuple[Any, int]:
    """The parameter server's global model from its checkpoint, and the round it is at."""
    import torch

    from hypha.models import training_parameters
    from hypha.optim import OuterServer

    model = _model(options)
    params = training_parameters(model)
    server = OuterServer.load(path, [p.detach() for p in params], codec=options.codec,
                              outer_lr=options.outer_lr, outer_momentum=options.outer_momentum)
    with torch.no_grad():
        for p, g in zip(params, server.global_tensors(), strict=True):
            p.copy_(g.view_as(p))
    return model, server.round


def train_baseline(options: UpOptions, train_dir: Path, tokens: int, evaluator: Evaluator,
                   points: int = 10) -> tuple[float, list[tuple[int, float]]]:
    """The same model trained alone (one process, AdamW, the trainers' batch size and
    learning rate) on the same training set for ``tokens`` tokens; its eval loss, and its curve
    at ``points`` evenly spaced token counts."""
    import torch

    from hypha.data.slices import Dataset
    from hypha.models import training_parameters

    model = _model(options)
    groups = model.param_groups(0.1) if hasattr(model, "param_groups") else \
        [{"params": training_parameters(model)}]
    opt = torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.95))
    dataset = Dataset.open(train_dir)
    data = torch.cat([dataset.slice(i)["tokens"] for i in range(len(dataset))]).long()
    gen = torch.Generator().manual_seed(options.seed + 1)
    per_step = options.batch_size * options.seq_len
    steps = max(1, tokens // per_step)
    marks = {max(1, round(steps * k / points)) for k in range(1, points + 1)}
    curve = []
    for step in range(1, steps + 1):
        batch = data[torch.randint(0, len(data), (options.batch_size,), generator=gen)]
        loss = _loss(model, batch[:, :-1], batch[:, 1:])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step in marks:
            curve.append((step * per_step, evaluator.loss(model)))
    return curve[-1][1], curve


# ------------------------------------------------------------------------------------------------
# progress


@dataclass
class _Job:
    role: str
    worker: str
    values: dict[str, float] = field(default_factory=dict)


class Progress:
    """Follows the scheduler's metrics log (JSON lines)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.jobs: dict[str, _Job] = {}
        self.failed: list[str] = []
        self.finished: set[str] = set()
        self._partial = b""

    def poll(self) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return
        self.offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            job = str(event.get("job", ""))
            if event.get("event") == "metrics" and isinstance(event.get("values"), dict):
                entry = self.jobs.setdefault(job, _Job(str(event.get("role")),
                                                       str(event.get("worker"))))
                entry.values.update({k: float(v) for k, v in event["values"].items()
                                     if isinstance(v, int | float)})
            elif event.get("event") == "status":
                state = event.get("state")
                if state == "finished":
                    self.finished.add(job)
                elif state in ("failed", "stopped"):
                    self.failed.append(f"job {job} on {event.get('worker')} {state}: "
                                       f"{event.get('message', '')}")

    def trainers(self) -> list[_Job]:
        return [j for j in self.jobs.values() if j.role == "train"]

    def total(self, key: str) -> float:
        return sum(j.values.get(key, 0.0) for j in self.trainers())

    def mean(self, key: str) -> float:
        trainers = self.trainers()
        return self.total(key) / len(trainers) if trainers else 0.0

    def round(self) -> int:
        server = [j for j in self.jobs.values() if j.role == "parameter-server"]
        return int(server[0].values.get("round", 0)) if server else 0


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# ------------------------------------------------------------------------------------------------
# the run


def run(options: UpOptions) -> RunResult:
    """Start the network, train, stop everything; returns what was measured."""
    options.check()
    t_start = time.monotonic()
    with ExitStack() as stack:
        if options.directory is None:
            root = Path(tempfile.mkdtemp(prefix="hypha-up-"))
            stack.callback(shutil.rmtree, root, ignore_errors=True)
        else:
            root = options.directory.resolve()
            if root.exists() and any(root.iterdir()):
                raise ValueError(f"--dir {root} is not empty")
            root.mkdir(parents=True, exist_ok=True)
        cluster = Cluster(root)
        try:
            return _run(options, cluster, root, t_start)
        finally:
            killed = cluster.stop()
            if killed:
                print(f"hypha up: had to kill {', '.join(killed)}", file=sys.stderr)


def _run(options: UpOptions, cluster: Cluster, root: Path, t_start: float) -> RunResult:
    say = _Say(options.progress)
    context = getattr(getattr(_model(options), "cfg", None), "context", None)
    if isinstance(context, int) and options.seq_len > context:
        raise ValueError(f"--seq-len {options.seq_len} is longer than model {options.model!r} "
                         f"takes ({context} tokens)")
    net = LocalNetwork(options, cluster)
    net.prepare()
    say.line(f"PKI: root and org CA, {len(net.names)} node certificates in {cluster.pki}")
    say.line(f"data: {options.corpus} prepared as {TRAIN_DATASET} and {EVAL_DATASET} in "
             f"{root / 'datasets'}")
    evaluator = Evaluator(options, net.eval_dir)
    net.start()
    say.line(f"network: gateway, data node, parameter server and {options.workers} training "
             f"workers on 127.0.0.1 (logs in {cluster.logs})")
    scheduler = net.start_scheduler()
    metrics_log, train_dir = net.metrics_log, net.train_dir

    progress = Progress(metrics_log)
    per_round = options.workers * options.sync_batches * options.batch_size * options.seq_len
    points: list[RoundPoint] = []
    seen_round = 0
    t_train = time.monotonic()
    deadline = t_train + options.timeout
    while True:
        progress.poll()
        if progress.failed:
            raise RunFailed("; ".join(progress.failed))
        cluster.check_alive()
        done = scheduler.proc.poll() is not None
        checkpoint = net.checkpoint
        if checkpoint.exists():
            try:
                model, at = load_checkpoint(checkpoint, options)
            except (OSError, ValueError, RuntimeError):
                at = seen_round  # being replaced: read it at the next poll
            if at > seen_round:
                seen_round = at
                loss = evaluator.loss(model)
                # NOTE: the round's budget, not the workers' counters: they are already into
                # the next round when the checkpoint is read
                points.append(RoundPoint(at, at * per_round,
                                         progress.mean("bytes_sent")
                                         + progress.mean("bytes_received"),
                                         loss, time.monotonic() - t_train))
                say.line(f"round {at}/{options.rounds}: eval loss {loss:.4f} after "
                         f"{at * per_round:,} tokens")
        elapsed = time.monotonic() - t_train
        if progress.trainers():
            say.status(f"round {progress.round()}/{options.rounds} | train loss "
                       f"{progress.mean('loss'):.3f} | {progress.total('tokens') / max(elapsed, 1e-9):,.0f}"
                       f" tok/s | wire {_size(progress.mean('bytes_sent') + progress.mean('bytes_received'))}"
                       f"/worker | {elapsed:.0f} s")
        if done:
            break
        if time.monotonic() > deadline:
            raise RunFailed(f"the run did not finish within {options.timeout:.0f} s; the "
                            f"scheduler's log ({scheduler.log}):\n{scheduler.tail()}")
        time.sleep(0.25)
    train_seconds = time.monotonic() - t_train
    progress.poll()
    say.end()
    if scheduler.proc.returncode != 0:
        raise RunFailed(f"the scheduler exited with status {scheduler.proc.returncode}: "
                        f"{'; '.join(progress.failed) or scheduler.tail()}")
    if not points or points[-1].round != options.rounds:
        raise RunFailed(f"the parameter server's checkpoint reached round "
                        f"{points[-1].round if points else 0}, not {options.rounds}")
    final = points[-1].eval_loss
    tokens = int(progress.total("tokens"))
    names = cluster.peer_names()
    idle = {names.get(job.worker, job.worker): job.values.get("idle_seconds", 0.0)
            / max(job.values.get("wall_seconds", 0.0), 1e-9) for job in progress.trainers()}
    baseline: float | None = None
    curve: list[tuple[int, float]] = []
    if options.baseline:
        say.line(f"baseline: the same model alone for the same {tokens:,} tokens ...")
        baseline, curve = train_baseline(options, train_dir, tokens, evaluator)
    plot = options.plot or (root / "loss.png" if options.directory else Path("hypha-up-loss.png"))
    wrote = _plot(plot, points, curve, options)
    result = RunResult(options=_jsonable(asdict(options)), eval_loss=final,
                       baseline_eval_loss=baseline, tokens=tokens,
                       wall_seconds=time.monotonic() - t_start, train_seconds=train_seconds,
                       bytes_sent_per_worker=progress.mean("bytes_sent"),
                       bytes_received_per_worker=progress.mean("bytes_received"),
                       idle_share=idle, rounds=points, baseline_curve=curve,
                       plot=str(wrote) if wrote else None)
    if options.json_out is not None:
        options.json_out.write_text(json.dumps(_jsonable(asdict(result)), indent=2) + "\n")
    return result


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def _plot(path: Path, points: list[RoundPoint], curve: list[tuple[int, float]],
          options: UpOptions) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("hypha up: matplotlib is not installed; no plot (pip install matplotlib)",
              file=sys.stderr)
        return None
    fig, (by_tokens, by_bytes) = plt.subplots(1, 2, figsize=(11, 4))
    label = f"DiLoCo over Hypha, {options.workers} workers, {options.codec}"
    by_tokens.plot([p.tokens for p in points], [p.eval_loss for p in points], "o-", label=label)
    if curve:
        by_tokens.plot([t for t, _ in curve], [loss for _, loss in curve], "s--",
                       label="same model alone")
    by_tokens.set_xlabel("tokens trained (all workers)")
    by_tokens.set_ylabel("held-out loss (nats/byte)")
    by_tokens.legend()
    by_bytes.plot([p.bytes_per_worker for p in points], [p.eval_loss for p in points], "o-",
                  label=label)
    by_bytes.set_xlabel("bytes on the wire per worker (sent + received)")
    by_bytes.set_ylabel("held-out loss (nats/byte)")
    by_bytes.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


class _Say:
    """Progress output: one rewritten status line on a terminal, whole lines otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.tty = sys.stdout.isatty()
        self.last = 0.0
        self.open = False

    def line(self, text: str) -> None:
        if self.enabled:
            self.end()
            print(text, flush=True)

    def status(self, text: str) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        if self.tty:
            print(f"\r{text[:150]:<150}", end="", flush=True)
            self.open = True
        elif now - self.last >= 10:
            print(text, flush=True)
            self.last = now

    def end(self) -> None:
        if self.open:
            print(flush=True)
            self.open = False


def report(result: RunResult, options: UpOptions) -> str:
    lines = [f"final eval loss: {result.eval_loss:.4f} (DiLoCo over Hypha, {options.workers} "
             f"workers, {options.codec}, {options.rounds} rounds)"]
    if result.baseline_eval_loss is not None:
        diff = (result.eval_loss / result.baseline_eval_loss - 1) * 100
        lines.append(f"same model alone, same {result.tokens:,} tokens: "
                     f"{result.baseline_eval_loss:.4f} (DiLoCo {diff:+.1f}%)")
    lines.append(f"bytes on the wire per worker: {_size(result.bytes_sent_per_worker)} sent, "
                 f"{_size(result.bytes_received_per_worker)} received (pseudo-gradients, "
                 "updates and the initial model)")
    idle = ", ".join(f"{w} {share:.0%}" for w, share in sorted(result.idle_share.items()))
    lines.append(f"idle at synchronisation: {idle}")
    lines.append(f"wall time: {result.wall_seconds:.0f} s (training {result.train_seconds:.0f} s)")
    if result.plot:
        lines.append(f"plot: {result.plot}")
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    from hypha.rolecli import RaisingParser

    d = UpOptions()
    p = RaisingParser(prog="python -m hypha up", description=(
        "Start a whole Hypha network on 127.0.0.1 (PKI, gateway, data node, parameter server, "
        "training workers, scheduler) and train a GPT with DiLoCo over it."))
    p.add_argument("--workers", type=int, default=d.workers, help="training workers (3)")
    p.add_argument("--codec", default=d.codec, help="pseudo-gradient codec (int2)")
    p.add_argument("--rounds", type=int, default=d.rounds, help="outer rounds (10)")
    p.add_argument("--sync-batches", type=int, default=d.sync_batches,
                   help="batches per worker per round, nominal (50)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per batch (8)")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="bytes per sequence (64)")
    p.add_argument("--model", default=d.model,
                   help="gpt, gpt:tiny, gpt:small or package.module:factory (gpt)")
    p.add_argument("--lr", type=float, default=d.lr, help="inner AdamW learning rate (2e-3)")
    p.add_argument("--no-perf-aware", dest="perf_aware", action="store_false",
                   help="every worker runs the same number of batches per round")
    p.add_argument("--throttle", action="append", default=[], metavar="I=FACTOR",
                   help="make training worker I (0-based) FACTOR times slower (a test knob)")
    p.add_argument("--corpus", default=d.corpus, help="built-in corpus (python-stdlib)")
    p.add_argument("--round-timeout", type=float, default=d.round_timeout,
                   help="seconds the parameter server waits for stragglers (120)")
    p.add_argument("--no-baseline", dest="baseline", action="store_false",
                   help="skip training the same model alone for comparison")
    p.add_argument("--dir", type=Path, default=None, dest="directory",
                   help="keep everything (PKI, data, logs, checkpoints) in this new directory")
    p.add_argument("--plot", type=Path, default=None, help="where to write the PNG")
    p.add_argument("--json", type=Path, default=None, dest="json_out",
                   help="write the measurements as JSON")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--timeout", type=float, default=d.timeout,
                   help="give up after this many seconds (3600)")
    p.add_argument("--quiet", dest="progress", action="store_false",
                   help="no progress output, only the summary")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from hypha.rolecli import UsageError

    try:
        args = _parser().parse_args(list(sys.argv[1:] if argv is None else argv))
        throttle = {}
        for item in args.throttle:
            index, sep, factor = item.partition("=")
            if not sep:
                raise ValueError(f"--throttle {item!r}: expected I=FACTOR")
            throttle[int(index)] = float(factor)
        options = UpOptions(**{k: v for k, v in vars(args).items() if k != "throttle"},
                            throttle=throttle)
        options.check()
    except (UsageError, ValueError) as exc:
        print(f"hypha up: error: {exc}", file=sys.stderr)
        return 2
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    # SIGTERM (a supervisor, `timeout`) stops the network as Ctrl-C does; and Ctrl-C works
    # even when this process inherited SIGINT ignored (a background job of a shell script)
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        result = run(options)
    except KeyboardInterrupt:
        print("\nhypha up: interrupted; every process it started has been stopped",
              file=sys.stderr)
        return 130
    except RunFailed as exc:
        print(f"hypha up: failed: {exc}", file=sys.stderr)
        return 1
    print(report(result, options))
    return 0


if __name__ == "__main__":
    sys.exit(main())
