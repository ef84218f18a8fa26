"""The main job end to end: ``python -m hypha up`` on a small scale, as real OS processes.

A throw-away PKI, a gateway, a data node, a parameter server, two training workers and a
scheduler on 127.0.0.1; a tiny GPT, three outer rounds. The tests read what happened from the
run's result, the scheduler's metrics log and /proc (no process may outlive the run).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from hypha.up import UpOptions, _processes_under, run

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parents[2]


def _small(directory: Path, **kwargs: object) -> UpOptions:
    options = dict(workers=2, rounds=3, sync_batches=8, model="gpt:tiny", seq_len=32,
                   corpus="python-stdlib-small", slice_tokens=1 << 14, batch_size=4,
                   eval_sequences=64, baseline=False, progress=False, directory=directory,
                   timeout=400.0)
    options.update(kwargs)
    return UpOptions(**options)  # type: ignore[arg-type]


def _batches_per_round(metrics_log: Path) -> dict[str, dict[int, int]]:
    """worker → round → the most batches it reported within that round."""
    out: dict[str, dict[int, int]] = defaultdict(dict)
    for line in metrics_log.read_text().splitlines():
        event = json.loads(line)
        if event.get("event") != "metrics" or event.get("role") != "train":
            continue
        values = event["values"]
        r, step = int(values["round"]), int(values["round_step"])
        out[event["worker"]][r] = max(out[event["worker"]].get(r, 0), step)
    return out


def test_up_trains_over_the_network_and_leaves_nothing_behind(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    # worker 0 is 4x slower: performance-aware synchronisation gives it fewer batches per round
    options = _small(directory, throttle={0: 4.0}, sync_batches=16)
    result = run(options)

    # three rounds were closed (the run evaluates the checkpoints it sees: rounds this short
    # may pass between two looks), and training helped: a byte-level model starts at
    # ln(256) = 5.55 nats
    seen = [p.round for p in result.rounds]
    assert seen[-1] == 3 and seen == sorted(set(seen)), seen
    assert math.isfinite(result.eval_loss) and result.eval_loss < 5.0, result.rounds
    assert result.tokens > 0
    # pseudo-gradients went out and updates came back, and int2 keeps them small: a tiny GPT
    # in fp32 is ~100 KiB, so three rounds of int2 must stay well below three fp32 copies
    assert 0 < result.bytes_sent_per_worker
    assert 0 < result.bytes_received_per_worker
    assert set(result.idle_share) == {"worker-0", "worker-1"}
    assert all(0 <= share <= 1 for share in result.idle_share.values())

    # the scheduler holds the parameter server's last checkpoint, written atomically (no
    # temporary file left), with its record
    custody = directory / "checkpoints"
    assert sorted(p.name for p in custody.iterdir()) == ["checkpoint.json", "checkpoint.pt"]
    assert json.loads((custody / "checkpoint.json").read_text())["round"] == 3

    # performance-aware synchronisation: after the first round (which it needs to measure the
    # speeds) the slow worker runs fewer batches per round than the fast one
    names = {v: k for k, v in _peer_names(directory).items()}
    per_round = _batches_per_round(directory / "metrics.jsonl")
    slow, fast = per_round[names["worker-0"]], per_round[names["worker-1"]]
    later = [r for r in (1, 2) if r in slow and r in fast]
    assert later and sum(slow[r] for r in later) < sum(fast[r] for r in later), (slow, fast)

    # every process the run started is gone
    assert _processes_under(directory) == []


def test_ctrl_c_stops_every_process(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypha", "up", "--workers", "2", "--rounds", "100000",
         "--sync-batches", "20", "--model", "gpt:tiny", "--seq-len", "32",
         "--corpus", "python-stdlib-small",
         "--no-baseline", "--dir", str(directory)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # as a shell's background job starts it: SIGINT ignored, which hypha up must undo
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    assert proc.stdout is not None
    seen = []
    deadline = time.monotonic() + 300
    for line in proc.stdout:  # wait until training has started
        seen.append(line)
        if line.startswith("round ") and "eval loss" in line:
            break
        assert time.monotonic() < deadline, "".join(seen)
    else:
        raise AssertionError("hypha up ended before the first round:\n" + "".join(seen))
    os.kill(proc.pid, signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, "".join(seen) + out
    assert "interrupted" in out
    assert _processes_under(directory) == []


def test_bad_flags_exit_2(tmp_path: Path) -> None:
    for argv in (["--workers", "0"], ["--codec", "int3"], ["--throttle", "5=2"],
                 ["--throttle", "0=0.5"], ["--rounds", "x"]):
        proc = subprocess.run([sys.executable, "-m", "hypha", "up", *argv], cwd=ROOT,
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (argv, proc.stderr)
        assert "hypha up: error:" in proc.stderr or "error:" in proc.stderr, proc.stderr


def _peer_names(directory: Path) -> dict[str, str]:
    from hypha.certutil import load_certificates
    from hypha.net import peer_id_from_certificate

    return {str(peer_id_from_certificate(load_certificates(p)[0])): p.stem
            for p in (directory / "pki").glob("*.pem")
            if p.stem not in ("root", "org") and not p.name.endswith(".crl.pem")}
