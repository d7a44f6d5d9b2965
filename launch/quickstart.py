"""Quickstart: a synthetic identity dataset, then 2-rank DeepSpeed training, on CPU or GPU.

    python launch/quickstart.py                 # 2 ranks (CPU processes when there is no GPU)
    python launch/quickstart.py --ranks 4 train.steps=500

Writes 1,000 synthetic identities x 20 images (32x32 JPEG, WebDataset shards) to
runs/quickstart/data with hybrid_fc.data.make_synthetic, then runs exactly

    deepspeed --num_gpus 2 launch/train.py --config launch/configs/quickstart.yaml \\
        --deepspeed_config ds_configs/cpu_zero1_fp32.json

(300 steps, a batch of 32 per rank, a tiny IResNet, ArcFace Partial FC at sample rate 0.5),
prints the loss every 25 steps, verification accuracy on 600 pairs of 200 held-out identities
(runs/quickstart/heldout_pairs.bin, insightface .bin format) every 100 steps and at the end,
checkpoints to runs/quickstart, fails unless the loss fell, and draws the run's curves to
runs/quickstart/curves.png (launch/plot.py). On a 2-core CPU VM it took 56 s:
held-out accuracy 89.7% at step 100, 96.5% at 200, 97.0% at 300 (an untrained backbone: 57%).
Run it again and it resumes from the last checkpoint, which is the end of its 300 steps:
nothing to do (train.steps=600 schedule.allow_change=true continues training over a new
schedule; a fresh run needs another --out).

    python launch/quickstart.py --short --out /tmp/qs   # the same job at toy size (~30 s on
                                                        # one core): what the tests run
"""
import argparse
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# How hard the synthetic identities are to tell apart (hybrid_fc.data.synthetic_image): with the
# generator's defaults an untrained backbone already scored 86% on the held-out pairs, so the
# printed accuracy could not show learning; here identities are only 30% of the way from a shared
# appearance under 20 levels of pixel noise: untrained ~55% (tests/test_smoke.py checks <= 65%).
NOISE, DISTINCT = 20.0, 0.3


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=2, help="processes (GPUs when present)")
    p.add_argument("--identities", type=int, default=None, help="default 1000 (--short: 32)")
    p.add_argument("--images-per-id", type=int, default=None, help="default 20 (--short: 8)")
    p.add_argument("--out", default=os.path.join("runs", "quickstart"),
                   help="data, held-out pairs and the run's checkpoints go here")
    p.add_argument("--short", action="store_true",
                   help="toy size: 32 identities x 8 images, 40 held-out pairs, 8 steps")
    p.add_argument("--master_port", type=int, default=None,
                   help="the launcher's rendezvous port (default: DeepSpeed's, 29500)")
    p.add_argument("--deepspeed_config", default=os.path.join(ROOT, "ds_configs",
                                                              "cpu_zero1_fp32.json"))
    p.add_argument("overrides", nargs="*", help="section.key=value for launch/train.py")
    args = p.parse_args(argv)
    identities = args.identities or (32 if args.short else 1000)
    images_per_id = args.images_per_id or (8 if args.short else 20)
    heldout, num_pairs = (16, 40) if args.short else (200, 600)
    out = os.path.abspath(args.out)  # relative to where it was started, before the chdir
    os.chdir(ROOT)
    t0 = time.time()
    data = os.path.join(out, "data")
    if not os.path.isfile(os.path.join(data, "manifest.json")):
        from hybrid_fc.data import make_synthetic
        print(f"writing {identities} x {images_per_id} synthetic images to {data}", flush=True)
        make_synthetic(data, identities, images_per_id, size=32, seed=0, noise=NOISE,
                       distinct=DISTINCT, workers=max(1, min(4, os.cpu_count() or 1)),
                       samples_per_shard=2000)
    pairs = os.path.join(out, "heldout_pairs.bin")
    if not os.path.isfile(pairs):  # verification on identities the run never trains on
        from hybrid_fc.data import synthetic_pairs
        from hybrid_fc.evaluation import write_bin
        write_bin(pairs, *synthetic_pairs(identities, heldout, num_pairs, size=32, seed=0,
                                          noise=NOISE, distinct=DISTINCT))
    short = (["train.steps=8", "train.log_every=2", "train.checkpoint_every=4", "eval.every=4",
              "schedule.warmup_steps=2"] if args.short else [])
    # the user's overrides come last, so they win
    overrides = [f"head.num_classes={identities}", f"train.output_dir={out}"] + short \
        + args.overrides
    port = ["--master_port", str(args.master_port)] if args.master_port else []
    cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(args.ranks),
           *port, os.path.join("launch", "train.py"), "--config",
           os.path.join("launch", "configs", "quickstart.yaml"),
           "--deepspeed_config", args.deepspeed_config, f"data.urls={data}",
           f"eval.bins={pairs}"] + overrides
    print(" ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    started = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    for line in proc.stdout:  # show people rank 0's progress lines and errors
        if line.startswith(("step ", "start:", "verify ", "done at", "resume", "hybrid_fc",
                            "tensorboard")) or "rror" in line:
            print(line, end="", flush=True)
    rc = proc.wait()
    if rc != 0:
        sys.exit(f"training failed (exit code {rc})")
    # the numbers come from the run's metrics file, this invocation's rows
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.metrics import read_metrics
    out = load_config(os.path.join("launch", "configs", "quickstart.yaml"),
                      [o for o in overrides if o.startswith("train.output_dir=")]
                      ).train.output_dir
    losses = [(r["step"], r["loss"]) for r in read_metrics(out, "train")
              if r["time"] >= started]
    if len(losses) >= 2:
        first, last = losses[0][1], losses[-1][1]
        print(f"loss {first:.3f} -> {last:.3f} over steps {losses[0][0]}..{losses[-1][0]}; "
              f"wall time {time.time() - t0:.0f} s", flush=True)
        if not last < first:
            sys.exit("the loss did not fall")
    else:
        print(f"nothing to train (already at train.steps); wall time {time.time() - t0:.0f} s")
    from hybrid_fc.training.metrics import plot_runs
    plot = os.path.join(out, "curves.png")
    plot_runs([out], plot)
    print(f"curves of the run: {plot} (python launch/plot.py {out} --out FILE draws them again)",
          flush=True)


if __name__ == "__main__":
    main()
