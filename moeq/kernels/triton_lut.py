"""The CUDA route: one Triton kernel reading the kernel layout of :mod:`moeq.kernels.lut` (2, 3 and 4 bits).

Each program computes a [BLOCK_M, BLOCK_N] tile of y: for every BLOCK_K slice of the inputs it decodes the codes
of BLOCK_N rows (byte address and shift per input, from the layout), gathers their LUT entries, multiplies by the
group scales (float32), and accumulates ``tl.dot(x, W.T)`` in float32; half-precision x keeps W in x's dtype for
the dot, float32 x uses IEEE float32 (no TF32). Simple, not tuned: decode at M = 1 pads M to 16 rows.

Not run on a GPU yet (no device in the development machines); its logic is checked on CPU with Triton's interpreter
(``TRITON_INTERPRET=1``, see tests/test_kernels.py) where Triton is installed. Imported only by the ``triton``
route, which needs ``import triton`` to succeed and a CUDA device.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_M, BLOCK_N, BLOCK_K = 16, 64, 64


@triton.jit
def _lut_linear_kernel(x_ptr, packed_ptr, lut_ptr, scales_ptr, y_ptr, M, N, K, row_bytes, lut_stride, n_groups,
                       GROUP: tl.constexpr, BITS: tl.constexpr, IEEE: tl.constexpr,
                       BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    rm = tl.program_id(0) * BM + tl.arange(0, BM)
    rn = tl.program_id(1) * BN + tl.arange(0, BN)
    m_ok, n_ok = rm < M, rn < N
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_ok = rk < K
        ok = n_ok[:, None] & k_ok[None, :]
        row = packed_ptr + rn[:, None].to(tl.int64) * row_bytes
        if BITS == 4:            # nibble plane: byte 16 * (k // 32) + k % 16, shift 4 * ((k % 32) // 16)
            off = (rk // 32) * 16 + rk % 16
            shift = ((rk % 32) // 16) * 4
            code = (tl.load(row + off[None, :], mask=ok, other=0).to(tl.int32) >> shift[None, :]) & 15
        else:                    # crumb plane: byte 16 * (k // 64) + k % 16, shift 2 * ((k % 64) // 16)
            off = (rk // 64) * 16 + rk % 16
            shift = ((rk % 64) // 16) * 2
            code = (tl.load(row + off[None, :], mask=ok, other=0).to(tl.int32) >> shift[None, :]) & 3
            if BITS == 3:        # bit plane after it: bit k % 8 of byte K / 4 + k // 8
                hb = tl.load(row + (K // 4 + rk // 8)[None, :], mask=ok, other=0).to(tl.int32)
                code = code | (((hb >> (rk % 8)[None, :]) & 1) << 2)
        w = tl.load(lut_ptr + rn[:, None] * lut_stride + code, mask=ok, other=0.0)
        s = tl.load(scales_ptr + rn[:, None] * n_groups + (rk // GROUP)[None, :], mask=ok, other=0.0)
        w = w * s
        x = tl.load(x_ptr + rm[:, None].to(tl.int64) * K + rk[None, :], mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    y = acc.to(y_ptr.dtype.element_ty)
    tl.store(y_ptr + rm[:, None].to(tl.int64) * N + rn[None, :], y, mask=m_ok[:, None] & n_ok[None, :])


def lut_linear_triton(x2: torch.Tensor, packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor,
                      group_size: int, bits: int, in_features: int) -> torch.Tensor:
    """x2 [M, in] (float32 / bfloat16 / float16) @ W.T -> [M, out] in x2's dtype; operands checked by the caller."""
    m, n = x2.shape[0], packed.shape[0]
    x2, packed = x2.contiguous(), packed.contiguous()
    lut, scales = lut.float().contiguous(), scales.float().contiguous()
    y = torch.empty(m, n, dtype=x2.dtype, device=x2.device)
    grid = (triton.cdiv(m, BLOCK_M), triton.cdiv(n, BLOCK_N))
    _lut_linear_kernel[grid](x2, packed, lut, scales, y, m, n, in_features, packed.shape[1],
                             0 if lut.ndim == 1 else lut.shape[1], scales.shape[1],
                             GROUP=group_size, BITS=bits, IEEE=x2.dtype == torch.float32,
                             BM=BLOCK_M, BN=BLOCK_N, BK=BLOCK_K)
    return y
