"""The memory planner (hybrid_fc.training.plan, launch/plan.py) against measured peaks and by hand."""
import json
import os
import subprocess
import sys

import pytest

from hybrid_fc.training.plan import (PlanInput, backbone_footprint, from_deepspeed_config, parse_bytes,
                            parse_count, plan)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# slow (~35 s): the planner's arithmetic is also checked by hand in the default run
@pytest.mark.slow
@pytest.mark.parametrize("weight, state, chunk, classes", [
    ("float32", "float32", None, 1_000_000),
    ("bfloat16", "int8", None, 2_000_000),
    ("bfloat16", "int8", 4096, 4_000_000),
    ("int8", "int4", None, 4_000_000),
])
def test_planned_head_bytes_match_measured_peak(weight, state, chunk, classes):
    """benchmarks/head_bench.py measures the head's peak (CPU: peak RSS minus the RSS just
    before the head is built, with glibc returning freed blocks, --exact-rss; CUDA: peak
    allocated) and reports hybrid_fc.training.plan's figure for the same head: within 10%."""
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "head_bench.py"),
           "--classes", str(classes), "--dim", "64", "--batch", "64", "--world-size", "1",
           "--steps", "1", "--warmup", "2", "--skip-baseline", "--exact-rss",
           "--weight-dtype", weight, "--state-dtype", state, "--threads", "1"]
    if chunk:
        cmd += ["--chunk-size", str(chunk)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = result["net_head_bytes"] / result["planned_head_bytes"]
    assert 0.9 <= ratio <= 1.1, result


def test_parse_counts_and_sizes():
    assert parse_count("300M") == 300_000_000 and parse_count("300000000") == 300_000_000
    assert parse_count("2.5k") == 2500 and parse_count(17) == 17
    assert parse_bytes("80GB") == 80 * 10 ** 9 and parse_bytes("80GiB") == 80 * 2 ** 30
    for bad in ("lots", "1.5", "3X"):
        with pytest.raises(ValueError):
            parse_count(bad)
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes("80 apples")


def test_head_items_by_hand():
    """Every head line from its formula: 1,000 classes on 3 ranks (rank 0 owns 334)."""
    inp = PlanInput(classes=1000, dim=32, gpus=3, gpu_memory=10 ** 9, sample_rate=0.5,
                    micro_batch=4, precision="fp32", weight_dtype="bfloat16",
                    state_dtype="int8", head_optimizer="sparse_sgd", reserve=0, device="cpu")
    items = plan(inp).summary()["items"]
    L, S, N = 334, 167, 12
    assert items["head: centers"] == L * 32 * 2
    assert items["head: optimizer state"] == L * 32 * 1 + L * 4
    assert items["head: sampled rows' gradient"] == S * 32 * 2
    assert items["head: kept for backward"] == S * N * 2
    adamw = plan(PlanInput(**{**inp.__dict__, "head_optimizer": "sparse_adamw"}))
    assert adamw.summary()["items"]["head: optimizer state"] == 2 * (L * 32 + L * 4) + L * 8
    fp32 = plan(PlanInput(**{**inp.__dict__, "weight_dtype": "float32", "state_dtype": "float32"}))
    assert fp32.summary()["items"]["head: kept for backward"] == S * N * 4 + S * 32 * 4


def test_int8_int4_items_by_hand():
    """int8 centers: 1 byte + one fp32 scale per row; int4 momentum: half a byte + a scale;
    under AdamW the second moment stays int8 (+ its scale) and each row keeps an int64 step;
    the rows' gradient and the kept exponentials are bf16. Planted bug caught: int4 counted as
    one byte (dtype_bytes of torch.int8's size)."""
    inp = PlanInput(classes=1000, dim=32, gpus=3, gpu_memory=10 ** 9, sample_rate=0.5,
                    micro_batch=4, precision="fp32", weight_dtype="int8", state_dtype="int4",
                    head_optimizer="sparse_sgd", reserve=0, device="cpu")
    items = plan(inp).summary()["items"]
    L, S, N = 334, 167, 12
    assert items["head: centers"] == L * 32 + L * 4
    assert items["head: optimizer state"] == L * 16 + L * 4
    assert items["head: sampled rows' gradient"] == S * 32 * 2
    assert items["head: kept for backward"] == S * N * 2
    adamw = plan(PlanInput(**{**inp.__dict__, "head_optimizer": "sparse_adamw"}))
    state = adamw.summary()["items"]["head: optimizer state"]
    assert state == (L * 16 + L * 4) + (L * 32 + L * 4) + L * 8
    with pytest.raises(ValueError, match="sparse_grad"):
        PlanInput(**{**inp.__dict__, "sparse_grad": False})
    # error feedback: one more signed state (the residual) in the state dtype, with its scale;
    # with momentum 0 it is the only state
    fb = plan(PlanInput(**{**inp.__dict__, "rounding": "feedback"})).summary()["items"]
    assert fb["head: optimizer state"] == 2 * (L * 16 + L * 4)
    fb0 = plan(PlanInput(**{**inp.__dict__, "rounding": "feedback", "momentum": False}))
    assert fb0.summary()["items"]["head: optimizer state"] == L * 16 + L * 4
    assert "int4 rounding residual" in fb0.table()
    fp32 = plan(PlanInput(**{**inp.__dict__, "rounding": "feedback", "weight_dtype": "float32"}))
    assert fp32.summary()["items"]["head: optimizer state"] == L * 16 + L * 4   # exact: none
    with pytest.raises(ValueError, match="rounding must be one of"):
        PlanInput(**{**inp.__dict__, "rounding": "up"})


def test_backbone_zero_accounting():
    p = 1000
    assert backbone_footprint(p, "bf16", 0, "sgd", 4) == (2000, 2000, 8000)
    assert backbone_footprint(p, "bf16", 1, "adam", 4) == (2000, 2000, 3000)
    assert backbone_footprint(p, "fp32", 2, "sgd", 4) == (4000, 1000, 1000)
    assert backbone_footprint(p, "fp16", 3, "sgd", 4) == (500, 500, 2000)
    ds = json.load(open(os.path.join(ROOT, "ds_configs", "zero2_bf16_adamw.json")))
    assert from_deepspeed_config(ds) == {"precision": "bf16", "zero_stage": 2,
                                         "backbone_optimizer": "adam", "micro_batch": 128}


def test_max_classes_is_the_edge_and_advice_fits():
    inp = PlanInput(classes=100_000_000, dim=512, gpus=8, gpu_memory=parse_bytes("40GB"),
                    sample_rate=0.1, micro_batch=64, backbone_params=20_000_000,
                    activation_elems=10 ** 9, weight_dtype="float32", state_dtype="float32")
    p = plan(inp)
    assert not p.fits and p.advice.startswith("would fit with")
    edge = p.max_classes
    assert plan(PlanInput(**{**inp.__dict__, "classes": edge})).fits
    assert not plan(PlanInput(**{**inp.__dict__, "classes": edge + 8})).fits
    # the advice names settings that really fit
    assert "bfloat16" in p.advice or "chunk_size" in p.advice


def _plan_cli(*args):
    """launch/plan.py's main in this process (its command line runs as written in the README's
    plan blocks, tests/test_readme.py): (exit status, the last line's JSON, what it printed)."""
    import contextlib
    import importlib.util
    import io
    spec = importlib.util.spec_from_file_location("launch_plan",
                                                  os.path.join(ROOT, "launch", "plan.py"))
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    out = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(out):
        rc = cli.main(list(args))
    text = out.getvalue()
    return rc, json.loads(text.strip().splitlines()[-1]), text


def test_plan_cli_300m_classes_on_one_node():
    """The README's example: 300M x 512 over 8 x 80 GB, iresnet100, ZeRO-2 bf16, micro batch
    128, r=0.1: bf16 centers + int8 state fit (with chunk_size); fp32 / fp32 does not."""
    common = ["--classes", "300M", "--dim", "512", "--gpus", "8", "--gpu-memory", "80GB",
              "--sample-rate", "0.1", "--backbone", "iresnet100", "--deepspeed_config",
              "ds_configs/zero2_bf16.json", "--micro-batch", "128"]
    rc, low, text = _plan_cli(*common, "--weight-dtype", "bfloat16", "--state-dtype", "int8",
                              "--chunk-size", "65536")
    assert rc == 0 and low["fits"] and low["max_classes"] >= 300_000_000, text
    assert low["input"]["backbone_params"] == 65_156_160        # iresnet100, computed
    for item in ("head: centers", "head: optimizer state", "head: sampled rows' gradient",
                 "backbone: activations", "backbone: optimizer state"):
        assert item in low["items"] and item in text
    assert low["items"]["head: centers"] == 37_500_000 * 512 * 2
    rc, full, text = _plan_cli(*common, "--weight-dtype", "float32", "--state-dtype", "float32")
    assert rc == 3 and not full["fits"] and full["max_classes"] < 300_000_000
    assert "would fit with" in full["advice"], text


def test_plan_cli_first_day_forms():
    """Bugs caught: `--classes 100M --dim 512 --gpus 8 --gpu-memory 80GB` crashed (micro batch
    1 -> BatchNorm's training-mode check) and planned sample rate 1.0 silently; an unknown
    backbone gave a traceback; the rows did not add up to the total with nothing saying why;
    GiB printed as GB."""
    rc, plan, text = _plan_cli("--classes", "100M", "--dim", "512", "--gpus", "8",
                               "--gpu-memory", "80GB")
    assert rc == 3 and plan["input"]["micro_batch"] == 128, text
    assert "note: micro batch 128 images per rank (the default" in text
    assert "note: sample rate 1.0: every class is scored" in text
    assert "the total is the peak, not the sum of the rows" in text
    rc, _, text = _plan_cli("--classes", "1M", "--dim", "512", "--gpus", "8", "--gpu-memory",
                            "80GiB", "--sample-rate", "0.1", "--micro-batch", "1")
    assert rc == 0 and "of 85.90 GB" in text, text          # 80 x 2^30 bytes, printed in GB
    r = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "plan.py"), "--classes",
                        "1M", "--dim", "512", "--gpus", "8", "--gpu-memory", "80GB",
                        "--backbone", "iresnet55"], capture_output=True, text=True,
                       timeout=120, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "unknown backbone 'iresnet55'" in r.stderr and "iresnet50" in r.stderr


def test_the_reserve_is_in_the_total():
    """Bug caught: the planner dropping its 3 GB reserve (plans that fit on paper, OOM on the
    GPU)."""
    from hybrid_fc.common import parse_size
    from hybrid_fc.training.plan import PlanInput, plan
    inp = PlanInput(classes=1_000_000, dim=128, gpus=2, gpu_memory=int(80e9), sample_rate=0.1,
                    backbone_params=10_000_000, activation_elems=1_000_000)
    assert inp.reserve == 3 * 10 ** 9 == parse_size("3GB")
    with_reserve, without = plan(inp), plan(PlanInput(**{**inp.__dict__, "reserve": 0}))
    assert with_reserve.per_gpu_bytes - without.per_gpu_bytes == 3 * 10 ** 9
    assert ("reserve", 3e9) in [(name, value) for name, value, _ in with_reserve.rows]


def test_plan_cli_a_billion_classes_on_one_node():
    """The issue's goal: 1,000,000,000 x 256 over 8 x 80 GB, iresnet100, ZeRO-2 bf16, micro
    batch 128, r=0.1: int8 centers + int4 momentum (chunk_size 65536) fit with max_classes >= 1e9;
    bf16 + int8 does not, and its advice names int8 + int4."""
    common = ["--classes", "1000000000", "--dim", "256", "--gpus", "8", "--gpu-memory", "80GB",
              "--sample-rate", "0.1", "--micro-batch", "128", "--backbone", "iresnet100",
              "--deepspeed_config", "ds_configs/zero2_bf16.json", "--chunk-size", "65536"]
    rc, low, text = _plan_cli(*common, "--weight-dtype", "int8", "--state-dtype", "int4")
    assert rc == 0 and low["fits"] and low["max_classes"] >= 10 ** 9, text
    assert low["items"]["head: centers"] == 125_000_000 * (256 + 4)
    assert low["items"]["head: optimizer state"] == 125_000_000 * (128 + 4)
    bf16 = plan(PlanInput(**{**low["input"], "weight_dtype": "bfloat16", "state_dtype": "int8"}))
    assert not bf16.fits and bf16.max_classes < 10 ** 9
    assert "head.weight_dtype=int8 head_optim.state_dtype=int4" in bf16.advice, bf16.advice
