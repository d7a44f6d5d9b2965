"""Shard writer: round trips from RecordIO (both layouts), image folders and list files; resume of
a killed conversion; clear errors on bad input; the synthetic generator.

RecordIO fixtures are written here by a small writer that follows the MXNet/dmlc format on its own
(magic, lrecord = cflag << 29 | length, 4-byte padding, payload split where the magic word occurs
at an aligned position, IRHeader '<IfQQ' + flag float32 labels), so the reader is checked against
an independent implementation of the format, not against itself.
"""
import json
import os
import signal
import struct
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

from hybrid_fc.data import SourceError, convert, encode_jpeg, synthetic_image
from hybrid_fc.data.shards import stable_permutation

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAGIC = 0xCED7230A


# --- an independent RecordIO writer -----------------------------------------------------------

def _ir_pack(label, image: bytes, id1=0, id2=0) -> bytes:
    if isinstance(label, (list, tuple)):
        arr = np.asarray(label, np.float32)
        return struct.pack("<IfQQ", arr.size, 0.0, id1, id2) + arr.tobytes() + image
    return struct.pack("<IfQQ", 0, float(label), id1, id2) + image


def _rec_record(payload: bytes) -> bytes:
    magic = struct.pack("<I", MAGIC)
    out, start = [], 0
    for i in range(0, len(payload) - len(payload) % 4, 4):
        if payload[i:i + 4] == magic:  # split here; the magic word is dropped and implied
            out.append(struct.pack("<II", MAGIC, ((1 if start == 0 else 2) << 29) | (i - start)))
            out.append(payload[start:i])
            start = i + 4
    rest = payload[start:]
    out.append(struct.pack("<II", MAGIC, ((3 if start else 0) << 29) | len(rest)))
    out.append(rest + b"\0" * (-len(rest) % 4))
    return b"".join(out)


def _write_recordio(directory, records):
    """records: list of (key, payload) -> train.rec + train.idx (idx lines shuffled)."""
    os.makedirs(directory, exist_ok=True)
    offsets, pos = [], 0
    with open(os.path.join(directory, "train.rec"), "wb") as f:
        for key, payload in records:
            blob = _rec_record(payload)
            offsets.append((key, pos))
            f.write(blob)
            pos += len(blob)
    rng = np.random.default_rng(0)
    with open(os.path.join(directory, "train.idx"), "w") as f:
        for j in rng.permutation(len(offsets)):
            f.write(f"{offsets[j][0]}\t{offsets[j][1]}\n")


def _jpeg(i, size=16):
    return encode_jpeg(synthetic_image(i % 5, i, size, seed=1))


def _read_shards(out):
    """{key: (ext, bytes, label)} read with tarfile from the manifest's shards."""
    m = json.load(open(os.path.join(out, "manifest.json")))
    samples = {}
    for s in m["shards"]:
        n = 0
        with tarfile.open(os.path.join(out, s["url"])) as tf:
            members = {}
            for ti in tf.getmembers():
                key, ext = ti.name.split(".", 1)
                members.setdefault(key, {})[ext] = tf.extractfile(ti).read()
        for key, d in members.items():
            assert key not in samples, f"duplicate sample {key}"
            ext = "jpg" if "jpg" in d else "png"
            samples[key] = (ext, d[ext], int(d["cls"].decode()))
            n += 1
        assert n == s["count"]
    assert len(samples) == m["num_samples"]
    return m, samples


def _key(i):
    return f"{i:010d}"


# --- RecordIO ----------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["header", "plain"])
def test_recordio_round_trip(tmp_path, layout):
    n = 23
    images = [_jpeg(i) for i in range(n)]
    # one image containing the magic word at an aligned payload position: written as 3 parts
    magic = struct.pack("<I", MAGIC)
    pad = (-(24 + len(images[5])) % 4)
    images[5] = images[5] + b"\0" * pad + magic + b"tail" + magic + b"xy"
    labels = [(i * 7) % 9 for i in range(n)]
    records = []
    if layout == "header":
        # key 0: header (flag 2, labels [first identity record, end]); images 1..n;
        # identity-range records after them are not images.
        records.append((0, _ir_pack([n + 1, n + 1 + 9], b"")))
        for i in range(n):
            lab = [labels[i], 0.5] if i % 2 else labels[i]  # array label: first element
            records.append((i + 1, _ir_pack(lab, images[i], id1=i)))
        for c in range(9):
            records.append((n + 1 + c, _ir_pack([c, c + 1], b"")))
        keys = list(range(1, n + 1))
    else:
        for i in range(n):
            lab = [labels[i], 3.0] if i % 3 == 0 else float(labels[i])
            records.append((i + 10, _ir_pack(lab, images[i])))
        keys = list(range(10, n + 10))
    _write_recordio(tmp_path / "rec", records)
    out = str(tmp_path / "out")
    m = convert(str(tmp_path / "rec"), out, samples_per_shard=6, workers=2)
    _, got = _read_shards(out)
    assert len(got) == n and m["num_samples"] == n
    # source index = position of the key in key order
    for idx, key in enumerate(keys):
        i = key - keys[0]
        assert got[_key(idx)] == ("jpg", images[i], labels[i])
    assert m["num_classes"] == 9


def test_recordio_errors(tmp_path):
    d = tmp_path / "bad"
    _write_recordio(d, [(0, _ir_pack(2.5, _jpeg(0))), (1, _ir_pack(1, _jpeg(1)))])
    with pytest.raises(SourceError, match=r"record key 0: label 2\.5 is not a non-negative"):
        convert(str(d), str(tmp_path / "o1"), samples_per_shard=4)
    # an .idx that points into the middle of a record
    _write_recordio(d, [(0, _ir_pack(2, _jpeg(0))), (1, _ir_pack(1, _jpeg(1)))])
    with open(d / "train.idx", "w") as f:
        f.write("0\t0\n1\t12\n")
    with pytest.raises(SourceError, match=r"key 1 at offset 12: magic 0x[0-9a-f]+, expected"):
        convert(str(d), str(tmp_path / "o2"), samples_per_shard=4)
    with open(d / "train.idx", "w") as f:
        f.write("0\t0\n1\tzz\n")
    with pytest.raises(SourceError, match="could parse only the first 1"):
        convert(str(d), str(tmp_path / "o3"))


# --- folder and list ---------------------------------------------------------------------------

def test_folder_round_trip(tmp_path):
    root = tmp_path / "faces"
    names = ["bob", "alice", "Zed", "carol"]  # label order = sorted names: Zed, alice, bob, carol
    expected = {}
    for j, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for k in range(j + 2):
            data = _jpeg(10 * j + k)
            (root / name / f"img{k:02d}.jpg").write_bytes(data)
            expected[(name, f"img{k:02d}.jpg")] = data
    (root / "alice" / "notes.txt").write_text("not an image")
    out = str(tmp_path / "out")
    m = convert(str(root), out, samples_per_shard=3, workers=2)
    _, got = _read_shards(out)
    classes = sorted(names)
    assert m["num_classes"] == 4 and open(os.path.join(out, "classes.txt")).read().split() == \
        classes
    # source order: sorted folders, sorted files within
    order = [(c, f) for c in classes for f in sorted(f for (n, f) in expected if n == c)]
    assert len(got) == len(order)
    for idx, (c, f) in enumerate(order):
        assert got[_key(idx)] == ("jpg", expected[(c, f)], classes.index(c))


def test_list_round_trip_png_and_spaces(tmp_path):
    from PIL import Image
    import io
    (tmp_path / "imgs").mkdir()
    lines, expected = [], []
    for i in range(11):
        if i == 4:
            buf = io.BytesIO()
            Image.fromarray(synthetic_image(0, i, 16)).save(buf, format="PNG")
            data, ext = buf.getvalue(), "png"
        else:
            data, ext = _jpeg(i), "jpg"
        name = f"imgs/my img {i}.{ext}"
        (tmp_path / name).write_bytes(data)
        label = (i * 5) % 7 + (2 ** 40 if i == 7 else 0)  # int64 labels survive as decimal text
        lines.append(f"{name if i % 2 else tmp_path / name} {label}")
        expected.append((ext, data, label))
    (tmp_path / "list.txt").write_text("# comment\n" + "\n".join(lines) + "\n")
    out = str(tmp_path / "out")
    m = convert(str(tmp_path / "list.txt"), out, samples_per_shard=4)
    _, got = _read_shards(out)
    assert [got[_key(i)] for i in range(11)] == expected
    assert m["num_classes"] == 2 ** 40 + (7 * 5) % 7 + 1


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(SourceError, match="does not exist"):
        convert(str(tmp_path / "nope"), str(tmp_path / "o"))
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "list.txt").write_text("a.jpg 1\na.jpg cat\n")
    with pytest.raises(SourceError, match=r"list.txt:2: label 'cat' is not a number"):
        convert(str(tmp_path / "list.txt"), str(tmp_path / "o"))
    (tmp_path / "list.txt").write_text("a.jpg 1\na.jpg -3\n")
    with pytest.raises(SourceError, match=r"list.txt:2: label '-3' is not a non-negative"):
        convert(str(tmp_path / "list.txt"), str(tmp_path / "o"))
    (tmp_path / "list.txt").write_text("a.jpg 1\nmissing.jpg 2\n")
    with pytest.raises(SourceError, match="missing.jpg"):
        convert(str(tmp_path / "list.txt"), str(tmp_path / "o"), samples_per_shard=1)
    # the CLI reports the same error as one line (hybrid_fc.runtime.run_script), status 1
    r = subprocess.run([sys.executable, "data/make_shards.py", str(tmp_path / "nope"), "--out",
                        str(tmp_path / "o2")], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 1 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_non_image_bytes_are_listed_not_written(tmp_path):
    (tmp_path / "a.jpg").write_bytes(_jpeg(0))
    (tmp_path / "b.jpg").write_bytes(b"GIF89a not a jpeg")
    (tmp_path / "list.txt").write_text("a.jpg 0\nb.jpg 1\na.jpg 1\n")
    m = convert(str(tmp_path / "list.txt"), str(tmp_path / "o"), shuffle_seed=None)
    assert m["num_samples"] == 2 and m["skipped"] == [1]


# --- resume ------------------------------------------------------------------------------------

def test_resume_after_kill(tmp_path):
    """Kill -9 a conversion that is stuck mid-shard (one image is a FIFO nobody writes to), then
    run it again: finished shards are kept as they are, the rest is written, and the shards hold
    exactly the source samples once each."""
    (tmp_path / "imgs").mkdir()
    n, stuck = 40, 23
    expected = []
    for i in range(n):
        path = tmp_path / "imgs" / f"{i}.jpg"
        data = _jpeg(i)
        if i == stuck:
            os.mkfifo(path)  # open() blocks until a writer appears: a writer frozen mid-shard
        else:
            path.write_bytes(data)
        expected.append((data, i % 6))
    (tmp_path / "list.txt").write_text("".join(f"imgs/{i}.jpg {i % 6}\n" for i in range(n)))
    out = tmp_path / "out"
    cmd = [sys.executable, "data/make_shards.py", str(tmp_path / "list.txt"), "--out", str(out),
           "--samples-per-shard", "5", "--workers", "2"]
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        # 8 shards; the one holding the FIFO can never finish
        while time.time() < deadline:
            done = [f for f in os.listdir(out / "_convert")] if (out / "_convert").exists() else []
            if len([f for f in done if f.startswith("shard-")]) == 7:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the conversion did not reach 7 of 8 shards within 60s")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "manifest.json").exists()
    temps = [f for f in os.listdir(out) if ".tmp." in f]
    assert temps, "the stuck shard should have left a partial temp file"
    before = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    assert len(before) == 7
    os.remove(tmp_path / "imgs" / f"{stuck}.jpg")
    (tmp_path / "imgs" / f"{stuck}.jpg").write_bytes(expected[stuck][0])

    m = convert(str(tmp_path / "list.txt"), str(out), workers=2)
    after = {f: os.stat(out / f).st_mtime_ns for f in os.listdir(out) if f.endswith(".tar")}
    assert {f: after[f] for f in before} == before  # finished shards were not rewritten
    assert len(after) == 8 and not [f for f in os.listdir(out) if ".tmp." in f]
    _, got = _read_shards(str(out))
    assert m["num_samples"] == n
    assert {k: (d, lab) for k, (_, d, lab) in got.items()} == \
        {_key(i): expected[i] for i in range(n)}
    # a third run finds everything done and changes nothing
    convert(str(tmp_path / "list.txt"), str(out))
    assert {f: os.stat(out / f).st_mtime_ns for f in after} == after
    # resuming into that directory from another source is refused
    (tmp_path / "other.txt").write_text("imgs/0.jpg 0\n")
    with pytest.raises(SourceError, match="different source"):
        convert(str(tmp_path / "other.txt"), str(out))


def test_stable_permutation():
    p = stable_permutation(1000, 5)
    assert sorted(p.tolist()) == list(range(1000))
    assert not np.array_equal(p, np.arange(1000))
    assert np.array_equal(p, stable_permutation(1000, 5))
    assert not np.array_equal(p, stable_permutation(1000, 6))


# --- synthetic -----------------------------------------------------------------------------------

def test_synthetic_shards_match_generator(tmp_path):
    """The CLI's shards hold the generator's images and labels: the exact JPEG bytes of the
    generator's arrays, which decode close to those arrays and far from other images."""
    out = tmp_path / "syn"
    r = subprocess.run([sys.executable, "data/make_synthetic.py", "--out", str(out),
                        "--identities", "3", "--images-per-id", "4", "--size", "24",
                        "--seed", "9", "--samples-per-shard", "5"], cwd=REPO,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    m, got = _read_shards(str(out))
    assert m["num_classes"] == 3 and len(m["shards"]) == 3
    from PIL import Image
    import io
    for i in range(12):
        ext, data, label = got[_key(i)]
        assert label == i // 4
        ref = synthetic_image(i // 4, i % 4, 24, seed=9)
        assert data == encode_jpeg(ref)
        img = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), np.float32)
        other = synthetic_image(i // 4, i % 4 + 1, 24, seed=9).astype(np.float32)
        # quality-90 JPEG of a noisy 24x24 image: a few grey levels of error (chroma subsampling)
        err = np.abs(img - ref).mean()
        assert err < 10.0 and err < 0.5 * np.abs(img - other).mean()


def test_synthetic_identities_are_learnable():
    """A small CNN separates 8 synthetic identities on held-out images (chance: 12.5%)."""
    torch.manual_seed(0)
    ids, per_id, size = 8, 24, 32
    x = np.stack([synthetic_image(c, k, size, seed=2) for c in range(ids) for k in range(per_id)])
    y = np.repeat(np.arange(ids), per_id)
    x = torch.from_numpy(x).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    y = torch.from_numpy(y)
    test = torch.arange(len(y)) % per_id >= per_id - 4  # 4 held-out images per identity
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(128, ids))
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xtr, ytr = x[~test], y[~test]
    for step in range(150):
        idx = torch.randint(0, len(ytr), (32,))
        loss = torch.nn.functional.cross_entropy(net(xtr[idx]), ytr[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        acc = (net(x[test]).argmax(1) == y[test]).float().mean().item()
    assert acc >= 0.9, acc
