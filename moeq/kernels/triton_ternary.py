"""The CUDA route of the ``ternary-dict`` runtime: Triton kernels reading the coded rows and the phrase records of
:mod:`moeq.runtime.ternary_dict` (record layout there and in :mod:`moeq.kernels.cpu`).

``_ternary_matmul_kernel`` (decode-and-multiply): each program takes a block of ``BR`` rows of W and ``BM`` rows of
x. It walks the rows' codewords ``BC`` at a time, all rows of the block side by side: the records give each
phrase's length, a cumulative sum along the chunk (plus the running per-row base) places the phrases in their
rows, and for each of the record's 4 slots x is gathered at base + pos into the +1 or the -1 sum ([BR, BC, BM]
tiles summed over the chunk); nonzeros past a phrase's 4th come from ``ex_ent``, one masked step each up to the
dictionary's maximum. ``y = hi * sum+ + lo * sum-`` in float32, stored in x's dtype. Every load is masked: a column
is read only below ``in_features``. ``_ternary_decode_kernel`` is the same walk storing ``hi`` / ``lo`` into a
zeroed dense W instead (prefill: ``TRITON_FUSED_MAX_M`` rows of x and more run one dense GEMM on it).

Simple, not tuned, and NOT RUN ON A GPU: no device in the development machines. Its logic (indexing, masks, the
overflow entries) is checked on CPU with Triton's interpreter (``TRITON_INTERPRET=1``, tests/test_ternary_runtime.py)
where Triton is installed; block sizes and the threshold are guesses until measured on a GPU. Imported only by the
``triton`` route (a CUDA device and ``import triton``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_R, BLOCK_C = 16, 32          # rows of W, codewords of each row per step
TRITON_FUSED_MAX_M = 64            # above: decode to a dense W once, then one GEMM (a guess: not measured)


@triton.jit
def _walk_chunk(cw_ptr, rec_ptr, start, end, base, c0, r_ok, K, BC: tl.constexpr):
    """Codewords [c0, c0 + BC) of each row: (codeword, in-row mask, phrase starts [BR, BC], the new bases)."""
    j = start[:, None] + c0 + tl.arange(0, BC)[None, :]
    ok = r_ok[:, None] & (j < end[:, None])
    c = tl.load(cw_ptr + j, mask=ok, other=0).to(tl.int32) & 0xFFFF          # uint16 held as int16
    ln = tl.load(rec_ptr + c * 8, mask=ok, other=0).to(tl.int32) & 0xFF
    cs = tl.cumsum(ln, axis=1)
    pstart = base[:, None] + cs - ln
    return c, ok, pstart, base + tl.sum(ln, axis=1)


@triton.jit
def _ternary_matmul_kernel(x_ptr, cw_ptr, off_ptr, lo_ptr, hi_ptr, rec_ptr, exoff_ptr, exent_ptr, y_ptr,
                           M, N, K, longest, max_extra,
                           BR: tl.constexpr, BC: tl.constexpr, BM: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    rm = tl.program_id(1) * BM + tl.arange(0, BM)
    r_ok, m_ok = rows < N, rm < M
    start = tl.load(off_ptr + rows, mask=r_ok, other=0)
    end = tl.load(off_ptr + rows + 1, mask=r_ok, other=0)
    base = tl.zeros((BR,), dtype=tl.int32)
    accp = tl.zeros((BR, BM), dtype=tl.float32)
    accm = tl.zeros((BR, BM), dtype=tl.float32)
    xrow = x_ptr + rm[None, None, :].to(tl.int64) * K
    for c0 in range(0, longest, BC):
        c, ok, pstart, base = _walk_chunk(cw_ptr, rec_ptr, start, end, base, c0, r_ok, K, BC)
        codes = tl.load(rec_ptr + c * 8 + 7, mask=ok, other=0).to(tl.int32) & 0xFF   # unused slots: 0
        for s in tl.static_range(4):
            col = pstart + (tl.load(rec_ptr + c * 8 + 2 + s, mask=ok, other=0).to(tl.int32) & 0xFF)
            code = (codes >> (2 * s)) & 3
            good = ok & (code != 0) & (col < K)
            xv = tl.load(xrow + col[:, :, None], mask=good[:, :, None] & m_ok[None, None, :], other=0.0)
            xv = xv.to(tl.float32)
            accp += tl.sum(tl.where((code == 1)[:, :, None], xv, 0.0), axis=1)
            accm += tl.sum(tl.where((code == 2)[:, :, None], xv, 0.0), axis=1)
        e0 = tl.load(exoff_ptr + c, mask=ok, other=0)
        e1 = tl.load(exoff_ptr + c + 1, mask=ok, other=0)
        for e in range(max_extra):               # nonzeros past a phrase's 4th (ex_ent: pos << 2 | code)
            has = ok & (e0 + e < e1)
            ent = tl.load(exent_ptr + e0 + e, mask=has, other=0).to(tl.int32) & 0xFFFF
            col = pstart + ((ent >> 2) & 0xFF)
            code = ent & 3
            good = has & (code != 0) & (col < K)
            xv = tl.load(xrow + col[:, :, None], mask=good[:, :, None] & m_ok[None, None, :], other=0.0)
            xv = xv.to(tl.float32)
            accp += tl.sum(tl.where((code == 1)[:, :, None], xv, 0.0), axis=1)
            accm += tl.sum(tl.where((code == 2)[:, :, None], xv, 0.0), axis=1)
    hi = tl.load(hi_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
    lo = tl.load(lo_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)
    y = hi[:, None] * accp + lo[:, None] * accm
    tl.store(y_ptr + rm[None, :].to(tl.int64) * N + rows[:, None], y.to(y_ptr.dtype.element_ty),
             mask=r_ok[:, None] & m_ok[None, :])


@triton.jit
def _ternary_decode_kernel(cw_ptr, off_ptr, lo_ptr, hi_ptr, rec_ptr, exoff_ptr, exent_ptr, w_ptr,
                           N, K, longest, max_extra, BR: tl.constexpr, BC: tl.constexpr):
    rows = tl.program_id(0) * BR + tl.arange(0, BR)
    r_ok = rows < N
    start = tl.load(off_ptr + rows, mask=r_ok, other=0)
    end = tl.load(off_ptr + rows + 1, mask=r_ok, other=0)
    hi = tl.load(hi_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    lo = tl.load(lo_ptr + rows, mask=r_ok, other=0.0).to(tl.float32)[:, None]
    wrow = w_ptr + rows[:, None].to(tl.int64) * K
    base = tl.zeros((BR,), dtype=tl.int32)
    for c0 in range(0, longest, BC):
        c, ok, pstart, base = _walk_chunk(cw_ptr, rec_ptr, start, end, base, c0, r_ok, K, BC)
        codes = tl.load(rec_ptr + c * 8 + 7, mask=ok, other=0).to(tl.int32) & 0xFF
        for s in tl.static_range(4):
            col = pstart + (tl.load(rec_ptr + c * 8 + 2 + s, mask=ok, other=0).to(tl.int32) & 0xFF)
            code = (codes >> (2 * s)) & 3
            val = tl.where(code == 1, hi, lo)
            tl.store(wrow + col, val.to(w_ptr.dtype.element_ty), mask=ok & (code != 0) & (col < K))
        e0 = tl.load(exoff_ptr + c, mask=ok, other=0)
        e1 = tl.load(exoff_ptr + c + 1, mask=ok, other=0)
        for e in range(max_extra):
            has = ok & (e0 + e < e1)
            ent = tl.load(exent_ptr + e0 + e, mask=has, other=0).to(tl.int32) & 0xFFFF
            col = pstart + ((ent >> 2) & 0xFF)
            code = ent & 3
            val = tl.where(code == 1, hi, lo)
            tl.store(wrow + col, val.to(w_ptr.dtype.element_ty), mask=has & (code != 0) & (col < K))


def _as_signed(t: torch.Tensor) -> torch.Tensor:
    """uint16 tensors as int16 (the kernels mask them back to 16 bits): Triton's unsigned 16-bit support varies."""
    return t.view(torch.int16) if t.dtype == torch.uint16 else t


def _operands(codewords, row_offsets, lo, hi, rec, ex_off, ex_ent):
    ex_ent = ex_ent if ex_ent.numel() else torch.zeros(1, dtype=ex_ent.dtype, device=ex_ent.device)
    return (_as_signed(codewords.contiguous()), row_offsets.contiguous(), lo.contiguous(), hi.contiguous(),
            rec.contiguous(), ex_off.contiguous(), _as_signed(ex_ent.contiguous()))


def ternary_decode_triton(codewords, row_offsets, lo, hi, rec, ex_off, ex_ent, in_features: int, longest: int,
                          max_extra: int, dtype: torch.dtype) -> torch.Tensor:
    """The dense [out, in] W in ``dtype`` (lo / hi rounded once from float16)."""
    n = lo.numel()
    w = torch.zeros(n, in_features, dtype=dtype, device=lo.device)
    ops = _operands(codewords, row_offsets, lo, hi, rec, ex_off, ex_ent)
    _ternary_decode_kernel[(triton.cdiv(n, BLOCK_R),)](*ops, w, n, in_features, longest, max_extra,
                                                      BR=BLOCK_R, BC=BLOCK_C)
    return w


def ternary_linear_triton(x2: torch.Tensor, codewords, row_offsets, lo, hi, rec, ex_off, ex_ent, in_features: int,
                          longest: int, max_extra: int) -> torch.Tensor:
    """x2 [M, in] (float32 / bfloat16 / float16) @ W.T -> [M, out] in x2's dtype. ``longest``: the most codewords
    in a row; ``max_extra``: the most nonzeros past a phrase's 4th (both from the caller, computed once)."""
    m, n = x2.shape[0], lo.numel()
    if m > TRITON_FUSED_MAX_M:
        w = ternary_decode_triton(codewords, row_offsets, lo, hi, rec, ex_off, ex_ent, in_features, longest,
                                  max_extra, x2.dtype)
        return torch.nn.functional.linear(x2, w)
    x2 = x2.contiguous()
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    bm = min(16, triton.next_power_of_2(max(m, 1)))
    ops = _operands(codewords, row_offsets, lo, hi, rec, ex_off, ex_ent)
    grid = (triton.cdiv(n, BLOCK_R), triton.cdiv(m, bm))
    _ternary_matmul_kernel[grid](x2, *ops, y, m, n, in_features, longest, max_extra, BR=BLOCK_R, BC=BLOCK_C, BM=bm)
    return y
