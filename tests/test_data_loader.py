"""Streaming loader: equal batches on 2 and 3 gloo ranks with uneven shards, seeded order, exact
resume, corrupt samples and truncated tars counted, missing / unreachable shards fail fast,
decoders and device augmentation."""
import io
import json
import os
import tarfile
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist

from hybrid_fc.data import ShardError, augment, make_decoder, make_loader, available_decoders
from hybrid_fc.data.synthetic import encode_jpeg, synthetic_image
from harness import run_ranks


def _epoch(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def _labels(batches):
    return torch.cat([y for _, y in batches]).tolist()


def _tar_members(url):
    with tarfile.open(url) as tf:
        return {ti.name: tf.extractfile(ti).read() for ti in tf.getmembers()}


def test_epoch_reads_every_sample_once(data_tiny_shards):
    """One consumer, no shuffle buffer: an epoch is one permutation of the shards, so every
    sample of the manifest appears exactly once (96 samples = 12 batches of 8)."""
    loader = make_loader(data_tiny_shards, 8, rank=0, world_size=1, num_workers=0,
                         shuffle_buffer=0, seed=1)
    batches = _epoch(loader)
    assert len(batches) == len(loader) == 12 and loader.epoch == 1
    m = json.load(open(os.path.join(data_tiny_shards, "manifest.json")))
    want = sorted(int(v) for s in m["shards"] for k, v in
                  _tar_members(os.path.join(data_tiny_shards, s["url"])).items()
                  if k.endswith(".cls"))
    assert sorted(_labels(batches)) == want
    x, y = batches[0]
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.int64


def test_order_is_seeded(data_tiny_shards):
    kw = dict(rank=0, world_size=1, num_workers=2, shuffle_buffer=30)
    a = _epoch(make_loader(data_tiny_shards, 8, seed=5, **kw))
    b = _epoch(make_loader(data_tiny_shards, 8, seed=5, **kw))
    c = _epoch(make_loader(data_tiny_shards, 8, seed=6, **kw))
    assert len(a) == len(b) == 12
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))
    assert _labels(a) != _labels(c)
    # the next epoch has another order
    loader = make_loader(data_tiny_shards, 8, seed=5, **kw)
    _epoch(loader)
    assert _labels(_epoch(loader)) != _labels(a)


@pytest.mark.parametrize("stop_after", [5, 12])
def test_resume_continues_the_epoch(data_tiny_shards, stop_after):
    """Stop after k batches, restore the state into a fresh loader: the rest of the epoch (and the
    next epoch) is exactly what an uninterrupted loader yields. k = 5 with 2 workers also
    checks that the restored round-robin starts at the right worker."""
    kw = dict(rank=0, world_size=1, num_workers=2, shuffle_buffer=30, seed=11)
    full = make_loader(data_tiny_shards, 8, **kw)
    ref = _epoch(full) + _epoch(full)
    first = make_loader(data_tiny_shards, 8, **kw)
    it = iter(first)
    for _ in range(stop_after):
        next(it)
    state = first.state_dict()
    del it
    resumed = make_loader(data_tiny_shards, 8, **kw)
    resumed.load_state_dict(state)
    rest = _epoch(resumed) + _epoch(resumed)
    assert len(rest) == 24 - stop_after
    for (xr, yr), (x, y) in zip(ref[stop_after:], rest):
        assert torch.equal(yr, y) and torch.equal(xr, x)


def _write_tar(path, samples):
    with tarfile.open(path, "w") as tf:
        for key, ext, data in samples:
            ti = tarfile.TarInfo(f"{key}.{ext}")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))


def _handmade_shards(d, n_shards=3, per=10):
    """Shards written with tarfile by the test itself; returns the manifest path."""
    os.makedirs(d, exist_ok=True)
    shards = []
    for s in range(n_shards):
        samples = []
        for k in range(per):
            i = s * per + k
            samples += [(f"{i:05d}", "jpg", encode_jpeg(synthetic_image(i % 4, i, 16))),
                        (f"{i:05d}", "cls", str(i % 4).encode())]
        name = f"s{s}.tar"
        _write_tar(os.path.join(d, name), samples)
        shards.append({"url": name, "count": per})
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"num_samples": n_shards * per, "num_classes": 4, "shards": shards}, f)
    return os.path.join(d, "manifest.json")


def test_corrupt_samples_and_truncated_tar_are_counted(tmp_path, caplog):
    manifest = _handmade_shards(str(tmp_path))
    # shard 0: one JPEG cut short, one label that is not a number (a label out of the
    # manifest's range is not a corrupt sample but an error: tests/test_faults.py)
    members = _tar_members(tmp_path / "s0.tar")
    members["00001.jpg"] = members["00001.jpg"][:60]
    members["00002.cls"] = b"abc"
    _write_tar(tmp_path / "s0.tar", [(k.split(".")[0], k.split(".")[1], v)
                                     for k, v in members.items()])
    # shard 1: truncated in the middle of a member
    raw = (tmp_path / "s1.tar").read_bytes()
    (tmp_path / "s1.tar").write_bytes(raw[:len(raw) // 2 + 100])
    for workers in (0, 2):
        loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=workers,
                             shuffle_buffer=0, seed=0)
        with caplog.at_level("WARNING"):
            batches = _epoch(loader)
        assert len(batches) == len(loader) == 7  # 30 // 4: the epoch length holds regardless
        assert all(((y >= 0) & (y < 4)).all() for _, y in batches)
        assert loader.stats["corrupt_samples"] >= 2 and loader.stats["shard_errors"] >= 1
    # the totals are logged by the main process
    assert "corrupt samples skipped" in caplog.text


def test_missing_and_unreachable_shards_fail_fast(tmp_path):
    manifest = _handmade_shards(str(tmp_path), n_shards=2, per=4)
    m = json.load(open(manifest))
    m["shards"].append({"url": "gone.tar", "count": 4})
    m["num_samples"] += 4
    json.dump(m, open(manifest, "w"))
    t = time.time()
    with pytest.raises(ShardError, match="gone.tar"):
        make_loader(manifest, 2, rank=0, world_size=1)
    # without the up-front check the worker raises on first use instead of looping
    loader = make_loader(manifest, 2, rank=0, world_size=1, num_workers=1, check=False,
                         shuffle_buffer=0)
    with pytest.raises(ShardError, match="gone.tar"):
        _epoch(loader)
    # a pipe: command that fails: the check names it and the command's exit status
    urls = [f"pipe:cat {tmp_path}/s0.tar", f"pipe:cat {tmp_path}/nothing.tar"]
    with pytest.raises(ShardError, match=r"nothing.tar: .*exit (status )?1"):
        make_loader(urls, 2, rank=0, world_size=1, samples_per_epoch=8)
    # unchecked, a store where every shard fails stops after a few attempts instead of spinning
    loader = make_loader([urls[1]], 2, rank=0, world_size=1, samples_per_epoch=8,
                         num_workers=0, check=False)
    with pytest.raises(ShardError, match="shards in a row could not be read"):
        _epoch(loader)
    assert time.time() - t < 30
    with pytest.raises(ShardError, match="nowhere does not exist"):
        make_loader(str(tmp_path / "nowhere"), 2)
    with pytest.raises(ShardError, match="no manifest at .*empty/manifest.json"):
        (tmp_path / "empty").mkdir()
        make_loader(str(tmp_path / "empty"), 2)


def test_pipe_urls_stream(tmp_path):
    manifest = _handmade_shards(str(tmp_path), n_shards=2, per=8)
    loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=1, shuffle_buffer=0,
                         url_template="pipe:cat {url}")
    assert loader.manifest.urls[0].startswith("pipe:cat ")
    assert sorted(_labels(_epoch(loader))) == sorted(i % 4 for i in range(16))


def _rank_epoch(rank, world, shards, num_workers):
    loader = make_loader(shards, 8, rank=rank, world_size=world, num_workers=num_workers,
                         shuffle_buffer=16, seed=2)
    n, labels = 0, []
    for x, y in loader:
        n += 1
        labels += y.tolist()
        # a collective every step, as in training: a rank with fewer batches would hang here
        t = torch.ones(1)
        dist.all_reduce(t)
        assert t.item() == world
    total = torch.tensor([n])
    dist.all_reduce(total)
    return n, int(total.item()), len(loader), labels


@pytest.mark.parametrize("world,num_workers", [(2, 2), (3, 1)])
def test_ranks_get_equal_batches_with_uneven_shards(data_tiny_shards, world, num_workers):
    """5 shards of 20,20,20,20,16 samples over 2 and 3 ranks: every rank yields 96 // (W * 8)
    batches, steps through the same number of collectives, and finishes."""
    results = run_ranks(world, _rank_epoch, data_tiny_shards, num_workers, timeout=120)
    expected = 96 // (world * 8)
    for n, total, length, labels in results:
        assert n == length == expected and total == expected * world
        assert all(0 <= v < 12 for v in labels)


# --- decode and augment ------------------------------------------------------------------------

def test_decoders_agree_and_reject_corrupt():
    ref = synthetic_image(1, 2, 32)
    data = encode_jpeg(ref)
    outs = {name: make_decoder(name)(data) for name in available_decoders()}
    for name, img in outs.items():
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert np.abs(img.astype(float) - ref).mean() < 10, name
    if len(outs) == 2:  # libjpeg-turbo in both: the same integer IDCT up to rounding
        assert np.abs(outs["pil"].astype(int) - outs["simplejpeg"]).max() <= 2
    for name in available_decoders():
        with pytest.raises(Exception):
            make_decoder(name)(data[: len(data) // 2])
    with pytest.raises(ValueError, match="decoder must be"):
        make_decoder("nvjpeg2")


def test_augment_flip_normalize():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 4, 5), dtype=torch.uint8, generator=g)
    before = x.clone()
    out = augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, before) and out.dtype == torch.float32
    plain = (x.double() / 255 - 0.5) / 0.5
    flipped = 0
    for i in range(16):
        if torch.allclose(out[i].double(), plain[i], atol=1e-6):
            continue
        assert torch.allclose(out[i].double(), plain[i].flip(-1), atol=1e-6)
        flipped += 1
    assert 0 < flipped < 16
    again = augment(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)
    assert torch.allclose(augment(x, flip=False).double(), plain, atol=1e-6)
    # channels_last batches (what the loader yields) give the same values
    cl = x.contiguous(memory_format=torch.channels_last)
    assert torch.equal(augment(cl, flip=False), augment(x, flip=False))
    with pytest.raises(ValueError, match="uint8"):
        augment(x.float())


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_strict_tar_reader(fmt):
    """iter_tar reads what tarfile writes (long names, pax records, directories skipped), and
    every cut before the end-of-archive block is an error, including cuts at header
    boundaries, which tarfile's stream mode takes for a normal end."""
    from hybrid_fc.data.tario import TarError, iter_tar
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tf:
        for i in range(4):
            data = bytes(range(1, 256)) * (i + 1)
            ti = tarfile.TarInfo(("d" * 120 if i == 2 else "x") + f"/k{i}.jpg")
            ti.size = len(data)
            tf.addfile(ti, io.BytesIO(data))
        ti = tarfile.TarInfo("somedir")
        ti.type = tarfile.DIRTYPE
        tf.addfile(ti)
    raw = buf.getvalue()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tf:
        ref = [(ti.name, tf.extractfile(ti).read()) for ti in tf if ti.isreg()]
    assert list(iter_tar(io.BytesIO(raw))) == ref
    end = len(raw.rstrip(b"\0"))  # the last member's data ends with a non-zero byte
    for cut in sorted(set(range(0, end + 1, 512)) | set(range(0, end + 1, 97))):
        with pytest.raises(TarError):
            list(iter_tar(io.BytesIO(raw[:cut])))
