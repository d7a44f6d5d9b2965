"""S3 for real: a local moto S3 server; shards uploaded with boto3, then streamed through the
s3:// handler (fsspec/s3fs, in forked DataLoader workers) and through `pipe:aws s3 cp URL -`;
the converter writes to an s3:// prefix; a missing object and a dead endpoint are clear errors.
"""
import json
import os
import shlex
import tarfile
import time

import pytest
import torch

from hybrid_fc.data import ShardError, convert, make_loader

try:  # test extras: required, a missing one fails the run (it used to skip these tests)
    import boto3
    import s3fs  # noqa: F401  (the s3:// handler's backend)
except ImportError as exc:
    raise ImportError(f"{exc.name} is a test extra; install them: pip install -e '.[test]'") \
        from exc


def _upload(endpoint, bucket, prefix, directory):
    s3 = boto3.client("s3", endpoint_url=endpoint)
    try:
        s3.create_bucket(Bucket=bucket)
    except s3.exceptions.BucketAlreadyOwnedByYou:
        pass
    names = sorted(n for n in os.listdir(directory) if n.endswith((".tar", ".json")))
    for name in names:
        s3.upload_file(os.path.join(directory, name), bucket, f"{prefix}/{name}")
    return names


def _batches(source, **kw):
    loader = make_loader(source, 8, rank=0, world_size=1, seed=4, **kw)
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b):
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb)
                                    for (xa, ya), (xb, yb) in zip(a, b))


@pytest.fixture(scope="module")
def data_s3_shards(s3_server, data_tiny_shards):
    _upload(s3_server, "faces", "tiny", data_tiny_shards)
    return "s3://faces/tiny/"


def test_stream_from_s3_in_forked_workers(data_s3_shards, data_tiny_shards):
    """One epoch over s3:// in 2 forked workers: the same batches as from local disk (the order
    depends on the URLs' positions, not their names). The prefix without its trailing slash
    (what make_shards prints) means the same."""
    remote = _batches(data_s3_shards, num_workers=2, shuffle_buffer=20)
    assert len(remote) == 12
    assert _same(remote, _batches(data_tiny_shards, num_workers=2, shuffle_buffer=20))
    assert _same(remote, _batches(data_s3_shards.rstrip("/"), num_workers=2, shuffle_buffer=20))


def test_stream_through_aws_cli_pipe(data_s3_shards, data_tiny_shards, aws_cli):
    """pipe:aws s3 cp URL - : the CLI finds the endpoint and credentials in the environment.
    `aws` is the one beside this interpreter (a venv not activated has no aws on PATH), else
    the one on PATH; neither fails the test (conftest.find_aws_cli), it never skips."""
    template = f"pipe:{shlex.quote(aws_cli)} s3 cp {{url}} -"
    loader = make_loader(data_s3_shards, 8, rank=0, world_size=1, url_template=template)
    assert loader.manifest.urls[0].startswith(f"pipe:{shlex.quote(aws_cli)} s3 cp "
                                              "s3://faces/tiny/")
    # a small shuffle buffer: each shard costs one CLI start (~1 s), so read few ahead
    kw = dict(num_workers=1, shuffle_buffer=8, samples_per_epoch=40)
    remote = _batches(data_s3_shards, url_template=template, **kw)
    assert len(remote) == 5
    assert _same(remote, _batches(data_tiny_shards, **kw))


def test_convert_to_s3_prefix(s3_server, tmp_path, data_tiny_shards):
    """The writer uploads shards + manifest to s3://; a second run finds them done."""
    (tmp_path / "imgs").mkdir()
    lines = []
    for i in range(9):
        src = os.path.join(data_tiny_shards, "shard-000000.tar")
        with tarfile.open(src) as tf:
            jpgs = [tf.extractfile(t).read() for t in tf.getmembers() if t.name.endswith(".jpg")]
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpgs[i])
        lines.append(f"imgs/{i}.jpg {i % 3}")
    (tmp_path / "list.txt").write_text("\n".join(lines) + "\n")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="converted")
    m = convert(str(tmp_path / "list.txt"), "s3://converted/ds", samples_per_shard=4,
                workers=2)
    keys = {o["Key"] for o in s3.list_objects_v2(Bucket="converted", Prefix="ds/")["Contents"]}
    assert {"ds/manifest.json", "ds/shard-000000.tar", "ds/shard-000002.tar"} <= keys
    remote = json.loads(s3.get_object(Bucket="converted", Key="ds/manifest.json")["Body"].read())
    assert remote["num_samples"] == m["num_samples"] == 9 and len(remote["shards"]) == 3
    # resume finds every shard done (no new uploads)
    stamp = s3.head_object(Bucket="converted", Key="ds/shard-000001.tar")["LastModified"]
    time.sleep(1.1)
    convert(str(tmp_path / "list.txt"), "s3://converted/ds", samples_per_shard=4)
    assert s3.head_object(Bucket="converted", Key="ds/shard-000001.tar")["LastModified"] == stamp
    loader = make_loader("s3://converted/ds/manifest.json", 3, rank=0, world_size=1,
                         num_workers=0, shuffle_buffer=0)
    labels = sorted(torch.cat([y for _, y in loader]).tolist())
    assert labels == sorted(i % 3 for i in range(9))  # one consumer: one pass of all shards


def test_s3_errors_are_clear_and_fast(data_s3_shards, s3_server, monkeypatch):
    urls = [data_s3_shards + "shard-000000.tar", data_s3_shards + "no-such-shard.tar"]
    t = time.time()
    with pytest.raises(ShardError, match="no-such-shard.tar: FileNotFoundError"):
        make_loader(urls, 4, rank=0, world_size=1, samples_per_epoch=16)
    with pytest.raises(ShardError, match="no manifest at s3://faces/missing/manifest.json"):
        make_loader("s3://faces/missing/", 4, rank=0, world_size=1)
    assert time.time() - t < 10


def _train_from_s3(rank, world_size, urls, out):
    import contextlib
    import io
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, os.path.join(root, "launch"))
    import train
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        hybrid = train.main([
            "--config", os.path.join(root, "launch", "configs", "quickstart.yaml"),
            "--deepspeed_config", os.path.join(root, "ds_configs", "cpu_zero1_fp32.json"),
            f"data.urls={urls}", "data.num_workers=1", "data.shuffle_buffer=20",
            "model.backbone=mlp", "head.num_classes=12", "train.steps=8", "train.log_every=4",
            "train.checkpoint_every=0", "schedule.warmup_steps=0", "train.tensorboard=false",
            f"train.output_dir={out}"])
    return hybrid.global_steps, printed.getvalue()


def test_train_py_streams_s3_on_two_ranks(data_s3_shards, tmp_path):
    """launch/train.py's loop on 2 gloo ranks with data.urls=s3://...: each rank streams its
    share of the shards from the local S3 server in a forked worker; 8 steps of 32 images per
    rank run 2.7 epochs of the 96 samples, so the epoch boundary is crossed on both ranks."""
    from harness import run_deepspeed_ranks
    out = str(tmp_path / "run")
    results = run_deepspeed_ranks(2, _train_from_s3, data_s3_shards, out)
    assert [steps for steps, _ in results] == [8, 8]
    from hybrid_fc.training.metrics import read_metrics
    rows = read_metrics(out, "train")
    assert [r["step"] for r in rows] == [4, 8] and all(r["loss"] > 0 for r in rows)
    assert open(os.path.join(out, "latest")).read() == "global_step8"
