"""The data node: announces prepared datasets in the DHT and streams their slices to workers.

``python -m hypha.data run`` opens (and verifies) every dataset of ``[data] datasets``, joins the
network and, for each dataset ``NAME``:

* **announces** it under the DHT key ``/hypha/dataset/NAME`` (:func:`dataset_key`): a provider
  record (who serves it: ``find_providers``) and a value record, the :class:`DatasetInfo`
  (kind, number of slices and examples, the manifest's SHA-256) that a scheduler needs to build
  its slice tracker. Both are announced again every :data:`REANNOUNCE` seconds, so that DHT
  peers that joined later or dropped the records learn them again;
* **serves** ``/hypha/data-fetch/1``: a worker sends :class:`~hypha.messages.FetchSlice`, the
  node answers :class:`~hypha.messages.SliceComing` (the slice's size and the tensor stream's
  name, :func:`slice_stream`) and then opens that tensor stream to the worker, carrying the
  slice's file bytes in chunks of :data:`CHUNK_SIZE`, with meta ``{"dataset", "slice",
  "sha256"}``. An unknown dataset or slice is refused (``RequestRejected``).

Transfers are bounded: ``max_transfers`` at once (each holds one slice in memory), at most
``max_waiting`` more queued behind them; beyond that a request is refused as busy. Every slice is
read from disk and checked against the manifest's SHA-256 when it is sent, so a file corrupted
since the start is refused rather than shipped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import trio
from libp2p.peer.id import ID
from prometheus_client.core import Metric

import hypha
from hypha.data.config import DataConfig
from hypha.data.slices import Dataset, DatasetError
from hypha.messages import (
    PROTOCOLS,
    FetchSlice,
    Health,
    HealthCheck,
    MessageError,
    SliceComing,
    decode,
    encode,
)
from hypha.metrics import counter, gauge, network_metrics
from hypha.net import (
    DialError,
    MTLSTransport,
    Network,
    NetworkClosed,
    RequestRejected,
    TensorStreamError,
    open_network,
    settings_from_sections,
)
from hypha.rolecli import serve_node

__all__ = [
    "CHUNK_SIZE",
    "DATASET_KEY_PREFIX",
    "NO_SLICE_AVAILABLE",
    "DataNode",
    "DatasetInfo",
    "dataset_key",
    "open_datasets",
    "run",
    "slice_stream",
]

log = logging.getLogger("hypha.data")

#: Every dataset is announced under this DHT key prefix: ``/hypha/dataset/<name>``.
DATASET_KEY_PREFIX: Final = "/hypha/dataset/"
#: Bytes per tensor-stream chunk of a slice.
CHUNK_SIZE: Final = 4 << 20
#: Seconds between announcements of the same dataset.
REANNOUNCE: Final = 600.0
#: Seconds between attempts to announce while the DHT knows no peer (doubling, capped).
ANNOUNCE_RETRY: Final = (0.5, 30.0)
#: Seconds to open the tensor stream to a worker, and the most a worker may leave a chunk unread.
STREAM_TIMEOUT: Final = 60.0
#: The start of the scheduler's answer when it has no slice to give *yet* (all of the epoch are
#: assigned and not all used, or it has not found the dataset yet): ask again later. Any other
#: refusal of ``/hypha/data-slice/1`` is final.
NO_SLICE_AVAILABLE: Final = "no slice available yet"

_INFO_FORMAT: Final = "hypha-dataset-info"
_INFO_VERSION: Final = 1
_SHA256_HEX: Final = frozenset("0123456789abcdef")


def dataset_key(name: str) -> str:
    """The DHT key a dataset is announced under: ``/hypha/dataset/<name>``."""
    return f"{DATASET_KEY_PREFIX}{name}"


def slice_stream(dataset: str, index: int) -> str:
    """The name of the tensor stream that carries slice ``index`` of ``dataset``:
    ``slice:<dataset>:<index>`` (a worker expects exactly this name from the node it asked)."""
    return f"slice:{dataset}:{index}"


@dataclass(frozen=True)
class DatasetInfo:
    """The DHT value record of a dataset: what a scheduler needs to hand out its slices.

    NOTE: a DHT record, not an RPC message, hence here and not in hypha.messages. Its bytes come
    from any peer that can write to the DHT, so :meth:`from_bytes` checks every field.
    """

    name: str
    kind: str
    num_slices: int
    num_examples: int
    manifest_sha256: str

    @classmethod
    def of(cls, dataset: Dataset) -> DatasetInfo:
        digest = hashlib.sha256(dataset.manifest.to_json().encode()).hexdigest()
        return cls(dataset.name, dataset.kind, dataset.num_slices,
                   dataset.manifest.num_examples, digest)

    def to_bytes(self) -> bytes:
        return json.dumps({"format": _INFO_FORMAT, "version": _INFO_VERSION,
                           "name": self.name, "kind": self.kind, "num_slices": self.num_slices,
                           "num_examples": self.num_examples,
                           "manifest_sha256": self.manifest_sha256},
                          separators=(",", ":"), sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, name: str) -> DatasetInfo:
        """Parse a record read under ``dataset_key(name)``; ValueError says what is wrong."""
        try:
            raw = json.loads(data)
        except (UnicodeDecodeError, ValueError) as exc:
            raise ValueError(f"dataset record of {name!r} is not JSON: {exc}") from None
        keys = {"format", "version", "name", "kind", "num_slices", "num_examples",
                "manifest_sha256"}
        if not isinstance(raw, dict) or set(raw) != keys:
            raise ValueError(f"dataset record of {name!r}: expected an object with the keys "
                             f"{', '.join(sorted(keys))}")
        if raw["format"] != _INFO_FORMAT or raw["version"] != _INFO_VERSION:
            raise ValueError(f"dataset record of {name!r}: format {raw['format']!r} version "
                             f"{raw['version']!r} is not {_INFO_FORMAT!r} {_INFO_VERSION}")
        if raw["name"] != name:
            raise ValueError(f"dataset record under {dataset_key(name)} names {raw['name']!r}")
        for key in ("num_slices", "num_examples"):
            value = raw[key]
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"dataset record of {name!r}: {key} must be an integer >= 1, "
                                 f"got {value!r}")
        digest = raw["manifest_sha256"]
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= _SHA256_HEX:
            raise ValueError(f"dataset record of {name!r}: manifest_sha256 is not a SHA-256")
        if not isinstance(raw["kind"], str) or not raw["kind"]:
            raise ValueError(f"dataset record of {name!r}: kind must be a non-empty string")
        return cls(name, raw["kind"], raw["num_slices"], raw["num_examples"], digest)


def open_datasets(paths: Sequence[Path], *, verify: bool = True) -> list[Dataset]:
    """Open the dataset directories ``paths`` (reading every slice when ``verify``); blocking.

    Raises :class:`~hypha.data.DatasetError` for a dataset that cannot be served: unreadable,
    corrupt, a name that cannot be announced, or the same name twice."""
    datasets: dict[str, Dataset] = {}
    for path in paths:
        dataset = Dataset.open(path)
        _check_announceable(dataset.name, where=str(path))
        if dataset.name in datasets:
            raise DatasetError(f"{path}: dataset {dataset.name!r} is also at "
                               f"{datasets[dataset.name].path}; serve each name once")
        if verify:
            dataset.verify()
        datasets[dataset.name] = dataset
    return list(datasets.values())


def _check_announceable(name: str, *, where: str) -> None:
    try:
        FetchSlice(dataset=name, slice=0)
    except MessageError:
        # NOTE: prepare accepts upper-case names (they are directory names); the network's
        # dataset names are lower-case (hypha.messages.DatasetName).
        raise DatasetError(f"{where}: dataset name {name!r} cannot be announced: names on the "
                           "network are 1-64 of a-z, 0-9, '.', '_' and '-'; prepare it again "
                           "with a lower-case --name") from None


class DataNode:
    """The data node's logic on top of a running :class:`~hypha.net.Network`."""

    def __init__(self, net: Network, datasets: Iterable[Dataset], *, max_transfers: int = 4,
                 max_waiting: int = 64, chunk_size: int = CHUNK_SIZE,
                 reannounce: float = REANNOUNCE) -> None:
        if max_transfers < 1:
            raise ValueError(f"Invalid max_transfers: {max_transfers} (at least 1)")
        if max_waiting < 0:
            raise ValueError(f"Invalid max_waiting: {max_waiting} (0 or more)")
        if not 0 < chunk_size <= 64 << 20:
            raise ValueError(f"Invalid chunk_size: {chunk_size} (1 byte .. 64 MiB)")
        self.net = net
        self.datasets: dict[str, Dataset] = {}
        for dataset in datasets:
            _check_announceable(dataset.name, where=str(dataset.path))
            if dataset.name in self.datasets:
                raise ValueError(f"dataset {dataset.name!r} given twice")
            self.datasets[dataset.name] = dataset
        if not self.datasets:
            raise ValueError("a data node needs at least one dataset to serve")
        self.max_transfers = max_transfers
        self.max_waiting = max_waiting
        self.chunk_size = chunk_size
        self.reannounce = reannounce
        #: set once every dataset has been announced (provider and value record) at least once
        self.announced = trio.Event()
        self.slices_sent = 0
        self.bytes_sent = 0
        self.transfers_failed = 0
        self._slots = trio.Semaphore(max_transfers)
        self._queued = 0
        self._started = time.monotonic()
        self._nursery: trio.Nursery | None = None

    def collect_metrics(self) -> list[Metric]:
        """Prometheus metrics of the data node, read at scrape time."""
        return [
            gauge("hypha_peers_connected", "peers with an open connection",
                  len(self.net.connected_peers())),
            counter("hypha_data_slices_sent", "slices streamed to workers", self.slices_sent),
            counter("hypha_data_bytes_sent", "slice bytes streamed to workers", self.bytes_sent),
            counter("hypha_data_transfers_failed", "slice transfers that failed",
                    self.transfers_failed),
            *network_metrics(self.net),
        ]

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; reports readiness once the protocols are served."""
        self.net.serve(PROTOCOLS["data-fetch"], self._on_fetch)
        self.net.serve(PROTOCOLS["health"], self._on_health)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._announce)
            log.info("data node %s serving %s", self.net.peer_id, ", ".join(
                f"{d.name} ({d.num_slices} slices)" for d in self.datasets.values()))
            task_status.started()

    # -- announcing ------------------------------------------------------------------------------
    async def _announce(self) -> None:
        delay, cap = ANNOUNCE_RETRY
        while True:
            try:
                for dataset in self.datasets.values():
                    await self.announce(dataset)
            except (ConnectionError, ValueError, trio.TooSlowError) as exc:
                # NOTE: py-libp2p raises plain ValueError/ConnectionError when the DHT has no
                # peer to store a record on yet (before the bootstrap connection is up).
                log.info("could not announce the datasets yet (%s); retrying in %.1f s", exc,
                         delay)
                await trio.sleep(delay)
                delay = min(delay * 2, cap)
                continue
            delay = ANNOUNCE_RETRY[0]
            self.announced.set()
            await trio.sleep(self.reannounce)

    async def announce(self, dataset: Dataset) -> None:
        """Put the dataset's record and provide its key; ConnectionError when no peer took it."""
        key = dataset_key(dataset.name)
        if not await self.net.provide(key):
            raise ConnectionError(f"no DHT peer accepted the provider record of {key}")
        # NOTE: after provide, not before: a put with no DHT peer yet succeeds silently (the
        # record stays local), a provide reports it, so once it succeeded the put reaches peers.
        await self.net.put(key, DatasetInfo.of(dataset).to_bytes())
        log.info("announced dataset %s under %s", dataset.name, key)

    # -- serving slices --------------------------------------------------------------------------
    async def _on_fetch(self, peer: ID, data: bytes) -> bytes:
        try:
            request = decode(FetchSlice, data)
        except MessageError as exc:
            raise RequestRejected(str(exc)) from None
        dataset = self.datasets.get(request.dataset)
        if dataset is None:
            raise RequestRejected(f"this data node does not serve dataset {request.dataset!r} "
                                  f"(it serves {', '.join(sorted(self.datasets))})")
        if request.slice >= dataset.num_slices:
            raise RequestRejected(f"dataset {dataset.name!r} has slices 0..."
                                  f"{dataset.num_slices - 1}; there is no slice {request.slice}")
        if self._queued >= self.max_waiting + self.max_transfers:
            raise RequestRejected(f"busy: {self._queued} transfers in progress or queued; ask "
                                  "again later")
        assert self._nursery is not None
        stream = slice_stream(dataset.name, request.slice)
        self._queued += 1
        # NOTE: the transfer starts before this answer is written; the worker registers the
        # stream it expects before it asks, so the order does not matter.
        self._nursery.start_soon(self._send, peer, dataset, request.slice, stream)
        return encode(SliceComing(dataset=dataset.name, slice=request.slice,
                                  size=dataset.manifest.slice_info(request.slice).size,
                                  stream=stream))

    async def _send(self, peer: ID, dataset: Dataset, index: int, name: str) -> None:
        try:
            async with self._slots:
                data = await trio.to_thread.run_sync(dataset.slice_bytes, index)
                meta = {"dataset": dataset.name, "slice": index,
                        "sha256": dataset.manifest.slice_info(index).sha256}
                with trio.fail_after(STREAM_TIMEOUT):
                    out = await self.net.open_tensor_stream(peer, name, meta)
                async with out:
                    view = memoryview(data)
                    for start in range(0, len(view), self.chunk_size):
                        with trio.fail_after(STREAM_TIMEOUT):
                            await out.send(view[start:start + self.chunk_size])
                # leaving `async with` closes the stream and waits for the worker's check
            self.slices_sent += 1
            self.bytes_sent += len(data)
            log.info("sent slice %d of %s (%d bytes) to %s", index, dataset.name, len(data),
                     peer)
        except (DatasetError, DialError, TensorStreamError, trio.TooSlowError,
                NetworkClosed) as exc:
            self.transfers_failed += 1
            log.warning("sending slice %d of %s to %s failed: %s", index, dataset.name, peer,
                        str(exc) or "the worker stopped reading")
        except Exception:
            # NOTE: a failed transfer is the worker's to retry; it must not take the node down.
            self.transfers_failed += 1
            log.exception("sending slice %d of %s to %s failed", index, dataset.name, peer)
        finally:
            self._queued -= 1

    async def _on_health(self, peer: ID, data: bytes) -> bytes:
        try:
            decode(HealthCheck, data)
        except MessageError as exc:
            raise RequestRejected(str(exc)) from None
        return encode(Health(status="ok", role="data", version=hypha.__version__,
                             uptime=time.monotonic() - self._started))


async def run(config: DataConfig, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> int:
    """``python -m hypha.data run``: serve the configured datasets until SIGINT/SIGTERM."""
    try:
        if not config.network.bootstrap:
            raise ValueError("network.bootstrap is empty: a data node needs the address of at "
                             "least one gateway (…/p2p/<peer id>) to announce its datasets")
        if not config.data.datasets:
            raise ValueError("data.datasets is empty: list the prepared dataset directories to "
                             "serve (made with `python -m hypha.data prepare`)")
        settings = settings_from_sections(config.network, config.tls, reload_on_sighup=True)
        MTLSTransport(settings.tls)
        if config.data.verify:
            log.info("verifying %d dataset(s) (every slice's SHA-256)", len(config.data.datasets))
        datasets = await trio.to_thread.run_sync(
            lambda: open_datasets(config.data.datasets, verify=config.data.verify))
    except (ValueError, DatasetError) as exc:
        log.error("cannot start the data node: %s", exc)
        return 2
    async with open_network(settings) as net:
        node = DataNode(net, datasets, max_transfers=config.data.max_transfers)
        await serve_node(node, config.metrics, log, task_status)
    log.info("data node stopped: %d slices (%d bytes) sent", node.slices_sent, node.bytes_sent)
    return 0
