"""python -m hypha.gateway: `init` writes the commented config, `run` (the default) loads it."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from hypha.gateway import cli
from hypha.gateway.config import GatewayConfig

TLS_ENV = {"HYPHA_TLS_CERT": "c.pem", "HYPHA_TLS_KEY": "k.pem", "HYPHA_TLS_TRUST": "t.pem"}


@pytest.fixture(autouse=True)
def clean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Run in an empty directory, with no HYPHA_* variables, and restore logging afterwards."""
    monkeypatch.chdir(tmp_path)
    for name in list(os.environ):
        if name.startswith("HYPHA_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def node(monkeypatch: pytest.MonkeyPatch) -> list[GatewayConfig]:
    """A stand-in for hypha.gateway.node (written elsewhere) that records what run() got."""
    calls: list[GatewayConfig] = []
    module = types.ModuleType("hypha.gateway.node")

    async def run(config: GatewayConfig) -> None:
        calls.append(config)

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hypha.gateway.node", module)
    return calls


def test_init_writes_a_config_that_run_reads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], node: list[GatewayConfig],
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    assert cli.main(["init"]) == 0
    path = tmp_path / "hypha-gateway.toml"
    assert path.read_text().startswith("# Hypha gateway configuration.")
    assert "hypha-gateway.toml" in capsys.readouterr().out

    for name, value in TLS_ENV.items():
        monkeypatch.setenv(name, value)
    assert cli.main([]) == 0  # no subcommand: run, with ./hypha-gateway.toml
    assert len(node) == 1
    assert node[0].tls.cert == tmp_path / "c.pem"
    assert node[0].network.listen == ["/ip4/0.0.0.0/tcp/4001"]


def test_init_refuses_to_overwrite(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "conf" / "gw.toml"
    assert cli.main(["init", "--config", str(path)]) == 0
    path.write_text("# edited\n")
    capsys.readouterr()
    assert cli.main(["init", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hypha gateway: error: {path}: already exists")
    assert "--force" in err
    assert path.read_text() == "# edited\n"
    assert cli.main(["init", "--config", str(path), "--force"]) == 0
    assert path.read_text().startswith("# Hypha gateway configuration.")


def test_run_layers_file_env_and_flags(
    tmp_path: Path, node: list[GatewayConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[tls]\ncert = "certs/node.pem"\nkey = "/k"\ntrust = "/t"\n'
        "[relay]\nmax_circuits = 10\nmax_reservations = 20\n[log]\nlevel = 'error'\n"
    )
    monkeypatch.setenv("HYPHA_RELAY_MAX_CIRCUITS", "11")
    monkeypatch.setenv("HYPHA_SKIP_CUDA", "1")  # not ours: ignored
    argv = ["run", "--config", str(path), "--relay-max-circuits", "12", "--no-relay-enabled",
            "--listen", "/ip4/127.0.0.1/tcp/0", "--log-level", "warning"]  # fmt: skip
    assert cli.main(argv) == 0
    (cfg,) = node
    assert cfg.tls.cert == tmp_path / "certs" / "node.pem"
    assert (cfg.relay.max_circuits, cfg.relay.max_reservations) == (12, 20)
    assert cfg.relay.enabled is False
    assert cfg.network.listen == ["/ip4/127.0.0.1/tcp/0"]
    assert logging.getLogger().level == logging.WARNING  # [log] was applied


def test_run_with_a_bad_key_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], node: list[GatewayConfig]
) -> None:
    path = tmp_path / "gw.toml"
    path.write_text('[tls]\ncert = "/c"\nkey = "/k"\ntrust = "/t"\n[relay]\nmax_circuit = 5\n')
    assert cli.main(["run", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(
        f"hypha gateway: error: {path}: unknown key relay.max_circuit (did you mean max_circuits?)"
    )
    assert "Traceback" not in err
    assert node == []


def test_run_reports_bad_env_and_flags(
    capsys: pytest.CaptureFixture[str], node: list[GatewayConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HYPHA_TLS_CRT", "x")
    assert cli.main(["--relay-max-circuits", "many"]) == 2
    err = capsys.readouterr().err
    assert "environment variable HYPHA_TLS_CRT: names no setting of [tls]" in err
    assert "flag --relay-max-circuits: relay.max_circuits: expected an integer, got 'many'" in err
    assert "tls.cert: required value missing" in err
    assert node == []


def test_run_with_a_missing_config_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["run", "--config", "nope.toml"]) == 2
    err = capsys.readouterr().err
    assert "nope.toml: config file not found" in err
    assert "python -m hypha.gateway init --config nope.toml" in err


def test_run_awaits_an_async_node(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[GatewayConfig] = []
    module = types.ModuleType("hypha.gateway.node")

    async def run(config: GatewayConfig) -> int:
        calls.append(config)
        return 3

    module.run = run  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "hypha.gateway.node", module)
    for name, value in TLS_ENV.items():
        monkeypatch.setenv(name, value)
    assert cli.main(["run"]) == 3
    assert len(calls) == 1


def test_help_lists_every_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["--help"]) == 0
    assert "{init,run}" in capsys.readouterr().out
    assert cli.main(["run", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--tls-cert", "--network-listen", "--listen", "--relay-enabled",
                 "--no-relay-enabled", "HYPHA_RELAY_MAX_CIRCUIT_BYTES", "[relay]",
                 "{debug,info,warning,error}"):  # fmt: skip
        assert text in out
    assert cli.main(["run", "--no-such-flag"]) == 2


def test_python_dash_m(tmp_path: Path) -> None:
    env = {**os.environ, "HYPHA_NO_EXTENSION": "1"}  # skip loading torch: faster
    done = subprocess.run(
        [sys.executable, "-m", "hypha.gateway", "init", "--config", "x.toml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "x.toml").exists()
    done = subprocess.run(
        [sys.executable, "-m", "hypha.gateway", "--config", "x.toml"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2
    assert done.stderr.startswith("hypha gateway: error: 3 problems in the configuration:")
