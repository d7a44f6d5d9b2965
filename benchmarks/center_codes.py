"""Which 8-bit storage for class centers? int8 codes vs float8 (e4m3), both with one fp32 scale
per center (row), against bf16: precision, stochastic-rounding noise, drift, CPU speed.

    python benchmarks/center_codes.py          # 20,000 rows x 256; ~1 min on one core

1. Representation error of rows rounded to nearest, on Gaussian, Laplace and Student-t(3) rows
   (centers are dense across their D entries): relative RMS ||Q(w) - w|| / ||w|| and mean
   1 - cos(Q(w), w) (the loss sees only directions).
2. One stochastic-rounding write of a row that moved by 0.1% of its scale: the noise it adds
   (relative to ||w||), and |mean of 200 draws - exact| over what an unbiased rounding leaves
   by chance (the RMS noise / sqrt(200)): about 1 when unbiased.
3. A drift: 300 writes of w <- Q(w + u), u a fixed direction of 0.2% of ||w|| each: how far the
   end point is from the exact one, relative to the distance travelled (stochastic rounding and
   to nearest).
4. CPU time (one thread) to decode and to encode (stochastically) a 4096 x 256 block.

int8 and bf16 are hybrid_fc.head.precision's own code (encode_rows / decode_rows,
round_to_bf16) with its counter-based bits (rounding_bits). float8 is written here (torch has
no stochastic rounding to it): the row is scaled so that its absmax is e4m3's largest value
448, 16 random bits are added to the fp32 bit pattern at the 20 bits below e4m3's 3 mantissa
bits and the result truncated (exact in e4m3's normal range); values below e4m3's smallest
normal 2^-6 are rounded on its fixed subnormal grid 2^-9. The last printed line is one JSON
object (also written to --json).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from hybrid_fc.head.precision import (decode_rows, encode_rows, round_to_bf16,  # noqa: E402
                                      rounding_bits)

_STEP = [0]  # a fresh counter of the rounding stream for every stochastic write


def _bits(x: torch.Tensor) -> torch.Tensor:
    _STEP[0] += 1
    return rounding_bits(0, _STEP[0], torch.arange(x.shape[0]), x.shape[1])


def q_int8(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    codes, scale = encode_rows(x.clone(), True, _bits(x) if stochastic else None)
    return decode_rows(codes, scale, True)


def q_bf16(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    return round_to_bf16(x.clone(), _bits(x) if stochastic else None).float()


def encode_fp8(x: torch.Tensor, stochastic: bool):
    """(e4m3 codes, fp32 row scales): row absmax -> 448."""
    scale = x.abs().amax(1, keepdim=True).clamp_min(1e-30)
    y = x * (448.0 / scale)
    if stochastic:
        bits = _bits(x)
        normal = (y.view(torch.int32) + (bits << 4)) & ~((1 << 20) - 1)
        sub = torch.floor(y * 512 + bits.float() / 65536) / 512
        y = torch.where(y.abs() < 2.0 ** -6, sub, normal.view(torch.float32))
    return y.to(torch.float8_e4m3fn), scale


def q_fp8(x: torch.Tensor, stochastic: bool) -> torch.Tensor:
    codes, scale = encode_fp8(x, stochastic)
    return codes.float() * (scale / 448.0)


STORAGES = {"bf16": q_bf16, "int8": q_int8, "float8_e4m3fn": q_fp8}


def representation(rows: int, dim: int):
    g = torch.Generator().manual_seed(0)
    sets = {"gaussian": torch.randn(rows, dim, generator=g),
            "laplace": torch.distributions.Laplace(0.0, 1.0).sample((rows, dim)),
            "student_t3": torch.distributions.StudentT(3.0).sample((rows, dim))}
    out = {}
    for name, w in sets.items():
        w = w * 0.01
        for code, q in STORAGES.items():
            e = q(w, False)
            cos = torch.nn.functional.cosine_similarity(e, w, dim=1)
            out[f"{name}/{code}"] = dict(
                rel_rms=((e - w).norm(dim=1) / w.norm(dim=1)).mean().item(),
                one_minus_cos=(1 - cos).mean().item())
    return out


def one_write(rows: int, dim: int, draws: int = 200):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(rows, dim, generator=g) * 0.01
    x = w + torch.randn(rows, dim, generator=g) * 1e-5        # moved by 0.1% of the scale
    out = {}
    for code, q in STORAGES.items():
        total, sq = torch.zeros_like(x), torch.zeros(rows)
        for _ in range(draws):
            r = q(x, True)
            sq += (r - x).norm(dim=1) ** 2
            total += r
        rms = (sq / draws).sqrt()                                   # (rows,) noise of a write
        out[code] = dict(noise=(rms / w.norm(dim=1)).mean().item(),
                         bias_over_chance=((total / draws - x).norm(dim=1)
                                           / (rms / draws ** 0.5)).mean().item())
    return out


def drift(rows: int, dim: int, steps: int = 300):
    g = torch.Generator().manual_seed(2)
    w0 = torch.randn(rows, dim, generator=g) * 0.01
    u = torch.randn(rows, dim, generator=g)
    u = u / u.norm(dim=1, keepdim=True) * w0.norm(dim=1, keepdim=True) * 2e-3
    exact = w0 + steps * u
    out = {}
    for code, q in STORAGES.items():
        for stochastic in (True, False):
            x = q(w0, False)
            for _ in range(steps):
                x = q(x + u, stochastic)
            err = ((x - exact).norm(dim=1) / (steps * u).norm(dim=1)).mean().item()
            out[f"{code}/{'stochastic' if stochastic else 'nearest'}"] = err
    return out


def speed(dim: int, reps: int = 50):
    torch.set_num_threads(1)
    x = torch.randn(4096, dim)
    codes8, scale8 = encode_rows(x.clone(), True)
    codes_f8, scale_f8 = encode_fp8(x, False)
    bf = x.bfloat16()

    def ms(fn):
        fn()
        t0 = time.process_time()
        for _ in range(reps):
            fn()
        return (time.process_time() - t0) / reps * 1e3
    return {"decode_ms": {"bf16": ms(lambda: bf.float()),
                          "int8": ms(lambda: decode_rows(codes8, scale8, True)),
                          "float8_e4m3fn": ms(lambda: codes_f8.float().mul_(scale_f8 / 448.0))},
            "encode_stochastic_ms": {code: ms(lambda q=q: q(x, True)) for code, q in
                                     STORAGES.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--json", default=None, help="also write the result to this file")
    args = ap.parse_args(argv)
    result = {"representation": representation(args.rows, args.dim),
              "one_write": one_write(min(args.rows, 2000), args.dim),
              "drift": drift(min(args.rows, 2000), args.dim), "speed": speed(args.dim)}
    for section, values in result.items():
        print(f"{section}:")
        for key, value in values.items():
            print(f"  {key}: " + (", ".join(f"{k} {v:.3g}" for k, v in value.items())
                                  if isinstance(value, dict) else f"{value:.3g}"))
    print(json.dumps(result), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
