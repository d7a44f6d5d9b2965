"""export / eval / extract on a checkpoint of a backbone outside the registry (the README's
"the head in your own DeepSpeed model" path): the checkpoint has no model config, so the
scripts say how to name the model, and `--model module:factory` loads the weights into it."""
import os
import subprocess
import sys

import pytest
import torch

from harness import run_deepspeed_ranks

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.dirname(os.path.abspath(__file__))


def _train_and_save(rank, world_size, out):
    from hybrid_fc.training.checkpoint import save_checkpoint
    from test_checkpoint import _build
    from tinynet import batch
    hybrid = _build(world_size, stage=2)
    x, y = batch(0, rank, 3, 11)
    hybrid.forward_backward(x, y)
    hybrid.step()
    save_checkpoint(hybrid, out)
    return {k: v.detach().float().clone() for k, v in hybrid.engine.module.state_dict().items()}


def test_export_of_an_own_backbone_needs_and_uses_model_factory(tmp_path):
    """Bugs caught: "no saved model config" with no way out, and an empty output folder left
    by the failed export."""
    run = str(tmp_path / "run")
    (trained,) = run_deepspeed_ranks(1, _train_and_save, run)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([TESTS, ROOT, os.environ.get("PYTHONPATH", "")]))
    export = [sys.executable, os.path.join(ROOT, "launch", "export.py"), "--checkpoint", run]
    out = tmp_path / "exported"
    r = subprocess.run(export + ["--out", str(out)], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode != 0 and "--model module:factory" in r.stderr, r.stderr[-2000:]
    assert not out.exists()
    r = subprocess.run(export + ["--out", str(out), "--model", "tinynet:nowhere"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "has no attribute 'nowhere'" in r.stderr
    r = subprocess.run(export + ["--out", str(out), "--model", "tinynet:TinyNet"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = torch.load(out / "backbone.pt", weights_only=True)
    assert saved.keys() == trained.keys()
    assert all(torch.equal(saved[k], trained[k]) for k in trained)
    # eval.py / extract.py load through the same function (TinyNet takes vectors, not
    # images: load_backbone, which load_for_inference calls before its image-size check)
    sys.path.insert(0, TESTS)
    from hybrid_fc.evaluation.export import load_backbone
    model, cfg = load_backbone(run, model="tinynet:TinyNet")
    assert cfg["backbone"] == "tinynet:TinyNet"
    assert all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="expected module:factory"):
        load_backbone(run, model="TinyNet")


OWN_NET = """
from hybrid_fc.backbones import build_backbone


def make():
    return build_backbone("iresnet_tiny", 8, input_size=16)   # 16 x 16 faces, not 112
"""


def _train_own_images(rank, world_size, out):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training import HybridEngine, save_checkpoint
    from ownnet import make
    from tinynet import ds_config
    net = make()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(1, micro=4, world_size=world_size))
    head = PartialFC(ArcFace(16.0, 0.3), 8, 10)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(rank)
    hybrid.forward_backward(torch.randn(4, 3, 16, 16, generator=g),
                            torch.randint(0, 10, (4,), generator=g))
    hybrid.step()
    save_checkpoint(hybrid, out)


def test_an_own_image_backbone_exports_at_the_size_it_was_trained(tmp_path):
    """Bugs caught: export.py --onnx / eval.py of an own backbone assumed 112-pixel input
    (ONNX: a misleading "data-dependent control flow" error; eval: a 43-line shape traceback)
    although the checkpoint could say the size it was trained at."""
    (tmp_path / "ownnet.py").write_text(OWN_NET)
    sys.path.insert(0, str(tmp_path))
    run = str(tmp_path / "run")
    run_deepspeed_ranks(1, _train_own_images, run)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(tmp_path), TESTS, ROOT,
                                           os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "exported"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "export.py"),
                        "--checkpoint", run, "--out", str(out), "--model", "ownnet:make",
                        "--onnx"], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (out / "backbone.onnx").exists()
    import json
    assert json.loads((out / "backbone.json").read_text())["input_size"] == 16
    from hybrid_fc.evaluation.export import load_for_inference
    model, cfg = load_for_inference(run, model="ownnet:make")
    assert cfg["input_size"] == 16
    with pytest.raises(Exception, match="does not take 112 x 112 images.*--input-size"):
        load_for_inference(run, model="ownnet:make", input_size=112)
