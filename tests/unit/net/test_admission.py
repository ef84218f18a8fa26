"""Admission control and the refusal record, on a hand-driven clock."""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import pytest

from hypha.metrics import network_metrics
from hypha.net import NetworkSettings, TLSFiles
from hypha.net._admission import Admission, Limits, Refusals, TokenBucket


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_burst_then_the_rate() -> None:
    bucket = TokenBucket(rate=10.0, burst=5, now=0.0)
    assert [bucket.take(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert bucket.take(0.05) is False  # half a token
    assert bucket.take(0.1) is True
    assert bucket.take(0.1) is False
    assert not bucket.full(0.1)
    assert bucket.full(0.6)
    # a long pause refills to the burst, not beyond
    assert [bucket.take(100.0) for _ in range(6)] == [True] * 5 + [False]


def test_bucket_ignores_a_clock_that_steps_back() -> None:
    bucket = TokenBucket(rate=1.0, burst=1, now=10.0)
    assert bucket.take(10.0)
    assert not bucket.take(5.0)
    assert bucket.take(11.0)


def test_a_peer_over_its_rate_is_refused_and_others_are_not() -> None:
    clock = Clock()
    admission = Admission(Limits(rate=100.0, burst=20), clock=clock)
    results = [admission.admit_request("flooder") for _ in range(25)]
    for i in range(20):
        assert results[i] is None
        admission.release_request("flooder")
    for refusal in results[20:]:
        assert refusal is not None and refusal.reason == "rate-limited"
        assert refusal.message == "rate limited: more than 100 requests/s from you (burst 20)"
    assert admission.admit_request("polite") is None  # its own bucket
    admission.release_request("polite")
    clock.now += 0.1  # 10 tokens back
    admitted = 0
    for _ in range(15):
        if admission.admit_request("flooder") is None:
            admitted += 1
            admission.release_request("flooder")
    assert admitted == 10
    assert admission.requests_in_flight == 0


def test_concurrency_caps_per_peer_and_in_total() -> None:
    admission = Admission(Limits(rate=1e6, burst=1000, per_peer=2, total=3), clock=Clock())
    assert admission.admit_request("a") is None
    assert admission.admit_request("a") is None
    refusal = admission.admit_request("a")
    assert refusal is not None and refusal.reason == "too-many-concurrent"
    assert "2 of yours are in progress (limit 2)" in refusal.message
    assert admission.admit_request("b") is None
    refusal = admission.admit_request("b")
    assert refusal is not None and refusal.reason == "overloaded"
    assert "3 requests in progress (limit 3)" in refusal.message
    assert admission.in_flight("a") == (2, 0)
    admission.release_request("a")
    assert admission.admit_request("b") is None
    assert admission.requests_in_flight == 3


def test_tensor_streams_are_capped_per_peer() -> None:
    admission = Admission(Limits(tensor_streams=2), clock=Clock())
    assert admission.admit_tensor_stream("a") is None
    assert admission.admit_tensor_stream("a") is None
    refusal = admission.admit_tensor_stream("a")
    assert refusal is not None and refusal.reason == "tensor-stream-refused"
    assert "2 of yours are open (limit 2)" in refusal.message
    assert admission.admit_tensor_stream("b") is None
    admission.release_tensor_stream("a")
    assert admission.admit_tensor_stream("a") is None


def test_idle_peers_are_forgotten() -> None:
    clock = Clock()
    admission = Admission(Limits(rate=10.0, burst=10), clock=clock)
    for i in range(100):
        assert admission.admit_request(f"p{i}") is None
        admission.release_request(f"p{i}")
    assert admission.admit_request("busy") is None  # stays in flight
    assert admission.admit_tensor_stream("streaming") is None
    assert len(admission) == 102
    clock.now += 0.5  # buckets not full again yet: nothing is forgotten
    admission.admit_request("x")
    assert len(admission) == 103
    clock.now += 2.0  # full again (10 tokens at 10/s take 1 s)
    admission.admit_request("y")
    assert len(admission) == 4  # busy, streaming, x (in flight), y
    assert admission.in_flight("busy") == (1, 0)
    assert admission.in_flight("streaming") == (0, 1)


def test_the_table_is_capped() -> None:
    clock = Clock()
    admission = Admission(Limits(rate=1.0, burst=5), max_peers=8, clock=clock)
    assert admission.admit_request("busy") is None
    for i in range(1000):
        if admission.admit_request(f"p{i}") is None:
            admission.release_request(f"p{i}")
        assert len(admission) <= 8
    assert admission.in_flight("busy") == (1, 0)  # an entry in flight is never dropped
    admission.release_request("busy")
    assert admission.requests_in_flight == 0


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"request_rate": 0}, "request_rate must be a positive number"),
    ({"request_rate": float("inf")}, "request_rate must be a positive number"),
    ({"request_burst": 0}, "request_burst must be an integer"),
    ({"request_burst": 2.5}, "request_burst must be an integer"),
    ({"max_requests_per_peer": 0}, "max_requests_per_peer must be an integer"),
    ({"max_requests": 16, "max_requests_per_peer": 32}, "cannot exceed max_requests"),
    ({"max_tensor_streams_per_peer": True}, "max_tensor_streams_per_peer must be an integer"),
])
def test_bad_admission_settings_are_refused(tmp_path: Path, kwargs: dict[str, object],
                                            message: str) -> None:
    files = TLSFiles(cert=tmp_path / "c", key=tmp_path / "k", trust=tmp_path / "t")
    with pytest.raises(ValueError, match=message):
        NetworkSettings(tls=files, **kwargs)  # type: ignore[arg-type]


def test_default_settings_describe_the_default_limits(tmp_path: Path) -> None:
    files = TLSFiles(cert=tmp_path / "c", key=tmp_path / "k", trust=tmp_path / "t")
    assert NetworkSettings(tls=files).admission_limits() == Limits(
        rate=200.0, burst=400, per_peer=32, total=1024, tensor_streams=16)


def test_refusals_are_counted_and_their_log_lines_rate_limited(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = Refusals(logging.getLogger("test.refusals"), interval=10.0, clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        for _ in range(1235):
            refusals.record("rate-limited", "peerA", "echo from peerA: rate limited")
            clock.now += 0.005
        refusals.record("malformed-request", "peerA", "echo from peerA: malformed request")
        refusals.record("rate-limited", "peerB", "echo from peerB: rate limited")
        clock.now += 10.0
        refusals.record("rate-limited", "peerA", "echo from peerA: rate limited")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "echo from peerA: rate limited [rate-limited]",
        "echo from peerA: malformed request [malformed-request]",
        "echo from peerB: rate limited [rate-limited]",
        "echo from peerA: rate limited [rate-limited] (and 1234 more from this peer in the "
        "last 16 s)",
    ]
    assert refusals.counts == Counter({"rate-limited": 1237, "malformed-request": 1})
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_refusal_log_state_is_bounded_and_says_what_it_held_back(
        caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    refusals = Refusals(logging.getLogger("test.refusals"), interval=10.0, max_entries=16,
                        clock=clock)
    with caplog.at_level(logging.INFO, logger="test.refusals"):
        refusals.record("rate-limited", "quiet", "from quiet")
        refusals.record("rate-limited", "quiet", "from quiet")  # held back
        for i in range(100):
            refusals.record("rate-limited", f"p{i}", f"from p{i}")
            assert len(refusals) <= 16
        clock.now += 11.0
        refusals.record("rate-limited", "late", "from late")
    assert len(refusals) <= 16
    messages = [r.getMessage() for r in caplog.records]
    assert "1 more refusals [rate-limited] from quiet since the last line about them, 0 s ago" \
        in messages
    assert len(messages) == 1 + 1 + 100 + 1


def test_network_metrics_export_refusals_by_reason() -> None:
    net = SimpleNamespace(refusals=Counter({"rate-limited": 7, "slow-request": 1}))
    (family,) = network_metrics(net)  # type: ignore[arg-type]
    samples = {(s.name, s.labels["reason"]): s.value for s in family.samples
               if s.name.endswith("_total")}
    assert samples == {("hypha_net_refused_total", "rate-limited"): 7,
                       ("hypha_net_refused_total", "slow-request"): 1}
