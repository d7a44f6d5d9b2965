"""HybridEngine: a PartialFC head beside a DeepSpeed engine that trains the backbone.

The backbone is data-parallel under DeepSpeed (ZeRO 0-3, fp32/bf16/fp16); the head is
model-parallel and stays *outside* the engine with its own fp32 weights and optimizer, so ZeRO
never all-reduces or partitions class centers. One micro-step:

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
import os
import sys
import threading
import time
from typing import Callable, List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["HybridEngine", "WarmupDecay", "clear_stale_build_locks", "rank_memory_bytes",
           "release_shm_buffers", "finish_distributed", "run_script", "standalone_defaults",
           "watch_build_locks"]


def _build_locks():
    """(path, age in seconds) of every torch JIT-extension build lock under
    TORCH_EXTENSIONS_DIR, else torch's default root (~/.cache/torch_extensions)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = get_default_build_root()
    for dirpath, _, files in os.walk(root):
        if "lock" in files:
            lock = os.path.join(dirpath, "lock")
            try:
                yield lock, time.time() - os.path.getmtime(lock)
            except FileNotFoundError:  # released meanwhile
                continue


def _waiting_message(lock: str, age: float, stale_after_s: float) -> str:
    return (f"hybrid_fc: DeepSpeed is waiting on the op build lock {lock} ({age:.0f} s old). "
            "A build takes about a minute; if no other run is starting on this machine, the "
            "lock was left by a process killed while building or loading the op: remove it "
            f"(it is removed at start once {stale_after_s / 60:.0f} minutes old)")


def clear_stale_build_locks(stale_after_s: float = 1800.0, print_fn=print) -> List[str]:
    """Remove torch JIT-extension build locks older than `stale_after_s`; returns their paths.

    DeepSpeed JIT-compiles ops (the CPU backend's deepspeed_shm_comm at every start, FusedAdam
    and others on GPUs) through torch.utils.cpp_extension, which serializes builds with a bare
    `lock` file in the op's build folder and waits, silently and without end, while it exists.
    A process killed during the build or the load (Ctrl-C at start-up, a job timeout) leaves the
    file behind, and every later run on that machine hangs at start-up. A build takes minutes,
    not half an hour, so an older lock has no live owner. A younger lock may be another run
    building right now: left alone, and mentioned only when it is over 2 minutes old (and by
    watch_build_locks if the start-up is still waiting 2 minutes later). Call it from one
    process per machine (local rank 0) before DeepSpeed starts, so that two ranks never remove
    a lock the other just took."""
    removed = []
    for lock, age in _build_locks():
        if age > stale_after_s:
            try:
                os.remove(lock)
            except FileNotFoundError:
                continue
            removed.append(lock)
            print_fn(f"hybrid_fc: removed a stale build lock {lock} ({age / 60:.0f} min old; "
                     "its process died while building or loading a DeepSpeed op)")
        elif age > 120:
            print_fn(_waiting_message(lock, age, stale_after_s))
    return removed


def watch_build_locks(after_s: float = 120.0, stale_after_s: float = 1800.0, print_fn=print):
    """A daemon thread that, if DeepSpeed's start-up is still running `after_s` seconds from
    now, names any build lock it may be waiting on (torch waits on one silently, for ever).
    Returns the Event to set when start-up is done."""
    done = threading.Event()

    def watch():
        if not done.wait(after_s):
            for lock, age in _build_locks():
                print_fn(_waiting_message(lock, age, stale_after_s))
    threading.Thread(target=watch, daemon=True, name="hybrid_fc-build-lock-watch").start()
    return done


def release_shm_buffers() -> Optional[str]:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm; returns its path if it
    was there. Collective (one barrier): call it on every rank right after
    deepspeed.init_distributed().

    DeepSpeed's CPU backend creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank> (69 MB, RAM) per rank and never unlinks it, also after a normal exit: an afternoon of
    runs piled up gigabytes. Its shm_initialize maps every local rank's buffer before
    init_distributed returns, so after a barrier every mapping exists and the names can go (a
    mapping outlives its name; the memory is freed when the last process unmaps it, at exit).
    Nothing to do on GPUs (no such buffer)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    name = os.path.join("/dev/shm", f"deepspeed_allreduce_buffer_{os.getuid()}_"
                        f"{os.environ.get('MASTER_ADDR', '')}_{os.environ.get('MASTER_PORT', '')}_"
                        f"{dist.get_rank()}")
    dist.barrier()
    try:
        os.unlink(name)
    except (FileNotFoundError, PermissionError):
        return None
    return name


def standalone_defaults() -> bool:
    """`python launch/train.py` without a launcher: make this process a world of one (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT) so that deepspeed.init_distributed
    does not go looking for MPI (mpi4py). Returns True when it did; under deepspeed, torchrun or
    mpirun (their variables present) it changes nothing."""
    if any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")) or (
            dist.is_available() and dist.is_initialized()):
        return False
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    return True


def finish_distributed() -> None:
    """End a launch script's process group cleanly: a barrier (no rank leaves while another still
    talks to it), then destroy_process_group so gloo's threads are joined before the interpreter
    exits. Without it a rank that reaches exit first could die of SIGABRT ("terminate called
    without an active exception", about 1 run in 6 of 2-rank eval on CPU) and the launcher then
    reports the whole run as failed. No-op when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _input_error(exc: BaseException) -> bool:
    """An error about the run's input (a config field, a file, a shard, memory that will not
    suffice, a diverged loss), whose message says what to change: shown without a traceback."""
    mine = type(exc).__module__.startswith("hybrid_fc")
    return mine or isinstance(exc, (ValueError, FileNotFoundError, MemoryError,
                                    FloatingPointError))


def run_script(main, argv=None) -> int:
    """A launch script's entry: main(argv), then the process group's clean end; returns the
    exit status. Logs stay readable on N ranks: a rank that stops because another failed
    (RankFailed) prints one line naming that rank; an input error (a bad config field, file,
    shard...) prints its message as one line per rank that raised it; anything else is a bug
    and keeps its traceback. `--verbose` (or HYBRID_FC_TRACEBACK=1) shows every traceback."""
    from .collectives import RankFailed
    verbose = "--verbose" in sys.argv[1:] or os.environ.get("HYBRID_FC_TRACEBACK") == "1"
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None else ""
    try:
        main(argv)
    except RankFailed as exc:
        if verbose:
            raise
        print(f"hybrid_fc{where}: stopping: {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if verbose or not _input_error(exc):
            raise
        print(f"hybrid_fc{where}: error: {type(exc).__name__}: {exc}\n(HYBRID_FC_TRACEBACK=1 "
              "or --verbose shows the traceback)", file=sys.stderr, flush=True)
        return 1
    finish_distributed()
    return 0


def rank_memory_bytes(device: torch.device) -> Tuple[int, float]:
    """(bytes one rank may use, reserve to keep back) for the memory plan: a GPU's total memory
    with 3 GB kept for the CUDA context, NCCL and allocator slack; on a CPU the memory the
    system reports available now, shared by this node's ranks (LOCAL_WORLD_SIZE under torchrun,
    LOCAL_SIZE under deepspeed), with 1 GB
    per rank kept for the interpreter and DeepSpeed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, 3e9
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return available // max(1, int(local)), 1e9  # torchrun / deepspeed's launcher


class WarmupDecay:
    """LR multiplier for optimizer step `s` (0-based): linear warmup, then poly/cosine decay.

    warmup: (s + 1) / warmup_steps for s < warmup_steps (the first step is not wasted at 0).
    decay over the remaining steps until total_steps, from 1 down to min_ratio:
      poly:   min_ratio + (1 - min_ratio) * (1 - t) ** power
      cosine: min_ratio + (1 - min_ratio) * (1 + cos(pi t)) / 2
      constant: 1
    with t = (s - warmup_steps) / (total_steps - warmup_steps), clamped to [0, 1].
    """

    def __init__(self, total_steps: int, warmup_steps: int = 0, decay: str = "poly",
                 power: float = 2.0, min_ratio: float = 0.0):
        if total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        if not 0 <= warmup_steps <= total_steps:
            raise ValueError(f"warmup_steps must be in [0, total_steps={total_steps}], "
                             f"got {warmup_steps}")
        if decay not in ("poly", "cosine", "constant"):
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
        shape = (1.0 - t) ** self.power if self.decay == "poly" else 0.5 * (1 + math.cos(math.pi * t))
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
        hybrid_fc.optim.SparseSGD with `sparse_grad=True`).
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
        """Optimizer steps taken by the engine (skipped fp16 steps included, as DeepSpeed counts)."""
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
        save_checkpoint and distributed evaluation call this so that every rank evaluates, and
        the checkpoint keeps, one model. Collective (hybrid_fc.collectives.sync_buffers)."""
        from hybrid_fc.collectives import sync_buffers
        sync_buffers(self.engine.module, self.head.process_group)

    def train(self, mode: bool = True):
        self.engine.train(mode)
        self.head.train(mode)
        return self

    def eval(self):
        return self.train(False)
