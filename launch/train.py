"""Train a face-recognition / re-ID embedding model: DeepSpeed backbone + Partial FC head.

Single node, N GPUs (or N CPU processes on a machine without GPUs):
    deepspeed --num_gpus 8 launch/train.py --config launch/configs/base.yaml \\
        --deepspeed_config ds_configs/zero1_bf16.json  [section.key=value ...]

Several nodes, from the first node (ssh to every host, pdsh installed):
    hostfile:   node1 slots=8
                node2 slots=8
    deepspeed --hostfile hostfile --master_addr node1 --master_port 29500 launch/train.py \\
        --config launch/configs/glint360k_r100_pfc.yaml --deepspeed_config ds_configs/zero2_bf16.json
  Environment for the remote ranks goes in `.deepspeed_env` (one VAR=value a line, in the
  working directory or ~): e.g. NCCL_SOCKET_IFNAME=eth0, AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY /
  AWS_ENDPOINT_URL for s3:// shards (the pdsh path exports only NCCL*, PYTHON*, UCX*, MV2* and
  MLFLOW* variables by itself).

Several nodes without ssh (a scheduler starts one launcher per node; also two "nodes" on one box):
    deepspeed --hostfile hostfile --no_ssh --node_rank 0 --master_addr node1 --master_port 29500 \\
        launch/train.py --config ... --deepspeed_config ...        # on node1
    deepspeed --hostfile hostfile --no_ssh --node_rank 1 --master_addr node1 --master_port 29500 \\
        launch/train.py --config ... --deepspeed_config ...        # on node2
  `.deepspeed_env` is not applied here: export NCCL_SOCKET_IFNAME, AWS_* in each node's shell.

The YAML (hybrid_fc/config.py) owns the model, head, head optimizer, LR schedule shape, data and
loop; the DeepSpeed JSON owns micro batch, accumulation, precision, ZeRO and the backbone
optimizer. Every YAML field can be overridden: `head.sample_rate=0.1 train.steps=2000`.
A run resumes from `train.output_dir/latest` automatically, at any number of ranks.
"""
import argparse
import json
import logging
import os
import sys
import time

import torch

logger = logging.getLogger("hybrid_fc.train")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="experiment YAML (hybrid_fc/config.py)")
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON (ds_configs/)")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    p.add_argument("overrides", nargs="*", help="section.key=value overrides of the YAML")
    return p.parse_args(argv)


# -- pieces built from the config ------------------------------------------------------------
def build_margin(cfg):
    from hybrid_fc import ArcFace, CombinedMarginLoss, CosFace
    h = cfg.head
    if h.margin == "arcface":
        return ArcFace(h.scale, h.m)
    if h.margin == "cosface":
        return CosFace(h.scale, h.m)
    return CombinedMarginLoss(h.scale, *h.combined)


def build_head_optimizer(cfg, params):
    from hybrid_fc.optim import SparseAdamW, SparseSGD
    o = cfg.head_optim
    if o.name == "sgd":
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    if o.name == "adamw":
        return torch.optim.AdamW(params, lr=o.lr, betas=o.betas, eps=o.eps,
                                 weight_decay=o.weight_decay)
    low = dict(state_dtype=getattr(torch, o.state_dtype), rounding=o.rounding, seed=cfg.head.seed)
    if o.name == "sparse_sgd":
        return SparseSGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay, **low)
    return SparseAdamW(params, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay,
                       **low)


class InputStreams:
    """This rank's input: the batches and every random stream they depend on, as one state that
    the checkpoint holds per rank (`state_dict` / `load_state_dict`), so that a run restarted at
    the same size reads and augments exactly what the uninterrupted run would have:
      - webdataset: the loader's position (hybrid_fc.data's exact-resume state);
      - synthetic: micro-batch k is drawn from a generator seeded by (seed, rank, k), a pure
        function of the position;
      - the flip augmentation's own generator (never torch's global one, which launch/train.py
        reseeds at every start), and torch's global CPU/CUDA generators (dropout and the like).
    At another world size none of it applies (the loader continues at the same fraction of its
    epoch in another order; hybrid_fc.data logs it)."""

    def __init__(self, cfg, batch_size, rank, world_size, device):
        from hybrid_fc.data import stable_seed
        self.cfg, self.batch_size, self.rank, self.device = cfg, batch_size, rank, device
        self.micro_batches = 0
        self.augment_rng = torch.Generator(device=device)
        self.augment_rng.manual_seed(stable_seed("augment", cfg.train.seed, rank) >> 1)
        self.loader = None
        if cfg.data.source == "webdataset":
            from hybrid_fc.data import make_loader
            self.loader = make_loader(cfg.data.urls, batch_size, rank=rank, world_size=world_size,
                                      num_workers=cfg.data.num_workers,
                                      shuffle_buffer=cfg.data.shuffle_buffer,
                                      seed=cfg.train.seed, image_size=cfg.model.input_size)
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
        if self._batches is None:
            self._batches = (self._synthetic() if self.loader is None else self._webdataset())
        images, labels = next(self._batches)
        self.micro_batches += 1
        return images, labels

    def _synthetic(self):
        """In-memory synthetic identities (no files): class c's images are a fixed random image
        (seeded by c) plus Gaussian noise of std data.synthetic_noise; distinct per rank."""
        from hybrid_fc.data import stable_seed
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
        from hybrid_fc.data import augment
        while True:
            for images, labels in self.loader:
                yield (augment(images.to(self.device), generator=self.augment_rng),
                       labels.to(self.device))


def build_verification(cfg, log):
    """The periodic verification of eval.bins (hybrid_fc.evaluation.VerificationHook: every
    rank embeds its slice of each pair set, BatchNorm statistics averaged over the ranks first),
    or None. Reads and decodes the pair files now, so a bad file fails before training."""
    if not cfg.eval.bins:
        return None
    from hybrid_fc.evaluation import VerificationHook
    return VerificationHook(cfg.eval.bins, every=cfg.eval.every, image_size=cfg.model.input_size,
                            batch_size=cfg.eval.batch_size, flip=cfg.eval.flip,
                            writer=log.writer, print_fn=log.metrics.log,
                            record=log.metrics.record)


class _Log:
    """Rank 0's progress line, metrics.jsonl / training.log rows (hybrid_fc.metrics) and
    TensorBoard scalars when tensorboard is installed."""

    def __init__(self, cfg, rank, images_per_step):
        from hybrid_fc.metrics import MetricsLog
        self.rank, self.every, self.total = rank, cfg.train.log_every, cfg.train.steps
        self.images_per_step = images_per_step
        self.metrics = MetricsLog(cfg.train.output_dir, rank)
        self.loss_sum, self.count = None, 0
        self.t0, self.start = time.time(), time.time()
        self.writer = None
        if rank == 0 and cfg.train.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(os.path.join(cfg.train.output_dir, "tb"))
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
    """The memory plan (hybrid_fc.plan) before anything large exists; every rank refuses
    together when one rank's memory will not hold the run."""
    from hybrid_fc.collectives import all_ranks_true
    from hybrid_fc.engine import rank_memory_bytes
    from hybrid_fc.plan import plan_experiment
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


def main(argv=None):
    args = parse_args(argv)
    import deepspeed
    from hybrid_fc import PartialFC
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.checkpoint import (latest_tag, load_checkpoint, prune_checkpoints,
                                      save_checkpoint)
    from hybrid_fc.config import config_to_dict, load_config
    from hybrid_fc.engine import HybridEngine, WarmupDecay

    cfg = load_config(args.config, args.overrides)
    with open(args.deepspeed_config) as f:
        ds_cfg = json.load(f)
    if "scheduler" in ds_cfg and cfg.schedule.apply_to_backbone:
        raise ValueError("schedule.apply_to_backbone: the DeepSpeed JSON has a \"scheduler\"; "
                         "set schedule.apply_to_backbone=false or remove it (one owner per key)")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:  # a killed run's build lock hangs start-up
        from hybrid_fc.engine import clear_stale_build_locks
        clear_stale_build_locks()
    deepspeed.init_distributed()
    import torch.distributed as dist
    from hybrid_fc.engine import release_shm_buffers
    release_shm_buffers()  # DeepSpeed's CPU all-reduce buffers would outlive the run in /dev/shm
    rank, world_size = dist.get_rank(), dist.get_world_size()
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")

    _check_memory(cfg, ds_cfg, rank, world_size)
    torch.manual_seed(cfg.train.seed)  # identical backbone init on every rank
    backbone = build_backbone(cfg.model.backbone, cfg.model.embedding_size,
                              input_size=cfg.model.input_size, **cfg.model.backbone_kwargs)
    engine, *_ = deepspeed.initialize(
        model=backbone, config=ds_cfg,
        model_parameters=[p for p in backbone.parameters() if p.requires_grad])
    device = next(engine.module.parameters()).device
    head = PartialFC(build_margin(cfg), cfg.model.embedding_size, cfg.head.num_classes,
                     cfg.head.sample_rate, sparse_grad=cfg.head.sparse_grad,
                     chunk_size=cfg.head.chunk_size, seed=cfg.head.seed, device=device,
                     weight_dtype=getattr(torch, cfg.head.weight_dtype))
    schedule = WarmupDecay(cfg.train.steps, cfg.schedule.warmup_steps, cfg.schedule.decay,
                           cfg.schedule.power, cfg.schedule.min_lr_ratio)
    hybrid = HybridEngine(engine, head, build_head_optimizer(cfg, head.parameters()),
                          lr_schedule=schedule, schedule_backbone=cfg.schedule.apply_to_backbone,
                          max_grad_norm=cfg.head_optim.max_grad_norm)

    out = cfg.train.output_dir
    resumed = (load_checkpoint(hybrid, out, trust_deepspeed_files=cfg.train.trust_checkpoint)
               if cfg.train.resume else None)
    if rank == 0:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "config.json"), "w") as f:
            json.dump({"experiment": config_to_dict(cfg), "deepspeed": ds_cfg}, f, indent=1)
        where = (f"resumed at step {hybrid.global_steps} from {out}" if resumed is not None
                 else "fresh start")
        print(f"hybrid_fc: {world_size} ranks, {cfg.model.backbone}, {cfg.head.num_classes} "
              f"classes, {head.num_local} on rank 0; {where}", flush=True)

    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    batches = InputStreams(cfg, micro, rank, world_size, device)
    if (resumed or {}).get("rank_state") is not None:  # same world size: this rank's streams
        batches.load_state_dict(resumed["rank_state"])

    log = _Log(cfg, rank, micro * gas * world_size)
    log.metrics.record("start", step=hybrid.global_steps, world_size=world_size,
                       resumed=resumed is not None)
    verify = build_verification(cfg, log)
    last_saved = hybrid.global_steps if resumed is not None else -1

    def save():
        save_checkpoint(hybrid, out, client_state={"experiment": config_to_dict(cfg)},
                        rank_state=batches.state_dict())
        if cfg.train.keep_last and rank == 0:  # after the save's last barrier: none in flight
            for tag in prune_checkpoints(out, cfg.train.keep_last):
                log.metrics.log(f"hybrid_fc: removed old checkpoint {os.path.join(out, tag)} "
                                f"(train.keep_last={cfg.train.keep_last})")
    hybrid.train()
    while hybrid.global_steps < cfg.train.steps:
        for _ in range(gas):
            images, labels = next(batches)
            loss = hybrid.forward_backward(images.to(device), labels.to(device))
            if not bool(torch.isfinite(loss)):  # the same global loss on every rank: all stop
                raise FloatingPointError(
                    f"non-finite loss ({loss.item()}) at step {hybrid.global_steps + 1}; the last "
                    f"good checkpoint is {latest_tag(out) or 'none'} in {out}. Lower the learning "
                    "rates (head_optim.lr, the DeepSpeed optimizer's lr) or check the data.")
            hybrid.step()
            log.add(loss)
        log.maybe_print(hybrid)
        step = hybrid.global_steps
        if verify is not None and step < cfg.train.steps:  # the hook acts every eval.every
            log.exclude(lambda: verify(hybrid, step))
        if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
            save()
            last_saved = step
    log.maybe_print(hybrid, force=True)
    if verify is not None:
        verify(hybrid, hybrid.global_steps, force=True)
    if last_saved != hybrid.global_steps:
        save()
    if rank == 0:
        log.metrics.log(f"hybrid_fc: done at step {hybrid.global_steps}; checkpoint "
                        f"{os.path.join(out, open(os.path.join(out, 'latest')).read())}")
    log.metrics.close()
    return hybrid


if __name__ == "__main__":
    main()
    from hybrid_fc.engine import finish_distributed
    finish_distributed()
    sys.exit(0)
