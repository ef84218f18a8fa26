"""Loads the compiled extension ``hypha._C`` once; warns once and falls back when it is missing."""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

__all__ = ["ENV_NO_EXTENSION", "extension", "extension_error"]

#: Set to 1 to ignore a built extension and run the pure-torch reference (debugging, tests).
ENV_NO_EXTENSION = "HYPHA_NO_EXTENSION"

_C: ModuleType | None = None
_error: str | None = None


def _load() -> None:
    global _C, _error
    if os.environ.get(ENV_NO_EXTENSION, "0") == "1":
        _error = f"disabled by {ENV_NO_EXTENSION}=1"
        return
    try:
        import torch  # noqa: F401  (hypha._C links against libtorch: load it first)

        mod = importlib.import_module("hypha._C")
    except ImportError as exc:
        _error = str(exc)
        warnings.warn(
            "hypha._C is not built; falling back to the pure-torch reference kernels, which are "
            "several times slower. Build it with `make build` (or `pip install "
            f"--no-build-isolation -e .`). Import error: {exc}",
            RuntimeWarning,
            stacklevel=3,
        )
        return
    _C = mod


def extension() -> ModuleType | None:
    """The compiled module, or None when it is not built (or disabled)."""
    return _C


def extension_error() -> str | None:
    """Why the extension is not loaded, or None when it is."""
    return _error


_load()
