"""Head optimizers that update only the rows that received gradient.

With PartialFC(sparse_grad=True) the weight gradient is a sparse COO tensor over the sampled
rows; these optimizers touch only those rows: O(S * D) work and no (num_local, D) gradient.

Rows that were not sampled in a step are left exactly as they are: no weight decay, no momentum
decay, no Adam moment decay. Their state resumes when they are next sampled ("lazy" updates, as
in PaddlePaddle PLSC's sparse momentum and TensorFlow's LazyAdam). For a row that is sampled in
every step the update is identical to torch.optim.SGD / torch.optim.AdamW.

Dense gradients are accepted too and then update every row, exactly like the torch optimizers.

Storage (hybrid_fc.head.precision), everything computed in fp32 in between:
  * weights: fp32 (updated in place, the exact path) or bfloat16 with **no fp32 master copy**
    (PartialFC(weight_dtype=torch.bfloat16)): each touched row is read as fp32, updated, and
    written back with stochastic rounding (`rounding="stochastic"`, the default) or to nearest
    (`rounding="nearest"`). The random bits come from the optimizer's own counter-based stream:
    group["seed"] and a per-parameter step counter `state["rounding_step"]` (saved in
    `state_dict()` and in hybrid_fc checkpoints), keyed by *global* row id
    (`param.row_offset` + local row, set by PartialFC), so a resumed run rounds exactly as an
    uninterrupted one, at any number of ranks.
  * state (`state_dtype`): float32, bfloat16, float16, or int8 with one fp32 scale per row
    (`<key>_scale`): momentum / first moment in a linear code, the second moment in a log code.
    At D=512 int8 state costs 1.008 bytes per element instead of 4.
"""
from typing import Iterable, Optional, Tuple

import torch

from .precision import (ROUNDINGS, STATE_DTYPES, WEIGHT_DTYPES, decode_rows, dtype_name,
                        encode_rows,
                        round_to_bf16, rounding_bits)

__all__ = ["SparseSGD", "SparseAdamW", "HEAD_OPTIMIZERS", "make_head_optimizer"]

ROW_BLOCK_ELEMS = 1 << 22  # rows are updated in blocks of ~4M elements (16 MB fp32 temporaries)
HEAD_OPTIMIZERS = ("sgd", "adamw", "sparse_sgd", "sparse_adamw")
"""Head optimizer names (`make_head_optimizer`): torch's SGD / AdamW (dense gradients, fp32
centers only) or this module's row-wise SparseSGD / SparseAdamW (any storage)."""


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


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D (rows, width) view (writes go through to `t`): the row-wise code works on any
    parameter shape."""
    if t.dim() == 0:
        return t.view(1, 1)
    return t.view(t.shape[0], -1)


def _check_common(lr, weight_decay, state_dtype, rounding):
    if not 0.0 <= lr < float("inf"):
        raise ValueError(f"lr must be a finite number >= 0, got {lr!r}")
    if not 0.0 <= weight_decay < float("inf"):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if state_dtype not in STATE_DTYPES:
        raise ValueError(f"state_dtype must be one of "
                         f"{', '.join(dtype_name(d) for d in STATE_DTYPES)}, got {state_dtype}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be stochastic or nearest, got {rounding!r}")


def _words(t: torch.Tensor) -> torch.Tensor:
    """The same rows viewed as int64 words where the row bytes allow (bf16/int8 rows are copied
    2-8x faster this way on CPU), else `t`."""
    row_bytes = t.shape[1] * t.element_size()
    if (t.element_size() < 8 and row_bytes % 8 == 0 and t.is_contiguous()
            and (t.storage_offset() * t.element_size()) % 8 == 0):
        return t.view(torch.int64)
    return t


class _Rows:
    """The rows one block updates: a slice (dense gradient) or sorted row ids (sparse)."""

    def __init__(self, a: int, b: int, index: Optional[torch.Tensor]):
        self.a, self.b, self.index = a, b, index

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of these rows of `t` (never a view: the caller mutates it)."""
        if self.index is None:
            return t[self.a:self.b].clone()
        return t.index_select(0, self.index)

    def put(self, t: torch.Tensor, value: torch.Tensor) -> None:
        """t[rows] = value (value already in t's dtype, or cast here)."""
        if self.index is None:
            t[self.a:self.b].copy_(value)
            return
        value = value.to(t.dtype)
        if t.dim() == 2:  # rows as 8-byte words: index_copy_ moves elements one by one
            t, value = _words(t), _words(value)
        t.index_copy_(0, self.index, value)

    def global_ids(self, offset: int, device) -> torch.Tensor:
        if self.index is None:
            return torch.arange(self.a + offset, self.b + offset, device=device)
        return self.index + offset


class _RowwiseOptimizer(torch.optim.Optimizer):
    """Shared step loop and storage: each parameter with a gradient goes to `_update` block by
    block as (rows, fp32 gradient values); `_read` / `_write` convert weights and state between
    their storage dtype and fp32."""

    # key -> signed (linear int8 code) or not (log int8 code); set by subclasses
    _STATE_KEYS = {}

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
                if p.dtype not in WEIGHT_DTYPES:
                    raise TypeError(f"{type(self).__name__} updates float32 or bfloat16 "
                                    f"parameters; got a {p.dtype} parameter")
                rows, values = _rows_and_values(p, p.grad)
                state = self.state[p]
                self._init_state(p, group, state)
                if p.dtype != torch.float32:
                    state["rounding_step"] = state.get("rounding_step", 0) + 1
                w2, v2 = _as_rows(p), values.reshape(values.shape[0] if values.dim() else 1, -1)
                n = w2.shape[0] if rows is None else rows.shape[0]
                step = max(1, ROW_BLOCK_ELEMS // max(1, w2.shape[1]))
                for a in range(0, n, step):
                    b = min(n, a + step)
                    sel = _Rows(a, b, None if rows is None else rows[a:b])
                    g = v2[a:b].to(torch.float32)
                    self._update(p, w2, group, state, sel, g)
        return loss

    def load_state_dict(self, state_dict):
        """torch's loader casts every state tensor but "step" to the parameter's dtype, which
        would turn int8 codes, fp32 row scales and int64 row steps into bf16: the saved
        dtypes are put back here (values moved to the parameter's device only)."""
        super().load_state_dict(state_dict)
        by_id = dict(zip((i for g in state_dict["param_groups"] for i in g["params"]),
                         (p for g in self.param_groups for p in g["params"])))
        for pid, saved in state_dict["state"].items():
            p = by_id.get(pid)
            if p is None:
                continue
            for key, value in saved.items():
                if torch.is_tensor(value) and self.state[p][key].dtype != value.dtype:
                    self.state[p][key] = value.to(device=p.device, copy=True)

    # -- storage ---------------------------------------------------------------------------
    def _init_state(self, p, group, state):
        dtype = group["state_dtype"]
        for key in self._STATE_KEYS:
            if key in state:
                continue
            if dtype == torch.int8:
                state[key] = torch.zeros(p.shape, dtype=torch.int8, device=p.device)
                state[key + "_scale"] = torch.zeros(_as_rows(p).shape[0], device=p.device)
            else:
                state[key] = torch.zeros_like(p, dtype=dtype)

    def _read(self, state, key, sel: _Rows, factor: float = 1.0) -> torch.Tensor:
        """fp32 copy of `factor` x state `key` on the block's rows (the factor folds into the
        int8 row scale: no extra pass)."""
        t = _as_rows(state[key])
        if t.dtype == torch.int8:
            return decode_rows(sel.take(t), sel.take(state[key + "_scale"]) * factor,
                               self._STATE_KEYS[key])
        out = sel.take(t).to(torch.float32)
        return out.mul_(factor) if factor != 1.0 else out

    def _write(self, state, key, sel: _Rows, value: torch.Tensor) -> None:
        """Store fp32 `value` (consumed) as state `key` on the block's rows."""
        t = _as_rows(state[key])
        if t.dtype == torch.int8:
            codes, scale = encode_rows(value, self._STATE_KEYS[key])
            sel.put(t, codes)
            sel.put(state[key + "_scale"], scale)
        else:
            sel.put(t, value.to(t.dtype))

    def _write_weight(self, p, w2, group, state, sel: _Rows, w: torch.Tensor) -> None:
        """Store fp32 rows `w` (consumed) into a low-precision parameter."""
        bits = None
        if group["rounding"] == "stochastic":
            offset = int(getattr(p, "row_offset", 0))
            bits = rounding_bits(group["seed"], state["rounding_step"],
                                 sel.global_ids(offset, p.device), w.shape[1])
        sel.put(w2, round_to_bf16(w, bits))

    def _update(self, p, w2, group, state, sel, g):  # pragma: no cover - abstract
        raise NotImplementedError


class SparseSGD(_RowwiseOptimizer):
    """SGD with momentum and L2 weight decay, updating only rows that have gradient.

    Per touched row: m = momentum * m + (g + weight_decay * w); w -= lr * m
    (torch.optim.SGD with dampening=0, nesterov=False; a fresh row's m starts at 0, which
    equals torch's first-step m = g).
    state_dtype: momentum storage (float32, bfloat16, float16, int8). rounding / seed: how a
    bfloat16 parameter is written back (module docstring).
    """

    _STATE_KEYS = {"momentum_buffer": True}

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9,
                 weight_decay: float = 5e-4, state_dtype: torch.dtype = torch.float32,
                 rounding: str = "stochastic", seed: int = 0):
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        _check_common(lr, weight_decay, state_dtype, rounding)
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay,
                                      state_dtype=state_dtype, rounding=rounding, seed=int(seed)))

    def _init_state(self, p, group, state):
        if group["momentum"]:
            super()._init_state(p, group, state)

    def _update(self, p, w2, group, state, sel, g):
        lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]
        exact = p.dtype == torch.float32
        w = sel.take(w2).to(torch.float32) if (wd or not exact) else None   # (c, D) fp32
        if mu:  # m = momentum * m + g + weight_decay * w
            d = self._read(state, "momentum_buffer", sel, factor=mu).add_(g)
            if wd:
                d.add_(w, alpha=wd)
        else:
            d = g.add(w, alpha=wd) if wd else g
        if exact:
            if sel.index is None:
                w2[sel.a:sel.b].add_(d, alpha=-lr)
            else:
                w2.index_add_(0, sel.index, d, alpha=-lr)    # w -= lr * m on the touched rows
        else:
            self._write_weight(p, w2, group, state, sel, w.add_(d, alpha=-lr))
        if mu:
            self._write(state, "momentum_buffer", sel, d)


class SparseAdamW(_RowwiseOptimizer):
    """AdamW (decoupled weight decay) updating only rows that have gradient.

    Each row keeps its own step count for bias correction, so a row sampled k times has had
    exactly the k Adam updates torch.optim.AdamW would apply to a parameter updated k times.
    state_dtype: storage of exp_avg / exp_avg_sq (float32, bfloat16, float16, int8); rounding /
    seed: how a bfloat16 parameter is written back (module docstring).
    """

    _STATE_KEYS = {"exp_avg": True, "exp_avg_sq": False}

    def __init__(self, params: Iterable, lr: float = 1e-3,
                 betas: Tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.01,
                 state_dtype: torch.dtype = torch.float32, rounding: str = "stochastic",
                 seed: int = 0):
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"betas must be in [0, 1), got {betas!r}")
        if not eps > 0.0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        _check_common(lr, weight_decay, state_dtype, rounding)
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      state_dtype=state_dtype, rounding=rounding, seed=int(seed)))

    def _init_state(self, p, group, state):
        super()._init_state(p, group, state)
        if "step" not in state:
            state["step"] = torch.zeros(_as_rows(p).shape[0], dtype=torch.int64, device=p.device)

    def _update(self, p, w2, group, state, sel, g):
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        w = sel.take(w2).to(torch.float32)
        m = self._read(state, "exp_avg", sel).mul_(b1).add_(g, alpha=1 - b1)
        v = self._read(state, "exp_avg_sq", sel).mul_(b2).addcmul_(g, g, value=1 - b2)
        t = sel.take(state["step"]) + 1                                    # (c,)
        bc1 = (1 - b1 ** t.double()).float().unsqueeze(1)
        bc2 = (1 - b2 ** t.double()).float().unsqueeze(1)
        w.mul_(1 - lr * wd)
        denom = (v / bc2).sqrt_().add_(eps)
        w.addcdiv_(m, denom.mul_(bc1), value=-lr)
        if p.dtype == torch.float32:
            sel.put(w2, w)
        else:
            self._write_weight(p, w2, group, state, sel, w)
        self._write(state, "exp_avg", sel, m)
        self._write(state, "exp_avg_sq", sel, v)
        sel.put(state["step"], t)


def make_head_optimizer(name: str, params, *, lr: float, momentum: float = 0.9,
                        weight_decay: float = 5e-4, betas=(0.9, 0.999), eps: float = 1e-8,
                        state_dtype=torch.float32, rounding: str = "stochastic", seed: int = 0
                        ) -> torch.optim.Optimizer:
    """The head optimizer a config names (HEAD_OPTIMIZERS); state_dtype, rounding and seed are
    the row-wise optimizers' (refused for torch's, which keep fp32 state)."""
    if name in ("sgd", "adamw") and (state_dtype != torch.float32):
        raise ValueError(f"state_dtype {dtype_name(state_dtype)} needs sparse_sgd or "
                         f"sparse_adamw, not {name}")
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    low = dict(state_dtype=state_dtype, rounding=rounding, seed=seed)
    if name == "sparse_sgd":
        return SparseSGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay, **low)
    if name == "sparse_adamw":
        return SparseAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **low)
    raise ValueError(f"head optimizer must be one of {', '.join(HEAD_OPTIMIZERS)}, got {name!r}")
