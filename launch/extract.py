"""Embeddings of a folder of images or of WebDataset shards -> .npy + keys (for search / re-ID).

    python launch/extract.py --checkpoint runs/ms1mv3_r50 --images gallery/ --out gallery.npy
    deepspeed --num_gpus 8 launch/extract.py --checkpoint exported/backbone.pt \\
        --images data/ms1mv3 --out ms1mv3.npy          # shards: manifest folder or brace pattern

writes gallery.npy (float32 (N, D), L2-normalized, flip TTA), gallery.keys.txt (one key per row:
the relative path, or the shard sample key) and, for shards with labels, gallery.labels.npy.
Several ranks split the files / shards and need a filesystem they all see for --out.
"""
import argparse
import os
import sys


def parse_args(argv=None):
    from hybrid_fc.evaluation.export import add_checkpoint_args
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_checkpoint_args(p)
    p.add_argument("--images", required=True, help="image folder, or shards (manifest/pattern)")
    p.add_argument("--out", required=True, help="output .npy")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--no-flip", action="store_true")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from hybrid_fc.evaluation.export import load_for_inference, model_overrides
    from hybrid_fc.evaluation.extract import check_source, extract_embeddings
    check_source(args.images)  # before the checkpoint is read
    model, cfg = load_for_inference(args.checkpoint, args.tag, args.trust_checkpoint,
                                    **model_overrides(args))
    n = extract_embeddings(model, args.images, args.out, int(cfg["input_size"]),
                           batch_size=args.batch_size, flip=not args.no_flip)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{n} embeddings -> {args.out} (+ {args.out[:-4]}.keys.txt)", flush=True)
    return n


if __name__ == "__main__":
    from hybrid_fc.runtime import run_script
    sys.exit(run_script(main))
