"""Network namespaces for the partition fault: each node on a machine of its own, as far as the
network goes.

:class:`Namespaces` builds, for the nodes it is given:

* a private Linux bridge in the host's namespace, ``hy<6 hex>`` (the test's "switch"; it has
  no address, so the host's own routing never sees the test's traffic);
* per node, a network namespace ``hy<6 hex>-<node>`` with ``lo`` up, and a veth pair: the host
  end ``hy<6 hex>v<i>`` is a port of the bridge, the other end is moved into the namespace,
  renamed ``eth0`` and given ``10.<a>.<b>.<i + 1>/24``. The /24 is drawn at random from
  10.64.0.0 .. 10.254.255.0 and checked against the host's addresses and routes.

:meth:`Namespaces.cut` disables the node's bridge port (``bridge link set dev <host end> state
0``) and :meth:`Namespaces.heal` sets it forwarding again (``state 3``). NOTE: not ``ip link set
... down``: that drops the carrier of the node's ``eth0``, and the node's kernel then marks its
routes ``linkdown`` (a pulled cable on the node's own NIC, which it notices). A disabled port
drops every frame in both directions while both ends of the veth stay up: the node and its peers
see only silence, as when a switch or a router between them fails. That is the partition: TCP
connections stay open and retransmit into the void, and are usable again once the port
forwards.

Everything created is removed on exit (also after an exception or Ctrl-C): the host ends of the
veth pairs (which takes the namespace ends with them), the namespaces, the bridge.
:meth:`Namespaces.leftovers` lists what is still there. The nodes' processes must be stopped
before: a namespace lives on, unnamed, while a process is inside it.

:func:`available` says why namespaces cannot be used here (not root, no iproute2, ``ip netns
add`` refused as in an unprivileged container), or ``None``.
"""

from __future__ import annotations

import functools
import ipaddress
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from types import TracebackType

__all__ = ["Namespaces", "NamespacesUnavailable", "available"]

#: Seconds an ``ip`` command may take.
IP_TIMEOUT = 30.0
#: Seconds to wait for the kernel to finish removing a namespace's links (it does it after
#: ``ip netns del`` returns).
GONE_TIMEOUT = 10.0
#: Bridge port states (``bridge link set ... state``).
PORT_DISABLED, PORT_FORWARDING = 0, 3


class NamespacesUnavailable(RuntimeError):
    """Network namespaces cannot be used here; the message says why."""


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` failed ({done.returncode}): "
                           f"{done.stderr.strip() or done.stdout.strip()}")
    return done


@functools.cache
def available() -> str | None:
    """Why network namespaces, veth pairs and a bridge cannot be made here, or ``None``.

    Probes by making (and removing) one namespace, one veth pair and one bridge."""
    if not sys.platform.startswith("linux"):
        return f"network namespaces are Linux only (this is {sys.platform})"
    if os.geteuid() != 0:
        return "creating network namespaces, veth pairs and a bridge needs root"
    for tool in ("ip", "bridge"):
        if shutil.which(tool) is None:
            return f"iproute2's `{tool}` is not installed"
    tag = secrets.token_hex(3)
    ns, bridge, veth, peer = f"hyprobe{tag}", f"hyp{tag}", f"hyp{tag}v", f"hyp{tag}p"
    undo: list[list[str]] = []
    try:
        for argv, back in (
                (["ip", "netns", "add", ns], ["ip", "netns", "del", ns]),
                (["ip", "link", "add", bridge, "type", "bridge"], ["ip", "link", "del", bridge]),
                (["ip", "link", "add", veth, "type", "veth", "peer", "name", peer],
                 ["ip", "link", "del", veth]),
                (["ip", "link", "set", peer, "netns", ns], []),
                (["ip", "link", "set", veth, "master", bridge], [])):
            done = _run(*argv, check=False)
            if done.returncode != 0:
                return f"`{' '.join(argv)}` was refused: {done.stderr.strip()}"
            if back:
                undo.append(back)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"iproute2 did not work: {exc}"
    finally:
        for back in reversed(undo):
            _run(*back, check=False)
    return None


def _free_subnet(rng: random.Random) -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no address or route of the host overlaps."""
    used: list[ipaddress.IPv4Network] = []
    for line in _run("ip", "-o", "-4", "addr", "show").stdout.splitlines():
        fields = line.split()
        if "inet" in fields:
            used.append(ipaddress.IPv4Interface(fields[fields.index("inet") + 1]).network)
    for line in _run("ip", "-4", "route", "show", "table", "all").stdout.splitlines():
        fields = line.split()
        if fields and fields[0] in ("broadcast", "local", "unicast", "multicast"):
            fields = fields[1:]
        if fields and fields[0] != "default":
            try:
                used.append(ipaddress.IPv4Network(fields[0], strict=False))
            except ValueError:
                continue
    for _ in range(1000):
        subnet = ipaddress.IPv4Network(f"10.{rng.randint(64, 254)}.{rng.randint(0, 255)}.0/24")
        if not any(subnet.overlaps(other) for other in used):
            return subnet
    raise RuntimeError("no free 10.x.y.0/24 on this host")


class Namespaces:
    """A bridge, and a network namespace with a veth port on it for each of ``nodes`` (see the
    module doc). Use as a context manager; :meth:`placement` is the hook for
    :class:`hypha.up.LocalNetwork`."""

    def __init__(self, nodes: Sequence[str], *, seed: int | None = None) -> None:
        if len(set(nodes)) != len(nodes):
            raise ValueError(f"node names must be distinct, got {list(nodes)}")
        if len(nodes) > 250:
            raise ValueError(f"at most 250 nodes fit in a /24, got {len(nodes)}")
        self.tag = secrets.token_hex(3)
        self.bridge = f"hy{self.tag}"
        self.nodes = list(nodes)
        self._rng = random.Random(seed)
        self.subnet: ipaddress.IPv4Network | None = None
        self._undo: list[list[str]] = []
        self._lock = threading.Lock()

    # -- what a node is given ---------------------------------------------------------------------
    def namespace(self, node: str) -> str:
        return f"hy{self.tag}-{node}"

    def port(self, node: str) -> str:
        """The host end of ``node``'s veth pair: its port on the bridge."""
        return f"hy{self.tag}v{self.nodes.index(node)}"

    def address(self, node: str) -> str:
        if self.subnet is None:
            raise RuntimeError("the namespaces are not set up (use `with Namespaces(...)`)")
        return str(self.subnet.network_address + self.nodes.index(node) + 1)

    def prefix(self, node: str) -> list[str]:
        """The command prefix that runs a program in ``node``'s namespace. NOTE: ``ip netns
        exec`` execs the program, so the pid (and the session) is the program's."""
        return ["ip", "netns", "exec", self.namespace(node)]

    def placement(self, node: str) -> tuple[list[str], str] | None:
        """:class:`hypha.up.LocalNetwork`'s hook: (command prefix, listen host), or ``None`` for
        a node not placed here (it runs on 127.0.0.1 in the host's namespace)."""
        if node not in self.nodes:
            return None
        return self.prefix(node), self.address(node)

    # -- the fault --------------------------------------------------------------------------------
    def cut(self, node: str) -> None:
        """Partition ``node``: its bridge port drops every frame, both ways."""
        _run("bridge", "link", "set", "dev", self.port(node), "state", str(PORT_DISABLED))

    def heal(self, node: str) -> None:
        """Reconnect ``node``: its bridge port forwards again."""
        _run("bridge", "link", "set", "dev", self.port(node), "state", str(PORT_FORWARDING))

    # -- set up and tear down ---------------------------------------------------------------------
    def __enter__(self) -> Namespaces:
        reason = available()
        if reason is not None:
            raise NamespacesUnavailable(reason)
        try:
            self._create()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def _do(self, argv: list[str], undo: list[str] | None = None) -> None:
        # NOTE: the undo step is recorded before the step runs: an interrupted `ip link add`
        # may have made the link; deleting one that is not there only fails quietly.
        if undo is not None:
            self._undo.append(undo)
        _run(*argv)

    def _create(self) -> None:
        self.subnet = _free_subnet(self._rng)
        self._do(["ip", "link", "add", self.bridge, "type", "bridge"],
                 ["ip", "link", "del", self.bridge])
        self._do(["ip", "link", "set", self.bridge, "up"])
        for node in self.nodes:
            ns, port = self.namespace(node), self.port(node)
            inside = f"hy{self.tag}p{self.nodes.index(node)}"
            self._do(["ip", "netns", "add", ns], ["ip", "netns", "del", ns])
            self._do(["ip", "-n", ns, "link", "set", "lo", "up"])
            self._do(["ip", "link", "add", port, "type", "veth", "peer", "name", inside],
                     ["ip", "link", "del", port])
            self._do(["ip", "link", "set", inside, "netns", ns])
            self._do(["ip", "-n", ns, "link", "set", inside, "name", "eth0"])
            self._do(["ip", "-n", ns, "addr", "add",
                      f"{self.address(node)}/{self.subnet.prefixlen}", "dev", "eth0"])
            self._do(["ip", "-n", ns, "link", "set", "eth0", "up"])
            self._do(["ip", "link", "set", port, "master", self.bridge])
            self._do(["ip", "link", "set", port, "up"])

    def close(self) -> None:
        """Remove everything that was created, in reverse order; a second Ctrl-C does not cut
        it short. Raises if something could not be removed."""
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            with self._lock:
                while self._undo:
                    _run(*self._undo.pop(), check=False)
                left = self._wait_gone()
        finally:
            if main:
                signal.signal(signal.SIGINT, previous)
        if left:
            raise RuntimeError(f"could not remove {', '.join(left)}")

    def _wait_gone(self) -> list[str]:
        deadline = time.monotonic() + GONE_TIMEOUT
        while (left := self.leftovers()) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def leftovers(self) -> list[str]:
        """The namespaces and links of this instance that exist now."""
        mark = f"hy{self.tag}"
        spaces = [line.split()[0] for line in _run("ip", "netns", "list").stdout.splitlines()
                  if line.strip()]
        links = [line.split()[0].split("@")[0]
                 for line in _run("ip", "-br", "link").stdout.splitlines() if line.strip()]
        return ([f"namespace {s}" for s in spaces if s.startswith(mark)]
                + [f"link {link}" for link in links if link.startswith(mark)])
