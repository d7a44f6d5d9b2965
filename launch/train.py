"""Train a face-recognition / re-ID embedding model: DeepSpeed backbone + Partial FC head.

Single node, N GPUs (or N CPU processes on a machine without GPUs):
    deepspeed --num_gpus 8 launch/train.py --config launch/configs/base.yaml \\
        --deepspeed_config ds_configs/zero1_bf16.json  [section.key=value ...]

Several nodes, from the first node (ssh to every host, pdsh installed):
    hostfile:   node1 slots=8
                node2 slots=8
    deepspeed --hostfile hostfile --master_addr node1 --master_port 29500 launch/train.py \\
        --config launch/configs/glint360k_r100_pfc.yaml --deepspeed_config ds_configs/zero2_bf16.json
  Environment for the remote ranks goes in `.deepspeed_env` (one VAR=value a line, in the
  working directory or ~): e.g. NCCL_SOCKET_IFNAME=eth0, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_ENDPOINT_URL for s3:// shards (the pdsh path exports only NCCL*, PYTHON*, UCX*, MV2* and
  MLFLOW* variables by itself).

Several nodes without ssh (a scheduler starts one launcher per node; also two "nodes" on one box):
    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr node1 --master_port 29500 \\
        launch/train.py --config ... --deepspeed_config ...        # on node1
    deepspeed --hostfile hostfile --no_ssh --node_rank 1 --master_addr node1 --master_port 29500 \\
        launch/train.py --config ... --deepspeed_config ...        # on node2
  `.deepspeed_env` is not applied here: export NCCL_SOCKET_IFNAME, AWS_* in each node's shell.

The YAML (hybrid_fc/training/config.py) owns the model, head, head optimizer, LR schedule shape, data and
loop; the DeepSpeed JSON owns micro batch, accumulation, precision, ZeRO and the backbone
optimizer. Every YAML field can be overridden: `head.sample_rate=0.1 train.steps=2000`.
A run resumes from `train.output_dir/latest` automatically, at any number of ranks.
"""
import argparse
import sys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML (hybrid_fc/training/config.py)")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("--verbose", action="store_true",
                   help="every rank logs, DeepSpeed's and botocore's INFO lines included")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the YAML")
    return p.parse_args(argv)


def main(argv=None):
    """Train; returns the HybridEngine (tests call this in-process)."""
    args = parse_args(argv)
    from hybrid_fc.evaluation import build_verification
    from hybrid_fc.training import Trainer, load_config
    from hybrid_fc.training.config import load_deepspeed_config
    cfg = load_config(args.config, args.overrides)
    ds_cfg = load_deepspeed_config(args.deepspeed_config)
    return Trainer(cfg, ds_cfg, verbose=args.verbose, verification=build_verification).fit()


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
