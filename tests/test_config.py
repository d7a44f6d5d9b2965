"""Experiment config: YAML + base inheritance, key=value overrides, validation errors."""
import os

import pytest

from hybrid_fc.training.config import ExperimentConfig, config_to_dict, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_overrides_convert_types(tmp_path):
    (tmp_path / "base.yaml").write_text("head:\n  num_classes: 1000\n  sample_rate: 0.2\n"
                                        "train:\n  steps: 50\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nhead:\n  sample_rate: 0.5\n")
    cfg = load_config(str(tmp_path / "child.yaml"),
                      ["lr=1e-3", "head.chunk_size=4096", "betas=[0.8, 0.9]",
                       "train.resume=false", "model.backbone=mobilefacenet",
                       "head.chunk_size=null"])
    assert cfg.head.num_classes == 1000 and cfg.head.sample_rate == 0.5   # child over base
    assert cfg.train.steps == 50
    assert cfg.head_optim.lr == 1e-3 and cfg.head_optim.betas == (0.8, 0.9)
    assert cfg.train.resume is False and cfg.model.backbone == "mobilefacenet"
    assert cfg.head.chunk_size is None                                    # last one wins
    assert config_to_dict(cfg)["head_optim"]["betas"] == [0.8, 0.9]


@pytest.mark.parametrize("override,message", [
    ("nope=1", "unknown override 'nope'"),
    ("head.nope=1", "head has no key 'nope'"),
    ("optimizer.lr=1", "no section 'optimizer'"),
    ("seed=1", "ambiguous override 'seed'"),
    ("head.num_classes=many", "head.num_classes: expected an integer"),
    ("head.sample_rate=0", r"head.sample_rate: must be in \(0, 1\]"),
    ("head.margin=arcfce", "head.margin: must be one of arcface, cosface, combined"),
    ("train.resume=maybe", "train.resume: expected true/false"),
    ("head_optim.max_grad_norm=-1", "head_optim.max_grad_norm: must be >= 0"),
    ("schedule.warmup_steps=5000", r"schedule.warmup_steps: must be <= train.steps"),
    ("head.sparse_grad=true", "head.sparse_grad: needs head_optim.name sparse_sgd"),
    ("data.source=webdataset", "data.urls: must be set"),
    ("lr", "not of the form key=value"),
])
def test_bad_values_name_the_field(override, message):
    with pytest.raises(ValueError, match=message):
        load_config(None, [override])


def test_unknown_yaml_key_and_section(tmp_path):
    (tmp_path / "a.yaml").write_text("head:\n  num_clases: 10\n")
    with pytest.raises(ValueError, match="unknown key.*head.num_clases"):
        load_config(str(tmp_path / "a.yaml"))
    (tmp_path / "b.yaml").write_text("deepspeed:\n  stage: 2\n")
    with pytest.raises(ValueError, match="unknown section.*deepspeed"):
        load_config(str(tmp_path / "b.yaml"))


def test_shipped_configs_load():
    folder = os.path.join(ROOT, "launch", "configs")
    names = sorted(n for n in os.listdir(folder) if n.endswith(".yaml"))
    assert "base.yaml" in names and len(names) >= 3
    for name in names:
        assert isinstance(load_config(os.path.join(folder, name)), ExperimentConfig), name


def test_every_field_has_a_docstring():
    """Each dataclass field is followed by a docstring line in config.py (read from source)."""
    import dataclasses
    import inspect

    import hybrid_fc.training.config as c
    src = inspect.getsource(c)
    for cls in (c.ModelConfig, c.HeadConfig, c.HeadOptimConfig, c.ScheduleConfig, c.DataConfig,
                c.TrainConfig, c.ExperimentConfig):
        body = inspect.getsource(cls)
        for f in dataclasses.fields(cls):
            after = body.split(f"    {f.name}:", 1)[1].split("\n", 2)[1].strip()
            assert after.startswith('"""'), f"{cls.__name__}.{f.name} has no docstring"
    assert src


def test_head_backend_is_validated(tmp_path):
    (tmp_path / "a.yaml").write_text("head:\n  backend: triton\n")
    assert load_config(str(tmp_path / "a.yaml")).head.backend == "triton"
    assert load_config(None, ["head.backend=torch"]).head.backend == "torch"
    assert load_config(None, []).head.backend == "auto"
    with pytest.raises(ValueError,
                       match="head.backend: must be one of auto, torch, triton, got 'cuda'"):
        load_config(None, ["head.backend=cuda"])


def test_the_deepspeed_json_is_checked_before_anything_is_built(tmp_path):
    """Bug caught: `"gradient_clipping": NaN` (Python's json reads NaN) was accepted and trained
    to nan; a JSON list or a bad batch size failed deep inside DeepSpeed."""
    from hybrid_fc.training.config import load_deepspeed_config
    path = tmp_path / "ds.json"
    for text, match in (('{"train_micro_batch_size_per_gpu": 4, "gradient_clipping": NaN}',
                         "gradient_clipping must be a finite number, got nan"),
                        ('{"optimizer": {"params": {"lr": Infinity}}}',
                         r"optimizer\.params\.lr must be a finite number"),
                        ('[1, 2]', "expected a JSON object"),
                        ('{"train_micro_batch_size_per_gpu": 0}',
                         "train_micro_batch_size_per_gpu must be a positive integer"),
                        ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage"),
                        ('{"gradient_clipping": -1}', "gradient_clipping must be a number >= 0"),
                        ('{not json', "not valid JSON")):
        path.write_text(text)
        with pytest.raises(ValueError, match=match) as info:
            load_deepspeed_config(str(path))
        assert str(path) in str(info.value)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_deepspeed_config(str(tmp_path / "missing.json"))
    for preset in os.listdir(os.path.join(ROOT, "ds_configs")):   # the shipped ones pass
        load_deepspeed_config(os.path.join(ROOT, "ds_configs", preset))
