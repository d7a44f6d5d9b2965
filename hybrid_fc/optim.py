"""Head optimizers that update only the rows that received gradient (fp32 master weights).

With PartialFC(sparse_grad=True) the weight gradient is a sparse COO tensor over the sampled
rows; these optimizers touch only those rows: O(S * D) work and no (num_local, D) gradient.

Rows that were not sampled in a step are left exactly as they are: no weight decay, no momentum
decay, no Adam moment decay. Their state resumes when they are next sampled ("lazy" updates, as
in PaddlePaddle PLSC's sparse momentum and TensorFlow's LazyAdam). For a row that is sampled in
every step the update is identical to torch.optim.SGD / torch.optim.AdamW.

Dense gradients are accepted too and then update every row, exactly like the torch optimizers.
State dtype: fp32 by default; `state_dtype=torch.bfloat16` halves (SGD) the optimizer state of
very large heads at the cost of bf16 rounding of the moments (the weights stay fp32).
"""
from typing import Iterable, Tuple

import torch

__all__ = ["SparseSGD", "SparseAdamW"]

_ROW_BLOCK_ELEMS = 1 << 22  # rows are updated in blocks of ~4M elements (16 MB fp32 temporaries)


def _rows_and_values(p: torch.Tensor, grad: torch.Tensor):
    """(rows (R,), values (R, D)); rows unique and sorted. None rows = every row (dense)."""
    if grad.is_sparse:
        if not grad.is_coalesced():
            rows = grad._indices()[0]
            # PartialFC's rows are sorted and unique but autograd drops the coalesced flag;
            # checking is one pass over S ints, coalescing would copy the (S, D) values.
            if rows.numel() > 1 and not bool((rows[1:] > rows[:-1]).all()):
                grad = grad.coalesce()  # sums duplicate rows
            else:
                return rows, grad._values()
        return grad.indices()[0], grad.values()
    if grad.layout != torch.strided:
        raise TypeError(f"unsupported gradient layout {grad.layout}")
    return None, grad


def _blocks(num_rows: int, width: int):
    step = max(1, _ROW_BLOCK_ELEMS // max(1, width))
    for a in range(0, num_rows, step):
        yield a, min(num_rows, a + step)


def _check_state_dtype(dtype):
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"state_dtype must be float32, bfloat16 or float16, got {dtype}")


def _check_common(lr, weight_decay, state_dtype):
    if not lr >= 0.0:
        raise ValueError(f"lr must be >= 0, got {lr!r}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay!r}")
    _check_state_dtype(state_dtype)


class _RowwiseOptimizer(torch.optim.Optimizer):
    """Shared step loop: each fp32 parameter with a gradient goes to `_update` as
    (param, group, rows or None for dense, gradient values)."""

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.dtype != torch.float32:
                    raise TypeError(f"{type(self).__name__} keeps fp32 master weights; "
                                    f"got a {p.dtype} parameter")
                rows, values = _rows_and_values(p, p.grad)
                self._update(p, group, rows, values)
        return loss

    def _update(self, p, group, rows, values):  # pragma: no cover - abstract
        raise NotImplementedError


class SparseSGD(_RowwiseOptimizer):
    """SGD with momentum and L2 weight decay, updating only rows that have gradient.

    Per touched row: g += weight_decay * w; m = momentum * m + g; w -= lr * m
    (torch.optim.SGD with dampening=0, nesterov=False; a fresh row's m starts at 0, which
    equals torch's first-step m = g).
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, state_dtype: torch.dtype = torch.float32):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_common(lr, weight_decay, state_dtype)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      state_dtype=state_dtype))

    def _update(self, p, group, rows, values):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        state = self.state[p]
        if mu and "momentum_buffer" not in state:
            state["momentum_buffer"] = torch.zeros_like(p, dtype=group["state_dtype"])
        buf = state.get("momentum_buffer")
        n = p.shape[0] if rows is None else rows.shape[0]
        width = p[0].numel() if p.dim() else 1
        for a, b in _blocks(n, width):
            r = None if rows is None else rows[a:b]
            g = values[a:b].to(torch.float32)
            if r is None:  # dense gradient: every row, in place, as torch.optim.SGD
                w = p[a:b]
                if wd:
                    g = g.add(w, alpha=wd)
                if mu:
                    g = buf[a:b].mul_(mu).add_(g)
                w.add_(g, alpha=-lr)
                continue
            if mu:
                m = buf.index_select(0, r).to(torch.float32)           # (c, D)
                m.mul_(mu).add_(g)
                if wd:
                    m.add_(p.index_select(0, r), alpha=wd)
                buf.index_copy_(0, r, m.to(buf.dtype))
                g = m
            elif wd:
                g = g.add(p.index_select(0, r), alpha=wd)
            p.index_add_(0, r, g, alpha=-lr)  # w -= lr * m on the touched rows


class SparseAdamW(_RowwiseOptimizer):
    """AdamW (decoupled weight decay) updating only rows that have gradient.

    Each row keeps its own step count for bias correction, so a row sampled k times has had
    exactly the k Adam updates torch.optim.AdamW would apply to a parameter updated k times.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 state_dtype: torch.dtype = torch.float32):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        _check_common(lr, weight_decay, state_dtype)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      state_dtype=state_dtype))

    def _update(self, p, group, rows, values):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        state = self.state[p]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros_like(p, dtype=group["state_dtype"])
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=group["state_dtype"])
            state["step"] = torch.zeros(p.shape[0], dtype=torch.int64, device=p.device)
        m_all, v_all, steps = state["exp_avg"], state["exp_avg_sq"], state["step"]
        n = p.shape[0] if rows is None else rows.shape[0]
        width = p[0].numel() if p.dim() else 1
        for a, b in _blocks(n, width):
            r = torch.arange(a, b, device=p.device) if rows is None else rows[a:b]
            g = values[a:b].to(torch.float32)
            w = p.index_select(0, r)
            m = m_all.index_select(0, r).float().mul_(b1).add_(g, alpha=1 - b1)
            v = v_all.index_select(0, r).float().mul_(b2).addcmul_(g, g, value=1 - b2)
            t = steps.index_select(0, r) + 1                               # (c,)
            shape = (-1,) + (1,) * (p.dim() - 1)
            bc1 = (1 - b1 ** t.double()).float().view(shape)
            bc2 = (1 - b2 ** t.double()).float().view(shape)
            w.mul_(1 - lr * wd)
            denom = (v / bc2).sqrt_().add_(eps)
            w.addcdiv_(m, denom * bc1, value=-lr)
            p.index_copy_(0, r, w)
            m_all.index_copy_(0, r, m.to(m_all.dtype))
            v_all.index_copy_(0, r, v.to(v_all.dtype))
            steps.index_copy_(0, r, t)
