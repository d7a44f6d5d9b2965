"""Write a synthetic identity dataset (learnable; same shard format as make_shards.py).

    python data/make_synthetic.py --out DIR --identities N --images-per-id K [--size 112] [--seed S]

Each identity has a stable appearance (smooth colour field + coloured blobs), each image a random
shift / brightness / contrast / noise variation, JPEG-encoded. Resumable like make_shards.py.
"""
import argparse
import sys

from hybrid_fc.data import make_synthetic
from hybrid_fc.data.shards import run_cli
from hybrid_fc.runtime import run_script


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--identities", type=int, required=True)
    p.add_argument("--images-per-id", type=int, required=True)
    p.add_argument("--size", type=int, default=112, help="image side in pixels (default 112)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quality", type=int, default=90, help="JPEG quality")
    p.add_argument("--noise", type=float, default=6.0,
                   help="per-pixel noise std (0-255); higher is harder to learn (default 6)")
    p.add_argument("--distinct", type=float, default=1.0,
                   help="identities' distance from a shared appearance, in (0, 1]; lower is "
                        "harder (default 1)")
    p.add_argument("--shard-size", default="256MB")
    p.add_argument("--samples-per-shard", type=int, default=None)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    return run_cli(args.out, lambda progress: make_synthetic(
        args.out, args.identities, args.images_per_id, size=args.size, seed=args.seed,
        quality=args.quality, noise=args.noise, distinct=args.distinct, workers=args.workers,
        samples_per_shard=args.samples_per_shard, shard_size=args.shard_size,
        progress=progress))


if __name__ == "__main__":
    sys.exit(run_script(main))  # an input error: one line naming it, exit status 1
