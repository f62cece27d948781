"""Executing ``affine-packed`` weights.

Simple path (every device, dtype and width): keep the packed bytes; per forward unpack the codes, dequantize
(w = scale * (code - zero) in float32, cast to the activation dtype) and run one ``F.linear``.

CPU int4 path (bits 4, bfloat16/float16 activations, groups of 32/64/128 dividing in_features, out_features a
multiple of 16): torch's ``_weight_int4pack_mm_for_cpu`` computes with w = (q - 8) * s + z per group, which is
ours with z = scale * (8 - zero). Its weight layout (``_convert_weight_to_int4pack_for_cpu``, 4 bits a weight) and
the scale/offset table are built on the first such call and cached outside the state dict (rebuilt if ``qweight``
is replaced or changed in place); the module then holds the packed weight twice (1 byte per weight in all, still
half of bfloat16). ``cache_int4 = False`` rebuilds them per call instead (about 3x faster than the simple path
rather than ~100x at one token; for memory-bounded offloading). Scales are rounded to the activation dtype, so
results agree with the simple path to that dtype's precision, not bit for bit. float32 activations take the simple
path: the kernel is slower than unpacking there for all but single-token batches.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

from moeq.formats import bitpack
from moeq.quant.base import QTensor
from moeq.quant.uniform import affine_dequantize
from moeq.registry import RUNTIMES
from moeq.runtime.packed import PackedLinear

INT4_DTYPES = (torch.bfloat16, torch.float16)
INT4_GROUPS = (32, 64, 128)


@RUNTIMES.register("affine-packed")
class AffineLinear(PackedLinear):
    """``x @ W.T + bias`` for x of any leading shape; one instance per weight (per expert in an MoE layer)."""

    cache_int4: ClassVar[bool] = True

    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size = int(q.meta["bits"]), int(q.meta["group_size"])
        t = q.tensors
        self.register_buffer("qweight", bitpack.pack(t["codes"].contiguous(), self.bits))
        self.register_buffer("scale", t["scale"])
        self.register_buffer("zero", t["zero"])
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._int4: dict = {}      # CPU int4 kernel operands: "weight" and one scale/offset table per dtype
        self._int4_src: tuple = ()            # the buffers they were built from (see _int4_sources)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective [out, in] weight in ``dtype`` (computed in float32)."""
        codes = bitpack.unpack(self.qweight, self.bits, self.in_features)
        return affine_dequantize(codes, self.scale, self.zero, self.group_size).to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self._int4_applies(x):
            return F.linear(x, self.dequantized(x.dtype), bias)
        x2 = x.reshape(-1, self.in_features).contiguous()
        weight, table = self._int4_weight(), self._int4_table(x.dtype)
        if not self.cache_int4:
            self._int4.clear()
        y = torch._weight_int4pack_mm_for_cpu(x2, weight, self.group_size, table)
        if bias is not None:
            y = y + bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _int4_applies(self, x: torch.Tensor) -> bool:
        return (self.bits == 4 and x.device.type == "cpu" and self.qweight.device.type == "cpu"
                and x.dtype in INT4_DTYPES and self.group_size in INT4_GROUPS
                and self.in_features % self.group_size == 0 and self.out_features % 16 == 0
                and hasattr(torch, "_weight_int4pack_mm_for_cpu"))

    def _int4_sources(self) -> tuple:
        """Identity and in-place version of qweight, scale and zero: a replaced or modified buffer (load_state_dict,
        assignment) invalidates the cached operands. A replacing tensor exists while the old one does, so the
        (id, data_ptr) pair cannot be reused by it."""
        return tuple((id(t), t.data_ptr(), t._version) for t in (self.qweight, self.scale, self.zero))

    def _int4_weight(self) -> torch.Tensor:
        if self._int4_src != self._int4_sources():
            self._int4.clear()
            self._int4_src = self._int4_sources()
        if "weight" not in self._int4:
            codes = bitpack.unpack(self.qweight, 4, self.in_features).to(torch.int32)
            self._int4["weight"] = torch._convert_weight_to_int4pack_for_cpu(codes, 1)
        return self._int4["weight"]

    def _int4_table(self, dtype: torch.dtype) -> torch.Tensor:
        """[n_groups, out, 2]: (scale, scale * (8 - zero)) in ``dtype``, the kernel's per-group operands."""
        if dtype not in self._int4:
            s = self.scale.float()
            table = torch.stack([s.T, (s * (8 - self.zero.float())).T], dim=-1)
            self._int4[dtype] = table.to(dtype).contiguous()
        return self._int4[dtype]
