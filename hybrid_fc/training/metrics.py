"""Metrics as data: `metrics.jsonl` (one JSON object per line) and `training.log` of a run.

The one owner of the log format: the trainer (hybrid_fc.training.trainer) writes through
`MetricsLog`; programs (quickstart, the learning check, tests) read with `read_metrics`, never by
parsing what was printed. Rows:

  {"kind": "train", "step", "loss", "img_s", "lr", "backbone_lr", "loss_scale", "skipped",
   "time"}                                         every train.log_every optimizer steps
  {"kind": "verify", "step", "set", "accuracy", "std", "threshold", "xnorm", "tar", "time"}
                                                   per pair set at each verification
  {"kind": "start", "step", "world_size", "global_batch", "resumed", "time"}
                                                   once per start (or resume)
  {"kind": "resume", "step", "time", and before/after pairs of what the resume changed:
   "old_steps"/"new_steps", "head_lr_before"/"head_lr_after", "old_world_size"/
   "new_world_size", "old_global_batch"/"new_global_batch"}    when a resume changes the run

A resumed run appends to the same files; rows of steps after the checkpoint it resumed from
appear twice (the killed run's and the resumed run's): `read_metrics(..., last=True)` keeps the
last row per (kind, step, set).
"""
import json
import os
import time
from typing import Any, Callable, Dict, List, Optional


__all__ = ["MetricsLog", "read_metrics", "METRICS_FILE", "LOG_FILE"]

from .checkpoint import LOG_FILE, METRICS_FILE  # the run folder's names have one owner


class MetricsLog:
    """Rank 0 appends rows to `output_dir/metrics.jsonl` and printed lines to `training.log`
    (and prints them); other ranks do nothing. Each write is flushed (a killed run keeps every
    row written before the kill)."""

    def __init__(self, output_dir: str, rank: int, print_fn: Callable[[str], Any] = None):
        self.rank = rank
        self.print_fn = print_fn or (lambda s: print(s, flush=True))
        self.output_dir = output_dir
        self._rows = self._text = None
        if rank == 0:
            os.makedirs(output_dir, exist_ok=True)
            self._rows = open(os.path.join(output_dir, METRICS_FILE), "a")
            self._text = open(os.path.join(output_dir, LOG_FILE), "a")

    def log(self, line: str) -> None:
        """Print a line for people (rank 0) and keep it in training.log."""
        if self.rank != 0:
            return
        self.print_fn(line)
        self._text.write(line + "\n")
        self._text.flush()

    def record(self, kind: str, **fields) -> None:
        """Append one row {"kind": kind, **fields, "time": unix seconds} (rank 0)."""
        if self.rank != 0:
            return
        row = {"kind": kind, **fields, "time": round(time.time(), 3)}
        self._rows.write(json.dumps(row, allow_nan=True) + "\n")
        self._rows.flush()

    def close(self) -> None:
        for f in (self._rows, self._text):
            if f is not None:
                f.close()
        self._rows = self._text = None


def read_metrics(path: str, kind: Optional[str] = None, last: bool = True) -> List[Dict]:
    """Rows of a run's metrics.jsonl (`path`: the file or the run folder), in step order,
    optionally of one kind; `last` keeps the last row per (kind, step, set) (a resumed run
    repeats the steps after its checkpoint). A partial last line (a killed writer) is skipped."""
    if os.path.isdir(path):
        path = os.path.join(path, METRICS_FILE)
    rows = []
    with open(path) as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if kind is None or row.get("kind") == kind:
                rows.append(row)
    if last:
        keyed = {}
        for row in rows:
            keyed[(row.get("kind"), row.get("step"), row.get("set"))] = row
        rows = list(keyed.values())
    return sorted(rows, key=lambda r: (r.get("step") or 0))
