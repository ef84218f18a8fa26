"""Resources arithmetic: fits, +, - (never below zero) and the capacity measure."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hypha.messages import GIB, MessageError, Resources

GPU_BOX = Resources(cpu=16, memory=64 * GIB, storage=1000 * GIB, gpu=2)
JOB = Resources(cpu=4.5, memory=16 * GIB, storage=100 * GIB, gpu=1)


def test_default_is_nothing() -> None:
    assert Resources() == Resources(cpu=0.0, memory=0, storage=0, gpu=0)
    assert Resources().capacity() == 0.0
    assert Resources().fits(Resources())


def test_fits_needs_every_component() -> None:
    assert JOB.fits(GPU_BOX)
    assert not GPU_BOX.fits(JOB)
    assert GPU_BOX.fits(GPU_BOX)
    for too_much in (Resources(cpu=16.5), Resources(memory=64 * GIB + 1),
                     Resources(storage=1001 * GIB), Resources(gpu=3)):
        assert not too_much.fits(GPU_BOX), too_much


def test_add_and_subtract() -> None:
    assert JOB + JOB == Resources(cpu=9.0, memory=32 * GIB, storage=200 * GIB, gpu=2)
    left = GPU_BOX - JOB - JOB
    assert left == Resources(cpu=7.0, memory=32 * GIB, storage=800 * GIB, gpu=0)
    assert left + JOB + JOB == GPU_BOX
    assert GPU_BOX - GPU_BOX == Resources()


def test_subtract_never_goes_below_zero() -> None:
    with pytest.raises(ValueError, match=r"gpu would go below zero") as info:
        GPU_BOX - JOB - JOB - JOB
    assert "cpu" not in str(info.value).rsplit(":", 1)[1]
    with pytest.raises(ValueError, match=r": cpu, memory, storage, gpu would go below zero$"):
        Resources() - JOB


def test_cpu_rounding_residue_is_forgiven() -> None:
    a, b, c = Resources(cpu=0.1), Resources(cpu=0.2), Resources(cpu=0.3)
    assert (a + b).cpu > c.cpu  # 0.30000000000000004
    assert (a + b).fits(c)
    left = c - a - b  # would be -2.8e-17
    assert left.cpu == 0.0


def test_sums_stay_in_range() -> None:
    with pytest.raises(MessageError, match="Resources: memory: got 9223372036854775808"):
        Resources(memory=2**62) + Resources(memory=2**62)


def test_arithmetic_with_other_types_is_a_type_error() -> None:
    with pytest.raises(TypeError):
        JOB + 1  # type: ignore[operator]
    with pytest.raises(TypeError):
        JOB - {"cpu": 1}  # type: ignore[operator]


def test_capacity_weights() -> None:
    assert Resources(cpu=1).capacity() == 1.0
    assert Resources(memory=GIB).capacity() == 1.0
    assert Resources(storage=100 * GIB).capacity() == 1.0
    assert Resources(gpu=1).capacity() == 4.0
    assert GPU_BOX.capacity() == 16 + 64 + 10 + 8


resources = st.builds(Resources, cpu=st.floats(0, 1e6), memory=st.integers(0, 2**50),
                      storage=st.integers(0, 2**50), gpu=st.integers(0, 64))


@given(a=resources, b=resources)
def test_arithmetic_properties(a: Resources, b: Resources) -> None:
    total = a + b
    assert a.fits(total) and b.fits(total)
    back = total - b
    assert (back.memory, back.storage, back.gpu) == (a.memory, a.storage, a.gpu)
    assert back.cpu == pytest.approx(a.cpu, abs=1e-6)
    assert (a + b).capacity() == pytest.approx(a.capacity() + b.capacity())
    if not b.fits(a):
        with pytest.raises(ValueError, match="would go below zero"):
            a - b
