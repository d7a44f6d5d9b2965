"""Verification accuracy of a trained backbone on insightface pair sets: prints a table.

One process (CPU or one GPU):
    python launch/eval.py --checkpoint runs/ms1mv3_r50 --pairs data/lfw.bin \\
        --pairs data/cfp_fp.bin --pairs data/agedb_30.bin
Every GPU of a node (each rank embeds a slice of every set; the result equals one process):
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/ms1mv3_r50 --pairs data/lfw.bin
    torchrun --nproc_per_node 8 launch/eval.py --checkpoint runs/ms1mv3_r50 --pairs data/lfw.bin
(--pairs was --bin, still accepted outside the deepspeed launcher, whose own argument parser
reads --bin as an abbreviation of its --bind_cores_to_rank / --bind_core_list.)

--checkpoint: a training run folder (its `latest` checkpoint; --tag picks another), a tag folder,
or a backbone.pt written by launch/export.py. Any file not ending in .bin is read as a pair list
(`image_a image_b is_same` per line). Accuracy is insightface's 10-fold protocol with flip TTA
(hybrid_fc/evaluation/verification.py); TAR@FAR is over all pairs (n/a when a set has < 1/FAR impostors).
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    from hybrid_fc.evaluation.export import add_checkpoint_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--pairs", "--bin", action="append", required=True, dest="bins",
                   help="pair set (.bin or pair list); repeat for several")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (x2 with flip)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from hybrid_fc.evaluation import evaluate, format_table, load_pair_set
    from hybrid_fc.evaluation.export import load_for_inference, model_overrides
    rank = int(os.environ.get("RANK", "0"))
    model, cfg = load_for_inference(args.checkpoint, args.tag, args.trust_checkpoint,
                                    **model_overrides(args))
    size = int(cfg["input_size"])
    results = [evaluate(model, load_pair_set(path), size, batch_size=args.batch_size,
                        flip=not args.no_flip, nfolds=args.nfolds) for path in args.bins]
    if rank == 0:
        print(format_table(results, title=f"{args.checkpoint}: {cfg['backbone']}, "
                                          f"{'flip TTA' if not args.no_flip else 'no flip'}, "
                                          f"{args.nfolds}-fold"), flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([r.as_dict() for r in results], f, indent=1)
    return results


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
