"""All communication of the head lives here (DESIGN.md layering).

Each collective is an autograd pair with an explicit process group and an early return when the
group has one rank. Backends: gloo (CPU tests) and NCCL (GPUs). gloo has no reduce-scatter, so
there the gather's backward is an all-reduce followed by taking the local slice (same result,
W times the traffic); NCCL uses reduce_scatter_tensor.
"""
from typing import List, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "group_rank", "group_size", "gather_batch_meta", "all_gather_varlen", "all_gather_rows",
    "scale_grad", "sharded_margin_softmax_ce", "sync_buffers", "comm_device", "all_ranks_true",
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
    raises RankFailed naming the lowest failing rank and its message."""
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
def sync_buffers(module: torch.nn.Module, group=None) -> None:
    """Make a data-parallel module's buffers equal on every rank of `group`, in place.

    BatchNorm running means and variances become their mean over the ranks: each rank's copy
    saw only its own batches, and DeepSpeed (unlike DDP's default) never broadcasts buffers, so
    without this the ranks evaluate different models and a checkpoint keeps rank 0's alone.
    Every other buffer (num_batches_tracked, constant tables) becomes rank 0's copy, bit for bit.
    Collective; cost: one all-reduce of all BatchNorm statistics (flattened, fp32) and one
    broadcast per other buffer dtype (iresnet100: ~0.1 M floats in all).
    """
    world = group_size(group)
    if world == 1:
        return
    stats, others = [], {}
    for m in module.modules():
        bn = (isinstance(m, torch.nn.modules.batchnorm._NormBase) and m.track_running_stats
              and m.running_mean is not None)
        for name, b in m.named_buffers(recurse=False):
            if bn and name in ("running_mean", "running_var") and b.is_floating_point():
                stats.append(b)
            else:
                others.setdefault((b.dtype, b.device), []).append(b)
    if stats:
        flat = torch.cat([b.reshape(-1).float() for b in stats])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
        flat /= world
        for b, v in zip(stats, flat.split([b.numel() for b in stats])):
            b.copy_(v.view_as(b))
    src = dist.get_global_rank(group, 0) if group is not None else 0
    for bufs in others.values():
        flat = torch.cat([b.reshape(-1) for b in bufs])
        dist.broadcast(flat, src=src, group=group)
        for b, v in zip(bufs, flat.split([b.numel() for b in bufs])):
            b.copy_(v.view_as(b))


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


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if group_size(group) > 1:
        dist.all_reduce(t, op=op, group=group)
    return t


def _block_bounds(total: int, block: int):
    for a in range(0, total, block):
        yield a, min(total, a + block)


def _rows_and_inv_norm(weight: torch.Tensor, rows: torch.Tensor, out_inv=None):
    """Gather rows of the stored weight: (c, D) raw rows as fp32 and (c,) 1 / ||row||.

    bf16 storage is converted once here (the norm, the matmul operand and backward's projection
    all want fp32 rows; torch's fp32-accumulating norm of bf16 input is ~3x slower on CPU than
    converting first)."""
    w = weight.index_select(0, rows)
    if w.dtype != torch.float32:
        w = w.float()
    inv = torch.linalg.vector_norm(w, dim=1, out=out_inv)
    return w, inv.clamp_min_(1e-12).reciprocal_()


def _put_targets(block: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor,
                 values: torch.Tensor) -> torch.Tensor:
    """block[j, cols[j]] = values[j] where valid[j]; shape-static, no host sync."""
    cols = cols.clamp(0, block.shape[1] - 1).unsqueeze(1)
    keep = block.gather(1, cols).squeeze(1)
    block.scatter_(1, cols, torch.where(valid, values, keep).unsqueeze(1))
    return block


def _normalizes_rows(dtype) -> bool:
    """fp16 operands: rows normalized before the cast (see _operand; the kernels do the same)."""
    return dtype == torch.float16


def _operand(w_b, inv_b, dtype):
    """The matmul operand for a block of raw rows, and the logit column factor it needs.

    Raw rows go in as they are and 1/||w|| scales the (N, c) logit columns, one pass fewer over
    the (c, D) rows. fp16 is the exception: its narrow exponent range would lose the small
    elements of low-norm rows, so rows are normalized before the cast.
    """
    if _normalizes_rows(dtype):
        return (w_b * inv_b.unsqueeze(1)).to(dtype), None
    return w_b.to(dtype), inv_b


def _project_rows(w_b, rows, inv_b, col):
    """In place: B = dlog'^T @ emb (c, D) fp32 -> d loss / d w for the raw rows w_b (c, D).

    With u = w * k the matmul operand (k = 1 for raw rows, col = 1/||w||; k = 1/||w|| for
    fp16's normalized ones, col None) and dlog' = d loss / d cos * (1/||w||) / k, B is
    (d loss / d w_hat) / (||w|| k) and d w = k (B - w <w, B> / ||w||^2)."""
    coef = torch.linalg.vecdot(w_b, rows, dim=1).mul_(inv_b).mul_(inv_b)  # (c,)
    rows.addcmul_(w_b, coef.unsqueeze(1), value=-1.0)
    if col is None:
        rows.mul_(inv_b.unsqueeze(1))
    return rows


def _block_logits(emb, w_b, inv_b, scale, target, a, in_block, logit_t):
    """s * cos for one block of sampled rows, target entries replaced. (N, c) fp32."""
    op, col = _operand(w_b, inv_b, emb.dtype)
    logits = torch.matmul(emb, op.t()).float()
    logits.mul_(scale if col is None else (col * scale).unsqueeze(0))
    return _put_targets(logits, target - a, in_block, logit_t)


class _ShardedMarginSoftmaxCE(torch.autograd.Function):
    """forward: max and sum all-reduces (fp32 log-sum-exp); backward: no collectives.

    Scores the gathered, normalized embeddings E (N, D) against the sampled, normalized rows
    of this rank's shard, with the margin on each row's target logit, and returns the mean
    cross-entropy over the N rows of the global batch (the same value on every rank).
    Work is done in blocks of `block` sampled rows. With `keep_probs` (the fast path) each
    block's exponentials (N, c) are kept for backward and freed as backward consumes them
    (three matmuls per step); without it only (N,) and (S,) vectors are kept and each block's
    logits are recomputed in backward (four matmuls, activation memory O(block * (N + D))).

    `kernel` (hybrid_fc.kernels.triton_ce, or None for torch): computes this rank's row max and
    sum-exp and, in backward, d emb and the rows' B = dlog'^T @ emb tile by tile without the
    (N, S) logits (like keep_probs=False, with no block of logits in memory at all). Everything
    else - target logits and the margin, the all-reduces, the loss, the margin's gradient, the
    rows' projection - is the code below, shared by both backends.

    Storage dtype of the weight: fp32 keeps each block's fp32 exponentials and its gathered
    rows (activation memory O(S * (N + D)) x 4 bytes). bf16 storage (no fp32 master; the mode
    for hundreds of millions of classes) keeps the exponentials in bf16, each block relative to
    its own row max (fp32 (N,) per block), and gathers the rows again in backward: activation
    memory S * N * 2 bytes, gradient rows in bf16. The softmax statistics, the target
    probabilities and every matmul accumulation stay fp32.
    """

    @staticmethod
    def forward(ctx, emb, weight, index, target, margin, group, block, keep_probs, sparse_grad,
                kernel):
        # emb: (N, D) normalized, compute dtype; weight: (num_local, D) stored (fp32 or bf16);
        # index: (S,) sampled local rows, sorted; target: (N,) position in index or -1.
        n, s_rows = emb.shape[0], index.shape[0]
        scale = margin.scale
        owned = target >= 0
        low = weight.dtype != torch.float32
        keep_probs = keep_probs and kernel is None

        # Target cosines in fp32 from the stored rows (N x D, cheap), margin applied.
        w_t, inv_t = _rows_and_inv_norm(weight, index.index_select(0, target.clamp(min=0)))
        cos_t = (emb.float() * w_t).sum(1).mul_(inv_t).clamp_(-1.0, 1.0)  # (N,)
        del w_t
        logit_t = margin(cos_t) * scale                                    # (N,) fp32

        row_max = torch.full((n,), float("-inf"), device=emb.device)
        inv_norms = torch.empty(s_rows, device=emb.device)  # (S,) kept for backward
        blocks = []  # keep_probs: (N, c) fp32 logits then exponentials; bf16 storage: bf16 exps
        row_blocks = []  # keep_probs with fp32 storage: (c, D) gathered rows
        block_max = []  # keep_probs with bf16 storage: (N,) fp32 max of each block
        block_sum = []  # keep_probs with bf16 storage: (N,) fp32 sum of each block's exps
        run_sum = None if keep_probs else torch.zeros(n, device=emb.device)
        if kernel is not None:  # (N,) local max and sum of exp(l - max), (S,) 1/||w||
            row_max, run_sum, inv_norms = kernel.forward_stats(emb, weight, index, target,
                                                               logit_t, scale)
        for a, b in _block_bounds(s_rows, block) if kernel is None else ():
            w_b, inv_b = _rows_and_inv_norm(weight, index[a:b], out_inv=inv_norms[a:b])
            in_block = owned & (target >= a) & (target < b)
            logits = _block_logits(emb, w_b, inv_b, scale, target, a, in_block, logit_t)
            bmax = logits.amax(dim=1)
            if keep_probs and low:  # exps relative to the block's own max, stored in bf16
                e = logits.sub_(bmax.unsqueeze(1)).exp_()
                block_sum.append(e.sum(1))
                blocks.append(e.to(weight.dtype))
                block_max.append(bmax)
                del e
                torch.maximum(row_max, bmax, out=row_max)
            elif keep_probs:
                blocks.append(logits)
                row_blocks.append(w_b)
                torch.maximum(row_max, bmax, out=row_max)
            else:  # online log-sum-exp: rescale the running sum to the new max
                new_max = torch.maximum(row_max, bmax)
                run_sum.mul_(torch.exp(row_max - new_max)).add_(
                    logits.sub_(new_max.unsqueeze(1)).exp_().sum(1))
                row_max = new_max
            del logits, w_b

        local_max = row_max
        row_max = _all_reduce(row_max.clone(), dist.ReduceOp.MAX, group)  # (N,) global max
        if keep_probs and low:
            local_sum = torch.zeros(n, device=emb.device)
            for k, (bmax, bsum) in enumerate(zip(block_max, block_sum)):
                block_max[k] = torch.exp(bmax - row_max)    # now: block exps -> exp(l - max)
                local_sum.add_(bsum * block_max[k])
            block_sum = None
        elif keep_probs:
            local_sum = torch.zeros(n, device=emb.device)
            for logits in blocks:
                local_sum.add_(logits.sub_(row_max.unsqueeze(1)).exp_().sum(1))
        else:
            local_sum = run_sum.mul_(torch.exp(local_max - row_max))
        # One all-reduce for the sum of exponentials and the (single-owner) target logit.
        stats = torch.stack([local_sum, torch.where(owned, logit_t, torch.zeros_like(logit_t))], 1)
        stats = _all_reduce(stats, dist.ReduceOp.SUM, group)
        sum_exp, tgt = stats[:, 0], stats[:, 1]
        loss = (torch.log(sum_exp) + row_max - tgt).mean()

        ctx.margin, ctx.block, ctx.keep_probs, ctx.sparse_grad = margin, block, keep_probs, sparse_grad
        ctx.kernel = kernel
        ctx.blocks, ctx.row_blocks, ctx.block_factor = blocks, row_blocks, block_max
        ctx.save_for_backward(emb, weight, index, target, cos_t, logit_t, row_max, sum_exp,
                              inv_norms)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        emb, weight, index, target, cos_t, logit_t, row_max, sum_exp, inv_norms = ctx.saved_tensors
        if ctx.blocks is None:
            raise RuntimeError("PartialFC backward ran twice; retain_graph is not supported")
        margin, block = ctx.margin, ctx.block
        n, s_rows = emb.shape[0], index.shape[0]
        scale = margin.scale
        owned = target >= 0
        low = weight.dtype != torch.float32
        g = grad_loss.float() / n  # d(mean)/d(row loss), a 0-dim tensor: no host sync
        # d loss / d logit = (p - onehot) * g with p = exp(l - max) / sum_exp; then times s for
        # d / d cos, and at the target also times margin'(cos).
        row_f = (g * scale / sum_exp).unsqueeze(1)                      # (N, 1)
        p_t = torch.exp(logit_t - row_max) / sum_exp                    # (N,) target probability
        with torch.enable_grad():
            c = cos_t.detach().requires_grad_(True)
            dmargin, = torch.autograd.grad(margin(c).sum(), c)
        tgt_grad = (p_t - 1.0) * g * scale * dmargin                    # (N,) d loss / d cos_t
        # grad_rows: (S, D) gradient of the sampled rows, in the storage dtype (bf16: half the
        # bytes).
        if ctx.kernel is not None:
            # d emb (N, D) and B (S, D), both fp32, tile by tile; then the shared projection.
            grad_emb, grad_rows = ctx.kernel.backward(emb, weight, index, target, logit_t,
                                                      inv_norms, row_max, row_f.squeeze(1),
                                                      tgt_grad, scale)
            grad_b = grad_rows  # fp32 storage: projected in place
            if low:
                grad_rows = torch.empty(grad_b.shape, dtype=weight.dtype, device=emb.device)
            for a, b in _block_bounds(s_rows, block):
                w_b = weight.index_select(0, index[a:b]).float()
                inv_b = inv_norms[a:b]
                rows = _project_rows(w_b, grad_b[a:b], inv_b,
                                     None if _normalizes_rows(emb.dtype) else inv_b)
                if low:
                    grad_rows[a:b].copy_(rows)  # fp32 -> bf16, round to nearest
                del w_b, rows
            del grad_b
        else:
            grad_emb = torch.zeros(emb.shape, dtype=torch.float32, device=emb.device)
            grad_rows = torch.empty((s_rows, weight.shape[1]), dtype=weight.dtype,
                                    device=emb.device)
        for k, (a, b) in enumerate(_block_bounds(s_rows, block) if ctx.kernel is None else ()):
            inv_b = inv_norms[a:b]
            in_block = owned & (target >= a) & (target < b)
            if ctx.keep_probs and low:  # bf16 exps of forward, rows gathered again
                e, ctx.blocks[k] = ctx.blocks[k], None
                factor, ctx.block_factor[k] = ctx.block_factor[k], None
                dlog = e.float().mul_((factor.unsqueeze(1) * row_f))
                del e
                w_b = weight.index_select(0, index[a:b]).float()
            elif ctx.keep_probs:  # exp(l - max) and rows from forward, released as we go
                dlog, ctx.blocks[k] = ctx.blocks[k], None
                w_b, ctx.row_blocks[k] = ctx.row_blocks[k], None
                dlog.mul_(row_f)
            else:
                w_b = weight.index_select(0, index[a:b]).float()
                dlog = _block_logits(emb, w_b, inv_b, scale, target, a, in_block, logit_t)
                dlog.sub_(row_max.unsqueeze(1)).exp_().mul_(row_f)
            _put_targets(dlog, target - a, in_block, tgt_grad)
            # dlog is d loss / d cos (N, c). With u = w * k the matmul operand (k = 1 for raw
            # rows, k = 1/||w|| for fp16's normalized ones) and dlog' = dlog * (1/||w||) / k:
            #   d emb += dlog' @ u                                    (N, D)
            #   B = dlog'^T @ emb = (d loss / d w_hat) / (||w|| k)    (c, D)
            #   d w = k (B - w <w, B> / ||w||^2)                        (_project_rows)
            op, col = _operand(w_b, inv_b, emb.dtype)
            if col is not None:
                dlog.mul_(col.unsqueeze(0))
            dlog = dlog.to(emb.dtype)
            grad_emb.add_(torch.matmul(dlog, op))
            del op
            rows = grad_rows[a:b] if not low else torch.empty(
                (b - a, weight.shape[1]), dtype=torch.float32, device=emb.device)
            if emb.dtype == torch.float32:
                torch.matmul(dlog.t(), emb, out=rows)  # straight into the gradient buffer
            else:
                rows.copy_(torch.matmul(dlog.t(), emb))
            del dlog
            _project_rows(w_b, rows, inv_b, col)
            if low:
                grad_rows[a:b].copy_(rows)  # fp32 -> bf16, round to nearest
            del w_b, rows
        ctx.blocks = ctx.row_blocks = ctx.block_factor = None

        if ctx.sparse_grad:
            grad_weight = torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape,
                                                  is_coalesced=True, check_invariants=False)
        else:
            grad_weight = torch.zeros_like(weight)
            grad_weight.index_copy_(0, index, grad_rows)
        return (grad_emb.to(emb.dtype), grad_weight, None, None, None, None, None, None, None,
                None)


def sharded_margin_softmax_ce(emb, weight, index, target, margin, group, *, block: int,
                              keep_probs: bool, sparse_grad: bool, kernel=None) -> torch.Tensor:
    """Mean margin-softmax cross-entropy over the global batch; see _ShardedMarginSoftmaxCE.
    kernel: None (torch) or hybrid_fc.kernels.triton_ce (the fused per-rank kernels)."""
    return _ShardedMarginSoftmaxCE.apply(emb, weight, index, target, margin, group, block,
                                         keep_probs, sparse_grad, kernel)
