"""IJB-B / IJB-C 1:1 verification: alignment, insightface's pooling and TAR@FAR, ranks, ONNX,
bad releases.

The release is synthetic and written here in insightface's layout: identities are smooth
random 32x32 "faces" (80% of their texture shared, so that a random network's TAR is below
100%), each image one of them (plus noise, at a random contrast, so that feature norms differ)
placed into a 48x56 loose crop by a known random similarity transform (cv2.warpAffine), its 5
landmarks the reference points moved by that transform. References are independent of hybrid_fc.evaluation: OpenCV's warpAffine, a
least-squares similarity by np.linalg.lstsq, PIL decoding, the backbone called directly,
insightface's pooling / scoring / TAR loops transcribed from eval_ijbc.py, and sklearn's
roc_curve and auc.
"""
import json
import os
import shutil

import numpy as np
import pytest
import torch

from _extras import require_extra
from harness import run_ranks
from hybrid_fc.evaluation import (ARCFACE_DST, IJBError, align_face, evaluate_ijb,
                                  load_release, pool_templates, roc_curve, similarity_transform,
                                  tar_at_fars, warp_affine)
from hybrid_fc.evaluation.align import reference_points
from hybrid_fc.evaluation.ijb import FARS, embed_release, ijb_metrics, score_pairs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE, EMB = 32, 16
LOOSE_H, LOOSE_W = 56, 48
IDENTITIES, TEMPLATES_PER_ID = 8, 3


def _smooth_image(rng, h, w):
    """uint8 (h, w, 3) noise upsampled 4x (bicubic): texture that bilinear resampling keeps."""
    cv2 = require_extra("cv2")
    small = rng.integers(0, 256, (max(2, h // 4), max(2, w // 4), 3)).astype(np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_CUBIC)


def _random_similarity(rng, scale=(1.0, 1.3), angle=25.0, size=SIZE, loose=(LOOSE_H, LOOSE_W)):
    """(2, 3) crop -> loose-image transform: rotation, scale, and a shift that keeps the crop's
    center near the loose image's center."""
    s = rng.uniform(*scale)
    a = np.deg2rad(rng.uniform(-angle, angle))
    lin = s * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    center = np.array([loose[1], loose[0]]) / 2 + rng.uniform(-2, 2, 2)
    return np.hstack([lin, (center - lin @ np.array([size / 2, size / 2]))[:, None]])


def _apply(matrix, points):
    return points @ matrix[:, :2].T + matrix[:, 2]


def write_release(root, name="ijbc", seed=0, size=SIZE, loose=(LOOSE_H, LOOSE_W),
                  identities=IDENTITIES):
    """An insightface-layout release in `root`: identities x TEMPLATES_PER_ID templates of 1-3
    media of 1-3 frames, faces of size x size in loose (H, W) crops, every template pair listed
    (label: same identity). Returns {"images": [(file, template, media, landmarks (5, 2),
    score)], "pairs": (P, 3)}. benchmarks/RESULTS.md's IJB set is write_release(root,
    size=112, loose=(160, 144), identities=30)."""
    from PIL import Image
    cv2 = require_extra("cv2")
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(root, "loose_crop"))
    os.makedirs(os.path.join(root, "meta"))
    base = _smooth_image(rng, size, size).astype(np.float64)   # shared: TAR stays below 100%
    faces = [0.8 * base + 0.2 * _smooth_image(rng, size, size) for _ in range(identities)]
    ref = reference_points(size)
    images, media, template_of = [], 100, {}
    for ident in range(identities):
        for k in range(TEMPLATES_PER_ID):
            template = 1 + ident * TEMPLATES_PER_ID + k
            template_of[template] = ident
            for _ in range(rng.integers(1, 4)):
                media += 1
                for _ in range(rng.integers(1, 4)):
                    crop = faces[ident] + rng.normal(0, 12, faces[ident].shape)
                    crop = np.clip(128 + (crop - 128) * rng.uniform(0.2, 1.5), 0, 255)
                    m = _random_similarity(rng, size=size, loose=loose)
                    image = cv2.warpAffine(crop.astype(np.uint8), m, (loose[1], loose[0]),
                                           borderValue=0)
                    fname = f"{len(images) + 1}.jpg"
                    Image.fromarray(image).save(os.path.join(root, "loose_crop", fname),
                                                quality=95)
                    landmarks = np.round(_apply(m, ref), 3)
                    score = round(float(rng.choice([0.1, rng.uniform(0.3, 1.0)], p=[0.1, 0.9])),
                                  3)
                    images.append((fname, template, media, landmarks, score))
    ts = sorted(template_of)
    pairs = np.array([(a, b, int(template_of[a] == template_of[b]))
                      for i, a in enumerate(ts) for b in ts[i + 1:]], np.int64)
    meta = os.path.join(root, "meta")
    with open(os.path.join(meta, f"{name}_face_tid_mid.txt"), "w") as f:
        f.writelines(f"{n} {t} {m}\n" for n, t, m, _, _ in images)
    with open(os.path.join(meta, f"{name}_name_5pts_score.txt"), "w") as f:
        f.writelines(f"{n} " + " ".join(f"{v:.3f}" for v in lm.reshape(-1)) + f" {s:.3f}\n"
                     for n, _, _, lm, s in images)
    np.savetxt(os.path.join(meta, f"{name}_template_pair_label.txt"), pairs, fmt="%d")
    return {"images": images, "pairs": pairs}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("ijb") / "IJBC")
    return root, write_release(root)


def _model(seed=0):
    from hybrid_fc.backbones import build_backbone
    torch.manual_seed(seed)
    model = build_backbone("iresnet_tiny", EMB, input_size=SIZE)
    with torch.no_grad():  # non-trivial BN statistics, so eval mode matters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


# -- alignment -----------------------------------------------------------------------------
def _lstsq_similarity(src, dst):
    """Least-squares [[a, -b], [b, a]] | t by np.linalg.lstsq (the linear parametrization of a
    rotation + uniform scale): the reference for Umeyama's estimate."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def test_similarity_is_the_least_squares_fit():
    """Bugs caught: the rotation's sign flipped or transposed, src and dst exchanged (the
    inverse transform), no scale."""
    rng = np.random.default_rng(0)
    for _ in range(5):
        m = _random_similarity(rng, scale=(0.5, 3.0), angle=170)
        exact = _apply(m, ARCFACE_DST)
        np.testing.assert_allclose(similarity_transform(ARCFACE_DST, exact), m, atol=1e-9)
        noisy = exact + rng.normal(0, 2, exact.shape)   # detected landmarks are noisy
        np.testing.assert_allclose(similarity_transform(noisy, ARCFACE_DST),
                                   _lstsq_similarity(noisy, ARCFACE_DST), atol=1e-9)
    with pytest.raises(ValueError, match="same point"):
        similarity_transform(np.ones((5, 2)), ARCFACE_DST)


def test_warp_equals_opencv():
    """Bugs caught: a half-pixel shift (align_corners / pixel-center convention), the forward
    instead of the inverse map, a replicated instead of a zero border, truncation instead of
    rounding. OpenCV rounds source positions to 1/32 pixel: one grey level apart at most."""
    cv2 = require_extra("cv2")
    rng = np.random.default_rng(1)
    for trial in range(6):
        image = (_smooth_image(rng, 70, 60) if trial % 2 else
                 rng.integers(0, 256, (70, 60, 3)).astype(np.uint8))
        size = (112, 32, 45)[trial % 3]
        # the whole image lands inside the crop, rotated: the zero border is compared too
        m = _random_similarity(rng, scale=(0.5 * size / 70, 0.9 * size / 70), angle=180,
                               size=60, loose=(size, size))
        ours = warp_affine(image, m, size).astype(int)
        ref = cv2.warpAffine(image, m, (size, size), borderValue=0).astype(int)
        assert np.abs(ours - ref).max() <= 1, (trial, np.abs(ours - ref).max())
        assert np.abs(ours - ref).mean() < 0.05
        assert (ref == 0).all(2).mean() > 0.2


INSIGHTFACE_DST = [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                   [41.5493, 92.3655], [70.7299, 92.2041]]    # arcface_torch's, for 112 x 112


def test_reference_points_follow_the_resized_crop():
    """At 112 the points are insightface's; at another size the aligned crop is the 112 crop
    resized (PIL bilinear, as training resizes 112 x 112 data). Bugs caught: a typo in the
    points, scaling them by size / 112 without the half-pixel grid shift, not scaling them."""
    from PIL import Image
    cv2 = require_extra("cv2")
    np.testing.assert_array_equal(reference_points(112), INSIGHTFACE_DST)
    rng = np.random.default_rng(5)
    crop = _smooth_image(rng, 112, 112)
    m = _random_similarity(rng, scale=(0.9, 1.1), size=112, loose=(150, 140))
    loose = cv2.warpAffine(crop, m, (140, 150), borderValue=0)
    landmarks = _apply(m, np.array(INSIGHTFACE_DST))
    for size in (224, 168):    # upsampling: PIL's bilinear is then plain bilinear
        ref = np.asarray(Image.fromarray(crop).resize((size, size), Image.BILINEAR), float)
        inner = slice(size // 8, size - size // 8)
        err = np.abs(align_face(loose, landmarks, size) - ref)[inner, inner].mean()
        # two interpolations: ~2 grey levels; without the grid shift 5-8, unscaled far more
        assert err < 3.0, (size, err)


def test_alignment_round_trip():
    """A crop placed into a larger image by a known similarity comes back from its landmarks.
    Bugs caught: landmarks x/y swapped, reference points not scaled to the input size (or
    scaled without the half-pixel grid shift), the transform applied the wrong way round."""
    cv2 = require_extra("cv2")
    rng = np.random.default_rng(2)
    for size in (SIZE, 112):
        crop = _smooth_image(rng, size, size)
        ref = reference_points(size)
        # exact case: a quarter turn and a whole-pixel shift move pixels without resampling
        m = np.array([[0.0, -1.0, size + 9.0], [1.0, 0.0, 5.0]])
        loose = cv2.warpAffine(crop, m, (size + 20, size + 12), borderValue=0)
        assert np.array_equal(align_face(loose, _apply(m, ref), size), crop)
        # general case: scale, rotation, sub-pixel shift; interpolated twice
        m = _random_similarity(rng, scale=(1.2, 1.5), size=size,
                               loose=(int(size * 1.8), int(size * 1.7)))
        loose = cv2.warpAffine(crop, m, (int(size * 1.7), int(size * 1.8)), borderValue=0)
        back = align_face(loose, _apply(m, ref), size).astype(float)
        inner = slice(size // 8, size - size // 8)       # away from the border
        err = np.abs(back - crop)[inner, inner]
        assert err.mean() < 3.0, err.mean()
        swapped = align_face(loose, _apply(m, ref)[:, ::-1], size).astype(float)
        assert np.abs(swapped - crop)[inner, inner].mean() > 10 * err.mean()


# -- the protocol --------------------------------------------------------------------------
def test_pooling_hand_computed():
    """Template 1: media 10 (two frames) and media 11 (one still); template 2: one image.
    Bugs caught: a plain mean (or sum) over a template's images instead of mean per media then
    sum, the detector score ignored, the template not normalized."""
    f = np.array([[3.0, 4.0], [0.0, 2.0], [1.0, 0.0], [0.0, 5.0]], np.float32)
    templates, medias = np.array([1, 1, 1, 2]), np.array([10, 10, 11, 12])
    scores = np.array([0.5, 1.0, 0.8, 0.2], np.float32)
    ids, feats = pool_templates(f, templates, medias, scores)
    # media 10: mean(0.5 * (3, 4), 1.0 * (0, 2)) = (0.75, 2); media 11: 0.8 * (1, 0) = (0.8, 0)
    # template 1 = (1.55, 2) / |(1.55, 2)|; template 2 = (0, 1)
    t1 = np.array([1.55, 2.0]) / np.hypot(1.55, 2.0)
    assert ids.tolist() == [1, 2]
    np.testing.assert_allclose(feats.numpy(), [t1, [0.0, 1.0]], atol=1e-7)
    # normalize_images (insightface's N0): (0.6, 0.8) * 0.5, (0, 1), (1, 0) * 0.8
    _, feats = pool_templates(f, templates, medias, scores, normalize_images=True)
    t1 = np.array([0.15 + 0.8, 0.7]) / np.hypot(0.95, 0.7)
    np.testing.assert_allclose(feats.numpy()[0], t1, atol=1e-7)
    # no detector score (insightface's D0): media 10 = (1.5, 3), media 11 = (1, 0)
    _, feats = pool_templates(f, templates, medias)
    np.testing.assert_allclose(feats.numpy()[0], np.array([2.5, 3.0]) / np.hypot(2.5, 3.0),
                               atol=1e-7)


def _insightface_tar(labels, scores):
    """eval_ijbc.py's table row, transcribed: sklearn's roc_curve, both arrays flipped, then
    `min(zip(abs(fpr - far), range(len(fpr))))` per FAR."""
    sk = require_extra("sklearn.metrics")
    fpr, tpr, _ = sk.roc_curve(labels, scores)
    auc = sk.auc(fpr, tpr)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    out = {}
    for far in FARS:
        _, i = min(zip(abs(fpr - far), range(len(fpr))))
        out[far] = tpr[i]
    return out, auc


def test_roc_and_tar_against_sklearn_and_insightface():
    """Bugs caught: no drop_intermediate (a longer ROC: other nearest points), ties split into
    several ROC points, the nearest point taken on the unflipped ROC (at FPR = 0 insightface
    takes the top of the vertical segment, not (0, 0)), AUC by another rule."""
    sk = require_extra("sklearn.metrics")
    rng = np.random.default_rng(3)
    for n_imp, n_gen in ((200_000, 300), (5_000, 40), (120, 30)):
        labels = np.r_[np.zeros(n_imp, bool), np.ones(n_gen, bool)]
        scores = np.r_[rng.normal(0, 0.1, n_imp), rng.normal(0.35, 0.15, n_gen)]
        scores = np.round(scores, 3)               # many ties, as float cosines of templates
        scores[-5:] = 0.9                          # genuine pairs above every impostor
        order = rng.permutation(labels.size)
        labels, scores = labels[order], scores[order]
        fpr, tpr, thr = roc_curve(labels, scores)
        ref_fpr, ref_tpr, ref_thr = sk.roc_curve(labels, scores)
        np.testing.assert_array_equal(fpr, ref_fpr)
        np.testing.assert_array_equal(tpr, ref_tpr)
        np.testing.assert_array_equal(thr, ref_thr)
        result = ijb_metrics(scores, labels)
        ref_tar, ref_auc = _insightface_tar(labels, scores)
        assert result.tar_at_far == ref_tar
        assert result.auc == pytest.approx(ref_auc, abs=1e-12)
        assert result.unresolved == [f for f in FARS if f * n_imp < 1]
    # a vertical ROC segment at FPR 0 (genuine pairs above every impostor): with 120
    # impostors FAR 1e-6 is nearest to FPR 0, where insightface reports the segment's top
    top = np.mean(scores[labels] > scores[~labels].max())
    assert top >= 5 / 30 and result.tar_at_far[1e-6] == top
    assert tar_at_fars(np.array([0.0, 0.0, 0.5, 1.0]), np.array([0.0, 0.4, 0.6, 1.0]),
                       (1e-6,)) == {1e-6: 0.4}


def test_unresolved_far_is_flagged_in_json_and_table():
    """Bug caught: a TAR printed as if measured at a FAR the impostors cannot resolve."""
    from hybrid_fc.evaluation import format_ijb_table
    rng = np.random.default_rng(4)
    labels = np.r_[np.zeros(500, bool), np.ones(50, bool)]
    scores = np.r_[rng.normal(0, 0.1, 500), rng.normal(0.5, 0.1, 50)]
    r = ijb_metrics(scores, labels, "IJBC")
    d = r.as_dict()
    assert d["kind"] == "ijb" and list(d["tar_at_far"]) == ["1e-06", "1e-05", "1e-04",
                                                            "1e-03", "1e-02", "1e-01"]
    # 500 impostors: FPR steps of 2e-3, so 1e-3 and below are not resolved
    assert [d["tar_at_far"][k] for k in ("1e-06", "1e-05", "1e-04", "1e-03")] == [None] * 4
    assert d["tar_at_far"]["1e-02"] == r.tar_at_far[1e-2] and "1e-03" in d["note"]
    assert d["nearest_roc_point"]["1e-04"] == r.tar_at_far[1e-4]
    table = format_ijb_table([r])
    assert f"{100 * r.tar_at_far[1e-4]:8.2f}*" in table
    assert f"{100 * r.tar_at_far[1e-2]:8.2f} " in table and "* fewer than 1/FAR" in table


def _reference_protocol(features, info, detector_score=True):
    """eval_ijbc.py's image2template_feature and verification, transcribed (float64)."""
    templates = np.array([t for _, t, _, _, _ in info["images"]])
    medias = np.array([m for _, _, m, _, _ in info["images"]])
    feats = features.astype(np.float32)
    if detector_score:
        feats = feats * np.array([s for *_, s in info["images"]], np.float32)[:, None]
    unique = np.unique(templates)
    tfeats = np.zeros((len(unique), feats.shape[1]))
    for c, t in enumerate(unique):
        (ind_t,) = np.where(templates == t)
        face_feats, face_medias = feats[ind_t], medias[ind_t]
        media_feats = []
        for u in np.unique(face_medias):
            (ind_m,) = np.where(face_medias == u)
            media_feats.append(np.mean(face_feats[ind_m], axis=0, keepdims=True))
        tfeats[c] = np.sum(np.array(media_feats), axis=0)
    tfeats /= np.linalg.norm(tfeats, axis=1, keepdims=True)
    index = {t: c for c, t in enumerate(unique)}
    p = info["pairs"]
    scores = np.sum(tfeats[[index[t] for t in p[:, 0]]] * tfeats[[index[t] for t in p[:, 1]]],
                    -1)
    return tfeats, scores


def _reference_features(model, root, info):
    """PIL decode, cv2.warpAffine by the lstsq similarity, model(x) + model(mirror(x))."""
    from PIL import Image
    cv2 = require_extra("cv2")
    crops = []
    for fname, _, _, landmarks, _ in info["images"]:
        rgb = np.asarray(Image.open(os.path.join(root, "loose_crop", fname)).convert("RGB"))
        m = _lstsq_similarity(landmarks, reference_points(SIZE))
        crops.append(cv2.warpAffine(rgb, m, (SIZE, SIZE), borderValue=0))
    x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        return (model(x) + model(x.flip(3))).numpy()


def test_release_end_to_end_against_insightface_transcription(release):
    """Features of the package's decode + align + flip TTA against the independent pipeline,
    then pooling, scores, TAR and AUC against eval_ijbc.py's loops on the same features.
    Bugs caught: landmarks read as (y, x), flip TTA dropped, features normalized per image by
    default, media/template pooling or detector weights wrong (or read from another field), an
    unnormalized template, the pairs' template ids mapped to the wrong rows."""
    root, info = release
    model = _model()
    rel = load_release(root)
    assert (rel.name, rel.num_images, len(rel.template_ids)) == (
        "IJBC", len(info["images"]), IDENTITIES * TEMPLATES_PER_ID)
    features, seconds = embed_release(model, rel, SIZE, batch_size=16)
    ref = _reference_features(model, root, info)
    # cv2 and this warp differ by <= 1 grey level, PIL and simplejpeg decode alike: the raw
    # features agree to ~1% of their norm (a (y, x) or flip bug moves them by ~50%)
    scale = np.linalg.norm(ref, axis=1, keepdims=True)
    assert np.abs(features.numpy() - ref).max() / scale.min() < 0.02
    result = evaluate_ijb(model, root, SIZE, batch_size=16, workers=1)
    tfeats, scores = _reference_protocol(features.numpy(), info)
    _, ours = pool_templates(features, rel.templates, rel.medias, rel.detector_scores)
    # insightface's np.mean over float32 frames accumulates in float32, pool_templates in
    # float64: ~1e-8 apart on unit vectors (a pooling bug is O(0.1))
    np.testing.assert_allclose(ours.numpy(), tfeats, atol=1e-6)
    np.testing.assert_allclose(score_pairs(ours, rel.pairs), scores, atol=1e-6)
    ref_tar, ref_auc = _insightface_tar(info["pairs"][:, 2], scores)
    assert result.tar_at_far == ref_tar and result.auc == pytest.approx(ref_auc, abs=1e-12)
    assert (result.pairs, result.genuine) == (len(info["pairs"]), int(info["pairs"][:, 2].sum()))
    # the detector scores change the result here (10% of the images score 0.1), and so does
    # normalizing each image's feature (insightface's N0 mode, not its default)
    _, plain = _reference_protocol(features.numpy(), info, detector_score=False)
    assert not np.allclose(plain, scores, atol=1e-3)
    assert evaluate_ijb(model, rel, SIZE, normalize_images=True).auc != result.auc
    assert 0.5 < result.auc <= 1.0 and seconds > 0 and result.images_per_s > 0


def _ranks_evaluate(rank, world_size, root):
    rel = load_release(root)
    model = _model()
    features, _ = embed_release(model, rel, SIZE, batch_size=8)
    _, templates = pool_templates(features, rel.templates, rel.medias, rel.detector_scores)
    result = evaluate_ijb(model, rel, SIZE, batch_size=8)
    return features, templates, score_pairs(templates, rel.pairs), result.as_dict()


def test_two_ranks_equal_one(release):
    """Each rank embeds a contiguous slice (uneven: the image count is odd or the slices have
    different batch counts), one all-gather. Bugs caught: slices gathered out of order, an
    image embedded twice or not at all, a rank's features only."""
    root, info = release
    (one,) = run_ranks(1, _ranks_evaluate, root)
    two = run_ranks(2, _ranks_evaluate, root)
    for features, templates, scores, d in two:
        assert features.shape == (len(info["images"]), EMB)
        # fp32 convolutions over other batch layouts: summation order only
        np.testing.assert_allclose(features.numpy(), one[0].numpy(), atol=1e-4, rtol=1e-5)
        np.testing.assert_allclose(templates.numpy(), one[1].numpy(), atol=1e-6)
        np.testing.assert_allclose(scores, one[2], atol=1e-6)
        for key in ("tar_at_far", "images", "templates", "pairs", "genuine", "impostor"):
            assert d[key] == one[3][key], key
        assert d["auc"] == pytest.approx(one[3]["auc"], abs=1e-9)


def _ranks_bad_image(rank, world_size, root):
    model, calls = _model(), []
    model.register_forward_hook(lambda *_: calls.append(1))
    try:
        evaluate_ijb(model, root, SIZE, batch_size=8)
    except Exception as exc:  # noqa: BLE001 - the test looks at which error each rank got
        return f"{type(exc).__name__}: {exc}", len(calls)
    return None, len(calls)


def test_undecodable_image_on_one_rank_stops_both(release, tmp_path):
    """The last image (rank 1's slice) is not a JPEG: rank 1 names the file and its landmark
    line, rank 0 stops naming rank 1 - after both ran as many forward calls (under ZeRO-3 a
    rank that stopped calling forward would hang the others: the bug this guards against)."""
    root, info = release
    bad = str(tmp_path / "IJBC")
    shutil.copytree(root, bad)
    last = info["images"][-1][0]
    with open(os.path.join(bad, "loose_crop", last), "wb") as f:
        f.write(b"\xff\xd8\xff" + b"not a jpeg" * 10)
    (error0, calls0), (error1, calls1) = run_ranks(2, _ranks_bad_image, bad)
    errors = [error0, error1]
    assert calls0 == calls1 == -(-(len(info["images"]) // 2) // 8)
    n = len(info["images"])
    assert errors[1].startswith("IJBError: ") and f"loose_crop/{last} cannot be read" in errors[1]
    assert f"ijbc_name_5pts_score.txt:{n}" in errors[1]
    assert errors[0].startswith("RankFailed: rank 1 failed: IJBError")


# -- bad releases --------------------------------------------------------------------------
def _edit(path, lineno, new):
    lines = open(path).read().split("\n")
    lines[lineno - 1] = new(lines[lineno - 1]) if callable(new) else new
    with open(path, "w") as f:
        f.write("\n".join(lines))


@pytest.mark.parametrize("what, edit, match", [
    ("missing meta", lambda m: os.remove(f"{m}/ijbc_template_pair_label.txt"),
     r"meta/ijbc_template_pair_label.txt does not exist; .* must be an insightface IJB"),
    ("landmark fields", lambda m: _edit(f"{m}/ijbc_name_5pts_score.txt", 3,
                                        lambda l: l.rsplit(" ", 1)[0]),
     r"ijbc_name_5pts_score.txt:3: expected 12 fields"),
    ("landmark number", lambda m: _edit(f"{m}/ijbc_name_5pts_score.txt", 4,
                                        lambda l: l.replace(" ", " x", 1)),
     r"ijbc_name_5pts_score.txt:4: expected `image x1 y1"),
    ("landmark nan", lambda m: _edit(f"{m}/ijbc_name_5pts_score.txt", 2,
                                     lambda l: l.rsplit(" ", 1)[0] + " nan"),
     r"ijbc_name_5pts_score.txt:2: .*not finite"),
    ("landmarks one point", lambda m: _edit(f"{m}/ijbc_name_5pts_score.txt", 5,
                                            lambda l: l.split()[0] + " 1.0" * 10 + " 0.9"),
     r"ijbc_name_5pts_score.txt:5: the 5 landmarks of 5.jpg are one point"),
    ("tid_mid number", lambda m: _edit(f"{m}/ijbc_face_tid_mid.txt", 6, "6.jpg 2 1.5"),
     r"ijbc_face_tid_mid.txt:6: expected `image template_id media_id`"),
    ("no landmarks", lambda m: _edit(f"{m}/ijbc_name_5pts_score.txt", 7, ""),
     r"ijbc_face_tid_mid.txt:7: image 7.jpg has no line in .*ijbc_name_5pts_score.txt"),
    ("conflicting repeat", lambda m: _edit(f"{m}/ijbc_face_tid_mid.txt", 9,
                                           lambda l: l + "\n" + l.split()[0] + " 1 999"),
     r"ijbc_face_tid_mid.txt:10: image 9.jpg again, with other values than on line 9"),
    ("pair fields", lambda m: _edit(f"{m}/ijbc_template_pair_label.txt", 11, "1 2"),
     r"ijbc_template_pair_label.txt:11: expected `template1 template2 label`"),
    ("pair label", lambda m: _edit(f"{m}/ijbc_template_pair_label.txt", 12,
                                   lambda l: l[:-1] + "2"),
     r"ijbc_template_pair_label.txt:12: label 2, expected 1"),
    ("unknown template", lambda m: _edit(f"{m}/ijbc_template_pair_label.txt", 13,
                                         lambda l: "999 " + l.split(" ", 1)[1]),
     r"ijbc_template_pair_label.txt:13: template 999 has no image in .*tid_mid.txt"),
    ("only genuine", lambda m: open(f"{m}/ijbc_template_pair_label.txt", "w").write("1 2 1\n"),
     r"only genuine pairs"),
    ("both sets", lambda m: shutil.copy(f"{m}/ijbc_face_tid_mid.txt",
                                        f"{m}/ijbb_face_tid_mid.txt"),
     r"holds both IJB-B and IJB-C meta files: choose one with --ijb-name"),
])
def test_bad_release_names_file_and_line(release, tmp_path, what, edit, match):
    """Each defect is one IJBError naming the file and line, before any embedding. Bug caught
    (unknown template): insightface's template2id maps a template without images to row 0,
    scoring another template's feature without a word."""
    root, _ = release
    bad = str(tmp_path / "IJBC")
    shutil.copytree(root, bad)
    edit(os.path.join(bad, "meta"))
    with pytest.raises(IJBError, match=match):
        load_release(bad)


def test_template_rows_dense_and_sparse_ids():
    """Pair template ids -> rows, -1 where unknown, by the lookup table (IJB's small ids) and
    by binary search (ids up to 1e12)."""
    from hybrid_fc.evaluation.ijb import _rows_of
    values = np.array([[2, 9], [5, 10], [-3, 2], [1, 5]])
    assert _rows_of(np.array([2, 5, 9]), values).tolist() == [[0, 2], [1, -1], [-1, 0],
                                                               [-1, 1]]
    assert _rows_of(np.array([2, 5, 10 ** 12]), np.array([[2, 10 ** 12], [3, 5]])).tolist() == [
        [0, 2], [-1, 1]]


def test_release_folder_choice_and_counted_repeats(release, tmp_path):
    """--ijb-name picks one set of a folder holding both; the parent folder of IJBC/ is named
    in the error; a line repeated word for word is counted, not an error."""
    root, info = release
    both = str(tmp_path / "both")
    shutil.copytree(root, both)
    meta = os.path.join(both, "meta")
    for kind in ("face_tid_mid", "name_5pts_score", "template_pair_label"):
        shutil.copy(f"{meta}/ijbc_{kind}.txt", f"{meta}/ijbb_{kind}.txt")
    with open(f"{meta}/ijbb_face_tid_mid.txt", "a") as f:
        f.write(f"1.jpg {info['images'][0][1]} {info['images'][0][2]}\n")
    rel = load_release(both, "ijbb")
    assert rel.name == "IJBB" and rel.num_images == len(info["images"])
    assert rel.ignored == {"repeated lines of ijbb_face_tid_mid.txt": 1}
    with pytest.raises(IJBError, match=r"no IJB meta files .*pass .*/IJBC\?"):
        load_release(os.path.dirname(root))


def test_missing_image_is_named_before_embedding(release, tmp_path):
    root, info = release
    bad = str(tmp_path / "IJBC")
    shutil.copytree(root, bad)
    os.remove(os.path.join(bad, "loose_crop", "3.jpg"))

    class NoForward(torch.nn.Module):
        def forward(self, x):
            raise AssertionError("embedding started before the images were checked")
    with pytest.raises(IJBError, match=r"loose_crop/3.jpg does not exist \(listed at "
                                       r".*ijbc_name_5pts_score.txt:3\)"):
        evaluate_ijb(NoForward(), bad, SIZE)


# -- launch/eval.py: checkpoint, ONNX, ranks -------------------------------------------------
def _launch_eval():
    import importlib.util
    spec = importlib.util.spec_from_file_location("launch_eval",
                                                  os.path.join(ROOT, "launch", "eval.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """The tiny model as launch/export.py writes it: backbone.pt + backbone.json, and ONNX."""
    from hybrid_fc.evaluation import export_onnx
    require_extra("onnxruntime")
    out = tmp_path_factory.mktemp("exported")
    model = _model()
    torch.save(model.state_dict(), out / "backbone.pt")
    (out / "backbone.json").write_text(json.dumps({"backbone": "iresnet_tiny",
                                                   "embedding_size": EMB, "input_size": SIZE,
                                                   "backbone_kwargs": {}}))
    export_onnx(model, str(out / "backbone.onnx"), SIZE)
    return out


def _without_speed(records):
    return [{k: v for k, v in r.items() if k != "images_per_s"} for r in records]


def test_eval_checkpoint_onnx_and_two_ranks_agree(release, exported, tmp_path, capsys):
    """launch/eval.py --ijb and --pairs on the checkpoint (one process), on its ONNX export
    (onnxruntime: equal within fp32 tolerance), and under the deepspeed launcher on 2 ranks
    (the same JSON, the same printed table)."""
    import subprocess
    import sys
    from harness import free_port
    from test_evaluation import _pairs, _write_insightface_bin
    root, info = release
    images, issame = _pairs(12, size=SIZE)
    _write_insightface_bin(str(tmp_path / "lfw.bin"), images, issame)
    common = ["--ijb", root, "--pairs", str(tmp_path / "lfw.bin"), "--batch-size", "16"]
    launch_eval = _launch_eval()
    launch_eval.main(["--checkpoint", str(exported / "backbone.pt"), *common,
                      "--json", str(tmp_path / "ck.json"), "--plot", str(tmp_path / "roc.png")])
    printed = capsys.readouterr().out
    launch_eval.main(["--onnx", str(exported / "backbone.onnx"), *common,
                      "--json", str(tmp_path / "onnx.json")])
    ck = json.loads((tmp_path / "ck.json").read_text())
    onnx = json.loads((tmp_path / "onnx.json").read_text())
    assert [r["kind"] for r in ck] == ["pairs", "ijb"] and ck[1]["name"] == "IJBC"
    assert ck[1]["images"] == len(info["images"]) and ck[1]["images_per_s"] > 0
    assert "IJBC" in printed and "1e-06" in printed and "images/s on 1 rank" in printed
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    # onnxruntime's fp32 kernels sum in another order: scores within ~1e-6, the TARs equal
    assert ck[0]["accuracy"] == onnx[0]["accuracy"]
    assert ck[1]["tar_at_far"] == onnx[1]["tar_at_far"]
    assert ck[1]["auc"] == pytest.approx(onnx[1]["auc"], abs=1e-4)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                          "--master_port", str(free_port()),
                          os.path.join(ROOT, "launch", "eval.py"), "--checkpoint",
                          str(exported / "backbone.pt"), *common,
                          "--json", str(tmp_path / "two.json")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    two = json.loads((tmp_path / "two.json").read_text())
    assert _without_speed(two) == _without_speed(ck)
    table = [line for line in printed.splitlines() if line.startswith("IJBC ")]
    assert table and table[0] in out.stdout and "images/s on 2 ranks" in out.stdout


def test_eval_errors_are_one_line(release, exported, tmp_path, capsys):
    """Through run_script, as on the command line: a bad release is one line naming the file
    and line (no traceback); --onnx and --checkpoint exclude each other."""
    from hybrid_fc.runtime import run_script
    root, _ = release
    bad = str(tmp_path / "IJBC")
    shutil.copytree(root, bad)
    _edit(os.path.join(bad, "meta", "ijbc_template_pair_label.txt"), 2, "1 2 x")
    launch_eval = _launch_eval()
    assert run_script(launch_eval.main, ["--checkpoint", str(exported / "backbone.pt"),
                                         "--ijb", bad]) == 1
    err = capsys.readouterr().err
    assert "IJBError: " in err and "ijbc_template_pair_label.txt:2: expected" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    for argv in (["--checkpoint", "x", "--onnx", "y.onnx", "--ijb", root], ["--ijb", root],
                 ["--checkpoint", "x"]):
        with pytest.raises(SystemExit):
            launch_eval.parse_args(argv)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")   # torch's TorchScript exporter
def test_onnx_input_conventions(exported, tmp_path):
    """insightface-style models that take raw pixels: `pixel_norm.txt` (0, 1) beside the
    model, or a graph starting with Sub and Mul nodes (MXNet conversions). Bugs caught: the
    pixel scale not undone, a static batch of 1 fed a batch of 5."""
    onnx = require_extra("onnx")
    from hybrid_fc.evaluation import OnnxBackbone

    class RawPixels(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, p):
            return self.net((p - 127.5) * (1 / 127.5))
    net = _model()
    raw = tmp_path / "raw"
    raw.mkdir()
    torch.onnx.export(RawPixels(net).eval(), (torch.zeros(1, 3, SIZE, SIZE),),
                      str(raw / "m.onnx"),
                      dynamo=False, input_names=["data"], output_names=["fc1"])
    x = torch.rand(5, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        ref = net(x)
    (raw / "pixel_norm.txt").write_text("0\n1\n")
    model = OnnxBackbone(str(raw / "m.onnx"))
    assert (model.input_size, model.batch, model.mean, model.std) == (SIZE, 1, 0.0, 1.0)
    torch.testing.assert_close(model(x), ref, atol=1e-4, rtol=1e-4)
    (raw / "pixel_norm.txt").unlink()
    # insightface's check reads the names of the first 8 nodes only (MXNet's _minus / _mul)
    graph = onnx.load(str(raw / "m.onnx"))
    graph.graph.node[0].name, graph.graph.node[1].name = "_minus0", "_mul0"
    onnx.save(graph, str(raw / "m.onnx"))
    torch.testing.assert_close(OnnxBackbone(str(raw / "m.onnx"))(x), ref, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match=r"backbone.onnx: input 'images' is 32x32; expected a "
                                         r"square input of --input-size 48"):
        OnnxBackbone(str(exported / "backbone.onnx"), input_size=48)
