"""DiLoCo's outer round: against a pure-torch reference, bit-identical global copies across
workers, streaming fragments, bf16 models, memory, and resuming from a checkpoint bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch

from hypha import compress, ops
from hypha.optim import LocalTransport
from tests.unit.optim._run import (
    Worker,
    assert_identical,
    batch,
    make_model,
    run_threads,
    run_workers,
    train,
)

pytestmark = pytest.mark.timeout(120)


def reference_diloco(
    n: int, steps: int, sync_every: int, codec: str = "fp32", lr: float = 1e-2
) -> list[torch.Tensor]:
    """DiLoCo written out with plain torch (one fragment): every worker starts from rank 0's
    model, trains with AdamW, and every ``sync_every`` steps the pseudo-gradients are averaged in
    rank order and applied with Nesterov (the reference kernel) to the global copy; the update
    that reaches the global copy is ``new - global`` encoded with ``codec`` (exact for fp32)."""
    models = [make_model(seed=0) for _ in range(n)]
    opts = [torch.optim.AdamW(m.parameters(), lr=lr) for m in models]
    global_ = [p.detach().clone() for p in models[0].parameters()]
    momentum = [torch.zeros_like(g) for g in global_]
    for step in range(steps):
        for rank, (m, o) in enumerate(zip(models, opts, strict=True)):
            x, y = batch(rank, step)
            ((m(x) - y) ** 2).float().mean().backward()
            o.step()
            o.zero_grad()
        if (step + 1) % sync_every:
            continue
        with torch.no_grad():
            for i, g in enumerate(global_):
                acc = torch.zeros_like(g)
                for m in models:
                    acc += g - list(m.parameters())[i].detach()
                acc /= n
                if n == 1:
                    ops.nesterov_(g, momentum[i], acc, 0.7, 0.9, backend="reference")
                else:
                    new = g.clone()
                    ops.nesterov_(new, momentum[i], acc, 0.7, 0.9, backend="reference")
                    g += compress.decode(compress.encode_delta([new], [g], None, codec))[0]
                for m in models:
                    list(m.parameters())[i].detach().copy_(g)
    return global_


@pytest.mark.parametrize("n", [1, 2, 3])
def test_fp32_matches_the_reference_bit_for_bit(n: int) -> None:
    workers = run_workers(n, 12, sync_every=4, codec="fp32", backend="reference")
    expected = reference_diloco(n, 12, 4)
    for w in workers:
        got = w.globals()
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            assert torch.equal(a, b), f"rank {w.rank} tensor {i}: max diff {(a - b).abs().max()}"
        # without overlap the local parameters restart from the global copy after every round
        assert_identical([w.locals(), got])
        w.opt.close()


def test_world_one_int8_matches_the_reference() -> None:
    """One worker: the pseudo-gradient goes through the int8 codec with error feedback, the
    Nesterov step is applied in place (nothing to broadcast)."""
    (w,) = run_workers(1, 6, sync_every=3, codec="int8", backend="reference")
    model = make_model(seed=0)
    inner = torch.optim.AdamW(model.parameters(), lr=1e-2)
    global_ = [p.detach().clone() for p in model.parameters()]
    ef = [torch.zeros_like(g) for g in global_]
    mom = [torch.zeros_like(g) for g in global_]
    for step in range(6):
        x, y = batch(0, step)
        ((model(x) - y) ** 2).mean().backward()
        inner.step()
        inner.zero_grad()
        if (step + 1) % 3 == 0:
            local = [p.detach().reshape(-1) for p in model.parameters()]
            flat = [g.view(-1) for g in global_]
            payload = compress.encode_delta(flat, local, [e.view(-1) for e in ef], "int8")
            for g, d, m, p in zip(
                global_, compress.decode(payload), mom, model.parameters(), strict=True
            ):
                ops.nesterov_(g.view(-1), m.view(-1), d, 0.7, 0.9, backend="reference")
                p.detach().copy_(g)
    for a, b in zip(w.globals(), global_, strict=True):
        assert torch.equal(a, b)
    assert any(e.abs().sum() > 0 for e in ef), "int8 leaves a residual in the error feedback"
    assert all(
        torch.equal(e, w.opt.state[p]["error_feedback"])
        for e, p in zip(ef, w.model.parameters(), strict=True)
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "int2"},
        {"codec": "int4+zstd"},
        {"codec": "int8"},
        {"codec": "bf16"},
        {"codec": "int2", "error_feedback": False},
        {"codec": "int4", "fragments": 3, "sync_every": 6},
        {"codec": "int4", "fragments": 2, "sync_every": 6, "overlap_steps": 3, "merge_alpha": 0.3},
        {"codec": "int8", "fragments": 1, "sync_every": 4, "overlap_steps": 2},
    ],
    ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()),
)
def test_global_copies_stay_bit_identical(kwargs: dict[str, object]) -> None:
    kwargs = {"sync_every": 4, "chunk_elems": 128, **kwargs}
    workers = run_workers(4, 25, **kwargs)
    copies = [w.globals() for w in workers]
    assert_identical(copies)
    rounds = 25 // (kwargs["sync_every"] // kwargs.get("fragments", 1))  # type: ignore[operator]
    assert workers[0].opt.stats.outer_rounds >= rounds - 1
    initial = list(make_model(seed=0).parameters())
    assert all(not torch.equal(g, p) for g, p in zip(copies[0], initial, strict=True)), (
        "training moved"
    )
    # the quantized update is close to the exact one: the copies are not merely identical garbage
    assert all(torch.isfinite(g).all() for g in copies[0])
    for w in workers:
        w.opt.close()


def test_quantized_round_is_close_to_exact() -> None:
    exact = reference_diloco(4, 8, 8)
    initial = [p.detach() for p in make_model(seed=0).parameters()]
    for codec, tol in (("int8", 0.02), ("int4", 0.15)):
        got = run_workers(4, 8, sync_every=8, codec=codec)[0].globals()
        for g, e, p0 in zip(got, exact, initial, strict=True):
            step = (e - p0).norm()
            assert (g - e).norm() <= tol * step, f"{codec}: error {(g - e).norm()} vs step {step}"


def test_streaming_merges_after_overlap() -> None:
    """Fragment f is exchanged at its step and merged overlap_steps later, with merge_alpha."""
    (w,) = run_workers(
        1, 4, sync_every=4, fragments=2, overlap_steps=1, merge_alpha=0.25, codec="fp32"
    )
    # step 2: fragment 0 starts; 3: it is merged; 4: fragment 1 starts and is still in flight
    assert w.opt.stats.outer_rounds == 1
    assert w.opt.state_dict()["diloco"]["pending"]["fragment"] == 1
    after_inner: list[torch.Tensor] = []
    w.opt.inner.register_step_post_hook(
        lambda *_: after_inner.extend(p.detach().clone() for p in w.model.parameters())
    )
    train(w.model, w.opt, 0, range(4, 5))  # step 5: the inner step, then fragment 1's merge
    assert w.opt.stats.outer_rounds == 2
    params = list(w.model.parameters())
    for seg in w.opt.layout.fragment_segments(1):
        p = params[seg.param]
        g = w.opt.state[p]["global"].view(-1)[seg.start : seg.stop]
        local = after_inner[seg.param].view(-1)[seg.start : seg.stop]
        torch.testing.assert_close(
            p.detach().view(-1)[seg.start : seg.stop], local * 0.25 + g * 0.75
        )
    for seg in w.opt.layout.fragment_segments(0):  # fragment 0 is left to the inner step
        p = params[seg.param]
        assert torch.equal(
            p.detach().view(-1)[seg.start : seg.stop],
            after_inner[seg.param].view(-1)[seg.start : seg.stop],
        )


def test_bf16_model_keeps_fp32_masters() -> None:
    workers = run_workers(3, 12, sync_every=4, codec="int4", dtype=torch.bfloat16)
    assert_identical([w.globals() for w in workers])
    for w in workers:
        for p in w.model.parameters():
            assert p.dtype == torch.bfloat16
            assert w.opt.state[p]["global"].dtype == torch.float32
            assert w.opt.state[p]["error_feedback"].dtype == torch.float32
            # after the last round (step 12) the local parameters are the rounded global copy
            assert torch.equal(p.detach(), w.opt.state[p]["global"].to(torch.bfloat16))
    # fp16 AdamW needs an eps that fp16 can represent
    fp16 = run_workers(2, 8, sync_every=4, codec="int8", dtype=torch.float16, eps=1e-4)
    assert_identical([w.globals() for w in fp16])
    for ws, rounds in ((workers, 3), (fp16, 2)):
        assert all(
            (w.opt.stats.outer_rounds, w.opt.stats.skipped_rounds) == (rounds, 0) for w in ws
        )


@pytest.mark.parametrize("n", [1, 2, 4])
def test_extra_memory_is_at_most_three_fp32_copies(n: int) -> None:
    workers = run_workers(n, 1, sync_every=4, codec="int2", chunk_elems=128)
    params = sum(p.numel() for p in workers[0].model.parameters())
    for w in workers:
        extra = sum(t.numel() for st in w.opt.state.values() for t in st.values())
        owned = w.opt._outer_momentum.numel()
        # global copy + error feedback + this rank's momentum shard, which may be up to one
        # quantizer block (128) larger than 1/n, since shard cuts fall on blocks
        assert extra == 2 * params and owned <= params // n + 128
        assert extra + owned <= 3 * params, f"rank {w.rank}: {(extra + owned) / params:.3f} copies"
    shares = [w.opt._outer_momentum.numel() for w in workers]
    assert sum(shares) == params and max(shares) - min(shares) <= 128


def test_layout_covers_every_element_once() -> None:
    from hypha.optim._layout import Layout

    for numels, fragments, world, align in [
        ([5], 1, 3, 1),
        ([1000, 3, 77, 4096, 1], 3, 4, 128),
        ([1, 1, 1], 4, 2, 1),
        ([300], 2, 5, 128),
    ]:
        layout = Layout(numels, fragments, world, align)
        seen = [torch.zeros(n, dtype=torch.int32) for n in numels]
        for f in range(fragments):
            for j, shard in enumerate(layout.shards[f]):
                assert shard.owner == j
                for seg in shard.segments:
                    seen[seg.param][seg.start : seg.stop] += 1
        assert all(bool((s == 1).all()) for s in seen)
        assert sum(layout.owned) == sum(numels)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"codec": "int4", "sync_every": 4},
        # checkpoint at step 9 while fragment 0's exchange is in flight and its merge is due at 10
        {"codec": "int2", "sync_every": 6, "fragments": 2, "overlap_steps": 1},
    ],
)
def test_resume_continues_the_same_trajectory(kwargs: dict[str, object]) -> None:
    n, total, cut = 2, 15, 9
    straight = run_workers(n, total, **kwargs)
    expected = [(w.globals(), w.locals()) for w in straight]

    first = run_workers(n, cut, **kwargs)
    saved = [
        (copy.deepcopy(w.model.state_dict()), copy.deepcopy(w.opt.state_dict())) for w in first
    ]
    if kwargs.get("fragments") == 2:
        assert saved[0][1]["diloco"]["pending"] == {
            "fragment": 0,
            "round": 2,
            "due": 10,
            "abstained": False,
        }
    for w in first:
        w.opt.close()
    comms = LocalTransport.create(n)

    def resume(rank: int) -> Worker:
        from hypha.optim import DiLoCo

        model = make_model(
            seed=100 + rank
        )  # a different init: everything comes from the checkpoint
        opt = DiLoCo(torch.optim.AdamW(model.parameters(), lr=1e-2), comms[rank], **kwargs)  # type: ignore[arg-type]
        model.load_state_dict(saved[rank][0])
        opt.load_state_dict(saved[rank][1])
        w = Worker(rank, model, opt)
        train(model, opt, rank, range(cut, total))
        return w

    resumed = run_threads(resume, n)
    for w, (globals_, locals_) in zip(resumed, expected, strict=True):
        assert_identical([globals_, w.globals()])
        assert_identical([locals_, w.locals()])
        assert w.opt.stats.inner_steps == total


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_parameters(dtype: torch.dtype) -> None:
    workers = run_workers(3, 12, sync_every=4, codec="int4", device="cuda", dtype=dtype)
    copies = [w.globals() for w in workers]
    assert all(g.is_cuda and g.dtype == torch.float32 for g in copies[0])
    assert_identical(copies)
    # the same bytes as on the CPU: the kernels are bit-exact across devices
    cpu = run_workers(3, 12, sync_every=4, codec="int4", dtype=dtype)
    assert_identical([[g.cpu() for g in copies[0]], cpu[0].globals()])


class _SlowLink(LocalTransport):
    """Every message takes 50 ms to arrive."""

    def _recv(self, peer: int, timeout: float | None) -> tuple[bytes, int]:
        import time

        time.sleep(0.05)
        return super()._recv(peer, timeout)


def test_streaming_exchange_overlaps_inner_steps() -> None:
    """With overlap, the step that starts a fragment's exchange returns at once; the training
    loop only waits for what the overlapped inner steps did not cover."""
    import time

    comms = _SlowLink.create(2)
    workers = run_workers(2, 0, comms=comms, codec="int4", sync_every=8, fragments=2, overlap_steps=4)
    durations: list[list[float]] = [[], []]

    def loop(rank: int) -> None:
        w = workers[rank]
        for step in range(8):
            t0 = time.perf_counter()
            train(w.model, w.opt, rank, range(step, step + 1))
            durations[rank].append(time.perf_counter() - t0)
            time.sleep(0.1)  # the rest of a training step (data loading, logging)

    run_threads(loop, 2)
    for w, d in zip(workers, durations, strict=True):
        stats = w.opt.stats
        assert stats.outer_rounds == 1  # fragment 0: started at step 4, merged at step 8
        assert stats.exchange_seconds > 0.1  # 3+ messages at 50 ms
        assert d[3] < 0.5 * stats.exchange_seconds, f"starting the exchange blocked for {d[3]:.3f} s"
        assert stats.blocked_seconds < 0.5 * stats.exchange_seconds
    assert_identical([w.globals() for w in workers])
