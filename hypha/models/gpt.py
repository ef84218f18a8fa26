"""A small byte-level GPT: the model of bench/convergence.py and of the training executor.

GPT-2 style (Radford et al., "Language Models are Unsupervised Multitask Learners", 2019):
token and learned position embeddings, pre-LayerNorm blocks of causal self-attention and a GELU
MLP, a final LayerNorm and an untied output head over the 256 byte values; GPT-2's
initialisation (normal, std 0.02, residual projections scaled by ``1/sqrt(2 * layers)``, zero
biases). ``forward(idx)`` gives logits, ``loss(x, y)`` the mean cross-entropy in nats per token.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT", "Block", "GPTConfig"]


@dataclass(frozen=True)
class GPTConfig:
    """The shape of a :class:`GPT`; the defaults are the ``"gpt"`` model (867,072 parameters)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 512
    context: int = 64  #: the longest input, in tokens
    vocab: int = 256

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"Invalid {f.name}: {value!r} (a positive int)")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be a multiple of n_heads "
                             f"({self.n_heads}): each head gets d_model / n_heads dimensions")


class Block(nn.Module):
    """A pre-LayerNorm transformer block: causal self-attention, then a GELU MLP, each added to
    the residual stream."""

    def __init__(self, d: int, heads: int, ff: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, ff)
        self.fc2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, t, c))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class GPT(nn.Module):
    """Byte-level GPT: ``forward(idx)`` -> logits ``[batch, time, vocab]``; ``loss(x, y)`` ->
    mean cross-entropy (nats). ``idx`` holds token ids, ``[batch, time]`` with ``time <=
    cfg.context``."""

    def __init__(self, cfg: GPTConfig | None = None, **overrides: Any) -> None:
        super().__init__()
        if cfg is None:
            cfg = GPTConfig()
        if overrides:
            known = {f.name for f in fields(GPTConfig)}
            unknown = sorted(set(overrides) - known)
            if unknown:
                raise TypeError(f"unknown GPT setting(s) {', '.join(unknown)}; expected "
                                f"{', '.join(sorted(known))}")
            cfg = GPTConfig(**{**cfg.__dict__, **overrides})
        self.cfg = cfg
        self.tok = nn.Embedding(cfg.vocab, cfg.d_model)
        self.pos = nn.Embedding(cfg.context, cfg.d_model)
        self.blocks = nn.ModuleList(
            Block(cfg.d_model, cfg.n_heads, cfg.d_ff) for _ in range(cfg.n_layers)
        )
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab, bias=False)
        for name, p in self.named_parameters():
            if p.dim() == 2:  # GPT-2 init: residual projections scaled by 1/sqrt(2 layers)
                scale = (
                    math.sqrt(2 * cfg.n_layers)
                    if name.endswith(("fc2.weight", "proj.weight"))
                    else 1
                )
                nn.init.normal_(p, std=0.02 / scale)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        if idx.dim() != 2 or not 1 <= idx.shape[1] <= self.cfg.context:
            raise ValueError(f"expected token ids of shape [batch, time] with 1 <= time <= "
                             f"{self.cfg.context} (the model's context), got shape "
                             f"{list(idx.shape)}")
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of predicting ``y`` (the next tokens) from ``x``."""
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: weight decay on the matrices (``dim() >= 2``: linear weights and
        embeddings), none on biases and LayerNorms, as in nanoGPT."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
