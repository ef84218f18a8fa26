"""Kernel and codec throughput: are our kernels near memory bandwidth, and where does the codec
spend its time?

Part 1, kernels (fresh randn data): every op of hypha.ops at every size, for every available
backend, timed in the same run as a memcpy of the same number of bytes (the ceiling) and the
composed-torch reference (the floor). Reports GB/s (bytes read + written, byte model below),
the fraction of memcpy, the speed-up over the reference, and pass/miss against the targets.

Part 2, codec end to end (a real DiLoCo pseudo-gradient, bench/_pseudograd.py): for each codec
with and without zstd, encode / decode / decode-accumulate throughput, the zstd stage timed on
its own against the rest and against the network link, bits per parameter on the wire and the
relative error.

    python bench/kernels.py --quick --results-dir /tmp/benchsmoke     # smoke test
    python bench/kernels.py                                           # full run, recorded
    python bench/kernels.py --device cuda --backends reference,cuda,triton
"""

from __future__ import annotations

import argparse
import gc
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

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

OPS = ("quantize", "dequantize", "dequantize_accumulate", "encode_delta", "nesterov")
BITS_OPS = ("quantize", "dequantize", "dequantize_accumulate", "encode_delta")
DEFAULT_SIZES = "1M,4M,16M,64M,256M"
QUICK_SIZES = "1M,4M"

#: Targets: op -> (fraction of memcpy, minimum speed-up over the reference or None), per device.
TARGETS: dict[str, dict[str, tuple[float, float | None]]] = {
    "cpu": {op: (0.60, 4.0) for op in ("quantize", "dequantize_accumulate", "nesterov")},
    "cuda": {op: (0.85, None) for op in ("quantize", "dequantize_accumulate", "nesterov")},
}

#: Peak temporary memory of the reference backend, in units of 4n bytes (fp32 copies of the
#: input), measured with ru_maxrss at n = 8M on torch 2.13 and rounded up. Used only to skip the
#: reference where it would not fit in memory.
REF_TEMP_FP32_COPIES = {
    "quantize": 7,
    "dequantize": 5,
    "dequantize_accumulate": 5,
    "encode_delta": 8,
    "nesterov": 3,
}


def byte_model(op: str, n: int, bits: int, block_size: int) -> tuple[int, int]:
    """(bytes read, bytes written) by one call on ``n`` elements: the traffic of an ideal
    single-pass kernel, which is what GB/s and the memcpy ceiling are computed from.

    codes = ceil(n * bits / 8) packed bytes, scales = 4 bytes per block of ``block_size``.

    * quantize:               reads x (4n);                   writes codes + scales
    * dequantize:             reads codes + scales;           writes out (4n)
    * dequantize_accumulate:  reads codes + scales + acc (4n); writes acc (4n)
    * encode_delta (fused):   reads global, local, ef (12n);  writes ef (4n) + codes + scales
    * nesterov:               reads param, momentum, grad (12n); writes param, momentum (8n)
    """
    q = ops.packed_nbytes(n, bits) + 4 * ops.num_blocks(n, block_size) if bits else 0
    model = {
        "quantize": (4 * n, q),
        "dequantize": (q, 4 * n),
        "dequantize_accumulate": (q + 4 * n, 4 * n),
        "encode_delta": (12 * n, 4 * n + q),
        "nesterov": (12 * n, 8 * n),
    }
    return model[op]


# --- part 1: kernels ----------------------------------------------------------------------------


def make_case(
    op: str, n: int, bits: int, block_size: int, device: torch.device
) -> Callable[[str], Callable[[], object]]:
    """Allocates the inputs of ``op`` and returns backend -> the call to time."""
    gen = torch.Generator(device=device).manual_seed(n + bits)

    def randn(scale: float = 1.0) -> torch.Tensor:
        x = torch.randn(n, generator=gen, device=device)
        return x.mul_(scale) if scale != 1.0 else x

    # NOTE: the compiled backends write into preallocated outputs (out=), as the dequantize rows
    # already do: a fresh 64M-element output costs more in first-touch page faults than the
    # kernel itself (quantize int8 at 256M: 220 ms allocating vs 69 ms into `out`, measured).
    # The reference allocates, as composed torch ops do.
    qout = ops.quantize(torch.zeros(n, device=device), bits, block_size) if op in ("quantize", "encode_delta") else None

    def out_for(b: str) -> ops.QTensor | None:
        return None if b == "reference" else qout

    if op == "quantize":
        x = randn()
        return lambda b: lambda: ops.quantize(x, bits, block_size, out=out_for(b), backend=b)
    if op in ("dequantize", "dequantize_accumulate"):
        q = ops.quantize(randn(), bits, block_size)  # any backend: all produce the same codes
        out = torch.zeros(n, device=device)
        if op == "dequantize":
            return lambda b: lambda: ops.dequantize(q, out=out, backend=b)
        return lambda b: lambda: ops.dequantize_accumulate_(out, q, backend=b)
    if op == "encode_delta":
        g = randn()
        local = g - randn(0.01)  # one inner round away from the global weights
        ef = torch.zeros(n, device=device)
        return lambda b: lambda: ops.encode_delta(
            g, local, ef, bits, block_size, out=out_for(b), backend=b
        )
    if op == "nesterov":
        p, m, grad = randn(), torch.zeros(n, device=device), randn(0.01)
        return lambda b: lambda: ops.nesterov_(p, m, grad, 0.7, 0.9, backend=b)
    raise ValueError(op)


def memcpy_case(nbytes: int, device: torch.device) -> Callable[[], object]:
    """dst.copy_(src) of ``nbytes // 2`` bytes: moves ``nbytes`` bytes read + written."""
    src = torch.ones(max(1, nbytes // 2), dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def target_verdict(
    op: str, device: str, backend: str, of_copy: float, vs_ref: float | None
) -> str | None:
    goal = TARGETS.get(device, {}).get(op)
    if goal is None or backend == "reference":
        return None
    bw, ref = goal
    missed = []
    if of_copy < bw:
        missed.append("bw")
    if ref is not None and vs_ref is not None and vs_ref < ref:
        missed.append("ref")
    if missed:
        return f"miss({','.join(missed)})"
    return "pass?" if ref is not None and vs_ref is None else "pass"


def resolve_backends(requested: list[str], device: torch.device) -> list[str]:
    avail = ops.available_backends(device)
    out = []
    for b in requested:
        if (b, device.type) in (("cuda", "cpu"), ("cpp", "cuda")):
            continue  # the other device's backend: not a missing one
        if b == "triton" and device.type == "cpu":
            print(
                "note: skipping backend 'triton' on cpu (only the slow TRITON_INTERPRET mode runs there)"
            )
        elif b not in avail:
            why = ""
            if b == "cpp" and hypha._ext.extension_error():
                why = f": hypha._C is not built ({hypha._ext.extension_error()})"
            print(
                f"note: skipping backend {b!r}, not available on {device.type}{why}; available: {avail}"
            )
        else:
            out.append(b)
    if "reference" not in out:
        print("note: the reference backend is not in --backends: no speed-up column")
    return out


def run_kernels(args: argparse.Namespace, rec: h.Recorder, device: torch.device) -> None:
    tk = h.timing_kwargs(args, device)
    backends = resolve_backends(args.backends.split(","), device)
    sizes = h.parse_sizes(args.sizes or (QUICK_SIZES if args.quick else DEFAULT_SIZES))
    bs = args.block_size
    ref_max = h.parse_sizes(args.ref_max_size)[0] if args.ref_max_size else None
    copy_name = "device copy" if device.type == "cuda" else "memcpy"
    table = rec.table(
        "kernels",
        [
            h.Column("op", "op", width=21),
            h.Column("bits", "bits"),
            h.Column("size", "size"),
            h.Column("backend", "backend", width=9),
            h.Column("ms", "ms", h.sig(4), width=8),
            h.Column("gbps", "GB/s", ".2f", width=6),
            h.Column("copy_gbps", f"{copy_name} GB/s", ".2f"),
            h.Column("of_copy", f"of {copy_name}", h.pct),
            h.Column("vs_ref", "vs ref", h.times),
            h.Column("target", "target", width=10),
            h.Column("spread", "spread", h.pct),
            h.Column("n", "n"),
            h.Column("note", "note"),
        ],
        title=f"Kernels on {device.type}, block size {bs}: GB/s = (bytes read + written) / median time "
        f"(byte model in byte_model()); '{copy_name}' moves the same bytes in the same run; "
        "spread = (max - min) / median of the n samples",
    )
    ops_sel = args.ops.split(",")
    bits_sel = [int(b) for b in args.bits.split(",")]
    if not backends:
        rec.note("no backend to run: kernels part skipped")
        return
    for n in sizes:
        for op in ops_sel:
            for bits in bits_sel if op in BITS_OPS else [0]:
                read, write = byte_model(op, n, bits, bs)
                need = 2 * (read + write)  # inputs/outputs, plus the memcpy buffers
                avail = h.mem_available(device)
                if need > 0.85 * avail:
                    rec.note(
                        f"skipped {op} bits={bits or '-'} at {h.fmt_size(n)}: needs ~{h.fmt_bytes(need)}, "
                        f"{h.fmt_bytes(avail)} available"
                    )
                    continue
                make = make_case(op, n, bits, bs, device)
                fns: dict[str, Callable[[], object]] = {"copy": memcpy_case(read + write, device)}
                notes: dict[str, str] = {}
                for b in backends:
                    if b == "reference":
                        ref_need = need + REF_TEMP_FP32_COPIES[op] * 4 * n
                        if ref_max is not None and n > ref_max:
                            notes["ref"] = (
                                f"reference skipped above {args.ref_max_size} (--ref-max-size)"
                            )
                            continue
                        if ref_need > 0.85 * avail:
                            notes["ref"] = f"reference skipped: needs ~{h.fmt_bytes(ref_need)}"
                            continue
                    fns[b] = make(b)
                if len(fns) == 1:
                    rec.note(f"skipped {op} bits={bits or '-'} at {h.fmt_size(n)}: {notes['ref']}")
                    continue
                t = h.measure(fns, **tk)
                copy_t = t.pop("copy")
                copy_gbps = (read + write) / copy_t.median / 1e9
                ref_t = t.get("reference")
                for b, tb in t.items():
                    vs_ref = ref_t.median / tb.median if ref_t is not None else None
                    of_copy = copy_t.median / tb.median
                    table.add(
                        op=op,
                        bits=bits or None,
                        size=h.fmt_size(n),
                        numel=n,
                        block_size=bs,
                        backend=b,
                        ms=tb.median * 1e3,
                        gbps=(read + write) / tb.median / 1e9,
                        copy_gbps=copy_gbps,
                        copy_ms=copy_t.median * 1e3,
                        of_copy=of_copy,
                        vs_ref=vs_ref,
                        target=target_verdict(op, device.type, b, of_copy, vs_ref),
                        spread=tb.spread,
                        n=tb.n,
                        inner=tb.inner,
                        min_ms=tb.min * 1e3,
                        max_ms=tb.max * 1e3,
                        bytes_read=read,
                        bytes_written=write,
                        note=notes.get("ref") if b != "reference" else None,
                    )
                del make, fns, t
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    verdicts = [r for r in table.rows if r.get("target")]
    if verdicts:
        passed = sum(r["target"].startswith("pass") for r in verdicts)
        goals = "; ".join(
            f"{op} >= {bw:.0%} of {copy_name}" + (f" and >= {ref:g}x the reference" if ref else "")
            for op, (bw, ref) in TARGETS[device.type].items()
        )
        rec.note(f"targets ({goals}): {passed}/{len(verdicts)} rows pass")
        misses = [
            f"{r['op']}/{r['bits'] or '-'}/{r['size']}/{r['backend']}"
            for r in verdicts
            if r["target"].startswith("miss")
        ]
        if misses:
            rec.note("misses: " + ", ".join(misses))


# --- part 2: the codec end to end ---------------------------------------------------------------


def _bodies(tensors: list[torch.Tensor], base: str, backend: str | None) -> list[bytes]:
    """The chunk bodies that the zstd stage compresses (a payload's chunks minus their heads)."""
    pieces = list(compress.iter_encode(tensors, base, backend=backend))
    return [piece[16:] for piece in pieces[1:]]


def run_codecs(args: argparse.Namespace, rec: h.Recorder, device: torch.device) -> None:
    import zstandard

    tk = h.timing_kwargs(args, device)
    backend = args.codec_backend or None
    used = ops.select_backend(device, backend)
    pg = pseudo_gradient()
    rec.note(describe(pg).replace("\n  ", "; "))
    target = h.parse_sizes(args.e2e_elems or ("4M" if args.quick else "16M"))[0]
    deltas = [d.to(device) for d in pg.deltas]
    tiled, k = tile(deltas, target)
    n_tiled = sum(t.numel() for t in tiled)
    link = args.link_mbps * 1e6
    rec.note(
        f"codec throughput on the pseudo-gradient tiled {k}x ({n_tiled:,} elements in {len(tiled)} "
        f"tensors on {device.type}, as a model with {k}x the layers); bits/param and error on the untiled "
        f"{pg.numel:,}-parameter pseudo-gradient. Kernels: {used!r} backend. GB/s count fp32 "
        f"input/output bytes (4 per element). Link: {args.link_mbps:g} MB/s (py-libp2p yamux as "
        "measured on this machine), i.e. 4 * 8 / (bits/param) * link in fp32 GB/s."
    )
    table = rec.table(
        "codec",
        [
            h.Column("codec", "codec", width=10),
            h.Column("bpp", "bits/param", ".3f"),
            h.Column("rel_err", "rel err", h.sig(3)),
            h.Column("enc_ms", "enc ms", h.sig(4)),
            h.Column("enc_gbps", "enc GB/s", ".3f"),
            h.Column("dec_gbps", "dec GB/s", ".3f"),
            h.Column("acc_gbps", "dec+acc GB/s", ".3f"),
            h.Column("zstd_c_ms", "zstd ms", h.sig(4)),
            h.Column("zstd_share", "zstd/enc", h.pct),
            h.Column("zstd_c_gbps", "zstd GB/s", ".3f"),
            h.Column("zstd_in_mbps", "zstd in MB/s", ".0f"),
            h.Column("zstd_d_gbps", "unzstd GB/s", ".3f"),
            h.Column("link_gbps", "link GB/s", ".3f"),
            h.Column("send_bottleneck", "send limit"),
            h.Column("recv_bottleneck", "recv limit"),
        ],
        title="Codec end to end (fp32-equivalent GB/s: 4 bytes per parameter). zstd = the zstd "
        "stage alone (compress / decompress of the chunk bodies); zstd/enc = its share of the "
        "+zstd encode; send/recv limit = slowest pipeline stage (quant = encode without zstd, "
        "zstd, link)",
    )
    zlevel = f":{args.zstd_level}" if args.zstd_level is not None else ""
    flat = pg.flat
    base_t: dict[str, dict[str, h.Timing]] = {}
    for base in args.codecs.split(","):
        for name in (base, f"{base}+zstd{zlevel}"):
            spec = compress.parse_codec(name)
            # bits/param and error on the real, untiled pseudo-gradient
            payload = compress.encode(deltas, spec, backend=backend)
            bpp = compress.bits_per_param(payload)
            dec = torch.cat([t.reshape(-1).cpu() for t in compress.decode(payload)])
            rel_err = float((flat - dec).norm() / flat.norm())
            # throughput on the tiled one
            big = compress.encode(tiled, spec, backend=backend)
            accs = [torch.zeros_like(t) for t in tiled]
            fns: dict[str, Callable[[], object]] = {
                "encode": lambda spec=spec: compress.encode(tiled, spec, backend=backend),
                "decode": lambda big=big: compress.decode(big, device=device),
                "decode+acc": lambda big=big, accs=accs: compress.decode_accumulate(big, accs),
            }
            if spec.zstd_level is not None:
                bodies = _bodies(tiled, base, backend)
                cctx = zstandard.ZstdCompressor(level=spec.zstd_level, write_content_size=True)
                frames = [cctx.compress(b) for b in bodies]
                dctx = zstandard.ZstdDecompressor()
                fns["zstd-c"] = lambda bodies=bodies, cctx=cctx: [cctx.compress(b) for b in bodies]
                fns["zstd-d"] = lambda frames=frames, bodies=bodies, dctx=dctx: [
                    dctx.decompress(f, max_output_size=len(b))
                    for f, b in zip(frames, bodies, strict=True)
                ]
            t = h.measure(fns, **tk)
            gb = 4 * n_tiled / 1e9
            link_gbps = link * 32 / bpp / 1e9
            row: dict[str, object] = {
                "codec": str(spec) + zlevel if spec.zstd_level is not None else str(spec),
                "zstd_level": spec.zstd_level,
                "block_size": spec.block_size if spec.quantized else None,
                "backend": used,
                "numel": n_tiled,
                "bpp": bpp,
                "rel_err": rel_err,
                "enc_ms": t["encode"].median * 1e3,
                "enc_gbps": gb / t["encode"].median,
                "dec_gbps": gb / t["decode"].median,
                "acc_gbps": gb / t["decode+acc"].median,
                "link_gbps": link_gbps,
                "spread_enc": t["encode"].spread,
                "n": t["encode"].n,
            }
            if spec.zstd_level is None:
                base_t[base] = t
                send = {"quant": gb / t["encode"].median, "link": link_gbps}
                recv = {"link": link_gbps, "dequant": gb / t["decode"].median}
            else:
                body_bytes = sum(len(b) for b in bodies)
                zc, zd = t["zstd-c"].median, t["zstd-d"].median
                row |= {
                    "zstd_c_ms": zc * 1e3,
                    "zstd_share": zc / t["encode"].median,
                    "zstd_c_gbps": gb / zc,
                    "zstd_in_mbps": body_bytes / zc / 1e6,
                    "zstd_d_gbps": gb / zd,
                    "zstd_ratio": body_bytes / max(1, sum(len(f) for f in frames)),
                }
                # the rest of the pipeline is the same codec without zstd, timed just before
                rest = base_t.get(base, t)
                send = {"quant": gb / rest["encode"].median, "zstd": gb / zc, "link": link_gbps}
                recv = {"link": link_gbps, "unzstd": gb / zd, "dequant": gb / rest["decode"].median}
            row["send_bottleneck"] = min(send, key=send.__getitem__)
            row["recv_bottleneck"] = min(recv, key=recv.__getitem__)
            row["send_gbps"] = min(send.values())
            row["recv_gbps"] = min(recv.values())
            table.add(**row)
            del fns, t, big, accs, payload, dec
            gc.collect()
    zrows = [r for r in table.rows if r.get("zstd_c_gbps") is not None]
    slow = [
        r["codec"]
        for r in zrows
        if r["send_bottleneck"] == "zstd" or r["recv_bottleneck"] == "unzstd"
    ]
    if zrows:
        rec.note(
            "zstd is the pipeline bottleneck for: "
            + (", ".join(slow) if slow else "none of the codecs")
            + f" (vs. the quantize stage and a {args.link_mbps:g} MB/s link)"
        )
        worth = [
            f"{r['codec']} ({r['zstd_ratio']:.2f}x smaller)"
            for r in zrows
            if r.get("zstd_ratio", 1) >= 1.05
        ]
        rec.note("zstd saves >= 5% of the bytes for: " + (", ".join(worth) if worth else "none"))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument(
        "--sizes",
        default=None,
        help=f"element counts, default {DEFAULT_SIZES} ({QUICK_SIZES} with --quick)",
    )
    ap.add_argument(
        "--backends",
        default="reference,cpp,cuda,triton",
        help="unavailable ones are skipped with a note",
    )
    ap.add_argument("--ops", default=",".join(OPS))
    ap.add_argument("--bits", default="8,4,2")
    ap.add_argument("--block-size", type=int, default=ops.DEFAULT_BLOCK_SIZE)
    ap.add_argument(
        "--ref-max-size",
        default=None,
        help="skip the reference above this size (default: run it wherever it fits in memory)",
    )
    ap.add_argument("--skip-kernels", action="store_true", help="only the codec part")
    ap.add_argument("--skip-codec", action="store_true", help="only the kernels part")
    ap.add_argument(
        "--codecs", default="fp32,bf16,int8,int4,int2", help="each runs with and without +zstd"
    )
    ap.add_argument(
        "--zstd-level", type=int, default=None, help="default: the codec's default level"
    )
    ap.add_argument(
        "--codec-backend", default=None, help="kernel backend under the codec (default: auto)"
    )
    ap.add_argument(
        "--e2e-elems",
        default=None,
        help="tile the pseudo-gradient to this many elements (default 16M; 4M with --quick)",
    )
    ap.add_argument(
        "--link-mbps",
        type=float,
        default=200.0,
        help="network link in MB/s (default 200: py-libp2p yamux here)",
    )
    h.add_common_args(ap)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    rec = h.recorder("kernels", args, device)
    if hypha._ext.extension_error():
        rec.note(
            f"hypha._C is not loaded ({hypha._ext.extension_error()}): no 'cpp'/'cuda' backend"
        )
    if not args.skip_kernels:
        run_kernels(args, rec, device)
    if not args.skip_codec:
        run_codecs(args, rec, device)
    rec.save()


if __name__ == "__main__":
    main()
