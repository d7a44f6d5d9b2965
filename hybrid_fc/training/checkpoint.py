"""Checkpoints of a HybridEngine that resume at any number of ranks.

A run folder (`train.output_dir`; this module owns every file name in it):
  config.json                        rank 0 at start: the experiment and DeepSpeed configs
  metrics.jsonl, training.log        hybrid_fc.training.metrics rows and printed lines
  tb/                                TensorBoard scalars (when tensorboard is installed)
  latest                             the tag of the newest complete checkpoint
  TAG/                               one checkpoint, below

Layout of `save_dir/TAG/`:
  (DeepSpeed's own files)            engine.save_checkpoint: exact same-world-size resume
  hybrid/head-rank{r:05d}.pt         one per head rank: class range [start, start + num_local),
                                     weight rows as stored (fp32, bf16, or int8 codes +
                                     "weight_scale", one fp32 scale per row), head-optimizer
                                     state (codes as stored), sampler RNG state; the rank's
                                     own backbone buffers and rank_state (a same-size resume
                                     restores them)
  hybrid/backbone.pt                 rank 0: world-size-independent backbone state: fp32 master
                                     weights, buffers (BatchNorm statistics averaged over the
                                     ranks) and optimizer state keyed by parameter
                                     name (e.g. SGD momentum_buffer, AdamW exp_avg/exp_avg_sq),
                                     engine counters, loss scaler, DeepSpeed LR scheduler
  hybrid/meta.json                   rank 0: format, num_classes, embedding_size, world size,
                                     class ranges, file list
  save_dir/latest                    the tag; moved last, by rank 0, after every rank's files
                                     are complete (a barrier), through a temporary name + rename

Every file goes to `<name>.tmp.<pid>` first and is renamed into place, so a killed writer leaves
no partial file under a final name, and `latest` still names the previous complete checkpoint
(DeepSpeed's own `save_checkpoint` lets rank 0 move `latest` without waiting for other ranks'
files, so it is called with save_latest=False and `latest` is written here).

Resume (`load_checkpoint`), at any data-parallel size: the backbone comes from
hybrid/backbone.pt through DeepSpeed's full-parameter utilities (ZeRO 1/2/3 partitions, bf16
optimizer) and the head rows are cut from the saved shards by class range; exact copies of the
saved values. Every file is read as data only (`load_file`: torch.load(weights_only=True)), so
a crafted checkpoint cannot run code. DeepSpeed's own files (its loader unpickles them) are
read only when the caller says it trusts them (trust_deepspeed_files=True, same size only).
"""
import contextlib
import glob
import json
import os
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..collectives import averaged_buffers
from ..common import stable_seed

__all__ = ["save_checkpoint", "load_checkpoint", "latest_tag", "load_file", "prune_checkpoints",
           "remove_stale_temps", "resolve_checkpoint", "read_meta", "model_config",
           "backbone_file", "head_shard_file", "deepspeed_model_states", "write_run_config",
           "read_run_config", "head_shards", "CheckpointError", "CheckpointMismatch", "CONFIG_FILE",
           "METRICS_FILE", "LOG_FILE", "TENSORBOARD_DIR"]

FORMAT = 1
CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
LOG_FILE = "training.log"
TENSORBOARD_DIR = "tb"
_META = "meta.json"
_BACKBONE = "backbone.pt"
_HYBRID = "hybrid"
_LATEST = "latest"
_DEEPSPEED_STATES = "*model_states.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked (missing, corrupt, or holding more than data);
    the message names the file."""


class CheckpointMismatch(CheckpointError):
    """The checkpoint does not fit the model it is loaded into (classes, width, parameters)."""


def load_file(path: str, mmap: bool = False) -> Any:
    """A file this project wrote, read as data only: torch.load(weights_only=True) admits
    tensors, numbers, strings, dtypes and containers of them, never code (a crafted pickle that
    would run a command is refused). Errors name the file."""
    import pickle
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused: it holds objects other than tensors and plain "
                              f"data ({first[:200]}); hybrid_fc reads checkpoints as data only, "
                              "since unpickling a crafted file runs code") from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot be read ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); the file is truncated or corrupt") from None


def _head_file(rank: int) -> str:
    return f"head-rank{rank:05d}.pt"


def backbone_file(save_dir: str, tag: str) -> str:
    """Path of a checkpoint's portable backbone state (hybrid/backbone.pt)."""
    return os.path.join(save_dir, tag, _HYBRID, _BACKBONE)


def head_shard_file(save_dir: str, tag: str, rank: int) -> str:
    """Path of head rank `rank`'s shard of a checkpoint."""
    return os.path.join(save_dir, tag, _HYBRID, _head_file(rank))


def deepspeed_model_states(tag_dir: str) -> List[str]:
    """DeepSpeed's own model-states files of a checkpoint tag folder, sorted (maybe none)."""
    return sorted(glob.glob(os.path.join(tag_dir, _DEEPSPEED_STATES)))


def write_run_config(output_dir: str, experiment: Dict[str, Any],
                     deepspeed_config: Dict[str, Any]) -> str:
    """The run's config.json: {"experiment": ..., "deepspeed": ...} (rank 0, at start)."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, CONFIG_FILE)
    _atomic_write_text(json.dumps({"experiment": experiment, "deepspeed": deepspeed_config},
                                  indent=1), path)
    return path


def read_run_config(output_dir: str) -> Optional[Dict[str, Any]]:
    """The run's config.json as written by write_run_config, or None when there is none."""
    path = os.path.join(output_dir, CONFIG_FILE)
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


_MODEL_KEYS = ("backbone", "embedding_size", "input_size", "backbone_kwargs")


# -- locating a checkpoint (export, eval and extract read through these) ---------------------
def _is_tag_dir(path: str) -> bool:
    return os.path.isdir(os.path.join(path, _HYBRID)) or bool(deepspeed_model_states(path))


def resolve_checkpoint(path: str, tag: Optional[str] = None) -> Tuple[str, str]:
    """(save_dir, tag) from a run folder (with `latest`), a run folder + tag, or a tag folder."""
    if not os.path.exists(path):
        raise CheckpointError(f"checkpoint {path!r} does not exist")
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path!r} is not a folder (a run folder, a tag "
                              "folder, or a backbone.pt written by launch/export.py)")
    if tag is None and not os.path.isfile(os.path.join(path, _LATEST)) and _is_tag_dir(path):
        path = os.path.abspath(path)
        return os.path.dirname(path), os.path.basename(path)
    if tag is None:
        tag = latest_tag(path)
        if tag is None:
            raise CheckpointError(f"checkpoint {path!r}: no `latest` file and not a checkpoint "
                                  "tag folder (expected TAG/hybrid/ or DeepSpeed "
                                  "*_model_states.pt files)")
    if not os.path.isdir(os.path.join(path, tag)):
        raise CheckpointError(f"checkpoint {path!r}: tag folder {tag!r} does not exist")
    return path, tag


def model_config(save_dir: str, client_state: Optional[dict]) -> Optional[Dict[str, Any]]:
    """The model section of the experiment config saved with the checkpoint, else the run's
    config.json (the trainer writes both), else what save_checkpoint noted of any model (the
    input size it was trained at and the embedding width: enough for an own backbone given by
    `--model module:factory`), else None."""
    model = ((client_state or {}).get("experiment") or {}).get("model")
    if not model:
        model = ((read_run_config(save_dir) or {}).get("experiment") or {}).get("model")
    if not model:
        model = (client_state or {}).get("model")
    if not isinstance(model, dict):
        return None
    return {k: model[k] for k in _MODEL_KEYS if k in model} or None


# -- small file utilities ----------------------------------------------------------------------
def _free_space(path: str) -> str:
    try:
        st = os.statvfs(os.path.dirname(os.path.abspath(path)))
        return f"{st.f_bavail * st.f_frsize / 1e9:.2f} GB free there"
    except OSError:
        return "free space unknown"


@contextlib.contextmanager
def _deferred_write_errors(engine):
    """DeepSpeed's save_checkpoint writes each rank's files between barriers: a rank whose
    write fails (disk full, a folder at the file's path) raises out of it while every other
    rank waits in its final barrier for ever. Inside this block the engine's writer records the
    failure (path, exception) in the yielded list, removes the partial file and skips this
    rank's remaining files, so every rank reaches the barrier; the caller then shares the
    failure with all ranks (agree_on_error)."""
    ce = engine.checkpoint_engine
    failed = []
    write = ce.save

    def save(state_dict, path, *args, **kwargs):
        if failed:
            return None
        try:
            return write(state_dict, path, *args, **kwargs)
        except (OSError, RuntimeError) as exc:  # torch.save: RuntimeError on a full disk
            failed.append((path, exc))
            if os.path.isfile(path):
                try:
                    os.remove(path)
                except OSError:
                    pass
            return None
    ce.save = save
    try:
        yield failed
    finally:
        del ce.save  # the instance attribute goes; the class's method is back


def _atomic_write(path: str, write) -> None:
    """write(tmp) to `path`.tmp.<pid>, then rename it into place. A failure (disk full, a file
    size limit, EIO) removes the temporary file and raises CheckpointError naming the file and
    the free space; torch's own message for it is "basic_ios::clear: iostream error"."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CheckpointError(f"cannot write {path} ({type(exc).__name__}: {str(exc)[:200]}; "
                              f"{_free_space(path)}): disk full, a quota or file-size limit, or "
                              "an I/O error; nothing of this checkpoint is marked complete"
                              ) from None


def _atomic_torch_save(obj, path: str) -> None:
    _atomic_write(path, lambda tmp: torch.save(obj, tmp))


def _atomic_write_text(text: str, path: str) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
    _atomic_write(path, write)


def remove_stale_temps(save_dir: str) -> List[str]:
    """Delete the `*.tmp.<pid>` files a killed or failed save left in `save_dir` (its `latest`
    and every tag's hybrid/ folder); returns their paths. Call it from one process per
    filesystem before the run's first save (the trainer: at start-up), never during one."""
    import re
    pattern = re.compile(r"\.tmp\.\d+$")
    removed = []
    if not os.path.isdir(save_dir):
        return removed
    folders = [save_dir] + [os.path.join(save_dir, t, _HYBRID) for t in os.listdir(save_dir)]
    for folder in folders:
        if not os.path.isdir(folder):
            continue
        for name in os.listdir(folder):
            if pattern.search(name):
                try:
                    os.remove(os.path.join(folder, name))
                    removed.append(os.path.join(folder, name))
                except OSError:
                    pass
    return removed


def latest_tag(load_dir: str) -> Optional[str]:
    """The tag named by `load_dir/latest`, or None when there is no `latest` file.

    A `latest` that does not name a checkpoint of this folder is an error, never a fresh
    start (which would write over the checkpoints): empty, unreadable, more than a plain
    folder name (`../other_run/global_step6`, an absolute path) or a folder that is not there.
    """
    path = os.path.join(load_dir, _LATEST)
    if not os.path.lexists(path):
        return None
    try:
        with open(path) as f:
            tag = f.read(4097).strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} cannot be read ({exc}); it should hold the name of the "
                              "newest checkpoint folder, e.g. global_step2000") from None
    fix = (f"write the name of a complete checkpoint folder of {load_dir} into it (echo "
           f"global_stepN > {path}), or use a new train.output_dir")
    if not tag:
        raise CheckpointError(f"{path} is empty: {fix}")
    if not _plain_name(tag):
        raise CheckpointError(f"{path} names {tag[:200]!r}, which is not a checkpoint folder "
                              f"of this run (a plain folder name inside it): {fix}")
    if not os.path.isdir(os.path.join(load_dir, tag)):
        raise CheckpointError(f"{path} names {tag!r} but {os.path.join(load_dir, tag)} does not "
                              f"exist: {fix}")
    return tag


def _plain_name(name: str) -> bool:
    """One path component: no separators, not '.', '..', no NUL, not hidden."""
    return (bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name
            and os.sep not in name and "\0" not in name and not name.startswith("."))


def find_checkpoint(load_dir: str) -> Optional[str]:
    """The tag a run in `load_dir` resumes from (its `latest`), or None for a fresh start.
    A folder that holds complete checkpoints but no `latest` is refused: a fresh start would
    write over them (CheckpointError naming the newest)."""
    tag = latest_tag(load_dir)
    if tag is not None or not os.path.isdir(load_dir):
        return tag
    found = []
    for name in os.listdir(load_dir):
        if os.path.isfile(os.path.join(load_dir, name, _HYBRID, _META)):
            found.append(name)
    if found:
        raise CheckpointError(f"{load_dir} holds checkpoints ({', '.join(sorted(found)[-3:])}) "
                              f"but no `latest` file: write the one to resume from into "
                              f"{os.path.join(load_dir, _LATEST)}, or use a new "
                              "train.output_dir (a fresh start here would overwrite them)")
    return None


def _barrier():
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _global_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# -- backbone: world-size-independent state -----------------------------------------------------
def _inner_optimizer(engine):
    """The torch optimizer that holds the state (inside DeepSpeed's ZeRO/bf16/fp16 wrappers)."""
    opt = engine.optimizer
    return getattr(opt, "optimizer", opt)


def _optimized_tensors(engine) -> List[torch.Tensor]:
    """The tensors the inner optimizer keys its state by: DeepSpeed's flat fp32 partitions under
    ZeRO/bf16 (ZeRO-3 empties the optimizer's param_groups between steps), else the params."""
    wrapper = engine.optimizer
    flats = getattr(wrapper, "fp32_partitioned_groups_flat", None)  # ZeRO-3
    if flats is None:
        flats = getattr(wrapper, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
    if flats is None:
        flats = getattr(wrapper, "fp32_groups_flat_partition", None)  # bf16 optimizer
    if flats is not None:
        return [f for f in flats if f is not None]
    return [q for g in _inner_optimizer(engine).param_groups for q in g["params"]]


def _state_keys(engine):
    """(per-element keys, scalar state) of the backbone optimizer, e.g. (['momentum_buffer'], {})
    for SGD, (['exp_avg', 'exp_avg_sq'], {'step': ...}) for torch AdamW."""
    inner = _inner_optimizer(engine)
    elem, scalars = [], {}
    for q in _optimized_tensors(engine):
        for key, value in inner.state.get(q, {}).items():
            if torch.is_tensor(value) and value.shape == q.shape and value.numel() > 1:
                if key not in elem:
                    elem.append(key)
            elif key not in scalars:
                scalars[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
    return elem, scalars


def _is_zero3(p) -> bool:
    return hasattr(p, "ds_id")


def _has_hp(p) -> bool:
    return _is_zero3(p) or hasattr(p, "_hp_mapping")


def _full_param(p) -> torch.Tensor:
    """The full fp32 master value of a backbone parameter (collective under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param
    if p.requires_grad and _has_hp(p):
        return safe_get_full_fp32_param(p).detach().float().cpu().clone()
    if _is_zero3(p):  # frozen ZeRO-3 parameter: gather its low-precision value
        import deepspeed
        with deepspeed.zero.GatheredParameters([p]):
            return p.detach().float().cpu().clone()
    return p.detach().float().cpu().clone()


def _full_state(engine, p, key) -> Optional[torch.Tensor]:
    from deepspeed.utils import safe_get_full_optimizer_state
    if not p.requires_grad:
        return None
    if _has_hp(p):
        return safe_get_full_optimizer_state(p, key).detach().float().cpu().clone()
    value = _inner_optimizer(engine).state.get(p, {}).get(key)
    return None if value is None else value.detach().float().cpu().clone()


def _loss_scaler_state(engine) -> Dict[str, Any]:
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is None:
        return {}
    return {k: v for k, v in vars(scaler).items() if isinstance(v, (bool, int, float))}


def backbone_state(engine) -> Dict[str, Any]:
    """Gather the engine's full backbone state on every rank (collective: all ranks call it).

    Cost: one all-reduce per parameter and optimizer-state tensor; the full fp32 values are held
    on the CPU of every rank while saving (rank 0 writes them)."""
    elem_keys, scalars = _state_keys(engine)
    params, state = {}, {}
    for name, p in engine.module.named_parameters():
        params[name] = _full_param(p)
        per = {k: _full_state(engine, p, k) for k in elem_keys}
        per = {k: v for k, v in per.items() if v is not None}
        if per:
            state[name] = per
    inner = _inner_optimizer(engine)
    return {
        "format": FORMAT,
        "params": params,
        "requires_grad": {n: p.requires_grad for n, p in engine.module.named_parameters()},
        "buffers": {n: b.detach().cpu().clone() for n, b in engine.module.named_buffers()},
        "optimizer": {"class": type(inner).__name__, "elem_keys": elem_keys, "scalars": scalars,
                      "state": state,
                      "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                       for g in inner.param_groups]},
        "counters": {"global_steps": engine.global_steps,
                     "global_samples": getattr(engine, "global_samples", 0),
                     "skipped_steps": engine.skipped_steps},
        "loss_scaler": _loss_scaler_state(engine),
        "lr_scheduler": (engine.lr_scheduler.state_dict()
                         if getattr(engine, "lr_scheduler", None) is not None
                         and hasattr(engine.lr_scheduler, "state_dict") else None),
        "dp_world_size": engine.dp_world_size,
    }


def _ensure_optimizer_state(engine, elem_keys: List[str], scalars: Dict[str, Any]):
    """Create the optimizer state that torch optimizers only create at their first step, so it
    can be filled (a fresh engine has none), and link DeepSpeed's fragment views to it."""
    inner = _inner_optimizer(engine)
    for q in _optimized_tensors(engine):
        st = inner.state[q]
        for key in elem_keys:
            if key not in st:
                st[key] = torch.zeros_like(q)
        for key, value in scalars.items():
            if key not in st:
                st[key] = value.clone().to(q.device) if torch.is_tensor(value) else value
    _link_optimizer_state(engine)


def _link_optimizer_state(engine) -> None:
    """Point ZeRO-1/2 and bf16-optimizer fragment views at the current optimizer state.

    DeepSpeed links them lazily after its first step; after a load (ours or its own) the state
    tensors are new, and `safe_get_full_optimizer_state` needs the links before any step."""
    wrapper = engine.optimizer
    inner = _inner_optimizer(engine)
    if hasattr(wrapper, "_lazy_init_hp_params_optimizer_state") and any(
            inner.state.get(q) for q in _optimized_tensors(engine)):
        wrapper._hp_optimizer_states_linked = False
        wrapper._lazy_init_hp_params_optimizer_state()


def _set_lp(p, value: torch.Tensor):
    """Write a full value into the model (low-precision) parameter on every rank."""
    if _is_zero3(p):
        import deepspeed
        with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
            if _global_rank() == 0:
                p.data.copy_(value.to(p.device, p.dtype).view_as(p))
    else:
        p.data.copy_(value.to(p.device, p.dtype).view_as(p))


def _set_full_hp(p, value: torch.Tensor, key: Optional[str] = None) -> None:
    """Write a full fp32 value (or optimizer state `key`) into this rank's master partition.

    ZeRO-3 is done here rather than by deepspeed's safe_set_full_* because DeepSpeed 0.19.8
    narrows the unpadded value at rank x partition size, which fails for the last rank of a
    padded parameter (16 elements over 3 ranks: partitions of 6)."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state
    if not _is_zero3(p):
        if key is None:
            safe_set_full_fp32_param(p, value)
        else:
            safe_set_full_optimizer_state(p, value, key)
        return
    opt = p._z3_optimizer
    part, _ = opt._get_fp32_opt_state_partition(p, release_swap_buffers=False,
                                                optim_state_key=key)
    start = part.numel() * opt._get_param_partition_rank(p)
    valid = max(0, min(part.numel(), p.ds_numel - start))
    flat = value.reshape(-1).to(part.device, part.dtype)
    part.data.zero_()
    part.data[:valid].copy_(flat[start:start + valid])


def load_backbone_state(engine, state: Dict[str, Any]) -> None:
    """Load `backbone_state` output into a (fresh) engine of any data-parallel size (collective)."""
    named = dict(engine.module.named_parameters())
    missing, unexpected = sorted(set(named) - set(state["params"])), \
        sorted(set(state["params"]) - set(named))
    if missing or unexpected:
        raise CheckpointMismatch(f"backbone parameters differ from the checkpoint: missing "
                                 f"{missing[:5]}, unexpected {unexpected[:5]}")
    for name, p in named.items():
        shape = tuple(p.ds_shape) if _is_zero3(p) else tuple(p.shape)
        if tuple(state["params"][name].shape) != shape:
            raise CheckpointMismatch(f"backbone parameter {name}: checkpoint shape "
                                     f"{tuple(state['params'][name].shape)}, model {shape}")
    # fp16 / bf16 without ZeRO: DeepSpeed's FP16_UnfusedOptimizer keeps fp32 master copies
    # and their optimizer state where backbone_state does not see them (a portable load would
    # restore the low-precision weights only and silently drop master values and momentum).
    low = engine.fp16_enabled() or engine.bfloat16_enabled()
    if low and not any(_has_hp(p) for p in named.values()):
        raise NotImplementedError("resharding an fp16/bf16 engine without ZeRO (stage 0) is not "
                                  "supported; use ZeRO stage >= 1 or resume at the same size")
    opt = state["optimizer"]
    inner = _inner_optimizer(engine)
    if opt["state"] and type(inner).__name__ != opt["class"]:
        raise CheckpointMismatch(f"backbone optimizer is {type(inner).__name__} but the "
                                 f"checkpoint holds {opt['class']} state")
    if opt["elem_keys"]:
        _ensure_optimizer_state(engine, opt["elem_keys"], opt["scalars"])
    for name, p in named.items():
        value = state["params"][name]
        if p.requires_grad and _has_hp(p):
            _set_full_hp(p, value.to(p.device))
            for key, v in opt["state"].get(name, {}).items():
                _set_full_hp(p, v.to(p.device), key)
        elif p.requires_grad:  # no ZeRO, fp32: the parameter is its own master
            for key, v in opt["state"].get(name, {}).items():
                inner.state[p][key].copy_(v.to(p.device).view_as(p))
        _set_lp(p, value)
    for name, b in engine.module.named_buffers():
        if name in state["buffers"]:
            b.data.copy_(state["buffers"][name].to(b.device, b.dtype))
    for group, saved in zip(inner.param_groups, opt["param_groups"]):
        group.update({k: v for k, v in saved.items() if k in group})
    c = state["counters"]
    engine.global_steps = c["global_steps"]
    engine.global_samples = c["global_samples"]
    engine.skipped_steps = c["skipped_steps"]
    engine.micro_steps = c["global_steps"] * engine.gradient_accumulation_steps()
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    if scaler is not None:
        for k, v in state["loss_scaler"].items():
            if hasattr(scaler, k):
                setattr(scaler, k, v)
    if state["lr_scheduler"] is not None and getattr(engine, "lr_scheduler", None) is not None:
        engine.lr_scheduler.load_state_dict(state["lr_scheduler"])


# -- head shards ---------------------------------------------------------------------------
def _center_parts(head) -> Dict[str, torch.Tensor]:
    """The head's stored center tensors by shard key: "weight" (fp32 / bf16 rows, or int8
    codes) and, for int8, "weight_scale" ((num_local,) fp32), saved and resharded as they are."""
    parts = {"weight": head.weight}
    if head.weight_scale is not None:
        parts["weight_scale"] = head.weight_scale
    return parts


def _head_shard(hybrid) -> Dict[str, Any]:
    head, opt = hybrid.head, hybrid.head_optimizer
    st = opt.state.get(head.weight, {})
    rows, scalars = {}, {}
    for key, value in st.items():
        if torch.is_tensor(value) and value.dim() >= 1 and value.shape[0] == head.num_local:
            rows[key] = value.detach().cpu().clone()
        else:
            scalars[key] = value.detach().cpu().clone() if torch.is_tensor(value) else value
    return {
        "format": FORMAT, "num_classes": head.num_classes,
        "embedding_size": head.embedding_size, "world_size": head.world_size, "rank": head.rank,
        "class_start": head.class_start, "num_local": head.num_local,
        **{key: t.detach().cpu().clone() for key, t in _center_parts(head).items()},
        "optimizer": {"class": type(opt).__name__, "rows": rows, "scalars": scalars,
                      "param_groups": [{k: v for k, v in g.items() if k != "params"}
                                       for g in opt.param_groups]},
        "rng": head.rng_state(),
    }


def head_shards(save_dir: str, tag: str, meta: Dict[str, Any], start: int, end: int):
    """The one reader of head shards by class range: yields (shard, lo, hi) for every shard of
    checkpoint `tag` that holds classes of [start, end), where `shard` is its dict (read as
    data, memory-mapped) and [lo, hi) the overlap in global class ids (its rows are
    [lo - shard["class_start"], hi - shard["class_start"]) of every per-row tensor). Each shard
    is checked against meta.json (class range, width), and the shards must cover [start, end)."""
    width, ranges = int(meta["embedding_size"]), meta["class_ranges"]
    covered = 0
    for r, (s, n) in enumerate(ranges):
        lo, hi = max(s, start), min(s + n, end)
        if lo >= hi:
            continue
        path = head_shard_file(save_dir, tag, r)
        if not os.path.isfile(path):
            raise CheckpointError(f"{path} is missing (meta.json lists {len(ranges)} head "
                                  "shards)")
        shard = load_file(path, mmap=True)
        weight = shard.get("weight") if isinstance(shard, dict) else None
        if not torch.is_tensor(weight) or (shard.get("class_start"), shard.get("num_local")) \
                != (s, n) or tuple(weight.shape) != (n, width):
            got = (f"classes [{shard['class_start']}, {shard['class_start'] + shard['num_local']})"
                   f" of width {weight.shape[-1]}" if torch.is_tensor(weight) and
                   isinstance(shard.get("class_start"), int) and
                   isinstance(shard.get("num_local"), int) else "no class range and weight")
            raise CheckpointMismatch(f"{path} holds {got}; meta.json says [{s}, {s + n}) of "
                                     f"width {width}")
        scale = shard.get("weight_scale")
        if (weight.dtype == torch.int8) != torch.is_tensor(scale) or (
                torch.is_tensor(scale) and tuple(scale.shape) != (n,)):
            raise CheckpointMismatch(f"{path}: int8 center codes need one fp32 scale per row "
                                     f"(weight_scale, ({n},)); it holds {weight.dtype} codes "
                                     f"and {tuple(scale.shape) if torch.is_tensor(scale) else 'no'}"
                                     " scales")
        yield shard, lo, hi
        covered += hi - lo
    if covered != end - start:
        raise CheckpointMismatch(f"{os.path.join(save_dir, tag, _HYBRID)}: head shards cover "
                                 f"{covered} of the {end - start} classes [{start}, {end})")


def _load_head(hybrid, load_dir: str, tag: str, meta: Dict[str, Any], same_layout: bool
               ) -> Any:
    """Fill this rank's head and head optimizer from the checkpoint's shards (any layout);
    returns (rank_state, the backbone buffers this rank had) of this rank's own shard when the
    layout is the same, else (None, None)."""
    head, opt = hybrid.head, hybrid.head_optimizer
    start, end = head.class_start, head.class_start + head.num_local
    mine = _center_parts(head)
    centers = {key: torch.empty_like(t, device="cpu") for key, t in mine.items()}
    rows: Dict[str, torch.Tensor] = {}
    scalars, groups, opt_class, rng, rank_state, buffers = None, None, None, None, None, None
    for shard, lo, hi in head_shards(load_dir, tag, meta, start, end):
        s = shard["class_start"]
        if (shard["weight"].dtype == torch.int8) != (head.weight.dtype == torch.int8):
            saved = str(shard["weight"].dtype).replace("torch.", "")
            raise CheckpointMismatch(
                f"the checkpoint stores {saved} class centers and the head "
                f"{str(head.weight.dtype).replace('torch.', '')} ones: int8 codes are not "
                f"converted on load; set head.weight_dtype={saved} to resume it")
        for key, t in centers.items():
            t[lo - start:hi - start] = shard[key][lo - s:hi - s]
        for key, value in shard["optimizer"]["rows"].items():
            if key not in rows:
                rows[key] = torch.empty((head.num_local,) + tuple(value.shape[1:]),
                                        dtype=value.dtype)
            rows[key][lo - start:hi - start] = value[lo - s:hi - s]
        scalars, groups = shard["optimizer"]["scalars"], shard["optimizer"]["param_groups"]
        opt_class = shard["optimizer"]["class"]
        if same_layout:
            rng, rank_state = shard["rng"], shard.get("rank_state")
            buffers = shard.get("buffers")
    if type(opt).__name__ != opt_class and (rows or scalars):
        raise CheckpointMismatch(f"head optimizer is {type(opt).__name__} but the checkpoint "
                                 f"holds {opt_class} state")
    with torch.no_grad():
        for key, t in mine.items():
            t.copy_(centers[key].to(t.device))
    device = head.weight.device
    new_state = {k: v.to(device) for k, v in rows.items()}
    new_state.update({k: (v.clone().to(device) if torch.is_tensor(v) else v)
                      for k, v in (scalars or {}).items()})
    if new_state:
        opt.state[head.weight] = new_state
    for group, saved in zip(opt.param_groups, groups or []):
        group.update({k: v for k, v in saved.items() if k in group})
    if rng is not None:
        head.set_rng_state(rng)
    else:
        # New layout: a fresh sampler stream per rank, distinct from the first run's streams.
        g = torch.Generator(device=device)
        g.manual_seed(stable_seed("resume", head.seed, meta["global_steps"], head.rank))
        head.set_rng_state({"state": g.get_state()})
    return rank_state, buffers


# -- public API ----------------------------------------------------------------------------
def save_checkpoint(hybrid, save_dir: str, tag: Optional[str] = None,
                    client_state: Optional[Dict[str, Any]] = None,
                    rank_state: Any = None) -> str:
    """Save engine, head shards and the portable backbone state; returns the tag directory.

    client_state: one dict for all ranks (rank 0's is kept, as DeepSpeed does).
    rank_state: this rank's own picklable state (e.g. its data loader position), stored in its
      head shard and given back on a resume with the same number of ranks.
    Collective: every rank calls it. `latest` moves only after every rank's files exist.
    The portable backbone holds the BatchNorm running statistics averaged over the ranks (one
    model, for export and evaluation); each rank's own, which it goes on training with, are in
    its head shard, so a same-size resume continues exactly as if no save had happened. The
    input size of the square images trained on is noted (client_state["model"], unless given),
    so export / eval / extract of an own backbone (`--model module:factory`) need no more."""
    engine, head = hybrid.engine, hybrid.head
    tag = str(tag if tag is not None else f"global_step{engine.global_steps}")
    client_state = dict(client_state or {})
    shape = getattr(hybrid, "input_shape", None)
    if shape is not None and len(shape) == 3 and shape[1] == shape[2]:  # what eval will need
        client_state.setdefault("model", {"input_size": int(shape[1]),
                                          "embedding_size": head.embedding_size})
    folder = os.path.join(save_dir, tag)
    hfolder = os.path.join(folder, _HYBRID)
    rank = _global_rank()
    bstate = backbone_state(engine)                                    # collective
    # one set of BatchNorm statistics (the ranks' mean) for the portable backbone; the live
    # model keeps each rank's own, which its head shard keeps for a same-size resume
    bstate["buffers"] = {n: b.detach().cpu() for n, b in
                         averaged_buffers(engine.module, head.process_group).items()}
    # Never a checkpoint of inf/nan weights: decided on every rank before anything is written.
    bad = [n for n, v in bstate["params"].items() if not bool(torch.isfinite(v).all())]
    if not all(bool(torch.isfinite(t.detach()).all()) for t in _center_parts(head).values()):
        bad.append(f"head centers of rank {head.rank}")
    from ..collectives import all_ranks_true
    if not all_ranks_true(not bad):
        raise FloatingPointError(
            f"not saving {folder}: non-finite weights ({', '.join(bad[:4]) or 'on another rank'}"
            f"); the last good checkpoint is {latest_tag(save_dir) or 'none'} in {save_dir}")
    from ..collectives import agree_on_error
    error = None
    try:  # a rank that cannot write says so to all: none waits alone in the next barrier
        if rank == 0:
            os.makedirs(hfolder, exist_ok=True)
    except OSError as exc:
        error = CheckpointError(f"cannot create {hfolder}: {exc}")
    agree_on_error(error)
    try:
        os.makedirs(hfolder, exist_ok=True)  # ranks on other nodes with their own view
        if rank == 0:
            bstate["client_state"] = client_state or {}
            _atomic_torch_save(bstate, os.path.join(hfolder, _BACKBONE))
        del bstate
        shard = _head_shard(hybrid)
        shard["rank_state"] = rank_state
        shard["buffers"] = {n: b.detach().cpu().clone()
                            for n, b in engine.module.named_buffers()}
        _atomic_torch_save(shard, os.path.join(hfolder, _head_file(head.rank)))
        del shard
    except (CheckpointError, OSError) as exc:
        error = exc
    agree_on_error(error)
    with _deferred_write_errors(engine) as failed:
        try:
            engine.save_checkpoint(save_dir, tag, client_state=client_state or {},
                                   save_latest=False)
        except (OSError, RuntimeError) as exc:
            failed.append((folder, exc))
    if failed:
        path, exc = failed[0]
        error = CheckpointError(f"cannot write DeepSpeed's file {path} ({type(exc).__name__}: "
                                f"{str(exc)[:200]}; {_free_space(path)}): disk full, a quota, "
                                "an I/O error or something else at that path; nothing of this "
                                "checkpoint is marked complete")
    agree_on_error(error)
    if rank == 0:
        meta = {"format": FORMAT, "tag": tag, "num_classes": head.num_classes,
                "embedding_size": head.embedding_size, "world_size": head.world_size,
                "dp_world_size": engine.dp_world_size, "global_steps": engine.global_steps,
                "class_ranges": [[r.start, r.num_local]
                                 for r in _ranges_of(head.num_classes, head.world_size)],
                "files": [_BACKBONE] + [_head_file(r) for r in range(head.world_size)],
                "experiment": (client_state or {}).get("experiment") or {},
                "run": (client_state or {}).get("run") or {}}
        try:
            _atomic_write_text(json.dumps(meta, indent=1), os.path.join(hfolder, _META))
        except CheckpointError as exc:
            error = exc
    agree_on_error(error)                             # every rank's files are complete
    if rank == 0:
        try:
            _atomic_write_text(tag, os.path.join(save_dir, _LATEST))
        except CheckpointError as exc:
            error = exc
    agree_on_error(error)
    return folder


def prune_checkpoints(save_dir: str, keep_last: int) -> List[str]:
    """Delete all but the newest `keep_last` complete checkpoints of `save_dir`; returns the
    deleted tag folders. Complete = has hybrid/meta.json (written last by save_checkpoint);
    newest = highest saved global_steps. The tag `latest` names is never deleted, nor is an
    incomplete tag newer than the newest complete one (a save may be writing it). Call it from
    one process (rank 0) after save_checkpoint has returned, never during a save."""
    import shutil
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    latest = latest_tag(save_dir)
    complete = []
    for name in os.listdir(save_dir):
        meta = os.path.join(save_dir, name, _HYBRID, _META)
        if not os.path.isfile(meta):
            continue
        try:
            with open(meta) as f:
                steps = int(json.load(f)["global_steps"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not ours to judge: leave it
        complete.append((steps, name))
    complete.sort()
    removed = []
    for _, name in complete[:-keep_last]:
        if name == latest:
            continue
        shutil.rmtree(os.path.join(save_dir, name), ignore_errors=True)
        removed.append(name)
    return removed


def _ranges_of(num_classes: int, world_size: int):
    from ..head.partition import shard_ranges
    return shard_ranges(num_classes, world_size)


def read_meta(load_dir: str, tag: str) -> Dict[str, Any]:
    """A checkpoint's hybrid/meta.json, checked: every field there with its type, and class
    ranges that tile [0, num_classes) over `world_size` shards (CheckpointError naming the file
    and field otherwise). It also holds the run's experiment config and run facts (world size,
    global batch, data), so a resume can be checked before anything is built."""
    path = os.path.join(load_dir, tag, _HYBRID, _META)
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} is missing: {os.path.join(load_dir, tag)} is not a "
                              "complete hybrid_fc checkpoint")
    with open(path) as f:
        try:
            meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: not valid JSON ({exc}); the checkpoint's metadata "
                                  "is corrupt") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(meta).__name__}")
    for key, low in (("num_classes", 1), ("embedding_size", 1), ("world_size", 1),
                     ("dp_world_size", 1), ("global_steps", 0)):
        value = meta.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise CheckpointError(f"{path}: {key} must be an integer >= {low}, got {value!r}; "
                                  "the checkpoint's metadata is corrupt")
    ranges = meta.get("class_ranges")
    expected = [[r.start, r.num_local] for r in _ranges_of(meta["num_classes"],
                                                            meta["world_size"])]
    if ranges != expected:
        raise CheckpointError(f"{path}: class_ranges {str(ranges)[:120]} are not the split of "
                              f"{meta['num_classes']} classes over {meta['world_size']} head "
                              "shards; the checkpoint's metadata is corrupt")
    for key in ("experiment", "run"):
        if not isinstance(meta.get(key, {}), dict):
            raise CheckpointError(f"{path}: {key} must be a JSON object")
    return meta


def load_checkpoint(hybrid, load_dir: str, tag: Optional[str] = None,
                    trust_deepspeed_files: bool = False) -> Optional[Dict[str, Any]]:
    """Restore a checkpoint saved by `save_checkpoint` at any number of ranks.

    Returns the saved client_state, or None when `load_dir` has no checkpoint (fresh start),
    with two entries added: "same_layout" (the same number of head ranks) and "rank_state":
    this rank's own `rank_state` when the layout is the same, else rank 0's (a per-rank data
    position can only move to the same fraction of its epoch at another size).
    Everything is read as data only (`load_file`): the backbone from hybrid/backbone.pt, the
    head from its shards, at any size. trust_deepspeed_files=True lets DeepSpeed's own loader
    read its files instead at the same data-parallel size (needed only for fp16 or bf16 without
    ZeRO); that loader unpickles them, so a crafted checkpoint could run code: trusted
    checkpoints only. A checkpoint of non-finite weights is refused on every rank (it is not
    "the last good one"). Collective: every rank calls it."""
    engine, head = hybrid.engine, hybrid.head
    tag = tag or latest_tag(load_dir)
    if tag is None:
        return None
    meta = read_meta(load_dir, tag)
    where = os.path.join(load_dir, tag)
    for field, mine in (("num_classes", head.num_classes),
                        ("embedding_size", head.embedding_size)):
        if meta[field] != mine:
            raise CheckpointMismatch(f"{field}: the checkpoint {where} has {field}="
                                     f"{meta[field]} but the head has {mine}")
    folder = os.path.join(load_dir, tag, _HYBRID)
    same_size = meta["dp_world_size"] == engine.dp_world_size
    bad = []
    if not (trust_deepspeed_files and same_size):
        bstate = load_file(os.path.join(folder, _BACKBONE))
        if not isinstance(bstate, dict) or not isinstance(bstate.get("params"), dict):
            raise CheckpointError(f"{os.path.join(folder, _BACKBONE)}: not a backbone state "
                                  "written by hybrid_fc (no 'params')")
        bad = [n for n, v in bstate["params"].items() if torch.is_tensor(v)
               and v.is_floating_point() and not bool(torch.isfinite(v).all())]
        try:
            load_backbone_state(engine, bstate)
        except NotImplementedError as exc:
            raise NotImplementedError(f"{exc}; at the same size DeepSpeed's own files can "
                                      "restore it: trust_deepspeed_files=True "
                                      "(train.trust_checkpoint=true), for trusted checkpoints "
                                      "only (they are unpickled)") from None
        client_state = bstate.get("client_state", {})
        del bstate
    else:
        path, client_state = engine.load_checkpoint(load_dir, tag, load_optimizer_states=True,
                                                    load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load {where}")
        _link_optimizer_state(engine)
    client_state = dict(client_state or {})
    same_layout = meta["world_size"] == head.world_size
    client_state["same_layout"] = same_layout
    client_state["rank_state"], buffers = _load_head(hybrid, load_dir, tag, meta, same_layout)
    if buffers:  # same layout: this rank's own BatchNorm statistics, as it left them
        with torch.no_grad():
            for name, b in engine.module.named_buffers():
                if name in buffers:
                    b.copy_(buffers[name].to(b.device, b.dtype))
    if not same_layout:  # rank 0's data position, for the same fraction of the epoch
        shard = load_file(head_shard_file(load_dir, tag, 0), mmap=True)
        client_state["rank_state"] = shard.get("rank_state") if isinstance(shard, dict) else None
    if not bool(torch.isfinite(head.weight.detach()).all()):
        bad.append(f"head centers of classes [{head.class_start}, "
                   f"{head.class_start + head.num_local})")
    from ..collectives import all_ranks_true
    if not all_ranks_true(not bad):
        raise CheckpointError(f"{where} holds non-finite weights ("
                              f"{', '.join(bad[:3]) or 'on another rank'}): it is not a usable "
                              f"checkpoint; write an earlier tag into "
                              f"{os.path.join(load_dir, _LATEST)} to resume from it")
    _barrier()
    return client_state
