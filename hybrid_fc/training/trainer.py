"""The training run as an object: `Trainer(cfg, ds_config).fit()`.

Built from an ExperimentConfig (hybrid_fc.training.config) and a DeepSpeed JSON dict: the memory
plan before anything large exists, the backbone under deepspeed.initialize, the Partial FC head
and its optimizer, the LR schedule, this rank's input streams, checkpoint cadence and pruning,
and the metrics log (hybrid_fc.training.metrics). The periodic verification of eval.bins is
passed in (`verification=hybrid_fc.evaluation.build_verification`), so the training package
never imports evaluation. launch/train.py only parses arguments and calls it; a Python program
can do the same:

    from hybrid_fc.evaluation import build_verification
    from hybrid_fc.training import Trainer, load_config
    hybrid = Trainer(load_config("launch/configs/quickstart.yaml", ["train.steps=50"]),
                     json.load(open("ds_configs/cpu_zero1_fp32.json")),
                     verification=build_verification).fit()

Everything a step depends on is per-rank checkpoint state (InputStreams: loader position, the
augmentation generator, torch's generators; the head's sampler stream; optimizer, LR schedule
and loss scale in the engine), so a run restarted at the same number of ranks ends bit-identical
to an uninterrupted one.
"""
import logging
import os
import time
from typing import Any, Callable, Dict, Optional

import torch

from ..backbones import build_backbone
from ..collectives import agree_on_error, all_ranks_true
from ..common import stable_seed
from ..head import PartialFC
from ..head.margins import make_margin
from ..head.optim import make_head_optimizer
from ..runtime import join_process_group, quiet_logs, rank_memory_bytes, starting_up
from .checkpoint import (TENSORBOARD_DIR, latest_tag, load_checkpoint, prune_checkpoints,
                         remove_stale_temps, save_checkpoint, write_run_config)
from .config import config_to_dict
from .engine import HybridEngine, WarmupDecay
from .metrics import MetricsLog
from .plan import plan_experiment

logger = logging.getLogger("hybrid_fc.train")

__all__ = ["Trainer", "InputStreams", "build_margin", "build_head_optimizer"]


# -- pieces built from the config ------------------------------------------------------------
def build_margin(cfg):
    h = cfg.head
    return make_margin(h.margin, h.scale, h.m, h.combined)


def build_head_optimizer(cfg, params):
    o = cfg.head_optim
    return make_head_optimizer(o.name, params, lr=o.lr, momentum=o.momentum,
                               weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                               state_dtype=getattr(torch, o.state_dtype), rounding=o.rounding,
                               seed=cfg.head.seed)


class InputStreams:
    """This rank's input: the batches and every random stream they depend on, as one state that
    the checkpoint holds per rank (`state_dict` / `load_state_dict`), so that a run restarted at
    the same size reads and augments exactly what the uninterrupted run would have:
      - webdataset: the loader's position (hybrid_fc.data's exact-resume state);
      - synthetic: micro-batch k is drawn from a generator seeded by (seed, rank, k), a pure
        function of the position;
      - the flip augmentation's own generator (never torch's global one, which the trainer
        reseeds at every start), and torch's global CPU/CUDA generators (dropout and the like).
    At another world size none of it applies (the loader continues at the same fraction of its
    epoch in another order; hybrid_fc.data logs it)."""

    def __init__(self, cfg, batch_size, rank, world_size, device):
        self.cfg, self.batch_size, self.rank, self.device = cfg, batch_size, rank, device
        self.micro_batches = 0
        self.augment_rng = torch.Generator(device=device)
        self.augment_rng.manual_seed(stable_seed("augment", cfg.train.seed, rank) >> 1)
        self.loader = None
        if cfg.data.source == "webdataset":
            from ..data import make_loader
            self.loader = make_loader(cfg.data.urls, batch_size, rank=rank, world_size=world_size,
                                      num_workers=cfg.data.num_workers,
                                      shuffle_buffer=cfg.data.shuffle_buffer,
                                      seed=cfg.train.seed, image_size=cfg.model.input_size,
                                      retry_s=cfg.data.retry_s,
                                      samples_per_epoch=cfg.data.samples_per_epoch or None)
            n = self.loader.num_classes
            if n is not None and n > cfg.head.num_classes:
                raise ValueError(f"head.num_classes={cfg.head.num_classes} but the dataset "
                                 f"{cfg.data.urls} has {n} classes")
        self._batches = None

    def state_dict(self) -> dict:
        state = {"micro_batches": self.micro_batches, "augment_rng": self.augment_rng.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "loader": self.loader.state_dict() if self.loader is not None else None}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict) -> None:
        if "micro_batches" not in state:  # a checkpoint of an older version: the loader's state
            state = {"loader": state}
        self.micro_batches = int(state.get("micro_batches", 0))
        if "augment_rng" in state:
            self.augment_rng.set_state(state["augment_rng"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.loader is not None and state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])

    def __next__(self):
        """The next micro-batch. Collective: a loader that fails on one rank (a ShardError, a
        worker that died) stops every rank at the same step, the others with RankFailed naming
        it, instead of leaving them in the head's next collective (one tiny all-reduce)."""
        if self._batches is None:
            self._batches = (self._synthetic() if self.loader is None else self._webdataset())
        error = None
        try:
            images, labels = next(self._batches)
        except Exception as exc:  # noqa: BLE001 - shared with the other ranks, then re-raised
            error = exc
        agree_on_error(error)
        self.micro_batches += 1
        return images, labels

    def _synthetic(self):
        """In-memory synthetic identities (no files): class c's images are a fixed random image
        (seeded by c) plus Gaussian noise of std data.synthetic_noise; distinct per rank."""
        cfg, b = self.cfg, self.batch_size
        size, C = cfg.model.input_size, cfg.head.num_classes
        means = torch.randn(C, 3, size, size,
                            generator=torch.Generator().manual_seed(cfg.train.seed))
        while True:
            g = torch.Generator().manual_seed(
                stable_seed("synthetic", cfg.train.seed, self.rank, self.micro_batches) >> 1)
            labels = torch.randint(0, C, (b,), generator=g)
            noise = torch.randn(b, 3, size, size, generator=g) * cfg.data.synthetic_noise
            yield (means[labels] + noise).to(self.device), labels.to(self.device)

    def _webdataset(self):
        from ..data import augment
        while True:
            for images, labels in self.loader:
                yield (augment(images.to(self.device), generator=self.augment_rng),
                       labels.to(self.device))


class _Log:
    """Rank 0's progress line, metrics.jsonl / training.log rows (hybrid_fc.training.metrics) and
    TensorBoard scalars when tensorboard is installed."""

    def __init__(self, cfg, rank, images_per_step):
        self.rank, self.every, self.total = rank, cfg.train.log_every, cfg.train.steps
        self.images_per_step = images_per_step
        self.metrics = MetricsLog(cfg.train.output_dir, rank)
        self.loss_sum, self.count = None, 0
        self.t0, self.start = time.time(), time.time()
        self.writer = None
        if rank == 0 and cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(cfg.train.output_dir, TENSORBOARD_DIR))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def exclude(self, fn):
        """Run fn (e.g. a verification) without counting its time against training img/s."""
        t = time.time()
        out = fn()
        self.t0 += time.time() - t
        return out

    def add(self, loss):
        # Keep the sum on the device: no host sync until a log line is printed.
        self.loss_sum = loss if self.loss_sum is None else self.loss_sum + loss
        self.count += 1

    def maybe_print(self, hybrid, force=False):
        step = hybrid.global_steps
        if self.count == 0 or not (force or step % self.every == 0):
            return None
        loss = (self.loss_sum / self.count).item()
        now = time.time()
        ips = self.count * self.images_per_step / max(now - self.t0, 1e-9)
        eta = (self.total - step) * (now - self.start) / max(step, 1)
        row = dict(step=step, loss=loss, img_s=ips, lr=hybrid.head_lr,
                   backbone_lr=hybrid.backbone_lr, loss_scale=hybrid.loss_scale,
                   skipped=hybrid.engine.skipped_steps)
        if self.rank == 0:
            self.metrics.log(f"step {step:>7d}/{self.total}  loss {loss:8.4f}  {ips:9.1f} img/s  "
                             f"lr {row['lr']:.3g} (backbone {row['backbone_lr']:.3g})  "
                             f"scale {row['loss_scale']:g}  skipped {row['skipped']}  "
                             f"eta {eta / 60:.1f} min")
            self.metrics.record("train", **row)
            if self.writer is not None:
                for k in ("loss", "img_s", "lr", "backbone_lr", "loss_scale"):
                    self.writer.add_scalar(f"train/{k}", row[k], step)
        self.loss_sum, self.count, self.t0 = None, 0, now
        return row


def _check_memory(cfg, ds_cfg, rank, world_size):
    """The memory plan (hybrid_fc.training.plan) before anything large exists; every rank refuses
    together when one rank's memory will not hold the run."""
    if not cfg.train.memory_check:
        return
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    memory, reserve = rank_memory_bytes(device)
    plan = plan_experiment(cfg, ds_cfg, world_size, memory, reserve=reserve,
                           device=device.type)
    if all_ranks_true(plan.fits):
        if rank == 0:
            print(f"hybrid_fc: memory plan per rank {plan.per_gpu_bytes / 1e9:.2f} GB of "
                  f"{memory / 1e9:.2f} GB (head {plan.head_bytes / 1e9:.2f} GB); "
                  "launch/plan.py prints the breakdown", flush=True)
        return
    raise MemoryError("hybrid_fc: this run will not fit in memory on every rank "
                      f"(train.memory_check=false skips this check):\n{plan.table()}")


class Trainer:
    """One training run: everything built in __init__ (collective: every rank constructs it),
    `fit()` trains to cfg.train.steps and returns the HybridEngine.

    Resume: from cfg.train.output_dir's `latest` when cfg.train.resume, at any number of ranks.
    What a resume may change, and what it does about it (logged as a "resume" record in
    metrics.jsonl and printed by rank 0):
      - the number of ranks: the model state is exact; the global batch changes with it (the
        DeepSpeed JSON's micro batch per rank is kept) and the data order restarts at the same
        fraction of the epoch;
      - train.steps: the LR schedule is a function of (step, train.steps), so a new length would
        jump the learning rate; refused unless schedule.allow_change=true, then logged with the
        learning rates before and after."""

    def __init__(self, cfg, ds_config: Dict[str, Any], verbose: bool = False,
                 verification: Optional[Callable] = None):
        import deepspeed

        self.cfg, self.ds_config = cfg, ds_config
        if "scheduler" in ds_config and cfg.schedule.apply_to_backbone:
            raise ValueError("schedule.apply_to_backbone: the DeepSpeed JSON has a \"scheduler\"; "
                             "set schedule.apply_to_backbone=false or remove it (one owner per "
                             "key)")
        if cfg.eval.bins and verification is None:
            raise ValueError("eval.bins is set but no verification was passed: "
                             "Trainer(cfg, ds_config, verification=hybrid_fc.evaluation."
                             "build_verification) (launch/train.py does), or eval.bins=[]")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with starting_up():  # DeepSpeed's start-up: its JIT ops are built or loaded in here
            self.rank, self.world_size = rank, world_size = join_process_group()
            quiet_logs(rank, verbose)
            self.out = out = cfg.train.output_dir
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a killed save's temporary files
                for path in remove_stale_temps(out):
                    logger.info("removed %s (left by an interrupted save)", path)

            _check_memory(cfg, ds_config, rank, world_size)
            torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank
            backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size,
                                      input_size=cfg.model.input_size, **cfg.model.backbone_kwargs)
            engine, *_ = deepspeed.initialize(
                model=backbone, config=ds_config,
                model_parameters=[p for p in backbone.parameters() if p.requires_grad])
        self.device = device = next(engine.module.parameters()).device
        head = PartialFC(build_margin(cfg), cfg.model.embedding_size, cfg.head.num_classes,
                         cfg.head.sample_rate, sparse_grad=cfg.head.sparse_grad,
                         chunk_size=cfg.head.chunk_size, seed=cfg.head.seed, device=device,
                         weight_dtype=getattr(torch, cfg.head.weight_dtype),
                         backend=cfg.head.backend)
        schedule = WarmupDecay(cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.decay,
                               cfg.schedule.power, cfg.schedule.min_lr_ratio)
        self.hybrid = hybrid = HybridEngine(
            engine, head, build_head_optimizer(cfg, head.parameters()), lr_schedule=schedule,
            schedule_backbone=cfg.schedule.apply_to_backbone,
            max_grad_norm=cfg.head_optim.max_grad_norm)
        self.micro, self.gas = (engine.train_micro_batch_size_per_gpu(),
                                engine.gradient_accumulation_steps())
        self.global_batch = self.micro * self.gas * world_size

        resumed = (load_checkpoint(hybrid, out, trust_deepspeed_files=cfg.train.trust_checkpoint)
                   if cfg.train.resume else None)
        changes = self._resume_changes(resumed) if resumed is not None else {}
        if rank == 0:
            write_run_config(out, config_to_dict(cfg), ds_config)
            where = (f"resumed at step {hybrid.global_steps} from {out}" if resumed is not None
                     else "fresh start")
            print(f"hybrid_fc: {world_size} ranks, {cfg.model.backbone}, {cfg.head.num_classes} "
                  f"classes, {head.num_local} on rank 0; global batch {self.global_batch}; "
                  f"{where}", flush=True)

        self.batches = InputStreams(cfg, self.micro, rank, world_size, device)
        if (resumed or {}).get("rank_state") is not None:  # same world size: this rank's streams
            self.batches.load_state_dict(resumed["rank_state"])
        self.log = _Log(cfg, rank, self.global_batch)
        self.log.metrics.record("start", step=hybrid.global_steps, world_size=world_size,
                                global_batch=self.global_batch, resumed=resumed is not None)
        if changes:
            self.log.metrics.record("resume", step=hybrid.global_steps, **changes)
        self.verify = verification(cfg, self.log) if cfg.eval.bins else None
        self.last_saved = hybrid.global_steps if resumed is not None else -1

    def _resume_changes(self, resumed: Dict[str, Any]) -> Dict[str, Any]:
        """What differs from the run that wrote the checkpoint (see the class docstring);
        raises for a changed train.steps unless schedule.allow_change."""
        cfg, hybrid, step = self.cfg, self.hybrid, self.hybrid.global_steps
        saved = resumed.get("experiment") or {}
        run = resumed.get("run") or {}
        changes, lines = {}, []
        old_steps = (saved.get("train") or {}).get("steps")
        if old_steps is not None and old_steps != cfg.train.steps:
            s = cfg.schedule
            old = WarmupDecay(old_steps, s.warmup_steps, s.decay, s.power, s.min_lr_ratio)
            lr_old = cfg.head_optim.lr * old(step)
            lr_new = hybrid.head_lr
            if not cfg.schedule.allow_change:
                raise ValueError(
                    f"train.steps: the checkpoint in {self.out} was trained towards "
                    f"{old_steps} steps, this run says {cfg.train.steps}; the LR schedule would "
                    f"jump at step {step} from {lr_old:.4g} to {lr_new:.4g} (head). Set "
                    f"train.steps={old_steps} to continue as planned, or schedule.allow_change="
                    "true to accept the new schedule")
            changes.update(old_steps=old_steps, new_steps=cfg.train.steps, head_lr_before=lr_old,
                           head_lr_after=lr_new)
            lines.append(f"train.steps {old_steps} -> {cfg.train.steps}: the LR schedule is now "
                         f"over {cfg.train.steps} steps (head LR at step {step}: {lr_old:.4g} -> "
                         f"{lr_new:.4g}; schedule.allow_change=true)")
        old_world, old_batch = run.get("world_size"), run.get("global_batch")
        if old_world is not None and old_world != self.world_size:
            changes.update(old_world_size=old_world, new_world_size=self.world_size,
                           old_global_batch=old_batch, new_global_batch=self.global_batch)
            lines.append(f"{old_world} -> {self.world_size} ranks: global batch {old_batch} -> "
                         f"{self.global_batch} (the DeepSpeed JSON's micro batch per rank is "
                         "kept; scale the learning rates yourself if you want them to follow); "
                         "the data order restarts at the same fraction of the epoch; the model "
                         "state is exact")
        if lines and self.rank == 0:
            for line in lines:
                logger.warning("hybrid_fc: resume changes the run: %s", line)
        return changes

    def save(self) -> None:
        """A checkpoint of the current step (collective), then pruning by train.keep_last."""
        cfg = self.cfg
        save_checkpoint(self.hybrid, self.out,
                        client_state={"experiment": config_to_dict(cfg),
                                      "run": {"world_size": self.world_size,
                                              "global_batch": self.global_batch}},
                        rank_state=self.batches.state_dict())
        self.last_saved = self.hybrid.global_steps
        if cfg.train.keep_last and self.rank == 0:  # after the save's last barrier
            for tag in prune_checkpoints(self.out, cfg.train.keep_last):
                self.log.metrics.log(f"hybrid_fc: removed old checkpoint "
                                     f"{os.path.join(self.out, tag)} "
                                     f"(train.keep_last={cfg.train.keep_last})")

    def fit(self):
        """Train to cfg.train.steps (verification every eval.every, a checkpoint every
        train.checkpoint_every and at the end); returns the HybridEngine."""
        cfg, hybrid, log, verify = self.cfg, self.hybrid, self.log, self.verify
        hybrid.train()
        while hybrid.global_steps < cfg.train.steps:
            for _ in range(self.gas):
                images, labels = next(self.batches)
                loss = hybrid.forward_backward(images.to(self.device), labels.to(self.device))
                if not bool(torch.isfinite(loss)):  # the same global loss on every rank
                    raise FloatingPointError(
                        f"non-finite loss ({loss.item()}) at step {hybrid.global_steps + 1}; the "
                        f"last good checkpoint is {latest_tag(self.out) or 'none'} in "
                        f"{self.out}. Lower the learning rates (head_optim.lr, the DeepSpeed "
                        "optimizer's lr) or check the data.")
                hybrid.step()
                log.add(loss)
            log.maybe_print(hybrid)
            step = hybrid.global_steps
            if verify is not None and step < cfg.train.steps:  # the hook acts every eval.every
                log.exclude(lambda: verify(hybrid, step))
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                self.save()
        log.maybe_print(hybrid, force=True)
        if verify is not None:
            verify(hybrid, hybrid.global_steps, force=True)
        if self.last_saved != hybrid.global_steps:
            self.save()
        if self.rank == 0:
            log.metrics.log(f"hybrid_fc: done at step {hybrid.global_steps}; checkpoint "
                            f"{os.path.join(self.out, latest_tag(self.out))}")
        log.metrics.close()
        return hybrid

