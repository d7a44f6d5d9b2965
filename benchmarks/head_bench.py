"""Head benchmark: PartialFC vs an arcface_torch-style head vs the bare matmuls, on W ranks.

    python benchmarks/head_bench.py --classes 4194304 --dim 256 --batch 128 \
        --sample-rate 0.1 --world-size 2

Runs W ranks (gloo on CPU, NCCL when CUDA is available) twice, in fresh processes so that each
peak-memory figure is its own: (1) PartialFC (sparse gradient + SparseSGD), (2) a baseline written
here in arcface_torch's style (dense Parameter, unique + top-k sampling, autograd gather giving a
dense (num_local, D) gradient, torch.optim.SGD with momentum over the whole shard). Each phase
runs its warm-up steps, reads its peak memory, then alternates timed head steps with the three
bare matmuls of the same sampled shape (logits, input grad, weight grad), so that both see the
same machine load: the ratio head / matmuls is taken step by step. Timings are medians of
forward + backward + optimizer step; the last printed line is one JSON object.

On CUDA (NCCL): `--backend torch|triton|auto` picks the head's kernels, `--input-dtype bfloat16`
feeds bf16 embeddings, the matmuls are also timed in bf16 (tensor cores: `head_over_gemm_bf16`)
and the JSON carries torch.cuda.max_memory_allocated / max_memory_reserved per rank (slowest /
largest rank). One GPU, the Triton kernels against the torch path:

    python benchmarks/head_bench.py --classes 1000000 --dim 512 --batch 256 --world-size 1 \
        --input-dtype bfloat16 --backend triton --skip-baseline
"""
import argparse
import datetime
import json
import os
import resource
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hybrid_fc import ArcFace, PartialFC  # noqa: E402
from hybrid_fc.head.optim import SparseSGD  # noqa: E402
from hybrid_fc.head.partition import ClassRange  # noqa: E402
from hybrid_fc.head.precision import (ROUNDINGS, STATE_DTYPES, WEIGHT_DTYPES,  # noqa: E402
                                      dtype_names)
from hybrid_fc.training.plan import PlanInput, plan  # noqa: E402
from hybrid_fc.head.sampler import num_sample_for  # noqa: E402


def _peak_gb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # ru_maxrss is KiB


def _now_gb(device):
    """Memory held right now: CUDA allocations, or this process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 1e9
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 1e9


def _warm_up(device, dim):
    """One-time costs that are not the head's, paid before the baseline is read: the BLAS
    library's workspace (first matmul) and torch.optim's first step, which imports
    torch._dynamo (~150 MB of modules on CPU)."""
    torch.mm(torch.randn(64, dim, device=device), torch.randn(dim, 4096, device=device))
    p = torch.nn.Parameter(torch.zeros(4, 4, device=device))
    p.grad = torch.ones_like(p)
    SparseSGD([p], lr=0.1).step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device):
    dist.barrier()
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _gemms(n, num_sample, dim, device, dtype):
    """The three matmuls of a head step at the sampled shape, in `dtype`."""
    e = torch.randn(n, dim, device=device, dtype=dtype)
    w = torch.randn(num_sample, dim, device=device, dtype=dtype)
    g = torch.randn(n, num_sample, device=device, dtype=dtype)

    def gemm():
        torch.matmul(e, w.t())   # logits          (N, S)
        torch.matmul(g, w)       # input grad      (N, D)
        torch.matmul(g.t(), e)   # weight grad     (S, D)
    gemm()
    return gemm


def _measure(step, args, device, n, num_sample):
    """Warm up, read the peak memory, then alternate timed steps with the bare matmuls (on
    CUDA also with bf16 ones: the tensor-core limit)."""
    for i in range(args.warmup):
        _timed(lambda: step(i), device)
    peak = _peak_gb(device)
    cuda = {}
    if device.type == "cuda":  # read before the matmuls' own buffers exist
        cuda = dict(cuda_max_allocated_gb=torch.cuda.max_memory_allocated(device) / 1e9,
                    cuda_max_reserved_gb=torch.cuda.max_memory_reserved(device) / 1e9)
    gemm = _gemms(n, num_sample, args.dim, device, torch.float32)
    gemm_bf16 = _gemms(n, num_sample, args.dim, device, torch.bfloat16) \
        if device.type == "cuda" else None
    head_t, gemm_t, bf16_t = [], [], []
    for i in range(args.warmup, args.warmup + args.steps):
        head_t.append(_timed(lambda: step(i), device))
        gemm_t.append(_timed(gemm, device))
        if gemm_bf16 is not None:
            bf16_t.append(_timed(gemm_bf16, device))
    out = dict(ms=statistics.median(head_t) * 1e3, gemm_ms=statistics.median(gemm_t) * 1e3,
               ratio=statistics.median(h / m for h, m in zip(head_t, gemm_t)), peak_gb=peak,
               **cuda)
    if bf16_t:
        out["gemm_bf16_ms"] = statistics.median(bf16_t) * 1e3
        out["ratio_bf16"] = statistics.median(h / m for h, m in zip(head_t, bf16_t))
    return out


def _batch(args, rank, step, device):
    g = torch.Generator().manual_seed(1000 * step + rank)
    x = torch.randn(args.batch, args.dim, generator=g).to(device, getattr(torch, args.input_dtype))
    x.requires_grad_(True)
    y = torch.randint(0, args.classes, (args.batch,), generator=g).to(device)
    return x, y


# -- arcface_torch-style baseline (written for this benchmark) -----------------------------------
class _GatherBaseline(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        r = dist.get_rank()
        return grad[r * n:(r + 1) * n]


def _baseline_loss(weight, x, y, cr, num_sample, scale=64.0, m=0.5):
    emb = _GatherBaseline.apply(x)
    labels = torch.cat([torch.empty_like(y) for _ in range(dist.get_world_size())])
    parts = list(labels.chunk(dist.get_world_size()))
    dist.all_gather(parts, y)
    labels = torch.cat(parts)
    local = labels - cr.start
    own = (local >= 0) & (local < cr.num_local)
    with torch.no_grad():  # unique + top-k sampling, as arcface_torch does it
        positive = torch.unique(local[own], sorted=True)
        perm = torch.rand(cr.num_local, device=x.device)
        perm[positive] = 2.0
        index = torch.topk(perm, k=max(num_sample, positive.numel()))[1].sort()[0]
        local = torch.where(own, torch.searchsorted(index, local.clamp(0, cr.num_local - 1)), -1)
    w = weight[index]                                      # autograd gather: dense grad later
    logits = F.linear(F.normalize(emb), F.normalize(w)).clamp(-1, 1)
    rows = torch.nonzero(local >= 0).squeeze(1)
    with torch.no_grad():  # margin under no_grad, as arcface_torch
        t = logits[rows, local[rows]]
        logits[rows, local[rows]] = torch.cos(torch.acos(t) + m)
    logits = logits * scale
    mx = logits.detach().max(dim=1, keepdim=True)[0]
    dist.all_reduce(mx, dist.ReduceOp.MAX)
    e = torch.exp(logits - mx)
    s = e.sum(dim=1, keepdim=True)
    dist.all_reduce(s)
    p = e / s
    tp = torch.zeros(p.shape[0], device=x.device)
    tp[rows] = p[rows, local[rows]]
    total = tp.detach().clone()
    dist.all_reduce(total)  # every row's target probability, from the rank that owns it
    return -torch.log((tp + (total - tp).detach()).clamp_min(1e-30)).mean()


# -- per-rank phases -----------------------------------------------------------------------------
def _run_phase(rank, world, port, phase, args, queue):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world) if args.threads == 0 else args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    device = torch.device("cuda", rank % torch.cuda.device_count()) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{port}",
                            rank=rank, world_size=world, timeout=datetime.timedelta(minutes=30))
    cr = ClassRange(args.classes, world, rank)
    num_sample = num_sample_for(args.sample_rate, cr.num_local)
    n = args.batch * world
    _warm_up(device, args.dim)
    before = _now_gb(device)  # the interpreter, torch and the process group: not the head's
    if phase == "head":
        head = PartialFC(ArcFace(64.0, 0.5), args.dim, args.classes, args.sample_rate,
                         sparse_grad=True, chunk_size=args.chunk_size, device=device,
                         weight_dtype=getattr(torch, args.weight_dtype), backend=args.backend)
        opt = SparseSGD(head.parameters(), lr=0.1, momentum=args.momentum, weight_decay=5e-4,
                        state_dtype=getattr(torch, args.state_dtype), rounding=args.rounding)

        def step(i):
            x, y = _batch(args, rank, i, device)
            opt.zero_grad(set_to_none=True)
            head(x, y).backward()
            opt.step()
    else:
        weight = torch.nn.Parameter(torch.normal(0, 0.01, (cr.num_local, args.dim), device=device))
        opt = torch.optim.SGD([weight], lr=0.1, momentum=0.9, weight_decay=5e-4)

        def step(i):
            x, y = _batch(args, rank, i, device)
            opt.zero_grad(set_to_none=False)  # arcface_torch keeps the dense grad buffer
            _baseline_loss(weight, x, y, cr, num_sample).backward()
            opt.step()
    out = _measure(step, args, device, n, num_sample)
    out["num_local"], out["num_sample"], out["before_gb"] = cr.num_local, num_sample, before
    queue.put((rank, out))
    dist.destroy_process_group()


def _phase(phase, args):
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [ctx.Process(target=_run_phase, args=(r, args.world_size, port, phase, args, queue))
             for r in range(args.world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs):
        raise SystemExit(f"phase {phase} failed: exit codes {[p.exitcode for p in procs]}")
    res = dict(queue.get() for _ in procs)
    ranked = [res[r] for r in range(args.world_size)]
    print(f"[{phase}] " + ", ".join(
        f"rank {r}: {o['ms']:.1f} ms vs matmuls {o['gemm_ms']:.1f} ms (x{o['ratio']:.2f}), "
        f"peak {o['peak_gb']:.2f} GB" for r, o in enumerate(ranked)), flush=True)
    return ranked


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", default=None,
                    help="also write the result (one JSON object) to this file")
    ap.add_argument("--classes", type=int, default=400_000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--batch", type=int, default=128, help="per rank")
    ap.add_argument("--sample-rate", type=float, default=0.1)
    ap.add_argument("--world-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5, help="timed steps (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=None,
                    help="PartialFC chunk_size (recompute path); default keeps probabilities")
    ap.add_argument("--weight-dtype", default="float32", choices=dtype_names(WEIGHT_DTYPES),
                    help="storage of the class centers (PartialFC weight_dtype)")
    ap.add_argument("--state-dtype", "--momentum-dtype", dest="state_dtype", default="float32",
                    choices=dtype_names(STATE_DTYPES),
                    help="SparseSGD momentum storage (--momentum-dtype: the old name)")
    ap.add_argument("--rounding", default="stochastic", choices=ROUNDINGS,
                    help="write-back of bf16 / int8 centers (feedback: to nearest, the "
                         "residual kept as one more state in --state-dtype)")
    ap.add_argument("--momentum", type=float, default=0.9,
                    help="SparseSGD momentum (0: no momentum state)")
    ap.add_argument("--backend", default="auto", choices=["auto", "torch", "triton"],
                    help="PartialFC backend (auto: torch until the kernels pass on a GPU)")
    ap.add_argument("--input-dtype", default="float32",
                    choices=["float32", "bfloat16", "float16"],
                    help="dtype of the embeddings fed to the head (the backbone's output)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per rank (0: cores / W)")
    ap.add_argument("--skip-baseline", action="store_true")
    ap.add_argument("--cpu", action="store_true", help="stay on CPU/gloo even if CUDA is present")
    ap.add_argument("--exact-rss", action="store_true",
                    help="CPU: allocations over 64 KiB are mmapped and returned when freed "
                         "(MALLOC_MMAP_THRESHOLD_), so peak RSS tracks live memory instead of "
                         "glibc's retained heap; slows the steps (page faults): memory runs only")
    args = ap.parse_args(argv)
    if args.exact_rss:
        os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"  # read by glibc in the spawned ranks

    head = _phase("head", args)
    base = None if args.skip_baseline else _phase("baseline", args)
    elems = head[0]["num_local"] * args.dim
    result = {
        "classes": args.classes, "dim": args.dim, "batch": args.batch,
        "sample_rate": args.sample_rate, "world_size": args.world_size,
        "chunk_size": args.chunk_size, "weight_dtype": args.weight_dtype,
        "state_dtype": args.state_dtype, "rounding": args.rounding,
        "momentum": args.momentum, "backend": args.backend, "input_dtype": args.input_dtype,
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() and not args.cpu
        else f"cpu x{os.cpu_count()}",
        "head_ms": round(max(o["ms"] for o in head), 2),
        "gemm_limit_ms": round(max(o["gemm_ms"] for o in head), 2),
        # median over steps of (head step / matmuls right after it), slowest rank
        "head_over_gemm": round(max(o["ratio"] for o in head), 3),
        "peak_rss_gb": round(max(o["peak_gb"] for o in head), 3),
        "bytes_per_element": round(max(o["peak_gb"] for o in head) * 1e9 / elems, 2),
        # what the head itself adds: peak minus the process just before the head was built
        "net_bytes_per_element": round(max((o["peak_gb"] - o["before_gb"]) for o in head)
                                       * 1e9 / elems, 3),
        "net_head_bytes": int(max((o["peak_gb"] - o["before_gb"]) for o in head) * 1e9),
        # hybrid_fc.training.plan's figure for the same head (rank 0): what launch/plan.py would say
        "planned_head_bytes": int(plan(PlanInput(
            classes=args.classes, dim=args.dim, gpus=args.world_size, gpu_memory=1 << 50,
            sample_rate=args.sample_rate, micro_batch=args.batch, precision="fp32",
            weight_dtype=args.weight_dtype, state_dtype=args.state_dtype,
            head_optimizer="sparse_sgd", momentum=args.momentum > 0, rounding=args.rounding,
            sparse_grad=True, chunk_size=args.chunk_size,
            reserve=0, device="cuda" if torch.cuda.is_available() and not args.cpu else "cpu"))
            .head_bytes),
    }
    if "cuda_max_allocated_gb" in head[0]:  # CUDA: the allocator's own counters, largest rank
        for key in ("cuda_max_allocated_gb", "cuda_max_reserved_gb"):
            result[key] = round(max(o[key] for o in head), 3)
        result["cuda_bytes_per_element"] = round(result["cuda_max_allocated_gb"] * 1e9 / elems, 2)
        result["gemm_bf16_limit_ms"] = round(max(o["gemm_bf16_ms"] for o in head), 2)
        result["head_over_gemm_bf16"] = round(max(o["ratio_bf16"] for o in head), 3)
    if base:
        result["baseline_ms"] = round(max(o["ms"] for o in base), 2)
        result["baseline_gemm_limit_ms"] = round(max(o["gemm_ms"] for o in base), 2)
        result["baseline_over_gemm"] = round(max(o["ratio"] for o in base), 3)
        result["baseline_peak_rss_gb"] = round(max(o["peak_gb"] for o in base), 3)
        result["baseline_bytes_per_element"] = round(result["baseline_peak_rss_gb"] * 1e9 / elems, 2)
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
