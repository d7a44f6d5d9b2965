"""The one dense reference of the tests (a helper module: no tests here).

`dense_margin_ce` is the single-process full softmax over all C classes with the margin on the
target, written without hybrid_fc's collectives, sampling or blocks (float64 by default).
`ArcFaceFormula` is insightface's ArcFace written from its formula, independent of
hybrid_fc.head.margins. `dense_reference` trains the tiny backbone and the full class matrix
in one process on every rank's micro-batches concatenated: what a data-parallel run with a
sharded head must equal.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn

from tinynet import TinyNet, batch


class ArcFaceFormula:
    """cos(theta + m), and cos(theta) - m sin(m) where theta + m > pi (insightface's
    convention), with logit scale `scale`; written here from the formula."""

    def __init__(self, scale: float, m: float):
        self.scale, self.m = scale, m

    def __call__(self, cos):
        t = cos.clamp(-1, 1)
        theta = torch.acos(t.clamp(-1 + 1e-7, 1 - 1e-7))
        return torch.where(theta + self.m <= math.pi, torch.cos(theta + self.m),
                           t - self.m * math.sin(self.m))


def dense_margin_ce(embeddings, weight, labels, margin, dtype=torch.float64):
    """Full softmax over all C classes, `margin` (any callable on target cosines with a
    `.scale`) on the target, mean over the batch; computed in `dtype` (None: the inputs')."""
    if dtype is not None:
        embeddings, weight = embeddings.to(dtype), weight.to(dtype)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()   # (N, C)
    target = margin(cos.gather(1, labels[:, None]).squeeze(1))              # (N,)
    logits = cos.scatter(1, labels[:, None], target[:, None]) * margin.scale
    return F.cross_entropy(logits, labels)


def dense_reference(steps, world_size, micro, num_classes, centers, head_lr, s, m,
                    backbone_lr=0.05, gas=1, head_momentum=0.9, head_wd=5e-4,
                    backbone_clip=0.0, head_clip=0.0):
    """Single process: the same backbone and the full class matrix, on the concatenation of
    every rank's micro-batches, in fp32 like the runs it is compared with. `world_size` may be
    a list (one per step: a resumed run). Returns (losses per optimizer step, backbone state,
    centers)."""
    net = TinyNet()
    w = nn.Parameter(centers.clone())
    opt_b = torch.optim.SGD(net.parameters(), lr=backbone_lr, momentum=0.9, weight_decay=1e-3)
    opt_h = torch.optim.SGD([w], lr=head_lr, momentum=head_momentum, weight_decay=head_wd)
    losses = []
    margin = ArcFaceFormula(s, m)
    sizes = world_size if isinstance(world_size, (list, tuple)) else [world_size] * steps
    for step in range(steps):
        xs, ys = zip(*[batch(step * gas + k, r, micro, num_classes)
                       for k in range(gas) for r in range(sizes[step])])
        x, y = torch.cat(xs), torch.cat(ys)
        loss = dense_margin_ce(net(x), w, y, margin, dtype=None)
        opt_b.zero_grad()
        opt_h.zero_grad()
        loss.backward()
        if backbone_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), backbone_clip)
        if head_clip:
            torch.nn.utils.clip_grad_norm_([w], head_clip)
        opt_b.step()
        opt_h.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}, w.detach().clone()
