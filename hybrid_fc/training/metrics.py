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

A resumed run appends to the same files after dropping the interrupted run's train / verify
rows and step lines of steps after its checkpoint (that training was undone). `read_metrics(...,
last=True)` keeps the last row per (kind, step, set) (a run killed while it rewrote the files
may leave both).
"""
import json
import os
import re
import time
from typing import Any, Callable, Dict, List, Optional


__all__ = ["MetricsLog", "read_metrics", "plot_runs", "METRICS_FILE", "LOG_FILE"]

from .checkpoint import LOG_FILE, METRICS_FILE  # the run folder's names have one owner


# The printed lines of one step (the trainer's progress line, the verification hook's lines)
# begin like this; a resumed run drops the interrupted run's lines of later steps by it.
STEP_LINE = re.compile(r"^(?:step\s+(\d+)/|verify \[[^\]]*\] step (\d+):)")


class MetricsLog:
    """Rank 0 appends rows to `output_dir/metrics.jsonl` and printed lines to `training.log`
    (and prints them); other ranks do nothing. Each write is flushed (a killed run keeps every
    row written before the kill). resumed_at: the step a resumed run continues from; the
    interrupted run's train/verify rows and step lines of later steps are dropped first (that
    training was undone; the resumed run writes those steps again), its other rows and lines
    (starts, resume records, errors) stay."""

    def __init__(self, output_dir: str, rank: int, print_fn: Callable[[str], Any] = None,
                 resumed_at: Optional[int] = None):
        self.rank = rank
        self.print_fn = print_fn or (lambda s: print(s, flush=True))
        self.output_dir = output_dir
        self._rows = self._text = None
        if rank == 0:
            try:
                os.makedirs(output_dir, exist_ok=True)
                if resumed_at is not None:
                    _drop_after(os.path.join(output_dir, METRICS_FILE), resumed_at, _row_step)
                    _drop_after(os.path.join(output_dir, LOG_FILE), resumed_at, _line_step)
                self._rows = open(os.path.join(output_dir, METRICS_FILE), "a")
                self._text = open(os.path.join(output_dir, LOG_FILE), "a")
            except OSError as exc:
                raise OSError(f"cannot write the run's logs in {output_dir} "
                              f"({exc.strerror or exc}): train.output_dir must be a writable "
                              "folder") from None

    def log(self, line: str) -> None:
        """Print a line for people (rank 0) and keep it in training.log."""
        if self.rank != 0:
            return
        self.print_fn(line)
        self._write(self._text, line)

    def record(self, kind: str, **fields) -> None:
        """Append one row {"kind": kind, **fields, "time": unix seconds} (rank 0)."""
        if self.rank != 0:
            return
        row = {"kind": kind, **fields, "time": round(time.time(), 3)}
        self._write(self._rows, json.dumps(row, allow_nan=True))

    def _write(self, f, line: str) -> None:
        if f is None:  # closed: the run has ended (a late line still reaches the screen)
            return
        try:
            f.write(line + "\n")
            f.flush()
        except OSError as exc:  # disk full, a quota, the folder made read-only
            raise OSError(f"cannot write {f.name} ({exc.strerror or exc}): disk full or the "
                          "folder is no longer writable") from None

    def close(self) -> None:
        for f in (self._rows, self._text):
            if f is not None:
                f.close()
        self._rows = self._text = None


def _row_step(line: str) -> Optional[int]:
    """The step of a train / verify row of metrics.jsonl (None for other rows)."""
    try:
        row = json.loads(line)
    except json.JSONDecodeError:
        return None
    if isinstance(row, dict) and row.get("kind") in ("train", "verify"):
        step = row.get("step")
        return step if isinstance(step, int) else None
    return None


def _line_step(line: str) -> Optional[int]:
    m = STEP_LINE.match(line)
    return int(m.group(1) or m.group(2)) if m else None


def _drop_after(path: str, step: int, step_of) -> None:
    """Rewrite `path` (through a temporary file) without the lines whose step is > `step`."""
    if not os.path.isfile(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = [line for line in lines if (step_of(line) or 0) <= step]
    if len(keep) == len(lines):
        return
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)


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


def plot_runs(run_dirs: List[str], out: str, labels: Optional[List[str]] = None):
    """One PNG of runs read from their metrics.jsonl, overlaid (one line per run in each panel):
    loss, learning rates (head solid, backbone dashed), images/s, and each verification set's
    accuracy, against the optimizer step. Returns the matplotlib Figure (after saving `out`).
    Needs matplotlib (installed with hybrid_fc)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = labels or [os.path.basename(os.path.normpath(
        d if os.path.isdir(d) else os.path.dirname(os.path.abspath(d)))) for d in run_dirs]
    runs = [(label, read_metrics(d)) for label, d in zip(labels, run_dirs)]
    sets = sorted({r["set"] for _, rows in runs for r in rows if r.get("kind") == "verify"})
    fig, axes = plt.subplots(1, 3 + len(sets), figsize=(4.2 * (3 + len(sets)), 3.6),
                             squeeze=False)
    axes = axes[0]
    for label, rows in runs:
        train = [r for r in rows if r.get("kind") == "train"]
        steps = [r["step"] for r in train]
        line, = axes[0].plot(steps, [r["loss"] for r in train], label=label)
        axes[1].plot(steps, [r["lr"] for r in train], color=line.get_color(), label=label)
        axes[1].plot(steps, [r.get("backbone_lr") for r in train], color=line.get_color(),
                     linestyle="--")
        axes[2].plot(steps, [r["img_s"] for r in train], color=line.get_color(), label=label)
        for ax, name in zip(axes[3:], sets):
            verify = [r for r in rows if r.get("kind") == "verify" and r.get("set") == name]
            ax.plot([r["step"] for r in verify], [100 * r["accuracy"] for r in verify],
                    marker="o", color=line.get_color(), label=label)
    titles = ["loss", "learning rate (head; backbone dashed)", "images / s"] + [
        f"{name} accuracy %" for name in sets]
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return fig
