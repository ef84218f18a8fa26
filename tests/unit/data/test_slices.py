"""Reading datasets: the manifest is validated in full, a tampered or truncated slice is caught,
and slice bytes from the network are checked before they are trusted (a header that lies about
its length, dtypes and shapes the manifest does not declare, offsets that do not tile the data)."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save

from hypha.data import (
    Dataset,
    DatasetError,
    Manifest,
    load_slice_bytes,
    prepare_images,
    prepare_text,
)


@pytest.fixture
def text_ds(tmp_path: Path) -> Dataset:
    (tmp_path / "t.txt").write_bytes(bytes(range(32, 127)) * 4)
    prepare_text([tmp_path / "t.txt"], "t", tmp_path / "out", slice_tokens=64, seq_len=16)
    return Dataset.open(tmp_path / "out" / "t")


@pytest.fixture
def image_ds(tmp_path: Path) -> Dataset:
    images = np.arange(6 * 2 * 2 * 3, dtype=np.uint8).reshape(6, 2, 2, 3)
    np.savez(tmp_path / "i.npz", images=images, labels=np.array([0, 1, 2, 0, 1, 2]))
    prepare_images(tmp_path / "i.npz", "i", tmp_path / "out", slice_examples=4)
    return Dataset.open(tmp_path / "out" / "i")


def header_of(data: bytes) -> dict[str, Any]:
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n])


def with_header(header: dict[str, Any], body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + body


# ----------------------------------------------------------------------------------------------
# Dataset on disk


def test_open_and_read(text_ds: Dataset, image_ds: Dataset) -> None:
    assert (text_ds.name, text_ds.kind, len(text_ds)) == ("t", "text", text_ds.num_slices)
    assert "kind='text'" in repr(text_ds)
    text_ds.verify()
    image_ds.verify()
    s = image_ds.slice(1)
    assert set(s) == {"images", "labels"}
    assert tuple(s["images"].shape) == (2, 2, 2, 3) and s["labels"].dtype == torch.int64
    with pytest.raises(DatasetError, match=r"has 2 slices .*there is no slice 2"):
        image_ds.slice(2)


def test_tampered_slice(text_ds: Dataset) -> None:
    path = text_ds.path / "slice-00001.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # same size, one bit of one token flipped
    path.write_bytes(bytes(data))
    text_ds.slice(0)  # the others are fine
    with pytest.raises(DatasetError, match="slice 1's SHA-256 does not match the manifest"):
        text_ds.slice(1)
    with pytest.raises(DatasetError, match="SHA-256"):
        text_ds.verify()


def test_truncated_or_missing_slice(text_ds: Dataset) -> None:
    path = text_ds.path / "slice-00000.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(DatasetError, match=r"slice 0 is \d+ bytes, the manifest says \d+ \(trunc"):
        Dataset.open(text_ds.path)
    with pytest.raises(DatasetError, match="truncated"):
        text_ds.slice_bytes(0)  # a file that shrank after opening
    path.unlink()
    with pytest.raises(DatasetError, match="slice 0 is missing"):
        Dataset.open(text_ds.path)


def test_open_refusals(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no such dataset"):
        Dataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match=r"no manifest.json in it"):
        Dataset.open(tmp_path / "empty")
    (tmp_path / "empty" / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match=r"manifest.json: manifest is not valid JSON"):
        Dataset.open(tmp_path / "empty")


Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def apply(d: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        for p in parents:
            d = d[int(p)] if p.isdigit() else d[p]  # type: ignore[index]
        d[int(last) if last.isdigit() else last] = value  # type: ignore[index]

    return apply


def _delete(key: str) -> Mutation:
    return lambda d: d.pop(key) and None


BAD_MANIFESTS: list[tuple[str, Mutation, str]] = [
    ("unknown-key", _set("extra", 1), "manifest: unknown key 'extra'"),
    (
        "unknown-slice-key",
        _set("slices.0.owner", "x"),
        r"manifest.slices\[0\]: unknown key 'owner'",
    ),
    ("missing-key", _delete("created"), "missing key 'created'"),
    ("newer-version", _set("version", 2), "version 2 is not supported.*newer Hypha"),
    ("bool-version", _set("version", True), "version True is not supported"),
    ("format", _set("format", "npz"), "not a Hypha dataset manifest"),
    ("kind", _set("kind", "audio"), "kind must be one of text, images"),
    ("kind-section", _set("kind", "images"), "unknown key 'text'"),
    ("num-slices", _set("num_slices", 7), "num_slices is 7 but the slices add up to"),
    ("num-examples", _set("num_examples", 1), "num_examples is 1 but"),
    ("examples", _set("slices.0.examples", 0), r"slices\[0\].examples: must be at least 1"),
    ("bool-int", _set("slices.0.examples", True), "expected an integer, got True"),
    ("file-escape", _set("slices.0.file", "../../etc/passwd"), r"expected 'slice-00000"),
    ("sha", _set("slices.0.sha256", "XYZ"), "64 lowercase hex digits"),
    (
        "tensors",
        _set("tensors", {"tokens": {"dtype": "float32", "shape": [17]}}),
        "manifest.tensors: a text dataset",
    ),
    ("vocab", _set("text.vocab", 512), "byte-level text has vocab 256"),
    ("seq-len", _set("text.seq_len", 0), "seq_len: must be at least 1"),
    ("total-tokens", _set("text.total_tokens", 10), "tokens cannot fill"),
    ("name", _set("name", "../x"), "invalid dataset name"),
    ("created", _set("created", "yesterday"), "ISO 8601"),
    ("no-slices", _set("slices", []), "non-empty list"),
    ("not-object", lambda d: d.clear(), "not a Hypha dataset manifest"),
]


@pytest.mark.parametrize(
    ("mutate", "message"), [b[1:] for b in BAD_MANIFESTS], ids=[b[0] for b in BAD_MANIFESTS]
)
def test_bad_manifest(text_ds: Dataset, mutate: Mutation, message: str) -> None:
    path = text_ds.path / "manifest.json"
    d = json.loads(path.read_text())
    mutate(d)
    path.write_text(json.dumps(d))
    with pytest.raises(DatasetError, match=message):
        Dataset.open(text_ds.path)


def test_manifest_oddities() -> None:
    with pytest.raises(DatasetError, match="duplicate key 'name'"):
        Manifest.from_json('{"name": "a", "name": "b"}')
    with pytest.raises(DatasetError, match="expected a JSON object, got list"):
        Manifest.from_dict([])


def test_bad_image_manifest(image_ds: Dataset) -> None:
    d = image_ds.manifest.to_dict()
    for mutate, message in [
        (_set("images.classes", []), "non-empty list"),
        (_set("images.classes", ["a", "a", "b"]), "must be unique"),
        (_set("images.shape", [2, 2, 5]), "channels must be 1 to 4"),
        (_set("images.shape", [2, 2]), r"expected \[height, width, channels\]"),
    ]:
        bad = json.loads(json.dumps(d))
        mutate(bad)
        with pytest.raises(DatasetError, match=message):
            Manifest.from_dict(bad)


# ----------------------------------------------------------------------------------------------
# slices from the network


def test_load_slice_bytes_round_trip(text_ds: Dataset, image_ds: Dataset) -> None:
    for ds in (text_ds, image_ds):
        for i in range(len(ds)):
            data = ds.slice_bytes(i)
            a = load_slice_bytes(data, ds.manifest, index=i)
            b = load_slice_bytes(bytearray(data), ds.manifest.to_dict())  # a plain dict will do
            for name, t in ds.slice(i).items():
                assert torch.equal(a[name], t) and torch.equal(b[name], t)


def test_with_index_checks_size_and_hash(text_ds: Dataset) -> None:
    data = text_ds.slice_bytes(0)
    with pytest.raises(DatasetError, match="got 10 bytes, the manifest says"):
        load_slice_bytes(data[:10], text_ds.manifest, index=0)
    if len(text_ds) > 1 and len(text_ds.slice_bytes(1)) == len(data):
        with pytest.raises(DatasetError, match="does not match the manifest's"):
            load_slice_bytes(text_ds.slice_bytes(1), text_ds.manifest, index=0)
    flipped = bytearray(data)
    flipped[-1] ^= 0xFF
    with pytest.raises(DatasetError, match="corrupted or tampered"):
        load_slice_bytes(bytes(flipped), text_ds.manifest, index=0)
    with pytest.raises(DatasetError, match="there is no slice 99"):
        load_slice_bytes(data, text_ds.manifest, index=99)


def test_header_length_lies(text_ds: Dataset) -> None:
    data = text_ds.slice_bytes(0)
    (n,) = struct.unpack("<Q", data[:8])
    for claimed in (len(data) - 7, 2**64 - 1):
        with pytest.raises(DatasetError, match=f"header claims {claimed} bytes but only"):
            load_slice_bytes(struct.pack("<Q", claimed) + data[8:], text_ds.manifest)
    for claimed in (n - 1, n + 1, len(data) - 8):  # in bounds, but wrong: caught all the same
        with pytest.raises(DatasetError):
            load_slice_bytes(struct.pack("<Q", claimed) + data[8:], text_ds.manifest)
    with pytest.raises(DatasetError, match="too short"):
        load_slice_bytes(data[:5], text_ds.manifest)
    big = with_header({"pad": "x" * 100_000}, b"")
    with pytest.raises(DatasetError, match="over the 65536 allowed"):
        load_slice_bytes(big, text_ds.manifest)
    with pytest.raises(DatasetError, match="not valid JSON"):
        load_slice_bytes(struct.pack("<Q", 4) + b"{{{{", text_ds.manifest)
    with pytest.raises(DatasetError, match="not a JSON object"):
        load_slice_bytes(struct.pack("<Q", 2) + b"[]", text_ds.manifest)


def test_undeclared_dtypes_and_shapes(text_ds: Dataset, image_ds: Dataset) -> None:
    m = text_ds.manifest
    cases = [
        (
            {"tokens": torch.zeros(2, 17, dtype=torch.float32)},
            "has dtype 'F32'; the manifest declares uint8",
        ),
        ({"tokens": torch.zeros(2, 17, dtype=torch.int64)}, "has dtype 'I64'"),
        ({"tokens": torch.zeros(2, 16, dtype=torch.uint8)}, r"has shape \[2, 16\]"),
        ({"tokens": torch.zeros(17, dtype=torch.uint8)}, r"has shape \[17\]"),
        ({"tokens": torch.zeros(0, 17, dtype=torch.uint8)}, r"has shape \[0, 17\]"),
        (
            {"tokens": torch.zeros(2, 17, dtype=torch.uint8), "extra": torch.zeros(1)},
            r"holds tensors \['extra', 'tokens'\], the manifest declares \['tokens'\]",
        ),
        ({"other": torch.zeros(2, 17, dtype=torch.uint8)}, "holds tensors"),
    ]
    for tensors, message in cases:
        with pytest.raises(DatasetError, match=message):
            load_slice_bytes(save(tensors), m)
    im = image_ds.manifest
    with pytest.raises(
        DatasetError, match=r"different numbers of examples \(3 and 4\)|\(4 and 3\)"
    ):
        load_slice_bytes(
            save(
                {
                    "images": torch.zeros(3, 2, 2, 3, dtype=torch.uint8),
                    "labels": torch.zeros(4, dtype=torch.int64),
                }
            ),
            im,
        )
    with pytest.raises(DatasetError, match="label 3 names no class"):
        load_slice_bytes(
            save(
                {
                    "images": torch.zeros(2, 2, 2, 3, dtype=torch.uint8),
                    "labels": torch.tensor([0, 3]),
                }
            ),
            im,
        )
    other = save(
        {"images": torch.zeros(2, 2, 2, 3, dtype=torch.uint8), "labels": torch.tensor([0, 1])}
    )
    first = {
        **im.slices[0].to_dict(),
        "bytes": len(other),
        "sha256": hashlib.sha256(other).hexdigest(),
    }
    fake = Manifest.from_dict({**im.to_dict(), "slices": [first, im.slices[1].to_dict()]})
    with pytest.raises(DatasetError, match="holds 2 examples, the manifest says 4"):
        load_slice_bytes(other, fake, index=0)


def test_offsets_must_tile_the_data(text_ds: Dataset) -> None:
    m = text_ds.manifest
    body = bytes(34)
    good = {"tokens": {"dtype": "U8", "shape": [2, 17], "data_offsets": [0, 34]}}
    assert load_slice_bytes(with_header(good, body), m)["tokens"].shape == (2, 17)
    for offsets, message in [
        ([0, 35], "outside the 34 data bytes"),
        ([1, 35], "outside"),
        ([0, 33], "spans 33 bytes; its shape needs 34"),
        ([-1, 33], "outside"),
        ([0], "outside"),
        ("0-34", "outside"),
    ]:
        bad = {"tokens": {**good["tokens"], "data_offsets": offsets}}
        with pytest.raises(DatasetError, match=message):
            load_slice_bytes(with_header(bad, body), m)
    with pytest.raises(DatasetError, match="2 bytes after the last tensor's data"):
        load_slice_bytes(with_header(good, body + b"xx"), m)
    with pytest.raises(DatasetError, match="malformed header entry"):
        load_slice_bytes(with_header({"tokens": {**good["tokens"], "x": 1}}, body), m)
    with pytest.raises(DatasetError, match="__metadata__"):
        load_slice_bytes(with_header({**good, "__metadata__": {"a": 1}}, body), m)
    meta = {**good, "__metadata__": {"source": "test"}}
    assert load_slice_bytes(with_header(meta, body), m)["tokens"].shape == (2, 17)


def test_random_corruption_is_always_a_dataset_error(image_ds: Dataset) -> None:
    """Cut or flip bytes anywhere (no index, so no hash to hide behind): a DatasetError or a
    valid slice, never anything else."""
    rng = np.random.default_rng(0)
    data = image_ds.slice_bytes(0)
    for _ in range(300):
        bad = bytearray(data)
        if rng.random() < 0.3:
            bad = bad[: int(rng.integers(0, len(bad)))]
        else:
            for _ in range(int(rng.integers(1, 4))):
                bad[int(rng.integers(0, len(bad)))] = int(rng.integers(0, 256))
        try:
            out = load_slice_bytes(bytes(bad), image_ds.manifest)
        except DatasetError:
            continue
        assert set(out) == {"images", "labels"}
