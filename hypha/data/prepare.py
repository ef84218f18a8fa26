"""Turning a corpus into a dataset of slices: ``python -m hypha.data prepare text|images``.

Text (:func:`prepare_text`): the input files are read as bytes, in a fixed order (inputs as given;
the files under a directory sorted by their path relative to it), each checked to be UTF-8 with
no NUL byte, and joined into one token stream with byte ``0`` (:data:`END_OF_DOCUMENT`) after
each file. Sequence ``k`` of the dataset is ``stream[k*L : k*L + L + 1]`` (inputs and next-token
targets, overlapping the next sequence by one token); slices take ``slice_tokens // L`` sequences
each, in order, and the last slice keeps whatever full sequences remain.

Images (:func:`prepare_images`): an ``.npz`` (``images``, ``labels`` and optionally ``classes``)
or a folder ``ROOT/CLASS/*.png|*.ppm|*.pgm`` (classes sorted by folder name). Examples are
shuffled with a fixed seed so that every slice mixes the classes.

A dataset is built in a hidden ``.NAME.*.partial`` directory beside its final place and moved
there when complete, so an interrupted run never leaves something that looks like a dataset.
Preparing is deterministic: the same inputs and settings give byte-identical slices (only the
manifest's ``created`` time differs).
"""

from __future__ import annotations

import os
import shutil
import sysconfig
import tempfile
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Final

import numpy as np

from hypha.data._imageio import IMAGE_SUFFIXES, ImageError, read_image

if TYPE_CHECKING:
    import torch

from hypha.data.slices import (
    MANIFEST,
    TEXT_VOCAB,
    DatasetError,
    ImagesInfo,
    Manifest,
    SliceInfo,
    TextInfo,
    check_name,
    slice_file_name,
)

__all__ = [
    "BUILTIN_CORPORA",
    "DEFAULT_SEQ_LEN",
    "DEFAULT_SLICE_EXAMPLES",
    "DEFAULT_SLICE_TOKENS",
    "END_OF_DOCUMENT",
    "TEXT_SUFFIXES",
    "BuiltinCorpus",
    "builtin_corpus_files",
    "prepare_builtin_text",
    "prepare_images",
    "prepare_text",
]

DEFAULT_SLICE_TOKENS: Final = 1 << 20
DEFAULT_SEQ_LEN: Final = 256
DEFAULT_SLICE_EXAMPLES: Final = 1024
# An .npz without a 'classes' array gets classes "0", "1" ...: this bounds how many.
MAX_UNNAMED_CLASSES: Final = 100_000
#: The token after each document (file) of a text corpus; text files never contain it.
END_OF_DOCUMENT: Final = 0
#: Files under an input directory that are read as text (files named directly are always read).
TEXT_SUFFIXES: Final = (
    ".txt",
    ".md",
    ".rst",
    ".py",
    ".pyi",
    ".c",
    ".h",
    ".cc",
    ".cpp",
    ".hpp",
    ".rs",
    ".go",
    ".js",
    ".ts",
    ".java",
    ".json",
    ".toml",
    ".yaml",
    ".yml",
    ".csv",
    ".tsv",
    ".tex",
    ".html",
)


@dataclass(frozen=True)
class BuiltinCorpus:
    """A text corpus every Python install has: the top-level ``*.py`` modules of the running
    interpreter's standard library (``sysconfig.get_paths()["stdlib"]``), sorted by file name,
    taken while their total stays within ``budget`` bytes (files that would overflow it, are not
    UTF-8 or hold a NUL byte are skipped). The selection is the same on every machine with the
    same Python version."""

    description: str
    budget: int


#: ``prepare text --builtin NAME``: corpora that need no download.
BUILTIN_CORPORA: Final[dict[str, BuiltinCorpus]] = {
    "python-stdlib": BuiltinCorpus("~4 MiB of Python standard library source", 4 << 20),
    "python-stdlib-small": BuiltinCorpus("~512 KiB of Python standard library source", 512 << 10),
}


# ----------------------------------------------------------------------------------------------
# text


def prepare_text(
    inputs: Sequence[str | Path],
    name: str,
    out: str | Path,
    *,
    slice_tokens: int = DEFAULT_SLICE_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    force: bool = False,
) -> Manifest:
    """Prepare a byte-level text dataset ``out/name`` from files and directories ``inputs``."""
    _check_text_settings(slice_tokens, seq_len)
    check_name(name)
    files = _text_files(inputs)
    return _write_text(
        _read_checked(files), len(files), name, Path(out), slice_tokens, seq_len, force
    )


def builtin_corpus_files(builtin: str) -> list[Path]:
    """The files of built-in corpus ``builtin`` on this Python (see :class:`BuiltinCorpus`)."""
    corpus = BUILTIN_CORPORA.get(builtin)
    if corpus is None:
        raise DatasetError(
            f"no built-in corpus {builtin!r} (choose from: {', '.join(BUILTIN_CORPORA)})"
        )
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    chosen: list[Path] = []
    total = 0
    for path in sorted(stdlib.glob("*.py"), key=lambda p: p.name):
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if total + len(data) > corpus.budget or not data or _text_problem(data):
            continue
        chosen.append(path)
        total += len(data)
    if not chosen:
        raise DatasetError(f"built-in corpus {builtin!r}: found no Python sources under {stdlib}")
    return chosen


def prepare_builtin_text(
    builtin: str,
    out: str | Path,
    *,
    name: str | None = None,
    slice_tokens: int = DEFAULT_SLICE_TOKENS,
    seq_len: int = DEFAULT_SEQ_LEN,
    force: bool = False,
) -> Manifest:
    """Prepare built-in corpus ``builtin`` (:data:`BUILTIN_CORPORA`) as ``out/name`` (default:
    the corpus's name)."""
    _check_text_settings(slice_tokens, seq_len)
    check_name(name if name is not None else builtin)
    files = builtin_corpus_files(builtin)
    return _write_text(
        _read_checked(files), len(files), name or builtin, Path(out), slice_tokens, seq_len, force
    )


def _check_text_settings(slice_tokens: int, seq_len: int) -> None:
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise DatasetError(f"seq_len must be a positive integer, got {seq_len!r}")
    if isinstance(slice_tokens, bool) or not isinstance(slice_tokens, int) or slice_tokens < 1:
        raise DatasetError(f"slice_tokens must be a positive integer, got {slice_tokens!r}")
    if slice_tokens < seq_len:
        raise DatasetError(
            f"slice_tokens {slice_tokens} is smaller than seq_len {seq_len}: a slice must hold "
            "at least one sequence"
        )


def _text_files(inputs: Sequence[str | Path]) -> list[Path]:
    if isinstance(inputs, str | Path):
        inputs = [inputs]
    if not inputs:
        raise DatasetError("no input given: name text files or directories")
    files: list[Path] = []
    seen: dict[Path, Path] = {}
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            found = _walk(path, lambda f: f.suffix.lower() in TEXT_SUFFIXES)
            if not found:
                raise DatasetError(
                    f"{path}: no text files in it (looked for {' '.join(TEXT_SUFFIXES)})"
                )
        elif path.is_file():
            found = [path]
        elif not path.exists():
            raise DatasetError(f"{path}: no such file or directory")
        else:
            raise DatasetError(f"{path}: not a regular file or a directory")
        for f in found:
            key = f.resolve()
            if key in seen:
                raise DatasetError(f"{f}: given twice (also as {seen[key]}); name each file once")
            seen[key] = f
            files.append(f)
    return files


def _walk(root: Path, wanted: Callable[[Path], bool]) -> list[Path]:
    """The non-hidden files under ``root`` that ``wanted`` accepts, sorted by relative path."""

    def fail(exc: OSError) -> None:
        raise DatasetError(f"{exc.filename}: cannot list: {exc.strerror or exc}")

    found = []
    for folder, dirs, names in os.walk(root, onerror=fail):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for n in names:
            path = Path(folder, n)
            if not n.startswith(".") and wanted(path) and path.is_file():
                found.append(path)
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _text_problem(data: bytes) -> str | None:
    if b"\0" in data:
        return "holds NUL bytes: not a text file"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"not UTF-8 text (invalid byte at offset {exc.start}); convert it to UTF-8"
    return None


def _read_checked(files: Sequence[Path]) -> Iterator[bytes]:
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DatasetError(f"{path}: cannot read: {exc.strerror or exc}") from None
        problem = _text_problem(data)
        if problem:
            raise DatasetError(f"{path}: {problem}")
        if data:
            yield data


def _write_text(
    documents: Iterator[bytes],
    n_files: int,
    name: str,
    out: Path,
    slice_tokens: int,
    seq_len: int,
    force: bool,
) -> Manifest:
    import torch  # NOTE: late, as in hypha.data.slices: importing hypha.data stays light

    per_slice = slice_tokens // seq_len  # sequences per slice
    span = per_slice * seq_len  # new tokens per slice; each slice also holds the next one
    total = 0
    buf = bytearray()
    with _Writer(out, name, force) as writer:

        def emit(n_seq: int) -> None:
            stream = np.frombuffer(bytes(buf[: n_seq * seq_len + 1]), np.uint8)
            windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len]
            writer.add({"tokens": torch.from_numpy(windows.copy())})  # contiguous, writable
            del buf[: n_seq * seq_len]

        for doc in documents:
            buf += doc
            buf.append(END_OF_DOCUMENT)
            total += len(doc) + 1
            while len(buf) >= span + 1:
                emit(per_slice)
        if len(buf) >= seq_len + 1:
            emit((len(buf) - 1) // seq_len)
        if total == 0:
            raise DatasetError("the input holds no text (every file is empty)")
        if not writer.slices:
            raise DatasetError(
                f"the input holds {total} tokens, fewer than one sequence of seq_len {seq_len} "
                f"needs ({seq_len + 1}); give more text or a smaller --seq-len"
            )
        return writer.commit(
            "text", text=TextInfo(TEXT_VOCAB, seq_len, total_tokens=total, files=n_files)
        )


# ----------------------------------------------------------------------------------------------
# images


def prepare_images(
    source: str | Path,
    name: str,
    out: str | Path,
    *,
    slice_examples: int = DEFAULT_SLICE_EXAMPLES,
    seed: int = 0,
    shuffle: bool = True,
    force: bool = False,
) -> Manifest:
    """Prepare a labelled image dataset ``out/name`` from an ``.npz`` file or a class folder."""
    if (
        isinstance(slice_examples, bool)
        or not isinstance(slice_examples, int)
        or slice_examples < 1
    ):
        raise DatasetError(f"slice_examples must be a positive integer, got {slice_examples!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise DatasetError(f"seed must be an integer >= 0, got {seed!r}")
    check_name(name)
    path = Path(source).expanduser()
    if path.is_dir():
        images: _Images = _FolderImages(path)
    elif path.is_file():
        if path.suffix.lower() != ".npz":
            raise DatasetError(
                f"{path}: expected an .npz file (arrays images, labels) or a folder of class "
                "folders"
            )
        images = _NpzImages(path)
    elif not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    else:
        raise DatasetError(f"{path}: not a regular file or a directory")
    import torch

    n = images.count
    order = np.random.default_rng(seed).permutation(n) if shuffle else np.arange(n)
    with _Writer(Path(out), name, force) as writer:
        for start in range(0, n, slice_examples):
            batch, labels = images.batch(order[start : start + slice_examples])
            writer.add(
                {
                    "images": torch.from_numpy(np.ascontiguousarray(batch)),
                    "labels": torch.from_numpy(labels.astype(np.int64)),
                }
            )
        assert images.shape is not None
        return writer.commit("images", images=ImagesInfo(images.classes, images.shape))


class _Images(ABC):
    """A source of labelled images: an ``.npz`` file or a folder of class directories."""

    classes: tuple[str, ...]
    shape: tuple[int, int, int] | None
    count: int

    @abstractmethod
    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(images uint8 [n, H, W, C], labels int64 [n])`` of the examples ``indices``."""


class _NpzImages(_Images):
    """``images`` uint8 [N, H, W] or [N, H, W, C], ``labels`` integers [N], optional
    ``classes`` strings (default ``"0"``, ``"1"`` ...)."""

    def __init__(self, path: Path) -> None:
        try:
            loaded = np.load(path, allow_pickle=False)
            if not isinstance(loaded, np.lib.npyio.NpzFile):
                raise DatasetError(f"{path}: a single .npy array, not an .npz archive of arrays")
            with loaded as npz:
                found = list(npz.files)
                arrays = {k: npz[k] for k in ("images", "labels", "classes") if k in found}
        except DatasetError:
            raise
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise DatasetError(f"{path}: cannot read as .npz: {exc}") from None
        missing = [k for k in ("images", "labels") if k not in arrays]
        if missing:
            raise DatasetError(
                f"{path}: no array {missing[0]!r} (it holds: {', '.join(found) or 'nothing'}); "
                "expected images and labels"
            )
        images, labels, classes = arrays["images"], arrays["labels"], arrays.get("classes")
        if images.dtype != np.uint8 or images.ndim not in (3, 4):
            raise DatasetError(
                f"{path}: images must be uint8 [N, H, W] or [N, H, W, C], got {images.dtype} "
                f"{list(images.shape)}"
            )
        if images.ndim == 3:
            images = images[..., None]
        if not 1 <= images.shape[3] <= 4 or 0 in images.shape:
            raise DatasetError(
                f"{path}: images {list(images.shape)}: need at least one image with at least one "
                "pixel, and 1 to 4 channels"
            )
        if labels.ndim != 1 or labels.dtype.kind not in "iu" or len(labels) != len(images):
            raise DatasetError(
                f"{path}: labels must be integers [N] with N = {len(images)} (the images), got "
                f"{labels.dtype} {list(labels.shape)}"
            )
        if int(labels.min()) < 0:
            raise DatasetError(f"{path}: labels must not be negative, found {int(labels.min())}")
        if classes is None:
            if int(labels.max()) >= MAX_UNNAMED_CLASSES:
                raise DatasetError(
                    f"{path}: label {int(labels.max())} with no classes array: give the class "
                    f"names as an array 'classes' (without one, labels must be under "
                    f"{MAX_UNNAMED_CLASSES})"
                )
            names = tuple(str(i) for i in range(int(labels.max()) + 1))
        else:
            if classes.ndim != 1 or classes.dtype.kind != "U" or not len(classes):
                raise DatasetError(f"{path}: classes must be a 1-D array of strings")
            names = tuple(str(c) for c in classes)
            if not all(names) or len(set(names)) != len(names):
                raise DatasetError(f"{path}: class names must be non-empty and unique")
            if int(labels.max()) >= len(names):
                raise DatasetError(
                    f"{path}: label {int(labels.max())} names no class (there are {len(names)})"
                )
        self.classes = names
        self.shape = (int(images.shape[1]), int(images.shape[2]), int(images.shape[3]))
        self.count = len(images)
        self._images = images
        self._labels = labels

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self._images[indices], self._labels[indices]


class _FolderImages(_Images):
    """``ROOT/CLASS/IMAGE`` with PNG, PGM or PPM images; classes are the sorted folder names."""

    def __init__(self, root: Path) -> None:
        try:
            entries = sorted(root.iterdir(), key=lambda p: p.name)
        except OSError as exc:
            raise DatasetError(f"{root}: cannot list: {exc.strerror or exc}") from None
        class_dirs = []
        for entry in entries:
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                class_dirs.append(entry)
            elif entry.suffix.lower() in IMAGE_SUFFIXES:
                raise DatasetError(
                    f"{entry}: images go in one folder per class (ROOT/CLASS/IMAGE), not in ROOT"
                )
        if not class_dirs:
            raise DatasetError(
                f"{root}: no class folders in it; expected ROOT/CLASS/*.png|*.ppm|*.pgm"
            )
        self._files: list[tuple[Path, int]] = []
        for label, folder in enumerate(class_dirs):
            try:
                names = sorted(folder.iterdir(), key=lambda p: p.name)
            except OSError as exc:
                raise DatasetError(f"{folder}: cannot list: {exc.strerror or exc}") from None
            count = 0
            for f in names:
                if f.name.startswith("."):
                    continue
                if f.is_dir():
                    raise DatasetError(
                        f"{f}: folders inside a class folder are not supported; put the "
                        "images directly in the class folder"
                    )
                if f.suffix.lower() not in IMAGE_SUFFIXES:
                    raise DatasetError(
                        f"{f}: unsupported image format {f.suffix or '(no suffix)'!r}; use PNG "
                        "(8-bit), binary PGM (P5) or binary PPM (P6)"
                    )
                self._files.append((f, label))
                count += 1
            if not count:
                raise DatasetError(f"{folder}: class folder holds no images")
        self.classes = tuple(d.name for d in class_dirs)
        self.count = len(self._files)
        self.shape = None
        self._first: Path | None = None

    def batch(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        images = []
        for i in indices:
            path, _ = self._files[int(i)]
            try:
                image = read_image(path)
            except ImageError as exc:
                raise DatasetError(f"{path}: {exc}") from None
            shape = (int(image.shape[0]), int(image.shape[1]), int(image.shape[2]))
            if self.shape is None:
                self.shape, self._first = shape, path
            elif shape != self.shape:
                raise DatasetError(
                    f"{path}: image is {_hwc(shape)} but {self._first} is {_hwc(self.shape)}; "
                    "all images must share one shape (height x width x channels)"
                )
            images.append(image)
        labels = np.array([self._files[int(i)][1] for i in indices], np.int64)
        return np.stack(images), labels


def _hwc(shape: tuple[int, int, int]) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------------------------
# writing a dataset directory


class _Writer:
    """Builds ``out/name`` in a hidden temporary directory; :meth:`commit` moves it in place."""

    def __init__(self, out: Path, name: str, force: bool) -> None:
        self.final = out / check_name(name)
        self.name = name
        if self.final.exists() or self.final.is_symlink():
            if not force:
                raise DatasetError(f"{self.final} already exists; pass --force to replace it")
            if not self.final.is_dir() or self.final.is_symlink():
                raise DatasetError(f"{self.final} exists and is not a directory; not replacing it")
            if not (self.final / MANIFEST).is_file() and any(self.final.iterdir()):
                raise DatasetError(
                    f"{self.final} is not a Hypha dataset (no {MANIFEST}); not replacing it "
                    "even with --force: remove it yourself or pick another --name"
                )
        try:
            out.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", suffix=".partial", dir=out))
            self.tmp.chmod(0o755)  # mkdtemp makes it 0700; a dataset is not a secret
        except OSError as exc:
            raise DatasetError(f"{out}: cannot create the dataset: {exc.strerror or exc}") from None
        self.slices: list[SliceInfo] = []

    def __enter__(self) -> _Writer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)  # gone already after a commit

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        import hashlib

        from safetensors.torch import save

        data = save(tensors)
        file = slice_file_name(len(self.slices))
        self._write(self.tmp / file, data)
        examples = int(next(iter(tensors.values())).shape[0])
        self.slices.append(SliceInfo(file, examples, len(data), hashlib.sha256(data).hexdigest()))

    def commit(
        self, kind: str, *, text: TextInfo | None = None, images: ImagesInfo | None = None
    ) -> Manifest:
        manifest = Manifest(
            name=self.name,
            kind=kind,
            created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
            slices=tuple(self.slices),
            text=text,
            images=images,
        )
        Manifest.from_json(manifest.to_json())  # what we write must be what we read
        self._write(self.tmp / MANIFEST, manifest.to_json().encode())
        try:
            old = None
            if self.final.exists():
                old = Path(
                    tempfile.mkdtemp(prefix=f".{self.name}.", suffix=".old", dir=self.final.parent)
                )
                os.replace(self.final, old / self.name)
            os.replace(self.tmp, self.final)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except OSError as exc:
            raise DatasetError(
                f"{self.final}: cannot move the dataset in place: {exc.strerror or exc}"
            ) from None
        return manifest

    @staticmethod
    def _write(path: Path, data: bytes) -> None:
        try:
            path.write_bytes(data)
        except OSError as exc:
            raise DatasetError(f"{path}: cannot write: {exc.strerror or exc}") from None
