"""Row-wise head optimizers against torch's dense optimizers on the touched rows."""
import pytest
import torch

from hybrid_fc import ArcFace, PartialFC
from hybrid_fc.head.optim import SparseAdamW, SparseSGD

CASES = [(SparseSGD, torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=5e-4)),
         (SparseSGD, torch.optim.SGD, dict(lr=0.05, momentum=0.0, weight_decay=1e-2)),
         (SparseAdamW, torch.optim.AdamW, dict(lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05))]


def _sparse(rows, values, shape):
    return torch.sparse_coo_tensor(rows.unsqueeze(0), values, shape)


@pytest.mark.parametrize("opt_cls, ref_cls, kw", CASES)
def test_touched_rows_follow_dense_reference_and_others_stay(opt_cls, ref_cls, kw):
    torch.manual_seed(0)
    w0 = torch.randn(12, 5, dtype=torch.float64).float()
    touched = torch.tensor([9, 1, 4, 7])                # unsorted, as a user may pass it
    p = torch.nn.Parameter(w0.clone())
    ref = torch.nn.Parameter(w0[touched].clone())       # dense reference: only those rows
    opt, ref_opt = opt_cls([p], **kw), ref_cls([ref], **kw)
    for _ in range(4):
        g = torch.randn(4, 5)
        # duplicate row entries must be summed, like a coalesced gradient
        p.grad = _sparse(torch.cat([touched, touched[:1]]), torch.cat([g, g[:1]]), p.shape)
        ref.grad = g.clone()
        ref.grad[0] *= 2
        opt.step()
        ref_opt.step()
    # Tolerance: same fp32 formulas, different op order (AdamW's bias corrections) -> ~1e-7.
    assert torch.allclose(p.detach()[touched], ref.detach(), atol=1e-6, rtol=1e-6)
    others = torch.ones(12, dtype=torch.bool)
    others[touched] = False
    assert torch.equal(p.detach()[others], w0[others])   # lazy: no decay of untouched rows


@pytest.mark.parametrize("opt_cls, ref_cls, kw", CASES)
def test_dense_gradient_equals_torch_optimizer(opt_cls, ref_cls, kw):
    torch.manual_seed(1)
    w0 = torch.randn(7, 3)
    p, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt, ref_opt = opt_cls([p], **kw), ref_cls([ref], **kw)
    for _ in range(3):
        g = torch.randn(7, 3)
        p.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        ref_opt.step()
    assert torch.allclose(p.detach(), ref.detach(), atol=1e-6, rtol=1e-6)


def test_rows_sampled_at_different_steps_keep_their_own_state():
    """A row's k-th update equals torch's k-th update, however many steps it sat out."""
    w0 = torch.randn(4, 2)
    p = torch.nn.Parameter(w0.clone())
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.1)
    ref = torch.nn.Parameter(w0[2:3].clone())
    ref_opt = torch.optim.AdamW([ref], lr=0.1, weight_decay=0.1)
    for step, rows in enumerate([[0], [2], [0, 1], [2]]):
        g = torch.full((len(rows), 2), float(step + 1))
        p.grad = _sparse(torch.tensor(rows), g, p.shape)
        opt.step()
        if 2 in rows:
            ref.grad = g[rows.index(2)].unsqueeze(0).clone()
            ref_opt.step()
    assert torch.allclose(p.detach()[2:3], ref.detach(), atol=1e-6)
    assert opt.state[p]["step"].tolist() == [2, 1, 2, 0]
    assert torch.equal(p.detach()[3], w0[3])


def test_bf16_state_halves_memory_and_stays_close():
    torch.manual_seed(2)
    w0 = torch.randn(64, 32)
    p32, p16 = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    o32 = SparseSGD([p32], lr=0.1, momentum=0.9)
    o16 = SparseSGD([p16], lr=0.1, momentum=0.9, state_dtype=torch.bfloat16)
    for _ in range(5):
        g = torch.randn(64, 32)
        rows = torch.arange(0, 64, 2)
        p32.grad, p16.grad = _sparse(rows, g[rows], w0.shape), _sparse(rows, g[rows], w0.shape)
        o32.step()
        o16.step()
    assert o16.state[p16]["momentum_buffer"].dtype == torch.bfloat16
    # bf16 momentum rounds to 8 mantissa bits each step: weights drift ~1e-3 relative to the step.
    assert (p16 - p32).abs().max() < 1e-2 * (p32 - w0).abs().max()


@pytest.mark.parametrize("weight_dtype, state_dtype", [(torch.float32, torch.float32),
                                                       (torch.bfloat16, torch.int8)])
def test_head_with_sparse_sgd_learns(weight_dtype, state_dtype):
    torch.manual_seed(3)
    head = PartialFC(ArcFace(32.0, 0.3), 8, 300, 0.2, sparse_grad=True, seed=1,
                     weight_dtype=weight_dtype)
    opt = SparseSGD(head.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4,
                    state_dtype=state_dtype)
    protos = torch.randn(300, 8)
    labels = torch.randint(0, 300, (64,))
    emb = protos[labels] + 0.1 * torch.randn(64, 8)
    first = None
    for _ in range(30):
        opt.zero_grad()
        loss = head(emb, labels)
        loss.backward()
        opt.step()
        first = first if first is not None else loss.item()
    assert head.weight.dtype == weight_dtype
    assert loss.item() < 0.5 * first


@pytest.mark.parametrize("make, match", [
    (lambda p: SparseSGD(p, lr=-1.0), "lr"),
    (lambda p: SparseSGD(p, lr=0.1, momentum=1.0), "momentum"),
    (lambda p: SparseSGD(p, lr=0.1, state_dtype=torch.uint8), "state_dtype"),
    (lambda p: SparseSGD(p, lr=0.1, rounding="up"), "rounding"),
    (lambda p: SparseAdamW(p, lr=0.1, betas=(0.9, 1.0)), "betas"),
    (lambda p: SparseAdamW(p, lr=0.1, eps=0.0), "eps"),
])
def test_bad_optimizer_arguments(make, match):
    with pytest.raises(ValueError, match=match):
        make([torch.nn.Parameter(torch.zeros(2, 2))])
