"""hybrid_fc: model-parallel Partial FC heads beside DeepSpeed ZeRO backbones.

The public API, by package (imports run downwards: evaluation -> training -> head, data,
backbones -> collectives, runtime, common):
  hybrid_fc.head        the plugin: PartialFC, margins, the row-wise head optimizers
  hybrid_fc.training    HybridEngine, Trainer, checkpoints, config, metrics, memory planner
  hybrid_fc.evaluation  verification, extraction, export
  hybrid_fc.data        WebDataset shards: converter and streaming loader
  hybrid_fc.backbones   iresnet, MobileFaceNet, timm

Module paths of release 0.1 (hybrid_fc.engine, hybrid_fc.trainer, hybrid_fc.optim, ...) still
import, as aliases of their new homes, for one release; they warn (DeprecationWarning).
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings

from .head import (ArcFace, ClassRange, CombinedMarginLoss, CosFace, PartialFC, SparseAdamW,
                   SparseSGD, shard_ranges)

__all__ = ["PartialFC", "ArcFace", "CosFace", "CombinedMarginLoss", "ClassRange",
           "shard_ranges", "SparseSGD", "SparseAdamW", "HybridEngine", "WarmupDecay", "Trainer",
           "save_checkpoint", "load_checkpoint", "load_config"]

_LAZY = {"HybridEngine": "training.engine", "WarmupDecay": "training.engine",
         "Trainer": "training.trainer", "save_checkpoint": "training.checkpoint",
         "load_checkpoint": "training.checkpoint", "load_config": "training.config"}

# old module path -> new one (release 0.1 -> 0.2)
_MOVED = {"margins": "head.margins", "sampler": "head.sampler", "partition": "head.partition",
          "precision": "head.precision", "optim": "head.optim", "kernels": "head.kernels",
          "kernels.triton_ce": "head.kernels.triton_ce", "engine": "training.engine",
          "trainer": "training.trainer", "checkpoint": "training.checkpoint",
          "config": "training.config", "metrics": "training.metrics", "plan": "training.plan",
          "export": "evaluation.export", "extract": "evaluation.extract"}


def __getattr__(name):
    """HybridEngine, Trainer & co. on first use: `import hybrid_fc` stays light (no DeepSpeed)."""
    if name in _LAZY:
        return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """`import hybrid_fc.engine` gives the module hybrid_fc.training.engine itself (one module
    object under both names, so patches and isinstance checks agree), with a warning."""

    def find_spec(self, fullname, path=None, target=None):
        prefix = __name__ + "."
        if fullname.startswith(prefix) and fullname[len(prefix):] in _MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = f"{__name__}.{_MOVED[spec.name[len(__name__) + 1:]]}"
        warnings.warn(f"{spec.name} moved to {new}; the old path goes in the next release",
                      DeprecationWarning, stacklevel=3)
        return importlib.import_module(new)

    def exec_module(self, module):
        pass


if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModules())  # before the path finder: one module per file
