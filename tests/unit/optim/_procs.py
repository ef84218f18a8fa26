"""Entry points for DiLoCo workers in separate processes (gloo over 127.0.0.1, or pipes).

    python -m tests.unit.optim._procs RANK WORLD PORT OUT STEPS KWARGS_JSON

trains like tests/unit/optim/_run.py's workers and saves the global copy to OUT/rank{RANK}.pt.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from hypha.optim import DiLoCo, Transport
from tests.unit.optim._run import make_model, train


def work(rank: int, comm: Transport | None, out: str, steps: int, kwargs: dict[str, Any]) -> None:
    torch.set_num_threads(1)
    model = make_model(seed=rank)
    opt = DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), comm, **kwargs)
    train(model, opt, rank, range(steps))
    opt.synchronize()
    result = {
        "globals": [g.clone() for g in opt.global_parameters()],
        "rounds": opt.stats.outer_rounds,
        "bytes_sent": opt.stats.bytes_sent,
    }
    torch.save(result, Path(out) / f"rank{rank}.pt")
    opt.close()


def main() -> None:
    import torch.distributed as dist

    rank, world, port, out, steps, kwargs = sys.argv[1:7]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
    try:
        work(int(rank), None, out, int(steps), json.loads(kwargs))  # comm=None: DistTransport
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
