"""Builds hypha._C: the C++ CPU kernels always, the CUDA kernels when a CUDA toolkit and a CUDA
build of torch are present.

Environment:
  HYPHA_SKIP_CUDA=1        never build the CUDA kernels.
  HYPHA_CUDA_ARCHS="80;90" compute capabilities to compile for (default: TORCH_CUDA_ARCH_LIST, or
                           torch's choice for the visible GPUs).
  HYPHA_DEBUG=1            -O0 -g build.

Build it against the torch already installed: pip install --no-build-isolation -e .
"""

from __future__ import annotations

import glob
import os

from setuptools import find_packages, setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError as exc:  # pragma: no cover - exercised only on a broken install
    raise SystemExit(
        "hypha builds its extension against an installed torch. Install torch first "
        "(e.g. `pip install torch`), then `pip install --no-build-isolation .`"
    ) from exc


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").strip().lower() in ("1", "true", "yes", "on")


def _cuda_enabled() -> bool:
    if _flag("HYPHA_SKIP_CUDA"):
        return False
    return CUDA_HOME is not None and torch.version.cuda is not None


def _gencode_flags() -> list[str]:
    archs = os.environ.get("HYPHA_CUDA_ARCHS", "").replace(",", ";").split(";")
    flags = []
    for arch in (a.strip().replace(".", "") for a in archs):
        if arch:
            flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags  # empty: torch.utils.cpp_extension picks (TORCH_CUDA_ARCH_LIST or visible GPUs)


def _extension():
    debug = _flag("HYPHA_DEBUG")
    opt = ["-O0", "-g"] if debug else ["-O3"]
    # NOTE: -ffp-contract=off keeps a*b+c as two roundings, as the reference defines; no
    # -march=native: the wheel must run on any x86-64 (wider SIMD is dispatched at run time).
    cxx = opt + ["-std=c++17", "-fopenmp", "-ffp-contract=off", "-fno-math-errno", "-Wall"]
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/core/*.cpp"))
    include_dirs = [os.path.abspath("csrc/include")]
    if _cuda_enabled():
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        nvcc = opt + ["-std=c++17", "--fmad=false", "-lineinfo"] + _gencode_flags()
        return CUDAExtension(
            "hypha._C",
            sources,
            include_dirs=include_dirs,
            define_macros=[("HYPHA_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + ["-DHYPHA_WITH_CUDA=1"], "nvcc": nvcc},
            extra_link_args=["-fopenmp"],
        )
    return CppExtension(
        "hypha._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx},
        extra_link_args=["-fopenmp"],
    )


setup(
    packages=find_packages(include=["hypha", "hypha.*"]) + ["hypha.kernels"],
    package_dir={"hypha.kernels": "kernels"},
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
