"""batches(): advertisements that arrive within a window of the first one are answered together.

Time is trio's MockClock, jumping ahead whenever every task sleeps (no real waiting).
"""

from __future__ import annotations

import contextlib

import pytest
import trio
import trio.testing

from hypha.worker.arbiter import batches


@pytest.fixture
def mock_clock() -> trio.testing.MockClock:
    clock = trio.testing.MockClock()
    clock.autojump_threshold = 0
    return clock


async def collect(
    receive: trio.MemoryReceiveChannel[str], window: float, **kw: int
) -> list[tuple[float, list[str]]]:
    """Every batch, with the (mock) time it was yielded at."""
    start = trio.current_time()
    out = []
    async with contextlib.aclosing(batches(receive, window, **kw)) as it:
        async for batch in it:
            out.append((round(trio.current_time() - start, 6), batch))
    return out


async def produce(send: trio.MemorySendChannel[str], script: list[tuple[float, str]]) -> None:
    """Send each item after sleeping the given seconds; close the channel at the end."""
    async with send:
        for pause, item in script:
            await trio.sleep(pause)
            await send.send(item)


async def run(
    script: list[tuple[float, str]], window: float, **kw: int
) -> list[tuple[float, list[str]]]:
    send, receive = trio.open_memory_channel[str](100)
    result: list[tuple[float, list[str]]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(produce, send, script)

        async def consume() -> None:
            result.extend(await collect(receive, window, **kw))

        nursery.start_soon(consume)
    return result


async def test_items_within_the_window_of_the_first_are_one_batch(
    mock_clock: trio.testing.MockClock,
) -> None:
    script = [
        (1.0, "a"),  # t=1.0 opens a batch until 1.2
        (0.1, "b"),  # 1.1
        (0.05, "c"),  # 1.15
        (0.2, "d"),  # 1.35: a new batch until 1.55
        (0.5, "e"),  # 1.85: a new batch, cut short when the channel closes
    ]
    assert await run(script, window=0.2) == [
        (1.2, ["a", "b", "c"]),
        (1.55, ["d"]),
        (1.85, ["e"]),
    ]


async def test_an_item_just_after_the_window_starts_the_next_batch(
    mock_clock: trio.testing.MockClock,
) -> None:
    script = [(0.0, "a"), (0.2, "b"), (0.1, "c"), (5.0, "d")]  # b at 0.2, c at 0.3, d at 5.3
    assert await run(script, window=0.2) == [(0.2, ["a"]), (0.4, ["b", "c"]), (5.3, ["d"])]


async def test_limit_ends_a_batch_early(mock_clock: trio.testing.MockClock) -> None:
    script = [(0.0, "a"), (0.01, "b"), (0.01, "c"), (0.01, "d"), (1.0, "e")]
    assert await run(script, window=0.5, limit=2) == [
        (0.01, ["a", "b"]),
        (0.03, ["c", "d"]),  # the limit, long before the window ends
        (1.03, ["e"]),
    ]


async def test_a_zero_window_answers_each_item_alone(mock_clock: trio.testing.MockClock) -> None:
    send, receive = trio.open_memory_channel[str](10)
    for item in "abc":
        send.send_nowait(item)
    await send.aclose()
    assert await collect(receive, 0.0) == [(0.0, ["a"]), (0.0, ["b"]), (0.0, ["c"])]


async def test_a_closed_channel_ends_the_batches(mock_clock: trio.testing.MockClock) -> None:
    send, receive = trio.open_memory_channel[str](10)
    await send.aclose()
    assert await collect(receive, 0.2) == []


@pytest.mark.parametrize(("window", "kw"), [(-1.0, {}), (float("nan"), {}), (0.2, {"limit": 0})])
async def test_bad_arguments(window: float, kw: dict[str, int]) -> None:
    _, receive = trio.open_memory_channel[str](1)
    with pytest.raises(ValueError, match=r"Invalid (window|limit)"):
        await collect(receive, window, **kw)
