"""Hypha: decentralised DiLoCo training over libp2p with compressed pseudo-gradients.

The compiled kernels (``hypha._C``) load with ``hypha.ops`` (when they are not built, it warns
once and every op falls back to its pure-torch reference). Importing ``hypha`` itself loads
neither torch nor the kernels, so the network roles and ``hypha certutil`` start quickly.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "extension_available"]


def extension_available() -> bool:
    """True when the compiled kernels (hypha._C) are loaded."""
    from hypha import _ext

    return _ext.extension() is not None
