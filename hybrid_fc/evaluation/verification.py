"""Face verification on insightface pair sets (.bin) and pair lists, spread over every rank.

Protocol (insightface's eval/verification.py, reimplemented without MXNet or sklearn):
  * A pair set holds 2N images; images 2i and 2i+1 form pair i, `issame[i]` says whether they
    show the same identity.
  * Embedding with flip test-time augmentation: e = f(x) + f(mirror(x)), then L2-normalized.
    Inputs are normalized as in training ((x / 255 - 0.5) / 0.5, `hybrid_fc.data.augment`).
  * Accuracy: the squared L2 distance d = ||e1 - e2||^2 in [0, 4] (= 2 - 2 cos) is compared with
    thresholds 0, 0.01, ..., 3.99 ("same" when d < t). The pairs are split into 10 contiguous
    folds (sklearn KFold without shuffling: the first N % 10 folds get one more pair); for each
    fold the threshold with the best accuracy on the other 9 folds (the first one on ties) is
    applied to it. Reported: mean and population std of the 10 fold accuracies, the mean of
    the 10 chosen thresholds, and XNorm (mean norm of the un-flipped raw embeddings).
  * TAR at FAR (over all pairs, no folds): the threshold on the cosine that lets through
    floor(FAR x #impostor pairs) impostor pairs; TAR is the fraction of genuine pairs above it.
    Undefined (NaN) when the set has fewer than 1 / FAR impostor pairs (LFW's 3,000 impostors
    resolve FAR = 1e-3, not 1e-4).

Distribution: rank r of W decodes and embeds the contiguous slice [N r // W ... ) of the images
(hybrid_fc.common.split_span), every rank runs the same number of forward calls (ZeRO-3 gathers
parameters inside forward, so a rank that stopped early would hang the others), and the
embeddings are all-gathered in rank order; every rank then computes the same metrics. The
result on W ranks equals the result on 1 rank up to float summation order inside the backbone
(each image's embedding does not depend on the rest of its batch in eval mode).

`.bin` files are pickles. They are read with an unpickler that only builds bytes, lists,
tuples, bools, numbers and numpy arrays/scalars; anything else is refused (a pickle can
otherwise run arbitrary code).
"""
import logging
import math
import os
import pickle
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..common import split_span

__all__ = ["BinFileError", "PairSet", "load_bin", "write_bin", "load_pair_list",
           "load_pair_set", "decode_images", "embed_images", "embed_pair_set",
           "kfold_folds", "kfold_accuracy", "tar_at_far", "verification_metrics",
           "VerificationResult", "evaluate", "format_table", "VerificationHook",
           "build_verification"]

log = logging.getLogger(__name__)

THRESHOLDS = np.arange(0, 4, 0.01)
"""insightface's accuracy thresholds on the squared L2 distance of normalized embeddings."""
FARS = (1e-3, 1e-4)


class BinFileError(ValueError):
    """A pair file that is not a valid insightface .bin / pair list; the message names it."""


@dataclass
class PairSet:
    """2N encoded images (pair i = images 2i, 2i+1) and N is-same flags."""

    name: str
    images: List[bytes]
    issame: np.ndarray  # (N,) bool

    @property
    def num_pairs(self) -> int:
        return int(self.issame.shape[0])


# -- reading and writing pair sets ---------------------------------------------------------------
_ALLOWED_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy", "bool_"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"), ("builtins", "bytearray"), ("__builtin__", "bytearray"),
}


class _DataUnpickler(pickle.Unpickler):
    """Builds plain data only; any other global (a class, a function) is refused."""

    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name} (a pair file "
                                         "holds only bytes and flags)")
        return super().find_class(module, name)


def _as_bytes(item, index: int, where: str) -> bytes:
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    raise BinFileError(f"{where}: image {index} is a {type(item).__name__}, expected encoded "
                       "image bytes")


def _as_flags(values, where: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.size == 0:
        return np.zeros(0, bool)
    if arr.ndim != 1:
        raise BinFileError(f"{where}: the is-same flags have shape {arr.shape}, expected (N,)")
    if arr.dtype != np.bool_:
        if arr.dtype.kind not in "iu" or not np.isin(arr, (0, 1)).all():
            raise BinFileError(f"{where}: the is-same flags must be booleans or 0/1, got dtype "
                               f"{arr.dtype}")
        arr = arr.astype(bool)
    return arr


def load_bin(path: str, name: Optional[str] = None) -> PairSet:
    """Read an insightface `.bin` pair file: a pickle of (2N encoded images, N is-same flags).

    Python 2 pickles (the published LFW / CFP-FP / AgeDB-30 files) are read with
    encoding='bytes'. Images stay encoded here; `decode_images` decodes a slice of them.
    Raises BinFileError for anything that is not such a pickle (truncated, wrong layout, counts
    that do not match)."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    with open(path, "rb") as f:
        try:
            obj = _DataUnpickler(f, encoding="bytes").load()
        except BinFileError:
            raise
        except Exception as exc:  # EOFError, UnpicklingError, ValueError, ...: corrupt
            raise BinFileError(f"{path}: not a readable insightface .bin pair file "
                               f"({type(exc).__name__}: {exc})") from None
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFileError(f"{path}: expected a pickled pair (images, issame), got "
                           f"{type(obj).__name__}" + (f" of length {len(obj)}"
                                                      if isinstance(obj, (tuple, list)) else ""))
    bins, issame = obj
    if not isinstance(bins, (list, tuple)):
        raise BinFileError(f"{path}: images must be a list of encoded images, got "
                           f"{type(bins).__name__}")
    flags = _as_flags(issame, path)
    if len(bins) != 2 * len(flags):
        raise BinFileError(f"{path}: {len(bins)} images for {len(flags)} is-same flags; a pair "
                           f"file needs exactly 2 images per flag ({2 * len(flags)})")
    if len(flags) == 0:
        raise BinFileError(f"{path}: no pairs")
    images = [_as_bytes(b, i, path) for i, b in enumerate(bins)]
    return PairSet(name, images, flags)


def write_bin(path: str, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write a pair file in insightface's format (pickle protocol 2 of (list of bytes, list of
    bool)), readable by insightface's own load_bin and by `load_bin`."""
    images = [bytes(b) for b in images]
    flags = [bool(x) for x in issame]
    if len(images) != 2 * len(flags):
        raise ValueError(f"images: {len(images)} images for {len(flags)} flags, need "
                         f"{2 * len(flags)}")
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        pickle.dump((images, flags), f, protocol=2)
    os.replace(tmp, path)


def load_pair_list(path: str, name: Optional[str] = None) -> PairSet:
    """A text pair list: one `image_a image_b is_same` line per pair (is_same 1/0 or
    true/false; paths relative to the list's folder; `#` starts a comment)."""
    name = name or os.path.splitext(os.path.basename(path))[0]
    root = os.path.dirname(os.path.abspath(path))
    images, flags = [], []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            if len(parts) != 3 or parts[2].lower() not in ("0", "1", "true", "false"):
                raise BinFileError(f"{path}:{lineno}: expected `image_a image_b is_same(0/1)`, "
                                   f"got {line!r}")
            for p in parts[:2]:
                full = p if os.path.isabs(p) else os.path.join(root, p)
                try:
                    with open(full, "rb") as img:
                        images.append(img.read())
                except OSError as exc:
                    raise BinFileError(f"{path}:{lineno}: cannot read {full}: {exc}") from None
            flags.append(parts[2].lower() in ("1", "true"))
    if not flags:
        raise BinFileError(f"{path}: no pairs")
    return PairSet(name, images, np.asarray(flags, dtype=bool))


def load_pair_set(path: str) -> PairSet:
    """`.bin` (insightface pickle) or anything else as a text pair list."""
    return load_bin(path) if path.endswith(".bin") else load_pair_list(path)


# -- embedding ------------------------------------------------------------------------------------
def decode_images(images: Sequence[bytes], image_size: int, where: str = "images",
                  first_index: int = 0, names: Optional[Sequence[str]] = None) -> torch.Tensor:
    """Encoded images -> uint8 (n, 3, S, S). Off-size images are resized (bilinear), as
    insightface resizes .bin images that do not match the model. Cost: one JPEG decode each
    (~13k img/s/core with simplejpeg at 112x112, ~5k with PIL). Errors name the image by
    `names[i]` when given (a file or sample key), else as first_index + its position (its index
    in the whole pair set)."""
    from hybrid_fc.data.decode import fit_size, make_decoder
    decode = make_decoder("auto")
    out = torch.empty((len(images), 3, image_size, image_size), dtype=torch.uint8)
    for i, data in enumerate(images):
        try:
            rgb = decode(data)
        except Exception as exc:
            which = names[i] if names is not None else first_index + i
            raise BinFileError(f"{where}: image {which} cannot be decoded "
                               f"({type(exc).__name__}: {exc})") from None
        rgb = fit_size(rgb, (image_size, image_size))
        out[i] = torch.from_numpy(np.require(rgb, np.uint8, ["C", "W"])).permute(2, 0, 1)
    return out


def _unwrap(model):
    """The backbone nn.Module of a HybridEngine or DeepSpeed engine (`.module`), or the module."""
    return getattr(model, "module", model)


def _device_dtype(module) -> Tuple[torch.device, torch.dtype]:
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype   # ZeRO-3: p is partitioned, device and dtype still right
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def embed_images(model, images: torch.Tensor, batch_size: int = 64, flip: bool = True,
                 num_calls: Optional[int] = None, normalize: bool = True
                 ) -> Tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, S, S) -> (embeddings (n, D) fp32, L2-normalized; raw norms (n,) fp32).

    With flip the embedding is f(x) + f(mirror(x)) before normalization (one forward of 2B
    images per batch). normalize=False returns it unnormalized (IJB templates weight each
    image by its norm). The model runs in eval mode and is put back in its previous mode.
    num_calls: run exactly this many forward calls (padding with one-image dummy batches when
    the images run out) so that every rank of a ZeRO-3 group calls forward equally often."""
    from hybrid_fc.data.decode import augment
    module = _unwrap(model)
    device, dtype = _device_dtype(module)
    n, calls = images.shape[0], math.ceil(images.shape[0] / batch_size)
    if num_calls is not None:
        if num_calls < calls:
            raise ValueError(f"num_calls={num_calls} cannot cover {n} images in batches of "
                             f"{batch_size}")
        calls = num_calls
    was_training = module.training
    module.eval()
    embs, norms = [], []
    try:
        for c in range(calls):
            chunk = images[c * batch_size:(c + 1) * batch_size]
            dummy = chunk.shape[0] == 0
            if dummy:  # this rank has no images left; forward anyway (ZeRO-3 collectives)
                chunk = images.new_zeros((1,) + tuple(images.shape[1:]))
            x = augment(chunk.to(device), flip=False, dtype=dtype)    # (B, 3, S, S)
            b = x.shape[0]
            if flip:
                out = module(torch.cat([x, x.flip(-1)])).float()       # (2B, D)
                raw, e = out[:b], out[:b] + out[b:]
            else:
                raw = e = module(x).float()
            if not dummy:
                norms.append(raw.norm(dim=1))
                embs.append(torch.nn.functional.normalize(e, dim=1) if normalize else e)
    finally:
        module.train(was_training)
    if not embs:
        return torch.zeros((0, 0), device=device), torch.zeros((0,), device=device)
    return torch.cat(embs), torch.cat(norms)


def embed_pair_set(model, pairs: PairSet, image_size: int, *, batch_size: int = 64,
                   flip: bool = True, group=None,
                   decoded: Optional[torch.Tensor] = None) -> Tuple[np.ndarray, float]:
    """Embeddings of all 2N images (float32 (2N, D), normalized) and XNorm, on every rank.

    Collective over `group` (default: the world when torch.distributed is initialized): each
    rank decodes and embeds its slice, then one all-gather. `decoded`: this rank's slice,
    already decoded (VerificationHook caches it). A decode error on any rank raises
    BinFileError on every rank. With more than one rank the model's BatchNorm running statistics
    are first averaged over `group`, in place (collectives.sync_buffers): data-parallel ranks
    each track their own, and the pairs must all be embedded by one model."""
    from hybrid_fc.collectives import (all_gather_varlen, gather_batch_meta, group_rank,
                                       group_size, sync_buffers)
    world, rank = group_size(group), group_rank(group)
    if world > 1:
        sync_buffers(_unwrap(model), group)
    n = 2 * pairs.num_pairs
    lo, hi = split_span(n, rank, world)
    error = None
    if decoded is None:
        try:
            decoded = decode_images(pairs.images[lo:hi], image_size, where=pairs.name,
                                    first_index=lo)
        except BinFileError as exc:
            error, decoded = exc, torch.empty((0, 3, image_size, image_size), dtype=torch.uint8)
    per_rank = [split_span(n, r, world) for r in range(world)]
    sizes = [h - lo_ for lo_, h in per_rank]
    # Every rank runs the same number of forward calls, also one whose decode failed.
    emb, norm = embed_images(model, decoded, batch_size, flip,
                             num_calls=math.ceil(max(sizes) / batch_size))
    local_dim = emb.shape[1] if emb.shape[0] else 0
    if world > 1:  # one tiny gather: a bad image on any rank raises on all (no hang), and D
        meta = gather_batch_meta(torch.tensor([int(error is not None), local_dim],
                                              device=emb.device), group)
        bad = [r for r, (f, _) in enumerate(meta) if f]
        if bad:
            raise error or BinFileError(f"{pairs.name}: an image of rank {bad[0]}'s slice "
                                        "cannot be decoded (see that rank's error)")
        dim = max(d for _, d in meta)
    elif error is not None:
        raise error
    else:
        dim = local_dim
    if emb.shape[0] == 0:
        emb, norm = emb.new_zeros((0, dim)), norm.new_zeros((0,))
    # Cost: one all-gather of 2N x D fp32 (12,000 x 512 x 4 B = 24 MB for LFW) per call.
    full = all_gather_varlen(emb.contiguous(), sizes, group)
    norms = all_gather_varlen(norm.contiguous().reshape(-1, 1), sizes, group)
    xnorm = float(norms.double().mean())
    return full.cpu().numpy(), xnorm


# -- metrics ---------------------------------------------------------------------------------
def kfold_folds(n: int, nfolds: int = 10) -> List[Tuple[int, int]]:
    """Contiguous [lo, hi) test folds: sklearn KFold(nfolds, shuffle=False)'s split."""
    if nfolds < 2 or n < nfolds:
        raise ValueError(f"nfolds={nfolds}: needs 2 <= nfolds <= number of pairs ({n})")
    return [split_span(n, k, nfolds) for k in range(nfolds)]


def _correct_counts(dist: np.ndarray, same: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold t: #genuine with d < t + #impostors with d >= t. O((N + T) log N)."""
    gen, imp = np.sort(dist[same]), np.sort(dist[~same])
    return np.searchsorted(gen, thresholds, "left") + \
        (imp.size - np.searchsorted(imp, thresholds, "left"))


def kfold_accuracy(dist: np.ndarray, issame: np.ndarray, nfolds: int = 10,
                   thresholds: np.ndarray = THRESHOLDS) -> Tuple[np.ndarray, np.ndarray]:
    """insightface's k-fold verification accuracy on distances (smaller = more alike).

    Returns (accuracy of each test fold, the threshold chosen for it on the other folds)."""
    dist, same = np.asarray(dist, np.float64), np.asarray(issame, bool)
    if dist.shape != same.shape or dist.ndim != 1:
        raise ValueError(f"dist {dist.shape} and issame {same.shape} must be equal 1-D shapes")
    folds = kfold_folds(dist.shape[0], nfolds)
    per_fold = np.stack([_correct_counts(dist[a:b], same[a:b], thresholds)
                         for a, b in folds], 1)                              # (T, K)
    total = per_fold.sum(1)
    acc, best = np.zeros(nfolds), np.zeros(nfolds)
    for k, (a, b) in enumerate(folds):
        i = int(np.argmax(total - per_fold[:, k]))   # train folds: same size for every t
        acc[k], best[k] = per_fold[i, k] / (b - a), thresholds[i]
    return acc, best


def tar_at_far(scores: np.ndarray, issame: np.ndarray, fars: Sequence[float] = FARS
               ) -> Dict[float, float]:
    """TAR at each FAR over all pairs, on similarities (larger = more alike).

    The threshold is the (k+1)-th largest impostor score with k = floor(FAR x #impostors), so
    at most k impostors score above it; TAR = fraction of genuine scores above it. NaN when
    there are fewer than 1 / FAR impostors or no genuine pairs."""
    scores, same = np.asarray(scores, np.float64), np.asarray(issame, bool)
    imp = np.sort(scores[~same])[::-1]
    gen = scores[same]
    out = {}
    for far in fars:
        k = int(math.floor(far * imp.size + 1e-9))
        if k < 1 or gen.size == 0:
            out[far] = float("nan")
            continue
        out[far] = float(np.mean(gen > imp[k]))
    return out


@dataclass
class VerificationResult:
    """Metrics of one pair set (accuracy and TAR as fractions in [0, 1])."""

    name: str
    num_pairs: int
    accuracy: float
    """Mean 10-fold accuracy."""
    std: float
    """Population std of the fold accuracies (insightface's +-)."""
    threshold: float
    """Mean of the per-fold best thresholds on the squared L2 distance (cos = 1 - t / 2)."""
    xnorm: float
    """Mean L2 norm of the raw (un-flipped, un-normalized) embeddings."""
    tar: Dict[float, float] = field(default_factory=dict)
    """FAR -> TAR over all pairs (NaN where the set is too small for that FAR)."""
    fold_accuracies: List[float] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"name": self.name, "num_pairs": self.num_pairs, "accuracy": self.accuracy,
                "std": self.std, "threshold": self.threshold, "xnorm": self.xnorm,
                "tar": {f"{k:g}": v for k, v in self.tar.items()},
                "fold_accuracies": list(self.fold_accuracies)}


def verification_metrics(embeddings: np.ndarray, issame: np.ndarray, name: str = "pairs",
                         nfolds: int = 10, fars: Sequence[float] = FARS,
                         xnorm: float = float("nan")) -> VerificationResult:
    """Metrics from L2-normalized embeddings (2N, D), pairs (2i, 2i+1)."""
    emb = np.asarray(embeddings, np.float64)
    same = np.asarray(issame, bool)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.shape[0]:
        raise ValueError(f"embeddings {emb.shape} must be (2N, D) for N={same.shape[0]} pairs")
    e1, e2 = emb[0::2], emb[1::2]
    dist = np.sum((e1 - e2) ** 2, 1)                   # squared L2, in [0, 4]
    acc, best = kfold_accuracy(dist, same, nfolds)
    cos = np.sum(e1 * e2, 1)
    return VerificationResult(name, int(same.shape[0]), float(acc.mean()), float(acc.std()),
                              float(best.mean()), float(xnorm), tar_at_far(cos, same, fars),
                              [float(a) for a in acc])


def evaluate(model, pairs: PairSet, image_size: int, *, batch_size: int = 64, flip: bool = True,
             group=None, nfolds: int = 10, decoded: Optional[torch.Tensor] = None
             ) -> VerificationResult:
    """Embed a pair set over all ranks of `group` and compute its metrics (same on every rank).
    Collective."""
    emb, xnorm = embed_pair_set(model, pairs, image_size, batch_size=batch_size, flip=flip,
                                group=group, decoded=decoded)
    return verification_metrics(emb, pairs.issame, pairs.name, nfolds, xnorm=xnorm)


def _pct(x: float) -> str:
    return "   n/a" if x != x else f"{100 * x:6.2f}"


def format_table(results: Sequence[VerificationResult], title: Optional[str] = None) -> str:
    """A fixed-width table: set, pairs, accuracy +- std (%), threshold (d^2 and cos), TAR@FAR."""
    fars = sorted({f for r in results for f in r.tar}, reverse=True)
    head = (f"{'set':<14}{'pairs':>7}  {'accuracy %':>16}  {'thr d^2':>7} {'(cos)':>6}"
            + "".join(f"  {'TAR@' + format(f, 'g'):>10}" for f in fars) + f"  {'xnorm':>7}")
    lines = ([title] if title else []) + [head, "-" * len(head)]
    for r in results:
        lines.append(f"{r.name:<14}{r.num_pairs:>7}  {_pct(r.accuracy)} +- {_pct(r.std)}  "
                     f"{r.threshold:7.3f} {1 - r.threshold / 2:6.3f}"
                     + "".join(f"  {_pct(r.tar.get(f, float('nan'))):>10}" for f in fars)
                     + f"  {r.xnorm:7.2f}")
    return "\n".join(lines)


# -- the periodic hook for training --------------------------------------------------------------
class VerificationHook:
    """Verification every `every` optimizer steps on the given pair files, during training.

        hook = VerificationHook(["lfw.bin", "cfp_fp.bin"], every=2000, image_size=112)
        ...                                         # after each optimizer step, on every rank:
        hook(hybrid.engine, hybrid.global_steps)    # or the backbone nn.Module

    Collective: every rank of `group` constructs it and calls it at every step (it returns
    None without communicating when `step % every != 0`). Construction reads every pair file
    on every rank and decodes this rank's slice once (kept as uint8: 2N/W x 3 x S x S bytes,
    ~225 MB for LFW at 112x112 on 2 ranks); a bad file or image raises on every rank here,
    before training starts, not at the first evaluation.
    A call puts the backbone in eval mode, embeds the slice with flip TTA, all-gathers, computes
    the metrics on every rank, restores the mode, logs one line per set on rank 0 (and
    `verify/<set>/accuracy` etc. to `writer`, a TensorBoard SummaryWriter, and a "verify" row
    to `record`, a hybrid_fc.training.metrics sink, when given), and
    returns {set name: VerificationResult}. `best` keeps the highest accuracy seen per set.
    """

    def __init__(self, paths: Sequence[str], every: int, image_size: int, *, batch_size: int = 64,
                 flip: bool = True, nfolds: int = 10, group=None, writer=None,
                 print_fn=None, record=None):
        from hybrid_fc.collectives import comm_device, gather_batch_meta, group_rank, group_size
        if isinstance(paths, str):
            paths = [paths]
        if not paths:
            raise ValueError("paths: no pair files given")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive number of steps, got {every!r}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size!r}")
        self.every, self.image_size, self.batch_size = every, int(image_size), batch_size
        self.flip, self.nfolds, self.group, self.writer = flip, nfolds, group, writer
        self.rank, self.world = group_rank(group), group_size(group)
        self.print_fn = print_fn or (lambda s: print(s, flush=True))
        self.record = record  # record("verify", **fields): hybrid_fc.training.metrics' sink
        self.sets: List[PairSet] = []
        self.decoded: List[torch.Tensor] = []
        self.best: Dict[str, float] = {}
        error = None
        for path in paths:
            try:
                pairs = load_pair_set(path)
                if pairs.num_pairs < nfolds:
                    raise BinFileError(f"{path}: {pairs.num_pairs} pairs, fewer than "
                                       f"nfolds={nfolds}")
                lo, hi = split_span(len(pairs.images), self.rank, self.world)
                self.decoded.append(decode_images(pairs.images[lo:hi], self.image_size,
                                                  where=path, first_index=lo))
                pairs.images = []  # only the decoded slice is kept
                self.sets.append(pairs)
            except (OSError, BinFileError) as exc:
                error = exc
                break
        if self.world > 1:
            flags = gather_batch_meta(torch.tensor([int(error is not None)],
                                                   device=comm_device(group)), group)
            bad = [r for r, (f,) in enumerate(flags) if f]
            if bad and error is None:
                raise BinFileError(f"pair files {list(paths)}: rank {bad[0]} failed to read "
                                   "them (see that rank's error)")
        if error is not None:
            raise error

    def __call__(self, model, step: int, force: bool = False
                 ) -> Optional[Dict[str, VerificationResult]]:
        """Evaluate when `step % every == 0` (or `force`); collective in that case."""
        if not force and (step <= 0 or step % self.every):
            return None
        results = {}
        for pairs, decoded in zip(self.sets, self.decoded):
            r = evaluate(model, pairs, self.image_size, batch_size=self.batch_size,
                         flip=self.flip, group=self.group, nfolds=self.nfolds, decoded=decoded)
            results[pairs.name] = r
            self.best[pairs.name] = max(self.best.get(pairs.name, 0.0), r.accuracy)
            if self.rank == 0:
                tar = "  ".join(f"TAR@FAR={f:g} {_pct(v).strip()}%" for f, v in r.tar.items()
                                if v == v)
                self.print_fn(f"verify [{pairs.name}] step {step}: accuracy "
                              f"{100 * r.accuracy:.2f}% +- {100 * r.std:.2f} (best "
                              f"{100 * self.best[pairs.name]:.2f}%)  threshold {r.threshold:.2f}"
                              f"  xnorm {r.xnorm:.2f}" + (f"  {tar}" if tar else ""))
                if self.record is not None:
                    self.record("verify", step=step, set=pairs.name, accuracy=r.accuracy,
                                std=r.std, threshold=r.threshold, xnorm=r.xnorm,
                                best=self.best[pairs.name],
                                tar={f"{f:g}": v for f, v in r.tar.items() if v == v})
                if self.writer is not None:
                    self.writer.add_scalar(f"verify/{pairs.name}/accuracy", r.accuracy, step)
                    self.writer.add_scalar(f"verify/{pairs.name}/xnorm", r.xnorm, step)
                    for f, v in r.tar.items():
                        if v == v:
                            self.writer.add_scalar(f"verify/{pairs.name}/tar@far={f:g}", v,
                                                   step)
        return results


def build_verification(cfg, log) -> Optional[VerificationHook]:
    """The trainer's periodic verification of cfg.eval.bins (pass it as
    `Trainer(..., verification=build_verification)`), or None without eval.bins. Every rank
    embeds its slice of each pair set, BatchNorm statistics averaged over the ranks first;
    results go to `log`'s TensorBoard writer, printed lines and metrics.jsonl rows. Reads and
    decodes the pair files now, so a bad file fails before training."""
    if not cfg.eval.bins:
        return None
    return VerificationHook(cfg.eval.bins, every=cfg.eval.every, image_size=cfg.model.input_size,
                            batch_size=cfg.eval.batch_size, flip=cfg.eval.flip,
                            writer=log.writer, print_fn=log.metrics.log,
                            record=log.metrics.record)
