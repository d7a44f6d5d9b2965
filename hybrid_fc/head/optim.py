"""Head optimizers that update only the rows that received gradient.

With PartialFC(sparse_grad=True) the weight gradient is a sparse COO tensor over the sampled
rows; these optimizers touch only those rows: O(S * D) work and no (num_local, D) gradient.

Rows that were not sampled in a step are left exactly as they are: no weight decay, no momentum
decay, no Adam moment decay. Their state resumes when they are next sampled ("lazy" updates, as
in PaddlePaddle PLSC's sparse momentum and TensorFlow's LazyAdam). For a row that is sampled in
every step the update is identical to torch.optim.SGD / torch.optim.AdamW.

Dense gradients are accepted too and then update every row, exactly like the torch optimizers.

Storage (hybrid_fc.head.precision), everything computed in fp32 in between:
  * weights: fp32 (updated in place, the exact path), or bfloat16 / int8 with **no fp32 master
    copy** (PartialFC(weight_dtype=torch.bfloat16 or torch.int8)): each touched row is read as
    fp32, updated, and written back with stochastic rounding (`rounding="stochastic"`, the
    default) or to nearest (`rounding="nearest"`, the ablation). int8 centers are linear codes
    with one fp32 scale per row (`param.row_scale`, set by PartialFC), re-encoded from the
    updated row's absmax at every update. The random bits come from the optimizer's own
    counter-based stream: group["seed"] and a per-parameter step counter
    `state["rounding_step"]` (saved in `state_dict()` and in hybrid_fc checkpoints), keyed by
    *global* row id (`param.row_offset` + local row, set by PartialFC), so a resumed run rounds
    exactly as an uninterrupted one, at any number of ranks.
  * error feedback (`rounding="feedback"`): the row is written to nearest and what that loses
    (exact - stored) is kept as one more signed row state, `rounding_residual`, in
    `state_dtype`; the next update of the row starts from stored + residual. The loss reads the
    stored rows only; the optimizer sees the finer value. Stochastic rounding's error is a random
    walk (its variance grows with every write, by ~ code step x update size, and anneals only
    as sqrt(lr)); with feedback the stored row stays within about a code step of the exact one
    (an int4 residual adds 4 bits below int8's: 12 in all for 0.5 byte more per element).
  * state (`state_dtype`): float32, bfloat16, float16, int8 with one fp32 scale per row
    (`<key>_scale`): momentum / first moment in a linear code, the second moment in a log code;
    or int4: momentum / first moment as 4-bit linear codes, two per byte, with one fp32 scale
    per row, stochastically rounded from sub-stream 1 (2, ... for further signed keys) of the
    same counter-based bits; AdamW's second moment then stays int8 (16 levels cannot cover its
    range), so int4 AdamW state is 1.5 bytes per element against SGD's 0.5. At D=256 int8
    state costs 1.016 bytes per element and int4 0.516, instead of 4.
"""
from typing import Iterable, Optional, Tuple

import torch

from .precision import (ROUNDINGS, STATE_DTYPES, WEIGHT_DTYPES, dtype_name, rounding_bits,
                        state_code, weight_code)

__all__ = ["SparseSGD", "SparseAdamW", "HEAD_OPTIMIZERS", "make_head_optimizer"]

# Rows are updated in blocks of ~256K elements: the block's fp32 temporaries (1 MB each) stay
# in a CPU core's L2 cache between the ~20-30 passes of decode, update, stochastic rounding and
# encode (measured on this project's 2-core VM: int8 centers + int4 momentum 12-18 ns per
# element at 2^18, 19-30 at 2^22; bf16 + int8 7 vs 11; smaller blocks pay Python per block).
ROW_BLOCK_ELEMS = 1 << 18
RESIDUAL = "rounding_residual"
"""State key of the error-feedback residual (rounding="feedback")."""
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
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")


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


class _ParamStep:
    """One parameter's storage during one step: its weight code and its state codes
    (hybrid_fc.head.precision), read and written a block of rows at a time in fp32."""

    def __init__(self, p, group, state, state_keys):
        self.p, self.group, self.state = p, group, state
        self.w2 = _as_rows(p)
        self.exact = p.dtype == torch.float32
        self.weight_code = weight_code(p.dtype)
        scale = getattr(p, "row_scale", None)
        if "_scale" in self.weight_code.parts and scale is None:
            raise ValueError(f"a {p.dtype} parameter needs its per-row scales as "
                             "param.row_scale (PartialFC(weight_dtype=torch.int8) sets them)")
        self.weight_parts = dict(zip(self.weight_code.parts, (self.w2, scale)))
        width = self.w2.shape[1]
        self.feedback = not self.exact and group["rounding"] == "feedback"
        if self.feedback:  # the rounding residual: one more signed row state
            state_keys = dict(state_keys, **{RESIDUAL: True})
        self.codes = {key: state_code(group["state_dtype"], signed, width)
                      for key, signed in state_keys.items()}
        self.streams = {key: i + 1 for i, key in enumerate(state_keys)}
        self.offset = int(getattr(p, "row_offset", 0))

    @property
    def random(self) -> bool:
        """Whether this step draws rounding bits (and so advances the rounding stream)."""
        return not self.exact or any(c.stochastic_only for c in self.codes.values())

    def init_state(self) -> None:
        if not self.feedback:  # left by a run with rounding="feedback": the stored rows are the
            for key in [k for k in self.state if k.startswith(RESIDUAL)]:   # centers from now on
                del self.state[key]
        for key, code in self.codes.items():
            if key not in self.state:
                for suffix, t in code.empty(self.p.shape, self.p.device).items():
                    self.state[key + suffix] = t

    def _bits(self, sel, stream: int, width: int) -> torch.Tensor:
        return rounding_bits(self.group["seed"], self.state["rounding_step"],
                             sel.global_ids(self.offset, self.p.device), width, stream)

    def _parts(self, key: str, code):
        return {s: (_as_rows(self.state[key]) if not s else self.state[key + s])
                for s in code.parts}

    def read_weight(self, sel) -> torch.Tensor:
        """fp32 copy of the block's rows (decoded; with error feedback, plus the residual that
        the stored rows miss: the rows the optimizer updates)."""
        w = self.weight_code.decode({s: sel.take(t) for s, t in self.weight_parts.items()})
        return w.add_(self.read(RESIDUAL, sel)) if self.feedback else w

    def write_weight(self, sel, w: torch.Tensor) -> None:
        """Store fp32 rows `w` (consumed): as they are (fp32), else rounded stochastically from
        stream 0, to nearest, or to nearest with the residual w - stored kept as state
        (error feedback: it is added back at the row's next update)."""
        bits = None
        if not self.exact and self.group["rounding"] == "stochastic":
            bits = self._bits(sel, 0, w.shape[1])
        exact = w.clone() if self.feedback else None
        parts = self.weight_code.encode(w, bits)
        for suffix, value in parts.items():
            sel.put(self.weight_parts[suffix], value)
        if self.feedback:
            self.write(RESIDUAL, sel, exact.sub_(self.weight_code.decode(parts)))

    def read(self, key: str, sel, factor: float = 1.0) -> torch.Tensor:
        """fp32 copy of `factor` x state `key` on the block's rows (for scaled codes the factor
        folds into the row scale: no extra pass)."""
        code = self.codes[key]
        return code.decode({s: sel.take(t) for s, t in self._parts(key, code).items()}, factor)

    def write(self, key: str, sel, value: torch.Tensor) -> None:
        """Store fp32 `value` (consumed) as state `key` on the block's rows."""
        code = self.codes[key]
        bits = self._bits(sel, self.streams[key], value.shape[1]) if code.stochastic_only \
            else None
        parts = self._parts(key, code)
        for suffix, v in code.encode(value, bits).items():
            sel.put(parts[suffix], v)


class _RowwiseOptimizer(torch.optim.Optimizer):
    """Shared step loop: each parameter with a gradient goes to `_update` block by block as
    (rows, fp32 gradient values), with a `_ParamStep` that reads and writes its weight and
    state in their storage."""

    # key -> signed (linear code) or not (log code); set by subclasses
    _STATE_KEYS = {}

    def _state_keys(self, group):
        return self._STATE_KEYS

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
                    raise TypeError(f"{type(self).__name__} updates "
                                    f"{', '.join(dtype_name(d) for d in WEIGHT_DTYPES)} "
                                    f"parameters; got a {p.dtype} parameter")
                rows, values = _rows_and_values(p, p.grad)
                ps = _ParamStep(p, group, self.state[p], self._state_keys(group))
                self._init_state(ps)
                if ps.random:
                    ps.state["rounding_step"] = ps.state.get("rounding_step", 0) + 1
                v2 = values.reshape(values.shape[0] if values.dim() else 1, -1)
                n = ps.w2.shape[0] if rows is None else rows.shape[0]
                step = max(1, ROW_BLOCK_ELEMS // max(1, ps.w2.shape[1]))
                for a in range(0, n, step):
                    b = min(n, a + step)
                    sel = _Rows(a, b, None if rows is None else rows[a:b])
                    self._update(ps, sel, v2[a:b].to(torch.float32))
        return loss

    def load_state_dict(self, state_dict):
        """torch's loader casts every state tensor but "step" to the parameter's dtype, which
        would turn int8 / 4-bit codes, fp32 row scales and int64 row steps into bf16: the saved
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

    def _init_state(self, ps: _ParamStep) -> None:
        ps.init_state()

    def _update(self, ps: _ParamStep, sel: _Rows, g: torch.Tensor):  # pragma: no cover
        raise NotImplementedError


class SparseSGD(_RowwiseOptimizer):
    """SGD with momentum and L2 weight decay, updating only rows that have gradient.

    Per touched row: m = momentum * m + (g + weight_decay * w); w -= lr * m
    (torch.optim.SGD with dampening=0, nesterov=False; a fresh row's m starts at 0, which
    equals torch's first-step m = g).
    state_dtype: momentum storage (float32, bfloat16, float16, int8, int4). rounding / seed: how
    a bfloat16 or int8 parameter is written back (module docstring).
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

    def _state_keys(self, group):
        return self._STATE_KEYS if group["momentum"] else {}

    def _update(self, ps, sel, g):
        lr, mu, wd = ps.group["lr"], ps.group["momentum"], ps.group["weight_decay"]
        w = ps.read_weight(sel) if (wd or not ps.exact) else None   # (c, D) fp32
        if mu:  # m = momentum * m + g + weight_decay * w
            d = ps.read("momentum_buffer", sel, factor=mu).add_(g)
            if wd:
                d.add_(w, alpha=wd)
        else:
            d = g.add(w, alpha=wd) if wd else g
        if not ps.exact:
            ps.write_weight(sel, w.add_(d, alpha=-lr))
        elif sel.index is None:
            ps.w2[sel.a:sel.b].add_(d, alpha=-lr)
        else:
            ps.w2.index_add_(0, sel.index, d, alpha=-lr)    # w -= lr * m on the touched rows
        if mu:
            ps.write("momentum_buffer", sel, d)


class SparseAdamW(_RowwiseOptimizer):
    """AdamW (decoupled weight decay) updating only rows that have gradient.

    Each row keeps its own step count for bias correction, so a row sampled k times has had
    exactly the k Adam updates torch.optim.AdamW would apply to a parameter updated k times.
    state_dtype: storage of exp_avg / exp_avg_sq (float32, bfloat16, float16, int8, or int4:
    exp_avg 4-bit, exp_avg_sq int8); rounding / seed: how a bfloat16 or int8 parameter is
    written back (module docstring).
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

    def _init_state(self, ps):
        ps.init_state()
        if "step" not in ps.state:
            ps.state["step"] = torch.zeros(ps.w2.shape[0], dtype=torch.int64, device=ps.p.device)

    def _update(self, ps, sel, g):
        group = ps.group
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        w = ps.read_weight(sel)
        m = ps.read("exp_avg", sel).mul_(b1).add_(g, alpha=1 - b1)
        v = ps.read("exp_avg_sq", sel).mul_(b2).addcmul_(g, g, value=1 - b2)
        t = sel.take(ps.state["step"]) + 1                                 # (c,)
        bc1 = (1 - b1 ** t.double()).float().unsqueeze(1)
        bc2 = (1 - b2 ** t.double()).float().unsqueeze(1)
        w.mul_(1 - lr * wd)
        denom = (v / bc2).sqrt_().add_(eps)
        w.addcdiv_(m, denom.mul_(bc1), value=-lr)
        ps.write_weight(sel, w)
        ps.write("exp_avg", sel, m)
        ps.write("exp_avg_sq", sel, v)
        sel.put(ps.state["step"], t)


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
