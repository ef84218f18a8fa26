"""The stdlib PNG and PGM/PPM decoders: every filter and colour type on odd sizes against an
independent encoder, and a clear refusal of everything unsupported or corrupted."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from hypha.data._imageio import ImageError, decode_png, decode_pnm, read_image
from tests.unit.data._images import (
    PNG_SIGNATURE,
    chunk,
    encode_png,
    encode_pnm,
    ihdr,
    random_image,
)


def mismatch(got: np.ndarray, want: np.ndarray) -> str:
    if got.shape != want.shape:
        return f"shape {got.shape} != {want.shape}"
    bad = np.argwhere(got != want)
    return f"{len(bad)} of {want.size} samples differ, first at {bad[:5].tolist()}"


@pytest.mark.parametrize("channels", [1, 2, 3, 4])
@pytest.mark.parametrize("size", [(1, 1), (3, 5), (13, 7), (2, 64)])
@pytest.mark.parametrize("kind", [0, 1, 2, 3, 4])
def test_png_every_filter_and_colour_type(channels: int, size: tuple[int, int], kind: int) -> None:
    rng = np.random.default_rng(channels * 100 + kind)
    image = random_image(rng, *size, channels)
    got = decode_png(encode_png(image, filters=(kind,)))
    assert got.dtype == np.uint8
    assert np.array_equal(got, image), mismatch(got, image)


def test_png_mixed_filters_split_idat_and_ancillary_chunks() -> None:
    image = random_image(np.random.default_rng(1), 9, 11, 3)
    extra = chunk(b"tEXt", b"Comment\x00hello") + chunk(b"PLTE", bytes(range(6)))
    data = encode_png(image, filters=(4, 3, 2, 1, 0), extra_chunks=extra, idat_parts=4)
    got = decode_png(data)
    assert np.array_equal(got, image), mismatch(got, image)


def test_png_smooth_image_exercises_wraparound() -> None:
    # a gradient makes the Sub/Up/Paeth residues small and the running sums wrap past 255
    y, x = np.mgrid[0:16, 0:40]
    image = ((x * 7 + y * 13) % 256).astype(np.uint8)[..., None].repeat(3, axis=2)
    got = decode_png(encode_png(image))
    assert np.array_equal(got, image), mismatch(got, image)


def _png(body: bytes) -> bytes:
    return PNG_SIGNATURE + body


def _idat(raw: bytes) -> bytes:
    return chunk(b"IDAT", zlib.compress(raw))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GIF89a....", "not a PNG"),
        (_png(ihdr(2, 2, color=3) + chunk(b"IEND", b"")), "palette"),
        (_png(ihdr(2, 2, depth=16) + chunk(b"IEND", b"")), "16 bits"),
        (_png(ihdr(2, 2, interlace=1) + chunk(b"IEND", b"")), "interlaced"),
        (_png(ihdr(0, 2) + chunk(b"IEND", b"")), "no pixels"),
        (_png(ihdr(1 << 14, 1 << 14) + chunk(b"IEND", b"")), "over the"),
        (_png(chunk(b"IDAT", b"") + ihdr(2, 2)), "first chunk is not IHDR"),
        (_png(ihdr(1, 1, color=0) + chunk(b"ZzZz", b"")), "unknown critical chunk"),
        (_png(ihdr(1, 1, color=0) + chunk(b"IEND", b"", crc=1234)), "CRC mismatch in the IEND"),
        (_png(ihdr(1, 1, color=0) + _idat(b"\x00\x07")), "no IEND"),
        (_png(ihdr(1, 1, color=0))[:-3], "truncated"),
        (
            _png(ihdr(1, 1, color=0) + chunk(b"IDAT", b"junk") + chunk(b"IEND", b"")),
            "corrupted PNG image data",
        ),
        (_png(ihdr(2, 1, color=0) + _idat(b"\x00\x07") + chunk(b"IEND", b"")), "expected 3"),
        (_png(ihdr(1, 1, color=0) + _idat(b"\x00\x07\x08") + chunk(b"IEND", b"")), "expected 2"),
        (
            _png(ihdr(1, 1, color=0) + _idat(b"\x05\x07") + chunk(b"IEND", b"")),
            "unknown filter type 5",
        ),
        (
            _png(
                ihdr(1, 1, color=0)
                + chunk(b"IDAT", zlib.compress(b"\x00\x07")[:-4])
                + chunk(b"IEND", b"")
            ),
            "incomplete",
        ),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_png_refusals(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_png(data)


def test_png_truncated_anywhere_is_an_image_error() -> None:
    data = encode_png(random_image(np.random.default_rng(2), 4, 4, 3))
    for n in range(len(data)):
        with pytest.raises(ImageError):
            decode_png(data[:n])


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("comment", [False, True])
def test_pnm_round_trip(channels: int, comment: bool) -> None:
    image = random_image(np.random.default_rng(3), 5, 7, channels)
    got = decode_pnm(encode_pnm(image, comment=comment))
    assert np.array_equal(got, image), mismatch(got, image)


def test_pnm_small_maxval_is_scaled() -> None:
    image = np.array([[0, 1, 2, 3]], np.uint8)[..., None]
    got = decode_pnm(encode_pnm(image, maxval=3))
    assert got[0, :, 0].tolist() == [0, 85, 170, 255]


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"P2\n1 1\n255\n7", "ASCII"),
        (b"P7\n1 1\n255\n7", "not a binary PGM/PPM"),
        (b"P5\n1 1\n65535\n\x00\x07", "only 8-bit"),
        (b"P5\n1 1\n0\n\x00", "only 8-bit"),
        (b"P5\n2 2\n255\n\x00", "truncated PGM/PPM: 1 of 4"),
        (b"P5\n2", "no height"),
        (b"P5\nx 2 255\n", "width is not a decimal"),
        (b"P5\n1 1\n255", "no whitespace after maxval"),
        (b"P5\n1 1\n3\n\x09", "over maxval"),
        (b"P6\n0 1\n255\n", "no pixels"),
    ],
    ids=lambda v: v if isinstance(v, str) else "",
)
def test_pnm_refusals(data: bytes, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_pnm(data)


def test_read_image_dispatches_by_suffix(tmp_path: Path) -> None:
    image = random_image(np.random.default_rng(4), 3, 3, 3)
    (tmp_path / "a.PNG").write_bytes(encode_png(image))
    (tmp_path / "a.ppm").write_bytes(encode_pnm(image))
    assert np.array_equal(read_image(tmp_path / "a.PNG"), image)
    assert np.array_equal(read_image(tmp_path / "a.ppm"), image)
    (tmp_path / "a.jpg").write_bytes(b"\xff\xd8\xff")
    with pytest.raises(ImageError, match=r"unsupported image format '.jpg'"):
        read_image(tmp_path / "a.jpg")
    (tmp_path / "b.png").write_bytes(encode_pnm(image))  # content checked, not only the name
    with pytest.raises(ImageError, match="not a PNG"):
        read_image(tmp_path / "b.png")
    with pytest.raises(ImageError, match="cannot read"):
        read_image(tmp_path / "missing.png")


def test_chunk_helper_matches_struct_layout() -> None:
    c = chunk(b"IEND", b"")
    assert c == struct.pack(">I", 0) + b"IEND" + struct.pack(">I", zlib.crc32(b"IEND"))
