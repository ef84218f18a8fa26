"""The short fuzzing pass of ``make test`` (bench/_fuzz.py; ``python bench/fuzz.py`` runs 10^6):
every target's seeds are valid, a few thousand mutated inputs per target and hypothesis-drawn
mutation plans find nothing, and the engine itself reports, saves and exits 1 on what it finds
(exceptions, oracle failures, slow and hanging inputs, crashed worker processes)."""

from __future__ import annotations

import json
import os
import random
import signal
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from bench import _fuzz as F

pytestmark = pytest.mark.timeout(120)

#: Mutated inputs per target in the seeded loop (1-2 s each on one core).
SHORT_PASS = {"codec": 12_000, "messages": 60_000, "server": 8000, "slices": 60_000}
PLANS = settings(max_examples=300, deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def targets() -> dict[str, F.Target]:
    return {name: F.make_target(name) for name in F.TARGETS}


def _show(findings: list[F.Finding]) -> str:
    return "\n".join(f"{f.describe()}\n  plan: {f.plan}\n{f.traceback}" for f in findings)


# --- the targets ---------------------------------------------------------------------------------


def test_message_catalogue_is_complete() -> None:
    import hypha.messages as M
    from tests.unit.messages._samples import MESSAGE_TYPES

    types = F.message_types()
    assert set(MESSAGE_TYPES) <= set(types)
    assert all(issubclass(t, M.Message) for t in types)


@pytest.mark.parametrize("name", list(F.TARGETS))
def test_seeds_are_accepted(name: str, targets: dict[str, F.Target]) -> None:
    """The corpus is valid input (so the mutants start deep), and the oracles pass on it."""
    t = targets[name]
    assert len(t.seeds) >= 5
    for k, seed in enumerate(t.seeds):
        assert t.run(seed.data, seed.ctx, 1) is None, f"seed {k} refused"
    t.end()
    if name == "messages":  # every message type has seeds
        assert {s.ctx for s in t.seeds} == set(F.message_types())


@pytest.mark.parametrize("name", list(F.TARGETS))
def test_short_pass(name: str, targets: dict[str, F.Target]) -> None:
    result = F.fuzz(targets[name], SHORT_PASS[name], seed="make-test")
    assert not result.findings, _show(result.findings)
    assert result.inputs == SHORT_PASS[name]
    # the mutants are neither all refused at the first check nor all accepted
    assert result.valid > 0
    assert len(result.refusals) >= 20, result.refusals.most_common()


@pytest.mark.parametrize("name", list(F.TARGETS))
def test_hypothesis_plans(name: str, targets: dict[str, F.Target]) -> None:
    """The same mutations drawn by hypothesis: a failure shrinks to a minimal plan."""
    t = targets[name]

    @PLANS
    @given(plan=F.plans(1 << 16))
    def check(plan: F.Plan) -> None:
        data, ctx = t.input(plan)
        t.run(data, ctx, plan.aux)

    check()
    t.end()


def test_codec_zero_sized_tensor_with_huge_dimensions() -> None:
    """The first finding of the fuzzer: a tensor of 0 elements whose other dimensions do not fit
    an int64 (or whose product does not) must be refused with CodecError, not crash decode()."""
    from hypha import compress as C

    for dims in [(4, 2**63, 0), (0, 2**62, 2**62), (2**64 - 1, 0)]:
        table = struct.pack("<BB", 0, len(dims)) + struct.pack(f"<{len(dims)}Q", *dims)
        fixed = struct.pack("<4sHBBIIIII", b"HYDC", 1, 0, 0, 0, 32, 1, len(table), 0)
        payload = fixed + table + struct.pack("<I", zlib.crc32(fixed + table))
        try:
            out = C.decode(payload)
        except C.CodecError:
            continue
        assert [tuple(t.shape) for t in out] == [dims]


# --- the engine ----------------------------------------------------------------------------------


def test_plans_are_deterministic(targets: dict[str, F.Target]) -> None:
    t = targets["codec"]
    draws = []
    for _ in range(2):
        rng = random.Random("same")
        draws.append([t.input(F.random_plan(rng, len(t.seeds)))[0] for _ in range(300)])
    assert draws[0] == draws[1]
    assert len(set(draws[0])) > 250  # and they differ from one another


def test_every_mutation_kind_applies() -> None:
    corpus = [bytes(range(40)), b"other seed"]
    rng = random.Random(0)
    for kind in range(F.N_KINDS):
        changed = 0
        for _ in range(50):
            op = (kind, rng.getrandbits(32), rng.getrandbits(32), rng.getrandbits(32))
            changed += F.mutate(corpus[0], [op], corpus) != corpus[0]
            F.mutate(b"", [op], corpus)  # empty input: no error
        assert changed >= 25 or kind == F.K_STRUCT, F.KIND_NAMES[kind]


class BuggyTarget(F.Target):
    """A decoder with planted bugs: an IndexError, a wrong answer, a slow and a hanging input."""

    name = "buggy"
    allowed = (ValueError,)

    def make_seeds(self) -> list[F.Seed]:
        return [F.Seed(b"hello world"), F.Seed(b"\x00\x01\x02")]

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        if data.startswith(b"\xff"):
            raise IndexError("planted")
        if data == b"":
            raise F.Violation("empty input accepted")
        if data.startswith(b"hello w\x7f"):
            end = time.process_time() + 0.05
            while time.process_time() < end:  # slow
                pass
        if data.startswith(b"hello w\x80"):
            while True:  # a hang
                pass
        if len(data) % 2:
            return ValueError("odd")
        return None


def test_findings_are_recorded_and_saved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(F.TARGETS, "buggy", BuggyTarget)
    monkeypatch.delitem(F._BUILT, "buggy", raising=False)
    report = F.run_all(1000, 5, targets=["buggy"], jobs=1, slow_s=0.03, hang_s=0.3,
                       results_dir=tmp_path)
    assert not report.ok
    kinds = {f.kind: f for f in report.findings}
    assert set(kinds) == {"exception", "violation", "slow", "hang"}, report.findings
    assert kinds["exception"].error == "IndexError: planted"
    assert kinds["exception"].data.startswith(b"\xff")
    assert kinds["exception"].count > 1  # deduplicated by signature
    assert "IndexError" in kinds["exception"].traceback
    (row,) = [r for r in report.rows if r["target"] == "buggy"]
    assert row["inputs"] == 1000 and row["findings"] == sum(f.count for f in report.findings)
    assert row["valid"] > 0 and row["refused"] > 0
    # saved: the input, and what reproduces it
    assert len(report.saved) == len(report.findings)
    saved = json.loads(report.saved[0].read_text())
    f = report.findings[0]
    assert report.saved[0].with_suffix(".bin").read_bytes() == f.data
    plan = F.Plan(saved["plan"]["seed"], tuple(map(tuple, saved["plan"]["ops"])), saved["plan"]["aux"])
    assert F.make_target("buggy").input(plan)[0] == f.data
    assert signal.getsignal(signal.SIGPROF) in (signal.SIG_DFL, None)  # the guard is gone


def test_bench_script_exits_1_on_findings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import fuzz as script

    monkeypatch.setitem(F.TARGETS, "buggy", BuggyTarget)
    monkeypatch.delitem(F._BUILT, "buggy", raising=False)
    args = ["--targets", "buggy", "--inputs", "500", "--jobs", "1", "--results-dir",
            str(tmp_path), "--slow", "0.03", "--hang", "0.3"]
    assert script.main(args) == 1
    assert list((tmp_path / "fuzz-findings").glob("buggy-exception-*.json"))
    rows = [json.loads(line) for line in (tmp_path / "fuzz.jsonl").read_text().splitlines()]
    assert {r["target"] for r in rows if r["table"] == "targets"} == {"buggy", "total"}
    found = sorted((tmp_path / "fuzz-findings").glob("buggy-exception-*.json"))[0]
    assert script.main(["--replay", str(found)]) == 1  # reproduces it


class CrashingTarget(F.Target):
    """Kills its process on 1% of the inputs (a segfault in C code, say)."""

    name = "crashing"
    allowed = (ValueError,)

    def make_seeds(self) -> list[F.Seed]:
        return [F.Seed(b"some bytes to mutate"), F.Seed(b"\x01\x02\x03\x04")]

    def run(self, data: bytes, ctx: Any, aux: int) -> BaseException | None:
        if (zlib.crc32(data) ^ 31676) % 101 == 0:  # 2 inputs of the test's 240
            os.kill(os.getpid(), signal.SIGSEGV)
        return None


def test_a_crashed_worker_is_a_finding() -> None:
    name = f"{__name__}:CrashingTarget"
    report = F.run_all(240, 3, targets=[name], jobs=2)
    crashes = [f for f in report.findings if f.kind == "crash"]
    assert crashes, report.findings
    assert "SIGSEGV" in crashes[0].error
    assert (zlib.crc32(crashes[0].data) ^ 31676) % 101 == 0
    # the shards went on after the input that killed them
    assert report.rows[0]["inputs"] >= 240 - sum(f.count for f in crashes)
