"""LLM.int8(): per-row absmax int8 weights, per-token int8 activations and a mixed-precision decomposition
of outlier features, plus two calibrated additions (see ../shared/methods/llm-int8.md):

- exact outliers: input features that calibration shows to be systematic outliers (|x| >= threshold in at least
  ``outlier_frac`` of calibration tokens) keep their EXACT 16-bit weight columns; bitsandbytes dequantizes them
  from int8 instead. Features that exceed the threshold only at run time are still decomposed dynamically.
- smoothing (SmoothQuant): s_j = amax_x_j^a / amax_w_j^(1-a) is folded into the weight columns (W·s) and the
  activations are divided by s at run time, moving quantization difficulty from activations to weights.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Literal

import torch
from pydantic import Field, model_validator

from moeq.heap import empty
from moeq.quant.base import CalibSpec, MethodConfig, QTensor, Quantizer, Stats
from moeq.quant.stats import AbsMaxHits
from moeq.registry import QUANTIZERS

QMAX = 127


class Int8Config(MethodConfig):
    mode: Literal["w8a8", "weight_only"] = Field(
        "w8a8", description="w8a8: int8 GEMM with decomposition; weight_only: int8 weights, 16/32-bit activations")
    threshold: float = Field(6.0, ge=0.0, description="activation outlier threshold; 0 disables the decomposition")
    smooth_alpha: float | None = Field(0.5, ge=0.0, le=1.0, description="SmoothQuant migration strength; null = off")
    outlier_frac: float = Field(0.01, ge=0.0, le=1.0,
                                description="calibration token share above threshold that makes a feature systematic")
    act_group: int = Field(0, ge=0, description="per-token activation scales per group of this many inputs; 0 = whole row")
    outlier_dtype: Literal["float16", "bfloat16"] = "float16"

    @model_validator(mode="after")
    def _check(self):
        if self.mode == "weight_only" and (self.act_group or self.smooth_alpha not in (None, 0.5)):
            raise ValueError("act_group and smooth_alpha apply to mode w8a8 only")
        return self


BLOCK = 1 << 17  # elements per block of rows (512 KB of float32: stays in cache, below bound_heap's mmap threshold)


def absmax_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-row symmetric int8: codes [out, in] int8, scale [out] fp32 (w ~= codes * scale[:, None]),
    s = max|w_row| / 127 and codes = round(w / s) in float32 (``w`` may be bf16 or fp16: upcast exactly).
    On the CPU one pass of moeq's C++ kernel (``moeq.kernels.cpu.absmax_rows``) where the kernel route is ``cpp``;
    else torch a block of rows at a time, so the temporaries stay in cache (several times faster than whole-matrix
    ops on large weights). No clamp of the codes: |w / s| <= 127 up to one rounding of the division."""
    out_f, in_f = w.shape
    cpu = w.device.type == "cpu"
    codes = empty((out_f, in_f), torch.int8) if cpu else torch.empty(out_f, in_f, dtype=torch.int8, device=w.device)
    scale = torch.empty(out_f, dtype=torch.float32, device=w.device)
    if cpu and w.dtype in (torch.float32, torch.bfloat16, torch.float16) and (in_f <= 1 or w.stride(1) == 1):
        from moeq.kernels import cpu as cpu_kernels
        from moeq.kernels.lut import route_for
        if route_for("cpu") == "cpp":
            cpu_kernels.absmax_rows(w, codes, scale)
            return codes, scale
    step = max(1, BLOCK // max(in_f, 1)) if cpu else max(out_f, 1)
    with one_thread(cpu):
        for r in range(0, out_f, step):
            blk = w[r:r + step].to(torch.float32, copy=True)
            s = blk.abs().amax(dim=1).clamp_(min=1e-12).div_(QMAX)
            scale[r:r + step] = s
            codes[r:r + step] = blk.div_(s[:, None]).round_()
    return codes, scale


@contextmanager
def one_thread(on: bool = True):
    """Torch ops on one thread inside the block: cache-sized blocks gain nothing from splitting, and each split
    op waits for the other thread at its end (a scheduling slice each, on a loaded machine)."""
    n = torch.get_num_threads()
    if on and n > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on and n > 1:
            torch.set_num_threads(n)


def smoothing_scales(act_amax: torch.Tensor, w: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant per-input-feature scales s = amax_x^alpha / amax_w^(1-alpha), finite and positive."""
    w_amax = w.abs().amax(dim=0).clamp(min=1e-5)
    s = act_amax.float().clamp(min=1e-5).pow(alpha) / w_amax.pow(1.0 - alpha)
    return s.clamp(min=1e-4, max=1e4)


def systematic_outliers(stats: Stats | None, frac: float, threshold: float) -> torch.Tensor:
    """Indices of features whose share of calibration tokens with |x| >= threshold is >= frac."""
    if stats is None or threshold <= 0 or stats.tokens == 0:
        return torch.zeros(0, dtype=torch.int32)
    share = stats.hits.float() / stats.tokens
    mask = (share >= frac) & (stats.hits > 0)
    return mask.nonzero().flatten().to(torch.int32)


@QUANTIZERS.register("int8")
class Int8Quantizer(Quantizer):
    name = "int8"
    codec = "int8-rows"
    Config = Int8Config

    def calibration(self, cfg: Int8Config) -> CalibSpec:
        if cfg.mode == "w8a8" and (cfg.smooth_alpha is not None or cfg.threshold > 0):
            return CalibSpec([AbsMaxHits(cfg.threshold)])
        return CalibSpec()

    def quantize(self, w: torch.Tensor, cfg: Int8Config, stats: Stats | None, shared=None) -> QTensor:
        w = w.detach()  # absmax_rows computes in float32 itself
        out_f, in_f = w.shape
        tensors: dict[str, torch.Tensor] = {}
        if cfg.mode == "w8a8":
            w = w.float()
            idx = systematic_outliers(stats, cfg.outlier_frac, cfg.threshold)
            if idx.numel():
                tensors["outlier_idx"] = idx
                tensors["outlier_w"] = w[:, idx.long()].to(getattr(torch, cfg.outlier_dtype))
            if cfg.smooth_alpha is not None and stats is not None:
                s = smoothing_scales(stats.amax, w, cfg.smooth_alpha)
                if idx.numel():
                    s[idx.long()] = 1.0
                w = w * s[None, :]
                tensors["smooth"] = s
            if idx.numel():
                w = w.clone()
                w[:, idx.long()] = 0.0
        codes, scale = absmax_rows(w)
        tensors = {"qweight": codes, "scale": scale, **tensors}
        meta = {"mode": cfg.mode, "threshold": float(cfg.threshold), "act_group": int(cfg.act_group)}
        if cfg.act_group and in_f % cfg.act_group:
            meta["act_group"] = 0  # the group must divide the row; fall back to per-token scales
        return QTensor((out_f, in_f), tensors, meta)

    def dequantize(self, q: QTensor, shared=None) -> torch.Tensor:
        t = q.tensors
        w = t["qweight"].float() * t["scale"][:, None]
        if "smooth" in t:
            w = w / t["smooth"][None, :]
        if "outlier_idx" in t:
            w[:, t["outlier_idx"].long()] = t["outlier_w"].float()
        return w
