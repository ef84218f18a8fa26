"""Untrusted bytes: whatever arrives, decode returns a valid message or raises MessageError."""

from __future__ import annotations

import copy
import math
import random
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hypha.messages as M
from tests.unit.messages._samples import MESSAGE_TYPES, SAMPLES, raw

#: Byte-level mutations per message type in the seeded loop (about 0.1 s per type).
MUTATIONS = 2000
FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _decodes_or_refuses(cls: type[M.Message], data: bytes) -> None:
    try:
        message = M.decode(cls, data)
    except M.MessageError:
        return
    # what decodes is a valid message: it encodes again, to the same message
    assert M.decode(cls, M.encode(message)) == message


@FUZZ
@given(cls=st.sampled_from(MESSAGE_TYPES), data=st.binary(max_size=512))
def test_random_bytes(cls: type[M.Message], data: bytes) -> None:
    _decodes_or_refuses(cls, data)


def _mutate_bytes(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(5)
        i = rng.randrange(len(b) + 1)
        if op == 0 and b:  # flip bits
            b[min(i, len(b) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1 and b:  # a byte with a type-tag meaning
            b[min(i, len(b) - 1)] = rng.choice([0xC0, 0xC1, 0xC2, 0xC3, 0xC4, 0xCA, 0xCB, 0xCF,
                                                0xD3, 0xD9, 0xDC, 0xDD, 0xDE, 0xDF, 0x90, 0x80,
                                                0xA0, 0xFF, 0x7F, rng.randrange(256)])
        elif op == 2:  # insert junk
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3:  # delete a run
            del b[i:i + rng.randint(1, 8)]
        else:  # truncate
            del b[i:]
    return bytes(b)


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
def test_byte_mutations_of_valid_encodings(cls: type[M.Message]) -> None:
    rng = random.Random(f"hypha-messages-{cls.__name__}")
    data = M.encode(SAMPLES[cls])
    for _ in range(MUTATIONS):
        _decodes_or_refuses(cls, _mutate_bytes(rng, data))


# structural mutations: decode the wire form, replace or add one value anywhere, pack it again

JUNK = st.one_of(
    st.none(), st.booleans(),
    st.integers(-(2**63), 2**64 - 1),
    st.sampled_from([math.nan, math.inf, -math.inf, -0.0, 1e308, 5e-324]),
    st.floats(),
    st.text(max_size=8), st.text(min_size=1000, max_size=1100),
    st.binary(max_size=4),
    st.lists(st.integers(0, 3), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=3),
    st.sampled_from(["process", "peer", "ok", "0123456789abcdef0123456789abcdef",
                     "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"]),
)


def _slots(node: Any) -> list[tuple[Any, Any]]:
    """Every (container, key) in a wire form, to replace the value at."""
    out: list[tuple[Any, Any]] = []
    if isinstance(node, dict):
        for key, value in node.items():
            out.append((node, key))
            out.extend(_slots(value))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            out.append((node, i))
            out.extend(_slots(value))
    return out


@FUZZ
@given(cls=st.sampled_from(MESSAGE_TYPES), pick=st.integers(0, 10**6), junk=JUNK,
       add_key=st.one_of(st.none(), st.text(max_size=12)))
def test_structural_mutations(cls: type[M.Message], pick: int, junk: Any,
                              add_key: str | None) -> None:
    wire = copy.deepcopy(raw(SAMPLES[cls]))
    slots = _slots(wire)
    container, key = slots[pick % len(slots)]
    if add_key is not None and isinstance(container, dict):
        container[add_key] = junk
    else:
        container[key] = junk
    _decodes_or_refuses(cls, msgpack.packb(wire))
