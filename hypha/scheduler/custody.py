"""The scheduler's custody of a DiLoCo run's parameter-server checkpoint.

The parameter server checkpoints in its own work directory after every round; a worker that dies
takes that copy with it. With ``[job] checkpoint_dir`` set, the parameter server also sends each
checkpoint to its scheduler as the tensor stream ``checkpoint:<job id>:<round>`` (meta ``{"job",
"round", "size", "sha256"}``) and waits for it to be stored before it sends the round's update to
anyone, so the copy kept here is never behind an update a trainer applied. Here it is written
atomically (a temporary file, fsync, rename, fsync of the directory) as ``checkpoint.pt``, with
``checkpoint.json`` (round, size, SHA-256) beside it, after its size and SHA-256 were checked.

Only the worker running this scheduler's current parameter-server job may send one, for that job;
a round that is not newer than the stored one is refused (a replay), as is anything over
:data:`MAX_CHECKPOINT_BYTES`.

When the scheduler dispatches a parameter server (a replacement, or the first one of a
restarted scheduler) and holds a checkpoint, the job's config carries ``resume_round`` and
``resume_sha256``, and :meth:`CheckpointCustody.push` sends the file to the new server as
``file:<scheduler>:checkpoint-<round>``; the server checks it and resumes from it bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import trio
from libp2p.peer.id import ID

from hypha._files import replace_atomically
from hypha.executors.network import CHECKPOINT_PREFIX, checkpoint_stream, file_stream
from hypha.net import IncomingTensorStream, Network, TensorStreamError

__all__ = ["CHECKPOINT_PREFIX", "MAX_CHECKPOINT_BYTES", "CheckpointCustody", "Stored",
           "checkpoint_stream"]

log = logging.getLogger("hypha.scheduler.custody")

#: The largest checkpoint the scheduler keeps.
MAX_CHECKPOINT_BYTES: Final = 64 << 30
#: Seconds a checkpoint stream may stall between two chunks.
IDLE_TIMEOUT: Final = 60.0
#: Attempts (and seconds between them) at sending the checkpoint to a new parameter server: its
#: job must have started to take the file.
PUSH_ATTEMPTS: Final = 10
PUSH_RETRY: Final = 1.0
CHUNK: Final = 4 << 20


@dataclass(frozen=True)
class Stored:
    """The checkpoint in custody: the parameter server's state after ``round`` rounds."""

    round: int
    size: int
    sha256: str
    path: Path


class CheckpointCustody:
    """Keeps the latest checkpoint of this scheduler's parameter server in ``directory``.

    ``is_parameter_server(peer, job_id)`` says whether ``peer`` runs the current
    parameter-server job ``job_id``. ``counts`` counts ``stored``, ``refused``, ``failed`` and
    ``pushed``."""

    def __init__(self, net: Network, directory: Path,
                 is_parameter_server: Callable[[ID, str], bool]) -> None:
        self.net = net
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.is_parameter_server = is_parameter_server
        self.counts: Counter[str] = Counter()
        self._lock = trio.Lock()
        self.stored = self._read()
        if self.stored is not None:
            log.info("checkpoint in custody: round %d (%d bytes) in %s", self.stored.round,
                     self.stored.size, self.directory)

    @property
    def path(self) -> Path:
        return self.directory / "checkpoint.pt"

    def _read(self) -> Stored | None:
        meta = self.directory / "checkpoint.json"
        try:
            info = json.loads(meta.read_text())
            round_, size, digest = info["round"], info["size"], info["sha256"]
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{meta} is not a checkpoint record: {exc}") from None
        if not (isinstance(round_, int) and isinstance(size, int) and isinstance(digest, str)):
            raise ValueError(f"{meta} is not a checkpoint record: {info!r}")
        try:
            actual = self.path.stat().st_size
        except FileNotFoundError:
            raise ValueError(f"{meta} names a checkpoint, but {self.path} is missing") from None
        if actual != size:
            raise ValueError(f"{self.path} has {actual} bytes, {meta} says {size}")
        return Stored(round_, size, digest, self.path)

    # -- receiving -------------------------------------------------------------------------------
    def takes(self, name: str) -> bool:
        return name.startswith(CHECKPOINT_PREFIX)

    async def accept(self, incoming: IncomingTensorStream) -> None:
        job_id, _, round_text = incoming.name[len(CHECKPOINT_PREFIX):].partition(":")
        meta = incoming.meta
        size, digest = meta.get("size"), meta.get("sha256")
        problem = None
        if not self.is_parameter_server(incoming.peer, job_id):
            problem = f"{incoming.peer} does not run this scheduler's parameter-server job {job_id}"
        elif not round_text.isdigit() or meta.get("round") != int(round_text):
            problem = f"{incoming.name!r} does not name its round as the meta does"
        elif not isinstance(size, int) or isinstance(size, bool) \
                or not 0 < size <= MAX_CHECKPOINT_BYTES:
            problem = f"meta 'size' must be 1 .. {MAX_CHECKPOINT_BYTES} bytes"
        elif not isinstance(digest, str) or len(digest) != 64:
            problem = "meta 'sha256' must be a hex SHA-256"
        elif self.stored is not None and int(round_text) <= self.stored.round:
            problem = (f"round {round_text} is not newer than the checkpoint in custody "
                       f"(round {self.stored.round})")
        if problem is not None:
            self.counts["refused"] += 1
            log.warning("refused a checkpoint from %s: %s", incoming.peer, problem)
            await incoming.refuse(problem)
            return
        assert isinstance(size, int) and isinstance(digest, str)
        incoming.max_bytes = size
        async with self._lock:
            try:
                stored = await self._write(incoming, int(round_text), size, digest)
            except (TensorStreamError, trio.TooSlowError, ValueError, OSError) as exc:
                self.counts["failed"] += 1
                log.warning("the checkpoint of round %s from %s was not stored: %s", round_text,
                            incoming.peer, exc or "it stalled")
                if not incoming.finished:
                    await incoming.refuse(str(exc)[:1000] or "stalled")
                return
        self.stored = stored
        self.counts["stored"] += 1
        log.info("checkpoint of round %d (%d bytes) in custody", stored.round, stored.size)

    async def _write(self, incoming: IncomingTensorStream, round_: int, size: int,
                     digest: str) -> Stored:
        fd, tmp = tempfile.mkstemp(prefix=".checkpoint.", suffix=".tmp", dir=self.directory)
        try:
            hasher = hashlib.sha256()
            received = 0
            with os.fdopen(fd, "wb") as out:
                chunks = aiter(incoming)
                while True:
                    with trio.fail_after(IDLE_TIMEOUT):
                        try:
                            chunk = await anext(chunks)
                        except StopAsyncIteration:
                            break
                    received += len(chunk)
                    hasher.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            if received != size or hasher.hexdigest() != digest:
                raise ValueError(f"got {received} bytes with SHA-256 {hasher.hexdigest()[:16]}…, "
                                 f"announced {size} with {digest[:16]}…")
            os.replace(tmp, self.path)
            record = json.dumps({"round": round_, "size": size, "sha256": digest}).encode()
            replace_atomically(self.directory / "checkpoint.json", lambda f: f.write(record))
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return Stored(round_, size, digest, self.path)

    # -- sending -----------------------------------------------------------------------------------
    async def push(self, peer: ID, job_id: str) -> bool:
        """Send the checkpoint in custody to the new parameter server ``peer`` (job ``job_id``)
        as ``file:<this scheduler>:checkpoint-<round>``; True once it took it."""
        stored = self.stored
        if stored is None:
            return False
        name = file_stream(str(self.net.peer_id), f"checkpoint-{stored.round}")
        for attempt in range(1, PUSH_ATTEMPTS + 1):
            try:
                out = await self.net.open_tensor_stream(peer, name,
                                                        {"job": job_id, "size": stored.size})
                async with out:
                    with open(stored.path, "rb") as f:
                        while chunk := f.read(CHUNK):
                            await out.send(chunk)
            except (ConnectionError, OSError, TensorStreamError) as exc:
                log.info("sending the checkpoint of round %d to %s failed (attempt %d of %d): "
                         "%s", stored.round, peer, attempt, PUSH_ATTEMPTS, exc)
                await trio.sleep(PUSH_RETRY)
                continue
            self.counts["pushed"] += 1
            log.info("sent the checkpoint of round %d to the parameter server %s", stored.round,
                     peer)
            return True
        log.error("could not send the checkpoint of round %d to the parameter server %s",
                  stored.round, peer)
        return False
