"""launch/train.py through the real `deepspeed` launcher (deepspeed.launcher.runner, what the
`deepspeed` command runs): two "nodes" on this machine with --no_ssh --node_rank, writing
WebDataset shards made by hybrid_fc.data first; then a resume on one node at another size."""
import json
import os
import re
import subprocess
import sys

import deepspeed  # noqa: F401  (conftest then builds DeepSpeed's JIT op once, up front)
import pytest
import torch

from harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from hybrid_fc.data import make_synthetic
    out = tmp_path_factory.mktemp("data") / "syn"
    make_synthetic(str(out), 24, 16, size=16, seed=0, samples_per_shard=100)
    return str(out)


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _train_args(tmp_path, dataset, steps):
    ds = {"train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 1,
          "optimizer": {"type": "SGD", "params": {"lr": 0.05, "momentum": 0.9}},
          "zero_optimization": {"stage": 2}, "zero_allow_untested_optimizer": True,
          "gradient_clipping": 5.0, "steps_per_print": 10**9}
    ds_path = tmp_path / "ds.json"
    ds_path.write_text(json.dumps(ds))
    return [os.path.join(ROOT, "launch", "train.py"),
            "--config", os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
            "--deepspeed_config", str(ds_path),
            "model.input_size=16", "head.num_classes=24", f"data.urls={dataset}",
            "data.num_workers=0", "data.shuffle_buffer=50", f"train.steps={steps}",
            "train.log_every=2", "train.checkpoint_every=3", "schedule.warmup_steps=0",
            f"train.output_dir={tmp_path / 'run'}"]


LAUNCHER = [sys.executable, "-m", "deepspeed.launcher.runner"]


# slow (~55 s): the two-node --no_ssh form also runs in the default run (the README's two-node
# and SLURM blocks, the SIGTERM test); the train.steps refusal in test_resume.py; resharding in
# test_checkpoint.py
@pytest.mark.slow
def test_two_node_no_ssh_launch_trains_checkpoints_and_resumes_at_one_rank(tmp_path, dataset):
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("nodeA slots=1\nnodeB slots=1\n")
    port = free_port()
    procs = [subprocess.Popen(
        LAUNCHER + ["--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(node),
                    "--master_addr", "127.0.0.1", "--master_port", str(port)]
        + _train_args(tmp_path, dataset, 6),
        cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for node in (0, 1)]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n\n".join(o[-4000:] for o in outs)
    # DeepSpeed's per-rank /dev/shm all-reduce buffers of this run are gone (69 MB of RAM each)
    if os.path.isdir("/dev/shm"):
        assert [n for n in os.listdir("/dev/shm") if n.startswith("deepspeed_allreduce_buffer")
                and n.split("_")[-2] == str(port)] == []
    node0 = outs[0]
    assert "start: 2 ranks" in node0 and "fresh start" in node0
    assert "done at step 6" in node0
    run = tmp_path / "run"
    from hybrid_fc.training.metrics import read_metrics
    train_rows = read_metrics(str(run), "train")
    assert [r["step"] for r in train_rows] == [2, 4, 6]
    assert all(r["loss"] > 0 and r["img_s"] > 0 and r["lr"] > 0 for r in train_rows)
    assert read_metrics(str(run), "start") == [dict(read_metrics(str(run), "start")[0],
                                                    step=0, world_size=2, resumed=False)]
    assert (run / "latest").read_text() == "global_step6"
    hybrid = run / "global_step6" / "hybrid"
    assert sorted(os.listdir(hybrid)) == ["backbone.pt", "head-rank00000.pt",
                                          "head-rank00001.pt", "meta.json"]
    meta = json.loads((hybrid / "meta.json").read_text())
    assert meta["class_ranges"] == [[0, 12], [12, 12]] and meta["global_steps"] == 6
    assert (run / "global_step3" / "hybrid" / "meta.json").exists()  # periodic checkpoint

    # Resume on one node with one rank (the head's 24 classes resharded 2 -> 1), 6 -> 9 steps:
    # a longer schedule would jump the LR, so it is refused unless schedule.allow_change=true
    def resume(*extra):
        return subprocess.run(LAUNCHER + ["--num_gpus", "1", "--master_port", str(free_port())]
                              + _train_args(tmp_path, dataset, 9) + ["train.keep_last=1", *extra],
                              cwd=tmp_path, env=_env(), capture_output=True, text=True,
                              timeout=300)
    refused = resume()
    assert refused.returncode != 0
    assert "trained with train.steps=6, this run says 9" in refused.stderr
    assert "schedule.allow_change=true" in refused.stderr
    # the LR it names is the one the run logged at its last step (was: "0 -> 2.551e-06")
    logged = [r["lr"] for r in read_metrics(str(run), "train") if r["step"] == 6][0]
    assert f"would jump from {logged:.6g} (step 6, as logged)" in refused.stderr
    assert (run / "latest").read_text() == "global_step6"
    single = resume("schedule.allow_change=true")
    out = single.stdout + single.stderr
    assert single.returncode == 0, out[-4000:]
    (change,) = read_metrics(str(run), "resume", last=False)
    assert (change["step"], change["old_steps"], change["new_steps"]) == (6, 6, 9)
    assert (change["old_world_size"], change["new_world_size"]) == (2, 1)
    assert change["old_global_batch"] == 2 * change["new_global_batch"]
    assert change["head_lr_before"] != change["head_lr_after"]
    assert "resume changes the run" in out and "global batch" in out
    assert "start: 1 rank," in out and "resumed at step 6" in out and "done at step 9" in out
    assert (run / "latest").read_text() == "global_step9"
    # train.keep_last=1: the older tags went after the new save
    assert sorted(n for n in os.listdir(run) if n.startswith("global_step")) == ["global_step9"]
    starts = read_metrics(str(run), "start", last=False)
    assert [(r["step"], r["world_size"], r["resumed"]) for r in starts] == [(0, 2, False),
                                                                           (6, 1, True)]
    assert [r["step"] for r in read_metrics(str(run), "train")] == [2, 4, 6, 8, 9]
    assert "step       8/9" in (run / "training.log").read_text()
    meta = json.loads((run / "global_step9" / "hybrid" / "meta.json").read_text())
    assert meta["class_ranges"] == [[0, 24]] and meta["world_size"] == 1


def _train_in_process(rank, world_size, out, pairs):
    import contextlib
    import io
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import train
    args = ["--config", os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
            "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_zero1_fp32.json"),
            "data.source=synthetic", "model.backbone=mlp", "model.input_size=8",
            "head.num_classes=16", "train.steps=8", "train.log_every=4",
            "train.checkpoint_every=0", "schedule.warmup_steps=2", f"train.output_dir={out}",
            f"eval.bins={pairs}", "eval.every=3", "eval.batch_size=8"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        hybrid = train.main(args)
    errors = []
    for bad in (["train.stepz=3"], ["head.sample_rate=1.5"], ["eval.bins=missing.bin"],
                # 4 billion classes x 512 on two CPU ranks: refused by the memory plan before
                # anything is allocated, on every rank, with the table
                ["head.num_classes=4000000000", "model.embedding_size=512",
                 f"train.output_dir={out}_big"],
                ["head_optim.lr=inf"],
                # finite but absurd: the centers overflow, the next loss is nan -> every rank
                # stops naming the step and the last good checkpoint (none in this folder)
                ["head_optim.lr=1e38", f"train.output_dir={out}_nan", "eval.bins=[]"]):
        try:
            train.main(args + bad)
        except (ValueError, OSError, MemoryError, FloatingPointError) as exc:
            errors.append(f"{type(exc).__name__}: {exc}")
    return hybrid.global_steps, hybrid.head_lr, errors, printed.getvalue()


def test_train_main_synthetic_source_verification_and_config_errors(tmp_path):
    """The loop itself (in-process on 2 gloo ranks): synthetic source, warmup + poly schedule to
    zero at the last step, a checkpoint at the end only, verification of a .bin pair set every
    eval.every steps and at the end (on rank 0's output only), and errors naming the field or
    file."""
    from harness import run_deepspeed_ranks
    from hybrid_fc.data import synthetic_pairs
    from hybrid_fc.evaluation import write_bin
    pairs = str(tmp_path / "pairs.bin")
    write_bin(pairs, *synthetic_pairs(16, 6, 20, size=8))
    out = str(tmp_path / "run")
    results = run_deepspeed_ranks(2, _train_in_process, out, pairs)
    for rank, (steps, lr, errors, printed) in enumerate(results):
        assert steps == 8 and lr == 0.2 * (1 - 5 / 6) ** 2      # lr of the last step (index 7)
        assert "unknown override 'train.stepz'" in errors[0]
        assert "head.sample_rate" in errors[1]
        assert "missing.bin" in errors[2]
        assert errors[3].startswith("MemoryError") and "will not fit" in errors[3]
        assert "head: centers" in errors[3] and "largest class count" in errors[3]
        assert "head_optim.lr: must be a finite number, got inf" in errors[4]
        assert re.match(r"FloatingPointError: non-finite loss \(nan\) at step [23];", errors[5])
        assert "no checkpoint in" in errors[5]
        if rank == 0:   # verified at steps 3 and 6, then the end (8); printed by rank 0 only
            assert printed.count("verify [pairs] step") == 3, printed
        else:
            assert "verify [pairs]" not in printed
    from hybrid_fc.training.metrics import read_metrics
    verified = read_metrics(out, "verify")
    assert [(r["step"], r["set"]) for r in verified] == [(3, "pairs"), (6, "pairs"), (8, "pairs")]
    assert all(0 <= r["accuracy"] <= 1 and r["std"] >= 0 for r in verified)
    names = os.listdir(out)  # (DeepSpeed also drops its zero_to_fp32.py converter here)
    assert {"config.json", "latest"} <= set(names)
    assert [n for n in names if n.startswith("global_step")] == ["global_step8"]


class _Crash(Exception):
    pass


def _train_webdataset(rank, world_size, dataset, out, steps, crash_after=None):
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import contextlib
    import io
    import train
    from hybrid_fc.training.engine import HybridEngine
    if crash_after is not None:  # the process dies right after this optimizer step
        real_step = HybridEngine.step

        def step(self):
            applied = real_step(self)
            if self.global_steps == crash_after:
                raise _Crash()
            return applied
        HybridEngine.step = step
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(_Crash):
        train.main(["--config", os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
                    "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_zero1_fp32.json"),
                    f"data.urls={dataset}", "data.num_workers=1", "data.shuffle_buffer=50",
                    "model.input_size=16", "head.num_classes=24", f"train.steps={steps}",
                    "train.checkpoint_every=3", "train.log_every=1", "train.tensorboard=false",
                    "schedule.warmup_steps=2", "model.backbone_kwargs={dropout: 0.3}",
                    f"train.output_dir={out}"])
    return None


def test_same_size_resume_is_bit_exact(tmp_path, dataset):
    """2 ranks, WebDataset shards read by a forked worker, flips on, half the classes sampled:
    7 steps straight vs the same command dying after step 5 and started again (it resumes from
    the step-3 checkpoint, mid-epoch, and redoes steps 4-7). The final checkpoints are equal bit
    for bit (backbone weights, buffers and optimizer state, head centers and optimizer state)
    and so are the losses of steps 4-7: the loader position, the flip generator, the sampler
    stream, torch's global generator (the backbone has dropout) and the LR schedule all come
    back. (Planted once each: not restoring the flip generator, the loader's position or
    torch's global generator fails it; so did the DataLoader drawing its workers' base seed
    from torch's global generator at every start.)"""
    from harness import run_deepspeed_ranks
    from hybrid_fc.training.checkpoint import load_file
    from hybrid_fc.training.metrics import read_metrics
    straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
    run_deepspeed_ranks(2, _train_webdataset, dataset, straight, 7)
    run_deepspeed_ranks(2, _train_webdataset, dataset, stopped, 7, 5)
    assert open(os.path.join(stopped, "latest")).read() == "global_step3"
    run_deepspeed_ranks(2, _train_webdataset, dataset, stopped, 7)
    for name in ("backbone.pt", "head-rank00000.pt", "head-rank00001.pt"):
        a = load_file(os.path.join(straight, "global_step7", "hybrid", name))
        b = load_file(os.path.join(stopped, "global_step7", "hybrid", name))
        leaves_a, leaves_b = [], []

        def walk(x, out):
            if isinstance(x, dict):
                for k in sorted(x, key=str):
                    if k not in ("client_state",):
                        walk(x[k], out)
            elif isinstance(x, (list, tuple)):
                for v in x:
                    walk(v, out)
            elif torch.is_tensor(x):
                out.append(x)
        walk(a, leaves_a)
        walk(b, leaves_b)
        assert len(leaves_a) == len(leaves_b) > 0, name
        assert all(torch.equal(x, y) for x, y in zip(leaves_a, leaves_b)), name
    la = {r["step"]: r["loss"] for r in read_metrics(straight, "train")}
    lb = {r["step"]: r["loss"] for r in read_metrics(stopped, "train")}
    assert [la[s] for s in (4, 5, 6, 7)] == [lb[s] for s in (4, 5, 6, 7)]


def test_brace_pattern_sources_need_and_use_samples_per_epoch(dataset):
    """data.urls as a brace pattern (no manifest.json): the error names data.samples_per_epoch;
    given, the trainer's input streams read that many samples per epoch. The shipped configs
    point at make_shards' folders (manifest inside), so they run as shipped."""
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.trainer import InputStreams
    m = json.load(open(os.path.join(dataset, "manifest.json")))
    names = sorted(s["url"] for s in m["shards"])
    pattern = os.path.join(dataset, names[0][:-10] + "{" + names[0][-10:-4] + ".." +
                           names[-1][-10:-4] + "}.tar")
    args = ["data.source=webdataset", f"data.urls={pattern}", "data.num_workers=0",
            f"head.num_classes={m['num_classes']}", "model.input_size=16"]
    with pytest.raises(ValueError, match=r"data\.samples_per_epoch=N"):
        InputStreams(load_config(None, args), 4, 0, 1, torch.device("cpu"))
    streams = InputStreams(load_config(None, args + ["data.samples_per_epoch=40"]), 4, 0, 1,
                           torch.device("cpu"))
    assert len(streams.loader) == 10
    images, labels = next(streams)
    assert images.shape == (4, 3, 16, 16) and labels.max() < m["num_classes"]
    for name in os.listdir(os.path.join(ROOT, "launch", "configs")):
        cfg = load_config(os.path.join(ROOT, "launch", "configs", name))
        assert "{" not in cfg.data.urls or cfg.data.samples_per_epoch > 0, name


def test_a_config_error_is_one_line_per_rank_not_a_traceback(tmp_path):
    """Under the deepspeed launcher a bad field is printed as one line naming it by each rank
    (it was a full traceback from every rank)."""
    cmd = LAUNCHER + ["--num_gpus", "2", "--master_port", str(free_port()),
                      os.path.join(ROOT, "launch", "train.py"), "--config",
                      os.path.join(ROOT, "launch", "configs", "quickstart.yaml"),
                      "--deepspeed_config", os.path.join(ROOT, "ds_configs", "cpu_zero1_fp32.json"),
                      "train.steps=4", f"train.output_dir={tmp_path / 'run'}"]
    r = subprocess.run(cmd, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    lines = [ln for ln in r.stderr.splitlines() if "schedule.warmup_steps" in ln]
    # each rank that got to it says so in one line (the launcher ends the other rank once the
    # first has exited: under load a slower rank may be stopped before it prints)
    expected = {f"hybrid_fc (rank {k}): error: ValueError: schedule.warmup_steps: must be <= "
                "train.steps (4), got 20 (--verbose or HYBRID_FC_TRACEBACK=1 shows the "
                "traceback)" for k in (0, 1)}
    assert lines and len(set(lines)) == len(lines) and set(lines) <= expected, r.stderr
    assert "Traceback" not in r.stderr


def test_run_script_keeps_tracebacks_of_bugs_and_one_line_for_peers(capsys, monkeypatch):
    from hybrid_fc.collectives import RankFailed
    from hybrid_fc.runtime import run_script
    monkeypatch.setenv("RANK", "3")
    monkeypatch.delenv("HYBRID_FC_TRACEBACK", raising=False)

    def peer(argv):
        raise RankFailed("rank 1 failed: ShardError: shard x.tar ...")
    assert run_script(peer) == 1
    assert capsys.readouterr().err == ("hybrid_fc (rank 3): stopping: rank 1 failed: ShardError: "
                                       "shard x.tar ...\n")

    def bug(argv):
        raise RuntimeError("an index went wrong")
    with pytest.raises(RuntimeError, match="an index went wrong"):
        run_script(bug)

    def bad_field(argv):
        raise ValueError("train.steps: must be > 0, got 0")
    assert run_script(bad_field) == 1
    assert capsys.readouterr().err == (  # one line, in one write
        "hybrid_fc (rank 3): error: ValueError: train.steps: must be > 0, got 0 (--verbose or "
        "HYBRID_FC_TRACEBACK=1 shows the traceback)\n")
    monkeypatch.setenv("HYBRID_FC_TRACEBACK", "1")  # (or --verbose): every traceback
    with pytest.raises(ValueError, match="train.steps"):
        run_script(bad_field)
    with pytest.raises(RankFailed):
        run_script(peer)
