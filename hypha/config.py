"""One config loader shared by every Hypha node role (gateway, scheduler, worker, data node).

A role's configuration is a frozen dataclass of *sections* (declared with :func:`section`); each
section is a frozen dataclass of *settings* (declared with :func:`setting`, which carries the help
text shown in ``--help``, in the commented TOML and in error messages)::

    @dataclass(frozen=True)
    class RelaySection:
        \"\"\"Circuit relay v2 for peers behind NAT.\"\"\"
        enabled: bool = setting(True, "serve circuit relay v2")

    @dataclass(frozen=True)
    class GatewayConfig:
        role: ClassVar[str] = "gateway"
        relay: RelaySection = section(RelaySection)

Values come in four layers, each overriding the one before it::

    built-in defaults  <  TOML file  <  HYPHA_<SECTION>_<KEY> environment  <  command-line flags

* Environment: ``HYPHA_TLS_CERT``, ``HYPHA_NETWORK_LISTEN`` (lists comma-separated, booleans
  1/0/true/false/yes/no, an empty value unsets an optional setting). A ``HYPHA_<SECTION>_*``
  variable that names no key of a section of the schema is an error; other ``HYPHA_*`` variables
  (``HYPHA_SKIP_CUDA`` ...) are not the loader's business and are ignored.
* Flags: ``--<section>-<key>`` with ``_`` written ``-`` (``--tls-cert``), plus an optional alias
  (``setting(..., flag="--listen")``); list flags take several values and may be repeated;
  booleans are ``--relay-enabled`` / ``--no-relay-enabled``.
* Relative paths in the file resolve against the file's directory; from the environment or flags,
  against the working directory; ``~`` is expanded everywhere.

Every bad input raises :class:`ConfigError` naming where the value came from, the key as
``section.key``, what is wrong and what would be valid. A section may define ``validate(self)``
raising :class:`InvalidSetting` (or a plain ``ValueError`` for the section as a whole).

Supported setting types: ``str``, ``int``, ``float``, ``bool``, ``pathlib.Path``, ``list[str]``,
``list[Path]`` and ``X | None`` of those.
"""

# NOTE: setting() and section() return dataclasses.field(...) (ruff cannot see that); the cure is
# extend-immutable-calls = ["hypha.config.setting", "hypha.config.section"] in pyproject.toml.

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import logging
import math
import os
import sys
import textwrap
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePath
from typing import Any, Final, TypeVar, cast

__all__ = [
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

T = TypeVar("T")

#: Every environment variable the loader reads starts with this.
ENV_PREFIX: Final = "HYPHA_"

_META: Final = "hypha.config"
_SCALARS: Final = (str, int, float, bool, Path)
_EXPECTED: Final[dict[type, str]] = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    Path: "a path string",
}
_TRUE: Final = frozenset({"1", "true", "yes"})
_FALSE: Final = frozenset({"0", "false", "no"})
_WIDTH: Final = 100


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


#: ``setting(REQUIRED, ...)``: the setting has no default; loading fails when no layer gives it.
REQUIRED: Final[Any] = _Required()


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` holds one line per problem found."""

    def __init__(self, problems: str | Sequence[str]) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__(self.problems[0] if self.problems else "invalid configuration")

    def __str__(self) -> str:
        if len(self.problems) == 1:
            return self.problems[0]
        lines = "\n".join(f"  - {p}" for p in self.problems)
        return f"{len(self.problems)} problems in the configuration:\n{lines}"


class InvalidSetting(ValueError):
    """Raised by a section's ``validate()`` to blame one key (``key`` may carry an index: ``listen[1]``)."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


# ----------------------------------------------------------------------------------------------
# declaring schemas


@dataclass(frozen=True)
class _Meta:
    help: str
    flag: str | None
    choices: tuple[str, ...] | None
    example: object
    metavar: str | None


def setting(
    default: Any,
    help: str,
    *,
    flag: str | None = None,
    choices: Sequence[str] | None = None,
    example: object = None,
    metavar: str | None = None,
) -> Any:
    """Declare one setting of a section: its default (or ``REQUIRED``) and its help text.

    ``flag`` adds a short alias to the generated ``--<section>-<key>`` flag; ``choices`` restricts
    a string to a fixed set; ``example`` is shown in the rendered TOML when there is no default;
    ``metavar`` names the value in ``--help``.
    """
    if not help.strip():
        raise TypeError("setting(): help text must not be empty; it is what users read")
    if flag is not None and (not flag.startswith("--") or len(flag) < 3):
        raise TypeError(f"setting(): flag alias must look like '--name', got {flag!r}")
    meta = {_META: _Meta(help.strip(), flag, tuple(choices) if choices else None, example, metavar)}
    # NOTE: kw_only on every field lets a required setting follow one with a default.
    if default is REQUIRED:
        return dataclasses.field(metadata=meta, kw_only=True)
    if isinstance(default, list):
        items = list(default)
        return dataclasses.field(default_factory=lambda: list(items), metadata=meta, kw_only=True)
    return dataclasses.field(default=default, metadata=meta, kw_only=True)


def section(cls: type, help: str | None = None) -> Any:
    """Declare one section of a role config; ``help`` defaults to the section class's docstring."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"section(): {cls!r} is not a dataclass")
    text = help if help is not None else _docstring(cls)
    if not text:
        raise TypeError(f"section(): give {cls.__name__} a docstring or pass help=")
    meta = {_META: text}
    if all(_default_of(f) is not REQUIRED for f in dataclasses.fields(cls)):
        return dataclasses.field(default_factory=cls, metadata=meta, kw_only=True)
    return dataclasses.field(metadata=meta, kw_only=True)


def _docstring(cls: type) -> str:
    doc = cls.__doc__ or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclass() writes when there is none
        return ""
    return " ".join(textwrap.dedent(doc).strip().split("\n\n")[0].split())


def _default_of(f: dataclasses.Field[Any]) -> object:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return REQUIRED


@dataclass(frozen=True)
class _Setting:
    section: str
    key: str
    base: type  # one of _SCALARS; the item type for lists
    is_list: bool
    optional: bool
    default: object  # REQUIRED when there is none
    help: str
    alias: str | None
    choices: tuple[str, ...] | None
    example: object
    metavar: str | None

    @property
    def dotted(self) -> str:
        return f"{self.section}.{self.key}"

    @property
    def env(self) -> str:
        return f"{ENV_PREFIX}{self.section.upper()}_{self.key.upper()}"

    @property
    def flag(self) -> str:
        return f"--{self.section}-{self.key}".replace("_", "-")

    @property
    def flags(self) -> list[str]:
        return [self.flag] + ([self.alias] if self.alias else [])

    @property
    def expected(self) -> str:
        if self.choices:
            return "one of " + ", ".join(self.choices)
        if self.is_list:
            return f"a list of {_EXPECTED[self.base][2:]}s"
        return _EXPECTED[self.base]


@dataclass(frozen=True)
class _Section:
    name: str
    cls: type
    help: str
    settings: dict[str, _Setting]


@dataclass(frozen=True)
class _Schema:
    cls: type
    role: str
    doc: str
    sections: dict[str, _Section]

    def settings(self) -> Iterable[_Setting]:
        for sec in self.sections.values():
            yield from sec.settings.values()

    def lookup(self, dotted: str) -> _Setting | None:
        name, _, key = dotted.partition(".")
        sec = self.sections.get(name)
        return sec.settings.get(key) if sec else None


_SCHEMAS: dict[type, _Schema] = {}


def _describe(schema: type) -> _Schema:
    """Read (once) the sections and settings of a role config; schema mistakes are TypeErrors."""
    if schema not in _SCHEMAS:
        _SCHEMAS[schema] = _read_schema(schema)
    return _SCHEMAS[schema]


def _read_schema(schema: type) -> _Schema:
    if not dataclasses.is_dataclass(schema):
        raise TypeError(f"{schema!r} is not a dataclass of sections")
    hints = typing.get_type_hints(schema)
    sections: dict[str, _Section] = {}
    for f in dataclasses.fields(schema):
        cls = hints[f.name]
        help_text = f.metadata.get(_META)
        if not isinstance(cls, type) or not dataclasses.is_dataclass(cls):
            raise TypeError(f"{schema.__name__}.{f.name}: a section must be a dataclass type")
        if not isinstance(help_text, str):
            raise TypeError(f"{schema.__name__}.{f.name}: declare sections with section(...)")
        sections[f.name] = _Section(f.name, cls, help_text, _describe_section(f.name, cls))
    seen: dict[str, str] = {}  # env names and flags must be unambiguous
    for sec in sections.values():
        for s in sec.settings.values():
            for name in (s.env, *s.flags):
                if name in seen:
                    raise TypeError(
                        f"{schema.__name__}: {s.dotted} and {seen[name]} both map to {name}"
                    )
                seen[name] = s.dotted
    role = getattr(schema, "role", None) or schema.__name__.lower()
    return _Schema(schema, role, _docstring(schema), sections)


def _describe_section(name: str, cls: type) -> dict[str, _Setting]:
    hints = typing.get_type_hints(cls)
    out: dict[str, _Setting] = {}
    for f in dataclasses.fields(cls):
        where = f"{cls.__name__}.{f.name}"
        meta = f.metadata.get(_META)
        if not isinstance(meta, _Meta):
            raise TypeError(f"{where}: declare settings with setting(default, help)")
        base, is_list, optional = _parse_type(hints[f.name], where)
        s = _Setting(
            section=name,
            key=f.name,
            base=base,
            is_list=is_list,
            optional=optional,
            default=_default_of(f),
            help=meta.help,
            alias=meta.flag,
            choices=meta.choices,
            example=meta.example,
            metavar=meta.metavar,
        )
        if s.choices and base is not str:
            raise TypeError(f"{where}: choices= only applies to str settings")
        if s.default is not REQUIRED and not _conforms(s, s.default):
            raise TypeError(f"{where}: default {s.default!r} is not {s.expected}")
        out[f.name] = s
    return out


def _parse_type(tp: Any, where: str) -> tuple[type, bool, bool]:
    optional = False
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        rest = [a for a in args if a is not type(None)]
        if len(args) == 2 and len(rest) == 1:
            optional, tp = True, rest[0]
    if typing.get_origin(tp) is list and typing.get_args(tp) in ((str,), (Path,)):
        return typing.get_args(tp)[0], True, optional
    if tp in _SCALARS:
        return tp, False, optional
    raise TypeError(
        f"{where}: unsupported setting type {tp!r}; use str, int, float, bool, Path, list[str], "
        "list[Path], or one of those | None"
    )


def _conforms(s: _Setting, value: object) -> bool:
    if value is None:
        return s.optional
    if s.is_list:
        return isinstance(value, list) and all(_conforms_scalar(s, v) for v in value)
    return _conforms_scalar(s, value)


def _conforms_scalar(s: _Setting, value: object) -> bool:
    if s.base is float:
        ok = isinstance(value, float)
    elif s.base is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, s.base)
    return ok and (not s.choices or value in s.choices)


# ----------------------------------------------------------------------------------------------
# converting raw values


class _Bad(Exception):
    """A raw value that does not fit its setting; ``index`` is set for a bad list item."""

    def __init__(self, message: str, index: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.index = index


def _got(value: object) -> str:
    if isinstance(value, dict):
        return "got a table"
    return f"got {value!r} ({type(value).__name__})"


def _resolve(path: Path, base: Path | None) -> Path:
    path = path.expanduser()
    return path if base is None or path.is_absolute() else base / path


def _convert(s: _Setting, value: object, base: Path | None, *, text: bool) -> object:
    """``value`` as ``s`` wants it; with ``text``, strings are parsed the way env values are."""
    if s.optional and (value is None or value == ""):
        return None
    if s.is_list:
        if text and isinstance(value, str):
            items: list[object] = [v.strip() for v in value.split(",") if v.strip()]
        elif isinstance(value, list | tuple):
            items = list(value)
        else:
            example = '["a", "b"]' if s.base is str else '["a.pem", "b.pem"]'
            raise _Bad(f"expected {s.expected} (for example {example}), {_got(value)}")
        out = []
        for i, item in enumerate(items):
            try:
                out.append(_convert_scalar(s, item, base, text=text))
            except _Bad as exc:
                raise _Bad(exc.message, index=i) from None
        return out
    return _convert_scalar(s, value, base, text=text)


def _convert_scalar(s: _Setting, value: object, base: Path | None, *, text: bool) -> object:
    t = s.base
    out: object
    if isinstance(value, str) and (t is Path or (text and t is not str)):
        raw = value.strip()
        if t is Path:
            if not value:
                raise _Bad("expected a path, got an empty string")
            out = _resolve(Path(value), base)
        elif t is bool:
            if raw.lower() not in _TRUE | _FALSE:
                raise _Bad(f"expected one of 1/0/true/false/yes/no, got {value!r}")
            out = raw.lower() in _TRUE
        else:
            try:
                out = int(raw) if t is int else float(raw)
            except ValueError:
                raise _Bad(f"expected {_EXPECTED[t]}, got {value!r}") from None
    elif t is Path and isinstance(value, PurePath):
        if not str(value):
            raise _Bad("expected a path, got an empty path")
        out = _resolve(Path(value), base)
    elif isinstance(value, bool):  # bool is an int in Python, but not a number in a config
        if t is not bool:
            raise _Bad(f"expected {_EXPECTED[t]}, {_got(value)}")
        out = value
    elif t is float and isinstance(value, int | float):
        out = float(value)
    elif (t is int and isinstance(value, int)) or (t is str and isinstance(value, str)):
        out = value
    else:
        raise _Bad(f"expected {_EXPECTED[t]}, {_got(value)}")
    if s.choices and out not in s.choices:
        raise _Bad(f"expected {s.expected}, got {out!r}{_did_you_mean(str(out), s.choices)}")
    return out


def _did_you_mean(word: str, options: Iterable[str], fmt: str = "{}") -> str:
    by_lower = {o.lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=0.6)
    return f" (did you mean {fmt.format(by_lower[close[0]])}?)" if close else ""


# ----------------------------------------------------------------------------------------------
# loading


def load(
    schema: type[T],
    path: Path | str | None,
    *,
    env: Mapping[str, str] = os.environ,
    overrides: Mapping[str, object] = types.MappingProxyType({}),
) -> T:
    """Build ``schema`` from defaults < the TOML file at ``path`` < ``env`` < ``overrides``.

    ``overrides`` maps ``"section.key"`` to a value, typically from :func:`overrides_from_args`;
    strings there are parsed like environment values, ``None`` means "not given". Raises
    :class:`ConfigError` listing every problem found.
    """
    spec = _describe(schema)
    found = _Found()
    if path is not None:
        _read_file(spec, Path(path), found)
    _read_env(spec, env, found)
    _read_overrides(spec, overrides, found)
    sections: dict[str, object] = {}
    for sec in spec.sections.values():
        kwargs: dict[str, object] = {}
        complete = True
        for s in sec.settings.values():
            if s.dotted in found.bad:
                complete = False
            elif s.dotted in found.values:
                kwargs[s.key] = found.values[s.dotted][0]
            elif s.default is REQUIRED:
                found.error(_missing(s, path))
                complete = False
        if not complete:  # validate() sees whole sections only
            continue
        obj = sec.cls(**kwargs)
        _validate(sec, obj, found)
        sections[sec.name] = obj
    if found.problems:
        raise ConfigError(found.problems)
    return cast(Callable[..., T], schema)(**sections)


@dataclass
class _Found:
    values: dict[str, tuple[object, str]] = dataclasses.field(default_factory=dict)
    bad: set[str] = dataclasses.field(default_factory=set)
    problems: list[str] = dataclasses.field(default_factory=list)

    def error(self, message: str, dotted: str | None = None) -> None:
        self.problems.append(message)
        if dotted:
            self.bad.add(dotted)

    def take(self, s: _Setting, raw: object, base: Path | None, source: str, *, text: bool) -> None:
        try:
            self.values[s.dotted] = (_convert(s, raw, base, text=text), source)
        except _Bad as exc:
            key = s.dotted if exc.index is None else f"{s.dotted}[{exc.index}]"
            self.error(f"{source}: {key}: {exc.message}", s.dotted)


def _read_file(spec: _Schema, path: Path, found: _Found) -> None:
    label = str(path)
    try:
        text = path.expanduser().read_bytes().decode("utf-8")
    except FileNotFoundError:
        found.error(
            f"{label}: config file not found (write one with "
            f"`python -m hypha.{spec.role} init --config {label}`)"
        )
        return
    except OSError as exc:
        found.error(f"{label}: cannot read the config file: {exc.strerror or exc}")
        return
    except UnicodeDecodeError as exc:
        found.error(f"{label}: not UTF-8 text (bad byte at offset {exc.start})")
        return
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        found.error(f"{label}: invalid TOML: {exc}")
        return
    base = path.expanduser().absolute().parent
    valid = ", ".join(f"[{n}]" for n in spec.sections)
    for name, table in doc.items():
        sec = spec.sections.get(name)
        if sec is None and not isinstance(table, dict):
            owners = [s.name for s in spec.sections.values() if name in s.settings]
            hint = f" (did you mean to put it under [{owners[0]}]?)" if owners else ""
            found.error(
                f"{label}: key '{name}' is outside any section{hint}; keys belong in {valid}"
            )
        elif sec is None:
            dym = _did_you_mean(name, spec.sections, "[{}]")
            found.error(f"{label}: unknown section [{name}]{dym}; valid sections: {valid}")
        elif not isinstance(table, dict):
            found.error(f"{label}: {name}: expected a [{name}] section, {_got(table)}")
        else:
            for key, raw in table.items():
                s = sec.settings.get(key)
                if s is None:
                    found.error(
                        f"{label}: unknown key {name}.{key}{_did_you_mean(key, sec.settings)}; "
                        f"valid keys in [{name}]: {', '.join(sec.settings)}"
                    )
                else:
                    found.take(s, raw, base, label, text=False)


def _read_env(spec: _Schema, env: Mapping[str, str], found: _Found) -> None:
    cwd = Path.cwd()
    for name in sorted(env):
        if not name.startswith(ENV_PREFIX):
            continue
        rest = name[len(ENV_PREFIX) :]
        # The longest section name that prefixes the rest: only these variables are ours.
        owners = [
            sec
            for sec in spec.sections.values()
            if rest == sec.name.upper() or rest.startswith(sec.name.upper() + "_")
        ]
        if not owners:
            continue
        sec = max(owners, key=lambda o: len(o.name))
        by_env = {s.env: s for s in sec.settings.values()}
        s = by_env.get(name)
        source = f"environment variable {name}"
        if s is None:
            found.error(
                f"{source}: names no setting of [{sec.name}]{_did_you_mean(name, by_env)}; "
                f"valid: {', '.join(by_env)}"
            )
        else:
            found.take(s, env[name], cwd, source, text=True)


def _read_overrides(spec: _Schema, overrides: Mapping[str, object], found: _Found) -> None:
    cwd = Path.cwd()
    for dotted, raw in overrides.items():
        s = spec.lookup(dotted)
        if s is None:
            dym = _did_you_mean(dotted, [x.dotted for x in spec.settings()])
            found.error(f"override {dotted!r}: no such setting{dym}")
        elif raw is not None:
            found.take(s, raw, cwd, f"flag {s.flag}", text=True)


def _missing(s: _Setting, path: Path | str | None) -> str:
    where = f"{path}: " if path is not None else ""
    file = f"in the [{s.section}] section of {path}" if path is not None else "in a config file"
    return (
        f"{where}{s.dotted}: required value missing ({s.help}); set {s.key} = ... {file}, "
        f"the environment variable {s.env}, or the flag {s.flag}"
    )


def _validate(sec: _Section, obj: object, found: _Found) -> None:
    validate = getattr(obj, "validate", None)
    if not callable(validate):
        return
    try:
        validate()
    except InvalidSetting as exc:
        dotted = f"{sec.name}.{exc.key}"
        _, source = found.values.get(dotted.split("[")[0], (None, "built-in default"))
        found.error(f"{source}: {dotted}: {exc.message}")
    except ValueError as exc:
        found.error(f"[{sec.name}]: {exc}")


# ----------------------------------------------------------------------------------------------
# command-line flags


def add_arguments(parser: argparse.ArgumentParser, schema: type) -> None:
    """One flag per setting of ``schema`` (``--<section>-<key>``), grouped by section.

    Flags default to absent, so only flags actually given override the file and environment.
    """
    spec = _describe(schema)
    for sec in spec.sections.values():
        group = parser.add_argument_group(f"[{sec.name}]", sec.help)
        for s in sec.settings.values():
            help_text = f"{s.help} ({_describe_default(s)}; env {s.env})".replace("%", "%%")
            kw: dict[str, Any] = {"dest": s.dotted, "default": argparse.SUPPRESS, "help": help_text}
            if s.base is bool:
                group.add_argument(*s.flags, action=argparse.BooleanOptionalAction, **kw)
            elif s.is_list:
                # NOTE: nargs="*" (not "+") so that a bare `--network-bootstrap` empties a list.
                group.add_argument(*s.flags, action="extend", nargs="*", metavar=_metavar(s), **kw)
            else:
                group.add_argument(*s.flags, metavar=_metavar(s), **kw)


def overrides_from_args(namespace: argparse.Namespace, schema: type) -> dict[str, object]:
    """The flags of ``schema`` that were given on the command line, as ``{"section.key": value}``."""
    out: dict[str, object] = {}
    for s in _describe(schema).settings():
        value = getattr(namespace, s.dotted, None)
        if value is not None:
            out[s.dotted] = value
    return out


def _metavar(s: _Setting) -> str:
    if s.metavar:
        return s.metavar
    if s.choices:
        return "{" + ",".join(s.choices) + "}"
    return {str: "TEXT", int: "INT", float: "NUMBER", Path: "PATH"}[s.base]


def _describe_default(s: _Setting) -> str:
    if s.default is REQUIRED:
        return "required"
    if s.default is None:
        return "default: unset"
    if isinstance(s.default, list):
        return "default: " + (" ".join(str(v) for v in s.default) if s.default else "none")
    if isinstance(s.default, bool):
        return f"default: {str(s.default).lower()}"
    return f"default: {s.default}"


# ----------------------------------------------------------------------------------------------
# writing TOML


def render(schema: type[T], values: T | None = None) -> str:
    """A commented TOML document for ``schema`` holding ``values`` (default: the defaults).

    Loading it back gives the same values (required settings without a value are written as
    commented-out examples and must then come from the environment or flags).
    """
    spec = _describe(schema)
    program = f"python -m hypha.{spec.role}"
    out = [f"# Hypha {spec.role} configuration.", "#"]
    if spec.doc:
        out += [*_comment(spec.doc), "#"]
    out += [
        "# Precedence, lowest to highest:",
        "#   built-in defaults < this file < environment variables < command-line flags",
    ]
    out += _comment(
        "A commented-out key keeps its default; a required one must then be given in the "
        "environment or on the command line."
    )
    out.append("#")
    out += _comment(
        "The environment variable for a key is HYPHA_<SECTION>_<KEY> in upper case (e.g. "
        "HYPHA_TLS_CERT); lists are comma-separated there and booleans accept 1/0/true/false/"
        f"yes/no. The flag is --<section>-<key> (e.g. --tls-cert); see `{program} run --help`."
    )
    out.append("#")
    out += _comment("Relative paths in this file are relative to the directory that holds it.")
    for sec in spec.sections.values():
        current = getattr(values, sec.name) if values is not None else None
        out += ["", "", *_comment(sec.help), f"[{sec.name}]"]
        for s in sec.settings.values():
            value = getattr(current, s.key) if current is not None else s.default
            notes = []
            if s.default is REQUIRED:
                notes.append("Required.")
            elif s.optional:
                notes.append('Optional; "" or leaving it out means unset.')
            if s.choices:
                notes.append("One of: " + ", ".join(s.choices) + ".")
            out += ["", *_comment(" ".join([_sentence(s.help), *notes]))]
            out.append(f"# env {s.env}, flag {' / '.join(s.flags)}")
            if value is None and s.default is not None:
                out.append(f'{s.key} = ""')  # unset, where the default is not
            elif value is REQUIRED or value is None:
                example = s.example if s.example is not None else _placeholder(s)
                out.append(f"# {s.key} = {_toml(example)}")
            elif values is None and _relative_path_in(value):
                # NOTE: written in the file, a relative default would become relative to the
                # file's directory; commented out, it keeps its meaning (the working directory).
                out.append(f"# {s.key} = {_toml(value)}  # default, relative to the working dir")
            else:
                out.append(f"{s.key} = {_toml(value)}")
    return "\n".join(out) + "\n"


def write_config(path: Path | str, text: str, force: bool = False) -> None:
    """Write a rendered config to ``path``; refuses to replace an existing file unless ``force``."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a directory; give the config a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w" if force else "x", encoding="utf-8") as f:
            f.write(text)
    except FileExistsError:
        raise ConfigError(
            f"{path}: already exists; not overwriting it (pass --force to replace it)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot write the config: {exc.strerror or exc}") from None


def _sentence(text: str) -> str:
    text = text[0].upper() + text[1:]
    return text if text.endswith((".", "!", "?")) else text + "."


def _comment(text: str) -> list[str]:
    lines = textwrap.wrap(
        text, _WIDTH, initial_indent="# ", subsequent_indent="# ", break_on_hyphens=False
    )
    return lines or ["#"]


def _placeholder(s: _Setting) -> object:
    if s.choices:
        return s.choices[0]
    scalar = {str: "...", int: 0, float: 0.0, bool: False, Path: "/path/to/file"}[s.base]
    return [scalar] if s.is_list else scalar


def _relative_path_in(value: object) -> bool:
    items = value if isinstance(value, list) else [value]
    return any(isinstance(v, PurePath) and not v.is_absolute() for v in items)


_ESCAPES: Final = {
    '"': '\\"',
    "\\": "\\\\",
    "\b": "\\b",
    "\t": "\\t",
    "\n": "\\n",
    "\f": "\\f",
    "\r": "\\r",
}


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return repr(value)  # repr gives 'inf', '-inf', '1e-05', '3600.0': all valid TOML
    if isinstance(value, PurePath):
        value = str(value)
    if isinstance(value, str):
        chars = (
            _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c)
            for c in value
        )
        return '"' + "".join(chars) + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} ({type(value).__name__}) as TOML")


# ----------------------------------------------------------------------------------------------
# the sections every role shares

_ADDR_EXAMPLE: Final = "/ip4/203.0.113.7/tcp/4001"
_PEER_EXAMPLE: Final = "/ip4/203.0.113.7/tcp/4001/p2p/12D3KooW..."


def _check_multiaddrs(key: str, entries: Sequence[str], *, peer: bool = False) -> None:
    from multiaddr import Multiaddr
    from multiaddr.exceptions import Error as MultiaddrError

    example = _PEER_EXAMPLE if peer else _ADDR_EXAMPLE
    for i, text in enumerate(entries):
        try:
            protocols = [p.name for p in Multiaddr(text).protocols()]
        except (ValueError, MultiaddrError) as exc:
            raise InvalidSetting(
                f"{key}[{i}]", f"invalid multiaddr {text!r} ({exc}); expected e.g. {example}"
            ) from None
        if not protocols:
            raise InvalidSetting(
                f"{key}[{i}]", f"empty multiaddr {text!r}; expected e.g. {example}"
            )
        if peer and protocols[-1] != "p2p":
            raise InvalidSetting(
                f"{key}[{i}]",
                f"{text!r} does not end in /p2p/<peer id>; a bootstrap address names the "
                f"gateway's peer id, e.g. {_PEER_EXAMPLE}",
            )


@dataclass(frozen=True)
class NetworkSection:
    """libp2p addresses: where this node listens, what it advertises, and whom it dials first."""

    listen: list[str] = setting(
        ["/ip4/0.0.0.0/tcp/0"], "multiaddrs to listen on", flag="--listen", metavar="MULTIADDR"
    )
    external: list[str] = setting(
        [],
        "multiaddrs to advertise to peers instead of the listen ones (e.g. behind NAT)",
        metavar="MULTIADDR",
    )
    bootstrap: list[str] = setting(
        [],
        "multiaddrs of gateways to join the network through, each ending in /p2p/<peer id>",
        metavar="MULTIADDR",
    )

    def validate(self) -> None:
        _check_multiaddrs("listen", self.listen)
        _check_multiaddrs("external", self.external)
        _check_multiaddrs("bootstrap", self.bootstrap, peer=True)


@dataclass(frozen=True)
class TLSSection:
    """Mutual TLS: this node's CA-signed Ed25519 certificate, and whom it trusts.

    The files need not exist when the config is loaded; the node checks them when it starts.
    """

    cert: Path = setting(
        REQUIRED,
        "PEM file: this node's certificate followed by its issuing chain",
        example="node.cert.pem",
    )
    key: Path = setting(
        REQUIRED, "PEM file: this node's PKCS#8 Ed25519 private key", example="node.key.pem"
    )
    trust: Path = setting(
        REQUIRED,
        "PEM bundle of the root CAs whose certificates this node trusts",
        example="trust.pem",
    )
    crl: list[Path] = setting(
        [],
        "PEM certificate revocation lists; when given, every peer's certificate is checked "
        "against them and a peer whose issuer has no CRL here is refused",
    )


LOG_LEVELS: Final = ("debug", "info", "warning", "error")
LOG_FORMATS: Final = ("text", "json")


@dataclass(frozen=True)
class LogSection:
    """Logging to standard error."""

    level: str = setting("info", "least severe level to log", choices=LOG_LEVELS)
    format: str = setting(
        "text", "text for people, json (one object per line) for machines", choices=LOG_FORMATS
    )


@dataclass(frozen=True)
class MetricsSection:
    """Prometheus metrics of this node, served over HTTP at /metrics."""

    port: int | None = setting(
        None, "local TCP port for /metrics; unset: no metrics endpoint", metavar="PORT")
    host: str = setting("127.0.0.1", "address to serve metrics on (keep it local or firewalled)")

    def validate(self) -> None:
        if self.port is not None and not 0 <= self.port <= 65535:
            raise InvalidSetting("port", f"must be 0 (any free port) .. 65535, got {self.port}")


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


_HANDLER_NAME: Final = "hypha"  # marks the handler configure_logging installed


def configure_logging(log: LogSection, stream: typing.TextIO | None = None) -> None:
    """Send the root logger to ``stream`` (default stderr) at ``log.level`` in ``log.format``."""
    # NOTE: lives here until there is a telemetry library; every role calls it after load().
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.set_name(_HANDLER_NAME)
    if log.format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == _HANDLER_NAME]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(log.level.upper())
