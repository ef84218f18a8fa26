"""A small declarative schema for control-plane messages, and their msgpack encoding.

A message is a frozen, keyword-only dataclass whose field types carry their constraints::

    class Resources(Message):
        \"\"\"What a job asks for or a worker offers.\"\"\"
        cpu: Annotated[float, Range(ge=0)] = 0.0
        memory: Annotated[int, Range(ge=0)] = 0

    class DispatchJob(Message, max_size=1 << 20):     # the encoded size limit (default 64 KiB)
        ...

Field types and their constraints:

* ``str`` with ``Text(max_len, min_len=0, pattern=None, hint=None)`` (required: every string has
  a limit); the pattern must match the whole string.
* ``int`` with an optional ``Range(ge=, gt=, le=, lt=)``; always within a signed 64-bit integer.
  ``bool`` is not accepted where an ``int`` is expected (it is an ``int`` subclass in Python).
* ``float`` with an optional ``Range``; always finite (NaN and ±inf are refused). An ``int`` is
  accepted and stored as a float.
* ``bool``; ``Literal["a", "b"]`` (a string enum); another ``Message`` (nested).
* ``Sequence[T]`` with ``MaxItems(n)`` (required), stored as a tuple.
* ``Mapping[Annotated[str, Text(...)], V]`` with ``MaxItems(n)`` (required), stored read-only.
* ``T | None``; unions of the scalars (``Annotated[str, Text(4096)] | int | float | bool``), told
  apart by the value's type.

Constraints are checked when a message is constructed and when it is decoded; a violation raises
:class:`MessageError` naming the message type, the field path (``resources.memory``,
``executors[2].name``, ``values['loss']``), what was wrong and what is allowed. A subclass may
add cross-field rules in ``_validate(self)``, raising ``self._error(field, problem)``.

Wire form: one msgpack map ``{"v": 1, <field>: <value>, ...}`` holding every field in
declaration order (``None`` as nil; defaults are a convenience of the constructor, never of the
wire); a nested message is a map of its fields without ``"v"``. Decoding accepts exactly that,
and bounds its work before the schema check: the input is capped at the type's ``MAX_SIZE``
before it is parsed; msgpack's ``max_*_len`` limits and the number of maps and lists the parser
may build come from the schema (with slack; no binary or extension types at all); map keys must
be unique strings. The schema bounds the nesting: it cannot refer to itself (a field's type must
exist before the class that uses it), and the check only descends where it has a nested
message, list or map. Any malformed input raises :class:`MessageError`, never anything else.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Final, Literal, NoReturn, TypeVar, dataclass_transform

import msgpack

__all__ = [
    "DEFAULT_MAX_SIZE",
    "SCHEMA_VERSION",
    "MaxItems",
    "Message",
    "MessageError",
    "Range",
    "Text",
    "decode",
    "encode",
]

#: The ``"v"`` every encoded message carries; decoding refuses any other.
SCHEMA_VERSION: Final = 1
#: A message type's encoded size limit unless it declares its own (``max_size=``).
DEFAULT_MAX_SIZE: Final = 64 << 10

_INT64_MIN: Final = -(1 << 63)
_INT64_MAX: Final = (1 << 63) - 1
_VERSION_KEY: Final = "v"
_SHORT: Final = 40  # characters of a bad string quoted in an error

M = TypeVar("M", bound="Message")


class MessageError(ValueError):
    """A message that breaks its schema, built in code or decoded from bytes.

    ``message_type`` is the class name, ``path`` the field (``resources.memory``; empty for the
    message as a whole), ``problem`` what was wrong and what is allowed.
    """

    def __init__(self, message_type: str, path: str, problem: str) -> None:
        self.message_type = message_type
        self.path = path
        self.problem = problem
        where = f"{message_type}: {path}" if path else message_type
        super().__init__(f"{where}: {problem}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.message_type, self.path, self.problem))


# ----------------------------------------------------------------------------------------------
# constraints, written in Annotated[...] field types


@dataclass(frozen=True)
class Text:
    """A string's length in characters and, optionally, a pattern it must match in full.

    ``hint`` replaces the generated description of what is allowed in error messages
    (``"a peer id: 20-128 base58 characters"``).
    """

    max_len: int
    min_len: int = 0
    pattern: str | None = None
    hint: str | None = None


@dataclass(frozen=True)
class Range:
    """Bounds of an int or float field: ``ge``/``gt`` below, ``le``/``lt`` above."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


@dataclass(frozen=True)
class MaxItems:
    """The most items a list or map field may hold."""

    n: int


# ----------------------------------------------------------------------------------------------
# field specs: what a field type compiles to


class _Invalid(Exception):
    """One broken constraint, raised below the message being checked; becomes MessageError."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(path, problem)
        self.path = path
        self.problem = problem


def _fail(path: str, got: str, allowed: str) -> NoReturn:
    raise _Invalid(path, f"got {got}; allowed: {allowed}")


def _short(value: object) -> str:
    """A bounded rendering of a scalar for error messages."""
    if isinstance(value, str) and len(value) > _SHORT:
        return f"{value[:_SHORT]!r}... ({len(value)} characters)"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    return repr(value)


def _kind(value: object) -> str:
    """What a value of the wrong type is, for error messages (never renders a container)."""
    if value is None:
        return "None"
    if isinstance(value, bool):
        return f"a bool ({value})"
    if isinstance(value, int):
        return f"an integer ({_short(value)})"
    if isinstance(value, float):
        return f"a float ({value!r})"
    if isinstance(value, str):
        return f"a string ({_short(value)})"
    if isinstance(value, bytes | bytearray | memoryview):
        return f"binary data ({len(value)} bytes)"
    if isinstance(value, list | tuple):
        return f"a list of {len(value)} item{'' if len(value) == 1 else 's'}"
    if isinstance(value, Mapping):
        return f"a map of {len(value)} entr{'y' if len(value) == 1 else 'ies'}"
    return _a(type(value).__name__)


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _join(path: str, name: str) -> str:
    return f"{path}.{name}" if path else name


class _Spec(ABC):
    """Checks and normalises one field's value; ``wire`` is True for decoded msgpack values."""

    allowed: str

    @abstractmethod
    def convert(self, value: Any, path: str, wire: bool) -> Any:
        """The checked value (normalised), or a MessageError naming ``path``."""

    def plain(self, value: Any) -> Any:
        """The value as msgpack packs it."""
        return value

    def children(self) -> Iterator[_Spec]:
        return iter(())


@dataclass(frozen=True)
class _Str(_Spec):
    text: Text
    regex: re.Pattern[str] | None
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if not isinstance(value, str):
            _fail(path, _kind(value), self.allowed)
        value = str(value)
        if not self.text.min_len <= len(value) <= self.text.max_len or (
                self.regex is not None and not self.regex.fullmatch(value)):
            _fail(path, _short(value), self.allowed)
        if not value.isascii():
            try:
                value.encode()
            except UnicodeEncodeError:
                _fail(path, "a string that is not valid Unicode (a lone surrogate)", self.allowed)
        return value


@dataclass(frozen=True)
class _Int(_Spec):
    lo: int
    hi: int
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(path, _kind(value), self.allowed)
        if not self.lo <= value <= self.hi:
            _fail(path, _short(value), self.allowed)
        return int(value)


@dataclass(frozen=True)
class _Float(_Spec):
    bounds: Range
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | float):
            _fail(path, _kind(value), self.allowed)
        try:
            number = float(value)
        except OverflowError:
            _fail(path, _short(value), self.allowed)
        b = self.bounds
        if not math.isfinite(number) or (
                (b.ge is not None and not number >= b.ge) or (b.gt is not None and not number > b.gt)
                or (b.le is not None and not number <= b.le)
                or (b.lt is not None and not number < b.lt)):
            _fail(path, _short(number), self.allowed)
        return number


@dataclass(frozen=True)
class _Bool(_Spec):
    allowed: str = "a bool (true or false)"

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if not isinstance(value, bool):
            _fail(path, _kind(value), self.allowed)
        return value


@dataclass(frozen=True)
class _Choice(_Spec):
    choices: tuple[str, ...]
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if not isinstance(value, str):
            _fail(path, _kind(value), self.allowed)
        if value not in self.choices:
            _fail(path, _short(value), self.allowed)
        return str(value)


@dataclass(frozen=True)
class _Nested(_Spec):
    cls: type[Message]
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if wire:
            if not isinstance(value, dict):
                _fail(path, _kind(value), self.allowed)
            return _from_map(self.cls, value, path)
        if not isinstance(value, self.cls):
            _fail(path, _kind(value), self.allowed)
        return value  # checked when it was built

    def plain(self, value: Any) -> Any:
        return _to_map(value)

    def children(self) -> Iterator[_Spec]:
        return iter(_SCHEMAS[self.cls].fields.values())


@dataclass(frozen=True)
class _List(_Spec):
    item: _Spec
    max_items: int
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if not isinstance(value, list if wire else list | tuple):
            _fail(path, _kind(value), self.allowed)
        if len(value) > self.max_items:
            _fail(path, f"{len(value)} items", self.allowed)
        return tuple(self.item.convert(v, f"{path}[{i}]", wire) for i, v in enumerate(value))

    def plain(self, value: Any) -> Any:
        return [self.item.plain(v) for v in value]

    def children(self) -> Iterator[_Spec]:
        yield self.item


@dataclass(frozen=True)
class _Map(_Spec):
    key: _Str
    value: _Spec
    max_items: int
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        if not isinstance(value, dict if wire else Mapping):
            _fail(path, _kind(value), self.allowed)
        if len(value) > self.max_items:
            _fail(path, f"{len(value)} entries", self.allowed)
        out = {}
        for k, v in value.items():
            try:
                key = self.key.convert(k, path, wire)
            except _Invalid:
                _fail(path, f"the key {_short(k) if isinstance(k, str) else _kind(k)}",
                      f"keys that are {self.key.allowed}")
            out[key] = self.value.convert(v, f"{path}[{key!r}]", wire)
        return types.MappingProxyType(out)

    def plain(self, value: Any) -> Any:
        return {k: self.value.plain(v) for k, v in value.items()}

    def children(self) -> Iterator[_Spec]:
        yield self.key
        yield self.value


@dataclass(frozen=True)
class _Optional(_Spec):
    inner: _Spec
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        return None if value is None else self.inner.convert(value, path, wire)

    def plain(self, value: Any) -> Any:
        return None if value is None else self.inner.plain(value)

    def children(self) -> Iterator[_Spec]:
        yield self.inner


@dataclass(frozen=True)
class _Scalars(_Spec):
    """A union of scalars, told apart by the value's type (an int goes to a float if no int)."""

    options: Mapping[type, _Spec]
    allowed: str

    def convert(self, value: Any, path: str, wire: bool) -> Any:
        spec = None
        for kind in (bool, int, float, str):  # bool before int: it is an int subclass
            if isinstance(value, kind):
                spec = self.options.get(kind)
                if spec is None and kind is int:
                    spec = self.options.get(float)
                break
        if spec is None:
            _fail(path, _kind(value), self.allowed)
        return spec.convert(value, path, wire)

    def children(self) -> Iterator[_Spec]:
        return iter(self.options.values())


# ----------------------------------------------------------------------------------------------
# compiling field types into specs


def _number(bounds: Range, noun: str) -> str:
    parts = [f"{op} {_fmt(x)}" for op, x in ((">=", bounds.ge), (">", bounds.gt),
                                              ("<=", bounds.le), ("<", bounds.lt)) if x is not None]
    return f"{noun} {' and '.join(parts)}" if parts else noun


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(x)


def _text_allowed(text: Text) -> str:
    if text.hint:
        return text.hint
    size = (f"at most {text.max_len}" if text.min_len == 0 else
            f"{text.min_len}-{text.max_len}" if text.min_len < text.max_len else str(text.max_len))
    pattern = f" matching {text.pattern}" if text.pattern else ""
    return f"a string of {size} characters{pattern}"


def _take(markers: list[object], kind: type, where: str, *, required: bool = False) -> Any:
    found = [m for m in markers if isinstance(m, kind)]
    if len(found) > 1 or (required and not found):
        raise TypeError(f"{where}: needs {'exactly' if required else 'at most'} one "
                        f"{kind.__name__}(...) in Annotated[...]")
    for m in found:
        markers.remove(m)
    return found[0] if found else None


def _compile(tp: Any, markers: list[object], where: str) -> _Spec:
    """The spec of one field type; ``markers`` are the Annotated constraints that apply to it."""
    if typing.get_origin(tp) is Annotated:
        base, *extra = typing.get_args(tp)
        return _compile(base, [*markers, *extra], where)
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in args if a is not type(None)]
        if len(options) < len(args):
            inner_type = options[0] if len(options) == 1 else typing.Union[tuple(options)]  # noqa: UP007
            inner = _compile(inner_type, markers, where)
            return _Optional(inner, f"{inner.allowed}, or None")
        specs = [_compile(a, [], where) for a in options]
        by_type: dict[type, _Spec] = {}
        for s in specs:
            kind = {_Str: str, _Int: int, _Float: float, _Bool: bool}.get(type(s))
            if kind is None or kind in by_type:
                raise TypeError(f"{where}: a union may hold only str, int, float and bool, each "
                                "at most once (and None)")
            by_type[kind] = s
        allowed = ", ".join(s.allowed for s in specs[:-1]) + f" or {specs[-1].allowed}"
        spec: _Spec = _Scalars(types.MappingProxyType(by_type), allowed)
    elif tp is str:
        text = _take(markers, Text, where, required=True)
        if text.max_len < max(text.min_len, 1) or text.min_len < 0:
            raise TypeError(f"{where}: Text needs 0 <= min_len <= max_len and max_len >= 1")
        regex = re.compile(text.pattern) if text.pattern is not None else None
        spec = _Str(text, regex, _text_allowed(text))
    elif tp is bool:
        spec = _Bool()
    elif tp is int:
        bounds = _take(markers, Range, where) or Range()
        lo, hi = _INT64_MIN, _INT64_MAX
        if bounds.ge is not None:
            lo = max(lo, math.ceil(bounds.ge))
        if bounds.gt is not None:
            lo = max(lo, math.floor(bounds.gt) + 1)
        if bounds.le is not None:
            hi = min(hi, math.floor(bounds.le))
        if bounds.lt is not None:
            hi = min(hi, math.ceil(bounds.lt) - 1)
        allowed = ("a 64-bit integer" if (lo, hi) == (_INT64_MIN, _INT64_MAX) else
                   f"an integer >= {lo}" if hi == _INT64_MAX else
                   f"an integer <= {hi}" if lo == _INT64_MIN else f"an integer in [{lo}, {hi}]")
        spec = _Int(lo, hi, allowed)
    elif tp is float:
        bounds = _take(markers, Range, where) or Range()
        spec = _Float(bounds, _number(bounds, "a finite number"))
    elif origin is Literal:
        if not args or not all(isinstance(a, str) for a in args):
            raise TypeError(f"{where}: Literal[...] must list strings")
        spec = _Choice(tuple(args), "one of " + ", ".join(repr(a) for a in args))
    elif isinstance(tp, type) and issubclass(tp, Message):
        if tp not in _SCHEMAS:
            raise TypeError(f"{where}: {tp.__name__} is not a finished message class")
        spec = _Nested(tp, _a(tp.__name__))
    elif origin is Sequence:
        limit = _take(markers, MaxItems, where, required=True)
        item = _compile(args[0], [], f"{where}[]")
        spec = _List(item, limit.n, f"a list of at most {limit.n} items")
    elif origin is Mapping:
        limit = _take(markers, MaxItems, where, required=True)
        key = _compile(args[0], [], f"{where} key")
        if not isinstance(key, _Str):
            raise TypeError(f"{where}: map keys must be Annotated[str, Text(...)]")
        value = _compile(args[1], [], f"{where}[]")
        spec = _Map(key, value, limit.n, f"a map of at most {limit.n} entries")
    else:
        raise TypeError(f"{where}: unsupported field type {tp!r} (see hypha.messages._codec)")
    if markers:
        raise TypeError(f"{where}: {markers[0]!r} does not apply to {tp!r}")
    return spec


@dataclass(frozen=True)
class _Schema:
    fields: Mapping[str, _Spec]
    max_size: int
    unpack_limits: Mapping[str, int]  # msgpack's max_*_len
    max_containers: int  # the most maps and lists the parser may build (with slack)


_SCHEMAS: dict[type, _Schema] = {}


# NOTE: the parser's limits are the schema's with slack (twice, at least 16), so that input a
# little over a limit (an unknown field, one item too many) reaches the schema check, whose error
# names the field; the parser's terser errors are for input far beyond. Either way memory stays
# bounded by the size cap and by these limits.
def _slack(n: int) -> int:
    return max(16, 2 * n)


def _unpack_limits(fields: Mapping[str, _Spec]) -> dict[str, int]:
    """msgpack's max_*_len for one message type, from the longest string, list and map it
    allows; no binary or extension types."""
    strings = [len(_VERSION_KEY), *(len(name) for name in fields)]
    arrays = [0]
    maps = [len(fields) + 1]
    todo = list(fields.values())
    while todo:
        spec = todo.pop()
        if isinstance(spec, _Str):
            strings.append(4 * spec.text.max_len)  # UTF-8: at most 4 bytes a character
        elif isinstance(spec, _Choice):
            strings.append(max(len(c.encode()) for c in spec.choices))
        elif isinstance(spec, _Nested):
            fields_of = _SCHEMAS[spec.cls].fields
            strings.extend(len(name) for name in fields_of)
            maps.append(len(fields_of))
        elif isinstance(spec, _List):
            arrays.append(spec.max_items)
        elif isinstance(spec, _Map):
            maps.append(spec.max_items)
        todo.extend(spec.children())
    return {"max_str_len": _slack(max(strings)), "max_bin_len": 0, "max_ext_len": 0,
            "max_array_len": _slack(max(arrays)), "max_map_len": _slack(max(maps))}


def _containers(spec: _Spec) -> int:
    """The most maps and lists a value of ``spec`` can hold, itself included."""
    inner = sum(_containers(child) for child in spec.children())
    if isinstance(spec, _List | _Map):
        return 1 + spec.max_items * inner
    return 1 + inner if isinstance(spec, _Nested) else inner


class _Reader:
    """msgpack hooks for one decode: map keys are unique strings, and no more maps and lists
    are built than the schema can hold (so deep or wide junk stops early, whatever its shape)."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.left = budget

    def _spend(self) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Invalid("", f"got more than {self.budget} maps and lists; allowed: far "
                           "fewer (as many as the schema holds)")

    def on_list(self, items: list[Any]) -> list[Any]:
        self._spend()
        return items

    def on_map(self, pairs: list[tuple[Any, Any]]) -> dict[str, Any]:
        self._spend()
        out: dict[str, Any] = {}
        for key, value in pairs:
            if not isinstance(key, str):
                raise _Invalid("", f"got a map key that is {_kind(key)}; allowed: string keys")
            if key in out:
                raise _Invalid("", f"got the key {_short(key)} twice in one map; allowed: "
                               "unique keys")
            out[key] = value
        return out


# ----------------------------------------------------------------------------------------------
# the base class


@dataclass_transform(kw_only_default=True, frozen_default=True,
                     field_specifiers=(dataclasses.field,))
class Message:
    """Base of every control-plane message: subclasses become frozen keyword-only dataclasses.

    ``class X(Message, max_size=...)`` sets ``X.MAX_SIZE``, the most bytes its encoding may take
    (the protocol's ``max_request`` or ``max_response``).
    """

    MAX_SIZE: ClassVar[int] = DEFAULT_MAX_SIZE

    def __init_subclass__(cls, *, max_size: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if max_size is not None:
            if not 0 < max_size <= 0xFFFFFFFF:  # what a hypha.net.Protocol allows
                raise TypeError(f"{cls.__name__}: max_size must be 1 .. 4 GiB - 1 bytes")
            cls.MAX_SIZE = max_size
        dataclasses.dataclass(frozen=True, kw_only=True)(cls)
        hints = typing.get_type_hints(cls, include_extras=True)
        fields: dict[str, _Spec] = {}
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            if f.name == _VERSION_KEY:
                raise TypeError(f"{cls.__name__}: the field name {_VERSION_KEY!r} is reserved "
                                "for the schema version")
            fields[f.name] = _compile(hints[f.name], [], f"{cls.__name__}.{f.name}")
        _SCHEMAS[cls] = _Schema(types.MappingProxyType(fields), cls.MAX_SIZE,
                                _unpack_limits(fields),
                                _slack(1 + sum(_containers(s) for s in fields.values())))

    def __post_init__(self) -> None:
        try:
            for name, spec in _SCHEMAS[type(self)].fields.items():
                value = getattr(self, name)
                converted = spec.convert(value, name, False)
                if converted is not value:
                    object.__setattr__(self, name, converted)
        except _Invalid as exc:
            raise MessageError(type(self).__name__, exc.path, exc.problem) from None
        self._validate()

    def _validate(self) -> None:
        """Rules across fields, run after each field passed its own; raise ``self._error``."""

    def _error(self, path: str, problem: str) -> MessageError:
        return MessageError(type(self).__name__, path, problem)


def _schema(cls: type) -> _Schema:
    schema = _SCHEMAS.get(cls)
    if schema is None:
        raise TypeError(f"{cls!r} is not a hypha message type (a subclass of Message)")
    return schema


def _to_map(message: Message) -> dict[str, Any]:
    fields = _SCHEMAS[type(message)].fields
    return {name: spec.plain(getattr(message, name)) for name, spec in fields.items()}


def _from_map(cls: type[M], raw: dict[str, Any], path: str) -> M:
    fields = _SCHEMAS[cls].fields
    for key in raw:
        if key not in fields:
            raise _Invalid(path, f"unknown field {_short(key)}; allowed fields: "
                           f"{', '.join(fields) or 'none'}")
    values = {}
    for name, spec in fields.items():
        if name not in raw:
            raise _Invalid(_join(path, name), f"missing; allowed: {spec.allowed}")
        values[name] = spec.convert(raw[name], _join(path, name), True)
    # NOTE: what cls(**values) would do, without checking each field a second time.
    message = cls.__new__(cls)
    for name, value in values.items():
        object.__setattr__(message, name, value)
    try:
        message._validate()
    except MessageError as exc:
        raise _Invalid(_join(path, exc.path), exc.problem) from None
    return message


# ----------------------------------------------------------------------------------------------
# encode / decode


def encode(message: Message) -> bytes:
    """The msgpack encoding of a message; MessageError if it exceeds its type's ``MAX_SIZE``."""
    schema = _schema(type(message))
    data: bytes = msgpack.packb({_VERSION_KEY: SCHEMA_VERSION, **_to_map(message)},
                                use_bin_type=True)
    if len(data) > schema.max_size:
        raise MessageError(type(message).__name__, "", f"encodes to {len(data)} bytes; allowed: "
                           f"at most {schema.max_size} bytes")
    return data


def decode(message_type: type[M], data: bytes | bytearray | memoryview) -> M:
    """The message of type ``message_type`` encoded in ``data`` (untrusted bytes).

    Raises MessageError, and nothing else, for anything but a valid encoding of that type.
    """
    schema = _schema(message_type)
    name = message_type.__name__
    if not isinstance(data, bytes | bytearray | memoryview):
        raise TypeError(f"decode() takes bytes, not {type(data).__name__}")
    size = data.nbytes if isinstance(data, memoryview) else len(data)
    if size > schema.max_size:
        raise MessageError(name, "", f"got {size} bytes; allowed: at most {schema.max_size} bytes")
    try:
        reader = _Reader(schema.max_containers)
        raw = msgpack.unpackb(data, raw=False, use_list=True, strict_map_key=False,
                              list_hook=reader.on_list, object_pairs_hook=reader.on_map,
                              **schema.unpack_limits)
    except _Invalid as exc:
        raise MessageError(name, exc.path, exc.problem) from None
    except msgpack.StackError:
        raise MessageError(name, "", "got msgpack nested deeper than the parser's stack; "
                           "allowed: the nesting of this message's schema") from None
    except Exception as exc:  # NOTE: the parser's errors vary (ValueError, FormatError, ...)
        raise MessageError(name, "", f"not valid msgpack for this message ({exc})") from None
    if not isinstance(raw, dict):
        raise MessageError(name, "", f"got {_kind(raw)} at the top level; allowed: a map")
    if _VERSION_KEY not in raw:
        raise MessageError(name, _VERSION_KEY, f"missing schema version; allowed: "
                           f"{SCHEMA_VERSION}")
    version = raw.pop(_VERSION_KEY)
    if type(version) is not int:
        raise MessageError(name, _VERSION_KEY, f"got {_kind(version)} as the schema version; "
                           f"allowed: {SCHEMA_VERSION}")
    if version != SCHEMA_VERSION:
        raise MessageError(name, _VERSION_KEY, f"unsupported schema version {version} (this "
                           f"node reads version {SCHEMA_VERSION}); allowed: {SCHEMA_VERSION}")
    try:
        return _from_map(message_type, raw, "")
    except _Invalid as exc:
        raise MessageError(name, exc.path, exc.problem) from None
