"""Every constructor argument path of DiLoCo: checked in __init__, with a message that says what is
wrong; hyper-parameters in param_groups; the torch.optim surface (schedulers, zero_grad)."""

from __future__ import annotations

import pytest
import torch

from hypha.compress import Codec
from hypha.optim import DiLoCo, LocalTransport, Transport
from tests.unit.optim._run import make_model


def solo(**kwargs: object) -> DiLoCo:
    model = make_model()
    return DiLoCo(torch.optim.AdamW(model.parameters()), LocalTransport.create(1)[0], **kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"sync_every": 0}, ValueError, "Invalid sync_every: 0"),
        ({"sync_every": -5}, ValueError, "Invalid sync_every"),
        ({"sync_every": 2.5}, ValueError, "Invalid sync_every"),
        ({"sync_every": True}, ValueError, "Invalid sync_every"),
        ({"outer_lr": -1.0}, ValueError, "Invalid outer_lr: -1.0"),
        ({"outer_lr": float("inf")}, ValueError, "Invalid outer_lr"),
        ({"outer_lr": float("nan")}, ValueError, "Invalid outer_lr"),
        ({"outer_momentum": 1.0}, ValueError, "Invalid outer_momentum"),
        ({"outer_momentum": -0.1}, ValueError, "Invalid outer_momentum"),
        ({"codec": "int3"}, ValueError, "unknown codec"),
        ({"codec": "int4+lz4"}, ValueError, "unknown entropy stage"),
        ({"codec": 4}, TypeError, "codec must be"),
        ({"codec": "fp32", "error_feedback": True}, ValueError, "needs a lossy codec"),
        ({"error_feedback": "yes"}, TypeError, "error_feedback must be"),
        ({"fragments": 0}, ValueError, "Invalid fragments"),
        ({"fragments": 3, "sync_every": 10}, ValueError, "multiple of fragments"),
        ({"overlap_steps": -1}, ValueError, "Invalid overlap_steps"),
        ({"overlap_steps": 11, "sync_every": 10}, ValueError, "Invalid overlap_steps"),
        (
            {"overlap_steps": 6, "sync_every": 10, "fragments": 2},
            ValueError,
            "sync_every / fragments = 5",
        ),
        ({"merge_alpha": 1.0}, ValueError, "Invalid merge_alpha"),
        ({"merge_alpha": -0.5}, ValueError, "Invalid merge_alpha"),
        ({"nonfinite": "ignore"}, ValueError, "nonfinite must be"),
        ({"timeout": 0}, ValueError, "Invalid timeout"),
        ({"backend": "gpu"}, ValueError, "Invalid backend"),
        ({"chunk_elems": 100}, ValueError, "multiple of the block size"),
        ({"chunk_elems": 0}, ValueError, "chunk_elems"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        solo(**kwargs)


def test_bad_inner_and_comm() -> None:
    model = make_model()
    comm = LocalTransport.create(1)[0]
    with pytest.raises(TypeError, match=r"inner must be a torch.optim.Optimizer"):
        DiLoCo(model.parameters(), comm)  # type: ignore[arg-type]
    inner = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="comm must be"):
        DiLoCo(inner, comm="tcp://x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="DiLoCo needs comm="):
        DiLoCo(inner)  # torch.distributed is not initialised in the test process
    wrapped = DiLoCo(inner, comm)
    with pytest.raises(TypeError, match="already a DiLoCo"):
        DiLoCo(wrapped, comm)


def test_bad_parameters() -> None:
    comm = LocalTransport.create(1)[0]
    ints = torch.nn.Parameter(torch.zeros(3, dtype=torch.float64))
    with pytest.raises(TypeError, match="float64"):
        DiLoCo(torch.optim.SGD([ints], lr=0.1), comm)
    empty = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=0.1)
    empty.param_groups[0]["params"] = []
    with pytest.raises(ValueError, match="no parameters"):
        DiLoCo(empty, comm)


def test_defaults_follow_the_paper_and_the_codec() -> None:
    opt = solo()
    assert opt.codec == Codec("int4")
    assert opt.error_feedback is True
    assert (opt.sync_every, opt.fragments, opt.overlap_steps, opt.merge_alpha) == (100, 1, 0, 0.0)
    for group in opt.param_groups:
        assert (group["outer_lr"], group["outer_momentum"]) == (0.7, 0.9)
    assert solo(codec="fp32").error_feedback is False
    assert solo(codec="bf16").error_feedback is True
    assert solo(codec="int2", error_feedback=False).error_feedback is False
    streaming = solo(fragments=4, sync_every=100)
    assert (streaming.overlap_steps, streaming.merge_alpha) == (1, 0.5)
    assert solo(fragments=4, overlap_steps=0).merge_alpha == 0.0
    assert "global" in opt.state[next(iter(opt.state))]


def test_param_groups_are_the_inner_groups() -> None:
    model = make_model()
    inner = torch.optim.AdamW(
        [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.5}], lr=0.1
    )
    opt = DiLoCo(inner, LocalTransport.create(1)[0], outer_lr=0.5)
    assert opt.param_groups is inner.param_groups
    assert [g["outer_lr"] for g in inner.param_groups] == [0.5, 0.5]
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    model(torch.zeros(1, 13)).sum().backward()
    opt.step()
    sched.step()
    assert [g["lr"] for g in inner.param_groups] == [0.05, 0.25]
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(RuntimeError, match="fixes its parameters"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(1))]})
    opt.param_groups[0]["outer_momentum"] = 1.5  # a bad value set later is caught when loaded
    state = opt.state_dict()
    opt.param_groups[0]["outer_momentum"] = 0.9
    with pytest.raises(ValueError, match="Invalid outer_momentum"):
        opt.load_state_dict(state)


def test_transport_checks_peers() -> None:
    a, b = LocalTransport.create(2)
    assert isinstance(a, Transport)
    for bad in (0, 2, -1, "1"):
        with pytest.raises(ValueError, match="peer must be another rank"):
            a.send(bad, b"x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="world_size"):
        LocalTransport(0, 0, {})
    with pytest.raises(ValueError, match="rank must be"):
        LocalTransport(3, 2, {})
    a.send(1, b"one")
    a.send(1, bytearray(b"two"))
    assert [b.recv(0, timeout=1), b.recv(0, timeout=1)] == [b"one", b"two"]
    assert (a.bytes_sent, b.bytes_received) == (6, 6)
    with pytest.raises(TimeoutError, match="nothing from rank 0"):
        b.recv(0, timeout=0.05)
    a.close()
    with pytest.raises(ConnectionError, match="closed"):
        b.recv(0, timeout=1)
    with pytest.raises(ConnectionError, match="closed"):
        a.send(1, b"late")
