"""The tiny DeepSpeed model of the engine, checkpoint and trainer tests (a helper module).

TinyNet (Linear -> tanh -> Linear, no BatchNorm: a data-parallel run equals one big batch),
its deterministic micro-batches, DeepSpeed JSON configs for every ZeRO stage and precision, a
simulated fp16 overflow (InfGrad), the real fp16 path on CPU (patch_fp16_supported), and the
full fp32 parameters of an engine. Also the `--model tinynet:TinyNet` factory of the own-model
tests.
"""
import torch
from torch import nn

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
