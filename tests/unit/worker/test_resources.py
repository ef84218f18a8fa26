"""hypha.worker.resources: human sizes, detecting this machine, config overrides."""

from __future__ import annotations

import logging
import os
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypha.messages import Resources
from hypha.worker import resources
from hypha.worker.resources import apply_overrides, detect, format_size, parse_size

KiB, MiB, GiB, TiB = 2**10, 2**20, 2**30, 2**40


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0", 0),
        ("17179869184", 16 * GiB),
        (" 42 ", 42),
        (1024, 1024),
        ("512B", 512),
        ("16GiB", 16 * GiB),
        ("16gib", 16 * GiB),
        ("16Gi", 16 * GiB),
        ("16 GiB", 16 * GiB),
        ("500G", 500 * 10**9),
        ("500GB", 500 * 10**9),
        ("1kB", 1000),
        ("1K", 1000),
        ("1KiB", KiB),
        ("3MiB", 3 * MiB),
        ("2M", 2 * 10**6),
        ("1.5TiB", 3 * TiB // 2),
        ("1.5T", 15 * 10**11),
        ("0.5KiB", 512),
        (".5K", 500),
        ("1.0001K", 1000),  # rounded down to whole bytes
        ("2PiB", 2 * 2**50),
    ],
)
def test_parse_size(text: str | int, expected: int) -> None:
    assert parse_size(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected a size in bytes such as"),
        ("   ", "expected a size in bytes such as"),
        ("GiB", "expected a size in bytes such as"),
        ("lots", "expected a size in bytes such as"),
        ("1e9", "expected a size in bytes such as"),
        ("16 parsecs", "unknown unit 'parsecs'"),
        ("16GiBs", "unknown unit 'GiBs'"),
        ("1.2.3G", "expected a size in bytes such as"),
        ("16 G iB", "expected a size in bytes such as"),
        ("-1", "cannot be negative"),
        ("-2GiB", "cannot be negative"),
        (-5, "cannot be negative"),
        ("nan", "expected a size in bytes such as"),
        ("inf", "expected a size in bytes such as"),
        (True, "expected a size in bytes such as"),
        (1.5, "expected a size in bytes such as"),
    ],
)
def test_parse_size_errors(text: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_size(text)  # type: ignore[arg-type]


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(16 * GiB) == "16.0 GiB"
    assert format_size(3 * TiB // 2) == "1.5 TiB"
    assert format_size(5000 * TiB) == "5000.0 TiB"


def test_detect_measures_this_machine(tmp_path: Path) -> None:
    found = detect(tmp_path, None)
    assert found.cpu == float(len(os.sched_getaffinity(0))) and found.cpu >= 1
    assert 16 * MiB < found.memory <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert found.storage > 0 and found.gpu == 0
    # a work dir that does not exist yet: the free space of the nearest existing parent
    later = detect(tmp_path / "not" / "yet", None)
    assert later.storage > 0 and abs(later.storage - found.storage) < 1 * GiB


def test_memory_falls_back_to_sysconf(tmp_path: Path) -> None:
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       1000 kB\nMemAvailable:    750 kB\n")
    assert resources._memory(meminfo) == 750 * 1024
    meminfo.write_text("MemTotal:       1000 kB\n")  # an old kernel: no MemAvailable
    fallback = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert abs(resources._memory(meminfo) - fallback) < 1 * GiB
    assert resources._memory(tmp_path / "missing") > 0


def test_cpu_count_without_affinity(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(os, "sched_getaffinity")
    monkeypatch.setattr(os, "cpu_count", lambda: 3)
    assert resources._cpus() == 3


def fake_torch(monkeypatch: pytest.MonkeyPatch, *, available: bool, count: int) -> None:
    cuda = types.SimpleNamespace(is_available=lambda: available, device_count=lambda: count)
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))


def test_gpu_by_device_index(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_torch(monkeypatch, available=True, count=2)
    assert detect(tmp_path, 0).gpu == 1
    assert detect(tmp_path, 1).gpu == 1
    with pytest.raises(ValueError) as exc:
        detect(tmp_path, 2)
    assert str(exc.value) == "--gpu 2: this machine has 2 CUDA device(s) (0..1)"
    fake_torch(monkeypatch, available=True, count=1)
    with pytest.raises(ValueError) as exc:
        detect(tmp_path, 1)
    assert str(exc.value) == "--gpu 1: this machine has 1 CUDA device(s) (0..0)"
    with pytest.raises(ValueError, match="--gpu -1: expected a CUDA device index"):
        detect(tmp_path, -1)


def test_gpu_without_cuda(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_torch(monkeypatch, available=False, count=0)
    with pytest.raises(ValueError, match=r"^--gpu given but torch has no CUDA"):
        detect(tmp_path, 0)
    assert detect(tmp_path, None).gpu == 0  # no --gpu: torch is not even consulted


@dataclass(frozen=True)
class Overrides:
    cpu: float | None = None
    memory: str | int | None = None
    storage: str | int | None = None


DETECTED = Resources(cpu=8.0, memory=32 * GiB, storage=100 * GiB, gpu=1)


def test_overrides_cap_the_detected_values(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hypha.worker")
    assert apply_overrides(DETECTED, Overrides()) == DETECTED
    capped = apply_overrides(DETECTED, Overrides(cpu=2, memory="4GiB", storage=10 * GiB))
    assert capped == Resources(cpu=2.0, memory=4 * GiB, storage=10 * GiB, gpu=1)
    assert isinstance(capped.cpu, float)
    assert caplog.records == []


def test_overrides_above_the_detected_values_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, "hypha.worker")
    more = apply_overrides(DETECTED, Overrides(cpu=64, memory="1TiB"))
    assert more == Resources(cpu=64.0, memory=TiB, storage=100 * GiB, gpu=1)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "resources.cpu = 64 is more than the 8 cores detected; offering 64 as configured",
        "resources.memory = 1.0 TiB is more than the 32.0 GiB detected; offering 1.0 TiB as "
        "configured",
    ]


def test_bad_overrides() -> None:
    with pytest.raises(ValueError, match=r"resources\.memory: unknown unit 'parsecs'"):
        apply_overrides(DETECTED, Overrides(memory="16 parsecs"))
    with pytest.raises(ValueError, match=r"resources\.cpu: expected a positive number of cores"):
        apply_overrides(DETECTED, Overrides(cpu=0))
