"""Every ds_configs/*.json preset, as shipped, drives HybridEngine and round-trips a checkpoint.

On 2 gloo ranks each preset builds a real engine around iresnet_tiny (BatchNorm buffers and a
frozen BatchNorm1d scale, as insightface's), takes two steps with the head beside it, saves,
and loads into a fresh engine through the portable path; the backbone state gathered after the
load must equal the one saved, bit for bit. fp16 presets run with the CPU accelerator's fp16
check patched (the real loss-scaling path). Stage-0 bf16/fp16 (not shipped) train too.
"""
import glob
import json
import os

import torch

from test_engine_support import patch_fp16_supported, run_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "ds_configs", "*.json")))
SIZE, EMB, C = 16, 16, 10


def _build(cfg):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.engine import HybridEngine
    torch.manual_seed(0)
    net = build_backbone("iresnet_tiny", EMB, input_size=SIZE, width=4)
    engine, *_ = deepspeed.initialize(model=net, config=cfg, model_parameters=[
        p for p in net.parameters() if p.requires_grad])
    head = PartialFC(ArcFace(16.0, 0.3), EMB, C)
    return HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1, momentum=0.9))


def _presets(rank, world_size, tmp, configs):
    patch_fp16_supported()
    from hybrid_fc.checkpoint import backbone_state, load_checkpoint, save_checkpoint
    report = {}
    for name, cfg in configs:
        hybrid = _build(cfg)
        micro = hybrid.engine.train_micro_batch_size_per_gpu()
        g = torch.Generator().manual_seed(rank)
        losses = []
        for _ in range(2 * hybrid.gradient_accumulation_steps):
            x = torch.randn(micro, 3, SIZE, SIZE, generator=g)
            losses.append(hybrid.forward_backward(x, torch.randint(0, C, (micro,),
                                                                   generator=g)).item())
            hybrid.step()
        zero = hybrid.engine.zero_optimization_stage()
        fp16_stage0 = hybrid.engine.fp16_enabled() and zero == 0
        folder = os.path.join(tmp, name)
        save_checkpoint(hybrid, folder)
        before = backbone_state(hybrid.engine)
        fresh = _build(cfg)
        # fp16 without ZeRO has no portable path: DeepSpeed's own (unpickling) loader, opted in
        load_checkpoint(fresh, folder, trust_deepspeed_files=fp16_stage0)
        after = backbone_state(fresh.engine)
        same = all(torch.equal(before["params"][k], after["params"][k]) for k in before["params"])
        same_state = all(torch.equal(v, after["optimizer"]["state"][k][key])
                         for k, per in before["optimizer"]["state"].items()
                         for key, v in per.items())
        same_buffers = all(torch.equal(v, after["buffers"][k]) for k, v in
                           before["buffers"].items())
        report[name] = dict(losses=losses, steps=hybrid.global_steps, same=same,
                            same_state=same_state, same_buffers=same_buffers,
                            keys=before["optimizer"]["elem_keys"],
                            scales=(hybrid.loss_scale, fresh.loss_scale),
                            counters=(before["counters"], after["counters"]),
                            head_equal=torch.equal(fresh.head.weight, hybrid.head.weight))
    bare = {k: v for k, v in configs[0][1].items() if k not in ("data_types", "fp16")}
    try:  # bf16 without buffer_dtype: BatchNorm would fail mid-forward; refused up front
        _build(dict(bare, bf16={"enabled": True}))
    except ValueError as exc:
        report["bf16_without_buffer_dtype"] = str(exc)
    return report


def test_presets_train_and_round_trip(tmp_path):
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
    reports = run_ranks(2, _presets, str(tmp_path), configs, timeout=400)
    for name, _ in configs:
        r0, r1 = reports[0][name], reports[1][name]
        assert r0["losses"] == r1["losses"] and all(map(torch.isfinite, map(torch.tensor,
                                                                            r0["losses"])))
        assert r0["steps"] == 2, name
        assert r0["same"] and r0["same_buffers"] and r0["same_state"] and r0["head_equal"], name
        assert r1["same"] and r1["same_state"], name
        assert r0["scales"][0] == r0["scales"][1] and r0["counters"][0] == r0["counters"][1], name
        if r0["keys"]:
            assert set(r0["keys"]) in ({"momentum_buffer"}, {"exp_avg", "exp_avg_sq"}), name
    assert '"buffer_dtype": "bf16"' in reports[0]["bf16_without_buffer_dtype"]
