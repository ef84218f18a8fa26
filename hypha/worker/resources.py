"""What this worker can offer: detect the machine's resources, let the config cap them.

:func:`detect` measures what this process may use (cores in its affinity mask, available memory,
free space where jobs will write, one CUDA device when ``--gpu N`` is given);
:func:`apply_overrides` replaces any of cpu / memory / storage with the configured value (a value
above the detected one is allowed, with a warning: in a container the operator often knows
better than ``/proc``). :func:`parse_size` reads the human sizes the config accepts.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import shutil
from fractions import Fraction
from pathlib import Path
from typing import Final, Protocol

from hypha.messages import Resources

__all__ = ["ResourceOverrides", "apply_overrides", "detect", "format_size", "parse_size"]

log = logging.getLogger("hypha.worker")

# NOTE: SI prefixes are powers of 1000 and IEC ones powers of 1024, as in Kubernetes
# ("16G" = 16e9 bytes, "16Gi" / "16GiB" = 16 * 2**30); a trailing B is optional; case is ignored.
_UNITS: Final[dict[str, int]] = {
    "": 1,
    "b": 1,
    **{p: 1000**i for i, p in enumerate("kmgtpe", start=1)},
    **{f"{p}b": 1000**i for i, p in enumerate("kmgtpe", start=1)},
    **{f"{p}i": 1024**i for i, p in enumerate("kmgtpe", start=1)},
    **{f"{p}ib": 1024**i for i, p in enumerate("kmgtpe", start=1)},
}
_SIZE: Final = re.compile(r"\s*(?P<number>[0-9]*\.?[0-9]+|[0-9]+\.)\s*(?P<unit>[a-z]*)\s*",
                          re.IGNORECASE)
_SIZE_HELP: Final = 'a size in bytes such as "17179869184", "16GiB", "500G" or "1.5TiB"'


def parse_size(text: str | int) -> int:
    """Bytes in ``text``: a plain integer, or a number with a unit.

    Units: B; kB MB GB TB PB EB (powers of 1000, the B optional: "500G"); KiB MiB GiB TiB PiB EiB
    (powers of 1024, the B optional: "16Gi"). Case is ignored. A fractional result is rounded
    down to whole bytes ("1.5TiB" is exact). Raises ``ValueError`` saying what was expected.
    """
    if isinstance(text, bool):
        raise ValueError(f"expected {_SIZE_HELP}, got {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative, got {text}")
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected {_SIZE_HELP}, got {type(text).__name__} {text!r}")
    if text.strip().startswith("-"):
        raise ValueError(f"a size cannot be negative, got {text!r}")
    match = _SIZE.fullmatch(text)
    if match is None:
        raise ValueError(f"expected {_SIZE_HELP}, got {text!r}")
    unit = match["unit"].lower()
    if unit not in _UNITS:
        raise ValueError(
            f"unknown unit {match['unit']!r} in {text!r}; use B, kB, MB, GB, TB, PB (powers of "
            "1000) or KiB, MiB, GiB, TiB, PiB (powers of 1024)"
        )
    return math.floor(Fraction(match["number"]) * _UNITS[unit])


def format_size(n: int) -> str:
    """``n`` bytes for people: "16.0 GiB"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------
# detection


def detect(work_dir: Path, gpu: int | None) -> Resources:
    """The resources this process can use.

    * cpu: cores in this process's affinity mask (``os.sched_getaffinity``; ``os.cpu_count()``
      where that does not exist). CPU quotas of a container are not seen: override them.
    * memory: ``MemAvailable`` of ``/proc/meminfo`` in bytes (available physical pages elsewhere).
    * storage: free bytes on the filesystem that holds ``work_dir`` (or, while it does not exist
      yet, its nearest existing parent).
    * gpu: 1 when ``gpu`` (a CUDA device index, ``--gpu N``) names a device torch can see, else 0.
      Raises ``ValueError`` when it names none.
    """
    return Resources(
        cpu=float(_cpus()), memory=_memory(), storage=_storage(work_dir), gpu=_gpus(gpu)
    )


def _cpus() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _memory(meminfo: Path = Path("/proc/meminfo")) -> int:
    try:
        with open(meminfo, encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    value, unit = line.split()[1:3]
                    if unit.lower() != "kb":
                        break
                    return int(value) * 1024
    except (OSError, ValueError):
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def _storage(work_dir: Path) -> int:
    path = Path(work_dir).expanduser().absolute()
    while not path.exists() and path.parent != path:
        path = path.parent
    return shutil.disk_usage(path).free


def _gpus(index: int | None) -> int:
    if index is None:
        return 0
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ValueError(f"--gpu {index}: expected a CUDA device index (0, 1, ...)")
    import torch  # only a worker that offers a GPU pays for importing torch

    if not torch.cuda.is_available():
        raise ValueError(
            "--gpu given but torch has no CUDA (a CPU-only build, or no driver); "
            "leave out --gpu to offer CPU only"
        )
    count = torch.cuda.device_count()
    if index >= count:
        raise ValueError(
            f"--gpu {index}: this machine has {count} CUDA device(s) (0..{count - 1})"
        )
    return 1


# ----------------------------------------------------------------------------------------------
# overrides


class ResourceOverrides(Protocol):
    """What :func:`apply_overrides` reads: the ``[resources]`` section of the worker config.

    ``None`` keeps the detected value; sizes are bytes or strings for :func:`parse_size`.
    """

    @property
    def cpu(self) -> float | None: ...

    @property
    def memory(self) -> str | int | None: ...

    @property
    def storage(self) -> str | int | None: ...


def apply_overrides(detected: Resources, overrides: ResourceOverrides) -> Resources:
    """``detected`` with cpu / memory / storage replaced where ``overrides`` gives a value.

    A value above the detected one is used, with a warning. The GPU is not overridden here: it is
    chosen by device index (``--gpu N``) in :func:`detect`.
    """
    changes: dict[str, float | int] = {}
    if overrides.cpu is not None:
        cpu = float(overrides.cpu)
        if not (math.isfinite(cpu) and cpu > 0):
            raise ValueError(f"resources.cpu: expected a positive number of cores, got {cpu}")
        if cpu > detected.cpu:
            log.warning(
                "resources.cpu = %g is more than the %g cores detected; offering %g as configured",
                cpu, detected.cpu, cpu,
            )
        changes["cpu"] = cpu
    for key in ("memory", "storage"):
        raw = getattr(overrides, key)
        if raw is None:
            continue
        try:
            size = parse_size(raw)
        except ValueError as exc:
            raise ValueError(f"resources.{key}: {exc}") from None
        found = getattr(detected, key)
        if size > found:
            log.warning(
                "resources.%s = %s is more than the %s detected; offering %s as configured",
                key, format_size(size), format_size(found), format_size(size),
            )
        changes[key] = size
    return dataclasses.replace(detected, **changes)  # type: ignore[arg-type]
