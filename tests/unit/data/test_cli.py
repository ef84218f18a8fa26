"""`python -m hypha.data`: prepare and verify end to end, exit codes, and errors that are one
`hypha data: error: ...` line (exit status 2), never a traceback; plus the package's exports."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import hypha.data
from hypha.data import Dataset
from hypha.data.cli import main

PREFIX = "hypha data: error: "


def run(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def fails(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> str:
    """Run argv, check it fails the documented way, return the error message."""
    rc, out, err = run(capsys, *argv)
    assert rc == 2, (out, err)
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(PREFIX), err
    return line[len(PREFIX) :]


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "a.txt").write_text("hello hypha\n" * 50)
    return d


def test_prepare_text_and_verify(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    rc, stdout, err = run(
        capsys,
        "prepare",
        "text",
        "--input",
        corpus,
        "--name",
        "hello",
        "--out",
        out,
        "--seq-len",
        "32",
        "--slice-tokens",
        "1_024",
    )
    assert rc == 0, err
    assert stdout.startswith(f"prepared text dataset 'hello' in {out / 'hello'}: 1 slice, 18 ")
    ds = Dataset.open(out / "hello")
    assert ds.manifest.text is not None and ds.manifest.text.seq_len == 32
    rc, stdout, _ = run(capsys, "verify", out / "hello")
    assert rc == 0 and stdout.startswith(f"{out / 'hello'}: ok: 1 slice")
    assert "already exists; pass --force" in fails(
        capsys, "prepare", "text", "--input", corpus, "--name", "hello", "--out", out
    )
    rc, _, _ = run(
        capsys, "prepare", "text", "--input", corpus, "--name", "hello", "--out", out, "--force"
    )
    assert rc == 0
    slice0 = out / "hello" / "slice-00000.safetensors"
    data = bytearray(slice0.read_bytes())
    data[-1] ^= 1
    slice0.write_bytes(bytes(data))
    assert "SHA-256 does not match" in fails(capsys, "verify", out / "hello")


def test_prepare_builtin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, stdout, err = run(
        capsys, "prepare", "text", "--builtin", "python-stdlib-small", "--out", tmp_path
    )
    assert rc == 0, err
    assert "'python-stdlib-small'" in stdout
    Dataset.open(tmp_path / "python-stdlib-small").verify()


def test_prepare_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    np.savez(tmp_path / "m.npz", images=np.zeros((5, 2, 3), np.uint8), labels=np.arange(5))
    rc, stdout, err = run(
        capsys,
        "prepare",
        "images",
        "--input",
        tmp_path / "m.npz",
        "--name",
        "m",
        "--out",
        tmp_path,
        "--slice-examples",
        "2",
        "--seed",
        "3",
        "--no-shuffle",
    )
    assert rc == 0, err
    assert stdout.endswith("3 slices, 5 images of 2x3x1 in 5 classes\n")
    assert "invalid dataset name 'bad name'" in fails(
        capsys,
        "prepare",
        "images",
        "--input",
        tmp_path / "m.npz",
        "--name",
        "bad name",
        "--out",
        tmp_path,
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["prepare", "text", "--input", "{corpus}", "--out", "{tmp}"],
            "--name is required with --input",
        ),
        (
            ["prepare", "text", "--name", "x", "--out", "{tmp}"],
            "one of the arguments --input --builtin is required",
        ),
        (
            [
                "prepare",
                "text",
                "--builtin",
                "python-stdlib",
                "--input",
                "{corpus}",
                "--out",
                "{tmp}",
            ],
            "not allowed with",
        ),
        (["prepare", "text", "--builtin", "nope", "--out", "{tmp}"], "invalid choice: 'nope'"),
        (
            [
                "prepare",
                "text",
                "--input",
                "{corpus}",
                "--name",
                "x",
                "--out",
                "{tmp}",
                "--seq-len",
                "0",
            ],
            "expected a positive integer, got '0'",
        ),
        (
            [
                "prepare",
                "text",
                "--input",
                "{corpus}",
                "--name",
                "x",
                "--out",
                "{tmp}",
                "--slice-tokens",
                "lots",
            ],
            "expected a positive integer, got 'lots'",
        ),
        (
            [
                "prepare",
                "text",
                "--input",
                "{corpus}",
                "--name",
                "x",
                "--out",
                "{tmp}",
                "--slice-tokens",
                "8",
                "--seq-len",
                "16",
            ],
            "slice_tokens 8 is smaller than seq_len 16",
        ),
        (
            ["prepare", "text", "--input", "{tmp}/missing", "--name", "x", "--out", "{tmp}"],
            "missing: no such file or directory",
        ),
        (
            ["prepare", "text", "--input", "{corpus}", "--name", "a/b", "--out", "{tmp}"],
            "invalid dataset name 'a/b'",
        ),
        (
            ["prepare", "images", "--input", "{corpus}", "--name", "x", "--out", "{tmp}"],
            "no class folders",
        ),
        (
            [
                "prepare",
                "images",
                "--input",
                "{corpus}",
                "--name",
                "x",
                "--out",
                "{tmp}",
                "--seed",
                "-1",
            ],
            "expected an integer >= 0",
        ),
        (["prepare", "video"], "invalid choice: 'video'"),
        (["verify", "{tmp}/nothing"], "no such dataset"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
    ],
)
def test_errors(
    tmp_path: Path, corpus: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    args = [a.format(corpus=corpus, tmp=tmp_path) for a in argv]
    assert message in fails(capsys, *args)


def test_help_and_missing_command(capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = run(capsys, "--help")
    assert rc == 0 and "prepare" in out and "verify" in out
    rc, out, _ = run(capsys, "prepare", "text", "--help")
    assert rc == 0 and "python-stdlib" in out and "--slice-tokens" in out
    rc, _, err = run(capsys)
    assert rc == 2 and "usage:" in err
    rc, _, err = run(capsys, "prepare")
    assert rc == 2 and "KIND" in err


def test_python_dash_m(tmp_path: Path, corpus: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "hypha.data",
            "prepare",
            "text",
            "--input",
            str(corpus),
            "--name",
            "x",
            "--out",
            str(tmp_path),
            "--seq-len",
            "1",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "hypha.data", "verify", str(tmp_path / "y")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.startswith(PREFIX)


def test_exports() -> None:
    assert sorted(hypha.data.__all__) == sorted(
        [
            "BUILTIN_CORPORA",
            "DEFAULT_MAX_ASSIGNED",
            "DEFAULT_SEQ_LEN",
            "DEFAULT_SLICE_EXAMPLES",
            "DEFAULT_SLICE_TOKENS",
            "END_OF_DOCUMENT",
            "FORMAT",
            "FORMAT_VERSION",
            "KINDS",
            "MANIFEST",
            "TEXT_SUFFIXES",
            "Assignment",
            "BuiltinCorpus",
            "Dataset",
            "DatasetError",
            "ImagesInfo",
            "Manifest",
            "NoSliceAvailable",
            "SliceInfo",
            "SliceState",
            "SliceTracker",
            "TensorSpec",
            "TextInfo",
            "TrackerError",
            "TrackerStats",
            "builtin_corpus_files",
            "check_name",
            "load_slice_bytes",
            "prepare_builtin_text",
            "prepare_images",
            "prepare_text",
            "slice_file_name",
        ]
    )
    for name in hypha.data.__all__:
        assert getattr(hypha.data, name) is not None


def test_import_is_light() -> None:
    """The scheduler imports hypha.data for the tracker; that must not pull in torch (~1.5 s)."""
    code = "import sys, hypha.data; print('torch' in sys.modules, 'safetensors' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.split() == ["False", "False"]
