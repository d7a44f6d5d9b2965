"""Communication only: every collective of the package (the head's, the run's, evaluation's).

Each takes an explicit process group and returns early when the group has one rank. The
differentiable ones are autograd pairs, forward and backward named in their docstring's first
line (`all_gather_rows`: gather forward, reduce-scatter backward; `scale_grad`). The rest move
plain tensors or decisions: batch metadata, BatchNorm statistics, agreement on an error.
Backends: gloo (CPU tests) and NCCL (GPUs). gloo has no reduce-scatter, so there the gather's
backward is an all-reduce followed by taking the local slice (same result, W times the
traffic); NCCL uses reduce_scatter_tensor.
"""
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "group_rank", "group_size", "gather_batch_meta", "all_gather_varlen", "all_gather_rows",
    "scale_grad", "all_reduce", "sync_buffers", "averaged_buffers", "comm_device",
    "all_ranks_true",
    "agree_on_error", "RankFailed",
]


def group_size(group) -> int:
    return dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1


def group_rank(group) -> int:
    return dist.get_rank(group) if dist.is_available() and dist.is_initialized() else 0


def comm_device(group) -> torch.device:
    """Where a tensor for a collective on `group` must live (NCCL: this rank's GPU; else CPU)."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_ranks_true(flag: bool, group=None) -> bool:
    """True on every rank iff `flag` is true on every rank of `group` (one tiny all-reduce):
    a decision taken per rank (e.g. from memory the rank measured) that all must share."""
    if group_size(group) == 1:
        return bool(flag)
    t = torch.tensor([1 if flag else 0], device=comm_device(group))
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=group)
    return bool(t.item())


class RankFailed(RuntimeError):
    """Raised on the ranks that did nothing wrong when another rank failed (agree_on_error);
    the message names that rank and its error. Launch scripts print it as one line: the
    failing rank's traceback is the one to read."""


def agree_on_error(error: Optional[BaseException], group=None) -> None:
    """Collective: every rank of `group` learns whether any rank holds an error, so none walks
    into the next collective alone and waits there for ever. No error anywhere: returns (cost:
    one tiny all-reduce). Otherwise a rank holding an error raises it, and every other rank
    raises RankFailed naming the lowest failing rank and its message. Alone (no process
    group, or a group of one) it raises the error, if any."""
    if group_size(group) == 1:
        if error is not None:
            raise error
        return
    if all_ranks_true(error is None, group):
        return
    text = None if error is None else f"{type(error).__name__}: {error}"
    texts = [None] * group_size(group)
    dist.all_gather_object(texts, text, group=group)
    if error is not None:
        raise error
    k = next(i for i, t in enumerate(texts) if t is not None)
    raise RankFailed(f"rank {k} failed: {texts[k]}")


def gather_batch_meta(meta: torch.Tensor, group) -> List[List[int]]:
    """All-gather a small int64 vector per rank and bring it to the host.

    Used once per step for the batch sizes (which may differ between ranks and steps) together
    with input-validation counters, so that every rank learns of bad input on any rank and all
    raise together instead of hanging in the next collective. Cost: one tiny all-gather and one
    host sync (on GPU it waits for the kernels that produced `meta`).
    """
    world = group_size(group)
    if world == 1:
        return [meta.tolist()]
    out = [torch.empty_like(meta) for _ in range(world)]
    dist.all_gather(out, meta.contiguous(), group=group)
    return [t.tolist() for t in torch.stack(out).cpu()]


@torch.no_grad()
def averaged_buffers(module: torch.nn.Module, group=None) -> Dict[str, torch.Tensor]:
    """The buffers of a data-parallel module as one model holds them: {name: a new tensor},
    the module untouched.

    BatchNorm running means and variances are their mean over the ranks of `group`: each rank's
    copy saw only its own batches, and DeepSpeed (unlike DDP's default) never broadcasts
    buffers, so the ranks' copies differ. Every other buffer (num_batches_tracked, constant
    tables) is rank 0's, bit for bit. Collective; cost: one all-reduce of all BatchNorm
    statistics (flattened, fp32) and one broadcast per other buffer dtype (iresnet100: ~0.1 M
    floats in all)."""
    world = group_size(group)
    stats, others = [], {}
    for prefix, m in module.named_modules():
        bn = (isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
              and m.running_mean is not None)
        for name, b in m.named_buffers(recurse=False):
            full = f"{prefix}.{name}" if prefix else name
            if bn and name in ("running_mean", "running_var") and b.is_floating_point():
                stats.append((full, b))
            else:
                others.setdefault((b.dtype, b.device), []).append((full, b))
    out = {}
    if stats:
        flat = torch.cat([b.reshape(-1).float() for _, b in stats])
        if world > 1:
            dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
            flat /= world
        for (name, b), v in zip(stats, flat.split([b.numel() for _, b in stats])):
            out[name] = v.view_as(b).to(b.dtype)
    src = dist.get_global_rank(group, 0) if group is not None and world > 1 else 0
    for bufs in others.values():
        flat = torch.cat([b.reshape(-1) for _, b in bufs])
        if world > 1:
            dist.broadcast(flat, src=src, group=group)
        for (name, b), v in zip(bufs, flat.split([b.numel() for _, b in bufs])):
            out[name] = v.view_as(b).clone()
    return out


@torch.no_grad()
def sync_buffers(module: torch.nn.Module, group=None) -> None:
    """Make a data-parallel module's buffers equal on every rank of `group`, in place: the
    values of `averaged_buffers` (e.g. before every rank evaluates one model). Collective."""
    if group_size(group) == 1:
        return
    values = averaged_buffers(module, group)
    for name, b in module.named_buffers():
        if name in values:
            b.copy_(values[name])


def _offsets(sizes: Sequence[int]) -> List[int]:
    offs, acc = [], 0
    for s in sizes:
        offs.append(acc)
        acc += s
    return offs


def all_gather_varlen(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Concatenate every rank's `x` (first dims `sizes[r]`) in rank order. No autograd."""
    world = len(sizes)
    if world == 1:
        return x
    longest = max(sizes)
    if x.shape[0] < longest:  # all_gather needs equal shapes: pad, then drop the padding
        pad = x.new_zeros((longest - x.shape[0],) + tuple(x.shape[1:]))
        x = torch.cat([x, pad])
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """forward: all-gather rows (variable counts per rank); backward: reduce-scatter (sum)."""

    @staticmethod
    def forward(ctx, x, sizes, group):
        ctx.sizes, ctx.group = sizes, group
        ctx.rank = group_rank(group)
        return all_gather_varlen(x, sizes, group)

    @staticmethod
    def backward(ctx, grad):
        sizes, group, rank = ctx.sizes, ctx.group, ctx.rank
        grad = grad.contiguous()
        start = _offsets(sizes)[rank]
        if dist.get_backend(group) == "nccl":
            longest = max(sizes)
            padded = grad.new_zeros((len(sizes) * longest,) + tuple(grad.shape[1:]))
            for r, (off, n) in enumerate(zip(_offsets(sizes), sizes)):
                padded[r * longest:r * longest + n] = grad[off:off + n]
            out = grad.new_empty((longest,) + tuple(grad.shape[1:]))
            dist.reduce_scatter_tensor(out, padded, group=group)
            return out[:sizes[rank]], None, None
        grad = grad.clone()
        dist.all_reduce(grad, group=group)
        return grad[start:start + sizes[rank]], None, None


def all_gather_rows(x: torch.Tensor, sizes: Sequence[int], group) -> torch.Tensor:
    """Differentiable gather: (sizes[rank], ...) -> (sum(sizes), ...).

    The backward sums the gradients that every rank computed for this rank's rows. When each
    rank's graph covers one shard of a loss that all ranks compute identically, that sum is the
    exact gradient of the loss with respect to the local rows.
    """
    if len(sizes) == 1:
        return x
    return _AllGatherRows.apply(x, list(sizes), group)


class _ScaleGrad(torch.autograd.Function):
    """forward: identity; backward: gradient times `factor`."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


def scale_grad(x: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return x
    return _ScaleGrad.apply(x, factor)


def all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    """In-place all-reduce of `t` over `group` (nothing to do on one rank); returns `t`.
    No autograd."""
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t
