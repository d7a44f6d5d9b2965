"""Partial FC class sampling (pure tensor math, no torch.distributed).

Given the global batch's labels already shifted into this shard's local ids, pick which local
class centers are scored this step: every positive that lives here, plus uniform random
negatives up to `num_sample` rows in all (or just the positives when there are more of them).
The result is sorted, and each label is remapped to its row in the sample.
"""
from typing import Optional, Tuple

import torch

__all__ = ["sample_classes", "num_sample_for"]


def num_sample_for(sample_rate: float, num_local: int) -> int:
    """Rows scored per step on a shard of `num_local` classes (before positives overflow it)."""
    return max(1, min(num_local, int(sample_rate * num_local)))


def sample_classes(local_labels: torch.Tensor, num_local: int, num_sample: int,
                   generator: Optional[torch.Generator]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Choose the rows of this shard to score.

    Args:
      local_labels: (N,) int64, global labels minus this shard's first class; values outside
        [0, num_local) belong to other shards.
      num_local: rows in this shard.
      num_sample: rows wanted (positives included); num_sample >= num_local means all rows.
      generator: the rank's own random stream for the negatives.

    Returns:
      index: (S,) int64 sorted local row ids, S = max(num_sample, #positives here).
      target: (N,) int64 position of each label's row in `index`, or -1 where the label lives
        on another shard.

    Cost: one uniform draw and one top-k over num_local keys. A host sync (reading the positive
    count) happens only when the positives could outnumber num_sample, i.e. when
    num_sample < min(N, num_local); otherwise every shape is known in advance.
    """
    device = local_labels.device
    owned = (local_labels >= 0) & (local_labels < num_local)
    if num_sample >= num_local:
        index = torch.arange(num_local, device=device)
        return index, torch.where(owned, local_labels, torch.full_like(local_labels, -1))

    # Mark positives; labels of other shards write into a spare slot past the end.
    slot = torch.where(owned, local_labels, torch.full_like(local_labels, num_local))
    positive = torch.zeros(num_local + 1, dtype=torch.bool, device=device)
    positive.scatter_(0, slot, True)
    positive = positive[:num_local]

    size = num_sample
    if num_sample < min(local_labels.numel(), num_local):
        size = max(num_sample, int(positive.sum()))  # host sync, only in this rare case

    # Positives get key 2 (above any uniform draw) so top-k keeps all of them, then the
    # negatives with the largest keys: a uniform sample without replacement.
    keys = torch.rand(num_local, generator=generator, device=device)
    keys.masked_fill_(positive, 2.0)
    index = torch.topk(keys, size, sorted=False).indices
    index, _ = torch.sort(index)
    target = torch.searchsorted(index, slot.clamp(max=num_local - 1))
    target = torch.where(owned, target, torch.full_like(target, -1))
    return index, target
