"""The job bridge: an HTTP API on a per-job Unix socket through which a training script, in any
language, asks its worker to move files (``curl --unix-socket <path> http://bridge/health``).

Endpoints (JSON bodies of at most 64 KiB; errors are ``{"error": "..."}`` with a 4xx/5xx)::

    GET  /health             → {"ok": true, "job_id": "..."}
    POST /resources/fetch    {"source": "peer"|"data"|"path", "dest": "rel/path",
                              "path": "...", "peer": "<peer id>", "dataset": "...", "slice": 3}
                             → {"path": "rel/path", "size": n}       (when the file is complete)
    POST /resources/send     {"path": "rel/file", "peers": ["<peer id>", ...],
                              "strategy": "all"|"one"|"random", "name": "..."}
                             → {"sent_to": ["<peer id>", ...]}
    POST /resources/receive  → text/event-stream: one ``data: {"path", "peer", "name", "size"}``
                             event per file that arrived under ``incoming/``, ``: keepalive``
                             comments in between (GET works too, for EventSource clients)
    POST /metrics            {"step": n >= 0, "values": {"loss": 2.31, ...}}
                             → {"round": int|null, "batches": int|null,
                                "parameter_server": "<peer id>"|null}
                             (the scheduler's latest instruction; see BridgeBackend.report)

``/metrics`` takes at most :data:`MAX_METRICS` values, each named like ``loss`` or
``train/tokens_per_s`` (1-64 of ``A-Z a-z 0-9 _ . / -``) with a finite number; it answers at once
(the backend forwards the report in the background).

Paths in requests are relative to the job's work directory and confined to it
(``hypha.executors._paths``); ``.hypha/`` in it is the worker's and is never written through
the bridge. The bridge itself never touches the network: it calls a :class:`BridgeBackend`.

Served by hypercorn on trio (HTTP/1.1, and h2c for clients that ask) with a hand-written ASGI app.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import re
import shutil
import socket
import stat
import tempfile
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath
from typing import Any, Literal, Protocol, TypedDict, cast

import trio

from hypha._asgi import answer_lifespan, serve_asgi
from hypha.executors._paths import (
    MAX_PATH_BYTES,
    AtomicFile,
    PathRefused,
    check_name,
    check_relative,
    confine,
    confine_destination,
    open_for_reading,
    private_dir,
)

__all__ = [
    "DEFAULT_KEEPALIVE_INTERVAL",
    "MAX_BODY_BYTES",
    "MAX_METRICS",
    "METRIC_NAME",
    "PRIVATE_DIR",
    "STRATEGIES",
    "BridgeBackend",
    "BridgeError",
    "FetchRequest",
    "IncomingFile",
    "Instruction",
    "JobBridge",
    "deliver",
    "incoming_destination",
    "read_chunks",
    "write_chunks",
]

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024
DEFAULT_KEEPALIVE_INTERVAL = 15.0  # seconds between ": keepalive" comments on a receive stream
PRIVATE_DIR = ".hypha"  # in the work dir: the worker's (socket, job.json, job.log); 0700
SOCKET_NAME = "bridge.sock"
# sockaddr_un.sun_path is 108 bytes on Linux, NUL included (104 on macOS)
MAX_SOCKET_PATH_BYTES = 107
STRATEGIES = ("all", "one", "random")
MAX_PEERS = 1024
MAX_ID_CHARS = 256  # peer ids and dataset names
# NOTE: these two mirror hypha.messages.metrics (MetricName, MetricsReport's MaxItems), which the
# bridge does not import (it would load the network stack); a unit test checks they agree.
#: The most values one ``POST /metrics`` may carry.
MAX_METRICS = 128
#: What a metric's name looks like: ``loss``, ``train/tokens_per_s``.
METRIC_NAME = re.compile(r"[A-Za-z0-9_./-]{1,64}")
MAX_STEP = (1 << 63) - 1
_CHUNK = 1 << 20

Source = Literal["peer", "data", "path"]


class BridgeError(Exception):
    """An error with the HTTP status the bridge answers it with (400–599).

    ``details`` are merged into the JSON error body (e.g. ``{"sent_to": [...], "failed": {...}}``
    for a send that reached only some peers)."""

    def __init__(self, status: int, message: str,
                 details: Mapping[str, object] | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"Invalid status: {status} (expected 400-599)")
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = dict(details or {})


def _optional_str(body: Mapping[str, object], key: str, limit: int) -> str | None:
    value = body.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value or "\x00" in value:
        raise BridgeError(400, f"{key} must be a non-empty string without NUL bytes, "
                               f"got {value!r}")
    if len(value.encode("utf-8", "surrogatepass")) > limit:
        raise BridgeError(400, f"{key} is longer than {limit} bytes")
    return value


def _metrics_report(body: Mapping[str, object]) -> tuple[int, dict[str, float]]:
    """The step and values of a ``POST /metrics`` body; ``BridgeError(400)`` says what is
    wrong."""
    _refuse_unknown(body, frozenset({"step", "values"}))
    if "step" not in body:
        raise BridgeError(400, "missing 'step' (the training step the values were measured at, "
                               "an integer >= 0)")
    step = body["step"]
    if not isinstance(step, int) or isinstance(step, bool) or not 0 <= step <= MAX_STEP:
        raise BridgeError(400, f"step must be an integer from 0 to {MAX_STEP}, got {step!r}")
    values = body.get("values")
    if not isinstance(values, dict):
        raise BridgeError(400, "values must be a JSON object of metric name → number, got "
                               f"{type(values).__name__ if 'values' in body else 'nothing'}")
    if len(values) > MAX_METRICS:
        raise BridgeError(400, f"at most {MAX_METRICS} values per report, got {len(values)}")
    checked: dict[str, float] = {}
    for name, value in values.items():
        if not METRIC_NAME.fullmatch(name):
            raise BridgeError(400, f"metric name {name[:80]!r} is not 1-64 characters of "
                                   "letters, digits, '_', '.', '/' and '-'")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise BridgeError(400, f"value of {name!r} must be a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise BridgeError(400, f"value of {name!r} must be finite, got {value!r}")
        checked[name] = number
    return step, checked


def _refuse_unknown(body: Mapping[str, object], known: frozenset[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        raise BridgeError(400, f"unknown field(s) {', '.join(map(repr, unknown))}; expected "
                               f"{', '.join(sorted(known))}")


@dataclass(frozen=True)
class FetchRequest:
    """What ``POST /resources/fetch`` asks for; checked when constructed (``BridgeError(400)``).

    - ``source="path"``: ``path`` is a local file (relative to the work dir, or absolute where the
      backend allows it).
    - ``source="peer"``: ``path`` names a file that ``peer`` offers.
    - ``source="data"``: slice ``slice`` of ``dataset`` from a data node (``path`` optional).

    ``dest`` is the destination relative to the work dir as the script gave it; the bridge has
    already confined it and hands the backend the resolved location separately.
    """

    source: Source
    dest: str
    path: str | None = None
    peer: str | None = None
    dataset: str | None = None
    slice: int | None = None

    FIELDS = frozenset({"source", "dest", "path", "peer", "dataset", "slice"})

    def __post_init__(self) -> None:
        if self.source not in ("peer", "data", "path"):
            raise BridgeError(400, f"source must be 'peer', 'data' or 'path', got {self.source!r}")
        if not isinstance(self.dest, str):
            raise BridgeError(400, f"dest must be a string, got {self.dest!r}")
        if self.slice is not None and (not isinstance(self.slice, int)
                                       or isinstance(self.slice, bool) or self.slice < 0):
            raise BridgeError(400, f"slice must be a non-negative integer, got {self.slice!r}")
        if self.source in ("peer", "path") and self.path is None:
            raise BridgeError(400, f"source {self.source!r} needs a 'path'")
        if self.source == "peer" and self.peer is None:
            raise BridgeError(400, "source 'peer' needs a 'peer' (the peer id to fetch from)")
        if self.source == "data" and self.dataset is None:
            raise BridgeError(400, "source 'data' needs a 'dataset'")

    @classmethod
    def from_json(cls, body: Mapping[str, object]) -> FetchRequest:
        _refuse_unknown(body, cls.FIELDS)
        if "dest" not in body:
            raise BridgeError(400, "missing 'dest' (where to put the file, relative to the work "
                                   "directory)")
        slice_ = body.get("slice")
        return cls(
            source=cast(Source, body.get("source")),
            dest=cast(str, body["dest"]),
            path=_optional_str(body, "path", MAX_PATH_BYTES),
            peer=_optional_str(body, "peer", MAX_ID_CHARS),
            dataset=_optional_str(body, "dataset", MAX_ID_CHARS),
            slice=cast(int | None, slice_),
        )


@dataclass(frozen=True)
class IncomingFile:
    """A file that a peer sent, already complete at ``path`` (absolute, inside the work dir,
    normally under ``incoming/``; see :func:`incoming_destination`)."""

    path: Path
    peer: str
    name: str
    size: int


class Instruction(TypedDict):
    """The answer to ``POST /metrics``: the scheduler's latest instruction to a DiLoCo training
    job (see :class:`hypha.messages.MetricsReceived`): in outer round ``round``, run
    ``batches`` batches in all from the last synchronisation, then send the pseudo-gradient to
    ``parameter_server``. All three are None until the scheduler has said, and for other jobs."""

    round: int | None
    batches: int | None
    parameter_server: str | None


class BridgeBackend(Protocol):
    """What the bridge needs from the worker; ``LocalBackend`` for one machine, a network
    backend for real jobs.

    The bridge has checked every request before calling: ``dest`` and ``path`` are absolute
    locations inside the work dir (for ``dest``: its directory resolved, nothing written yet),
    ``peers`` is a non-empty list of distinct non-empty strings, ``strategy`` is one of
    :data:`STRATEGIES`, ``name`` a plain file name.

    Errors map to HTTP statuses (anything else is a 500 with the exception in the message):

    ==============================================  ======
    ``BridgeError(status, message, details)``       status
    ``PathRefused``                                 its ``status`` (400 or 403)
    ``FileNotFoundError``                           404
    ``IsADirectoryError``, ``NotADirectoryError``   400
    ``PermissionError``                             403
    ``TimeoutError``, ``trio.TooSlowError``         504
    ==============================================  ======

    Use 502 for a peer or data node that failed or could not be reached, 503 when the network is
    down, 501 for a source this backend does not offer. A request whose client disconnects is
    cancelled (a ``trio.Cancelled`` reaches the backend); a partly written file must then vanish.
    """

    async def fetch(self, request: FetchRequest, dest: Path) -> int:
        """Fetch the requested file to ``dest``; returns its size in bytes once it is complete.

        Write with :func:`write_chunks` (or ``hypha.executors.AtomicFile``), never with
        ``open(dest, "wb")``: they create the file atomically without following symlinks, so a
        script cannot redirect the write outside its work dir and never sees a partial file."""
        ...

    async def send(self, path: Path, peers: list[str], strategy: str, name: str) -> list[str]:
        """Send the regular file ``path`` to ``peers`` as ``name``; returns the peers that got it.

        ``"all"``: every peer; ``"one"``: the first peer, in the given order, that accepts it;
        ``"random"``: one peer picked at random, falling back to the others in random order.
        :func:`deliver` implements these strategies (and the 502 when they fail) given a function
        that sends to one peer; read the file with :func:`read_chunks`."""
        ...

    def incoming(self) -> AsyncIterator[IncomingFile]:
        """Files from peers, each yielded once it is completely written (write them with
        ``write_chunks(incoming_destination(work_dir, name), ..., overwrite=False)``).

        Called once per open receive stream, possibly several at a time: each file goes to one
        of them. Files that arrive while no stream is open wait (in a bounded queue) for the
        next. The iterator ends when the backend closes. The bridge ``aclose()``s it when the
        stream ends, so an async generator is the natural implementation."""
        ...

    async def report(self, step: int, values: dict[str, float]) -> Instruction:
        """The job measured ``values`` at training ``step`` (checked: ``step >= 0``, at most
        :data:`MAX_METRICS` finite values with valid names); returns the latest instruction the
        backend knows (:class:`Instruction`; all None when there is none).

        It must return at once, without waiting on the network: the script calls it every
        batch. A backend that forwards reports does it in the background, and never fails the
        call because the forwarding failed."""
        ...


async def deliver(peers: Sequence[str], strategy: str,
                  send_one: Callable[[str], Awaitable[None]], *,
                  rng: random.Random | None = None) -> list[str]:
    """Run a send strategy over ``send_one(peer)`` (which raises when that peer fails).

    ``"all"`` sends to every peer concurrently; ``"one"`` tries the peers in order and stops at
    the first success; ``"random"`` does the same in a random order. Returns the peers that got
    the file; raises ``BridgeError(502)`` with ``details = {"sent_to": [...], "failed": {peer:
    reason}}`` when ``"all"`` missed any peer or ``"one"``/``"random"`` reached none. This is the
    one place where a peer's failure is decided to be fatal or not.
    """
    if strategy not in STRATEGIES:
        raise BridgeError(400, f"strategy must be one of {', '.join(STRATEGIES)}, got "
                               f"{strategy!r}")
    if not peers:
        raise BridgeError(400, "no peers to send to")
    failed: dict[str, str] = {}

    async def attempt(peer: str) -> bool:
        try:
            await send_one(peer)
        except Exception as error:
            failed[peer] = f"{type(error).__name__}: {error}"
            log.warning("sending to peer %s failed: %s", peer, failed[peer])
            return False
        return True

    if strategy == "all":
        sent: set[str] = set()

        async def to(peer: str) -> None:
            if await attempt(peer):
                sent.add(peer)

        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(to, peer)
        in_order = [peer for peer in peers if peer in sent]
        if failed:
            raise BridgeError(502, f"sent to {len(in_order)} of {len(peers)} peers; failed: "
                                   + "; ".join(f"{p}: {why}" for p, why in failed.items()),
                              {"sent_to": in_order, "failed": failed})
        return in_order
    order = list(peers)
    if strategy == "random":
        (rng or random.Random()).shuffle(order)
    for peer in order:
        if await attempt(peer):
            return [peer]
    raise BridgeError(502, "no peer could be reached: "
                           + "; ".join(f"{p}: {why}" for p, why in failed.items()),
                      {"sent_to": [], "failed": failed})


def incoming_destination(work_dir: Path, name: str) -> Path:
    """Where a file that a peer sent as ``name`` goes: ``<work_dir>/incoming/<name>`` (write it
    with ``overwrite=False``, which picks ``name-1.ext`` etc. when the name is taken).
    Raises :class:`PathRefused` for a name that is not a plain file name."""
    return confine_destination(work_dir, f"incoming/{check_name(name)}", "name")


async def write_chunks(dest: Path, chunks: AsyncIterable[bytes], *,
                       overwrite: bool = True) -> tuple[Path, int]:
    """Write ``chunks`` atomically to the checked destination ``dest`` (see :class:`AtomicFile`);
    returns the final path and the size. On an error or cancellation nothing is left behind."""
    out = await trio.to_thread.run_sync(AtomicFile, dest)
    try:
        size = 0
        pending = bytearray()
        async for chunk in chunks:
            pending += chunk
            size += len(chunk)
            if len(pending) >= _CHUNK:  # one thread hop per MiB, not per network frame
                await trio.to_thread.run_sync(out.file.write, bytes(pending))
                pending.clear()
        if pending:
            await trio.to_thread.run_sync(out.file.write, bytes(pending))
        final = await trio.to_thread.run_sync(partial(out.commit, overwrite=overwrite))
        return final, size
    finally:
        out.close()


async def read_chunks(path: Path, chunk_size: int = _CHUNK) -> AsyncIterator[bytes]:
    """The checked regular file ``path`` in chunks, opened without following symlinks."""
    file = await trio.to_thread.run_sync(open_for_reading, path)
    try:
        while chunk := await trio.to_thread.run_sync(file.read, chunk_size):
            yield chunk
    finally:
        file.close()


# --- the HTTP side -----------------------------------------------------------------------------

Scope = Mapping[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Disconnected(Exception):
    """The client went away; there is no one to answer."""


def _error_response(error: Exception) -> tuple[int, str, dict[str, object]]:
    """The status and message for an error from a handler or backend (see BridgeBackend)."""
    if isinstance(error, BridgeError):
        return error.status, error.message, error.details
    if isinstance(error, PathRefused):
        return error.status, error.message, {}
    if isinstance(error, FileNotFoundError):
        return 404, f"not found: {error.filename or error}", {}
    if isinstance(error, IsADirectoryError | NotADirectoryError):
        return 400, f"{error.strerror or 'wrong kind of file'}: {error.filename or error}", {}
    if isinstance(error, PermissionError):
        return 403, f"permission denied: {error.filename or error}", {}
    if isinstance(error, TimeoutError | trio.TooSlowError):
        return 504, str(error) or "timed out", {}
    return 500, f"internal error: {type(error).__name__}: {error}", {}


async def _send_json(send: Send, status: int, payload: Mapping[str, object],
                     headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _read_body(scope: Scope, receive: Receive) -> bytes:
    for name, value in scope.get("headers", ()):
        if name.lower() == b"content-length":
            try:
                declared = int(value)
            except ValueError:
                raise BridgeError(400, "invalid Content-Length") from None
            if declared > MAX_BODY_BYTES:
                raise BridgeError(413, f"request body is {declared} bytes; the limit is "
                                       f"{MAX_BODY_BYTES}")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        body += message.get("body", b"")
        if len(body) > MAX_BODY_BYTES:
            raise BridgeError(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _parse_object(body: bytes, *, required: bool = True) -> dict[str, object]:
    if not body.strip():
        if required:
            raise BridgeError(400, "expected a JSON object as the request body")
        return {}
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as error:
        raise BridgeError(400, f"request body is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise BridgeError(400, f"expected a JSON object, got {type(value).__name__}")
    return value


async def _until_disconnect(receive: Receive, scope: trio.CancelScope) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
    scope.cancel()


async def _unless_disconnected(receive: Receive, operation: Awaitable[dict[str, object]],
                               ) -> dict[str, object]:
    """Run ``operation``; cancel it when the client disconnects (a killed script must not leave
    a transfer running)."""
    result: dict[str, object] | None = None
    error: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_until_disconnect, receive, nursery.cancel_scope)
        try:
            result = await operation
        except Exception as raised:  # re-raised below, outside the nursery, without a group
            error = raised
        finally:
            nursery.cancel_scope.cancel()
    if error is not None:
        raise error
    if result is None:
        raise _Disconnected
    return result


def _short_temp_dir() -> str:
    for candidate in (os.environ.get("XDG_RUNTIME_DIR"), tempfile.gettempdir(), "/tmp"):
        if candidate and len(os.fsencode(candidate)) < 64 and os.path.isdir(candidate):
            return candidate
    return "/tmp"


@dataclass
class _Listener:
    sock: socket.socket
    path: Path
    temp_dir: Path | None = None


@dataclass(eq=False)
class JobBridge:
    """The bridge of one job. ``path = await nursery.start(bridge.serve)`` binds its socket and
    serves until cancelled; the socket is removed afterwards.

    The socket is ``<work_dir>/.hypha/bridge.sock``: the directory is created 0700 first, the
    socket is bound in it and then made 0600, so no other user can reach it at any moment. Where
    that path is too long for a Unix socket (107 bytes), a fresh ``mkdtemp`` directory (0700) in
    ``$XDG_RUNTIME_DIR`` or the temp dir holds it instead. ``socket_path`` overrides both; its
    directory must then be private (0700, ours) or not exist yet.
    """

    work_dir: Path
    backend: BridgeBackend
    job_id: str
    socket_path: Path | None = None
    keepalive_interval: float = DEFAULT_KEEPALIVE_INTERVAL
    _listener: _Listener | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if not self.keepalive_interval > 0:
            raise ValueError(f"Invalid keepalive_interval: {self.keepalive_interval}")
        self._root = Path(self.work_dir).resolve(strict=True)
        if not self._root.is_dir():
            raise NotADirectoryError(f"work dir {self.work_dir} is not a directory")
        self._routes: dict[str, tuple[tuple[str, ...],
                                      Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/health": (("GET",), self._health),
            "/resources/fetch": (("POST",), partial(self._json_endpoint, self._fetch)),
            "/resources/send": (("POST",), partial(self._json_endpoint, self._send)),
            "/resources/receive": (("POST", "GET"), self._receive),
            "/metrics": (("POST",), partial(self._json_endpoint, self._metrics)),
        }

    # --- lifecycle ---

    def bind(self) -> Path:
        """Create, bind and listen on the socket now (a no-op when bound); returns its path.
        Clients that connect before :meth:`serve` runs wait in the listen backlog."""
        if self._listener is None:
            self._listener = self._bind()
        return self._listener.path

    def _bind(self) -> _Listener:
        temp_dir: Path | None = None
        if self.socket_path is not None:
            path = Path(self.socket_path)
            private_dir(path.parent)
        else:
            path = private_dir(self._root / PRIVATE_DIR) / SOCKET_NAME
            if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
                temp_dir = Path(tempfile.mkdtemp(prefix="hypha-bridge-", dir=_short_temp_dir()))
                path = temp_dir / SOCKET_NAME
        if len(os.fsencode(str(path))) > MAX_SOCKET_PATH_BYTES:
            raise ValueError(f"socket path {path} is longer than {MAX_SOCKET_PATH_BYTES} bytes")
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            pass
        else:
            if not stat.S_ISSOCK(info.st_mode):
                raise PathRefused(f"{path} exists and is not a socket", status=403)
            os.unlink(path)  # a stale socket of an earlier bridge
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec by default
        try:
            sock.bind(str(path))
            # NOTE: the directory is 0700, so the socket is unreachable by others until this
            # chmod too. (hypercorn's own "unix:" bind can only narrow the mode through the
            # process-wide umask, which would race with other threads.)
            os.chmod(path, 0o600)
            info = os.lstat(path)
            if not stat.S_ISSOCK(info.st_mode) or stat.S_IMODE(info.st_mode) != 0o600:
                raise PathRefused(f"{path} changed while the bridge was binding it", status=403)
            sock.listen(64)
        except BaseException:
            sock.close()
            if temp_dir is not None:
                shutil.rmtree(temp_dir, ignore_errors=True)
            raise
        log.debug("job %s: bridge socket %s", self.job_id, path)
        return _Listener(sock, path, temp_dir)

    def close(self) -> None:
        """Close the socket and remove it (and its temp dir); idempotent."""
        listener, self._listener = self._listener, None
        if listener is None:
            return
        listener.sock.close()
        try:
            if stat.S_ISSOCK(os.lstat(listener.path).st_mode):
                os.unlink(listener.path)
        except FileNotFoundError:
            pass
        if listener.temp_dir is not None:
            try:
                os.rmdir(listener.temp_dir)
            except OSError as error:
                log.warning("could not remove %s: %s", listener.temp_dir, error)

    async def serve(self, *, task_status: Any = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        """Serve until cancelled; reports the socket path once it accepts connections."""
        path = self.bind()
        assert self._listener is not None
        try:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(
                    serve_asgi, self._asgi, self._listener.sock,
                    log=logging.getLogger(f"{__name__}.http"), keep_alive_timeout=30.0))
                log.info("job %s: bridge listening on %s", self.job_id, path)
                task_status.started(path)
        finally:
            self.close()

    # --- the ASGI app ---

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif scope["type"] == "http":
            await self._http(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        route = self._routes.get(path)
        if route is None:
            await _send_json(send, 404, {"error": f"no endpoint {path!r}; the bridge serves "
                                                  + ", ".join(sorted(self._routes))})
            return
        methods, handler = route
        if method not in methods:
            await _send_json(send, 405, {"error": f"{path} takes {' or '.join(methods)}, not "
                                                  f"{method}"},
                             [(b"allow", ", ".join(methods).encode())])
            return
        try:
            await handler(scope, receive, send)
        except _Disconnected:
            log.info("job %s: client went away during %s %s", self.job_id, method, path)
        except Exception as error:
            status, message, details = _error_response(error)
            counts = getattr(self.backend, "counts", None)  # the worker's (NetworkBackend)
            if counts is not None:
                counts[f"bridge {status}"] += 1
            if status >= 500:
                log.warning("job %s: %s %s failed with %d: %s", self.job_id, method, path,
                            status, message, exc_info=status == 500)
            else:
                log.info("job %s: %s %s refused with %d: %s", self.job_id, method, path,
                         status, message)
            await _send_json(send, status, {"error": message, **details})

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _send_json(send, 200, {"ok": True, "job_id": self.job_id})

    async def _json_endpoint(self, operation: Callable[[dict[str, object]],
                                                       Awaitable[dict[str, object]]],
                             scope: Scope, receive: Receive, send: Send) -> None:
        body = _parse_object(await _read_body(scope, receive))
        result = await _unless_disconnected(receive, operation(body))
        await _send_json(send, 200, result)

    def _destination(self, dest: object) -> tuple[PurePosixPath, Path]:
        relative = check_relative(dest, "dest")
        if relative.parts[0] == PRIVATE_DIR:
            raise PathRefused(f"dest {str(relative)!r} is inside {PRIVATE_DIR}/, which is "
                              "reserved for the worker", status=403)
        return relative, confine_destination(self._root, dest, "dest")

    async def _fetch(self, body: dict[str, object]) -> dict[str, object]:
        request = FetchRequest.from_json(body)
        relative, dest = self._destination(request.dest)
        size = await self.backend.fetch(request, dest)
        return {"path": str(relative), "size": size}

    async def _send(self, body: dict[str, object]) -> dict[str, object]:
        _refuse_unknown(body, frozenset({"path", "peers", "strategy", "name"}))
        if "path" not in body:
            raise BridgeError(400, "missing 'path' (the file to send, relative to the work "
                                   "directory)")
        relative = check_relative(body["path"], "path")
        source = confine(self._root, body["path"], "path")
        try:
            info = os.stat(source)
        except FileNotFoundError:
            raise BridgeError(404, f"path {str(relative)!r} does not exist in the work "
                                   "directory") from None
        if not stat.S_ISREG(info.st_mode):
            raise BridgeError(400, f"path {str(relative)!r} is not a regular file")
        peers = body.get("peers")
        if (not isinstance(peers, list) or not peers
                or not all(isinstance(p, str) and p and len(p) <= MAX_ID_CHARS for p in peers)):
            raise BridgeError(400, f"peers must be a non-empty list of peer ids, got {peers!r}")
        if len(peers) > MAX_PEERS:
            raise BridgeError(400, f"at most {MAX_PEERS} peers per send, got {len(peers)}")
        strategy = body.get("strategy", "all")
        if strategy not in STRATEGIES:
            raise BridgeError(400, f"strategy must be one of {', '.join(STRATEGIES)}, got "
                                   f"{strategy!r}")
        name = check_name(body.get("name", relative.name), "name")
        unique = list(dict.fromkeys(cast(list[str], peers)))
        sent = await self.backend.send(source, unique, strategy, name)
        return {"sent_to": sent}

    async def _metrics(self, body: dict[str, object]) -> dict[str, object]:
        step, values = _metrics_report(body)
        answer = await self.backend.report(step, values)
        return {"round": answer.get("round"), "batches": answer.get("batches"),
                "parameter_server": answer.get("parameter_server")}

    def _relative(self, path: Path) -> str:
        for root in (self._root, Path(self.work_dir)):
            if path.is_relative_to(root):
                return str(path.relative_to(root))
        raise RuntimeError(f"backend reported {path}, which is outside the work dir")

    async def _receive(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = _parse_object(await _read_body(scope, receive), required=False)
        _refuse_unknown(body, frozenset())
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream; charset=utf-8"),
                                (b"cache-control", b"no-cache")]})
        lock = trio.Lock()

        async def emit(data: bytes) -> None:
            async with lock:  # keepalives and events come from two tasks
                await send({"type": "http.response.body", "body": data, "more_body": True})

        async def keepalive() -> None:
            while True:
                await trio.sleep(self.keepalive_interval)
                await emit(b": keepalive\n\n")

        await emit(b": connected\n\n")
        disconnected = trio.CancelScope()
        with disconnected:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_until_disconnect, receive, disconnected)
                nursery.start_soon(keepalive)
                files = self.backend.incoming()
                try:
                    async for file in files:
                        event = {"path": self._relative(file.path), "peer": file.peer,
                                 "name": file.name, "size": file.size}
                        await emit(b"data: " + json.dumps(event).encode() + b"\n\n")
                except Exception as error:  # the response has started: report in-stream
                    status, message, _ = _error_response(error)
                    log.warning("job %s: receive stream failed: %s", self.job_id, message,
                                exc_info=status == 500)
                    await emit(b"event: error\ndata: " + json.dumps(
                        {"error": message, "status": status}).encode() + b"\n\n")
                finally:
                    aclose = getattr(files, "aclose", None)
                    if aclose is not None:
                        with trio.CancelScope(shield=True):
                            await aclose()
                    nursery.cancel_scope.cancel()
        if not disconnected.cancelled_caught:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
