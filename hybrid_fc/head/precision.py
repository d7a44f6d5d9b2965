"""Low-precision storage of class centers and head-optimizer state (pure tensor math).

Three pieces, used by hybrid_fc.head.optim; no torch.distributed here:

* **Counter-based random bits** (`rounding_bits`): 16 uniform bits for element (row, col) at
  step `counter` of a stream `seed`, from a 32-bit integer hash (no generator state). The bits of
  a row depend on its *global* row id, so a class's rounding does not depend on how classes are
  split over ranks, on the device, or on which other rows were updated in the step; a stream is
  saved as two integers. For speed the bits of an element are h(row) XOR h'(col) with a fresh
  pair of hashes per step: every element is uniform and independent across steps (all that the
  unbiasedness of stochastic rounding needs); elements of one row within one step share h(row).
* **Stochastic rounding to bfloat16** (`round_to_bf16`): add 16 random bits to the fp32 bit
  pattern below bf16's last mantissa bit, then truncate. Rounds up with probability equal to the
  distance from the lower neighbour over the spacing, so E[round(x)] = x: updates smaller than
  bf16's spacing (2^-8 relative) are kept on average instead of being lost. Round-to-nearest
  stays available (`stochastic=False`).
* **8-bit row state** (`encode_rows` / `decode_rows`): one scale per row (the row's absolute
  max, fp32) and 8-bit codes, in the manner of bitsandbytes' blockwise 8-bit optimizers with a
  block = one class center. Signed state (momentum, Adam's first moment) uses a linear code
  (-127..127 x absmax / 127): a center's momentum is dense across its D entries, so the
  relative RMS error is ~0.2-0.4% of the row's scale. Non-negative state (Adam's second
  moment, whose entries span many orders of magnitude) uses a logarithmic code: value =
  absmax * 2^(-q / 8), q = 0..254, 255 = exactly zero (relative error <= 4.4%, range 2^-31.75).
"""
from typing import Optional

import torch

__all__ = ["rounding_bits", "round_to_bf16", "encode_rows", "decode_rows", "STATE_DTYPES",
           "WEIGHT_DTYPES", "ROUNDINGS", "parse_dtype", "dtype_name", "dtype_names",
           "dtype_bytes"]

WEIGHT_DTYPES = (torch.float32, torch.bfloat16)
"""Storage of the class centers."""
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)
"""Storage of the row-wise optimizers' state (int8: one fp32 scale per row and moment)."""
ROUNDINGS = ("stochastic", "nearest")
"""How the row-wise optimizers write fp32 updates back into low-precision centers."""

_M32 = 0xFFFFFFFF
_K = 0x45D9F3B          # odd multiplier < 2^31: int64 products of 32-bit values never overflow
_LOG_STEPS = 8.0        # log code: 8 codes per octave
_LOG_ZERO = 255         # log code for an exact zero


def parse_dtype(name, allowed, what: str) -> torch.dtype:
    """'bfloat16' / 'bf16' / torch.bfloat16 -> torch.bfloat16, checked against `allowed`."""
    aliases = {"fp32": "float32", "float": "float32", "bf16": "bfloat16", "fp16": "float16",
               "half": "float16"}
    if isinstance(name, torch.dtype):
        dtype = name
    else:
        dtype = getattr(torch, aliases.get(str(name), str(name)), None)
    if not isinstance(dtype, torch.dtype) or dtype not in allowed:
        raise ValueError(f"{what} must be one of {', '.join(dtype_name(d) for d in allowed)}, "
                         f"got {name!r}")
    return dtype


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def dtype_names(dtypes) -> tuple:
    """('float32', 'bfloat16') for (torch.float32, torch.bfloat16): the names configs use."""
    return tuple(dtype_name(d) for d in dtypes)


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype given by name ('bfloat16' -> 2)."""
    return torch.empty((), dtype=getattr(torch, name)).element_size()


# -- counter-based random bits -------------------------------------------------------------
def _mix64(x: int) -> int:
    """splitmix64 finalizer on Python ints (exact, arbitrary precision)."""
    x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash of int64 values in [0, 2^32) (no overflow: products < 2^63)."""
    x = x ^ (x >> 16)
    x = (x * _K) & _M32
    x = x ^ (x >> 16)
    x = (x * _K) & _M32
    return x ^ (x >> 16)


def rounding_bits(seed: int, counter: int, rows: torch.Tensor, width: int) -> torch.Tensor:
    """(len(rows), width) int32 in [0, 2^16): the random bits of step `counter` for `rows`.

    rows: (c,) int64 *global* row ids (class ids). Cost: two hashes of c + width integers and one
    XOR pass over the (c, width) output.
    """
    key = _mix64(_mix64(int(seed)) ^ int(counter))
    k_row, k_col = key & _M32, (key >> 32) & _M32
    rows = rows.to(torch.int64)
    r = _mix32(((rows ^ (rows >> 32)) & _M32) ^ k_row) & 0xFFFF          # (c,)
    c = _mix32(torch.arange(width, device=rows.device, dtype=torch.int64) ^ k_col) & 0xFFFF
    return torch.bitwise_xor(r.to(torch.int32).unsqueeze(1), c.to(torch.int32).unsqueeze(0))


def round_to_bf16(x: torch.Tensor, bits: Optional[torch.Tensor]) -> torch.Tensor:
    """fp32 -> bf16, stochastically when `bits` ((x.shape) int32 in [0, 2^16)) is given, else to
    nearest. Consumes `x` (its memory is reused). inf and NaN stay what they are."""
    if x.dtype != torch.float32:
        raise TypeError(f"round_to_bf16 takes float32, got {x.dtype}")
    if bits is None:
        return x.to(torch.bfloat16)
    b = x.view(torch.int32)
    b.add_(bits).bitwise_and_(-65536)        # + U[0, 2^16) below bf16's last bit, truncate
    return b.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


# -- 8-bit row state ---------------------------------------------------------------------------
def encode_rows(x: torch.Tensor, signed: bool):
    """(codes int8 like x, scale fp32 (rows,)) of a 2-D fp32 tensor, one scale per row.

    Consumes `x`. signed: linear code round(x / absmax * 127); else (x >= 0) the log code.
    """
    # (c,) row absmax (two plain reductions: torch's inf-norm is ~10x slower on CPU)
    scale = torch.maximum(x.amax(1), x.amin(1).neg_()) if signed else x.amax(1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)
    if signed:
        codes = x.mul_(127.0 / safe).round_().to(torch.int8)
        return codes, scale
    zero = x <= 0
    q = x.div_(safe).log2_().mul_(-_LOG_STEPS).round_().clamp_(0, _LOG_ZERO - 1)
    q.masked_fill_(zero, _LOG_ZERO)
    return q.sub_(128).to(torch.int8), scale


def decode_rows(codes: torch.Tensor, scale: torch.Tensor, signed: bool) -> torch.Tensor:
    """fp32 rows from `encode_rows` output."""
    if signed:
        return codes.float().mul_((scale / 127.0).unsqueeze(1))
    q = codes.float().add_(128)
    out = q.mul(-1.0 / _LOG_STEPS).exp2_().mul_(scale.unsqueeze(1))
    return out.masked_fill_(q == _LOG_ZERO, 0.0)
