"""Verification: .bin reading, insightface's 10-fold protocol, TAR@FAR, and 2 ranks == 1 rank.

References are independent of hybrid_fc.evaluation: pair files are pickled here the way
insightface's are (protocol 2: bytes become _codecs.encode calls, as in Python-2-era files),
images are encoded and decoded with PIL here, accuracies are hand-computed or come from a
naive loop transcription of the protocol, and the flip-TTA embedding is recomputed here.
"""
import io
import os
import pickle

import numpy as np
import pytest
import torch

from harness import run_ranks
from hybrid_fc.evaluation import (BinFileError, VerificationHook, decode_images,
                                  embed_images, evaluate, format_table, kfold_accuracy,
                                  load_bin, load_pair_list, tar_at_far, verification_metrics,
                                  write_bin)

SIZE = 16


def _jpeg(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def _pil_decode(data: bytes) -> np.ndarray:
    from PIL import Image
    return np.array(Image.open(io.BytesIO(data)).convert("RGB"))


def _pairs(num_pairs, seed=0, size=SIZE):
    """Pairs of small JPEGs: a 'same' pair is one random image twice with different noise."""
    rng = np.random.default_rng(seed)
    images, issame = [], []
    for i in range(num_pairs):
        same = bool(i % 2 == 0)
        a = rng.integers(0, 256, (size, size, 3)).astype(np.float32)
        b = a if same else rng.integers(0, 256, (size, size, 3)).astype(np.float32)
        for img in (a, b):
            noisy = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
            images.append(_jpeg(noisy))
        issame.append(same)
    return images, issame


def _write_insightface_bin(path, images, issame):
    with open(path, "wb") as f:
        pickle.dump((images, issame), f, protocol=2)


# -- reading pair files ------------------------------------------------------------------------
def test_bin_round_trip(tmp_path):
    images, issame = _pairs(6)
    path = str(tmp_path / "lfw.bin")
    _write_insightface_bin(path, images, [np.bool_(x) for x in issame])  # numpy flags too
    ps = load_bin(path)
    assert ps.name == "lfw" and ps.num_pairs == 6
    assert ps.images == images and ps.issame.tolist() == issame
    decoded = decode_images(ps.images, SIZE)
    assert decoded.dtype == torch.uint8 and decoded.shape == (12, 3, SIZE, SIZE)
    for i, data in enumerate(images):
        assert torch.equal(decoded[i], torch.from_numpy(_pil_decode(data)).permute(2, 0, 1))
    # write_bin produces what insightface's reader (plain pickle, encoding='bytes') expects
    out = str(tmp_path / "again.bin")
    write_bin(out, images, issame)
    with open(out, "rb") as f:
        bins, flags = pickle.load(f, encoding="bytes")
    assert bins == images and flags == issame
    # off-size images are resized to the requested size
    assert decode_images(images[:2], 8).shape == (2, 3, 8, 8)


def test_pair_list(tmp_path):
    images, issame = _pairs(3)
    lines = []
    for i in range(3):
        for j in (0, 1):
            (tmp_path / f"img{i}_{j}.jpg").write_bytes(images[2 * i + j])
        lines.append(f"img{i}_0.jpg img{i}_1.jpg {int(issame[i])}  # pair {i}")
    (tmp_path / "pairs.txt").write_text("\n".join(lines) + "\n")
    ps = load_pair_list(str(tmp_path / "pairs.txt"))
    assert ps.images == images and ps.issame.tolist() == issame
    (tmp_path / "bad.txt").write_text("img0_0.jpg img0_1.jpg maybe\n")
    with pytest.raises(BinFileError, match="bad.txt:1"):
        load_pair_list(str(tmp_path / "bad.txt"))


class _Evil:
    def __reduce__(self):
        return (os.getcwd, ())  # harmless here; any callable would run under plain pickle


@pytest.mark.parametrize("content, match", [
    ("truncated", "not a readable"),
    ({"images": []}, "expected a pickled pair"),
    (([b"x"] * 3, [True]), "3 images for 1 is-same flags"),
    (([b"x", 5], [True]), "image 1 is a int"),
    (([b"x", b"y"], [[True]]), "shape"),
    (([b"x", b"y"], [0.5]), "booleans or 0/1"),
    (([], []), "no pairs"),
    ("evil", "refusing to unpickle"),
])
def test_bad_bin_files(tmp_path, content, match):
    path = str(tmp_path / "bad.bin")
    if content == "truncated":
        images, issame = _pairs(2)
        _write_insightface_bin(path, images, issame)
        with open(path, "rb") as f:
            data = f.read()
        with open(path, "wb") as f:
            f.write(data[:len(data) // 2])
    elif content == "evil":
        with open(path, "wb") as f:
            pickle.dump(([_Evil(), b"y"], [True]), f, protocol=2)
    else:
        with open(path, "wb") as f:
            pickle.dump(content, f, protocol=2)
    with pytest.raises(BinFileError, match=match):
        load_bin(path)


def test_undecodable_image_names_its_index():
    images, _ = _pairs(2)
    images[3] = b"\xff\xd8\xff" + b"not really a jpeg" * 4
    with pytest.raises(BinFileError, match="image 3 cannot be decoded"):
        decode_images(images, SIZE, where="x.bin")


# -- the 10-fold protocol ----------------------------------------------------------------------
def test_kfold_perfectly_separable_is_100():
    same = np.arange(200) % 3 == 0
    dist = np.where(same, 0.4, 1.6)
    acc, thr = kfold_accuracy(dist, same)
    assert acc.tolist() == [1.0] * 10
    # the first threshold that separates: 0.41 (d < t is "same"), on every fold
    np.testing.assert_allclose(thr, 0.41, atol=1e-9)


def test_kfold_hand_computed_case():
    # 20 pairs -> 10 folds of 2. One genuine pair (index 5, fold 2) lies beyond every impostor:
    # whatever the threshold chosen on the other folds (0.51, as they separate at 0.5 | 2.0),
    # that fold scores 1/2 and the other nine 2/2: mean 0.95, population std
    # sqrt((9 * 0.05^2 + 0.45^2) / 10) = 0.15.
    same = np.array([i % 2 == 0 for i in range(20)])
    dist = np.where(same, 0.5, 2.0)
    dist[4] = 3.5          # pair 4 is genuine (even index) and in fold 2 (pairs 4, 5)
    acc, thr = kfold_accuracy(dist, same)
    assert acc.tolist() == [1.0, 1.0, 0.5] + [1.0] * 7
    assert acc.mean() == pytest.approx(0.95) and acc.std() == pytest.approx(0.15)
    np.testing.assert_allclose(thr, 0.51, atol=1e-9)


def _naive_kfold(dist, same, nfolds=10):
    """insightface's calculate_roc accuracy, transcribed as plain loops (sklearn KFold split)."""
    thresholds = np.arange(0, 4, 0.01)
    n = len(dist)
    sizes = [n // nfolds + (1 if k < n % nfolds else 0) for k in range(nfolds)]
    starts = np.cumsum([0] + sizes[:-1])
    accs = []
    for k in range(nfolds):
        test = set(range(starts[k], starts[k] + sizes[k]))
        train = [i for i in range(n) if i not in test]

        def acc(t, idx):
            return sum((dist[i] < t) == same[i] for i in idx) / len(idx)
        train_acc = [acc(t, train) for t in thresholds]
        best = thresholds[int(np.argmax(train_acc))]
        accs.append(acc(best, sorted(test)))
    return np.array(accs)


def test_kfold_matches_naive_protocol():
    rng = np.random.default_rng(3)
    n = 103                                   # uneven folds: 3 of 11 pairs, 7 of 10
    same = rng.random(n) < 0.5
    dist = np.clip(np.where(same, rng.normal(1.0, 0.4, n), rng.normal(1.7, 0.4, n)), 0, 4)
    dist[7] = dist[8] = 1.25                  # ties
    acc, _ = kfold_accuracy(dist, same)
    np.testing.assert_array_equal(acc, _naive_kfold(dist, same))


def test_shuffled_labels_give_chance():
    rng = np.random.default_rng(0)
    n = 6000
    same = np.arange(n) % 2 == 0
    e1 = rng.normal(size=(n, 32))
    e2 = np.where(same[:, None], e1 + 0.1 * rng.normal(size=(n, 32)), rng.normal(size=(n, 32)))
    emb = np.empty((2 * n, 32))
    emb[0::2], emb[1::2] = e1, e2
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    assert verification_metrics(emb, same).accuracy == 1.0
    shuffled = rng.permutation(same)
    r = verification_metrics(emb, shuffled)
    # Chance is 0.5; one fold of 600 pairs has std ~0.02, the 10-fold mean ~0.0065. The
    # threshold fitted on shuffled train folds can only pick noise; 0.03 is > 4 sigma.
    assert abs(r.accuracy - 0.5) < 0.03, r.accuracy


def test_tar_at_far_hand_computed():
    # 2000 impostors scoring 0.00025 .. 0.99975 in steps of 0.0005; FAR 1e-3 admits
    # floor(2.0) = 2 of them, so the threshold is the 3rd highest impostor score (0.99875) and
    # genuine pairs strictly above it are accepted; FAR 1e-2: the 21st highest, 0.98975.
    imp = (np.arange(2000) + 0.5) / 2000
    gen = np.array([0.9999, 0.999, 0.99876, 0.99875, 0.5, 0.1])
    scores = np.concatenate([gen, imp])
    same = np.concatenate([np.ones(6, bool), np.zeros(2000, bool)])
    tar = tar_at_far(scores, same, (1e-2, 1e-3, 1e-4))
    assert tar[1e-3] == pytest.approx(3 / 6)          # 0.9999, 0.999, 0.99876
    assert tar[1e-2] == pytest.approx(4 / 6)          # and 0.99875
    assert np.isnan(tar[1e-4])                        # 2000 impostors cannot resolve 1e-4


# -- embedding and distribution ----------------------------------------------------------------
def _model(seed=0):
    from hybrid_fc.backbones import build_backbone
    torch.manual_seed(seed)
    model = build_backbone("iresnet_tiny", 16, input_size=SIZE)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.train()  # as during training: evaluation must switch to eval and back


def test_flip_tta_embedding_reference():
    images, _ = _pairs(3)
    x = decode_images(images, SIZE)
    model = _model()
    emb, norms = embed_images(model, x, batch_size=4)
    assert model.training
    ref_model = _model().eval()
    with torch.no_grad():
        xf = (x.float() / 255 - 0.5) / 0.5
        raw, flipped = ref_model(xf), ref_model(torch.flip(xf, dims=[3]))
    ref = torch.nn.functional.normalize(raw + flipped, dim=1)
    # fp32 conv results depend on batch composition only through summation order: 1e-5.
    torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(norms, raw.norm(dim=1), atol=1e-4, rtol=1e-5)


def _evaluate_rank(rank, world_size, path, batch_size):
    model = _model()
    r = evaluate(model, load_bin(path), SIZE, batch_size=batch_size)
    from hybrid_fc.evaluation import embed_pair_set
    emb, xnorm = embed_pair_set(model, load_bin(path), SIZE, batch_size=batch_size)
    return r, emb, model.training


def test_two_ranks_equal_one(tmp_path):
    images, issame = _pairs(23, seed=1)       # 46 images: 23 per rank, 6 calls of 4
    path = str(tmp_path / "set.bin")
    _write_insightface_bin(path, images, issame)
    (one,) = run_ranks(1, _evaluate_rank, path, 4)
    two = run_ranks(2, _evaluate_rank, path, 4)
    r1, e1, training = one
    assert training
    for r2, e2, training in two:
        assert training
        # Each image's embedding is computed in eval mode, independent of its batch; only fp32
        # summation order may differ between batch layouts: 1e-5 on unit vectors.
        np.testing.assert_allclose(e2, e1, atol=1e-5, rtol=0)
        assert r2.accuracy == r1.accuracy and r2.std == r1.std
        assert r2.threshold == r1.threshold and r2.num_pairs == 23
        assert r2.xnorm == pytest.approx(r1.xnorm, rel=1e-5)
    # sanity: the same pairs are pictures of one image; a random CNN already separates them
    assert r1.accuracy > 0.8


def _model_with_rank_stats(rank):
    """Same weights on every rank, BatchNorm statistics of this rank's own (as data-parallel
    training leaves them: DeepSpeed never broadcasts buffers)."""
    model = _model()
    g = torch.Generator().manual_seed(100 + rank)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.mul_(torch.rand(m.running_var.shape, generator=g) + 0.5)
    return model


def _evaluate_rank_stats(rank, world_size, path):
    model = _model_with_rank_stats(rank)
    from hybrid_fc.evaluation import embed_pair_set
    emb, _ = embed_pair_set(model, load_bin(path), SIZE, batch_size=4)
    return emb, {n: b.clone() for n, b in model.named_buffers()}


def test_ranks_with_own_batchnorm_statistics_embed_with_their_mean(tmp_path):
    images, issame = _pairs(11, seed=2)
    path = str(tmp_path / "set.bin")
    _write_insightface_bin(path, images, issame)
    (e0, b0), (e1, b1) = run_ranks(2, _evaluate_rank_stats, path)
    own = [dict(_model_with_rank_stats(r).named_buffers()) for r in range(2)]
    ref_model = _model()
    with torch.no_grad():
        for name, b in ref_model.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                b.copy_((own[0][name] + own[1][name]) / 2)
    for name, b in ref_model.named_buffers():   # both ranks now hold the mean, in place
        assert torch.equal(b0[name], b) and torch.equal(b1[name], b), name
    from hybrid_fc.evaluation import embed_pair_set
    ref, _ = embed_pair_set(ref_model, load_bin(path), SIZE, batch_size=4)
    # one model on both ranks; fp32 summation order of other batch layouts: 1e-5
    np.testing.assert_allclose(e0, ref, atol=1e-5, rtol=0)
    np.testing.assert_allclose(e1, ref, atol=1e-5, rtol=0)


def _hook_rank(rank, world_size, paths):
    lines = []
    hook = VerificationHook(paths, every=2, image_size=SIZE, batch_size=8,
                            print_fn=lines.append)
    model = _model()
    out = [hook(model, step) for step in (1, 2)]
    return out, lines


def _bad_hook_rank(rank, world_size, paths):
    try:
        VerificationHook(paths, every=2, image_size=SIZE)
    except BinFileError as exc:
        return str(exc)
    return None


def test_hook_every_n_steps_and_bad_file_on_all_ranks(tmp_path):
    images, issame = _pairs(10, seed=2)
    good = str(tmp_path / "good.bin")
    _write_insightface_bin(good, images, issame)
    images[-1] = b"\xff\xd8\xffgarbage"       # the last image: in rank 1's slice only
    bad = str(tmp_path / "bad.bin")
    _write_insightface_bin(bad, images, issame)
    results = run_ranks(2, _hook_rank, [good])
    for rank, (out, lines) in enumerate(results):
        assert out[0] is None and set(out[1]) == {"good"}
        assert lines == ([] if rank else [lines[0]])
    assert results[0][1][0].startswith("verify [good] step 2: accuracy")
    # a corrupt image on one rank: both raise at construction instead of one hanging later
    errors = run_ranks(2, _bad_hook_rank, [good, bad])
    assert "image 19 cannot be decoded" in errors[1]
    assert "rank 1" in errors[0]


def test_format_table():
    r = verification_metrics(np.eye(4)[[0, 0, 1, 2] * 5], [True, False] * 5, name="toy")
    text = format_table([r])
    assert "toy" in text and "100.00" in text and "n/a" in text
