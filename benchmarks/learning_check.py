"""Does a head setting learn as well as the reference? Same data, seed and steps, one run each.

    python benchmarks/learning_check.py          # sample rate 1.0 vs 0.1: ~2 x 5 min on 2 cores
    python benchmarks/learning_check.py --precision --identities 8000 --images 4 \
        --noise 60 --distinct 0.15 --out runs/precision_check --png benchmarks/precision_check.png
                                                 # fp32 vs bf16 centers + int8 momentum
                                                 # (stochastic rounding, and round-to-nearest)

1. Writes a synthetic identity set with hybrid_fc.data.make_synthetic (32x32 JPEG shards):
   `--identities` training identities x `--images` images each, by default harder than the
   generator's own default (--noise 20, --distinct 0.3: identities only 30% of the way from a
   shared appearance; an untrained backbone verifies at ~56%).
2. Writes a verification pair set from held-out identities (ids `identities` ...
   `identities + heldout - 1` of the same generator, never seen in training): `--pairs` pairs,
   half same-identity, half different, as an insightface-format .bin (hybrid_fc.evaluation).
3. For each run (`--runs NAME:key=value,key=value ...`; default r1.0 and r0.1, or with
   `--precision` fp32 / bf16-sr-int8 / bf16-nearest-int8 at sample rate 0.1) runs the real
   launcher, same seed, data order and steps:
       deepspeed --num_gpus 2 launch/train.py --config launch/configs/quickstart.yaml \\
           --deepspeed_config ds_configs/cpu_zero1_fp32.json head.sample_rate=R ...
4. Verifies on the held-out pairs every --eval-every steps during training (train.py's
   eval.bins hook: early steps show differences in learning speed that the final accuracy,
   near the ceiling on this synthetic task, cannot), then evaluates each final checkpoint (and
   the untrained backbone, the "no learning" reference) with insightface's 10-fold protocol and
   flip TTA, writes OUT/learning_check.json, a PNG of the loss and accuracy curves (--png,
   default benchmarks/learning_check.png), and prints markdown tables for RESULTS.md. Loss and
   accuracy curves are read from each run's metrics.jsonl (hybrid_fc.training.metrics).

Everything goes under --out (default runs/learning_check); the data is reused when present.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(ROOT, "runs", "learning_check"))
    p.add_argument("--identities", type=int, default=2000, help="training identities")
    p.add_argument("--images", type=int, default=10, help="images per training identity")
    p.add_argument("--heldout", type=int, default=1000, help="held-out identities for pairs")
    p.add_argument("--pairs", type=int, default=6000, help="verification pairs (half same)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels")
    p.add_argument("--noise", type=float, default=20.0,
                   help="per-pixel noise std of the synthetic images (higher: harder)")
    p.add_argument("--distinct", type=float, default=0.3,
                   help="identities' distance from a shared appearance, (0, 1] (lower: harder)")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--eval-every", type=int, default=100,
                   help="verify on the held-out pairs during training every this many steps")
    p.add_argument("--runs", nargs="+", default=None,
                   help="NAME:section.key=value,... per run (default: r1.0 and r0.1 sample rates)")
    p.add_argument("--precision", action="store_true",
                   help="runs: fp32 vs bf16 centers + int8 momentum, stochastic and nearest "
                        "rounding, all at sample rate 0.1 with sparse_sgd")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--master-port", type=int, default=29500,
                   help="run i uses this + 7 i (tests pass a free one)")
    p.add_argument("--png", default=os.path.join(ROOT, "benchmarks", "learning_check.png"),
                   help="where the loss-curve plot goes")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                   help="no training: read several OUT/learning_check.json files, group runs "
                        "named NAME and NAME-headseedK as seeds of one setting, print per-seed "
                        "and mean results and plot the mean accuracy curves to --png")
    p.add_argument("--json", default=None,
                   help="where the results go (default OUT/learning_check.json)")
    p.add_argument("--evaluate-only", action="store_true",
                   help="no training: evaluate the runs' existing final checkpoints under --out "
                        "and read their curves from their metrics.jsonl")
    p.add_argument("overrides", nargs="*", help="extra section.key=value for launch/train.py")
    return p.parse_args(argv)


def make_pairs(path, identities, heldout, num_pairs, size, seed, noise, distinct):
    """num_pairs // 2 same pairs and as many different pairs of held-out identities
    (ids identities .. identities + heldout - 1, never trained on)."""
    from hybrid_fc.data import synthetic_pairs
    from hybrid_fc.evaluation import write_bin
    write_bin(path, *synthetic_pairs(identities, heldout, num_pairs, size, seed, noise,
                                     distinct))


_SPARSE = ["head.sample_rate=0.1", "head.sparse_grad=true", "head_optim.name=sparse_sgd"]
PRECISION_RUNS = {
    "fp32": _SPARSE,
    "bf16-sr-int8": _SPARSE + ["head.weight_dtype=bfloat16", "head_optim.state_dtype=int8"],
    "bf16-nearest-int8": _SPARSE + ["head.weight_dtype=bfloat16", "head_optim.state_dtype=int8",
                                    "head_optim.rounding=nearest"],
}
RATE_RUNS = {"r1.0": ["head.sample_rate=1.0"], "r0.1": ["head.sample_rate=0.1"]}


def run_specs(args):
    if args.runs:
        return {name: [o for o in rest.split(",") if o]
                for name, _, rest in (spec.partition(":") for spec in args.runs)}
    return PRECISION_RUNS if args.precision else RATE_RUNS


def train(args, index, name, run_overrides, data, run_dir, pairs):
    from hybrid_fc.training.metrics import LOG_FILE, METRICS_FILE
    for old in (METRICS_FILE, LOG_FILE):  # a fresh run (train.resume=false): fresh metrics
        if os.path.exists(os.path.join(run_dir, old)):
            os.remove(os.path.join(run_dir, old))
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
           "--master_port", str(args.master_port + 7 * index),
           os.path.join(ROOT, "launch", "train.py"),
           "--config", os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
           "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_zero1_fp32.json"),
           f"data.urls={data}", f"head.num_classes={args.identities}",
           f"train.steps={args.steps}",
           f"train.output_dir={run_dir}", "train.checkpoint_every=0", "train.log_every=10",
           "train.resume=false", "train.tensorboard=false", f"train.seed={args.seed}",
           f"model.input_size={args.size}", f"eval.bins={pairs}",
           f"eval.every={args.eval_every}", "eval.batch_size=256"] + run_overrides + args.overrides
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, cwd=ROOT)
    tail = []
    for line in proc.stdout:  # people see rank 0's progress; the numbers come from the file
        tail = (tail + [line])[-40:]
        if line.startswith("verify ") or (line.startswith("step ") and " 00/" in line[5:12]):
            print(f"  {name}: {line.strip()}", flush=True)
    if proc.wait() != 0:
        sys.exit(f"training run {name} failed:\n{''.join(tail)}")
    return curves_of(run_dir) + (time.time() - t0,)


def curves_of(run_dir):
    """(loss curve, verification accuracy curve) of a run, from its metrics.jsonl."""
    from hybrid_fc.training.metrics import read_metrics
    losses = [(r["step"], r["loss"]) for r in read_metrics(run_dir, "train")]
    accs = [(r["step"], 100 * r["accuracy"]) for r in read_metrics(run_dir, "verify")]
    return losses, accs


def evaluate_run(run_dir, pairs_path, size):
    from hybrid_fc.evaluation import evaluate, load_bin
    from hybrid_fc.evaluation.export import load_backbone
    model, _ = load_backbone(run_dir)
    return evaluate(model, load_bin(pairs_path), size, batch_size=128)


def untrained(run_dir, pairs_path, size):
    """The same backbone at its initialization (the trainer seeds it with train.seed)."""
    import torch
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.evaluation import evaluate, load_bin
    from hybrid_fc.evaluation.export import load_backbone
    from hybrid_fc.training.checkpoint import read_run_config
    _, cfg = load_backbone(run_dir)
    torch.manual_seed(read_run_config(run_dir)["experiment"]["train"]["seed"])
    model = build_backbone(cfg["backbone"], cfg["embedding_size"], input_size=cfg["input_size"],
                           **cfg["backbone_kwargs"])
    return evaluate(model, load_bin(pairs_path), size, batch_size=128)


def plot(curves, acc_curves, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4))
    for name, pts in curves.items():
        ax.plot([s for s, _ in pts], [v for _, v in pts], label=name)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (sampled margin softmax)")
    ax.set_title("training loss")
    for name, pts in acc_curves.items():
        bx.plot([s for s, _ in pts], [v for _, v in pts], marker="o", ms=3, label=name)
    bx.set_xlabel("optimizer step")
    bx.set_ylabel("verification accuracy % (held-out identities)")
    bx.set_title("10-fold accuracy on unseen identities")
    for a in (ax, bx):
        a.legend()
        a.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def merge(paths, png):
    """Seeds of one setting side by side: NAME and NAME-headseedK are the same setting."""
    import re
    import statistics
    runs, curves, untrained = {}, {}, []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        untrained.append(100 * data["untrained"]["accuracy"])
        for name, r in data["runs"].items():
            setting, seed = re.fullmatch(r"(.+?)(?:-headseed(\d+))?", name).groups()
            runs.setdefault(setting, {})[int(seed or 0)] = 100 * r["accuracy"]
            curves.setdefault(setting, {})[int(seed or 0)] = data["accuracy_curves"][name]
    print(f"untrained backbone: {', '.join(f'{u:.2f}' for u in untrained)}\n")
    print("| setting | accuracy % per head seed | mean | spread (max - min) |")
    print("|---|---|---|---|")
    for setting, per in runs.items():
        vals = [per[k] for k in sorted(per)]
        print(f"| {setting} | " + ", ".join(f"seed {k}: {per[k]:.2f}" for k in sorted(per))
              + f" | **{statistics.mean(vals):.2f}** | {max(vals) - min(vals):.2f} |")
    steps = sorted({s for per in curves.values() for c in per.values() for s, _ in c})
    means = {setting: [(s, statistics.mean(dict(c)[s] for c in per.values() if s in dict(c)))
                       for s in steps] for setting, per in curves.items()}
    print("\nmean verification accuracy % over the seeds during training:\n")
    print("| step | " + " | ".join(means) + " |")
    print("|---|" + "---|" * len(means))
    for i, s in enumerate(steps):
        print(f"| {s} | " + " | ".join(f"{means[k][i][1]:.2f}" for k in means) + " |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for color, (setting, per) in zip(plt.rcParams["axes.prop_cycle"].by_key()["color"],
                                     curves.items()):
        for c in per.values():
            ax.plot([s for s, _ in c], [v for _, v in c], color=color, alpha=0.25, lw=1)
        ax.plot([s for s, _ in means[setting]], [v for _, v in means[setting]], color=color,
                lw=2.5, marker="o", ms=3, label=f"{setting} (mean of {len(per)} seeds)")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("verification accuracy % (held-out identities)")
    ax.set_title("per-seed curves (thin) and their mean (thick)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=100)
    print(f"\nplot {png}")


def main(argv=None):
    args = parse_args(argv)
    if args.merge:
        return merge(args.merge, args.png)
    os.makedirs(args.out, exist_ok=True)
    sys.path.insert(0, ROOT)
    data = os.path.join(args.out, "data")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        from hybrid_fc.data import make_synthetic
        t0 = time.time()
        make_synthetic(data, args.identities, args.images, size=args.size, seed=args.seed,
                       noise=args.noise, distinct=args.distinct, workers=2, samples_per_shard=2000)
        print(f"wrote {args.identities} x {args.images} images in {time.time() - t0:.0f} s")
    pairs = os.path.join(args.out, "heldout_pairs.bin")
    if not os.path.isfile(pairs):
        make_pairs(pairs, args.identities, args.heldout, args.pairs, args.size, args.seed,
                   args.noise, args.distinct)
    results, curves, acc_curves = {}, {}, {}
    specs = run_specs(args)
    for index, (name, run_overrides) in enumerate(specs.items()):
        run_dir = os.path.join(args.out, name)
        if args.evaluate_only:
            losses, accs, seconds = curves_of(run_dir) + (float("nan"),)
        else:
            losses, accs, seconds = train(args, index, name, run_overrides, data, run_dir, pairs)
        curves[name], acc_curves[name] = losses, accs
        r = evaluate_run(run_dir, pairs, args.size)
        results[name] = dict(r.as_dict(), train_seconds=seconds, final_loss=losses[-1][1],
                             first_loss=losses[0][1], overrides=run_overrides)
        print(f"{name}: accuracy {100 * r.accuracy:.2f} +- {100 * r.std:.2f}  "
              f"({seconds:.0f} s)", flush=True)
    base = untrained(os.path.join(args.out, next(iter(specs))), pairs, args.size)
    png = args.png
    plot(curves, acc_curves, png, " vs ".join(specs) + f" (synthetic identities, "
         f"{args.ranks} ranks)")
    with open(args.json or os.path.join(args.out, "learning_check.json"), "w") as f:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
        json.dump({"args": vars(args), "commit": commit, "untrained": base.as_dict(),
                   "runs": results, "curves": curves, "accuracy_curves": acc_curves}, f,
                  indent=1)
    print("\n| run | verification accuracy % (10-fold, +- std) | TAR@FAR=1e-3 % | "
          "loss first -> last | train time s |")
    print("|---|---|---|---|---|")
    print(f"| untrained backbone | {100 * base.accuracy:.2f} +- {100 * base.std:.2f} | "
          f"{100 * base.tar[1e-3]:.1f} | — | — |")
    for name, r in results.items():
        print(f"| {name} | {100 * r['accuracy']:.2f} +- {100 * r['std']:.2f} | "
              f"{100 * r['tar']['0.001']:.1f} | {r['first_loss']:.2f} -> {r['final_loss']:.2f} "
              f"| {r['train_seconds']:.0f} |")
    steps = sorted({s for pts in acc_curves.values() for s, _ in pts})
    if steps:
        names = list(acc_curves)
        print("\nverification accuracy % during training (launch/train.py's eval.bins hook):\n")
        print("| step | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for st in steps:
            row = [dict(acc_curves[n]).get(st) for n in names]
            print(f"| {st} | " + " | ".join("—" if v is None else f"{v:.2f}" for v in row) + " |")
    first = next(iter(results))
    for name, r in list(results.items())[1:]:
        print(f"gap {first} - {name}: {100 * (results[first]['accuracy'] - r['accuracy']):+.2f} "
              f"points")
    print(f"plot {png}")


if __name__ == "__main__":
    main()
