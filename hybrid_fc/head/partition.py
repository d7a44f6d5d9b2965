"""Class sharding: which rank owns which contiguous range of class ids.

One utility for head, checkpoint, planner and tests. The split is insightface's (the one split
of hybrid_fc.common.split_span), so their per-rank checkpoints map onto ours: rank r of W owns
[start, start + num_local) with num_local = C // W + (r < C % W) and
start = C // W * r + min(r, C % W). Pure integer math: no torch.distributed here.
"""
from dataclasses import dataclass
from typing import List

from ..common import split_span

__all__ = ["ClassRange", "shard_ranges"]


@dataclass(frozen=True)
class ClassRange:
    """The slice of classes one rank owns."""

    num_classes: int
    """Total number of classes C over all ranks."""
    world_size: int
    """Number of ranks W the classes are split over."""
    rank: int
    """This rank, 0 <= rank < world_size."""

    def __post_init__(self):
        for name in ("num_classes", "world_size", "rank"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"ClassRange.{name} must be an int, got {type(value).__name__}")
        if self.world_size < 1:
            raise ValueError(f"ClassRange.world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"ClassRange.rank must be in [0, {self.world_size}), got {self.rank}")
        if self.num_classes < self.world_size:
            raise ValueError(
                f"num_classes={self.num_classes} is smaller than the world size {self.world_size}: "
                "every rank must own at least one class")

    @property
    def start(self) -> int:
        return split_span(self.num_classes, self.rank, self.world_size)[0]

    @property
    def end(self) -> int:
        return split_span(self.num_classes, self.rank, self.world_size)[1]

    @property
    def num_local(self) -> int:
        return self.end - self.start


def shard_ranges(num_classes: int, world_size: int) -> List[ClassRange]:
    """The class range of every rank, in rank order; they tile [0, num_classes)."""
    return [ClassRange(num_classes, world_size, r) for r in range(world_size)]
