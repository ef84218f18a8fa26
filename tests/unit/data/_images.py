"""Test helpers: tiny PNG and PGM/PPM encoders (stdlib + numpy), written independently of the
decoder in hypha.data._imageio so that the two check each other."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> PNG colour type


def chunk(ctype: bytes, body: bytes, *, crc: int | None = None) -> bytes:
    value = zlib.crc32(ctype + body) if crc is None else crc
    return struct.pack(">I", len(body)) + ctype + body + struct.pack(">I", value)


def ihdr(width: int, height: int, *, depth: int = 8, color: int = 2, interlace: int = 0) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, interlace))


def _paeth(a: int, b: int, c: int) -> int:
    p = a + b - c
    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
    if pa <= pb and pa <= pc:
        return a
    return b if pb <= pc else c


def filter_row(kind: int, row: bytes, prev: bytes, bpp: int) -> bytes:
    """PNG filter ``kind`` (0..4) applied to one row of raw bytes, the straightforward way."""
    out = bytearray(len(row))
    for i, x in enumerate(row):
        a = row[i - bpp] if i >= bpp else 0
        b = prev[i]
        c = prev[i - bpp] if i >= bpp else 0
        pred = (0, a, b, (a + b) // 2, _paeth(a, b, c))[kind]
        out[i] = (x - pred) % 256
    return bytes(out)


def encode_png(
    image: np.ndarray,
    *,
    filters: tuple[int, ...] = (0, 1, 2, 3, 4),
    extra_chunks: bytes = b"",
    idat_parts: int = 1,
) -> bytes:
    """Encode ``uint8 [H, W, C]`` as a PNG, row ``y`` using filter ``filters[y % len]``;
    ``extra_chunks`` go between IHDR and the image data, which is split into ``idat_parts``."""
    h, w, c = image.shape
    raw = bytearray()
    prev = bytes(w * c)
    for y in range(h):
        row = image[y].tobytes()
        kind = filters[y % len(filters)]
        raw += bytes([kind]) + filter_row(kind, row, prev, c)
        prev = row
    data = zlib.compress(bytes(raw), 6)
    step = -(-len(data) // idat_parts)
    idats = b"".join(chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step))
    return (
        PNG_SIGNATURE
        + ihdr(w, h, color=COLOR_TYPES[c])
        + extra_chunks
        + idats
        + chunk(b"IEND", b"")
    )


def encode_pnm(image: np.ndarray, *, maxval: int = 255, comment: bool = False) -> bytes:
    """Binary PGM (1 channel) or PPM (3 channels)."""
    h, w, c = image.shape
    magic = {1: b"P5", 3: b"P6"}[c]
    note = b"# made by a test\n" if comment else b""
    return magic + b"\n" + note + f"{w} {h}\n{maxval}\n".encode() + image.tobytes()


def write_image(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() == ".png":
        path.write_bytes(encode_png(image))
    else:
        path.write_bytes(encode_pnm(image))


def random_image(rng: np.random.Generator, h: int, w: int, c: int) -> np.ndarray:
    return rng.integers(0, 256, (h, w, c), dtype=np.uint8)
