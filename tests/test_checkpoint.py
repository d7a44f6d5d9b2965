"""Checkpoints: save at 4 ranks, resume at 3 and at 2 (other ZeRO stages too), exactly.

Resuming must restore head rows by class range, the head optimizer state, the backbone's fp32
weights and its optimizer state (SGD momentum, AdamW moments) bit for bit, and training must
go on as if uninterrupted: the 4 -> 3 -> 2 run is compared with the dense reference trained
straight through on the same batches (tolerance as in test_engine: fp32 summation order).
"""
import os

import pytest
import torch

from harness import run_deepspeed_ranks
from reference import dense_reference
from tinynet import batch, ds_config, EMB, TinyNet

S, M, C, MICRO = 16.0, 0.3, 11, 3


def _build(world_size, stage, optimizer="SGD", num_classes=C):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    from hybrid_fc.head.optim import SparseAdamW
    net = TinyNet()
    cfg = ds_config(stage, micro=MICRO, world_size=world_size, optimizer=optimizer)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    if optimizer == "SGD":
        head = PartialFC(ArcFace(S, M), EMB, num_classes)
        opt = torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)
    else:
        head = PartialFC(ArcFace(S, M), EMB, num_classes, sample_rate=0.5, sparse_grad=True)
        opt = SparseAdamW(head.parameters(), lr=1e-2)
    return HybridEngine(engine, head, opt)


def _snapshot(hybrid):
    """Full backbone fp32 weights and optimizer state (DeepSpeed's own gather utilities), and
    this rank's head rows and head-optimizer state."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state
    engine = hybrid.engine
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    keys = sorted({k for st in inner.state.values() for k, v in st.items()
                   if torch.is_tensor(v) and v.numel() > 1})
    params, state = {}, {}
    for name, p in engine.module.named_parameters():
        params[name] = safe_get_full_fp32_param(p).clone()
        state[name] = {k: safe_get_full_optimizer_state(p, k).clone() for k in keys}
    head_state = {k: v.clone() if torch.is_tensor(v) else v for k, v in
                  hybrid.head_optimizer.state.get(hybrid.head.weight, {}).items()}
    scale = hybrid.head.weight_scale
    return dict(params=params, state=state, keys=keys, start=hybrid.head.class_start,
                weight=hybrid.head.weight.detach().clone(), head_state=head_state,
                steps=engine.global_steps, scale=None if scale is None else scale.detach().clone())


def _phase(rank, world_size, stage, ckdir, steps, optimizer="SGD"):
    from hybrid_fc.training.checkpoint import CheckpointMismatch, load_checkpoint, save_checkpoint
    hybrid = _build(world_size, stage, optimizer)
    client = load_checkpoint(hybrid, ckdir)
    loaded = _snapshot(hybrid) if client is not None else None
    first = hybrid.global_steps
    losses = []
    for step in range(first, first + steps):
        losses.append(hybrid.forward_backward(*batch(step, rank, MICRO, C)).item())
        hybrid.step()
    saved = _snapshot(hybrid)
    save_checkpoint(hybrid, ckdir, client_state={"next_step": hybrid.global_steps})
    errors = []
    if rank == 0 and client is not None:
        # the size changed: rank 0's saved rank state (none saved here) for every rank
        assert client == {"next_step": first, "rank_state": None, "same_layout": False}
    if client is not None:  # a different number of classes is refused with a clear error
        for bad in (_build_head_only(hybrid, C + 1), _build_head_only(hybrid, C, EMB + 1)):
            try:
                load_checkpoint(bad, ckdir)
            except CheckpointMismatch as exc:
                errors.append(str(exc))
    return dict(loaded=loaded, saved=saved, losses=losses, errors=errors)


def _build_head_only(hybrid, num_classes, emb=EMB):
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    head = PartialFC(ArcFace(S, M), emb, num_classes)
    return HybridEngine(hybrid.engine, head, torch.optim.SGD(head.parameters(), lr=0.1))


def _gather_head(results, part):
    """(centers, per-row optimizer state) of all ranks in class order; int8 centers come with
    their row scales as state key "weight_scale"."""
    starts = [r[part]["start"] for r in results]
    assert starts == sorted(starts)
    weight = torch.cat([r[part]["weight"] for r in results])
    state = {k: torch.cat([r[part]["head_state"][k] for r in results])
             for k, v in results[0][part]["head_state"].items() if torch.is_tensor(v) and v.dim()}
    if results[0][part]["scale"] is not None:
        state["weight_scale"] = torch.cat([r[part]["scale"] for r in results])
    return weight, state


def _assert_same(before, after):
    """after (loaded at W') equals before (saved at W): backbone rank 0's, head concatenated."""
    b0, a0 = before[0]["saved"], after[0]["loaded"]
    assert a0["steps"] == b0["steps"] and a0["keys"] == b0["keys"] and b0["keys"]
    for r in after:
        for name, value in b0["params"].items():
            assert torch.equal(r["loaded"]["params"][name], value), name
            for key in b0["keys"]:
                assert torch.equal(r["loaded"]["state"][name][key], b0["state"][name][key])
    wb, sb = _gather_head(before, "saved")
    wa, sa = _gather_head(after, "loaded")
    assert torch.equal(wa, wb) and sb.keys() == sa.keys() and sb
    for k in sb:
        assert torch.equal(sa[k], sb[k]), k


def test_resume_4_to_3_to_2_sgd_exact(tmp_path):
    ck = str(tmp_path / "ck")
    r4 = run_deepspeed_ranks(4, _phase, 2, ck, 3)            # ZeRO-2 at 4 ranks, 3 steps, save
    r3 = run_deepspeed_ranks(3, _phase, 3, ck, 2)            # ZeRO-3 at 3 ranks: load, 2 steps, save
    _assert_same(r4, r3)
    r2 = run_deepspeed_ranks(2, _phase, 1, ck, 2)            # ZeRO-1 at 2 ranks: load, 2 steps, save
    _assert_same(r3, r2)
    with open(os.path.join(ck, "latest")) as f:
        assert f.read() == "global_step7"
    for r in (r3, r2):
        assert len(r[0]["errors"]) == 2
        assert "num_classes" in r[0]["errors"][0] and "embedding_size" in r[0]["errors"][1]
    # Training went on as if uninterrupted: the dense reference over the same 7 steps.
    from hybrid_fc.head import init_class_centers
    ref_losses, ref_params, ref_centers = dense_reference(
        7, [4, 4, 4, 3, 3, 2, 2], MICRO, C, init_class_centers(0, C, EMB, 0), 0.2, S, M)
    losses = r4[0]["losses"] + r3[0]["losses"] + r2[0]["losses"]
    # fp32, summation order only (see test_engine): relative 1e-5
    assert max(abs(a - b) / b for a, b in zip(losses, ref_losses)) < 1e-5
    for name, ref in ref_params.items():
        assert ((r2[0]["saved"]["params"][name] - ref).norm() / ref.norm()) < 1e-5, name
    centers = torch.cat([r["saved"]["weight"] for r in r2])
    assert ((centers - ref_centers).norm() / ref_centers.norm()) < 1e-5


def test_resume_adamw_zero3_sparse_head_4_to_2_exact(tmp_path):
    """AdamW moments (+ step) under ZeRO-3 and the SparseAdamW head's per-row state."""
    ck = str(tmp_path / "ck")
    r4 = run_deepspeed_ranks(4, _phase, 3, ck, 2, "AdamW")
    r2 = run_deepspeed_ranks(2, _phase, 2, ck, 1, "AdamW")
    _assert_same(r4, r2)
    assert set(r4[0]["saved"]["keys"]) == {"exp_avg", "exp_avg_sq"}
    assert set(r2[0]["loaded"]["head_state"]) >= {"exp_avg", "exp_avg_sq", "step"}


def _killed_mid_write(rank, world_size, ckdir):
    """Save at step 2; at step 3 rank 1 dies by SIGKILL halfway through writing its head shard."""
    import signal

    import hybrid_fc.training.checkpoint as ckpt
    hybrid = _build(world_size, 2)
    for step in range(3):
        hybrid.forward_backward(*batch(step, rank, MICRO, C))
        hybrid.step()
        if step == 1:
            ckpt.save_checkpoint(hybrid, ckdir, rank_state={"rank": rank, "batches": 2})
            # what was saved, kept outside the checkpoint folder for the test to compare
            torch.save(_snapshot(hybrid), os.path.join(os.path.dirname(ckdir), f"good{rank}.pt"))
    if rank == 1:
        real_save = torch.save

        def dying_save(obj, path, *a, **k):
            if "head-rank" in str(path):
                with open(path, "wb") as f:      # a partial file under the temporary name
                    f.write(b"PK\x03\x04 half a checkpoint")
                    f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, path, *a, **k)
        ckpt.torch.save = dying_save
    ckpt.save_checkpoint(hybrid, ckdir)


def _reload(rank, world_size, ckdir):
    from hybrid_fc.training.checkpoint import load_checkpoint
    hybrid = _build(world_size, 2)
    client = load_checkpoint(hybrid, ckdir)
    return dict(_snapshot(hybrid), rank_state=client["rank_state"])


def test_kill_9_mid_write_leaves_previous_checkpoint_loadable(tmp_path):
    ck = str(tmp_path / "ck")
    results, procs = run_deepspeed_ranks(2, _killed_mid_write, ck, allow_dead=True, timeout=120)
    assert procs[1].exitcode == -9                 # rank 1 really died by SIGKILL
    assert results[1] is None and results[0] is None  # rank 0's save failed with it
    with open(os.path.join(ck, "latest")) as f:
        assert f.read() == "global_step2"           # the marker never moved
    partial = os.listdir(os.path.join(ck, "global_step3", "hybrid"))
    # rank 1's shard exists only under its temporary name; no meta.json marks the tag complete
    assert "head-rank00001.pt" not in partial and "meta.json" not in partial, partial
    assert any(n.startswith("head-rank00001.pt.tmp.") for n in partial), partial
    # The previous checkpoint loads exactly what was saved, also at another size (1 rank).
    from hybrid_fc.training.checkpoint import latest_tag
    assert latest_tag(ck) == "global_step2"
    good = [torch.load(tmp_path / f"good{r}.pt", weights_only=False) for r in range(2)]
    saved_weight = torch.cat([g["weight"] for g in good])
    for world_size in (2, 1):
        after = run_deepspeed_ranks(world_size, _reload, ck)
        assert torch.equal(torch.cat([r["weight"] for r in after]), saved_weight)
        assert after[0]["steps"] == 2
        # each rank's own state comes back at the same size; at another size rank 0's (a data
        # position continues at the same fraction of its epoch)
        assert [r["rank_state"] for r in after] == (
            [{"rank": 0, "batches": 2}, {"rank": 1, "batches": 2}] if world_size == 2
            else [{"rank": 0, "batches": 2}])
        for name, value in good[0]["params"].items():
            assert torch.equal(after[0]["params"][name], value), name
            assert torch.equal(after[0]["state"][name]["momentum_buffer"],
                               good[0]["state"][name]["momentum_buffer"])


# -- bf16 centers + int8 head-optimizer state ----------------------------------------------------
BF16_INT8 = (torch.bfloat16, torch.int8, "stochastic")
INT8_INT4_FEEDBACK = (torch.int8, torch.int4, "feedback")


def _build_low(world_size, storage, stage=2, num_classes=C):
    """A HybridEngine whose head stores low-precision centers and SparseSGD keeps low-precision
    momentum (storage: (weight_dtype, state_dtype, rounding)); half the classes sampled per
    step, so the sampler stream and the lazy rows matter on resume."""
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    from hybrid_fc.head.optim import SparseSGD
    net = TinyNet()
    cfg = ds_config(stage, micro=MICRO, world_size=world_size)
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    head = PartialFC(ArcFace(S, M), EMB, num_classes, sample_rate=0.5, sparse_grad=True,
                     weight_dtype=storage[0])
    opt = SparseSGD(head.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4,
                    state_dtype=storage[1], rounding=storage[2], seed=5)
    return HybridEngine(engine, head, opt)


def _low_phase(rank, world_size, ckdir, steps, save, storage=BF16_INT8, after=0):
    """Load `ckdir` if it exists, train `steps`, save if asked, train `after` more steps (the
    uninterrupted run a resume from that save must equal)."""
    from hybrid_fc.training.checkpoint import load_checkpoint, save_checkpoint
    hybrid = _build_low(world_size, storage)
    client = load_checkpoint(hybrid, ckdir) if os.path.isdir(ckdir) else None
    loaded = _snapshot(hybrid) if client is not None else None
    first = hybrid.global_steps
    for step in range(first, first + steps + after):
        if save and step == first + steps:
            save_checkpoint(hybrid, ckdir)
        hybrid.forward_backward(*batch(step, rank, MICRO, C))
        hybrid.step()
    if save and not after:
        save_checkpoint(hybrid, ckdir)
    return dict(loaded=loaded, saved=_snapshot(hybrid),
                rounding_step=hybrid.head_optimizer.state[hybrid.head.weight]["rounding_step"])


def _assert_same_head(before, after):
    """Every class's centers and per-row state in `after` (loaded) equal `before` (saved),
    dtypes included."""
    wb, sb = _gather_head(before, "saved")
    wa, sa = _gather_head(after, "loaded")
    assert wa.dtype == wb.dtype and torch.equal(wa, wb)
    assert set(sa) == set(sb)
    for key in sb:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def _assert_same_run(straight, resumed, dtypes, rounding_step):
    """Each rank's final state of two runs bit for bit: centers (and int8 scales), head state
    (`dtypes`: of the centers and of the momentum codes), rounding steps, backbone."""
    for a, b in zip(straight, resumed):
        assert (a["saved"]["weight"].dtype,
                a["saved"]["head_state"]["momentum_buffer"].dtype) == dtypes
        assert torch.equal(a["saved"]["weight"], b["saved"]["weight"])
        assert (a["saved"]["scale"] is None) == (b["saved"]["scale"] is None)
        assert a["saved"]["scale"] is None or torch.equal(a["saved"]["scale"], b["saved"]["scale"])
        for key, value in a["saved"]["head_state"].items():
            assert torch.equal(value, b["saved"]["head_state"][key]) if torch.is_tensor(value) \
                else value == b["saved"]["head_state"][key], key
        for name, value in a["saved"]["params"].items():
            assert torch.equal(value, b["saved"]["params"][name]), name
        assert a["rounding_step"] == b["rounding_step"] == rounding_step


def test_bf16_int8_head_resumes_bit_exact_and_reshards(tmp_path):
    """Same size: 2 steps, save, load, 2 more steps == 4 uninterrupted steps, bit for bit
    (centers, int8 codes and scales, backbone): the rounding stream, the sampler stream and the
    lazy rows all come back. Another size: the 2-rank checkpoint loads at 3 ranks with every
    class's bf16 center and int8 state exactly as saved."""
    ck = str(tmp_path / "ck")
    straight = run_deepspeed_ranks(2, _low_phase, str(tmp_path / "none"), 4, False)
    first = run_deepspeed_ranks(2, _low_phase, ck, 2, True)
    resumed = run_deepspeed_ranks(2, _low_phase, ck, 2, False)
    _assert_same_run(straight, resumed, (torch.bfloat16, torch.int8), 4)
    three = run_deepspeed_ranks(3, _low_phase, ck, 0, False)
    _assert_same_head(first, three)
    assert set(_gather_head(three, "loaded")[1]) == {"momentum_buffer", "momentum_buffer_scale"}
    assert all(r["rounding_step"] == 2 for r in three)


def test_int8_int4_head_reshards_4_3_2_and_resumes_bit_exact(tmp_path):
    """int8 centers (codes + one scale per row), int4 momentum and the int4 residual of error
    feedback (packed codes + scales, the residual's bits from the stream after the momentum's):
    saved at 4 ranks, loaded at 3 and then at 2 with every class's codes, scales and state
    exactly as saved; at 2 ranks a save, a load in fresh processes and 1 step equal the step
    the saving run took on without stopping, bit for bit (the rounding streams, the sampler
    and the lazy rows come back). Planted bugs caught: shards saved without weight_scale
    (refused on load), scales not resharded (cut from the wrong rows)."""
    ck = str(tmp_path / "ck")
    low = INT8_INT4_FEEDBACK
    four = run_deepspeed_ranks(4, _low_phase, ck, 2, True, low)        # -> global_step2
    three = run_deepspeed_ranks(3, _low_phase, ck, 1, True, low)       # -> global_step3
    _assert_same_head(four, three)
    straight = run_deepspeed_ranks(2, _low_phase, ck, 1, True, low, 1)  # -> step4, + 1
    _assert_same_head(three, straight)
    assert set(_gather_head(straight, "loaded")[1]) == {
        "momentum_buffer", "momentum_buffer_scale", "rounding_residual",
        "rounding_residual_scale", "weight_scale"}
    resumed = run_deepspeed_ranks(2, _low_phase, ck, 1, False, low)
    _assert_same_run(straight, resumed, (torch.int8, torch.uint8), 5)


def test_bf16_int8_head_shard_is_smaller():
    """A head shard holds what the head holds: bf16 centers + int8 momentum + one fp32 scale per
    row is (2 + 1 + 4/D) / (4 + 4) of the fp32 head's bytes (0.38 at D=64)."""
    import io
    from types import SimpleNamespace

    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.checkpoint import _head_shard
    from hybrid_fc.head.optim import SparseSGD
    sizes = {}
    for wd, sd in ((torch.float32, torch.float32), (torch.bfloat16, torch.int8)):
        head = PartialFC(ArcFace(S, M), 64, 4000, sample_rate=1.0, sparse_grad=True,
                         weight_dtype=wd)
        opt = SparseSGD(head.parameters(), lr=0.1, state_dtype=sd)
        head(torch.randn(8, 64), torch.randint(0, 4000, (8,))).backward()
        opt.step()
        buf = io.BytesIO()
        torch.save(_head_shard(SimpleNamespace(head=head, head_optimizer=opt)), buf)
        sizes[sd] = buf.tell()
    assert sizes[torch.int8] / sizes[torch.float32] < (2 + 1 + 4 / 64) / 8 + 0.01, sizes


def test_prune_keeps_the_newest_and_latest_and_in_flight_tags(tmp_path):
    """keep_last=2 over complete tags of steps 100..500: 400 and 500 stay, and so does 200,
    which `latest` names (a resumed run may point there); an incomplete tag (no meta.json:
    a save in flight, or foreign folders) is never touched."""
    import json

    from hybrid_fc.training.checkpoint import prune_checkpoints
    for step in (100, 200, 300, 400, 500):
        h = tmp_path / f"global_step{step}" / "hybrid"
        h.mkdir(parents=True)
        (h / "meta.json").write_text(json.dumps({"global_steps": step}))
        (h / "head-rank00000.pt").write_bytes(b"x" * 10)
    (tmp_path / "global_step600" / "hybrid").mkdir(parents=True)   # being written
    (tmp_path / "tb").mkdir()
    (tmp_path / "latest").write_text("global_step200")
    removed = prune_checkpoints(str(tmp_path), 2)
    assert sorted(removed) == ["global_step100", "global_step300"]
    assert sorted(os.listdir(tmp_path)) == ["global_step200", "global_step400", "global_step500",
                                            "global_step600", "latest", "tb"]
    with pytest.raises(ValueError, match="keep_last"):
        prune_checkpoints(str(tmp_path), 0)


# -- DeepSpeed's own LR scheduler --------------------------------------------------------------
def _warmup_lr_worker(rank, world_size, ck, steps, save):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training import checkpoint as ckpt
    from hybrid_fc.training.engine import HybridEngine
    net = TinyNet()
    cfg = ds_config(1, micro=MICRO, world_size=world_size,
                    scheduler={"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                              "warmup_max_lr": 0.05,
                                                              "warmup_num_steps": 10}})
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(), config=cfg)
    head = PartialFC(ArcFace(S, M), EMB, C)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.2))
    if not save:
        ckpt.load_checkpoint(hybrid, ck)
    lrs = []
    for step in range(steps):
        x, y = batch(engine.global_steps, rank, MICRO, C)
        hybrid.forward_backward(x, y)
        hybrid.step()
        lrs.append(hybrid.backbone_lr)
    if save:
        ckpt.save_checkpoint(hybrid, ck)
    return lrs


def test_deepspeed_lr_scheduler_continues_after_a_resume(tmp_path):
    """Bug caught: DeepSpeed's own LR scheduler state not restored from hybrid/backbone.pt: a
    WarmupLR restarted its warmup at the resumed step."""
    ck = str(tmp_path / "ck")
    straight = run_deepspeed_ranks(1, _warmup_lr_worker, str(tmp_path / "x"), 6, True)[0]
    first = run_deepspeed_ranks(1, _warmup_lr_worker, ck, 3, True)[0]
    resumed = run_deepspeed_ranks(1, _warmup_lr_worker, ck, 3, False)[0]
    assert first + resumed == straight and len(set(straight)) == 6   # still warming up
