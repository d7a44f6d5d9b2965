"""The test extras (setup.cfg `[options.extras_require] test`) are installed, and the `aws` CLI
is found even when the venv holding it is not activated. Tests that use an extra import it
through _extras.require_extra: a missing one fails, never skips."""
import configparser
import os
import sys
from importlib import metadata

import pytest

from _extras import find_aws_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _test_extras():
    cfg = configparser.ConfigParser()
    cfg.read(os.path.join(ROOT, "setup.cfg"))
    lines = cfg["options.extras_require"]["test"].strip().splitlines()
    names = []
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            names.append(line.split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip())
    return names


def test_every_test_extra_is_installed():
    """Catches a CI image without an extra (the S3 and ONNX tests used to skip then)."""
    names = _test_extras()
    assert {"moto", "boto3", "s3fs", "awscli", "onnx", "onnxruntime", "simplejpeg"} <= set(names)
    missing = []
    for name in names:
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(name)
    assert not missing, f"test extras not installed: {missing}; pip install -e '.[test]'"
    from hybrid_fc.data import available_decoders
    assert "simplejpeg" in available_decoders()  # else the decoder comparison tests one only
    assert os.access(find_aws_cli(), os.X_OK)


def test_aws_cli_is_found_beside_the_interpreter_then_on_path(tmp_path, monkeypatch):
    venv_bin, other = tmp_path / "venv" / "bin", tmp_path / "other"
    venv_bin.mkdir(parents=True)
    other.mkdir()
    for d in (venv_bin, other):
        (d / "aws").write_text("#!/bin/sh\n")
        (d / "aws").chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(venv_bin / "python"))
    monkeypatch.setenv("PATH", str(other))
    assert find_aws_cli() == str(venv_bin / "aws")      # the venv's, not activated
    (venv_bin / "aws").unlink()
    assert find_aws_cli() == str(other / "aws")         # then PATH
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(pytest.fail.Exception, match="aws CLI is neither in .* nor on PATH"):
        find_aws_cli()
