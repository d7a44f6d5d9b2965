"""A resumed run is the run it claims to be: what a resume may change is applied and recorded or
refused (hybrid_fc.training.resume), `latest` must name a checkpoint of this run, a checkpoint
of non-finite weights is refused, a failed DeepSpeed write on one rank stops every rank, and the
run's logs read as one run across restarts (no repeated steps, a start line each time).

Runs are in-process on real gloo ranks with DeepSpeed (harness.run_deepspeed_ranks) through
launch/train.py's main, a tiny MLP backbone and 16 classes."""
import json
import os
import sys
import time

import pytest
import torch

from harness import run_deepspeed_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _main(out, *extra, steps=4, data=None):
    """launch/train.py's main on this rank: synthetic data (or `data` shards), 16 classes."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train
    source = ([f"data.urls={data}", "data.num_workers=0", "data.shuffle_buffer=20"] if data
              else ["data.source=synthetic"])
    args = ["--config", os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
            "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_zero1_fp32.json"),
            "model.backbone=mlp", "model.input_size=8", "head.num_classes=16",
            f"train.steps={steps}", "train.log_every=1", "train.checkpoint_every=2",
            "schedule.warmup_steps=1", "head_optim.name=sparse_sgd", "head.sparse_grad=true",
            "train.tensorboard=false", f"train.output_dir={out}", *source, *extra]
    return train.main(args)


def _error(fn, *args, **kw):
    try:
        fn(*args, **kw)
    except Exception as exc:  # noqa: BLE001 - the test reads the class and message
        return f"{type(exc).__name__}: {exc}"
    return None


def _policy_worker(rank, world_size, out):
    from hybrid_fc.training.metrics import read_metrics
    _main(out)                                               # 4 steps, checkpoints 2 and 4
    files = sorted(os.listdir(os.path.join(out, "global_step4", "hybrid")))
    errors = {case: _error(_main, out, *case) for case in (
        ("head_optim.state_dtype=int8",),                    # refused: the state's dtype
        ("head.weight_dtype=bfloat16",),                     # refused: the shards' storage
        ("schedule.warmup_steps=3",),                        # the LR would jump
        ("head_optim.lr=0.05",),                             # the LR would jump
    )}
    # a longer run: refused, naming the LR the run logged at its last step (was "0 -> 2.551e-06")
    errors["train.steps=6"] = _error(_main, out, steps=6)
    lr4 = [r["lr"] for r in read_metrics(out, "train") if r["step"] == 4]
    # applied: the config wins over what the checkpoint's optimizer held (momentum 0.9)
    hybrid = _main(out, "head_optim.momentum=0.0", "head.margin=cosface", "head.m=0.35",
                   "head.sample_rate=0.5", "data.synthetic_noise=0.7")
    momentum = hybrid.head_optimizer.param_groups[0]["momentum"]
    margin = type(hybrid.head.margin_loss).__name__
    after = sorted(os.listdir(os.path.join(out, "global_step4", "hybrid")))
    # allowed schedule change: applied, with the LRs before and after
    hybrid = _main(out, "schedule.warmup_steps=3", "schedule.allow_change=true", steps=5)
    return dict(errors=errors, files=(files, after), lr4=lr4, momentum=momentum, margin=margin,
                records=read_metrics(out, "resume", last=False),
                lr5=[r["lr"] for r in read_metrics(out, "train") if r["step"] == 5],
                log=open(os.path.join(out, "training.log")).read() if rank == 0 else "")


def test_every_resume_change_is_applied_and_recorded_or_refused(tmp_path):
    """Bugs caught: a changed head_optim.state_dtype accepted (the momentum stayed fp32), the
    checkpoint's momentum 0.9 silently overriding a new 0.0 while the saved config said 0.0,
    margin / sample-rate / schedule changes accepted with no log line and no resume record, a
    longer train.steps refused naming LR values the run never had."""
    r = run_deepspeed_ranks(1, _policy_worker, str(tmp_path / "run"))[0]
    e = r["errors"]
    state = e[("head_optim.state_dtype=int8",)]
    assert "ValueError: head_optim.state_dtype: the checkpoint" in state
    assert "has head_optim.state_dtype='float32', this run says 'int8'" in state
    assert "head.weight_dtype" in e[("head.weight_dtype=bfloat16",)]
    for case in (("schedule.warmup_steps=3",), ("head_optim.lr=0.05",)):
        assert "learning rate would jump" in e[case] and "schedule.allow_change=true" in e[case]
    steps = e["train.steps=6"]
    assert "trained with train.steps=4, this run says 6" in steps, steps
    assert f"would jump from {r['lr4'][0]:.6g} (step 4, as logged)" in steps, steps
    assert "schedule.allow_change=true" in steps
    assert r["files"][0] == r["files"][1]   # a refused resume wrote nothing
    assert r["momentum"] == 0.0 and r["margin"] == "CosFace"
    applied, scheduled = r["records"]
    assert applied["step"] == 4
    for field, change in {"head.margin": ["arcface", "cosface"], "head.m": [0.2, 0.35],
                          "head_optim.momentum": [0.9, 0.0],
                          "data.synthetic_noise": [0.5, 0.7]}.items():
        assert applied["changes"][field] == change, (field, applied["changes"])
    assert "resume changes the run: head_optim.momentum 0.9 -> 0.0" in r["log"]
    # the schedule change: its record holds the LRs, and step 5 ran at the new schedule's LR
    assert scheduled["changes"]["schedule.warmup_steps"] == [1, 3]
    assert r["lr5"] == [pytest.approx(scheduled["head_lr_after"])]
    from hybrid_fc.training.engine import WarmupDecay
    assert scheduled["head_lr_after"] == pytest.approx(0.2 * WarmupDecay(5, 3)(4))
    assert scheduled["head_lr_before"] == pytest.approx(0.2 * WarmupDecay(4, 1)(3))


def test_the_resume_policy_table_covers_every_field():
    """Each config field has one rule, and the README's table says it."""
    from hybrid_fc.training.config import ExperimentConfig, config_to_dict
    from hybrid_fc.training.resume import IGNORED, REFUSED, SCHEDULE, resume_policy
    readme = open(os.path.join(ROOT, "README.md")).read()
    table = readme[readme.index("| setting changed on resume |"):]
    table = table[:table.index("\n\n")]
    for section, values in config_to_dict(ExperimentConfig()).items():
        for key in values:
            field = f"{section}.{key}"
            if field in IGNORED:
                continue
            rule, _ = resume_policy(field)
            row = [line for line in table.splitlines()
                   if f"`{field}`" in line or f"`{section}.*`" in line]
            assert row, f"{field} is not in the README's resume table"
            word = {REFUSED: "refused", SCHEDULE: "allow_change"}.get(rule, "applied")
            assert word in row[0], (field, rule, row[0])


# -- the run folder: latest, missing latest, non-finite checkpoints ---------------------------
def _folder_worker(rank, world_size, out):
    _main(out)                                               # global_step2, global_step4
    stamp = os.path.getmtime(os.path.join(out, "global_step4", "hybrid", "meta.json"))
    latest = os.path.join(out, "latest")
    errors = []
    for text in ("", "../other_run/global_step6", "/tmp", "global_step9"):
        with open(latest, "w") as f:
            f.write(text)
        errors.append(_error(_main, out, steps=6))
    os.remove(latest)
    errors.append(_error(_main, out, steps=6))              # checkpoints but no latest
    with open(latest, "w") as f:
        f.write("global_step4")
    # a head shard of non-finite weights: refused, and not named as the last good one
    shard = os.path.join(out, "global_step4", "hybrid", "head-rank00000.pt")
    state = torch.load(shard, weights_only=True)
    state["weight"][3, 1] = float("nan")
    torch.save(state, shard)
    errors.append(_error(_main, out))
    untouched = stamp == os.path.getmtime(os.path.join(out, "global_step4", "hybrid",
                                                       "meta.json"))
    return errors, untouched, sorted(n for n in os.listdir(out) if n.startswith("global_step"))


def test_latest_must_name_a_checkpoint_of_this_run_and_nan_checkpoints_are_refused(tmp_path):
    """Bugs caught: an empty `latest` gave a silent fresh start that overwrote the checkpoints;
    `latest` = ../other_run/global_step6 resumed from another run; a NaN head shard was loaded
    (and then named as "the last good checkpoint")."""
    out = str(tmp_path / "run")
    errors, untouched, tags = run_deepspeed_ranks(1, _folder_worker, out)[0]
    empty, other, absolute, missing, no_latest, nan = errors
    assert "CheckpointError" in empty and "latest is empty" in empty
    assert "'../other_run/global_step6', which is not a checkpoint folder of this run" in other
    assert "'/tmp', which is not a checkpoint folder" in absolute
    assert "names 'global_step9' but" in missing and "does not exist" in missing
    assert "holds checkpoints (global_step2, global_step4) but no `latest` file" in no_latest
    assert "global_step4 holds non-finite weights (head centers of classes [0, 16))" in nan
    assert "last good" not in nan
    assert untouched and tags == ["global_step2", "global_step4"]


def test_find_checkpoint_of_an_empty_or_new_folder_is_a_fresh_start(tmp_path):
    from hybrid_fc.training.checkpoint import find_checkpoint
    assert find_checkpoint(str(tmp_path / "new")) is None
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "global_step3").mkdir()   # no meta.json: not a checkpoint
    assert find_checkpoint(str(tmp_path / "empty")) is None


def test_corrupt_meta_json_is_named(tmp_path):
    """Bug caught: meta.json as a list or with missing keys gave KeyError / TypeError without
    the path."""
    from hybrid_fc.training.checkpoint import CheckpointError, read_meta
    hdir = tmp_path / "run" / "global_step1" / "hybrid"
    hdir.mkdir(parents=True)
    good = {"format": 1, "num_classes": 5, "embedding_size": 4, "world_size": 2,
            "dp_world_size": 2, "global_steps": 1, "class_ranges": [[0, 3], [3, 2]]}
    for bad, match in (([1, 2], "expected a JSON object"),
                       ({k: v for k, v in good.items() if k != "world_size"},
                        "world_size must be an integer"),
                       (dict(good, num_classes="5"), "num_classes must be an integer"),
                       (dict(good, class_ranges=[[0, 5]]), "class_ranges"),
                       (dict(good, experiment=[1]), "experiment must be a JSON object")):
        (hdir / "meta.json").write_text(json.dumps(bad))
        with pytest.raises(CheckpointError, match=match) as info:
            read_meta(str(tmp_path / "run"), "global_step1")
        assert "meta.json" in str(info.value)
    (hdir / "meta.json").write_text(json.dumps(good))
    assert read_meta(str(tmp_path / "run"), "global_step1")["num_classes"] == 5


# -- a DeepSpeed file one rank cannot write ------------------------------------------------------
def _ds_write_worker(rank, world_size, out):
    if rank == 1:  # a folder where rank 1's ZeRO optimizer file of step 2 goes
        os.makedirs(os.path.join(out, "global_step2",
                                 "zero_pp_rank_1_mp_rank_00_optim_states.pt"))
    t0 = time.monotonic()
    error = _error(_main, out, steps=4)
    return error, time.monotonic() - t0, os.path.exists(os.path.join(out, "latest"))


def test_a_deepspeed_file_one_rank_cannot_write_stops_every_rank(tmp_path):
    """Bug caught: the failing rank raised out of DeepSpeed's save while the other waited in its
    final barrier: no output at all, a hang (here: the harness' timeout)."""
    out = str(tmp_path / "run")
    (e0, t0, latest0), (e1, t1, latest1) = run_deepspeed_ranks(2, _ds_write_worker, out,
                                                               timeout=150)
    assert e1.startswith("CheckpointError: cannot write DeepSpeed's file") and \
        "zero_pp_rank_1_mp_rank_00_optim_states.pt" in e1
    assert e0.startswith("RankFailed: rank 1 failed: CheckpointError")
    assert not latest0 and not latest1   # nothing of the failed checkpoint is marked complete
    assert max(t0, t1) < 60


# -- the logs of a restarted run -----------------------------------------------------------------
def _log_worker(rank, world_size, out, data):
    from hybrid_fc.training.metrics import read_metrics
    _main(out, data=data)                                     # 4 steps, checkpoints at 2 and 4
    with open(os.path.join(out, "latest"), "w") as f:   # as if killed after step 4's lines but
        f.write("global_step2")                          # before its checkpoint was complete
    _main(out, data=data)
    return (open(os.path.join(out, "training.log")).read(),
            [r["step"] for r in read_metrics(out, "train", last=False)])


def test_a_restart_reads_as_one_run(tmp_path, data_tiny_shards):
    """Bugs caught: training.log had no start/restart line and repeated the step lines of the
    interrupted run after a resume; 16 head classes over a 12-class dataset passed without a
    note."""
    out = str(tmp_path / "run")
    text, steps = run_deepspeed_ranks(1, _log_worker, out, data_tiny_shards)[0]
    assert steps == [1, 2, 3, 4]                       # steps 3, 4 once each, the resumed run's
    for step in (1, 2, 3, 4):
        assert text.count(f"step {step:>7d}/4") == 1, text
    starts = [line for line in text.splitlines() if line.startswith("start: ")]
    assert len(starts) == 2 and starts[0].endswith("fresh start")
    assert "resumed at step 2 from" in starts[1]
    assert text.count("the 4 centers above them never get a positive") == 2


def test_eta_counts_only_this_process_steps():
    """Bug caught: after a resume at step 900 the ETA divided the time since the restart by
    the global step (900 + k), promising the end ~100x too early."""
    from types import SimpleNamespace
    from hybrid_fc.training.trainer import _Log
    log = _Log.__new__(_Log)  # the progress line alone: no files
    log.rank, log.every, log.total, log.images_per_step = 0, 10, 1000, 32
    log.start, log.start_step, log.t0, log.count = time.time() - 10.0, 900, time.time(), 10
    log.loss_sum, log.writer = torch.tensor(5.0), None
    lines = []
    log.metrics = SimpleNamespace(log=lines.append, record=lambda *a, **k: None)
    engine = SimpleNamespace(skipped_steps=0)
    hybrid = SimpleNamespace(global_steps=910, head_lr=0.1, backbone_lr=0.1, loss_scale=1.0,
                             engine=engine)
    log.maybe_print(hybrid)
    eta_min = float(lines[0].split("eta ")[1].split(" min")[0])
    # 10 steps took ~10 s: 90 steps left take ~90 s = 1.5 min (not 90 * 10 / 910 s)
    assert 1.4 <= eta_min <= 1.7, lines[0]


# -- the synthetic source resumes exactly too ----------------------------------------------------
def _synthetic_resume_worker(rank, world_size, out):
    import shutil
    import torch.distributed as dist
    _main(out)                                               # 4 steps, checkpoints 2 and 4
    dist.barrier()                                           # every rank is done reading
    if rank == 0:
        shutil.copytree(os.path.join(out, "global_step4"), os.path.join(out, "straight4"))
        with open(os.path.join(out, "latest"), "w") as f:
            f.write("global_step2")                          # died after step 3, say
    dist.barrier()
    _main(out)                                               # redoes steps 3 and 4
    return None


def test_synthetic_source_resumes_bit_exact(tmp_path):
    """Bug caught: the synthetic source's micro-batch counter not restored (a resumed run drew
    the batches of steps 1-2 again as steps 3-4)."""
    from hybrid_fc.training.checkpoint import load_file
    out = tmp_path / "run"
    run_deepspeed_ranks(2, _synthetic_resume_worker, str(out))
    for name in ("backbone.pt", "head-rank00000.pt", "head-rank00001.pt"):
        a = load_file(str(out / "straight4" / "hybrid" / name))
        b = load_file(str(out / "global_step4" / "hybrid" / name))
        weights = ((a["params"], b["params"]) if name == "backbone.pt"
                   else ({"w": a["weight"]}, {"w": b["weight"]}))
        assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0]), name


def test_ranks_flip_different_images():
    """Bug caught: every rank seeding its flip generator alike (all ranks flipping the same
    images of their batches: half the augmentation's diversity)."""
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.trainer import InputStreams
    cfg = load_config(None, ["data.source=synthetic", "model.input_size=8"])
    draws = [torch.rand(64, generator=InputStreams(cfg, 4, r, 2, torch.device("cpu"))
                        .augment_rng) for r in (0, 1)]
    assert not torch.equal(draws[0], draws[1])
    again = torch.rand(64, generator=InputStreams(cfg, 4, 0, 2, torch.device("cpu")).augment_rng)
    assert torch.equal(draws[0], again)   # seeded: the same rank draws the same


def test_a_run_whose_steps_all_overflow_stops():
    """Bug caught: head.scale=1e30 trained no step at all (every step's gradients overflowed and
    was skipped) and exited 0."""
    from types import SimpleNamespace
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.trainer import MAX_SKIPPED_IN_A_ROW, Trainer
    with pytest.raises(ValueError, match=r"head\.scale: must be in \(0, 1024\]"):
        load_config(None, ["head.scale=1e30"])
    trainer = Trainer.__new__(Trainer)   # the loop's step alone, around a head that skips
    trainer.gas, trainer.device, trainer.out = 1, torch.device("cpu"), "/nowhere"
    trainer.batches = iter(lambda: (torch.zeros(2, 3), torch.zeros(2)), None)
    trainer.log = SimpleNamespace(add=lambda loss: None)
    trainer.hybrid = SimpleNamespace(forward_backward=lambda x, y: torch.tensor(1.0),
                                     step=lambda: False, global_steps=7)
    for _ in range(MAX_SKIPPED_IN_A_ROW - 1):
        trainer._step()
    with pytest.raises(FloatingPointError, match=f"the last {MAX_SKIPPED_IN_A_ROW} steps .* "
                                                 "were all skipped"):
        trainer._step()
    trainer.hybrid.step = lambda: True   # one applied step resets the count
    trainer._step()
    assert trainer.skipped_in_a_row == 0


def _bad_data_worker(rank, world_size, out):
    import contextlib
    import io
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        error = _error(_main, out, "model.backbone=iresnet100", "model.input_size=112",
                       data=os.path.join(out, "no_such_shards"))
    return error, printed.getvalue()


def test_bad_data_fails_before_the_model_is_built(tmp_path):
    """Bug caught: a wrong data.urls (or missing S3 credentials) failed only after the backbone
    was built and DeepSpeed initialized (minutes for a real backbone on a GPU node)."""
    error, printed = run_deepspeed_ranks(1, _bad_data_worker, str(tmp_path / "run"))[0]
    assert error.startswith("ShardError") and "no_such_shards" in error, error
    assert "memory plan" not in printed   # printed just before the backbone is built
