"""prepare text: the slices decode back to the corpus, the manifest describes them, preparing is
deterministic, the built-in corpus works offline, and bad input is refused with a clear error."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from hypha.data import (
    BUILTIN_CORPORA,
    END_OF_DOCUMENT,
    Dataset,
    DatasetError,
    Manifest,
    builtin_corpus_files,
    prepare_builtin_text,
    prepare_text,
)


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """corpus/ with three text files (one in a subfolder) and files that must be skipped."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "b.txt").write_bytes(b"The quick brown fox jumps over the lazy dog.\n" * 3)
    (root / "a.md").write_bytes("# Überschrift\n\nnaïve café — ünïcödé ✓\n".encode())
    # sorted by path (sub/0.py after b.txt), not by name
    (root / "sub" / "0.py").write_bytes(b"def f(x):\n    return x * 2\n" * 4)
    (root / "image.bin").write_bytes(bytes(range(256)))  # not a text suffix: skipped
    (root / ".hidden.txt").write_bytes(b"secret")  # hidden: skipped
    (root / ".git").mkdir()
    (root / ".git" / "x.txt").write_bytes(b"skipped too")
    return root


def stream_of(root: Path) -> bytes:
    """The token stream prepare_text must build: files sorted by relative path, each + byte 0."""
    files = ["a.md", "b.txt", "sub/0.py"]
    return b"".join((root / f).read_bytes() + bytes([END_OF_DOCUMENT]) for f in files)


def decode(ds: Dataset) -> bytes:
    """The dataset's sequences joined back into the stream they were cut from."""
    rows = np.concatenate([ds.slice(i)["tokens"].numpy() for i in range(len(ds))])
    assert (rows[1:, 0] == rows[:-1, -1]).all(), "sequences must overlap by one token"
    return rows[:, :-1].tobytes() + rows[-1, -1:].tobytes()


def test_slices_decode_to_the_corpus(tmp_path: Path, corpus: Path) -> None:
    m = prepare_text([corpus], "tiny", tmp_path / "out", slice_tokens=64, seq_len=16)
    stream = stream_of(corpus)
    n_seq = (len(stream) - 1) // 16
    ds = Dataset.open(tmp_path / "out" / "tiny")
    assert ds.manifest == m
    assert decode(ds) == stream[: n_seq * 16 + 1]
    assert m.kind == "text" and m.name == "tiny"
    assert m.text is not None
    assert (m.text.vocab, m.text.seq_len, m.text.files) == (256, 16, 3)
    assert m.text.total_tokens == len(stream)
    assert m.num_examples == n_seq
    assert [s.examples for s in m.slices] == [4] * (n_seq // 4) + ([n_seq % 4] if n_seq % 4 else [])
    for i, s in enumerate(m.slices):
        data = (ds.path / f"slice-{i:05d}.safetensors").read_bytes()
        assert s.file == f"slice-{i:05d}.safetensors"
        assert (s.size, s.sha256) == (len(data), hashlib.sha256(data).hexdigest())
        assert ds.slice_bytes(i) == data
        t = ds.slice(i)["tokens"]
        assert str(t.dtype) == "torch.uint8" and tuple(t.shape) == (s.examples, 17)
    raw = json.loads((ds.path / "manifest.json").read_text())
    assert raw["format"] == "hypha-dataset" and raw["version"] == 1
    assert raw["num_slices"] == len(m.slices) and raw["created"].endswith("Z")
    assert raw["tensors"] == {"tokens": {"dtype": "uint8", "shape": [17]}}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["tiny"]  # no leftovers


def test_explicit_files_keep_their_order_and_the_tail_is_dropped(tmp_path: Path) -> None:
    one, two = tmp_path / "one.log", tmp_path / "two.txt"  # a named file needs no text suffix
    one.write_bytes(b"x" * 20)
    two.write_bytes(b"y" * 20)
    m = prepare_text([two, one], "pair", tmp_path / "out", slice_tokens=10, seq_len=10)
    stream = b"y" * 20 + b"\0" + b"x" * 20 + b"\0"  # 42 tokens: 4 sequences of 10, 1 token left
    assert m.num_examples == 4 and m.num_slices == 4
    assert decode(Dataset.open(tmp_path / "out" / "pair")) == stream[:41]


def test_last_partial_slice_is_kept(tmp_path: Path) -> None:
    (tmp_path / "t.txt").write_bytes(b"abcdefghij" * 10)  # 101 tokens with the separator
    m = prepare_text([tmp_path / "t.txt"], "p", tmp_path / "out", slice_tokens=40, seq_len=10)
    assert [s.examples for s in m.slices] == [4, 4, 2]


def test_deterministic(tmp_path: Path, corpus: Path) -> None:
    a = prepare_text([corpus], "d", tmp_path / "a", slice_tokens=32, seq_len=8)
    b = prepare_text([corpus], "d", tmp_path / "b", slice_tokens=32, seq_len=8)
    assert a.slices == b.slices
    for s in a.slices:
        assert (tmp_path / "a" / "d" / s.file).read_bytes() == (
            tmp_path / "b" / "d" / s.file
        ).read_bytes()
    da, db = a.to_dict(), b.to_dict()
    da.pop("created"), db.pop("created")
    assert da == db


def test_builtin_corpus(tmp_path: Path) -> None:
    files = builtin_corpus_files("python-stdlib")
    size = sum(f.stat().st_size for f in files)
    assert 1 << 20 < size <= 4 << 20, size
    assert files == builtin_corpus_files("python-stdlib")
    assert [f.name for f in files] == sorted(f.name for f in files)
    small = builtin_corpus_files("python-stdlib-small")
    assert sum(f.stat().st_size for f in small) <= BUILTIN_CORPORA["python-stdlib-small"].budget
    m = prepare_builtin_text("python-stdlib", tmp_path, seq_len=128)
    assert m.name == "python-stdlib" and m.text is not None
    assert m.text.total_tokens == size + len(files) and m.text.files == len(files)
    ds = Dataset.open(tmp_path / "python-stdlib")
    first = files[0].read_bytes()
    assert ds.slice(0)["tokens"][0].numpy().tobytes() == first[:129]
    m2 = prepare_builtin_text("python-stdlib-small", tmp_path, name="s")
    assert m2.name == "s"
    with pytest.raises(DatasetError, match=r"no built-in corpus 'nope'.*python-stdlib"):
        builtin_corpus_files("nope")


def test_force_replaces_a_dataset(tmp_path: Path, corpus: Path) -> None:
    prepare_text([corpus], "d", tmp_path, slice_tokens=32, seq_len=8)
    with pytest.raises(DatasetError, match="already exists; pass --force"):
        prepare_text([corpus], "d", tmp_path, slice_tokens=32, seq_len=8)
    m = prepare_text([corpus], "d", tmp_path, slice_tokens=64, seq_len=8, force=True)
    assert Dataset.open(tmp_path / "d").manifest == m
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "d"]
    assert sorted(p.name for p in (tmp_path / "d").iterdir()) == sorted(
        ["manifest.json"] + [s.file for s in m.slices]
    )


def test_force_never_replaces_something_else(tmp_path: Path, corpus: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="is not a Hypha dataset"):
        prepare_text([corpus], "d", tmp_path, force=True, slice_tokens=32, seq_len=8)
    assert (tmp_path / "d" / "thesis.tex").read_text() == "precious"
    (tmp_path / "f").write_text("a file")
    with pytest.raises(DatasetError, match="not a directory"):
        prepare_text([corpus], "f", tmp_path, force=True, slice_tokens=32, seq_len=8)


def test_a_failure_leaves_nothing_behind(tmp_path: Path, corpus: Path) -> None:
    (corpus / "z_bad.txt").write_bytes(b"latin-1 \xe9t\xe9")  # read last, after slices are written
    out = tmp_path / "out"
    with pytest.raises(
        DatasetError, match=r"z_bad.txt: not UTF-8 text \(invalid byte at offset 8\)"
    ):
        prepare_text([corpus], "d", out, slice_tokens=16, seq_len=8)
    assert list(out.iterdir()) == []


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda p: [], "no input given"),
        (lambda p: [p / "missing.txt"], "missing.txt: no such file or directory"),
        (lambda p: [_mkdir(p / "empty")], "empty: no text files in it"),
        (lambda p: [_write(p / "e.txt", b"")], "holds no text"),
        (lambda p: [_write(p / "s.txt", b"short")], "holds 6 tokens, fewer than one sequence"),
        (lambda p: [_write(p / "n.txt", b"a\0b" * 100)], "n.txt: holds NUL bytes"),
        (lambda p: [_write(p / "u.txt", b"\xff" * 100)], "u.txt: not UTF-8 text"),
        (lambda p: [_write(p / "t.txt", b"x" * 100)] * 2, "t.txt: given twice"),
    ],
    ids=[
        "no-input",
        "missing",
        "empty-dir",
        "empty-files",
        "too-short",
        "nul",
        "not-utf8",
        "twice",
    ],
)
def test_refusals(tmp_path: Path, setup: Callable[[Path], list[Path]], message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        prepare_text(setup(tmp_path), "d", tmp_path / "out", slice_tokens=64, seq_len=8)
    assert not (tmp_path / "out" / "d").exists()


def test_unreadable_file_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bad = _write(tmp_path / "locked.txt", b"x" * 100)
    real = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.name == "locked.txt":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DatasetError, match=r"locked.txt: cannot read: Permission denied"):
        prepare_text([bad], "d", tmp_path / "out")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"seq_len": 0}, "seq_len must be a positive integer"),
        ({"slice_tokens": 0}, "slice_tokens must be a positive integer"),
        ({"slice_tokens": 8, "seq_len": 16}, "slice_tokens 8 is smaller than seq_len 16"),
        ({"name": "../escape"}, "invalid dataset name '../escape'"),
        ({"name": ".hidden"}, "invalid dataset name"),
    ],
)
def test_bad_settings(tmp_path: Path, corpus: Path, kwargs: dict[str, Any], message: str) -> None:
    args = {"name": "d", **kwargs}
    name = args.pop("name")
    with pytest.raises(DatasetError, match=message):
        prepare_text([corpus], name, tmp_path, **args)


def test_manifest_json_round_trip(tmp_path: Path, corpus: Path) -> None:
    m = prepare_text([corpus], "d", tmp_path, slice_tokens=32, seq_len=8)
    assert Manifest.from_json(m.to_json()) == m
    assert Manifest.from_dict(json.loads(m.to_json())) == m


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path
