"""PartialFC: the model-parallel sampled margin-softmax head.

Each rank owns a contiguous slice of the C class centers (hybrid_fc.head.partition). One step:
  1. all-gather the batch sizes and input checks (one tiny collective, one host sync),
  2. normalize the local embeddings and all-gather them (backward: reduce-scatter),
  3. all-gather the labels, sample this shard's rows (all local positives + random negatives),
  4. score against the sampled, normalized centers with the margin on the target logit and a
     cross-rank log-sum-exp (hybrid_fc.head.loss), giving the mean loss of the global batch.
"""
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..collectives import (all_gather_rows, all_gather_varlen, comm_device, gather_batch_meta,
                           group_rank, group_size, scale_grad)
from ..common import stable_seed
from . import kernels
from .loss import sharded_margin_softmax_ce
from .margins import MarginBase
from .partition import ClassRange
from .precision import WEIGHT_DTYPES, dtype_name, parse_dtype, weight_code
from .sampler import num_sample_for, sample_classes

__all__ = ["PartialFC", "init_class_centers", "init_center_parts", "auto_block_elems"]

_INIT_BLOCK = 1 << 16  # classes per independently seeded init block
# Logit elements per block when chunk_size is None (64 MB of fp32 temporaries per block).
_AUTO_BLOCK_ELEMS = 1 << 24


def auto_block_elems(weight_dtype: torch.dtype, device) -> int:
    """Logit elements per block when chunk_size is None. bf16 / int8 storage on a CPU: 1/16 of
    it, so that its extra conversion passes run in cache (and its point, memory, is not spent on
    temporaries); GPUs keep large blocks (fewer kernel launches)."""
    if weight_dtype != torch.float32 and torch.device(device).type == "cpu":
        return _AUTO_BLOCK_ELEMS // 16
    return _AUTO_BLOCK_ELEMS


_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8,
           torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)


def _dtype_code(dtype) -> int:
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def _dtype_name(code: int) -> str:
    return str(_DTYPES[code]) if code < len(_DTYPES) else "another dtype"


def init_center_parts(start: int, end: int, dim: int, seed: int, std: float = 0.01,
                      dtype: torch.dtype = torch.float32) -> Dict[str, torch.Tensor]:
    """Rows [start, end) of a (C, dim) N(0, std^2) matrix that does not depend on the sharding,
    stored as `dtype` (hybrid_fc.head.precision.weight_code): {"": the rows} for fp32 / bf16,
    {"": int8 codes, "_scale": (end - start,) fp32 row scales} for int8.

    Classes are drawn in blocks of 65,536 with a seed per block, so any rank layout (and a
    single-process reference) produces the same centers for the same classes. Each block is
    drawn in fp32 and encoded straight into the `dtype` output (bf16, int8: rounded to
    nearest), so the peak is the output plus one fp32 block, never a whole fp32 copy.
    """
    code = weight_code(dtype)
    out = code.empty((end - start, dim))
    first, last = start // _INIT_BLOCK, (end - 1) // _INIT_BLOCK
    for blk in range(first, last + 1):
        g = torch.Generator().manual_seed(stable_seed("init", seed, blk))
        lo, hi = blk * _INIT_BLOCK, (blk + 1) * _INIT_BLOCK
        a, b = max(lo, start), min(hi, end)
        # Always draw the whole block: torch's normal_ output depends on the tensor's size.
        rows = torch.empty(_INIT_BLOCK, dim).normal_(0.0, std, generator=g)
        for suffix, value in code.encode(rows[a - lo:b - lo]).items():
            out[suffix][a - start:b - start] = value
    return out


def init_class_centers(start: int, end: int, dim: int, seed: int, std: float = 0.01,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`init_center_parts` of a float storage (fp32, bf16) as one (end - start, dim) tensor."""
    parts = init_center_parts(start, end, dim, seed, std, dtype)
    if len(parts) > 1:
        raise ValueError(f"{dtype_name(dtype)} centers are codes with row scales: use "
                         "init_center_parts")
    return parts[""]


class PartialFC(nn.Module):
    """Model-parallel Partial FC head (sampled ArcFace/CosFace softmax over sharded classes).

    Args:
      margin_loss: an ArcFace / CosFace / CombinedMarginLoss (hybrid_fc.head.margins).
      embedding_size: D, the embedding width.
      num_classes: C, all classes over all ranks (>= world size).
      sample_rate: fraction of each shard's centers scored per step, in (0, 1]; all positives
        of the global batch are always scored.
      process_group: the ranks the classes are split over (default: the world, or a single
        process when torch.distributed is not initialized).
      sparse_grad: `weight.grad` is a sparse COO tensor over the sampled rows (memory O(S*D);
        use with hybrid_fc.head.optim) instead of a dense (num_local, D) tensor (works with any
        torch optimizer). int8 centers need it.
      chunk_size: score the sampled rows in blocks of this many and recompute each block's
        logits in backward, so the (B*W, S) logits never exist at once (one extra matmul).
        None keeps the (B*W, S) fp32 probabilities for backward (fastest).
      seed: seeds the class-center init (independent of the rank layout) and each rank's own
        sampling stream.
      check_inputs: verify labels are in [0, C) and embeddings finite, on every rank, as part of
        the per-step metadata gather (costs one reduction over the inputs).
      equal_batches: promise that every rank passes the same batch size. Together with
        check_inputs=False this removes the per-step metadata gather, the head's only host
        sync in forward (on GPUs it waits for the backbone's forward kernels).
      weight_dtype: storage of the class centers: torch.float32 (default; exact),
        torch.bfloat16 (2 bytes per element and no fp32 master copy; the sampled rows'
        gradient and the kept exponentials are bf16 too) or torch.int8 (1 byte per element +
        one fp32 scale per center, `weight_scale`: `weight` holds linear codes, center =
        weight * weight_scale / 127 per row; rows are decoded a block at a time for the loss,
        whose math stays fp32; the rows' gradient and the kept exponentials are bf16; needs
        sparse_grad=True). Update a bf16 or int8 head with hybrid_fc.head.optim's SparseSGD /
        SparseAdamW, which compute in fp32 and write back with stochastic rounding (torch's
        optimizers would round every update to nearest and lose the ones below the spacing,
        and cannot update int8 codes at all). int8: `weight` cannot require grad (torch allows
        that only for floating tensors); the head's backward sets `weight.grad` (sparse bf16)
        itself, summed over micro-steps like autograd's (hybrid_fc.head.loss.CenterCodes).
      backend: "auto" (default), "torch" or "triton". triton: the fused kernels of
        hybrid_fc.head.kernels.triton_ce score the sampled rows tile by tile and never hold the
        (B*W, S) logits (chunk_size then only sizes the blocks of the rows' gradient
        projection); needs the `triton` extra and CUDA tensors (or CPU tensors under
        TRITON_INTERPRET=1, for tests), and raises where it cannot run. auto: torch for now;
        triton on CUDA (when importable) once the kernels have passed the GPU suite
        (kernels.TRITON_ON_CUDA_BY_DEFAULT). Decided per step from the inputs' device.

    Precision: embeddings in bf16/fp16 make the matmuls run in that precision; normalization of
    the centers, softmax statistics, loss and the accumulation of gradients are fp32.
    `weight.row_offset` (= class_start) tells hybrid_fc.head.optim the global class id of row 0;
    with int8 centers `weight.row_scale` is `weight_scale` (a Parameter, so that `.to(device)`
    keeps the object the optimizer follows; it requires grad but its `.grad` stays None:
    hybrid_fc.head.loss.CenterCodes). Both are set again at every forward: a deepcopy or
    load_state_dict(assign=True) makes Parameter objects without them.
    """

    def __init__(self, margin_loss: MarginBase, embedding_size: int, num_classes: int,
                 sample_rate: float = 1.0, *, process_group=None, sparse_grad: bool = False,
                 chunk_size: Optional[int] = None, seed: int = 0, check_inputs: bool = True,
                 equal_batches: bool = False, weight_dtype=torch.float32, device=None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(margin_loss, MarginBase):
            raise TypeError("margin_loss must be an ArcFace, CosFace or CombinedMarginLoss "
                            f"from hybrid_fc.head.margins, got {type(margin_loss).__name__}")
        if not isinstance(embedding_size, int) or embedding_size < 1:
            raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not (isinstance(sample_rate, (int, float)) and 0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate!r}")
        if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        weight_dtype = parse_dtype(weight_dtype, WEIGHT_DTYPES, "weight_dtype")
        if weight_dtype == torch.int8 and not sparse_grad:
            raise ValueError("weight_dtype=int8 needs sparse_grad=True (head.sparse_grad=true): "
                             "a dense gradient would hold 2 bytes per center element, twice "
                             "the int8 centers, and only the row-wise optimizers update them")
        self.backend = kernels.check_backend(backend)
        self.process_group = process_group
        self.world_size = group_size(process_group)
        self.rank = group_rank(process_group)
        if num_classes < self.world_size:
            raise ValueError(f"num_classes={num_classes} is smaller than the world size "
                             f"{self.world_size}: every rank must own at least one class")
        self.margin_loss = margin_loss
        self.embedding_size = embedding_size
        self.num_classes = num_classes
        self.sample_rate = float(sample_rate)
        self.sparse_grad = bool(sparse_grad)
        self.chunk_size = chunk_size
        self.seed = int(seed)
        self.check_inputs = bool(check_inputs)
        self.equal_batches = bool(equal_batches)
        self.class_range = ClassRange(num_classes, self.world_size, self.rank)
        self.class_start = self.class_range.start
        self.num_local = self.class_range.num_local
        self.num_sample = num_sample_for(self.sample_rate, self.num_local)
        parts = init_center_parts(self.class_start, self.class_range.end, embedding_size, seed,
                                  dtype=weight_dtype)
        parts = {k: v.to(device) if device is not None else v for k, v in parts.items()}
        # int8 codes cannot require grad: CenterCodes sets weight.grad itself
        self.weight = nn.Parameter(parts[""], requires_grad=weight_dtype.is_floating_point)
        # int8: (num_local,) fp32 row scales, re-encoded by the optimizer with each row; they
        # require grad to stand for the codes in autograd (hybrid_fc.head.loss.CenterCodes)
        self.register_parameter("weight_scale", nn.Parameter(parts["_scale"])
                                if "_scale" in parts else None)
        self._link_weight()
        self._generator: Optional[torch.Generator] = None

    def _link_weight(self) -> None:
        """What hybrid_fc.head.optim reads from the weight: the global class id of row 0 and,
        for int8 centers, the row scales."""
        self.weight.row_offset = self.class_start
        if self.weight_scale is not None:
            self.weight.row_scale = self.weight_scale

    def extra_repr(self):
        return (f"margin={self.margin_loss}, embedding_size={self.embedding_size}, "
                f"num_classes={self.num_classes}, classes=[{self.class_start}, "
                f"{self.class_range.end}) on rank {self.rank}/{self.world_size}, "
                f"sample_rate={self.sample_rate}, sparse_grad={self.sparse_grad}, "
                f"weight_dtype={self.weight_dtype}, backend={self.backend}")

    @property
    def weight_dtype(self) -> torch.dtype:
        """Storage dtype of the class centers (float32, bfloat16 or int8)."""
        return self.weight.dtype

    # -- sampler stream --------------------------------------------------------------------
    def _stream(self) -> torch.Generator:
        device = self.weight.device
        if self._generator is None or self._generator.device != device:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(stable_seed("sampler", self.seed, self.rank))
        return self._generator

    def rng_state(self) -> dict:
        """This rank's sampler stream, for checkpoints."""
        return {"rank": self.rank, "world_size": self.world_size, "seed": self.seed,
                "state": self._stream().get_state()}

    def set_rng_state(self, state: dict) -> None:
        self._stream().set_state(state["state"])

    # -- forward ---------------------------------------------------------------------------
    def _local_problem(self, embeddings, labels):
        """(labels as a flat int64 tensor or None, None or (code, a, b, c)): what is wrong with
        this rank's inputs, as small integers that travel in the per-step metadata gather."""
        if not isinstance(embeddings, torch.Tensor) or not isinstance(labels, torch.Tensor):
            return None, (1, 0, 0, 0)
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_size:
            dims = tuple(embeddings.shape) + (0, 0)
            return None, (2, embeddings.dim(), dims[0], dims[1])
        if embeddings.dtype not in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
            return None, (3, _dtype_code(embeddings.dtype), 0, 0)
        if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
            return None, (4, _dtype_code(labels.dtype), 0, 0)
        flat = labels.reshape(-1)
        if flat.shape[0] != embeddings.shape[0]:
            return None, (5, flat.shape[0], embeddings.shape[0], 0)
        if self.weight.device != embeddings.device:
            return None, (6, 0, 0, 0)
        return flat.to(embeddings.device, torch.long), None

    def _problem_error(self, rank: int, problem) -> Exception:
        code, a, b, c = problem
        prefix = f"rank {rank}: " if self.world_size > 1 else ""
        if code == 1:
            return TypeError(prefix + "PartialFC.forward takes (embeddings, labels) tensors")
        if code == 2:
            got = f"({b}, {c})" if a == 2 else f"a {a}-dim tensor"
            return ValueError(prefix + f"embeddings must be (batch, {self.embedding_size}), "
                              f"got {got}")
        if code == 3:
            return TypeError(prefix + f"embeddings must be a floating tensor, got "
                             f"{_dtype_name(a)}")
        if code == 4:
            return TypeError(prefix + f"labels must be an integer tensor, got {_dtype_name(a)}")
        if code == 5:
            return ValueError(prefix + f"{a} labels for {b} embeddings")
        return ValueError(prefix + f"embeddings are not on the head's device "
                          f"({self.weight.device.type}); move the head with .to(device)")

    def _gather_sizes_and_check(self, embeddings, labels, problem):
        """Every rank's batch size, and the same error on every rank for bad input on any rank:
        type, shape, length and device problems and (check_inputs) label range and non-finite
        values all travel in one small all-gather, before any collective that could block."""
        group = self.process_group
        # what every rank must agree on: the head's shape and the embeddings' dtype (a rank
        # with another num_classes would leave classes on no rank; mixed dtypes abort gloo)
        agree = [self.num_classes, self.embedding_size,
                 -1 if problem is not None else _dtype_code(embeddings.dtype)]
        if problem is not None:  # nothing computed from the inputs: they may be anything
            meta = torch.tensor([0, 0, 0, *problem, *agree], device=comm_device(group))
        else:
            device = embeddings.device
            count = torch.tensor(labels.shape[0], device=device)
            if self.check_inputs:
                bad_label = ((labels < 0) | (labels >= self.num_classes)).sum()
                nonfinite = (~torch.isfinite(embeddings)).sum()
            else:
                bad_label = nonfinite = torch.zeros((), dtype=torch.long, device=device)
            zero = torch.zeros((), dtype=torch.long, device=device)
            meta = torch.stack([count, bad_label.to(device), nonfinite.to(device)]
                               + [zero] * 4 + [torch.tensor(v, device=device) for v in agree]
                               ).long()
        metas = gather_batch_meta(meta.long(), group)
        for r, m in enumerate(metas):
            if m[3]:
                raise self._problem_error(r, tuple(m[3:7]))
        for r, m in enumerate(metas):
            if m[7:9] != metas[0][7:9]:
                raise ValueError(f"rank {r} built PartialFC with num_classes={m[7]}, "
                                 f"embedding_size={m[8]} but rank 0 with num_classes="
                                 f"{metas[0][7]}, embedding_size={metas[0][8]}: every rank must "
                                 "build the head with the same arguments")
        codes = {m[9] for m in metas}
        if len(codes) > 1:
            names = ", ".join(f"rank {r}: {_dtype_name(m[9])}" for r, m in enumerate(metas))
            raise TypeError(f"the ranks passed embeddings of different dtypes ({names}): every "
                            "rank must pass the same dtype (one autocast / engine precision)")
        for r, (_, bad, nonfin, *_) in enumerate(metas):
            if bad:
                raise ValueError(f"rank {r}: {bad} label(s) outside [0, {self.num_classes})")
            if nonfin:
                raise ValueError(f"rank {r}: {nonfin} non-finite (NaN/inf) embedding value(s)")
        sizes = [m[0] for m in metas]
        if self.equal_batches and len(set(sizes)) > 1:
            raise ValueError(f"equal_batches=True but the ranks passed batch sizes {sizes}")
        return sizes

    def forward(self, local_embeddings: torch.Tensor, local_labels: torch.Tensor) -> torch.Tensor:
        """Mean loss over the global batch (same on every rank); inputs are not modified.

        The gradient reaching `local_embeddings` is world_size x d(loss)/d(local_embeddings),
        so that a data-parallel average of backbone gradients is the exact global gradient.
        """
        labels, problem = self._local_problem(local_embeddings, local_labels)
        group = self.process_group
        self._link_weight()
        # Decided before any collective: a forced backend that cannot run raises on its own
        # rank. Every rank holds the same settings and device type, so they all agree.
        kernel = None
        if kernels.select_backend(self.backend, self.weight.device) == "triton":
            kernel = kernels.load_triton_ce(self.weight.device)

        if self.equal_batches and not self.check_inputs:
            if problem is not None:  # no collective to share it: this rank raises alone
                raise self._problem_error(self.rank, problem)
            sizes = [labels.shape[0]] * self.world_size  # trusted: no collective, no host sync
        else:
            sizes = self._gather_sizes_and_check(local_embeddings, labels, problem)
        if sum(sizes) == 0:
            raise ValueError("the global batch is empty")
        device = local_embeddings.device

        # Normalize in fp32, then compute in the input precision. (b, D) -> gathered (N, D)
        x = scale_grad(local_embeddings, self.world_size)
        x = F.normalize(x.float(), dim=1, eps=1e-12)
        if local_embeddings.dtype in (torch.bfloat16, torch.float16):
            x = x.to(local_embeddings.dtype)
        emb = all_gather_rows(x, sizes, group)                        # (N, D)
        glabels = all_gather_varlen(labels, sizes, group)             # (N,)

        with torch.no_grad():
            index, target = sample_classes(glabels - self.class_start, self.num_local,
                                           self.num_sample, self._stream())
        block = self.chunk_size or max(1, auto_block_elems(self.weight.dtype, device)
                                       // emb.shape[0])
        return sharded_margin_softmax_ce(emb, self.weight, index, target, self.margin_loss, group,
                                         block=block, keep_probs=self.chunk_size is None,
                                         sparse_grad=self.sparse_grad, kernel=kernel,
                                         scale=self.weight_scale)
