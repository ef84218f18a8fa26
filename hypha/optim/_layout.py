"""Which elements belong to which fragment, and which rank owns which part of each.

The parameters are laid end to end in one flat index space (in ``param_groups`` order). It is cut
into ``fragments`` contiguous ranges (Streaming DiLoCo syncs one at a time), and each fragment
into ``world_size`` contiguous shards: rank ``j`` is the parameter server of shard ``j`` of every
fragment. Cuts fall on multiples of ``align`` elements (the quantizer's block size), so a shard
only splits a tensor where a block would end anyway. A shard is a list of segments, each a
contiguous range of one flattened parameter.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["Layout", "Segment", "Shard"]


@dataclass(frozen=True)
class Segment:
    """Elements ``start:stop`` of flattened parameter ``param``."""

    param: int
    start: int
    stop: int

    @property
    def numel(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Shard:
    fragment: int
    owner: int
    segments: tuple[Segment, ...]
    #: where the shard starts in its owner's flat outer-state buffers (momentum, error feedback)
    owner_offset: int

    @property
    def numel(self) -> int:
        return sum(s.numel for s in self.segments)

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """Shapes of the tensors in this shard's payloads: one 1-D tensor per segment."""
        return [(s.numel,) for s in self.segments]


class Layout:
    def __init__(self, numels: Sequence[int], fragments: int, world_size: int, align: int = 1):
        self.numels = tuple(int(n) for n in numels)
        self.fragments = fragments
        self.world_size = world_size
        self.total = sum(self.numels)
        self._offsets = [0]
        for n in self.numels:
            self._offsets.append(self._offsets[-1] + n)

        def cut(lo: int, hi: int, i: int, parts: int) -> int:
            if i == parts:
                return hi
            return lo + ((hi - lo) * i // parts) // align * align

        owned = [0] * world_size
        self.shards: list[list[Shard]] = []
        for f in range(fragments):
            lo, hi = cut(0, self.total, f, fragments), cut(0, self.total, f + 1, fragments)
            row = []
            for j in range(world_size):
                a, b = cut(lo, hi, j, world_size), cut(lo, hi, j + 1, world_size)
                segs = self._segments(a, b)
                row.append(Shard(f, j, segs, owned[j]))
                owned[j] += b - a
            self.shards.append(row)
        self.owned = tuple(owned)

    def _segments(self, a: int, b: int) -> tuple[Segment, ...]:
        out = []
        i = bisect.bisect_right(self._offsets, a) - 1
        while a < b and i < len(self.numels):
            base = self._offsets[i]
            stop = min(b, base + self.numels[i])
            if stop > a:
                out.append(Segment(i, a - base, stop - base))
            a = max(a, stop)
            i += 1
        return tuple(out)

    def fragment_segments(self, fragment: int) -> list[Segment]:
        return [s for shard in self.shards[fragment] for s in shard.segments]

    def fragment_params(self, fragment: int) -> list[int]:
        return sorted({s.param for s in self.fragment_segments(fragment)})

    def describe(self) -> dict[str, object]:
        """What a checkpoint must match to be loaded into this layout."""
        return {
            "numels": list(self.numels),
            "fragments": self.fragments,
            "world_size": self.world_size,
        }
