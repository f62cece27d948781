"""Uniform b-bit affine quantization: w ~= scale * (code - zero) per row and group of inputs, and the two methods
that share the grid: ``rtn`` (data-free round-to-nearest) and ``gptq`` (calibrated error feedback,
``moeq.quant.gptq``). Both store codec ``affine-packed``.

QTensor tensors: ``codes`` uint8 [out, in] (0 .. 2^bits - 1), ``scale`` float16 [out, n_groups],
``zero`` uint8 [out, n_groups]; meta {bits, group_size, sym}. Group j covers inputs [j*g, (j+1)*g) (the last may
be shorter); group_size 0 = one group per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Iterator, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from moeq.quant.base import CalibSpec, MethodConfig, QTensor, Quantizer, SharedTable, Stats, calibrated
from moeq.quant.gptq import GPTQResult, GridResult, gptq, rtn
from moeq.quant.stats import Hessian
from moeq.registry import QUANTIZERS

FP16_MIN, FP16_MAX = 2.0 ** -24, 65504.0       # smallest subnormal / largest finite float16
CLIP_RATIOS = tuple(i / 50 for i in range(50, 0, -1))  # clip="mse": range multipliers tried (1.00 .. 0.02)
BATCH_BYTES = 1 << 26    # Hessian bytes per batched GPTQ call (experts are chunked to stay under it; the call
                         # holds about 3x that in factorization temporaries)


@dataclass(frozen=True)
class UniformGrid:
    """The uniform grid as a ``moeq.quant.gptq.ColumnGrid``, GPTQ's quantizer:
      asymmetric: range [min(w, 0), max(w, 0)] over 2^b - 1 steps, zero = round(-min / scale) in [0, 2^b - 1];
      symmetric:  range [-absmax, absmax], zero = 2^(b-1), so codes reach -2^(b-1) .. 2^(b-1) - 1 steps and the
                  positive extreme clips by half a step (the reference keeps min = 0 for a group with no negative
                  weight, clipping it to half its range; here the range is always symmetric).
    ``clip="mse"`` shrinks each row's (group's) range by the factor in ``CLIP_RATIOS`` of least squared weight error
    (1.0 is among them, so never worse than absmax). An all-zero group gets the range [-1, 1]. The scale is rounded to float16 (kept in [2^-24, 65504]) before the
    codes are chosen, as stored, so ``deq`` is exactly what the codec's parts decode to."""

    bits: int
    sym: bool = False
    clip: Literal["absmax", "mse"] = "absmax"
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)
        if self.sym:
            hi = torch.maximum(-lo, hi)
            lo = -hi
        if self.clip == "mse":
            return self._mse_params(w, lo, hi)
        return self._range_params(lo, hi)

    def _mse_params(self, w: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per row (and group), the range [a*lo, a*hi] with a in ``CLIP_RATIOS`` of least squared error."""
        best, best_err = None, None
        for a in CLIP_RATIOS:
            p = self._range_params(lo * a, hi * a)
            deq, _ = self.quantize(w, {k: v[..., None] for k, v in p.items()})
            err = (deq - w).square_().sum(-1)
            if best is None:
                best, best_err = p, err
            else:
                better = err < best_err
                best = {k: torch.where(better, v, best[k]) for k, v in p.items()}
                best_err = torch.minimum(err, best_err)
        return best

    def _range_params(self, lo: torch.Tensor, hi: torch.Tensor) -> dict[str, torch.Tensor]:
        empty = (lo == 0) & (hi == 0)
        lo, hi = lo.masked_fill(empty, -1.0), hi.masked_fill(empty, 1.0)
        scale = ((hi - lo) / self.maxq).clamp(FP16_MIN, FP16_MAX).half().to(lo.dtype)
        if self.sym:
            zero = torch.full_like(scale, (self.maxq + 1) // 2)
        else:
            zero = torch.round(-lo / scale).clamp(0, self.maxq)
        return {"scale": scale, "zero": zero}

    def quantize(self, w, params):
        codes = (torch.round(w / params["scale"]) + params["zero"]).clamp(0, self.maxq)
        return params["scale"] * (codes - params["zero"]), codes.to(self.code_dtype)


def affine_dequantize(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] = scale * (codes - zero), group-wise; bit-identical to ``UniformGrid.quantize``'s deq."""
    out_f, in_f = codes.shape
    ng = scale.shape[1]
    g = group_size or in_f
    c = F.pad(codes, (0, ng * g - in_f)) if ng * g != in_f else codes
    w = c.reshape(out_f, ng, g).float().sub_(zero.float()[..., None]).mul_(scale.float()[..., None])
    return w.view(out_f, ng * g)[:, :in_f]


class UniformConfig(MethodConfig):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: Literal[0, 32, 64, 128] = Field(128, description="inputs per scale/zero group; 0 = one per row")
    sym: bool = Field(False, description="symmetric grid (zero point fixed at 2^(bits-1)) instead of min/max")
    clip: Literal["absmax", "mse"] = Field(
        "absmax", description="range of a row/group: its min/max, or the shrunk range of least squared error (mse)")


class GPTQOptions(MethodConfig):
    """The options of the GPTQ core (``moeq.quant.gptq``) and of its calibration, for every method built on it."""

    percdamp: float = Field(0.01, gt=0, description="GPTQ damping λ = percdamp * mean(diag H)")
    block_size: int = Field(128, ge=1, description="GPTQ columns per lazy-batch block")
    act_order: bool = Field(True, description="GPTQ: quantize columns by descending Hessian diagonal")
    experts: Literal["routed", "pooled"] = Field(
        "routed", description="routed: one Hessian per expert from its routed tokens; pooled: one per layer")
    gate_weighted: bool = Field(False, description="weight each routed token by its gate probability")
    min_tokens: int = Field(1, ge=1, description="an expert routed fewer calibration tokens is starved")
    starved: Literal["rtn", "route_all"] = Field(
        "rtn", description="what a starved expert gets: rtn (identity Hessian) or route_all (Hessian from every "
                           "calibration token of the layer)")

    def calib_spec(self) -> CalibSpec:
        """The calibration these options ask for: one Hessian per input (or per pooled expert set)."""
        return CalibSpec(accumulators=[Hessian()], experts=self.experts, gate_weighted=self.gate_weighted,
                         min_tokens=self.min_tokens, starved=self.starved)


class GPTQConfig(GPTQOptions, UniformConfig):
    static_groups: bool = Field(True, description="group parameters from the original weights, computed up front")

    @model_validator(mode="after")
    def _check(self):
        if self.act_order and self.group_size and not self.static_groups:
            raise ValueError("act_order with groups needs static_groups (no column permutation is stored)")
        return self


def _qtensor(r: GridResult, cfg: UniformConfig) -> QTensor:
    return QTensor(tuple(r.codes.shape), {"codes": r.codes, "scale": r.params["scale"].half(),
                                          "zero": r.params["zero"].to(torch.uint8)},
                   {"bits": cfg.bits, "group_size": cfg.group_size, "sym": cfg.sym})


def _split(r: GridResult, cfg: UniformConfig) -> list[QTensor]:
    out = [_qtensor(GridResult(r.codes[e], {k: v[e] for k, v in r.params.items()}, r.deq[e]), cfg)
           for e in range(r.codes.shape[0])]
    if isinstance(r, GPTQResult):  # diagnostics for the manifest: damping used, GPTQ's proxy loss
        for e, q in enumerate(out):
            q.info = {"gptq_fallback": r.fallback[e], "gptq_loss": round(float(r.loss[e]), 6)}
    return out


def expert_batches(stats: list[Stats | None], shape: tuple[int, int], min_tokens: int = 1, calibrate: bool = True
                   ) -> Iterator[tuple[list[int], torch.Tensor | None]]:
    """The experts of one stack ([E, out, in] with ``shape`` = (out, in)) in the batches a GPTQ-core method
    processes them: ``(indices, None)`` for those with fewer than ``min_tokens`` calibration tokens (or all, when
    not ``calibrate``: data-free), chunked to ~``BATCH_BYTES`` of float weights; then ``(indices, H)`` for the
    calibrated ones, H the pooled [in, in] Hessian when they all share one (``experts="pooled"``), else their
    stacked [k, in, in], chunked so Hessians and weight copies stay near ``BATCH_BYTES``."""
    out_f, in_f = shape
    hot = [e for e, s in enumerate(stats) if calibrate and calibrated(s, min_tokens)]
    cold = sorted(set(range(len(stats))) - set(hot))
    step = max(1, BATCH_BYTES // (4 * out_f * in_f))
    for i in range(0, len(cold), step):
        yield cold[i:i + step], None
    step = max(1, BATCH_BYTES // (4 * in_f * max(in_f, out_f)))
    for i in range(0, len(hot), step):
        hs = [stats[e].hessian for e in hot[i:i + step]]
        yield hot[i:i + step], hs[0] if all(h is hs[0] for h in hs) else torch.stack(hs)


class _UniformQuantizer(Quantizer):
    codec = "affine-packed"

    def _rtn(self, w: torch.Tensor, cfg: UniformConfig) -> GridResult:
        return rtn(w.detach().float(), UniformGrid(cfg.bits, cfg.sym, cfg.clip), cfg.group_size)

    def quantize(self, w, cfg, stats, shared=None):
        return _qtensor(self._rtn(w, cfg), cfg)

    def quantize_experts(self, w, cfg, stats, shared=None):
        return [q for idx, _ in expert_batches(stats, tuple(w.shape[-2:]), calibrate=False)
                for q in _split(self._rtn(w[idx], cfg), cfg)]

    def dequantize(self, q: QTensor, shared: dict[str, SharedTable] | None = None) -> torch.Tensor:
        t = q.tensors
        return affine_dequantize(t["codes"], t["scale"], t["zero"], int(q.meta["group_size"]))


@QUANTIZERS.register("rtn")
class RTNQuantizer(_UniformQuantizer):
    """Data-free round-to-nearest on the uniform grid."""

    name = "rtn"
    Config = UniformConfig


@QUANTIZERS.register("gptq")
class GPTQQuantizer(_UniformQuantizer):
    """GPTQ on the uniform grid. A weight without calibration tokens (an expert its router never chose) is
    rounded to nearest (GPTQ with identity H): with H = 0 every input would count as dead and be zeroed."""

    name = "gptq"
    Config = GPTQConfig

    def calibration(self, cfg: GPTQConfig) -> CalibSpec:
        return cfg.calib_spec()

    def _gptq(self, w: torch.Tensor, h: torch.Tensor, cfg: GPTQConfig) -> GridResult:
        return gptq(w.detach().float(), h.float(), UniformGrid(cfg.bits, cfg.sym, cfg.clip), group_size=cfg.group_size,
                    block_size=cfg.block_size, percdamp=cfg.percdamp, act_order=cfg.act_order,
                    static_groups=cfg.static_groups)

    def quantize(self, w, cfg, stats, shared=None):
        return self.quantize_experts(w[None], cfg, [stats])[0]

    def quantize_experts(self, w, cfg, stats, shared=None):
        """One batched GPTQ call per chunk of calibrated experts (one call for all when they share one pooled
        Hessian), one batched RTN call per chunk of the rest (``expert_batches``)."""
        out: list[QTensor | None] = [None] * w.shape[0]
        for idx, h in expert_batches(stats, tuple(w.shape[-2:]), cfg.min_tokens):
            r = self._rtn(w[idx], cfg) if h is None else self._gptq(w[idx], h, cfg)
            for e, q in zip(idx, _split(r, cfg)):
                out[e] = q
        return out
