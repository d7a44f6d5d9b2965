"""Embedding backbones: insightface-compatible IResNet / MobileFaceNet, tiny ones, and timm.

`build_backbone(name, embedding_size, input_size=112, **kwargs)` is the one entry point the
launcher uses. Backbones are pure math (no torch.distributed) and map images to embeddings.
"""
from typing import Callable, Dict, Tuple

import torch
from torch import nn

from .iresnet import IResNet, iresnet18, iresnet34, iresnet50, iresnet100
from .mobilefacenet import MobileFaceNet, mobilefacenet, mobilefacenet_large

__all__ = ["build_backbone", "backbone_names", "backbone_size", "IResNet", "MobileFaceNet", "TinyMLP",
           "iresnet18", "iresnet34", "iresnet50", "iresnet100", "mobilefacenet",
           "mobilefacenet_large"]


class TinyMLP(nn.Module):
    """Flatten -> Linear -> PReLU -> Linear: a backbone small enough for equivalence tests."""

    def __init__(self, embedding_size: int, input_size: int = 8, hidden: int = 32,
                 in_channels: int = 3):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * input_size * input_size, hidden)
        self.act = nn.PReLU(hidden)
        self.fc2 = nn.Linear(hidden, embedding_size)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x.flatten(1))))


def _iresnet_tiny(embedding_size, **kwargs):
    """One block per stage, 16 channels: the IResNet topology at CPU-smoke-test cost."""
    kwargs.setdefault("width", 16)
    return IResNet((1, 1, 1, 1), embedding_size, **kwargs)


_BUILTIN: Dict[str, Callable[..., nn.Module]] = {
    "iresnet18": iresnet18, "iresnet34": iresnet34, "iresnet50": iresnet50,
    "iresnet100": iresnet100, "iresnet_tiny": _iresnet_tiny,
    "mobilefacenet": mobilefacenet, "mbf": mobilefacenet,
    "mobilefacenet_large": mobilefacenet_large, "mbf_large": mobilefacenet_large,
    "mlp": TinyMLP,
}


def backbone_names():
    """The built-in names (any timm model name works too when timm is installed)."""
    return sorted(_BUILTIN)


def build_backbone(name: str, embedding_size: int, input_size: int = 112, **kwargs) -> nn.Module:
    """A backbone mapping (B, 3, input_size, input_size) images to (B, embedding_size).

    Built-in names: see `backbone_names()`. Otherwise, with timm installed, `name` is a timm
    model created with `num_classes=embedding_size` (its classifier becomes the embedding layer).
    """
    if not isinstance(embedding_size, int) or embedding_size < 1:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    if name in _BUILTIN:
        return _BUILTIN[name](embedding_size, input_size=input_size, **kwargs)
    try:
        import timm
    except ImportError:
        raise ValueError(f"unknown backbone {name!r}: built-in names are {backbone_names()}; "
                         "other names need timm (pip install timm)") from None
    if not timm.is_model(name):
        raise ValueError(f"unknown backbone {name!r}: not built in ({backbone_names()}) and "
                         "not a timm model name")
    kwargs.setdefault("pretrained", False)
    model = timm.create_model(name, num_classes=embedding_size, **kwargs)
    return model


def backbone_size(name: str, embedding_size: int, input_size: int = 112, micro_batch: int = 1,
                  **kwargs) -> Tuple[int, int]:
    """(parameter count, activation elements of one training micro-batch), computed on torch's
    meta device: shapes only, nothing allocated, seconds even for iresnet100.

    The activation figure sums the output of every leaf module in a forward of
    (micro_batch, 3, input_size, input_size): each is kept once for backward (as the next
    layer's saved input), so it estimates the activation memory in elements (multiply by the
    compute dtype's bytes). In-place activations or recomputation would make the real figure
    smaller. The forward runs in eval mode: the shapes are those of training, and BatchNorm's
    training-mode check would refuse a micro batch of 1."""
    with torch.device("meta"):
        model = build_backbone(name, embedding_size, input_size=input_size, **kwargs)
    params = sum(p.numel() for p in model.parameters())
    total = [0]

    def count(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            total[0] += output.numel()
    hooks = [m.register_forward_hook(count) for m in model.modules() if not list(m.children())]
    try:
        model.eval()
        with torch.no_grad():
            model(torch.empty(micro_batch, 3, input_size, input_size, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    return params, total[0]
