"""The data path as a hostile user meets it (issue 16, data part; issue 19 items 10 and 13):
nothing read from a manifest runs, nothing hangs, nothing is silently wrong, and every error is
one line naming the file, the field and what to do.

Scripts (make_shards.py, make_synthetic.py, extract.py) run as real subprocesses, all at once
(each start costs ~2.5 s of CPU, mostly torch's import); everything else runs in this process on
tiny fixtures written here. tests/README.md ("Data path") lists the probes and their tests.
"""
import json
import os
import re
import resource
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from hybrid_fc.data import ShardError, convert, load_manifest, make_loader
from hybrid_fc.data.storage import OutputError
from test_data_convert import _jpeg
from test_data_loader import _epoch, _handmade_shards, _write_tar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
def _scripts(*runs, timeout=120):
    """Run (argv, preexec_fn) script invocations at once; returns (returncode, stdout, stderr)
    of each, in order."""
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable] + argv, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, preexec_fn=preexec)
             for argv, preexec in runs]
    out = []
    for p in procs:
        stdout, stderr = p.communicate(timeout=timeout)
        out.append((p.returncode, stdout, stderr))
    return out


def _one_error_line(result, *names):
    """Exit status 1 and, on stderr, one error line naming each of `names` (besides
    run_script's fixed hint about HYBRID_FC_TRACEBACK); no traceback."""
    rc, stdout, stderr = result
    lines = [ln for ln in stderr.splitlines()
             if ln.strip() and not ln.startswith("(HYBRID_FC_TRACEBACK")]
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


def _big_images(tmp_path):
    """16 images of ~5 KB: a shard of 8 outgrows the 32 KB file size limit of _fsize_limit."""
    src = _image_folder(tmp_path / "faces", n=16)
    for i in range(16):
        (src / f"id{i % 2}" / f"{i}.jpg").write_bytes(_jpeg(i, size=96))
    return src


def test_converter_full_disk_is_named_and_leaves_nothing(tmp_path):
    """convert() with one writer in a forked child whose writes past 32 KB fail (EFBIG): an
    OutputError naming the shard and the free space, no temp file left. Bug caught: a bare
    OSError ('File too large') naming no file, through a traceback."""
    import multiprocessing
    src = _big_images(tmp_path)
    ctx = multiprocessing.get_context("fork")
    receive, send = ctx.Pipe(duplex=False)

    def child():
        _fsize_limit()
        try:
            convert(str(src), str(tmp_path / "full"), samples_per_shard=8)
            send.send(None)
        except Exception as exc:  # noqa: BLE001 - sent to the test
            send.send((type(exc).__name__, str(exc)))
    proc = ctx.Process(target=child)
    proc.start()
    kind, text = receive.recv()
    proc.join()
    assert kind == "OutputError" and re.search(r"cannot write .*full/shard-00000\d\.tar: OSError: "
                                               r".*File too large.*GB free", text), text
    assert not [n for n in os.listdir(tmp_path / "full") if ".tmp." in n]


def test_converter_to_s3_without_credentials_names_bucket_and_endpoint(s3_server, tmp_path,
                                                                        monkeypatch):
    """Issue 19 item 10 (with the script run in test_scripts_end_in_one_line). Bug caught:
    botocore's NoCredentialsError through ~69 lines of traceback, naming neither the bucket nor
    the endpoint."""
    from test_faults import _fresh_s3fs
    src = str(_image_folder(tmp_path / "faces"))
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    _fresh_s3fs()
    try:
        with pytest.raises(OutputError, match=rf"s3://no-such-bucket/ds.*NoCredentialsError.*"
                                              rf"endpoint {s3_server}: .*bucket 'no-such-bucket' "
                                              r"exists .*credentials"):
            convert(src, "s3://no-such-bucket/ds")
    finally:
        _fresh_s3fs()


def test_scripts_end_in_one_line(s3_server, tmp_path):
    """The real scripts, at once: make_shards.py with a full disk and two writer processes,
    make_shards.py --out s3:// with a bucket that does not exist (issue 19 item 10),
    make_synthetic.py with a bad argument, extract.py --images with a folder that does not exist
    (issue 19 item 13). Each: exit status 1, one line naming the file, bucket or field, no
    traceback. Bugs caught: a 30-line _RemoteTraceback for EFBIG in a pool worker; 50 lines of
    botocore naming no bucket; input errors through a path of their own with status 2;
    extract.py reading the checkpoint first and then saying "no manifest"."""
    src = _big_images(tmp_path)
    shards = [os.path.join(ROOT, "data", "make_shards.py"), str(src), "--out"]
    full, bucket, synthetic, extract = _scripts(
        (shards + [str(tmp_path / "full"), "--samples-per-shard", "8", "--workers", "2"],
         _fsize_limit),
        (shards + ["s3://no-such-bucket/ds"], None),
        ([os.path.join(ROOT, "data", "make_synthetic.py"), "--out", str(tmp_path / "syn"),
          "--identities", "0", "--images-per-id", "2"], None),
        ([os.path.join(ROOT, "launch", "extract.py"), "--checkpoint", str(tmp_path / "run"),
          "--images", str(tmp_path / "gallery"), "--out", str(tmp_path / "emb.npy")], None))
    _one_error_line(full, "OutputError: cannot write", "full/shard-0000", "File too large",
                    "GB free, or a file size limit")
    assert not [n for n in os.listdir(tmp_path / "full") if ".tmp." in n]
    _one_error_line(bucket, "OutputError: cannot ", "s3://no-such-bucket/ds",
                    "bucket does not exist", f"endpoint {s3_server}",
                    "bucket 'no-such-bucket' exists")
    _one_error_line(synthetic, "identities must be >= 1, got 0")
    _one_error_line(extract, f"FileNotFoundError: {tmp_path / 'gallery'} does not exist "
                             "(expected an image folder, or shards")


# -- manifests: names are never commands or paths, every field is checked -------------------------
def _manifest_with(tmp_path, name, edit):
    """The handmade 3 x 10 dataset with its manifest edited by edit(dict) (or replaced by the
    bytes it returns); returns the manifest's path."""
    manifest = _handmade_shards(str(tmp_path / name))
    m = json.load(open(manifest))
    new = edit(m)
    with open(manifest, "wb") as f:
        f.write(new if isinstance(new, bytes) else json.dumps(m).encode())
    return manifest


@pytest.mark.parametrize("url, why", [
    ("s0.tar $(touch {marker})", r"holds characters a shell or a URL gives a meaning to "
                                 r"\('[^']*\$"),
    ("s0.tar`touch {marker}`", r"holds characters .*\('[^']*`"),
    ("s0.tar;touch {marker}", r"holds characters .*\('[^']*;"),
    ("s0.tar\ntouch {marker}", r"holds characters .*\('\\n"),
    ("pipe:touch {marker}; cat s0.tar", "is a command"),
    ("../escape/s0.tar", "is a path"),
    ("{tmp}/escape/s0.tar", "is a path"),
    ("file://{tmp}/escape/s0.tar", "points outside the manifest's own local location"),
    ("s0.tar.sh", "is not a plain shard file name"),
])
def test_manifest_shard_names_never_run_and_never_escape(tmp_path, url, why):
    """Bugs caught: a manifest entry `s0.tar $(touch m)` ran the command under a pipe:
    url_template (on S3 already in check_shards); `../x.tar` and absolute paths were read from
    outside the dataset. Each is refused when the manifest is read, naming the manifest and the
    entry, before any template, check or worker; the command never runs."""
    marker = tmp_path / "marker"
    escape = _handmade_shards(str(tmp_path / "escape"))  # a real shard to escape to
    entry = url.format(marker=marker, tmp=tmp_path)

    def edit(m):
        m["shards"][0]["url"] = entry
    manifest = _manifest_with(tmp_path, "ds", edit)
    with pytest.raises(ShardError, match=rf"ds/manifest\.json: shards\[0\]: url .*{why}"):
        make_loader(manifest, 2, rank=0, world_size=1, num_workers=0,
                    url_template="pipe:cat {url}")
    assert not marker.exists() and os.path.exists(escape)


def test_pipe_templates_quote_each_url(tmp_path, monkeypatch):
    """A URL the user lists that holds shell syntax reaches a pipe: command as one quoted
    argument: `cat` reads the file of that literal name and nothing runs. Bug caught: the URL was
    pasted into the command unquoted."""
    monkeypatch.chdir(tmp_path)  # where the command would touch its marker
    marker = tmp_path / "marker"
    _handmade_shards(str(tmp_path), n_shards=1, per=4)
    odd = tmp_path / "s0 $(touch marker).tar"
    os.rename(tmp_path / "s0.tar", odd)
    loader = make_loader([str(odd)], 2, rank=0, world_size=1, num_workers=0, shuffle_buffer=0,
                         samples_per_epoch=4, url_template="pipe:cat {url}")
    assert sorted(y for _, ys in _epoch(loader) for y in ys.tolist()) == [0, 1, 2, 3]
    assert not marker.exists()
    with pytest.raises(ValueError, match=r"url_template 'pipe:cat' has no \{url\}"):
        load_manifest([str(odd)], url_template="pipe:cat")


def test_a_shard_listed_twice_is_refused(tmp_path):
    """Bug caught: the same shard listed twice in a manifest (or a URL list) was read twice per
    epoch, and another shard not at all."""
    def edit(m):
        m["shards"][2]["url"] = "s0.tar"
    manifest = _manifest_with(tmp_path, "dup", edit)
    with pytest.raises(ShardError, match=r"dup/manifest\.json: shards 0 and 2 are the same shard "
                                         r"'s0\.tar'"):
        make_loader(manifest, 2, rank=0, world_size=1)
    url = str(tmp_path / "dup" / "s1.tar")
    with pytest.raises(ShardError, match=r"URL list's entries 0 and 1 are the same shard"):
        make_loader([url, url], 2, rank=0, world_size=1, samples_per_epoch=20)


def test_s3_manifest_never_names_a_local_file(s3_server, tmp_path):
    """Bug caught: an s3:// manifest whose entry was an absolute path made every rank read that
    local file."""
    import boto3
    local = _handmade_shards(str(tmp_path / "local"), n_shards=1, per=4)
    m = json.load(open(local))
    m["shards"][0]["url"] = os.path.join(str(tmp_path / "local"), "s0.tar")
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket="hostile")
    s3.put_object(Bucket="hostile", Key="ds/manifest.json", Body=json.dumps(m).encode())
    with pytest.raises(ShardError, match=r"s3://hostile/ds/manifest\.json: shards\[0\]: url "
                                         r"'/.*/s0\.tar' is a path"):
        make_loader("s3://hostile/ds/", 2, rank=0, world_size=1)


def _set(key, value):
    def edit(m):
        m[key] = value
    return edit


def _set_shard(key, value):
    def edit(m):
        m["shards"][0][key] = value
    return edit


@pytest.mark.parametrize("edit, message", [
    (lambda m: b"{not json", r" is not a JSON manifest \(JSONDecodeError"),
    (lambda m: b'{"num_samples": "\xff"}', r" is not a JSON manifest \(UnicodeDecodeError"),
    (lambda m: b"[1, 2]", r" holds a JSON list, not a manifest object"),
    (lambda m: m.pop("num_samples"), r": manifest has no 'num_samples' field"),
    (_set("shards", {"s0.tar": 10}), r": 'shards' must be a non-empty list"),
    (_set("shards", []), r": 'shards' must be a non-empty list"),
    (_set("shards", ["s0.tar", "s1.tar", "s2.tar"]), r": shards\[0\] has no url name: 's0\.tar'"),
    (_set_shard("count", "10"), r": shards\[0\]\.count must be an integer >= 0, got '10'"),
    (_set_shard("count", -10), r": shards\[0\]\.count must be an integer >= 0, got -10"),
    (_set_shard("count", True), r": shards\[0\]\.count must be an integer >= 0, got True"),
    (_set("num_samples", 30.0), r": num_samples must be an integer >= 0, got 30\.0"),
    (_set("num_classes", 0), r": num_classes must be an integer >= 1, got 0"),
    (_set("num_classes", "4"), r": num_classes must be an integer >= 1, got '4'"),
], ids=["bad-json", "not-utf8", "a-list", "no-num_samples", "shards-dict", "shards-empty",
        "entry-string", "count-string", "count-negative", "count-bool", "num_samples-float",
        "num_classes-zero", "num_classes-string"])
def test_corrupt_manifests_name_the_file_and_the_field(tmp_path, edit, message):
    """Bug caught: a corrupt manifest.json gave a KeyError / TypeError / JSONDecodeError without
    the path (the ShardError clause for bad JSON could never run: `except Exception` came
    first), or was accepted (count '10', num_classes 0)."""
    manifest = _manifest_with(tmp_path, "bad", edit)
    with pytest.raises(ShardError, match=r"bad/manifest\.json" + message):
        make_loader(manifest, 2, rank=0, world_size=1)


# -- S3: a server that stops answering ends within data.retry_s -----------------------------------
class _StallingProxy:
    """A TCP proxy in front of the local S3 server that, once `stall()` is called, keeps every
    connection open and accepts new ones but relays nothing: a hung server, not a dead one."""

    def __init__(self, upstream: str):
        self.upstream = int(upstream.rsplit(":", 1)[1])
        self.stalled = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:  # closed
                return
            self.sockets.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client):
        if self.stalled.is_set():
            return  # accepted, never answered
        server = socket.create_connection(("127.0.0.1", self.upstream))
        self.sockets.append(server)
        other = {client: server, server: client}
        while not self.stalled.is_set():
            ready, _, _ = select.select([client, server], [], [], 0.05)
            for sock in ready:
                try:
                    data = sock.recv(1 << 16)
                except OSError:
                    data = b""
                if not data or self.stalled.is_set():
                    return
                other[sock].sendall(data)

    def stall(self):
        self.stalled.set()

    def close(self):
        for sock in self.sockets:
            sock.close()


def test_stalling_s3_server_ends_within_retry_s(s3_server, data_tiny_shards, monkeypatch):
    """A server that stops answering mid-epoch: with data.retry_s=3 a ShardError names the shard
    and the endpoint within 3 + 5 s; at start, the manifest read gives up within the check
    timeout. Bug caught: fixed 20 s read timeouts, twice per attempt (HEAD, GET), made it 82 s
    with retry_s=3 and 90 s with the default 20 s, whatever data.retry_s said."""
    from test_data_s3 import _upload
    from test_faults import _fresh_s3fs
    _upload(s3_server, "faces", "stall", data_tiny_shards)
    proxy = _StallingProxy(s3_server)
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    _fresh_s3fs()
    try:
        with pytest.raises(ShardError, match=rf"shard s3://faces/stall/shard-\d+\.tar cannot be "
                                             rf"read from endpoint {proxy.endpoint}: .*Timeout"):
            for step, _ in enumerate(make_loader("s3://faces/stall/", 4, rank=0, world_size=1,
                                                 num_workers=0, shuffle_buffer=0, retry_s=3)):
                if step == 0:  # the server hangs after the first batch
                    proxy.stall()
                    t = time.monotonic()
        assert time.monotonic() - t < 3 + 5
        t = time.monotonic()
        with pytest.raises(ShardError, match=r"cannot read s3://faces/stall/manifest\.json from "
                                             rf"endpoint {proxy.endpoint}"):
            make_loader("s3://faces/stall/", 4, rank=0, world_size=1, check_timeout=2)
        assert time.monotonic() - t < 2 + 3
    finally:
        proxy.close()
        _fresh_s3fs()


# -- a loader state that this loader cannot have written ------------------------------------------
def _edited(state, **fields):
    out = json.loads(json.dumps(state))
    for k, v in fields.items():
        out[k] = v
    return out


def test_loader_state_is_checked_before_resuming(tmp_path):
    """A real mid-epoch state with corrupt samples skipped (2 workers) resumes; crafted ones are
    refused with a ValueError naming the field. Bug caught: `raw=[10**9]` (a worker's position)
    was taken as it came and the resumed worker skipped samples for ever; strings, negative
    counts and positions past the epoch were cast or used as they were."""
    from test_data_ranks import _write_shards
    d = _write_shards(str(tmp_path), 4, 10, corrupt=(0, 1))
    kw = dict(rank=0, world_size=1, num_workers=2, shuffle_buffer=0, seed=1)
    loader = make_loader(d, 4, **kw)
    it = iter(loader)
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    del it
    assert sum(s.get("corrupt", 0) for s in state["worker_stats"]) > 0  # the relation is tested
    resumed = make_loader(d, 4, **kw)
    resumed.load_state_dict(_edited(state))
    assert len(_epoch(resumed)) == len(loader) - 3
    raw0, per_epoch = state["raw"][0], len(loader)
    layout2 = dict(state["layout"], world_size=2)
    for fields, field in (
            (dict(raw=[10 ** 9, state["raw"][1]]), r"raw\[0\] is 1000000000, but worker 0 handed "
                                                   r"out 2 batches of 4"),
            (dict(raw=[raw0]), r"raw is \[\d+\], expected a list of 2 counts"),
            (dict(worker_stats=[{"corrupt": 10 ** 9}, {}], raw=[8 + 10 ** 9, 0]),
             r"worker_stats\[0\]\['corrupt'\] is 1000000000, expected an integer in \[0, 40\]"),
            (dict(worker_stats=[{"corrupt": "2"}, {}]), r"worker_stats\[0\]\['corrupt'\] is '2'"),
            (dict(epoch="1"), r"epoch is '1', expected an integer"),
            (dict(epoch=-1), r"epoch is -1"),
            (dict(batches_done=per_epoch + 1), rf"batches_done is {per_epoch + 1}, expected an "
                                               rf"integer in \[0, {per_epoch}\]"),
            (dict(layout=layout2, batches_done=10 ** 6), r"batches_done is 1000000"),
            (dict(layout={"seed": 1}), r"layout is \{'seed': 1\}, expected the fields"),
            (dict(stats_before={"corrupt_samples": -5}),
             r"stats_before\['corrupt_samples'\] is -5"),
            (dict(stats_before=[]), r"stats_before is \[\], expected a mapping")):
        with pytest.raises(ValueError, match=r"data loader state \(a checkpoint's rank_state\): "
                                             + field + ".*resume from another checkpoint"):
            make_loader(d, 4, **kw).load_state_dict(_edited(state, **fields))
    with pytest.raises(ValueError, match=r"field 'raw' is missing"):
        make_loader(d, 4, **kw).load_state_dict({k: v for k, v in state.items() if k != "raw"})
    with pytest.raises(ValueError, match=r"the state is list, expected a mapping"):
        make_loader(d, 4, **kw).load_state_dict([state])


# -- DataLoader workers: an error in one, a worker killed on one rank -----------------------------
def test_a_worker_error_arrives_as_one_line(tmp_path):
    """A ShardError raised in a DataLoader worker (a label outside num_classes) reaches the
    main process with its own message, the same as without workers. Bug caught: torch re-raised
    it as 'Caught ShardError in DataLoader worker process 0. Original Traceback ...', some 20
    lines that run_script printed as the 'one line'."""
    def edit(m):
        m["num_classes"] = 2
    manifest = _manifest_with(tmp_path, "labels", edit)
    messages = []
    for workers in (0, 1):
        loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=workers,
                             shuffle_buffer=0)
        with pytest.raises(ShardError) as caught:
            _epoch(loader)
        messages.append(str(caught.value))
    assert messages[0] == messages[1] and "\n" not in messages[1], messages
    assert "has label" in messages[1]


def _kill_a_worker_on_rank_1(rank, world_size, data):
    """Training's consumer (InputStreams: a shared error check per batch) plus a collective per
    step; rank 1 kills its DataLoader worker after 2 steps. Returns what each rank raised."""
    import psutil
    import signal
    import torch
    import torch.distributed as dist
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.trainer import InputStreams
    cfg = load_config(None, ["data.source=webdataset", f"data.urls={data}", "data.num_workers=1",
                             "data.shuffle_buffer=0", "head.num_classes=4", "model.input_size=16"])
    streams = InputStreams(cfg, 2, rank, world_size, torch.device("cpu"))
    t = time.monotonic()
    try:
        for step in range(100):
            next(streams)
            dist.all_reduce(torch.ones(1))  # the head's collective
            if rank == 1 and step == 1:
                for child in psutil.Process().children():
                    os.kill(child.pid, signal.SIGKILL)
            time.sleep(0.02)
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return type(exc).__name__, str(exc), time.monotonic() - t
    return None


def test_a_worker_killed_on_one_rank_stops_every_rank_with_one_line(tmp_path):
    """Bug caught: torch's SIGCHLD handler raised 'DataLoader worker is killed by signal' from
    whatever code ran at that moment (a collective, a sleep) on the rank that lost its worker,
    outside the loader's shared error check; the other rank then died in gloo with a 22-line
    'Connection closed by peer' traceback. Now the loader finds the death at its next fetch and
    every rank stops with a line naming it."""
    from harness import run_ranks
    data = _handmade_shards(str(tmp_path), n_shards=4, per=10)
    r0, r1 = run_ranks(2, _kill_a_worker_on_rank_1, data, timeout=90)
    assert r1[0] == "LoaderError" and "a data loader worker process died" in r1[1], r1
    assert "out-of-memory killer" in r1[1] and "\n" not in r1[1]
    assert r0[:2] == ("RankFailed", f"rank 1 failed: LoaderError: {r1[1]}"), r0
    assert max(r0[2], r1[2]) < 30


def test_a_broken_worker_pipe_is_named_as_a_dead_worker():
    """Bug caught (the test above failed once in five full-suite runs): when the killed worker's
    result pipe broke before torch saw the process gone, torch's ConnectionResetError came
    through as it is (a bare "[Errno 104] Connection reset by peer"), not as the loader's
    LoaderError. The iterator here raises what torch's did; its worker is a real process that
    has exited. With every worker alive the error is not the loader's to rename."""
    import multiprocessing
    from hybrid_fc.data.loader import LoaderError, _worker_deaths_named
    worker = multiprocessing.get_context("fork").Process(target=os._exit, args=(0,))
    worker.start()
    worker.join()

    class BrokenPipe:  # torch's multi-worker iterator at the moment the pipe broke
        def __init__(self, workers):
            self._workers = workers

        def __iter__(self):
            return self

        def __next__(self):
            raise ConnectionResetError(104, "Connection reset by peer")

    with pytest.raises(LoaderError, match=rf"a data loader worker process died \(pid\(s\) "
                                          rf"{worker.pid}: ConnectionResetError on its result"):
        list(_worker_deaths_named(BrokenPipe([worker])))
    t = time.monotonic()
    with pytest.raises(ConnectionResetError):
        list(_worker_deaths_named(BrokenPipe([])))
    assert time.monotonic() - t < 5



# -- images: 16-bit PNGs, images of another size ------------------------------------------------
def test_16_bit_png_decodes_and_resized_images_are_counted(tmp_path, caplog):
    """One shard: four 16x16 JPEGs, a 16-bit grayscale PNG (a gradient over 0..65535) and a
    24x24 JPEG, read at image_size=16 by each decoder, with and without a worker. Bugs caught:
    the PNG decoded as all 255 (PIL's convert('RGB') clips 16-bit values), and the 24x24 image
    was resized without a trace (now counted in loader.stats and logged like a corrupt one)."""
    import io
    import numpy as np
    from PIL import Image
    from hybrid_fc.data import available_decoders
    from hybrid_fc.data.synthetic import encode_jpeg, synthetic_image
    gradient = (np.arange(256, dtype=np.uint32).reshape(16, 16) * 257).astype(np.uint16)
    png = io.BytesIO()
    Image.fromarray(gradient).save(png, format="PNG")
    samples = []
    for i in range(6):
        image = (png.getvalue() if i == 4 else
                 encode_jpeg(synthetic_image(i, i, 24 if i == 5 else 16)))
        samples += [(f"{i:05d}", "png" if i == 4 else "jpg", image),
                    (f"{i:05d}", "cls", str(i).encode())]
    _write_tar(tmp_path / "s0.tar", samples)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"num_samples": 6, "num_classes": 6, "shards": [{"url": "s0.tar", "count": 6}]}))
    for decoder in available_decoders():
        for workers in (0, 1):
            loader = make_loader(str(tmp_path), 2, rank=0, world_size=1, num_workers=workers,
                                 shuffle_buffer=0, image_size=16, decoder=decoder)
            with caplog.at_level("WARNING"):
                batches = _epoch(loader)
            images = {int(y): x for xs, ys in batches for x, y in zip(xs, ys)}
            assert sorted(images) == list(range(6))
            want = np.repeat((gradient >> 8).astype(np.uint8)[None], 3, axis=0)
            assert np.array_equal(images[4].numpy(), want), (decoder, workers)
            assert loader.stats["resized_samples"] == 1 and loader.stats["corrupt_samples"] == 0
            assert loader.state_dict()["stats_before"]["resized_samples"] == 1
    assert "a 24x24 image, resized to 16x16" in caplog.text
    assert "1 images of another size resized" in caplog.text


# -- RecordIO: an .idx that does not index every record -------------------------------------------
def test_recordio_idx_cut_short_or_missing_lines_is_refused(tmp_path):
    """Bug caught: a train.idx cut at a line boundary (20 of 40 lines, an interrupted copy)
    parsed cleanly and converted 20 of 40 records with rc 0. Now the record that starts last
    must end where the .rec ends, and every record where the next indexed one starts (checked
    as it is read); both files are named. An empty .idx is named too."""
    from hybrid_fc.data import SourceError
    from test_data_convert import _ir_pack, _write_recordio
    d = tmp_path / "rec"
    _write_recordio(d, [(k, _ir_pack(k % 3, _jpeg(k))) for k in range(40)])
    lines = sorted((d / "train.idx").read_text().splitlines(), key=lambda ln: int(ln.split()[0]))
    (d / "train.idx").write_text("\n".join(lines[:20]) + "\n")
    with pytest.raises(SourceError, match=r"rec/train\.idx does not index every record: .*rec/"
                                          r"train\.rec: record key 19 at offset \d+: the record "
                                          r"ends at byte \d+, but .* is at byte \d+"):
        convert(str(d), str(tmp_path / "o1"))
    (d / "train.idx").write_text("\n".join(lines[:10] + lines[11:]) + "\n")  # key 10 lost
    with pytest.raises(SourceError, match=r"train\.idx does not index every record: .*record "
                                          r"key 9 at offset"):
        convert(str(d), str(tmp_path / "o2"), samples_per_shard=8)
    assert not os.path.exists(tmp_path / "o2" / "manifest.json")
    (d / "train.idx").write_text("")
    with pytest.raises(SourceError, match=r"train\.idx has no `key<TAB>offset` lines"):
        convert(str(d), str(tmp_path / "o3"))


# -- extract.py: nothing dropped or repeated without an error ------------------------------------
def _extract_shards(d, shards):
    """shards: {name: [(key, members dict)]} -> tar shards + manifest (counts = samples)."""
    os.makedirs(d, exist_ok=True)
    for name, samples in shards.items():
        _write_tar(os.path.join(d, name), [(key, ext, data) for key, members in samples
                                           for ext, data in members.items()])
    entries = [{"url": name, "count": len(samples)} for name, samples in shards.items()]
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump({"num_samples": sum(e["count"] for e in entries), "num_classes": 4,
                   "shards": entries}, f)
    return d


def _sample(i, **members):
    return f"k{i:03d}", {"jpg": _jpeg(i), "cls": str(i % 4).encode(), **members}


def _extract_and_report(rank, world_size, source, out):
    from test_export import SIZE, _tiny_model
    from hybrid_fc.evaluation.extract import extract_embeddings
    try:
        return extract_embeddings(_tiny_model(), source, out, SIZE, batch_size=4)
    except Exception as exc:  # noqa: BLE001 - the test compares what each rank raised
        return type(exc).__name__, str(exc)


def test_extract_refuses_a_key_two_shards_share_on_two_ranks(tmp_path):
    """Shard s0 (rank 0) and s2 (rank 1) hold the same key. Bug caught: rc 0 with the key's row
    twice; now rank 0 names the key and both shards, rank 1 stops with RankFailed naming it,
    and neither leaves a part file or an output behind."""
    from harness import run_ranks
    src = _extract_shards(str(tmp_path / "dup"), {
        "s0.tar": [_sample(i) for i in range(3)], "s1.tar": [_sample(i) for i in range(3, 6)],
        "s2.tar": [_sample(1), _sample(7)], "s3.tar": [_sample(8)]})
    out = str(tmp_path / "emb" / "emb.npy")
    r0, r1 = run_ranks(2, _extract_and_report, src, out, timeout=120)
    assert r0[0] == "ShardError" and re.search(r"key k001 appears twice, in shard .*dup/s0\.tar "
                                               r"and in shard .*dup/s2\.tar", r0[1]), r0
    assert r1 == ("RankFailed", f"rank 0 failed: ShardError: {r0[1]}")
    assert os.listdir(tmp_path / "emb") == []


@pytest.mark.parametrize("samples, message", [
    ({"s0.tar": [_sample(0), _sample(1), _sample(1)]},
     r"s0\.tar: key k001 has two \.jpg members \(two samples merged under one key\)"),
    ({"s0.tar": [_sample(0), _sample(1), _sample(2)], "s1.tar": [_sample(3), _sample(0)]},
     r"key k000 appears twice, in shard .*s0\.tar and in shard .*s1\.tar"),
    ({"s0.tar": [_sample(0), ("k001", {"cls": b"1"}), _sample(2)]},
     r"s0\.tar: sample k001 has 0 image members \(members: \['cls'\]\)"),
    ({"s0.tar": [_sample(0), _sample(1, cls=b"one")]},
     r"s0\.tar: sample k001: label b'one' is not an integer"),
], ids=["merged-key", "key-in-two-shards", "no-image", "bad-label"])
def test_extract_refuses_samples_that_would_drop_or_repeat_rows(tmp_path, samples, message):
    """Bugs caught: two samples under one key merged into one row (the second image kept), a
    key in two shards gave two rows, a sample without an image was dropped, a bad label was a
    ValueError without the shard; each with rc 0 or no name."""
    src = _extract_shards(str(tmp_path / "src"), samples)
    out = str(tmp_path / "emb.npy")
    kind, text = _extract_and_report(0, 1, src, out)
    assert kind == "ShardError" and re.search(message, text), text
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_extract_checks_each_shard_against_its_manifest_count(tmp_path):
    """Bug caught: a shard shorter than its manifest count gave fewer rows with rc 0."""
    src = _extract_shards(str(tmp_path / "src"), {"s0.tar": [_sample(i) for i in range(4)],
                                                   "s1.tar": [_sample(i) for i in range(4, 8)]})
    m = json.load(open(os.path.join(src, "manifest.json")))
    m["shards"][1]["count"], m["num_samples"] = 5, 9
    json.dump(m, open(os.path.join(src, "manifest.json"), "w"))
    kind, text = _extract_and_report(0, 1, src, str(tmp_path / "emb.npy"))
    assert kind == "ShardError" and "s1.tar holds 4 samples but the manifest says 5" in text


# -- tests that would not notice (bugs planted by hand, one at a time) ---------------------------
def test_shuffle_buffer_is_reseeded_every_epoch(tmp_path):
    """One shard, so that the shard order cannot differ between epochs: only the shuffle
    buffer's seed can. Two epochs differ, each is reproduced by a fresh loader started at that
    epoch, and without a buffer both are the archive order. Bug caught (planted: the epoch left
    out of the buffer's seed): every epoch in the same order; test_order_is_seeded stayed green
    because its five shards are permuted per epoch anyway."""
    from test_data_ranks import _write_shards
    d = _write_shards(str(tmp_path), 1, 16)  # sample i has label i

    def labels(loader):
        return [v for _, y in loader for v in y.tolist()]
    kw = dict(rank=0, world_size=1, num_workers=0, seed=3)
    loader = make_loader(d, 4, shuffle_buffer=16, **kw)
    first, second = labels(loader), labels(loader)
    assert len(first) == len(second) == 16 and first != second
    assert labels(make_loader(d, 4, shuffle_buffer=16, epoch=1, **kw)) == second
    plain = make_loader(d, 4, shuffle_buffer=0, **kw)
    assert labels(plain) == labels(plain) == list(range(16))


def test_samples_per_epoch_with_and_without_a_manifest(tmp_path):
    """On a local manifest (30 samples): samples_per_epoch=12 makes epochs of 12 samples; a
    brace pattern (no manifest) without it is refused, naming the setting. Bugs caught
    (planted: samples_per_epoch ignored when a manifest gives a count; the refusal removed with
    a default of one shard's worth): only an S3 test noticed the first, by accident."""
    manifest = _handmade_shards(str(tmp_path), n_shards=3, per=10)
    loader = make_loader(manifest, 4, rank=0, world_size=1, num_workers=0,
                         samples_per_epoch=12)
    assert len(loader) == 3 and len(_epoch(loader)) == 3 and loader.num_samples == 12
    pattern = str(tmp_path / "s{0..2}.tar")
    with pytest.raises(ValueError, match=r"samples_per_epoch: the epoch length is unknown.*"
                                         r"data\.samples_per_epoch=N"):
        make_loader(pattern, 4, rank=0, world_size=1)
    assert len(make_loader(pattern, 4, rank=0, world_size=1, samples_per_epoch=30)) == 7


# -- hostile shards: a folder, zero bytes, keys that are no text ----------------------------------
def test_a_shard_that_is_a_folder_or_empty_is_named(tmp_path):
    """Bug caught: a shard that is a folder was reported as not existing; an empty shard file is
    named by the pre-flight check ('read 0 bytes')."""
    manifest = _handmade_shards(str(tmp_path / "folder"), n_shards=2, per=4)
    os.remove(tmp_path / "folder" / "s1.tar")
    os.mkdir(tmp_path / "folder" / "s1.tar")
    with pytest.raises(ShardError, match=r"1 of 2 shards do not exist or are not files \(a "
                                         r"folder\?\), e\.g\. \['.*folder/s1\.tar'\]"):
        make_loader(manifest, 2, rank=0, world_size=1)
    manifest = _handmade_shards(str(tmp_path / "empty"), n_shards=2, per=4)
    open(tmp_path / "empty" / "s1.tar", "wb").close()
    with pytest.raises(ShardError, match=r"1 of 2 checked shards cannot be read:\n  .*empty/s1\.tar"
                                         r": read 0 bytes"):
        make_loader(manifest, 2, rank=0, world_size=1)


@pytest.mark.parametrize("key", ["k\udcff1", "k\n1", "k\t1"], ids=["not-utf8", "newline", "tab"])
def test_extract_refuses_keys_that_are_no_line_of_text(tmp_path, key):
    """Bug caught: a key that is not UTF-8 text gave a UnicodeEncodeError naming nothing (and a
    key with a newline a ValueError without the shard)."""
    src = _extract_shards(str(tmp_path / "src"), {"s0.tar": [_sample(0), (key, _sample(1)[1])]})
    kind, text = _extract_and_report(0, 1, src, str(tmp_path / "emb.npy"))
    assert kind == "ValueError" and re.search(r"src/s0\.tar: key .* cannot be a line of the keys "
                                              r"file", text), (kind, text)


def test_extract_names_the_image_it_cannot_decode(tmp_path):
    """Bug caught: an image extract could not decode was named by the batch's first key and its
    position in the batch, not by its own key."""
    from PIL import Image
    from hybrid_fc.backbones import build_backbone
    from hybrid_fc.evaluation import BinFileError, extract_embeddings
    folder = tmp_path / "gallery" / "a"
    folder.mkdir(parents=True)
    for k in range(3):
        Image.new("RGB", (16, 16), (k, 0, 0)).save(folder / f"{k}.jpg")
    (folder / "9_broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    model = build_backbone("mlp", 8, input_size=16).eval()
    with pytest.raises(BinFileError, match=r"image 'a/9_broken\.jpg' cannot be decoded"):
        extract_embeddings(model, str(tmp_path / "gallery"), str(tmp_path / "e.npy"), 16,
                           batch_size=8)
