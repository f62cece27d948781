"""Executing ``bitplanes`` weights at the width they were loaded at (r bits, the first r planes):
W[o, i] = lut_r[code[o, i]] * scale[o, group(i)] (+ offset[o, group(i)] when asymmetric), in float32
(``moeq.quant.matryoshka``).

Three routes, fixed at construction from the width, the grid and the shape (never a float copy of W kept):

* kernel route (symmetric; r = 2, 3, 4; ``moeq.runtime.nupes.kernel_group`` accepts the group): a symmetric width
  is one global LUT of 2^r levels times the per-group scale, exactly ``moeq.kernels.lut_linear``'s operation: the
  codes are held in the kernel layout, the scales as float32, the width's LUT as float32.
* uint8 route (symmetric; r = 5..8; any shape; where the C++ library of ``moeq.kernels.cpu`` loads): the r-bit
  codes held one byte per weight (``codes`` uint8 [out, in]: the artifact stores r/8 bytes a weight, the module
  holds 1 byte, the bitpacked fallback r/8), ``scales`` float32 [out, n_groups] = scale * 2^(8-r) (4 bytes a
  group), so W = scales * (code + 0.5 - 2^(r-1)) (``u8_offset``): the same float32 weight as lut_r[code] * scale,
  bit for bit (the factor is a power of two). On CPU (``MOEQ_KERNEL`` auto or cpp, as
  ``moeq.kernels.lut.route_for``) up to ``cpu.U8_MATVEC_MAX_M`` rows of x run the fused matvec ``cpu.u8_matvec``
  (W never formed), more rows decode W tile by tile in x's dtype, one GEMM per tile (``cpu.u8_linear_tiled``);
  elsewhere (CUDA, ``MOEQ_KERNEL=torch``) the codes are decoded in torch a row tile at a time, then one
  ``F.linear``.
* fallback (asymmetric grids, r = 5..8 where the C++ library does not load): the r-bit codes bitpacked
  (``moeq.formats.bitpack``) and the float16 scales/offsets as stored; per forward they are decoded in float32 a
  row tile at a time into one buffer in x's dtype, then one ``F.linear``.

Kept columns (an entry with ``outliers`` k > 0): the main route runs the codes as they are in every column, and
``x[..., cols] @ col_delta`` adds the difference between the stored 16-bit weights of those k columns and what
their codes decode to at this width (``col_delta`` [k, out], formed once at load in float32, then in the module's
compute dtype like the bias): one ``addmm`` on the main route's output.

All three round the float32 weight once to the compute dtype: a forward equals ``F.linear(x, dequantized(x.dtype))``
up to GEMM summation order. Buffers that are the code keep their dtypes through ``.to(dtype)``; ``bias`` follows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq.formats import bitpack
from moeq.kernels import cpu
from moeq.kernels import lut as lut_kernels
from moeq.quant.base import QTensor
from moeq.quant.matryoshka import PARENT_BITS, decode, nested_dequantize, width_lut
from moeq.registry import RUNTIMES
from moeq.runtime.nupes import kernel_group
from moeq.runtime.packed import PackedLinear

TILE_BYTES = 4 << 20           # fallback: float32 weight rows decoded per step
EXACT = ("packed", "qweight", "codes", "scales", "scale", "offset", "lut", "cols")  # buffers whose dtype is the format
U8_BITS = range(5, 9)          # the widths the uint8 route runs (symmetric)


def u8_offset(bits: int) -> float:
    """The additive offset of the uint8 route at ``bits``: W = scales * (code + offset)."""
    return 0.5 - (1 << (bits - 1))


def _cpp(device: torch.device) -> bool:
    """Whether the C++ kernels run for tensors on ``device`` (CPU, ``MOEQ_KERNEL`` auto or cpp)."""
    return device.type == "cpu" and lut_kernels.route_for(device) == "cpp"


@RUNTIMES.register("bitplanes")
class MatryoshkaLinear(PackedLinear):
    """``x @ W.T + bias`` for x of any leading shape (float32 / bfloat16 / float16) at the loaded width; one
    instance per weight (per expert in an MoE layer)."""

    exact = EXACT

    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict | None = None):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.bits, self.group_size, self.sym = int(q.meta["bits"]), int(q.meta["group_size"]), bool(q.meta["sym"])
        t = q.tensors
        codes = t["codes"].contiguous()
        self.kernel_group = kernel_group(self.bits, self.group_size, self.in_features) if self.sym else None
        self.u8 = self.sym and self.bits in U8_BITS and cpu.library() is not None
        if self.kernel_group is not None:
            self.register_buffer("packed", lut_kernels.pack_for_kernel(codes, self.bits))
            self.register_buffer("scales", t["scale"].float().contiguous())
            self.register_buffer("lut", width_lut(self.bits, True))
        elif self.u8:
            self.register_buffer("codes", codes.to(torch.uint8))
            self.register_buffer("scales", (t["scale"].float() * (1 << (PARENT_BITS - self.bits))).contiguous())
        else:
            self.register_buffer("qweight", bitpack.pack(codes, self.bits))
            self.register_buffer("scale", t["scale"].contiguous())
            self.register_buffer("offset", None if self.sym else t["offset"].contiguous())
        cols = t.get("cols")
        self.register_buffer("cols", None if cols is None else cols.long())
        self.register_buffer("col_delta", None if cols is None else self._col_delta(t, cols.long()).T.contiguous())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def _col_delta(self, t: dict, cols: torch.Tensor) -> torch.Tensor:
        """float32 [out, k]: the kept columns' stored weights minus what their codes decode to at this width."""
        groups = cols // (self.group_size or self.in_features)
        offset = None if self.sym else t["offset"][:, groups]
        return t["col_values"].float() - decode(t["codes"][:, cols], self.bits, t["scale"][:, groups], offset)

    def extra_repr(self) -> str:
        route = "lut_linear" if self.kernel_group is not None else "u8_matvec" if self.u8 else "dequantize+linear"
        return (f"in={self.in_features}, out={self.out_features}, bits={self.bits}, group_size={self.group_size}, "
                f"sym={self.sym}, route={route}, outliers={0 if self.cols is None else self.cols.numel()}, "
                f"bias={self.bias is not None}")

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The effective [out, in] weight in ``dtype`` (computed in float32, rounded once; the kept columns' delta is
        in the module's compute dtype, as ``forward`` adds it)."""
        w = self._coded(dtype if self.cols is None else torch.float32)
        if self.cols is None:
            return w
        w[:, self.cols] += self.col_delta.T.float()
        return w.to(dtype)

    def _coded(self, dtype: torch.dtype) -> torch.Tensor:
        """The [out, in] weight the codes decode to (kept columns not applied)."""
        if self.kernel_group is not None:
            return lut_kernels.dequantize_packed(self.packed, self.lut, self.scales, self.kernel_group, self.bits,
                                                 self.in_features, dtype)
        if self.u8:
            return self._u8_dequantized(dtype)
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=self.qweight.device)
        step = max(1, TILE_BYTES // (4 * self.in_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            codes = bitpack.unpack(self.qweight[r0:r1], self.bits, self.in_features)
            off = None if self.offset is None else self.offset[r0:r1]
            out[r0:r1] = nested_dequantize(codes, self.bits, self.scale[r0:r1], off, self.group_size)
        return out

    def _u8_dequantized(self, dtype: torch.dtype) -> torch.Tensor:
        codes, scales, off = self.codes, self.scales, u8_offset(self.bits)
        if _cpp(codes.device) and dtype in cpu.DTYPES:
            return cpu.u8_dequantize(codes, scales, self.group_size, off, dtype)
        out = torch.empty(self.out_features, self.in_features, dtype=dtype, device=codes.device)
        g = self.group_size or self.in_features
        step = max(1, TILE_BYTES // (4 * self.in_features))
        for r0 in range(0, self.out_features, step):
            r1 = min(r0 + step, self.out_features)
            s = scales[r0:r1].repeat_interleave(g, dim=1)[:, :self.in_features]
            out[r0:r1] = (codes[r0:r1].float() + off) * s
        return out

    def _u8_linear(self, x: torch.Tensor) -> torch.Tensor:
        if not (_cpp(x.device) and self.codes.device.type == "cpu" and x.dtype in cpu.DTYPES):
            return F.linear(x, self._u8_dequantized(x.dtype))
        x2 = x.reshape(-1, self.in_features).contiguous()
        off = u8_offset(self.bits)
        if x2.shape[0] <= cpu.U8_MATVEC_MAX_M[cpu.flavor()]:
            y2 = cpu.u8_matvec(x2, self.codes, self.scales, self.group_size, off)
        else:
            y2 = cpu.u8_linear_tiled(x2, self.codes, self.scales, self.group_size, off)
        return y2.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel_group is not None:
            y = lut_kernels.lut_linear(x, self.packed, self.lut, self.scales, self.kernel_group, self.bits,
                                       self.out_features, self.in_features)
        elif self.u8:
            y = self._u8_linear(x)
        else:
            y = F.linear(x, self._coded(x.dtype))
        if self.cols is not None:
            y2 = y.reshape(-1, self.out_features)
            y = torch.addmm(y2, x.reshape(-1, self.in_features).index_select(1, self.cols),
                            self.col_delta.to(x.dtype)).view(y.shape)
        return y if self.bias is None else y + self.bias.to(y.dtype)
