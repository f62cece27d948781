"""Executing LLM.int8 packed weights.

w8a8 forward for x [M, K] (per-token scales computed at run time, in float32 whatever the activation dtype):
    xs = x * c                                       c = 1/smooth with the static outlier columns O set to 0
    y  = int8(xs) @ Q.T * amax(xs)/127 * sw          (int8 GEMM, int32 accumulate, ``torch._int_mm``; at one or
                                                      two tokens on CPU torch's int8-weight matvec on the integer
                                                      codes held in bf16, sums rounded once to bf16: ~1.5x faster)
       + x[:, O] @ W16[:, O].T                       (systematic outlier features: exact 16-bit columns, one addmm)
       + xs[:, D] @ deq(Q[:, D]).T                   (uncalibrated layers only: features over the threshold in THIS
                                                      batch, zeroed in xs first; a data-dependent branch)
A calibrated layer runs no per-call outlier search and no host synchronisation: ~10 kernels a call.

w8a8 at decode on CPU (up to ``fused_rows`` tokens, layers without the dynamic search or ``act_group``): the whole
formula above is ONE call of moeq's C++ kernel (``moeq.kernels.cpu.int8_matvec``: the same integer codes, exact int32
sums by AVX-512 VNNI, the static outlier columns and the bias in float32, output in x's dtype), instead of ~15 small
torch ops whose per-op overhead dominated small layers. ``MOEQ_KERNEL=torch`` (or no C++ compiler) keeps the torch
route; ``MOEQ_KERNEL=cpp`` insists on the kernel.

weight-only forward: ``torch._weight_int8pack_mm`` (int8 weights x bf16/fp16 activations, per-row scales) up to
``Int8Linear.small_batch`` tokens (more for large weights), float32 activations converted to bfloat16 once for it (torch's float32 variant
of the kernel is ~20x slower than the bf16 one); above that (prefill) the codes are converted and one dense GEMM
runs in the activation dtype (float32 for CPU float16, whose GEMMs are slow).
"""

from __future__ import annotations

import os
from typing import ClassVar

import torch
import torch.nn.functional as F

# builds nothing on import: the C++ library is built (or loaded from its cache) on first use
from moeq.kernels import cpu as cpu_kernels
from moeq.quant.base import QTensor
from moeq.registry import RUNTIMES

QMAX = 127.0
_FUSED_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}   # = moeq.kernels.cpu.DTYPES


def fused_library():
    """moeq's C++ library where the fused CPU w8a8 route may run, else None. ``MOEQ_KERNEL`` (moeq.kernels.lut):
    ``torch`` forces the torch route, ``cpp`` insists (RuntimeError where the library cannot be built), anything
    else takes the kernel where it builds."""
    want = os.environ.get("MOEQ_KERNEL", "auto").strip().lower()
    if want == "torch":
        return None
    lib = cpu_kernels.library()
    if lib is None and want == "cpp":
        raise RuntimeError("MOEQ_KERNEL=cpp: the C++ int8 kernel cannot run here")
    return lib


def int8_mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """int8 [M, K] x int8 [K, N] -> int32 [M, N]."""
    if a.device.type == "cuda" and a.shape[0] <= 16:  # cuBLASLt int8 needs M > 16
        pad = a.new_zeros(17 - a.shape[0], a.shape[1])
        return torch._int_mm(torch.cat([a, pad]), b_t)[: a.shape[0]]
    if a.device.type in ("cpu", "cuda"):
        return torch._int_mm(a, b_t)
    return a.to(torch.int32) @ b_t.to(torch.int32)


def aligned(t: torch.Tensor, to: int = 64) -> torch.Tensor:
    """``t`` contiguous at a ``to``-byte aligned address (a copy only where needed). Codes decoded from a shard are
    views at any byte offset, and ``torch._weight_int8pack_mm`` crashes (SIGSEGV, torch 2.13 CPU) on an int8
    weight that is not 64-byte aligned."""
    t = t.contiguous()
    return t if t.data_ptr() % to == 0 else t.clone()


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
    """One packed int8 weight. Per call it picks the fastest exact route for the batch (see the module docstring);
    every per-call constant (smoothing with the static outlier columns zeroed, scales over 127, the outlier weight in
    the compute dtype) is built once, so a decode step is a handful of kernels and no host synchronisation."""

    # Routes by batch size, measured on a 2-core AVX-512 CPU (torch 2.13): torch's int8-weight matvec costs about
    # one matvec per row of x, while converting the codes for a dense GEMM costs ~1 ns a weight; the int8 GEMM is
    # flat in M up to a few rows but loses to the matvec at one or two.
    small_batch: ClassVar[int] = 8     # weight-only: the int8-weight kernel up to max(this, weights / 2^19) rows
    matvec_rows: ClassVar[int] = 2     # w8a8: the int8-weight kernel on integer codes up to this many rows
    fused_rows: ClassVar[int] = 4      # w8a8 CPU: moeq's fused C++ kernel up to this many rows (where it applies)

    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict | None = None):
        super().__init__()
        t = q.tensors
        self.out_features, self.in_features = q.shape
        self.mode = q.meta.get("mode", "w8a8")
        self.threshold = float(q.meta.get("threshold", 0.0))
        self.act_group = int(q.meta.get("act_group", 0))
        self.register_buffer("qweight", aligned(t["qweight"]))
        self.register_buffer("scale", t["scale"].float())
        self.register_buffer("inv_smooth", (1.0 / t["smooth"].float()) if "smooth" in t else None)
        self.register_buffer("outlier_idx", t["outlier_idx"].long() if "outlier_idx" in t else None)
        self.register_buffer("outlier_w", t.get("outlier_w"))
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        # Calibration saw this layer's inputs (smoothing or systematic columns): its outliers are the static columns
        # and no per-call search runs. Uncalibrated layers decompose features over the threshold in each batch.
        self.dynamic = self.threshold > 0 and self.inv_smooth is None and self.outlier_idx is None
        self._fusable = self.mode == "w8a8" and not self.dynamic and not self.act_group   # the fused CPU route
        self._cache: dict = {}   # (name, dtype, device) -> constant; "fused" -> the fused kernel's layer (int8_layer)

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
        return y.reshape(*shape[:-1], self.out_features)

    def _apply(self, fn, *args, **kwargs):  # .to() / .cuda() / load_state_dict: the constants are rebuilt
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def _const(self, name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A per-call constant, built once per (dtype, device) from the buffers (rebuilt if they move)."""
        key = (name, dtype, device)
        t = self._cache.get(key)
        if t is None:
            if name == "act_scale":  # what multiplies x before the int8 GEMM: 1/smooth, 0 on the static columns
                t = torch.ones(self.in_features, device=device) if self.inv_smooth is None else self.inv_smooth.clone()
                if self.outlier_idx is not None:
                    t[self.outlier_idx] = 0.0
            elif name == "scale_q":  # weight scale / 127: the dequantisation of int32 sums is (x absmax) * scale_q
                t = self.scale / QMAX
            elif name == "ones":
                t = torch.ones(self.out_features)
            elif name == "outlier_w_t":
                t = self.outlier_w.t()
            elif name == "comp":  # fused kernel: its codes are held + 128 (VNNI multiplies unsigned by signed bytes)
                t = self.qweight.sum(dim=1, dtype=torch.int32) * 128
            else:
                t = getattr(self, name)
            t = self._cache[key] = t.to(device=device, dtype=dtype).contiguous()
        return t

    def _weight_only(self, x: torch.Tensor) -> torch.Tensor:
        dt = x.dtype
        if (x.device.type == "cpu" and x.shape[0] <= max(self.small_batch, self.qweight.numel() >> 19)
                and self.in_features % 16 == 0):  # torch 2.13's kernel is wrong (NaN, garbage, a crash at K=7)
                                                  # when K is not a multiple of 16: tests/test_int8_fused.py
            # torch's int8 x bf16/fp16 kernel; its float32 variant is ~20x slower, so float32 activations are
            # converted once (bf16 keeps 8 bits of mantissa against the weight's 7)
            kdt = dt if dt in (torch.bfloat16, torch.float16) else torch.bfloat16
            y = torch._weight_int8pack_mm(x.to(kdt), self.qweight, self._const("scale", kdt, x.device)).to(dt)
        else:
            cdt = torch.float32 if dt == torch.float16 and x.device.type == "cpu" else dt  # CPU fp16 GEMMs are slow
            y = F.linear(x.to(cdt), self.qweight.to(cdt)) * self._const("scale", cdt, x.device)
            y = y.to(dt)
        return y if self.bias is None else y + self._const("bias", dt, x.device)

    def _w8a8(self, x: torch.Tensor) -> torch.Tensor:
        dev = x.device
        if (self._fusable and x.is_cpu and x.shape[0] <= self.fused_rows and x.dtype in _FUSED_DTYPES
                and not (x.requires_grad and torch.is_grad_enabled())):
            lib = fused_library()
            if lib is not None:
                return self._w8a8_fused(lib, x)
        xs = x * self._const("act_scale", torch.float32, dev)  # fp32; the static outlier columns are zero
        y_fp = None
        if self.dynamic:
            xs, y_fp = self._take_dynamic_outliers(x, xs)
        if self.act_group:
            y = self._grouped_int8(xs)
        else:
            amax = xs.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)  # (linalg.vector_norm inf: 24x slower)
            codes = (xs * (QMAX / amax)).round_()
            if dev.type == "cpu" and x.shape[0] <= self.matvec_rows:
                # integer codes are exact in bf16; torch's int8-weight matvec sums them in float32 (exact below
                # 2^24) and rounds each sum to bf16 once: ~1.5x faster than the int8 GEMM at one token
                acc = torch._weight_int8pack_mm(codes.to(torch.bfloat16), self.qweight,
                                                self._const("ones", torch.bfloat16, dev))
            else:
                acc = int8_mm(codes.to(torch.int8), self.qweight.t())
            y = acc * (amax * self._const("scale_q", torch.float32, dev))
        if self.outlier_idx is not None:  # exact 16-bit columns for the systematic outlier features
            xo = x.index_select(1, self.outlier_idx).float()
            y = torch.addmm(y, xo, self._const("outlier_w_t", torch.float32, dev))
        if y_fp is not None:
            y = y + y_fp
        if self.bias is not None:
            y = y + self._const("bias", torch.float32, dev)
        return y.to(x.dtype)

    def _w8a8_fused(self, lib, x: torch.Tensor) -> torch.Tensor:
        """The decode route on CPU: the whole w8a8 formula in one call of the C++ kernel (module docstring). The
        layer's constants (the cached float32 ones, the codes, 128 * their row sums) are handed over once."""
        qw = self._buffers["qweight"]
        fused = self._cache.get("fused")
        if fused is None or fused[0] is not qw or fused[1] != qw._version:
            # first call, or qweight replaced / modified in place: its row sums ("comp") are stale with it
            self._cache.pop(("comp", torch.int32, x.device), None)
            dev, f32 = x.device, torch.float32
            j = self.outlier_idx is not None and self.outlier_idx.numel() > 0
            layer = cpu_kernels.int8_layer(
                self._const("act_scale", f32, dev), qw, self._const("comp", torch.int32, dev),
                self._const("scale_q", f32, dev), self._const("outlier_idx", torch.int64, dev) if j else None,
                self._const("outlier_w_t", f32, dev) if j else None,
                self._const("bias", f32, dev) if self.bias is not None else None)
            fused = self._cache["fused"] = (qw, qw._version, layer)
        layer = fused[2]
        x = x.contiguous()
        m, dt = x.shape[0], _FUSED_DTYPES[x.dtype]
        y = torch.empty(m, self.out_features, dtype=x.dtype)
        threads = cpu_kernels.int8_threads(layer[0].N * layer[0].K)
        lib.moeq_int8_matvec(layer[1], x.data_ptr(), dt, m, y.data_ptr(), dt, threads)
        return y

    def _take_dynamic_outliers(self, x: torch.Tensor, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features over the threshold in THIS batch leave the int8 GEMM and run in float32 (LLM.int8's
        decomposition; a data-dependent branch, so only for layers calibration did not see)."""
        dyn = (x.abs() >= self.threshold).any(dim=0)
        if not dyn.any():
            return xs, None
        d = dyn.nonzero().flatten()
        wd = self.qweight[:, d].float() * self.scale[:, None]
        y = xs[:, d] @ wd.t()
        xs = xs.clone()
        xs[:, d] = 0.0
        return xs, y

    def _grouped_int8(self, xs: torch.Tensor) -> torch.Tensor:
        g = self.act_group
        codes, sx = quantize_tokens(xs, g)
        acc = None
        for i in range(self.in_features // g):
            part = int8_mm(codes[:, i * g:(i + 1) * g].contiguous(), self.qweight[:, i * g:(i + 1) * g].t()).float()
            part = part * sx[:, i]
            acc = part if acc is None else acc.add_(part)
        return acc * self.scale
