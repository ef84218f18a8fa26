"""hypha.config.render / write_config: the commented TOML loads back to exactly what was rendered."""


from __future__ import annotations

import math
import tomllib
from dataclasses import dataclass
from pathlib import Path

import pytest

from hypha.config import ConfigError, TLSSection, load, render, section, setting, write_config
from hypha.gateway.config import GatewayConfig

from ._toy import BETA, Alpha, Beta, Toy, defaults


def load_text(tmp_path: Path, text: str, **kw: object) -> object:
    path = tmp_path / "rendered.toml"
    path.write_text(text, encoding="utf-8")
    return load(kw.pop("schema", Toy), path, env=kw.pop("env", {}), **kw)  # type: ignore[arg-type]


def test_rendered_defaults_load_back_to_the_defaults(tmp_path: Path) -> None:
    text = render(Toy)
    assert load_text(tmp_path, text, overrides=BETA) == defaults()


def test_rendered_document_explains_itself() -> None:
    text = render(Toy)
    assert text.startswith("# Hypha toy configuration.\n#\n# A toy role for the tests.\n")
    assert "built-in defaults < this file < environment variables < command-line flags" in text
    assert "HYPHA_<SECTION>_<KEY>" in text
    assert "# Every supported type, each with a default.\n[alpha]\n" in text
    assert "# An integer.\n# env HYPHA_ALPHA_COUNT, flag --alpha-count\ncount = 3\n" in text
    assert '# env HYPHA_ALPHA_NAME, flag --alpha-name / --name\nname = "hypha"\n' in text
    assert "# A choice. One of: fast, slow.\n" in text
    # required settings and unset optional ones are commented-out examples
    assert (
        '# A required path. Required.\n# env HYPHA_BETA_SECRET, flag --beta-secret\n# secret = "secret.pem"\n'
        in text
    )
    assert "# port = 4001\n" in text
    assert '# note = "..."\n' in text
    assert all(len(line) <= 100 for line in text.splitlines())


def test_rendered_required_settings_come_from_env(tmp_path: Path) -> None:
    cfg = load_text(tmp_path, render(Toy), env={"HYPHA_BETA_SECRET": "/s", "HYPHA_BETA_PORT": "9"})
    assert cfg == Toy(alpha=Alpha(), beta=Beta(secret=Path("/s"), port=9))


def test_rendered_values_round_trip(tmp_path: Path) -> None:
    odd = 'quote " backslash \\ newline \n tab \t del \x7f nul \x00 unicode é ✓ #not-a-comment'
    values = Toy(
        alpha=Alpha(
            name=odd,
            count=-12,
            ratio=1e-05,
            on=True,
            home=Path("/srv/with space/and'quote"),
            tags=[odd, "", "x"],
            files=[Path("/a.pem"), Path("/b c.pem")],
            note="",
            limit=None,
            where=Path("/w"),
            mode="slow",
        ),
        beta=Beta(secret=Path("/s"), port=65535),
    )
    text = render(Toy, values)
    tomllib.loads(text)  # valid TOML on its own
    got = load_text(tmp_path, text)
    # NOTE: "" for an optional string reads back as unset, by design
    assert got == Toy(alpha=_replace(values.alpha, note=None), beta=values.beta)


@pytest.mark.parametrize("ratio", [math.inf, -math.inf, 1e300, 5e-324, -0.0, 0.1 + 0.2, 3.0])
def test_floats_round_trip_exactly(tmp_path: Path, ratio: float) -> None:
    values = Toy(alpha=Alpha(ratio=ratio), beta=Beta(secret=Path("/s"), port=1))
    got = load_text(tmp_path, render(Toy, values))
    assert isinstance(got, Toy)
    assert got.alpha.ratio == ratio and math.copysign(1, got.alpha.ratio) == math.copysign(1, ratio)


def test_nan_round_trips(tmp_path: Path) -> None:
    values = Toy(alpha=Alpha(ratio=math.nan), beta=Beta(secret=Path("/s"), port=1))
    got = load_text(tmp_path, render(Toy, values))
    assert isinstance(got, Toy) and math.isnan(got.alpha.ratio)


@dataclass(frozen=True)
class Work:
    """Where a node keeps its files."""

    dir: Path = setting(Path("work"), "a relative default")
    extra: list[Path] = setting([Path("a"), Path("/b")], "a list with a relative default")


@dataclass(frozen=True)
class Relative:
    """A role with relative default paths."""

    work: Work = section(Work)


def test_relative_default_paths_keep_their_meaning(tmp_path: Path) -> None:
    # written out, "work" would become relative to the file's directory; commented out, the
    # default (relative to the working directory at run time) stays the default
    text = render(Relative)
    assert '# dir = "work"  # default, relative to the working dir\n' in text
    assert load_text(tmp_path, text, schema=Relative) == Relative()


def test_gateway_round_trip(tmp_path: Path) -> None:
    env = {"HYPHA_TLS_CERT": "/c.pem", "HYPHA_TLS_KEY": "/k.pem", "HYPHA_TLS_TRUST": "/t.pem"}
    tls = TLSSection(cert=Path("/c.pem"), key=Path("/k.pem"), trust=Path("/t.pem"))
    assert load_text(tmp_path, render(GatewayConfig), schema=GatewayConfig, env=env) == (
        GatewayConfig(tls=tls)
    )
    text = render(GatewayConfig)
    for line in ("[network]", "[tls]", "[log]", "[relay]", 'listen = ["/ip4/0.0.0.0/tcp/4001"]',
                 '# cert = "node.cert.pem"', "# env HYPHA_RELAY_MAX_CIRCUIT_BYTES"):  # fmt: skip
        assert line in text.splitlines() or line in text


def test_gateway_round_trip_with_values(tmp_path: Path) -> None:
    base = load(GatewayConfig, None, env={}, overrides={
        "tls.cert": "/c", "tls.key": "/k", "tls.trust": "/t", "tls.crl": ["/r1", "/r2"],
        "network.bootstrap": ["/dns4/gw.example/tcp/4001/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"],
        "relay.enabled": False, "relay.reservation_ttl": 60, "log.format": "json",
    })  # fmt: skip
    assert load_text(tmp_path, render(GatewayConfig, base), schema=GatewayConfig) == base


def test_write_config_refuses_to_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "c.toml"
    write_config(path, "first\n")
    assert path.read_text() == "first\n"
    with pytest.raises(ConfigError, match=r"already exists; not overwriting it \(pass --force"):
        write_config(path, "second\n")
    assert path.read_text() == "first\n"
    write_config(path, "third\n", force=True)
    assert path.read_text() == "third\n"
    with pytest.raises(ConfigError, match="is a directory"):
        write_config(tmp_path, "x", force=True)


def _replace(obj: Alpha, **changes: object) -> Alpha:
    import dataclasses

    return dataclasses.replace(obj, **changes)  # type: ignore[arg-type]
