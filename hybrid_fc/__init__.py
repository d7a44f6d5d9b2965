"""hybrid_fc: model-parallel Partial FC heads beside DeepSpeed ZeRO backbones."""
from .head import PartialFC
from .margins import ArcFace, CombinedMarginLoss, CosFace
from .partition import ClassRange, shard_ranges

__all__ = ["PartialFC", "ArcFace", "CosFace", "CombinedMarginLoss", "ClassRange", "shard_ranges"]
