"""Low-precision storage of class centers and head-optimizer state (pure tensor math).

Used by hybrid_fc.head.optim (updates), hybrid_fc.head.loss (reads), hybrid_fc.head.partial_fc
(init), checkpoints and export; no torch.distributed here:

* **Counter-based random bits** (`rounding_bits`): 16 uniform bits for element (row, col) at
  step `counter` of a stream `seed`, from a 32-bit integer hash (no generator state). The bits of
  a row depend on its *global* row id, so a class's rounding does not depend on how classes are
  split over ranks, on the device, or on which other rows were updated in the step; a stream is
  saved as two integers. For speed the bits of an element are h(row) XOR h'(col) with a fresh
  pair of hashes per step: every element is uniform and independent across steps (all that the
  unbiasedness of stochastic rounding needs); elements of one row within one step share h(row).
  `stream` selects independent sub-streams of one seed (centers 0, 4-bit state 1, ...).
* **Stochastic rounding to bfloat16** (`round_to_bf16`): add 16 random bits to the fp32 bit
  pattern below bf16's last mantissa bit, then truncate. Rounds up with probability equal to the
  distance from the lower neighbour over the spacing, so E[round(x)] = x: updates smaller than
  bf16's spacing (2^-8 relative) are kept on average instead of being lost. Round-to-nearest
  stays available (no bits).
* **8-bit row codes** (`encode_rows` / `decode_rows`): one scale per row (the row's absolute
  max, fp32) and 8-bit codes, in the manner of bitsandbytes' blockwise 8-bit optimizers with a
  block = one class center. Signed values (int8 class centers, momentum, Adam's first moment)
  use a linear code (-127..127 x absmax / 127): a center or its momentum is dense across its D
  entries, so the relative RMS error is ~0.7% of the row's RMS for Gaussian rows. With random
  bits the linear code rounds stochastically, q = floor(x / absmax * 127 + u), u = bits / 2^16,
  so E[q] is exact (to 2^-16 of a step): class centers keep updates far below a step on
  average, as bf16 centers do. Non-negative state (Adam's second moment, whose entries span
  many orders of magnitude) uses a logarithmic code: value = absmax * 2^(-q / 8), q = 0..254,
  255 = exactly zero (relative error <= 4.4%, range 2^-31.75).
* **4-bit row codes** (`encode_rows4` / `decode_rows4`): signed linear code -7..7 x absmax / 7,
  two's-complement nibbles, two per byte (a row's first ceil(D/2) entries in the low nibbles,
  the rest in the high ones) and one fp32 scale per row: 0.5 + 4/D bytes per element. Always rounded
  stochastically: to nearest, a momentum entry below absmax / 14 would be stored as 0 at every
  step, and an SGD coordinate whose momentum stays that small would move at lr x g instead of
  lr x g / (1 - momentum).
* **Row codes as objects** (`FloatCode`, `Int8Code`, `Int4Code`; `weight_code`, `state_code`):
  each storage allocates, encodes and decodes a block of rows as a dict of parts ("" the values
  or codes, "_scale" the per-row scale), so the optimizers, the loss, init, checkpoints and
  export handle every storage through one interface instead of a branch per dtype.

Why int8 and not float8 (torch.float8_e4m3fn with a per-row scale) for 8-bit centers, measured
on this project's CPUs (benchmarks/RESULTS.md): on Gaussian rows the int8 linear code's error is
0.69% of the row's norm vs 2.6% for e4m3 (3 mantissa bits), one stochastic-rounding write adds
3.8x less noise, a drift of 300 small updates ends 0.17 vs 0.32 of its length off, and decoding
int8 on a CPU is 11x faster (float8 -> fp32 has no vectorized CPU path in torch 2.13).
"""
import math
from typing import Dict, Optional

import torch

__all__ = ["rounding_bits", "round_to_bf16", "encode_rows", "decode_rows", "encode_rows4",
           "decode_rows4", "FloatCode", "Int8Code", "Int4Code", "weight_code", "state_code",
           "STATE_DTYPES", "WEIGHT_DTYPES", "ROUNDINGS", "parse_dtype", "dtype_name",
           "dtype_names", "dtype_bytes"]

WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.int8)
"""Storage of the class centers (int8: linear codes with one fp32 scale per center)."""
STATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8, torch.int4)
"""Storage of the row-wise optimizers' state (int8: one fp32 scale per row and moment; int4:
momentum / Adam's first moment in 4-bit codes, two per byte, with one fp32 scale per row, Adam's
second moment stays int8)."""
ROUNDINGS = ("stochastic", "nearest", "feedback")
"""How the row-wise optimizers write fp32 updates back into low-precision centers: stochastic
rounding, round-to-nearest (the ablation), or error feedback (to nearest, the residual kept as
one more row state in the optimizer's state_dtype and added back at the row's next update)."""

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


def dtype_bytes(name: str) -> float:
    """Bytes per element of a storage given by name ('bfloat16' -> 2, 'int4' -> 0.5: two codes
    per byte; torch.int4 is a name here, it has no storage of its own). Per-row scales are not
    included (the planner adds them)."""
    if name == "int4":
        return 0.5
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


def rounding_bits(seed: int, counter: int, rows: torch.Tensor, width: int,
                  stream: int = 0) -> torch.Tensor:
    """(len(rows), width) int32 in [0, 2^16): the random bits of step `counter` for `rows`.

    rows: (c,) int64 *global* row ids (class ids). stream: an independent sub-stream of `seed`
    (counters stay below 2^56). Cost: two hashes of c + width integers and one XOR pass over
    the (c, width) output.
    """
    key = _mix64(_mix64(int(seed)) ^ int(counter) ^ (int(stream) << 56))
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


# -- 8-bit and 4-bit row codes -------------------------------------------------------------------
def _absmax(x: torch.Tensor, signed: bool):
    """(c,) row absmax and (c, 1) the same with zero rows as 1 (two plain reductions: torch's
    inf-norm is ~10x slower on CPU)."""
    scale = torch.maximum(x.amax(1), x.amin(1).neg_()) if signed else x.amax(1)
    return scale, torch.where(scale > 0, scale, torch.ones_like(scale)).unsqueeze(1)


def _round(y: torch.Tensor, bits: Optional[torch.Tensor]) -> torch.Tensor:
    """In place: floor(y + bits / 2^16) (stochastic, unbiased) or round to nearest (no bits)."""
    if bits is None:
        return y.round_()
    return y.add_(bits.float(), alpha=1.0 / 65536).floor_()


def encode_rows(x: torch.Tensor, signed: bool, bits: Optional[torch.Tensor] = None):
    """(codes int8 like x, scale fp32 (rows,)) of a 2-D fp32 tensor, one scale per row.

    Consumes `x`. signed: linear code x / absmax * 127, rounded stochastically with `bits`
    ((x.shape) int32 in [0, 2^16)) or to nearest; else (x >= 0) the log code (to nearest).
    """
    scale, safe = _absmax(x, signed)
    if signed:
        codes = _round(x.mul_(127.0 / safe), bits).clamp_(-127, 127).to(torch.int8)
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


def encode_rows4(x: torch.Tensor, bits: torch.Tensor):
    """(codes uint8 (c, ceil(D/2)), scale fp32 (c,)) of a signed (c, D) fp32 tensor: the 4-bit
    linear code q = floor(x / absmax * 7 + u) in -7..7 as a two's-complement nibble; entry j
    of a row in the low nibble of byte j for j < ceil(D/2), else the high nibble of byte
    j - ceil(D/2) (contiguous halves: no strided passes). Consumes `x`; `bits` as for
    encode_rows (stochastic rounding always)."""
    scale, safe = _absmax(x, True)
    q = _round(x.mul_(7.0 / safe), bits).clamp_(-7, 7).to(torch.int8).view(torch.uint8)
    half = (q.shape[1] + 1) // 2
    codes = q[:, :half].bitwise_and(15)
    codes[:, :q.shape[1] - half].bitwise_or_(q[:, half:].bitwise_left_shift(4))
    return codes, scale


def decode_rows4(codes: torch.Tensor, scale: torch.Tensor, width: int) -> torch.Tensor:
    """fp32 (c, width) rows from `encode_rows4` output: nibbles sign-extended by an arithmetic
    shift of the bytes as int8 (low nibbles shifted up first), then one pass of the row
    factor."""
    half = codes.shape[1]
    q = torch.cat([codes.bitwise_left_shift(4), codes[:, :width - half]], 1)
    return q.view(torch.int8).bitwise_right_shift_(4).float().mul_((scale / 7.0).unsqueeze(1))


# -- storages as objects -----------------------------------------------------------------------
def _rows_width(shape) -> tuple:
    """(rows, entries per row) of a tensor shape seen as rows (a 0-dim tensor is one row)."""
    rows = shape[0] if len(shape) else 1
    return rows, (math.prod(shape) // rows if rows else 0)


class FloatCode:
    """Rows stored as fp32, bf16 or fp16 (part ""): bf16 written with stochastic rounding when
    given bits, every other case to nearest."""

    parts = ("",)
    stochastic_only = False

    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype

    def empty(self, shape, device=None) -> Dict[str, torch.Tensor]:
        """Zero parts for a tensor of `shape` (rows = its first dimension)."""
        return {"": torch.zeros(shape, dtype=self.dtype, device=device)}

    def encode(self, x: torch.Tensor, bits=None) -> Dict[str, torch.Tensor]:
        """Parts of fp32 rows `x` (consumed)."""
        if self.dtype == torch.bfloat16:
            return {"": round_to_bf16(x, bits)}
        return {"": x.to(self.dtype)}

    def decode(self, parts: Dict[str, torch.Tensor], factor: float = 1.0) -> torch.Tensor:
        """fp32 rows times `factor` (the parts are copies the caller gives away: fp32 rows come
        back as the same tensor)."""
        out = parts[""].float()
        return out.mul_(factor) if factor != 1.0 else out


class _ScaledCode:
    """Rows as codes (part "") and one fp32 scale per row ("_scale"); subclasses give the
    code's own `_encode(x, bits)` -> (codes, scale) and `_decode(codes, scale)`."""

    parts = ("", "_scale")

    def encode(self, x: torch.Tensor, bits=None) -> Dict[str, torch.Tensor]:
        codes, scale = self._encode(x, bits)
        return {"": codes, "_scale": scale}

    def decode(self, parts: Dict[str, torch.Tensor], factor: float = 1.0) -> torch.Tensor:
        """The factor folds into the row scales: no extra pass."""
        scale = parts["_scale"] * factor if factor != 1.0 else parts["_scale"]
        return self._decode(parts[""], scale)


class Int8Code(_ScaledCode):
    """int8 codes and a scale per row: the linear code (signed) or the log code
    (non-negative), `encode_rows`."""

    dtype = torch.int8
    stochastic_only = False

    def __init__(self, signed: bool):
        self.signed = signed

    def empty(self, shape, device=None) -> Dict[str, torch.Tensor]:
        return {"": torch.zeros(shape, dtype=torch.int8, device=device),
                "_scale": torch.zeros(_rows_width(shape)[0], device=device)}

    def _encode(self, x, bits):
        return encode_rows(x, self.signed, bits)

    def _decode(self, codes, scale):
        return decode_rows(codes, scale, self.signed)


class Int4Code(_ScaledCode):
    """Signed rows of `width` entries as packed 4-bit codes (uint8 (rows, ceil(width/2))) and
    a scale per row, `encode_rows4`; stochastic rounding only."""

    dtype = torch.int4
    stochastic_only = True

    def __init__(self, width: int):
        self.width = width

    def empty(self, shape, device=None) -> Dict[str, torch.Tensor]:
        rows, width = _rows_width(shape)
        return {"": torch.zeros((rows, (width + 1) // 2), dtype=torch.uint8, device=device),
                "_scale": torch.zeros(rows, device=device)}

    def _encode(self, x, bits):
        return encode_rows4(x, bits)

    def _decode(self, codes, scale):
        return decode_rows4(codes, scale, self.width)


def weight_code(dtype: torch.dtype):
    """The storage of class centers of `dtype` (WEIGHT_DTYPES)."""
    return Int8Code(signed=True) if dtype == torch.int8 else FloatCode(dtype)


def state_code(dtype: torch.dtype, signed: bool, width: int):
    """The storage of an optimizer state tensor of `dtype` (STATE_DTYPES) with rows of `width`:
    signed (momentum, first moment) or non-negative (second moment, which stays int8 under
    int4: 16 levels cannot span its range)."""
    if dtype == torch.int4:
        return Int4Code(width) if signed else Int8Code(signed=False)
    if dtype == torch.int8:
        return Int8Code(signed)
    return FloatCode(dtype)
