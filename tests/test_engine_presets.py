"""Every ds_configs/*.json preset, as shipped, drives HybridEngine and round-trips a checkpoint.

On 2 gloo ranks each preset builds a real engine around iresnet_tiny (BatchNorm buffers and a
frozen BatchNorm1d scale, as insightface's), trains with the head beside it, saves, and loads
into a fresh engine through the portable path. The restored state is compared for real: the
parameters moved during training and come back bit for bit, the optimizer state is non-empty
and comes back (element-wise moments and AdamW's scalar `step`), as do the loss scaler, the
step / skipped-step counters and the head; then both engines take one more step on the same
batch and must stay bit-identical.

fp16 presets run with the CPU accelerator's fp16 check patched (the real loss-scaling path),
`initial_scale_power` lowered so that steps are applied (at the shipped 2^16 every step of
this tiny net overflows and nothing would be compared), and two forced overflows on rank 1
first (an inf gradient), so the loss scale is halved once and the skipped-step counter is 2:
a load that forgot the scaler or the counters restores a state that differs from the saved
one. Stage-0 bf16/fp16 (not shipped) train too.
"""
import glob
import json
import os

import torch
from torch import nn

from harness import run_deepspeed_ranks
from tinynet import InfGrad, patch_fp16_supported

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
SIZE, EMB, C = 16, 16, 10
FP16_SCALE_POWER = 8   # 256: no overflow on this net's gradients, so steps are applied
FORCED_OVERFLOWS = 2   # fp16: the first 2 steps overflow on rank 1 (hysteresis 2: scale / 2)


class _Poisonable(nn.Module):
    """The backbone, with an inf gradient on its output while `poison` is set (an overflow)."""

    def __init__(self, net):
        super().__init__()
        self.net, self.poison = net, False

    def forward(self, x):
        out = self.net(x)
        return InfGrad.apply(out) if self.poison else out


def _build(cfg):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.training.engine import HybridEngine
    torch.manual_seed(0)
    net = _Poisonable(build_backbone("iresnet_tiny", EMB, input_size=SIZE, width=4))
    engine, *_ = deepspeed.initialize(model=net, config=cfg, model_parameters=[
        p for p in net.parameters() if p.requires_grad])
    head = PartialFC(ArcFace(16.0, 0.3), EMB, C)
    return HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9))


def _scalar_state(engine):
    """The backbone optimizer's scalar state per optimized tensor (AdamW: `step`), read from the
    inner torch optimizer directly, not through hybrid_fc.training.checkpoint."""
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return [{k: float(v) for k, v in st.items() if not torch.is_tensor(v) or v.numel() == 1}
            for st in inner.state.values()]


def _scaler_state(engine):
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    return {} if scaler is None else {k: v for k, v in vars(scaler).items()
                                      if isinstance(v, (bool, int, float))}


def _equal_trees(a, b):
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal_trees(a[k], b[k]) for k in a)
    if torch.is_tensor(a):
        return torch.is_tensor(b) and torch.equal(a, b)
    return a == b


def _train_step(hybrid, x, y, poison=False):
    hybrid.engine.module.poison = poison
    loss = hybrid.forward_backward(x, y).item()
    applied = hybrid.step()
    hybrid.engine.module.poison = False
    return loss, applied


def _presets(rank, world_size, tmp, configs):
    patch_fp16_supported()
    from hybrid_fc.training.checkpoint import backbone_state, load_checkpoint, save_checkpoint
    report = {}
    for name, cfg in configs:
        hybrid = _build(cfg)
        fp16 = hybrid.engine.fp16_enabled()
        micro = hybrid.engine.train_micro_batch_size_per_gpu()
        gas = hybrid.gradient_accumulation_steps
        g = torch.Generator().manual_seed(rank)

        def micro_batch():
            return (torch.randn(micro, 3, SIZE, SIZE, generator=g),
                    torch.randint(0, C, (micro,), generator=g))
        start = backbone_state(hybrid.engine)
        head_start = hybrid.head.weight.detach().clone()
        steps = 2 + (FORCED_OVERFLOWS if fp16 else 0)
        losses, applied = [], []
        for step in range(steps):
            for _ in range(gas):
                poison = fp16 and step < FORCED_OVERFLOWS and rank == 1
                loss, ok = _train_step(hybrid, *micro_batch(), poison=poison)
                losses.append(loss)
            applied.append(ok)
        # fp16/bf16 without ZeRO have no portable path (their fp32 masters sit in DeepSpeed's
        # FP16_UnfusedOptimizer): DeepSpeed's own (unpickling) loader, opted in
        stage0_low = hybrid.engine.zero_optimization_stage() == 0 and (
            fp16 or hybrid.engine.bfloat16_enabled())
        folder = os.path.join(tmp, name)
        save_checkpoint(hybrid, folder)
        before = backbone_state(hybrid.engine)
        fresh = _build(cfg)
        if stage0_low:  # the portable path refuses rather than drop the masters and momentum
            try:
                load_checkpoint(_build(cfg), folder)
            except NotImplementedError as exc:
                report[name + ":portable"] = str(exc)
        load_checkpoint(fresh, folder, trust_deepspeed_files=stage0_low)
        after = backbone_state(fresh.engine)
        r = dict(losses=losses, applied=applied, steps=hybrid.global_steps, stage0_low=stage0_low,
                 moved=sum(not torch.equal(start["params"][k], before["params"][k])
                           for k in start["params"]),
                 n_params=len(start["params"]),
                 head_moved=not torch.equal(head_start, hybrid.head.weight),
                 n_state=len(before["optimizer"]["state"]),
                 same=_equal_trees(before["params"], after["params"]),
                 same_state=_equal_trees(before["optimizer"]["state"],
                                         after["optimizer"]["state"]),
                 same_buffers=_equal_trees(before["buffers"], after["buffers"]),
                 keys=before["optimizer"]["elem_keys"],
                 scalars=(_scalar_state(hybrid.engine), _scalar_state(fresh.engine)),
                 scaler=(_scaler_state(hybrid.engine), _scaler_state(fresh.engine)),
                 scales=(hybrid.loss_scale, fresh.loss_scale),
                 counters=(before["counters"], after["counters"]),
                 head_equal=torch.equal(fresh.head.weight, hybrid.head.weight))
        # One more step on each, same batch: a state the comparisons above missed shows here.
        x, y = micro_batch()
        for h in (hybrid, fresh):
            for _ in range(gas):
                _train_step(h, x, y)
        a, b = backbone_state(hybrid.engine), backbone_state(fresh.engine)
        r["next_step_equal"] = (_equal_trees(a["params"], b["params"])
                                and _equal_trees(a["optimizer"]["state"], b["optimizer"]["state"])
                                and torch.equal(hybrid.head.weight, fresh.head.weight)
                                and hybrid.loss_scale == fresh.loss_scale)
        report[name] = r
    bare = {k: v for k, v in configs[0][1].items() if k not in ("data_types", "fp16")}
    try:  # bf16 without buffer_dtype: BatchNorm would fail mid-forward; refused up front
        _build(dict(bare, bf16={"enabled": True}))
    except ValueError as exc:
        report["bf16_without_buffer_dtype"] = str(exc)
    return report


def test_presets_train_and_round_trip(tmp_path):
    """Catches (each planted once): a load_checkpoint that skips the backbone (fp16 presets
    passed it before: no step was ever applied), an AdamW `step` reset to 0 on load, a loss
    scaler or skipped-step counter not restored."""
    configs = []
    for path in PRESETS:
        with open(path) as f:
            configs.append((os.path.basename(path)[:-5], json.load(f)))
    assert {n for n, _ in configs} >= {f"zero{s}_{p}" for s in (1, 2, 3) for p in ("bf16", "fp16")}
    base = dict(configs[0][1], train_micro_batch_size_per_gpu=4, gradient_accumulation_steps=2)
    base.pop("fp16", None), base.pop("bf16", None), base.pop("data_types", None)
    configs += [("zero0_bf16", dict(base, zero_optimization={"stage": 0}, bf16={"enabled": True},
                                    data_types={"buffer_dtype": "bf16"})),
                ("zero0_fp16", dict(base, zero_optimization={"stage": 0},
                                    fp16={"enabled": True, "initial_scale_power": 8},
                                    data_types={"buffer_dtype": "fp16"}))]
    for name, cfg in configs:   # as shipped, apart from the torch AdamW on CPU (no FusedAdam)
        if cfg["optimizer"]["type"] == "AdamW":
            cfg["optimizer"]["params"]["torch_adam"] = True
        if "fp16" in cfg:       # and a scale at which this tiny net's steps are applied
            cfg["fp16"] = dict(cfg["fp16"], initial_scale_power=FP16_SCALE_POWER)
    reports = run_deepspeed_ranks(2, _presets, str(tmp_path), configs, timeout=400)
    for name, cfg in configs:
        r0, r1 = reports[0][name], reports[1][name]
        fp16 = "fp16" in cfg
        assert r0["losses"] == r1["losses"] and all(map(torch.isfinite, map(torch.tensor,
                                                                            r0["losses"])))
        # fp16: the forced overflows are skipped on both ranks, then every step is applied
        want = [False] * FORCED_OVERFLOWS + [True, True] if fp16 else [True, True]
        assert r0["applied"] == r1["applied"] == want, (name, r0["applied"], r1["applied"])
        assert r0["steps"] == len(want), name
        # training really changed what the checkpoint must restore
        assert r0["moved"] >= r0["n_params"] // 2 and r0["head_moved"], (name, r0["moved"])
        if r0["stage0_low"]:  # state invisible to backbone_state: the next step compares it
            assert "without ZeRO (stage 0) is not supported" in reports[0][name + ":portable"]
        else:
            assert r0["n_state"] >= r0["n_params"] // 2, (name, r0["n_state"])
            assert set(r0["keys"]) in ({"momentum_buffer"}, {"exp_avg", "exp_avg_sq"}), name
        for r in (r0, r1):
            assert r["same"] and r["same_state"] and r["same_buffers"] and r["head_equal"], name
            assert r["scalars"][0] == r["scalars"][1], (name, r["scalars"])
            assert r["scaler"][0] == r["scaler"][1], (name, r["scaler"])
            assert r["scales"][0] == r["scales"][1] and r["counters"][0] == r["counters"][1], \
                (name, r["scales"], r["counters"])
            assert r["next_step_equal"], name
        if "exp_avg" in r0["keys"]:   # AdamW's step counter is a scalar and must be there
            assert r0["scalars"][0] and all(s.get("step") == 2 for s in r0["scalars"][0]), \
                (name, r0["scalars"])
        if fp16:   # the overflows lowered the scale below a fresh engine's; both were skipped
            assert r0["scales"][0] < 2.0 ** FP16_SCALE_POWER, (name, r0["scales"])
            assert r0["counters"][0]["skipped_steps"] == FORCED_OVERFLOWS, name
    assert '"buffer_dtype": "bf16"' in reports[0]["bf16_without_buffer_dtype"]
