"""Verification of a trained backbone on insightface pair sets and on IJB-B / IJB-C: prints tables.

One process (CPU or one GPU):
    python launch/eval.py --checkpoint runs/ms1mv3_r50 --pairs data/lfw.bin \\
        --pairs data/cfp_fp.bin --pairs data/agedb_30.bin
    python launch/eval.py --checkpoint runs/ms1mv3_r50 --ijb IJB_release/IJBC \\
        --ijb IJB_release/IJBB --json ijb.json --plot ijb_roc.png
An ONNX model instead of a checkpoint (launch/export.py's, or any insightface-style model):
    python launch/eval.py --onnx exported/backbone.onnx --ijb IJB_release/IJBC
Every GPU of a node (each rank embeds a slice of every set; the result equals one process):
    deepspeed --num_gpus 8 launch/eval.py --checkpoint runs/ms1mv3_r50 --pairs data/lfw.bin
    torchrun --nproc_per_node 8 launch/eval.py --checkpoint runs/ms1mv3_r50 \\
        --ijb IJB_release/IJBC --workers 4
(--pairs was --bin, still accepted outside the deepspeed launcher, whose own argument parser
reads --bin as an abbreviation of its --bind_cores_to_rank / --bind_core_list.)

--checkpoint: a training run folder (its `latest` checkpoint; --tag picks another), a tag folder,
or a backbone.pt written by launch/export.py. Any --pairs file not ending in .bin is read as a
pair list (`image_a image_b is_same` per line). Accuracy is insightface's 10-fold protocol with
flip TTA (hybrid_fc/evaluation/verification.py); TAR@FAR is over all pairs (n/a when a set has
< 1/FAR impostors). --ijb DIR: an insightface IJB release folder (loose_crop/ and meta/), 1:1
template verification as insightface's eval_ijbc.py computes it
(hybrid_fc/evaluation/ijb.py): TAR (%) at FAR 1e-6 ... 1e-1 and ROC AUC.
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    from hybrid_fc.evaluation.export import add_checkpoint_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, onnx=True)
    p.add_argument("--pairs", "--bin", action="append", default=[], dest="bins",
                   help="pair set (.bin or pair list); repeat for several")
    p.add_argument("--ijb", action="append", default=[], metavar="DIR",
                   help="IJB-B or IJB-C release folder (loose_crop/, meta/); repeat for several")
    p.add_argument("--ijb-name", choices=("ijbb", "ijbc"), default=None,
                   help="which set of a --ijb folder that holds both")
    p.add_argument("--ijb-no-detector-score", action="store_true",
                   help="do not weight IJB images by their detector score (insightface: D0)")
    p.add_argument("--ijb-normalize-images", action="store_true",
                   help="L2-normalize each IJB image's feature before pooling (insightface's "
                        "default keeps its norm as a weight: N1)")
    p.add_argument("--workers", type=int, default=0,
                   help="processes per rank that decode and align IJB images ahead of the model")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward (x2 with flip)")
    p.add_argument("--no-flip", action="store_true", help="no flip test-time augmentation")
    p.add_argument("--nfolds", type=int, default=10)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--plot", default=None, metavar="PNG",
                   help="draw the IJB ROC curves (log FAR axis) into this PNG file")
    args = p.parse_args(argv)
    if not args.bins and not args.ijb:
        p.error("nothing to evaluate: give --pairs FILE and/or --ijb DIR")
    if args.onnx:
        given = [f for f, v in (("--tag", args.tag), ("--backbone", args.backbone),
                                ("--model", args.model), ("--embedding-size",
                                                          args.embedding_size),
                                ("--trust-checkpoint", args.trust_checkpoint)) if v]
        if given:
            p.error(f"{', '.join(given)}: only with --checkpoint (an ONNX file holds its model)")
    if args.plot and not args.ijb:
        p.error("--plot draws the IJB ROC curves: give --ijb DIR")
    return args


def main(argv=None):
    args = parse_args(argv)
    from hybrid_fc.evaluation import (evaluate, evaluate_ijb, format_ijb_table, format_table,
                                      load_pair_set, plot_roc)
    from hybrid_fc.evaluation.export import (load_for_inference, load_onnx_for_inference,
                                             model_overrides)
    rank = int(os.environ.get("RANK", "0"))
    if args.onnx:
        model, cfg = load_onnx_for_inference(args.onnx, args.input_size)
    else:
        model, cfg = load_for_inference(args.checkpoint, args.tag, args.trust_checkpoint,
                                        **model_overrides(args))
    size, flip = int(cfg["input_size"]), not args.no_flip
    results = [evaluate(model, load_pair_set(path), size, batch_size=args.batch_size,
                        flip=flip, nfolds=args.nfolds) for path in args.bins]
    ijb = [evaluate_ijb(model, root, size, name=args.ijb_name, batch_size=args.batch_size,
                        flip=flip, normalize_images=args.ijb_normalize_images,
                        detector_score=not args.ijb_no_detector_score, workers=args.workers)
           for root in args.ijb]
    if rank == 0:
        source = f"{args.onnx or args.checkpoint}: {cfg['backbone']}"
        if results:
            print(format_table(results, title=f"{source}, {'flip TTA' if flip else 'no flip'}, "
                                              f"{args.nfolds}-fold"), flush=True)
        if ijb:
            protocol = ", ".join([
                "flip TTA" if flip else "no flip",
                "images L2-normalized" if args.ijb_normalize_images else "feature norms kept",
                "no detector score" if args.ijb_no_detector_score else "detector-score weights"])
            print(format_ijb_table(ijb, title=f"{source}, IJB 1:1 TAR (%) at FAR ({protocol})"),
                  flush=True)
            world = int(os.environ.get("WORLD_SIZE", "1"))
            for r in ijb:
                ignored = "".join(f"; ignored {n} {what}" for what, n in r.ignored.items())
                print(f"{r.name}: {r.images} images embedded at {r.images_per_s:.1f} images/s "
                      f"on {world} rank{'s' if world > 1 else ''}{ignored}", flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump([dict(r.as_dict(), kind="pairs") for r in results]
                          + [r.as_dict() for r in ijb], f, indent=1)
        if args.plot:
            plot_roc(ijb, args.plot)
    return results + ijb


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
