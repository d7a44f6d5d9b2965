"""Where shards live: local paths, `s3://` (fsspec + s3fs), `pipe:` commands.

`register_s3_handler()` adds `s3://` to `webdataset.gopen_schemes` (webdataset 1.0.2 has none).
It opens objects through fsspec/s3fs, whose filesystem cache is keyed by process id, so the
handler also works inside forked DataLoader workers (each worker builds its own client on first
use; cost: one client, ~50 ms, per worker). Credentials and the endpoint come from the usual AWS
sources on every rank: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY / AWS_DEFAULT_REGION /
AWS_ENDPOINT_URL environment variables, ~/.aws/{credentials,config}, or an instance role.
"""
import contextlib
import errno
import io
import os
import shutil
import tempfile
from typing import List, Optional

__all__ = ["register_s3_handler", "is_remote", "open_read", "read_bytes", "join_url",
           "OutputDir", "OutputError", "endpoint_of"]

# Streaming read size for S3 objects: one ranged GET per block. 8 MiB keeps per-request overhead
# (~10 ms) small next to the transfer and costs 8 MiB of buffer per open shard per worker.
S3_BLOCK_SIZE = 8 << 20
LOCAL_BUFFER = 1 << 20  # local shard reads: 1 MiB buffer -> few syscalls per 256 MB shard


# Reads fail fast and leave retrying to the caller (loader.read_shards retries a shard with
# backoff for a bounded time, then names the shard and the endpoint): no retries inside botocore
# or s3fs (theirs stacked to ~10 s per request against a dead endpoint, and 75 s per failed
# epoch). The connect and read timeouts come from the caller's time budget (`timeout`): a hung
# server answers nothing, and with fixed 20 s timeouts a stalled S3 server took 80 s (an open's
# HEAD and GET, twice) to become an error whatever data.retry_s said.
_CONNECT_TIMEOUT = 5.0
# Timeouts are rounded down to one of these steps, so that a process holds at most a handful of
# differently configured clients (fsspec caches one filesystem per configuration).
_TIMEOUT_STEPS = (0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def _timeout_step(timeout: float) -> float:
    return max([t for t in _TIMEOUT_STEPS if t <= timeout] or [_TIMEOUT_STEPS[0]])


def _s3fs(timeout: Optional[float] = None):
    """fsspec's s3 filesystem. timeout: a streaming reader without internal retries whose
    connect and read timeouts each fit in `timeout` seconds (see _CONNECT_TIMEOUT)."""
    try:
        import fsspec
        if timeout is None:
            return fsspec.filesystem("s3")  # cached per process (fsspec checks the pid after fork)
        t = _timeout_step(timeout)
        fs = fsspec.filesystem("s3", config_kwargs={
            "connect_timeout": min(_CONNECT_TIMEOUT, t), "read_timeout": t,
            "retries": {"max_attempts": 1, "mode": "standard"}})
        fs.retries = 1  # s3fs's own retry loop around each call
        return fs
    except ImportError as e:
        raise ImportError("s3:// URLs need s3fs: pip install s3fs (or hybrid_fc[test])") from e


def endpoint_of(url: str) -> str:
    """Where a URL is read from, for error messages: the S3 endpoint of an s3:// URL."""
    if url.startswith("s3://"):
        ep = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return f"endpoint {ep}" if ep else "the default AWS endpoint (AWS_ENDPOINT_URL unset)"
    return "the local filesystem" if not is_remote(url) else url.split("/", 3)[2]


def _gopen_s3(url, mode="rb", bufsize=8192, timeout: float = 16.0, **kw):
    """webdataset's gopen handler for s3://; `timeout`: see _s3fs (reads only)."""
    fs = _s3fs(timeout if mode[0] == "r" else None)
    if mode[0] == "r":
        # fsspec's file object spends ~5-10 us of Python per read() call, and a tar reader makes
        # four per sample; a C BufferedReader in front serves them from 1 MiB chunks (measured
        # on 8.5 KB JPEG samples: 71 -> 43 us CPU per sample, local disk 17 us).
        raw = fs.open(url, "rb", block_size=S3_BLOCK_SIZE, cache_type="readahead")
        return io.BufferedReader(raw, LOCAL_BUFFER)
    return fs.open(url, "wb")


def register_s3_handler():
    """Make `webdataset.gopen` open s3:// URLs with fsspec/s3fs. Idempotent; call it before
    building a pipeline (make_loader does)."""
    import webdataset
    webdataset.gopen_schemes["s3"] = _gopen_s3


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def join_url(base: str, name: str) -> str:
    if "://" in name or name.startswith("pipe:") or os.path.isabs(name):
        return name
    if is_remote(base):
        return base.rstrip("/") + "/" + name
    return os.path.join(base, name)


def open_read(url: str, timeout: float = 16.0):
    """A readable binary stream for a shard URL (local path, file://, s3://, pipe:, http...).
    timeout: for s3://, each request (the open's HEAD, every ranged GET) waits at most about
    this long for a connection and for each answer (rounded down to a power of 2, 0.5-16 s).
    """
    if url.startswith("file://"):
        url = url[len("file://"):]
    if "://" not in url and not url.startswith("pipe:"):
        return open(url, "rb", buffering=LOCAL_BUFFER)
    if url.startswith("s3://"):
        return _gopen_s3(url, "rb", timeout=timeout)
    import webdataset
    return webdataset.gopen(url, "rb")


class OutputError(RuntimeError):
    """An output (a conversion's, an extraction's) cannot be created, listed, read or written;
    the message names the file and what to check (free space, permissions, the bucket and
    credentials)."""


# errno values of a write that failed for want of space: a full disk, a file size limit
# (RLIMIT_FSIZE), a quota
_NO_SPACE = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


class OutputDir:
    """Destination of a conversion: a local directory or an s3:// prefix.

    Local: a shard is written under a temporary name in the directory itself and renamed when
    complete (rename is atomic on POSIX). Remote: it is written to a local staging file and then
    uploaded; an S3 object appears only once its upload completes, so existence again means
    complete. Every failure of the output (a read-only or full disk, a missing bucket, no
    credentials, a dead endpoint) is an OutputError naming the file (`errors`).
    """

    def __init__(self, url: str, staging_dir: Optional[str] = None):
        self.url = url.rstrip("/") if is_remote(url) else url
        self.remote = is_remote(url)
        with self.errors("create", ""):
            if self.remote:
                self.staging = tempfile.mkdtemp(prefix="hybrid_fc_shards_", dir=staging_dir)
            else:
                os.makedirs(url, exist_ok=True)
                self.staging = url

    @contextlib.contextmanager
    def errors(self, verb: str, name: str, store: bool = False):
        """Turn a failure to `verb` the output file `name` into an OutputError that names it:
        an OSError (local files, the staging copy of an upload), and with store=True any error
        of the remote store's client (botocore raises its own types: NoCredentialsError,
        EndpointConnectionError). Errors of hybrid_fc's own kinds (a bad source) pass as they
        are."""
        try:
            yield
        except OSError as e:
            raise OutputError(self._explain(verb, name, e)) from None
        except Exception as e:  # noqa: BLE001 - a remote store client's error, named below
            if not store or type(e).__module__.startswith("hybrid_fc") or \
                    isinstance(e, ImportError):
                raise
            raise OutputError(self._explain(verb, name, e)) from None

    def _explain(self, verb: str, name: str, e: Exception) -> str:
        where = self.path(name) if name else self.url
        msg = f"cannot {verb} {where}: {type(e).__name__}: {e}"
        if isinstance(e, OSError) and e.errno in _NO_SPACE:
            try:
                free = f"{shutil.disk_usage(self.staging).free / 1e9:.1f} GB free"
            except (OSError, AttributeError):
                free = "free space unknown"
            return f"{msg} (out of space on {self.staging}: {free}, or a file size limit)"
        if self.remote:
            bucket = self.url.split("://", 1)[1].split("/", 1)[0]
            return (f"{msg} ({endpoint_of(self.url)}: check that it answers, that bucket "
                    f"{bucket!r} exists and that this machine's credentials (AWS_* variables, "
                    "~/.aws) may write to it)")
        return f"{msg} (the output must be a folder this user can write to)"

    @property
    def fs(self):
        """The fsspec filesystem, looked up on every use: fsspec caches one instance per process,
        and an instance made before a fork must not be used in the child."""
        if self.url.startswith("s3://"):
            return _s3fs()
        import fsspec
        return fsspec.filesystem(self.url.split("://")[0])

    def path(self, name: str) -> str:
        return join_url(self.url, name)

    def exists(self, name: str) -> bool:
        with self.errors("read", name, store=True):
            return self.fs.exists(self.path(name)) if self.remote else \
                os.path.exists(self.path(name))

    def list(self, sub: str = "") -> List[str]:
        """Names (relative to sub) of the files directly under `sub`."""
        with self.errors("list", sub, store=True):
            if self.remote:
                try:
                    return [p.rsplit("/", 1)[-1] for p in self.fs.ls(self.path(sub),
                                                                      detail=False, refresh=True)]
                except FileNotFoundError:
                    return []
            d = self.path(sub)
            return os.listdir(d) if os.path.isdir(d) else []

    def temp_file(self, name: str) -> str:
        """A fresh local path to write `name` to before `commit`."""
        return os.path.join(self.staging, f"{os.path.basename(name)}.tmp.{os.getpid()}")

    def commit(self, local_tmp: str, name: str):
        """Publish a fully written temp file under its final name (atomically)."""
        with self.errors("write", name, store=True):
            if self.remote:
                self.fs.put_file(local_tmp, self.path(name))
                os.remove(local_tmp)
            else:
                target = self.path(name)
                os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
                os.replace(local_tmp, target)

    def write_text(self, name: str, text: str):
        tmp = self.temp_file(name)
        try:
            with self.errors("write", name), open(tmp, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
        except OutputError:
            with contextlib.suppress(FileNotFoundError):
                os.remove(tmp)
            raise
        self.commit(tmp, name)

    def read_text(self, name: str) -> str:
        with self.errors("read", name, store=True):
            if self.remote:
                with self.fs.open(self.path(name), "rb") as f:
                    return f.read().decode("utf-8", "replace")
            with open(self.path(name), encoding="utf-8", errors="replace") as f:
                return f.read()

    def remove_stale_temps(self) -> int:
        """Delete temp files left by an interrupted run (local output only; remote temps live in
        a per-run staging directory)."""
        n = 0
        for sub in ("", "_convert"):
            d = self.path(sub) if not self.remote else None
            if d and os.path.isdir(d):
                for name in os.listdir(d):
                    if ".tmp." in name:
                        with self.errors("remove", f"{sub}/{name}" if sub else name):
                            os.remove(os.path.join(d, name))
                        n += 1
        return n

    def cleanup(self):
        if self.remote:
            shutil.rmtree(self.staging, ignore_errors=True)


def read_bytes(url: str, timeout: float = 16.0) -> bytes:
    """The whole content of a small file (a manifest) at a local path or remote URL; bytes, so
    that a file that is not text is the JSON parser's error, with the caller's file name. A
    remote server that does not answer raises within about `timeout` (its HEAD and GET each
    wait half)."""
    with open_read(url, timeout / 2) as f:
        return f.read()
