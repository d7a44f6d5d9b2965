"""Synthetic identities: a stable per-identity appearance, a random variation per image.

Identity appearance (seeded by (seed, identity)): a smooth colour field (a 4x4 grid of random
colours upsampled bicubically) plus three coloured ellipses at identity-specific places, a
crude stand-in for face layout. Per image (seeded by (seed, identity, image)): a shift of up to
size/16 pixels, brightness and contrast jitter, Gaussian pixel noise, then JPEG encoding. Images of
one identity therefore differ pixel-wise but share structure that a small CNN learns to separate
in a few hundred steps; the quickstart, tests and benchmarks use it.

Written through the same shard writer as real data (same tar layout and manifest), so the output
is also resumable. Images depend on numpy's Generator streams, which the resume fingerprint pins
via the numpy version.
"""
import io
from typing import List, Optional, Tuple

import numpy as np

from .shards import convert
from .sources import Source

__all__ = ["synthetic_image", "encode_jpeg", "SyntheticSource", "make_synthetic",
           "synthetic_pairs"]


def _identity_base(identity: int, size: int, seed: int) -> np.ndarray:
    from PIL import Image
    rng = np.random.default_rng([seed, identity, 0])
    grid = rng.integers(30, 226, size=(4, 4, 3), dtype=np.uint8)
    base = np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC), np.float32)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    for _ in range(3):
        cy, cx = rng.uniform(0.2, 0.8, 2)
        ry, rx = rng.uniform(0.06, 0.18, 2)
        colour = rng.integers(0, 256, 3).astype(np.float32)
        mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
        base[mask] = 0.35 * base[mask] + 0.65 * colour
    return base


_COMMON = 2 ** 40  # the identity id of the shared "population" appearance (never trained on)


def synthetic_image(identity: int, image: int, size: int = 112, seed: int = 0,
                    noise: float = 6.0, distinct: float = 1.0) -> np.ndarray:
    """Image `image` of `identity` as uint8 (size, size, 3) RGB, before JPEG encoding.

    distinct: how far identities are from a shared appearance, 1.0 (default) fully their own,
    0.3 only 30% of the way (harder to tell apart); noise: per-pixel noise std (0-255)."""
    base = _identity_base(identity, size, seed)
    if distinct != 1.0:
        common = _identity_base(_COMMON, size, seed)
        base = common + np.float32(distinct) * (base - common)
    rng = np.random.default_rng([seed, identity, image + 1])
    shift = max(1, size // 16)
    dy, dx = rng.integers(-shift, shift + 1, 2)
    img = np.roll(base, (int(dy), int(dx)), axis=(0, 1))
    mean = img.mean()
    img = (img - mean) * rng.uniform(0.8, 1.2) + mean * rng.uniform(0.75, 1.25)
    img = img + rng.normal(0.0, noise, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def encode_jpeg(rgb: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 (H, W, 3) array (libjpeg-turbo via simplejpeg when installed)."""
    try:
        import simplejpeg
        return simplejpeg.encode_jpeg(np.ascontiguousarray(rgb), quality=quality,
                                      colorspace="RGB")
    except ImportError:
        from PIL import Image
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=quality)
        return buf.getvalue()


class SyntheticSource(Source):
    """identities x images_per_id generated images; index = identity * images_per_id + image."""

    kind = "synthetic"

    def __init__(self, identities: int, images_per_id: int, size: int = 112, seed: int = 0,
                 quality: int = 90, noise: float = 6.0, distinct: float = 1.0):
        for name, v in (("identities", identities), ("images_per_id", images_per_id),
                        ("size", size)):
            if int(v) < 1:
                raise ValueError(f"{name} must be >= 1, got {v!r}")
        if not 1 <= quality <= 100:
            raise ValueError(f"quality must be in 1..100, got {quality!r}")
        if not noise >= 0:
            raise ValueError(f"noise must be >= 0, got {noise!r}")
        if not 0 < distinct <= 1:
            raise ValueError(f"distinct must be in (0, 1], got {distinct!r}")
        self.noise, self.distinct = float(noise), float(distinct)
        self.identities, self.images_per_id = int(identities), int(images_per_id)
        self.size, self.seed, self.quality = int(size), int(seed), int(quality)
        self.num_samples = self.identities * self.images_per_id
        self.known_num_classes = self.identities

    def fingerprint(self):
        return {"kind": self.kind, "identities": self.identities,
                "images_per_id": self.images_per_id, "size": self.size, "seed": self.seed,
                "quality": self.quality, "noise": self.noise,
                "distinct": self.distinct, "numpy": np.__version__}

    def mean_sample_bytes(self):
        picks = range(0, self.num_samples, max(1, self.num_samples // 8))
        return float(np.mean([len(self._encoded(i)) for i in picks]))

    def _encoded(self, index: int) -> bytes:
        identity, image = divmod(index, self.images_per_id)
        return encode_jpeg(synthetic_image(identity, image, self.size, self.seed, self.noise,
                                           self.distinct), self.quality)

    def iter_indices(self, indices):
        for i in indices.tolist():
            yield i, self._encoded(i), i // self.images_per_id


def make_synthetic(out: str, identities: int, images_per_id: int, *, size: int = 112,
                   seed: int = 0, quality: int = 90, noise: float = 6.0, distinct: float = 1.0,
                   workers: int = 1,
                   samples_per_shard: Optional[int] = None, shard_size="256MB",
                   progress=None) -> dict:
    """Write a synthetic identity dataset as shards + manifest.json under `out`; returns the
    manifest (see shards.convert). `noise` and `distinct`: see synthetic_image (more noise or
    less distinct identities make them harder to tell apart)."""
    source = SyntheticSource(identities, images_per_id, size, seed, quality, noise, distinct)
    return convert(source, out, shard_size=shard_size, samples_per_shard=samples_per_shard,
                   workers=workers, shuffle_seed=seed, progress=progress)


def synthetic_pairs(first_identity: int, identities: int, num_pairs: int, size: int = 112,
                    seed: int = 0, noise: float = 6.0, distinct: float = 1.0
                    ) -> Tuple[List[bytes], List[bool]]:
    """A verification pair set over identities [first_identity, first_identity + identities):
    (2 * num_pairs JPEG images, num_pairs is-same flags), same and different pairs alternating.

    Pick identities a training set does not contain (make_synthetic writes 0 .. identities-1)
    to test generalization to unseen identities. Image numbers start at 1000, so even for a
    training identity no pair image is one of make_synthetic's (it writes images 0, 1, ...).
    Write it as an insightface .bin with hybrid_fc.evaluation.write_bin(path, *pairs)."""
    if identities < 2:
        raise ValueError(f"identities must be >= 2 (different-identity pairs), got {identities}")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    rng = np.random.default_rng([seed, 5])
    ids = np.arange(first_identity, first_identity + identities)
    used = {}

    def next_image(identity):
        used[identity] = used.get(identity, 0) + 1
        return encode_jpeg(synthetic_image(int(identity), 1000 + used[identity], size, seed,
                                           noise, distinct))

    images, issame = [], []
    for i in range(num_pairs):
        if i % 2 == 0:
            a = b = rng.choice(ids)
        else:
            a, b = rng.choice(ids, 2, replace=False)
        images += [next_image(a), next_image(b)]
        issame.append(bool(a == b))
    return images, issame
