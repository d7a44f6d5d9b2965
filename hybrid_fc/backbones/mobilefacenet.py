"""MobileFaceNet with insightface arcface_torch state-dict keys (`get_mbf` / `get_mbf_large`).

Every conv unit is a `.layers` Sequential (conv, BN[, PReLU]) as in arcface_torch, so keys read
`layers.3.layers.0.layers.1.layers.0.weight`, `conv_sep.layers.0.weight`,
`features.layers.2.weight` (the embedding Linear) and `features.layers.3` (BatchNorm1d).
Pure math: no torch.distributed, no device choice.
"""
from typing import Sequence

import torch
from torch import nn

__all__ = ["MobileFaceNet", "mobilefacenet", "mobilefacenet_large"]


class _ConvUnit(nn.Module):
    """conv -> BN [-> PReLU]; `act=False` is insightface's LinearBlock."""

    def __init__(self, in_ch, out_ch, kernel=1, stride=1, padding=0, groups=1, act=True):
        super().__init__()
        mods = [nn.Conv2d(in_ch, out_ch, kernel, stride, padding, groups=groups, bias=False),
                nn.BatchNorm2d(out_ch)]
        if act:
            mods.append(nn.PReLU(out_ch))
        self.layers = nn.Sequential(*mods)

    def forward(self, x):
        return self.layers(x)


class _DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `mid`, depthwise 3x3, linear 1x1 project."""

    def __init__(self, in_ch, out_ch, mid, stride, residual=False):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(_ConvUnit(in_ch, mid),
                                    _ConvUnit(mid, mid, 3, stride, 1, groups=mid),
                                    _ConvUnit(mid, out_ch, act=False))

    def forward(self, x):
        y = self.layers(x)
        return x + y if self.residual else y


class _Residual(nn.Module):
    def __init__(self, ch, num_block, mid):
        super().__init__()
        self.layers = nn.Sequential(*[_DepthWise(ch, ch, mid, 1, residual=True)
                                      for _ in range(num_block)])

    def forward(self, x):
        return self.layers(x)


class _GDC(nn.Module):
    """Global depthwise conv over the final (side x side) map, then Linear + BatchNorm1d."""

    def __init__(self, embedding_size, side):
        super().__init__()
        self.layers = nn.Sequential(_ConvUnit(512, 512, side, 1, 0, groups=512, act=False),
                                    nn.Flatten(), nn.Linear(512, embedding_size, bias=False),
                                    nn.BatchNorm1d(embedding_size))

    def forward(self, x):
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: (B, 3, H, W) -> (B, embedding_size).

    Args:
      embedding_size: output width.
      blocks: residual blocks in the four stages; (1, 4, 6, 2) default, (2, 8, 12, 4) large.
      scale: channel multiplier (2 default, 4 large).
      input_size: image side, a multiple of 16 (112 for faces; the GDC kernel is input_size/16).
    """

    def __init__(self, embedding_size: int = 512, blocks: Sequence[int] = (1, 4, 6, 2),
                 scale: int = 2, input_size: int = 112):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16, got {input_size}")
        c1, c2 = 64 * scale, 128 * scale
        stem = [_ConvUnit(3, c1, 3, 2, 1)]
        if blocks[0] == 1:
            stem.append(_ConvUnit(c1, c1, 3, 1, 1, groups=64))
        else:
            stem.append(_Residual(c1, blocks[0], 128))
        self.layers = nn.ModuleList(stem + [
            _DepthWise(c1, c1, 128, 2), _Residual(c1, blocks[1], 128),
            _DepthWise(c1, c2, 256, 2), _Residual(c2, blocks[2], 256),
            _DepthWise(c2, c2, 512, 2), _Residual(c2, blocks[3], 256),
        ])
        self.conv_sep = _ConvUnit(c2, 512)
        self.features = _GDC(embedding_size, input_size // 16)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def mobilefacenet(embedding_size: int = 512, **kwargs) -> MobileFaceNet:
    """insightface `mbf`: blocks (1, 4, 6, 2), scale 2."""
    return MobileFaceNet(embedding_size, **kwargs)


def mobilefacenet_large(embedding_size: int = 512, **kwargs) -> MobileFaceNet:
    """insightface `mbf_large`: blocks (2, 8, 12, 4), scale 4."""
    kwargs.setdefault("blocks", (2, 8, 12, 4))
    kwargs.setdefault("scale", 4)
    return MobileFaceNet(embedding_size, **kwargs)
