"""Matryoshka: one 8-bit parent code per weight whose top r bits are the r-bit code, for every r in ``widths``
(see ../shared/methods/matryoshka.md). One artifact holds every precision from 8 down to 2 bits; a loader picks one.

The grid. Per row and group of inputs a range [lo, lo + 256 s] is cut into 256 buckets of width s (the parent
step). The r-bit child of parent q is ``c = q >> (8 - r)`` and decodes to the CENTRE of its bucket of 2^(8-r)
parent steps:
    deq_r(q) = lut_r[c] * s + lo,   lut_r[c] = 2^(8-r) * (c + 1/2)             (asymmetric, lo = min of the group)
    deq_r(q) = lut_r[c] * s,        lut_r[c] = 2^(8-r) * (c + 1/2 - 2^(r-1))   (symmetric: lo = -absmax,
                                                                                s = 2 absmax / 256)
So a symmetric width is one global LUT of 2^r levels times a per-group scale: ``moeq.kernels.lut_linear`` runs it.
Every level sits at a centre, none at zero (an all-zero group gets s = 0 and decodes to exact zeros).

Nesting for free. The floor parent q = clamp(floor((w - lo) / s), 0, 255) puts w in the bucket that contains it
at every width at once, and a bucket's centre is the nearest r-bit level to any point of it: the floor parent
minimizes (w - deq_r(q))^2 for every r simultaneously, hence sum_r λ_r (w - deq_r(q))^2 for any λ >= 0 (the
method note's exhaustive search returns the same codes). No search over the 256 codes is needed.

Two modes:
  - ``data_free``: the floor parent of the weight (the strongest data-free baseline).
  - ``data_driven`` (default): GPTQ (``moeq.quant.gptq``) on the nested grid, in one of two ways (``feedback``):
    ``per_width`` (default, ``WidthStates``): one error state per width, each copy of the weights fed its own
    width's residual, one parent per weight chosen for sum_r λ_r (w_r - deq_r(q))^2; ``averaged`` (MatGPTQ,
    ``NestedGrid``): one state, each column's parent the floor parent of the updated column and the error fed
    back w - the λ-weighted AVERAGE of deq_r over ``widths``. The averaged residual is dominated by the low widths'
    large errors, so the 8-bit model carries compensation made for 2-bit errors: at the same λ (2/1/1/1/1), on
    SmolLM2-135M (g64, 4 kept columns, 16 windows) it gave r = 8 / 4 / 3 / 2 ppl 14.70 / 15.78 / 24.87 / 4881
    against per_width's 13.73 / 15.52 / 25.28 / 3384 (int8 13.53, GPTQ-4 15.46); on tiny-moe (32 windows, both with
    kept columns) averaged 67.52 / 67.53 / 67.53 / 67.79 / 69.54 at r = 8 / 6 / 4 / 3 / 2 against per_width's 67.39
    / 67.43 / 67.52 / 67.66 / 68.69 (benchmarks/results/matryoshka_tiny-moe{,_averaged}.json). per_width costs R
    GPTQ states (4.5x the time at 5 widths on SmolLM2).
Scales (and offsets) are rounded to float16 before the codes are chosen, so the codes decode bit-exactly.

Outlier columns (data-driven, ``outliers`` k, default 4): the k inputs of largest mean squared activation (diag H)
are not quantized. GPTQ processes them last, so they absorb the other columns' compensation, and they are stored
in float16 and read as stored at every width (``gptq(keep=k)``). The nested grid has no zero level, so without
them a near-zero weight in a massive-activation channel is off by half a bucket at low widths (see
``DEFAULT_OUTLIERS``).

QTensor tensors: ``codes`` uint8 [out, in] (the parent, < 2^bits), ``scale`` float16 [out, n_groups] (s),
``offset`` float16 [out, n_groups] (lo; asymmetric only), ``cols`` int32 [k] and ``col_values`` float16 [out, k]
(the kept columns, k > 0 only); meta {bits (8 for the parent, r for a child read at r bits), widths (descending,
the widths the parent was fitted for and may be read at), group_size, sym, outliers (k)}. Group j
covers inputs [j*g, (j+1)*g) (the last may be shorter); group_size 0 = one group per row. ``info``: the mode and
``out_err`` {width: error} with ``metric`` ``output`` (tr(dW_r H dW_r^T), H the input Hessian 2 X^T X / n) or
``weight_mse`` (no Hessian: data-free mode or no calibration tokens), for a later bit allocation per expert.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from moeq.quant.base import CalibSpec, QTensor, Quantizer, SharedTable
from moeq.quant.gptq import GridResult, gptq, rtn
from moeq.quant.uniform import FP16_MAX, FP16_MIN, GPTQOptions, expert_batches
from moeq.registry import QUANTIZERS

PARENT_BITS = 8
WIDTHS = (8, 6, 4, 3, 2)
# default λ per width (data-driven), by feedback. per_width: the low widths' buckets are wide (64 parent steps at
# r = 2, 32 at 3), so an equal say lets them pull the parent many 8-bit steps away from the 8-bit optimum; weight
# 16 on 8 bits and a small one on 3 and 2 bits keeps the 8-bit model at plain int8's level while every width keeps
# its own GPTQ state. SmolLM2-135M (g64, 4 kept columns, 16 windows; int8 13.5278, GPTQ r-bit 15.4562 / 25.1875 /
# 1781.1 at r = 4 / 3 / 2, floor parent 24.0901 / 8610.4 / 97,802.8): λ 2/1/1/1/1 gave r = 8 / 4 / 3 / 2 ppl
# 13.7254 / 15.5212 / 25.28 / 3384 (r = 8 +1.46% of int8); λ 8/1/1/1/1 13.6582 / 15.5740 / 26.72 / 2633;
# λ 16/1/1/0.25/0.0625 13.5034 / 15.0398 / 26.03 / 4035 (r = 8 -0.18% of int8, r = 4 -2.7% of GPTQ).
# averaged (MatGPTQ), tuned on tiny-moe without kept columns: twice the weight on 8 bits kept it within 0.25% ppl of
# plain int8 (equal λ: +0.34%, λ_8 = 4: +0.18% but r = 2 gains half as much; 2x on r = 2: +0.52%)
DEFAULT_WEIGHTS = {
    "per_width": {8: 16.0, 7: 1.0, 6: 1.0, 5: 1.0, 4: 1.0, 3: 0.25, 2: 0.0625},
    "averaged": {8: 2.0, 7: 1.0, 6: 1.0, 5: 1.0, 4: 1.0, 3: 1.0, 2: 1.0},
}
# input columns kept in 16 bits (data-driven). Real LLMs have a few "massive activation" channels (SmolLM2-135M: the
# top input's mean square is 300-2300x the median); a weight error there is multiplied by a huge input, and the
# nested grid has no zero level, so a near-zero weight in such a column is off by half a bucket. Measured on
# SmolLM2 (floor parent, g64 symmetric, 2 windows): r = 3 ppl 15,328 -> 35.0 with 4 kept columns, r = 4 27.0 -> 17.3
# (+0.11 bits/param at 576 inputs)
DEFAULT_OUTLIERS = 4


# ------------------------------------------------------------------------------------------------- the grid

def width_lut(bits: int, sym: bool) -> torch.Tensor:
    """float32 [2^bits]: the bucket centres of an r-bit child in parent steps (exact small dyadic numbers)."""
    c = torch.arange(1 << bits, dtype=torch.float64) + 0.5
    if sym:
        c -= 1 << (bits - 1)
    return (c * (1 << (PARENT_BITS - bits))).float()


def child(parent: torch.Tensor, bits: int) -> torch.Tensor:
    """The r-bit codes of 8-bit parents: their top r bits."""
    return parent >> (PARENT_BITS - bits)


def decode(codes: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """float32 lut_bits[codes] * scale (+ offset), scale/offset broadcast with codes: what the codec's parts and
    the runtime decode to."""
    v = width_lut(bits, offset is None).to(codes.device)[codes.long()] * scale.float()
    return v if offset is None else v + offset.float()


def floor_parent(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None) -> torch.Tensor:
    """uint8 parents: clamp(floor((w - lo) / s), 0, 255) (lo = -128 s when symmetric); s = 0 gives the middle
    (symmetric) or the bottom (asymmetric) bucket, which decodes to 0 / lo at every width."""
    s = torch.where(scale > 0, scale, torch.ones_like(scale))
    if offset is None:
        q = torch.floor(w / s) + (1 << (PARENT_BITS - 1))
    else:
        q = torch.floor((w - offset) / s)
    return q.clamp_(0, (1 << PARENT_BITS) - 1).to(torch.uint8)


@dataclass(frozen=True)
class NestedGrid:
    """The nested grid as a ``moeq.quant.gptq.ColumnGrid``. ``quantize`` returns the floor parents and, as
    ``deq``, the λ-weighted average over ``weights`` ((width, λ) pairs) of what each width decodes to: the
    residual GPTQ feeds back (MatGPTQ). With one width of λ > 0 it is exactly that width's decoded weight.
    Parameters per row (and group): ``scale`` s (float16-rounded, 0 for an all-zero or constant group) and, when
    asymmetric, ``offset`` lo = min (float16-rounded)."""

    sym: bool = True
    weights: tuple[tuple[int, float], ...] = ((PARENT_BITS, 1.0),)
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.sym:
            amax = w.abs().amax(-1)
            scale = (amax * (2 / 256)).clamp(FP16_MIN, FP16_MAX).half().to(w.dtype)
            return {"scale": scale.masked_fill(amax == 0, 0.0)}
        lo = w.amin(-1).clamp(-FP16_MAX, FP16_MAX).half().to(w.dtype)
        span = w.amax(-1) - lo
        scale = (span / 256).clamp(FP16_MIN, FP16_MAX).half().to(w.dtype)
        return {"scale": scale.masked_fill(span <= 0, 0.0), "offset": lo}

    def quantize(self, w, params):
        scale, offset = params["scale"], params.get("offset")
        q = floor_parent(w, scale, offset)
        total = sum(lam for _, lam in self.weights)
        deq = sum(lam * decode(child(q, r), r, scale, offset).to(w.dtype) for r, lam in self.weights if lam)
        return deq / total if total != 1 else deq, q


@dataclass(frozen=True)
class WidthStates:
    """The multi-width objective with one GPTQ state per width, as a ``moeq.quant.gptq.ColumnGrid``: the weights
    GPTQ is given are R = len(``weights``) stacked copies of the stack (width-major: copy r first along the
    leading dim), so each copy accumulates the error feedback of ITS width only. Per element, ``quantize`` picks
    one parent q minimizing sum_r λ_r (w_r - deq_r(q))^2 over the candidates: each copy's floor parent (the
    optimum of its own width) and, for each width, the widest copy's floor parent clamped into that width's
    bucket (the coarse choice kept, the fine bits as the widest width wants them); copy r gets deq_r(q) back,
    so its residual is its own. Unlike the averaged residual (``NestedGrid`` with several λ, MatGPTQ), the 8-bit
    model never carries compensation made for 2-bit errors. Kept columns (``gptq(keep=k)``) are exact in every
    copy; the artifact stores the first (widest) copy's values, read at every width."""

    sym: bool = True
    weights: tuple[tuple[int, float], ...] = ((PARENT_BITS, 1.0),)
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return NestedGrid(self.sym).params(w)     # the copies are equal when groups are fitted (static groups)

    def quantize(self, w, params):
        n = len(self.weights)
        ws = w.reshape(n, -1)
        scale = params["scale"].expand_as(w).reshape(n, -1)[0]
        offset = params.get("offset")
        offset = None if offset is None else offset.expand_as(w).reshape(n, -1)[0]
        widest = max(range(n), key=lambda i: self.weights[i][0])
        own = [floor_parent(ws[i], scale, offset) for i in range(n)]
        fine = own[widest].int()
        cands = list(own)
        for i, (r, _) in enumerate(self.weights):
            shift = PARENT_BITS - r
            base = (own[i].int() >> shift) << shift
            cands.append(torch.minimum(torch.maximum(fine, base), base + (1 << shift) - 1).to(torch.uint8))
        best, best_err = None, None
        for q in cands:
            err = sum(lam * (ws[i] - decode(child(q, r), r, scale, offset)).square()
                      for i, (r, lam) in enumerate(self.weights) if lam)
            if best is None:
                best, best_err = q, err
            else:
                take = err < best_err
                best, best_err = torch.where(take, q, best), torch.where(take, err, best_err)
        deq = torch.stack([decode(child(best, r), r, scale, offset) for r, _ in self.weights])
        return deq.reshape(w.shape).to(w.dtype), best.expand(n, -1).reshape(w.shape)


def nested_dequantize(codes: torch.Tensor, bits: int, scale: torch.Tensor, offset: torch.Tensor | None,
                      group_size: int) -> torch.Tensor:
    """float32 [out, in] of r-bit codes, group-wise; bit-identical to ``decode`` with column-expanded params."""
    out_f, in_f = codes.shape
    ng = scale.shape[1]
    g = group_size or in_f
    c = F.pad(codes, (0, ng * g - in_f)) if ng * g != in_f else codes
    c = c.view(out_f, ng, g)
    w = decode(c, bits, scale[..., None], None if offset is None else offset[..., None])
    return w.view(out_f, ng * g)[:, :in_f]


def with_kept(w: torch.Tensor, cols: torch.Tensor | None, values: torch.Tensor | None) -> torch.Tensor:
    """``w`` [out, in] with the kept input columns ``cols`` [k] set to their 16-bit ``values`` [out, k] (in place)."""
    if cols is not None and cols.numel():
        w[:, cols.long()] = values.to(w.dtype)
    return w


def width_errors(w: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None,
                 widths: tuple[int, ...], group_size: int, h: torch.Tensor | None,
                 kept: torch.Tensor | None = None, values: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
    """Per width r, per expert [E]: tr(dW_r H dW_r^T) (``h`` [in, in] or [E, in, in]) or, without ``h``, the
    weight MSE of dW_r = w - deq_r; ``w``/``codes`` [E, out, in], params [E, out, n_groups]; ``kept`` [E, k] /
    ``values`` [E, out, k]: the columns kept in 16 bits."""
    out = {}
    for r in widths:
        deq = torch.stack([with_kept(nested_dequantize(child(codes[e], r), r, scale[e],
                                                       None if offset is None else offset[e], group_size),
                                     None if kept is None else kept[e], None if values is None else values[e])
                           for e in range(w.shape[0])])
        dw = w.float() - deq
        out[r] = dw.square().mean((-2, -1)) if h is None else ((dw @ h.float()) * dw).sum((-2, -1))
    return out


# ---------------------------------------------------------------------------------------------- the method

class MatryoshkaConfig(GPTQOptions):
    widths: tuple[int, ...] = Field(WIDTHS, description="the widths the parent is fitted for and may be read at "
                                                        "(descending, 8 first)")
    feedback: Literal["per_width", "averaged"] = Field(
        "per_width", description="data-driven GPTQ: one error state per width, each fed its own residual "
                                 "(per_width), or one state fed the λ-averaged residual (averaged, MatGPTQ: faster, "
                                 "worse at every width on SmolLM2 and tiny-moe)")
    weights: tuple[float, ...] | None = Field(
        None, description="data-driven: λ per width (as ``widths``): the weight of each width's error in the parent "
                          "choice (and, averaged, in the residual); null = the default per feedback (per_width: 8: 16, "
                          "3: 0.25, 2: 0.0625, others 1; averaged: 8: 2, others 1)")
    group_size: Literal[0, 64, 128] = Field(64, description="inputs per scale group; 0 = one per row (64 and 128 "
                                                            "run the LUT kernel at 2, 3 and 4 bits)")
    sym: bool = Field(True, description="symmetric [-absmax, absmax] groups (one LUT per width, the LUT kernel); "
                                        "false: [min, max] with a float16 offset per group")
    mode: Literal["data_free", "data_driven"] = Field(
        "data_driven", description="data_free: the floor parent (nearest level at every width); data_driven: GPTQ "
                                   "on the nested grid on calibration data (see feedback)")
    outliers: int | None = Field(
        None, ge=0, le=64, description="data-driven: input columns of largest mean squared activation kept in 16 bits "
                                       "at every width (GPTQ compensates into them); null = 4 (data_driven), 0 "
                                       "(data_free)")

    @model_validator(mode="after")
    def _check(self):
        w = self.widths
        if not w or w[0] != PARENT_BITS or list(w) != sorted(set(w), reverse=True) or min(w) < 2:
            raise ValueError(f"widths must be distinct, descending, start at 8 and stay >= 2, got {list(w)}")
        if self.weights is not None and (len(self.weights) != len(w) or min(self.weights) < 0
                                         or not sum(self.weights) > 0):
            raise ValueError(f"weights: one λ >= 0 per width ({len(w)}), not all zero, got {list(self.weights)}")
        if self.mode == "data_free" and self.outliers:
            raise ValueError("outliers are chosen from calibration activations: they need mode data_driven")
        return self

    def kept_columns(self, in_features: int) -> int:
        """How many input columns stay in 16 bits for a weight with ``in_features`` inputs."""
        k = self.outliers if self.outliers is not None else (DEFAULT_OUTLIERS if self.mode == "data_driven" else 0)
        return min(k, in_features - 1)

    def lambdas(self) -> tuple[tuple[int, float], ...]:
        lam = self.weights if self.weights is not None else [DEFAULT_WEIGHTS[self.feedback][r] for r in self.widths]
        return tuple(zip(self.widths, (float(x) for x in lam)))


def _round(v: float) -> float:
    return float(f"{v:.6g}")


@QUANTIZERS.register("matryoshka")
class MatryoshkaQuantizer(Quantizer):
    """Nested 8-bit parents (bitplanes codec), data-free or GPTQ on the multi-width objective. A weight without
    calibration tokens in data-driven mode gets the floor parent (its ``info`` says so)."""

    name = "matryoshka"
    codec = "bitplanes"
    Config = MatryoshkaConfig

    def calibration(self, cfg: MatryoshkaConfig) -> CalibSpec:
        if cfg.mode != "data_driven":
            return CalibSpec()
        return cfg.calib_spec()

    def _qtensors(self, w, r: GridResult, cfg, h, info: dict) -> list[QTensor]:
        scale, offset = r.params["scale"], r.params.get("offset")
        kept = getattr(r, "kept", None)
        vals = None if kept is None else r.deq.gather(-1, kept[:, None, :].expand(*r.deq.shape[:2], -1)).half()
        errs = width_errors(w, r.codes, scale, offset, cfg.widths, cfg.group_size, h, kept, vals)
        meta = {"bits": PARENT_BITS, "widths": list(cfg.widths), "group_size": cfg.group_size, "sym": cfg.sym,
                "outliers": 0 if kept is None else kept.shape[-1]}
        out = []
        for e in range(w.shape[0]):
            t = {"codes": r.codes[e], "scale": scale[e].half()}
            if offset is not None:
                t["offset"] = offset[e].half()
            if kept is not None:
                t["cols"], t["col_values"] = kept[e].to(torch.int32), vals[e]
            i = {**info, "metric": "weight_mse" if h is None else "output",
                 "out_err": {str(k): _round(float(v[e])) for k, v in errs.items()}}
            if getattr(r, "fallback", ()):
                i["gptq_fallback"] = r.fallback[e]
            out.append(QTensor(tuple(r.codes[e].shape), t, dict(meta), info=i))
        return out

    def _data_free(self, w: torch.Tensor, cfg, note: str | None = None) -> list[QTensor]:
        w = w.detach().float()
        r = rtn(w, NestedGrid(cfg.sym), cfg.group_size)
        info = {"mode": "data_free"} if note is None else {"mode": "data_free", "fallback": note}
        return self._qtensors(w, r, cfg, None, info)

    def _data_driven(self, w: torch.Tensor, h: torch.Tensor, cfg) -> list[QTensor]:
        w = w.detach().float()
        opts = {"group_size": cfg.group_size, "block_size": cfg.block_size, "percdamp": cfg.percdamp,
                "act_order": cfg.act_order, "static_groups": True, "keep": cfg.kept_columns(w.shape[-1])}
        if cfg.feedback == "averaged":
            r = gptq(w, h.float(), NestedGrid(cfg.sym, cfg.lambdas()), **opts)
        else:   # one GPTQ state per width: the stack repeated width-major (its Hessians too, unless pooled)
            n, e = len(cfg.widths), w.shape[0]
            hh = h.float() if h.ndim == 2 else h.float().repeat(n, 1, 1)
            r = gptq(w.repeat(n, 1, 1), hh, WidthStates(cfg.sym, cfg.lambdas()), **opts)
            r = type(r)(r.codes[:e], {k: v[:e] for k, v in r.params.items()}, r.deq[:e], r.row_loss[:e],
                        r.percdamp[:e], r.fallback[:e], None if r.kept is None else r.kept[:e])
        return self._qtensors(w, r, cfg, h, {"mode": "data_driven"})

    def quantize(self, w, cfg, stats, shared=None):
        return self.quantize_experts(w[None], cfg, [stats], shared)[0]

    def quantize_experts(self, w, cfg, stats, shared=None):
        """Data-free: the floor parents a chunk of experts at a time. Data-driven: one batched GPTQ call per chunk
        of calibrated experts (``expert_batches``), the rest data-free."""
        out: list[QTensor | None] = [None] * w.shape[0]
        note = "no calibration tokens: floor parent" if cfg.mode == "data_driven" else None
        for idx, h in expert_batches(stats, tuple(w.shape[-2:]), cfg.min_tokens, cfg.mode == "data_driven"):
            qs = self._data_free(w[idx], cfg, note) if h is None else self._data_driven(w[idx], h, cfg)
            for e, q in zip(idx, qs):
                out[e] = q
        return out

    def dequantize(self, q: QTensor, shared: dict[str, SharedTable] | None = None) -> torch.Tensor:
        t = q.tensors
        w = nested_dequantize(t["codes"], int(q.meta["bits"]), t["scale"], t.get("offset"), int(q.meta["group_size"]))
        return with_kept(w, t.get("cols"), t.get("col_values"))
