"""Every message survives encode → decode unchanged, and encodes to the same bytes again."""

from __future__ import annotations

import math
import types

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hypha.messages as M
from tests.unit.messages._samples import MESSAGE_TYPES, RESOURCES, SAMPLES, messages


def test_every_message_type_has_a_sample() -> None:
    assert sorted(c.__name__ for c in SAMPLES) == sorted(c.__name__ for c in MESSAGE_TYPES)


@pytest.mark.parametrize("message", SAMPLES.values(), ids=lambda m: type(m).__name__)
def test_sample_round_trip(message: M.Message) -> None:
    data = M.encode(message)
    back = M.decode(type(message), data)
    assert back == message
    assert type(back) is type(message)
    assert M.encode(back) == data
    assert len(data) <= type(message).MAX_SIZE


@pytest.mark.parametrize("message", SAMPLES.values(), ids=lambda m: type(m).__name__)
def test_wire_form_is_a_versioned_map_of_every_field(message: M.Message) -> None:
    wire = msgpack.unpackb(M.encode(message))
    assert list(wire) == ["v", *(f for f in message.__dataclass_fields__)]  # type: ignore[attr-defined]
    assert wire["v"] == M.SCHEMA_VERSION == 1


def test_wire_form_of_nested_and_optional_fields() -> None:
    wire = msgpack.unpackb(M.encode(SAMPLES[M.DispatchJob]))
    job = wire["job"]
    assert "v" not in job and "v" not in job["executor"]  # only the top-level map is versioned
    assert job["executor"] == {"kind": "process", "name": "train", "runtime": "python3.11"}
    assert job["resources"][3] == {"source": "path", "peer": None, "path": "/opt/hypha/train.py",
                                   "dataset": None}
    assert job["config"]["bf16"] is True and job["config"]["inner_steps"] == 500


def test_decode_accepts_any_bytes_like() -> None:
    message = SAMPLES[M.WorkerOffer]
    data = M.encode(message)
    assert M.decode(M.WorkerOffer, bytearray(data)) == message
    assert M.decode(M.WorkerOffer, memoryview(data)) == message


def test_containers_are_stored_read_only() -> None:
    offer = SAMPLES[M.WorkerOffer]
    assert isinstance(offer, M.WorkerOffer)
    assert isinstance(offer.executors, tuple)
    report = SAMPLES[M.MetricsReport]
    assert isinstance(report, M.MetricsReport)
    assert isinstance(report.values, types.MappingProxyType)
    values = {"loss": 1.0}
    copy = M.MetricsReport(job_id=report.job_id, step=1, values=values, time=0.0)
    values["loss"] = math.nan  # the message took a copy
    assert copy.values["loss"] == 1.0


def test_ints_given_for_floats_are_stored_as_floats() -> None:
    r = M.Resources(cpu=2)
    assert type(r.cpu) is float
    assert M.decode(M.Resources, msgpack.packb({"v": 1, "cpu": 2, "memory": 0, "storage": 0,
                                                "gpu": 0})) == r
    # in a union with int, an int stays an int
    job = M.JobSpec(id=M.new_id(), executor=SAMPLES[M.Executor], config={"n": 2},  # type: ignore[arg-type]
                    resources=[])
    assert type(job.config["n"]) is int


def test_messages_are_frozen_keyword_only_and_hashable() -> None:
    import dataclasses

    r = RESOURCES
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.cpu = 1.0  # type: ignore[misc]
    with pytest.raises(TypeError):
        M.Resources(1.0)  # type: ignore[call-arg]
    assert hash(SAMPLES[M.WorkerOffer]) == hash(M.decode(M.WorkerOffer,
                                                         M.encode(SAMPLES[M.WorkerOffer])))


@pytest.mark.parametrize("cls", MESSAGE_TYPES, ids=lambda c: c.__name__)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_round_trip_property(cls: type[M.Message], data: st.DataObject) -> None:
    message = data.draw(messages(cls))
    encoded = M.encode(message)
    back = M.decode(cls, encoded)
    assert back == message
    assert M.encode(back) == encoded
