"""bf16 class centers with stochastic rounding and 8-bit optimizer state (hybrid_fc.head.precision).

References are written here in float64, independently of the library's arithmetic: the bf16
neighbours of a value from its binary exponent, the 8-bit codes from their definitions. The
library's random bits (a counter-based hash) are the one shared input: the tests check what is
done with them, and separately that they make the rounding unbiased.
"""
import pytest
import torch

from hybrid_fc import ArcFace, PartialFC
from hybrid_fc.head import init_class_centers
from hybrid_fc.head.optim import SparseAdamW, SparseSGD
from hybrid_fc.head.precision import decode_rows, encode_rows, round_to_bf16, rounding_bits
from harness import run_ranks
from reference import dense_margin_ce


# -- float64 references ------------------------------------------------------------------------
def _bf16_ulp(x: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |x| (8 significant bits), float64."""
    e = torch.floor(torch.log2(x.abs().clamp_min(1e-30)))
    return torch.pow(2.0, e - 7)


def _ref_round(x: torch.Tensor, bits) -> torch.Tensor:
    """float64 rounding of x to bf16: stochastic with uniform u = bits / 2^16 (round the
    magnitude up iff u >= 1 - p, p = distance above the lower neighbour in ulps), or nearest."""
    x = x.double()
    ulp = _bf16_ulp(x)
    lo = torch.floor(x.abs() / ulp) * ulp
    p = (x.abs() - lo) / ulp
    if bits is None:
        up = (p > 0.5) | ((p == 0.5) & (torch.remainder(lo / ulp, 2) == 1))
    else:
        up = bits.double() / 65536.0 >= 1.0 - p
    return torch.where(up, lo + ulp, lo) * torch.sign(x)


def _ref_encode_linear(m: torch.Tensor):
    absmax = m.abs().amax(1)
    return torch.round(m / absmax.clamp_min(1e-300).unsqueeze(1) * 127), absmax


def _ref_encode_log(v: torch.Tensor):
    vmax = v.amax(1)
    q = torch.round(-8 * torch.log2(v / vmax.clamp_min(1e-300).unsqueeze(1))).clamp(0, 254)
    return torch.where(v > 0, q, torch.full_like(q, 255.0)), vmax


# -- stochastic rounding -------------------------------------------------------------------------
def test_stochastic_rounding_is_unbiased():
    """Each value rounds up with probability equal to its distance above the lower bf16
    neighbour (in ulps). Statistic per element over K=4096 steps of the stream: the count of
    round-ups vs Binomial(K, p), |z| < 5.5; under uniform independent bits the chance that any
    of the 256 elements crosses it is 256 x 3.8e-8 ~ 1e-5 (the false-alarm rate)."""
    g = torch.Generator().manual_seed(0)
    lo = torch.randn(32, 8, generator=g).bfloat16().double()          # bf16 values
    p = torch.rand(32, 8, generator=g, dtype=torch.float64) * 0.98 + 0.01
    x = (lo + torch.sign(lo) * p * _bf16_ulp(lo)).float()            # p of the way up (fp32)
    p = ((x.double() - lo).abs() / _bf16_ulp(lo))                       # exact p after the fp32 cast
    k_steps = 4096
    ups = torch.zeros_like(p)
    rows = torch.arange(1000, 1032)
    for k in range(k_steps):
        r = round_to_bf16(x.clone(), rounding_bits(7, k, rows, 8)).double()
        assert torch.all((r == lo) | (r == _ref_round(lo + torch.sign(lo) * _bf16_ulp(lo), None)))
        ups += (r != lo).double()
    z = (ups - k_steps * p) / torch.sqrt(k_steps * p * (1 - p))
    assert z.abs().max() < 5.5, z.abs().max()
    # and the mean of the rounded values is the value: sum of z over 256 elements ~ N(0, 256)
    assert abs(z.sum().item()) < 5.5 * 16


def test_sub_spacing_updates_survive_only_with_stochastic_rounding():
    """1000 increments of 1e-3 on a bf16 1.0 (spacing 2^-7 = 0.0078): round-to-nearest never
    moves; stochastic rounding ends near 2.0 (binomial spread; 8 sigma ~ 0.05 after scaling)."""
    w_n = torch.ones(64, 16, dtype=torch.bfloat16)
    w_s = w_n.clone()
    rows = torch.arange(64)
    for k in range(1000):
        w_n = round_to_bf16(w_n.float() + 1e-3, None)
        w_s = round_to_bf16(w_s.float() + 1e-3, rounding_bits(1, k, rows, 16))
    assert torch.all(w_n == 1.0)
    assert abs(w_s.double().mean().item() - 2.0) < 0.02, w_s.double().mean()


def test_rounding_bits_depend_on_global_row_and_step_only():
    full = rounding_bits(3, 11, torch.arange(100), 32)
    assert full.dtype == torch.int32 and full.min() >= 0 and full.max() < 65536
    part = rounding_bits(3, 11, torch.tensor([7, 42, 99]), 32)     # another layout / sample
    assert torch.equal(part, full[[7, 42, 99]])
    assert not torch.equal(rounding_bits(3, 12, torch.arange(100), 32), full)   # next step
    assert not torch.equal(rounding_bits(4, 11, torch.arange(100), 32), full)   # other seed
    # 16 usable bits: every bit position is set about half the time
    frac = torch.stack([(full >> b) & 1 for b in range(16)]).double().mean(dim=(1, 2))
    assert torch.all((frac > 0.4) & (frac < 0.6)), frac


def test_round_to_bf16_matches_reference_and_keeps_specials():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 40, generator=g) * torch.logspace(-3, 3, 40)
    bits = rounding_bits(0, 5, torch.arange(50), 40)
    assert torch.equal(round_to_bf16(x.clone(), bits).double(), _ref_round(x, bits))
    assert torch.equal(round_to_bf16(x.clone(), None).double(), _ref_round(x, None))
    special = torch.tensor([[float("inf"), float("-inf"), float("nan"), 0.0, -0.0]])
    out = round_to_bf16(special.clone(), rounding_bits(0, 1, torch.arange(1), 5))
    assert torch.isposinf(out[0, 0]) and torch.isneginf(out[0, 1]) and torch.isnan(out[0, 2])
    assert out[0, 3] == 0 and out[0, 4] == 0


# -- 8-bit row state ---------------------------------------------------------------------------
def test_int8_codes_error_bounds():
    g = torch.Generator().manual_seed(2)
    m = torch.randn(40, 64, generator=g) * torch.logspace(-6, 2, 40).unsqueeze(1)
    m[3] = 0.0                                                   # a row never updated
    codes, scale = encode_rows(m.clone(), signed=True)
    back = decode_rows(codes, scale, signed=True)
    assert codes.dtype == torch.int8 and scale.dtype == torch.float32
    # linear code: error <= half a step of absmax / 127 (plus fp32 rounding)
    assert torch.all((back - m).abs() <= scale.unsqueeze(1) / 254 * (1 + 1e-5) + 1e-30)
    assert torch.all(back[3] == 0)
    ref_codes, ref_scale = _ref_encode_linear(m.double())
    assert torch.allclose(scale.double(), ref_scale, rtol=1e-7)
    assert (codes.double() - ref_codes).abs().max() <= 1
    assert (codes.double() == ref_codes).double().mean() > 0.99

    v = m.double().square().float() * torch.rand(40, 64, generator=g)  # Adam's 2nd moment
    v[5, :10] = 0.0
    codes, scale = encode_rows(v.clone(), signed=False)
    back = decode_rows(codes, scale, signed=False)
    nz = v > scale.unsqueeze(1) * 2.0 ** -31
    # log code: 8 codes per octave -> relative error <= 2^(1/16) - 1 = 4.4%
    rel = ((back - v).abs() / v.clamp_min(1e-38))[nz]
    assert rel.max() <= 2 ** (1 / 16) - 1 + 1e-5, rel.max()
    assert torch.all(back[5, :10] == 0) and torch.all(back[~nz & (v == 0)] == 0)
    ref_codes, _ = _ref_encode_log(v.double())
    assert ((codes.double() + 128) - ref_codes).abs().max() <= 1


# -- optimizers against float64 references of the same rounding ----------------------------
def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape)


def _random_problem(seed, n=30, d=24):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(n, d, generator=g).bfloat16()
    grads = [(torch.randn(n, d, generator=g) * 0.3).bfloat16() for _ in range(4)]
    picks = [torch.sort(torch.randperm(n, generator=g)[:n // 2]).values for _ in range(4)]
    return w0, grads, picks


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_sparse_sgd_bf16_int8_against_float64_reference(rounding):
    """Each step from the optimizer's own current state: momentum decoded from its codes,
    the update in float64, weights rounded with the same bits, momentum re-encoded.
    Tolerance: the library computes the update in fp32, so a value that lands within ~2^-16
    ulp of a rounding threshold may go the other way: <= 1 bf16 ulp / 1 code anywhere,
    exact on >= 98% of elements."""
    w0, grads, picks = _random_problem(0)
    p = torch.nn.Parameter(w0.clone())
    p.row_offset = 500                                    # global class id of row 0
    lr, mu, wd = 0.05, 0.9, 5e-4
    opt = SparseSGD([p], lr=lr, momentum=mu, weight_decay=wd, state_dtype=torch.int8,
                    rounding=rounding, seed=9)
    for step, (g, rows) in enumerate(zip(grads, picks)):
        st = opt.state.get(p, {})
        if st:
            m = st["momentum_buffer"][rows].double() * st["momentum_buffer_scale"][rows].double()\
                .unsqueeze(1) / 127
        else:
            m = torch.zeros(len(rows), p.shape[1], dtype=torch.float64)
        w = p.detach()[rows].double()
        m = mu * m + g[rows].double() + wd * w
        bits = rounding_bits(9, step + 1, rows + 500, p.shape[1]) if rounding == "stochastic" \
            else None
        ref_w = _ref_round(w - lr * m, bits)
        ref_codes, ref_scale = _ref_encode_linear(m)
        untouched = p.detach().clone()
        p.grad = _sparse(rows, g[rows], p.shape)
        opt.step()
        got = p.detach()[rows].double()
        assert p.dtype == torch.bfloat16
        assert torch.all((got - ref_w).abs() <= _bf16_ulp(ref_w) * 1.01), step
        assert (got == ref_w).double().mean() >= 0.98
        codes = opt.state[p]["momentum_buffer"][rows].double()
        assert (codes - ref_codes).abs().max() <= 1 and (codes == ref_codes).double().mean() > 0.98
        assert torch.allclose(opt.state[p]["momentum_buffer_scale"][rows].double(), ref_scale,
                              rtol=1e-5)
        others = torch.ones(p.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(p.detach()[others], untouched[others])   # lazy rows stay bit for bit
    assert opt.state[p]["rounding_step"] == 4


def test_sparse_adamw_bf16_int8_against_float64_reference():
    w0, grads, picks = _random_problem(1)
    p = torch.nn.Parameter(w0.clone())
    lr, b1, b2, eps, wd = 1e-2, 0.9, 0.99, 1e-8, 0.05
    opt = SparseAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                      state_dtype=torch.int8, seed=4)
    for step, (g, rows) in enumerate(zip(grads, picks)):
        st = opt.state.get(p, {})
        if st:
            m = st["exp_avg"][rows].double() * st["exp_avg_scale"][rows].double().unsqueeze(1) / 127
            q = st["exp_avg_sq"][rows].double() + 128
            v = torch.where(q == 255, torch.zeros_like(q), torch.pow(2.0, -q / 8)
                            * st["exp_avg_sq_scale"][rows].double().unsqueeze(1))
            t = st["step"][rows].double() + 1
        else:
            m = v = torch.zeros(len(rows), p.shape[1], dtype=torch.float64)
            t = torch.ones(len(rows), dtype=torch.float64)
        gg = g[rows].double()
        w = p.detach()[rows].double()
        m = b1 * m + (1 - b1) * gg
        v = b2 * v + (1 - b2) * gg * gg
        upd = (m / (1 - b1 ** t).unsqueeze(1)) / ((v / (1 - b2 ** t).unsqueeze(1)).sqrt() + eps)
        ref_w = _ref_round(w * (1 - lr * wd) - lr * upd, rounding_bits(4, step + 1, rows, p.shape[1]))
        p.grad = _sparse(rows, g[rows], p.shape)
        opt.step()
        got = p.detach()[rows].double()
        # Tolerance as for SGD, plus the decoded moments: fp32 vs float64 decode of the same codes
        assert torch.all((got - ref_w).abs() <= _bf16_ulp(ref_w) * 1.01), step
        assert (got == ref_w).double().mean() >= 0.97
        assert (opt.state[p]["exp_avg"][rows].double() - _ref_encode_linear(m)[0]).abs().max() <= 1
        assert ((opt.state[p]["exp_avg_sq"][rows].double() + 128)
                - _ref_encode_log(v)[0]).abs().max() <= 1


def test_optimizer_state_dict_resumes_rounding_exactly():
    """3 steps, state_dict() into a fresh optimizer and a copy of the weights, 3 more steps:
    bit-identical to 6 uninterrupted steps (the rounding stream is state, not a generator)."""
    w0, grads, picks = _random_problem(2)
    grads, picks = grads + grads[:2], picks + picks[:2]

    def make(w):
        p = torch.nn.Parameter(w.clone())
        return p, SparseSGD([p], lr=0.1, momentum=0.9, state_dtype=torch.int8, seed=3)

    def run(p, opt, steps):
        for g, rows in steps:
            p.grad = _sparse(rows, g[rows], p.shape)
            opt.step()

    p, opt = make(w0)
    run(p, opt, list(zip(grads, picks)))
    q, opt_q = make(w0)
    run(q, opt_q, list(zip(grads, picks))[:3])
    saved = opt_q.state_dict()
    r, opt_r = make(q.detach())
    opt_r.load_state_dict(saved)
    run(r, opt_r, list(zip(grads, picks))[3:])
    assert torch.equal(r.detach(), p.detach())
    assert torch.equal(opt_r.state[r]["momentum_buffer"], opt.state[p]["momentum_buffer"])
    assert opt_r.state[r]["rounding_step"] == 6


def test_int8_state_is_a_quarter_of_fp32():
    p = torch.nn.Parameter(torch.zeros(1000, 256, dtype=torch.bfloat16))
    opt = SparseSGD([p], lr=0.1, state_dtype=torch.int8)
    p.grad = _sparse(torch.tensor([1, 5]), torch.ones(2, 256, dtype=torch.bfloat16), p.shape)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    assert nbytes == 1000 * 256 + 1000 * 4               # codes + one fp32 scale per row


# -- the head with bf16 centers ---------------------------------------------------------------
C, D = 23, 16
BATCHES = {1: [6], 2: [5, 3], 3: [4, 0, 5]}


def test_bf16_init_is_the_fp32_init_rounded():
    assert torch.equal(init_class_centers(3, 70_000, 8, 5, dtype=torch.bfloat16),
                       init_class_centers(3, 70_000, 8, 5).bfloat16())
    head = PartialFC(ArcFace(64.0, 0.5), 8, 100, weight_dtype="bfloat16", seed=5)
    assert head.weight.dtype == torch.bfloat16 and head.weight_dtype == torch.bfloat16
    assert head.weight.row_offset == 0
    with pytest.raises(ValueError, match="weight_dtype"):
        PartialFC(ArcFace(64.0, 0.5), 8, 100, weight_dtype=torch.float16)


def _bf16_head_worker(rank, world, sparse, chunk, emb_dtype):
    sizes = BATCHES[world]
    g = torch.Generator().manual_seed(11)
    n = sum(sizes)
    emb, labels = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)
    margin = ArcFace(64.0, 0.5)
    # Reference: float64 dense softmax over exactly the stored (bf16) centers.
    w_ref = init_class_centers(0, C, D, 3, dtype=torch.bfloat16).double().requires_grad_(True)
    e_ref = emb.to(emb_dtype).double().requires_grad_(True)
    ref = dense_margin_ce(e_ref, w_ref, labels, margin)
    ref.backward()
    head = PartialFC(margin, D, C, 1.0, sparse_grad=sparse, chunk_size=chunk, seed=3,
                     weight_dtype=torch.bfloat16)
    off = sum(sizes[:rank])
    x = emb[off:off + sizes[rank]].to(emb_dtype).clone().requires_grad_(True)
    loss = head(x, labels[off:off + sizes[rank]])
    loss.backward()
    wgrad = head.weight.grad.to_dense() if sparse else head.weight.grad
    lo, hi = head.class_start, head.class_start + head.num_local
    return dict(loss=loss.item(), ref=ref.item(), wgrad_dtype=str(wgrad.dtype),
                wgrad=wgrad.double(), ref_wgrad=w_ref.grad[lo:hi],
                egrad=x.grad.double(), ref_egrad=world * e_ref.grad[off:off + sizes[rank]])


@pytest.mark.parametrize("world", [1, 2, 3])
def test_bf16_head_matches_dense_reference(world):
    """bf16 storage: the loss is computed in fp32 from the stored values, so it matches the
    float64 reference on those values to fp32 precision (as the fp32 head); the kept
    exponentials are bf16 (each term of a gradient sum <= 2^-9 relative off) and the sampled
    rows' gradient is rounded to bf16, so gradients are within ~2^-8 of their scale."""
    for sparse, chunk, emb_dtype in [(True, None, torch.float32), (False, 5, torch.float32),
                                     (True, None, torch.bfloat16)]:
        for r in run_ranks(world, _bf16_head_worker, sparse, chunk, emb_dtype):
            cfg = (sparse, chunk, emb_dtype)
            tol = 2e-5 if emb_dtype == torch.float32 else 1e-2   # bf16 matmuls: 2^-8 relative
            assert abs(r["loss"] - r["ref"]) <= tol * max(1.0, abs(r["ref"])), (cfg, r["loss"], r["ref"])
            assert r["wgrad_dtype"] == "torch.bfloat16"
            # A row's gradient sums N bf16-stored probabilities times embeddings, with
            # cancellation: its error is bounded by the gradient's scale, not per element.
            scale = r["ref_wgrad"].abs().max()
            wtol = 2 ** -7 if emb_dtype == torch.float32 else 2e-2
            assert (r["wgrad"] - r["ref_wgrad"]).abs().max() <= wtol * scale, cfg
            if r["egrad"].numel():
                escale = r["ref_egrad"].abs().max()
                etol = 1e-2 if emb_dtype == torch.float32 else 3e-2
                assert (r["egrad"] - r["ref_egrad"]).abs().max() <= etol * escale, cfg
