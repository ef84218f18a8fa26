"""``python -m hypha.gateway`` as a user runs it: a config file, a real process, SIGHUP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import trio

from hypha.net import DialError, open_network
from tests.unit.net._pki import PKI

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]


async def _read_until(proc: trio.Process, pattern: str, seen: list[str]) -> re.Match[str]:
    """The first line of the gateway's log, read so far or still to come, matching ``pattern``.

    ``seen`` holds every complete line read, and a last item with the incomplete rest."""
    assert proc.stderr is not None
    regex = re.compile(pattern)
    if not seen:
        seen.append("")
    while True:
        for line in seen[:-1]:
            match = regex.search(line)
            if match:
                return match
        data = await proc.stderr.receive_some(4096)
        if not data:
            raise AssertionError("gateway exited:\n" + "\n".join(seen))
        *lines, rest = (seen.pop() + data.decode()).split("\n")
        seen.extend([*lines, rest])


async def test_gateway_process_bootstraps_nodes_and_reloads_its_crl_on_sighup(
        pki: PKI, tmp_path: Path) -> None:
    gw_ident, gw_files = pki.node("gateway")
    del gw_ident
    config = tmp_path / "gateway.toml"
    env = {**os.environ, "HYPHA_NO_EXTENSION": "1", "PYTHONUNBUFFERED": "1"}
    subprocess.run([sys.executable, "-m", "hypha.gateway", "init", "--config", str(config)],
                   check=True, cwd=ROOT, env=env, capture_output=True)
    text = config.read_text()
    assert "[relay]" in text and "HYPHA_TLS_CERT" in text  # commented, with the env names
    env |= {"HYPHA_TLS_CERT": str(gw_files.cert), "HYPHA_TLS_KEY": str(gw_files.key),
            "HYPHA_TLS_TRUST": str(gw_files.trust), "HYPHA_TLS_CRL": str(pki.crl)}
    seen: list[str] = []
    async with trio.open_nursery() as nursery:
        proc = await nursery.start(lambda **kw: trio.run_process(
            [sys.executable, "-m", "hypha.gateway", "run", "--config", str(config),
             "--listen", "/ip4/127.0.0.1/tcp/0", "--metrics-port", "0"],
            cwd=ROOT, env=env, stderr=subprocess.PIPE, check=False, **kw))
        try:
            with trio.fail_after(60):
                match = await _read_until(proc, r"peers bootstrap from: (\S+)", seen)
                metrics = await _read_until(proc, r"metrics at (http://\S+)", seen)
            gateway_addr = match.group(1)
            ident, files = pki.node("member")
            settings = pki.settings(files, bootstrap=(gateway_addr,))
            async with open_network(settings) as member:
                with trio.fail_after(30):
                    while not member.connected_peers():
                        await trio.sleep(0.02)
                    await member.put("/hypha/test/gw", b"anchored")
                    assert await member.get("/hypha/test/gw") == b"anchored"
                    body = await trio.to_thread.run_sync(
                        lambda: urllib.request.urlopen(metrics.group(1), timeout=10).read())
                    assert b"hypha_peers_connected 1.0" in body
                # revoke the member, tell the gateway: its connection goes, and it cannot return
                pki.revoke(ident)
                proc.send_signal(signal.SIGHUP)
                with trio.fail_after(30):
                    await _read_until(proc, r"closing the connection of revoked peer", seen)
                    while member.connected_peers():
                        await trio.sleep(0.02)
                    with pytest.raises(DialError, match="revoked"):
                        await member.dial(gateway_addr)
        finally:
            proc.send_signal(signal.SIGINT)
            with trio.move_on_after(20):
                await proc.wait()
            if proc.returncode is None:
                proc.kill()
    assert proc.returncode in (0, 130, -signal.SIGINT), "\n".join(seen)


def test_gateway_with_unusable_tls_files_exits_2(pki: PKI, tmp_path: Path) -> None:
    env = {**os.environ, "HYPHA_NO_EXTENSION": "1", "HYPHA_TLS_CERT": str(tmp_path / "none.pem"),
           "HYPHA_TLS_KEY": str(tmp_path / "none.key"), "HYPHA_TLS_TRUST": str(pki.trust)}
    proc = subprocess.run([sys.executable, "-m", "hypha.gateway", "run", "--listen",
                           "/ip4/127.0.0.1/tcp/0"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "none.pem" in proc.stderr
    assert "Traceback" not in proc.stderr
