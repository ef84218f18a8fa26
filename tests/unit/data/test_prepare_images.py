"""prepare images: from an .npz and from a folder of PNG/PGM/PPM class folders; every image
and label arrives in the slices (shuffled with the seed), and bad input is refused clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from hypha.data import Dataset, DatasetError, prepare_images
from tests.unit.data._images import encode_png, random_image, write_image


def read_all(ds: Dataset) -> tuple[np.ndarray, np.ndarray]:
    parts = [ds.slice(i) for i in range(len(ds))]
    images = np.concatenate([p["images"].numpy() for p in parts])
    labels = np.concatenate([p["labels"].numpy() for p in parts])
    return images, labels


def test_npz_gray(tmp_path: Path) -> None:
    n = 50
    images = np.stack([np.full((4, 6), i, np.uint8) for i in range(n)])  # image i is all i
    labels = np.arange(n) % 3
    np.savez(tmp_path / "g.npz", images=images, labels=labels.astype(np.int32))
    m = prepare_images(tmp_path / "g.npz", "g", tmp_path / "out", slice_examples=16, seed=7)
    assert m.kind == "images" and m.images is not None
    assert m.images.classes == ("0", "1", "2") and m.images.shape == (4, 6, 1)
    assert [s.examples for s in m.slices] == [16, 16, 16, 2]
    got_images, got_labels = read_all(Dataset.open(tmp_path / "out" / "g"))
    order = np.random.default_rng(7).permutation(n)
    assert got_images.shape == (n, 4, 6, 1) and got_images.dtype == np.uint8
    assert got_labels.dtype == np.int64
    assert np.array_equal(got_images[:, 0, 0, 0], order)  # shuffled with the seed
    assert np.array_equal(got_labels, order % 3)  # labels travel with their images
    assert np.array_equal(got_images[:, :, :, 0], images[order])


def test_npz_rgb_with_classes_and_no_shuffle(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 3, 5, 3), dtype=np.uint8)
    labels = np.array([0, 1] * 5, np.uint8)
    np.savez(tmp_path / "c.npz", images=images, labels=labels, classes=np.array(["cat", "dog"]))
    m = prepare_images(tmp_path / "c.npz", "c", tmp_path, slice_examples=4, shuffle=False)
    assert m.images is not None and m.images.classes == ("cat", "dog")
    got_images, got_labels = read_all(Dataset.open(tmp_path / "c"))
    assert np.array_equal(got_images, images) and np.array_equal(got_labels, labels)


def test_folder_of_png_and_ppm(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    root = tmp_path / "pets"
    originals = {}
    for cls, names in {
        "cat": ["a.png", "b.ppm"],
        "dog": ["c.PNG"],
        "emu": ["d.ppm", "e.png"],
    }.items():
        for name in names:
            image = random_image(rng, 5, 7, 3)
            write_image(root / cls / name, image)
            originals[image.tobytes()] = cls
    (root / "README.txt").write_text("a note at the top is fine")
    (root / ".DS_Store").write_text("hidden: ignored")
    m = prepare_images(root, "pets", tmp_path / "out", slice_examples=2)
    assert m.images is not None
    assert m.images.classes == ("cat", "dog", "emu") and m.images.shape == (5, 7, 3)
    assert m.num_examples == 5 and m.num_slices == 3
    got_images, got_labels = read_all(Dataset.open(tmp_path / "out" / "pets"))
    seen = {
        img.tobytes(): m.images.classes[int(label)]
        for img, label in zip(got_images, got_labels, strict=True)
    }
    assert seen == originals


def test_folder_of_pgm_and_gray_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    a, b = random_image(rng, 4, 4, 1), random_image(rng, 4, 4, 1)
    write_image(tmp_path / "d" / "zero" / "a.pgm", a)
    write_image(tmp_path / "d" / "one" / "b.png", b)
    m = prepare_images(tmp_path / "d", "gray", tmp_path, shuffle=False)
    assert m.images is not None and m.images.classes == ("one", "zero")  # sorted
    images, labels = read_all(Dataset.open(tmp_path / "gray"))
    assert np.array_equal(images, np.stack([b, a])) and labels.tolist() == [0, 1]


def test_folder_of_gray_alpha_png(tmp_path: Path) -> None:
    image = random_image(np.random.default_rng(5), 3, 2, 2)
    write_image(tmp_path / "d" / "only" / "a.png", image)
    m = prepare_images(tmp_path / "d", "la", tmp_path)
    assert m.images is not None and m.images.shape == (3, 2, 2)
    assert np.array_equal(read_all(Dataset.open(tmp_path / "la"))[0][0], image)


def test_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    for i in range(6):
        write_image(tmp_path / "src" / f"c{i % 2}" / f"{i}.png", random_image(rng, 3, 3, 4))
    a = prepare_images(tmp_path / "src", "x", tmp_path / "a", slice_examples=4)
    b = prepare_images(tmp_path / "src", "x", tmp_path / "b", slice_examples=4)
    assert a.slices == b.slices
    c = prepare_images(tmp_path / "src", "x", tmp_path / "c", slice_examples=4, seed=1)
    assert c.slices != a.slices


def test_shape_mismatch_names_the_file(tmp_path: Path) -> None:
    write_image(tmp_path / "d" / "a" / "1.ppm", np.zeros((4, 4, 3), np.uint8))
    write_image(tmp_path / "d" / "b" / "2.pgm", np.zeros((4, 4, 1), np.uint8))
    with pytest.raises(DatasetError, match=r"is 4x4x(1|3) but .* is 4x4x(3|1); all images must"):
        prepare_images(tmp_path / "d", "x", tmp_path / "out", shuffle=False)
    with pytest.raises(DatasetError, match=r"2\.pgm: image is 4x4x1 but .*1\.ppm is 4x4x3"):
        prepare_images(tmp_path / "d", "x", tmp_path / "out", shuffle=False)
    assert list((tmp_path / "out").iterdir()) == []


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"a/x.jpg": b"\xff\xd8"}, r"x\.jpg: unsupported image format '\.jpg'"),
        ({"x.png": None}, r"x\.png: images go in one folder per class"),
        ({"a/sub/x.png": None}, r"sub: folders inside a class folder are not supported"),
        ({"a/x.png": None, "b/.keep": b""}, r"b: class folder holds no images"),
        ({"notes.txt": b"hi"}, r"no class folders"),
        ({"a/x.png": b"\x89PNG\r\n\x1a\n"}, r"x\.png: truncated PNG"),
        ({"a/x.pgm": b"P2\n1 1\n255\n0"}, r"x\.pgm: ASCII PGM/PPM"),
    ],
    ids=["jpeg", "image-in-root", "nested", "empty-class", "no-classes", "bad-png", "ascii-pgm"],
)
def test_folder_refusals(tmp_path: Path, files: dict[str, bytes | None], message: str) -> None:
    root = tmp_path / "src"
    root.mkdir()
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(np.zeros((2, 2, 1), np.uint8)) if data is None else data)
    with pytest.raises(DatasetError, match=message):
        prepare_images(root, "x", tmp_path / "out")
    assert not (tmp_path / "out" / "x").exists()


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"images": np.zeros((2, 3, 3), np.uint8)}, r"no array 'labels' \(it holds: images\)"),
        ({"images": np.zeros((2, 3, 3)), "labels": np.zeros(2, int)}, r"must be uint8"),
        (
            {"images": np.zeros((2, 3, 3, 5), np.uint8), "labels": np.zeros(2, int)},
            r"1 to 4 channels",
        ),
        (
            {"images": np.zeros((0, 3, 3), np.uint8), "labels": np.zeros(0, int)},
            r"at least one image",
        ),
        (
            {"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(3, int)},
            r"labels must be integers \[N\] with N = 2",
        ),
        (
            {"images": np.zeros((2, 3, 3), np.uint8), "labels": np.zeros(2)},
            r"labels must be integers",
        ),
        (
            {"images": np.zeros((2, 3, 3), np.uint8), "labels": np.array([0, -1])},
            r"must not be negative",
        ),
        (
            {
                "images": np.zeros((2, 3, 3), np.uint8),
                "labels": np.array([0, 2]),
                "classes": np.array(["a", "b"]),
            },
            r"label 2 names no class",
        ),
        (
            {
                "images": np.zeros((2, 3, 3), np.uint8),
                "labels": np.array([0, 1]),
                "classes": np.array(["a", "a"]),
            },
            r"unique",
        ),
    ],
    ids=[
        "no-labels",
        "float-images",
        "five-channels",
        "empty",
        "length",
        "float-labels",
        "negative",
        "label-range",
        "duplicate-classes",
    ],
)
def test_npz_refusals(tmp_path: Path, arrays: dict[str, np.ndarray], message: str) -> None:
    np.savez(tmp_path / "in.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        prepare_images(tmp_path / "in.npz", "x", tmp_path / "out")


def test_input_refusals(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"missing\.npz: no such file"):
        prepare_images(tmp_path / "missing.npz", "x", tmp_path)
    (tmp_path / "data.csv").write_text("1,2")
    with pytest.raises(DatasetError, match=r"expected an \.npz file"):
        prepare_images(tmp_path / "data.csv", "x", tmp_path)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DatasetError, match=r"junk\.npz: cannot read as \.npz"):
        prepare_images(tmp_path / "junk.npz", "x", tmp_path)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DatasetError, match=r"a single \.npy array"):
        prepare_images(tmp_path / "one.npz", "x", tmp_path)
    with pytest.raises(DatasetError, match=r"seed must be an integer >= 0, got -1"):
        prepare_images(tmp_path / "junk.npz", "x", tmp_path, seed=-1)
    many = {"images": np.zeros((1, 1, 1), np.uint8), "labels": np.array([10**9])}
    np.savez(tmp_path / "many.npz", **many)
    with pytest.raises(DatasetError, match=r"label 1000000000 .* give the class names"):
        prepare_images(tmp_path / "many.npz", "x", tmp_path)
    with pytest.raises(DatasetError, match=r"slice_examples must be a positive integer"):
        prepare_images(tmp_path / "junk.npz", "x", tmp_path, slice_examples=0)
