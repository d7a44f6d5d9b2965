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
from ..runtime import PeerLost, Preempted, Preemption
from .checkpoint import (TENSORBOARD_DIR, find_checkpoint, latest_tag, load_checkpoint,
                         prune_checkpoints, read_meta, remove_stale_temps, save_checkpoint,
                         write_run_config)
from .config import check_deepspeed_config, config_to_dict
from .resume import REFUSED, SCHEDULE, diff_configs, resume_policy
from .engine import HybridEngine, WarmupDecay
from .metrics import MetricsLog
from .plan import plan_experiment

logger = logging.getLogger("hybrid_fc.train")

# fp16's dynamic loss scale halves at each overflow: from 2^32 it reaches 1 in 32 skipped steps;
# more skips in a row than this mean the gradients overflow at any scale
MAX_SKIPPED_IN_A_ROW = 50

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
    At another world size none of it applies: the loader continues at the same fraction of its
    epoch in another order (hybrid_fc.data logs it), the other streams start fresh."""

    def __init__(self, cfg, batch_size, rank, world_size, device):
        self.cfg, self.batch_size, self.rank, self.device = cfg, batch_size, rank, device
        self.micro_batches = 0
        self.notes = []  # lines for the run's log (the trainer prints them on rank 0)
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
            if n is not None and n < cfg.head.num_classes:
                self.notes.append(
                    f"note: head.num_classes={cfg.head.num_classes} but the dataset "
                    f"{cfg.data.urls} has {n} classes: the {cfg.head.num_classes - n} centers "
                    "above them never get a positive (fine when more data comes later; "
                    f"otherwise set head.num_classes={n})")
        self._batches = None

    def fingerprint(self) -> Optional[dict]:
        """What the saved data position refers to: the epoch's sample count and the class
        count (None for the synthetic source, which has no files)."""
        if self.loader is None:
            return None
        return {"num_samples": int(self.loader.num_samples),
                "num_classes": self.loader.num_classes}

    def state_dict(self) -> dict:
        state = {"micro_batches": self.micro_batches, "augment_rng": self.augment_rng.get_state(),
                 "torch_rng": torch.get_rng_state(),
                 "loader": self.loader.state_dict() if self.loader is not None else None}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def load_state_dict(self, state: dict, same_layout: bool = True) -> None:
        """Continue from a saved state: this rank's own (same_layout) restores every stream
        exactly; another layout's (a rank of a run with another number of ranks) only moves the
        loader to the same fraction of its epoch (its own streams stay fresh)."""
        if "micro_batches" not in state:  # a checkpoint of an older version: the loader's state
            state = {"loader": state}
        if not same_layout:
            if self.loader is not None and state.get("loader") is not None:
                self.loader.load_state_dict(state["loader"])  # another layout: same fraction
            return
        self.micro_batches = int(state.get("micro_batches", 0))
        if "augment_rng" in state:
            self.augment_rng.set_state(state["augment_rng"])
        if "torch_rng" in state:
            torch.set_rng_state(state["torch_rng"])
        if "cuda_rng" in state and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)
        if self.loader is not None and state.get("loader") is not None:
            self.loader.load_state_dict(state["loader"])

    def close(self) -> None:
        """Stop the loader's workers now (the end of a run, an error, a preemption): they
        leave SIGTERM and SIGINT to this rank, so nothing else would stop them before exit."""
        if self._batches is not None:
            self._batches.close()
            self._batches = None

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
            epoch = iter(self.loader)
            try:
                for images, labels in epoch:
                    yield (augment(images.to(self.device), generator=self.augment_rng),
                           labels.to(self.device))
            finally:  # close(): the loader stops its workers
                epoch.close()


class _Log:
    """Rank 0's progress line, metrics.jsonl / training.log rows (hybrid_fc.training.metrics) and
    TensorBoard scalars when tensorboard is installed (its absence is said once).

    A resumed run first drops the interrupted run's rows and lines of steps after its
    checkpoint (MetricsLog): that training was undone, and would otherwise repeat."""

    def __init__(self, cfg, rank, images_per_step, start_step=0, resumed=False):
        self.rank, self.every, self.total = rank, cfg.train.log_every, cfg.train.steps
        self.images_per_step = images_per_step
        self.metrics = MetricsLog(cfg.train.output_dir, rank,
                                  resumed_at=start_step if resumed else None)
        self.loss_sum, self.count = None, 0
        self.t0, self.start, self.start_step = time.time(), time.time(), start_step
        self.writer = None
        if rank == 0 and cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(cfg.train.output_dir, TENSORBOARD_DIR))
            except ImportError:  # tensorboard is optional
                self.metrics.log("tensorboard is not installed: no TensorBoard scalars (pip "
                                 "install tensorboard, or train.tensorboard=false to silence "
                                 "this); metrics.jsonl has every figure (launch/plot.py)")

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
        # the time per step of this process's steps (not since step 0: a resumed run)
        eta = (self.total - step) * (now - self.start) / max(step - self.start_step, 1)
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
    A setting that differs from the checkpoint's run is applied and recorded, or refused
    (hybrid_fc.training.resume: the rule of every field), before anything large is built; a
    changed number of ranks keeps the model state exact, changes the global batch (the
    DeepSpeed JSON's micro batch per rank is kept) and continues the data at the same fraction
    of the epoch. Rank 0 logs each change and writes a "resume" record to metrics.jsonl.

    Preemption: SIGTERM or SIGINT on any rank (SLURM's --signal, Kubernetes, spot instances,
    Ctrl-C) makes every rank finish its step, save a checkpoint together within
    train.preempt_save_s, print one line and stop with `Preempted` (exit status 128 + the
    signal's number through hybrid_fc.runtime.run_script). The same command resumes."""

    def __init__(self, cfg, ds_config: Dict[str, Any], verbose: bool = False,
                 verification: Optional[Callable] = None):
        import deepspeed

        self.cfg, self.ds_config = cfg, check_deepspeed_config(ds_config)
        if "scheduler" in ds_config and cfg.schedule.apply_to_backbone:
            raise ValueError("schedule.apply_to_backbone: the DeepSpeed JSON has a \"scheduler\"; "
                             "set schedule.apply_to_backbone=false or remove it (one owner per "
                             "key)")
        if cfg.eval.bins and verification is None:
            raise ValueError("eval.bins is set but no verification was passed: "
                             "Trainer(cfg, ds_config, verification=hybrid_fc.evaluation."
                             "build_verification) (launch/train.py does), or eval.bins=[]")
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        self.out = out = cfg.train.output_dir
        with starting_up():  # DeepSpeed's start-up: its JIT ops are built or loaded in here
            self.rank, self.world_size = rank, world_size = join_process_group()
            quiet_logs(rank, verbose)
            if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a killed save's temporary files
                for path in remove_stale_temps(out):
                    logger.info("removed %s (left by an interrupted save)", path)
            # Before anything large is built: a refused resume, bad data or a run that will
            # not fit stops here within seconds.
            self.resume_from = find_checkpoint(out) if cfg.train.resume else None
            saved = read_meta(out, self.resume_from) if self.resume_from else {}
            self._check_resume(saved)
            self.micro, self.gas = _batch_shape(ds_config)
            self.global_batch = self.micro * self.gas * world_size
            device = _rank_device()
            self.batches = InputStreams(cfg, self.micro, rank, world_size, device)
            self._check_data_change(saved)
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
        self.hybrid = hybrid = HybridEngine(
            engine, head, build_head_optimizer(cfg, head.parameters()),
            lr_schedule=_schedule(cfg.schedule, cfg.train.steps),
            schedule_backbone=cfg.schedule.apply_to_backbone,
            max_grad_norm=cfg.head_optim.max_grad_norm)
        # the hyperparameters this config asks for; a load restores the checkpoint's (torch's
        # optimizer semantics), and the config wins again after it (resume.py: "applied")
        fresh = [_hyperparameters(hybrid.head_optimizer), _hyperparameters(engine.optimizer)]

        resumed = None
        if self.resume_from is not None:
            resumed = load_checkpoint(hybrid, out, self.resume_from,
                                      trust_deepspeed_files=cfg.train.trust_checkpoint)
            for opt, groups in zip((hybrid.head_optimizer, engine.optimizer), fresh):
                for group, values in zip(opt.param_groups, groups):
                    group.update(values)
            state = resumed.get("rank_state")
            if state is not None:  # this rank's own streams (same layout), else rank 0's
                self.batches.load_state_dict(state, same_layout=resumed.get("same_layout", True))
        self.log = _Log(cfg, rank, self.global_batch, hybrid.global_steps,
                        resumed=resumed is not None)
        self.start_step = hybrid.global_steps
        where = (f"resumed at step {hybrid.global_steps} from "
                 f"{os.path.join(out, self.resume_from)}" if resumed is not None
                 else "fresh start")
        if rank == 0:
            write_run_config(out, config_to_dict(cfg), ds_config)
        self.log.metrics.log(f"start: {world_size} rank{'s' if world_size > 1 else ''}, "
                             f"{cfg.model.backbone}, {cfg.head.num_classes} classes "
                             f"({head.num_local} on rank 0), global batch {self.global_batch}; "
                             f"{where}")
        self.log.metrics.record("start", step=hybrid.global_steps, world_size=world_size,
                                global_batch=self.global_batch, resumed=resumed is not None)
        for note in self.batches.notes:
            self.log.metrics.log(note)
        if resumed is not None:
            self._record_resume(saved, resumed)
        self.verify = verification(cfg, self.log) if cfg.eval.bins else None
        self.last_saved = hybrid.global_steps if resumed is not None else -1

    # -- resume ---------------------------------------------------------------------------
    def _check_resume(self, saved: Dict[str, Any]) -> None:
        """Refuse what a resume cannot honour (resume.py), before anything is built."""
        old = saved.get("experiment")
        if not old:
            return
        allow = self.cfg.schedule.allow_change
        step = int(saved.get("global_steps", 0))
        for field, before, after in diff_configs(old, config_to_dict(self.cfg)):
            rule, why = resume_policy(field)
            if rule == REFUSED:
                raise ValueError(
                    f"{field}: the checkpoint {os.path.join(self.out, self.resume_from)} has "
                    f"{field}={before!r}, this run says {after!r}, and {why}. Set "
                    f"{field}={_yaml(before)} to resume, or a new train.output_dir to start "
                    "over")
            if rule == SCHEDULE and not allow:
                lr_before, lr_after = _head_lrs(old, config_to_dict(self.cfg), step)
                raise ValueError(
                    f"{field}: the checkpoint {os.path.join(self.out, self.resume_from)} was "
                    f"trained with {field}={before!r}, this run says {after!r}; the head's "
                    f"learning rate would jump from {lr_before:.6g} (step {step}, as logged) to "
                    f"{lr_after:.6g} (step {step + 1}). Set {field}={_yaml(before)} to continue as "
                    "planned, or schedule.allow_change=true to accept the new schedule")

    def _check_data_change(self, saved: Dict[str, Any]) -> None:
        """data.urls may move (local disk to S3) but not change the data the saved position
        refers to: the same sample and class counts, or refused."""
        old = (saved.get("run") or {}).get("data")
        new = self.batches.fingerprint()
        if old and new and old != new:
            old_urls = ((saved.get("experiment") or {}).get("data") or {}).get("urls")
            raise ValueError(
                f"data.urls: the checkpoint {os.path.join(self.out, self.resume_from)} trained "
                f"on {old_urls!r} ({old['num_samples']} samples, {old['num_classes']} classes); "
                f"{self.cfg.data.urls!r} has {new['num_samples']} samples, {new['num_classes']} "
                "classes, so the saved data position would point elsewhere. Resume with the same "
                "data, or start a new run (train.output_dir)")

    def _record_resume(self, saved: Dict[str, Any], resumed: Dict[str, Any]) -> None:
        """Log and record (metrics.jsonl "resume") what this run changes (all applied)."""
        step = self.hybrid.global_steps
        old = saved.get("experiment") or resumed.get("experiment") or {}
        run = saved.get("run") or resumed.get("run") or {}
        new = config_to_dict(self.cfg)
        fields = diff_configs(old, new) if old else []
        record, lines = {}, []
        if fields:
            record["changes"] = {f: [b, a] for f, b, a in fields}
            lines += [f"{f} {b!r} -> {a!r}" for f, b, a in fields]
        if any(resume_policy(f)[0] == SCHEDULE for f, _, _ in fields):
            lr_before, lr_after = _head_lrs(old, new, step)
            record.update(head_lr_before=lr_before, head_lr_after=lr_after)
            lines.append(f"head LR at step {step}: {lr_before:.4g}, at step {step + 1}: "
                         f"{lr_after:.4g} (schedule.allow_change=true)")
        old_world, old_batch = run.get("world_size"), run.get("global_batch")
        if old_world is not None and old_world != self.world_size:
            record.update(old_world_size=old_world, new_world_size=self.world_size,
                          old_global_batch=old_batch, new_global_batch=self.global_batch)
            lines.append(f"{old_world} -> {self.world_size} ranks: global batch {old_batch} -> "
                         f"{self.global_batch} (the DeepSpeed JSON's micro batch per rank is "
                         "kept; scale the learning rates yourself if you want them to follow); "
                         "the data continues at the same fraction of the epoch in another "
                         "order; the model state is exact")
        if "old_steps" not in record and "train.steps" in record.get("changes", {}):
            record.update(old_steps=record["changes"]["train.steps"][0],
                          new_steps=record["changes"]["train.steps"][1])
        for line in lines:
            self.log.metrics.log(f"resume changes the run: {line}")
        if record:
            self.log.metrics.record("resume", step=step, **record)

    # -- checkpoints ----------------------------------------------------------------------
    def save(self) -> None:
        """A checkpoint of the current step (collective), then pruning by train.keep_last."""
        cfg = self.cfg
        run = {"world_size": self.world_size, "global_batch": self.global_batch,
               "data": self.batches.fingerprint()}
        save_checkpoint(self.hybrid, self.out,
                        client_state={"experiment": config_to_dict(cfg), "run": run},
                        rank_state=self.batches.state_dict())
        self.last_saved = self.hybrid.global_steps
        if cfg.train.keep_last and self.rank == 0:  # after the save's last barrier
            for tag in prune_checkpoints(self.out, cfg.train.keep_last):
                self.log.metrics.log(f"removed old checkpoint {os.path.join(self.out, tag)} "
                                     f"(train.keep_last={cfg.train.keep_last})")

    # -- the loop -------------------------------------------------------------------------
    def fit(self):
        """Train to cfg.train.steps (verification every eval.every, a checkpoint every
        train.checkpoint_every and at the end); returns the HybridEngine. Raises Preempted
        after a signal (saved), PeerLost when another rank went away."""
        try:
            return self._fit()
        finally:
            self.batches.close()

    def _fit(self):
        cfg, hybrid, log, verify = self.cfg, self.hybrid, self.log, self.verify
        hybrid.train()
        with Preemption(self.rank) as stop:
            while hybrid.global_steps < cfg.train.steps:
                try:
                    self._step()
                    log.maybe_print(hybrid)
                    step = hybrid.global_steps
                    if verify is not None and step < cfg.train.steps:  # acts every eval.every
                        log.exclude(lambda: verify(hybrid, step))
                    if stop.agreed():  # one tiny all-reduce a step
                        self._preempted(stop)
                    if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                        self.save()
                except RuntimeError as exc:
                    lost = PeerLost.wrap(exc)
                    if lost is exc:
                        raise
                    raise PeerLost(f"{lost} at step {hybrid.global_steps + 1}; "
                                   f"{self._last_checkpoint()}; run the same command to "
                                   "resume") from None
        log.maybe_print(hybrid, force=True)
        if verify is not None:
            verify(hybrid, hybrid.global_steps, force=True)
        if self.last_saved != hybrid.global_steps:
            self.save()
        log.metrics.log(f"done at step {hybrid.global_steps}; checkpoint "
                        f"{os.path.join(self.out, latest_tag(self.out))}")
        log.metrics.close()
        return hybrid

    def _step(self) -> None:
        """One optimizer step: gradient accumulation over self.gas micro-batches."""
        hybrid = self.hybrid
        for _ in range(self.gas):
            images, labels = next(self.batches)
            loss = hybrid.forward_backward(images.to(self.device), labels.to(self.device))
            if not bool(torch.isfinite(loss)):  # the same global loss on every rank
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at step {hybrid.global_steps + 1}; "
                    f"{self._last_checkpoint()}. Lower the learning rates (head_optim.lr, "
                    "the DeepSpeed optimizer's lr), the logit scale (head.scale) or check the "
                    "data.")
            applied = hybrid.step()
            self.log.add(loss)
        # the last micro-step was the boundary: `applied` says whether this step moved anything
        self.skipped_in_a_row = 0 if applied else self.skipped_in_a_row + 1
        if self.skipped_in_a_row >= MAX_SKIPPED_IN_A_ROW:
            raise FloatingPointError(
                f"the last {self.skipped_in_a_row} steps (to step {hybrid.global_steps}) were all "
                "skipped: their gradients overflowed (inf/nan), so nothing trains; "
                f"{self._last_checkpoint()}. Lower head.scale or the learning rates, or check "
                "the data.")

    skipped_in_a_row = 0

    def _last_checkpoint(self) -> str:
        tag = latest_tag(self.out)
        return (f"the last checkpoint is {os.path.join(self.out, tag)}" if tag else
                f"no checkpoint in {self.out} yet")

    def _preempted(self, stop: "Preemption") -> None:
        """Every rank: save this step within train.preempt_save_s, one line, Preempted."""
        step, limit = self.hybrid.global_steps, self.cfg.train.preempt_save_s
        if self.last_saved != step:
            with stop.deadline(limit, lambda: (
                    f"stopped by {stop.signal_name} at step {step} but the checkpoint could not "
                    f"be written within train.preempt_save_s={limit:g} s; "
                    f"{self._last_checkpoint()}; run the same command to resume")):
                self.save()
        self.log.maybe_print(self.hybrid, force=True)
        self.log.metrics.close()
        raise Preempted(f"stopped by {stop.signal_name} at step {step}; saved "
                        f"{os.path.join(self.out, latest_tag(self.out))}; run the same command "
                        "to resume", stop.exit_code)


def _rank_device() -> torch.device:
    """This rank's device before the engine exists (DeepSpeed puts the model there)."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def _batch_shape(ds_config: Dict[str, Any]):
    """(micro batch per rank, accumulation steps) as DeepSpeed will read them."""
    micro = ds_config.get("train_micro_batch_size_per_gpu")
    gas = ds_config.get("gradient_accumulation_steps", 1)
    if micro is None:
        raise ValueError("the DeepSpeed JSON must set train_micro_batch_size_per_gpu (the "
                         "images per rank per micro-step)")
    return int(micro), int(gas)


def _schedule(s, steps: int) -> WarmupDecay:
    return WarmupDecay(steps, s.warmup_steps, s.decay, s.power, s.min_lr_ratio)


def _head_lrs(old: Dict[str, Any], new: Dict[str, Any], step: int):
    """(head LR of step `step` under the old config, as logged; head LR of step `step` + 1
    under the new one). Steps count from 1; the schedule's index is step - 1."""
    def lr(exp, i):
        s, t = exp.get("schedule") or {}, exp.get("train") or {}
        w = WarmupDecay(int(t["steps"]), int(s.get("warmup_steps", 0)), s.get("decay", "poly"),
                        float(s.get("power", 2.0)), float(s.get("min_lr_ratio", 0.0)))
        return float(exp["head_optim"]["lr"]) * w(max(0, i))
    return (lr(old, step - 1) if step > 0 else float("nan")), lr(new, step)


def _hyperparameters(optimizer) -> list:
    """Each param group's hyperparameters except the learning rate (the schedule sets it)."""
    return [{k: v for k, v in g.items() if k not in ("params", "lr", "initial_lr")}
            for g in optimizer.param_groups]


def _yaml(value) -> str:
    """A config value as an override would write it (true, [0.9, 0.99], 0.1)."""
    import json
    return json.dumps(value) if not isinstance(value, str) else value
