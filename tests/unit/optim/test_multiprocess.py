"""DiLoCo across processes: torch.distributed (gloo on 127.0.0.1) and pipes. Every process ends
with the same global copy, and that copy is bit for bit the one the threaded LocalTransport run
computes: the transport moves bytes and changes nothing else."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hypha.optim import PipeTransport
from tests.unit.optim._procs import work
from tests.unit.optim._run import assert_identical, run_workers

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def expected(n: int, steps: int, kwargs: dict[str, object]) -> list[torch.Tensor]:
    workers = run_workers(n, steps, **kwargs)
    copies = [w.globals() for w in workers]
    assert_identical(copies)
    return copies[0]


def load(out: Path, n: int) -> list[dict[str, object]]:
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(n)]


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("n", "kwargs"),
    [
        (3, {"codec": "int4", "sync_every": 4}),
        (4, {"codec": "int2+zstd", "sync_every": 6, "fragments": 2}),
        (2, {"codec": "fp32", "sync_every": 5}),
    ],
)
def test_gloo_processes(tmp_path: Path, n: int, kwargs: dict[str, object]) -> None:
    steps = 13
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.unit.optim._procs",
                str(r),
                str(n),
                str(port),
                str(tmp_path),
                str(steps),
                json.dumps(kwargs),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for r in range(n)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=240)[0].decode(errors="replace"))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, text) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{text[-3000:]}"
    results = load(tmp_path, n)
    copies = [res["globals"] for res in results]
    assert_identical(copies)  # type: ignore[arg-type]
    assert_identical([copies[0], expected(n, steps, kwargs)])  # type: ignore[list-item]
    assert all(res["rounds"] == results[0]["rounds"] and res["rounds"] >= 2 for res in results)


@pytest.mark.timeout(300)
def test_pipe_processes(tmp_path: Path) -> None:
    n, steps, kwargs = 2, 9, {"codec": "int8", "sync_every": 3}
    ctx = multiprocessing.get_context("spawn")
    comms = PipeTransport.create(n, context=ctx)
    procs = [
        ctx.Process(target=work, args=(r, comms[r], str(tmp_path), steps, kwargs)) for r in range(n)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(240)
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0] * n
    copies = [res["globals"] for res in load(tmp_path, n)]
    assert_identical(copies)  # type: ignore[arg-type]
    assert_identical([copies[0], expected(n, steps, kwargs)])  # type: ignore[list-item]
