"""Executing LLM.int8 packed weights.

w8a8 forward for x [M, K] (all per-token scales are computed at run time):
    xs = x / smooth                                  (calibrated smoothing, optional)
    y  = x[:, O] @ W16[:, O].T                       (systematic outlier features: exact 16-bit columns)
       + xs[:, D] @ deq(Q[:, D]).T                   (features over the threshold in THIS batch only)
       + int8(xs, D and O zeroed) @ Q.T * sx * sw    (int8 GEMM, int32 accumulate)
weight-only forward: y = x @ (Q * sw).T with ``torch._weight_int8pack_mm`` for bf16/fp16 CPU activations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moeq.quant.base import QTensor
from moeq.registry import RUNTIMES

QMAX = 127.0


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if a.device.type == "cuda" and a.shape[0] <= 16:  # cuBLASLt int8 needs M > 16
        pad = a.new_zeros(17 - a.shape[0], a.shape[1])
        return torch._int_mm(torch.cat([a, pad]), b_t)[: a.shape[0]]
    if a.device.type in ("cpu", "cuda"):
        return torch._int_mm(a, b_t)
    return a.to(torch.int32) @ b_t.to(torch.int32)


def quantize_tokens(x: torch.Tensor, group: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token absmax int8 (per group of ``group`` features when group > 0).
    Returns codes [M, K] int8 and scales [M, 1] (or [M, K // group, 1] for groups), fp32."""
    xf = x.float()
    if group:
        xf = xf.view(x.shape[0], -1, group)
    sx = xf.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8) / QMAX
    codes = torch.round(xf / sx).to(torch.int8)
    return codes.view(x.shape), sx


@RUNTIMES.register("int8-rows")
class Int8Linear(torch.nn.Module):
    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict | None = None):
        super().__init__()
        t = q.tensors
        self.out_features, self.in_features = q.shape
        self.mode = q.meta.get("mode", "w8a8")
        self.threshold = float(q.meta.get("threshold", 0.0))
        self.act_group = int(q.meta.get("act_group", 0))
        self.register_buffer("qweight", t["qweight"])
        self.register_buffer("scale", t["scale"].float())
        self.register_buffer("inv_smooth", (1.0 / t["smooth"].float()) if "smooth" in t else None)
        self.register_buffer("outlier_idx", t["outlier_idx"].long() if "outlier_idx" in t else None)
        self.register_buffer("outlier_w", t.get("outlier_w"))
        static = torch.zeros(self.in_features, dtype=torch.bool)
        if self.outlier_idx is not None:
            static[self.outlier_idx] = True
        self.register_buffer("static_mask", static, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._cache: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @property
    def weight(self) -> torch.Tensor:
        """The int8 codes; model code that probes ``layer.weight.dtype`` (T5/Switch) sees int8, as with bitsandbytes."""
        return self.qweight

    def extra_repr(self) -> str:
        k = 0 if self.outlier_idx is None else self.outlier_idx.numel()
        return (f"in={self.in_features}, out={self.out_features}, mode={self.mode}, threshold={self.threshold}, "
                f"smooth={self.inv_smooth is not None}, outlier_cols={k}, act_group={self.act_group}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)
        y = self._weight_only(x2) if self.mode == "weight_only" else self._w8a8(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _as(self, name: str, dtype: torch.dtype) -> torch.Tensor:
        """A small buffer (scales, 16-bit outlier columns) in the compute dtype, converted once: CPU GEMMs in
        float16 are orders of magnitude slower than in float32/bfloat16."""
        src = getattr(self, name)
        t = self._cache.get((name, dtype))
        if t is None or t.device != src.device:
            t = self._cache[(name, dtype)] = src.to(dtype)
        return t

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16) and x.shape[0] <= 16:
            return torch._weight_int8pack_mm(x, self.qweight, self._as("scale", x.dtype))
        return F.linear(x, self.qweight.to(x.dtype)) * self._as("scale", x.dtype)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        xs = x.float() * self.inv_smooth if self.inv_smooth is not None else x.float()
        y = None
        if self.outlier_idx is not None:
            y = F.linear(x[:, self.outlier_idx].float(), self._as("outlier_w", torch.float32))
            if self.inv_smooth is None:
                xs = xs.clone()
            xs[:, self.outlier_idx] = 0.0
        if self.threshold > 0:
            dyn = (x.abs() >= self.threshold).any(dim=0)
            if self.outlier_idx is not None:
                dyn &= ~self.static_mask
            if dyn.any():
                d = dyn.nonzero().flatten()
                wd = self.qweight[:, d].float() * self.scale[:, None]
                yd = xs[:, d] @ wd.t()
                y = yd if y is None else y + yd
                if xs is x or (self.inv_smooth is None and self.outlier_idx is None):
                    xs = xs.clone()
                xs[:, d] = 0.0
        if self.act_group:
            y8 = self._grouped_int8(xs)
        else:
            codes, sx = quantize_tokens(xs)
            y8 = int8_mm(codes, self.qweight.t()).float() * sx * self.scale
        y = y8 if y is None else y8 + y
        return y.to(x.dtype)

    def _grouped_int8(self, xs: torch.Tensor) -> torch.Tensor:
        g = self.act_group
        codes, sx = quantize_tokens(xs, g)
        acc = None
        for i in range(self.in_features // g):
            part = int8_mm(codes[:, i * g:(i + 1) * g].contiguous(), self.qweight[:, i * g:(i + 1) * g].t()).float()
            part = part * sx[:, i]
            acc = part if acc is None else acc.add_(part)
        return acc * self.scale
