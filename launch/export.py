"""Export a training checkpoint: plain fp32 backbone state dict, ONNX, class centers.

    python launch/export.py --checkpoint runs/ms1mv3_r50 --out exported/ --onnx --centers

writes exported/backbone.pt (`model.load_state_dict(torch.load(...))` on
hybrid_fc.backbones.build_backbone(**exported/backbone.json), or on your own model's factory
with --model module:factory for a backbone outside the registry), exported/backbone.onnx (input
`images` (batch, 3, S, S) normalized as in training, output `embeddings` (batch, D); checked
with onnxruntime at batch sizes 1 and 3 against PyTorch, normalized embeddings within 1e-4) and
exported/centers.npy (the (C, D) fp32 class centers of all head shards, by class id).
Works for checkpoints of any ZeRO stage and any number of ranks; one CPU process is enough
(under `deepspeed` or `torchrun` rank 0 does the work and the other ranks exit).
"""
import argparse
import json
import os
import sys


def parse_args(argv=None):
    from hybrid_fc.evaluation.export import add_checkpoint_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p, checkpoint_help="run folder (latest) or tag folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--onnx", action="store_true", help="also write backbone.onnx")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--centers", action="store_true", help="also write the class centers")
    p.add_argument("--json", default=None, help="also write what was written (paths) here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if int(os.environ.get("RANK", "0")) != 0:
        return {}  # under a launcher: one process is enough, rank 0 writes, the others wait
    from hybrid_fc.evaluation.export import (export_class_centers, export_onnx, load_backbone,
                                             model_overrides, save_backbone)
    overrides = model_overrides(args)
    # save_backbone creates args.out only once the weights have loaded into the model: a
    # checkpoint that cannot be read leaves no empty output folder behind
    pt = save_backbone(args.checkpoint, os.path.join(args.out, "backbone.pt"), args.tag,
                       args.trust_checkpoint, **overrides)
    written = {"state_dict": pt}
    if args.onnx:
        model, cfg = load_backbone(pt, model=args.model)
        info = export_onnx(model, os.path.join(args.out, "backbone.onnx"),
                           int(cfg["input_size"]), opset=args.opset)
        written["onnx"] = info["path"]
        print(f"onnx: max |onnxruntime - torch| of normalized embeddings "
              f"{info['max_abs_diff']:.2e} at batch sizes {info['batch_sizes']}", flush=True)
    if args.centers:
        written["centers"] = export_class_centers(args.checkpoint,
                                                  os.path.join(args.out, "centers.npy"), args.tag,
                                                  report=lambda s: print(s, flush=True))
    print(json.dumps(written, indent=1), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(written, f, indent=1)
    return written


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
