"""IJB-B / IJB-C 1:1 template verification (TAR at FAR): insightface's protocol, over every rank.

A release as insightface distributes it (IJB_release.tar, one folder per set, <n> = ijbb/ijbc):
    DIR/loose_crop/<image>              the detected faces, not aligned
    DIR/meta/<n>_face_tid_mid.txt       `image template_id media_id`, one line per image
    DIR/meta/<n>_name_5pts_score.txt    `image x1 y1 ... x5 y5 detector_score`
    DIR/meta/<n>_template_pair_label.txt  `template1 template2 label` (1 same person, 0 not)
IJB-B: 227,630 images, 12,115 templates, 8,010,270 pairs; IJB-C: 469,375 images, 23,124
templates, 15,658,489 pairs.

The protocol, as insightface's recognition/arcface_torch/eval_ijbc.py and onnx_ijbc.py run it
by default:
  1. Every image is aligned from its 5 landmarks (hybrid_fc.evaluation.align) and embedded with
     flip TTA: f = f(x) + f(mirror(x)), the raw backbone outputs.
  2. f keeps its norm: insightface's default (`use_norm_score = True`, its test mode "N1") lets
     the norm weight the image within its template; normalize_images=True divides it out
     (its "N0"). f is multiplied by the image's detector score (the 5pts file's last field;
     detector_score=False: its "D0").
  3. Media feature = mean of the template's images of one media (a video's frames, or a still);
     template feature = sum of its media features, L2-normalized.
  4. The score of a pair is the cosine of its two template features (float64).
  5. The ROC is sklearn.metrics.roc_curve(labels, scores)'s (drop_intermediate=True), ROC AUC
     its trapezoid area, and TAR at FAR the TPR of the ROC point whose FPR is nearest to FAR,
     the largest TPR among equally near points (insightface flips the ROC before its argmin).
Where this differs from insightface (the README lists the same):
  * A FAR below 1 / #impostor pairs cannot be resolved. insightface prints the nearest ROC
    point's TPR anyway; here it is printed with a `*` and is null in the JSON (`as_dict`).
  * Every line of the meta files is checked: a wrong field count, a number that does not parse,
    a missing or undecodable image, a pair naming a template without images, a label other
    than 0/1, a repeated image with other values: an IJBError naming the file and line, where
    insightface crashes, or (an unknown template) silently scores another template. An
    identical repeated line is counted and ignored. Images are joined to their landmarks by
    name (insightface pairs the two files' lines by position).
  * JPEG decoding by libjpeg-turbo (simplejpeg) or PIL instead of cv2.imread; the warp is a
    float64 cv2.warpAffine (within one grey level of it); pooling sums in float64 where
    insightface averages frames in float32 (scores ~1e-8 apart); at input sizes other than 112
    the reference points follow the resized crop (hybrid_fc.evaluation.align).

Distribution: rank r of W aligns and embeds the contiguous slice split_span(N, r, W) of the
images, one batch at a time (decoded images live for one batch; `workers` DataLoader
processes decode and align ahead), every rank runs the same number of forward calls (ZeRO-3
gathers parameters inside forward), then one all-gather of the (N, D) float32 features; every
rank then pools, scores and computes the same metrics. Memory per rank: the features
(IJB-C at D = 512: 0.96 GB, twice that during the gather), the pairs (P x 2 x 4 B) and their
float64 scores (IJB-C: 125 MB each).
"""
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..common import split_span
from .align import align_face
from .verification import _unwrap, embed_images

__all__ = ["IJBError", "IJBRelease", "IJBResult", "FARS", "find_release", "load_release",
           "embed_release", "pool_templates", "score_pairs", "roc_curve", "roc_auc",
           "tar_at_fars", "ijb_metrics", "evaluate_ijb", "format_ijb_table", "plot_roc"]

FARS = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""The FAR columns insightface prints for IJB-B / IJB-C."""
_META = {"tid_mid": "{}_face_tid_mid.txt", "landmarks": "{}_name_5pts_score.txt",
         "pairs": "{}_template_pair_label.txt"}
_LAYOUT = ("an insightface IJB release folder: DIR/loose_crop/ (the images) and DIR/meta/"
           "{n}_face_tid_mid.txt, {n}_name_5pts_score.txt, {n}_template_pair_label.txt "
           "(IJB_release.tar, see insightface's evaluation/IJB readme)")


class IJBError(ValueError):
    """An IJB release that cannot be evaluated as it is; the message names the file and line."""


@dataclass
class IJBRelease:
    """The meta data of one IJB set, checked; images stay on disk."""

    name: str
    """'IJBB' or 'IJBC'."""
    image_dir: str
    landmark_file: str
    images: List[str]
    """(N) file names in image_dir, in the tid_mid file's order."""
    image_lines: np.ndarray
    """(N,) each image's line in landmark_file (for error messages)."""
    landmarks: np.ndarray
    """(N, 5, 2) float64 (x, y) pixel coordinates."""
    detector_scores: np.ndarray
    """(N,) float32."""
    templates: np.ndarray
    """(N,) int64 template id of each image."""
    medias: np.ndarray
    """(N,) int64 media id of each image."""
    template_ids: np.ndarray
    """(T,) int64, sorted: row t of the template features is template template_ids[t]."""
    pairs: np.ndarray
    """(P, 2) int32 rows of template_ids."""
    labels: np.ndarray
    """(P,) bool, True for a genuine (same person) pair."""
    ignored: Dict[str, int] = field(default_factory=dict)
    """Counted lines that were left out: reason -> count."""

    @property
    def num_images(self) -> int:
        return len(self.images)


# -- reading a release ----------------------------------------------------------------------
def find_release(root: str, name: Optional[str] = None) -> Tuple[str, Dict[str, str]]:
    """('ijbb' or 'ijbc', {"tid_mid", "landmarks", "pairs", "images": path}) of the release in
    `root`, named by its meta files (`name` chooses when both are there). IJBError when a file
    is missing or the choice is ambiguous."""
    meta = os.path.join(root, "meta")
    if name is None:
        found = [n for n in ("ijbb", "ijbc")
                 if any(os.path.exists(os.path.join(meta, f.format(n))) for f in _META.values())]
        if len(found) > 1:
            raise IJBError(f"{root}: {meta} holds both IJB-B and IJB-C meta files: choose one "
                           "with --ijb-name ijbb or --ijb-name ijbc")
        if not found:
            sub = [os.path.join(root, d) for d in ("IJBB", "IJBC")
                   if os.path.isdir(os.path.join(root, d))]
            raise IJBError(f"{root}: no IJB meta files in {meta}; expected "
                           + _LAYOUT.format(n="ijbc") + (f" (pass {' or '.join(sub)}?)"
                                                          if sub else ""))
        name = found[0]
    elif name not in ("ijbb", "ijbc"):
        raise IJBError(f"IJB set name must be ijbb or ijbc, got {name!r}")
    paths = {k: os.path.join(meta, f.format(name)) for k, f in _META.items()}
    paths["images"] = os.path.join(root, "loose_crop")
    for path in paths.values():
        if not os.path.exists(path):
            raise IJBError(f"{path} does not exist; {root} must be " + _LAYOUT.format(n=name))
    return name, paths


def _read_image_lines(path: str, fields: str, convert, ignored: Dict[str, int]
                      ) -> Tuple[List[str], List[int], list]:
    """`image value ...` lines -> (names, line numbers, convert(values)) in file order. A line
    repeated word for word is counted in `ignored`; an image repeated with other values is an
    IJBError naming both lines. Cost: ~2 us per line (469,375 lines for IJB-C)."""
    count = len(fields.split())
    seen: Dict[str, Tuple[int, tuple]] = {}
    names, lines, values = [], [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != count:
                raise IJBError(f"{path}:{lineno}: expected {count} fields `{fields}`, got "
                               f"{len(parts)}: {line.strip()[:120]!r}")
            try:
                value = convert(parts[1:])
            except ValueError as exc:
                raise IJBError(f"{path}:{lineno}: expected `{fields}`, got "
                               f"{line.strip()[:120]!r} ({exc})") from None
            first = seen.get(parts[0])
            if first is not None:
                if first[1] != value:
                    raise IJBError(f"{path}:{lineno}: image {parts[0]} again, with other values "
                                   f"than on line {first[0]}")
                key = f"repeated lines of {os.path.basename(path)}"
                ignored[key] = ignored.get(key, 0) + 1
                continue
            seen[parts[0]] = (lineno, value)
            names.append(parts[0])
            lines.append(lineno)
            values.append(value)
    return names, lines, values


def _ints(values) -> tuple:
    return tuple(map(int, values))


def _floats(values) -> tuple:
    return tuple(map(float, values))


def _data_lines(path: str):
    """(line number, text) of the lines numpy.loadtxt reads as rows: not blank, not a comment."""
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            text = line.split("#", 1)[0].strip()
            if text:
                yield lineno, text


def _line_of_row(path: str, row: int) -> int:
    for k, (lineno, _) in enumerate(_data_lines(path)):
        if k == row:
            return lineno
    raise IndexError(row)


def _read_pairs(path: str) -> np.ndarray:
    """(P, 3) int64 `template1 template2 label` rows. numpy's C parser reads IJB-C's 15.6M
    lines in ~4 s (a Python loop: ~40 s); only on a parse error are the lines scanned again in
    Python to name the bad one."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)   # "input contained no data"
            table = np.loadtxt(path, dtype=np.int64, ndmin=2)
    except ValueError as exc:
        table, error = None, exc
    if table is not None and table.shape[1] == 3:
        return table
    for lineno, text in _data_lines(path):
        parts = text.split()
        try:
            if len(parts) != 3:
                raise ValueError(f"{len(parts)} fields")
            _ints(parts)
        except ValueError:
            raise IJBError(f"{path}:{lineno}: expected `template1 template2 label`, got "
                           f"{text[:120]!r}") from None
    if table is not None:   # no rows at all
        raise IJBError(f"{path}: no pairs")
    raise IJBError(f"{path}: cannot be read as `template1 template2 label` lines ({error})")


def _rows_of(ids: np.ndarray, values: np.ndarray) -> np.ndarray:
    """The row of each of `values` in the sorted unique `ids`, -1 where absent. IJB's template
    ids are small non-negative integers: a lookup table then (0.7 s for IJB-C's 31M ids, where
    a binary search, np.searchsorted, took 10 s)."""
    if ids[0] >= 0 and ids[-1] <= 64 * len(ids) + (1 << 20):
        table = np.full(ids[-1] + 2, -1, np.int64)            # the last entry: out of range
        table[ids] = np.arange(len(ids))
        return table[np.clip(values, -1, ids[-1] + 1)]
    pos = np.searchsorted(ids, values).clip(max=len(ids) - 1)
    return np.where(ids[pos] == values, pos, -1)


def load_release(root: str, name: Optional[str] = None) -> IJBRelease:
    """Read and check an IJB release's meta files (see the module docstring); images are only
    listed. Cost: ~1 s per 500k images plus ~4 s per 15M pairs, one core."""
    name, paths = find_release(root, name)
    ignored: Dict[str, int] = {}
    names, tid_lines, ids = _read_image_lines(paths["tid_mid"], "image template_id media_id",
                                              _ints, ignored)
    lm_names, lm_lines, lm_values = _read_image_lines(
        paths["landmarks"], "image x1 y1 x2 y2 x3 y3 x4 y4 x5 y5 detector_score",
        _floats, ignored)
    if not names:
        raise IJBError(f"{paths['tid_mid']}: no images")
    where = {n: k for k, n in enumerate(lm_names)}
    rows = []
    for image, lineno in zip(names, tid_lines):
        k = where.get(image)
        if k is None:
            raise IJBError(f"{paths['tid_mid']}:{lineno}: image {image} has no line in "
                           f"{paths['landmarks']}")
        rows.append(k)
    if len(lm_names) > len(names):
        key = f"lines of {os.path.basename(paths['landmarks'])} naming an image of no template"
        ignored[key] = len(lm_names) - len(names)
    values = np.asarray(lm_values, np.float64)[rows]                     # (N, 11)
    landmarks = values[:, :10].reshape(-1, 5, 2)
    image_lines = np.asarray(lm_lines, np.int64)[rows]
    bad = np.flatnonzero(~np.isfinite(values).all(1))
    if bad.size:
        raise IJBError(f"{paths['landmarks']}:{image_lines[bad[0]]}: a value of {names[bad[0]]} "
                       "is not finite (nan or inf)")
    spread = ((landmarks - landmarks.mean(1, keepdims=True)) ** 2).sum((1, 2))
    flat = np.flatnonzero(spread <= 1e-12)
    if flat.size:
        raise IJBError(f"{paths['landmarks']}:{image_lines[flat[0]]}: the 5 landmarks of "
                       f"{names[flat[0]]} are one point: no alignment is possible")
    ids = np.asarray(ids, np.int64)
    templates, medias = ids[:, 0], ids[:, 1]
    template_ids = np.unique(templates)

    table = _read_pairs(paths["pairs"])
    labels = table[:, 2]
    bad = np.flatnonzero((labels != 0) & (labels != 1))
    if bad.size:
        raise IJBError(f"{paths['pairs']}:{_line_of_row(paths['pairs'], int(bad[0]))}: label "
                       f"{labels[bad[0]]}, expected 1 (same person) or 0 (not)")
    pairs = _rows_of(template_ids, table[:, :2])                          # (P, 2)
    unknown = np.flatnonzero((pairs < 0).any(1))
    if unknown.size:
        row = int(unknown[0])
        t = table[row, int(pairs[row, 0] >= 0)]
        raise IJBError(f"{paths['pairs']}:{_line_of_row(paths['pairs'], row)}: template {t} "
                       f"has no image in {paths['tid_mid']}")
    labels = labels.astype(bool)
    if labels.all() or not labels.any():
        raise IJBError(f"{paths['pairs']}: {'only genuine' if labels.all() else 'no genuine'} "
                       "pairs: a ROC needs both genuine (label 1) and impostor (label 0) pairs")
    return IJBRelease(name.upper(), paths["images"], paths["landmarks"], names, image_lines,
                      landmarks, values[:, 10].astype(np.float32), templates, medias,
                      template_ids, pairs.astype(np.int32), labels, ignored)


# -- embedding -----------------------------------------------------------------------------
class _AlignedImages(torch.utils.data.Dataset):
    """Image lo + i of a release -> uint8 (3, S, S) aligned crop, or the IJBError saying why
    not (returned, not raised, so that every rank keeps calling forward; see embed_release)."""

    def __init__(self, release: IJBRelease, lo: int, hi: int, size: int):
        from hybrid_fc.data.decode import make_decoder
        self.release, self.lo, self.hi, self.size = release, lo, hi, size
        self.decode = make_decoder("auto")

    def __len__(self):
        return self.hi - self.lo

    def __getitem__(self, i):
        r, k = self.release, self.lo + i
        path = os.path.join(r.image_dir, r.images[k])
        try:
            with open(path, "rb") as f:
                rgb = self.decode(f.read())
        except Exception as exc:  # OSError, a decoder's error: corrupt or not an image
            return IJBError(f"{path} cannot be read as an image ({type(exc).__name__}: {exc}); "
                            f"listed at {r.landmark_file}:{r.image_lines[k]}")
        crop = align_face(rgb, r.landmarks[k], self.size)
        return torch.from_numpy(crop).permute(2, 0, 1)


def _collate(items):
    """A batch: uint8 (B, 3, S, S), or the first IJBError among its images."""
    errors = [x for x in items if isinstance(x, IJBError)]
    return errors[0] if errors else torch.stack(items)


def _missing_image(release: IJBRelease, lo: int, hi: int) -> Optional[IJBError]:
    for k in range(lo, hi):
        path = os.path.join(release.image_dir, release.images[k])
        if not os.path.isfile(path):
            return IJBError(f"{path} does not exist (listed at {release.landmark_file}:"
                            f"{release.image_lines[k]}): is the release fully extracted?")
    return None


def embed_release(model, release: IJBRelease, image_size: int, *, batch_size: int = 64,
                  flip: bool = True, workers: int = 0, group=None
                  ) -> Tuple[torch.Tensor, float]:
    """Every image's feature f(x) + f(mirror(x)) (or f(x) without flip), not normalized:
    float32 (N, D) on the CPU of every rank, and the seconds this took.

    Collective over `group`. Each rank first checks that its images exist (an IJBError on every
    rank before any embedding; the others raise RankFailed naming it), then decodes, aligns and
    embeds its slice batch by batch (`workers` DataLoader processes ahead of the model; 0: in
    this process). A read or decode error stops the rank's decoding but not its forward calls,
    and is raised on every rank after them. With more than one rank the model's BatchNorm
    statistics are first averaged over `group` (as embed_pair_set does)."""
    from hybrid_fc.collectives import (agree_on_error, all_gather_varlen, comm_device,
                                       gather_batch_meta, group_rank, group_size, sync_buffers)
    world, rank = group_size(group), group_rank(group)
    start = time.perf_counter()
    if world > 1:
        sync_buffers(_unwrap(model), group)
    n = release.num_images
    sizes = [hi - lo for lo, hi in (split_span(n, r, world) for r in range(world))]
    lo, hi = split_span(n, rank, world)
    agree_on_error(_missing_image(release, lo, hi), group)
    calls = math.ceil(max(sizes) / batch_size)
    loader = torch.utils.data.DataLoader(_AlignedImages(release, lo, hi, image_size),
                                         batch_size=batch_size, num_workers=workers,
                                         collate_fn=_collate)
    parts, error = [], None
    for batch in loader:
        if isinstance(batch, IJBError):
            error = batch
            break
        emb, _ = embed_images(model, batch, batch_size, flip, num_calls=1, normalize=False)
        parts.append(emb.cpu())
    if len(parts) < calls:  # as many forward calls as the rank with the most images (ZeRO-3)
        embed_images(model, torch.empty((0, 3, image_size, image_size), dtype=torch.uint8),
                     batch_size, flip, num_calls=calls - len(parts))
    agree_on_error(error, group)
    device = comm_device(group)
    local_dim = parts[0].shape[1] if parts else 0
    dim = max(d for (d,) in gather_batch_meta(torch.tensor([local_dim], device=device), group))
    local = torch.cat(parts) if parts else torch.zeros((0, dim))
    # Cost: one all-gather of N x D fp32 (IJB-C, D = 512: 0.96 GB).
    features = all_gather_varlen(local.to(device), sizes, group).cpu()
    return features, time.perf_counter() - start


# -- the protocol --------------------------------------------------------------------------
_BLOCK = 1 << 16
"""Images per block of the pooling: (2^16, 512) float64 = 268 MB."""


def pool_templates(features, templates: np.ndarray, medias: np.ndarray,
                   detector_scores: Optional[np.ndarray] = None, normalize_images: bool = False
                   ) -> Tuple[np.ndarray, torch.Tensor]:
    """Image features (N, D) -> (template ids (T,) sorted, template features (T, D) float64,
    L2-normalized), insightface's pooling: each image's feature (L2-normalized first with
    normalize_images) times its detector score (when given), float32 as insightface computes
    it; media feature = mean over the template's images of that media, template feature = sum
    of its media features, then normalized (a zero feature stays zero). Sums in float64, one
    block of images at a time: cost O(N D), memory G x D x 8 bytes (G = template-media groups)."""
    f = torch.as_tensor(features, dtype=torch.float32)
    keys = np.stack([np.asarray(templates, np.int64), np.asarray(medias, np.int64)], 1)
    groups, group_of = np.unique(keys, axis=0, return_inverse=True)      # (G, 2), (N,)
    template_ids, template_of_group = np.unique(groups[:, 0], return_inverse=True)
    group_of = torch.from_numpy(group_of.reshape(-1))
    media = torch.zeros((len(groups), f.shape[1]), dtype=torch.float64)
    for s in range(0, f.shape[0], _BLOCK):
        block = f[s:s + _BLOCK]
        if normalize_images:
            block = torch.nn.functional.normalize(block, dim=1)
        if detector_scores is not None:
            block = block * torch.as_tensor(detector_scores[s:s + _BLOCK],
                                            dtype=torch.float32)[:, None]
        media.index_add_(0, group_of[s:s + _BLOCK], block.double())
    media /= torch.bincount(group_of, minlength=len(groups)).double()[:, None]
    out = torch.zeros((len(template_ids), f.shape[1]), dtype=torch.float64)
    out.index_add_(0, torch.from_numpy(template_of_group.reshape(-1)), media)
    return template_ids, torch.nn.functional.normalize(out, dim=1)


def score_pairs(template_features: torch.Tensor, pairs: np.ndarray, tile: int = 1024
                ) -> np.ndarray:
    """(P,) float64 cosine of each pair's two rows of `template_features` (T, D), normalized;
    `pairs` (P, 2) row indices.

    Computed as tiles of the Gram matrix: `tile` templates against all T (one matmul), from
    which the pairs whose first template lies in the tile are read. Cost: T^2 D multiply-adds
    whatever P (IJB-C: 23,124^2 x 512 = 2.7e11, ~45 s on one core of the test machine) and a
    tile x T float64 block (190 MB). Gathering both rows of every pair instead reads P x D x 16
    bytes (IJB-C: 128 GB) and took 225 s there: IJB's pairs are dense (6% of all template pairs)."""
    first = np.asarray(pairs[:, 0], np.int64)
    order = np.argsort(first)
    starts = list(range(0, template_features.shape[0], tile))
    bounds = np.searchsorted(first[order], starts + [template_features.shape[0]])
    columns = template_features.T.contiguous()                            # (D, T)
    scores = np.empty(len(pairs), np.float64)
    for k, start in enumerate(starts):
        rows = order[bounds[k]:bounds[k + 1]]
        if rows.size:
            gram = (template_features[start:start + tile] @ columns).numpy()  # (tile, T)
            scores[rows] = gram[first[rows] - start, pairs[rows, 1]]
    return scores


def roc_curve(labels: np.ndarray, scores: np.ndarray
              ) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) exactly as sklearn.metrics.roc_curve(labels, scores) with its
    default drop_intermediate=True: one point per distinct score (descending), points in the
    middle of a straight segment dropped, (0, 0) at threshold inf first. Cost: one sort."""
    y = np.asarray(labels, bool)
    s = np.asarray(scores, np.float64)
    order = np.argsort(s)[::-1]                # ties end up in one point: any order
    s, y = s[order], y[order]
    ends = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]     # last index of each distinct score
    tps = np.cumsum(y, dtype=np.float64)[ends]
    fps = 1.0 + ends - tps
    thresholds = s[ends]
    if fps.size > 2:
        keep = np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True]
        fps, tps, thresholds = fps[keep], tps[keep], thresholds[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    return fps / fps[-1], tps / tps[-1], np.r_[np.inf, thresholds]


def roc_auc(fpr: np.ndarray, tpr: np.ndarray) -> float:
    """Area under the ROC by the trapezoid rule (sklearn.metrics.auc)."""
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1])) / 2)


def tar_at_fars(fpr: np.ndarray, tpr: np.ndarray, fars: Sequence[float] = FARS
                ) -> Dict[float, float]:
    """insightface's TAR at each FAR: the TPR of the ROC point with the FPR nearest to FAR; among
    equally near points the last one of the ROC (the largest TPR: insightface flips fpr and tpr
    and takes the first minimum)."""
    fpr, tpr = fpr[::-1], tpr[::-1]
    return {far: float(tpr[int(np.argmin(np.abs(fpr - far)))]) for far in fars}


@dataclass
class IJBResult:
    """TAR at FAR of one IJB set (fractions in [0, 1])."""

    name: str
    images: int
    templates: int
    pairs: int
    genuine: int
    impostor: int
    tar_at_far: Dict[float, float]
    """FAR -> insightface's TAR (its nearest ROC point, also where `unresolved`)."""
    unresolved: List[float]
    """FARs below 1 / impostor: no threshold lets exactly that rate through."""
    auc: float
    images_per_s: float = float("nan")
    fpr: np.ndarray = field(default=None, repr=False)
    tpr: np.ndarray = field(default=None, repr=False)
    ignored: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict:
        """The JSON record: tar_at_far maps "1e-06" ... "1e-01" to a fraction, or null where
        the set is too small to resolve the FAR (`nearest_roc_point` has insightface's value)."""
        key = {far: f"{far:.0e}" for far in self.tar_at_far}
        out = {"name": self.name, "kind": "ijb", "images": self.images,
               "templates": self.templates, "pairs": self.pairs, "genuine": self.genuine,
               "impostor": self.impostor,
               "tar_at_far": {key[f]: (None if f in self.unresolved else v)
                              for f, v in self.tar_at_far.items()},
               "auc": self.auc, "images_per_s": self.images_per_s, "ignored": self.ignored}
        if self.unresolved:
            out["nearest_roc_point"] = {key[f]: v for f, v in self.tar_at_far.items()}
            out["note"] = (f"{self.impostor} impostor pairs cannot resolve FAR "
                           + ", ".join(key[f] for f in self.unresolved) + ": null here; "
                           "nearest_roc_point is what insightface prints")
        return out


def ijb_metrics(scores: np.ndarray, labels: np.ndarray, name: str = "IJB",
                fars: Sequence[float] = FARS) -> IJBResult:
    """ROC, AUC and TAR at each FAR of pair scores (larger = more alike) and labels."""
    labels = np.asarray(labels, bool)
    fpr, tpr, _ = roc_curve(labels, scores)
    impostor = int((~labels).sum())
    return IJBResult(name, 0, 0, int(labels.size), int(labels.sum()), impostor,
                     tar_at_fars(fpr, tpr, fars), [f for f in fars if f * impostor < 1],
                     roc_auc(fpr, tpr), fpr=fpr, tpr=tpr)


def evaluate_ijb(model, release, image_size: int, *, name: Optional[str] = None,
                 batch_size: int = 64, flip: bool = True, normalize_images: bool = False,
                 detector_score: bool = True, workers: int = 0, group=None) -> IJBResult:
    """Embed an IJB release (an IJBRelease or its folder, `name` ijbb/ijbc choosing when the
    folder holds both) over all ranks of `group` and compute its TAR at FAR (the same on every
    rank). Collective."""
    if not isinstance(release, IJBRelease):
        release = load_release(release, name)
    features, seconds = embed_release(model, release, image_size, batch_size=batch_size,
                                      flip=flip, workers=workers, group=group)
    _, templates = pool_templates(features, release.templates, release.medias,
                                  release.detector_scores if detector_score else None,
                                  normalize_images)
    result = ijb_metrics(score_pairs(templates, release.pairs), release.labels, release.name)
    result.images, result.templates = release.num_images, len(release.template_ids)
    result.images_per_s, result.ignored = release.num_images / seconds, dict(release.ignored)
    return result


# -- reporting -----------------------------------------------------------------------------
def format_ijb_table(results: Sequence[IJBResult], title: Optional[str] = None) -> str:
    """insightface's table: one row per set, TAR (%) at each FAR, plus the set's sizes and ROC
    AUC (%). A value the set cannot resolve is marked `*` and explained below the table."""
    fars = sorted({f for r in results for f in r.tar_at_far})
    head = (f"{'set':<10}{'images':>9}{'templates':>10}{'pairs':>10}"
            + "".join(f"{format(f, '.0e'):>9}" for f in fars) + f"{'AUC':>9}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    starred = False
    for r in results:
        cells = []
        for f in fars:
            mark = "*" if f in r.unresolved else " "
            starred |= mark == "*"
            cells.append(f"{100 * r.tar_at_far[f]:8.2f}{mark}")
        lines.append(f"{r.name:<10}{r.images:>9}{r.templates:>10}{r.pairs:>10}"
                     + "".join(cells) + f"{100 * r.auc:9.2f}")
    if starred:
        lines.append("* fewer than 1/FAR impostor pairs: insightface's nearest ROC point, not a "
                     "TAR at this FAR (null in --json)")
    return "\n".join(lines)


def plot_roc(results: Sequence[IJBResult], path: str) -> str:
    """The ROC curves (TPR against FAR on a log axis from 1e-6 to 1e-1, one line per set,
    insightface's figure) as a PNG at `path`. Needs matplotlib (drawn without pyplot, so no
    display or global backend is touched)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for r in results:
        keep = r.fpr > 0
        ax.plot(r.fpr[keep], r.tpr[keep], lw=1,
                label=f"{r.name} (AUC = {100 * r.auc:.4f} %)")
    ax.set_xscale("log")
    ax.set_xlim(FARS[0], FARS[-1])
    ax.set_ylim(0.0, 1.0)
    ax.set_xticks(list(FARS))
    ax.grid(linestyle="--", linewidth=1)
    ax.set_xlabel("False Positive Rate")
    ax.set_ylabel("True Positive Rate")
    ax.set_title("ROC on IJB")
    ax.legend(loc="lower right")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
