"""Run a function on W real gloo ranks (forked processes) and collect each rank's result."""
import datetime
import os
import pickle
import socket
import time
import traceback

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world_size, port, fn, args, queue):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world_size, timeout=datetime.timedelta(seconds=60))
        result = fn(rank, world_size, *args)
        # Plain pickle copies tensor data (torch's queue reducer would share memory with a
        # process that is about to exit).
        queue.put((rank, True, pickle.dumps(result)))
    except BaseException:  # report every failure to the parent, with its traceback
        queue.put((rank, False, traceback.format_exc()))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_world(world_size, fn, *args, timeout=180, fresh_env=None):
    """fn(rank, world_size, *args) on `world_size` gloo ranks; returns results in rank order.

    fn must be a module-level function; its result is pickled back through a queue.
    fresh_env: start the ranks as fresh interpreters (spawn, ~2 s more) with these extra
    environment variables, for state that is fixed at import time (TRITON_INTERPRET: an earlier
    test may have imported triton in compiled mode, which a forked rank would inherit).
    """
    ctx = mp.get_context("fork" if fresh_env is None else "spawn")
    queue = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    saved = {k: os.environ.get(k) for k in fresh_env or {}}
    os.environ.update(fresh_env or {})
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    results, errors = {}, []
    deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout)
    while len(results) + len(errors) < world_size:
        if datetime.datetime.now() > deadline:
            break
        if queue.empty():
            if not any(p.is_alive() for p in procs) and queue.empty():
                break
            time.sleep(0.02)
            continue
        rank, ok, payload = queue.get()
        if ok:
            results[rank] = pickle.loads(payload)
        else:
            errors.append(f"rank {rank}:\n{payload}")
    for p in procs:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
    if errors:
        raise AssertionError("\n".join(errors))
    if len(results) != world_size:
        raise AssertionError(f"only ranks {sorted(results)} of {world_size} finished within {timeout}s")
    return [results[r] for r in range(world_size)]
