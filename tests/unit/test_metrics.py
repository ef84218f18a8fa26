"""The /metrics endpoint: live values at scrape time, 404 elsewhere, a clear error on a busy port."""

from __future__ import annotations

import pytest
import trio

from hypha.metrics import counter, gauge, serve_metrics


async def _get(port: int, path: str) -> tuple[int, str]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    await stream.send_all(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    data = b""
    while chunk := await stream.receive_some(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode()


async def test_metrics_are_collected_at_scrape_time() -> None:
    state = {"leases": 1.0}

    def collect():  # type: ignore[no-untyped-def]
        yield gauge("hypha_leases", "leases held", state["leases"])
        yield counter("hypha_offers", "offers sent", 7)
        yield gauge("hypha_jobs", "jobs by state", labels={("running",): 2, ("failed",): 1},
                    label_names=("state",))

    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_metrics(
            collect, port=0, task_status=task_status))
        with trio.fail_after(10):
            status, body = await _get(port, "/metrics")
            assert status == 200
            assert "hypha_leases 1.0" in body and "hypha_offers_total 7.0" in body
            assert 'hypha_jobs{state="running"} 2.0' in body
            state["leases"] = 3.0
            assert "hypha_leases 3.0" in (await _get(port, "/metrics"))[1]
            assert (await _get(port, "/other"))[0] == 404
        nursery.cancel_scope.cancel()


async def test_a_busy_port_is_a_clear_error() -> None:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status: serve_metrics(
            lambda: [], port=0, task_status=task_status))
        with pytest.raises(ValueError, match=f"cannot listen on 127.0.0.1:{port}"):
            await serve_metrics(lambda: [], port=port)
        nursery.cancel_scope.cancel()
