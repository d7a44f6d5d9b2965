"""JPEG decoding (in loader workers) and flip/normalize augmentation (on the training device).

Decoders, fastest first (one core, 112x112 JPEG, measured by benchmarks/data_bench.py):
libjpeg-turbo through simplejpeg (~2.5x PIL), then PIL. A decoder returns uint8 (H, W, 3) RGB and
raises on corrupt data (simplejpeg strict mode turns libjpeg's "premature end of data" warning
into an error; PIL raises on truncated files), which the loader counts and skips.
nvJPEG (torchvision.io.decode_jpeg on CUDA) is not wired in: decoding in CPU workers keeps the
GPU free and is what the benchmark target is stated against.
"""
import io
from typing import Callable, Optional, Tuple

import numpy as np
import torch

__all__ = ["make_decoder", "available_decoders", "augment", "fit_size"]


def available_decoders():
    names = []
    try:
        import simplejpeg  # noqa: F401
        names.append("simplejpeg")
    except ImportError:
        pass
    return names + ["pil"]


def _decode_pil(data: bytes) -> np.ndarray:
    from PIL import Image
    with Image.open(io.BytesIO(data)) as im:
        if im.mode.startswith("I"):
            # 16-bit grayscale PNG ("I;16", "I" in older PIL): convert("RGB") clips every
            # value above 255 to white. Keep the top 8 bits, as PIL itself does for 16-bit RGB.
            gray = (np.clip(np.asarray(im, np.int64), 0, 65535) >> 8).astype(np.uint8)
            return np.repeat(gray[:, :, None], 3, axis=2)
        return np.asarray(im.convert("RGB"))


def _decode_simplejpeg(data: bytes) -> np.ndarray:
    import simplejpeg
    if data[:3] != b"\xff\xd8\xff":  # PNG and friends: PIL
        return _decode_pil(data)
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)


def make_decoder(name: str = "auto") -> Callable[[bytes], np.ndarray]:
    """'auto' (fastest installed), 'simplejpeg' or 'pil' -> bytes -> uint8 (H, W, 3)."""
    if name == "auto":
        name = available_decoders()[0]
    if name == "simplejpeg":
        if "simplejpeg" not in available_decoders():
            raise ImportError("decoder 'simplejpeg' is not installed: pip install simplejpeg")
        return _decode_simplejpeg
    if name == "pil":
        return _decode_pil
    raise ValueError(f"decoder must be auto, simplejpeg or pil, got {name!r}")


def fit_size(rgb: np.ndarray, size: Tuple[int, int]) -> np.ndarray:
    """Resize (bilinear, PIL) to (H, W) when needed: the slow path for off-size images."""
    if rgb.shape[:2] == tuple(size):
        return rgb
    from PIL import Image
    return np.asarray(Image.fromarray(rgb).resize((size[1], size[0]), Image.BILINEAR))


def augment(images: torch.Tensor, *, flip: bool = True, mean: float = 0.5, std: float = 0.5,
            dtype: torch.dtype = torch.float32,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """uint8 (B, 3, H, W) on any device -> `dtype` (B, 3, H, W), ((x / 255) - mean) / std, each
    image mirrored left-right with probability 1/2 when `flip`.

    Runs where `images` live (move the uint8 batch to the GPU first: 4x fewer bytes than float).
    Cost: one elementwise pass, plus one select pass with flip. Pass a `generator` on the images'
    device for reproducible flips. The input is not modified.
    """
    if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.to(dtype).mul_(1.0 / (255.0 * std)).sub_(mean / std)
    if flip:
        coin = torch.rand(images.shape[0], device=images.device, generator=generator) < 0.5
        x = torch.where(coin[:, None, None, None], x.flip(-1), x)
    return x
