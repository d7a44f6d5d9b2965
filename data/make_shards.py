"""Convert a face / re-ID dataset into WebDataset tar shards + manifest.json.

    python data/make_shards.py SOURCE --out OUT [--shard-size 256MB] [--workers N]

SOURCE: a directory with insightface `train.rec` + `train.idx`; an image folder with one
sub-folder per identity (labels = sorted folder names, written to OUT/classes.txt); or a text
file of `path label` lines. OUT: a local directory or an s3:// prefix (credentials and endpoint
from the usual AWS environment variables / ~/.aws files).

Interrupted? Run the same command again: finished shards are kept, the rest are written.
"""
import argparse
import sys

from hybrid_fc.data import convert
from hybrid_fc.data.shards import run_cli
from hybrid_fc.runtime import run_script


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", help="RecordIO directory, image folder, or `path label` list file")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--shard-size", default="256MB",
                   help="target shard size: 256MB = 256 x 10^6 bytes, 256MiB = 256 x 2^20 "
                        "(default 256MB)")
    p.add_argument("--samples-per-shard", type=int, default=None,
                   help="fixed number of samples per shard (overrides --shard-size)")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes")
    p.add_argument("--seed", type=int, default=0, help="seed spreading samples over shards")
    p.add_argument("--no-shuffle", action="store_true",
                   help="keep the source order in the shards (not recommended for training)")
    p.add_argument("--staging-dir", default=None,
                   help="local directory for shards before upload (s3:// output only)")
    p.add_argument("--verbose", action="store_true", help="show the traceback of an error")
    args = p.parse_args(argv)
    return run_cli(args.out, lambda progress: convert(
        args.source, args.out, shard_size=args.shard_size,
        samples_per_shard=args.samples_per_shard, workers=args.workers,
        shuffle_seed=None if args.no_shuffle else args.seed, staging_dir=args.staging_dir,
        progress=progress))


if __name__ == "__main__":
    sys.exit(run_script(main))  # an input error: one line naming it, exit status 1
