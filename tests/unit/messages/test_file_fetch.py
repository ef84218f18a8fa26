"""``/hypha/file-fetch/1``: FetchFile → FileComing, built in code and decoded from bytes."""

from __future__ import annotations

import msgpack
import pytest

import hypha.messages as M
from tests.unit.messages._samples import SAMPLES, raw

DIGEST = "0123456789abcdef" * 4


def test_the_protocol() -> None:
    assert M.FILE_FETCH is M.PROTOCOLS["file-fetch"]
    assert M.FILE_FETCH.id == "/hypha/file-fetch/1"
    assert M.FILE_FETCH.max_request == M.FetchFile.MAX_SIZE == 64 << 10


@pytest.mark.parametrize("path", ["w", "weights/model.safetensors", "é/ü" * 340, "x" * 1024,
                                  # NOTE: what a path may name is the server's decision
                                  "../secret", "/etc/passwd"])
def test_a_fetch_round_trips(path: str) -> None:
    request = M.FetchFile(path=path)
    assert M.decode(M.FetchFile, M.encode(request)) == request
    coming = M.FileComing(path=path, size=0, sha256=DIGEST, stream="file-fetch:ab")
    assert M.decode(M.FileComing, M.encode(coming)) == coming
    assert msgpack.unpackb(M.encode(coming)) == {"v": 1, "path": path, "size": 0,
                                                 "sha256": DIGEST, "stream": "file-fetch:ab"}


@pytest.mark.parametrize(("path", "problem"), [
    ("", "got ''; allowed: a path of 1-1024 characters, no NUL"),
    ("a\x00b", "allowed: a path of 1-1024 characters, no NUL"),
    ("x" * 1025, "(1025 characters); allowed: a path of 1-1024 characters"),
    (b"weights", "got binary data (7 bytes)"),
    (None, "got None"),
])
def test_a_bad_path_is_refused(path: object, problem: str) -> None:
    with pytest.raises(M.MessageError, match=r"^FetchFile: path: ") as built:
        M.FetchFile(path=path)  # type: ignore[arg-type]
    assert problem in built.value.problem
    wire = {**raw(SAMPLES[M.FetchFile]), "path": path}
    with pytest.raises(M.MessageError) as decoded:
        M.decode(M.FetchFile, msgpack.packb(wire))
    if not isinstance(path, bytes):  # binary data is refused by the parser, for the whole message
        assert decoded.value.path == "path" and problem in decoded.value.problem


@pytest.mark.parametrize(("field", "value", "problem"), [
    ("size", -1, "allowed: an integer >= 0"),
    ("size", True, "got a bool"),
    ("sha256", DIGEST.upper(), "allowed: a SHA-256: 64 lower-case hex digits"),
    ("sha256", DIGEST[:63], "allowed: a SHA-256"),
    ("sha256", DIGEST + "0", "allowed: a SHA-256"),
    ("stream", "", "got ''"),
    ("stream", "s" * 257, "(257 characters)"),
    ("path", "", "got ''"),
])
def test_a_bad_announcement_is_refused(field: str, value: object, problem: str) -> None:
    good = raw(SAMPLES[M.FileComing])
    with pytest.raises(M.MessageError) as built:
        M.FileComing(**{k: v for k, v in {**good, field: value}.items() if k != "v"})
    assert built.value.message_type == "FileComing" and built.value.path == field
    assert problem in built.value.problem, built.value.problem
    with pytest.raises(M.MessageError) as decoded:
        M.decode(M.FileComing, msgpack.packb({**good, field: value}))
    assert decoded.value.path == field and problem in decoded.value.problem


def test_every_field_is_required_on_the_wire() -> None:
    for field in ("path", "size", "sha256", "stream"):
        wire = {k: v for k, v in raw(SAMPLES[M.FileComing]).items() if k != field}
        with pytest.raises(M.MessageError, match=f"FileComing: {field}: missing"):
            M.decode(M.FileComing, msgpack.packb(wire))
