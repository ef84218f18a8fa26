"""The schema framework itself: what a message class may declare, and what it is refused."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Annotated, Literal

import pytest

from hypha.messages import MaxItems, Message, MessageError, Range, Text, decode, encode


class Inner(Message):
    """A nested test message."""

    label: Annotated[str, Text(8, min_len=1)]


class Everything(Message, max_size=4096):
    """One field of each kind the framework supports."""

    text: Annotated[str, Text(16, pattern=r"[a-z]*")]
    count: Annotated[int, Range(gt=-1, lt=10)]
    ratio: Annotated[float, Range(ge=0, le=1)]
    flag: bool
    choice: Literal["a", "b"]
    inner: Inner
    inners: Annotated[Sequence[Inner], MaxItems(2)]
    table: Annotated[Mapping[Annotated[str, Text(4)], int], MaxItems(3)]
    maybe: Annotated[str, Text(4)] | None = None
    maybe_inner: Inner | None = None
    scalar: Annotated[str, Text(4)] | int | bool = 0


def _everything(**changes: object) -> Everything:
    fields: dict[str, object] = dict(text="abc", count=9, ratio=0.5, flag=False, choice="b",
                                     inner=Inner(label="x"), inners=[Inner(label="y")],
                                     table={"k": 1})
    fields.update(changes)
    return Everything(**fields)  # type: ignore[arg-type]


def test_every_kind_round_trips() -> None:
    e = _everything(maybe="m", maybe_inner=Inner(label="z"), scalar=True)
    assert decode(Everything, encode(e)) == e
    assert Everything.MAX_SIZE == 4096 and Inner.MAX_SIZE == 64 << 10


@pytest.mark.parametrize(("changes", "message"), [
    ({"count": 10}, "Everything: count: got 10; allowed: an integer in [0, 9]"),
    ({"count": -1}, "Everything: count: got -1; allowed: an integer in [0, 9]"),
    ({"ratio": 1.5}, "Everything: ratio: got 1.5; allowed: a finite number >= 0 and <= 1"),
    ({"flag": 1}, "Everything: flag: got an integer (1); allowed: a bool (true or false)"),
    ({"text": "ABC"}, "Everything: text: got 'ABC'; allowed: a string of at most 16 characters "
     "matching [a-z]*"),
    ({"inners": [Inner(label="a")] * 3}, "Everything: inners: got 3 items; allowed: a list of "
     "at most 2 items"),
    ({"table": {"k": "v"}}, "Everything: table['k']: got a string ('v'); allowed: a 64-bit "
     "integer"),
    ({"maybe": "toolong"}, "Everything: maybe: got 'toolong'; allowed: a string of at most 4 "
     "characters"),
    ({"scalar": 1.5}, "Everything: scalar: got a float (1.5); allowed: a string of at most 4 "
     "characters, a 64-bit integer or a bool (true or false)"),
])
def test_constraints(changes: dict[str, object], message: str) -> None:
    with pytest.raises(MessageError) as info:
        _everything(**changes)
    assert str(info.value) == message


def _define(annotation: object, name: str = "field") -> None:
    type(f"Bad_{name}", (Message,), {"__annotations__": {name: annotation},
                                    "__doc__": "x", "__module__": __name__})


@pytest.mark.parametrize(("annotation", "message"), [
    (str, r"Bad_field\.field: needs exactly one Text\(\.\.\.\)"),
    (Annotated[str, Text(4), Text(5)], "needs exactly one Text"),
    (Annotated[str, Text(0)], "Text needs 0 <= min_len <= max_len"),
    (Annotated[str, Text(4, min_len=5)], "Text needs 0 <= min_len <= max_len"),
    (Sequence[int], r"needs exactly one MaxItems\(\.\.\.\)"),
    (Annotated[Mapping[str, int], MaxItems(2)], r"Bad_field\.field key: needs exactly one Text"),
    (Annotated[Mapping[Inner, int], MaxItems(2)], "map keys must be Annotated"),
    (Annotated[int, Text(4)], r"Text\(max_len=4.*\) does not apply to <class 'int'>"),
    (Annotated[str, Text(4), Range(ge=0)], "does not apply to <class 'str'>"),
    (dict, "unsupported field type <class 'dict'>"),
    (list[int], "unsupported field type list"),
    (bytes, "unsupported field type <class 'bytes'>"),
    (Literal[1, 2], "Literal.* must list strings"),
    (int | Inner, "a union may hold only str, int, float and bool"),
    (int | bool | int | float, None),  # typing folds the duplicate int: fine
])
def test_bad_schemas_are_refused_at_class_definition(annotation: object,
                                                     message: str | None) -> None:
    if message is None:
        _define(annotation)
        return
    with pytest.raises(TypeError, match=message):
        _define(annotation)


def test_the_version_key_is_reserved() -> None:
    with pytest.raises(TypeError, match="the field name 'v' is reserved"):
        _define(int, name="v")


def test_max_size_must_fit_a_protocol() -> None:
    with pytest.raises(TypeError, match=r"max_size must be 1 \.\. 4 GiB - 1 bytes"):
        type("Huge", (Message,), {"__doc__": "x", "__module__": __name__}, max_size=1 << 32)


def test_encode_and_decode_need_message_types() -> None:
    with pytest.raises(TypeError, match="is not a hypha message type"):
        encode(object())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="is not a hypha message type"):
        decode(Message, b"\x81\xa1v\x01")
