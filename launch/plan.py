"""Will it fit? The per-GPU memory of a Partial FC run, before you start it (hybrid_fc.training.plan).

    python launch/plan.py --classes 300M --dim 512 --gpus 8 --gpu-memory 80GB \\
        --sample-rate 0.1 --backbone iresnet100 --deepspeed_config ds_configs/zero2_bf16.json \\
        --micro-batch 128 --weight-dtype bfloat16 --state-dtype int8 --chunk-size 65536

    python launch/plan.py --config launch/configs/glint360k_r100_pfc.yaml \\
        --deepspeed_config ds_configs/zero2_bf16.json --gpus 8 --gpu-memory 80GB

Prints a table per GPU (rank 0, which owns the most classes): class centers, optimizer state,
sampled rows and their gradient, gathered embeddings, what is kept for backward, logits per
block, the backbone's parameters / gradients / optimizer state under the ZeRO stage of the JSON,
an activation estimate, a reserve and the headroom; then, as its last line, one JSON object
with `fits`, `per_gpu_bytes`, `head_bytes`, `max_classes` (the largest class count that fits
with everything else unchanged) and the items. Nothing is allocated: the backbone's size comes
from its registry definition on torch's meta device. launch/train.py runs the same plan at
start-up and refuses a run that does not fit.

Flags set the experiment's fields (with --config, over the YAML's values): --classes
head.num_classes (300000000 or 300M), --dim model.embedding_size, --sample-rate
head.sample_rate, --backbone model.backbone, --weight-dtype head.weight_dtype, --state-dtype
head_optim.state_dtype, --chunk-size head.chunk_size (0: none). Without --config the head is
planned with sparse gradients and sparse_sgd, the setup for large class counts. --micro-batch
overrides the JSON's train_micro_batch_size_per_gpu; without --deepspeed_config the backbone is
planned as bf16, ZeRO-0, SGD. Exit status: 0 when it fits, 3 when it does not.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
DEFAULT_MICRO_BATCH = 128


def parse_args(argv=None):
    from hybrid_fc.head.precision import STATE_DTYPES, WEIGHT_DTYPES, dtype_names
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML (defaults for the flags)")
    p.add_argument("--deepspeed_config", default=None, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--classes", default=None, help="head.num_classes, e.g. 300000000 or 300M")
    p.add_argument("--dim", type=int, default=None, help="model.embedding_size")
    p.add_argument("--gpus", type=int, required=True, help="ranks in all (nodes x GPUs)")
    p.add_argument("--gpu-memory", required=True, help="memory per rank, e.g. 80GB or 80GiB")
    p.add_argument("--sample-rate", type=float, default=None, help="head.sample_rate")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="images per rank per step (default: the JSON's, else 128)")
    p.add_argument("--backbone", default=None, help="model.backbone (a registry name)")
    p.add_argument("--input-size", type=int, default=None, help="model.input_size")
    p.add_argument("--weight-dtype", default=None, choices=dtype_names(WEIGHT_DTYPES))
    p.add_argument("--state-dtype", default=None, choices=dtype_names(STATE_DTYPES))
    p.add_argument("--chunk-size", type=int, default=None, help="head.chunk_size (0: none)")
    p.add_argument("--reserve", default="3GB",
                   help="allowance for the CUDA context, NCCL and allocator slack")
    p.add_argument("overrides", nargs="*", help="more section.key=value experiment overrides")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Print the plan; returns the exit status (0 fits, 3 does not)."""
    args = parse_args(argv)
    from hybrid_fc.training.config import load_config, load_deepspeed_config
    from hybrid_fc.training.plan import parse_bytes, parse_count, plan_experiment
    overrides = [] if args.config else ["head.sparse_grad=true", "head_optim.name=sparse_sgd",
                                        "data.source=synthetic"]
    pairs = [("head.num_classes", None if args.classes is None else parse_count(args.classes)),
             ("model.embedding_size", args.dim), ("head.sample_rate", args.sample_rate),
             ("model.backbone", args.backbone), ("model.input_size", args.input_size),
             ("head.weight_dtype", args.weight_dtype),
             ("head_optim.state_dtype", args.state_dtype),
             ("head.chunk_size", None if args.chunk_size is None else (args.chunk_size or "null"))]
    overrides += [f"{k}={v}" for k, v in pairs if v is not None] + list(args.overrides)
    cfg = load_config(args.config, overrides)
    notes = []
    if args.deepspeed_config:
        ds = load_deepspeed_config(args.deepspeed_config)
    else:
        ds = {"bf16": {"enabled": True}}
        notes.append("no --deepspeed_config: the backbone is planned as bf16, ZeRO-0, SGD")
    if args.micro_batch is not None:
        ds = dict(ds, train_micro_batch_size_per_gpu=args.micro_batch)
    elif "train_micro_batch_size_per_gpu" not in ds and "train_batch_size" not in ds:
        ds = dict(ds, train_micro_batch_size_per_gpu=DEFAULT_MICRO_BATCH)
        notes.append(f"micro batch {DEFAULT_MICRO_BATCH} images per rank (the default; "
                     "--micro-batch to change)")
    if args.sample_rate is None and not args.config:
        notes.append("sample rate 1.0: every class is scored each step (the default; Partial "
                     "FC runs use 0.1-0.3: --sample-rate)")
    result = plan_experiment(cfg, ds, args.gpus, parse_bytes(args.gpu_memory),
                             reserve=parse_bytes(args.reserve))
    print(f"{cfg.model.backbone}, {cfg.head.num_classes:,} classes x "
          f"{cfg.model.embedding_size}, sample rate {cfg.head.sample_rate}, "
          f"micro batch {result.inp.micro_batch}, {args.gpus} ranks, "
          f"{args.deepspeed_config or 'bf16 ZeRO-0 SGD'}")
    for note in notes:
        print(f"note: {note}")
    print(result.table())
    print(json.dumps(result.summary()), flush=True)
    return 0 if result.fits else 3


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main, status=True))
