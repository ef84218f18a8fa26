"""The training executor: one DiLoCo training worker of a parameter-server run, as a job process.

::

    python -m hypha.executors.train [JOB_JSON]      # default: $HYPHA_JOB_JSON

The worker starts it with ``HYPHA_SOCKET_PATH`` (its job bridge), ``HYPHA_WORK_DIR`` (its work
directory, also its working directory) and ``HYPHA_JOB_JSON`` (the job spec: ``{"id",
"executor", "config", "lease_id", "scheduler", "worker"}``). Everything it does goes through the
bridge (:mod:`hypha.executors.client`):

* **Data.** ``POST /resources/fetch {"source": "data", "dataset": ...}`` hands it the job's next
  slice of a text dataset (see :mod:`hypha.data.prepare`: ``tokens``, ``[examples, seq_len + 1]``
  bytes) as ``data/slice-<n>.safetensors``; it loads the tokens, deletes the file, and draws
  batches of ``batch_size`` sequences (inputs ``seq[:, :-1]``, targets ``seq[:, 1:]``) in a
  random order seeded by ``model_seed``, the job id and the slice's number, then fetches the
  next slice.
* **Model.** :func:`hypha.models.load_model` of ``model``, initialised after
  ``torch.manual_seed(model_seed)`` (on the CPU, then moved to ``device``), trained by AdamW
  (betas 0.9, 0.95; weight decay on the model's :func:`~hypha.models.parameter_groups`) with a
  linear warm-up over ``warmup`` batches, gradients clipped to ``grad_clip``, inside
  :class:`hypha.optim.DiLoCo` with manual rounds (``sync_every=None``).
* **Parameter server.** DiLoCo talks to it through :class:`BridgeServerLink`: its
  pseudo-gradient of round ``r`` goes out as the file ``delta-<r>`` (``POST /resources/send``),
  the server's update comes back as the file ``update-<r>`` and the current global model, when
  the worker joins, as ``global-<r>`` (both through ``POST /resources/receive``). The server is
  the peer the scheduler named last in its answers to the metrics reports, else the config's
  ``parameter_server``; files from any other peer are deleted unread.
* **Rounds.** After every batch it reports ``POST /metrics`` (step: batches done; values
  ``loss``, ``batch_seconds``, ``round``, ``round_step``, ``tokens``, ``bytes_sent``,
  ``bytes_received``, ``idle_seconds``, ``wall_seconds``) and syncs (``opt.sync()``) once the
  round has run the ``batches`` of the scheduler's answer for this round (``sync_batches``
  while it has given none; ``round`` in the answer is the job's own count of syncs). After
  round ``rounds - 1`` (counted as the parameter server counts them, so a worker that joins
  late stops with the others) it writes the global model to ``out/global.safetensors``,
  reports once more and exits.

Exit status: 0 when done; 2 for a bad job spec or configuration (the message names the key);
143 when stopped by SIGTERM (it stops at once, wherever it is: the worker stops a job only when
its result no longer matters); 1 for anything else, with a one-line reason as the last line of stderr (for
example: the parameter server's update did not come within ``round_timeout``).

``HYPHA_THROTTLE`` (a number >= 1, default 1) is a knob for tests and benchmarks only: after each
batch the executor sleeps ``(throttle - 1) ×`` the batch's compute time and counts the sleep as
compute (in ``batch_seconds``), so that one machine can play a slow worker and the scheduler's
planner sees its slowness.

The configuration keys (``config`` in the job spec; strings as the scheduler's ``KEY=VALUE``
settings give them, or JSON numbers and booleans):
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, Final

from hypha.executors.client import BridgeClient, BridgeError, EventStream
from hypha.optim import ServerLink

if TYPE_CHECKING:
    import torch

__all__ = [
    "CONFIG_KEYS",
    "THROTTLE_ENV",
    "BridgeServerLink",
    "ConfigError",
    "TrainConfig",
    "main",
    "parse_config",
]

log = logging.getLogger("hypha.executors.train")

#: The test/benchmark knob that slows the worker down (see the module docstring).
THROTTLE_ENV: Final = "HYPHA_THROTTLE"
#: Where the final global model is written, relative to the work directory.
FINAL_MODEL: Final = "out/global.safetensors"
#: Seconds between two metrics reports while the worker waits for the parameter server (they
#: tell the scheduler that it is alive and fetch its latest instruction).
POLL_INTERVAL: Final = 1.0
#: Bytes per piece of a file handed to DiLoCo.
READ_PIECE: Final = 1 << 20
#: Exit statuses.
EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_TERMINATED = 0, 1, 2, 143

_FILE_NAME: Final = re.compile(r"(delta|update|global)-(0|[1-9][0-9]{0,18})")


class ConfigError(ValueError):
    """The job spec or its configuration cannot be used (exit status 2)."""


class _Terminated(BaseException):
    """SIGTERM: stop now."""


# ------------------------------------------------------------------------------------------------
# the configuration


_REQUIRED: Final = object()


def _key(default: Any, help: str, kind: str, *, check: Callable[[Any], str | None] | None = None,
         choices: tuple[str, ...] = ()) -> Any:
    """A config key: its default (``_REQUIRED`` for none), what it means, its kind (``str``,
    ``int``, ``float``, ``bool``, ``peer``), and what values are allowed (``check`` returns the
    problem, or None)."""
    meta = {"help": help, "kind": kind, "check": check, "choices": choices}
    if default is _REQUIRED:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def _at_least(low: float) -> Callable[[Any], str | None]:
    return lambda v: None if v >= low else f"must be at least {low:g}"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be more than 0"


def _dataset_name(v: str) -> str | None:
    from hypha.data.slices import DatasetError, check_name

    try:
        check_name(v)
    except DatasetError as exc:
        return str(exc)
    return None


def _codec(v: str) -> str | None:
    from hypha.compress import parse_codec

    try:
        parse_codec(v)
    except (TypeError, ValueError) as exc:
        return str(exc)
    return None


def _device(v: str) -> str | None:
    if v in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:(0|[1-9][0-9]*)", v):
        return None
    return "must be 'auto', 'cpu', 'cuda' or 'cuda:<index>'"


def _momentum(v: float) -> str | None:
    return None if 0 <= v < 1 else "must be in [0, 1)"


@dataclass(frozen=True)
class TrainConfig:
    """The training executor's job configuration: every key it accepts (see :data:`CONFIG_KEYS`
    and :func:`parse_config`)."""

    dataset: str = _key(_REQUIRED, "the text dataset to train on, as a data node announces it",
                        "str", check=_dataset_name)
    rounds: int = _key(_REQUIRED, "outer rounds (synchronisations with the parameter server) "
                       "of the run", "int", check=_at_least(1))
    role: str = _key("train", "what this job does ('train': the only role of this executor)",
                     "str", choices=("train",))
    model: str = _key("gpt", "the model: 'gpt', 'gpt:tiny', 'gpt:small' or "
                      "'package.module:factory' (hypha.models.load_model)", "str")
    model_seed: int = _key(0, "seed of the model's initialisation (the same on every worker and "
                           "the parameter server) and of the data order", "int",
                           check=_at_least(0))
    scheduler: str | None = _key(None, "the scheduler's peer id (set by the scheduler)", "peer")
    parameter_server: str | None = _key(
        None, "peer id of the parameter server; the scheduler's answers to the metrics reports "
        "name it too, and win", "peer")
    batch_size: int = _key(8, "sequences per batch", "int", check=_at_least(1))
    lr: float = _key(2e-3, "peak learning rate of the inner optimizer", "float", check=_positive)
    weight_decay: float = _key(0.1, "weight decay of the inner optimizer (on the model's matrices "
                               "for the GPT)", "float", check=_at_least(0))
    warmup: int = _key(20, "batches of linear learning-rate warm-up", "int", check=_at_least(0))
    grad_clip: float = _key(1.0, "clip the gradients' norm to this (0: no clipping)", "float",
                            check=_at_least(0))
    inner_optimizer: str = _key("adamw", "the inner optimizer: 'adamw' (betas 0.9, 0.95) or "
                                "'sgd' (Nesterov momentum 0.9)", "str", choices=("adamw", "sgd"))
    outer_lr: float = _key(0.7, "the outer (Nesterov) learning rate", "float",
                           check=_at_least(0))
    outer_momentum: float = _key(0.9, "the outer momentum", "float", check=_momentum)
    codec: str = _key("int2", "how pseudo-gradients are compressed: int2, int4, int8, bf16, "
                      "fp32, optionally +zstd", "str", check=_codec)
    error_feedback: bool | None = _key(None, "keep what the codec dropped for the next round "
                                       "(default: on for lossy codecs)", "bool")
    fragments: int = _key(1, "Streaming DiLoCo: fragments the parameters are synced in", "int",
                          check=_at_least(1))
    sync_batches: int = _key(50, "batches per round while the scheduler says none", "int",
                             check=_at_least(1))
    device: str = _key("auto", "'auto' (cuda:0 when torch sees a GPU, else cpu), 'cpu', 'cuda' "
                       "or 'cuda:<index>'", "str", check=_device)
    round_timeout: float = _key(600.0, "seconds to wait for the parameter server's update (and "
                                "for the global model when joining)", "float", check=_positive)
    eval_slice: int | None = _key(None, "a slice for evaluation (not used by this executor)",
                                  "int", check=_at_least(0))
    files_peer: str | None = _key(None, "the peer serving the job's files (set by the "
                                  "scheduler; not used)", "peer")
    workers: int | None = _key(None, "training workers of the run (set by the scheduler; not "
                               "used)", "int", check=_at_least(1))

    def __post_init__(self) -> None:
        if self.error_feedback and self.codec.strip().lower().partition("+")[0] == "fp32":
            raise ConfigError("job config: 'error_feedback' needs a lossy codec, and 'codec' "
                              "is fp32 (which sends pseudo-gradients exactly)")


#: The configuration keys, in the order of :class:`TrainConfig`.
CONFIG_KEYS: Final = tuple(f.name for f in fields(TrainConfig))

_TRUE, _FALSE = ("true", "yes", "on", "1"), ("false", "no", "off", "0")


def _convert(name: str, raw: object, kind: str) -> Any:
    """``raw`` as ``kind``; ConfigError naming ``name`` when it is not one."""
    problem = f"job config: {name!r} must be "
    if kind in ("str", "peer"):
        if not isinstance(raw, str) or not raw.strip():
            raise ConfigError(problem + f"a non-empty string, got {raw!r}")
        value = raw.strip()
        if kind == "peer" and not re.fullmatch(r"[1-9A-HJ-NP-Za-km-z]{20,128}", value):
            raise ConfigError(problem + f"a peer id (base58), got {raw!r}")
        return value
    if kind == "int":
        if isinstance(raw, int) and not isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and re.fullmatch(r"[+-]?[0-9]{1,19}", raw.strip()):
            return int(raw)
        raise ConfigError(problem + f"an integer, got {raw!r}")
    if kind == "float":
        number = math.nan
        if isinstance(raw, int | float) and not isinstance(raw, bool):
            number = float(raw)
        elif isinstance(raw, str):
            try:
                number = float(raw.strip())
            except ValueError:
                pass
        if not math.isfinite(number):
            raise ConfigError(problem + f"a finite number, got {raw!r}")
        return number
    assert kind == "bool", kind
    if isinstance(raw, bool):
        return raw
    text = str(raw).strip().lower() if isinstance(raw, str | int) else None
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ConfigError(problem + f"true or false, got {raw!r}")


def parse_config(config: object) -> TrainConfig:
    """Check a job's ``config`` and fill in the defaults; :class:`ConfigError` lists every
    problem, each naming its key."""
    if not isinstance(config, dict):
        raise ConfigError(f"job config must be an object of key → value, got "
                          f"{type(config).__name__}")
    unknown = sorted(str(k) for k in config if k not in CONFIG_KEYS)
    problems = []
    if unknown:
        problems.append(f"job config: unknown key(s) {', '.join(map(repr, unknown))}; the "
                        f"training executor takes {', '.join(CONFIG_KEYS)}")
    values: dict[str, Any] = {}
    for f in fields(TrainConfig):
        if f.name not in config:
            if f.default is MISSING:
                problems.append(f"job config: {f.name!r} is required ({f.metadata['help']})")
            continue
        try:
            value = _convert(f.name, config[f.name], f.metadata["kind"])
        except ConfigError as exc:
            problems.append(str(exc))
            continue
        choices = f.metadata["choices"]
        if choices and value not in choices:
            problems.append(f"job config: {f.name!r} must be one of {', '.join(choices)}, got "
                            f"{value!r}")
            continue
        check = f.metadata["check"]
        why = check(value) if check is not None else None
        if why is not None:
            problems.append(f"job config: {f.name!r} {why}, got {config[f.name]!r}"
                            if why.startswith("must") else f"job config: {f.name!r}: {why}")
            continue
        values[f.name] = value
    if problems:
        raise ConfigError("\n".join(problems))
    return TrainConfig(**values)


def describe_keys() -> str:
    """The configuration keys, one per line: name, default, meaning."""
    lines = []
    for f in fields(TrainConfig):
        default = "required" if f.default is MISSING else f"default {f.default!r}"
        lines.append(f"  {f.name} ({default}): {f.metadata['help']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------
# the parameter server, through the bridge


@dataclass
class _Arrived:
    """A file that a peer sent, as the receive stream announced it."""

    kind: str  #: "update" or "global"
    round: int
    path: Path
    peer: str
    size: int


@dataclass
class _Pending:
    """This worker's pseudo-gradient of ``round``, kept until the round's update arrives."""

    round: int
    relative: str  #: the file, relative to the work directory
    path: Path
    size: int
    sent_to: str | None = None  #: the parameter server that has it


def _remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("could not delete %s: %s", path, exc)


class BridgeServerLink(ServerLink):
    """DiLoCo's link to its parameter server through the job bridge (see
    :class:`hypha.optim.ServerLink`).

    * :meth:`push` writes the payload to ``out/delta-<round>.bin`` in ``work_dir`` and sends it
      to the parameter server as ``delta-<round>`` (``POST /resources/send``). The file is kept
      until the round's update arrives: while :meth:`pull` waits, a send that failed is tried
      again every ``poll_interval``, and when the scheduler names a new parameter server (the
      old one died) the pseudo-gradient goes to the new one, so the round is not lost.
    * A thread (:meth:`start`) reads the receive stream (``POST /resources/receive``) and files
      what arrives by name. :meth:`pull` waits for ``update-<round>`` from the parameter server
      and yields it piece by piece; :meth:`pull_initial` takes the newest ``global-<round>`` from
      it and sets :attr:`initial_round`. Files of rounds already past, with other names, or from
      a peer that is not the parameter server are deleted unread; every file is deleted once
      read.

    The parameter server is :attr:`parameter_server`, which the caller keeps current (None: not
    known yet; a pull waits for it). While a pull waits it calls ``poll()`` every
    ``poll_interval`` seconds: the executor reports its metrics there, which also updates the
    parameter server, and raises there to end the wait when the job is being stopped.
    :meth:`close` ends the receive thread and any pull still waiting (``ConnectionError``).
    """

    def __init__(self, client: BridgeClient, work_dir: Path, *,
                 parameter_server: str | None = None, poll: Callable[[], None] | None = None,
                 poll_interval: float = POLL_INTERVAL) -> None:
        super().__init__()
        if not poll_interval > 0:
            raise ValueError(f"Invalid poll_interval: {poll_interval}")
        self.client = client
        self.work_dir = Path(work_dir)
        self.parameter_server = parameter_server
        self.poll = poll
        self.poll_interval = poll_interval
        #: the round of the global model :meth:`pull_initial` took; None before
        self.initial_round: int | None = None
        self._files: dict[tuple[str, int], list[_Arrived]] = {}
        self._changed = threading.Condition()
        self._error: BaseException | None = None
        self._stream: EventStream | None = None
        self._thread: threading.Thread | None = None
        self._pending: _Pending | None = None

    # -- the receive thread ---------------------------------------------------------------------
    def start(self) -> None:
        """Open the receive stream and start reading it (once)."""
        if self._thread is not None:
            return
        self._stream = self.client.open_receive()
        self._thread = threading.Thread(target=self._receive, args=(self._stream,),
                                        name="hypha-receive", daemon=True)
        self._thread.start()

    def _receive(self, stream: EventStream) -> None:
        error: BaseException
        try:
            for event in stream:
                self._arrive(event)
            error = ConnectionError("the bridge ended the receive stream (the job is ending)")
        except Exception as exc:  # OSError, HTTPException, BridgeError, ...: all end the stream
            error = ConnectionError(f"the bridge's receive stream broke: "
                                    f"{type(exc).__name__}: {exc}")
        with self._changed:
            if not self.closed:
                log.warning("%s", error)
            self._error = error
            self._changed.notify_all()

    def _arrive(self, event: dict[str, Any]) -> None:
        path, name, peer, size = (event.get(k) for k in ("path", "name", "peer", "size"))
        if not (isinstance(path, str) and isinstance(name, str) and isinstance(peer, str)
                and isinstance(size, int)):
            log.warning("ignoring a malformed receive event %r", event)
            return
        where = (self.work_dir / path).resolve()
        if not where.is_relative_to(self.work_dir.resolve()):
            log.warning("ignoring a receive event for %s, outside the work directory", path)
            return
        match = _FILE_NAME.fullmatch(name)
        if match is None or match[1] == "delta":
            log.warning("deleting %s from %s: a training worker takes only update-<round> and "
                        "global-<round> files", name, peer)
            _remove(where)
            return
        arrived = _Arrived(match[1], int(match[2]), where, peer, size)
        with self._changed:
            self._files.setdefault((arrived.kind, arrived.round), []).append(arrived)
            self._changed.notify_all()

    # -- waiting for a file ---------------------------------------------------------------------
    def _take(self, kind: str, round_: int | None, timeout: float, what: str) -> _Arrived:
        """The file ``kind-round_`` (the newest ``kind-*`` for None) from the parameter server;
        drops what is stale or from other peers on the way. Raises TimeoutError,
        ConnectionError."""
        if not timeout > 0:
            raise ValueError(f"Invalid timeout: {timeout}")
        deadline = time.monotonic() + timeout
        next_poll = next_delivery = time.monotonic() + self.poll_interval
        while True:
            with self._changed:
                found = self._pick(kind, round_)
                if found is not None:
                    return found
                if self._error is not None:
                    raise ConnectionError(f"{what}: {self._error}")
                if self.closed:
                    raise ConnectionError(f"{what}: the link is closed")
                now = time.monotonic()
                if now >= deadline:
                    server = self.parameter_server or "no parameter server named yet"
                    raise TimeoutError(f"{what} did not come within {timeout:g} s "
                                       f"(parameter server: {server})")
                self._changed.wait(min(deadline, next_poll) - now)
            if self.poll is not None and time.monotonic() >= next_poll:
                self.poll()
                next_poll = time.monotonic() + self.poll_interval
            if time.monotonic() >= next_delivery:
                self._deliver()
                next_delivery = time.monotonic() + self.poll_interval

    def _pick(self, kind: str, round_: int | None) -> _Arrived | None:
        """Under the lock: the wanted file (``round_`` None: the newest), after deleting the
        files of other peers and of rounds already past (and, when waiting for an update, global
        models: they are taken only when joining)."""
        server = self.parameter_server
        if server is None:
            return None  # nothing can be judged yet
        for key, entries in list(self._files.items()):
            for entry in list(entries):
                if entry.peer != server:
                    log.warning("deleting %s-%d from %s, which is not the parameter server (%s)",
                                *key, entry.peer, server)
                    entries.remove(entry)
                    _remove(entry.path)
            if not entries:
                del self._files[key]
        newest = max((r for k, r in self._files if k == "global"), default=-1)
        for key in list(self._files):
            k, r = key
            if (round_ is None and k == "global" and r < newest) or (
                    round_ is not None and (k == "global" or r < round_)):
                log.info("deleting %s-%d: %s", k, r, "a global model is taken only when joining"
                         if k == "global" and round_ is not None else "that round is past")
                for entry in self._files.pop(key):
                    _remove(entry.path)
        key = (kind, newest if round_ is None else round_)
        wanted = self._files.get(key)
        if not wanted:
            return None
        taken = wanted.pop(0)
        if not wanted:
            del self._files[key]
        return taken

    def _read(self, arrived: _Arrived) -> Iterator[bytes]:
        try:
            with open(arrived.path, "rb") as file:
                while piece := file.read(READ_PIECE):
                    self.bytes_received += len(piece)
                    yield piece
        finally:
            _remove(arrived.path)

    # -- ServerLink -----------------------------------------------------------------------------
    def push(self, round_: int, payload: Any) -> None:
        if self.parameter_server is None:
            raise ConnectionError(f"round {round_}: no parameter server to send to (the config "
                                  "names none and the scheduler has not named one)")
        if self._pending is not None:
            _remove(self._pending.path)
        relative = f"out/delta-{round_}.bin"
        path = self.work_dir / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        size = 0
        with open(path, "wb") as file:
            for piece in payload:
                file.write(piece)
                size += len(piece)
        self._pending = _Pending(round_, relative, path, size)
        self._deliver()

    def _deliver(self) -> None:
        """Send the pending pseudo-gradient to the parameter server unless it has it. A send
        that fails for the network's reasons (5xx) is tried again at the next call; a refusal
        (4xx: the server found it malformed, or does not take it) ends the round."""
        pending, server = self._pending, self.parameter_server
        if pending is None or server is None or pending.sent_to == server:
            return
        try:
            self.client.send(pending.relative, [server], strategy="all",
                             name=f"delta-{pending.round}")
        except BridgeError as exc:
            if exc.status < 500:
                raise ConnectionError(f"round {pending.round}: the parameter server {server} "
                                      f"refused the pseudo-gradient: {exc.message}") from None
            log.warning("round %d: sending the pseudo-gradient to the parameter server %s "
                        "failed (trying again while waiting for its update): %s", pending.round,
                        server, exc.message)
            return
        if pending.sent_to is not None:
            log.info("round %d: sent the pseudo-gradient again, to the new parameter server %s",
                     pending.round, server)
        pending.sent_to = server
        self.bytes_sent += pending.size

    def pull(self, round_: int, timeout: float) -> Iterator[bytes]:
        arrived = self._take("update", round_, timeout,
                             f"the parameter server's update of round {round_}")
        if self._pending is not None and self._pending.round <= round_:
            _remove(self._pending.path)
            self._pending = None
        return self._read(arrived)

    def pull_initial(self, timeout: float) -> Iterator[bytes]:
        arrived = self._take("global", None, timeout, "the parameter server's global model")
        self.initial_round = arrived.round
        return self._read(arrived)

    def close(self) -> None:
        with self._changed:
            super().close()
            self._changed.notify_all()
        if self._stream is not None:
            self._stream.close()
        if self._thread is not None:
            self._thread.join(timeout=5)


# ------------------------------------------------------------------------------------------------
# data


class DataError(RuntimeError):
    """A slice that cannot be trained on."""


class SliceBatches:
    """Batches of ``batch_size`` sequences from the job's slices of ``dataset``, fetched through
    the bridge one after the other (see the module docstring)."""

    def __init__(self, client: BridgeClient, work_dir: Path, dataset: str, batch_size: int,
                 seed: str) -> None:
        self.client = client
        self.work_dir = Path(work_dir)
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.slices = 0  #: slices fetched
        self.seq_len: int | None = None
        self._rows: torch.Tensor | None = None  #: the current slice, shuffled
        self._at = 0

    def _load(self) -> torch.Tensor:
        import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        n = self.slices
        reply = self.client.fetch(f"data/slice-{n}.safetensors", source="data",
                                  dataset=self.dataset)
        path = self.work_dir / reply["path"]
        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise DataError(f"slice {n} of {self.dataset!r} cannot be read: {exc}") from None
        finally:
            _remove(path)
        self.slices += 1
        tokens = tensors.get("tokens")
        if tokens is None:
            raise DataError(f"slice {n} of {self.dataset!r} holds {sorted(tensors)}, not "
                            "'tokens': it is not a text dataset")
        if tokens.dtype != torch.uint8 or tokens.dim() != 2 or tokens.shape[1] < 2 \
                or tokens.shape[0] < 1:
            raise DataError(f"slice {n} of {self.dataset!r}: tokens are {tokens.dtype} of shape "
                            f"{list(tokens.shape)}; expected uint8 [examples, seq_len + 1]")
        seq_len = tokens.shape[1] - 1
        if self.seq_len is not None and seq_len != self.seq_len:
            raise DataError(f"slice {n} of {self.dataset!r} holds sequences of {seq_len} tokens, "
                            f"the earlier ones {self.seq_len}")
        self.seq_len = seq_len
        digest = hashlib.sha256(f"{self.seed}:{n}".encode()).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
        return tokens[torch.randperm(tokens.shape[0], generator=generator)]

    def next(self) -> torch.Tensor:
        """The next batch: ``[batch_size, seq_len + 1]`` uint8 tokens."""
        import torch

        parts = []
        wanted = self.batch_size
        while wanted:
            if self._rows is None or self._at >= self._rows.shape[0]:
                self._rows, self._at = self._load(), 0
            take = self._rows[self._at:self._at + wanted]
            self._at += take.shape[0]
            wanted -= take.shape[0]
            parts.append(take)
        return parts[0] if len(parts) == 1 else torch.cat(parts)


# ------------------------------------------------------------------------------------------------
# the training loop


def _pick_device(name: str) -> torch.device:
    import torch

    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"job config: 'device' is {name!r}, but torch {torch.__version__} "
                              "sees no CUDA device here (torch.cuda.is_available() is False); "
                              "use 'cpu' or 'auto'")
        index = int(name.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"job config: 'device' is {name!r}, but torch sees "
                              f"{torch.cuda.device_count()} CUDA device(s)")
        return torch.device("cuda", index)
    return torch.device("cpu")


def _throttle() -> float:
    raw = os.environ.get(THROTTLE_ENV, "1")
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise ConfigError(f"{THROTTLE_ENV} must be a number >= 1 (a test/benchmark slow-down "
                          f"factor), got {raw!r}")
    return value


class _Trainer:
    """One run of the loop; its counters are what the metrics report."""

    def __init__(self, config: TrainConfig, job_id: str, client: BridgeClient, work_dir: Path,
                 stopping: threading.Event) -> None:
        self.config = config
        self.job_id = job_id
        self.client = client
        self.work_dir = work_dir
        self.stopping = stopping
        self.throttle = _throttle()
        self.batches = 0  #: in all
        self.rounds_done = 0  #: syncs completed by this job
        self.round_step = 0  #: batches since the last sync
        self.tokens = 0
        self.idle = 0.0
        self.started = time.monotonic()
        self.loss: float | None = None
        self.batch_seconds: float | None = None
        self.instruction: dict[str, Any] = {}
        self.named_server: str | None = None  #: the latest the scheduler named
        self.link: BridgeServerLink | None = None
        self._reporting = threading.Lock()

    # -- metrics --------------------------------------------------------------------------------
    def values(self) -> dict[str, float]:
        link = self.link
        values = {"round": float(self.rounds_done), "round_step": float(self.round_step),
                  "tokens": float(self.tokens),
                  "bytes_sent": float(link.bytes_sent if link else 0),
                  "bytes_received": float(link.bytes_received if link else 0),
                  "idle_seconds": self.idle,
                  "wall_seconds": time.monotonic() - self.started}
        if self.loss is not None and math.isfinite(self.loss):
            values["loss"] = self.loss
        if self.batch_seconds is not None:
            values["batch_seconds"] = self.batch_seconds
        return values

    def report(self) -> None:
        """``POST /metrics`` with the current numbers; keeps the scheduler's answer."""
        with self._reporting:  # NOTE: the exchange thread polls too; steps must not go back
            answer = self.client.report(self.batches, self.values())
        rnd, batches, server = (answer.get(k) for k in ("round", "batches", "parameter_server"))
        if not ((rnd is None or isinstance(rnd, int)) and (batches is None or (
                isinstance(batches, int) and batches >= 1)) and (server is None or isinstance(
                server, str))):
            raise BridgeError(502, f"the bridge answered the metrics report with {answer!r}",
                              answer)
        self.instruction = answer
        if server is not None and server != self.named_server:
            log.info("the scheduler names %s as the parameter server", server)
            self.named_server = server
        if self.link is not None:
            self.link.parameter_server = self.parameter_server

    def poll(self) -> None:
        """While waiting for the parameter server: stop if asked; report (failures logged)."""
        if self.stopping.is_set():
            raise _Terminated
        try:
            self.report()
        except (OSError, BridgeError) as exc:
            log.warning("metrics report failed while waiting: %s", exc)

    @property
    def parameter_server(self) -> str | None:
        return self.named_server or self.config.parameter_server

    def target(self) -> int:
        """Batches to run in the current round: the scheduler's, when its latest answer is about
        this round (an answer about the round before comes until the first report of this one
        has been answered), else ``sync_batches``."""
        batches = self.instruction.get("batches")
        if isinstance(batches, int) and self.instruction.get("round") == self.rounds_done:
            return batches
        return self.config.sync_batches

    # -- the run --------------------------------------------------------------------------------
    def run(self) -> None:
        import torch
        import torch.nn.functional as F

        from hypha.models import ModelSpecError, load_model, parameter_groups
        from hypha.optim import DiLoCo

        config = self.config
        device = _pick_device(config.device)
        torch.manual_seed(config.model_seed)
        try:
            model = load_model(config.model)
            groups = parameter_groups(model, config.weight_decay)
        except (ModelSpecError, ValueError) as exc:
            raise ConfigError(f"job config: 'model': {exc}") from None
        model.to(device)
        model.train()
        if config.inner_optimizer == "adamw":
            inner: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=config.lr,
                                                             betas=(0.9, 0.95))
        else:
            inner = torch.optim.SGD(groups, lr=config.lr, momentum=0.9, nesterov=True)
        params = [p for group in inner.param_groups for p in group["params"]]
        loss_of = getattr(model, "loss", None)

        self.report()  # tells the scheduler this worker is here; may name the server
        data = SliceBatches(self.client, self.work_dir, config.dataset, config.batch_size,
                            f"{config.model_seed}:{self.job_id}")
        first = data.next()
        context = getattr(getattr(model, "cfg", None), "context", None)
        if isinstance(context, int) and data.seq_len is not None and data.seq_len > context:
            raise ConfigError(f"dataset {config.dataset!r} holds sequences of {data.seq_len} "
                              f"tokens, but model {config.model!r} takes at most {context}: "
                              "prepare the dataset with a shorter --seq-len or choose a model "
                              "with a longer context")

        self.link = BridgeServerLink(self.client, self.work_dir,
                                     parameter_server=self.parameter_server, poll=self.poll)
        self.link.start()
        try:
            opt = DiLoCo(inner, comm=self.link, sync_every=None,
                         codec=config.codec, error_feedback=config.error_feedback,
                         fragments=config.fragments, outer_lr=config.outer_lr,
                         outer_momentum=config.outer_momentum, timeout=config.round_timeout)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"job config: DiLoCo refuses the settings: {exc}") from None
        joined = self.link.initial_round or 0
        rounds = config.rounds - joined
        log.info("job %s: %s with %d parameters on %s; joined at round %d of %d; slices of %d "
                 "tokens", self.job_id, config.model, sum(p.numel() for p in params), device,
                 joined, config.rounds, data.seq_len)

        self.started = time.monotonic()
        round_losses: list[float] = []
        round_started, round_tokens = time.monotonic(), 0
        ahead: torch.Tensor | None = first
        while self.rounds_done < rounds:
            if self.stopping.is_set():
                raise _Terminated
            batch, ahead = (ahead if ahead is not None else data.next()), None
            seq = batch.to(device=device, dtype=torch.long, non_blocking=True)
            x, y = seq[:, :-1], seq[:, 1:]
            for group in inner.param_groups:
                group["lr"] = config.lr * min(1.0, (self.batches + 1) / config.warmup) \
                    if config.warmup else config.lr
            t0 = time.perf_counter()
            if callable(loss_of):
                loss = loss_of(x, y)
            else:
                logits = model(x)
                loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            opt.step()
            value = float(loss.detach())
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            compute = time.perf_counter() - t0
            if self.throttle > 1:
                time.sleep((self.throttle - 1) * compute)
                compute *= self.throttle
            self.batches += 1
            self.round_step += 1
            self.tokens += y.numel()
            round_tokens += y.numel()
            self.loss, self.batch_seconds = value, compute
            if math.isfinite(value):
                round_losses.append(value)
            self.report()
            if self.round_step < self.target():
                continue
            t0 = time.monotonic()
            opt.sync()
            self.idle += time.monotonic() - t0
            self.rounds_done += 1
            self.round_step = 0
            elapsed = time.monotonic() - round_started
            mean = sum(round_losses) / len(round_losses) if round_losses else math.nan
            log.info("round %d/%d: loss %.4f, %.0f tokens/s, %d batches, sync %.2f s",
                     joined + self.rounds_done, config.rounds, mean,
                     round_tokens / max(elapsed, 1e-9), self.batches,
                     time.monotonic() - t0)
            round_losses, round_started, round_tokens = [], time.monotonic(), 0
            self.report()
        t0 = time.monotonic()
        opt.synchronize()  # with several fragments the last round may still be in flight
        self.idle += time.monotonic() - t0
        self._save(opt.global_parameters(), params, model)
        opt.close()
        self.report()
        log.info("job %s: done: %d rounds, %d batches, %d tokens, %.1f s", self.job_id,
                 self.rounds_done, self.batches, self.tokens, time.monotonic() - self.started)

    def _save(self, globals_: list[torch.Tensor], params: list[torch.Tensor],
              model: torch.nn.Module) -> None:
        from safetensors.torch import save_file

        names = {id(p): name for name, p in model.named_parameters()}
        tensors = {names[id(p)]: g.detach().to("cpu", copy=True).contiguous()
                   for p, g in zip(params, globals_, strict=True)}
        path = self.work_dir / FINAL_MODEL
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        save_file(tensors, str(partial), metadata={"job": self.job_id,
                                                    "rounds": str(self.rounds_done)})
        os.replace(partial, path)


# ------------------------------------------------------------------------------------------------
# the process


def _read_job(path: str | None) -> dict[str, Any]:
    if not path:
        raise ConfigError("no job spec: pass JOB_JSON or set HYPHA_JOB_JSON")
    try:
        with open(path, "rb") as file:
            job = json.load(file)
    except OSError as exc:
        raise ConfigError(f"cannot read the job spec {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise ConfigError(f"the job spec {path} is not JSON: {exc}") from None
    if not isinstance(job, dict):
        raise ConfigError(f"the job spec {path} is not a JSON object")
    if not isinstance(job.get("id"), str) or not job["id"]:
        raise ConfigError(f"the job spec {path} has no 'id'")
    if "config" not in job:
        raise ConfigError(f"the job spec {path} has no 'config'")
    return job


def _arguments() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hypha.executors.train",
        description="Hypha's training executor: one DiLoCo worker, run by a worker as a job.",
        epilog="configuration keys (the job's config):\n" + describe_keys(),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("job_json", nargs="?", default=os.environ.get("HYPHA_JOB_JSON"),
                        help="the job spec (default: $HYPHA_JOB_JSON)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the executor; returns the exit status (see the module docstring)."""
    logging.basicConfig(stream=sys.stderr, level=logging.INFO,
                        format="%(asctime)s %(levelname)s train: %(message)s")
    args = _arguments().parse_args(argv)
    stopping = threading.Event()
    armed = True

    def on_sigterm(signum: int, frame: FrameType | None) -> None:
        nonlocal armed
        stopping.set()
        if armed:  # the first SIGTERM interrupts whatever runs; later ones only insist
            armed = False
            raise _Terminated

    try:
        previous = signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread (called from a test): no handler
        previous = None
    trainers: list[_Trainer] = []
    try:
        return _run(args.job_json, stopping, trainers)
    except _Terminated:
        print("hypha.executors.train: stopped by SIGTERM", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    finally:
        armed = False
        for trainer in trainers:
            if trainer.link is not None:
                trainer.link.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(job_json: str | None, stopping: threading.Event, trainers: list[_Trainer]) -> int:
    try:
        job = _read_job(job_json)
        config = parse_config(job["config"])
        socket_path = os.environ.get("HYPHA_SOCKET_PATH")
        if not socket_path:
            raise ConfigError("HYPHA_SOCKET_PATH is not set: the worker sets it to the job "
                              "bridge's socket")
        work_dir = Path(os.environ.get("HYPHA_WORK_DIR") or os.getcwd())
        _pick_device(config.device)  # fail early, before joining anything
        trainer = _Trainer(config, job["id"], BridgeClient(socket_path), work_dir, stopping)
        trainers.append(trainer)
        trainer.run()
        return EXIT_OK
    except ConfigError as exc:
        print(f"hypha.executors.train: {exc}", file=sys.stderr, flush=True)
        return EXIT_CONFIG
    except Exception as exc:
        if stopping.is_set():  # SIGTERM came inside something that wrapped it
            raise _Terminated from None
        known = (TimeoutError, ConnectionError, BridgeError, DataError)
        if not isinstance(exc, known) and not isinstance(exc.__cause__, known):
            log.exception("unexpected failure")
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        print(f"hypha.executors.train: failed: {reason}", file=sys.stderr, flush=True)
        return EXIT_FAILED


__doc__ = (__doc__ or "") + "\n" + describe_keys() + "\n"

if __name__ == "__main__":
    sys.exit(main())
