"""Improved ResNet (IResNet) face backbones with insightface arcface_torch state-dict keys.

Layout (so `load_state_dict` accepts arcface_torch checkpoints): `conv1, bn1, prelu` stem;
`layer1..layer4` of blocks `bn1, conv1, bn2, prelu, conv2, bn3` (+ `downsample.0/.1`);
then `bn2, fc, features` (BatchNorm1d whose weight is frozen at 1).
Pure math: no torch.distributed, no device choice.
"""
from typing import Sequence

import torch
from torch import nn

__all__ = ["IResNet", "iresnet18", "iresnet34", "iresnet50", "iresnet100"]

_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 14, 3), 100: (3, 13, 30, 3)}
_WIDTHS = (64, 128, 256, 512)


class IBasicBlock(nn.Module):
    """BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus the (projected) identity."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.prelu = nn.PReLU(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, stride, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch, eps=1e-5)
        self.downsample = None
        if stride != 1 or in_ch != out_ch:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False),
                                            nn.BatchNorm2d(out_ch, eps=1e-5))

    def forward(self, x):
        y = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        return y + (x if self.downsample is None else self.downsample(x))


class IResNet(nn.Module):
    """IResNet producing (B, embedding_size) embeddings from (B, 3, H, W) images.

    Args:
      layers: blocks per stage, e.g. (3, 4, 14, 3) for iresnet50.
      embedding_size: output width (insightface's `num_features`).
      input_size: image side; 112 for faces. The flatten width is 512 x (input_size/16)^2.
      dropout: dropout before the fc layer (insightface uses 0).
      width: channels of the first stage; later stages double it (64 = insightface's).
    """

    def __init__(self, layers: Sequence[int], embedding_size: int = 512, input_size: int = 112,
                 dropout: float = 0.0, width: int = 64):
        super().__init__()
        if input_size % 16:
            raise ValueError(f"input_size must be a multiple of 16 (four stride-2 stages), "
                             f"got {input_size}")
        widths = [width * (2 ** i) for i in range(4)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=1e-5)
        self.prelu = nn.PReLU(widths[0])
        in_ch = widths[0]
        for i, (n, ch) in enumerate(zip(layers, widths)):
            blocks = [IBasicBlock(in_ch, ch, stride=2)] + [IBasicBlock(ch, ch) for _ in range(n - 1)]
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
            in_ch = ch
        self.bn2 = nn.BatchNorm2d(in_ch, eps=1e-5)
        self.dropout = nn.Dropout(p=dropout)
        side = input_size // 16
        self.fc = nn.Linear(in_ch * side * side, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=1e-5)
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.ones_(self.features.weight)
        self.features.weight.requires_grad_(False)  # insightface freezes the embedding BN scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(torch.flatten(self.bn2(x), 1))
        return self.features(self.fc(x))


def _make(depth):
    def build(embedding_size: int = 512, **kwargs) -> IResNet:
        return IResNet(_DEPTHS[depth], embedding_size, **kwargs)
    build.__name__ = f"iresnet{depth}"
    build.__doc__ = f"IResNet-{depth}: stages {_DEPTHS[depth]}; kwargs go to IResNet."
    return build


iresnet18, iresnet34, iresnet50, iresnet100 = (_make(d) for d in (18, 34, 50, 100))
