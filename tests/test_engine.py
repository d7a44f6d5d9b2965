"""HybridEngine against a dense single-process reference, on real DeepSpeed engines (gloo, CPU).

Every case trains a tiny backbone (tests/tinynet.TinyNet) plus a PartialFC head
(sample_rate=1, so the loss is the full softmax) on 2 or 3 ranks under ZeRO 0-3 and compares
losses, backbone weights and the concatenated head shards with `dense_reference`, which sees the
concatenation of all ranks' micro-batches as one batch and uses plain torch SGD.
"""
import math
import os
import time

import pytest
import torch

from harness import run_deepspeed_ranks
from reference import dense_reference
from tinynet import batch, ds_config, EMB, full_params, InfGrad, patch_fp16_supported, TinyNet

S, M, HEAD_LR = 16.0, 0.3, 0.2
STEPS = 4


def _train(rank, world_size, stage, precision, steps, gas, micro, num_classes, clip):
    if precision == "fp16":
        patch_fp16_supported()
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    net = TinyNet()
    cfg = ds_config(stage, precision, micro=micro, gas=gas, world_size=world_size)
    if clip:
        cfg["gradient_clipping"] = clip[0]
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    head = PartialFC(ArcFace(S, M), EMB, num_classes)
    opt = torch.optim.SGD(head.parameters(), lr=HEAD_LR, momentum=0.9, weight_decay=5e-4)
    hybrid = HybridEngine(engine, head, opt, max_grad_norm=clip[1] if clip else 0.0)
    losses, applied = [], []
    for step in range(steps):
        micro_losses = []
        for k in range(gas):
            x, y = batch(step * gas + k, rank, micro, num_classes)
            micro_losses.append(hybrid.forward_backward(x, y).item())
            applied.append(hybrid.step())
        losses.append(sum(micro_losses) / gas)
    return dict(losses=losses, applied=applied, params=full_params(engine),
                shard=head.weight.detach().clone(), skipped=engine.skipped_steps,
                steps=engine.global_steps)


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


# Tolerances (relative L2 error of weights after STEPS steps):
#  fp32: 1e-5 — the same math in float32, only summation order differs (measured ~3e-7).
#  bf16: 5e-2 — embeddings and matmuls in bf16 (8-bit mantissa, ~4e-3 per op; measured 6e-3).
#  fp16: 1e-2 — 11-bit mantissa with loss scaling (measured 1e-3).
CASES = [  # (world_size, stage, precision, gas, micro, num_classes, (backbone clip, head clip), tol)
    (2, 0, "fp32", 1, 4, 10, None, 1e-5),
    (2, 1, "fp32", 1, 4, 10, (1.0, 2.0), 1e-5),   # both clippings active, vs torch's clip
    (3, 2, "fp32", 1, 3, 11, None, 1e-5),          # 11 classes over 3 ranks: uneven shards
    (2, 3, "fp32", 1, 4, 10, None, 1e-5),
    (2, 2, "fp32", 2, 2, 10, None, 1e-5),          # accumulation 2 x 2 == one batch of 4
    (2, 1, "bf16", 1, 4, 10, None, 5e-2),
    (2, 3, "bf16", 1, 4, 10, None, 5e-2),
    (2, 2, "fp16", 1, 4, 10, None, 1e-2),
]


@pytest.mark.parametrize("world_size,stage,precision,gas,micro,num_classes,clip,tol", CASES,
                         ids=[f"w{c[0]}-zero{c[1]}-{c[2]}-gas{c[3]}" + ("-clip" if c[6] else "")
                              for c in CASES])
def test_matches_dense_reference(world_size, stage, precision, gas, micro, num_classes, clip,
                                 tol):
    from hybrid_fc.head import init_class_centers
    res = run_deepspeed_ranks(world_size, _train, stage, precision, STEPS, gas, micro, num_classes, clip)
    ref_losses, ref_params, ref_centers = dense_reference(
        STEPS, world_size, micro, num_classes, init_class_centers(0, num_classes, EMB, 0),
        HEAD_LR, S, M, gas=gas, backbone_clip=clip[0] if clip else 0.0,
        head_clip=clip[1] if clip else 0.0)
    for r in res:  # every rank stepped every time, no fp16 overflow in these runs
        assert r["skipped"] == 0 and r["steps"] == STEPS
        assert r["applied"] == ([False] * (gas - 1) + [True]) * STEPS
        assert r["losses"] == res[0]["losses"]  # the head's loss is global: same on every rank
    centers = torch.cat([r["shard"] for r in res])
    assert centers.shape == (num_classes, EMB)
    assert _rel(centers, ref_centers) < tol
    for name, ref in ref_params.items():
        for r in res:
            assert _rel(r["params"][name], ref) < tol, name
    if gas == 1:  # with accumulation the per-micro-batch losses differ from the batch loss
        assert max(abs(a - b) / b for a, b in zip(res[0]["losses"], ref_losses)) < tol


# -- fp16 overflow -------------------------------------------------------------------------
class _PoisonNet(TinyNet):
    poison = False

    def forward(self, x):
        h = torch.tanh(self.fc1(x))
        return self.fc2(InfGrad.apply(h) if self.poison else h)


def _overflow(rank, world_size, stage):
    patch_fp16_supported()
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    net = _PoisonNet()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(stage, "fp16", world_size=world_size))
    head = PartialFC(ArcFace(S, M), EMB, 10)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=HEAD_LR,
                                                        momentum=0.9))
    out = {}
    for step in range(3):
        net.poison = step == 1 and rank == 1          # only rank 1 overflows, at step 1
        before = (full_params(engine), head.weight.detach().clone(), hybrid.loss_scale)
        hybrid.forward_backward(*batch(step, rank, 4, 10))
        applied = hybrid.step()
        after = (full_params(engine), head.weight.detach().clone(), hybrid.loss_scale)
        out[step] = dict(applied=applied, scale_before=before[2], scale_after=after[2],
                         backbone_moved=any(not torch.equal(before[0][k], after[0][k])
                                            for k in after[0]),
                         head_moved=not torch.equal(before[1], after[1]))
    out["skipped"] = engine.skipped_steps
    out["global_steps"] = engine.global_steps
    return out


def test_fp16_overflow_skips_head_and_backbone_on_every_rank():
    res = run_deepspeed_ranks(2, _overflow, 2)
    for r in res:
        assert r[0]["applied"] and r[0]["backbone_moved"] and r[0]["head_moved"]
        s1 = r[1]
        assert not s1["applied"] and not s1["backbone_moved"] and not s1["head_moved"]
        assert s1["scale_after"] < s1["scale_before"]  # dynamic scale lowered (hysteresis 1)
        assert r[2]["applied"] and r[2]["backbone_moved"] and r[2]["head_moved"]
        assert r["skipped"] == 1 and r["global_steps"] == 3
    assert res[0][1]["scale_after"] == res[1][1]["scale_after"]


# -- schedule and argument checks ----------------------------------------------------------
def test_warmup_decay_shapes():
    from hybrid_fc.training.engine import WarmupDecay
    poly = WarmupDecay(total_steps=10, warmup_steps=2, decay="poly", power=2.0)
    assert [poly(s) for s in range(2)] == [0.5, 1.0]
    assert poly(2) == 1.0 and poly(10) == 0.0
    assert math.isclose(poly(6), (1 - 4 / 8) ** 2)
    cos = WarmupDecay(total_steps=10, warmup_steps=0, decay="cosine", min_ratio=0.1)
    assert math.isclose(cos(5), 0.1 + 0.9 * 0.5) and math.isclose(cos(10), 0.1)
    assert WarmupDecay(5, 0, "constant")(4) == 1.0
    with pytest.raises(ValueError, match="warmup_steps"):
        WarmupDecay(5, 6)
    with pytest.raises(ValueError, match="decay"):
        WarmupDecay(5, 0, "linearish")


def _schedule_and_errors(rank, world_size):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine, WarmupDecay
    net = TinyNet()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(1, world_size=world_size, lr=0.05))
    head = PartialFC(ArcFace(S, M), EMB, 10)
    opt = torch.optim.SGD(head.parameters(), lr=0.4)
    sched = WarmupDecay(total_steps=6, warmup_steps=2, decay="cosine")
    hybrid = HybridEngine(engine, head, opt, lr_schedule=sched)
    lrs = []
    for step in range(4):
        hybrid.forward_backward(*batch(step, rank, 4, 10))
        hybrid.step()
        lrs.append((hybrid.head_lr, hybrid.backbone_lr))
    errors = {}
    for name, make in {
        "foreign": lambda: HybridEngine(engine, head, torch.optim.SGD(net.parameters(), lr=1)),
        "negative_clip": lambda: HybridEngine(engine, PartialFC(ArcFace(), EMB, 10,
                                                         process_group=None), opt,
                                       max_grad_norm=-1),
    }.items():
        try:
            make()
        except ValueError as exc:
            errors[name] = str(exc)
    return lrs, errors, [sched(s) for s in range(4)]


def test_schedule_follows_engine_steps_and_bad_arguments_are_refused():
    for lrs, errors, factors in run_deepspeed_ranks(2, _schedule_and_errors):
        for (head_lr, bb_lr), f in zip(lrs, factors):
            assert math.isclose(head_lr, 0.4 * f) and math.isclose(bb_lr, 0.05 * f)
        assert "not the head's" in errors["foreign"]
        assert "max_grad_norm" in errors["negative_clip"]


def _sparse_vs_dense(rank, world_size, sparse):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    from hybrid_fc.head.optim import SparseSGD
    net = TinyNet()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(1, world_size=world_size))
    head = PartialFC(ArcFace(S, M), EMB, 10, sparse_grad=sparse)
    opt = (SparseSGD if sparse else torch.optim.SGD)(head.parameters(), lr=HEAD_LR,
                                                     momentum=0.9, weight_decay=5e-4)
    hybrid = HybridEngine(engine, head, opt, max_grad_norm=0.5)
    norms = []
    for step in range(3):
        hybrid.forward_backward(*batch(step, rank, 4, 10))
        hybrid.step()
        norms.append(hybrid.last_head_grad_norm.item())
    return head.weight.detach().clone(), norms


def test_sparse_head_gradient_is_clipped_like_the_dense_one():
    """sample_rate=1: every row has a gradient, so SparseSGD == torch SGD; the clipped norms
    and weights must agree (fp32 rounding only: 1e-6 relative)."""
    dense = run_deepspeed_ranks(2, _sparse_vs_dense, False)
    sparse = run_deepspeed_ranks(2, _sparse_vs_dense, True)
    assert dense[0][1] == dense[1][1]                    # the global norm is the same on ranks
    assert all(n > 0.5 for n in dense[0][1])             # clipping was active
    for a, b in zip(dense[0][1], sparse[0][1]):
        assert abs(a - b) <= 1e-6 * a
    wd, ws = torch.cat([r[0] for r in dense]), torch.cat([r[0] for r in sparse])
    assert _rel(ws, wd) < 1e-6


def test_stale_build_locks_are_removed_and_fresh_ones_kept(tmp_path, monkeypatch):
    """A torch extension build lock left by a killed process hangs every later DeepSpeed start;
    clear_stale_build_locks removes locks older than its limit, leaves younger ones alone and
    mentions them only after 2 minutes, without inviting anyone to delete them."""
    from hybrid_fc.runtime import clear_stale_build_locks
    old, fresh = tmp_path / "py311_cpu" / "old_op", tmp_path / "py311_cpu" / "busy_op"
    for d in (old, fresh):
        d.mkdir(parents=True)
        (d / "lock").write_text("")
        (d / "op.so").write_text("built")
    os.utime(old / "lock", (time.time() - 3600, time.time() - 3600))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    said = []
    removed = clear_stale_build_locks(1800, print_fn=said.append)
    assert removed == [str(old / "lock")]
    assert not (old / "lock").exists() and (fresh / "lock").exists()
    assert (old / "op.so").exists()
    assert any("stale" in s and "old_op" in s for s in said)
    assert not any("busy_op" in s for s in said)  # a live build: nothing to say, nothing to do
    os.utime(fresh / "lock", (time.time() - 300, time.time() - 300))
    said.clear()
    assert clear_stale_build_locks(1800, print_fn=said.append) == []
    assert (fresh / "lock").exists()
    assert len(said) == 1 and "waiting on the op build lock" in said[0]
    assert "delete" not in said[0]  # never an invitation to delete a live lock
    # still waiting some time later (torch waits on a lock silently): the watcher names it
    from hybrid_fc.runtime import watch_build_locks
    said.clear()
    done = watch_build_locks(after_s=0.2, print_fn=said.append)
    time.sleep(1.0)
    assert len(said) == 1 and "busy_op" in said[0] and "waiting on the op build lock" in said[0]
    done.set()
    said.clear()
    watch_build_locks(after_s=0.5, print_fn=said.append).set()  # start-up done in time
    time.sleep(1.0)
    assert said == []
