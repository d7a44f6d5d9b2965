"""Face alignment from 5 landmarks: insightface's 112x112 crop, by a similarity transform.

insightface aligns every face of its training sets and benchmarks the same way: the 5 detected
landmarks (left eye, right eye, nose tip, left and right mouth corner, as seen in the image) are
mapped onto fixed reference points (`ARCFACE_DST`, in a 112x112 crop) by the least-squares
similarity transform (rotation, uniform scale, translation: Umeyama's estimate, skimage's
`SimilarityTransform.estimate`), and the image is warped with it (`cv2.warpAffine`, bilinear,
border 0). A crop aligned any other way (another reference, x and y swapped, a half-pixel
shift) still looks like a face and silently costs accuracy, so every convention here is the one
insightface's crops were made with:

  * Pixel coordinates: the center of pixel (column x, row y) is the point (x, y); landmarks are
    (x, y) pairs in this frame (the IJB `*_name_5pts_score.txt` files are).
  * The warp is OpenCV's: output pixel (x, y) takes the bilinear interpolation of the source at
    M^-1 (x, y); source pixels outside the image count as 0 (BORDER_CONSTANT, borderValue=0),
    also when only some of the 4 neighbours are outside. OpenCV computes in fixed point (source
    positions rounded to 1/32 pixel); this float64 version differs from it by at most one grey
    level on the images tests/test_ijb.py compares.
  * Another input size S: the crop is the 112x112 crop resized to S x S (what training does to
    112x112 data, `hybrid_fc.data.decode.fit_size`), so the reference points move with the
    pixel grid: (p + 0.5) * S / 112 - 0.5.

numpy and torch; no OpenCV or scikit-image at run time.
"""
import numpy as np
import torch

__all__ = ["ARCFACE_DST", "reference_points", "similarity_transform", "warp_affine",
           "align_face"]

ARCFACE_DST = np.array([[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
                        [41.5493, 92.3655], [70.7299, 92.2041]], dtype=np.float64)
"""insightface's reference landmarks (x, y) in a 112x112 crop: eyes, nose tip, mouth corners."""


def reference_points(size: int) -> np.ndarray:
    """ARCFACE_DST for a size x size crop: (5, 2) float64 (the 112 points at size 112)."""
    if size == 112:
        return ARCFACE_DST.copy()
    return (ARCFACE_DST + 0.5) * (size / 112.0) - 0.5


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """The least-squares similarity mapping points `src` (n, 2) onto `dst` (n, 2), as a (2, 3)
    float64 matrix M with dst ~ M @ [x, y, 1]: Umeyama's estimate without reflection, in its 2-D
    closed form. With centered points p (src) and q (dst), M's linear part is [[a, -b], [b, a]]
    with a = sum(p . q) / sum|p|^2 and b = sum(p x q) / sum|p|^2 (scale sqrt(a^2 + b^2)).
    Raises ValueError when `src` is degenerate (all points equal) or not finite."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2:
        raise ValueError(f"src {src.shape} and dst {dst.shape} must both be (n, 2)")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("landmarks must be finite")
    p, q = src - src.mean(0), dst - dst.mean(0)
    var = float((p ** 2).sum())
    if var <= 1e-12:
        raise ValueError("the landmarks are all the same point: no transform maps them")
    a = float((p * q).sum()) / var
    b = float((p[:, 0] * q[:, 1] - p[:, 1] * q[:, 0]).sum()) / var
    linear = np.array([[a, -b], [b, a]])
    return np.hstack([linear, (dst.mean(0) - linear @ src.mean(0))[:, None]])


def warp_affine(image: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, C) -> uint8 (size, size, C): output pixel (x, y) is the bilinear sample of
    `image` at matrix^-1 @ (x, y, 1), outside pixels 0, rounded half up: the convention of
    cv2.warpAffine(image, matrix, (size, size), borderValue=0).

    Computed by torch's grid_sample in float64 (align_corners=False, so source pixel x sits at
    the normalized coordinate (2x + 1) / W - 1; padding "zeros" is OpenCV's constant border).
    Cost: ~1 ms at 112 x 112 x 3 on one core (one float64 copy of the source image)."""
    if image.ndim != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be uint8 (H, W, C), got {image.dtype} {image.shape}")
    h, w = image.shape[:2]
    inv = np.linalg.inv(np.vstack([np.asarray(matrix, np.float64), [0.0, 0.0, 1.0]]))[:2]
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float64)
    sx = inv[0, 0] * xs + inv[0, 1] * ys + inv[0, 2]                # (size, size) source x
    sy = inv[1, 0] * xs + inv[1, 1] * ys + inv[1, 2]
    grid = torch.from_numpy(np.stack([(2 * sx + 1) / w - 1, (2 * sy + 1) / h - 1], -1))[None]
    src = torch.from_numpy(image).permute(2, 0, 1)[None].double()   # (1, C, H, W)
    out = torch.nn.functional.grid_sample(src, grid, mode="bilinear", padding_mode="zeros",
                                          align_corners=False)[0]     # (C, size, size)
    return out.add_(0.5).floor_().clamp_(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()


def align_face(image: np.ndarray, landmarks: np.ndarray, size: int = 112) -> np.ndarray:
    """The insightface crop of a face: uint8 (H, W, C) image and its 5 landmarks (5, 2) (x, y)
    -> uint8 (size, size, C). Raises ValueError for degenerate or non-finite landmarks."""
    matrix = similarity_transform(np.asarray(landmarks).reshape(5, 2), reference_points(size))
    return warp_affine(image, matrix, size)
