"""Bad input and faults end with an error that names the cause, on every rank, within a bound,
and leave nothing behind (issue 10): lying manifests, labels beyond num_classes, a loader that
fails on one rank only, truncated RecordIO, a folder's left-out files, a converter killed with
SIGKILL, a YAML section that is not a mapping, a dead S3 endpoint, an S3 server that dies (or
blinks) mid-epoch, a disk that fills up during a checkpoint, and the temporary files of
interrupted saves."""
import json
import os
import resource
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

from hybrid_fc.data import ShardError, make_loader
from test_data_loader import _epoch, _handmade_shards
from harness import free_port, run_deepspeed_ranks, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# -- manifests that do not describe their shards ---------------------------------------------
def test_label_beyond_manifest_num_classes_is_an_error_naming_the_shard(tmp_path):
    """Bug caught: out-of-range labels skipped as 'corrupt' (a manifest understating
    num_classes silently dropped 75% of the data)."""
    manifest = _handmade_shards(str(tmp_path))        # labels 0..3
    m = json.load(open(manifest))
    m["num_classes"] = 2
    json.dump(m, open(manifest, "w"))
    for workers in (0, 1):
        loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=workers,
                             shuffle_buffer=0)
        with pytest.raises(ShardError, match=r"shard .*s\d\.tar: sample \d+ has label [23], "
                                             r"outside \[0, 2\)"):
            _epoch(loader)


def test_manifest_counts_that_lie_are_errors(tmp_path):
    """Bugs caught: an overstated num_samples accepted silently (epochs 2.5x too long), and a
    per-shard count that does not match its shard."""
    manifest = _handmade_shards(str(tmp_path))        # 3 shards x 10
    m = json.load(open(manifest))
    m["num_samples"] = 75
    json.dump(m, open(manifest, "w"))
    with pytest.raises(ShardError, match="num_samples is 75 but its shards' counts add up to 30"):
        make_loader(manifest, 4, rank=0, world_size=1)
    m["num_samples"], m["shards"][1]["count"] = 45, 25
    json.dump(m, open(manifest, "w"))
    loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=0, shuffle_buffer=0)
    with pytest.raises(ShardError, match=r"s1\.tar holds 10 samples but the manifest says 25"):
        _epoch(loader)


def _streams_on_two_ranks(rank, world_size, good, bad):
    """InputStreams (what the trainer reads from) where only rank 1's data is bad."""
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.trainer import InputStreams
    cfg = load_config(None, ["data.source=webdataset", f"data.urls={bad if rank else good}",
                             "data.num_workers=0", "data.shuffle_buffer=0", "head.num_classes=4",
                             "model.input_size=16"])
    streams = InputStreams(cfg, 4, rank, world_size, torch.device("cpu"))
    try:
        for _ in range(20):
            next(streams)
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return type(exc).__name__, str(exc)
    return None


def test_a_loader_failing_on_one_rank_stops_every_rank(tmp_path):
    """Bug caught: a fatal loader error raised on its own rank only, the other rank waiting in
    the head's next collective until the process-group timeout (30 min)."""
    good = _handmade_shards(str(tmp_path / "good"))
    bad = _handmade_shards(str(tmp_path / "bad"))
    m = json.load(open(bad))
    m["num_classes"] = 1
    json.dump(m, open(bad, "w"))
    t = time.time()
    r0, r1 = run_ranks(2, _streams_on_two_ranks, good, bad, timeout=120)
    assert time.time() - t < 60
    assert r1[0] == "ShardError" and "has label" in r1[1]
    assert r0[0] == "RankFailed" and r0[1].startswith("rank 1 failed: ShardError: ")
    assert r1[1] in r0[1]  # the same message on the rank that did nothing wrong


# -- the converter's inputs ----------------------------------------------------------------------
def test_truncated_recordio_names_the_files(tmp_path):
    """Bug caught: IndexError from sources.py for a truncated .rec or an .idx pointing past its
    end."""
    from hybrid_fc.data import convert
    from hybrid_fc.data.sources import SourceError
    from test_data_convert import _ir_pack, _jpeg, _write_recordio
    d = tmp_path / "rec"
    _write_recordio(d, [(k, _ir_pack(k % 3, _jpeg(k))) for k in range(6)])
    size = os.path.getsize(d / "train.rec")
    os.truncate(d / "train.rec", size // 2)
    with pytest.raises(SourceError, match=r"train\.idx: key \d+ starts at byte \d+, but .*train"
                                          r"\.rec has only \d+ bytes .*truncated"):
        convert(str(d), str(tmp_path / "o1"), samples_per_shard=4)
    _write_recordio(d, [(k, _ir_pack(k % 3, _jpeg(k))) for k in range(6)])
    with open(d / "train.idx", "a") as f:
        f.write(f"6\t{size + 1000}\n")
    with pytest.raises(SourceError, match=r"key 6 starts at byte"):
        convert(str(d), str(tmp_path / "o2"), samples_per_shard=4)
    _write_recordio(d, [(k, _ir_pack(k % 3, _jpeg(k))) for k in range(6)])
    os.truncate(d / "train.rec", size - 10)            # inside the last record
    with pytest.raises(SourceError, match=r"train\.rec: record key 5 at offset \d+: file ends "
                                          r"inside a record"):
        convert(str(d), str(tmp_path / "o3"), samples_per_shard=4)
    assert not os.path.exists(tmp_path / "o3" / "manifest.json")


def test_converter_lists_every_file_it_leaves_out(tmp_path):
    """Bug caught: a dangling .jpg symlink (and any non-image file) dropped without a word."""
    from test_data_convert import _jpeg
    root = tmp_path / "faces"
    for name in ("a", "b"):
        (root / name).mkdir(parents=True)
        (root / name / "1.jpg").write_bytes(_jpeg(len(name)))
    os.symlink(tmp_path / "nowhere.jpg", root / "a" / "gone.jpg")
    (root / "b" / "notes.txt").write_text("x")
    (root / "README").write_text("x")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "data", "make_shards.py"), str(root),
                        "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "3 source files left out" in r.stdout
    m = json.load(open(out / "manifest.json"))
    assert m["num_samples"] == 2
    assert {os.path.relpath(e["path"], root): e["why"] for e in m["left_out"]} == {
        "README": "not an identity folder (files directly under the root are not samples)",
        os.path.join("a", "gone.jpg"): "dangling symbolic link",
        os.path.join("b", "notes.txt"): "extension is not one of .jpg/.jpeg/.png"}


def test_converter_workers_exit_with_a_killed_parent(tmp_path):
    """Bug caught: pool workers of make_shards living on for ever after kill -9 of the main
    process. The next run removes what they left and finishes the job."""
    import psutil
    from test_data_convert import _jpeg
    root = tmp_path / "faces"
    for c in range(16):
        (root / f"{c:02d}").mkdir(parents=True)
        for k in range(40):
            (root / f"{c:02d}" / f"{k}.jpg").write_bytes(_jpeg(c * 40 + k, size=64))
    cmd = [sys.executable, os.path.join(ROOT, "data", "make_shards.py"), str(root), "--out",
           str(tmp_path / "out"), "--samples-per-shard", "4", "--workers", "2"]
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, workers = time.time() + 60, []
    while time.time() < deadline and len(workers) < 2:
        workers = psutil.Process(p.pid).children()
        time.sleep(0.02)
    assert len(workers) == 2, "the converter did not start its workers"
    p.send_signal(signal.SIGKILL)
    p.wait()
    gone, alive = psutil.wait_procs(workers, timeout=10)
    assert alive == [], f"workers {[w.pid for w in alive]} outlived their parent"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert json.load(open(tmp_path / "out" / "manifest.json"))["num_samples"] == 640
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]


@pytest.mark.parametrize("text, match", [
    ("head: [1, 2]\n", r"bad\.yaml: section 'head' must be a mapping of keys"),
    ("base: [a.yaml]\n", r"`base:` must name one YAML file"),
    ("train:\n  steps: !!python/object/apply:os.system ['true']\n",
     r"bad\.yaml: not a plain YAML mapping"),
    ("train: [unclosed\n", r"bad\.yaml: not a plain YAML mapping"),
])
def test_yaml_errors_name_the_file(tmp_path, text, match):
    """Bugs caught: `head: [1, 2]` gave a TypeError from deep inside the config loader; a
    `!!python/object` tag or a YAML syntax error gave a traceback."""
    from hybrid_fc.training.config import load_config
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=match):
        load_config(str(path))


# -- S3: a dead endpoint, a server that dies or blinks mid-epoch ----------------------------------
def _fresh_s3fs():
    import s3fs
    s3fs.S3FileSystem.clear_instance_cache()  # clients remember the endpoint they were made for


@pytest.fixture
def s3_shards(s3_server, data_tiny_shards):
    """The tiny dataset under s3://faces/faults/ (5 shards, 96 samples)."""
    from test_data_s3 import _upload
    _upload(s3_server, "faces", "faults", data_tiny_shards)
    return "s3://faces/faults/"


def test_dead_endpoint_at_start_is_a_shard_error_within_seconds(s3_shards, monkeypatch):
    """Bug caught: a dead endpoint with an s3://prefix/ source raised botocore's
    EndpointConnectionError (after botocore's and s3fs's stacked retries), not ShardError."""
    dead = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", dead)
    _fresh_s3fs()
    try:
        t = time.time()
        with pytest.raises(ShardError, match=rf"s3://faces/faults/manifest\.json from endpoint "
                                             rf"{dead}"):
            make_loader(s3_shards, 4, rank=0, world_size=1)
        with pytest.raises(ShardError, match="cannot be read"):
            make_loader([s3_shards + "shard-000000.tar"], 4, rank=0, world_size=1,
                        samples_per_epoch=16)
        assert time.time() - t < 15
    finally:
        _fresh_s3fs()


class _Server:
    """A moto server of its own (the same in-process buckets as the session's), to kill."""

    def __init__(self, port):
        import moto.server
        self.port = port
        self.server = moto.server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        self.server.start()

    def stop(self):
        self.server.stop()


def test_s3_server_dying_mid_epoch_stops_within_the_bound(s3_shards, monkeypatch):
    """Bug caught: 75 s from a dead server to the error (stacked retries), and an error that
    named neither the shard nor the endpoint."""
    port = free_port()
    server = _Server(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    _fresh_s3fs()
    try:
        loader = make_loader(s3_shards, 4, rank=0, world_size=1, num_workers=0,
                             shuffle_buffer=0, retry_s=3)
        batches = iter(loader)
        next(batches)
        server.stop()
        t = time.time()
        with pytest.raises(ShardError, match=rf"shard s3://faces/faults/shard-\d+\.tar cannot be "
                                             rf"read from endpoint http://127\.0\.0\.1:{port}: "
                                             r".*still failing after \d+ retries in 3 s"):
            for _ in batches:
                pass
        assert time.time() - t < 3 + 10
    finally:
        _fresh_s3fs()


def test_s3_server_blinking_mid_epoch_loses_no_sample(s3_shards, monkeypatch):
    """A server that is down for a second: the shard is retried and read from where it broke;
    the epoch equals an undisturbed one sample for sample. Bug caught: a transient outage
    skipping shards (a shorter or reordered epoch)."""
    port = free_port()
    server = _Server(port)
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    _fresh_s3fs()
    try:
        kw = dict(rank=0, world_size=1, num_workers=0, shuffle_buffer=0, seed=2, retry_s=20)
        reference = [(x.clone(), y.clone()) for x, y in make_loader(s3_shards, 4, **kw)]
        loader = make_loader(s3_shards, 4, **kw)
        got = []
        for i, (x, y) in enumerate(loader):
            got.append((x.clone(), y.clone()))
            if i == 2:
                server.stop()
                threading.Timer(1.0, lambda: setattr(server, "server", _Server(port).server)
                                ).start()
        assert len(got) == len(reference) == 96 // 4
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
                   for a, b in zip(got, reference))
    finally:
        server.stop()
        _fresh_s3fs()


# -- checkpoints: a full disk, the temporary files of interrupted saves ----------------------------
def _save_with_a_full_disk(rank, world_size, out):
    from hybrid_fc.training.checkpoint import CheckpointError, save_checkpoint
    from hybrid_fc.collectives import RankFailed
    from test_checkpoint import _build
    from tinynet import batch
    hybrid = _build(world_size, stage=1)
    x, y = batch(0, rank, 3, 11)  # step 0, micro 3, test_checkpoint's 11 classes
    hybrid.forward_backward(x, y)
    hybrid.step()
    save_checkpoint(hybrid, out)                      # global_step1: complete
    hybrid.forward_backward(x, y)
    hybrid.step()
    if rank == 1:  # this rank's disk is "full": writes past 4 KB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    try:
        save_checkpoint(hybrid, out)
    except (CheckpointError, RankFailed) as exc:
        return type(exc).__name__, str(exc)
    return None


def test_disk_full_during_a_save_is_named_on_every_rank_and_leaves_nothing(tmp_path):
    """Bug caught: `basic_ios::clear: iostream error` on one rank, the other waiting in the
    save's barrier, and the *.tmp.<pid> file left behind."""
    out = str(tmp_path / "ck")
    r0, r1 = run_deepspeed_ranks(2, _save_with_a_full_disk, out, timeout=180)
    assert r1[0] == "CheckpointError"
    assert "cannot write" in r1[1] and "head-rank00001.pt" in r1[1] and "GB free" in r1[1]
    assert r0 == ("RankFailed", f"rank 1 failed: CheckpointError: {r1[1]}")
    assert open(os.path.join(out, "latest")).read() == "global_step1"
    leftovers = [os.path.join(d, n) for d, _, names in os.walk(out) for n in names
                 if ".tmp." in n]
    assert leftovers == []
    assert not os.path.exists(os.path.join(out, "global_step2", "hybrid", "meta.json"))


def test_stale_temporary_files_are_removed_at_the_next_start(tmp_path):
    """A save killed mid-write leaves <name>.tmp.<pid>; the next run's start removes them (and
    nothing else)."""
    from hybrid_fc.training.checkpoint import remove_stale_temps
    hybrid = tmp_path / "global_step4" / "hybrid"
    hybrid.mkdir(parents=True)
    stale = [hybrid / "head-rank00001.pt.tmp.4242", tmp_path / "latest.tmp.977"]
    keep = [hybrid / "meta.json", hybrid / "head-rank00000.pt", tmp_path / "latest",
            tmp_path / "notes.tmp.txt"]
    for p in stale + keep:
        p.write_text("x")
    assert sorted(remove_stale_temps(str(tmp_path))) == sorted(map(str, stale))
    assert all(p.exists() for p in keep) and not any(p.exists() for p in stale)
    assert remove_stale_temps(str(tmp_path / "missing")) == []
