"""The training run around the head: DeepSpeed glue, the run as an object, its checkpoints,
config, metrics and memory plan.

  engine      HybridEngine (a PartialFC beside a DeepSpeed engine), WarmupDecay
  trainer     Trainer(cfg, ds_config).fit(): builders, loop, cadence, resume
  checkpoint  head shards by class range, portable backbone state, every file name of a run folder
  config      the typed YAML config and its key=value overrides
  metrics     metrics.jsonl and training.log
  plan        the memory planner (pure arithmetic)
"""
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .config import ExperimentConfig, load_config
from .engine import HybridEngine, WarmupDecay
from .metrics import MetricsLog, read_metrics
from .plan import plan, plan_experiment
from .trainer import Trainer

__all__ = ["HybridEngine", "WarmupDecay", "Trainer", "save_checkpoint", "load_checkpoint",
           "prune_checkpoints", "ExperimentConfig", "load_config", "MetricsLog", "read_metrics",
           "plan", "plan_experiment"]
