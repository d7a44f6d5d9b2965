"""Shared fixtures. Data-path fixtures are prefixed `data_` / named for what they start."""
import os
import sys

import pytest

from _extras import find_aws_cli, require_extra
from harness import free_port, prebuild_deepspeed_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# DeepSpeed's CPU backend JIT-compiles its shared-memory op (deepspeed_shm_comm, ~50 s on 2
# cores) the first time any process initializes deepspeed.comm, under torch's FileBaton: a lock
# file with no owner recorded. A process killed while holding it (a rank stopped at a test's
# timeout, a Ctrl-C) leaves the lock behind and every later initialization waits on it forever
# - in one CI run that turned 17 DeepSpeed tests into 240 s hangs. So the tests build into this
# checkout's own directory (a fresh clone starts clean; the user's ~/.cache is not touched), and
# the build runs once in the pytest process itself, before any rank is forked: forked ranks
# inherit the loaded module and never take the lock; launcher subprocesses find it built.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(ROOT, "build", "torch_extensions"))


@pytest.fixture(scope="session", autouse=True)
def _deepspeed_ops_built():
    """Build DeepSpeed's JIT op in this process when a collected test module uses DeepSpeed
    (harness.run_deepspeed_ranks also does, before it forks)."""
    if "deepspeed" in sys.modules:
        prebuild_deepspeed_ops()


@pytest.fixture(scope="session")
def data_tiny_shards(tmp_path_factory):
    """A synthetic 32x32 dataset: 12 identities x 8 images = 96 samples in 5 uneven shards
    (20, 20, 20, 20, 16). Returns the directory (manifest.json inside)."""
    from hybrid_fc.data import make_synthetic
    out = tmp_path_factory.mktemp("data_tiny") / "shards"
    make_synthetic(str(out), identities=12, images_per_id=8, size=32, seed=3,
                   samples_per_shard=20)
    return str(out)


@pytest.fixture(scope="session")
def aws_cli() -> str:
    return find_aws_cli()


@pytest.fixture(scope="session")
def s3_server():
    """A real local S3 server (moto's server mode) on 127.0.0.1; the AWS_* variables point at it
    for this process and its children (forked DataLoader workers, the aws CLI). Yields the
    endpoint URL."""
    moto_server = require_extra("moto.server")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in list(env) + ["AWS_PROFILE", "AWS_SESSION_TOKEN"]}
    os.environ.update(env)
    for k in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(k, None)
    try:
        yield endpoint
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="session")
def quickstart_run(tmp_path_factory):
    """The README's main job at toy size, run once for every test that needs a trained run
    (tests/test_readme.py runs the block): (folder holding runs/quickstart, exit status,
    output)."""
    from test_readme import quickstart_block
    return quickstart_block(tmp_path_factory)
