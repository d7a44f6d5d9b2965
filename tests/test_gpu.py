"""GPU suite (`pytest -m gpu`): the head and HybridEngine on CUDA with NCCL, both backends.

Skipped without CUDA. Ranks are spawned (never forked: a CUDA context does not survive a fork)
with one GPU each; world size 1 always (NCCL refuses two ranks on one device), and 2 where two
GPUs are present. TRITON_INTERPRET is removed in the ranks: the kernels are compiled for the GPU.
Never run on the machine this was written on (no GPU); the CPU suite checks the same code paths
under Triton's interpreter (tests/test_triton.py).
"""
import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, D, SEED = 1000, 100, 7  # D = 100: not a multiple of the 64-wide D tiles (masked tail)
WORLDS = [1] + ([2] if torch.cuda.is_available() and torch.cuda.device_count() >= 2 else [])


def _spawn(world, fn, *args, timeout=600):
    """fn(rank, world, *args) on `world` spawned NCCL ranks (GPU `rank` each), the kernels
    compiled for the GPU (TRITON_INTERPRET removed); results in rank order."""
    from harness import run_ranks
    return run_ranks(world, fn, *args, timeout=timeout, backend="nccl",
                     env={"TRITON_INTERPRET": None})


def _split(n, world, rank):
    from hybrid_fc.common import split_span
    return slice(*split_span(n, rank, world))


def _head_worker(rank, world, configs):
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.head import init_class_centers
    from reference import dense_margin_ce
    device = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(3)
    n = 131  # uneven over two ranks; 3 row tiles of 64 on one rank (the last ragged)
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    labels = torch.randint(0, C, (n,), generator=g)
    margin = ArcFace(64.0, 0.5)
    e = emb.clone().requires_grad_(True)
    w = init_class_centers(0, C, D, SEED).double().requires_grad_(True)
    ref = dense_margin_ce(e, w, labels, margin)
    ref.backward()
    mine = _split(n, world, rank)
    out = []
    for backend, dtype, weight_dtype in configs:
        head = PartialFC(margin, D, C, 1.0, seed=SEED, backend=backend, device=device,
                         weight_dtype=weight_dtype)
        x = emb[mine].to(device, dtype).requires_grad_(True)
        loss = head(x, labels[mine].to(device))
        loss.backward()
        lo, hi = head.class_start, head.class_start + head.num_local
        ref_e, ref_w = world * e.grad[mine], w.grad[lo:hi]
        out.append(dict(
            cfg=(backend, str(dtype), str(weight_dtype)), loss=loss.item(), ref=ref.item(),
            e_err=((x.grad.double().cpu() - ref_e).norm() / ref_e.norm()).item(),
            w_err=((head.weight.grad.double().cpu() - ref_w).norm() / ref_w.norm()).item(),
            e_dtype=str(x.grad.dtype)))
    return out


HEAD_CONFIGS = [(b, dt, wdt) for b in ("torch", "triton")
                for dt, wdt in ((torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                (torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16))]


@pytest.mark.parametrize("world", WORLDS)
def test_head_on_cuda_matches_dense_reference(world):
    for per_rank in zip(*_spawn(world, _head_worker, HEAD_CONFIGS)):
        assert len({r["loss"] for r in per_rank}) == 1, per_rank
        for r in per_rank:
            backend, dtype, _ = r["cfg"]
            assert r["e_dtype"] == dtype, r
            # fp32: IEEE fp32 matmuls (never TF32) against float64, |logit| <= 64: ~1e-5.
            # bf16: 8 mantissa bits, ~4e-3 per cosine x s=64; fp16: 11 bits (as test_head).
            tol = {"torch.float32": (2e-5, 1e-4), "torch.float16": (0.01, 0.02)}.get(
                dtype, (0.03, 0.05))
            assert abs(r["loss"] - r["ref"]) <= tol[0] * max(1.0, r["ref"]), r
            assert r["e_err"] <= tol[1] and r["w_err"] <= tol[1], r


def _sampled_worker(rank, world):
    """sample_rate < 1, sparse gradient: triton and torch see the same sample (same seeded
    stream) and agree."""
    from hybrid_fc import CosFace, PartialFC
    device = torch.device("cuda", rank)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(40, D, generator=g).to(device)
    y = torch.randint(0, C, (40,), generator=g).to(device)
    res = {}
    for backend in ("torch", "triton"):
        head = PartialFC(CosFace(64.0, 0.4), D, C, 0.2, seed=SEED, backend=backend,
                         sparse_grad=True, device=device)
        xr = x.clone().requires_grad_(True)
        loss = head(xr, y)
        loss.backward()
        grad = head.weight.grad.coalesce()
        res[backend] = (loss.item(), xr.grad.cpu(), grad.indices().cpu(), grad.values().cpu())
    (l_t, e_t, i_t, v_t), (l_k, e_k, i_k, v_k) = res["torch"], res["triton"]
    return dict(loss=(l_t, l_k), same_rows=bool(torch.equal(i_t, i_k)),
                e_err=((e_t - e_k).norm() / e_t.norm()).item(),
                w_err=((v_t - v_k).norm() / v_t.norm()).item())


@pytest.mark.parametrize("world", WORLDS)
def test_sampled_triton_matches_torch_on_cuda(world):
    for r in _spawn(world, _sampled_worker):
        assert r["same_rows"], r
        assert abs(r["loss"][0] - r["loss"][1]) <= 1e-5 * max(1.0, r["loss"][0]), r
        assert r["e_err"] <= 1e-5 and r["w_err"] <= 1e-5, r


def test_auto_selects_triton_on_cuda_once_enabled():
    """auto is torch until the kernels are verified on a GPU (TRITON_ON_CUDA_BY_DEFAULT);
    enabled, it picks triton on CUDA."""
    from hybrid_fc.head import kernels
    assert kernels.triton_available(), "the GPU suite expects triton (pip install '.[test]')"
    expected = "triton" if kernels.TRITON_ON_CUDA_BY_DEFAULT else "torch"
    assert kernels.select_backend("auto", torch.device("cuda")) == expected


def _engine_worker(rank, world, precision, backend, steps):
    """HybridEngine on CUDA (DeepSpeed, NCCL): TinyNet backbone + PartialFC; fp16 with real
    dynamic loss scaling (the GPU supports fp16: nothing patched)."""
    import deepspeed
    from hybrid_fc import ArcFace, PartialFC
    from hybrid_fc.training.engine import HybridEngine
    from tinynet import batch, ds_config, EMB, TinyNet
    deepspeed.init_distributed(dist_backend="nccl", auto_mpi_discovery=False)
    device = torch.device("cuda", rank)
    net = TinyNet()
    engine, *_ = deepspeed.initialize(model=net, model_parameters=net.parameters(),
                                      config=ds_config(2, precision, micro=4, world_size=world))
    head = PartialFC(ArcFace(16.0, 0.3), EMB, 10, device=device, backend=backend)
    hybrid = HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.2, momentum=0.9,
                                                        weight_decay=5e-4))
    losses, scales = [], []
    for step in range(steps):
        x, y = batch(step, rank, 4, 10)
        losses.append(hybrid.forward_backward(x.to(device), y.to(device)).item())
        hybrid.step()
        scales.append(hybrid.loss_scale)
    from tinynet import full_params
    return dict(losses=losses, scales=scales, skipped=engine.skipped_steps,
                params={k: v.cpu() for k, v in full_params(engine).items()},
                shard=head.weight.detach().cpu())


@pytest.mark.parametrize("precision,backend", [(p, b) for p in ("bf16", "fp16")
                                               for b in ("torch", "triton")])
def test_engine_on_cuda_matches_dense_reference(precision, backend):
    from hybrid_fc.head import init_class_centers
    from reference import dense_reference
    steps = 4
    r, = _spawn(1, _engine_worker, precision, backend, steps)
    ref_losses, ref_params, ref_centers = dense_reference(
        steps, 1, 4, 10, init_class_centers(0, 10, r["shard"].shape[1], 0), 0.2, 16.0, 0.3)
    # As tests/test_engine.py: bf16 5e-2, fp16 1e-2 relative L2 after 4 steps.
    tol = 5e-2 if precision == "bf16" else 1e-2
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()  # noqa: E731
    assert rel(r["shard"], ref_centers) < tol
    for name, ref in ref_params.items():
        assert rel(r["params"][name], ref) < tol, name
    assert max(abs(a - b) / b for a, b in zip(r["losses"], ref_losses)) < tol, r["losses"]
    if precision == "fp16":  # the real dynamic loss scale (initial 2^8), no overflow here
        assert r["skipped"] == 0 and all(s >= 2 ** 8 for s in r["scales"]), r["scales"]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_head_bench_on_cuda_reports_memory_counters(backend, tmp_path):
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "head_bench.py"), "--classes",
         "200000", "--dim", "128", "--batch", "64", "--world-size", "1", "--steps", "2",
         "--warmup", "1", "--backend", backend, "--input-dtype", "bfloat16",
         "--skip-baseline", "--json", str(tmp_path / "r.json")], capture_output=True,
        text=True, timeout=600,
        env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert out.returncode == 0, out.stderr[-4000:]
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["backend"] == backend
    for key in ("cuda_max_allocated_gb", "cuda_max_reserved_gb", "cuda_bytes_per_element",
                "gemm_bf16_limit_ms", "head_over_gemm_bf16"):
        assert result[key] > 0, (key, result)
