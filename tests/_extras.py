"""Test extras (setup.cfg `test`) are required: a missing one fails with the install command,
it never skips a test (CI would go green without running it)."""
import os
import sys

import pytest


def require_extra(module: str):
    """Import a test extra (setup.cfg `test`); a missing one fails the test with the install
    command instead of skipping it, so CI cannot go green without running it."""
    import importlib
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        pytest.fail(f"{module} is a test extra and is not importable ({exc}); install them: "
                    "pip install -e '.[test]'", pytrace=False)


def find_aws_cli() -> str:
    """The `aws` CLI (awscli, a test extra): first beside the running interpreter (a venv's bin
    dir, whether or not the venv is activated), then on PATH; a missing one fails the test."""
    import shutil
    here = os.path.join(os.path.dirname(sys.executable), "aws")
    if os.path.isfile(here) and os.access(here, os.X_OK):
        return here
    found = shutil.which("aws")
    if found is None:
        pytest.fail(f"the aws CLI is neither in {os.path.dirname(sys.executable)} nor on PATH; "
                    "it is a test extra (awscli): pip install -e '.[test]'", pytrace=False)
    return found
