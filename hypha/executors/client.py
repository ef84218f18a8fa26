"""A dependency-free client for the Hypha job bridge (Python standard library only).

This file is self-contained: copy it into a training project that does not install Hypha
(``examples/bridge_client.py`` re-exports it for the examples in this repository).

The worker starts your script with ``HYPHA_SOCKET_PATH`` set to the bridge's Unix socket (and
``HYPHA_WORK_DIR``, ``HYPHA_JOB_JSON``). Paths are relative to the work directory::

    from bridge_client import BridgeClient

    bridge = BridgeClient()
    bridge.fetch("data/shard-0.safetensors", source="data", dataset="fineweb", slice=0)
    bridge.send("out/delta.bin", peers=[parameter_server], strategy="one")
    answer = bridge.report(step, {"loss": 2.31, "batch_seconds": 0.12})
    for event in bridge.receive():  # blocks; one dict per file that a peer sent
        update = open(event["path"], "rb").read()

The same from a shell: ``curl --unix-socket "$HYPHA_SOCKET_PATH" http://bridge/health``.
Errors come back as :class:`BridgeError` with the HTTP status and the bridge's message.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
from collections.abc import Iterator
from types import TracebackType
from typing import Any

__all__ = ["BridgeClient", "BridgeError", "EventStream"]


class BridgeError(Exception):
    """The bridge refused or failed a request: ``status`` and its ``message``."""

    def __init__(self, status: int, message: str, body: dict[str, Any]) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.message = message
        self.body = body


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float | None) -> None:
        super().__init__("bridge", timeout=timeout)
        self._unix_path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        sock.connect(self._unix_path)
        self.sock = sock


class EventStream:
    """An open receive stream (``POST /resources/receive``): iterate it for the files that peers
    send, as ``{"path", "peer", "name", "size"}`` dicts, each once it is complete (keepalive
    comments are skipped). Iteration ends when the worker has no more files for this job, and
    raises (``http.client.IncompleteRead``, ``OSError``) when the bridge goes away.

    :meth:`close` may be called from another thread: it ends an iteration that is waiting
    (quietly: the iteration just ends)."""

    def __init__(self, connection: _UnixConnection, response: http.client.HTTPResponse) -> None:
        self._connection = connection
        self._response = response
        self._lock = threading.Lock()
        self._iterating = False
        self.closed = False

    def __iter__(self) -> Iterator[dict[str, Any]]:
        with self._lock:
            if self.closed:
                return
            if self._iterating:
                raise RuntimeError("this receive stream is already being read")
            self._iterating = True
        try:
            yield from self._events()
        except Exception:
            if not self.closed:
                raise
        finally:
            with self._lock:
                self._iterating = False
                self.closed = True
                self._connection.close()

    def _events(self) -> Iterator[dict[str, Any]]:
        event, data = "message", list[str]()
        while line := self._response.readline():
            text = line.decode("utf-8").rstrip("\r\n")
            if not text:  # a blank line ends an event
                if data:
                    payload = json.loads("\n".join(data))
                    if event == "error":
                        raise BridgeError(payload.get("status", 500), str(payload.get("error")),
                                          payload)
                    yield payload
                event, data = "message", []
            elif text.startswith(":"):
                continue  # a comment: keepalive
            else:
                key, _, value = text.partition(":")
                value = value[1:] if value.startswith(" ") else value
                if key == "data":
                    data.append(value)
                elif key == "event":
                    event = value

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if not self._iterating:
                self._connection.close()
                return
            # NOTE: another thread is reading: wake it by shutting the socket down (closing the
            # connection under its feet would break http.client's state); it closes it then
            sock = self._connection.sock
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def __enter__(self) -> EventStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class BridgeClient:
    """Talks to the bridge at ``socket_path`` (default: ``$HYPHA_SOCKET_PATH``). ``timeout``
    (seconds, None = wait forever) bounds each socket operation; fetches can take long."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        if socket_path is None:
            socket_path = os.environ.get("HYPHA_SOCKET_PATH")
            if not socket_path:
                raise ValueError("no bridge socket: pass socket_path or set HYPHA_SOCKET_PATH "
                                 "(the worker sets it for the jobs it starts)")
        self.socket_path = socket_path
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict[str, Any] | None,
              ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        connection = _UnixConnection(self.socket_path, self.timeout)
        data = None if body is None else json.dumps(body, allow_nan=False).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        try:
            connection.request(method, path, body=data, headers=headers)
            response = connection.getresponse()
        except BaseException:
            connection.close()
            raise
        if response.status >= 400:
            raw = response.read()
            connection.close()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = {"error": raw.decode("utf-8", "replace")}
            raise BridgeError(response.status, str(payload.get("error")), payload)
        return connection, response

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
              ) -> dict[str, Any]:
        connection, response = self._open(method, path, body)
        try:
            return json.loads(response.read())
        finally:
            connection.close()

    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def fetch(self, dest: str, *, source: str = "path", path: str | None = None,
              peer: str | None = None, dataset: str | None = None,
              slice: int | None = None) -> dict[str, Any]:
        """Fetch a file into ``dest``: a local ``path`` (``source="path"``), ``path`` from
        ``peer`` (``"peer"``) or ``slice`` of ``dataset`` (``"data"``; without ``slice``: the
        job's next slice). Returns ``{"path", "size"}`` once the file is complete."""
        body: dict[str, Any] = {"source": source, "dest": dest}
        for key, value in (("path", path), ("peer", peer), ("dataset", dataset),
                           ("slice", slice)):
            if value is not None:
                body[key] = value
        return self._call("POST", "/resources/fetch", body)

    def send(self, path: str, peers: list[str], *, strategy: str = "all",
             name: str | None = None) -> list[str]:
        """Send ``path`` to ``peers`` ("all", the first reachable "one", or a "random" one);
        returns the peers that got it."""
        body: dict[str, Any] = {"path": path, "peers": peers, "strategy": strategy}
        if name is not None:
            body["name"] = name
        return self._call("POST", "/resources/send", body)["sent_to"]

    def report(self, step: int, values: dict[str, float]) -> dict[str, Any]:
        """Report metrics measured at training ``step`` (an int >= 0, never lower than the last
        one): ``values`` maps up to 128 names (1-64 of ``A-Z a-z 0-9 _ . / -``) to finite
        numbers. Returns at once with the scheduler's latest instruction, ``{"round",
        "batches", "parameter_server"}`` (all None while there is none): in outer round
        ``round`` run ``batches`` batches from the last synchronisation, then send the
        pseudo-gradient to ``parameter_server``."""
        return self._call("POST", "/metrics", {"step": step, "values": values})

    def open_receive(self) -> EventStream:
        """Open a receive stream (see :class:`EventStream`); close it when done."""
        connection, response = self._open("POST", "/resources/receive", None)
        return EventStream(connection, response)

    def receive(self) -> Iterator[dict[str, Any]]:
        """Files that peers send, as ``{"path", "peer", "name", "size"}``, each once it is
        complete (a Server-Sent Events stream; keepalive comments are skipped). Ends when the
        worker has no more files for this job; raises (``http.client.IncompleteRead``,
        ``ConnectionError``) when the bridge goes away."""
        with self.open_receive() as stream:
            yield from stream


if __name__ == "__main__":
    print(json.dumps(BridgeClient().health()))
