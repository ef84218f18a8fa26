"""A small byte-level language model trained by several workers, one process each.

    torchrun --standalone --nproc_per_node=2 examples/train_plain.py
    torchrun --standalone --nproc_per_node=2 examples/train_diloco.py

The text is the Python reference manual that ships with every Python (``pydoc_data.topics``).
train_plain.py: every worker trains its own copy of the model on its own shard of the text.
train_diloco.py: the same script plus two lines; the workers train one model together with
DiLoCo, exchanging int4-compressed pseudo-gradients every 50 steps (see examples/README.md).
"""

import argparse
import math
import os
from pathlib import Path
from pydoc_data.topics import topics

import torch
import torch.distributed as dist
from torch import nn

from hypha.optim import DiLoCo


class TinyGPT(nn.Module):
    def __init__(self, context: int, dim: int = 128, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, dim)  # one token per byte
        self.pos = nn.Parameter(torch.zeros(context, dim))
        layer = nn.TransformerEncoderLayer(
            dim, heads, 4 * dim, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.shape[1]
        mask = nn.Transformer.generate_square_subsequent_mask(t)
        h = self.blocks(self.embed(x) + self.pos[:t], mask=mask, is_causal=True)
        return self.head(self.norm(h))


def batches(data: torch.Tensor, batch: int, context: int, gen: torch.Generator):
    """Endless random windows of ``data``: (inputs, next-byte targets)."""
    while True:
        starts = torch.randint(len(data) - context - 1, (batch,), generator=gen)
        windows = torch.stack([data[s : s + context + 1] for s in starts.tolist()])
        yield windows[:, :-1], windows[:, 1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=25)
    parser.add_argument("--out", default=f"/tmp/hypha-examples/{Path(__file__).stem}")
    args = parser.parse_args()

    dist.init_process_group("gloo")  # torchrun sets RANK, WORLD_SIZE and the rendezvous
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed + rank)

    # this worker's shard of the text, and a held-out tail to evaluate on
    text = "\n\n".join(topics[k] for k in sorted(topics)).encode()
    data = torch.tensor(list(text), dtype=torch.long)
    train, val = data[: int(0.9 * len(data))], data[int(0.9 * len(data)) :]
    shard = train.chunk(world)[rank]
    gen = torch.Generator().manual_seed(args.seed + rank)

    model = TinyGPT(args.context)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    opt = DiLoCo(opt, sync_every=50, codec="int4")  # comm=None: the torchrun process group
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.steps, eta_min=args.lr / 10)
    if rank == 0:
        n = sum(p.numel() for p in model.parameters())
        print(f"{world} workers, {n / 1e3:.0f}K parameters, {len(shard) / 1e3:.0f} KB of text each")

    model.train()
    stream = batches(shard, args.batch, args.context, gen)
    for step in range(1, args.steps + 1):
        x, y = next(stream)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        sched.step()
        if rank == 0 and (step % args.log_every == 0 or step == 1):
            bits = loss.item() / math.log(2)
            print(f"step {step:4d}  loss {bits:.2f} bits/byte  lr {sched.get_last_lr()[0]:.2e}")

    model.eval()
    with torch.no_grad():
        x, y = next(batches(val, 64, args.context, torch.Generator().manual_seed(args.seed)))
        val_loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten()).item()
    print(f"rank {rank}: held-out loss {val_loss / math.log(2):.3f} bits/byte")

    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"rank{rank}.pt")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": step}, path)
    if rank == 0:
        print(f"saved {args.out}/rank*.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
