"""Triton kernels for hypha's compression ops, installed as ``hypha.kernels``.

Low-level entry points with preallocated outputs; ``hypha.ops`` checks arguments, allocates and
dispatches here with ``backend="triton"`` (CUDA tensors, or CPU tensors under
``TRITON_INTERPRET=1``). ``hypha.ops._reference`` defines every op bit for bit.
"""

from .nesterov import nesterov
from .quant import dequantize, dequantize_accumulate, encode_delta, quantize

__all__ = ["dequantize", "dequantize_accumulate", "encode_delta", "nesterov", "quantize"]
