"""Smoke runs of the README's commands and the benchmark scripts at toy sizes, as people run
them (fresh processes, the real launchers), so that none of them can rot unnoticed:

* on the README's quickstart run (tests/test_readme.py runs the README's blocks themselves):
  launch/export.py under the deepspeed launcher on its checkpoint, launch/extract.py under
  `torchrun --nproc_per_node 2` and as plain python on the exported backbone, launch/eval.py
  (plain python; under the deepspeed launcher in tests/test_export.py),
* benchmarks/data_bench.py (local disk and a local S3 server), benchmarks/center_codes.py and
  benchmarks/learning_check.py with flags for a tiny shape (head_bench.py: a README block).

Each asserts what the script promises to write or print, not only its exit status.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import deepspeed  # noqa: F401  (conftest then builds DeepSpeed's JIT op once, up front)
import numpy as np
import torch
import pytest

from harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _run(args, cwd, timeout=300):
    out = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                         timeout=timeout)
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]
    return out.stdout, text


@pytest.fixture(scope="module")
def quickstart(quickstart_run):
    """The README's main job at toy size (conftest's quickstart_run): 32 identities x 8 images,
    8 steps on 2 ranks; its run folder."""
    work, rc, out = quickstart_run
    assert rc == 0, out[-4000:]
    return Path(work) / "runs" / "quickstart", out


def test_export_extract_eval_command_lines(quickstart, tmp_path):
    """export.py under the deepspeed launcher (2 ranks: rank 0 writes, the other exits) ->
    extract.py under `torchrun --nproc_per_node 2` (each rank embeds a slice) and as plain
    python (the same rows) -> eval.py (plain python), on the quickstart's checkpoint; eval's
    accuracy is the training run's own final verification (the same model and pairs). The
    README's block runs the plain-python forms."""
    run, _ = quickstart
    exp = tmp_path / "exported"
    stdout, _ = _run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                      "--master_port", str(free_port()), os.path.join(ROOT, "launch", "export.py"),
                      "--checkpoint", str(run), "--out", str(exp), "--onnx", "--centers",
                      "--json", str(tmp_path / "written.json")], cwd=tmp_path)
    written = json.loads((tmp_path / "written.json").read_text())
    assert written == {"state_dict": str(exp / "backbone.pt"), "onnx": str(exp / "backbone.onnx"),
                       "centers": str(exp / "centers.npy")}
    assert "onnx: max |onnxruntime - torch|" in stdout
    centers = np.load(exp / "centers.npy")
    assert centers.shape == (32, 64) and np.isfinite(centers).all()

    for how, prefix in (("torchrun", [sys.executable, "-m", "torch.distributed.run",
                                      "--nproc_per_node", "2", "--master_port", str(free_port())]),
                        ("python", [sys.executable])):
        _run(prefix + [os.path.join(ROOT, "launch", "extract.py"), "--checkpoint",
                       str(exp / "backbone.pt"), "--images", str(run / "data"), "--out",
                       str(tmp_path / f"{how}.npy")], cwd=tmp_path)
    emb, one = np.load(tmp_path / "torchrun.npy"), np.load(tmp_path / "python.npy")
    keys = (tmp_path / "torchrun.keys.txt").read_text().split()
    labels = np.load(tmp_path / "torchrun.labels.npy")
    assert emb.shape == (256, 64) and len(set(keys)) == len(keys) == 256
    assert np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert sorted(np.bincount(labels, minlength=32)) == [8] * 32
    assert np.allclose(emb, one, atol=1e-5)
    assert (tmp_path / "python.keys.txt").read_text().split() == keys

    stdout, _ = _run([sys.executable, os.path.join(ROOT, "launch", "eval.py"),
                      "--checkpoint", str(run), "--pairs", str(run / "heldout_pairs.bin"),
                      "--json", str(tmp_path / "r.json")], cwd=tmp_path)
    (result,) = json.loads((tmp_path / "r.json").read_text())
    from hybrid_fc.training.metrics import read_metrics
    final = read_metrics(str(run), "verify")[-1]
    assert result["name"] == "heldout_pairs" and result["num_pairs"] == 40
    assert result["accuracy"] == final["accuracy"] and result["threshold"] == final["threshold"]
    assert f"{100 * result['accuracy']:.2f}" in stdout


def test_center_codes_tiny(tmp_path):
    _run([sys.executable, os.path.join(ROOT, "benchmarks", "center_codes.py"), "--rows", "40",
          "--dim", "16", "--json", str(tmp_path / "r.json")], cwd=tmp_path)
    r = json.loads((tmp_path / "r.json").read_text())
    assert set(r) == {"representation", "one_write", "drift", "speed"}
    assert set(r["one_write"]) == {"bf16", "int8", "float8_e4m3fn"}
    assert r["representation"]["gaussian/int8"]["rel_rms"] > 0


def test_data_bench_tiny(tmp_path):
    """64 images, one pass, local disk and the local S3 server (moto, a test extra)."""
    stdout, _ = _run([sys.executable, os.path.join(ROOT, "benchmarks", "data_bench.py"),
                      "--images", "64", "--batch", "16", "--passes", "1", "--shuffle-buffer",
                      "16", "--min-seconds", "0.05", "--data", str(tmp_path / "d"),
                      "--json", str(tmp_path / "r.json")], cwd=tmp_path)
    r = json.loads((tmp_path / "r.json").read_text())
    assert r["images"] == 64
    for key in ("decode_simplejpeg_per_core", "decode_pil_per_core", "loader_local_per_core",
                "loader_s3_per_core"):
        assert r[key] > 0, key


@pytest.mark.slow  # the learning check's full pipeline at toy size: ~25 s
def test_learning_check_tiny(tmp_path):
    """One run through the deepspeed launcher (1 rank, 2 steps), its evaluation, the untrained
    reference, the plot and the JSON."""
    out = tmp_path / "lc"
    stdout, _ = _run([sys.executable, os.path.join(ROOT, "benchmarks", "learning_check.py"),
                      "schedule.warmup_steps=0", "--out", str(out), "--png",
                      str(out / "curves.png"), "--identities", "16", "--images", "4",
                      "--heldout", "8", "--pairs", "20", "--size", "16", "--steps", "2",
                      "--eval-every", "2", "--ranks", "1", "--master-port", str(free_port()),
                      "--runs", "r0.5:head.sample_rate=0.5"], cwd=tmp_path)
    assert "| untrained backbone |" in stdout and "| r0.5 |" in stdout
    assert (out / "curves.png").stat().st_size > 1000
    result = json.loads((out / "learning_check.json").read_text())
    assert list(result["runs"]) == ["r0.5"] and result["accuracy_curves"]["r0.5"][0][0] == 2
    assert 0 <= result["runs"]["r0.5"]["accuracy"] <= 1


def test_quickstart_heldout_pairs_are_not_saturated():
    """The quickstart's held-out pairs (its own generator settings and sizes) are hard enough
    that an untrained backbone scores near chance (<= 65%), so the printed verification curve
    can show learning. Bug caught: the generator's defaults, where an untrained iresnet_tiny
    already scored 86%."""
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import quickstart as qs
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.training.config import load_config
    from hybrid_fc.data import synthetic_pairs
    from hybrid_fc.evaluation import evaluate, load_pair_set, write_bin
    import tempfile
    cfg = load_config(os.path.join(ROOT, "launch", "configs", "quickstart.yaml"))
    torch.manual_seed(cfg.train.seed)
    model = build_backbone(cfg.model.backbone, cfg.model.embedding_size,
                           input_size=cfg.model.input_size).eval()
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "pairs.bin")
        write_bin(path, *synthetic_pairs(1000, 200, 600, size=32, seed=0, noise=qs.NOISE,
                                         distinct=qs.DISTINCT))
        result = evaluate(model, load_pair_set(path), cfg.model.input_size, batch_size=200)
    assert 0.4 <= result.accuracy <= 0.65, result.accuracy
