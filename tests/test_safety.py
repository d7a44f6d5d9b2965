"""Nothing read from a checkpoint runs code: crafted pickles that would create a marker file.

Each crafted file, if unpickled, calls os.system("touch MARKER"). Every reader of this project's
files (resume, export, eval/extract through load_backbone, class centers) must refuse it with
an error naming the file, and the marker must not exist afterwards. DeepSpeed's own files are
read only with an explicit trust switch.
"""
import json
import os

import pytest
import torch

from hybrid_fc.training.checkpoint import CheckpointError, load_file
from hybrid_fc.evaluation.export import (export_class_centers, load_backbone,
                                         load_backbone_weights)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _craft(path, marker, wrap=lambda evil: evil):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.save(wrap(_Evil(marker)), path)


def test_plain_unpickling_would_run_the_payload(tmp_path):
    """The crafted file is real: torch.load(weights_only=False) runs it (so the refusals below
    are meaningful)."""
    marker = tmp_path / "ran"
    _craft(str(tmp_path / "x.pt"), marker)
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker.exists()


def _run_dir(tmp_path):
    """A checkpoint layout with meta.json, `latest` and one tag."""
    run = tmp_path / "run"
    hdir = run / "global_step1" / "hybrid"
    hdir.mkdir(parents=True)
    (hdir / "meta.json").write_text(json.dumps({
        "format": 1, "num_classes": 4, "embedding_size": 2, "world_size": 1, "dp_world_size": 1,
        "global_steps": 1, "class_ranges": [[0, 4]]}))
    (run / "latest").write_text("global_step1")
    return run, hdir


def test_crafted_files_are_refused_by_every_reader(tmp_path, capfd):
    marker = tmp_path / "pwned"
    run, hdir = _run_dir(tmp_path)
    _craft(str(hdir / "backbone.pt"), marker, lambda e: {"params": {"w": torch.zeros(1)}, "x": e})
    _craft(str(hdir / "head-rank00000.pt"), marker,
           lambda e: {"class_start": 0, "num_local": 4, "weight": torch.zeros(4, 2), "x": e})
    # an exported state dict (launch/export.py's backbone.pt, what eval/extract read)
    exported = tmp_path / "exported" / "backbone.pt"
    _craft(str(exported), marker, lambda e: {"w": torch.zeros(1), "x": e})
    for reader in (lambda: load_file(str(hdir / "backbone.pt")),
                   lambda: load_backbone_weights(str(run)),
                   lambda: export_class_centers(str(run)),
                   lambda: load_backbone(str(exported), backbone="mlp", embedding_size=4)):
        with pytest.raises(CheckpointError, match="refused: it holds objects other than"):
            reader()
    # a plain DeepSpeed checkpoint (no hybrid/): refused unless trusted
    plain = tmp_path / "plain" / "global_step1"
    _craft(str(plain / "mp_rank_00_model_states.pt"), marker)
    (tmp_path / "plain" / "latest").write_text("global_step1")
    with pytest.raises(CheckpointError, match="--trust-checkpoint"):
        load_backbone_weights(str(tmp_path / "plain"))
    # the command-line tools say so and exit non-zero (their main under run_script, as their
    # __main__ runs it, in this process: six interpreter start-ups fewer)
    import importlib.util
    from hybrid_fc.runtime import run_script
    for script, extra in (("export.py", ["--out", str(tmp_path / "exp"), "--centers"]),
                          ("eval.py", ["--pairs", str(tmp_path / "none.bin")]),
                          ("extract.py", ["--images", str(tmp_path), "--out",
                                          str(tmp_path / "e.npy")])):
        spec = importlib.util.spec_from_file_location(f"launch_{script[:-3]}",
                                                      os.path.join(ROOT, "launch", script))
        cli = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(cli)
        for ck in (run, tmp_path / "plain"):
            rc = run_script(cli.main, ["--checkpoint", str(ck)] + extra)
            err = capfd.readouterr().err
            assert rc != 0, (script, err[-2000:])
            assert "CheckpointError" in err and ("refused" in err or "--trust-checkpoint" in err)
    assert not marker.exists()


def test_truncated_and_corrupt_files_name_the_file(tmp_path):
    good = tmp_path / "good.pt"
    torch.save({"weight": torch.randn(100, 8)}, good)
    data = good.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.pt: cannot be read .*truncated or corrupt"):
        load_file(str(tmp_path / "cut.pt"))
    with pytest.raises(CheckpointError, match=r"missing\.pt is missing"):
        load_file(str(tmp_path / "missing.pt"))
    run, hdir = _run_dir(tmp_path)
    (hdir / "meta.json").write_text("{not json")
    from hybrid_fc.training.checkpoint import read_meta
    with pytest.raises(CheckpointError, match=r"meta\.json: not valid JSON"):
        read_meta(str(run), "global_step1")


def _resume_crafted(rank, world_size, ckdir, marker):
    """Save a real checkpoint, then replace its backbone.pt, then a head shard, by crafted
    files: load_checkpoint (what launch/train.py's resume calls) refuses both."""
    import shutil

    import deepspeed

    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.checkpoint import load_checkpoint, save_checkpoint
    from hybrid_fc.training.engine import HybridEngine
    from tinynet import ds_config, TinyNet
    net = TinyNet()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(1, micro=2, world_size=world_size))
    head = PartialFC(ArcFace(16.0, 0.3), 8, 6)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1))
    folder = save_checkpoint(hybrid, ckdir)
    errors = []
    for name in ("backbone.pt", "head-rank00000.pt"):
        path = os.path.join(folder, "hybrid", name)
        shutil.copy(path, path + ".orig")
        _craft(path, marker, lambda e: {"params": {}, "payload": e})
        try:
            load_checkpoint(hybrid, ckdir)
        except CheckpointError as exc:
            errors.append(str(exc))
        shutil.move(path + ".orig", path)
    load_checkpoint(hybrid, ckdir)  # the genuine files load
    with torch.no_grad():          # inf centers are never saved; nothing of the tag is left
        head.weight[0, 0] = float("inf")
    try:
        save_checkpoint(hybrid, ckdir, tag="bad")
    except FloatingPointError as exc:
        errors.append(str(exc))
    errors.append(os.path.exists(os.path.join(ckdir, "bad")))
    return errors


def test_resume_refuses_crafted_files_and_save_refuses_inf(tmp_path):
    from harness import run_deepspeed_ranks
    marker = tmp_path / "pwned"
    (errors,) = run_deepspeed_ranks(1, _resume_crafted, str(tmp_path / "ck"), str(marker))
    assert len(errors) == 4 and "backbone.pt: refused" in errors[0]
    assert "head-rank00000.pt: refused" in errors[1]
    assert not marker.exists()
    assert "non-finite weights (head centers of rank 0)" in errors[2]
    assert "last good checkpoint is global_step0" in errors[2] and errors[3] is False


def test_manifest_urls_are_names_never_commands(tmp_path):
    """A manifest.json whose shard url is `pipe:CMD` (or a URL elsewhere) is refused when it is
    read, before the pre-flight check opens anything; the command never runs. The same
    command given by the user (url_template) is theirs to give."""
    from hybrid_fc.data import make_loader
    from hybrid_fc.data.loader import ShardError, load_manifest
    marker = tmp_path / "pwned"
    for i, (url, match) in enumerate((
            (f"pipe:touch {marker}; cat x.tar", "is a command"),
            ("s3://elsewhere/x.tar", "outside the manifest's own local location"),
            (None, "has no url name"))):
        d = tmp_path / f"m{i}"  # (a hash of the url collided now and then)
        d.mkdir()
        (d / "manifest.json").write_text(json.dumps(
            {"num_samples": 4, "num_classes": 2, "shards": [{"url": url, "count": 4}]}))
        with pytest.raises(ShardError, match=match):
            load_manifest(str(d))
        with pytest.raises(ShardError, match=match):
            make_loader(str(d), 2, rank=0, world_size=1)
    assert not marker.exists()
    # relative names resolve beside the manifest
    (tmp_path / "ok").mkdir()
    (tmp_path / "ok" / "manifest.json").write_text(json.dumps(
        {"num_samples": 4, "shards": [{"url": "shard-000000.tar", "count": 4}]}))
    assert load_manifest(str(tmp_path / "ok")).urls == [str(tmp_path / "ok" / "shard-000000.tar")]


def test_exported_backbone_files_that_are_not_ours_are_named(tmp_path):
    """Bugs caught: a truncated exported backbone.pt raised a raw UnpicklingError suggesting
    weights_only=False, without the file; a corrupt backbone.json a JSONDecodeError / KeyError."""
    exported = tmp_path / "backbone.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, exported)
    (tmp_path / "backbone.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match=r"backbone\.json: expected a JSON object"):
        load_backbone(str(exported))
    (tmp_path / "backbone.json").write_text('{"backbone": "mlp", "embedding_size": "8"}')
    with pytest.raises(CheckpointError,
                       match=r"backbone\.json: embedding_size must be an integer"):
        load_backbone(str(exported))
    (tmp_path / "backbone.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"backbone\.json: not valid JSON"):
        load_backbone(str(exported))
    data = exported.read_bytes()
    exported.write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError, match=r"backbone\.pt: cannot be read .*truncated"):
        load_backbone(str(exported))
    torch.save([torch.zeros(1)], exported)
    with pytest.raises(CheckpointError, match=r"backbone\.pt: not a state dict"):
        load_backbone(str(exported))
