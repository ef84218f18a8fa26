"""The arbiter: which requests get offers, at what price, and the leases on the resources.

Lease timing runs on trio's MockClock (no sleeps); the property tests use a plain fake clock.
"""

from __future__ import annotations

import math

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from hypha.leases import LeaseError
from hypha.messages import GIB, Executor, Resources, WorkerOffer, WorkerRequest, new_id
from hypha.worker.arbiter import Arbiter, Pricing

PARAMETER_SERVER = Executor(kind="parameter-server", name="diloco", runtime="hypha")

NOW = 1_700_000_000.0  # unix seconds, as offers and deadlines carry them
WORKER = "12D3KooWWorkerWorkerWorkerWorkerWorkerWorker1"
SCHED_A = "12D3KooWSchedAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA"
SCHED_B = "12D3KooWSchedBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
TRAIN = Executor(kind="process", name="train", runtime="python")
TOTAL = Resources(cpu=8.0, memory=32 * GIB, storage=100 * GIB, gpu=1)


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    return trio.testing.MockClock()


def arbiter(
    strategy: str = "flexible",
    price: float = 1.0,
    floor: float = 0.5,
    total: Resources = TOTAL,
    **kw: object,
) -> Arbiter:
    return Arbiter(
        total,
        [TRAIN, PARAMETER_SERVER],
        Pricing(strategy, price, floor),  # type: ignore[arg-type]
        worker_id=WORKER,
        **kw,  # type: ignore[arg-type]
    )


def ask(
    bid: float = 2.0,
    *,
    cpu: float = 2.0,
    memory: int = 4 * GIB,
    storage: int = GIB,
    gpu: int = 0,
    executor: Executor = TRAIN,
    deadline: float = NOW + 60,
    lease_ttl: float = 30.0,
    scheduler: str = SCHED_A,
) -> WorkerRequest:
    return WorkerRequest(
        id=new_id(),
        scheduler=scheduler,
        resources=Resources(cpu=cpu, memory=memory, storage=storage, gpu=gpu),
        executor=executor,
        bid=bid,
        deadline=deadline,
        lease_ttl=lease_ttl,
    )


# ----------------------------------------------------------------------------------------------
# pricing


def test_pricing_quotes() -> None:
    flexible = Pricing("flexible", price=2.0, floor=1.0)
    assert flexible.quote(2.0) == 2.0 and flexible.quote(7.5) == 7.5
    assert flexible.quote(1.99) is None  # below the asking price
    whole = Pricing("whole", price=2.0, floor=1.0)
    assert whole.quote(0.5) == 2.0 and whole.quote(7.5) == 7.5
    high_floor = Pricing("whole", price=2.0, floor=5.0)
    assert high_floor.quote(3.0) is None and high_floor.quote(5.0) == 5.0
    assert Pricing("flexible", price=2.0, floor=5.0).quote(4.0) is None
    for bad in (math.nan, math.inf, -1.0):
        assert flexible.quote(bad) is None and whole.quote(bad) is None


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"strategy": "cheap"},
            "Invalid pricing strategy: 'cheap' (expected one of flexible, whole)",
        ),
        ({"price": 0}, "Invalid price: 0 (expected a price per hour > 0)"),
        ({"price": math.nan}, "Invalid price: nan (expected a finite number)"),
        ({"floor": -0.5}, "Invalid floor: -0.5 (expected a price per hour >= 0)"),
        ({"floor": math.inf}, "Invalid floor: inf (expected a finite number)"),
    ],
)
def test_pricing_is_checked(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError) as exc:
        Pricing(**kwargs)  # type: ignore[arg-type]
    assert str(exc.value) == message


def test_arbiter_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="Invalid offer_ttl: 0"):
        arbiter(offer_ttl=0)
    with pytest.raises(ValueError, match="worker_id"):
        Arbiter(TOTAL, [TRAIN], Pricing(), worker_id="")
    with pytest.raises(TypeError, match="pricing: expected Pricing"):
        Arbiter(TOTAL, [TRAIN], "flexible", worker_id=WORKER)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------------------------
# offers


async def test_flexible_offers_exactly_what_was_asked_at_the_bid(
    mock_clock: trio.testing.MockClock,
) -> None:
    arb = arbiter("flexible", price=1.0, floor=0.5)
    request = ask(bid=3.0)
    [offer] = arb.decide([request], NOW)
    assert offer == WorkerOffer(
        request_id=request.id,
        worker=WORKER,
        resources=request.resources,
        executors=[TRAIN],
        price=3.0,
        lease_id=offer.lease_id,
        lease_expires=NOW + 5.0,
    )
    assert len(offer.lease_id) == 32
    assert arb.free() == TOTAL - request.resources
    hold = arb.get(offer.lease_id)
    assert hold is not None and not hold.value.accepted
    assert hold.value.scheduler == SCHED_A and hold.value.price == 3.0
    assert hold.expires == pytest.approx(trio.current_time() + 5.0)


@pytest.mark.parametrize(("bid", "price"), [(2.0, 3.0), (5.0, 5.0), (9.0, 5.0)])
async def test_whole_offers_all_free_resources_at_the_larger_of_bid_and_price(
    mock_clock: trio.testing.MockClock, bid: float, price: float
) -> None:
    arb = arbiter("whole", price=price, floor=0.5)
    [offer] = arb.decide([ask(bid=bid, cpu=1.0)], NOW)
    assert offer.resources == TOTAL and offer.price == max(bid, price)
    assert arb.free() == Resources()
    assert arb.decide([ask(bid=100.0, cpu=0.5)], NOW) == []  # everything is held
    nothing = ask(bid=100.0, cpu=0, memory=0, storage=0)
    assert arb.decide([nothing], NOW) == []  # not even an empty offer
    # an accepted whole lease keeps all of it
    arb.accept(offer.lease_id, 60)
    assert arb.free() == Resources()
    arb.release(offer.lease_id)
    assert arb.free() == TOTAL


@pytest.mark.parametrize(
    ("strategy", "price", "floor", "bid"),
    [
        ("flexible", 2.0, 0.5, 1.5),  # below the asking price
        ("flexible", 1.0, 3.0, 2.0),  # above the price but below the floor
        ("whole", 1.0, 3.0, 2.0),  # max(bid, price) = 2 is below the floor
        ("whole", 2.5, 3.0, 0.1),
    ],
)
async def test_requests_priced_below_the_price_or_floor_are_refused(
    mock_clock: trio.testing.MockClock, strategy: str, price: float, floor: float, bid: float
) -> None:
    arb = arbiter(strategy, price=price, floor=floor)
    assert arb.decide([ask(bid=bid)], NOW) == []
    assert arb.free() == TOTAL
    assert arb.decide([ask(bid=max(price, floor))], NOW) != []  # at price and floor: answered


@settings(max_examples=300, deadline=None)
@given(
    strategy=st.sampled_from(["flexible", "whole"]),
    price=st.floats(0.01, 100.0),
    floor=st.floats(0.0, 100.0),
    batches=st.lists(
        st.lists(
            st.tuples(
                st.floats(0.01, 200.0),  # bid
                st.floats(0.0, 10.0),  # cpu
                st.integers(0, 40 * GIB),  # memory
                st.integers(0, 2),  # gpu
            ),
            max_size=6,
        ),
        min_size=1,
        max_size=4,
    ),
)
def test_no_offer_below_the_floor_and_every_offer_fits(
    strategy: str, price: float, floor: float, batches: list[list[tuple[float, float, int, int]]]
) -> None:
    now = [0.0]
    arb = arbiter(strategy, price=price, floor=floor, clock=lambda: now[0])
    for batch in batches:
        requests = [ask(bid, cpu=cpu, memory=memory, storage=0, gpu=gpu)
                    for bid, cpu, memory, gpu in batch]
        by_id = {r.id: r for r in requests}
        free = arb.free()
        offers = arb.decide(requests, NOW)
        offered = Resources()
        for offer in offers:
            request = by_id[offer.request_id]
            assert offer.price >= floor  # never below the floor
            assert request.resources.fits(offer.resources)
            if strategy == "flexible":
                assert offer.price == request.bid >= price
                assert offer.resources == request.resources
            else:
                assert offer.price == max(request.bid, price)
            offered = offered + offer.resources
        # what one batch offers fits into what was free, so nothing is offered twice
        assert offered.fits(free)
        assert (arb.free() + offered).fits(free) and free.fits(arb.free() + offered)
        now[0] += 2.0  # some holds (5 s) run out between batches
    for _ in range(3):
        now[0] += 5.0
        arb.expire()
    assert arb.free() == TOTAL


async def test_the_same_resources_are_never_offered_twice(
    mock_clock: trio.testing.MockClock,
) -> None:
    arb = arbiter("flexible", offer_ttl=5.0)

    def sixty(scheduler: str = SCHED_A) -> WorkerRequest:  # 60% of the worker
        return ask(3.0, cpu=4.8, memory=19 * GIB, scheduler=scheduler)

    offers = arb.decide([sixty(), sixty(SCHED_B)], NOW)
    assert len(offers) == 1
    # nor in the next batch, while the first offer holds them
    mock_clock.jump(4.9)
    assert arb.decide([sixty()], NOW + 4.9) == []
    # once the temporary hold runs out, they are offered again
    mock_clock.jump(0.1)
    again = arb.decide([sixty()], NOW + 5.0)
    assert len(again) == 1 and again[0].lease_expires == NOW + 10.0
    with pytest.raises(LeaseError, match=r"expired 0\.0 s ago .* its resources are free again"):
        arb.accept(offers[0].lease_id, 30)
    assert [le.key for le in arb.expire()] == [offers[0].lease_id]


async def test_a_shorter_lease_ttl_in_the_request_shortens_the_hold(
    mock_clock: trio.testing.MockClock,
) -> None:
    arb = arbiter(offer_ttl=5.0)
    [offer] = arb.decide([ask(lease_ttl=2.0)], NOW)
    assert offer.lease_expires == NOW + 2.0
    mock_clock.jump(2.0)
    assert arb.free() == TOTAL


async def test_accept_renew_expire(mock_clock: trio.testing.MockClock) -> None:
    arb = arbiter()
    request = ask()
    [offer] = arb.decide([request], NOW)
    mock_clock.jump(4.0)
    lease = arb.accept(offer.lease_id, 30, scheduler=SCHED_A)
    assert lease.key == offer.lease_id and lease.value.accepted
    assert lease.expires == pytest.approx(trio.current_time() + 30)
    assert arb.leases() == [lease] and arb.get(offer.lease_id) == lease
    mock_clock.jump(10.0)  # past the offer's 5 s: accepted, so it holds
    assert arb.expire() == []
    assert arb.free() == TOTAL - request.resources
    mock_clock.jump(12.0)  # at 75% of the lease the scheduler renews
    renewed = arb.renew(offer.lease_id, 30, scheduler=SCHED_A)
    assert renewed.renewals == 1
    assert arb.next_expiry() == pytest.approx(trio.current_time() + 30)
    mock_clock.jump(29.0)
    assert arb.expire() == [] and arb.free() == TOTAL - request.resources
    mock_clock.jump(1.0)
    # run out, but held until the owner has collected it (and stopped its jobs)
    assert arb.free() == TOTAL - request.resources
    with pytest.raises(LeaseError, match="has expired"):
        arb.renew(offer.lease_id, 30)
    [expired] = arb.expire()
    assert expired.key == offer.lease_id and expired.value.accepted
    assert arb.free() == TOTAL and arb.leases() == [] and arb.next_expiry() is None
    with pytest.raises(LeaseError, match="no lease"):
        arb.renew(offer.lease_id, 30)


async def test_lease_errors(mock_clock: trio.testing.MockClock) -> None:
    arb = arbiter()
    [a, b] = arb.decide([ask(), ask(scheduler=SCHED_B)], NOW)
    with pytest.raises(LeaseError, match=f"no offer '{'0' * 32}' on this worker"):
        arb.accept("0" * 32, 30)
    with pytest.raises(LeaseError, match=f"belongs to scheduler {SCHED_A}, not {SCHED_B}"):
        arb.accept(a.lease_id, 30, scheduler=SCHED_B)
    with pytest.raises(ValueError, match="positive number of seconds"):
        arb.accept(a.lease_id, 0)
    assert arb.get(a.lease_id) is not None  # a failed accept leaves the offer as it was
    arb.accept(a.lease_id, 30)
    with pytest.raises(LeaseError, match="already accepted; renew the lease"):
        arb.accept(a.lease_id, 30)
    with pytest.raises(LeaseError, match="belongs to scheduler"):
        arb.renew(a.lease_id, 30, scheduler=SCHED_B)
    with pytest.raises(LeaseError, match="belongs to scheduler"):
        arb.release(a.lease_id, scheduler=SCHED_B)
    # the first renewal of an offer accepts it
    renewed = arb.renew(b.lease_id, 30, scheduler=SCHED_B)
    assert renewed.value.accepted and len(arb.leases()) == 2
    assert arb.release(a.lease_id).key == a.lease_id
    with pytest.raises(LeaseError, match="no lease"):
        arb.release(a.lease_id)


async def test_release_of_an_offer_frees_it(mock_clock: trio.testing.MockClock) -> None:
    arb = arbiter()
    [offer] = arb.decide([ask(cpu=8.0)], NOW)
    assert arb.free().cpu == 0
    released = arb.release(offer.lease_id)
    assert not released.value.accepted and arb.free() == TOTAL


async def test_requests_that_cannot_be_served_are_skipped(
    mock_clock: trio.testing.MockClock,
) -> None:
    arb = arbiter()
    other = Executor(kind="process", name="train", runtime="python3.12")
    skipped = [
        ask(executor=other),  # executor not offered
        ask(executor=Executor(kind="process", name="eval", runtime="python")),
        ask(deadline=NOW),  # deadline passed
        ask(deadline=NOW - 1),
        ask(cpu=9.0),  # more than the worker has
        ask(gpu=2),
    ]
    assert arb.decide(skipped, NOW) == []
    assert arb.free() == TOTAL
    [offer] = arb.decide([*skipped, ask(executor=PARAMETER_SERVER, deadline=NOW + 0.1)], NOW)
    assert offer.executors == (PARAMETER_SERVER,)


async def test_the_most_valuable_requests_win(mock_clock: trio.testing.MockClock) -> None:
    arb = arbiter("flexible", price=1.0, floor=0.0)
    low = ask(6.0, cpu=6.0, memory=0, storage=0)  # 1 per core
    high = ask(12.0, cpu=6.0, memory=0, storage=0)  # 2 per core
    mid = ask(9.0, cpu=6.0, memory=0, storage=0)
    [offer] = arb.decide([low, high, mid], NOW)
    assert offer.request_id == high.id

    # by bid per unit of capacity, not by bid: 4 cores for 8 beat 8 cores for 10
    arb = arbiter("flexible", price=1.0, floor=0.0)
    big = ask(10.0, cpu=8.0, memory=0, storage=0)
    small = ask(8.0, cpu=4.0, memory=0, storage=0)
    smaller = ask(3.0, cpu=2.0, memory=0, storage=0)  # 1.5 per core
    offers = arb.decide([big, smaller, small], NOW)
    assert [o.request_id for o in offers] == [small.id, smaller.id]  # best first
    assert arb.free().cpu == 2.0

    # equal value: first come, first served
    arb = arbiter("flexible", price=1.0, floor=0.0)
    first, second = ask(5.0, cpu=5.0), ask(5.0, cpu=5.0)
    assert [o.request_id for o in arb.decide([first, second], NOW)] == [first.id]
