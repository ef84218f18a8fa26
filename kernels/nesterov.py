"""The fused outer Nesterov step in Triton, in place, as ``hypha.ops._reference.nesterov_``
defines it (torch.optim.SGD(nesterov=True)):

    m <- mu * m + g;  p <- p - lr * (g + mu * m)

``lr`` and ``mu`` are rounded to fp32 first and every product and sum is rounded separately
(launched with FMA contraction off). One program updates ``_TILE`` contiguous elements: 3 fp32
reads and 2 writes each, 80 KB moved per program.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import cdiv, check_tensors, launch, num_warps_for, round_f32

__all__ = ["nesterov"]

_TILE = 4096


@triton.jit
def _nesterov_kernel(p_ptr, m_ptr, g_ptr, n, lr, mu, TILE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * TILE + tl.arange(0, TILE)
    mask = offs < n
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = tl.load(m_ptr + offs, mask=mask, other=0.0)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    m = m * mu + g
    d = g + m * mu
    p = p - d * lr
    tl.store(m_ptr + offs, m, mask=mask)
    tl.store(p_ptr + offs, p, mask=mask)


def _nesterov(
    param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, mu: float
) -> None:
    device = check_tensors(param=param, momentum=momentum, grad=grad)
    n = param.numel()
    if n == 0:
        return
    launch(
        _nesterov_kernel,
        cdiv(n, _TILE),
        device,
        param,
        momentum,
        grad,
        n,
        round_f32(lr),
        round_f32(mu),
        num_warps=num_warps_for(_TILE),
        TILE=_TILE,
    )


def nesterov(
    param: torch.Tensor, momentum: torch.Tensor, grad: torch.Tensor, lr: float, mu: float
) -> None:
    """m <- mu * m + g; p <- p - lr * (g + mu * m), in place on ``param`` and ``momentum``."""
    _nesterov(param, momentum, grad, lr, mu)
