"""The sharded margin-softmax cross-entropy of the Partial FC head, in named steps.

Each rank scores the gathered, normalized embeddings E (N, D) against the S sampled rows of its
own shard of class centers, with the margin on each row's target logit, and every rank returns
the mean cross-entropy over the N rows of the global batch. Forward (fp32 log-sum-exp; two
all-reduces, a max and a sum):

  1. `target_logits`       each row's target cosine from the stored centers, margin applied
  2. mode.forward          per-block statistics: this rank's row max over its sampled rows
  3. `global_log_sum_exp`  max all-reduce; mode.local_sum gives sum exp(l - max) here; one sum
                           all-reduce of (sum-exp, target logit); loss = log(sum) + max - target
Backward (no collectives, no host sync):
  4. `logit_gradients`     d loss / d logit factors: p / sum-exp per row, the margin's slope at
                           the target
  5. mode.backward         block gradients: d E and the rows' B = dlog'^T @ E, block by block
                           (`block_gradients`), then `project_rows` (the normalization's Jacobian)
  6. `weight_gradient`     the (S, D) rows' gradient as a sparse COO or dense (num_local, D) one

A *mode* is how one rank computes and stores its blocks of logits (the compute path and what it
keeps for backward): `KeptExps` (fp32 centers, chunk_size None: each block's fp32 exponentials
and gathered rows kept for backward), `KeptLowExps` (bf16 or int8 centers: bf16 exponentials
kept, each block relative to its own max; rows gathered again in backward), `Recomputed`
(chunk_size set: online log-sum-exp forward, every block recomputed in backward) and
`TritonTiles` (the fused kernels of hybrid_fc.head.kernels.triton_ce). Each has `forward`,
`local_sum` and `backward`; a new compute mode is a new object. How the centers are *stored* is
one more small object that every mode reads rows through: `StoredCenters` (fp32 / bf16: rows
as they are, the weight's gradient handed to autograd) or `CenterCodes` (int8 codes + one fp32
scale per center, decoded a block of rows at a time; its gradient goes to `weight.grad`
directly, see there). `_ShardedMarginSoftmaxCE` is the thin autograd Function that calls the
steps.

The margin, the all-reduces, the loss, the margin's gradient and the rows' projection are the
code of this module for every mode: the kernels only replace the per-block arithmetic.
"""
from dataclasses import dataclass
from typing import Iterator, Tuple

import torch
import torch.distributed as dist

from ..collectives import all_reduce
from .precision import weight_code

__all__ = ["sharded_margin_softmax_ce", "target_logits", "global_log_sum_exp",
           "logit_gradients", "block_gradients", "project_rows", "weight_gradient",
           "select_mode", "stored_centers", "StoredCenters", "CenterCodes", "KeptExps",
           "KeptLowExps", "Recomputed", "TritonTiles"]


# -- how the centers are stored -----------------------------------------------------------------
class StoredCenters:
    """fp32 or bf16 centers (num_local, D): rows read as fp32; the rows' gradient is in the
    storage dtype and autograd delivers it to `weight.grad`."""

    def __init__(self, weight: torch.Tensor, scale=None):
        self.weight, self.scale = weight, scale
        self.code = weight_code(weight.dtype)
        self.parts = dict(zip(self.code.parts, (weight, scale)))

    @property
    def width(self) -> int:
        return self.weight.shape[1]

    @property
    def grad_dtype(self) -> torch.dtype:
        """dtype of the rows' gradient and (below fp32) of the kept exponentials."""
        return self.weight.dtype

    @property
    def low(self) -> bool:
        """Stored below fp32: exponentials kept and row gradients in `grad_dtype`."""
        return self.grad_dtype != torch.float32

    def take(self, rows: torch.Tensor) -> torch.Tensor:
        """(c, D) fp32 rows `rows` of the centers, decoded; a fresh tensor."""
        return self.code.decode({s: t.index_select(0, rows) for s, t in self.parts.items()})

    def deliver(self, grad: torch.Tensor):
        """What autograd gets as the weight's gradient."""
        return grad


class CenterCodes(StoredCenters):
    """int8 centers: linear codes (num_local, D) and one fp32 scale per center, decoded block by
    block (never (num_local, D) at once); the rows' gradient is bf16, as for bf16 centers.

    torch lets only floating tensors require grad, so the int8 weight cannot receive a gradient
    from autograd. The sampled rows' gradient (a sparse bf16 COO) is added to `weight.grad`
    here instead (its `grad_dtype` set to bf16), summing over micro-steps as autograd does: the
    optimizers, HybridEngine's head clipping (global norm over ranks), its fp16 overflow skip
    and gradient accumulation read `weight.grad` exactly as for bf16 centers. The row scales
    (a float Parameter that requires grad) stand for the centers in autograd: the loss has a
    backward whenever the head is trainable, also with frozen embeddings, and
    `head.requires_grad_(False)` freezes the int8 centers as any head's; the scales' own
    `.grad` stays None (they are re-derived from each updated row, not trained). A backward
    that reaches a trainable head adds to `weight.grad` whatever it was asked for
    (torch.autograd.grad included)."""

    @property
    def grad_dtype(self) -> torch.dtype:
        return torch.bfloat16

    def deliver(self, grad: torch.Tensor):
        w = self.weight
        w.grad_dtype = grad.dtype  # a deepcopy or a fresh Parameter forgets it
        w.grad = grad if w.grad is None else w.grad + grad
        return None


def stored_centers(weight: torch.Tensor, scale=None) -> StoredCenters:
    """The storage object of the centers `weight` (int8: with its (num_local,) `scale`)."""
    return CenterCodes(weight, scale) if weight.dtype == torch.int8 else StoredCenters(weight)


@dataclass
class Scores:
    """What every step reads: the gathered embeddings against this rank's sampled rows."""

    emb: torch.Tensor     # (N, D) normalized, compute dtype (fp32 / bf16 / fp16)
    centers: StoredCenters  # (num_local, D) stored centers (fp32, bf16 or int8 + scales)
    index: torch.Tensor   # (S,) sampled local rows, sorted
    target: torch.Tensor  # (N,) position of each label's row in `index`, or -1 (another rank's)
    scale: float          # the logit scale s
    block: int            # sampled rows per block

    @property
    def owned(self) -> torch.Tensor:
        return self.target >= 0

    @property
    def low(self) -> bool:
        """Centers stored below fp32: kept exponentials and row gradients in bf16."""
        return self.centers.low

    def blocks(self) -> Iterator[Tuple[int, int, int]]:
        """(k, a, b): block k covers sampled rows [a, b)."""
        total = self.index.shape[0]
        for k, a in enumerate(range(0, total, self.block)):
            yield k, a, min(total, a + self.block)

    def in_block(self, a: int, b: int) -> torch.Tensor:
        """(N,) rows whose target lies in block [a, b)."""
        return self.owned & (self.target >= a) & (self.target < b)

    def rows(self, a: int, b: int) -> torch.Tensor:
        """Sampled rows [a, b) of the stored centers as fp32 (c, D)."""
        return self.centers.take(self.index[a:b])


# -- small shape-static pieces ------------------------------------------------------------------
def rows_and_inv_norm(centers: StoredCenters, rows: torch.Tensor, out_inv=None):
    """Gather rows of the stored centers: (c, D) raw rows as fp32 and (c,) 1 / ||row||.

    bf16 / int8 storage is decoded once here (the norm, the matmul operand and backward's
    projection all want fp32 rows; torch's fp32-accumulating norm of bf16 input is ~3x slower
    on CPU than converting first)."""
    w = centers.take(rows)
    inv = torch.linalg.vector_norm(w, dim=1, out=out_inv)
    return w, inv.clamp_min_(1e-12).reciprocal_()


def put_targets(block: torch.Tensor, cols: torch.Tensor, valid: torch.Tensor,
                values: torch.Tensor) -> torch.Tensor:
    """block[j, cols[j]] = values[j] where valid[j]; shape-static, no host sync."""
    cols = cols.clamp(0, block.shape[1] - 1).unsqueeze(1)
    keep = block.gather(1, cols).squeeze(1)
    block.scatter_(1, cols, torch.where(valid, values, keep).unsqueeze(1))
    return block


def normalizes_rows(dtype) -> bool:
    """fp16 operands: rows normalized before the cast (see `operand`; the kernels do the same)."""
    return dtype == torch.float16


def operand(w_b, inv_b, dtype):
    """The matmul operand for a block of raw rows, and the logit column factor it needs.

    Raw rows go in as they are and 1/||w|| scales the (N, c) logit columns, one pass fewer over
    the (c, D) rows. fp16 is the exception: its narrow exponent range would lose the small
    elements of low-norm rows, so rows are normalized before the cast.
    """
    if normalizes_rows(dtype):
        return (w_b * inv_b.unsqueeze(1)).to(dtype), None
    return w_b.to(dtype), inv_b


def block_logits(sc: Scores, w_b, inv_b, a: int, b: int, logit_t) -> torch.Tensor:
    """s * cos for one block of sampled rows, target entries replaced by the margin's. (N, c)
    fp32."""
    op, col = operand(w_b, inv_b, sc.emb.dtype)
    logits = torch.matmul(sc.emb, op.t()).float()
    logits.mul_(sc.scale if col is None else (col * sc.scale).unsqueeze(0))
    return put_targets(logits, sc.target - a, sc.in_block(a, b), logit_t)


# -- 1. target logits --------------------------------------------------------------------------
def target_logits(sc: Scores, margin) -> Tuple[torch.Tensor, torch.Tensor]:
    """(cos_t, s * margin(cos_t)), both (N,) fp32, from the stored rows (N x D, cheap). Rows
    whose label lives on another rank get an arbitrary value (masked by `owned` later)."""
    w_t, inv_t = rows_and_inv_norm(sc.centers, sc.index.index_select(0, sc.target.clamp(min=0)))
    cos_t = (sc.emb.float() * w_t).sum(1).mul_(inv_t).clamp_(-1.0, 1.0)
    return cos_t, margin(cos_t) * sc.scale


# -- 3. the global log-sum-exp ---------------------------------------------------------------------
def global_log_sum_exp(mode, local_max, logit_t, owned, group):
    """(row max, sum of exp(l - max), target logit), each (N,) fp32 and equal on every rank:
    one max and one sum all-reduce (the target logit rides with the sum: one rank owns it)."""
    row_max = all_reduce(local_max.clone(), dist.ReduceOp.MAX, group)
    local_sum = mode.local_sum(row_max)
    stats = torch.stack([local_sum, torch.where(owned, logit_t, torch.zeros_like(logit_t))], 1)
    stats = all_reduce(stats, dist.ReduceOp.SUM, group)
    return row_max, stats[:, 0], stats[:, 1]


# -- 4. gradients of the logits ------------------------------------------------------------------
def logit_gradients(grad_loss, n: int, scale: float, sum_exp, logit_t, row_max, cos_t, margin):
    """(row_f (N, 1), tgt_grad (N,)): d loss / d cos = exp(l - max) * row_f off the target, and
    tgt_grad at it. d loss / d logit = (p - onehot) * g with p = exp(l - max) / sum_exp and g =
    d(mean) / d(row loss); times s for d / d cos, at the target also times margin'(cos_t)."""
    g = grad_loss.float() / n  # a 0-dim tensor: no host sync
    row_f = (g * scale / sum_exp).unsqueeze(1)
    p_t = torch.exp(logit_t - row_max) / sum_exp                    # (N,) target probability
    with torch.enable_grad():
        c = cos_t.detach().requires_grad_(True)
        dmargin, = torch.autograd.grad(margin(c).sum(), c)
    return row_f, (p_t - 1.0) * g * scale * dmargin


# -- 5. block gradients and the rows' projection ------------------------------------------------
def project_rows(w_b, rows, inv_b, col):
    """In place: B = dlog'^T @ emb (c, D) fp32 -> d loss / d w for the raw rows w_b (c, D).

    With u = w * k the matmul operand (k = 1 for raw rows, col = 1/||w||; k = 1/||w|| for
    fp16's normalized ones, col None) and dlog' = d loss / d cos * (1/||w||) / k, B is
    (d loss / d w_hat) / (||w|| k) and d w = k (B - w <w, B> / ||w||^2)."""
    coef = torch.linalg.vecdot(w_b, rows, dim=1).mul_(inv_b).mul_(inv_b)  # (c,)
    rows.addcmul_(w_b, coef.unsqueeze(1), value=-1.0)
    if col is None:
        rows.mul_(inv_b.unsqueeze(1))
    return rows


def block_gradients(sc: Scores, dlog, w_b, inv_b, a: int, b: int, grad_emb, grad_rows) -> None:
    """One block's share of the gradients, from dlog = d loss / d cos (N, c) fp32 (consumed)
    with the target entries still to be set by the caller's tgt_grad:
        d emb += dlog' @ u                                    (N, D)
        B = dlog'^T @ emb, projected (project_rows)           (c, D) -> grad_rows[a:b]
    (u the matmul operand, dlog' = dlog * (1/||w||) / k; see project_rows)."""
    op, col = operand(w_b, inv_b, sc.emb.dtype)
    if col is not None:
        dlog.mul_(col.unsqueeze(0))
    dlog = dlog.to(sc.emb.dtype)
    grad_emb.add_(torch.matmul(dlog, op))
    del op
    rows = grad_rows[a:b] if not sc.low else torch.empty(
        (b - a, sc.centers.width), dtype=torch.float32, device=sc.emb.device)
    if sc.emb.dtype == torch.float32:
        torch.matmul(dlog.t(), sc.emb, out=rows)  # straight into the gradient buffer
    else:
        rows.copy_(torch.matmul(dlog.t(), sc.emb))
    del dlog
    project_rows(w_b, rows, inv_b, col)
    if sc.low:
        grad_rows[a:b].copy_(rows)  # fp32 -> bf16, round to nearest


# -- 6. the weight's gradient ------------------------------------------------------------------
def weight_gradient(grad_rows, index, weight, sparse: bool) -> torch.Tensor:
    """(S, D) rows' gradient -> a sparse COO over the sampled rows, or dense (num_local, D), in
    the rows' dtype."""
    if sparse:
        return torch.sparse_coo_tensor(index.unsqueeze(0), grad_rows, weight.shape,
                                       is_coalesced=True, check_invariants=False)
    grad = torch.zeros(weight.shape, dtype=grad_rows.dtype, device=grad_rows.device)
    grad.index_copy_(0, index, grad_rows)
    return grad


# -- the modes -----------------------------------------------------------------------------------
class _BlockMode:
    """A torch mode: forward over blocks of sampled rows; backward asks `block_dlog` for each
    block's d loss / d cos (N, c) and its fp32 rows, and the shared steps do the rest."""

    def backward(self, sc: Scores, inv_norms, row_max, row_f, logit_t, tgt_grad):
        """(d emb (N, D) fp32, the rows' gradient (S, D) in the storage dtype)."""
        grad_emb = torch.zeros(sc.emb.shape, dtype=torch.float32, device=sc.emb.device)
        grad_rows = torch.empty((sc.index.shape[0], sc.centers.width),
                                dtype=sc.centers.grad_dtype, device=sc.emb.device)
        for k, a, b in sc.blocks():
            inv_b = inv_norms[a:b]
            dlog, w_b = self.block_dlog(sc, k, a, b, inv_b, row_max, row_f, logit_t)
            put_targets(dlog, sc.target - a, sc.in_block(a, b), tgt_grad)
            block_gradients(sc, dlog, w_b, inv_b, a, b, grad_emb, grad_rows)
            del dlog, w_b
        return grad_emb, grad_rows


class KeptExps(_BlockMode):
    """fp32 centers, chunk_size None (the fast path: three matmuls a step). Each block's fp32
    exponentials (N, c) and gathered rows (c, D) are kept for backward and freed as backward
    consumes them: activation memory S * (N + D) * 4 bytes."""

    def forward(self, sc: Scores, logit_t):
        n = sc.emb.shape[0]
        local_max = torch.full((n,), float("-inf"), device=sc.emb.device)
        inv_norms = torch.empty(sc.index.shape[0], device=sc.emb.device)
        self.blocks, self.rows = [], []
        for _, a, b in sc.blocks():
            w_b, inv_b = rows_and_inv_norm(sc.centers, sc.index[a:b], out_inv=inv_norms[a:b])
            logits = block_logits(sc, w_b, inv_b, a, b, logit_t)
            torch.maximum(local_max, logits.amax(dim=1), out=local_max)
            self.blocks.append(logits)
            self.rows.append(w_b)
        return local_max, inv_norms

    def local_sum(self, row_max):
        out = torch.zeros_like(row_max)
        for logits in self.blocks:  # the kept logits become exp(l - max), in place
            out.add_(logits.sub_(row_max.unsqueeze(1)).exp_().sum(1))
        return out

    def block_dlog(self, sc, k, a, b, inv_b, row_max, row_f, logit_t):
        dlog, self.blocks[k] = self.blocks[k], None
        w_b, self.rows[k] = self.rows[k], None
        return dlog.mul_(row_f), w_b


class KeptLowExps(_BlockMode):
    """bf16 or int8 centers (no fp32 master; the mode for hundreds of millions of classes),
    chunk_size None. Each block's exponentials are kept in bf16, relative to the block's own
    row max (fp32 (N,) per block); rows are gathered (and decoded) again in backward.
    Activation memory S * N * 2 bytes; softmax statistics, target probabilities and matmul
    accumulations stay fp32."""

    def forward(self, sc: Scores, logit_t):
        n = sc.emb.shape[0]
        local_max = torch.full((n,), float("-inf"), device=sc.emb.device)
        inv_norms = torch.empty(sc.index.shape[0], device=sc.emb.device)
        blocks = -(-sc.index.shape[0] // sc.block)
        # One buffer for every block's exponentials, freed whole after backward: hundreds of
        # per-block tensors of a few MB were kept in glibc's heap after backward and left it
        # fragmented (RSS 0.13 byte per center element above the sum, and growing, after 3
        # steps at 8.4M x 256 on one CPU rank); the peak, kept + the rows' gradient, is the same.
        self.exps = torch.empty((blocks, n, sc.block), dtype=sc.centers.grad_dtype,
                                device=sc.emb.device)
        self.maxes, self.sums = [], []
        for k, a, b in sc.blocks():
            w_b, inv_b = rows_and_inv_norm(sc.centers, sc.index[a:b], out_inv=inv_norms[a:b])
            logits = block_logits(sc, w_b, inv_b, a, b, logit_t)
            bmax = logits.amax(dim=1)
            e = logits.sub_(bmax.unsqueeze(1)).exp_()
            self.sums.append(e.sum(1))
            self.exps[k, :, :b - a] = e
            self.maxes.append(bmax)
            torch.maximum(local_max, bmax, out=local_max)
            del e, logits, w_b
        return local_max, inv_norms

    def local_sum(self, row_max):
        out = torch.zeros_like(row_max)
        for k, (bmax, bsum) in enumerate(zip(self.maxes, self.sums)):
            self.maxes[k] = torch.exp(bmax - row_max)  # now: block exps -> exp(l - max)
            out.add_(bsum * self.maxes[k])
        self.sums = None
        return out

    def block_dlog(self, sc, k, a, b, inv_b, row_max, row_f, logit_t):
        factor, self.maxes[k] = self.maxes[k], None
        dlog = self.exps[k, :, :b - a].float().mul_(factor.unsqueeze(1) * row_f)
        return dlog, sc.rows(a, b)


class Recomputed(_BlockMode):
    """chunk_size set: an online log-sum-exp in forward keeps only (N,) and (S,) vectors, and
    each block's logits are recomputed in backward (four matmuls a step; activation memory
    O(block x (N + D)))."""

    def forward(self, sc: Scores, logit_t):
        n = sc.emb.shape[0]
        row_max = torch.full((n,), float("-inf"), device=sc.emb.device)
        inv_norms = torch.empty(sc.index.shape[0], device=sc.emb.device)
        run_sum = torch.zeros(n, device=sc.emb.device)
        for _, a, b in sc.blocks():
            w_b, inv_b = rows_and_inv_norm(sc.centers, sc.index[a:b], out_inv=inv_norms[a:b])
            logits = block_logits(sc, w_b, inv_b, a, b, logit_t)
            new_max = torch.maximum(row_max, logits.amax(dim=1))
            # rescale the running sum to the new max
            run_sum.mul_(torch.exp(row_max - new_max)).add_(
                logits.sub_(new_max.unsqueeze(1)).exp_().sum(1))
            row_max = new_max
            del logits, w_b
        self.local_max, self.run_sum = row_max, run_sum
        return row_max, inv_norms

    def local_sum(self, row_max):
        return self.run_sum.mul_(torch.exp(self.local_max - row_max))

    def block_dlog(self, sc, k, a, b, inv_b, row_max, row_f, logit_t):
        w_b = sc.rows(a, b)
        dlog = block_logits(sc, w_b, inv_b, a, b, logit_t)
        return dlog.sub_(row_max.unsqueeze(1)).exp_().mul_(row_f), w_b


class TritonTiles:
    """The fused kernels (hybrid_fc.head.kernels.triton_ce): this rank's row max and sum-exp
    and, in backward, d emb and the rows' B = dlog'^T @ emb tile by tile, without any block of
    (N, c) logits in memory; the rows' projection is the shared `project_rows`."""

    def __init__(self, kernel):
        self.kernel = kernel

    def forward(self, sc: Scores, logit_t):
        # (N,) local max and sum of exp(l - max), (S,) 1/||w||
        local_max, self.run_sum, inv_norms = self.kernel.forward_stats(
            sc.emb, sc.centers.weight, sc.centers.scale, sc.index, sc.target, logit_t, sc.scale)
        self.local_max = local_max
        return local_max, inv_norms

    def local_sum(self, row_max):
        return self.run_sum.mul_(torch.exp(self.local_max - row_max))

    def backward(self, sc: Scores, inv_norms, row_max, row_f, logit_t, tgt_grad):
        # d emb (N, D) and B (S, D), both fp32, tile by tile; then the shared projection.
        grad_emb, grad_b = self.kernel.backward(sc.emb, sc.centers.weight, sc.centers.scale,
                                                sc.index, sc.target, logit_t, inv_norms, row_max,
                                                row_f.squeeze(1), tgt_grad, sc.scale)
        grad_rows = grad_b if not sc.low else torch.empty(
            grad_b.shape, dtype=sc.centers.grad_dtype, device=sc.emb.device)
        col_free = normalizes_rows(sc.emb.dtype)
        for _, a, b in sc.blocks():
            inv_b = inv_norms[a:b]
            rows = project_rows(sc.rows(a, b), grad_b[a:b], inv_b, None if col_free else inv_b)
            if sc.low:
                grad_rows[a:b].copy_(rows)  # fp32 -> bf16, round to nearest
        return grad_emb, grad_rows


def select_mode(centers: StoredCenters, keep_probs: bool, kernel):
    """The mode object for one forward (it holds what that forward keeps for backward)."""
    if kernel is not None:
        return TritonTiles(kernel)
    if not keep_probs:
        return Recomputed()
    return KeptLowExps() if centers.low else KeptExps()


# -- the autograd Function -----------------------------------------------------------------------
class _ShardedMarginSoftmaxCE(torch.autograd.Function):
    """forward: max and sum all-reduces (fp32 log-sum-exp); backward: no collectives."""

    @staticmethod
    def forward(ctx, emb, weight, scale, index, target, margin, group, block, keep_probs,
                sparse_grad, kernel):
        sc = Scores(emb, stored_centers(weight, scale), index, target, margin.scale, block)
        mode = select_mode(sc.centers, keep_probs, kernel)
        cos_t, logit_t = target_logits(sc, margin)                           # 1
        local_max, inv_norms = mode.forward(sc, logit_t)                     # 2
        row_max, sum_exp, tgt = global_log_sum_exp(mode, local_max, logit_t,  # 3
                                                   sc.owned, group)
        loss = (torch.log(sum_exp) + row_max - tgt).mean()
        ctx.margin, ctx.block, ctx.sparse_grad, ctx.mode = margin, block, sparse_grad, mode
        ctx.save_for_backward(emb, weight, scale, index, target, cos_t, logit_t, row_max,
                              sum_exp, inv_norms)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (emb, weight, scale, index, target, cos_t, logit_t, row_max, sum_exp,
         inv_norms) = ctx.saved_tensors
        if ctx.mode is None:
            raise RuntimeError("PartialFC backward ran twice; retain_graph is not supported")
        mode, ctx.mode = ctx.mode, None
        sc = Scores(emb, stored_centers(weight, scale), index, target, ctx.margin.scale,
                    ctx.block)
        row_f, tgt_grad = logit_gradients(grad_loss, emb.shape[0], sc.scale, sum_exp,  # 4
                                          logit_t, row_max, cos_t, ctx.margin)
        grad_emb, grad_rows = mode.backward(sc, inv_norms, row_max, row_f, logit_t,   # 5
                                            tgt_grad)
        grad_weight = weight_gradient(grad_rows, index, weight, ctx.sparse_grad)      # 6
        trained = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        return (grad_emb.to(emb.dtype), sc.centers.deliver(grad_weight) if trained else None,
                None, None, None, None, None, None, None, None, None)


def sharded_margin_softmax_ce(emb, weight, index, target, margin, group, *, block: int,
                              keep_probs: bool, sparse_grad: bool, kernel=None,
                              scale=None) -> torch.Tensor:
    """Mean margin-softmax cross-entropy over the global batch (the same value on every rank).

    emb (N, D) normalized, in the compute dtype; weight (num_local, D) stored centers (fp32,
    bf16, or int8 codes with their (num_local,) fp32 `scale`); index (S,) sampled local rows,
    sorted; target (N,) position of each label's row in index or -1; block: sampled rows per
    block; keep_probs: keep each block for backward (else recompute); kernel: None (torch) or
    hybrid_fc.head.kernels.triton_ce."""
    return _ShardedMarginSoftmaxCE.apply(emb, weight, scale, index, target, margin, group, block,
                                         keep_probs, sparse_grad, kernel)
