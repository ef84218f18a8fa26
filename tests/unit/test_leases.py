"""The lease ledger, its time driven by trio's MockClock (no sleeps)."""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing

from hypha.leases import LeaseError, Ledger


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


async def test_insert_renew_expire_remove(mock_clock: trio.testing.MockClock) -> None:
    ledger: Ledger[str, int] = Ledger()
    start = trio.current_time()
    lease = ledger.insert("a", 1, ttl=10)
    assert lease.expires == pytest.approx(start + 10)
    ledger.insert("b", 2, ttl=5)
    assert ledger.next_expiry() == pytest.approx(start + 5)
    mock_clock.jump(4)
    renewed = ledger.renew("b", ttl=5)
    assert renewed.expires == pytest.approx(start + 9) and renewed.renewals == 1
    assert ledger.expired() == []
    mock_clock.jump(5.5)  # b expired at start+9, a lives until start+10
    assert [le.key for le in ledger.expired()] == ["b"]
    assert ledger.get("b") is None and ledger.get("a") is not None
    with pytest.raises(LeaseError, match="expired"):
        ledger.renew("b", ttl=5)
    mock_clock.jump(1)
    assert [le.key for le in ledger.expired()] == ["b", "a"]  # soonest first
    assert "a" in ledger and len(ledger) == 2  # kept until the owner removes them
    assert ledger.remove("b").value == 2
    assert ledger.remove("a").value == 1
    assert len(ledger) == 0 and ledger.next_expiry() is None


async def test_errors(mock_clock: trio.testing.MockClock) -> None:
    ledger: Ledger[str, str] = Ledger()
    ledger.insert("x", "v", 1)
    with pytest.raises(LeaseError, match="already held"):
        ledger.insert("x", "w", 1)
    with pytest.raises(LeaseError, match="no lease 'y'"):
        ledger.renew("y", 1)
    with pytest.raises(LeaseError, match="no lease 'y'"):
        ledger.remove("y")
    for bad in (0, -1, math.nan, math.inf, True, "5"):
        with pytest.raises(ValueError, match="positive number of seconds"):
            ledger.insert("z", "v", bad)  # type: ignore[arg-type]
    mock_clock.jump(2)
    assert ledger.insert("x", "w", 1).value == "w"  # an expired lease may be replaced


async def test_a_task_sleeping_until_the_next_expiry(mock_clock: trio.testing.MockClock) -> None:
    """The pattern a lease owner uses: sleep until the next expiry, then collect."""
    mock_clock.autojump_threshold = 0
    ledger: Ledger[str, None] = Ledger()
    collected: list[tuple[str, float]] = []
    start = trio.current_time()
    for key, ttl in (("a", 3), ("b", 1), ("c", 2)):
        ledger.insert(key, None, ttl)

    while len(ledger):
        deadline = ledger.next_expiry()
        if deadline is not None:
            await trio.sleep_until(deadline)
        for lease in ledger.expired():
            ledger.remove(lease.key)
            collected.append((lease.key, trio.current_time() - start))
    assert [k for k, _ in collected] == ["b", "c", "a"]
    assert [t for _, t in collected] == pytest.approx([1, 2, 3])


def test_custom_clock() -> None:
    now = [100.0]
    ledger: Ledger[int, str] = Ledger(clock=lambda: now[0])
    ledger.insert(1, "one", 5)
    now[0] = 105.0
    assert [le.key for le in ledger.expired()] == [1]
