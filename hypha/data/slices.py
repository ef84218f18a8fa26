"""Prepared datasets: the manifest, the slice files, and slices received as bytes.

A dataset is a directory ``NAME/`` holding ``manifest.json`` and the slices
``slice-00000.safetensors``, ``slice-00001.safetensors`` ... (format described in
:mod:`hypha.data`). A data node streams a slice's bytes as they are on disk
(:meth:`Dataset.slice_bytes`); a worker turns received bytes into tensors with
:func:`load_slice_bytes`, which treats them as hostile: the SafeTensors header is checked against
the data's size and against the tensors the manifest declares before anything is trusted.

    >>> ds = Dataset.open("datasets/python-stdlib")                  # doctest: +SKIP
    >>> ds.slice(0)["tokens"].shape                                  # doctest: +SKIP
    torch.Size([4096, 257])
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    import torch

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "KINDS",
    "MANIFEST",
    "Dataset",
    "DatasetError",
    "ImagesInfo",
    "Manifest",
    "SliceInfo",
    "TensorSpec",
    "TextInfo",
    "check_name",
    "load_slice_bytes",
    "slice_file_name",
]

#: The ``format`` field of every manifest.
FORMAT: Final = "hypha-dataset"
#: The manifest/slice layout version this code writes and reads.
FORMAT_VERSION: Final = 1
#: The manifest's file name inside a dataset directory.
MANIFEST: Final = "manifest.json"
#: The kinds of dataset there are.
KINDS: Final = ("text", "images")
#: Byte-level text: every token is one byte.
TEXT_VOCAB: Final = 256

# Our headers are ~150 bytes; safetensors itself accepts up to 100 MB. A header bigger than this
# is refused before it is parsed.
MAX_HEADER_BYTES: Final = 64 * 1024
# A manifest lists one line per slice (~150 bytes): 64 MiB is ~400k slices.
MAX_MANIFEST_BYTES: Final = 64 << 20

_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
# manifest dtype name (also the torch dtype's name) -> (safetensors dtype code, item size)
_DTYPES: Final[dict[str, tuple[str, int]]] = {"uint8": ("U8", 1), "int64": ("I64", 8)}


class DatasetError(ValueError):
    """A dataset (or its input) that cannot be used: the message says what is wrong and where."""


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid dataset name, else raise :class:`DatasetError`.

    Names are announced to other peers and used as directory names: 1-64 characters out of
    letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit.
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise DatasetError(
            f"invalid dataset name {name!r}: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def slice_file_name(index: int) -> str:
    """The file name of slice ``index``: ``slice-00042.safetensors``."""
    return f"slice-{index:05d}.safetensors"


# ----------------------------------------------------------------------------------------------
# the manifest


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of every slice: its dtype and the shape of one example (a slice holds
    ``[examples, *shape]``)."""

    dtype: str
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class SliceInfo:
    """One slice file: its name, how many examples (sequences, images) it holds, its size in
    bytes and the SHA-256 of its bytes (lowercase hex)."""

    file: str
    examples: int
    size: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "examples": self.examples,
            "bytes": self.size,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class TextInfo:
    """A byte-level text dataset: ``vocab`` is 256; each example holds ``seq_len + 1`` tokens
    (inputs and next-token targets); ``total_tokens`` counts the corpus (document separators
    included) and ``files`` the source files it was made from."""

    vocab: int
    seq_len: int
    total_tokens: int
    files: int

    def to_dict(self) -> dict[str, Any]:
        return {
            "vocab": self.vocab,
            "seq_len": self.seq_len,
            "total_tokens": self.total_tokens,
            "files": self.files,
        }


@dataclass(frozen=True)
class ImagesInfo:
    """A labelled image dataset: class names (label ``i`` is ``classes[i]``) and the
    ``(height, width, channels)`` every image shares."""

    classes: tuple[str, ...]
    shape: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"classes": list(self.classes), "shape": list(self.shape)}


@dataclass(frozen=True)
class Manifest:
    """What ``manifest.json`` says; :meth:`from_dict` / :meth:`from_json` validate it in full.

    Exactly one of ``text`` and ``images`` is set, matching ``kind``.
    """

    name: str
    kind: str
    created: str
    slices: tuple[SliceInfo, ...]
    text: TextInfo | None = None
    images: ImagesInfo | None = None

    @property
    def num_slices(self) -> int:
        return len(self.slices)

    @property
    def num_examples(self) -> int:
        return sum(s.examples for s in self.slices)

    @property
    def tensors(self) -> dict[str, TensorSpec]:
        """The tensors every slice holds, by name; nothing else is accepted in a slice."""
        if self.text is not None:
            return {"tokens": TensorSpec("uint8", (self.text.seq_len + 1,))}
        assert self.images is not None
        return {"images": TensorSpec("uint8", self.images.shape), "labels": TensorSpec("int64", ())}

    def slice_info(self, index: int) -> SliceInfo:
        if isinstance(index, bool) or not isinstance(index, int):
            raise TypeError(f"slice index must be an int, got {type(index).__name__}")
        if not 0 <= index < len(self.slices):
            raise DatasetError(
                f"dataset {self.name!r} has {len(self.slices)} slices (0..{len(self.slices) - 1}); "
                f"there is no slice {index}"
            )
        return self.slices[index]

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "name": self.name,
            "kind": self.kind,
            "created": self.created,
            "num_slices": self.num_slices,
            "num_examples": self.num_examples,
            "tensors": {k: v.to_dict() for k, v in self.tensors.items()},
        }
        info = self.text if self.text is not None else self.images
        assert info is not None
        out[self.kind] = info.to_dict()
        out["slices"] = [s.to_dict() for s in self.slices]
        return out

    def to_json(self) -> str:
        """The manifest as written to ``manifest.json``: indented, one slice per line."""
        d = self.to_dict()
        slices = d.pop("slices")
        head = [f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)}," for k, v in d.items()]
        rows = ",\n".join("    " + json.dumps(s, ensure_ascii=False) for s in slices)
        return "{\n" + "\n".join(head) + '\n  "slices": [\n' + rows + "\n  ]\n}\n"

    @classmethod
    def from_json(cls, text: str | bytes) -> Manifest:
        try:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
        except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError
            raise DatasetError(f"manifest is not valid JSON: {exc}") from None
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Manifest:
        """Validate a parsed manifest; every problem is a :class:`DatasetError` naming the key."""
        d = _object(data, "manifest", _TOP_KEYS | {"text", "images"}, required=set())
        fmt = d.get("format")
        if fmt != FORMAT:
            raise DatasetError(f"not a Hypha dataset manifest: format is {fmt!r}, not {FORMAT!r}")
        version = d.get("version")
        if not _is_int(version) or version != FORMAT_VERSION:
            newer = _is_int(version) and isinstance(version, int) and version > FORMAT_VERSION
            raise DatasetError(
                f"manifest version {version!r} is not supported: this Hypha reads version "
                f"{FORMAT_VERSION}"
                + (" (the dataset was written by a newer Hypha)" if newer else "")
            )
        kind = d.get("kind")
        if kind not in KINDS:
            raise DatasetError(f"manifest: kind must be one of {', '.join(KINDS)}, got {kind!r}")
        _object(data, "manifest", _TOP_KEYS | {kind}, required=_TOP_KEYS | {kind})
        name = _str(d["name"], "manifest.name")
        try:
            check_name(name)
        except DatasetError as exc:
            raise DatasetError(f"manifest.name: {exc}") from None
        created = _str(d["created"], "manifest.created")
        try:
            datetime.fromisoformat(created)
        except ValueError:
            raise DatasetError(
                f"manifest.created: expected an ISO 8601 time, got {created!r}"
            ) from None
        text = images = None
        if kind == "text":
            t = _object(d["text"], "manifest.text", set(_TEXT_KEYS))
            text = TextInfo(
                vocab=_int(t["vocab"], "manifest.text.vocab", 1),
                seq_len=_int(t["seq_len"], "manifest.text.seq_len", 1),
                total_tokens=_int(t["total_tokens"], "manifest.text.total_tokens", 1),
                files=_int(t["files"], "manifest.text.files", 1),
            )
            if text.vocab != TEXT_VOCAB:
                raise DatasetError(
                    f"manifest.text.vocab: byte-level text has vocab {TEXT_VOCAB}, got {text.vocab}"
                )
        else:
            im = _object(d["images"], "manifest.images", {"classes", "shape"})
            classes = im["classes"]
            if not isinstance(classes, list) or not classes:
                raise DatasetError("manifest.images.classes: expected a non-empty list of names")
            names = tuple(_str(c, f"manifest.images.classes[{i}]") for i, c in enumerate(classes))
            if len(set(names)) != len(names):
                raise DatasetError("manifest.images.classes: class names must be unique")
            shape = im["shape"]
            if not isinstance(shape, list) or len(shape) != 3:
                raise DatasetError(
                    f"manifest.images.shape: expected [height, width, channels], got {shape!r}"
                )
            h, w, c = (_int(v, f"manifest.images.shape[{i}]", 1) for i, v in enumerate(shape))
            if c > 4:
                raise DatasetError(f"manifest.images.shape: channels must be 1 to 4, got {c}")
            images = ImagesInfo(names, (h, w, c))
        raw_slices = d["slices"]
        if not isinstance(raw_slices, list) or not raw_slices:
            raise DatasetError("manifest.slices: expected a non-empty list")
        slices = []
        for i, raw in enumerate(raw_slices):
            where = f"manifest.slices[{i}]"
            s = _object(raw, where, {"file", "examples", "bytes", "sha256"})
            file = _str(s["file"], f"{where}.file")
            if file != slice_file_name(i):
                raise DatasetError(f"{where}.file: expected {slice_file_name(i)!r}, got {file!r}")
            sha = _str(s["sha256"], f"{where}.sha256")
            if not _SHA256_RE.fullmatch(sha):
                raise DatasetError(f"{where}.sha256: expected 64 lowercase hex digits, got {sha!r}")
            slices.append(
                SliceInfo(
                    file=file,
                    examples=_int(s["examples"], f"{where}.examples", 1),
                    size=_int(s["bytes"], f"{where}.bytes", 9),
                    sha256=sha,
                )
            )
        out = cls(
            name=name, kind=kind, created=created, slices=tuple(slices), text=text, images=images
        )
        for key, actual in (("num_slices", out.num_slices), ("num_examples", out.num_examples)):
            declared = _int(d[key], f"manifest.{key}", 1)
            if declared != actual:
                raise DatasetError(
                    f"manifest.{key} is {declared} but the slices add up to {actual}"
                )
        tensors = d["tensors"]
        expected = {k: v.to_dict() for k, v in out.tensors.items()}
        if tensors != expected:
            raise DatasetError(
                f"manifest.tensors: a {kind} dataset with these settings holds "
                f"{json.dumps(expected)}, the manifest says {json.dumps(tensors)}"
            )
        if text is not None and out.num_examples * text.seq_len + 1 > text.total_tokens:
            raise DatasetError(
                f"manifest.text.total_tokens: {text.total_tokens} tokens cannot fill "
                f"{out.num_examples} sequences of {text.seq_len}"
            )
        return out


_TOP_KEYS: Final = frozenset(
    {
        "format",
        "version",
        "name",
        "kind",
        "created",
        "num_slices",
        "num_examples",
        "tensors",
        "slices",
    }
)
_TEXT_KEYS: Final = ("vocab", "seq_len", "total_tokens", "files")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


def _object(
    value: object,
    where: str,
    allowed: set[str] | frozenset[str],
    required: set[str] | frozenset[str] | None = None,
) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DatasetError(f"{where}: expected a JSON object, got {type(value).__name__}")
    unknown = sorted(set(value) - set(allowed))
    if unknown:
        raise DatasetError(
            f"{where}: unknown key {unknown[0]!r} (expected: {', '.join(sorted(allowed))})"
        )
    missing = sorted((allowed if required is None else required) - set(value))
    if missing:
        raise DatasetError(f"{where}: missing key {missing[0]!r}")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _int(value: object, where: str, minimum: int) -> int:
    if not _is_int(value):
        raise DatasetError(f"{where}: expected an integer, got {value!r}")
    assert isinstance(value, int)
    if value < minimum:
        raise DatasetError(f"{where}: must be at least {minimum}, got {value}")
    return value


def _str(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise DatasetError(f"{where}: expected a non-empty string, got {value!r}")
    return value


# ----------------------------------------------------------------------------------------------
# slices as bytes


def load_slice_bytes(
    data: bytes | bytearray | memoryview,
    manifest: Manifest | Mapping[str, Any],
    *,
    index: int | None = None,
) -> dict[str, torch.Tensor]:
    """Parse one slice's SafeTensors bytes (as received from a data node) into tensors.

    The bytes are untrusted: the header's length is checked against the data before it is read,
    the header must declare exactly the tensors of ``manifest.tensors`` with their dtypes and
    per-example shapes, the same number of examples in each, and offsets that tile the data.
    With ``index`` the bytes must also be that slice's exact size and SHA-256 and hold its number
    of examples. Image labels must name a class. Any problem raises :class:`DatasetError`.
    """
    if not isinstance(manifest, Manifest):
        manifest = Manifest.from_dict(manifest)
    blob = bytes(data)
    where = "slice" if index is None else f"slice {index} of {manifest.name!r}"
    info = None if index is None else manifest.slice_info(index)
    if info is not None:
        if len(blob) != info.size:
            raise DatasetError(
                f"{where}: got {len(blob)} bytes, the manifest says {info.size} "
                "(truncated or not this slice)"
            )
        digest = hashlib.sha256(blob).hexdigest()
        if digest != info.sha256:
            raise DatasetError(
                f"{where}: SHA-256 {digest[:16]}… does not match the manifest's "
                f"{info.sha256[:16]}… (corrupted or tampered with)"
            )
    examples = _check_header(blob, manifest, where)
    if info is not None and examples != info.examples:
        raise DatasetError(f"{where}: holds {examples} examples, the manifest says {info.examples}")
    # NOTE: imported here, not at the top: torch takes ~1.5 s to import, and the scheduler
    # (which imports hypha.data for the slice tracker) never needs it.
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except SafetensorError as exc:  # the checks above should leave nothing for it to find
        raise DatasetError(f"{where}: not valid SafeTensors: {exc}") from None
    for name, spec in manifest.tensors.items():
        t = tensors.get(name)
        if (
            t is None
            or t.dtype != getattr(torch, spec.dtype)
            or tuple(t.shape) != (examples, *spec.shape)
        ):
            raise DatasetError(f"{where}: tensor {name!r} does not match its header")
    if manifest.images is not None:
        labels = tensors["labels"]
        bad = (labels < 0) | (labels >= len(manifest.images.classes))
        if bool(bad.any()):
            value = int(labels[bad][0])
            raise DatasetError(
                f"{where}: label {value} names no class (there are {len(manifest.images.classes)})"
            )
    return tensors


def _check_header(blob: bytes, manifest: Manifest, where: str) -> int:
    """Validate the SafeTensors header of ``blob`` against ``manifest``; return the examples."""
    if len(blob) < 8:
        raise DatasetError(f"{where}: {len(blob)} bytes is too short for a SafeTensors file")
    (n,) = struct.unpack("<Q", blob[:8])
    if n > len(blob) - 8:
        raise DatasetError(
            f"{where}: the SafeTensors header claims {n} bytes but only {len(blob) - 8} follow "
            "the length field (truncated or not SafeTensors)"
        )
    if n > MAX_HEADER_BYTES:
        raise DatasetError(
            f"{where}: SafeTensors header of {n} bytes is over the {MAX_HEADER_BYTES} allowed"
        )
    try:
        header = json.loads(blob[8 : 8 + n].decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (ValueError, RecursionError) as exc:
        raise DatasetError(f"{where}: SafeTensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise DatasetError(f"{where}: SafeTensors header is not a JSON object")
    meta = header.pop("__metadata__", {})
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise DatasetError(f"{where}: SafeTensors __metadata__ must map strings to strings")
    specs = manifest.tensors
    if set(header) != set(specs):
        raise DatasetError(
            f"{where}: holds tensors {sorted(header)}, the manifest declares {sorted(specs)}"
        )
    data_len = len(blob) - 8 - n
    spans = []
    examples: int | None = None
    for name, spec in specs.items():
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise DatasetError(f"{where}: tensor {name!r}: malformed header entry")
        code = _DTYPES[spec.dtype][0]
        if entry["dtype"] != code:
            raise DatasetError(
                f"{where}: tensor {name!r} has dtype {entry['dtype']!r}; the manifest declares "
                f"{spec.dtype} ({code})"
            )
        shape = entry["shape"]
        if (
            not isinstance(shape, list)
            or not all(_is_int(v) and v >= 0 for v in shape)
            or len(shape) != 1 + len(spec.shape)
            or tuple(shape[1:]) != spec.shape
            or shape[0] < 1
        ):
            raise DatasetError(
                f"{where}: tensor {name!r} has shape {shape!r}; the manifest declares "
                f"[examples >= 1, {', '.join(map(str, spec.shape))}]".replace(", ]", "]")
            )
        if examples is None:
            examples = shape[0]
        elif shape[0] != examples:
            raise DatasetError(
                f"{where}: tensors hold different numbers of examples ({examples} and {shape[0]})"
            )
        offsets = entry["data_offsets"]
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(_is_int(v) for v in offsets)
            or not 0 <= offsets[0] <= offsets[1] <= data_len
        ):
            raise DatasetError(
                f"{where}: tensor {name!r} has data_offsets {offsets!r} outside the "
                f"{data_len} data bytes"
            )
        expected = math.prod(shape) * _DTYPES[spec.dtype][1]
        if offsets[1] - offsets[0] != expected:
            raise DatasetError(
                f"{where}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes; its shape "
                f"needs {expected}"
            )
        spans.append((offsets[0], offsets[1]))
    position = 0
    for start, end in sorted(spans):
        if start != position:
            raise DatasetError(f"{where}: tensor data overlaps or leaves gaps")
        position = end
    if position != data_len:
        raise DatasetError(f"{where}: {data_len - position} bytes after the last tensor's data")
    assert examples is not None
    return examples


# ----------------------------------------------------------------------------------------------
# a dataset on disk


class Dataset:
    """A prepared dataset directory. Open it with :meth:`open`.

    Opening reads and validates the manifest and checks that every slice file is there with its
    declared size; each slice's SHA-256 is checked when it is read.
    """

    def __init__(self, path: Path, manifest: Manifest) -> None:
        self.path = path
        self.manifest = manifest

    @classmethod
    def open(cls, path: str | Path) -> Dataset:
        path = Path(path).expanduser()
        file = path / MANIFEST
        try:
            with file.open("rb") as f:
                raw = f.read(MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            what = "directory" if path.is_dir() else "dataset"
            hint = "" if path.is_dir() else " (prepare one with `python -m hypha.data prepare`)"
            raise DatasetError(f"{path}: no such {what} or no {MANIFEST} in it{hint}") from None
        except OSError as exc:
            raise DatasetError(f"{file}: cannot read: {exc.strerror or exc}") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise DatasetError(f"{file}: over {MAX_MANIFEST_BYTES} bytes; not a manifest")
        try:
            manifest = Manifest.from_json(raw)
        except DatasetError as exc:
            raise DatasetError(f"{file}: {exc}") from None
        for i, info in enumerate(manifest.slices):
            slice_path = path / info.file
            try:
                size = slice_path.stat().st_size
            except OSError as exc:
                raise DatasetError(
                    f"{slice_path}: slice {i} is missing or unreadable: {exc.strerror or exc}"
                ) from None
            if size != info.size:
                raise DatasetError(
                    f"{slice_path}: slice {i} is {size} bytes, the manifest says {info.size} "
                    "(truncated or replaced)"
                )
        return cls(path, manifest)

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def kind(self) -> str:
        return self.manifest.kind

    @property
    def num_slices(self) -> int:
        return self.manifest.num_slices

    def __len__(self) -> int:
        return self.manifest.num_slices

    def __repr__(self) -> str:
        return (
            f"Dataset({str(self.path)!r}, kind={self.kind!r}, slices={self.num_slices}, "
            f"examples={self.manifest.num_examples})"
        )

    def slice_bytes(self, index: int) -> bytes:
        """Slice ``index`` exactly as stored (what a data node streams), checked against the
        manifest's size and SHA-256."""
        info = self.manifest.slice_info(index)
        path = self.path / info.file
        try:
            with path.open("rb") as f:
                data = f.read(info.size + 1)
        except OSError as exc:
            raise DatasetError(
                f"{path}: cannot read slice {index}: {exc.strerror or exc}"
            ) from None
        if len(data) != info.size:
            raise DatasetError(
                f"{path}: slice {index} is {len(data)} bytes, the manifest says {info.size} "
                "(truncated or replaced)"
            )
        digest = hashlib.sha256(data).hexdigest()
        if digest != info.sha256:
            raise DatasetError(
                f"{path}: slice {index}'s SHA-256 does not match the manifest (corrupted or "
                "tampered with); prepare the dataset again"
            )
        return data

    def slice(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors of slice ``index`` (``tokens``, or ``images`` and ``labels``)."""
        data = self.slice_bytes(index)
        try:
            return load_slice_bytes(data, self.manifest, index=index)
        except DatasetError as exc:
            raise DatasetError(f"{self.path / self.manifest.slices[index].file}: {exc}") from None

    def verify(self) -> None:
        """Read and check every slice; raise :class:`DatasetError` at the first bad one."""
        for i in range(self.num_slices):
            self.slice(i)
