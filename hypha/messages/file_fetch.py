"""``/hypha/file-fetch/1``, any peer → a node serving files: fetching one file it serves.

A node may serve one directory read-only (the scheduler serves the job's files: initial model
weights, a training script). A peer sends :class:`FetchFile` naming a file by its path relative
to that directory; the node answers :class:`FileComing` (the file's size and SHA-256, and the
name of the tensor stream that carries it) and then opens that tensor stream, named ``stream``,
from itself to the requester with the file's bytes. The node rejects the call
(``RequestRejected``) with the reason when it will not serve the file: not found, not a regular
file, outside the served directory, the requester not allowed, or too many transfers at once.

The path is bounded here (1-1024 characters, no NUL); what it may name is the serving node's
decision (:class:`hypha.files.FileServer` confines it to the served directory).
"""

from __future__ import annotations

from typing import Annotated

from hypha.messages._codec import Message, Range, Text
from hypha.net import Protocol

__all__ = [
    "FILE_FETCH",
    "FetchFile",
    "FileComing",
]

_Path = Annotated[str, Text(1024, min_len=1, pattern=r"[^\x00]*",
                            hint="a path of 1-1024 characters, no NUL")]


class FetchFile(Message):
    """Send me the file at ``path`` (relative to the directory you serve)."""

    path: _Path


class FileComing(Message):
    """The file at ``path`` (``size`` bytes, SHA-256 ``sha256`` in lower-case hex) follows as
    the tensor stream ``stream``."""

    path: _Path
    size: Annotated[int, Range(ge=0)]
    sha256: Annotated[str, Text(64, min_len=64, pattern=r"[0-9a-f]{64}",
                                hint="a SHA-256: 64 lower-case hex digits")]
    stream: Annotated[str, Text(256, min_len=1)]


FILE_FETCH = Protocol("file-fetch", "1", max_request=FetchFile.MAX_SIZE,
                      max_response=FileComing.MAX_SIZE)
