"""Path confinement for the job bridge: every path a job names stays inside its work directory.

The bridge runs with the worker's rights; the training script behind it may be sandboxed. So a
path in a request is untrusted input, and this module is the only place that turns one into a
file on disk. It works in two steps:

1. **Check** (:func:`confine`, :func:`confine_destination`, :func:`confine_source`), before
   anything is opened: lexical rules first (a non-empty relative path, no ``..`` component, no NUL
   byte, no name over 255 bytes, no path over 4096 bytes), then the location after following every
   symlink, in the parents and at the leaf, must lie inside the root. The result is an absolute
   path with no symlink in it (for a destination: no symlink above the leaf).
2. **Open** (:func:`open_for_reading`, :class:`AtomicFile`): walk that path from ``/`` one
   component at a time with ``O_NOFOLLOW``. Because the checked path contains no symlinks, any
   symlink met during the walk was planted after the check (a TOCTOU race) and the open fails
   with :class:`PathRefused` instead of following it. Writes go to a fresh temp file in the
   destination's directory (``O_CREAT | O_EXCL | O_NOFOLLOW``, mode 0600) that is then renamed
   over the destination, so an existing file, hard link or symlink at the destination is
   replaced, never written through, and readers never see a half-written file.

What remains: a process that can rename real directories both inside and outside the work
directory could move a directory in between the check and the walk. A sandboxed script cannot
reach outside its work directory, and an unsandboxed one has the worker's rights anyway.
"""

from __future__ import annotations

import errno
import os
import secrets
import stat
from collections.abc import Iterable, Iterator
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO

__all__ = [
    "MAX_NAME_BYTES",
    "MAX_PATH_BYTES",
    "AtomicFile",
    "PathRefused",
    "check_name",
    "check_relative",
    "confine",
    "confine_destination",
    "confine_source",
    "open_for_reading",
    "private_dir",
]

MAX_NAME_BYTES = 255  # NAME_MAX on Linux and the BSDs
MAX_PATH_BYTES = 4096  # PATH_MAX on Linux

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class PathRefused(ValueError):
    """A path from a request that may not be used. ``status`` is the HTTP status it maps to:
    400 for a malformed path or the wrong kind of file, 403 for one that leaves the work
    directory or meets a symlink where none may be."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def _encoded(path: str, what: str) -> bytes:
    try:
        return os.fsencode(path)
    except UnicodeEncodeError as error:
        raise PathRefused(f"{what} {path!r} is not a valid file name ({error.reason})") from None


def _check_common(path: object, what: str) -> str:
    if not isinstance(path, str):
        raise PathRefused(f"{what} must be a string, got {type(path).__name__}")
    if not path:
        raise PathRefused(f"{what} is empty")
    if "\x00" in path:
        raise PathRefused(f"{what} {path!r} contains a NUL byte")
    if len(_encoded(path, what)) > MAX_PATH_BYTES:
        raise PathRefused(f"{what} is longer than {MAX_PATH_BYTES} bytes")
    for part in path.split("/"):
        if part == "..":
            raise PathRefused(f"{what} {path!r} contains a '..' component")
        if len(_encoded(part, what)) > MAX_NAME_BYTES:
            raise PathRefused(f"{what} {path!r} has a name longer than {MAX_NAME_BYTES} bytes")
    return path


def check_relative(path: object, what: str = "path") -> PurePosixPath:
    """The lexical rules for a path relative to the work directory; returns it normalised
    (``a//./b`` → ``a/b``). Raises :class:`PathRefused`."""
    text = _check_common(path, what)
    if text.startswith("/"):
        raise PathRefused(f"{what} {text!r} is absolute; give a path relative to the work "
                          "directory")
    pure = PurePosixPath(text)
    if not pure.parts:
        raise PathRefused(f"{what} {text!r} names the work directory itself")
    return pure


def check_name(name: object, what: str = "name") -> str:
    """A single file name (no ``/``), e.g. the name a peer gives a file it sends."""
    text = _check_common(name, what)
    if "/" in text or text in (".", ".."):
        raise PathRefused(f"{what} {text!r} must be a plain file name, without '/'")
    return text


def _root(root: Path) -> Path:
    resolved = Path(root).resolve(strict=True)
    if not resolved.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(root))
    return resolved


def _resolve(path: Path, shown: str, what: str) -> Path:
    try:
        return path.resolve()
    except RuntimeError as error:  # Python 3.11: a symlink loop
        raise PathRefused(f"{what} {shown!r} cannot be resolved: {error}") from None
    except OSError as error:  # Python 3.13+: a symlink loop, and any other failure
        raise PathRefused(f"{what} {shown!r} cannot be resolved: {error.strerror}") from None


def _inside(path: Path, root: Path) -> bool:
    return path == root or path.is_relative_to(root)


def confine(root: Path, path: object, what: str = "path") -> Path:
    """The resolved location of ``path`` (relative to ``root``), every symlink followed; refused
    unless it lies strictly inside ``root``. Use for files to read."""
    relative = check_relative(path, what)
    base = _root(root)
    target = _resolve(base / relative, str(relative), what)
    if not _inside(target, base):
        raise PathRefused(f"{what} {str(relative)!r} resolves outside the work directory "
                          "(through a symlink)", status=403)
    if target == base:
        raise PathRefused(f"{what} {str(relative)!r} names the work directory itself")
    return target


def confine_destination(root: Path, path: object, what: str = "dest") -> Path:
    """Where to write ``path`` (relative to ``root``): its parent resolved, its leaf as named.

    Refused like :func:`confine` when the fully resolved location, a symlink at the leaf
    included, escapes ``root``; also refused when a trailing ``/`` is given or the destination
    is an existing directory. A symlink at the leaf that stays inside is replaced by the new file
    (:class:`AtomicFile` never writes through a link)."""
    if isinstance(path, str) and path.endswith("/"):
        raise PathRefused(f"{what} {path!r} ends with '/'; name a file")
    relative = check_relative(path, what)
    full = confine(root, path, what)
    base = _root(root)
    parent = _resolve(base / relative.parent, str(relative), what)
    if not _inside(parent, base):  # cannot happen when `full` is inside, but cheap to keep true
        raise PathRefused(f"{what} {str(relative)!r} resolves outside the work directory",
                          status=403)
    if full.is_dir():
        raise PathRefused(f"{what} {str(relative)!r} is an existing directory")
    return parent / relative.name


def confine_source(roots: Iterable[Path], path: object, what: str = "path") -> Path:
    """An absolute ``path`` that must resolve inside one of ``roots`` (e.g. allow-listed data
    directories). Lexical rules as for relative paths (no ``..``, NUL, over-long names)."""
    text = _check_common(path, what)
    if not text.startswith("/"):
        raise PathRefused(f"{what} {text!r} is not absolute")
    target = _resolve(Path(text), text, what)
    for root in roots:
        base = _root(root)
        if _inside(target, base) and target != base:
            return target
    raise PathRefused(f"{what} {text!r} is outside the work directory and the allowed "
                      "directories", status=403)


def _refuse_walk(dir_fd: int, part: str, path: Path, error: OSError) -> PathRefused:
    try:
        is_link = stat.S_ISLNK(os.stat(part, dir_fd=dir_fd, follow_symlinks=False).st_mode)
    except OSError:
        is_link = False
    if is_link:
        return PathRefused(f"{path}: {part!r} became a symlink after the path was checked",
                           status=403)
    return PathRefused(f"{path}: {part!r} is not a directory ({error.strerror})")


def _open_dir(path: Path, *, create: bool) -> int:
    """A descriptor of the absolute directory ``path``, opened from ``/`` without following any
    symlink; missing components are created (0700) when ``create``."""
    fd = os.open("/", _DIR_FLAGS)
    try:
        for part in path.parts[1:]:
            try:
                next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except FileNotFoundError:
                if not create:
                    raise
                try:
                    os.mkdir(part, 0o700, dir_fd=fd)
                except FileExistsError:
                    pass  # created concurrently: the open below checks what it is
                try:
                    next_fd = os.open(part, _DIR_FLAGS, dir_fd=fd)
                except OSError as error:
                    raise _refuse_walk(fd, part, path, error) from None
            except OSError as error:
                if error.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                raise _refuse_walk(fd, part, path, error) from None
            os.close(fd)
            fd = next_fd
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_for_reading(path: Path) -> BinaryIO:
    """Open a checked (symlink-free, absolute) path for reading without following symlinks.
    Only regular files: a FIFO, socket or device is refused without blocking."""
    dir_fd = _open_dir(path.parent, create=False)
    try:
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC,
                         dir_fd=dir_fd)
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise PathRefused(f"{path} became a symlink after it was checked",
                              status=403) from None
    finally:
        os.close(dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise PathRefused(f"{path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def _alternatives(name: str) -> Iterator[str]:
    yield name
    pure = PurePosixPath(name)
    stem, suffix = (pure.stem, pure.suffix) if pure.stem else (name, "")
    for i in range(1, 10_000):
        candidate = f"{stem}-{i}{suffix}"
        if len(os.fsencode(candidate)) <= MAX_NAME_BYTES:
            yield candidate


class AtomicFile:
    """Write a file atomically at a checked destination (see :func:`confine_destination`).

    ::

        with AtomicFile(dest) as out:
            out.file.write(data)
            final = out.commit()  # without commit(), the temp file is removed on exit

    The parent directories are created (0700) as needed, all without following symlinks; the
    data goes to ``.hypha-<random>.part`` (0600) beside the destination. ``commit()`` renames it
    over the destination, or with ``overwrite=False`` publishes it under the first free name of
    ``name``, ``name-1.ext``, ``name-2.ext``, ... (a hard link, which never replaces anything).
    Blocking: call it from a worker thread in async code.
    """

    def __init__(self, dest: Path) -> None:
        self.dest = dest
        self._dir_fd = _open_dir(dest.parent, create=True)
        self._tmp: str | None = None
        try:
            try:
                existing = os.stat(dest.name, dir_fd=self._dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                pass
            else:
                if stat.S_ISDIR(existing.st_mode):
                    raise PathRefused(f"{dest} is an existing directory")
            tmp = f".hypha-{secrets.token_hex(8)}.part"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         0o600, dir_fd=self._dir_fd)
            self._tmp = tmp
            self.file: BinaryIO = os.fdopen(fd, "wb")
        except BaseException:
            self.close()
            raise

    def commit(self, *, overwrite: bool = True) -> Path:
        """Publish the data; returns the final path. Call once."""
        if self._tmp is None:
            raise RuntimeError("AtomicFile is already committed or discarded")
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        tmp, self._tmp = self._tmp, None
        renamed = False
        try:
            if overwrite:
                try:
                    os.rename(tmp, self.dest.name, src_dir_fd=self._dir_fd,
                              dst_dir_fd=self._dir_fd)
                except IsADirectoryError:
                    raise PathRefused(f"{self.dest} is an existing directory") from None
                renamed = True
                return self.dest
            for name in _alternatives(self.dest.name):
                try:
                    os.link(tmp, name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd,
                            follow_symlinks=False)
                except FileExistsError:
                    continue
                return self.dest.with_name(name)
            raise PathRefused(f"{self.dest}: no free name left beside it")
        finally:
            if not renamed:  # failed, or published as a hard link: the temp name goes
                _unlink_quietly(tmp, self._dir_fd)

    def discard(self) -> None:
        """Remove the temp file (a no-op after commit)."""
        if self._tmp is not None:
            self.file.close()
            _unlink_quietly(self._tmp, self._dir_fd)
            self._tmp = None

    def close(self) -> None:
        self.discard()
        if self._dir_fd >= 0:
            os.close(self._dir_fd)
            self._dir_fd = -1

    def __enter__(self) -> AtomicFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


def private_dir(path: Path) -> Path:
    """Create the directory ``path`` with mode 0700, or accept an existing one only when it is a
    real directory (not a symlink) owned by this user and closed to everyone else."""
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise PathRefused(f"{path} exists and is not a directory (or is a symlink)",
                              status=403) from None
        if info.st_uid != os.getuid() or info.st_mode & 0o077:
            raise PathRefused(f"{path} exists but is not private (owner uid {info.st_uid}, mode "
                              f"{stat.S_IMODE(info.st_mode):o}); remove it", status=403) from None
    else:
        os.chmod(path, 0o700)  # mkdir's mode is filtered by the umask
    return path
