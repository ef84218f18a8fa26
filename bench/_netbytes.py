"""Bytes this process has put on TCP: the kernel's own per-socket counters, summed.

:func:`snapshot` walks ``/proc/self/fd``, and for every TCP socket (IPv4 or IPv6; listening
sockets included, they count zero) reads ``getsockopt(IPPROTO_TCP, TCP_INFO)``, the kernel's
``struct tcp_info`` (``include/uapi/linux/tcp.h``). The fields used, with their byte offsets in
that struct (x86-64 and every other Linux ABI: the struct has no padding before them):

* ``tcpi_bytes_acked`` (u64, offset 120, Linux >= 4.1): payload bytes sent and acknowledged
  (plus one for the SYN: the kernel reports ``snd_una - isn``);
* ``tcpi_bytes_received`` (u64, offset 128, Linux >= 4.1): payload bytes received;
* ``tcpi_bytes_sent`` (u64, offset 200, Linux >= 4.19): payload bytes sent, retransmissions
  included (on loopback there are none, so it equals ``bytes_acked`` once the peer has read).

Offsets derived from the struct: 8 u8 fields (0..7), 24 u32 fields (8..103: ``tcpi_rto`` ...
``tcpi_total_retrans``), then u64 ``pacing_rate`` 104, ``max_pacing_rate`` 112,
``bytes_acked`` 120, ``bytes_received`` 128, u32 ``segs_out`` 136, ``segs_in`` 140,
``notsent_bytes`` 144, ``min_rtt`` 148, ``data_segs_in`` 152, ``data_segs_out`` 156, u64
``delivery_rate`` 160, ``busy_time`` 168, ``rwnd_limited`` 176, ``sndbuf_limited`` 184, u32
``delivered`` 192, ``delivered_ce`` 196, u64 ``bytes_sent`` 200. :func:`self_check` verifies them
on the running kernel against a known transfer (and against ``ss -ti`` when it is installed).

Counts are TCP payload bytes (no TCP/IP headers). A socket is keyed by its inode, so a socket
behind several descriptors counts once. A :class:`Snapshot` difference counts sockets opened
after the first snapshot from zero; a socket opened *and closed* between two snapshots is
missed (the benchmarks' transports keep their connections open, so this does not arise there).

    python bench/_netbytes.py      # the self-check
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import struct
import subprocess
import threading
from dataclasses import dataclass, field

__all__ = ["Counters", "Snapshot", "loopback_tx_bytes", "self_check", "snapshot"]

_TCP_INFO = getattr(socket, "TCP_INFO", 11)
_OFF_BYTES_ACKED = 120
_OFF_BYTES_RECEIVED = 128
_OFF_BYTES_SENT = 200
_INFO_LEN = 256  # the kernel copies min(len, sizeof(struct tcp_info)) bytes


@dataclass(frozen=True)
class Counters:
    """Payload bytes of one socket (or a sum): sent (retransmissions included; ``acked`` where
    the kernel is older than 4.19), acknowledged, received."""

    sent: int = 0
    acked: int = 0
    received: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.sent + other.sent, self.acked + other.acked, self.received + other.received
        )

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.sent - other.sent, self.acked - other.acked, self.received - other.received
        )


@dataclass(frozen=True)
class Snapshot:
    """Counters of every TCP socket of the process at one moment, by socket inode."""

    sockets: dict[int, Counters] = field(default_factory=dict)

    @property
    def total(self) -> Counters:
        out = Counters()
        for c in self.sockets.values():
            out = out + c
        return out

    def __sub__(self, before: Snapshot) -> Counters:
        """What the process sent and received between ``before`` and this snapshot (sockets
        gone since ``before`` are left out; new ones count from zero)."""
        out = Counters()
        for inode, c in self.sockets.items():
            out = out + (c - before.sockets.get(inode, Counters()))
        return out


def _parse(info: bytes) -> Counters:
    if len(info) < _OFF_BYTES_RECEIVED + 8:
        raise OSError(f"TCP_INFO returned {len(info)} bytes: Linux >= 4.1 needed")
    acked, received = struct.unpack_from("=QQ", info, _OFF_BYTES_ACKED)
    sent = struct.unpack_from("=Q", info, _OFF_BYTES_SENT)[0] if len(info) >= 208 else acked
    return Counters(sent, acked, received)


def _socket_counters(fd: int) -> Counters | None:
    """Counters of the TCP socket behind ``fd``, or None if it is not one (or is gone)."""
    try:
        dup = os.dup(fd)
    except OSError:  # closed by another thread since the directory was listed
        return None
    try:
        s = socket.socket(fileno=dup)  # detects family, type and protocol; owns ``dup`` now
    except OSError:
        os.close(dup)
        return None
    try:
        if s.family not in (socket.AF_INET, socket.AF_INET6) or s.type != socket.SOCK_STREAM:
            return None
        return _parse(s.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _INFO_LEN))
    except OSError:
        return None
    finally:
        s.close()  # closes the duplicate only; the process's own descriptor stays open


def snapshot() -> Snapshot:
    """The counters of every TCP socket this process holds now."""
    sockets: dict[int, Counters] = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", target)
        if not m or int(m.group(1)) in sockets:
            continue
        c = _socket_counters(int(name))
        if c is not None:
            sockets[int(m.group(1))] = c
    return Snapshot(sockets)


def loopback_tx_bytes() -> int:
    """Bytes transmitted by the ``lo`` interface since boot (all processes, TCP/IP headers
    included), from /proc/net/dev; a machine-wide cross-check of :func:`snapshot`."""
    with open("/proc/net/dev") as f:
        for line in f:
            name, sep, rest = line.partition(":")
            if sep and name.strip() == "lo":
                return int(rest.split()[8])
    raise OSError("no lo interface in /proc/net/dev")


def _ss_bytes(port: int) -> dict[str, int]:
    """``bytes_sent`` / ``bytes_acked`` / ``bytes_received`` of the socket with local port
    ``port`` according to ``ss -tin`` (empty when ss is missing or too old)."""
    exe = shutil.which("ss")
    if exe is None:
        return {}
    out = subprocess.run(
        [exe, "-tinH", "state", "established", f"( sport = :{port} )"],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    ).stdout
    return {k: int(v) for k, v in re.findall(r"\b(bytes_(?:sent|acked|received)):(\d+)", out)}


def self_check(nbytes: int = 8 << 20) -> None:
    """Sends ``nbytes`` over a fresh 127.0.0.1 connection inside this process and checks that
    the counters see exactly that (and agree with ``ss``); raises AssertionError otherwise."""
    srv = socket.create_server(("127.0.0.1", 0))
    try:
        a = socket.create_connection(srv.getsockname())
        b, _ = srv.accept()
    finally:
        srv.close()
    with a, b:
        before = snapshot()
        payload = os.urandom(1 << 16) * (nbytes >> 16) + os.urandom(nbytes & 0xFFFF)
        got = bytearray()

        def reader() -> None:
            while len(got) < nbytes:
                chunk = b.recv(1 << 20)
                if not chunk:
                    break
                got.extend(chunk)

        t = threading.Thread(target=reader)
        t.start()
        a.sendall(payload)
        t.join(timeout=60)
        assert bytes(got) == payload, "transfer incomplete"
        b.sendall(b"ok")
        assert a.recv(2) == b"ok"
        after = snapshot()
        delta = after - before
        assert delta.sent == nbytes + 2, f"sent {delta.sent} != {nbytes + 2}"
        assert delta.acked == nbytes + 2, f"acked {delta.acked} != {nbytes + 2}"
        assert delta.received == nbytes + 2, f"received {delta.received} != {nbytes + 2}"
        fd_a = _socket_counters(a.fileno())
        assert fd_a is not None and fd_a.sent >= nbytes and fd_a.received >= 2
        ss = _ss_bytes(a.getsockname()[1])
        if ss:
            assert ss.get("bytes_acked") == fd_a.acked, f"ss {ss} vs TCP_INFO {fd_a}"
            assert ss.get("bytes_received") == fd_a.received, f"ss {ss} vs TCP_INFO {fd_a}"
            if "bytes_sent" in ss:
                assert ss["bytes_sent"] == fd_a.sent, f"ss {ss} vs TCP_INFO {fd_a}"


if __name__ == "__main__":
    self_check()
    snap = snapshot()
    print(
        f"_netbytes self-check passed (8 MiB over 127.0.0.1 counted exactly, "
        f"{'agreeing with ss' if shutil.which('ss') else 'ss not installed'}); "
        f"this process holds {len(snap.sockets)} TCP sockets"
    )
