"""Prometheus metrics: every node serves ``/metrics`` on a configurable local port.

A node describes its state with a *collect* callback that returns metric families at scrape
time (``prometheus_client`` custom-collector style), so nothing is instrumented twice and a
scrape always sees the live ledger, not counters that drifted. Served by hypercorn on trio, like
the job bridge; the socket is bound here so that port 0 (any free port) reports the real one.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from hypha._asgi import answer_lifespan, serve_asgi

if TYPE_CHECKING:
    from hypha.net import Network

__all__ = ["Collect", "counter", "gauge", "network_metrics", "serve_metrics"]

log = logging.getLogger("hypha.metrics")

Collect = Callable[[], Iterable[Metric]]


def gauge(name: str, doc: str, value: float | None = None, *,
          labels: Mapping[tuple[str, ...], float] | None = None,
          label_names: tuple[str, ...] = ()) -> GaugeMetricFamily:
    """A gauge with one value, or one value per label tuple."""
    if labels is None:
        return GaugeMetricFamily(name, doc, value=value or 0.0)
    family = GaugeMetricFamily(name, doc, labels=list(label_names))
    for key, v in labels.items():
        family.add_metric(list(key), v)
    return family


def counter(name: str, doc: str, value: float | None = None, *,
            labels: Mapping[tuple[str, ...], float] | None = None,
            label_names: tuple[str, ...] = ()) -> CounterMetricFamily:
    """A counter with one value, or one value per label tuple."""
    if labels is None:
        return CounterMetricFamily(name, doc, value=value or 0.0)
    family = CounterMetricFamily(name, doc, labels=list(label_names))
    for key, v in labels.items():
        family.add_metric(list(key), v)
    return family


def network_metrics(net: Network) -> list[Metric]:
    """``hypha_net_refused_total{reason}``: what the network layer refused, by reason
    (``Network.refusals``). A reason appears once it has happened. The roles already export
    ``hypha_peers_connected`` themselves, so it is not repeated here.
    """
    refused = CounterMetricFamily("hypha_net_refused", "inbound requests and streams the "
                                  "network layer refused or failed, by reason",
                                  labels=["reason"])
    for reason, count in sorted(net.refusals.items()):
        refused.add_metric([reason], count)
    return [refused]


class _Callback(Collector):
    def __init__(self, collect: Collect) -> None:
        self._collect = collect

    def collect(self) -> Iterable[Metric]:
        return list(self._collect())


async def serve_metrics(collect: Collect, *, host: str = "127.0.0.1", port: int = 0,
                        task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    """Serve ``collect()``'s metrics at ``http://host:port/metrics`` until cancelled.

    Reports the bound port through ``task_status`` (useful with port 0).
    """
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Callback(collect))

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            await answer_lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        if scope["path"] != "/metrics" or scope["method"] not in ("GET", "HEAD"):
            status, body, kind = 404, b"only GET /metrics here\n", b"text/plain"
        else:
            try:
                status, body, kind = 200, generate_latest(registry), CONTENT_TYPE_LATEST.encode()
            except Exception:
                log.exception("collecting metrics failed")
                status, body, kind = 500, b"collecting metrics failed\n", b"text/plain"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", kind),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body",
                    "body": b"" if scope["method"] == "HEAD" else body})

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise ValueError(f"metrics: cannot listen on {host}:{port}: {exc.strerror}") from exc
    bound = sock.getsockname()[1]
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(serve_asgi, app, sock,
                                        log=logging.getLogger("hypha.metrics.http")))
            log.info("metrics at http://%s:%d/metrics", host, bound)
            task_status.started(bound)
    finally:
        sock.close()
