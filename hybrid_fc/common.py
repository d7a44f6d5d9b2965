"""Three small facts the whole package shares, each defined once here (no torch.distributed).

* `split_span`: the uneven contiguous split of n items over k parts, the first n % k parts one
  longer. It is insightface's class split (rank r of W owns classes [start, start + num_local)
  with num_local = C // W + (r < C % W), start = C // W * r + min(r, C % W)), and the same split
  serves every other "this rank's slice" (evaluation images, extraction files, loader workers).
* `stable_seed`: the one seed hash: a 64-bit seed from any tuple of ints and strings, the same in
  every process, run and machine (Python's hash() is salted per process). Every derived random
  stream (center init, sampler, augmentation, data order) is seeded through it.
* Sizes and counts on command lines and in configs: `parse_size` reads bytes with the usual unit
  rule, decimal `KB MB GB TB` (10^3 ...) and binary `KiB MiB GiB TiB` (2^10 ...);
  `parse_count` reads class counts (300M = 3 x 10^8); `format_bytes` prints GB (10^9).
"""
import hashlib
import re
from typing import Tuple, Union

__all__ = ["split_span", "stable_seed", "parse_size", "parse_count", "format_bytes"]


def split_span(n: int, index: int, parts: int) -> Tuple[int, int]:
    """[lo, hi) of piece `index` when n items are cut into `parts` contiguous pieces, the first
    n % parts pieces one item longer (pieces may be empty when n < parts)."""
    base, rem = divmod(n, parts)
    lo = base * index + min(index, rem)
    return lo, lo + base + (1 if index < rem else 0)


def stable_seed(*parts) -> int:
    """A seed in [0, 2^64) from any tuple of ints / strings, stable across processes and runs
    (blake2b of the tuple's repr; torch.Generator.manual_seed takes the whole range)."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


_SIZE_UNITS = {"": 1, "b": 1, "k": 10 ** 3, "kb": 10 ** 3, "m": 10 ** 6, "mb": 10 ** 6,
               "g": 10 ** 9, "gb": 10 ** 9, "t": 10 ** 12, "tb": 10 ** 12, "kib": 2 ** 10,
               "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}
_COUNT_UNITS = {"": 1, "k": 10 ** 3, "m": 10 ** 6, "b": 10 ** 9, "g": 10 ** 9}


def parse_size(text: Union[str, int, float], what: str = "size") -> int:
    """'80GB' -> 80 x 10^9 bytes, '80GiB' -> 80 x 2^30, '256MB' -> 256 x 10^6; a plain number is
    bytes. ValueError naming `what` otherwise."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-z]*)\s*", str(text).lower())
        if not m or m.group(2) not in _SIZE_UNITS:
            raise ValueError(f"{what} {text!r}: expected a number of bytes with an optional "
                             "unit (KB MB GB TB = 10^3.., KiB MiB GiB TiB = 2^10..), e.g. 80GB")
        value = float(m.group(1)) * _SIZE_UNITS[m.group(2)]
    if value < 1:
        raise ValueError(f"{what} {text!r} must be at least 1 byte")
    return int(value)


def parse_count(text: Union[str, int]) -> int:
    """'300M' -> 300_000_000; '2.5k' -> 2500; '1B' -> 10^9; plain integers pass through."""
    if isinstance(text, int) and not isinstance(text, bool):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbg]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"not a count: {text!r} (e.g. 300000000, 300M, 2.5k)")
    value = float(m.group(1)) * _COUNT_UNITS[m.group(2)]
    if value != int(value):
        raise ValueError(f"not a whole count: {text!r}")
    return int(value)


def format_bytes(n: float) -> str:
    """Bytes as decimal GB (10^9), the unit of GPU memory sizes."""
    return f"{n / 1e9:,.2f} GB"
