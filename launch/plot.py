"""A picture of one or more runs from their metrics.jsonl: loss, learning rates, images/s and
every verification set's accuracy against the step, the runs overlaid.

    python launch/plot.py runs/quickstart --out runs/quickstart/curves.png
    python launch/plot.py runs/r50_rate0.1 runs/r50_rate1.0 --out compare.png --labels r=0.1 r=1

Reads only the files (a run may still be going); needs matplotlib (installed with hybrid_fc).
"""
import argparse
import os
import sys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders (train.output_dir) or metrics.jsonl")
    p.add_argument("--out", default="runs.png", help="the PNG to write (default runs.png)")
    p.add_argument("--labels", nargs="+", default=None, help="one legend label per run")
    args = p.parse_args(argv)
    from hybrid_fc.training.metrics import METRICS_FILE, plot_runs
    for run in args.runs:
        path = run if os.path.isfile(run) else os.path.join(run, METRICS_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{run}: no {METRICS_FILE} (is it a train.output_dir?)")
    if args.labels is not None and len(args.labels) != len(args.runs):
        raise ValueError(f"--labels: {len(args.labels)} labels for {len(args.runs)} runs")
    plot_runs(args.runs, args.out, args.labels)
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
