"""The model and data of bench/convergence.py: a small GPT on the Python standard library.

* Data: the source text of the Python standard library (:func:`bench._pseudograd.stdlib_text`,
  present on every install, no download), tokenized at byte level (vocabulary 256). The text is
  cut into blocks of :data:`BLOCK_BYTES`; every ``EVAL_EVERY``-th block is held out for
  evaluation, and the remaining blocks are dealt round-robin to the workers, so every worker
  owns a disjoint shard of the same distribution. A worker draws random windows of its own
  shard with its own seeded generator (:class:`Stream`): batch ``t`` of worker ``r`` is the same
  in every run, whatever the optimizer.
* Model: :class:`GPT`, a GPT-style byte-level transformer (token + learned position embeddings,
  pre-LayerNorm blocks with causal self-attention and a GELU MLP, untied output head).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bench._pseudograd import Block, stdlib_text

__all__ = ["BLOCK_BYTES", "EVAL_EVERY", "GPT", "Corpus", "GPTConfig", "Stream", "load_corpus"]

BLOCK_BYTES = 16 * 1024  # the unit of sharding and of the held-out split
EVAL_EVERY = 20  # every 20th block (5% of the text) is held out


@dataclass(frozen=True)
class GPTConfig:
    d_model: int = 192
    n_layers: int = 3
    n_heads: int = 4
    d_ff: int = 768
    context: int = 64
    vocab: int = 256


# --- model --------------------------------------------------------------------------------------


class GPT(nn.Module):
    """Byte-level GPT: ``forward(idx)`` -> logits; ``loss(x, y)`` -> mean cross-entropy (nats)."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
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
        x = self.tok(idx) + self.pos.weight[: idx.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(self(x).flatten(0, 1), y.flatten())

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: weight decay on the matrices (``dim() >= 2``: linear weights and
        embeddings), none on biases and LayerNorms, as in nanoGPT."""
        decay = [p for p in self.parameters() if p.dim() >= 2]
        no_decay = [p for p in self.parameters() if p.dim() < 2]
        return [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --- data ---------------------------------------------------------------------------------------


@dataclass
class Corpus:
    shards: list[torch.Tensor]  # one uint8 tensor per worker
    heldout: torch.Tensor  # uint8
    text_bytes: int

    def eval_batches(
        self, context: int, sequences: int, batch: int = 256
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A fixed evaluation set: ``sequences`` windows of the held-out text at evenly spaced
        offsets (deterministic; no generator), in batches of ``batch``."""
        n = len(self.heldout) - context - 1
        sequences = min(sequences, n)
        starts = torch.linspace(0, n - 1, sequences).long()
        return _windows(self.heldout, starts, context, batch)


def load_corpus(workers: int, text_bytes: int) -> Corpus:
    """The stdlib text split into ``workers`` disjoint training shards and a held-out slice."""
    text = stdlib_text(text_bytes)
    data = torch.frombuffer(bytearray(text), dtype=torch.uint8)
    blocks = list(data.split(BLOCK_BYTES))
    heldout = [b for i, b in enumerate(blocks) if i % EVAL_EVERY == EVAL_EVERY - 1]
    train = [b for i, b in enumerate(blocks) if i % EVAL_EVERY != EVAL_EVERY - 1]
    shards = [torch.cat(train[r::workers]) for r in range(workers)]
    return Corpus(shards, torch.cat(heldout), len(text))


def _windows(
    src: torch.Tensor, starts: torch.Tensor, context: int, batch: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    ix = starts[:, None] + torch.arange(context + 1)
    seq = src[ix].long()
    return [(s[:, :-1].contiguous(), s[:, 1:].contiguous()) for s in seq.split(batch)]


class Stream:
    """Worker ``rank``'s batches: random windows of its shard from a generator seeded with
    ``(seed, rank)``; ``batch(t)`` is deterministic in ``t`` (precomputed offsets)."""

    def __init__(
        self, shard: torch.Tensor, rank: int, steps: int, batch: int, context: int, seed: int
    ) -> None:
        gen = torch.Generator().manual_seed(seed * 1000 + rank)
        self.shard = shard
        self.context = context
        self.starts = torch.randint(0, len(shard) - context - 1, (steps, batch), generator=gen)

    def batch(self, t: int) -> tuple[torch.Tensor, torch.Tensor]:
        ((x, y),) = _windows(self.shard, self.starts[t], self.context, len(self.starts[t]))
        return x, y
