"""The fault matrix: a DiLoCo run on a local network of real processes (:class:`hypha.up.LocalNetwork`),
a fault injected at a named point, and the outcome the issue expects, checked from the nodes'
logs, the scheduler's metrics log and /proc.

Each scenario returns a :class:`Row`: what was injected where, what was expected, what was
observed, rounds lost, bytes wasted, recovery time, and whether every expectation held. The
tests (tests/integration/test_faults.py) run a short version of each; bench/faults.py runs the
full matrix and records it.

Measures:

* **rounds lost**: outer rounds whose work did not reach the global model (the parameter server's
  round at the fault minus the round it resumed from; 0 when the run went on without a break);
* **bytes wasted**: bytes that crossed the network without ending in the global model (the global
  model sent to a replacement, a resent pseudo-gradient, a contribution dropped as late);
* **recovery**: seconds from the fault until the run makes progress again (the next round closed
  with the replacement, or the restarted job's first round).
"""

from __future__ import annotations

import json
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hypha.up import Cluster, LocalNetwork, Node, UpOptions, _processes_under
from tests.integration import _netns

__all__ = ["SCENARIOS", "Row", "Run", "Unavailable", "small_options"]


class Unavailable(RuntimeError):
    """A scenario cannot run on this machine (e.g. no network namespaces); the message says
    why. The tests skip it, bench/faults.py records it as skipped."""


@dataclass
class Row:
    fault: str
    expected: str
    observed: str = ""
    rounds_lost: int = 0
    bytes_wasted: int = 0
    recovery_s: float = 0.0
    ok: bool = False
    checks: dict[str, bool] = field(default_factory=dict)


def small_options(**kwargs: Any) -> UpOptions:
    """A small, quick run: a tiny GPT, short rounds."""
    options: dict[str, Any] = dict(workers=2, rounds=10, sync_batches=150, model="gpt:tiny",
                                   seq_len=32, corpus="python-stdlib-small",
                                   slice_tokens=1 << 14, batch_size=4, eval_sequences=64,
                                   baseline=False, progress=False, round_timeout=10.0,
                                   timeout=300.0)
    options.update(kwargs)
    return UpOptions(**options)


class Run:
    """One scenario's network; reads what happened from the metrics log and the logs."""

    def __init__(self, root: Path, options: UpOptions, *, spare_ps: int = 0,
                 extra_trainers: int = 0, lease_ttl: float = 4.0,
                 initial_trainers: int | None = None) -> None:
        root.mkdir(parents=True, exist_ok=False)
        self.cluster = Cluster(root)
        self.net = LocalNetwork(options, self.cluster, spare_ps=spare_ps,
                                extra_trainers=extra_trainers, lease_ttl=lease_ttl,
                                initial_trainers=initial_trainers)
        self.options = options
        self.scheduler: Node | None = None
        self._names: dict[str, str] = {}

    def __enter__(self) -> Run:
        self.net.prepare()
        self.net.start()
        self.scheduler = self.net.start_scheduler()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cluster.stop()

    # -- what happened -----------------------------------------------------------------------------
    def events(self) -> list[dict[str, Any]]:
        try:
            text = self.net.metrics_log.read_text()
        except FileNotFoundError:
            return []
        out = []
        for line in text.splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    def name_of(self, peer: str) -> str:
        if not self._names:
            self._names = self.cluster.peer_names()
        return self._names.get(peer, peer)

    def ps_rounds(self) -> list[dict[str, Any]]:
        """The parameter server's round reports, in order (several servers: all of them)."""
        return [e for e in self.events()
                if e.get("event") == "metrics" and e.get("role") == "parameter-server"]

    def ps_round(self) -> int:
        rounds = [int(e["values"]["round"]) for e in self.ps_rounds()]
        return max(rounds, default=0)

    def trainers(self) -> dict[str, str]:
        """Node name → job id of every training job dispatched so far."""
        out = {}
        for e in self.events():
            if e.get("event") == "metrics" and e.get("role") == "train":
                out[self.name_of(e["worker"])] = e["job"]
        return out

    def wait(self, what: str, condition: Callable[[], Any], timeout: float = 120.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            value = condition()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what} did not happen within {timeout:.0f} s; scheduler "
                                   f"log:\n{self.log('scheduler')}")
            time.sleep(0.1)

    def log(self, name: str, lines: int = 30) -> str:
        node = self.net.nodes.get(name)
        return node.tail(lines) if node else ""

    def logged(self, name: str, pattern: str, since: int = 0) -> list[re.Match[str]]:
        """Matches of ``pattern`` in node ``name``'s log lines, from offset ``since`` (see
        :meth:`mark`) on."""
        node = self.net.nodes.get(name)
        if node is None:
            return []
        regex = re.compile(pattern)
        return [m for m in (regex.search(line) for line in node.text()[since:].splitlines())
                if m]

    def mark(self, name: str) -> int:
        """Where node ``name``'s log ends now (for :meth:`logged`'s ``since``)."""
        node = self.net.nodes.get(name)
        return len(node.text()) if node else 0

    def peer_of(self, name: str) -> str:
        return next(peer for peer, node in self.cluster.peer_names().items() if node == name)

    def finished(self, timeout: float) -> bool:
        assert self.scheduler is not None
        try:
            self.scheduler.proc.wait(timeout=timeout)
        except Exception:
            return False
        return self.scheduler.proc.returncode == 0


# ------------------------------------------------------------------------------------------------
# the scenarios


def kill_trainer(root: Path, scale: int = 1) -> Row:
    row = Row("kill -9 training worker-1 (and its job) mid-round 2",
              "the PS closes the round with the rest; a replacement is leased through a new "
              "advertisement, starts from the current global model; worker-1's slices go back "
              "to AVAILABLE; the run completes")
    options = small_options(rounds=10 * scale, round_timeout=5.0)
    with Run(root, options, extra_trainers=1) as run:
        run.wait("the first rounds", lambda: run.ps_round() >= 1)
        run.wait("worker-1 training", lambda: "worker-1" in run.trainers())
        time.sleep(0.3)  # into round 2
        at = run.ps_round()
        killed_at = time.monotonic()
        run.net.kill("worker-1")
        run.net.add_trainer("worker-2")  # a machine that answers the next advertisement
        replaced = run.wait("a replacement trainer", lambda: "worker-2" in run.trainers())
        recovered = run.wait("the replacement's first contribution", lambda: any(
            int(e["values"].get("round", 0)) >= 1 and run.name_of(e["worker"]) == "worker-2"
            for e in run.events() if e.get("event") == "metrics" and e.get("role") == "train"))
        row.recovery_s = time.monotonic() - killed_at
        done = run.finished(timeout=240)
        sched = "scheduler"
        row.checks = {
            "PS went on without it": run.ps_round() > at + 1,
            "lost and replaced": bool(run.logged(sched, r"lost train worker")) and bool(replaced),
            "slices back to AVAILABLE": bool(run.logged(
                sched, r"the worker was lost: slice\(s\) .* are available again")),
            "replacement joined from the current model": bool(recovered),
            "run completed": done,
        }
        global_bytes = _global_model_bytes(run)
        row.bytes_wasted = global_bytes
        row.rounds_lost = 0 if row.checks["PS went on without it"] else 1
        row.observed = (f"killed at PS round {at}; replacement worker-2 joined and contributed "
                        f"after {row.recovery_s:.1f} s; run {'completed' if done else 'FAILED'}")
    row.ok = all(row.checks.values())
    return row


def kill_ps(root: Path, scale: int = 1) -> Row:
    row = Row("kill -9 the parameter server during round 3",
              "a new PS is leased, resumes from the scheduler's checkpoint (SHA-256 checked), "
              "at most one round lost; the trainers resend their pseudo-gradients; the run "
              "completes")
    options = small_options(rounds=10 * scale, round_timeout=5.0)
    with Run(root, options, spare_ps=1) as run:
        run.wait("round 2", lambda: run.ps_round() >= 2)
        time.sleep(0.2)
        first = run.name_of(run.ps_rounds()[0]["worker"])
        spare = next(n for n in run.net.ps_names if n != first)
        at = run.ps_round()
        stored = json.loads((run.net.checkpoint_dir / "checkpoint.json").read_text())
        killed_at = time.monotonic()
        run.net.kill(first)
        resumed = run.wait("the new PS resuming", lambda: run.logged(
            spare, r"resuming from the scheduler's checkpoint of round (\d+)"), timeout=180)
        resume_round = int(resumed[0].group(1))
        run.wait("a round closed by the new PS", lambda: run.logged(spare, r"round \d+ closed"),
                 timeout=180)
        row.recovery_s = time.monotonic() - killed_at
        done = run.finished(timeout=240)
        row.rounds_lost = max(0, at - resume_round)
        row.checks = {
            "lost and replaced": bool(run.logged("scheduler", r"lost parameter-server worker")),
            "resumed from the checkpoint in custody": resume_round >= stored["round"],
            "at most one round lost": row.rounds_lost <= 1,
            "run completed": done,
        }
        resent = sum(len(run.logged(w, r"sent the pseudo-gradient again")) for w in
                     run.net.trainers)
        # the new server sends every trainer the global model (which they drop: they have it)
        # and the pseudo-gradients of the round in flight are sent twice
        row.bytes_wasted = options.workers * _global_model_bytes(run) + resent * \
            _global_model_bytes(run) // 16  # int2: 2 bits + a scale per block, ~1/16 of fp32
        row.observed = (f"killed {first} at PS round {at}; {spare} resumed from round {resume_round} "
                        f"after {row.recovery_s:.1f} s; {resent} pseudo-gradient(s) resent; run "
                        f"{'completed' if done else 'FAILED'}")
    row.ok = all(row.checks.values())
    return row


def kill_scheduler(root: Path, scale: int = 1) -> Row:
    row = Row("kill -9 the scheduler during round 2, then start it again",
              "leases expire and every job stops cleanly; the restarted scheduler runs the job "
              "again from the PS checkpoint")
    options = small_options(rounds=10 * scale, round_timeout=5.0)
    with Run(root, options, lease_ttl=3.0) as run:
        run.wait("round 2", lambda: run.ps_round() >= 2)
        at = run.ps_round()
        stored = json.loads((run.net.checkpoint_dir / "checkpoint.json").read_text())
        killed_at = time.monotonic()
        run.net.kill("scheduler")
        stopped = run.wait("every job stopped", lambda: not _job_processes(run), timeout=60)
        expired = all(run.logged(w, r"lease \S+ of scheduler \S+ expired")
                      for w in ["ps", *run.net.trainers[:options.workers]])
        time.sleep(1.0)
        run.scheduler = run.net.start_scheduler()
        resumed = run.wait("the PS resuming", lambda: run.logged(
            "ps", r"resuming from the scheduler's checkpoint of round (\d+)"), timeout=180)
        resume_round = int(resumed[-1].group(1))
        run.wait("a round closed after the restart", lambda: len(run.logged(
            "ps", r"round \d+ closed")) > stored["round"], timeout=180)
        row.recovery_s = time.monotonic() - killed_at
        done = run.finished(timeout=240)
        row.rounds_lost = max(0, at - resume_round)
        # the trainers of the restarted run fetch the global model again
        row.bytes_wasted = options.workers * _global_model_bytes(run)
        row.checks = {
            "leases expired": expired,
            "jobs stopped": bool(stopped),
            "restarted from the checkpoint": resume_round >= stored["round"],
            "run completed": done,
        }
        row.observed = (f"checkpoint of round {stored['round']} in custody; all jobs stopped; "
                        f"the restarted scheduler's PS resumed from round {resume_round}; run "
                        f"{'completed' if done else 'FAILED'} {row.recovery_s:.1f} s after the "
                        "kill")
    row.ok = all(row.checks.values())
    return row


def slow_worker(root: Path, scale: int = 1) -> Row:
    row = Row("worker-0 10x slower, fixed H (no perf-aware sync), round timeout 0.3 s",
              "rounds keep their pace (the PS closes them after the timeout without it); its "
              "late pseudo-gradient is dropped, never applied twice; the run completes")
    options = small_options(rounds=5 * scale, round_timeout=0.3, perf_aware=False,
                            sync_batches=20, throttle={0: 10.0})
    with Run(root, options) as run:
        start = time.monotonic()
        done = run.finished(timeout=300)
        wall = time.monotonic() - start
        late = sum(int(e["values"].get("late", 0)) for e in run.ps_rounds())
        partial_rounds = [e for e in run.ps_rounds()
                          if e["values"]["contributors"] < e["values"]["expected"]]
        row.checks = {
            "rounds closed without the straggler": bool(partial_rounds),
            "late contributions dropped": late > 0 or bool(run.logged("ps", r"after the round "
                                                                            r"closed; dropped")),
            "never applied twice": all(e["values"]["contributors"] <= e["values"]["expected"]
                                       for e in run.ps_rounds()),
            "run completed": done,
        }
        # each late contribution crossed the network for nothing (int2: ~1/16 of fp32)
        row.bytes_wasted = late * _global_model_bytes(run) // 16
        row.observed = (f"{len(partial_rounds)} of {len(run.ps_rounds())} rounds closed without "
                        f"the straggler; {late} late contribution(s) dropped; {wall:.0f} s")
    row.ok = all(row.checks.values())
    return row


def join_mid_run(root: Path, scale: int = 1) -> Row:
    row = Row("a third training worker joins after round 2",
              "it gets the current global model and contributes from the next round")
    options = small_options(workers=3, rounds=20 * scale, round_timeout=5.0)
    # the scheduler wants 3 trainers; only 2 machines are there at first
    with Run(root, options, initial_trainers=2) as run:
        run.wait("round 2", lambda: run.ps_round() >= 2, timeout=180)
        joined_at = time.monotonic()
        run.net.add_trainer("worker-2")
        at = run.ps_round()
        joined = run.wait("it joins", lambda: run.logged(
            "worker-2", r"joined at round (\d+) of"), timeout=120)
        start_round = int(joined[0].group(1))
        got_global = run.logged("worker-2", rf"received global-{start_round} ")
        contributed = run.wait("a round with 3 contributors", lambda: [
            e for e in run.ps_rounds() if e["values"]["contributors"] >= 3], timeout=180)
        row.recovery_s = time.monotonic() - joined_at
        done = run.finished(timeout=240)
        row.checks = {
            "got the current global model": start_round >= at and bool(got_global),
            "contributes from the next round":
                bool(contributed) and int(contributed[0]["values"]["round"]) >= start_round,
            "run completed": done,
        }
        row.bytes_wasted = 0
        row.observed = (f"joined at round {start_round}; first round with 3 contributors: "
                        f"{int(contributed[0]['values']['round'])}; run "
                        f"{'completed' if done else 'FAILED'}")
    row.ok = all(row.checks.values())
    return row


def partition(root: Path, scale: int = 1) -> Row:
    """Every node in a network namespace of its own (:mod:`tests.integration._netns`); worker-1
    is cut off (its bridge port drops everything, both ways) for three lease lifetimes, and
    healed once the scheduler has lost it too if that takes longer (its renewal RPC times out
    after 10 s), so that the heal never races the loss."""
    reason = _netns.available()
    if reason is not None:
        raise Unavailable(f"network namespaces are not available: {reason}")
    ttl = 4.0
    cut_for = 3 * ttl
    row = Row(f"partition: every node in its own network namespace; training worker-1 cut off "
              f"after round 2 for {cut_for:.0f} s (3 leases), then healed",
              "the scheduler loses it and leases a replacement; its own lease expires and its "
              "job stops; the PS never counts more contributions than expected and goes on; "
              "after the heal whatever it sends is dropped or refused; the run completes")
    options = small_options(rounds=10 * scale, round_timeout=5.0)
    run = Run(root, options, extra_trainers=1, lease_ttl=ttl)
    with _netns.Namespaces(run.net.names) as spaces:
        # NOTE: placed once the names are known (LocalNetwork makes them); nothing has started.
        run.net.placement = spaces.placement
        with run:
            cut = "worker-1"
            run.wait("round 2", lambda: run.ps_round() >= 2, timeout=180)
            run.wait(f"{cut} training", lambda: cut in run.trainers())
            peer = run.peer_of(cut)
            at = run.ps_round()
            since = {name: run.mark(name) for name in ("ps", "scheduler", cut)}
            cut_at = time.monotonic()
            spaces.cut(cut)
            run.net.add_trainer("worker-2")  # a machine that answers the next advertisement
            lost = run.wait("the scheduler losing it", lambda: run.logged(
                "scheduler", rf"lost train worker {peer} \((.*)\)", since["scheduler"]),
                timeout=60)
            lost_s = time.monotonic() - cut_at
            expired = run.wait("its lease expiring on its side", lambda: run.logged(
                cut, r"lease \S+ of scheduler \S+ expired", since[cut]), timeout=60)
            stopped = run.wait("its job stopping", lambda: run.logged(
                cut, r"stopping job \S+: lease expired", since[cut])
                and not _job_processes(run, [cut]), timeout=60)
            time.sleep(max(0.0, cut_at + cut_for - time.monotonic()))
            rounds_during = [e for e in run.ps_rounds() if e["values"]["round"] > at]
            healed_at = time.monotonic()
            spaces.heal(cut)
            cut_s = healed_at - cut_at
            after = run.mark("ps")
            replaced = run.wait("a replacement leased", lambda: [
                e for e in run.events() if e.get("event") == "lease" and e.get("role") == "train"
                and run.name_of(str(e.get("worker"))) == "worker-2"])
            run.wait("the replacement's first contribution", lambda: any(
                int(e["values"].get("round", 0)) >= 1 and run.name_of(e["worker"]) == "worker-2"
                for e in run.events() if e.get("event") == "metrics" and e.get("role") == "train"))
            row.recovery_s = time.monotonic() - cut_at
            done = run.finished(timeout=240)
            rounds = run.ps_rounds()
            # the round it missed: the PS gave up waiting for it, then closed the round
            missed = run.logged("ps", rf"^(\S+ \S+) .*round (\d+): no contribution from "
                                      rf"[^;]*{peer}", since["ps"])
            missed_round = int(missed[0].group(2)) if missed else -1
            closed = run.logged("ps", rf"^(\S+ \S+) .*round {missed_round} closed with (\d+) of "
                                      rf"(\d+)", since["ps"])
            # NOTE: measured, not checked: the PS sends each round's update to every worker it
            # ever sent the model (`joined`, lost ones too) and waits for every send; the one to
            # the cut worker hangs until opening the stream times out or the link heals, and the
            # whole run waits with it.
            stalled = (_stamp(closed[0].group(1)) - _stamp(missed[0].group(1))
                       if missed and closed else math.nan)
            # after the heal: every PS line about it is a drop, a refusal or a failed send
            mentions = [m.group(0) for m in run.logged("ps", rf".*{peer}.*", after)]
            harmless = re.compile(r"came after the round closed; dropped|refused the "
                                  r"contribution|did not name|broke off|could not send|"
                                  r"Failed to open stream")
            counted_after = [line for line in mentions if not harmless.search(line)]
            kinds = sorted({found.group(0) for line in mentions
                            if (found := harmless.search(line))})
            leases_of_cut = [e for e in run.events() if e.get("event") == "lease"
                             and e.get("worker") == peer]
            late = sum(int(e["values"].get("late", 0)) for e in rounds
                       if e["values"]["round"] > at)
            refused = sum(int(e["values"].get("refused", 0)) for e in rounds
                          if e["values"]["round"] > at)
            row.checks = {
                "scheduler lost it": bool(lost),
                "replacement leased": bool(replaced),
                "its lease expired on its side": bool(expired),
                "its job stopped": bool(stopped),
                "cut for longer than a lease": cut_s > ttl,
                "the round it missed closed without it": missed_round >= at and bool(closed)
                and int(closed[0].group(2)) < int(closed[0].group(3)),
                "never more contributions than expected": all(
                    e["values"]["contributors"] <= e["values"]["expected"] for e in rounds),
                "rounds went on without it": run.ps_round() > missed_round + 1,
                "after the heal nothing of it counted": not counted_after,
                "never leased again": len(leases_of_cut) == 1,
                "run completed": done and run.ps_round() == options.rounds,
            }
            row.rounds_lost = 0 if row.checks["rounds went on without it"] else 1
            # NOTE: the global model sent to the replacement, as for kill-trainer. A late or
            # refused contribution's bytes cannot be told apart (the PS counts the bytes it
            # receives per job, not per peer); their number is in `observed`.
            got = run.logged("worker-2", r"received global-\d+ \((\d+) bytes\)")
            row.bytes_wasted = int(got[0].group(1)) if got else _global_model_bytes(run)
            why = lost[0].group(1).strip()[:60]
            why += " timed out" if why.endswith(":") else ""
            row.observed = (
                f"cut while PS round {at} was open, for {cut_s:.1f} s; the scheduler lost it "
                f"after {lost_s:.1f} s ({why}); round {missed_round} "
                f"closed with {closed[0].group(2) if closed else '?'} of "
                f"{closed[0].group(3) if closed else '?'} after waiting {options.round_timeout:.0f} s "
                f"for it, then {stalled:.1f} s more on its update to the cut worker; "
                f"{len(rounds_during)} round(s) closed during the cut; after the heal "
                f"{len(mentions)} PS line(s) about it ({', '.join(kinds) or '-'}"
                f"{f', {len(counted_after)} other' if counted_after else ''}), {late} late and "
                f"{refused} refused contribution(s) from round {at} on; the replacement "
                f"contributed {row.recovery_s:.1f} s after the cut; run "
                f"{'completed' if done else 'FAILED'}")
    row.checks["namespaces removed"] = not spaces.leftovers()
    row.checks["no process left"] = not _processes_under(root)
    row.ok = all(row.checks.values())
    return row


def _stamp(text: str) -> float:
    """Seconds since the epoch of a log line's time stamp (``2026-01-31 12:00:00,123``)."""
    return datetime.strptime(text, "%Y-%m-%d %H:%M:%S,%f").timestamp()


def _global_model_bytes(run: Run) -> int:
    """Bytes of one fp32 copy of the model: what a joining worker receives."""
    import torch

    from hypha.models import load_model

    torch.manual_seed(0)
    return sum(p.numel() * 4 for p in load_model(run.options.model).parameters())


def _job_processes(run: Run, names: list[str] | None = None) -> list[int]:
    """Processes of the jobs of workers ``names`` (default: all), not the workers."""
    names = [*run.net.ps_names, *run.net.trainers] if names is None else names
    return [pid for name in names
            for pid in _processes_under(run.net.root / name)
            if pid not in {n.proc.pid for n in run.net.nodes.values()}]


SCENARIOS: dict[str, Callable[[Path, int], Row]] = {
    "kill-trainer": kill_trainer,
    "kill-ps": kill_ps,
    "kill-scheduler": kill_scheduler,
    "slow-worker": slow_worker,
    "join-mid-run": join_mid_run,
    "partition": partition,
}
