"""The plugin a user drops into a DeepSpeed (or any data-parallel) model: the Partial FC head.

  partial_fc  PartialFC: gather -> sample -> normalize -> score -> margin -> sharded softmax CE
  loss        the sharded margin-softmax cross-entropy in named steps, one object per mode
  margins     ArcFace / CosFace / combined margins (pure math on cosines)
  sampler     which of a shard's classes are scored in a step (pure)
  partition   which rank owns which classes (ClassRange)
  precision   bf16 stochastic rounding, 8-bit row codes, counter-based random bits
  optim       row-wise (lazy) SGD / AdamW for the head, any storage dtype
  kernels     the fused Triton path behind PartialFC's `backend` switch
"""
from .margins import ArcFace, CombinedMarginLoss, CosFace, MarginBase
from .optim import SparseAdamW, SparseSGD
from .partial_fc import PartialFC, auto_block_elems, init_class_centers
from .partition import ClassRange, shard_ranges

__all__ = ["PartialFC", "init_class_centers", "auto_block_elems", "ArcFace", "CosFace",
           "CombinedMarginLoss", "MarginBase", "SparseSGD", "SparseAdamW", "ClassRange",
           "shard_ranges"]
