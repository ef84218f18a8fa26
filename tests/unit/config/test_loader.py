"""hypha.config.load: layering (defaults < file < env < flags), paths, and every error path."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import pytest

import hypha.config as C
from hypha.config import REQUIRED, ConfigError, load, section, setting

from ._toy import BETA, Alpha, Toy, defaults


def write(tmp_path: Path, text: str, name: str = "toy.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def flags(*argv: str) -> dict[str, object]:
    parser = argparse.ArgumentParser()
    C.add_arguments(parser, Toy)
    return C.overrides_from_args(parser.parse_args(list(argv)), Toy)


def errors(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(exc.value)


def test_public_api() -> None:
    assert sorted(C.__all__) == sorted(
        [
            "ENV_PREFIX",
            "REQUIRED",
            "ConfigError",
            "InvalidSetting",
            "LogSection",
            "MetricsSection",
            "NetworkSection",
            "TLSSection",
            "add_arguments",
            "configure_logging",
            "load",
            "overrides_from_args",
            "render",
            "section",
            "setting",
            "write_config",
        ]
    )
    assert all(hasattr(C, name) for name in C.__all__)


def test_defaults_when_nothing_is_given() -> None:
    assert load(Toy, None, env={}, overrides=BETA) == defaults()


# field, TOML literal, env value, flags, and the value each layer should produce
LAYERS: list[tuple[str, str, str, list[str], Any, Any, Any]] = [
    ("name", '"file"', "env", ["--alpha-name", "flag"], "file", "env", "flag"),
    ("count", "10", "20", ["--alpha-count", "30"], 10, 20, 30),
    ("ratio", "1.5", "2.5", ["--alpha-ratio", "3.5"], 1.5, 2.5, 3.5),
    ("on", "true", "no", ["--alpha-on"], True, False, True),
    ("home", '"/f"', "/e", ["--alpha-home", "/c"], Path("/f"), Path("/e"), Path("/c")),
    (
        "tags",
        '["f1", "f2"]',
        "e1, e2",
        ["--alpha-tags", "c1", "--alpha-tags", "c2"],
        ["f1", "f2"],
        ["e1", "e2"],
        ["c1", "c2"],
    ),
    (
        "files",
        '["/f"]',
        "/e1,/e2",
        ["--alpha-files", "/c1", "/c2"],
        [Path("/f")],
        [Path("/e1"), Path("/e2")],
        [Path("/c1"), Path("/c2")],
    ),
    ("note", '"file"', "env", ["--alpha-note", "flag"], "file", "env", "flag"),
    ("limit", "1", "2", ["--alpha-limit", "3"], 1, 2, 3),
    ("where", '"/f"', "/e", ["--alpha-where", "/c"], Path("/f"), Path("/e"), Path("/c")),
    ("mode", '"slow"', "fast", ["--alpha-mode", "slow"], "slow", "fast", "slow"),
]


@pytest.mark.parametrize("case", LAYERS, ids=[c[0] for c in LAYERS])
def test_file_then_env_then_flag(tmp_path: Path, case: tuple[Any, ...]) -> None:
    key, literal, env_value, argv, from_file, from_env, from_flag = case
    path = write(tmp_path, f"[alpha]\n{key} = {literal}\n")
    env = {f"HYPHA_ALPHA_{key.upper()}": env_value}

    def value(cfg: Toy) -> object:
        return getattr(cfg.alpha, key)

    assert value(load(Toy, path, env={}, overrides=BETA)) == from_file
    assert value(load(Toy, path, env=env, overrides=BETA)) == from_env
    got = value(load(Toy, path, env=env, overrides={**BETA, **flags(*argv)}))
    assert got == from_flag
    assert type(got) is type(from_flag)


def test_flags_not_given_override_nothing(tmp_path: Path) -> None:
    assert flags() == {}
    path = write(tmp_path, "[alpha]\ncount = 10\non = true\ntags = ['x']\n")
    cfg = load(Toy, path, env={}, overrides={**BETA, **flags()})
    assert (cfg.alpha.count, cfg.alpha.on, cfg.alpha.tags) == (10, True, ["x"])


def test_flag_forms() -> None:
    assert flags("--name", "short") == {"alpha.name": "short"}
    assert flags("--no-alpha-on") == {"alpha.on": False}
    assert flags("--alpha-tags") == {"alpha.tags": []}  # a bare list flag empties the list
    cfg = load(Toy, None, env={}, overrides={**BETA, **flags("--alpha-tags", "--no-alpha-on")})
    assert cfg.alpha.tags == [] and cfg.alpha.on is False


def test_env_forms() -> None:
    env = {
        "HYPHA_ALPHA_LIMIT": "",  # empty unsets an optional setting
        "HYPHA_ALPHA_TAGS": "",  # and empties a list
        "HYPHA_ALPHA_FILES": "/a, /b,",
        "HYPHA_ALPHA_RATIO": "7",  # an integer is a fine float
    }
    cfg = load(Toy, None, env=env, overrides=BETA)
    assert cfg.alpha.limit is None and cfg.alpha.tags == []
    assert cfg.alpha.files == [Path("/a"), Path("/b")]
    assert cfg.alpha.ratio == 7.0 and isinstance(cfg.alpha.ratio, float)


@pytest.mark.parametrize(
    ("text", "value"),
    [("1", True), ("0", False), ("true", True), ("False", False), ("YES", True), ("no", False)],
)
def test_env_booleans(text: str, value: bool) -> None:
    assert load(Toy, None, env={"HYPHA_ALPHA_ON": text}, overrides=BETA).alpha.on is value


def test_unrelated_hypha_variables_are_ignored() -> None:
    env = {
        "HYPHA_SKIP_CUDA": "1",
        "HYPHA_CUDA_ARCHS": "80;90",
        "HYPHA_TEST_SEED": "5",
        "HYPHA_ALPHABET": "x",  # "ALPHA" followed by something other than "_"
        "NOT_HYPHA_ALPHA_CUONT": "1",
    }
    assert load(Toy, None, env=env, overrides=BETA) == defaults()


def test_typed_overrides_are_accepted() -> None:
    over = {"alpha.home": Path("/x"), "alpha.ratio": 2, "alpha.on": True, "alpha.note": None}
    cfg = load(Toy, None, env={}, overrides={**BETA, **over})
    assert (cfg.alpha.home, cfg.alpha.ratio, cfg.alpha.on, cfg.alpha.note) == (
        Path("/x"),
        2.0,
        True,
        None,
    )


# ------------------------------------------------------------------------------------------------
# paths


def test_relative_paths_in_the_file_follow_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    body = '[alpha]\nhome = "data"\nfiles = ["a.pem", "../b.pem", "/abs.pem"]\n'
    path = write(tmp_path, body, name="etc/toy.toml")
    cfg = load(Toy, Path("etc/toy.toml"), env={}, overrides=BETA)
    assert path.exists()
    assert cfg.alpha.home == tmp_path / "etc" / "data"
    assert cfg.alpha.files == [tmp_path / "etc/a.pem", tmp_path / "etc/../b.pem", Path("/abs.pem")]


def test_relative_paths_from_env_and_flags_follow_the_working_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    path = write(tmp_path, '[alpha]\nhome = "from-file"\n', name="etc/toy.toml")
    env = {"HYPHA_ALPHA_FILES": "a.pem,b.pem", "HYPHA_ALPHA_WHERE": "w"}
    cfg = load(Toy, path, env=env, overrides={**BETA, **flags("--alpha-home", "h")})
    assert cfg.alpha.home == tmp_path / "h"
    assert cfg.alpha.files == [tmp_path / "a.pem", tmp_path / "b.pem"]
    assert cfg.alpha.where == tmp_path / "w"
    assert cfg.beta.secret == Path("/etc/secret")


def test_home_is_expanded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path, '[alpha]\nhome = "~/h"\n', name="elsewhere/toy.toml")
    assert load(Toy, path, env={}, overrides=BETA).alpha.home == tmp_path / "h"


# ------------------------------------------------------------------------------------------------
# errors: each names the source, the key as section.key, what is wrong, and what would be valid


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load(Toy, missing, env={}, overrides=BETA)
    assert str(missing) in errors(exc)
    assert "not found" in errors(exc)
    assert "python -m hypha.toy init" in errors(exc)


def test_toml_syntax_error_has_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "[alpha]\ncount = = 3\n")
    with pytest.raises(ConfigError) as exc:
        load(Toy, path, env={}, overrides=BETA)
    assert errors(exc).startswith(f"{path}: invalid TOML")
    assert "line 2" in errors(exc) and "column" in errors(exc)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("[alpah]\n", "unknown section [alpah] (did you mean [alpha]?); valid sections: [alpha], [beta]"),
        ("[alpha]\ncuont = 1\n", "unknown key alpha.cuont (did you mean count?); valid keys in [alpha]: name, count"),
        ("count = 1\n", "key 'count' is outside any section (did you mean to put it under [alpha]?)"),
        ("alpha = 1\n", "alpha: expected a [alpha] section, got 1 (int)"),
        ("[alpha]\nhome = 3\n", "alpha.home: expected a path string, got 3 (int)"),
        ("[alpha]\nhome = ''\n", "alpha.home: expected a path, got an empty string"),
        ("[alpha]\ncount = 'x'\n", "alpha.count: expected an integer, got 'x' (str)"),
        ("[alpha]\ncount = 1.5\n", "alpha.count: expected an integer, got 1.5 (float)"),
        ("[alpha]\ncount = true\n", "alpha.count: expected an integer, got True (bool)"),
        ("[alpha]\nratio = 'fast'\n", "alpha.ratio: expected a number, got 'fast' (str)"),
        ("[alpha]\non = 1\n", "alpha.on: expected true or false, got 1 (int)"),
        ("[alpha]\nname = 5\n", "alpha.name: expected a string, got 5 (int)"),
        ("[alpha]\ntags = 'x'\n", "alpha.tags: expected a list of strings (for example"),
        ("[alpha]\nfiles = ['a', 2]\n", "alpha.files[1]: expected a path string, got 2 (int)"),
        ("[alpha]\nmode = 'fsat'\n", "alpha.mode: expected one of fast, slow, got 'fsat' (did you mean fast?)"),
        ("[alpha.sub]\nx = 1\n", "unknown key alpha.sub"),
    ],
)  # fmt: skip
def test_bad_file_values(tmp_path: Path, body: str, message: str) -> None:
    path = write(tmp_path, body)
    with pytest.raises(ConfigError) as exc:
        load(Toy, path, env={}, overrides=BETA)
    assert errors(exc).startswith(f"{path}: ")
    assert message in errors(exc)


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"HYPHA_ALPHA_COUNT": "abc"}, "environment variable HYPHA_ALPHA_COUNT: alpha.count: expected an integer, got 'abc'"),
        ({"HYPHA_ALPHA_RATIO": "x"}, "environment variable HYPHA_ALPHA_RATIO: alpha.ratio: expected a number, got 'x'"),
        ({"HYPHA_ALPHA_ON": "maybe"}, "alpha.on: expected one of 1/0/true/false/yes/no, got 'maybe'"),
        ({"HYPHA_ALPHA_HOME": ""}, "alpha.home: expected a path, got an empty string"),
        ({"HYPHA_ALPHA_MODE": "slwo"}, "alpha.mode: expected one of fast, slow, got 'slwo' (did you mean slow?)"),
        ({"HYPHA_ALPHA_CUONT": "1"}, "environment variable HYPHA_ALPHA_CUONT: names no setting of [alpha] (did you mean HYPHA_ALPHA_COUNT?); valid: HYPHA_ALPHA_NAME, HYPHA_ALPHA_COUNT"),
        ({"HYPHA_BETA": "1"}, "environment variable HYPHA_BETA: names no setting of [beta]"),
        ({"HYPHA_ALPHA_count": "1"}, "HYPHA_ALPHA_count: names no setting of [alpha] (did you mean HYPHA_ALPHA_COUNT?)"),
    ],
)  # fmt: skip
def test_bad_env_values(env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Toy, None, env=env, overrides=BETA)
    assert message in errors(exc)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--alpha-count", "x"], "flag --alpha-count: alpha.count: expected an integer, got 'x'"),
        (["--alpha-files", "a", ""], "flag --alpha-files: alpha.files[1]: expected a path, got an empty string"),
        (["--alpha-mode", "medium"], "flag --alpha-mode: alpha.mode: expected one of fast, slow, got 'medium'"),
    ],
)  # fmt: skip
def test_bad_flag_values(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Toy, None, env={}, overrides={**BETA, **flags(*argv)})
    assert message in errors(exc)


def test_unknown_override_key() -> None:
    with pytest.raises(
        ConfigError,
        match=r"override 'alpha\.cuont': no such setting \(did you mean alpha\.count\?\)",
    ):
        load(Toy, None, env={}, overrides={**BETA, "alpha.cuont": 1})


def test_required_values_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Toy, None, env={}, overrides={"beta.port": 1})
    assert errors(exc) == (
        "beta.secret: required value missing (a required path); set secret = ... in a config "
        "file, the environment variable HYPHA_BETA_SECRET, or the flag --beta-secret"
    )
    path = write(tmp_path, "[alpha]\n")
    with pytest.raises(ConfigError) as exc:
        load(Toy, path, env={})
    assert exc.value.problems == [
        f"{path}: beta.secret: required value missing (a required path); set secret = ... in "
        f"the [beta] section of {path}, the environment variable HYPHA_BETA_SECRET, or the flag "
        "--beta-secret",
        f"{path}: beta.port: required value missing (a required integer); set port = ... in "
        f"the [beta] section of {path}, the environment variable HYPHA_BETA_PORT, or the flag "
        "--beta-port",
    ]
    assert errors(exc).startswith("2 problems in the configuration:\n  - ")


def test_validate_hook_names_the_source_and_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load(Toy, None, env={"HYPHA_BETA_PORT": "-1"}, overrides={"beta.secret": "/s"})
    assert (
        errors(exc) == "environment variable HYPHA_BETA_PORT: beta.port: must be positive, got -1"
    )
    path = write(tmp_path, "[beta]\nsecret = '/s'\nport = 0\n")
    with pytest.raises(ConfigError) as exc:
        load(Toy, path, env={})
    assert errors(exc) == f"{path}: beta.port: must be positive, got 0"
    with pytest.raises(ConfigError) as exc:  # a plain ValueError blames the section
        load(Toy, path, env={}, overrides=flags("--beta-port", "13"))
    assert errors(exc) == "[beta]: port 13 is unlucky"


def test_every_problem_is_reported_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[alpha]\ncount = 'x'\n[beta]\nport = 'y'\n")
    with pytest.raises(ConfigError) as exc:
        load(Toy, path, env={"HYPHA_ALPHA_ON": "maybe"})
    problems = exc.value.problems
    assert len(problems) == 4, problems
    assert [p.split(": ")[1] for p in problems] == [
        "alpha.count",
        "beta.port",
        "alpha.on",
        "beta.secret",
    ]


# ------------------------------------------------------------------------------------------------
# schema mistakes are programming errors (TypeError), found when the schema is first used


def _role(section_cls: type) -> type:
    return dataclasses.make_dataclass("Role", [("s", section_cls, section(section_cls, "s"))])


def test_schema_mistakes_are_type_errors() -> None:
    with pytest.raises(TypeError, match="help text"):
        setting(1, " ")
    with pytest.raises(TypeError, match="flag alias"):
        setting(1, "x", flag="-x")

    bad_type = dataclasses.make_dataclass("S1", [("x", tuple, setting((), "x"))], frozen=True)
    with pytest.raises(TypeError, match="unsupported setting type"):
        load(_role(bad_type), None, env={})
    bad_default = dataclasses.make_dataclass("S2", [("x", int, setting("1", "x"))], frozen=True)
    with pytest.raises(TypeError, match="default '1' is not an integer"):
        load(_role(bad_default), None, env={})
    plain = dataclasses.make_dataclass("S3", [("x", int, dataclasses.field(default=1))])
    with pytest.raises(TypeError, match="declare settings with setting"):
        load(_role(plain), None, env={})
    required = dataclasses.make_dataclass("S4", [("x", int, setting(REQUIRED, "x"))], frozen=True)
    assert load(_role(required), None, env={"HYPHA_S_X": "5"}).s.x == 5


def test_sections_need_help() -> None:
    undocumented = dataclasses.make_dataclass("Undocumented", [("x", int, setting(1, "x"))])
    with pytest.raises(TypeError, match="docstring"):
        section(undocumented)
    assert Alpha.__doc__ and "Every supported type" in Alpha.__doc__
