"""The one multi-process harness of the tests (a helper module: no tests here).

`run_ranks(world_size, fn, *args)` runs fn(rank, world_size, *args) on `world_size` real ranks
(processes, each with the environment variables the `deepspeed` launcher sets), joined in one
process group, and returns each rank's result in rank order:
  - plain (default): torch.distributed.init_process_group(gloo) - the head and data tests;
  - deepspeed=True (`run_deepspeed_ranks`): deepspeed.init_distributed, DeepSpeed's own
    /dev/shm buffers released - the engine, checkpoint and trainer tests;
  - backend="nccl" (GPU tests): one GPU per rank, spawned processes.
`free_port()` gives a free TCP port on 127.0.0.1 (for MASTER_PORT and launcher flags).
"""
import datetime
import functools
import os
import pickle
import socket
import sys
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

__all__ = ["free_port", "run_ranks", "run_deepspeed_ranks", "prebuild_deepspeed_ops"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank, world_size, port, fn, args, queue, backend, use_deepspeed):
    os.environ.update({"OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(port), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_WORLD_SIZE": str(world_size)})
    torch.set_num_threads(1)
    try:
        if backend == "nccl":
            torch.cuda.set_device(rank)
        if use_deepspeed:
            import deepspeed
            deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                       timeout=datetime.timedelta(seconds=90))
            from hybrid_fc.runtime import release_shm_buffers
            release_shm_buffers()  # no /dev/shm leftovers from the tests
        else:
            extra = {"device_id": torch.device("cuda", rank)} if backend == "nccl" else {}
            dist.init_process_group(backend, init_method="env://", rank=rank,
                                    world_size=world_size,
                                    timeout=datetime.timedelta(seconds=60), **extra)
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data (torch's queue reducer would share memory with a
        # process that is about to exit).
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # every failure goes to the parent, with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(world_size, fn, *args, timeout=240, deepspeed=False, backend="gloo", env=None,
              spawn=False, allow_dead=False):
    """fn(rank, world_size, *args) on `world_size` ranks; results in rank order.

    fn must be a module-level function; its result is pickled back to this process.
    env: environment variables set (None: removed) before the ranks start, so also for state
    fixed at import time in a spawned rank (TRITON_INTERPRET). spawn: fresh interpreters instead
    of forks (~2 s more; always for NCCL). allow_dead: return ([result or None per rank],
    processes) instead of raising when ranks fail or die (the kill tests).
    """
    ctx = mp.get_context("spawn" if spawn or backend == "nccl" else "fork")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main,
                         args=(r, world_size, port, fn, args, queue, backend, deepspeed))
             for r in range(world_size)]
    saved = {k: os.environ.get(k) for k in env or {}}
    for k, v in (env or {}).items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results, errors = {}, {}
    deadline = time.monotonic() + timeout
    while len(results) + len(errors) < world_size and time.monotonic() < deadline:
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.02)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors[rank] = payload
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join()
    if allow_dead:
        return [results.get(r) for r in range(world_size)], procs
    if errors:
        raise AssertionError("\n".join(f"rank {r}:\n{e}" for r, e in sorted(errors.items())))
    if len(results) != world_size:
        raise AssertionError(f"only ranks {sorted(results)} of {world_size} finished within "
                             f"{timeout} s (exit codes {[p.exitcode for p in procs]})")
    return [results[r] for r in range(world_size)]


@functools.lru_cache(maxsize=None)
def prebuild_deepspeed_ops() -> None:
    """Build (or load) DeepSpeed's CPU shared-memory op in this process, once. Forked ranks
    inherit the loaded op and never take torch's build lock (conftest.py says why that
    matters); launcher subprocesses find it built in TORCH_EXTENSIONS_DIR."""
    from deepspeed.accelerator import get_accelerator
    import deepspeed.ops
    from hybrid_fc.runtime import clear_stale_build_locks
    builder = get_accelerator().create_op_builder("ShareMemCommBuilder")
    if builder is None or not deepspeed.ops.__compatible_ops__.get(builder.NAME, False):
        return  # not a CPU accelerator, or the op cannot build here: DeepSpeed skips it too
    # no build of this op takes 10 minutes; an older lock was left by a killed run
    clear_stale_build_locks(600, print_fn=lambda s: print(s, file=sys.stderr))
    builder.load()


def run_deepspeed_ranks(world_size, fn, *args, **kwargs):
    """run_ranks with DeepSpeed's distributed start (deepspeed=True); its JIT op is built in
    this process first."""
    prebuild_deepspeed_ops()
    return run_ranks(world_size, fn, *args, deepspeed=True, **kwargs)
