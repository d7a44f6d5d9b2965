"""Shared fixtures. Data-path fixtures are prefixed `data_` / named for what they start."""
import os
import socket

import pytest


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
def s3_server():
    """A real local S3 server (moto's server mode) on 127.0.0.1; the AWS_* variables point at it
    for this process and its children (forked DataLoader workers, the aws CLI). Yields the
    endpoint URL."""
    moto_server = pytest.importorskip("moto.server", reason="needs moto[server] (test extras)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
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
