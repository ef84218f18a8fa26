"""Hypha: decentralised DiLoCo training over libp2p with compressed pseudo-gradients.

Importing the package loads the compiled kernels (``hypha._C``) once; when they are not built it
warns once and every op falls back to its pure-torch reference.
"""

from hypha import _ext

__version__ = "0.1.0"

__all__ = ["__version__", "extension_available"]


def extension_available() -> bool:
    """True when the compiled kernels (hypha._C) are loaded."""
    return _ext.extension() is not None
