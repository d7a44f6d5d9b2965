"""Every command block of the README runs, as written or with the CPU stand-ins written next to
it, so that a README example that stops working fails the suite.

Each ```bash / ```python block of README.md is preceded by a directive, an HTML comment that
GitHub does not show: `<!-- test {...} -->` holding JSON:
  id        the test's name
  replace   [[old, new], ...]: the stand-ins (fewer processes, toy data, fewer steps); {port},
            {port2} become free ports
  setup     files the block reads, made here first: "shards PATH SIZE" (a 24-identity dataset),
            "image-folder PATH", "trained PATH" (the quickstart's run), "pairs" (lfw.bin,
            cfp_fp.bin, agedb_30.bin), "ijb PATH NAME" (a synthetic IJB release),
            "exported PATH" (export.py --onnx of the trained run), "fake-slurm"
  save_as   a python block is saved under this name, then `run` runs (else: `python FILE`)
  cwd       "root": run in the checkout (else a fresh folder holding launch/, ds_configs/,
            benchmarks/ and data/'s scripts)
  check     files the block must leave; expect / absent: strings its output must / must not
            hold; json: {file: [keys]} numbers a written JSON file must hold, each > 0
  note      why the stand-ins (people read it next to the block)
A ```text block (printed output) and a plain ``` block (a tree) are not run.
"""
import json
import os
import re
import shutil
import subprocess
import sys

import pytest

from harness import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
DIRECTIVE = re.compile(r"<!-- test (\{.*?\}) -->\s*\n```(bash|python)\n(.*?)\n```", re.S)


def _blocks():
    text = open(README).read()
    found = [(json.loads(m.group(1)), m.group(2), m.group(3)) for m in DIRECTIVE.finditer(text)]
    return text, found


def test_every_command_block_has_a_directive():
    """A new ```bash / ```python block without `<!-- test ... -->` fails here (and so does a
    command left in an indented block, which nothing would run)."""
    text, found = _blocks()
    fenced = re.findall(r"^```(bash|python)\n", text, re.M)
    assert len(fenced) == len(found), "a ```bash/```python block of README.md has no directive"
    ids = [d["id"] for d, _, _ in found]
    assert len(ids) == len(set(ids)), ids
    in_fence, loose = False, []
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif not in_fence and re.match(r"^ {4}(python|deepspeed|torchrun|pip) ", line):
            loose.append(line)
    assert not loose, f"commands outside a fenced block: {loose}"


def _env(extra_path=None):
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env["PATH"] = os.pathsep.join(([extra_path] if extra_path else [])
                                  + [os.path.dirname(sys.executable), env.get("PATH", "")])
    env.pop("CUDA_VISIBLE_DEVICES", None)
    for k in ("AWS_ENDPOINT_URL", "AWS_PROFILE"):
        env.pop(k, None)
    return env


def _workdir(path):
    """A folder laid out like the checkout for the README's relative paths."""
    os.makedirs(path, exist_ok=True)
    for name in ("launch", "ds_configs", "benchmarks"):
        os.symlink(os.path.join(ROOT, name), os.path.join(path, name))
    os.makedirs(os.path.join(path, "data"))
    for name in os.listdir(os.path.join(ROOT, "data")):
        os.symlink(os.path.join(ROOT, "data", name), os.path.join(path, "data", name))
    return path


def _run(cmd, cwd, timeout, env=None):
    # Command lines stop at the first failing command (bash -e -o pipefail); a block that is a
    # script (`#!/bin/bash`, the SLURM job) runs as its scheduler runs it: plain bash, where
    # `scontrol ... | head -1` may end its writer with SIGPIPE (rc 141 under pipefail: flaky).
    opts = [] if cmd.startswith("#!") else ["-e", "-o", "pipefail"]
    out = subprocess.run(["bash", *opts, "-c", cmd], cwd=cwd,
                         env=env or _env(), capture_output=True, text=True, timeout=timeout)
    return out.returncode, out.stdout + out.stderr


# -- setups ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("readme_cache"))


def _shards(cache, size):
    path = os.path.join(cache, f"shards{size}")
    if not os.path.isdir(path):
        from hybrid_fc.data import make_synthetic
        make_synthetic(path, 24, 12, size=size, seed=0, samples_per_shard=100)
    return path


def _image_folder(path):
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for ident in range(3):
        os.makedirs(os.path.join(path, f"id{ident}"))
        for k in range(4):
            Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(
                os.path.join(path, f"id{ident}", f"{k}.jpg"))


def _pairs(work):
    from hybrid_fc.data import synthetic_pairs
    from hybrid_fc.evaluation import write_bin
    for i, name in enumerate(("lfw", "cfp_fp", "agedb_30")):
        write_bin(os.path.join(work, f"{name}.bin"),
                  *synthetic_pairs(64, 8, 20, size=32, seed=i))


def _fake_slurm(work):
    """srun starts its command once per node (SLURM_NODEID 0, 1) on this machine and waits;
    scontrol names two hosts that both resolve here."""
    bin_dir = os.path.join(work, "fake_slurm")
    os.makedirs(bin_dir)
    with open(os.path.join(bin_dir, "srun"), "w") as f:
        f.write('#!/bin/bash\nfor n in 0 1; do SLURM_NODEID=$n "$@" & done\n'
                'status=0; for job in $(jobs -p); do wait $job || status=$?; done\n'
                'exit $status\n')
    with open(os.path.join(bin_dir, "scontrol"), "w") as f:
        f.write('#!/bin/bash\nif [ "$1 $2" = "show hostnames" ]; then '
                'printf "localhost\\n127.0.0.1\\n"; else echo "$@" >> requeued; fi\n')
    for name in ("srun", "scontrol"):
        os.chmod(os.path.join(bin_dir, name), 0o755)
    return bin_dir


def quickstart_block(tmp_path_factory):
    """Run the README's main job (its directive's stand-ins) in a fresh folder: (folder, exit
    status, output). conftest.py's session fixture `quickstart_run` calls it once."""
    directive, _, block = [b for b in _blocks()[1] if b[0]["id"] == "quickstart"][0]
    work = _workdir(str(tmp_path_factory.mktemp("readme_quickstart") / "w"))
    cmd = _apply(directive, block) + f" --master_port {free_port()}"
    rc, out = _run(cmd, work, 600)
    return work, rc, out


def _apply(directive, block):
    for old, new in directive.get("replace", []):
        assert old in block, f"{directive['id']}: stand-in {old!r} not in the block"
        block = block.replace(old, new)
    return block.replace("{port}", str(free_port())).replace("{port2}", str(free_port()))


def _setup(item, work, cache, quickstart_run):
    kind, *args = item.split()
    if kind == "shards":
        shutil.copytree(_shards(cache, int(args[1])), os.path.join(work, args[0]))
    elif kind == "image-folder":
        _image_folder(os.path.join(work, args[0]))
    elif kind == "trained":
        qs_work, rc, out = quickstart_run
        assert rc == 0, out[-3000:]
        os.makedirs(os.path.dirname(os.path.join(work, args[0])), exist_ok=True)
        os.symlink(os.path.join(qs_work, "runs", "quickstart"), os.path.join(work, args[0]))
    elif kind == "pairs":
        _pairs(work)
    elif kind == "ijb":
        from test_ijb import write_release
        write_release(os.path.join(work, args[0]), name=args[1], identities=4)
    elif kind == "exported":
        rc, out = _run(f"python launch/export.py --checkpoint runs/ms1mv3_r50 --out {args[0]} "
                       "--onnx", work, 300)
        assert rc == 0, out[-3000:]
    elif kind == "fake-slurm":
        return _fake_slurm(work)
    else:
        raise AssertionError(f"unknown setup {item!r}")
    return None


# -- the blocks ----------------------------------------------------------------------------------
def test_quickstart_block(quickstart_run):
    """The README's first command (stand-in: --short, the same job at toy size: 32 identities,
    8 steps on 2 ranks): trains, verifies on held-out identities, checkpoints, draws."""
    work, rc, out = quickstart_run
    assert rc == 0, out[-4000:]
    run = os.path.join(work, "runs", "quickstart")
    for name in ("curves.png", "metrics.jsonl", "heldout_pairs.bin"):
        assert os.path.exists(os.path.join(run, name)), name
    from hybrid_fc.training.metrics import read_metrics
    train = read_metrics(run, "train")
    assert [r["step"] for r in train] == [2, 4, 6, 8] and train[-1]["loss"] < train[0]["loss"]
    verify = read_metrics(run, "verify")
    assert [r["step"] for r in verify] == [4, 8] and verify[0]["set"] == "heldout_pairs"
    assert open(os.path.join(run, "latest")).read() == "global_step8"
    assert sorted(os.listdir(os.path.join(run, "global_step8", "hybrid"))) == [
        "backbone.pt", "head-rank00000.pt", "head-rank00001.pt", "meta.json"]
    assert "curves of the run:" in out and "start: 2 ranks" in out and "fresh start" in out
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:   # not installed: said once
        assert out.count("tensorboard is not installed") == 1, out[-3000:]
    assert "loss " in out and "over steps 2..8" in out      # its own "did the loss fall"


@pytest.mark.parametrize("block_id", [d["id"] for d, _, _ in _blocks()[1]
                                      if d["id"] != "quickstart"])
def test_readme_block(block_id, tmp_path, cache, quickstart_run):
    directive, lang, block = [b for b in _blocks()[1] if b[0]["id"] == block_id][0]
    root = directive.get("cwd") == "root"
    work = ROOT if root else _workdir(str(tmp_path / "w"))
    extra_path = None
    for item in directive.get("setup", []):
        extra_path = _setup(item, work, cache, quickstart_run) or extra_path
    code = _apply(directive, block)
    if lang == "python":
        name = directive.get("save_as", "block.py")
        with open(os.path.join(work, name), "w") as f:
            f.write(code + "\n")
        code = directive.get("run", f"python {name}").replace("{port}", str(free_port()))
    env = _env(extra_path)
    if extra_path:  # the job's SLURM variables
        env.update(SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="42")
    rc, out = _run(code, work, directive.get("timeout", 600), env)
    assert rc == 0, f"README block {block_id!r} failed:\n{code}\n---\n{out[-4000:]}"
    for path in directive.get("check", []):
        assert os.path.exists(os.path.join(work, path)), (block_id, path, out[-2000:])
    for text in directive.get("expect", []):
        assert text in out, (block_id, text, out[-2000:])
    for text in directive.get("absent", []):
        assert text not in out, (block_id, text, out[-2000:])
    for name, keys in directive.get("json", {}).items():  # programs read files, not output
        data = json.load(open(os.path.join(work, name)))
        for key in keys:
            assert data[key] > 0, (block_id, name, key, data)
    if extra_path:
        assert not os.path.exists(os.path.join(work, "requeued")), "a finished job requeued"
