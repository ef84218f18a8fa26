"""Which block size? A sweep of the quantizer's block size on a real DiLoCo pseudo-gradient.

For int8 / int4 / int2 and block sizes 16 ... 4096 (one fp32 absmax scale per block), on the
pseudo-gradient of bench/_pseudograd.py, quantized tensor by tensor as the codec does:

* bits per parameter: codes + fp32 scales, and on the wire (framing included) with and
  without zstd;
* error: normalised MSE ||delta - dequant(quant(delta))||^2 / ||delta||^2, its square root (the
  relative error) and in dB;
* for int4 / int2, the error-feedback view: encode_delta with error feedback over ``--rounds``
  rounds of the same delta; the residual ||ef|| / ||delta|| after the last round (and its
  largest value along the way: bounded or growing?), and the error of the average update that
  arrived, ||ef_R|| / (R ||delta||);
* quantize throughput (GB/s of fp32 input; the cpp backend when built), beside a memcpy of the
  same bytes.

Recommendation rule: spend bits where they buy the most. Widening the code by one bit buys
``s`` dB of error (measured here between bit widths at the same block size); a block size is
worth its scale bits if it minimises ``J = 10 log10(NMSE) + s * bits_per_param``. The "regret"
column is J minus the best J at that bit width, in dB; the recommended default is the block size
with the smallest worst-case regret over the bit widths.

    python bench/blocksize.py --quick --results-dir /tmp/benchsmoke
    python bench/blocksize.py
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import sys
import warnings
from pathlib import Path
from typing import Any

_ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path[0] is bench/, where kernels.py would shadow the repo's kernels/.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _ROOT / "bench"]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

import torch  # noqa: E402

with warnings.catch_warnings():
    warnings.simplefilter("ignore", RuntimeWarning)  # "hypha._C is not built": noted below
    import hypha._ext
    from hypha import compress, ops

from bench import _harness as h  # noqa: E402
from bench._pseudograd import describe, pseudo_gradient, tile  # noqa: E402

BLOCK_SIZES = "16,32,64,128,256,512,1024,4096"
BITS = "8,4,2"
#: the default is "supported" when its worst regret over the bit widths is within this many dB
SUPPORT_DB = 0.25


def quant_error(deltas: list[torch.Tensor], bits: int, bs: int, backend: str) -> tuple[float, int]:
    """(squared error, bytes of codes + scales), quantizing tensor by tensor as the codec does."""
    err, nbytes = 0.0, 0
    for d in deltas:
        q = ops.quantize(d, bits, bs, backend=backend)
        err += float((d.reshape(-1) - ops.dequantize(q, backend=backend)).pow(2).sum())
        nbytes += q.codes.numel() + 4 * q.scales.numel()
    return err, nbytes


def ef_residuals(
    deltas: list[torch.Tensor], bits: int, bs: int, rounds: int, backend: str
) -> list[float]:
    """||ef|| / ||delta|| after each of ``rounds`` encode_delta rounds of the same delta."""
    norm = math.sqrt(sum(float(d.pow(2).sum()) for d in deltas))
    efs = [torch.zeros(d.numel()) for d in deltas]
    out = []
    for _ in range(rounds):
        for d, ef in zip(deltas, efs, strict=True):
            ops.encode_delta(d.reshape(-1), None, ef, bits, bs, backend=backend)
        out.append(math.sqrt(sum(float(ef.pow(2).sum()) for ef in efs)) / norm)
    return out


def wire_bpp(deltas: list[torch.Tensor], bits: int, bs: int, zstd: bool, backend: str) -> float:
    codec = compress.Codec(f"int{bits}", compress.DEFAULT_ZSTD_LEVEL if zstd else None, bs)
    return compress.bits_per_param(compress.encode(deltas, codec, backend=backend))


def regrets(
    rows: dict[tuple[int, int], dict[str, Any]], widths: list[int], sizes: list[int], key: str
) -> tuple[dict[int, float], dict[int, int], dict[int, float]]:
    """Applies the rule with ``rows[..][key]`` as the bits per parameter; stores the regret (dB)
    in ``rows[..]["regret_db"]`` (``"regret_zstd_db"`` for the wire+zstd bits). Returns
    (dB per bit for each width, best block size per width, worst regret per block size)."""
    out_key = "regret_db" if key == "bpp" else "regret_zstd_db"
    slopes: dict[int, float] = {}
    for i, b in enumerate(widths):
        pair = widths[i : i + 2] if i + 1 < len(widths) else widths[i - 1 : i + 1]
        if len(pair) < 2:
            # no other width swept: one more bit halves the step, 6.02 dB for uniform noise
            slopes[b] = 10 * math.log10(4)
            continue
        lo, hi = pair
        per = [
            (rows[lo, bs]["db"] - rows[hi, bs]["db"]) / (rows[hi, bs][key] - rows[lo, bs][key])
            for bs in sizes
        ]
        slopes[b] = statistics.median(per)
    picks: dict[int, int] = {}
    for b in widths:
        js = {bs: rows[b, bs]["db"] + slopes[b] * rows[b, bs][key] for bs in sizes}
        best = min(js.values())
        picks[b] = min(sizes, key=js.__getitem__)
        for bs in sizes:
            rows[b, bs][out_key] = js[bs] - best
    worst = {bs: max(rows[b, bs][out_key] for b in widths) for bs in sizes}
    return slopes, picks, worst


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--block-sizes", default=BLOCK_SIZES)
    ap.add_argument("--bits", default=BITS)
    ap.add_argument("--rounds", type=int, default=10, help="error-feedback rounds (int4/int2)")
    ap.add_argument(
        "--backend", default=None, help="kernel backend (default: cpp when built, else reference)"
    )
    ap.add_argument(
        "--elems",
        default=None,
        help="quantize-throughput input: the pseudo-gradient tiled to this size (default 16M; 4M with --quick)",
    )
    ap.add_argument("--skip-throughput", action="store_true")
    h.add_common_args(ap)
    args = ap.parse_args(argv)

    rec = h.recorder("blocksize", args, "cpu")
    backend = args.backend or ops.select_backend(torch.device("cpu"))
    if backend not in ops.available_backends("cpu"):
        raise SystemExit(
            f"backend {backend!r} is not available on cpu: {ops.available_backends('cpu')}"
        )
    if backend == "reference":
        why = hypha._ext.extension_error()
        rec.note(
            "quantize throughput measured with the composed-torch reference"
            + (f" (hypha._C is not loaded: {why})" if why else "")
            + ": the GB/s column says nothing about the C++ kernels"
        )
    sizes = [int(s) for s in args.block_sizes.split(",")]
    bits_list = [int(b) for b in args.bits.split(",")]
    tk = h.timing_kwargs(args, None)
    tk.pop("cuda_events")

    pg = pseudo_gradient()
    rec.note(describe(pg).replace("\n  ", "; "))
    deltas = [d.reshape(-1).contiguous() for d in pg.deltas]
    norm2 = float(pg.flat.pow(2).sum())
    big = None
    if not args.skip_throughput:
        target = h.parse_sizes(args.elems or ("4M" if args.quick else "16M"))[0]
        parts, k = tile([pg.flat], target)
        big = torch.cat(parts)
        rec.note(
            f"throughput: quantize of the pseudo-gradient tiled {k}x ({big.numel():,} elements), {backend!r} backend"
        )

    table = rec.table(
        "blocksize",
        [
            h.Column("codec", "codec", width=5),
            h.Column("block", "block"),
            h.Column("bpp", "bits/param", ".3f"),
            h.Column("wire_bpp", "wire", ".3f"),
            h.Column("wire_zstd_bpp", "wire+zstd", ".3f"),
            h.Column("nmse", "NMSE", h.sig(3)),
            h.Column("rel_err", "rel err", h.sig(3)),
            h.Column("db", "dB", ".2f"),
            h.Column("regret_db", "regret dB", ".2f"),
            h.Column("regret_zstd_db", "regret zstd", ".2f"),
            h.Column("ef_resid", f"EF resid@{args.rounds}", h.sig(3)),
            h.Column("ef_max", "EF max", h.sig(3)),
            h.Column("ef_avg_err", "avg-upd err", h.sig(3)),
            h.Column("gbps", "quant GB/s", ".2f"),
            h.Column("of_copy", "of memcpy", h.pct),
        ],
        title=f"Block-size sweep on the pseudo-gradient ({pg.numel:,} params, {len(deltas)} tensors). "
        "bits/param = codes + fp32 scales; wire = whole payload (framing, default zstd level); "
        "NMSE = ||d - dq||^2/||d||^2; EF = encode_delta error feedback on the same delta each "
        "round; regret = J - min J at that width, J = dB + s * bits/param (see the notes); regret zstd: the same with the wire+zstd bits",
    )
    table.stream = False  # the regret column needs the whole sweep; printed at the end
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for bits in bits_list:
        for bs in sizes:
            err, nbytes = quant_error(deltas, bits, bs, backend)
            nmse = err / norm2
            row: dict[str, Any] = {
                "codec": f"int{bits}",
                "bits": bits,
                "block": bs,
                "bpp": 8 * nbytes / pg.numel,
                "wire_bpp": wire_bpp(pg.deltas, bits, bs, False, backend),
                "wire_zstd_bpp": wire_bpp(pg.deltas, bits, bs, True, backend),
                "nmse": nmse,
                "rel_err": math.sqrt(nmse),
                "db": 10 * math.log10(nmse) if nmse > 0 else -math.inf,
                "backend": backend,
            }
            if bits in (2, 4) and args.rounds > 0:
                res = ef_residuals(deltas, bits, bs, args.rounds, backend)
                row |= {
                    "ef_resid": res[-1],
                    "ef_max": max(res),
                    "ef_avg_err": res[-1] / args.rounds,
                    "ef_rounds": args.rounds,
                }
            if big is not None:
                n = big.numel()
                moved = 4 * n + ops.packed_nbytes(n, bits) + 4 * ops.num_blocks(n, bs)
                src = torch.ones(moved // 2, dtype=torch.uint8)
                dst = torch.empty_like(src)
                t = h.measure(
                    {
                        "copy": lambda src=src, dst=dst: dst.copy_(src),
                        "q": lambda bits=bits, bs=bs: ops.quantize(big, bits, bs, backend=backend),
                    },
                    **tk,
                )
                row |= {
                    "gbps": 4 * n / t["q"].median / 1e9,
                    "of_copy": t["copy"].median / t["q"].median,
                    "quant_ms": t["q"].median * 1e3,
                    "spread": t["q"].spread,
                    "numel": n,
                }
                del src, dst
                gc.collect()
            rows[bits, bs] = row
            print(
                f"  int{bits} block {bs:5d}: {row['bpp']:.3f} bits/param, rel err {row['rel_err']:.4g}"
                + (f", EF resid {row['ef_resid']:.3g}" if "ef_resid" in row else "")
                + (f", {row['gbps']:.2f} GB/s" if "gbps" in row else ""),
                flush=True,
            )

    # --- the recommendation: J = dB + s * bits, s = dB per code bit, measured -----------------
    widths = sorted(bits_list)
    results = {key: regrets(rows, widths, sizes, key) for key in ("bpp", "wire_zstd_bpp")}
    for key, (slopes, _picks, _worst) in results.items():
        suffix = "" if key == "bpp" else "_zstd"
        for (b, _bs), row in rows.items():
            row[f"slope_db_per_bit{suffix}"] = slopes[b]
    for bits in bits_list:
        for bs in sizes:
            table.add(**rows[bits, bs])
    table.print()

    cur = ops.DEFAULT_BLOCK_SIZE
    slopes, picks, worst = results["bpp"]
    overall = min(sizes, key=lambda bs: worst[bs])
    rec.note(
        "rule: per bit width pick the block size minimising J = 10*log10(NMSE) + s*bits/param, s = "
        "the dB a wider code buys per bit at the same block size (measured: "
        + ", ".join(f"int{b} {slopes[b]:.2f}" for b in widths)
        + " dB/bit); one default for all widths = the least worst-case regret (J - best J)"
    )
    rec.note("best block size per width: " + ", ".join(f"int{b}: {picks[b]}" for b in widths))
    z_slopes, z_picks, z_worst = results["wire_zstd_bpp"]
    z_overall = min(sizes, key=lambda bs: z_worst[bs])
    rec.note(
        "the same rule on the wire+zstd bits (s: "
        + ", ".join(f"int{b} {z_slopes[b]:.2f}" for b in widths)
        + " dB/bit): "
        + ", ".join(f"int{b}: {z_picks[b]}" for b in widths)
        + f"; overall {z_overall}"
        + (
            f" (DEFAULT_BLOCK_SIZE {cur}: worst regret {z_worst[cur]:.2f} dB)"
            if cur in z_worst
            else ""
        )
    )
    if cur in worst:
        verdict = "supported" if cur == overall or worst[cur] <= SUPPORT_DB else "NOT supported"
        rec.note(
            f"recommendation: block size {overall} (worst regret {worst[overall]:.2f} dB). The current "
            f"DEFAULT_BLOCK_SIZE = {cur} has worst regret {worst[cur]:.2f} dB: {verdict} by this sweep "
            f"(threshold {SUPPORT_DB} dB)."
        )
    else:
        rec.note(
            f"recommendation: block size {overall}; DEFAULT_BLOCK_SIZE = {cur} was not in the sweep"
        )
    rec.save()


if __name__ == "__main__":
    main()
