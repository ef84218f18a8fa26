"""Launch helpers shared by the Triton kernels: device checks, grids, warps, compile options.

Every kernel is launched through :func:`launch`, which adds ``enable_fp_fusion=False``: the
reference (``hypha.ops._reference``) rounds every product and sum separately, and Triton would
otherwise contract ``a * b + c`` into one FMA on the GPU. The option is a field of the NVIDIA and
AMD backends' compile options (``CUDAOptions.enable_fp_fusion``, ``HIPOptions.enable_fp_fusion``;
with it False the NVIDIA backend also runs ptxas with ``--fmad=false``). The CPU interpreter
(``TRITON_INTERPRET=1``) drops launch keywords it does not know, and computes with numpy, which
never fuses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from triton.runtime.interpreter import InterpretedFunction

__all__ = [
    "FP_OPTIONS",
    "as_i32",
    "cdiv",
    "check_tensors",
    "interpreting",
    "launch",
    "num_warps_for",
    "round_f32",
    "rows_per_program",
]

#: Compile options passed with every launch (see the module docstring).
FP_OPTIONS: dict[str, Any] = {"enable_fp_fusion": False}


def cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def interpreting() -> bool:
    """True when triton runs kernels on the CPU with its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def check_tensors(**tensors: torch.Tensor | None) -> torch.device:
    """All given tensors (None entries are skipped) contiguous and on one device that Triton
    can run on: a GPU, or the CPU under TRITON_INTERPRET=1. Returns that device."""
    device: torch.device | None = None
    first = ""
    for name, t in tensors.items():
        if t is None:
            continue
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous")
        if device is None:
            device, first = t.device, name
        elif t.device != device:
            raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
    if device is None:
        raise ValueError("no tensor given")
    if device.type == "cpu" and not interpreting():
        raise RuntimeError(
            "hypha.kernels runs CPU tensors only under the Triton interpreter; set "
            "TRITON_INTERPRET=1 before importing triton, or move the tensors to a GPU"
        )
    return device


def as_i32(value: int) -> int:
    """The low 32 bits of ``value`` as a signed int32, so a kernel argument always has type i32
    (values in [2**31, 2**32) would otherwise be passed as u32/i64 and compile a second kernel).
    The kernel bitcasts it back to uint32."""
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= 1 << 31 else value


def round_f32(value: float) -> float:
    """``value`` rounded to the nearest fp32, the way the reference rounds hyperparameters."""
    return float(torch.tensor(value, dtype=torch.float32))


def rows_per_program(block: int, target_elems: int) -> int:
    """Quantization blocks per program so one program covers ~``target_elems`` elements.

    Block sizes are powers of two, so the tile (rows, block) stays a power of two."""
    return max(1, target_elems // block)


def num_warps_for(tile_elems: int) -> int:
    """4 warps up to 2048 elements per program, 8 above: 8-16 fp32 values per thread per
    tensor, enough in flight for a memory-bound kernel without spilling registers."""
    return 4 if tile_elems <= 2048 else 8


def _device_guard(device: torch.device) -> AbstractContextManager[Any]:
    # Triton launches on the current CUDA device; make it the tensors' device.
    return torch.cuda.device(device) if device.type == "cuda" else nullcontext()


def launch(
    kernel: Callable[..., Any],
    programs: int,
    device: torch.device,
    *args: Any,
    num_warps: int,
    **constexprs: Any,
) -> None:
    """kernel[(programs,)](*args, **constexprs) on ``device`` with FMA contraction disabled."""
    if programs <= 0:
        return
    if device.type == "cpu" and not isinstance(kernel, InterpretedFunction):
        raise RuntimeError(
            "hypha.kernels was imported before TRITON_INTERPRET=1 was set, so its kernels were "
            "compiled for the GPU and cannot run on CPU tensors; set TRITON_INTERPRET=1 before "
            "importing triton"
        )
    with _device_guard(device):
        kernel[(programs,)](*args, num_warps=num_warps, **FP_OPTIONS, **constexprs)
