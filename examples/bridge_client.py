"""A dependency-free client for the Hypha job bridge; copy it into your training project.

The worker starts your script with ``HYPHA_SOCKET_PATH`` set to the bridge's Unix socket (and
``HYPHA_WORK_DIR``, ``HYPHA_JOB_JSON``). Paths are relative to the work directory::

    from bridge_client import BridgeClient

    bridge = BridgeClient()
    bridge.fetch("data/shard-0.safetensors", source="data", dataset="fineweb", slice=0)
    bridge.send("out/delta.bin", peers=[parameter_server], strategy="one")
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
from collections.abc import Iterator
from typing import Any

__all__ = ["BridgeClient", "BridgeError"]


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


class BridgeClient:
    """Talks to the bridge at ``socket_path`` (default: ``$HYPHA_SOCKET_PATH``). ``timeout``
    (seconds, None = wait forever) bounds each socket operation; fetches can take long."""

    def __init__(self, socket_path: str | None = None, timeout: float | None = None) -> None:
        self.socket_path = socket_path or os.environ["HYPHA_SOCKET_PATH"]
        self.timeout = timeout

    def _open(self, method: str, path: str, body: dict[str, Any] | None,
              ) -> tuple[_UnixConnection, http.client.HTTPResponse]:
        connection = _UnixConnection(self.socket_path, self.timeout)
        data = None if body is None else json.dumps(body).encode()
        headers = {} if data is None else {"Content-Type": "application/json"}
        connection.request(method, path, body=data, headers=headers)
        response = connection.getresponse()
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
        ``peer`` (``"peer"``) or ``slice`` of ``dataset`` (``"data"``). Returns ``{"path",
        "size"}`` once the file is complete."""
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

    def receive(self) -> Iterator[dict[str, Any]]:
        """Files that peers send, as ``{"path", "peer", "name", "size"}``, each once it is
        complete (a Server-Sent Events stream; keepalive comments are skipped). Ends when the
        worker has no more files for this job; raises (``http.client.IncompleteRead``,
        ``ConnectionError``) when the bridge goes away."""
        connection, response = self._open("POST", "/resources/receive", None)
        try:
            event, data = "message", list[str]()
            while line := response.readline():
                text = line.decode("utf-8").rstrip("\r\n")
                if not text:  # a blank line ends an event
                    if data:
                        payload = json.loads("\n".join(data))
                        if event == "error":
                            raise BridgeError(payload.get("status", 500),
                                              str(payload.get("error")), payload)
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
        finally:
            connection.close()


if __name__ == "__main__":
    print(json.dumps(BridgeClient().health()))
