"""Process plumbing shared by the trainer, evaluation, export and every launch script.

What a process needs around DeepSpeed's distributed start and end, none of it model code:
  * start-up: `starting_up()` removes stale torch JIT build locks and names a lock a start-up
    still waits on after 2 minutes; `join_process_group()` joins the launcher's process group
    (a world of one under plain `python`: `standalone_defaults`), unlinks DeepSpeed's
    /dev/shm all-reduce buffers (`release_shm_buffers`) and makes sure the group is destroyed
    at exit (`destroy_at_exit`);
  * logs: `quiet_logs` (rank 0 at INFO, third-party chatter lowered);
  * signals: `Preemption` (SIGTERM / SIGINT: every rank finishes its step, agrees, saves);
  * the end: `run_script(main)` turns input errors into one line per rank and ends the process
    group cleanly (`finish_distributed`); a preempted run exits with 128 + the signal;
  * `rank_memory_bytes`: the memory one rank may plan for.
"""
import contextlib
import logging
import os
import signal
import sys
import threading
import time
import warnings
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

__all__ = ["clear_stale_build_locks", "watch_build_locks", "starting_up", "release_shm_buffers",
           "remove_stale_shm_buffers", "check_master_addr",
           "standalone_defaults", "join_process_group", "quiet_logs", "finish_distributed",
           "destroy_at_exit",
           "run_script", "rank_memory_bytes", "print_err", "Preempted", "PeerLost",
           "Preemption"]


def print_err(line: str) -> None:
    """One line to stderr in a single write (two ranks' lines never interleave mid-line)."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _build_locks():
    """(path, age in seconds) of every torch JIT-extension build lock under
    TORCH_EXTENSIONS_DIR, else torch's default root (~/.cache/torch_extensions)."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root is None:
        from torch.utils.cpp_extension import get_default_build_root
        root = get_default_build_root()
    for dirpath, _, files in os.walk(root):
        if "lock" in files:
            lock = os.path.join(dirpath, "lock")
            try:
                yield lock, time.time() - os.path.getmtime(lock)
            except FileNotFoundError:  # released meanwhile
                continue


def _waiting_message(lock: str, age: float, stale_after_s: float) -> str:
    return (f"hybrid_fc: DeepSpeed is waiting on the op build lock {lock} ({age:.0f} s old). "
            "A build takes about a minute; if no other run is starting on this machine, the "
            "lock was left by a process killed while building or loading the op: remove it "
            f"(it is removed at start once {stale_after_s / 60:.0f} minutes old)")


def clear_stale_build_locks(stale_after_s: float = 1800.0, print_fn=print) -> List[str]:
    """Remove torch JIT-extension build locks older than `stale_after_s`; returns their paths.

    DeepSpeed JIT-compiles ops (the CPU backend's deepspeed_shm_comm at every start, FusedAdam
    and others on GPUs) through torch.utils.cpp_extension, which serializes builds with a bare
    `lock` file in the op's build folder and waits, silently and without end, while it exists.
    A process killed during the build or the load (Ctrl-C at start-up, a job timeout) leaves the
    file behind, and every later run on that machine hangs at start-up. A build takes minutes,
    not half an hour, so an older lock has no live owner. A younger lock may be another run
    building right now: left alone, and mentioned only when it is over 2 minutes old (and by
    watch_build_locks if the start-up is still waiting 2 minutes later). Call it from one
    process per machine (local rank 0) before DeepSpeed starts, so that two ranks never remove
    a lock the other just took."""
    removed = []
    for lock, age in _build_locks():
        if age > stale_after_s:
            try:
                os.remove(lock)
            except FileNotFoundError:
                continue
            removed.append(lock)
            print_fn(f"hybrid_fc: removed a stale build lock {lock} ({age / 60:.0f} min old; "
                     "its process died while building or loading a DeepSpeed op)")
        elif age > 120:
            print_fn(_waiting_message(lock, age, stale_after_s))
    return removed


def watch_build_locks(after_s: float = 120.0, stale_after_s: float = 1800.0, print_fn=print):
    """A daemon thread that, if DeepSpeed's start-up is still running `after_s` seconds from
    now, names any build lock it may be waiting on (torch waits on one silently, for ever).
    Returns the Event to set when start-up is done."""
    done = threading.Event()

    def watch():
        if not done.wait(after_s):
            for lock, age in _build_locks():
                print_fn(_waiting_message(lock, age, stale_after_s))
    threading.Thread(target=watch, daemon=True, name="hybrid_fc-build-lock-watch").start()
    return done


_SHM_PREFIX = "deepspeed_allreduce_buffer_"


def _shm_name(rank: int) -> str:
    return os.path.join("/dev/shm", f"{_SHM_PREFIX}{os.getuid()}_"
                        f"{os.environ.get('MASTER_ADDR', '')}_"
                        f"{os.environ.get('MASTER_PORT', '')}_{rank}")


def remove_stale_shm_buffers(min_age_s: float = 60.0, print_fn=None) -> List[str]:
    """Remove this user's DeepSpeed all-reduce buffers in /dev/shm that no live process maps
    (left by runs that died before release_shm_buffers, e.g. killed during start-up); returns
    their paths. A buffer younger than `min_age_s` is left alone (a run starting right now may
    not have mapped it yet). Cost: one read of /proc/*/maps."""
    root = "/dev/shm"
    if not os.path.isdir(root):
        return []
    mine = [os.path.join(root, n) for n in os.listdir(root)
            if n.startswith(f"{_SHM_PREFIX}{os.getuid()}_")]
    if not mine:
        return []
    mapped = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.split(None, 5)[-1].strip() for line in f if _SHM_PREFIX in line)
        except OSError:  # gone meanwhile, or another user's
            continue
    removed = []
    for path in mine:
        try:
            if path in mapped or time.time() - os.path.getmtime(path) < min_age_s:
                continue
            os.unlink(path)
            removed.append(path)
        except OSError:
            continue
    if removed and print_fn is not None:
        print_fn(f"hybrid_fc: removed {len(removed)} DeepSpeed all-reduce buffer(s) left in "
                 "/dev/shm by runs that died before releasing them")
    return removed


@contextlib.contextmanager
def starting_up():
    """Around a process's DeepSpeed start-up (init_distributed, deepspeed.initialize: where its
    JIT ops are built or loaded): on local rank 0, stale build locks and /dev/shm buffers of
    dead runs are removed first and a lock the start-up still waits on after 2 minutes is
    named on stderr."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_rank == 0:  # a killed run's build lock hangs start-up; its buffers hold RAM
        clear_stale_build_locks(print_fn=print_err)
        remove_stale_shm_buffers(print_fn=print_err)
    done = watch_build_locks(print_fn=print_err) if local_rank == 0 else None
    try:
        yield
    finally:
        if done is not None:
            done.set()


def check_master_addr() -> None:
    """MASTER_ADDR must resolve: torch's rendezvous otherwise retries a failed name lookup for
    minutes ("gai error") before it gives up. ValueError naming the address instead."""
    import socket
    addr = os.environ.get("MASTER_ADDR")
    if not addr:
        return
    try:
        socket.getaddrinfo(addr, None)
    except OSError as exc:
        raise ValueError(f"MASTER_ADDR={addr!r} (--master_addr) does not resolve on this host "
                         f"({exc}): give the first node's address or a name in /etc/hosts; "
                         "for two launchers on one machine use --master_addr 127.0.0.1") from None


def join_process_group(standalone: bool = True) -> Tuple[int, int]:
    """Join the launcher's process group (deepspeed.init_distributed reads its variables) and
    unlink DeepSpeed's /dev/shm buffers; returns (rank, world size). standalone: a process
    started without a launcher becomes a world of one (standalone_defaults) instead of
    DeepSpeed looking for MPI. A script that ends without `finish_distributed()` still has
    its process group destroyed at exit (`destroy_at_exit`). Collective."""
    import deepspeed
    if standalone:
        standalone_defaults()
    check_master_addr()
    # DeepSpeed calls torch's all_gather_into_tensor, which torch 2.13 deprecates: one
    # FutureWarning per rank per run that the user can do nothing about
    warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated",
                            category=FutureWarning)
    deepspeed.init_distributed()
    destroy_at_exit()
    release_shm_buffers()  # DeepSpeed's CPU all-reduce buffers would outlive the run
    return dist.get_rank(), dist.get_world_size()


def release_shm_buffers() -> Optional[str]:
    """Unlink this rank's DeepSpeed CPU all-reduce buffer from /dev/shm; returns its path if it
    was there. Collective (one barrier): call it on every rank right after
    deepspeed.init_distributed().

    DeepSpeed's CPU backend creates /dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_
    <rank> (69 MB, RAM) per rank and never unlinks it, also after a normal exit: an afternoon of
    runs piled up gigabytes. Its shm_initialize maps every local rank's buffer before
    init_distributed returns, so after a barrier every mapping exists and the names can go (a
    mapping outlives its name; the memory is freed when the last process unmaps it, at exit).
    Nothing to do on GPUs (no such buffer)."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    name = _shm_name(dist.get_rank())
    dist.barrier()
    try:
        os.unlink(name)
    except (FileNotFoundError, PermissionError):
        return None
    return name


def standalone_defaults() -> bool:
    """`python launch/train.py` without a launcher: make this process a world of one (RANK,
    LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, a free MASTER_PORT) so that deepspeed.init_distributed
    does not go looking for MPI (mpi4py). Returns True when it did; under deepspeed, torchrun or
    mpirun (their variables present) it changes nothing."""
    if any(k in os.environ for k in ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK")) or (
            dist.is_available() and dist.is_initialized()):
        return False
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(port))
    return True


def finish_distributed() -> None:
    """End a launch script's process group cleanly: a barrier (no rank leaves while another still
    talks to it), then destroy_process_group so gloo's threads are joined before the interpreter
    exits. Without it a rank that reaches exit first could die of SIGABRT ("terminate called
    without an active exception", about 1 run in 6 of 2-rank eval on CPU) and the launcher then
    reports the whole run as failed. No-op when no process group exists."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _destroy_left_group() -> None:
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception as exc:  # noqa: BLE001 - the process is ending either way
            print_err(f"hybrid_fc: destroying the process group at exit failed: {exc}")


def destroy_at_exit() -> None:
    """Destroy the process group when the interpreter exits, if the script has not
    (`finish_distributed`, `dist.destroy_process_group`): a gloo group left to the interpreter's
    teardown can kill a rank with SIGABRT ("terminate called without an active exception") after
    its work is done, and the launcher then reports the whole run as failed. No barrier here: a
    rank that exits on an error must not wait for ranks that are not coming; a script that
    finishes normally should still call `finish_distributed()` (barrier, then destroy).
    Registered once per process however often it is called."""
    import atexit
    atexit.unregister(_destroy_left_group)
    atexit.register(_destroy_left_group)


class Preempted(Exception):
    """The run stopped on a signal after saving (Trainer, `Preemption`); `code` is the exit
    status, 128 + the signal's number (143 for SIGTERM, 130 for SIGINT)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


class PeerLost(RuntimeError):
    """Another rank went away (killed, its node lost): this rank's next collective failed."""

    _SIGNS = ("Connection reset by peer", "Connection closed by peer", "Broken pipe",
              "connection refused", "Socket Timeout", "NCCL communicator was aborted",
              "Timed out waiting", "ProcessGroupGloo", "Connection reset")

    @classmethod
    def wrap(cls, exc: BaseException) -> BaseException:
        """PeerLost for a failed collective (gloo / NCCL transport errors), else `exc`."""
        text = str(exc)
        if any(sign.lower() in text.lower() for sign in cls._SIGNS):
            first = text.strip().splitlines()[0][:160] if text.strip() else type(exc).__name__
            return cls(f"lost contact with another rank ({first})")
        return exc


class Preemption:
    """SIGTERM / SIGINT handling of a training loop, as a context manager.

    A signal only sets a flag (the handler does nothing else: the step in flight finishes).
    `agreed()`, called by every rank once per step, is one tiny all-reduce that tells every
    rank whether any rank was signalled, so all stop at the same step. `deadline(s, message)`
    bounds what follows (the checkpoint): past it the process prints `message` and exits with
    the signal's code, leaving the previous complete checkpoint as `latest`. The previous
    handlers come back on exit. Handlers can only be installed from the main thread; elsewhere
    (a library user's thread) signals keep their default behaviour."""

    _NAMES = {signal.SIGTERM: "SIGTERM", signal.SIGINT: "SIGINT"}

    def __init__(self, rank: int = 0):
        self.rank, self.signum, self._saved = rank, None, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self._NAMES:
                self._saved[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._saved.items():
            signal.signal(sig, handler)
        return False

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print_err(f"hybrid_fc (rank {self.rank}): {self._NAMES[signum]} received: finishing "
                      "this step, then saving a checkpoint")

    @property
    def signal_name(self) -> str:
        return self._NAMES.get(self.signum, "a signal")

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum or signal.SIGTERM)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal (its kind is
        shared too, for the message and exit code)."""
        from .collectives import comm_device
        if not (dist.is_available() and dist.is_initialized()):
            return self.signum is not None
        t = torch.tensor([int(self.signum or 0)], device=comm_device(None))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        if int(t.item()) and self.signum is None:
            self.signum = int(t.item())
        return bool(t.item())

    @contextlib.contextmanager
    def deadline(self, seconds: float, message):
        """Exit the process (code 128 + signal) with message() if the block runs longer."""
        done = threading.Event()

        def watch():
            if not done.wait(seconds):
                print_err(f"hybrid_fc (rank {self.rank}): {message()}")
                os._exit(self.exit_code)
        threading.Thread(target=watch, daemon=True, name="hybrid_fc-preempt-deadline").start()
        try:
            yield
        finally:
            done.set()


def _input_error(exc: BaseException) -> bool:
    """An error about the run's input or its environment (a config field, a file, a shard,
    memory that will not suffice, a diverged loss, a full disk, a lost peer), whose message says
    what to change: shown without a traceback."""
    mine = type(exc).__module__.startswith("hybrid_fc")
    return mine or isinstance(exc, (ValueError, OSError, MemoryError, FloatingPointError))


def run_script(main, argv=None, status: bool = False) -> int:
    """A launch script's entry: main(argv), then the process group's clean end; returns the
    exit status (with `status`, the int main returned; else 0). Logs stay readable on N ranks:
    a rank that stops because another failed (RankFailed) prints one line naming that rank; an
    input error (a bad config field, file, shard...) prints its message as one line per rank
    that raised it; a preempted run its one line and 128 + the signal; anything else is a bug
    and keeps its traceback. `--verbose` (or HYBRID_FC_TRACEBACK=1) shows every traceback."""
    from .collectives import RankFailed
    verbose = "--verbose" in sys.argv[1:] or os.environ.get("HYBRID_FC_TRACEBACK") == "1"
    rank = os.environ.get("RANK")
    where = f" (rank {rank})" if rank is not None else ""
    try:
        returned = main(argv)
    except Preempted as exc:  # saved: one line, then the same clean end as a finished run
        print_err(f"hybrid_fc{where}: {exc}")
        finish_distributed()
        return exc.code
    except KeyboardInterrupt:  # Ctrl-C outside the training loop (start-up, evaluation)
        if verbose:
            raise
        print_err(f"hybrid_fc{where}: interrupted (SIGINT) before a step could be saved; run "
                  "the same command to start again")
        return 130
    except RankFailed as exc:
        if verbose:
            raise
        print_err(f"hybrid_fc{where}: stopping: {exc}")
        return 1
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is an input error
        if verbose or not _input_error(exc):
            raise
        print_err(f"hybrid_fc{where}: error: {type(exc).__name__}: {exc} (--verbose or "
                  "HYBRID_FC_TRACEBACK=1 shows the traceback)")
        return 1
    finish_distributed()
    return int(returned) if status else 0


def rank_memory_bytes(device: torch.device) -> Tuple[int, float]:
    """(bytes one rank may use, reserve to keep back) for the memory plan: a GPU's total memory
    with 3 GB kept for the CUDA context, NCCL and allocator slack; on a CPU the memory the
    system reports available now, shared by this node's ranks (LOCAL_WORLD_SIZE under torchrun,
    LOCAL_SIZE under deepspeed), with 1 GB
    per rank kept for the interpreter and DeepSpeed."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory, 3e9
    available = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except OSError:
        pass
    if available is None:
        available = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    local = os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or "1"
    return available // max(1, int(local)), 1e9  # torchrun / deepspeed's launcher


def quiet_logs(rank: int, verbose: bool = False) -> None:
    """Rank 0 logs at INFO, the other ranks at WARNING (verbose: all at INFO); third-party INFO
    chatter (DeepSpeed's per-step and config dumps, botocore/s3fs per request) is lowered to
    WARNING unless `verbose`."""
    logging.basicConfig(level=logging.INFO if rank == 0 or verbose else logging.WARNING,
                        format="%(asctime)s %(name)s: %(message)s")
    if verbose:
        return
    for name in ("DeepSpeed", "deepspeed", "botocore", "aiobotocore", "s3fs", "fsspec",
                 "urllib3", "torch.distributed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        from deepspeed.utils import logger as ds_logger
        ds_logger.setLevel(logging.WARNING)
        ds_logger.addFilter(_untested_optimizer_filter)
    except ImportError:  # pragma: no cover - deepspeed is a dependency
        pass


def _untested_optimizer_filter(record: logging.LogRecord) -> bool:
    """DeepSpeed warns "You are using ZeRO with an untested optimizer" for torch's SGD, the
    shipped presets' backbone optimizer: every run, nothing to do (SGD under ZeRO 1-3 is
    tested against a dense reference in tests/test_engine.py). Dropped unless --verbose."""
    return "untested optimizer" not in record.getMessage()
