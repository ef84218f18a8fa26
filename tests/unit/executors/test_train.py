"""The training executor (``python -m hypha.executors.train``): its configuration, its link to
the parameter server through the bridge, and whole runs against a real job bridge whose backend
serves a prepared text dataset and plays the parameter server with a real OuterServer."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
import trio
from libp2p.peer.id import ID
from safetensors.torch import load_file

from hypha.data import Dataset
from hypha.data.prepare import prepare_text
from hypha.executors import (
    FetchRequest,
    IncomingFile,
    JobBridge,
    incoming_destination,
    write_chunks,
)
from hypha.executors.client import BridgeClient, BridgeError
from hypha.executors.train import (
    CONFIG_KEYS,
    EXIT_CONFIG,
    BridgeServerLink,
    ConfigError,
    TrainConfig,
    main,
    parse_config,
)
from hypha.models import load_model, training_parameters
from hypha.optim import OuterServer

pytestmark = pytest.mark.timeout(120)

JOB = "0123456789abcdef0123456789abcdef"
SERVER = ID(b"\x00\x24" + bytes(range(36))).to_base58()
STRANGER = ID(b"\x00\x24" + bytes(range(1, 37))).to_base58()
OTHER_SERVER = ID(b"\x00\x24" + bytes(range(2, 38))).to_base58()
SEQ_LEN = 16


# --- configuration -------------------------------------------------------------------------------


def test_defaults_and_strings_as_the_scheduler_sends_them() -> None:
    config = parse_config({"dataset": "books", "rounds": "3"})
    assert config == TrainConfig(dataset="books", rounds=3)
    assert (config.model, config.model_seed, config.batch_size, config.lr, config.weight_decay,
            config.warmup, config.grad_clip, config.inner_optimizer, config.outer_lr,
            config.outer_momentum, config.codec, config.error_feedback, config.fragments,
            config.sync_batches, config.device, config.round_timeout) == (
        "gpt", 0, 8, 2e-3, 0.1, 20, 1.0, "adamw", 0.7, 0.9, "int2", None, 1, 50, "auto", 600.0)
    config = parse_config({
        "role": "train", "model": "gpt:tiny", "model_seed": "7", "dataset": "books",
        "scheduler": SERVER, "parameter_server": SERVER, "batch_size": 4, "lr": "1e-3",
        "weight_decay": 0, "warmup": "0", "grad_clip": "0", "inner_optimizer": "sgd",
        "outer_lr": "0.5", "outer_momentum": 0.0, "codec": "int4+zstd", "error_feedback": "off",
        "fragments": "2", "rounds": 5, "sync_batches": "10", "device": "cpu",
        "eval_slice": "3", "round_timeout": "30", "files_peer": SERVER, "workers": "4"})
    assert (config.model_seed, config.lr, config.error_feedback, config.fragments,
            config.outer_momentum, config.eval_slice, config.workers) == (
        7, 1e-3, False, 2, 0.0, 3, 4)
    assert parse_config({"dataset": "b", "rounds": 1, "error_feedback": "TRUE"}).error_feedback
    assert parse_config({"dataset": "b", "rounds": 1, "error_feedback": True}).error_feedback


def test_the_keys_are_the_dataclass_fields() -> None:
    assert set(CONFIG_KEYS) == {
        "role", "model", "model_seed", "dataset", "scheduler", "parameter_server", "batch_size",
        "lr", "weight_decay", "warmup", "grad_clip", "inner_optimizer", "outer_lr",
        "outer_momentum", "codec", "error_feedback", "fragments", "rounds", "sync_batches",
        "device", "eval_slice", "round_timeout", "files_peer", "workers"}


def test_unknown_keys_are_listed_with_the_known_ones() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"dataset": "b", "rounds": 1, "bach_size": 8, "zz": 1})
    message = str(caught.value)
    assert "unknown key(s) 'bach_size', 'zz'" in message
    assert "the training executor takes " + ", ".join(CONFIG_KEYS) in message


@pytest.mark.parametrize(("config", "message"), [
    ({"rounds": 1}, "'dataset' is required"),
    ({"dataset": "b"}, "'rounds' is required"),
    ({"dataset": "b", "rounds": 0}, "'rounds' must be at least 1, got 0"),
    ({"dataset": "b", "rounds": "two"}, "'rounds' must be an integer, got 'two'"),
    ({"dataset": "b", "rounds": 1.5}, "'rounds' must be an integer, got 1.5"),
    ({"dataset": "b", "rounds": True}, "'rounds' must be an integer, got True"),
    ({"dataset": "b c", "rounds": 1}, "'dataset': invalid dataset name 'b c'"),
    ({"dataset": "b", "rounds": 1, "batch_size": "0"}, "'batch_size' must be at least 1"),
    ({"dataset": "b", "rounds": 1, "lr": "-1"}, "'lr' must be more than 0, got '-1'"),
    ({"dataset": "b", "rounds": 1, "lr": "nan"}, "'lr' must be a finite number, got 'nan'"),
    ({"dataset": "b", "rounds": 1, "lr": "fast"}, "'lr' must be a finite number"),
    ({"dataset": "b", "rounds": 1, "outer_momentum": 1}, "'outer_momentum' must be in [0, 1)"),
    ({"dataset": "b", "rounds": 1, "codec": "int3"}, "'codec': "),
    ({"dataset": "b", "rounds": 1, "device": "tpu"}, "'device' must be 'auto', 'cpu', 'cuda'"),
    ({"dataset": "b", "rounds": 1, "role": "serve"}, "'role' must be one of train, got 'serve'"),
    ({"dataset": "b", "rounds": 1, "inner_optimizer": "lion"}, "'inner_optimizer' must be one "
                                                               "of adamw, sgd"),
    ({"dataset": "b", "rounds": 1, "error_feedback": "maybe"}, "'error_feedback' must be true "
                                                              "or false, got 'maybe'"),
    ({"dataset": "b", "rounds": 1, "parameter_server": "not a peer"}, "'parameter_server' must "
                                                                      "be a peer id"),
    ({"dataset": "b", "rounds": 1, "model": ""}, "'model' must be a non-empty string"),
    ({"dataset": "b", "rounds": 1, "codec": "fp32", "error_feedback": "on"},
     "'error_feedback' needs a lossy codec"),
])
def test_bad_values_name_the_key(config: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config)
    assert message in str(caught.value)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"batch_size": "x", "lr": 0})
    lines = str(caught.value).splitlines()
    assert len(lines) == 4, lines  # dataset, rounds, batch_size, lr
    assert all(line.startswith("job config: ") for line in lines)


def _job(tmp_path: Path, config: dict[str, Any], **extra: Any) -> Path:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({"id": JOB, "executor": {}, "config": config, "lease_id": JOB,
                                "scheduler": SERVER, "worker": SERVER, **extra}))
    return path


def test_main_exits_2_on_a_bad_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYPHA_SOCKET_PATH", str(tmp_path / "no.sock"))
    assert main([str(_job(tmp_path, {"dataset": "b", "rounds": 1, "warmpu": 3}))]) == EXIT_CONFIG
    assert "unknown key(s) 'warmpu'" in capsys.readouterr().err
    assert main([str(tmp_path / "missing.json")]) == EXIT_CONFIG
    assert "cannot read the job spec" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{")
    assert main([str(tmp_path / "bad.json")]) == EXIT_CONFIG
    assert "is not JSON" in capsys.readouterr().err
    assert main([str(_job(tmp_path, {}, id=""))]) == EXIT_CONFIG
    assert "has no 'id'" in capsys.readouterr().err
    monkeypatch.delenv("HYPHA_JOB_JSON", raising=False)
    assert main([]) == EXIT_CONFIG
    assert "no job spec: pass JOB_JSON or set HYPHA_JOB_JSON" in capsys.readouterr().err
    monkeypatch.delenv("HYPHA_SOCKET_PATH")
    assert main([str(_job(tmp_path, {"dataset": "b", "rounds": 1}))]) == EXIT_CONFIG
    assert "HYPHA_SOCKET_PATH is not set" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_cuda_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                         capsys: pytest.CaptureFixture[str],
                                         device: str) -> None:
    monkeypatch.setenv("HYPHA_SOCKET_PATH", str(tmp_path / "no.sock"))
    job = _job(tmp_path, {"dataset": "b", "rounds": 1, "device": device})
    assert main([str(job)]) == EXIT_CONFIG
    err = capsys.readouterr().err
    assert f"'device' is {device!r}, but torch" in err and "sees no CUDA device" in err


def test_a_bad_throttle_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("HYPHA_SOCKET_PATH", str(tmp_path / "no.sock"))
    monkeypatch.setenv("HYPHA_THROTTLE", "0.5")
    assert main([str(_job(tmp_path, {"dataset": "b", "rounds": 1, "device": "cpu"}))]) == 2
    assert "HYPHA_THROTTLE must be a number >= 1" in capsys.readouterr().err


def test_help_lists_the_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    for key in CONFIG_KEYS:
        assert f"  {key} (" in out


# --- the link, without a bridge ------------------------------------------------------------------


class FakeClient:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.sent: list[tuple[str, list[str], str, bytes]] = []
        self.failures: list[BridgeError] = []

    def send(self, path: str, peers: list[str], *, strategy: str = "all",
             name: str | None = None) -> list[str]:
        if self.failures:
            raise self.failures.pop(0)
        self.sent.append((path, peers, str(name), (self.work / path).read_bytes()))
        return peers


def _link(tmp_path: Path, **kwargs: Any) -> tuple[BridgeServerLink, FakeClient]:
    client = FakeClient(tmp_path)
    return BridgeServerLink(client, tmp_path, **kwargs), client  # type: ignore[arg-type]


def _arrive(link: BridgeServerLink, tmp_path: Path, name: str, peer: str = SERVER,
            data: bytes = b"") -> Path:
    path = tmp_path / "incoming" / f"{name}-{peer[-4:]}"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data or name.encode())
    link._arrive({"path": f"incoming/{path.name}", "peer": peer, "name": name,
                  "size": path.stat().st_size})
    return path


def test_push_keeps_the_file_until_the_update_and_resends_it(tmp_path: Path) -> None:
    link, client = _link(tmp_path, parameter_server=SERVER)
    link.poll_interval = 0.01
    link.push(3, [b"ab", b"cd", b"e"])
    assert client.sent == [("out/delta-3.bin", [SERVER], "delta-3", b"abcde")]
    assert link.bytes_sent == 5
    # kept until the round's update came: the server may die before it closes the round
    assert (tmp_path / "out" / "delta-3.bin").exists()
    _arrive(link, tmp_path, "update-3")
    assert b"".join(link.pull(3, timeout=5)) == b"update-3"
    assert not (tmp_path / "out" / "delta-3.bin").exists()

    # a failure of the bridge (5xx) is tried again while the update is awaited
    client.failures = [BridgeError(502, "peer unreachable", {})]
    link.push(4, [b"x"])
    assert [s[2] for s in client.sent] == ["delta-3"]
    with pytest.raises(TimeoutError):
        list(link.pull(4, timeout=0.1))
    assert [s[2] for s in client.sent] == ["delta-3", "delta-4"]
    assert link.bytes_sent == 6

    # the scheduler names a new parameter server: the pseudo-gradient goes to it too, once
    link.parameter_server = OTHER_SERVER
    with pytest.raises(TimeoutError):
        list(link.pull(4, timeout=0.1))
    assert client.sent[-1] == ("out/delta-4.bin", [OTHER_SERVER], "delta-4", b"x")
    assert len(client.sent) == 3
    _arrive(link, tmp_path, "update-4", OTHER_SERVER)
    assert b"".join(link.pull(4, timeout=5)) == b"update-4"

    # a refusal (4xx) ends the round
    client.failures = [BridgeError(400, "bad name", {})]
    with pytest.raises(ConnectionError, match=r"refused the pseudo-gradient: bad name"):
        link.push(5, [b"x"])
    link.parameter_server = None
    with pytest.raises(ConnectionError, match="no parameter server to send to"):
        link.push(6, [b"x"])


def test_pull_takes_the_servers_update_and_drops_the_rest(tmp_path: Path) -> None:
    link, _ = _link(tmp_path, parameter_server=SERVER)
    old = _arrive(link, tmp_path, "update-1")
    strangers = _arrive(link, tmp_path, "update-2", STRANGER)
    global_ = _arrive(link, tmp_path, "global-0")
    mine = _arrive(link, tmp_path, "update-2", data=b"x" * (3 << 20))
    later = _arrive(link, tmp_path, "update-3")
    delta = _arrive(link, tmp_path, "delta-2")  # not for a worker: deleted at once
    assert not delta.exists()
    pieces = list(link.pull(2, timeout=5))
    assert b"".join(pieces) == b"x" * (3 << 20) and len(pieces) == 3
    assert link.bytes_received == 3 << 20
    assert not any(p.exists() for p in (old, strangers, global_, mine))
    assert later.exists()  # the next round's, kept
    assert b"".join(link.pull(3, timeout=5)) == b"update-3"
    assert not later.exists()


def test_pull_initial_takes_the_newest_global_model(tmp_path: Path) -> None:
    link, _ = _link(tmp_path, parameter_server=SERVER)
    first = _arrive(link, tmp_path, "global-2")
    _arrive(link, tmp_path, "global-9", STRANGER)
    _arrive(link, tmp_path, "global-4")
    assert b"".join(link.pull_initial(timeout=5)) == b"global-4"
    assert link.initial_round == 4
    assert not first.exists()
    assert not list((tmp_path / "incoming").iterdir())


def test_a_pull_waits_polls_and_times_out(tmp_path: Path) -> None:
    polls: list[float] = []
    link, _ = _link(tmp_path, poll=lambda: polls.append(time.monotonic()), poll_interval=0.05)
    _arrive(link, tmp_path, "update-0")  # not judged while no server is known
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"update of round 0 did not come within 0.3 s "
                                           r"\(parameter server: no parameter server named yet\)"):
        link.pull(0, timeout=0.3)
    assert time.monotonic() - t0 >= 0.3
    assert len(polls) >= 3
    # the caller names the server (as the executor does from a metrics answer): it is taken
    link.parameter_server = SERVER
    assert b"".join(link.pull(0, timeout=1)) == b"update-0"


def test_a_pull_wakes_when_the_file_arrives(tmp_path: Path) -> None:
    link, _ = _link(tmp_path, parameter_server=SERVER)
    timer = threading.Timer(0.2, _arrive, (link, tmp_path, "update-5"))
    timer.start()
    t0 = time.monotonic()
    assert b"".join(link.pull(5, timeout=10)) == b"update-5"
    assert time.monotonic() - t0 < 5
    timer.join()


def test_a_broken_stream_fails_the_pull(tmp_path: Path) -> None:
    link, _ = _link(tmp_path, parameter_server=SERVER)
    with link._changed:
        link._error = ConnectionError("the bridge's receive stream broke: reset")
    with pytest.raises(ConnectionError, match="update of round 1: the bridge's receive stream "
                                              "broke"):
        link.pull(1, timeout=5)
    link.close()
    with pytest.raises(ValueError, match="Invalid timeout"):
        link.pull(1, timeout=0)


# --- whole runs ----------------------------------------------------------------------------------


def _pieces(data: Iterable[bytes]) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for piece in data:
            yield piece
    return gen()


class ServerBackend:
    """A worker's bridge backend for one training job: slices of ``dataset`` in order, and a
    parameter server played with ``server`` (None: it never answers)."""

    def __init__(self, work: Path, dataset: Dataset, server: OuterServer | None, *,
                 instruction: dict[str, Any] | None = None) -> None:
        self.work = work
        self.dataset = dataset
        self.server = server
        self.instruction = instruction or {"round": None, "batches": None,
                                           "parameter_server": None}
        self.fetched: list[int] = []
        self.deltas: list[tuple[str, int]] = []
        self.reports: list[tuple[int, dict[str, float]]] = []
        self.receiving = trio.Event()
        self._inbox, self._outbox = trio.open_memory_channel[IncomingFile](64)

    async def deliver(self, name: str, pieces: Iterable[bytes], peer: str = SERVER) -> None:
        dest = incoming_destination(self.work, name)
        final, size = await write_chunks(dest, _pieces(pieces), overwrite=False)
        await self._inbox.send(IncomingFile(final, peer, name, size))

    async def fetch(self, request: FetchRequest, dest: Path) -> int:
        assert request.source == "data" and request.slice is None
        assert request.dataset == self.dataset.name
        index = len(self.fetched) % self.dataset.num_slices
        self.fetched.append(index)
        _, size = await write_chunks(dest, _pieces([self.dataset.slice_bytes(index)]))
        return size

    async def send(self, path: Path, peers: list[str], strategy: str, name: str) -> list[str]:
        assert peers == [SERVER] and strategy == "all", (peers, strategy)
        data = path.read_bytes()
        self.deltas.append((name, len(data)))
        if self.server is not None:
            assert name == f"delta-{self.server.round}", name
            pieces = await trio.to_thread.run_sync(self._close_round, data)
            await self.deliver(f"update-{int(name.split('-')[1])}", pieces)
        return peers

    def _close_round(self, data: bytes) -> list[bytes]:
        assert self.server is not None
        round_ = self.server.open_round()
        contribution = round_.contribution("worker")
        contribution.feed(data[:100])
        contribution.feed(data[100:])
        contribution.finish()
        pieces, stats = round_.close()
        assert stats.contributors == 1
        return pieces

    async def incoming(self) -> AsyncIterator[IncomingFile]:
        self.receiving.set()
        async for file in self._outbox:
            yield file

    async def report(self, step: int, values: dict[str, float]) -> dict[str, Any]:
        self.reports.append((step, dict(values)))
        return dict(self.instruction)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("corpus")
    texts = root / "texts"
    texts.mkdir()
    for i in range(3):
        lines = [f"def f{i}_{j}(x):\n    return x * {j} + {i}  # line {j}\n" for j in range(40)]
        (texts / f"doc{i}.py").write_text("".join(lines))
    prepare_text([texts], "tiny-text", root / "datasets", slice_tokens=16 * SEQ_LEN,
                 seq_len=SEQ_LEN)
    return Dataset.open(root / "datasets" / "tiny-text")


def _server(codec: str = "int2", seed: int = 0, fragments: int = 1,
            ) -> tuple[OuterServer, list[str]]:
    """The parameter server of a gpt:tiny run, as the parameter-server executor builds it, and
    the names of its parameters in order."""
    torch.manual_seed(seed)
    model = load_model("gpt:tiny")
    names = {id(p): name for name, p in model.named_parameters()}
    params = training_parameters(model)
    server = OuterServer([p.detach() for p in params], codec=codec, fragments=fragments)
    return server, [names[id(p)] for p in params]


@asynccontextmanager
async def bridge(work: Path, backend: Any) -> AsyncIterator[Path]:
    async with trio.open_nursery() as nursery:
        path = await nursery.start(JobBridge(work, backend, job_id=JOB).serve)
        yield path
        nursery.cancel_scope.cancel()


def _env(work: Path, socket: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HYPHA_")}
    env.update(HYPHA_SOCKET_PATH=str(socket), HYPHA_WORK_DIR=str(work),
               HYPHA_JOB_JSON=str(work / ".hypha" / "job.json"), OMP_NUM_THREADS="1", **extra)
    return env


def _write_job(work: Path, config: dict[str, Any]) -> None:
    (work / ".hypha").mkdir(exist_ok=True, mode=0o700)
    (work / ".hypha" / "job.json").write_text(json.dumps(
        {"id": JOB, "executor": {"kind": "process", "name": "train", "runtime": "python"},
         "config": config, "lease_id": JOB, "scheduler": STRANGER, "worker": STRANGER}))


TRAIN = [sys.executable, "-m", "hypha.executors.train"]
BASE = {"model": "gpt:tiny", "dataset": "tiny-text", "rounds": "2", "sync_batches": "3",
        "parameter_server": SERVER, "device": "cpu", "round_timeout": "60"}


@pytest.mark.parametrize(("fragments", "device"), [
    (1, "cpu"),
    (2, "cpu"),
    pytest.param(1, "cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a CUDA device")]),
])
async def test_a_run_trains_two_rounds_with_the_parameter_server(
        tmp_path: Path, dataset: Dataset, fragments: int, device: str) -> None:
    """With 2 fragments each round syncs one (Streaming DiLoCo: the exchange overlaps the next
    batch, on DiLoCo's exchange thread)."""
    work = tmp_path / "work"
    work.mkdir()
    server, names = _server(fragments=fragments)
    backend = ServerBackend(work, dataset, server)
    _write_job(work, {**BASE, "scheduler": STRANGER, "files_peer": STRANGER, "workers": "1",
                      "fragments": str(fragments), "device": device})
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            # a global model from a peer that is not the parameter server is never used
            await backend.deliver("global-7", [b"not a model"], peer=STRANGER)
            await backend.deliver("global-0", server.initial_payload())
            done = await trio.run_process(TRAIN, cwd=work, env=_env(work, socket), check=False,
                                          capture_stdout=True, capture_stderr=True)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "deleting global-7 from " + STRANGER in err
    assert "round 1/2: loss" in err and "round 2/2: loss" in err
    # the delta of each round went to the server, which closed both rounds
    assert [name for name, _ in backend.deltas] == ["delta-0", "delta-1"]
    assert server.round == 2
    # 6 batches of 8 sequences from slices of 16: 3 slices, each deleted once used
    assert backend.fetched == [0, 1, 2]
    assert not list((work / "data").iterdir())
    assert not list((work / "out").glob("delta-*"))
    assert not list((work / "incoming").iterdir())
    # the metrics: one report to begin with, one per batch, one per sync, one at the end
    steps = [step for step, _ in backend.reports]
    assert steps == sorted(steps) and steps[0] == 0 and steps[-1] == 6
    final = backend.reports[-1][1]
    assert final["round"] == 2 and final["round_step"] == 0
    assert final["tokens"] == 6 * 8 * SEQ_LEN
    assert final["bytes_sent"] == sum(size for _, size in backend.deltas)
    assert final["bytes_received"] > final["bytes_sent"]  # the fp32 global model, the updates
    assert 0 < final["idle_seconds"] < final["wall_seconds"]
    assert 0 < final["loss"] < 6.0 and final["batch_seconds"] > 0
    trained = [values for step, values in backend.reports if step > 0]
    positions = [(v["round"], v["round_step"]) for v in trained]
    # after each batch, after each sync (and a report a second while waiting for an update)
    assert [p for i, p in enumerate(positions) if i == 0 or p != positions[i - 1]] == [
        (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3), (2, 0)]
    assert all(set(v) == {"loss", "batch_seconds", "round", "round_step", "tokens",
                          "bytes_sent", "bytes_received", "idle_seconds", "wall_seconds"}
               for v in trained)
    # the worker's global model is the server's, bit for bit (on the same kind of device)
    saved = load_file(work / "out" / "global.safetensors")
    assert list(saved) and set(saved) == set(names)
    for name, tensor in zip(names, server.global_tensors(), strict=True):
        if device == "cpu":
            assert torch.equal(saved[name], tensor.view_as(saved[name])), name
        else:
            torch.testing.assert_close(saved[name], tensor.view_as(saved[name]), rtol=0,
                                       atol=1e-6)


async def test_the_schedulers_instruction_sets_the_round_and_the_server(
        tmp_path: Path, dataset: Dataset) -> None:
    """No parameter server in the config: the scheduler names it; its batches win over
    sync_batches."""
    work = tmp_path / "work"
    work.mkdir()
    server, _ = _server("int4")
    backend = ServerBackend(work, dataset, server, instruction={
        "round": 0, "batches": 2, "parameter_server": SERVER})
    config = {k: v for k, v in BASE.items() if k != "parameter_server"}
    _write_job(work, {**config, "codec": "int4", "rounds": "1", "batch_size": "5",
                      "warmup": "0"})
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            await backend.deliver("global-0", server.initial_payload())
            done = await trio.run_process(TRAIN, cwd=work, env=_env(work, socket), check=False,
                                          capture_stdout=True, capture_stderr=True)
    assert done.returncode == 0, done.stderr.decode()
    assert [name for name, _ in backend.deltas] == ["delta-0"]
    assert backend.reports[-1][0] == 2  # 2 batches, as the scheduler said
    assert backend.reports[-1][1]["tokens"] == 2 * 5 * SEQ_LEN


async def test_no_update_within_the_round_timeout_fails_the_job(
        tmp_path: Path, dataset: Dataset) -> None:
    work = tmp_path / "work"
    work.mkdir()
    server, _ = _server()
    backend = ServerBackend(work, dataset, None)
    _write_job(work, {**BASE, "round_timeout": "2.5", "sync_batches": "1"})
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            await backend.deliver("global-0", server.initial_payload())
            done = await trio.run_process(TRAIN, cwd=work, env=_env(work, socket), check=False,
                                          capture_stdout=True, capture_stderr=True)
    lines = done.stderr.decode().strip().splitlines()
    assert done.returncode == 1, lines
    assert lines[-1].startswith("hypha.executors.train: failed: "), done.stderr.decode()
    assert "update of round 0 did not come within 2.5 s" in lines[-1]
    assert "Traceback" not in done.stderr.decode()
    # while it waited it kept reporting (the scheduler sees it synchronising), at step 1
    waiting = [step for step, values in backend.reports if step == 1]
    assert len(waiting) >= 3


async def test_sigterm_stops_it(tmp_path: Path, dataset: Dataset) -> None:
    work = tmp_path / "work"
    work.mkdir()
    backend = ServerBackend(work, dataset, None)  # never sends the global model: it waits
    _write_job(work, BASE)
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            process = await trio.lowlevel.open_process(
                TRAIN, cwd=work, env=_env(work, socket), stderr=__import__("subprocess").PIPE)
            await backend.receiving.wait()
            await trio.sleep(0.5)
            process.send_signal(signal.SIGTERM)
            assert process.stderr is not None
            err = b""
            while chunk := await process.stderr.receive_some():
                err += chunk
            code = await process.wait()
    assert code == 143, err.decode()
    assert err.decode().strip().splitlines()[-1] == "hypha.executors.train: stopped by SIGTERM"


async def test_a_dataset_longer_than_the_context_is_a_config_error(
        tmp_path: Path, dataset: Dataset) -> None:
    work = tmp_path / "work"
    work.mkdir()
    backend = ServerBackend(work, dataset, None)
    _write_job(work, {**BASE, "model": "hypha.models:GPT"})  # context 64 > 16: fine
    _write_job(work, {**BASE, "model": "gpt:tiny"})
    # a model whose context is shorter than the dataset's sequences
    (work / "short_model.py").write_text(
        "from hypha.models import GPT, GPTConfig\n"
        "def make():\n    return GPT(GPTConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, "
        "context=8))\n")
    _write_job(work, {**BASE, "model": "short_model:make"})
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            done = await trio.run_process(TRAIN, cwd=work, env=_env(work, socket), check=False,
                                          capture_stdout=True, capture_stderr=True)
    err = done.stderr.decode()
    assert done.returncode == 2, err
    assert f"holds sequences of {SEQ_LEN} tokens, but model 'short_model:make' takes at most " \
           "8" in err


def test_the_bridge_client_reports(tmp_path: Path) -> None:
    """The client's report() against a real bridge (the local backend)."""
    from hypha.executors import LocalBackend

    work = tmp_path / "w"
    work.mkdir()
    backend = LocalBackend(work, instruction={"round": 1, "batches": 5,
                                              "parameter_server": SERVER})
    answers: list[Any] = []

    async def run() -> None:
        async with bridge(work, backend) as socket:
            client = BridgeClient(str(socket), timeout=10)
            answers.append(await trio.to_thread.run_sync(client.report, 3, {"loss": 1.5}))
            with pytest.raises(BridgeError) as refused:
                await trio.to_thread.run_sync(client.report, 4, {"bad name": 1.0})
            answers.append(refused.value.status)

    trio.run(run)
    assert answers == [{"round": 1, "batches": 5, "parameter_server": SERVER}, 400]
    assert [(r.step, r.values) for r in backend.reports] == [(3, {"loss": 1.5})]


async def test_a_worker_that_joins_late_stops_with_the_others(
        tmp_path: Path, dataset: Dataset) -> None:
    """The server is at round 1 when the worker joins: of 2 rounds it runs the last one."""
    work = tmp_path / "work"
    work.mkdir()
    server, names = _server()
    server.open_round().close()  # round 0, without this worker
    backend = ServerBackend(work, dataset, server)
    _write_job(work, BASE)
    with trio.fail_after(90):
        async with bridge(work, backend) as socket:
            await backend.deliver("global-0", [b"stale"])  # an older one is ignored
            await backend.deliver("global-1", server.initial_payload())
            done = await trio.run_process(TRAIN, cwd=work, env=_env(work, socket), check=False,
                                          capture_stdout=True, capture_stderr=True)
    err = done.stderr.decode()
    assert done.returncode == 0, err
    assert "joined at round 1 of 2" in err and "round 2/2: loss" in err
    assert [name for name, _ in backend.deltas] == ["delta-1"]
    assert server.round == 2
    assert backend.reports[-1] == (3, backend.reports[-1][1])
    assert backend.reports[-1][1]["round"] == 1  # this job synced once
    saved = load_file(work / "out" / "global.safetensors")
    for name, tensor in zip(names, server.global_tensors(), strict=True):
        assert torch.equal(saved[name], tensor.view_as(saved[name])), name
