"""The data node's command line: ``prepare`` datasets, ``verify`` them, ``init`` and ``run`` the node.

python -m hypha.data prepare text --input PATH [PATH ...] --name NAME --out DIR
                                  [--slice-tokens N] [--seq-len L] [--force]
python -m hypha.data prepare text --builtin python-stdlib --out DIR [--name NAME] ...
python -m hypha.data prepare images --input FILE.npz|DIR --name NAME --out DIR
                                    [--slice-examples N] [--seed N] [--no-shuffle] [--force]
python -m hypha.data verify DIR/NAME [DIR/NAME ...]
python -m hypha.data init [--config hypha-data.toml] [--force]
python -m hypha.data run [--config PATH] [--data-datasets DIR ...] [--tls-cert PATH ...]

``init`` and ``run`` are every role's (:class:`hypha.rolecli.RoleCLI`); ``run`` starts
:mod:`hypha.data.node`. Every bad input ends with ``hypha data: error: ...`` on stderr and exit
status 2.
"""

# NOTE: unlike the other roles, a bare `python -m hypha.data` prints the usage instead of running
# the node: the data node's command line began as a preparation tool, and a typo'd `prepare`
# must not start a node. `run` is spelled out, or implied by a leading flag (`--config ...`).

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from hypha.data.config import DataConfig
from hypha.data.prepare import (
    BUILTIN_CORPORA,
    DEFAULT_SEQ_LEN,
    DEFAULT_SLICE_EXAMPLES,
    DEFAULT_SLICE_TOKENS,
    prepare_builtin_text,
    prepare_images,
    prepare_text,
)
from hypha.data.slices import Dataset, DatasetError, Manifest
from hypha.rolecli import RaisingParser, RoleCLI, UsageError

__all__ = ["CLI", "PROG", "main"]

CLI = RoleCLI(
    role="data",
    schema=DataConfig,
    node_module="hypha.data.node",
    description="Hypha data node: announces prepared datasets in the DHT and streams their "
    "slices to workers.",
    init_hint="fill in [tls], network.bootstrap and data.datasets",
)

PROG = "python -m hypha.data"
_ERROR = "hypha data: error:"
_NODE_COMMANDS = ("init", "run")




def main(argv: Sequence[str] | None = None) -> int:
    """Run the data node's command line with ``argv`` (default ``sys.argv[1:]``)."""
    args_list = list(sys.argv[1:] if argv is None else argv)
    if args_list and (args_list[0] in _NODE_COMMANDS
                      or (args_list[0].startswith("-") and args_list[0] not in ("-h", "--help"))):
        return CLI.main(args_list)
    parser = _build_parser()
    try:
        try:
            args = parser.parse_args(args_list)
        except SystemExit as exc:  # --help printed; return instead of exiting
            return exc.code if isinstance(exc.code, int) else 0
        if getattr(args, "run", None) is None:
            (args.usage_parser if hasattr(args, "usage_parser") else parser).print_help(sys.stderr)
            return 2
        return int(args.run(args))
    except UsageError as exc:
        exc.parser.print_usage(sys.stderr)
        print(f"{_ERROR} {exc}", file=sys.stderr)
        return 2
    except DatasetError as exc:
        print(f"{_ERROR} {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def _build_parser() -> argparse.ArgumentParser:
    parser = RaisingParser(
        prog=PROG,
        description="Hypha data node: prepare datasets as SafeTensors slices, and serve them to "
        "workers.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=RaisingParser)
    # NOTE: listed for --help only; main() hands `init` and `run` to CLI before parsing.
    commands.add_parser("init", help="write a commented config file for the node")
    commands.add_parser("run", help="start the data node: announce the datasets, serve slices "
                        "(see `run --help`)")
    prepare = commands.add_parser(
        "prepare",
        help="turn a text corpus or labelled images into a dataset of slices",
        description="Turn a corpus into DIR/NAME/manifest.json and DIR/NAME/slice-*.safetensors.",
    )
    prepare.set_defaults(usage_parser=prepare)
    kinds = prepare.add_subparsers(dest="kind", metavar="KIND", parser_class=RaisingParser)

    text = kinds.add_parser(
        "text",
        help="byte-level text: sequences of --seq-len + 1 tokens (0..255)",
        description="Prepare a byte-level text dataset. Files are read as UTF-8 bytes in a fixed "
        "order (inputs as given, each directory's files sorted by path), each followed by byte "
        "0 (end of document), and cut into sequences of SEQ_LEN + 1 tokens (inputs and "
        "next-token targets) that overlap by one. --builtin needs no download: "
        + "; ".join(f"{n}: {c.description}" for n, c in BUILTIN_CORPORA.items())
        + " (the top-level modules of this Python's standard library, a fixed selection).",
    )
    source = text.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--input",
        nargs="+",
        action="extend",
        type=Path,
        metavar="PATH",
        help="text files, or directories read recursively for "
        ".txt/.md/.rst/.py/... files (hidden ones skipped)",
    )
    source.add_argument(
        "--builtin", choices=sorted(BUILTIN_CORPORA), help="a corpus that ships with Python"
    )
    text.add_argument(
        "--name", help="the dataset's name (required with --input; default: the --builtin name)"
    )
    text.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where to create the dataset directory NAME",
    )
    text.add_argument(
        "--slice-tokens",
        type=_positive,
        default=DEFAULT_SLICE_TOKENS,
        metavar="N",
        help=f"tokens per slice, rounded down to whole sequences (default: {DEFAULT_SLICE_TOKENS})",
    )
    text.add_argument(
        "--seq-len",
        type=_positive,
        default=DEFAULT_SEQ_LEN,
        metavar="L",
        help=f"tokens per training sequence (default: {DEFAULT_SEQ_LEN})",
    )
    text.add_argument("--force", action="store_true", help="replace an existing dataset NAME")
    text.set_defaults(run=_cmd_text, usage_parser=text)

    images = kinds.add_parser(
        "images",
        help="labelled images from an .npz or a folder of class folders",
        description="Prepare a labelled image dataset from an .npz (arrays images: uint8 "
        "[N,H,W] or [N,H,W,C], labels: int [N], optional classes: str [K]) or a folder "
        "ROOT/CLASS/*.png|*.ppm|*.pgm (8-bit PNG: gray, gray+alpha, RGB, RGBA, not interlaced; "
        "binary PGM/PPM). All images must share one shape. Examples are shuffled with --seed so "
        "that each slice mixes the classes.",
    )
    images.add_argument(
        "--input",
        type=Path,
        required=True,
        metavar="FILE_OR_DIR",
        help="an .npz file or a folder of class folders",
    )
    images.add_argument("--name", required=True, help="the dataset's name")
    images.add_argument(
        "--out",
        type=Path,
        required=True,
        metavar="DIR",
        help="where to create the dataset directory NAME",
    )
    images.add_argument(
        "--slice-examples",
        type=_positive,
        default=DEFAULT_SLICE_EXAMPLES,
        metavar="N",
        help=f"images per slice (default: {DEFAULT_SLICE_EXAMPLES})",
    )
    images.add_argument(
        "--seed", type=_non_negative, default=0, help="seed of the shuffle (default: 0)"
    )
    images.add_argument(
        "--no-shuffle", dest="shuffle", action="store_false", help="keep the input order"
    )
    images.add_argument("--force", action="store_true", help="replace an existing dataset NAME")
    images.set_defaults(run=_cmd_images)

    verify = commands.add_parser(
        "verify",
        help="check a dataset's manifest and every slice's SHA-256 and layout",
        description="Check a dataset's manifest and read every slice, checking its SHA-256 and "
        "its tensors against the manifest.",
    )
    verify.add_argument("datasets", nargs="+", type=Path, metavar="DIR/NAME")
    verify.set_defaults(run=_cmd_verify)
    return parser


def _cmd_text(args: argparse.Namespace) -> int:
    if args.input is not None and args.name is None:
        raise UsageError("--name is required with --input", args.usage_parser)
    if args.builtin is not None:
        manifest = prepare_builtin_text(
            args.builtin,
            args.out,
            name=args.name,
            slice_tokens=args.slice_tokens,
            seq_len=args.seq_len,
            force=args.force,
        )
    else:
        manifest = prepare_text(
            args.input,
            args.name,
            args.out,
            slice_tokens=args.slice_tokens,
            seq_len=args.seq_len,
            force=args.force,
        )
    _report(args.out, manifest)
    return 0


def _cmd_images(args: argparse.Namespace) -> int:
    manifest = prepare_images(
        args.input,
        args.name,
        args.out,
        slice_examples=args.slice_examples,
        seed=args.seed,
        shuffle=args.shuffle,
        force=args.force,
    )
    _report(args.out, manifest)
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    for path in args.datasets:
        dataset = Dataset.open(path)
        dataset.verify()
        print(f"{path}: ok: {_summary(dataset.manifest)}")
    return 0


def _report(out: Path, manifest: Manifest) -> None:
    print(
        f"prepared {manifest.kind} dataset {manifest.name!r} in {out / manifest.name}: "
        f"{_summary(manifest)}"
    )


def _summary(m: Manifest) -> str:
    slices = f"{m.num_slices} slice{'s' if m.num_slices != 1 else ''}"
    if m.text is not None:
        return (
            f"{slices}, {m.num_examples:,} sequences of {m.text.seq_len} tokens "
            f"({m.text.total_tokens:,} tokens from {m.text.files} files)"
        )
    assert m.images is not None
    h, w, c = m.images.shape
    return f"{slices}, {m.num_examples:,} images of {h}x{w}x{c} in {len(m.images.classes)} classes"
