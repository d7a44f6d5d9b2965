"""Shared pieces of the engine / checkpoint tests (no tests here).

`run_ranks(world_size, fn, *args)` runs fn(rank, world_size, *args) on real gloo ranks in forked
processes with DeepSpeed's distributed state initialized (the same environment variables the
`deepspeed` launcher sets). The reference is a dense single-process model written here
independently of hybrid_fc's collectives: the full C x D class matrix, full softmax with the
insightface ArcFace margin, torch optimizers.
"""
import datetime
import math
import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import deepspeed  # noqa: F401  (imported in the parent so forked ranks start fast)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, queue, env):
    os.environ.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False,
                                   timeout=datetime.timedelta(seconds=90))
        from hybrid_fc.engine import release_shm_buffers
        release_shm_buffers()  # no /dev/shm leftovers from the tests
        result = fn(rank, world_size, *args)
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size, fn, *args, timeout=240, env=None, allow_dead=False):
    """fn(rank, world_size, *args) on `world_size` gloo ranks; results in rank order.

    With allow_dead=True, ranks that die or fail are reported as None instead of raising
    (used by the kill -9 test)."""
    ctx = mp.get_context("fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, fn, args, queue, env or {}))
             for r in range(world_size)]
    for p in procs:
        p.start()
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.02)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if allow_dead:
        return [results.get(r) for r in range(world_size)], procs
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
    if len(results) != world_size:
        raise AssertionError(f"only ranks {sorted(results)} of {world_size} finished "
                             f"(exit codes {[p.exitcode for p in procs]})")
    return [results[r] for r in range(world_size)]


# -- a tiny backbone and data --------------------------------------------------------------
IN_DIM, HIDDEN, EMB = 12, 16, 8


class InfGrad(torch.autograd.Function):
    """forward: identity; backward: an inf gradient (simulates an fp16 overflow)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return torch.full_like(g, float("inf"))


class TinyNet(nn.Module):
    """Linear -> tanh -> Linear: no BatchNorm, so a data-parallel run equals one big batch."""

    def __init__(self, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.fc1 = nn.Linear(IN_DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, EMB)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def batch(step, rank, micro, num_classes, seed=1):
    """Rank `rank`'s micro-batch number `step` (deterministic, independent of world size)."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 1009 + rank)
    return (torch.randn(micro, IN_DIM, generator=g),
            torch.randint(0, num_classes, (micro,), generator=g))


def ds_config(stage, precision="fp32", micro=4, gas=1, world_size=1, optimizer="SGD", lr=0.05,
              **extra):
    cfg = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": gas,
        "train_batch_size": micro * gas * world_size,
        "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True,
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0, which the reference would need
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if optimizer == "SGD":
        cfg["optimizer"] = {"type": "SGD", "params": {"lr": lr, "momentum": 0.9,
                                                      "weight_decay": 1e-3}}
    else:
        cfg["optimizer"] = {"type": "AdamW", "params": {"lr": lr, "betas": [0.9, 0.99],
                                                        "eps": 1e-8, "weight_decay": 1e-2,
                                                        "torch_adam": True}}
    if precision == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif precision == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 1000,
                       "hysteresis": 1, "min_loss_scale": 1}
    cfg.update(extra)
    return cfg


def patch_fp16_supported():
    """The CPU accelerator refuses fp16; claim support so the real fp16 loss-scaling path runs."""
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    acc.is_fp16_supported = lambda: True
    if hasattr(acc, "supported_dtypes"):
        orig = acc.supported_dtypes
        acc.supported_dtypes = lambda: list({*orig(), torch.float16})


def full_params(engine):
    """Every backbone parameter as a full fp32 tensor (the fp32 master copy under ZeRO)."""
    from deepspeed.utils import safe_get_full_fp32_param
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (p.detach().float() if full is None else full).clone()
    return out


# -- the dense reference -------------------------------------------------------------------
def dense_arcface_loss(emb, centers, labels, s, m):
    """Full-softmax ArcFace, written from the formula (insightface convention for theta+m>pi)."""
    cos = F.normalize(emb, dim=1) @ F.normalize(centers, dim=1).t()       # (N, C)
    t = cos.gather(1, labels[:, None]).clamp(-1, 1)
    theta = torch.acos(t.clamp(-1 + 1e-7, 1 - 1e-7))
    target = torch.where(theta + m <= math.pi, torch.cos(theta + m), t - m * math.sin(m))
    logits = cos.scatter(1, labels[:, None], target) * s
    return F.cross_entropy(logits, labels)


def dense_reference(steps, world_size, micro, num_classes, centers, head_lr, s, m,
                    backbone_lr=0.05, gas=1, head_momentum=0.9, head_wd=5e-4,
                    backbone_clip=0.0, head_clip=0.0):
    """Single process: the same backbone and the full class matrix, on the concatenation of
    every rank's micro-batches. `world_size` may be a list (one per step: a resumed run).
    Returns (losses per optimizer step, backbone state, centers)."""
    net = TinyNet()
    w = nn.Parameter(centers.clone())
    opt_b = torch.optim.SGD(net.parameters(), lr=backbone_lr, momentum=0.9, weight_decay=1e-3)
    opt_h = torch.optim.SGD([w], lr=head_lr, momentum=head_momentum, weight_decay=head_wd)
    losses = []
    sizes = world_size if isinstance(world_size, (list, tuple)) else [world_size] * steps
    for step in range(steps):
        xs, ys = zip(*[batch(step * gas + k, r, micro, num_classes)
                       for k in range(gas) for r in range(sizes[step])])
        x, y = torch.cat(xs), torch.cat(ys)
        loss = dense_arcface_loss(net(x), w, y, s, m)
        opt_b.zero_grad()
        opt_h.zero_grad()
        loss.backward()
        if backbone_clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), backbone_clip)
        if head_clip:
            torch.nn.utils.clip_grad_norm_([w], head_clip)
        opt_b.step()
        opt_h.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in net.state_dict().items()}, w.detach().clone()
