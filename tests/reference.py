"""Single-process dense float64 margin softmax: the independent reference for the head tests."""
import torch
import torch.nn.functional as F


def dense_margin_ce(embeddings, weight, labels, margin):
    """Full softmax over all C classes, margin on the target, mean over the batch (float64)."""
    emb = F.normalize(embeddings.double(), dim=1)
    w = F.normalize(weight.double(), dim=1)
    cos = emb @ w.t()                                              # (N, C)
    onehot = F.one_hot(labels, weight.shape[0]).bool()
    target = margin(cos.gather(1, labels[:, None]).squeeze(1))     # (N,)
    logits = torch.where(onehot, target[:, None], cos) * margin.scale
    return F.cross_entropy(logits, labels)
