"""HybridEngine: a PartialFC head beside a DeepSpeed engine that trains the backbone.

The backbone is data-parallel under DeepSpeed (ZeRO 0-3, fp32/bf16/fp16); the head is
model-parallel and stays *outside* the engine with its own weights (fp32, bf16 or int8) and
optimizer, so ZeRO never all-reduces or partitions class centers. One micro-step:

    feats = engine(images)                                  # (b, D) in the engine's dtype
    x = feats.detach().requires_grad_()                     # cut the graph at the embeddings
    (head(x, labels) / gas).backward()                      # head grads + x.grad
    engine.backward((feats.float() * x.grad.float()).sum(), scale_wrt_gas=False)

The surrogate `(feats * g).sum()` has gradient g with respect to feats, so the engine applies its
own loss scale (fp16), gradient accumulation bookkeeping and data-parallel averaging to exactly
g. By the head's contract g = world_size x d(loss)/d(feats_local); DeepSpeed divides by the
data-parallel size, so the averaged backbone gradient is the exact gradient of the global mean
loss (this requires the head's process group to be the engine's data-parallel group).

At an accumulation boundary `step()` clips the head gradient by its global norm across ranks,
calls `engine.step()`, and steps the head only if `engine.was_step_applied()` (False on an fp16
overflow, which DeepSpeed decides for all ranks together, so head and backbone skip together).
"""
import math
from typing import Callable, List, Optional

import torch
import torch.distributed as dist

from ..collectives import sync_buffers
from ..head.optim import SparseAdamW, SparseSGD

__all__ = ["HybridEngine", "WarmupDecay"]


class WarmupDecay:
    """LR multiplier for optimizer step `s` (0-based): linear warmup, then poly/cosine decay.

    warmup: (s + 1) / warmup_steps for s < warmup_steps (the first step is not wasted at 0).
    decay over the remaining steps until total_steps, from 1 down to min_ratio:
      poly:   min_ratio + (1 - min_ratio) * (1 - t) ** power
      cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi t)) / 2
      constant: 1
    with t = (s - warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1].
    """

    DECAYS = ("poly", "cosine", "constant")

    def __init__(self, total_steps: int, warmup_steps: int = 0, decay: str = "poly",
                 power: float = 2.0, min_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                             f"got {warmup_steps}")
        if decay not in self.DECAYS:
            raise ValueError(f"decay must be poly, cosine or constant, got {decay!r}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"min_ratio must be in [0, 1], got {min_ratio}")
        self.total_steps, self.warmup_steps = int(total_steps), int(warmup_steps)
        self.decay, self.power, self.min_ratio = decay, float(power), float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        span = max(1, self.total_steps - self.warmup_steps)
        t = min(1.0, max(0.0, (step - self.warmup_steps) / span))
        shape = ((1.0 - t) ** self.power if self.decay == "poly"
                 else 0.5 * (1 + math.cos(math.pi * t)))
        return self.min_ratio + (1.0 - self.min_ratio) * shape

    def __repr__(self):
        return (f"WarmupDecay(total_steps={self.total_steps}, warmup_steps={self.warmup_steps}, "
                f"decay={self.decay!r}, power={self.power}, min_ratio={self.min_ratio})")


def _check_batchnorm_dtypes(module) -> None:
    """DeepSpeed >= 0.18 casts parameters but not buffers to bf16/fp16 unless the JSON says
    `"data_types": {"buffer_dtype": ...}`; BatchNorm then fails mid-forward. Say so up front."""
    for name, m in module.named_modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.weight is not None \
                and m.running_mean is not None and m.running_mean.dtype != m.weight.dtype:
            kind = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(m.weight.dtype, "fp32")
            raise ValueError(f"BatchNorm {name or type(m).__name__} has {m.weight.dtype} weights "
                             f"but {m.running_mean.dtype} running statistics: add "
                             f"\"data_types\": {{\"buffer_dtype\": \"{kind}\"}} to the DeepSpeed "
                             "config (as in ds_configs/)")


class HybridEngine:
    """Drives a DeepSpeed engine (backbone) and a PartialFC head (outside it) as one model.

    Args:
      engine: the DeepSpeedEngine from `deepspeed.initialize(model=backbone, ...)`.
      head: a `hybrid_fc.PartialFC` whose process group is the engine's data-parallel group.
      head_optimizer: a torch optimizer over `head.parameters()` (e.g. torch.optim.SGD, or
        hybrid_fc.head.optim.SparseSGD with `sparse_grad=True`).
      lr_schedule: multiplier of the step index (e.g. `WarmupDecay`); the head's LR at step s is
        its initial LR times lr_schedule(s). None keeps LRs constant.
      schedule_backbone: also scale the backbone optimizer's initial LRs (from the DeepSpeed
        JSON) by lr_schedule. Refused if the engine already has its own DeepSpeed scheduler.
      max_grad_norm: clip the head gradient to this L2 norm, measured over all ranks' shards
        together (the norm of the full C x D gradient); 0 disables. The backbone is clipped by
        DeepSpeed's own "gradient_clipping".

    Use (the loop stays yours):
        hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1))
        for images, labels in loader:
            loss = hybrid.forward_backward(images, labels)  # one micro-batch
            hybrid.step()                                    # steps at accumulation boundaries
    """

    def __init__(self, engine, head, head_optimizer: torch.optim.Optimizer, *,
                 lr_schedule: Optional[Callable[[int], float]] = None,
                 schedule_backbone: bool = True, max_grad_norm: float = 0.0):
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        head_params = {id(p) for p in head.parameters()}
        for group in head_optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in head_params:
                    raise ValueError("head_optimizer holds a parameter that is not the head's")
        backbone_params = {id(p) for p in engine.module.parameters()}
        if head_params & backbone_params:
            raise ValueError("the head's parameters are inside the DeepSpeed engine; keep the "
                             "head outside (ZeRO would average or partition its shards)")
        if not head.weight.dtype.is_floating_point and not isinstance(
                head_optimizer, (SparseSGD, SparseAdamW)):
            raise ValueError(f"{head.weight.dtype} class centers are updated only by "
                             "hybrid_fc.head.optim's SparseSGD / SparseAdamW "
                             "(head_optim.name=sparse_sgd or sparse_adamw), not by "
                             f"{type(head_optimizer).__name__}")
        dp_size = engine.dp_world_size if hasattr(engine, "dp_world_size") else 1
        if head.world_size != dp_size:
            raise ValueError(f"head is split over {head.world_size} ranks but the engine's "
                             f"data-parallel size is {dp_size}: give PartialFC the engine's "
                             "data-parallel process group")
        if lr_schedule is not None and schedule_backbone and engine.lr_scheduler is not None:
            raise ValueError("the DeepSpeed config has its own \"scheduler\" and lr_schedule "
                             "would schedule the backbone too; drop one of them or pass "
                             "schedule_backbone=False")
        self.engine = engine
        self.head = head
        self.head_optimizer = head_optimizer
        self.lr_schedule = lr_schedule
        self.schedule_backbone = bool(schedule_backbone and lr_schedule is not None)
        self.max_grad_norm = float(max_grad_norm)
        self.head_base_lrs: List[float] = [g["lr"] for g in head_optimizer.param_groups]
        self.backbone_base_lrs: List[float] = [g["lr"] for g in engine.optimizer.param_groups]
        self.last_head_grad_norm: Optional[torch.Tensor] = None  # before clipping; None if off
        self.input_shape: Optional[tuple] = None  # (C, H, W) of the images seen last
        if engine.bfloat16_enabled():
            self.compute_dtype = torch.bfloat16
        elif engine.fp16_enabled():
            self.compute_dtype = torch.float16
        else:
            self.compute_dtype = torch.float32
        _check_batchnorm_dtypes(engine.module)

    @property
    def module(self) -> torch.nn.Module:
        """The backbone nn.Module (as DeepSpeed's `engine.module`), e.g. for evaluation."""
        return self.engine.module

    # -- properties for logging ------------------------------------------------------------
    @property
    def global_steps(self) -> int:
        """Optimizer steps taken by the engine (skipped fp16 steps included, as DeepSpeed
        counts)."""
        return self.engine.global_steps

    @property
    def gradient_accumulation_steps(self) -> int:
        return self.engine.gradient_accumulation_steps()

    @property
    def loss_scale(self) -> float:
        """The engine's current fp16 loss scale (1.0 for fp32/bf16)."""
        opt = self.engine.optimizer
        for name in ("cur_scale", "loss_scale"):
            value = getattr(opt, name, None)
            if isinstance(value, (int, float, torch.Tensor)):
                return float(value)
        return 1.0

    @property
    def head_lr(self) -> float:
        return self.head_optimizer.param_groups[0]["lr"]

    @property
    def backbone_lr(self) -> float:
        return self.engine.optimizer.param_groups[0]["lr"]

    # -- one micro-step --------------------------------------------------------------------
    def forward_backward(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the detached global mean loss.

        Head gradients accumulate in `head.weight.grad`; backbone gradients in the engine.
        """
        if images.is_floating_point():
            images = images.to(self.compute_dtype)
        self.input_shape = tuple(images.shape[1:])  # checkpoints note it (export, eval)
        feats = self.engine(images)                                     # (b, D)
        x = feats.detach().requires_grad_(True)
        loss = self.head(x, labels)                                     # same on every rank
        (loss / self.gradient_accumulation_steps).backward()           # fills x.grad, head grads
        # d/dfeats of the surrogate is x.grad: the engine scales (fp16), accumulates, averages.
        surrogate = (feats.float() * x.grad.float()).sum()
        self.engine.backward(surrogate, scale_wrt_gas=False)
        return loss.detach()

    def _clip_head_grad(self) -> Optional[torch.Tensor]:
        grads = [p.grad for p in self.head.parameters() if p.grad is not None]
        if not grads:
            return None
        sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        for g in grads:
            v = g.coalesce().values() if g.is_sparse else g
            sq = sq + v.float().pow(2).sum()
        if self.head.world_size > 1:  # shards are disjoint: the full norm^2 is the sum
            dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=self.head.process_group)
        norm = sq.sqrt()
        # No host sync: multiply by min(1, max/norm) as a tensor (as torch's clip_grad_norm_).
        coef = torch.clamp(self.max_grad_norm / (norm + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return norm

    def _apply_schedule(self):
        if self.lr_schedule is None:
            return
        factor = self.lr_schedule(self.engine.global_steps)
        for group, base in zip(self.head_optimizer.param_groups, self.head_base_lrs):
            group["lr"] = base * factor
        if self.schedule_backbone:
            for group, base in zip(self.engine.optimizer.param_groups, self.backbone_base_lrs):
                group["lr"] = base * factor

    def step(self) -> bool:
        """Step backbone and head at an accumulation boundary; returns whether a step was applied
        (False between boundaries and on an fp16 overflow, where both skip on every rank)."""
        boundary = self.engine.is_gradient_accumulation_boundary()  # read before engine.step()
        if boundary:
            self._apply_schedule()
            if self.max_grad_norm > 0:  # one scalar all-reduce per step
                self.last_head_grad_norm = self._clip_head_grad()
        self.engine.step()
        if not boundary:
            return False
        applied = bool(self.engine.was_step_applied())
        if applied:
            self.head_optimizer.step()
        self.head_optimizer.zero_grad(set_to_none=True)
        return applied

    def sync_buffers(self) -> None:
        """Average the backbone's BatchNorm running statistics over the data-parallel ranks (other
        buffers: rank 0's), in place. Each rank's statistics follow only its own batches;
        distributed evaluation calls this so that every rank evaluates one model (checkpoints
        save the mean without changing the live model). Collective
        (hybrid_fc.collectives.sync_buffers)."""
        sync_buffers(self.engine.module, self.head.process_group)

    def train(self, mode: bool = True):
        self.engine.train(mode)
        self.head.train(mode)
        return self

    def eval(self):
        return self.train(False)
