"""Additive angular / cosine margins on the target cosine (pure math, no torch.distributed).

Each margin maps the cosine between an embedding and its own class center, cos(theta), to the
margin-adjusted target cosine; every logit (target and not) is then multiplied by `scale` (s).
Conventions are insightface's:
  ArcFace:  cos(theta + m); where theta + m > pi (the function stops decreasing) it is
            cos(theta) - m * sin(m), which keeps the target logit monotone in theta.
  CosFace:  cos(theta) - m.
  Combined: cos(m1 * theta + m2) - m3 (insightface's CombinedMarginLoss family).

Gradients: by default the gradient through the margin is exact (autograd through the closed
form). sin(theta) is computed as sqrt(max(1 - cos^2, eps)), so at cos = +-1 the gradient stays
finite instead of dividing by zero. `straight_through=True` reproduces insightface's
arcface_torch, which computes the margin under torch.no_grad(): the forward value has the margin
but the gradient is that of the plain cosine (d target / d cos = 1).
"""
import math

import torch

__all__ = ["ArcFace", "CosFace", "CombinedMarginLoss", "MarginBase", "MARGINS", "make_margin"]

MARGINS = ("arcface", "cosface", "combined")
"""The margin names a config may give (`make_margin`)."""

# Floor under 1 - cos^2 before the sqrt: keeps d sin(theta) / d cos finite at cos = +-1.
# The largest gradient it allows is ~ sin(m) / sqrt(_EPS) = ~500 * sin(m); only cosines within
# 5e-7 of +-1 are affected.
_EPS = 1e-6


def _sin_from_cos(cos: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(1.0 - cos * cos, min=_EPS))


class MarginBase:
    """Common interface: `scale` (s) and `__call__(target_cos) -> adjusted target cos`."""

    def __init__(self, scale: float, straight_through: bool = False):
        if not (isinstance(scale, (int, float)) and scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self.scale = float(scale)
        self.straight_through = bool(straight_through)

    def target(self, cos: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __call__(self, cos: torch.Tensor) -> torch.Tensor:
        if self.straight_through:
            with torch.no_grad():
                delta = self.target(cos) - cos
            return cos + delta
        return self.target(cos)

    def __repr__(self):
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ArcFace(MarginBase):
    """Additive angular margin: target cos(theta + margin), insightface's fallback past pi."""

    def __init__(self, scale: float = 64.0, margin: float = 0.5, straight_through: bool = False):
        super().__init__(scale, straight_through)
        if not 0.0 <= margin < math.pi / 2:
            raise ValueError(f"ArcFace margin must be in [0, pi/2), got {margin!r}")
        self.margin = float(margin)

    def target(self, cos):
        m = self.margin
        sin = _sin_from_cos(cos)
        shifted = cos * math.cos(m) - sin * math.sin(m)  # cos(theta + m)
        # theta + m > pi  <=>  cos(theta) < cos(pi - m)
        return torch.where(cos > math.cos(math.pi - m), shifted, cos - m * math.sin(m))


class CosFace(MarginBase):
    """Additive cosine margin: target cos(theta) - margin."""

    def __init__(self, scale: float = 64.0, margin: float = 0.4, straight_through: bool = False):
        super().__init__(scale, straight_through)
        if not 0.0 <= margin < 2.0:
            raise ValueError(f"CosFace margin must be in [0, 2), got {margin!r}")
        self.margin = float(margin)

    def target(self, cos):
        return cos - self.margin


class CombinedMarginLoss(MarginBase):
    """cos(m1 * theta + m2) - m3; (1, 0.5, 0) is ArcFace, (1, 0, 0.4) CosFace.

    With m1 == 1 the closed form uses the trig expansion (and ArcFace's fallback past pi).
    With m1 != 1 (SphereFace-style) theta = arccos(cos) is used, with cos clamped to
    [-1 + 1e-6, 1 - 1e-6] so that the gradient stays finite, and m1 * theta + m2 is capped at
    pi so that the target never increases with theta.
    """

    def __init__(self, scale: float = 64.0, m1: float = 1.0, m2: float = 0.5, m3: float = 0.0,
                 straight_through: bool = False):
        super().__init__(scale, straight_through)
        if not m1 >= 1.0:
            raise ValueError(f"CombinedMarginLoss m1 must be >= 1, got {m1!r}")
        if not 0.0 <= m2 < math.pi / 2:
            raise ValueError(f"CombinedMarginLoss m2 must be in [0, pi/2), got {m2!r}")
        if not 0.0 <= m3 < 2.0:
            raise ValueError(f"CombinedMarginLoss m3 must be in [0, 2), got {m3!r}")
        self.m1, self.m2, self.m3 = float(m1), float(m2), float(m3)
        self._arc = ArcFace(scale, m2) if m1 == 1.0 else None

    def target(self, cos):
        if self._arc is not None:
            return self._arc.target(cos) - self.m3
        theta = torch.acos(torch.clamp(cos, -1.0 + _EPS, 1.0 - _EPS))
        angle = torch.clamp(self.m1 * theta + self.m2, max=math.pi)
        return torch.cos(angle) - self.m3


def make_margin(name: str, scale: float, m: float = 0.5,
                combined=(1.0, 0.5, 0.0)) -> MarginBase:
    """The margin a config names: arcface / cosface (margin m) or combined ((m1, m2, m3))."""
    if name == "arcface":
        return ArcFace(scale, m)
    if name == "cosface":
        return CosFace(scale, m)
    if name == "combined":
        return CombinedMarginLoss(scale, *combined)
    raise ValueError(f"margin must be one of {', '.join(MARGINS)}, got {name!r}")
