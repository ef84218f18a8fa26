"""Serving one directory's files, read-only, to peers: the serving side of ``/hypha/file-fetch/1``.

A node may serve one directory (the scheduler serves the job's files, ``[job] files``: initial
model weights, a training script). A peer sends :class:`~hypha.messages.FetchFile` with a path
relative to that directory; :class:`FileServer`

1. decides whether to serve it: the peer must be allowed (``allow(peer)``; the scheduler allows
   the workers it holds a lease on), the path must stay inside the directory after every
   symlink is followed (:func:`hypha.executors._paths.confine`: no absolute path, no ``..``,
   no symlink out), and name a regular file of at most :data:`MAX_FILE_BYTES`;
2. answers :class:`~hypha.messages.FileComing`: the file's size and SHA-256 (read in chunks, in
   a thread; cached by inode, size and mtime) and the tensor stream's name,
   ``file-fetch:<token>`` (:func:`file_fetch_stream`, a fresh random token per transfer);
3. opens that tensor stream to the requester and sends the bytes in chunks of
   :data:`CHUNK_SIZE`, with meta ``{"path", "size", "sha256"}``. The requester checks size and
   digest; a file changed since it was hashed fails that check there.

At most ``max_transfers`` requests are served at once (hashing included); more are refused as
busy. Every refusal is a ``RequestRejected`` whose message starts with one of :data:`INVALID`,
:data:`FORBIDDEN`, :data:`NOT_FOUND`, :data:`BUSY` and a colon, so that a requester can tell them
apart (the job bridge answers 400, 403, 404 and 503).
"""

from __future__ import annotations

import hashlib
import logging
import os
import secrets
import stat
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

import trio
from libp2p.peer.id import ID

from hypha.executors._paths import PathRefused, confine, open_for_reading
from hypha.messages import PROTOCOLS, FetchFile, FileComing, MessageError, decode, encode
from hypha.net import DialError, Network, NetworkClosed, RequestRejected, TensorStreamError

__all__ = [
    "BUSY",
    "CHUNK_SIZE",
    "FILE_FETCH_PREFIX",
    "FORBIDDEN",
    "INVALID",
    "MAX_FILE_BYTES",
    "NOT_FOUND",
    "FileServer",
    "file_fetch_stream",
]

log = logging.getLogger(__name__)

#: Tensor streams carrying a fetched file are named ``file-fetch:<token>``.
FILE_FETCH_PREFIX: Final = "file-fetch:"
#: Bytes per tensor-stream chunk of a file.
CHUNK_SIZE: Final = 4 << 20
#: The largest file served.
MAX_FILE_BYTES: Final = 16 << 30
#: Seconds to open the tensor stream to the requester, and the most it may leave a chunk unread.
STREAM_TIMEOUT: Final = 60.0
#: Files whose SHA-256 is remembered (by inode, size and mtime).
DIGEST_CACHE: Final = 1024

#: The start of a refusal: the request is malformed, or names something that is not a file.
INVALID: Final = "invalid"
#: The start of a refusal: the requester may not fetch it (not allowed, outside the directory).
FORBIDDEN: Final = "forbidden"
#: The start of a refusal: there is no such file in the served directory.
NOT_FOUND: Final = "not found"
#: The start of a refusal: too many transfers at once; ask again later.
BUSY: Final = "busy"

_HASH_CHUNK: Final = 4 << 20


def file_fetch_stream(token: str) -> str:
    """The name of the tensor stream that carries one fetched file: ``file-fetch:<token>``."""
    return f"{FILE_FETCH_PREFIX}{token}"


def _refuse(kind: str, message: str) -> RequestRejected:
    return RequestRejected(f"{kind}: {message}")


def _sha256(path: Path, key: tuple[int, int, int, int]) -> str:
    """The SHA-256 of the checked file ``path``; blocking. Refused when the file opened is not
    the one that was checked (``key``: device, inode, size, mtime)."""
    digest = hashlib.sha256()
    with open_for_reading(path) as file:
        if _key(os.fstat(file.fileno())) != key:
            raise PathRefused(f"{path} changed while it was being opened; ask again")
        while chunk := file.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _key(info: os.stat_result) -> tuple[int, int, int, int]:
    return info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns


class FileServer:
    """Serve the files under ``root`` over ``/hypha/file-fetch/1`` (see the module doc).

    Start it with ``await nursery.start(server.run)``; it serves until cancelled. ``allow``,
    when given, decides per request whether a peer may fetch anything at all.
    """

    def __init__(self, net: Network, root: Path, *, max_transfers: int = 4,
                 allow: Callable[[ID], bool] | None = None, chunk_size: int = CHUNK_SIZE,
                 max_file_bytes: int = MAX_FILE_BYTES) -> None:
        if max_transfers < 1:
            raise ValueError(f"Invalid max_transfers: {max_transfers} (at least 1)")
        if not 0 < chunk_size <= 64 << 20:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (1 byte .. 64 MiB)")
        if max_file_bytes < 0:
            raise ValueError(f"Invalid max_file_bytes: {max_file_bytes} (0 or more)")
        resolved = Path(root).resolve()
        if not resolved.is_dir():
            raise ValueError(f"cannot serve files from {root}: not a directory")
        self.net = net
        self.root = resolved
        self.max_transfers = max_transfers
        self.allow = allow
        self.chunk_size = chunk_size
        self.max_file_bytes = max_file_bytes
        self.files_sent = 0
        self.bytes_sent = 0
        self.transfers_failed = 0
        self.refused = 0
        self._active = 0
        self._digests: OrderedDict[tuple[int, int, int, int], str] = OrderedDict()
        self._nursery: trio.Nursery | None = None

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports readiness once the protocol is served."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            self.net.serve(PROTOCOLS["file-fetch"], self._on_fetch)
            log.info("serving the files under %s", self.root)
            task_status.started()
            await trio.sleep_forever()

    async def _on_fetch(self, peer: ID, data: bytes) -> bytes:
        try:
            request = decode(FetchFile, data)
        except MessageError as exc:
            raise self._refused(peer, INVALID, str(exc)) from None
        if self.allow is not None and not self.allow(peer):
            raise self._refused(peer, FORBIDDEN, f"peer {peer} may not fetch files from this "
                                "node (it serves only the peers it works with)")
        if self._active >= self.max_transfers:
            raise self._refused(peer, BUSY, f"{self._active} transfers in progress, the most "
                                "this node serves at once; ask again later")
        assert self._nursery is not None, "FileServer.run is not running"
        self._active += 1
        try:
            path, size, digest = await self._describe(peer, request.path)
            stream = file_fetch_stream(secrets.token_hex(16))
            # NOTE: the transfer may start before this answer arrives; the requester holds a
            # stream from this peer until it has read the answer (StreamRouter.expect_announced).
            self._nursery.start_soon(self._send, peer, path, request.path, size, digest, stream)
        except BaseException:
            self._active -= 1
            raise
        return encode(FileComing(path=request.path, size=size, sha256=digest, stream=stream))

    def _refused(self, peer: ID, kind: str, message: str) -> RequestRejected:
        self.refused += 1
        log.info("refused a file fetch from %s: %s: %s", peer, kind, message)
        return _refuse(kind, message)

    async def _describe(self, peer: ID, shown: str) -> tuple[Path, int, str]:
        """The checked file ``shown`` names, its size and SHA-256; RequestRejected when it may
        not be served."""
        try:
            path = confine(self.root, shown, "path")
            info = os.stat(path)
        except PathRefused as exc:
            # NOTE: _paths speaks of "the work directory" (the job bridge is its first user);
            # here the root is the directory this node serves.
            message = exc.message.replace("the work directory", "the served directory")
            raise self._refused(peer, FORBIDDEN if exc.status == 403 else INVALID,
                                message) from None
        except FileNotFoundError:
            raise self._refused(peer, NOT_FOUND, f"there is no file {shown!r} in the served "
                                "directory") from None
        except OSError as exc:
            raise self._refused(peer, INVALID, f"{shown!r} cannot be read: "
                                f"{exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            raise self._refused(peer, INVALID, f"{shown!r} is not a regular file")
        if info.st_size > self.max_file_bytes:
            raise self._refused(peer, INVALID, f"{shown!r} is {info.st_size} bytes, over the "
                                f"{self.max_file_bytes}-byte limit of files served")
        key = _key(info)
        digest = self._digests.get(key)
        if digest is None:
            try:
                digest = await trio.to_thread.run_sync(_sha256, path, key)
            except PathRefused as exc:
                raise self._refused(peer, FORBIDDEN if exc.status == 403 else INVALID,
                                    exc.message) from None
            except OSError as exc:
                raise self._refused(peer, INVALID, f"{shown!r} cannot be read: "
                                    f"{exc.strerror}") from None
            self._digests[key] = digest
            while len(self._digests) > DIGEST_CACHE:
                self._digests.popitem(last=False)
        else:
            self._digests.move_to_end(key)
        return path, info.st_size, digest

    async def _send(self, peer: ID, path: Path, shown: str, size: int, digest: str,
                    name: str) -> None:
        try:
            file = await trio.to_thread.run_sync(open_for_reading, path)
            with file:
                with trio.fail_after(STREAM_TIMEOUT):
                    out = await self.net.open_tensor_stream(
                        peer, name, {"path": shown, "size": size, "sha256": digest})
                async with out:
                    remaining = size
                    while remaining > 0:
                        chunk = await trio.to_thread.run_sync(
                            file.read, min(self.chunk_size, remaining))
                        if not chunk:
                            break  # shorter since it was hashed: the requester refuses it
                        with trio.fail_after(STREAM_TIMEOUT):
                            await out.send(chunk)
                        remaining -= len(chunk)
                # leaving `async with` closes the stream and waits for the requester's check
            self.files_sent += 1
            self.bytes_sent += size
            log.info("sent %s (%d bytes) to %s", shown, size, peer)
        except (DialError, TensorStreamError, trio.TooSlowError, NetworkClosed, OSError,
                PathRefused) as exc:
            self.transfers_failed += 1
            log.warning("sending %s to %s failed: %s", shown, peer,
                        str(exc) or "the requester stopped reading")
        except Exception:
            # NOTE: a failed transfer is the requester's to retry; it must not take the node
            # (the scheduler) down.
            self.transfers_failed += 1
            log.exception("sending %s to %s failed", shown, peer)
        finally:
            self._active -= 1
