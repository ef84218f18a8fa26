"""Test helpers that take a payload apart and put it back together with valid checksums, so
tests and the fuzzer can reach the checks behind the CRCs."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

FIXED = struct.Struct("<4sHBBIIIII")
CHUNK = struct.Struct("<IIII")


@dataclass
class Parts:
    fixed: bytearray
    table: bytearray
    chunks: list[tuple[list[int], bytearray]]  # ([tensor, index, body_len, crc], body)
    trailing: bytes = b""

    def build(self, fix_crc: bool = True, fix_len: bool = True) -> bytes:
        head = bytes(self.fixed) + bytes(self.table)
        out = bytearray(head + struct.pack("<I", zlib.crc32(head) if fix_crc else self._hcrc))
        for fields, body in self.chunks:
            tensor, index, body_len, crc = fields
            if fix_len:
                body_len = len(body)
            if fix_crc:
                crc = zlib.crc32(body)
            out += CHUNK.pack(tensor, index, body_len, crc) + bytes(body)
        return bytes(out + self.trailing)

    _hcrc: int = 0


def split(payload: bytes) -> Parts:
    """Splits a well-formed payload (as produced by encode) into its parts."""
    fixed = bytearray(payload[: FIXED.size])
    table_len = FIXED.unpack(fixed)[7]
    table = bytearray(payload[FIXED.size : FIXED.size + table_len])
    pos = FIXED.size + table_len
    (hcrc,) = struct.unpack_from("<I", payload, pos)
    pos += 4
    chunks = []
    while pos < len(payload):
        fields = list(CHUNK.unpack_from(payload, pos))
        pos += CHUNK.size
        body = bytearray(payload[pos : pos + fields[2]])
        pos += fields[2]
        chunks.append((fields, body))
    parts = Parts(fixed, table, chunks)
    parts._hcrc = hcrc
    return parts


def set_fixed(parts: Parts, **fields: int | bytes) -> None:
    names = ["magic", "version", "codec", "flags", "block", "chunk_elems", "ntensors", "table_len", "reserved"]
    values = list(FIXED.unpack(parts.fixed))
    for k, v in fields.items():
        values[names.index(k)] = v
    parts.fixed = bytearray(FIXED.pack(*values))
