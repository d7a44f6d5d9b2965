"""Export: a ZeRO-3 checkpoint (2 CPU ranks, real DeepSpeed) -> plain fp32 state dict, class
centers, ONNX checked with onnxruntime; embedding extraction; launch/eval.py's table.

References: the full fp32 parameters as DeepSpeed itself reports them on the training ranks
(safe_get_full_fp32_param), DeepSpeed's independent zero_to_fp32 consolidation of the same
checkpoint, the per-rank head shards as held in memory, and PyTorch forward passes.
"""
import os
import shutil

import numpy as np
import pytest
import torch

from _extras import require_extra
from harness import run_deepspeed_ranks
from tinynet import ds_config

from hybrid_fc.evaluation.export import (CheckpointError, OnnxExportError, export_class_centers,
                              export_onnx, load_backbone, load_backbone_weights, save_backbone)

SIZE, EMB, C = 16, 8, 13
MODEL = {"backbone": "iresnet_tiny", "embedding_size": EMB, "input_size": SIZE,
         "backbone_kwargs": {}}


def _train_and_save(rank, world_size, ckdir):
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.training.checkpoint import save_checkpoint
    from hybrid_fc.training.engine import HybridEngine
    torch.manual_seed(0)
    net = build_backbone("iresnet_tiny", EMB, input_size=SIZE)   # BatchNorm: buffers too
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(3, micro=4, world_size=world_size))
    head = PartialFC(ArcFace(16.0, 0.3), EMB, C)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1))
    g = torch.Generator().manual_seed(rank)
    for _ in range(2):
        hybrid.forward_backward(torch.randn(4, 3, SIZE, SIZE, generator=g),
                                torch.randint(0, C, (4,), generator=g))
        hybrid.step()
    from deepspeed.utils import safe_get_full_fp32_param
    params = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            params[n] = safe_get_full_fp32_param(p).clone()
        else:  # IResNet's frozen `features.weight`: no fp32 master, gather the parameter
            with deepspeed.zero.GatheredParameters([p]):
                params[n] = p.detach().float().clone()
    own_buffers = {n: b.clone() for n, b in engine.module.named_buffers()}  # this rank's stats
    save_checkpoint(hybrid, ckdir, client_state={"experiment": {"model": MODEL}})
    buffers = {n: b.clone() for n, b in engine.module.named_buffers()}      # after the save
    hybrid.sync_buffers()   # as evaluation does first: every rank embeds with one model
    # Evaluation on the live ZeRO-3 engine: ranks with fewer images must still call forward
    # as often as the others (parameters are gathered inside forward), here 3 calls of 2 on
    # 5 and 3 images; a missing dummy call would hang rank 0.
    from hybrid_fc.evaluation import embed_images
    images = torch.randint(0, 256, (5 - 2 * rank, 3, SIZE, SIZE), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(7))
    emb, _ = embed_images(hybrid, images, batch_size=2, num_calls=3)
    return (params, buffers, head.class_start, head.weight.detach().clone(), (images, emb),
            own_buffers)


@pytest.fixture(scope="module")
def zero3_run(tmp_path_factory):
    ckdir = str(tmp_path_factory.mktemp("export") / "run")
    results = run_deepspeed_ranks(2, _train_and_save, ckdir)
    return ckdir, results


def test_state_dict_from_zero3_checkpoint(zero3_run, tmp_path):
    ckdir, results = zero3_run
    params, buffers, *_ = results[0]
    sd, cfg, source = load_backbone_weights(ckdir)
    assert source.endswith(os.path.join("hybrid", "backbone.pt")) and cfg == MODEL
    assert set(sd) == set(params) | set(buffers)
    for name, value in params.items():       # exact: the saved fp32 masters, nothing recomputed
        assert sd[name].dtype == torch.float32 and torch.equal(sd[name], value), name
    # BatchNorm statistics: each rank tracked its own; the checkpoint holds their mean (the
    # step counters: rank 0's), while each rank goes on with its own (saving changes nothing)
    own = [r[5] for r in results]
    assert not torch.equal(own[0]["bn1.running_mean"], own[1]["bn1.running_mean"])
    for name in own[0]:
        if name.endswith(("running_mean", "running_var")):
            assert torch.equal(sd[name], (own[0][name] + own[1][name]) / 2), name
        else:
            assert torch.equal(sd[name], own[0][name]), name
        for rank in (0, 1):
            assert torch.equal(results[rank][1][name], own[rank][name]), name
    # DeepSpeed's own consolidation of the ZeRO-3 partitions (an independent path) agrees
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    with open(os.path.join(ckdir, "latest")) as f:
        tag = f.read()
    ref = get_fp32_state_dict_from_zero_checkpoint(ckdir, tag)
    for name in params:
        assert torch.equal(sd[name], ref[name].float()), name
    # the plain file loads into a freshly built backbone and gives the same embeddings
    out = save_backbone(ckdir, str(tmp_path / "bb" / "backbone.pt"))
    from hybrid_fc.backbones import build_backbone
    fresh = build_backbone("iresnet_tiny", EMB, input_size=SIZE)
    fresh.load_state_dict(torch.load(out, weights_only=True))
    model, _ = load_backbone(ckdir)
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(x), model(x))
    again, cfg2 = load_backbone(out)          # backbone.pt + backbone.json
    assert cfg2 == MODEL
    # the live ZeRO-3 engine embedded like the exported model (fp32; summation order: 1e-5)
    from hybrid_fc.evaluation import embed_images
    for images, emb in (r[4] for r in results):
        ref, _ = embed_images(model, images, batch_size=8)
        torch.testing.assert_close(emb, ref, atol=1e-5, rtol=0)
    # without hybrid/backbone.pt: the DeepSpeed files alone (zero_to_fp32 fallback)
    plain = str(tmp_path / "plain")
    shutil.copytree(ckdir, plain)
    shutil.rmtree(os.path.join(plain, tag, "hybrid"))
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):   # unpickling: opt-in
        load_backbone_weights(plain)
    sd2, _, source2 = load_backbone_weights(plain, trust_checkpoint=True)
    assert source2.endswith("model_states.pt")
    for name in params:
        assert torch.equal(sd2[name], params[name]), name


def test_class_centers(zero3_run, tmp_path):
    ckdir, results = zero3_run
    ref = torch.cat([r[3] for r in sorted(results, key=lambda r: r[2])])
    assert ref.shape == (C, EMB)
    assert torch.equal(export_class_centers(ckdir), ref)
    path = export_class_centers(ckdir, str(tmp_path / "centers.npy"))
    np.testing.assert_array_equal(np.load(path), ref.numpy())


def _bf16_shard(full):
    """bf16 rows: exactly the fp32 values of the stored bf16 numbers."""
    stored = full.bfloat16()
    return (lambda s, n: {"weight": stored[s:s + n].clone()}), stored.float()


def _int8_shard(full):
    """int8 codes + one fp32 scale per row: code x (scale / 127) in fp32, as the head decodes."""
    from hybrid_fc.head.precision import encode_rows
    codes, scale = encode_rows(full.clone(), signed=True)
    return (lambda s, n: {"weight": codes[s:s + n].clone(), "weight_scale": scale[s:s + n].clone()}
            ), codes.float() * (scale / 127).unsqueeze(1)


@pytest.mark.parametrize("storage, name", [(_bf16_shard, "bfloat16"), (_int8_shard, "int8")])
def test_low_precision_class_centers_export_as_fp32_and_say_so(tmp_path, storage, name):
    """Shards of a bf16 or int8 head (head.weight_dtype), two class ranges: centers.npy is
    float32 with exactly the stored values (int8: decoded with each row's scale), and the report
    names the stored dtype. Planted bug caught: int8 codes written without their scales."""
    import json
    hdir = tmp_path / "run" / "global_step1" / "hybrid"
    hdir.mkdir(parents=True)
    shard, expected = storage(torch.randn(7, 4))
    ranges = [[0, 4], [4, 3]]
    for r, (s, n) in enumerate(ranges):
        torch.save({"class_start": s, "num_local": n, **shard(s, n)},
                   hdir / f"head-rank{r:05d}.pt")
    (hdir / "meta.json").write_text(json.dumps({
        "format": 1, "num_classes": 7, "embedding_size": 4, "world_size": 2, "dp_world_size": 2,
        "global_steps": 1, "class_ranges": ranges}))
    (tmp_path / "run" / "latest").write_text("global_step1")
    said = []
    path = export_class_centers(str(tmp_path / "run"), str(tmp_path / "c.npy"), report=said.append)
    got = np.load(path)
    assert got.dtype == np.float32 and np.array_equal(got, expected.numpy())
    assert len(said) == 1 and f"stored as {name}" in said[0] and "float32" in said[0]
    # a shard of the wrong width: refused, and nothing loadable is left under the name (bug
    # caught: centers.npy was written in place and kept its zero rows after the refusal)
    torch.save({"class_start": 4, "num_local": 3, "weight": torch.zeros(3, 5)},
               hdir / "head-rank00001.pt")
    with pytest.raises(CheckpointError, match=r"head-rank00001\.pt holds classes \[4, 7\) of "
                                              r"width 5; meta\.json says \[4, 7\) of width 4"):
        export_class_centers(str(tmp_path / "run"), str(tmp_path / "bad.npy"))
    assert sorted(os.listdir(tmp_path)) == ["c.npy", "run"]


def test_checkpoint_without_backbone(tmp_path):
    run = tmp_path / "run"
    (run / "global_step5" / "hybrid").mkdir(parents=True)
    (run / "global_step5" / "hybrid" / "meta.json").write_text("{}")
    (run / "latest").write_text("global_step5")
    with pytest.raises(CheckpointError, match="checkpoint without a backbone"):
        load_backbone_weights(str(run))
    torch.save({"params": {}}, run / "global_step5" / "hybrid" / "backbone.pt")
    with pytest.raises(CheckpointError, match="checkpoint without a backbone.*no 'params'"):
        load_backbone_weights(str(run))
    with pytest.raises(CheckpointError, match="no `latest` file"):
        load_backbone_weights(str(tmp_path))


def _tiny_model():
    from hybrid_fc.backbones import build_backbone
    torch.manual_seed(1)
    model = build_backbone("iresnet_tiny", EMB, input_size=SIZE)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def test_onnx_dynamic_batch_matches_pytorch(tmp_path):
    onnx = require_extra("onnx")          # test extras: fail, never skip, when missing
    ort = require_extra("onnxruntime")
    model = _tiny_model()
    path = str(tmp_path / "bb.onnx")
    info = export_onnx(model, path, SIZE)
    assert info["max_abs_diff"] <= 1e-4
    graph = onnx.load(path).graph
    assert graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # independently: onnxruntime at a batch size the export never saw, raw (unnormalized)
    # embeddings; fp32 kernels differ in summation order only: 1e-4 relative to their scale.
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(5, 3, SIZE, SIZE)
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        ref = model(x)
    assert got.shape == (5, EMB)
    torch.testing.assert_close(got, ref, atol=1e-4 * float(ref.abs().max()), rtol=0)


class _DataDependent(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(3 * SIZE * SIZE, EMB)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        if y.mean() > 0:          # a branch on tensor values: a trace would freeze one side
            return y
        return -y


def test_onnx_refuses_data_dependent_control_flow(tmp_path):
    require_extra("onnx")
    with pytest.raises(OnnxExportError, match="_DataDependent.*data-dependent control flow"):
        export_onnx(_DataDependent(), str(tmp_path / "x.onnx"), SIZE)
    assert not os.path.exists(tmp_path / "x.onnx")


def _extract_rank(rank, world_size, source, out):
    from hybrid_fc.evaluation.extract import extract_embeddings
    return extract_embeddings(_tiny_model(), source, out, SIZE, batch_size=4)


def test_extract_folder_two_ranks_equal_reference(tmp_path):
    from PIL import Image
    from harness import run_ranks
    from hybrid_fc.evaluation import decode_images, embed_images
    rng = np.random.default_rng(0)
    root = tmp_path / "gallery"
    names = ["b/2.jpg", "a/1.png", "a/0.jpg", "c/d/3.jpg", "c/4.jpg", "5.jpg", "a/6.jpg"]
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3)).astype(np.uint8)).save(root / name)
    (root / "notes.txt").write_text("not an image")
    out = str(tmp_path / "emb.npy")
    assert run_ranks(2, _extract_rank, str(root), out) == [7, 7]
    keys = open(tmp_path / "emb.keys.txt").read().split("\n")[:-1]
    assert keys == sorted(names)
    emb = np.load(out)
    data = [(root / k).read_bytes() for k in keys]
    ref, _ = embed_images(_tiny_model(), decode_images(data, SIZE), batch_size=16)
    np.testing.assert_allclose(emb, ref.numpy(), atol=1e-5, rtol=0)   # summation order only
    assert not [p for p in os.listdir(tmp_path) if ".part" in p]
    assert not os.path.exists(tmp_path / "emb.labels.npy")


def test_extract_shards_keys_and_labels(tmp_path, data_tiny_shards):
    from hybrid_fc.evaluation.extract import extract_embeddings
    out = str(tmp_path / "train.npy")
    n = extract_embeddings(_tiny_model(), data_tiny_shards, out, SIZE, batch_size=32)
    keys = open(tmp_path / "train.keys.txt").read().split()
    labels = np.load(tmp_path / "train.labels.npy")
    assert n == 96 and len(keys) == 96 and len(set(keys)) == 96
    # the synthetic set's key is the sample index and its label index // images_per_id (8)
    assert [int(k) // 8 for k in keys] == labels.tolist()
    assert np.load(out).shape == (96, EMB)


def test_launch_eval_prints_table(zero3_run, tmp_path, capsys):
    import pickle
    import importlib.util
    spec = importlib.util.spec_from_file_location(
        "launch_eval", os.path.join(os.path.dirname(__file__), "..", "launch", "eval.py"))
    launch_eval = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch_eval)
    from test_evaluation import _pairs
    images, issame = _pairs(10)
    with open(tmp_path / "lfw.bin", "wb") as f:
        pickle.dump((images, issame), f, protocol=2)
    ckdir, _ = zero3_run
    results = launch_eval.main(["--checkpoint", ckdir, "--pairs", str(tmp_path / "lfw.bin"),
                                "--json", str(tmp_path / "r.json")])
    text = capsys.readouterr().out
    assert "lfw" in text and "accuracy" in text and f"{100 * results[0].accuracy:6.2f}" in text
    assert os.path.isfile(tmp_path / "r.json")
    # eval.py under the deepspeed launcher on 2 ranks (--pairs and --ijb, the same JSON as one
    # process): tests/test_ijb.py::test_eval_checkpoint_onnx_and_two_ranks_agree
