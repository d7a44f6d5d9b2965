"""The Triton backend of PartialFC, run by Triton's CPU interpreter (TRITON_INTERPRET=1), against
the torch backend and the dense float64 reference on 1-3 gloo ranks.

TRITON_INTERPRET is read when a kernel is decorated, i.e. when hybrid_fc.head.kernels.triton_ce (or
triton.language's own helpers, when triton itself) is imported. The ranks are fresh interpreters
started with it set (run_interpreted below): the pytest process itself never sets it, so other tests
neither see it nor depend on whether triton was imported before (torch._dynamo imports it in
compiled mode, and a forked rank would inherit that). Shapes are tiny (the interpreter runs Python per
program instance) and the tiles are 16 wide so that they still split into several blocks.
"""
import importlib
import math
import os
import sys

import pytest
import torch

from hybrid_fc import ArcFace, CombinedMarginLoss, CosFace, PartialFC
from hybrid_fc.head import kernels
from hybrid_fc.collectives import all_gather_varlen
from hybrid_fc.head import init_class_centers
from harness import run_ranks


def run_interpreted(*args, **kw):
    """Fresh interpreters with TRITON_INTERPRET=1 set before triton is imported."""
    return run_ranks(*args, spawn=True, env={"TRITON_INTERPRET": "1"}, **kw)
from reference import dense_margin_ce

# 37 classes: uneven over 2 and 3 ranks, and 3 column blocks of 16 (the last ragged) on one.
# D = 20: not a multiple of the 16-wide D tiles (masked tail).
C, D, SEED = 37, 20, 7
BATCHES = {1: [21], 2: [11, 6], 3: [7, 0, 9]}  # a rank may have no samples; 21 rows = 2 row blocks
# programs=2: one program per row block walks every column block (online log-sum-exp inside the
# kernel); programs=64: one column block per program (partials merged in torch).
TILES = {"n": 16, "s": 16, "d": 16, "programs": 2, "num_warps": 4}

MARGINS = {
    "arc": lambda: ArcFace(64.0, 0.5),
    "arc_st": lambda: ArcFace(64.0, 0.5, straight_through=True),
    "cos": lambda: CosFace(64.0, 0.4),
    "combined": lambda: CombinedMarginLoss(32.0, 1.0, 0.3, 0.2),
    "sphere": lambda: CombinedMarginLoss(32.0, 1.3, 0.2, 0.1),  # m1 != 1: the arccos form
}


CALLS = {"forward_stats": 0, "backward": 0}  # per forked rank: the kernels really ran


def _interpreted(**tiles):
    """In a forked rank: TRITON_INTERPRET=1, and the kernel module decorated under it (its entry
    points counted in CALLS, so that a silent fallback to torch would fail the tests)."""
    os.environ["TRITON_INTERPRET"] = "1"
    mod = sys.modules.get("hybrid_fc.head.kernels.triton_ce")
    if mod is not None and not mod.INTERPRETED:
        importlib.reload(mod)
    from hybrid_fc.head.kernels import triton_ce
    assert triton_ce.INTERPRETED
    triton_ce.BLOCKS.update(TILES, **tiles)
    for name in CALLS:
        def counted(*args, _f=getattr(triton_ce, name), _name=name):
            CALLS[_name] += 1
            return _f(*args)
        setattr(triton_ce, name, counted)
    return triton_ce


def _labels_and_embeddings(n, seed):
    """Labels that put positives at column-block edges (local rows 15 and 16 of the first two
    shards' layouts, and the last class), and 3 rows that point away from their own center, so
    that ArcFace takes its theta + m > pi branch."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, C, (n,), generator=g)
    edges = torch.tensor([15, 16, 34, 35, 36, 0, 18, 19])
    labels[:min(n, len(edges))] = edges[:n]
    emb = torch.randn(n, D, generator=g, dtype=torch.float64)
    centers = init_class_centers(0, C, D, SEED).double()
    away = torch.arange(n - 3, n)
    emb[away] = -centers[labels[away]] / centers[labels[away]].norm(dim=1, keepdim=True) * 3.0 \
        + 0.01 * emb[away]
    perm = torch.randperm(n, generator=g)
    return emb[perm], labels[perm]


def _local(x, sizes, rank):
    off = sum(sizes[:rank])
    return x[off:off + sizes[rank]]


def _run_head(backend, margin, x, y, sample_rate=1.0, **kw):
    head = PartialFC(margin, D, C, sample_rate, seed=SEED, backend=backend, **kw)
    xr = x.clone().requires_grad_(True)
    loss = head(xr, y)
    loss.backward()
    grad = head.weight.grad
    return head, loss.item(), xr.grad, grad.to_dense() if grad.is_sparse else grad


def _exact_worker(rank, world, configs):
    triton_ce = _interpreted()
    sizes = BATCHES[world]
    emb, labels = _labels_and_embeddings(sum(sizes), seed=3)
    out = []
    for name, sparse, programs in configs:
        triton_ce.BLOCKS["programs"] = programs
        margin = MARGINS[name]()
        e = emb.clone().requires_grad_(True)
        w = init_class_centers(0, C, D, SEED).double().requires_grad_(True)
        ref = dense_margin_ce(e, w, labels, margin)
        ref.backward()
        x, y = _local(emb, sizes, rank).float(), _local(labels, sizes, rank)
        res = {}
        for backend in ("torch", "triton"):
            head, loss, egrad, wgrad = _run_head(backend, margin, x, y, sparse_grad=sparse)
            res[backend] = (loss, egrad.double(), wgrad.double())
        lo, hi = head.class_start, head.class_start + head.num_local
        ref_e, ref_w = world * _local(e.grad, sizes, rank), w.grad[lo:hi]
        (l_t, e_t, w_t), (l_k, e_k, w_k) = res["torch"], res["triton"]
        cos_t = torch.nn.functional.cosine_similarity(emb, w.detach()[labels], dim=1)
        out.append(dict(
            cfg=(name, sparse, programs), loss=l_k, ref=ref.item(), torch_loss=l_t,
            egrad_err=(e_k - ref_e).abs().max().item() if x.shape[0] else 0.0,
            wgrad_err=(w_k - ref_w).abs().max().item(),
            scale=max(ref_e.abs().max().item() if x.shape[0] else 0.0, ref_w.abs().max().item()),
            vs_torch=max((e_k - e_t).abs().max().item() if x.shape[0] else 0.0,
                         (w_k - w_t).abs().max().item()),
            past_pi=int((cos_t < math.cos(math.pi - 0.5)).sum()), calls=dict(CALLS)))
    return out


EXACT_CONFIGS = [("arc", False, 2), ("arc", True, 64), ("arc_st", True, 2), ("cos", False, 64),
                 ("combined", True, 2), ("sphere", False, 2)]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_triton_matches_torch_and_dense_reference(world):
    results = run_interpreted(world, _exact_worker, EXACT_CONFIGS)
    for per_rank in zip(*results):
        assert len({r["loss"] for r in per_rank}) == 1, per_rank  # same loss on every rank
        for r in per_rank:
            assert r["past_pi"] == 3, r  # the theta + m > pi branch was exercised
            n_cfg = EXACT_CONFIGS.index(r["cfg"]) + 1
            assert r["calls"] == {"forward_stats": n_cfg, "backward": n_cfg}, r
            # Tolerance as in test_head: fp32 logits scaled by s=64 vs a float64 reference.
            assert abs(r["loss"] - r["ref"]) <= 2e-5 * max(1.0, abs(r["ref"])), r
            assert r["egrad_err"] <= 1e-4 * max(1e-3, r["scale"]), r
            assert r["wgrad_err"] <= 1e-4 * max(1e-3, r["scale"]), r
            # Against the torch backend: the same fp32 operands, summed in another order.
            assert abs(r["loss"] - r["torch_loss"]) <= 1e-5 * max(1.0, abs(r["ref"])), r
            assert r["vs_torch"] <= 1e-5 * max(1e-3, r["scale"]), r


def _counts(n, world):
    import torch.distributed as dist
    t = torch.tensor([n])
    out = [torch.zeros_like(t) for _ in range(world)]
    dist.all_gather(out, t)
    return [int(v) for v in out]


def _sampled_worker(rank, world, sample_rate):
    """sample_rate < 1: triton and torch draw the same rows (one seeded stream per rank) and
    both equal a float64 softmax over exactly the sampled classes."""
    _interpreted()
    sizes = BATCHES[world]
    emb, labels = _labels_and_embeddings(sum(sizes), seed=11)
    margin = ArcFace(64.0, 0.5)
    x, y = _local(emb, sizes, rank).float(), _local(labels, sizes, rank)
    head, loss, egrad, wgrad = _run_head("triton", margin, x, y, sample_rate, sparse_grad=True)
    _, loss_t, egrad_t, wgrad_t = _run_head("torch", margin, x, y, sample_rate, sparse_grad=True)
    _, full, _, _ = _run_head("triton", margin, x, y)
    index = head.weight.grad.coalesce().indices()[0]
    sampled = all_gather_varlen(index + head.class_start, _counts(index.numel(), world), None)
    keep = torch.sort(sampled).values
    col = {int(c): i for i, c in enumerate(keep)}
    e = emb.clone().requires_grad_(True)
    w = init_class_centers(0, C, D, SEED).double()[keep].clone().requires_grad_(True)
    ref = dense_margin_ce(e, w, torch.tensor([col[int(v)] for v in labels]), margin)
    ref.backward()
    lo = head.class_start
    mine = (keep >= lo) & (keep < lo + head.num_local)
    ref_e = world * _local(e.grad, sizes, rank)
    assert CALLS == {"forward_stats": 2, "backward": 2}, CALLS
    return dict(loss=loss, ref=ref.item(), torch_loss=loss_t, full=full, n_sampled=len(keep),
                num_sample=head.num_sample, num_local=head.num_local,
                egrad_err=(egrad.double() - ref_e).abs().max().item() if x.shape[0] else 0.0,
                wgrad_err=(wgrad.double()[keep[mine] - lo] - w.grad[mine]).abs().max().item(),
                vs_torch=max((egrad - egrad_t).abs().max().item() if x.shape[0] else 0.0,
                             (wgrad - wgrad_t).abs().max().item()),
                scale=max(ref_e.abs().max().item() if x.shape[0] else 0.0,
                          w.grad.abs().max().item()))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_triton_sampled_matches_reference_over_sampled_classes(world):
    for r in run_interpreted(world, _sampled_worker, 0.5):
        assert r["num_sample"] < r["num_local"] and r["n_sampled"] < C, r
        assert abs(r["loss"] - r["ref"]) <= 2e-5 * max(1.0, r["ref"]), r
        assert abs(r["loss"] - r["torch_loss"]) <= 1e-5 * max(1.0, r["ref"]), r
        assert r["loss"] <= r["full"] + 1e-5, r  # dropping classes never raises the loss
        assert r["egrad_err"] <= 1e-4 * r["scale"] and r["wgrad_err"] <= 1e-4 * r["scale"], r
        assert r["vs_torch"] <= 1e-5 * r["scale"], r


def _low_precision_worker(rank, world, configs):
    _interpreted()
    sizes = BATCHES[world]
    emb, labels = _labels_and_embeddings(sum(sizes), seed=5)
    margin = ArcFace(64.0, 0.5)
    e = emb.clone().requires_grad_(True)
    w = init_class_centers(0, C, D, SEED).double().requires_grad_(True)
    ref = dense_margin_ce(e, w, labels, margin)
    ref.backward()
    out = []
    for dtype, weight_dtype, weight_scale in configs:
        x = _local(emb, sizes, rank).to(dtype)
        y = _local(labels, sizes, rank)
        res = {}
        for backend in ("torch", "triton"):
            head = PartialFC(margin, D, C, 1.0, seed=SEED, backend=backend,
                             weight_dtype=weight_dtype)
            with torch.no_grad():
                head.weight.mul_(weight_scale)
            xr = x.clone().requires_grad_(True)
            loss = head(xr, y)
            loss.backward()
            assert loss.dtype == torch.float32 and xr.grad.dtype == dtype
            assert head.weight.grad.dtype == weight_dtype
            # d/dw scales with 1/||w||: bring it back to the unit-scale reference
            res[backend] = (loss.item(), xr.grad.double(),
                            head.weight.grad.double() * weight_scale)
        lo, hi = head.class_start, head.class_start + head.num_local
        ref_e, ref_w = world * _local(e.grad, sizes, rank), w.grad[lo:hi]
        rel = {}
        for backend, (loss, eg, wg) in res.items():
            rel[backend] = (abs(loss - ref.item()), (eg - ref_e).norm().item() / ref_e.norm().item()
                            if x.shape[0] else 0.0, (wg - ref_w).norm().item() / ref_w.norm().item())
        out.append(dict(cfg=(str(dtype), str(weight_dtype), weight_scale), ref=ref.item(), **rel))
    assert CALLS == {"forward_stats": len(configs), "backward": len(configs)}, CALLS
    return out


LOW_CONFIGS = [(torch.bfloat16, torch.float32, 1.0), (torch.float16, torch.float32, 1e-3),
               (torch.bfloat16, torch.bfloat16, 1.0), (torch.float32, torch.bfloat16, 1.0)]


def test_triton_low_precision_within_tolerance_of_dense_reference():
    for per_rank in run_interpreted(2, _low_precision_worker, LOW_CONFIGS):
        for r in per_rank:
            half = "float16" in r["cfg"][0]
            for backend in ("torch", "triton"):
                loss_err, e_err, w_err = r[backend]
                # Tolerances as in test_head: bf16 keeps 8 mantissa bits (~4e-3 relative per
                # cosine, x s=64 up to ~0.25 per logit); fp16 11 bits (rows of norm ~4e-4
                # normalized before the cast, as the torch path does). fp32 embeddings with bf16
                # storage: only the rows are rounded (2^-9 relative).
                tol = (0.01, 0.02) if half else (0.03, 0.05)
                assert loss_err <= tol[0] * max(1.0, r["ref"]), (backend, r)
                assert e_err <= tol[1] and w_err <= tol[1], (backend, r)


def _int8_worker(rank, world):
    """int8 centers (codes + one fp32 scale per row, decoded inside the kernels) against the
    float64 dense reference over exactly the decoded centers, and against the torch path."""
    _interpreted()
    from hybrid_fc.head.partial_fc import init_center_parts
    sizes = BATCHES[world]
    emb, labels = _labels_and_embeddings(sum(sizes), seed=13)
    margin = ArcFace(64.0, 0.5)
    parts = init_center_parts(0, C, D, SEED, dtype=torch.int8)
    w = (parts[""].double() * parts["_scale"].double().unsqueeze(1) / 127).requires_grad_(True)
    e = emb.clone().requires_grad_(True)
    ref = dense_margin_ce(e, w, labels, margin)
    ref.backward()
    x, y = _local(emb, sizes, rank).float(), _local(labels, sizes, rank)
    res = {}
    for backend in ("torch", "triton"):
        head, loss, egrad, wgrad = _run_head(backend, margin, x, y, sparse_grad=True,
                                             weight_dtype=torch.int8)
        res[backend] = (loss, egrad.double(), wgrad.double())
    lo, hi = head.class_start, head.class_start + head.num_local
    ref_e, ref_w = world * _local(e.grad, sizes, rank), w.grad[lo:hi]
    assert CALLS == {"forward_stats": 1, "backward": 1}, CALLS
    return dict(ref=ref.item(), loss=res["triton"][0], torch_loss=res["torch"][0],
                egrad_err=(res["triton"][1] - ref_e).abs().max().item() if x.shape[0] else 0.0,
                escale=ref_e.abs().max().item() if x.shape[0] else 1.0,
                wgrad_err=(res["triton"][2] - ref_w).abs().max().item(),
                wscale=ref_w.abs().max().item())


def test_triton_int8_centers_match_dense_reference():
    """Tolerances: the loss is fp32 on exactly the decoded rows (2e-5 relative, as for fp32
    centers; 1e-5 against the torch path, which decodes bit for bit alike); d E is fp32
    throughout in the kernels (1e-4 of its scale); the rows' gradient is computed in fp32 and
    rounded to bf16 once (2^-9 relative per element): within 2^-8 of its scale. Planted bug
    caught: the kernels' decode factor scale / 128 (the cosines do not change, the inverse
    norms handed to the rows' projection do: the rows' gradient is ~1% off)."""
    for r in run_interpreted(2, _int8_worker):          # 19 + 18 classes
        assert abs(r["loss"] - r["ref"]) <= 2e-5 * max(1.0, r["ref"]), r
        assert abs(r["loss"] - r["torch_loss"]) <= 1e-5 * max(1.0, r["ref"]), r
        assert r["egrad_err"] <= 1e-4 * max(1e-3, r["escale"]), r
        assert r["wgrad_err"] <= 2 ** -8 * r["wscale"], r


def _many_blocks_worker(rank, world):
    """One rank, 45 rows (3 row blocks, the last ragged) x 37 columns x 40 dims (3 D tiles) with
    both forward splits; the loss and gradients equal the torch backend's."""
    triton_ce = _interpreted()
    emb, labels = _labels_and_embeddings(45, seed=2)
    out = []
    # programs: 1 -> one program walks all 3 column blocks; 6 -> two programs of 2 blocks, the
    # last one's second block past S (masked); 64 -> one block per program.
    for programs in (1, 6, 64):
        triton_ce.BLOCKS["programs"] = programs
        res = {}
        for backend in ("torch", "triton"):
            head = PartialFC(CosFace(64.0, 0.4), 40, C, 1.0, seed=SEED, backend=backend)
            x = torch.cat([emb, emb], 1).float().requires_grad_(True)
            loss = head(x, labels)
            loss.backward()
            res[backend] = (loss.item(), x.grad, head.weight.grad)
        (l_t, e_t, w_t), (l_k, e_k, w_k) = res["torch"], res["triton"]
        out.append((abs(l_t - l_k), (e_t - e_k).abs().max().item() / e_t.abs().max().item(),
                    (w_t - w_k).abs().max().item() / w_t.abs().max().item()))
    assert CALLS == {"forward_stats": 3, "backward": 3}, CALLS
    return out


def test_triton_many_blocks_and_splits_match_torch():
    for loss_err, e_err, w_err in run_interpreted(1, _many_blocks_worker)[0]:
        assert loss_err <= 1e-5 and e_err <= 1e-5 and w_err <= 1e-5, (loss_err, e_err, w_err)


# -- the backend switch: validation and no silent fallback (no kernel runs here) -----------
def test_backend_name_is_validated():
    with pytest.raises(ValueError, match="backend must be one of 'auto', 'torch', 'triton'"):
        PartialFC(ArcFace(), D, C, backend="cuda")


def test_auto_is_torch_on_cpu_even_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert kernels.select_backend("auto", torch.device("cpu")) == "torch"
    assert kernels.select_backend("torch", torch.device("cuda")) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    monkeypatch.setattr(kernels, "TRITON_ON_CUDA_BY_DEFAULT", True)
    assert kernels.select_backend("auto", torch.device("cuda")) == "torch"
    monkeypatch.setattr(kernels, "triton_available", lambda: True)
    assert kernels.select_backend("auto", torch.device("cuda")) == "triton"
    monkeypatch.setattr(kernels, "TRITON_ON_CUDA_BY_DEFAULT", False)  # until a GPU verifies it
    assert kernels.select_backend("auto", torch.device("cuda")) == "torch"


def test_forced_triton_on_cpu_without_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    head = PartialFC(ArcFace(), D, C, backend="triton")
    with pytest.raises(RuntimeError, match="runs on CUDA tensors .*TRITON_INTERPRET=1"):
        head(torch.randn(4, D), torch.arange(4))


def test_forced_triton_without_triton_raises(monkeypatch):
    monkeypatch.setattr(kernels, "triton_available", lambda: False)
    head = PartialFC(ArcFace(), D, C, backend="triton")
    with pytest.raises(RuntimeError, match=r"needs the triton package .*hybrid_fc\[triton\]"):
        head(torch.randn(4, D), torch.arange(4))


def _import_order_worker(rank, world):
    """The module imported before TRITON_INTERPRET=1 was set holds GPU kernels: a clear error."""
    os.environ.pop("TRITON_INTERPRET", None)
    mod = sys.modules.get("hybrid_fc.head.kernels.triton_ce")
    if mod is None:
        importlib.import_module("hybrid_fc.head.kernels.triton_ce")
    elif mod.INTERPRETED:
        importlib.reload(mod)
    os.environ["TRITON_INTERPRET"] = "1"
    head = PartialFC(ArcFace(), D, C, backend="triton")
    try:
        head(torch.randn(4, D), torch.arange(4))
    except RuntimeError as e:
        return str(e)
    return "no error"


def test_kernels_imported_before_the_interpreter_flag_raise_clearly():
    msg, = run_interpreted(1, _import_order_worker)
    assert "imported without TRITON_INTERPRET=1" in msg, msg
