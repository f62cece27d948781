"""Executing ``nupes`` weights: W[o, i] = lut[code[o, i]] * scale[o, group(i)], computed in float32.

Two routes, fixed at construction from the weight's width and shape (never a float copy of W kept):

* kernel route (bits 2, 3, 4; ``in_features`` a multiple of the group, the group a multiple of
  ``moeq.kernels.lut.BLOCK[bits]``; group_size 0 runs as one group of ``in_features``): the codes are held in the
  kernel layout (``pack_for_kernel``), the scales as float32 (what the kernels read) and every forward is one
  ``moeq.kernels.lut_linear`` call: on CPU the AVX-512 LUT matvec for a few tokens and tile dequantization + GEMM
  for prefill, Triton on CUDA, pure torch where neither runs (``MOEQ_KERNEL``, see ``moeq.kernels.lut``).
* fallback (bits 5..8, other shapes): the bitpack bytes and float16 scales as stored; per forward the codes are
  unpacked, looked up and scaled in float32 a row tile at a time into one buffer in x's dtype, then one ``F.linear``.

Both routes round the float32 weight once to the compute dtype, so a forward equals ``F.linear(x, dequantized(
x.dtype))`` up to GEMM summation order. The buffers (codes, scales, lut) keep their dtypes through ``.to(dtype)`` /
``.half()``: they are the code, not activations (a bf16 lut would be a different, coarser grid); ``bias`` follows the
move. No derived state is cached, so replacing a buffer (``load_state_dict``, accelerate's offload hooks) needs no
invalidation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq.formats import bitpack
from moeq.kernels import lut as lut_kernels
from moeq.quant.base import QTensor
from moeq.quant.nupes import nupes_dequantize
from moeq.registry import RUNTIMES
from moeq.runtime.packed import PackedLinear

TILE_BYTES = 4 << 20           # fallback: float32 weight rows dequantized per step (temporaries stay in L2)
EXACT = ("packed", "qweight", "scales", "scale", "lut")      # buffers whose dtype is part of the format


def kernel_group(bits: int, group_size: int, in_features: int) -> int | None:
    """The group size ``lut_linear`` runs this weight with (group_size 0: ``in_features``), or None where the
    kernel layout cannot hold it."""
    g = group_size or in_features
    if bits not in lut_kernels.BLOCK or in_features % g or g % lut_kernels.BLOCK[bits]:
        return None
    return g


@RUNTIMES.register("nupes")
class NupesLinear(PackedLinear):
    """``x @ W.T + bias`` for x of any leading shape (float32 / bfloat16 / float16); one instance per weight (per
    expert in an MoE layer). ``shared`` is accepted for the runtime interface; nupes entries reference no table."""

    exact = EXACT

    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = int(q.meta["bits"]), int(q.meta["group_size"])
        t = q.tensors
        codes = t["codes"].contiguous()
        self.kernel_group = kernel_group(self.bits, self.group_size, self.in_features)
        if self.kernel_group is not None:
            self.register_buffer("packed", lut_kernels.pack_for_kernel(codes, self.bits))
            self.register_buffer("scales", t["scale"].float().contiguous())
        else:
            self.register_buffer("qweight", bitpack.pack(codes, self.bits))
            self.register_buffer("scale", t["scale"].contiguous())
        self.register_buffer("lut", t["lut"].float().contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def extra_repr(self) -> str:
        route = "lut_linear" if self.kernel_group is not None else "dequantize+linear"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"route={route}, bias={self.bias is not None}")


    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective [out, in] weight in ``dtype`` (computed in float32, rounded once)."""
        if self.kernel_group is not None:
            return lut_kernels.dequantize_packed(self.packed, self.lut, self.scales, self.kernel_group, self.bits,
                                                 self.in_features, dtype)
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        step = max(1, TILE_BYTES // (4 * self.in_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            codes = bitpack.unpack(self.qweight[r0:r1], self.bits, self.in_features)
            out[r0:r1] = nupes_dequantize(codes, self.scale[r0:r1], self.lut, self.group_size)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_group is not None:
            y = lut_kernels.lut_linear(x, self.packed, self.lut, self.scales, self.kernel_group, self.bits,
                                       self.out_features, self.in_features)
        else:
            y = F.linear(x, self.dequantized(x.dtype))
        return y if self.bias is None else y + self.bias.to(y.dtype)
