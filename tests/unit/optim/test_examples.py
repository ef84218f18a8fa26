"""examples/: adopting DiLoCo changes at most 5 lines of a training script, and the result runs."""

from __future__ import annotations

import difflib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[3]
PLAIN = ROOT / "examples" / "train_plain.py"
DILOCO = ROOT / "examples" / "train_diloco.py"


def _changed_lines() -> list[str]:
    diff = difflib.unified_diff(
        PLAIN.read_text().splitlines(), DILOCO.read_text().splitlines(), lineterm="", n=0
    )
    return [s for s in diff if s.startswith(("+", "-")) and not s.startswith(("+++", "---"))]


def test_diloco_example_changes_at_most_5_lines() -> None:
    changed = _changed_lines()
    assert 0 < len(changed) <= 5, "\n".join(changed)
    assert any("DiLoCo(" in line for line in changed)


def test_readme_shows_the_current_diff() -> None:
    readme = (ROOT / "examples" / "README.md").read_text()
    block = readme.split("```diff\n", 1)[1].split("```", 1)[0].splitlines()
    shown = [s for s in block if s.startswith(("+", "-")) and not s.startswith(("+++", "---"))]
    # difflib may align the hunks differently from diff(1); the changed lines are the same
    assert sorted(shown) == sorted(_changed_lines()), "regenerate the diff in examples/README.md"


@pytest.mark.timeout(240)
@pytest.mark.skipif(not torch.distributed.is_available(), reason="needs torch.distributed")
def test_diloco_example_runs_under_torchrun(tmp_path: Path) -> None:
    # sync_every is 50 in the script: 60 steps make one outer round, then 10 local steps
    out = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        str(DILOCO), "--steps", "60", "--batch", "4", "--context", "32", "--log-every", "20",
        "--out", str(out),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200, check=False
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "step   60" in proc.stdout

    ckpts = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2)]
    for rank, ckpt in enumerate(ckpts):
        assert ckpt["step"] == 60
        meta = ckpt["optimizer"]["diloco"]
        assert meta["rank"] == rank
        assert meta["step"] == 60
        assert meta["stats"]["outer_rounds"] == 1
        assert meta["settings"]["sync_every"] == 50
        assert meta["settings"]["codec"].startswith("int4")
        # the cosine schedule ran on the inner optimizer's groups, which DiLoCo shares
        lr = ckpt["optimizer"]["inner"]["param_groups"][0]["lr"]
        assert lr < ckpt["optimizer"]["inner"]["param_groups"][0]["initial_lr"]
    # after the outer round both workers hold the same global model, bit for bit
    states = [c["optimizer"]["state"] for c in ckpts]
    assert states[0].keys() == states[1].keys()
    for i in states[0]:
        assert torch.equal(states[0][i]["global"], states[1][i]["global"])
