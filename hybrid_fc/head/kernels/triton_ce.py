"""Triton kernels for one rank's part of the sampled margin softmax (no collectives here).

The head scores N gathered, normalized embeddings E (N, D) against S sampled rows of its shard
W[index] (stored fp32 or bf16, or int8 codes with one fp32 scale per row: each tile of codes is
decoded in the kernel, code x scale / 127 in fp32, exactly as the torch path decodes it),
logits = s * <e, w> / ||w|| with the margin-adjusted target logit put in each row's target
column. The (N, S) logits never exist in memory:

  forward_stats: per (block of rows, run of column blocks) program, the logits tile is computed
    on chip (dot over D in BLOCK_D steps, fp32 accumulation) and folded into a running row max
    and sum of exp (online log-sum-exp). Output: (P, N) partial maxima and sums, P = programs
    along S (few hundred at most), merged here into this rank's (N,) max and sum. The cross-rank
    max and sum all-reduces stay in hybrid_fc.head.loss.
  backward: each (row block, column block) program recomputes its logits tile, forms
    d loss / d cos (probabilities times the row factor, the target column replaced by the
    margin's gradient), and adds its contributions to d E (N, D) and to B = dlog^T E (S, D) with
    fp32 atomic adds (so on a GPU the order of the sums, and the last bits, vary run to run).
    hybrid_fc.head.loss turns B into the rows' gradient (projection off the row direction),
    the same code the torch path uses.

Precision mirrors the torch path (hybrid_fc.head.loss.operand): the dot runs in the embeddings' dtype
(fp32 as IEEE fp32, never TF32; bf16/fp16 on tensor cores) with fp32 accumulation; raw rows are
cast to that dtype and 1/||w|| scales the logit columns, except for fp16, whose narrow exponent
range would lose the small elements of low-norm rows: there rows are normalized in fp32 before
the cast. The target logits (N,) come in already computed by hybrid_fc.head.margins, so every
margin that module defines runs here unchanged.

Kernels are decorated when this module is imported; TRITON_INTERPRET=1 must be set before that
to run them on CPU tensors (tests). Shapes: any N, S, D (masked); BLOCK_* >= 16 (tl.dot).
"""
import torch
import triton
import triton.language as tl

__all__ = ["INTERPRETED", "BLOCKS", "forward_stats", "backward"]

# Tile sizes (powers of two, >= 16) and the number of programs the forward aims for along S.
# GPU defaults untuned (no GPU has been measured); tests set small ones to get many blocks.
BLOCKS = {"n": 64, "s": 64, "d": 64, "programs": 2048, "num_warps": 4}


@triton.jit
def _row_factor(sc_ptr, rows, smask, SCALED: tl.constexpr):
    """(BS,) fp32 decode factor of int8 rows (their scale / 127), or a placeholder."""
    if SCALED:
        return tl.load(sc_ptr + rows, mask=smask, other=0.0) / 127.0
    return tl.zeros(rows.shape, dtype=tl.float32)


@triton.jit
def _load_rows(w_ptr, rows, smask, rd, dmask, stride_w, factor, SCALED: tl.constexpr):
    """(BS, BD) tile of the stored rows: as stored, or (SCALED) int8 codes decoded to fp32."""
    w = tl.load(w_ptr + rows[:, None] * stride_w + rd[None, :],
                mask=smask[:, None] & dmask[None, :], other=0)
    if SCALED:
        w = w.to(tl.float32) * factor[:, None]
    return w


@triton.jit
def _inv_norm_kernel(w_ptr, sc_ptr, idx_ptr, inv_ptr, S, D, stride_w,
                     BS: tl.constexpr, BD: tl.constexpr, SCALED: tl.constexpr):
    """inv[j] = 1 / max(||W[index[j]]||, 1e-12) in fp32, for a block of BS sampled rows."""
    rs = tl.program_id(0) * BS + tl.arange(0, BS)
    smask = rs < S
    rows = tl.load(idx_ptr + rs, mask=smask, other=0)
    factor = _row_factor(sc_ptr, rows, smask, SCALED)
    acc = tl.zeros([BS], dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        w = _load_rows(w_ptr, rows, smask, rd, rd < D, stride_w, factor, SCALED).to(tl.float32)
        acc += tl.sum(w * w, axis=1)
    tl.store(inv_ptr + rs, 1.0 / tl.maximum(tl.sqrt(acc), 1e-12), mask=smask)


@triton.jit
def _cast(x, like_ptr, EMU: tl.constexpr):
    """x rounded to the element type of `like_ptr` (to nearest even). EMU (bf16 under the interpreter, whose bf16
    casts truncate and whose bf16 tl.dot multiplies the raw bit patterns): the rounding is done
    on the fp32 bits and the value stays fp32, so the dot runs on the same rounded operands."""
    if EMU:
        b = x.to(tl.float32).to(tl.uint32, bitcast=True)
        b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
        return b.to(tl.float32, bitcast=True)
    return x.to(like_ptr.dtype.element_ty)


@triton.jit
def _load_operand(w_ptr, rows, smask, rd, dmask, inv, factor, stride_w, e_ptr,
                  NORMALIZED: tl.constexpr, EMU: tl.constexpr, SCALED: tl.constexpr):
    """(BS, BD) tile of the matmul operand: raw (decoded) rows cast to the embeddings' dtype,
    or (NORMALIZED, fp16) rows scaled by 1/||w|| in fp32 first."""
    w = _load_rows(w_ptr, rows, smask, rd, dmask, stride_w, factor, SCALED)
    if NORMALIZED:
        w = w.to(tl.float32) * inv[:, None]
    return _cast(w, e_ptr, EMU)


@triton.jit
def _load_emb(e_ptr, rn, nmask, rd, dmask, stride_e, EMU: tl.constexpr):
    """(BN, BD) tile of the embeddings in the dot's dtype (EMU: bf16 widened to fp32, exact)."""
    e = tl.load(e_ptr + rn[:, None] * stride_e + rd[None, :],
                mask=nmask[:, None] & dmask[None, :], other=0.0)
    if EMU:
        e = e.to(tl.float32)
    return e


@triton.jit
def _logits_tile(e_ptr, w_ptr, rn, nmask, rows, rs, smask, inv, factor, tgt, logit_t, D,
                 stride_e, stride_w, scale, BN: tl.constexpr, BS: tl.constexpr,
                 BD: tl.constexpr, NORMALIZED: tl.constexpr, EMU: tl.constexpr,
                 SCALED: tl.constexpr):
    """(BN, BS) fp32 logits s * cos with each row's target column set to its target logit."""
    acc = tl.zeros([BN, BS], dtype=tl.float32)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        dmask = rd < D
        e = _load_emb(e_ptr, rn, nmask, rd, dmask, stride_e, EMU)
        w = _load_operand(w_ptr, rows, smask, rd, dmask, inv, factor, stride_w, e_ptr,
                          NORMALIZED, EMU, SCALED)
        acc = tl.dot(e, tl.trans(w), acc, input_precision="ieee")
    if NORMALIZED:
        logits = acc * scale
    else:
        logits = acc * (inv * scale)[None, :]
    is_t = rs[None, :] == tgt[:, None]
    return tl.where(is_t, logit_t[:, None], logits), is_t


@triton.jit
def _forward_kernel(e_ptr, w_ptr, sc_ptr, idx_ptr, inv_ptr, tgt_ptr, lt_ptr, pmax_ptr, psum_ptr,
                    N, S, D, stride_e, stride_w, scale, blocks_per_prog,
                    BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                    NORMALIZED: tl.constexpr, EMU: tl.constexpr, SCALED: tl.constexpr):
    """Online log-sum-exp of rows [pid_n*BN, +BN) over column blocks
    [pid_p*blocks_per_prog, +blocks_per_prog); the first of them always exists."""
    pid_n = tl.program_id(0)
    pid_p = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    tgt = tl.load(tgt_ptr + rn, mask=nmask, other=-1)
    lt = tl.load(lt_ptr + rn, mask=nmask, other=0.0)
    m_i = tl.full([BN], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BN], dtype=tl.float32)
    for k in range(0, blocks_per_prog):
        rs = (pid_p * blocks_per_prog + k) * BS + tl.arange(0, BS)
        smask = rs < S  # all false for a trailing block past S: it then adds nothing
        rows = tl.load(idx_ptr + rs, mask=smask, other=0)
        inv = tl.load(inv_ptr + rs, mask=smask, other=0.0)
        factor = _row_factor(sc_ptr, rows, smask, SCALED)
        logits, _ = _logits_tile(e_ptr, w_ptr, rn, nmask, rows, rs, smask, inv, factor, tgt, lt,
                                 D, stride_e, stride_w, scale, BN, BS, BD, NORMALIZED, EMU,
                                 SCALED)
        logits = tl.where(smask[None, :], logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))  # finite after the first block
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(logits - m_new[:, None]), axis=1)
        m_i = m_new
    tl.store(pmax_ptr + pid_p * N + rn, m_i, mask=nmask)
    tl.store(psum_ptr + pid_p * N + rn, l_i, mask=nmask)


@triton.jit
def _backward_kernel(e_ptr, w_ptr, sc_ptr, idx_ptr, inv_ptr, tgt_ptr, lt_ptr, max_ptr, rowf_ptr,
                     tgrad_ptr, ge_ptr, gb_ptr, N, S, D, stride_e, stride_w, scale,
                     BN: tl.constexpr, BS: tl.constexpr, BD: tl.constexpr,
                     NORMALIZED: tl.constexpr, EMU: tl.constexpr, SCALED: tl.constexpr):
    """One (BN, BS) tile: recompute logits, dlog = d loss / d cos (column-scaled like the
    operand), then d E += dlog @ U and B += dlog^T @ E, D in BD steps, fp32 atomic adds."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    rn = pid_n * BN + tl.arange(0, BN)
    nmask = rn < N
    rs = pid_s * BS + tl.arange(0, BS)
    smask = rs < S
    tgt = tl.load(tgt_ptr + rn, mask=nmask, other=-1)
    lt = tl.load(lt_ptr + rn, mask=nmask, other=0.0)
    rows = tl.load(idx_ptr + rs, mask=smask, other=0)
    inv = tl.load(inv_ptr + rs, mask=smask, other=0.0)
    factor = _row_factor(sc_ptr, rows, smask, SCALED)
    logits, is_t = _logits_tile(e_ptr, w_ptr, rn, nmask, rows, rs, smask, inv, factor, tgt, lt,
                                D, stride_e, stride_w, scale, BN, BS, BD, NORMALIZED, EMU,
                                SCALED)
    row_max = tl.load(max_ptr + rn, mask=nmask, other=0.0)
    row_f = tl.load(rowf_ptr + rn, mask=nmask, other=0.0)        # g * s / sum_exp
    tgrad = tl.load(tgrad_ptr + rn, mask=nmask, other=0.0)       # d loss / d cos_target
    dlog = tl.exp(logits - row_max[:, None]) * row_f[:, None]
    dlog = tl.where(is_t, tgrad[:, None], dlog)
    dlog = tl.where(nmask[:, None] & smask[None, :], dlog, 0.0)
    if not NORMALIZED:
        dlog = dlog * inv[None, :]
    dl = _cast(dlog, e_ptr, EMU)
    for d0 in range(0, D, BD):
        rd = d0 + tl.arange(0, BD)
        dmask = rd < D
        u = _load_operand(w_ptr, rows, smask, rd, dmask, inv, factor, stride_w, e_ptr,
                          NORMALIZED, EMU, SCALED)
        ge = tl.dot(dl, u, input_precision="ieee")                          # (BN, BD)
        tl.atomic_add(ge_ptr + rn[:, None] * D + rd[None, :], ge,
                      mask=nmask[:, None] & dmask[None, :], sem="relaxed")
        e = _load_emb(e_ptr, rn, nmask, rd, dmask, stride_e, EMU)
        gb = tl.dot(tl.trans(dl), e, input_precision="ieee")                # (BS, BD)
        tl.atomic_add(gb_ptr + rs[:, None] * D + rd[None, :], gb,
                      mask=smask[:, None] & dmask[None, :], sem="relaxed")


# How triton decorated the kernels (it reads TRITON_INTERPRET at decoration time).
INTERPRETED = type(_inv_norm_kernel).__name__ == "InterpretedFunction"


def _check(emb, weight, row_scale, index, target, logit_t):
    """(emb, weight, row scales or a placeholder) ready for the kernels."""
    if emb.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton backend: embeddings must be float32, bfloat16 or float16, "
                        f"got {emb.dtype}")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.int8):
        raise TypeError(f"triton backend: class centers must be float32, bfloat16 or int8, got "
                        f"{weight.dtype}")
    if (weight.dtype == torch.int8) != (row_scale is not None):
        raise ValueError("triton backend: int8 centers come with their row scales, other "
                         "storages without")
    for t in (weight, index, target, logit_t) + ((row_scale,) if row_scale is not None else ()):
        if t.device != emb.device:
            raise ValueError("triton backend: all tensors must be on one device")
    weight = weight if weight.stride(1) == 1 else weight.contiguous()
    scale = row_scale.float().contiguous() if row_scale is not None else \
        torch.zeros(1, device=emb.device)  # never read (SCALED is False)
    return emb.contiguous(), weight, scale


def _inv_norms(weight, row_scale, index, bs, bd, num_warps):
    s_rows, d = index.shape[0], weight.shape[1]
    inv = torch.empty(s_rows, dtype=torch.float32, device=weight.device)
    _inv_norm_kernel[(triton.cdiv(s_rows, bs),)](weight, row_scale, index, inv, s_rows, d,
                                                 weight.stride(0), BS=bs, BD=bd,
                                                 SCALED=weight.dtype == torch.int8,
                                                 num_warps=num_warps)
    return inv


def forward_stats(emb, weight, row_scale, index, target, logit_t, scale: float):
    """This rank's (N,) row max and sum of exp(logit - max) over the sampled rows, and the (S,)
    fp32 inverse row norms (kept for backward).

    emb: (N, D) normalized, fp32/bf16/fp16; weight: (num_local, D) fp32/bf16, or int8 codes
    with row_scale (num_local,) fp32 (else None); index: (S,) int64 sampled rows; target: (N,)
    int64 position in index or -1; logit_t: (N,) fp32 target logits.
    Memory: (S,) + 2 x (P, N) fp32, P <= BLOCKS["programs"] / (N / BLOCK_N) programs along S.
    """
    emb, weight, row_scale = _check(emb, weight, row_scale, index, target, logit_t)
    n, d = emb.shape
    s_rows = index.shape[0]
    bn, bs, bd, warps = BLOCKS["n"], BLOCKS["s"], BLOCKS["d"], BLOCKS["num_warps"]
    inv = _inv_norms(weight, row_scale, index, bs, bd, warps)
    n_blocks, s_blocks = triton.cdiv(n, bn), triton.cdiv(s_rows, bs)
    splits = min(s_blocks, max(1, triton.cdiv(BLOCKS["programs"], n_blocks)))
    per_prog = triton.cdiv(s_blocks, splits)
    splits = triton.cdiv(s_blocks, per_prog)  # every program's first block exists
    pmax = torch.empty((splits, n), dtype=torch.float32, device=emb.device)
    psum = torch.empty((splits, n), dtype=torch.float32, device=emb.device)
    _forward_kernel[(n_blocks, splits)](
        emb, weight, row_scale, index, inv, target, logit_t.float().contiguous(), pmax, psum,
        n, s_rows, d, emb.stride(0), weight.stride(0), float(scale), per_prog,
        BN=bn, BS=bs, BD=bd, NORMALIZED=emb.dtype == torch.float16,
        EMU=INTERPRETED and emb.dtype == torch.bfloat16, SCALED=weight.dtype == torch.int8,
        num_warps=warps)
    local_max = pmax.amax(0)                                            # (N,)
    local_sum = psum.mul_(torch.exp(pmax - local_max)).sum(0)           # (N,)
    return local_max, local_sum, inv


def backward(emb, weight, row_scale, index, target, logit_t, inv, row_max, row_f, tgt_grad,
             scale: float):
    """(d E (N, D) fp32, B (S, D) fp32) where, with dlog = d loss / d cos (N, S) column-scaled
    like the operand (loss.operand), d E = dlog @ U and B = dlog^T @ E.

    weight / row_scale as in forward_stats; row_max: (N,) global row max; row_f: (N,) g * s /
    sum_exp; tgt_grad: (N,) d loss / d cos of each row's target (used only where target >= 0).
    Memory: the two fp32 outputs.
    """
    emb, weight, row_scale = _check(emb, weight, row_scale, index, target, logit_t)
    n, d = emb.shape
    s_rows = index.shape[0]
    bn, bs, bd, warps = BLOCKS["n"], BLOCKS["s"], BLOCKS["d"], BLOCKS["num_warps"]
    grad_emb = torch.zeros((n, d), dtype=torch.float32, device=emb.device)
    grad_b = torch.zeros((s_rows, d), dtype=torch.float32, device=emb.device)
    _backward_kernel[(triton.cdiv(n, bn), triton.cdiv(s_rows, bs))](
        emb, weight, row_scale, index, inv, target, logit_t.float().contiguous(),
        row_max.contiguous(), row_f.contiguous(), tgt_grad.float().contiguous(), grad_emb, grad_b,
        n, s_rows, d, emb.stride(0), weight.stride(0), float(scale),
        BN=bn, BS=bs, BD=bd, NORMALIZED=emb.dtype == torch.float16,
        EMU=INTERPRETED and emb.dtype == torch.bfloat16, SCALED=weight.dtype == torch.int8,
        num_warps=warps)
    return grad_emb, grad_b
