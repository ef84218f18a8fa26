"""The model and data of bench/convergence.py: a small GPT on the Python standard library.

* Data: the source text of the Python standard library (:func:`bench._pseudograd.stdlib_text`,
  present on every install, no download), tokenized at byte level (vocabulary 256). The text is
  cut into blocks of :data:`BLOCK_BYTES`; every ``EVAL_EVERY``-th block is held out for
  evaluation, and the remaining blocks are dealt round-robin to the workers, so every worker
  owns a disjoint shard of the same distribution. A worker draws random windows of its own
  shard with its own seeded generator (:class:`Stream`): batch ``t`` of worker ``r`` is the same
  in every run, whatever the optimizer.
* Model: :class:`hypha.models.GPT` (re-exported here with :class:`~hypha.models.GPTConfig`), a
  GPT-style byte-level transformer (token + learned position embeddings, pre-LayerNorm blocks
  with causal self-attention and a GELU MLP, untied output head).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from bench._pseudograd import stdlib_text
from hypha.models import GPT, GPTConfig

__all__ = [
    "BLOCK_BYTES",
    "EVAL_EVERY",
    "GPT",
    "Corpus",
    "GPTConfig",
    "Stream",
    "load_corpus",
    "num_params",
]

BLOCK_BYTES = 16 * 1024  # the unit of sharding and of the held-out split
EVAL_EVERY = 20  # every 20th block (5% of the text) is held out


# --- model --------------------------------------------------------------------------------------


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
