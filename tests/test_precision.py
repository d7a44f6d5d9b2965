"""bf16 / int8 class centers with stochastic rounding and 8-bit / 4-bit optimizer state
(hybrid_fc.head.precision).

References are written here in float64, independently of the library's arithmetic: the bf16
neighbours of a value from its binary exponent, the 8-bit and 4-bit codes (and the 4-bit byte
layout) from their definitions. The library's random bits (a counter-based hash) are the one
shared input: the tests check what is done with them, and separately that they make the
rounding unbiased.
"""
import pytest
import torch

from hybrid_fc import ArcFace, PartialFC
from hybrid_fc.head import init_class_centers
from hybrid_fc.head.optim import SparseAdamW, SparseSGD
from hybrid_fc.head.partial_fc import init_center_parts
from hybrid_fc.head.precision import (decode_rows, encode_rows, encode_rows4, round_to_bf16,
                                      rounding_bits)
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


def _ref_encode_linear(m: torch.Tensor, levels: int = 127, bits=None):
    """Linear codes -levels..levels of float64 rows: to nearest, or stochastically with
    u = bits / 2^16 (lo + 1 iff u >= 1 - (y - lo), y the value in code units)."""
    absmax = m.abs().amax(1)
    y = m / absmax.clamp_min(1e-300).unsqueeze(1) * levels
    if bits is None:
        return torch.round(y), absmax
    lo = torch.floor(y)
    return torch.where(bits.double() / 65536.0 >= 1.0 - (y - lo), lo + 1, lo), absmax


def _ref_unpack4(codes: torch.Tensor, width: int) -> torch.Tensor:
    """float64 codes -7..7 of 4-bit rows by the layout's definition: two's-complement nibbles,
    entry j < ceil(width/2) in the low nibble of byte j, entry j >= ceil(width/2) in the high
    nibble of byte j - ceil(width/2)."""
    b = codes.long()
    nib = torch.cat([b & 15, b >> 4], 1)[:, :width].double()
    return torch.where(nib >= 8, nib - 16, nib)


def _ref_decode(codes, scale, levels):
    """float64 rows of linear codes (float64 -levels..levels) with their row scales."""
    return codes * scale.double().unsqueeze(1) / levels


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
    assert torch.equal(rounding_bits(3, 11, torch.arange(100), 32, stream=0), full)
    assert not torch.equal(rounding_bits(3, 11, torch.arange(100), 32, stream=1), full)
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


def _encode_int8(x, bits):
    codes, scale = encode_rows(x, signed=True, bits=bits)
    return codes.double(), scale


def _encode_int4(x, bits):
    codes, scale = encode_rows4(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape[1] == (x.shape[1] + 1) // 2
    return _ref_unpack4(codes, x.shape[1]), scale


@pytest.mark.parametrize("encode, levels", [(_encode_int8, 127), (_encode_int4, 7)])
def test_linear_codes_round_stochastically_unbiased_and_seeded(encode, levels):
    """int8 center codes and 4-bit momentum codes with random bits: every draw is the float64
    reference's floor(y + u) (<= 1 code off where fp32 and float64 disagree on y, at most 1%
    of elements), the same bits give the same codes, and over K=4096 steps of the stream each
    element rounds up with probability p = y - floor(y): the count vs Binomial(K, p), |z| < 5.5
    (false-alarm rate ~1e-5 over the elements, as for bf16). Odd width 9: the last byte of a
    4-bit row has no high nibble. Planted bug caught: floor(y + u) replaced by round(y) (or by
    floor(y + u) + 0.5 bias) fails the z test; a wrong nibble order fails the reference."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(24, 9, generator=g) * torch.logspace(-4, 2, 24).unsqueeze(1)
    ref_y = x.double() / x.double().abs().amax(1, keepdim=True) * levels
    p = ref_y - torch.floor(ref_y)
    k_steps, rows = 4096, torch.arange(300, 324)
    bits = torch.cat([rounding_bits(11, k, rows, 9) for k in range(k_steps)])  # step k: rows k*24..
    codes, scale = encode(x.repeat(k_steps, 1), bits)                   # all steps in one call
    ref, _ = _ref_encode_linear(x.double().repeat(k_steps, 1), levels, bits)
    assert (codes - ref).abs().max() <= 1 and (codes != ref).double().mean() <= 0.01
    assert torch.equal(scale, x.abs().amax(1).repeat(k_steps))
    assert torch.equal(encode(x.clone(), bits[:24])[0], codes[:24])     # seeded: same bits, codes
    ups = (codes.view(k_steps, 24, 9) > torch.floor(ref_y)).double().sum(0)
    free = (p > 0.01) & (p < 0.99)                                # the absmax entry is exact
    z = (ups - k_steps * p) / torch.sqrt(k_steps * p * (1 - p))
    assert free.sum() > 150 and z[free].abs().max() < 5.5, z[free].abs().max()
    assert abs(z[free].sum().item()) < 5.5 * free.sum().item() ** 0.5


# -- optimizers against float64 references of the same rounding ----------------------------
def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape)


def _random_problem(seed, n=30, d=24):
    """bf16 centers (n, d), four bf16 gradients and four sorted picks of n // 2 rows."""
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


def _int8_param(seed, n=30, d=24):
    """An int8 parameter as PartialFC(weight_dtype=int8) holds it: codes, row scales at
    `row_scale`, global row offset 500, a bf16 sparse gradient allowed; plus gradients and picks."""
    w0, grads, picks = _random_problem(seed, n, d)
    codes, scale = encode_rows(w0.float(), signed=True)
    p = torch.nn.Parameter(codes, requires_grad=False)
    p.row_scale, p.row_offset, p.grad_dtype = scale, 500, torch.bfloat16
    return p, grads, picks


def _check_codes(got, ref, share):
    """Library codes vs the float64 reference: the update is computed in fp32, so a value within
    ~2^-16 of a code step from a rounding threshold may go the other way: <= 1 code anywhere,
    equal on >= `share` of the elements."""
    assert (got - ref).abs().max() <= 1 and (got == ref).double().mean() >= share, \
        ((got - ref).abs().max(), (got == ref).double().mean())


@pytest.mark.parametrize("rounding", ["stochastic", "nearest"])
def test_sparse_sgd_int8_centers_int4_momentum_against_float64_reference(rounding):
    """int8 centers + 4-bit momentum, each step from the optimizer's own current state: centers
    and momentum decoded from their codes, the update in float64, center codes rounded with the
    same bits (stream 0; or to nearest), momentum codes stochastically with stream 1 (always).
    Tolerance as _check_codes; row scales are the updated rows' absmax (fp32 vs float64
    arithmetic, rtol 1e-5); untouched rows keep codes and scales bit for bit. Planted bugs
    caught: momentum bits from stream 0 (the centers' bits), a scale of absmax / 126."""
    p, grads, picks = _int8_param(0)
    lr, mu, wd, d = 0.05, 0.9, 5e-4, p.shape[1]
    opt = SparseSGD([p], lr=lr, momentum=mu, weight_decay=wd, state_dtype=torch.int4,
                    rounding=rounding, seed=9)
    for step, (g, rows) in enumerate(zip(grads, picks)):
        st = opt.state.get(p, {})
        m = _ref_decode(_ref_unpack4(st["momentum_buffer"][rows], d),
                        st["momentum_buffer_scale"][rows], 7) if st else 0.0
        w = _ref_decode(p.detach()[rows].double(), p.row_scale[rows], 127)
        m = mu * m + g[rows].double() + wd * w
        ids = rows + 500
        bits = rounding_bits(9, step + 1, ids, d) if rounding == "stochastic" else None
        ref_w, ref_scale = _ref_encode_linear(w - lr * m, 127, bits)
        ref_m, ref_m_scale = _ref_encode_linear(m, 7, rounding_bits(9, step + 1, ids, d, 1))
        untouched = (p.detach().clone(), p.row_scale.clone())
        p.grad = _sparse(rows, g[rows], p.shape)
        opt.step()
        assert p.dtype == torch.int8
        _check_codes(p.detach()[rows].double(), ref_w, 0.98)
        assert torch.allclose(p.row_scale[rows].double(), ref_scale, rtol=1e-5)
        _check_codes(_ref_unpack4(opt.state[p]["momentum_buffer"][rows], d), ref_m, 0.98)
        assert torch.allclose(opt.state[p]["momentum_buffer_scale"][rows].double(), ref_m_scale,
                              rtol=1e-5)
        others = torch.ones(p.shape[0], dtype=torch.bool)
        others[rows] = False
        assert torch.equal(p.detach()[others], untouched[0][others])
        assert torch.equal(p.row_scale[others], untouched[1][others])
    assert opt.state[p]["rounding_step"] == 4


def test_sparse_adamw_int8_centers_int4_state_against_float64_reference():
    """int8 centers, AdamW's first moment in 4 bits (stream 1), its second moment in the int8
    log code (16 levels cannot span it): as the SGD test, >= 97% of codes equal (the decoded
    second moment adds fp32-vs-float64 differences)."""
    p, grads, picks = _int8_param(1)
    lr, b1, b2, eps, wd, d = 1e-2, 0.9, 0.99, 1e-8, 0.05, p.shape[1]
    opt = SparseAdamW([p], lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd,
                      state_dtype=torch.int4, seed=4)
    for step, (g, rows) in enumerate(zip(grads, picks)):
        st = opt.state.get(p, {})
        if st:
            m = _ref_decode(_ref_unpack4(st["exp_avg"][rows], d), st["exp_avg_scale"][rows], 7)
            q = st["exp_avg_sq"][rows].double() + 128
            v = torch.where(q == 255, torch.zeros_like(q), torch.pow(2.0, -q / 8)
                            * st["exp_avg_sq_scale"][rows].double().unsqueeze(1))
            t = st["step"][rows].double() + 1
        else:
            m = v = torch.zeros(len(rows), d, dtype=torch.float64)
            t = torch.ones(len(rows), dtype=torch.float64)
        gg, ids = g[rows].double(), rows + 500
        w = _ref_decode(p.detach()[rows].double(), p.row_scale[rows], 127)
        m = b1 * m + (1 - b1) * gg
        v = b2 * v + (1 - b2) * gg * gg
        upd = (m / (1 - b1 ** t).unsqueeze(1)) / ((v / (1 - b2 ** t).unsqueeze(1)).sqrt() + eps)
        ref_w, _ = _ref_encode_linear(w * (1 - lr * wd) - lr * upd, 127,
                                      rounding_bits(4, step + 1, ids, d))
        ref_m, _ = _ref_encode_linear(m, 7, rounding_bits(4, step + 1, ids, d, 1))
        p.grad = _sparse(rows, g[rows], p.shape)
        opt.step()
        _check_codes(p.detach()[rows].double(), ref_w, 0.97)
        _check_codes(_ref_unpack4(opt.state[p]["exp_avg"][rows], d), ref_m, 0.97)
        _check_codes(opt.state[p]["exp_avg_sq"][rows].double() + 128, _ref_encode_log(v)[0], 0.97)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sparse_sgd_int8_error_feedback_against_float64_reference(momentum):
    """rounding="feedback", int4 state: each step the optimizer's weight is the decoded int8 row
    plus the decoded 4-bit residual; the update in float64; the new codes to nearest; the new
    residual (target - decoded new codes) in 4 bits, stochastically from the stream after the
    momentum's (stream 2 with momentum, else 1). Tolerance as _check_codes. Planted bugs
    caught: the residual not added back at the next step, the residual taken before the
    codes' rounding (x - x), residual bits from the momentum's stream."""
    p, grads, picks = _int8_param(3)
    lr, wd, d = 0.05, 5e-4, p.shape[1]
    opt = SparseSGD([p], lr=lr, momentum=momentum, weight_decay=wd, state_dtype=torch.int4,
                    rounding="feedback", seed=5)
    stream = 2 if momentum else 1
    for step, (g, rows) in enumerate(zip(grads, picks)):
        st = opt.state.get(p, {})
        ids = rows + 500
        w = _ref_decode(p.detach()[rows].double(), p.row_scale[rows], 127)
        if st:
            w = w + _ref_decode(_ref_unpack4(st["rounding_residual"][rows], d),
                                st["rounding_residual_scale"][rows], 7)
        m = g[rows].double() + wd * w
        if momentum and st:
            m = m + momentum * _ref_decode(_ref_unpack4(st["momentum_buffer"][rows], d),
                                           st["momentum_buffer_scale"][rows], 7)
        x = w - lr * m
        ref_w, ref_scale = _ref_encode_linear(x, 127)
        ref_r, _ = _ref_encode_linear(x - _ref_decode(ref_w, ref_scale, 127), 7,
                                      rounding_bits(5, step + 1, ids, d, stream))
        p.grad = _sparse(rows, g[rows], p.shape)
        opt.step()
        _check_codes(p.detach()[rows].double(), ref_w, 0.98)
        _check_codes(_ref_unpack4(opt.state[p]["rounding_residual"][rows], d), ref_r, 0.98)
    assert ("momentum_buffer" in opt.state[p]) == bool(momentum)


def test_error_feedback_keeps_int8_centers_on_the_exact_trajectory():
    """300 small SGD steps (each ~1/20 of an int8 code step) on 200 rows, against the same steps
    in float64. Error feedback with an fp32 residual: stored rows + residual equal the exact
    rows to fp32 precision and the stored rows are the exact ones rounded to nearest (within
    half a code step + fp32 slack). With a 4-bit residual the stored rows stay within about
    one code step of the exact ones (RMS), while stochastic rounding's error grows as a random
    walk (here > 2.5x feedback's). Planted bug caught: the residual dropped after one step."""
    g = torch.Generator().manual_seed(0)
    n, d, steps, lr = 200, 64, 300, 0.01
    w0 = torch.randn(n, d, generator=g) / 8
    target = w0 + torch.randn(n, d, generator=g) / 8
    results = {}
    for rounding, state in (("feedback", torch.float32), ("feedback", torch.int4),
                            ("stochastic", torch.int4)):
        codes, scale = encode_rows(w0.clone(), signed=True)
        p = torch.nn.Parameter(codes, requires_grad=False)
        p.row_scale, p.grad_dtype = scale, torch.float32
        opt = SparseSGD([p], lr=lr, momentum=0.0, weight_decay=0.0, state_dtype=state,
                        rounding=rounding, seed=1)
        x = decode_rows(codes, scale, True).double()      # the exact run starts where int8 does
        for _ in range(steps):
            grad = (x - target.double()) * 0.02            # a slow pull, the same in both
            p.grad = _sparse(torch.arange(n), grad.float(), p.shape)
            opt.step()
            x = x - lr * grad
        exact, stored = x, decode_rows(p.detach(), p.row_scale, True).double()
        step_size = p.row_scale.double().unsqueeze(1) / 127
        if state == torch.float32:
            residual = opt.state[p]["rounding_residual"].double()
            assert torch.allclose(stored + residual, exact, rtol=0, atol=1e-5)
            assert torch.all((stored - exact).abs() <= step_size * 0.5 + 1e-5)
        results[(rounding, state)] = ((stored - exact) / step_size).pow(2).mean().sqrt().item()
    feedback4, sr = results[("feedback", torch.int4)], results[("stochastic", torch.int4)]
    assert feedback4 <= 1.0 and sr >= 2.5 * feedback4, results


def test_sparse_adamw_error_feedback_tracks_fp32_adamw():
    """SparseAdamW with int8 centers, rounding="feedback" and fp32 state against SparseAdamW on
    fp32 centers from the same (decoded) start and gradients: after 20 sparse steps the stored
    rows plus the residual are the fp32 rows (to fp32 rounding) and the stored rows are within
    half a code step of them."""
    g = torch.Generator().manual_seed(6)
    n, d = 40, 32
    codes, scale = encode_rows(torch.randn(n, d, generator=g), signed=True)
    p = torch.nn.Parameter(codes, requires_grad=False)
    p.row_scale, p.grad_dtype = scale, torch.float32
    q = torch.nn.Parameter(decode_rows(codes, scale, True))
    kw = dict(lr=0.01, weight_decay=0.05, state_dtype=torch.float32)
    opt_p, opt_q = SparseAdamW([p], rounding="feedback", **kw), SparseAdamW([q], **kw)
    for _ in range(20):
        rows = torch.sort(torch.randperm(n, generator=g)[:n // 2]).values
        grad = torch.randn(len(rows), d, generator=g)
        for param, opt in ((p, opt_p), (q, opt_q)):
            param.grad = _sparse(rows, grad, param.shape)
            opt.step()
    stored = decode_rows(p.detach(), p.row_scale, True)
    assert torch.allclose(stored + opt_p.state[p]["rounding_residual"], q.detach(), atol=1e-5)
    half = p.row_scale.unsqueeze(1) / 254
    assert torch.all((stored - q.detach()).abs() <= half + 1e-5)


def test_switching_to_and_from_error_feedback_on_resume():
    """head_optim.rounding may change on resume: a run resumed with feedback starts with a zero
    residual (its first step equals the same step with nearest rounding), and one resumed
    without it drops the saved residual, whose state keys then leave the optimizer."""
    p, grads, picks = _int8_param(4)
    kw = dict(lr=0.05, momentum=0.9, state_dtype=torch.int4, seed=2)
    q = torch.nn.Parameter(p.detach().clone(), requires_grad=False)
    q.row_scale, q.row_offset, q.grad_dtype = p.row_scale.clone(), 500, torch.bfloat16
    fb, near = SparseSGD([p], rounding="feedback", **kw), SparseSGD([q], rounding="nearest", **kw)
    for param, opt in ((p, fb), (q, near)):
        param.grad = _sparse(picks[0], grads[0][picks[0]], param.shape)
        opt.step()
    assert torch.equal(p.detach(), q.detach())
    assert fb.state[p]["rounding_residual"][picks[0]].any()
    resumed = SparseSGD([p], rounding="stochastic", **kw)
    resumed.load_state_dict(fb.state_dict())
    resumed.param_groups[0]["rounding"] = "stochastic"   # the config wins after a load (Trainer)
    assert "rounding_residual" in resumed.state[p]
    p.grad = _sparse(picks[1], grads[1][picks[1]], p.shape)
    resumed.step()
    assert not [k for k in resumed.state[p] if k.startswith("rounding_residual")]


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


@pytest.mark.parametrize("state_dtype, code_bytes", [(torch.int8, 256), (torch.int4, 128)])
def test_int8_and_int4_state_bytes(state_dtype, code_bytes):
    """int8 momentum is a quarter of fp32's, int4 an eighth (two codes per byte), each with one
    fp32 scale per row."""
    p = torch.nn.Parameter(torch.zeros(1000, 256, dtype=torch.bfloat16))
    opt = SparseSGD([p], lr=0.1, state_dtype=state_dtype)
    p.grad = _sparse(torch.tensor([1, 5]), torch.ones(2, 256, dtype=torch.bfloat16), p.shape)
    opt.step()
    nbytes = sum(t.numel() * t.element_size() for t in opt.state[p].values() if torch.is_tensor(t))
    assert nbytes == 1000 * code_bytes + 1000 * 4         # codes + one fp32 scale per row


def test_unsupported_combinations_name_the_setting_to_change():
    """8-bit centers without sparse gradients, with torch's optimizers, without their scales,
    or an unknown storage: a ValueError naming the setting, never a fallback to a wider type."""
    from types import SimpleNamespace

    from hybrid_fc.head.optim import make_head_optimizer
    from hybrid_fc.training.config import load_config
    from hybrid_fc.training.engine import HybridEngine
    with pytest.raises(ValueError, match="sparse_grad=True"):
        PartialFC(ArcFace(), D, C, weight_dtype=torch.int8)
    with pytest.raises(ValueError, match="weight_dtype must be one of float32, bfloat16, int8"):
        PartialFC(ArcFace(), D, C, weight_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="head.weight_dtype: int8 centers need head.sparse_grad"):
        load_config(None, ["head.weight_dtype=int8", "head_optim.name=sparse_sgd"])
    with pytest.raises(ValueError, match="int4 needs sparse_sgd or sparse_adamw"):
        make_head_optimizer("sgd", [torch.nn.Parameter(torch.zeros(2))], lr=0.1,
                            state_dtype=torch.int4)
    head = PartialFC(ArcFace(), D, C, sparse_grad=True, weight_dtype=torch.int8)
    engine = SimpleNamespace(module=torch.nn.Linear(1, 1))
    with pytest.raises(ValueError, match="head_optim.name=sparse_sgd or sparse_adamw"):
        HybridEngine(engine, head, torch.optim.SGD(head.parameters(), lr=0.1))
    p = torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.int8), requires_grad=False)
    p.grad_dtype = torch.bfloat16
    p.grad = torch.ones(3, 4, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="row_scale"):
        SparseSGD([p], lr=0.1).step()


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


def _stored_centers(weight_dtype) -> torch.Tensor:
    """float64 (C, D): exactly the values a head of `weight_dtype` (seed 3) stores, decoded."""
    parts = init_center_parts(0, C, D, 3, dtype=weight_dtype)
    if weight_dtype == torch.int8:
        return _ref_decode(parts[""].double(), parts["_scale"], 127)
    return parts[""].double()


def _low_head_worker(rank, world, weight_dtype, sparse, chunk, emb_dtype):
    sizes = BATCHES[world]
    g = torch.Generator().manual_seed(11)
    n = sum(sizes)
    emb, labels = torch.randn(n, D, generator=g, dtype=torch.float64), torch.randint(0, C, (n,), generator=g)
    margin = ArcFace(64.0, 0.5)
    # Reference: float64 dense softmax over exactly the stored (bf16 / decoded int8) centers.
    w_ref = _stored_centers(weight_dtype).requires_grad_(True)
    e_ref = emb.to(emb_dtype).double().requires_grad_(True)
    ref = dense_margin_ce(e_ref, w_ref, labels, margin)
    ref.backward()
    head = PartialFC(margin, D, C, 1.0, sparse_grad=sparse, chunk_size=chunk, seed=3,
                     weight_dtype=weight_dtype)
    off = sum(sizes[:rank])
    x = emb[off:off + sizes[rank]].to(emb_dtype).clone().requires_grad_(True)
    loss = head(x, labels[off:off + sizes[rank]])
    loss.backward()
    wgrad = head.weight.grad.to_dense() if sparse else head.weight.grad
    lo, hi = head.class_start, head.class_start + head.num_local
    return dict(loss=loss.item(), ref=ref.item(), wgrad_dtype=str(wgrad.dtype),
                wgrad=wgrad.double(), ref_wgrad=w_ref.grad[lo:hi],
                egrad=x.grad.double(), ref_egrad=world * e_ref.grad[off:off + sizes[rank]])


LOW_HEADS = {torch.bfloat16: [(True, None, torch.float32), (False, 5, torch.float32),
                              (True, None, torch.bfloat16)],
             torch.int8: [(True, None, torch.float32), (True, 5, torch.float32),
                          (True, None, torch.bfloat16)]}


@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_low_precision_head_matches_dense_reference(world, weight_dtype):
    """bf16 / int8 storage: the loss is computed in fp32 from the stored (decoded) values, so it
    matches the float64 reference on those values to fp32 precision (as the fp32 head); the
    kept exponentials are bf16 (each term of a gradient sum <= 2^-9 relative off) and the
    sampled rows' gradient is rounded to bf16, so gradients are within ~2^-8 of their scale.
    int8 decodes exactly what the reference decodes (code x scale / 127). Planted bug caught:
    int8 rows decoded without their scale (the logits do not change, the rows' gradient is off
    by the scale's inverse)."""
    for sparse, chunk, emb_dtype in LOW_HEADS[weight_dtype]:
        for r in run_ranks(world, _low_head_worker, weight_dtype, sparse, chunk, emb_dtype):
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


def test_int8_head_gradient_accumulates_like_autograd():
    """int8 codes cannot require grad: the head sets weight.grad itself (sparse bf16). A second
    backward (gradient accumulation) adds to it as autograd would (sample rate 1: the same rows,
    so exactly twice); a deepcopy (which forgets grad_dtype and row_scale) works on its own
    scales; the
    codes and scales are 1 + 4/D bytes per center element; frozen embeddings still train the
    centers, a frozen head (requires_grad_(False)) gets no gradient. Planted bug caught:
    weight.grad replaced instead of summed."""
    import copy
    x, y = torch.randn(6, D), torch.randint(0, C, (6,))
    head = PartialFC(ArcFace(64.0, 0.5), D, C, 1.0, sparse_grad=True, seed=3,
                     weight_dtype=torch.int8)
    assert not head.weight.requires_grad and head.weight.row_scale is head.weight_scale
    head(x, y).backward()
    once = head.weight.grad.to_dense()
    assert head.weight.grad.dtype == torch.bfloat16 and head.weight.grad.is_sparse
    head(x, y).backward()
    assert torch.equal(head.weight.grad.to_dense(), once * 2)
    clone = copy.deepcopy(head)
    clone.weight.grad = None
    clone(x, y).backward()
    assert clone.weight.row_scale is clone.weight_scale      # linked again by forward
    assert torch.equal(clone.weight.grad.to_dense(), once)
    xg = x.clone().requires_grad_(True)
    clone.requires_grad_(False)(xg, y).backward()
    assert torch.equal(clone.weight.grad.to_dense(), once) and xg.grad is not None
    assert head.weight_scale.grad is None
    nbytes = sum(t.numel() * t.element_size() for t in (head.weight, head.weight_scale))
    assert nbytes == C * D + C * 4


class _FakeEngine:
    """Just what HybridEngine drives of a DeepSpeed engine: an identity backbone without
    parameters, `gas` micro-steps per step, and whether a boundary step was applied (False: an
    fp16 overflow)."""

    def __init__(self, gas, applied):
        from types import SimpleNamespace
        self.gas, self.applied, self.micro, self.global_steps = gas, applied, 0, 0
        self.module, self.lr_scheduler, self.dp_world_size = torch.nn.Identity(), None, 1
        self.optimizer = SimpleNamespace(param_groups=[{"lr": 0.1}])

    def __call__(self, images):
        return images

    def bfloat16_enabled(self):
        return False

    fp16_enabled = bfloat16_enabled

    def gradient_accumulation_steps(self):
        return self.gas

    def backward(self, loss, scale_wrt_gas=False):
        pass

    def is_gradient_accumulation_boundary(self):
        return (self.micro + 1) % self.gas == 0

    def step(self):
        self.micro += 1

    def was_step_applied(self):
        return self.applied


def test_int8_head_under_hybrid_engine_accumulates_clips_and_skips():
    """HybridEngine reads an int8 head's weight.grad as any head's: two micro-steps accumulate,
    the sum is clipped by its norm, the optimizer steps once; equal bit for bit to the same
    done by hand. On an overflow (step not applied) the codes, scales and state stay and the
    gradient is dropped. Planted bug caught: the head's gradient delivered only on the first
    micro-step (weight.grad set once)."""
    import copy

    from hybrid_fc.training.engine import HybridEngine
    g = torch.Generator().manual_seed(4)
    batches = [(torch.randn(6, D, generator=g), torch.randint(0, C, (6,), generator=g))
               for _ in range(2)]
    head = PartialFC(ArcFace(64.0, 0.5), D, C, 1.0, sparse_grad=True, seed=3,
                     weight_dtype=torch.int8)
    ref = copy.deepcopy(head)

    def optimizer(h):
        return SparseSGD(h.parameters(), lr=0.1, momentum=0.9, state_dtype=torch.int4, seed=2)
    hybrid = HybridEngine(_FakeEngine(gas=2, applied=True), head, optimizer(head),
                          max_grad_norm=0.05)
    applied = [(hybrid.forward_backward(x, y), hybrid.step())[1] for x, y in batches]
    assert applied == [False, True]
    opt = optimizer(ref)
    parts = []
    for x, y in batches:                          # each micro-step's gradient on its own
        ref.weight.grad = None
        (ref(x, y) / 2).backward()
        parts.append(ref.weight.grad)
    grad = ref.weight.grad = parts[0] + parts[1]
    norm = grad.coalesce().values().float().pow(2).sum().sqrt()
    assert abs(hybrid.last_head_grad_norm.item() - norm.item()) <= 1e-6 * norm.item()
    assert norm > 0.05                                        # the clip was active
    grad.mul_(torch.clamp(0.05 / (norm + 1e-6), max=1.0).to(grad.dtype))
    opt.step()
    assert torch.equal(head.weight, ref.weight) and torch.equal(head.weight_scale,
                                                                ref.weight_scale)
    assert head.weight.grad is None
    before = (head.weight.clone(), head.weight_scale.clone())
    skipped = HybridEngine(_FakeEngine(gas=1, applied=False), head, hybrid.head_optimizer)
    skipped.forward_backward(*batches[0])
    assert skipped.step() is False and head.weight.grad is None
    assert torch.equal(head.weight, before[0]) and torch.equal(head.weight_scale, before[1])
