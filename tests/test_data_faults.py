"""The data path as a hostile user meets it (issue 16, data part; issue 19 items 10 and 13):
nothing read from a manifest runs, nothing hangs, nothing is silently wrong, and every error is
one line naming the file, the field and what to do.

Scripts (make_shards.py, make_synthetic.py, extract.py) run as real subprocesses, several at
once (each start costs ~3 s of imports on 2 cores); everything else runs in this process on
tiny fixtures written here. tests/README.md ("Data path") lists the probes and their tests.
"""
import json
import os
import resource
import subprocess
import sys

import pytest

from hybrid_fc.data import convert
from hybrid_fc.data.storage import OutputError
from test_data_convert import _jpeg

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HINT = "(HYBRID_FC_TRACEBACK=1 or --verbose shows the traceback)"


def _scripts(*runs, timeout=120):
    """Run (argv, env_overrides, preexec_fn) script invocations at once; returns each
    CompletedProcess-like (returncode, stdout, stderr) in order."""
    procs = []
    for argv, env, preexec in runs:
        full_env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                  ""))
        for k, v in (env or {}).items():
            if v is None:
                full_env.pop(k, None)
            else:
                full_env[k] = v
        procs.append(subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=full_env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                      preexec_fn=preexec))
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _one_error_line(result, *names):
    """Exit status 1 and, on stderr, one error line naming each of `names` (run_script adds its
    fixed hint line); no traceback."""
    rc, stdout, stderr = result
    lines = [ln for ln in stderr.splitlines() if ln.strip() and ln != HINT]
    assert rc == 1 and "Traceback" not in stderr and len(lines) == 1, (rc, stderr)
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


def _image_folder(root, n=6):
    for i in range(n):
        (root / f"id{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / f"id{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(i))
    return root


# -- the converter's output: damaged plans and records, read-only and full disks -------------------
def test_converter_refuses_damaged_plans_and_records(tmp_path):
    """Bugs caught: a damaged _convert/plan.json gave a JSONDecodeError or a TypeError from
    ConvertPlan(**...) without the file's name; a damaged shard record a KeyError."""
    src = str(_image_folder(tmp_path / "faces"))
    out = tmp_path / "out"
    convert(src, str(out), samples_per_shard=2)
    plan = out / "_convert" / "plan.json"
    good = plan.read_text()
    wrong_count = good.replace('"num_shards": 3', '"num_shards": 2')
    for text, why in (("{bad", "not JSON"), ("[1, 2]", "a JSON list"), ('{"x": 1}', "fields"),
                      (wrong_count, "num_samples 6, .*num_shards 2")):
        plan.write_text(text)
        with pytest.raises(OutputError, match=rf"plan\.json is damaged \({why}.*remove the "
                                              rf"folder .*out and convert again"):
            convert(src, str(out), samples_per_shard=2)
    plan.write_text(good)
    record = out / "_convert" / "shard-000001.json"
    record.write_text('{"index": 1, "url": "shard-000001.tar"}')
    with pytest.raises(OutputError, match=r"shard-000001\.json is damaged \(not the record of "
                                          r"shard shard-000001\.tar.*remove it"):
        convert(src, str(out), samples_per_shard=2)
    record.unlink()  # what the message says to do: the shard is written again
    assert convert(src, str(out), samples_per_shard=2)["num_samples"] == 6


def test_converter_output_that_cannot_be_written_is_named(tmp_path):
    """Bug caught: --out under a regular file (or in a read-only folder) gave a
    NotADirectoryError / PermissionError traceback."""
    src = str(_image_folder(tmp_path / "faces"))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match=r"cannot create .*afile/out: NotADirectoryError.*"
                                          r"a folder this user can write to"):
        convert(src, str(tmp_path / "afile" / "out"))
    if os.geteuid() != 0:  # root writes into read-only folders
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match=r"cannot write .*ro/_convert/plan\.json: "
                                              r"PermissionError"):
            convert(src, str(ro))


def _fsize_limit():
    """A 'full disk' for one subprocess: writes past 32 KB fail with EFBIG (Python ignores
    SIGXFSZ, which would otherwise kill the process)."""
    resource.setrlimit(resource.RLIMIT_FSIZE, (32 << 10, resource.RLIM_INFINITY))


def test_converter_scripts_end_in_one_line(tmp_path):
    """make_shards.py with a full disk (one worker and two) and a damaged plan,
    make_synthetic.py with a bad argument: exit status 1, one line naming the file or field,
    no traceback, no temp file left. Bug caught: each was a traceback (EFBIG from a pool worker:
    a _RemoteTraceback of 30 lines), and input errors exited with status 2 through a path of
    their own instead of run_script's."""
    src = _image_folder(tmp_path / "faces", n=16)
    for i in range(16):  # ~5 KB each: a shard of 8 outgrows the 32 KB limit
        (src / f"id{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(i, size=96))
    damaged = tmp_path / "damaged"
    (damaged / "_convert").mkdir(parents=True)
    (damaged / "_convert" / "plan.json").write_text("{bad")
    shards = [os.path.join(ROOT, "data", "make_shards.py"), str(src)]
    runs = _scripts(
        (shards + ["--out", str(tmp_path / "full1"), "--samples-per-shard", "8"], None,
         _fsize_limit),
        (shards + ["--out", str(tmp_path / "full2"), "--samples-per-shard", "8", "--workers",
                   "2"], None, _fsize_limit),
        (shards + ["--out", str(damaged)], None, None),
        ([os.path.join(ROOT, "data", "make_synthetic.py"), "--out", str(tmp_path / "syn"),
          "--identities", "0", "--images-per-id", "2"], None, None))
    for k in (0, 1):
        line = _one_error_line(runs[k], f"full{k + 1}/shard-0000", "File too large",
                               "GB free, or a file size limit")
        assert "OutputError: cannot write" in line
        assert not [n for n in os.listdir(tmp_path / f"full{k + 1}") if ".tmp." in n]
    _one_error_line(runs[2], "damaged/_convert/plan.json is damaged (not JSON")
    _one_error_line(runs[3], "identities must be >= 1, got 0")


def test_make_shards_to_s3_without_bucket_or_credentials(s3_server, tmp_path):
    """Issue 19 item 10. Bug caught: `--out s3://...` with a bucket that does not exist, or
    without credentials, ended in 50-69 lines of botocore traceback that named neither the
    bucket nor the endpoint."""
    src = str(_image_folder(tmp_path / "faces"))
    argv = [os.path.join(ROOT, "data", "make_shards.py"), src, "--out", "s3://no-such-bucket/ds"]
    nobody = {"AWS_ACCESS_KEY_ID": None, "AWS_SECRET_ACCESS_KEY": None,
              "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
              "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    missing, anonymous = _scripts((argv, None, None), (argv, nobody, None))
    for result, cause in ((missing, "bucket does not exist"), (anonymous, "NoCredentialsError")):
        _one_error_line(result, "OutputError: cannot ", "s3://no-such-bucket/ds", cause,
                        f"endpoint {s3_server}", "bucket 'no-such-bucket' exists")
