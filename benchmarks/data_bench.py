"""Loader throughput per worker core vs. the bare JPEG decode rate of the same bytes.

    python benchmarks/data_bench.py [--images 4096] [--workers 1] [--batch 128] [--no-s3]
    python benchmarks/data_bench.py --images 64 --batch 16 --passes 1 --min-seconds 0.05
                                                # smoke size (tests/test_smoke.py)

Writes a synthetic 112x112 JPEG dataset (shards of 512 samples) to a temp dir, then measures in
one run, on the same bytes:
  * bare decode, one core: simplejpeg (libjpeg-turbo) and PIL, a tight loop over in-memory bytes;
  * make_loader from local disk with `--workers` DataLoader workers (img/s divided by workers);
  * make_loader from a local S3 server (moto, started as a separate process so it does not
    share the loader's interpreter), through the s3:// handler.
Rates are images per CPU-second (per core), which a busy shared machine does not distort; the
loader's figure covers one epoch of `--passes` passes over the data, all costs included (worker
start, shuffle buffer fill, tar parsing, batching, handing batches to the main process).
Wall-clock rates per worker are printed next to them. Target: loader >= 0.6 x bare decode per
core. The last line is JSON.
"""
import argparse
import json
import os
import platform
import resource
import socket
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np


def bare_decode_rate(blobs, name, min_seconds=2.0):
    """Images per CPU-second of a tight decode loop in this process."""
    from hybrid_fc.data import make_decoder
    decode = make_decoder(name)
    for b in blobs[:32]:
        decode(b)  # warm-up
    n, t0 = 0, time.process_time()
    while time.process_time() - t0 < min_seconds:
        for b in blobs:
            decode(b)
        n += len(blobs)
    return n / (time.process_time() - t0)


def _children_cpu():
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)  # exited and joined children only
    return ru.ru_utime + ru.ru_stime


def loader_rate(source, args, **kw):
    """(images per CPU-second of the loader's processes, images per wall second per worker).

    CPU time counts the DataLoader workers (joined at the end of the epoch) plus this process
    while it iterates, i.e. everything the loader costs, including worker start, the shuffle
    buffer fill and receiving batches; it does not count a shared machine's other load, which
    the wall-clock figure does.
    """
    from hybrid_fc.data import make_loader
    loader = make_loader(source, args.batch, rank=0, world_size=1, num_workers=args.workers,
                         shuffle_buffer=args.shuffle_buffer, seed=0,
                         samples_per_epoch=args.images * args.passes, image_size=112, **kw)
    c0, p0, t0 = _children_cpu(), time.process_time(), time.perf_counter()
    n = sum(x.shape[0] for x, _ in loader)
    wall = time.perf_counter() - t0
    cpu = _children_cpu() - c0 + time.process_time() - p0
    return n / cpu, n / wall / max(1, args.workers), loader.stats


def start_s3(directory):
    import boto3
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p",
                               str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ACCESS_KEY_ID="testing", AWS_SECRET_ACCESS_KEY="testing",
                      AWS_DEFAULT_REGION="us-east-1", AWS_ENDPOINT_URL=endpoint)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    for _ in range(100):
        try:
            s3.create_bucket(Bucket="bench")
            break
        except Exception:  # noqa: BLE001 - server still starting
            time.sleep(0.1)
    for name in os.listdir(directory):
        if name.endswith((".tar", ".json")):
            s3.upload_file(os.path.join(directory, name), "bench", f"ds/{name}")
    return server, "s3://bench/ds/"


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", default=None,
                   help="also write the result (one JSON object) to this file")
    p.add_argument("--images", type=int, default=4096)
    p.add_argument("--workers", type=int, default=1, help="DataLoader workers (rate / workers)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--passes", type=int, default=6, help="passes over the data per timed epoch")
    p.add_argument("--shuffle-buffer", type=int, default=1000)
    p.add_argument("--data", default=None, help="reuse/keep the synthetic shards here")
    p.add_argument("--no-s3", action="store_true", help="skip the local S3 server measurement")
    p.add_argument("--min-seconds", type=float, default=2.0,
                   help="CPU seconds of each bare-decode loop (a smoke run passes a tiny one)")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    torch.set_num_threads(1)
    from hybrid_fc.data import available_decoders, make_synthetic

    data = args.data or tempfile.mkdtemp(prefix="data_bench_")
    if not os.path.exists(os.path.join(data, "manifest.json")):
        make_synthetic(data, identities=max(1, args.images // 16), images_per_id=16, size=112,
                       samples_per_shard=512, workers=os.cpu_count() or 1)
    blobs = []
    for name in sorted(os.listdir(data)):
        if name.endswith(".tar"):
            with tarfile.open(os.path.join(data, name)) as tf:
                blobs += [tf.extractfile(t).read() for t in tf if t.name.endswith(".jpg")]
    print(f"{len(blobs)} JPEGs, mean {np.mean([len(b) for b in blobs]):.0f} bytes, 112x112")

    result = {"images": len(blobs), "workers": args.workers, "batch": args.batch,
              "machine": f"{platform.machine()} {os.cpu_count()} cores, torch "
                         f"{torch.__version__}"}
    for name in available_decoders():
        rate = bare_decode_rate(blobs, name, min_seconds=args.min_seconds)
        result[f"decode_{name}_per_core"] = round(rate)
        print(f"bare decode {name:10s} {rate:9.0f} img/s per CPU-second")
    ref = result[f"decode_{available_decoders()[0]}_per_core"]
    stores = [("local", data)]
    server = None
    if not args.no_s3:
        server, url = start_s3(data)
        stores.append(("s3", url))
    try:
        for where, source in stores:
            cpu_rate, wall_rate, stats = loader_rate(source, args)
            result[f"loader_{where}_per_core"] = round(cpu_rate)
            result[f"loader_{where}_wall_per_worker"] = round(wall_rate)
            result[f"ratio_{where}"] = round(cpu_rate / ref, 3)
            print(f"loader {where:6s} {cpu_rate:9.0f} img/s per CPU-second "
                  f"({cpu_rate / ref:.2f} x bare decode); wall {wall_rate:.0f} img/s per "
                  f"worker; {stats}")
    finally:
        if server is not None:
            server.terminate()
            server.wait()
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
