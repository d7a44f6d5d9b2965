"""Experiment configuration: typed dataclasses, YAML loading and `key=value` overrides.

Ownership (no key has two owners):
  * The DeepSpeed JSON (`--deepspeed_config`) owns the engine: micro batch size, gradient
    accumulation, precision (fp16/bf16), ZeRO stage, the backbone's optimizer and its base LR,
    gradient clipping of the backbone.
  * This YAML owns everything else: backbone architecture, head, head optimizer, the LR
    *schedule shape* (applied to the head, and to the backbone as a multiplier of its base LR
    unless the DeepSpeed JSON has its own "scheduler"), data, steps, logging, checkpoints.

`load_config(path, overrides)` reads the YAML (optionally `base: other.yaml`, merged under it),
applies `section.key=value` / `key=value` overrides (values parsed as YAML scalars, then checked
against the field's type) and validates every field.
"""
import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..head.kernels import BACKENDS
from ..head.margins import MARGINS
from ..head.optim import HEAD_OPTIMIZERS
from ..head.precision import ROUNDINGS, STATE_DTYPES, WEIGHT_DTYPES, dtype_names
from .engine import WarmupDecay

__all__ = ["ModelConfig", "HeadConfig", "HeadOptimConfig", "ScheduleConfig", "DataConfig",
           "TrainConfig", "EvalConfig", "ExperimentConfig", "load_config", "apply_overrides",
           "config_to_dict", "load_deepspeed_config", "check_deepspeed_config"]


def _require(cond: bool, name: str, msg: str, value: Any):
    if not cond:
        raise ValueError(f"{name}: {msg}, got {value!r}")


def _require_choice(value: Any, choices: Sequence[str], name: str):
    """`value` is one of `choices` (the set the setting's owner defines)."""
    _require(value in choices, name, f"must be one of {', '.join(choices)}", value)


def _require_finite(obj, section: str) -> None:
    """Every float field (and tuple of floats) of a config section is a finite number: inf or
    nan in a learning rate or a margin trains to nan (or to inf centers) without an error."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        values = value if isinstance(value, (tuple, list)) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ValueError(f"{section}.{f.name}: must be a finite number, got {value!r}")


@dataclass
class ModelConfig:
    backbone: str = "iresnet50"
    """Backbone name: iresnet18/34/50/100, mobilefacenet(_large), iresnet_tiny, mlp, or a timm
    model name (timm must be installed)."""
    embedding_size: int = 512
    """Width D of the embedding the head classifies."""
    input_size: int = 112
    """Side of the square input images in pixels (a multiple of 16 for the built-in CNNs)."""
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    """Extra keyword arguments for the backbone constructor (e.g. {dropout: 0.1})."""

    def __post_init__(self):
        _require_finite(self, "model")
        _require(isinstance(self.backbone, str) and self.backbone, "model.backbone",
                 "must be a non-empty name", self.backbone)
        _require(self.embedding_size >= 1, "model.embedding_size", "must be >= 1",
                 self.embedding_size)
        _require(self.input_size >= 1, "model.input_size", "must be >= 1", self.input_size)


@dataclass
class HeadConfig:
    num_classes: int = 93431
    """Number of identity classes C over all ranks (must be >= the number of ranks)."""
    margin: str = "arcface"
    """Margin type: arcface (cos(theta + m)), cosface (cos(theta) - m) or combined."""
    scale: float = 64.0
    """Logit scale s."""
    m: float = 0.5
    """Margin m for arcface / cosface."""
    combined: Tuple[float, float, float] = (1.0, 0.5, 0.0)
    """(m1, m2, m3) for the combined margin cos(m1 theta + m2) - m3."""
    sample_rate: float = 1.0
    """Fraction of each shard's class centers scored per step, in (0, 1] (Partial FC)."""
    sparse_grad: bool = False
    """Sparse (sampled-rows-only) head gradient; requires a sparse_* head optimizer."""
    chunk_size: Optional[int] = None
    """Score sampled classes in blocks of this many, recomputing logits in backward (memory)."""
    seed: int = 0
    """Seed of the class-center init, the negative sampler and the stochastic rounding."""
    weight_dtype: str = "float32"
    """Storage of the class centers: float32 (exact), bfloat16 (2 bytes per element, no fp32
    master copy) or int8 (1 byte per element + one fp32 scale per center; needs
    head.sparse_grad=true); below fp32 the head optimizer (sparse_*) writes updates back with
    stochastic rounding."""
    backend: str = "auto"
    """Head kernels: auto (torch for now; the fused Triton kernels on CUDA once they have
    passed the GPU suite), torch, or triton (never falls back: raises where the kernels
    cannot run)."""

    def __post_init__(self):
        _require_finite(self, "head")
        _require_choice(self.backend, BACKENDS, "head.backend")
        _require(self.num_classes >= 1, "head.num_classes", "must be >= 1", self.num_classes)
        _require_choice(self.weight_dtype, dtype_names(WEIGHT_DTYPES), "head.weight_dtype")
        _require_choice(self.margin, MARGINS, "head.margin")
        _require(0 < self.scale <= 1024, "head.scale",
                 "must be in (0, 1024] (face recognition uses 16-64; beyond, the logits' "
                 "gradients overflow)", self.scale)
        _require(0.0 <= self.m < 3.15, "head.m", "must be in [0, pi)", self.m)
        _require(len(self.combined) == 3, "head.combined", "must be (m1, m2, m3)", self.combined)
        self.combined = tuple(float(v) for v in self.combined)
        _require(0.0 < self.sample_rate <= 1.0, "head.sample_rate", "must be in (0, 1]",
                 self.sample_rate)
        _require(self.chunk_size is None or self.chunk_size >= 1, "head.chunk_size",
                 "must be None or >= 1", self.chunk_size)


@dataclass
class HeadOptimConfig:
    name: str = "sgd"
    """Head optimizer: sgd, adamw (torch, dense grads) or sparse_sgd, sparse_adamw (row-wise)."""
    lr: float = 0.1
    """Peak learning rate of the head (the schedule multiplies it)."""
    momentum: float = 0.9
    """SGD momentum."""
    weight_decay: float = 5e-4
    """Weight decay of the head's class centers."""
    betas: Tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    eps: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 5.0
    """Clip the head gradient to this global L2 norm across all ranks' shards; 0 disables."""
    state_dtype: str = "float32"
    """sparse_* optimizers: storage of momentum / Adam moments: float32, bfloat16, float16, int8
    (one fp32 scale per class center; 1 byte per element) or int4 (momentum / first moment in
    4-bit codes, 0.5 byte per element + the scale; AdamW's second moment stays int8)."""
    rounding: str = "stochastic"
    """sparse_* optimizers with head.weight_dtype bfloat16 or int8: how updated centers are
    written back: stochastic (unbiased: small updates survive on average), nearest (the
    ablation), or feedback (error feedback: to nearest, and the rounding residual is kept as one
    more row state in head_optim.state_dtype and added back at the row's next update, so the
    stored centers stay within about one code step of the exact ones instead of drifting as a
    random walk). int4 state is always rounded stochastically."""

    def __post_init__(self):
        _require_finite(self, "head_optim")
        _require_choice(self.state_dtype, dtype_names(STATE_DTYPES), "head_optim.state_dtype")
        _require_choice(self.rounding, ROUNDINGS, "head_optim.rounding")
        _require_choice(self.name, HEAD_OPTIMIZERS, "head_optim.name")
        _require(self.lr > 0, "head_optim.lr", "must be > 0", self.lr)
        _require(0.0 <= self.momentum < 1.0, "head_optim.momentum", "must be in [0, 1)",
                 self.momentum)
        _require(self.weight_decay >= 0, "head_optim.weight_decay", "must be >= 0",
                 self.weight_decay)
        _require(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "head_optim.betas",
                 "must be two values in [0, 1)", self.betas)
        self.betas = tuple(float(b) for b in self.betas)
        _require(self.eps > 0, "head_optim.eps", "must be > 0", self.eps)
        _require(self.max_grad_norm >= 0, "head_optim.max_grad_norm", "must be >= 0",
                 self.max_grad_norm)


@dataclass
class ScheduleConfig:
    warmup_steps: int = 0
    """Linear warmup from 0 over this many optimizer steps."""
    decay: str = "poly"
    """Decay after warmup until train.steps: poly, cosine or constant."""
    power: float = 2.0
    """Exponent of the polynomial decay (insightface uses 2)."""
    min_lr_ratio: float = 0.0
    """Floor of the multiplier at the end of training, as a fraction of the peak LR."""
    apply_to_backbone: bool = True
    """Also scale the backbone's DeepSpeed-configured LR by the same multiplier (refused when
    the DeepSpeed JSON has its own "scheduler", which would be a second owner)."""
    allow_change: bool = False
    """Resume with another train.steps than the checkpoint was trained towards: the schedule is
    recomputed over the new length, so the LR jumps (refused unless true; logged when true)."""

    def __post_init__(self):
        _require_finite(self, "schedule")
        _require(self.warmup_steps >= 0, "schedule.warmup_steps", "must be >= 0",
                 self.warmup_steps)
        _require_choice(self.decay, WarmupDecay.DECAYS, "schedule.decay")
        _require(self.power > 0, "schedule.power", "must be > 0", self.power)
        _require(0.0 <= self.min_lr_ratio <= 1.0, "schedule.min_lr_ratio", "must be in [0, 1]",
                 self.min_lr_ratio)


@dataclass
class DataConfig:
    source: str = "synthetic"
    """synthetic (random images from a fixed per-class mean, no files) or webdataset."""
    urls: str = ""
    """Shards: the folder or s3:// prefix data/make_shards.py wrote (manifest.json inside), a
    manifest.json, or a brace pattern / pipe: command (then set data.samples_per_epoch)."""
    num_workers: int = 2
    """DataLoader worker processes per rank."""
    shuffle_buffer: int = 1000
    """WebDataset sample shuffle buffer."""
    synthetic_noise: float = 0.5
    """Synthetic source: std of the per-image noise around its class's mean image."""
    samples_per_epoch: int = 0
    """Epoch length in samples; 0: from the manifest. Needed when data.urls is a brace pattern,
    a list or a pipe: command without manifest.json."""
    retry_s: float = 20.0
    """Remote shards (s3://): how long a shard whose connection fails or stalls is retried
    (with backoff, losing no sample; each request's timeout is cut from what is left) before
    the run stops with an error naming shard and endpoint."""

    def __post_init__(self):
        _require_finite(self, "data")
        _require(self.source in ("synthetic", "webdataset"), "data.source",
                 "must be synthetic or webdataset", self.source)
        _require(self.source != "webdataset" or bool(self.urls), "data.urls",
                 "must be set when data.source is webdataset", self.urls)
        _require(self.num_workers >= 0, "data.num_workers", "must be >= 0", self.num_workers)
        _require(self.shuffle_buffer >= 0, "data.shuffle_buffer", "must be >= 0",
                 self.shuffle_buffer)
        _require(self.synthetic_noise >= 0, "data.synthetic_noise", "must be >= 0",
                 self.synthetic_noise)
        _require(self.retry_s >= 0, "data.retry_s", "must be >= 0 seconds", self.retry_s)
        _require(self.samples_per_epoch >= 0, "data.samples_per_epoch",
                 "must be >= 0 (0: from the manifest)", self.samples_per_epoch)


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps to train for (the engine's global_steps)."""
    output_dir: str = "runs/default"
    """Checkpoints and logs go here; a run resumes from its `latest` checkpoint automatically."""
    log_every: int = 10
    """Log loss, img/s, lr and loss scale on rank 0 every this many optimizer steps."""
    checkpoint_every: int = 500
    """Save a checkpoint every this many optimizer steps (and at the end); 0: only at the end."""
    keep_last: int = 0
    """Keep only the newest this many checkpoints (rank 0 deletes older complete ones after each
    save; never the one `latest` names); 0 keeps all."""
    resume: bool = True
    """Resume from output_dir's latest checkpoint when one exists."""
    seed: int = 0
    """Seed of the backbone init and the data order."""
    tensorboard: bool = True
    """Write TensorBoard scalars to output_dir/tb when tensorboard is installed."""
    trust_checkpoint: bool = False
    """Resume at the same size through DeepSpeed's own checkpoint loader, which unpickles its
    files (a crafted checkpoint could run code); only fp16 or bf16 without ZeRO needs it. By
    default every file is read as data only (hybrid/backbone.pt and the head shards)."""
    memory_check: bool = True
    """Plan every rank's memory before building anything (hybrid_fc.training.plan, as
    launch/plan.py) and refuse a run that will not fit, printing the plan and the setting to
    change."""
    preempt_save_s: float = 120.0
    """On SIGTERM / SIGINT every rank finishes its step and saves a checkpoint; if that save
    takes longer than this many seconds the run stops without it (`latest` keeps the previous
    checkpoint). Keep it below the grace period of your scheduler (SLURM --signal=TERM@T,
    Kubernetes terminationGracePeriodSeconds; DeepSpeed's launcher kills after 30 s)."""

    def __post_init__(self):
        _require_finite(self, "train")
        _require(self.steps >= 1, "train.steps", "must be >= 1", self.steps)
        _require(bool(self.output_dir), "train.output_dir", "must be set", self.output_dir)
        _require(self.log_every >= 1, "train.log_every", "must be >= 1", self.log_every)
        _require(self.keep_last >= 0, "train.keep_last", "must be >= 0 (0 keeps all)",
                 self.keep_last)
        _require(self.checkpoint_every >= 0, "train.checkpoint_every", "must be >= 0",
                 self.checkpoint_every)
        _require(self.preempt_save_s > 0, "train.preempt_save_s", "must be > 0 seconds",
                 self.preempt_save_s)


@dataclass
class EvalConfig:
    bins: List[str] = field(default_factory=list)
    """Verification pair sets evaluated during training: insightface .bin files (lfw.bin,
    cfp_fp.bin, agedb_30.bin) or pair lists; empty: no verification."""
    every: int = 2000
    """Verify every this many optimizer steps, and once more at the end of training."""
    batch_size: int = 64
    """Images per forward pass during verification (each is run with its mirror image)."""
    flip: bool = True
    """Flip test-time augmentation: embed f(x) + f(mirror(x))."""

    def __post_init__(self):
        _require_finite(self, "eval")
        _require(all(isinstance(b, str) and b for b in self.bins), "eval.bins",
                 "must be a list of pair-file paths", self.bins)
        _require(self.every >= 1, "eval.every", "must be >= 1", self.every)
        _require(self.batch_size >= 1, "eval.batch_size", "must be >= 1", self.batch_size)


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    """Backbone architecture."""
    head: HeadConfig = field(default_factory=HeadConfig)
    """The Partial FC head."""
    head_optim: HeadOptimConfig = field(default_factory=HeadOptimConfig)
    """The head's own optimizer (outside DeepSpeed)."""
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    """LR schedule shape, over train.steps."""
    data: DataConfig = field(default_factory=DataConfig)
    """Input pipeline."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop length, logging, checkpoints."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Periodic verification on pair sets during training."""

    def __post_init__(self):
        _require(self.schedule.warmup_steps <= self.train.steps, "schedule.warmup_steps",
                 f"must be <= train.steps ({self.train.steps})", self.schedule.warmup_steps)
        _require(self.head.margin != "arcface" or self.head.m < 3.14159, "head.m",
                 "arcface margin must be below pi", self.head.m)
        _require(not self.head.sparse_grad or self.head_optim.name.startswith("sparse_"),
                 "head.sparse_grad", "needs head_optim.name sparse_sgd or sparse_adamw",
                 self.head.sparse_grad)
        sparse_opt = self.head_optim.name.startswith("sparse_")
        _require(self.head.weight_dtype == "float32" or sparse_opt, "head.weight_dtype",
                 f"{self.head.weight_dtype} centers need head_optim.name sparse_sgd or "
                 "sparse_adamw (they write back with stochastic rounding; torch's optimizers "
                 "would round every update to nearest)", self.head.weight_dtype)
        _require(self.head.weight_dtype != "int8" or self.head.sparse_grad, "head.weight_dtype",
                 "int8 centers need head.sparse_grad=true (a dense gradient would be twice the "
                 "size of the centers)", self.head.weight_dtype)
        _require(self.head_optim.state_dtype == "float32" or sparse_opt, "head_optim.state_dtype",
                 "is an option of sparse_sgd / sparse_adamw only", self.head_optim.state_dtype)


_SECTIONS = {f.name: f.type for f in dataclasses.fields(ExperimentConfig)}


# -- type conversion ---------------------------------------------------------------------------
def _coerce(value: Any, tp: Any, name: str) -> Any:
    """Check / convert a YAML-parsed value to the annotated field type."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ValueError(f"{name}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # PyYAML reads `1e-3` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ValueError(f"{name}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ValueError(f"{name}: expected a string, got {value!r}")
    if origin in (tuple, Tuple):
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], name) for v in value)
        if len(value) != len(args):
            raise ValueError(f"{name}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, name) for v, a in zip(value, args))
    if origin in (list, List, Sequence):
        if isinstance(value, str) and args and args[0] is str:  # `eval.bins=lfw.bin`
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name}: expected a list, got {value!r}")
        return [_coerce(v, args[0], name) for v in value] if args else list(value)
    if origin in (dict, Dict):
        if not isinstance(value, dict):
            raise ValueError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    raise TypeError(f"{name}: unsupported field type {tp!r}")  # pragma: no cover


def _hints(cls):
    return typing.get_type_hints(cls)


def _build_section(cls, raw: Dict[str, Any], section: str):
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ValueError(f"{section}: expected a mapping of keys, got {raw!r}")
    hints = _hints(cls)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ValueError(f"unknown key(s) {', '.join(f'{section}.{k}' for k in unknown)}; "
                         f"valid keys of {section}: {', '.join(sorted(hints))}")
    kwargs = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in raw.items()}
    return cls(**kwargs)


def _from_dict(raw: Dict[str, Any]) -> ExperimentConfig:
    unknown = sorted(set(raw) - set(_SECTIONS))
    if unknown:
        raise ValueError(f"unknown section(s) {', '.join(unknown)}; valid sections: "
                         f"{', '.join(_SECTIONS)}")
    sections = {name: _build_section(_hints(ExperimentConfig)[name], raw.get(name), name)
                for name in _SECTIONS}
    return ExperimentConfig(**sections)


def config_to_dict(cfg: ExperimentConfig) -> Dict[str, Dict[str, Any]]:
    """Plain nested dict (tuples as lists), e.g. to save next to a checkpoint."""
    def plain(v):
        return [plain(x) for x in v] if isinstance(v, (list, tuple)) else v
    return {s: {k: plain(v) for k, v in dataclasses.asdict(getattr(cfg, s)).items()}
            for s in _SECTIONS}


# -- overrides ---------------------------------------------------------------------------------
def _resolve_key(key: str) -> Tuple[str, str]:
    if "." in key:
        section, name = key.split(".", 1)
        if section not in _SECTIONS:
            raise ValueError(f"unknown override {key!r}: no section {section!r} "
                             f"(sections: {', '.join(_SECTIONS)})")
        if name not in _hints(_hints(ExperimentConfig)[section]):
            raise ValueError(f"unknown override {key!r}: {section} has no key {name!r} (keys: "
                             f"{', '.join(sorted(_hints(_hints(ExperimentConfig)[section])))})")
        return section, name
    owners = [s for s in _SECTIONS if key in _hints(_hints(ExperimentConfig)[s])]
    if not owners:
        raise ValueError(f"unknown override {key!r}: no section has this key")
    if len(owners) > 1:
        raise ValueError(f"ambiguous override {key!r}: write one of "
                         f"{', '.join(f'{s}.{key}' for s in owners)}")
    return owners[0], key


def apply_overrides(raw: Dict[str, Any], overrides: Sequence[str]) -> Dict[str, Any]:
    """Apply `section.key=value` or `key=value` (when the key is in one section only) to a raw
    nested dict. Values are parsed as YAML (so `1e-3`, `true`, `[0.9, 0.99]`, `null` work)."""
    import yaml
    out = {s: dict(v or {}) for s, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        section, name = _resolve_key(key.strip())
        try:
            value = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError as exc:
            raise ValueError(f"override {item!r}: cannot parse value ({exc})") from None
        if isinstance(value, str) and value.strip() == "":
            value = text
        out.setdefault(section, {})[name] = value
    return out


def _read_yaml(path: str, seen=()) -> Dict[str, Any]:
    import yaml
    path = os.path.abspath(path)
    if path in seen:
        raise ValueError(f"config {path}: `base:` chain loops back to itself")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config {path}: no such file")
    with open(path) as f:
        try:
            raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:  # a syntax error, or a tag such as !!python/object
            first = " ".join(str(exc).split())[:300]
            raise ValueError(f"config {path}: not a plain YAML mapping ({first}); configs hold "
                             "numbers, strings, lists and mappings only") from None
    if not isinstance(raw, dict):
        raise ValueError(f"config {path}: expected a mapping of sections at the top level")
    for section, values in raw.items():
        if section != "base" and values is not None and not isinstance(values, dict):
            raise ValueError(f"config {path}: section {section!r} must be a mapping of keys "
                             f"(`{section}:` then indented `key: value` lines), got "
                             f"{type(values).__name__} {values!r:.80}")
    base = raw.pop("base", None)
    if base is not None and not isinstance(base, str):
        raise ValueError(f"config {path}: `base:` must name one YAML file, got {base!r:.80}")
    if base is None:
        return raw
    merged = _read_yaml(os.path.join(os.path.dirname(path), base), seen + (path,))
    for section, values in raw.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: Optional[str] = None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment config (with `base:` inheritance), apply overrides, validate."""
    raw = _read_yaml(path) if path else {}
    return _from_dict(apply_overrides(raw, overrides))


# -- the DeepSpeed JSON ------------------------------------------------------------------------
_DS_POSITIVE_INTS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "train_batch_size")


def check_deepspeed_config(ds: Any, where: str = "the DeepSpeed config") -> Dict[str, Any]:
    """The DeepSpeed JSON owns the engine (this module's docstring); DeepSpeed itself accepts
    non-finite numbers (`"gradient_clipping": NaN` trains to nan) and checks little before the
    model is built. Checked here, before anything large exists: a JSON object, every number
    finite (NaN / Infinity are JSON extensions Python reads), the batch sizes positive integers,
    the ZeRO stage 0-3. Returns `ds`; ValueError naming `where` and the key otherwise."""
    if not isinstance(ds, dict):
        raise ValueError(f"{where}: expected a JSON object of DeepSpeed settings, got "
                         f"{type(ds).__name__}")

    def walk(value, key):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            if not math.isfinite(value):
                raise ValueError(f"{where}: {key} must be a finite number, got {value!r}")
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, f"{key}.{k}" if key else str(k))
        elif isinstance(value, list):
            for i, v in enumerate(value):
                walk(v, f"{key}[{i}]")
    walk(ds, "")
    for key in _DS_POSITIVE_INTS:
        if key in ds and (isinstance(ds[key], bool) or not isinstance(ds[key], int)
                          or ds[key] < 1):
            raise ValueError(f"{where}: {key} must be a positive integer, got {ds[key]!r}")
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ValueError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3, got "
                         f"{zero.get('stage') if isinstance(zero, dict) else zero!r}")
    clip = ds.get("gradient_clipping", 0.0)
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or clip < 0:
        raise ValueError(f"{where}: gradient_clipping must be a number >= 0, got {clip!r}")
    return ds


def load_deepspeed_config(path: str) -> Dict[str, Any]:
    """Read and check a DeepSpeed JSON (check_deepspeed_config); errors name the file."""
    import json
    if not os.path.isfile(path):
        raise FileNotFoundError(f"DeepSpeed config {path}: no such file")
    with open(path) as f:
        try:
            ds = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"DeepSpeed config {path}: not valid JSON ({exc})") from None
    return check_deepspeed_config(ds, f"DeepSpeed config {path}")
