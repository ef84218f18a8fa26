"""Path confinement: the lexical rules, symlink escapes, and symlinks planted after the check."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import trio

from hypha.executors._paths import (
    AtomicFile,
    PathRefused,
    check_name,
    check_relative,
    confine,
    confine_destination,
    confine_source,
    open_for_reading,
    private_dir,
)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    (tmp_path / "work").mkdir()
    return (tmp_path / "work").resolve()


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "secret").write_text("secret")
    return (tmp_path / "outside").resolve()


@pytest.mark.parametrize(("path", "message"), [
    ("", "is empty"),
    ("/etc/passwd", "is absolute"),
    ("../x", "'..' component"),
    ("a/../../x", "'..' component"),
    ("a/..", "'..' component"),
    ("a\x00b", "NUL byte"),
    ("x" * 256, "longer than 255 bytes"),
    ("é" * 128, "longer than 255 bytes"),  # 256 bytes in UTF-8
    ("a/" * 2048 + "b", "longer than 4096 bytes"),
    (".", "the work directory itself"),
    ("./", "the work directory itself"),
    (5, "must be a string"),
    (None, "must be a string"),
    ("\udc80\ud800", "not a valid file name"),
])
def test_lexical_refusals(work: Path, path: object, message: str) -> None:
    with pytest.raises(PathRefused, match=message) as caught:
        confine(work, path)
    assert caught.value.status == 400


@pytest.mark.parametrize(("path", "normal"), [
    ("a", "a"), ("a//b", "a/b"), ("./a/./b", "a/b"), ("a/b.c/d", "a/b.c/d"),
    ("x" * 255, "x" * 255), ("..a/b..", "..a/b.."), ("with space/ünï", "with space/ünï"),
])
def test_good_relative_paths(work: Path, path: str, normal: str) -> None:
    assert str(check_relative(path)) == normal
    assert confine(work, path) == work / normal


def test_nested_destination_is_created_private(work: Path) -> None:
    dest = confine_destination(work, "a/b/c/file.bin")
    assert dest == work / "a/b/c/file.bin"
    with AtomicFile(dest) as out:
        out.file.write(b"data")
        assert out.commit() == dest
    assert dest.read_bytes() == b"data"
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert stat.S_IMODE((work / "a/b").stat().st_mode) == 0o700
    assert sorted(p.name for p in dest.parent.iterdir()) == ["file.bin"]  # no temp left


def test_symlinked_parent_escaping_is_refused(work: Path, outside: Path) -> None:
    (work / "link").symlink_to(outside)
    for check in (confine, confine_destination):
        with pytest.raises(PathRefused, match="outside the work directory") as caught:
            check(work, "link/secret")
        assert caught.value.status == 403
    (work / "deep").mkdir()
    (work / "deep" / "up").symlink_to("../../outside")
    with pytest.raises(PathRefused, match="outside"):
        confine_destination(work, "deep/up/new")


def test_symlink_at_the_leaf_escaping_is_refused(work: Path, outside: Path) -> None:
    (work / "leaf").symlink_to(outside / "secret")
    (work / "dangling").symlink_to(outside / "not-yet")
    for name in ("leaf", "dangling"):
        for check in (confine, confine_destination):
            with pytest.raises(PathRefused, match="outside the work directory"):
                check(work, name)
    assert (outside / "secret").read_text() == "secret"
    assert not (outside / "not-yet").exists()


def test_symlinks_that_stay_inside_are_followed(work: Path) -> None:
    (work / "real").mkdir()
    (work / "real" / "f").write_text("x")
    (work / "data").symlink_to("real")
    (work / "alias").symlink_to("real/f")
    assert confine(work, "data/f") == work / "real/f"
    assert confine(work, "alias") == work / "real/f"
    assert confine_destination(work, "data/new") == work / "real/new"
    # a link at the destination is replaced by the new file, never written through
    assert confine_destination(work, "alias") == work / "alias"
    with AtomicFile(work / "alias") as out:
        out.file.write(b"new")
        out.commit()
    assert not (work / "alias").is_symlink()
    assert (work / "alias").read_bytes() == b"new"
    assert (work / "real" / "f").read_text() == "x"


def test_a_link_to_the_work_dir_itself_is_refused(work: Path) -> None:
    (work / "self").symlink_to(".")
    with pytest.raises(PathRefused, match="the work directory itself"):
        confine(work, "self")


def test_symlink_loop_is_refused(work: Path) -> None:
    (work / "loop").symlink_to("loop")
    with pytest.raises(PathRefused, match="cannot be resolved"):
        confine(work, "loop/x")


def test_existing_directory_is_not_a_destination(work: Path) -> None:
    (work / "d").mkdir()
    (work / "to-d").symlink_to("d")
    for name in ("d", "to-d"):
        with pytest.raises(PathRefused, match="existing directory"):
            confine_destination(work, name)
    with pytest.raises(PathRefused, match="ends with '/'"):
        confine_destination(work, "new/")


def test_a_file_in_the_middle_of_a_path_is_refused(work: Path) -> None:
    (work / "f").write_text("x")
    dest = confine_destination(work, "f/g")
    with pytest.raises(PathRefused, match="not a directory"):
        AtomicFile(dest)


def test_symlink_planted_after_the_check_is_not_followed(work: Path, outside: Path) -> None:
    """TOCTOU: a directory checked by confine_destination is swapped for a symlink to
    outside before the write; the component-wise O_NOFOLLOW walk refuses it."""
    (work / "a" / "b").mkdir(parents=True)
    dest = confine_destination(work, "a/b/secret")
    (work / "a" / "b").rmdir()
    (work / "a" / "b").symlink_to(outside)
    with pytest.raises(PathRefused, match="became a symlink") as caught:
        AtomicFile(dest)
    assert caught.value.status == 403
    assert (outside / "secret").read_text() == "secret"
    assert sorted(p.name for p in outside.iterdir()) == ["secret"]


def test_symlink_planted_after_the_check_is_not_read(work: Path, outside: Path) -> None:
    (work / "d").mkdir()
    (work / "d" / "f").write_text("mine")
    source = confine(work, "d/f")
    (work / "d" / "f").unlink()
    (work / "d" / "f").symlink_to(outside / "secret")
    with pytest.raises(PathRefused, match="became a symlink"):
        open_for_reading(source)
    (work / "d" / "f").unlink()
    (work / "d").rmdir()
    (work / "d").symlink_to(outside)
    with pytest.raises(PathRefused, match="became a symlink"):
        open_for_reading(source)


def test_hard_link_at_the_destination_is_replaced_not_written(work: Path,
                                                              outside: Path) -> None:
    os.link(outside / "secret", work / "linked")
    with AtomicFile(confine_destination(work, "linked")) as out:
        out.file.write(b"overwritten?")
        out.commit()
    assert (outside / "secret").read_text() == "secret"
    assert (work / "linked").read_bytes() == b"overwritten?"


def test_uncommitted_or_failed_writes_leave_nothing(work: Path) -> None:
    dest = confine_destination(work, "f")
    with pytest.raises(RuntimeError, match="boom"), AtomicFile(dest) as out:
        out.file.write(b"partial")
        raise RuntimeError("boom")
    with AtomicFile(dest) as out:
        out.file.write(b"never committed")
    assert list(work.iterdir()) == []


def test_no_overwrite_picks_a_free_name(work: Path) -> None:
    names = []
    for content in (b"1", b"2", b"3"):
        with AtomicFile(confine_destination(work, "in/model.bin")) as out:
            out.file.write(content)
            names.append(out.commit(overwrite=False).name)
    assert names == ["model.bin", "model-1.bin", "model-2.bin"]
    assert (work / "in" / "model-2.bin").read_bytes() == b"3"
    assert sorted(p.name for p in (work / "in").iterdir()) == sorted(names)


async def test_special_files_are_refused_without_blocking(work: Path) -> None:
    os.mkfifo(work / "fifo")
    with trio.fail_after(5), pytest.raises(PathRefused, match="not a regular file"):
        await trio.to_thread.run_sync(open_for_reading, confine(work, "fifo"),
                                      abandon_on_cancel=True)
    (work / "dir").mkdir()
    with pytest.raises(PathRefused, match="not a regular file"):
        open_for_reading(confine(work, "dir"))


def test_confine_source_with_allowed_roots(work: Path, outside: Path) -> None:
    assert confine_source([outside], str(outside / "secret")) == outside / "secret"
    assert confine_source([work, outside], str(outside / "secret")) == outside / "secret"
    cases = [
        ([work], str(outside / "secret"), "outside the work directory and the allowed"),
        ([outside], str(outside), "outside the work directory and the allowed"),
        ([outside], "secret", "not absolute"),
        ([outside], f"{outside}/../outside/secret", "'..' component"),
        ([outside], f"{outside}/x\x00", "NUL byte"),
    ]
    for roots, path, message in cases:
        with pytest.raises(PathRefused, match=message):
            confine_source(roots, path)
    (outside / "up").symlink_to(work)
    with pytest.raises(PathRefused, match="outside the work directory and the allowed"):
        confine_source([outside], str(outside / "up" / "x"))


def test_check_name() -> None:
    assert check_name("model.bin") == "model.bin"
    for bad, message in (("a/b", "plain file name"), (".", "plain file name"),
                         ("..", "'..' component"), ("", "is empty"), ("x" * 256, "255")):
        with pytest.raises(PathRefused, match=message):
            check_name(bad)


def test_private_dir(tmp_path: Path) -> None:
    made = private_dir(tmp_path / "p")
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert private_dir(made) == made  # an existing private dir is fine
    (tmp_path / "open").mkdir(mode=0o755)
    os.chmod(tmp_path / "open", 0o755)
    with pytest.raises(PathRefused, match="not private"):
        private_dir(tmp_path / "open")
    (tmp_path / "link").symlink_to(made)
    with pytest.raises(PathRefused, match="not a directory"):
        private_dir(tmp_path / "link")
    (tmp_path / "file").write_text("")
    with pytest.raises(PathRefused, match="not a directory"):
        private_dir(tmp_path / "file")
