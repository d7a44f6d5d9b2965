"""Memory planner: what one rank holds for a head of C classes beside a ZeRO backbone.

Pure arithmetic over shapes and dtypes (no torch.distributed, no allocation), so it runs on a
laptop for a 300M-class job and in the trainer before anything large is built. Rank 0 is
planned: it owns the most classes (ceil(C / W)). Every line mirrors what the code allocates:

head, held all run long
  centers                 L x D x weight bytes (fp32 4, bf16 2, int8 1 + one fp32 scale per row)
  optimizer state         SGD momentum: L x D x state bytes; AdamW: two moments + an int64 step
                          per row; int8 state adds one fp32 scale per row per moment; int4 is
                          0.5 byte + a scale per row for momentum / Adam's first moment, and
                          Adam's second moment stays int8 (hybrid_fc.head.precision.state_code)
head, one step (peak of forward + backward, or of the optimizer step, whichever is larger)
  gathered embeddings     N x D in the compute dtype, its fp32 gradient, labels
  sampled rows' gradient  S x D x gradient bytes (fp32 storage 4, bf16 and int8 storage 2;
                          dense gradient: L x D)
  kept for backward       chunk_size None: the (N, S) exponentials (fp32 4 bytes, bf16 / int8
                          storage 2 bytes) and, for fp32 storage, the gathered (S, D) fp32 rows;
                          chunk_size set: nothing (logits recomputed block by block)
  logits per block        one block's (N, c) fp32 logits and (c, D) rows in flight
  sampler                 L fp32 keys + L flags + top-k of S (before the blocks, not with them)
  optimizer step          the sampled rows' gradient + one update block's fp32 temporaries
backbone (ZeRO paper accounting, P parameters, W ranks)
  parameters / gradients  2 bytes each under bf16/fp16, 4 under fp32; ZeRO-3 divides the
                          parameters by W, ZeRO-2 and 3 the gradients
  optimizer state         fp32 master (mixed precision) + momentum (SGD) or two moments (Adam),
                          divided by W from ZeRO-1 on
  activations             an estimate: every layer output of one micro-batch, kept once
reserve                   CUDA context, NCCL buffers, allocator slack (a fixed allowance)

N = micro batch x W (the gathered global batch), S = max(sample_rate x L, min(N, L)) sampled rows
(all positives of the batch may land on one shard).
"""
from dataclasses import asdict, dataclass, field, replace
from typing import Dict, List, Optional, Tuple

import torch

from ..common import format_bytes, parse_count, parse_size
from ..head.optim import HEAD_OPTIMIZERS, ROW_BLOCK_ELEMS
from ..head.partial_fc import auto_block_elems
from ..head.partition import ClassRange
from ..head.precision import (ROUNDINGS, STATE_DTYPES, WEIGHT_DTYPES, dtype_bytes, dtype_name,
                              dtype_names, state_code, weight_code)
from ..head.sampler import num_sample_for

__all__ = ["PlanInput", "Plan", "plan", "plan_experiment", "parse_count", "parse_bytes",
           "format_bytes", "from_deepspeed_config", "backbone_footprint"]

def parse_bytes(text) -> int:
    """A memory size (hybrid_fc.common.parse_size: 80GB = 80e9 bytes, 80GiB = 80 x 2^30)."""
    return parse_size(text, "memory size")


@dataclass(frozen=True)
class PlanInput:
    """One rank's job, in the terms of the YAML and the DeepSpeed JSON."""

    classes: int
    """C, classes over all ranks."""
    dim: int
    """D, the embedding width."""
    gpus: int
    """W, ranks in all (nodes x GPUs per node)."""
    gpu_memory: int
    """Bytes of memory one rank may use."""
    sample_rate: float = 1.0
    """head.sample_rate."""
    micro_batch: int = 128
    """Images per rank per micro-step (DeepSpeed train_micro_batch_size_per_gpu)."""
    precision: str = "bf16"
    """Backbone and embedding compute precision: fp32, bf16 or fp16."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage of the backbone, 0-3."""
    backbone_optimizer: str = "sgd"
    """sgd (one momentum) or adam (two moments) for the backbone."""
    backbone_params: int = 0
    """Backbone parameter count."""
    activation_elems: int = 0
    """Backbone activations of one micro-batch, in elements (an estimate)."""
    weight_dtype: str = "float32"
    """head.weight_dtype."""
    state_dtype: str = "float32"
    """head_optim.state_dtype."""
    head_optimizer: str = "sparse_sgd"
    """head_optim.name: sgd, adamw, sparse_sgd, sparse_adamw."""
    momentum: bool = True
    """SGD head optimizer with momentum (else no state)."""
    rounding: str = "stochastic"
    """head_optim.rounding: feedback keeps one more signed row state (the rounding residual)
    for bfloat16 / int8 centers."""
    sparse_grad: bool = True
    """head.sparse_grad."""
    chunk_size: Optional[int] = None
    """head.chunk_size."""
    reserve: int = 3 * 10 ** 9
    """CUDA context, NCCL buffers, allocator slack (not planned line by line)."""
    device: str = "cuda"
    """cuda or cpu: the head picks smaller blocks for bf16 storage on a CPU."""

    def __post_init__(self):
        for name in ("classes", "dim", "gpus", "micro_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.classes < self.gpus:
            raise ValueError(f"classes={self.classes} is smaller than gpus={self.gpus}")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.precision not in ("fp32", "bf16", "fp16"):
            raise ValueError(f"precision must be fp32, bf16 or fp16, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage must be 0-3, got {self.zero_stage}")
        for name, choices in (("weight_dtype", dtype_names(WEIGHT_DTYPES)),
                              ("state_dtype", dtype_names(STATE_DTYPES)),
                              ("head_optimizer", HEAD_OPTIMIZERS), ("rounding", ROUNDINGS)):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, "
                                 f"got {getattr(self, name)!r}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1 or None, got {self.chunk_size}")
        if self.weight_dtype == "int8" and not (self.sparse_grad
                                                and self.head_optimizer.startswith("sparse_")):
            raise ValueError("weight_dtype int8 needs sparse_grad=True and a sparse_* head "
                             "optimizer (head.sparse_grad=true, head_optim.name=sparse_sgd)")


@dataclass
class Plan:
    inp: PlanInput
    rows: List[Tuple[str, float, str]] = field(default_factory=list)
    """(item, bytes, what it is) in table order; the peak-time items are counted as described
    by `head_bytes` / `per_gpu_bytes`."""
    head_bytes: float = 0.0
    """Everything the head holds at its peak (held + the larger of step and optimizer peaks)."""
    backbone_bytes: float = 0.0
    per_gpu_bytes: float = 0.0
    fits: bool = False
    max_classes: int = 0
    advice: str = ""

    @property
    def headroom(self) -> float:
        return self.inp.gpu_memory - self.per_gpu_bytes

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows) + 2
        lines = [f"memory plan per rank (rank 0 of {self.inp.gpus}: "
                 f"{_local(self.inp):,} classes x {self.inp.dim})"]
        for name, value, note in self.rows:
            lines.append(f"  {name:<{width}}{format_bytes(value):>14}   {note}")
        lines.append(f"  {'total per rank':<{width}}{format_bytes(self.per_gpu_bytes):>14}   "
                     f"of {format_bytes(self.inp.gpu_memory)}: "
                     + ("fits" if self.fits else "DOES NOT FIT")
                     + f", headroom {format_bytes(self.headroom)}")
        lines.append("  (the total is the peak, not the sum of the rows: the head's step rows "
                     "and the backbone's activations\n   are held during forward and backward, "
                     "the optimizer-step row after them: only the larger counts; GB = 10^9 B)")
        lines.append(f"  largest class count that fits with the rest unchanged: "
                     f"{self.max_classes:,}")
        if self.advice:
            lines.append(f"  {self.advice}")
        return "\n".join(lines)

    def summary(self) -> Dict:
        """The machine-readable result (launch/plan.py prints it as its last line)."""
        inp = asdict(self.inp)
        return {"fits": self.fits, "per_gpu_bytes": int(self.per_gpu_bytes),
                "head_bytes": int(self.head_bytes), "backbone_bytes": int(self.backbone_bytes),
                "gpu_memory": self.inp.gpu_memory, "headroom_bytes": int(self.headroom),
                "max_classes": self.max_classes, "advice": self.advice,
                "items": {name: int(v) for name, v, _ in self.rows}, "input": inp}


def _local(inp: PlanInput) -> int:
    return ClassRange(inp.classes, inp.gpus, 0).num_local  # rank 0 owns the most classes


def _scaled(code) -> bool:
    """The storage keeps one fp32 scale per row (hybrid_fc.head.precision's "_scale" part)."""
    return "_scale" in code.parts


def _state(inp: PlanInput, L: int, D: int):
    """(bytes, note) of the head optimizer's state: each moment in its code
    (hybrid_fc.head.precision.state_code: int4 keeps Adam's second moment in int8), row scales
    of scaled codes, AdamW's int64 step per row. torch's optimizers keep fp32."""
    adam = inp.head_optimizer.endswith("adamw")
    keys = ([("first moment", True), ("second moment", False)] if adam
            else ([("momentum", True)] if inp.momentum else []))
    sparse = inp.head_optimizer.startswith("sparse_")
    if sparse and inp.rounding == "feedback" and inp.weight_dtype != "float32":
        keys.append(("rounding residual", True))
    name = inp.state_dtype if sparse else "float32"
    codes = [state_code(getattr(torch, name), sign, D) for _, sign in keys]
    total = sum(L * D * dtype_bytes(dtype_name(c.dtype)) + L * 4 * _scaled(c) for c in codes)
    note = ", ".join(f"{dtype_name(c.dtype)} {what}" for (what, _), c in zip(keys, codes))
    note = (note or "none") + (" + row scales" if any(_scaled(c) for c in codes) else "") + (
        " + row steps" if adam else "")
    return total + (L * 8 if adam else 0), note


def _head(inp: PlanInput):
    """(held rows, step rows, optimizer-step rows), each [(name, bytes, note)]."""
    L, D, W = _local(inp), inp.dim, inp.gpus
    N = inp.micro_batch * W
    wb = dtype_bytes(inp.weight_dtype)
    scaled = _scaled(weight_code(getattr(torch, inp.weight_dtype)))
    gb = 4 if inp.weight_dtype == "float32" else 2   # the rows' gradient, kept exponentials
    cb = 4 if inp.precision == "fp32" else 2
    S = min(L, max(num_sample_for(inp.sample_rate, L), min(N, L)))
    held = [("centers", L * D * wb + (L * 4 if scaled else 0),
             f"{L:,} x {D} {inp.weight_dtype}" + (" + row scales" if scaled else "")),
            ("optimizer state", *_state(inp, L, D))]
    grad = S * D * gb if inp.sparse_grad else L * D * gb
    block = inp.chunk_size or max(1, auto_block_elems(getattr(torch, inp.weight_dtype),
                                                      inp.device) // N)
    block = min(block, S)
    if inp.chunk_size is None:
        kept = S * N * gb + (S * D * 4 if gb == 4 else 0)
        kept_note = (f"(N={N}, S={S:,}) exponentials"
                     + (" + (S, D) rows, fp32" if gb == 4 else ", bf16"))
    else:
        kept, kept_note = 0, "none: chunk_size recomputes"
    # One block in flight: its fp32 logits / exponentials and its rows as fp32 (bf16 / int8
    # storage adds the stored gather and an fp32 gradient block; fp32 keep-probs reuses what
    # is kept).
    if gb == 4 and inp.chunk_size is None:
        per_block = N * D * 4
    else:
        per_block = N * block * 4 + block * D * (4 if gb == 4 else wb + 8)
    sampler = (L * 5 + S * 28) if S < L else 0
    emb = N * D * (cb + 4) + N * 16 + S * 12
    gname = "float32" if gb == 4 else "bfloat16"
    step = [("gathered embeddings", emb, f"({N}, {D}) + fp32 gradient, labels, indices"),
            ("sampled rows' gradient", grad, (f"({S:,}, {D}) {gname}" if inp.sparse_grad
                                              else f"dense ({L:,}, {D})")),
            ("kept for backward", kept, kept_note),
            ("logits per block", max(per_block, sampler),
             f"{block:,} classes a block" + (" (the sampler's keys, the larger)"
                                             if sampler > per_block else ""))]
    low = gb == 2 or inp.state_dtype in ("int8", "int4")
    opt_temp = min(ROW_BLOCK_ELEMS, S * D) * (24 if low else 12)
    opt = [("optimizer step", grad + opt_temp, "gradient + one update block")]
    return held, step, opt


def backbone_footprint(params: int, precision: str, zero_stage: int, optimizer: str, gpus: int):
    """(parameters, gradients, optimizer state) bytes per rank, the ZeRO paper's accounting."""
    mixed = precision in ("bf16", "fp16")
    p_bytes = params * (2 if mixed else 4)
    g_bytes = params * (2 if mixed else 4)
    moments = 2 if optimizer == "adam" else 1
    o_bytes = params * 4 * (moments + (1 if mixed else 0))
    if zero_stage >= 1:
        o_bytes /= gpus
    if zero_stage >= 2:
        g_bytes /= gpus
    if zero_stage >= 3:
        p_bytes /= gpus
    return p_bytes, g_bytes, o_bytes


def _evaluate(inp: PlanInput) -> Plan:
    held, step, opt = _head(inp)
    p_b, g_b, o_b = backbone_footprint(inp.backbone_params, inp.precision, inp.zero_stage,
                                       inp.backbone_optimizer, inp.gpus)
    act = inp.activation_elems * (4 if inp.precision == "fp32" else 2)
    held_b = sum(r[1] for r in held)
    step_b = sum(r[1] for r in step)
    opt_b = sum(r[1] for r in opt)
    plan = Plan(inp)
    plan.head_bytes = held_b + max(step_b, opt_b)
    plan.backbone_bytes = p_b + g_b + o_b + act
    # Backbone activations live through the head's forward and backward; the two optimizer
    # steps come after they are freed.
    plan.per_gpu_bytes = held_b + p_b + g_b + o_b + max(step_b + act, opt_b) + inp.reserve
    plan.fits = plan.per_gpu_bytes <= inp.gpu_memory
    z = f"ZeRO-{inp.zero_stage}"
    plan.rows = [(f"head: {n}", v, note) for n, v, note in held + step + opt] + [
        ("backbone: parameters", p_b, f"{inp.backbone_params:,} x {inp.precision}"
         + (", / ranks" if inp.zero_stage >= 3 else "")),
        ("backbone: gradients", g_b, z + (", / ranks" if inp.zero_stage >= 2 else "")),
        ("backbone: optimizer state", o_b, f"{inp.backbone_optimizer}, " + z
         + (", / ranks" if inp.zero_stage >= 1 else "")),
        ("backbone: activations", act, f"estimate, micro batch {inp.micro_batch}"),
        ("reserve", inp.reserve, "CUDA context, NCCL, allocator slack"),
    ]
    return plan


def _max_classes(inp: PlanInput) -> int:
    """Largest C that fits with everything else unchanged (0 if none)."""
    def fits(c):
        return _evaluate(replace(inp, classes=c)).fits
    if not fits(inp.gpus):
        return 0
    lo, hi = inp.gpus, max(inp.gpus, inp.classes)
    while fits(hi):
        lo, hi = hi, hi * 2
        if hi > 10 ** 13:
            return lo
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def _sparse(inp: PlanInput) -> str:
    """The row-sparse variant of the head optimizer (what bf16 / int8 / sparse_grad need)."""
    return "sparse_" + inp.head_optimizer.replace("sparse_", "")


def _advice(inp: PlanInput, plan: Plan) -> str:
    if plan.fits:
        return ""
    tries = []
    if inp.chunk_size is None:
        tries.append(("head.chunk_size=65536", replace(inp, chunk_size=65536)))
    # smaller storages, from the exact side down: bf16 + int8, then int8 + int4 (each also
    # with chunk_size); only those smaller than what is planned now
    for weight, state in (("bfloat16", "int8"), ("int8", "int4")):
        if dtype_bytes(weight) > dtype_bytes(inp.weight_dtype) or (
                weight == inp.weight_dtype and dtype_bytes(state) >= dtype_bytes(inp.state_dtype)):
            continue
        text = f"head.weight_dtype={weight} head_optim.state_dtype={state}"
        alt = replace(inp, weight_dtype=weight, state_dtype=state, sparse_grad=True,
                      head_optimizer=_sparse(inp))
        tries.append((text + " (head_optim.name=sparse_sgd)", alt))
        if inp.chunk_size is None:
            tries.append((text + " head.chunk_size=65536", replace(alt, chunk_size=65536)))
    if not inp.sparse_grad:
        tries.insert(0, ("head.sparse_grad=true (head_optim.name=sparse_sgd)",
                         replace(inp, sparse_grad=True,
                                 head_optimizer=_sparse(inp))))
    for text, alt in tries:
        if _evaluate(alt).fits:
            return f"would fit with {text}"
    gpus = inp.gpus
    while gpus < 1 << 20 and not _evaluate(replace(inp, gpus=gpus)).fits:
        gpus *= 2
    lo = gpus // 2
    if gpus < 1 << 20:
        while gpus - lo > 1:
            mid = (lo + gpus) // 2
            lo, gpus = (lo, mid) if _evaluate(replace(inp, gpus=mid)).fits else (mid, gpus)
        return f"needs at least {gpus} ranks with these settings (or a smaller micro batch)"
    return "does not fit at any rank count: lower the micro batch or the embedding width"


def plan(inp: PlanInput) -> Plan:
    """The per-rank memory plan of `inp`, with `max_classes` and advice when it does not fit."""
    result = _evaluate(inp)
    result.max_classes = _max_classes(inp)
    result.advice = _advice(inp, result)
    return result


def from_deepspeed_config(ds: Dict) -> Dict:
    """PlanInput fields the DeepSpeed JSON owns: precision, ZeRO stage, backbone optimizer,
    micro batch."""
    if ds.get("bf16", {}).get("enabled"):
        precision = "bf16"
    elif ds.get("fp16", {}).get("enabled"):
        precision = "fp16"
    else:
        precision = "fp32"
    opt = str(ds.get("optimizer", {}).get("type", "sgd")).lower()
    out = {"precision": precision,
           "zero_stage": int(ds.get("zero_optimization", {}).get("stage", 0)),
           "backbone_optimizer": "adam" if "adam" in opt or "lamb" in opt else "sgd"}
    if "train_micro_batch_size_per_gpu" in ds:
        out["micro_batch"] = int(ds["train_micro_batch_size_per_gpu"])
    return out


def plan_experiment(cfg, ds_config: Dict, gpus: int, gpu_memory: int,
                    reserve: Optional[int] = None, device: str = "cuda") -> Plan:
    """The plan of a training run: `cfg` an ExperimentConfig (hybrid_fc.training.config),
    `ds_config` the DeepSpeed JSON as a dict. The backbone's parameters and activations are
    computed on torch's meta device (hybrid_fc.backbones.backbone_size; nothing is allocated)."""
    from ..backbones import backbone_size
    ds = from_deepspeed_config(ds_config)
    if "micro_batch" not in ds:  # DeepSpeed derives it from the global batch
        if "train_batch_size" not in ds_config:
            raise ValueError("the DeepSpeed JSON sets neither train_micro_batch_size_per_gpu nor "
                             "train_batch_size: the planner needs the images per rank "
                             "(launch/plan.py: --micro-batch)")
        gas = int(ds_config.get("gradient_accumulation_steps", 1))
        ds["micro_batch"] = max(1, int(ds_config["train_batch_size"]) // (gas * gpus))
    params, act = backbone_size(cfg.model.backbone, cfg.model.embedding_size,
                                input_size=cfg.model.input_size, micro_batch=ds["micro_batch"],
                                **cfg.model.backbone_kwargs)
    extra = {} if reserve is None else {"reserve": int(reserve)}
    return plan(PlanInput(
        classes=cfg.head.num_classes, dim=cfg.model.embedding_size, gpus=gpus,
        gpu_memory=int(gpu_memory), sample_rate=cfg.head.sample_rate,
        backbone_params=params, activation_elems=act, weight_dtype=cfg.head.weight_dtype,
        state_dtype=cfg.head_optim.state_dtype, head_optimizer=cfg.head_optim.name,
        momentum=cfg.head_optim.momentum > 0, rounding=cfg.head_optim.rounding,
        sparse_grad=cfg.head.sparse_grad,
        chunk_size=cfg.head.chunk_size, device=device, **ds, **extra))
