"""NUPES / PowerQuant: non-uniform b-bit quantization on a power-exponent grid (see ../shared/methods/nupes.md).

The levels are a power map of a uniform grid, in units of the stored scale ("steps"): with K the top level,
``level(k) = sign(k) * K * (|k| / K)^(1/a)`` for the grid points k, so a < 1 crowds levels near zero (where
bell-shaped weights are dense) and a = 1 is the uniform grid. Two grids of points k:
  - ``half`` (default): all 2^b codes at half-integers k in {±0.5, ..., ±(Q + 1/2)}, K = Q + 1/2, no zero level
    (at 2 bits the exponent still moves the inner levels);
  - ``sym``: k in {-Q, ..., Q}, K = Q, Q = 2^(b-1) - 1: 2^b - 1 levels and a zero, plus one pad entry repeating
    the top level (never chosen by the encoder). At a = 1 it is exactly symmetric absmax int-b quantization.
    Rejected at 2 bits: its levels {-1, 0, 1} do not depend on a.
Per row and group of inputs, scale = absmax / K rounded to float16, or with ``clip="mse"`` (the data-free default at
2 and 3 bits) the range shrunk to the one of least squared error (1.0 .. 0.5 x absmax); a weight is encoded to the
NEAREST level (in the weight domain, not by rounding |w|^a) and decodes to ``lut[code] * scale`` in float32.

Two modes:
  - data-free: per 2-D weight (per expert), the exponent minimizing the weight MSE (``search_exponent``: a coarse
    scan, then bounded Brent; with clipped scales each a is scored with its own best clip per group), never worse
    than a = 1; round to nearest.
  - data-driven: GPTQ on the power grid (a few exponents around the data-free one, the lowest output error
    tr(dW H dW^T) kept), then an Adam refinement of continuous latent weights and log a on that output error
    (straight-through nearest-level assignment, codes free to move over the whole range), kept only where it
    lowers the output error.

QTensor tensors: ``codes`` uint8 [out, in] (< 2^bits), ``scale`` float16 [out, n_groups], ``lut`` float32
[2^bits] (ascending; stored bit-exactly, it is what decoding reads); meta {bits, group_size, grid, exponent}.
Group j covers inputs [j*g, (j+1)*g) (the last may be shorter); group_size 0 = one group per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from moeq.quant.base import CalibSpec, QTensor, Quantizer, SharedTable
from moeq.quant.gptq import GridResult, column_groups, column_params, gptq, group_params, rtn
from moeq.quant.uniform import FP16_MAX, FP16_MIN, GPTQOptions, expert_batches
from moeq.registry import QUANTIZERS

Grid = Literal["half", "sym"]
BOUNDS = (0.2, 2.0)      # exponent range searched and learned (a -> 0 or large a make the levels degenerate)
CLIP_RATIOS = tuple(1 - i / 50 for i in range(26))   # clip="mse": range multipliers tried (1.00 .. 0.50)
DIGITS = 4               # exponents are rounded to this many decimals (meta stays short, the LUT reproducible)


# ------------------------------------------------------------------------------------------------- the grid

def _check(bits: int, grid: str) -> None:
    if not 2 <= bits <= 8:
        raise ValueError(f"nupes supports 2..8 bits, not {bits}")
    if grid not in ("half", "sym"):
        raise ValueError(f"unknown nupes grid {grid!r} (half or sym)")
    if grid == "sym" and bits == 2:
        raise ValueError("the sym grid at 2 bits has levels {-s, 0, s}, which ignore the exponent; use grid half")


def top_step(bits: int, grid: Grid) -> float:
    """K, the top level in steps: Q for ``sym``, Q + 1/2 for ``half`` (Q = 2^(bits-1) - 1); scale = absmax / K."""
    q = (1 << (bits - 1)) - 1
    return q + 0.5 if grid == "half" else float(q)


def grid_points(bits: int, grid: Grid, dtype=torch.float64) -> torch.Tensor:
    """The uniform grid points k in steps, ascending: -Q..Q (sym, 2^b - 1) or ±0.5..±(Q + 1/2) (half, 2^b)."""
    q = (1 << (bits - 1)) - 1
    k = torch.arange(-q, q + 1, dtype=dtype)
    return k if grid == "sym" else torch.arange(-q - 1, q + 1, dtype=dtype) + 0.5


def power_lut(bits: int, a: float, grid: Grid = "half") -> torch.Tensor:
    """float32 [2^bits] ascending: the levels sign(k) K (|k|/K)^(1/a), computed in float64 and rounded once; the
    ``sym`` grid repeats its top level in the last (unused) entry. At a = 1 the levels are the points k exactly."""
    _check(bits, grid)
    k = grid_points(bits, grid)
    top = top_step(bits, grid)
    lut = k.sign() * top * (k.abs() / top).pow(1.0 / float(a))
    if grid == "sym":
        lut = torch.cat([lut, lut[-1:]])
    return lut.float()


def power_levels(a: torch.Tensor, bits: int, grid: Grid) -> torch.Tensor:
    """The distinct levels (no pad) [..., n_levels] in a's dtype, differentiable in ``a`` [...]: built from the
    nonzero points only as exp(log(|k|/K) / a), so d/da is finite where a zero level exists (``sym``); the zero
    level is 0 for every a. Equal to ``power_lut`` up to float rounding."""
    k = grid_points(bits, grid, dtype=a.dtype).to(a.device)
    top = top_step(bits, grid)
    nonzero = k != 0
    logr = torch.where(nonzero, k.abs() / top, torch.ones_like(k)).log()       # log 1 = 0 where k = 0
    mag = top * torch.exp(logr / a[..., None])
    return torch.where(nonzero, k.sign() * mag, torch.zeros_like(mag))


def _n_levels(bits: int, grid: Grid) -> int:
    return (1 << bits) - (grid == "sym")


@dataclass(frozen=True)
class PowerGrid:
    """The power grid as a ``moeq.quant.gptq.ColumnGrid``. ``a``: one exponent, or one per expert (a tuple as
    long as the leading dim of every ``w`` given). The scale (absmax / K, float16-rounded, kept in
    [2^-24, 65504]) is independent of a; an all-zero group gets scale 0 (the ``half`` grid has no zero level, so
    any positive scale would decode it to nonzero weights). ``deq`` = float32 lut value * scale, cast to w's dtype:
    exactly what ``nupes_dequantize`` (and the runtime) compute from the stored parts."""

    bits: int
    a: float | tuple[float, ...] = 1.0
    grid: Grid = "half"
    clip: Literal["absmax", "mse"] = "absmax"
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def __post_init__(self):
        _check(self.bits, self.grid)

    @property
    def top(self) -> float:
        return top_step(self.bits, self.grid)

    @cached_property
    def lut(self) -> torch.Tensor:
        """float32 [2^bits], or [E, 2^bits] with one exponent per expert."""
        if isinstance(self.a, tuple):
            return torch.stack([power_lut(self.bits, a, self.grid) for a in self.a])
        return power_lut(self.bits, self.a, self.grid)

    @cached_property
    def _mids(self) -> torch.Tensor:
        """Midpoints between consecutive distinct levels (float64 from the float32 levels), [(E,) n_levels - 1]."""
        lv = self.lut[..., :_n_levels(self.bits, self.grid)].double()
        return (lv[..., 1:] + lv[..., :-1]) / 2

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        amax = w.abs().amax(-1)
        if self.clip == "absmax":
            return {"scale": self._scale(amax)}
        best, best_err = None, None        # mse: per row (group), the clipped range of least squared error
        for ratio in CLIP_RATIOS:
            s = self._scale(amax * ratio)
            err = (self.quantize(w, {"scale": s[..., None]})[0] - w).square_().sum(-1)
            if best is None:
                best, best_err = s, err
            else:
                better = err < best_err
                best, best_err = torch.where(better, s, best), torch.minimum(err, best_err)
        return {"scale": best}

    def _scale(self, amax: torch.Tensor) -> torch.Tensor:
        """amax / K rounded to float16 as stored (kept in [2^-24, 65504]); 0 for an all-zero group."""
        scale = (amax / self.top).clamp(FP16_MIN, FP16_MAX).half().to(amax.dtype)
        return scale.masked_fill(amax == 0, 0.0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest-level codes (uint8, same shape) of ``x`` in steps; per-expert exponents index x's dim 0."""
        mids = self._mids.to(device=x.device, dtype=x.dtype)
        if mids.ndim == 1:
            return torch.searchsorted(mids, x.contiguous()).to(self.code_dtype)
        return torch.searchsorted(mids, x.reshape(x.shape[0], -1)).view(x.shape).to(self.code_dtype)

    def decode(self, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """float32 lut[codes] * scale (scale broadcast with codes)."""
        lut = self.lut.to(codes.device)
        if lut.ndim == 1:
            v = lut[codes.long()]
        else:
            v = lut.gather(-1, codes.reshape(codes.shape[0], -1).long()).view(codes.shape)
        return v * scale.float()

    def quantize(self, w, params):
        s = params["scale"]
        codes = self.encode(w / torch.where(s > 0, s, torch.ones_like(s)))
        return self.decode(codes, s).to(w.dtype), codes


def nupes_dequantize(codes: torch.Tensor, scale: torch.Tensor, lut: torch.Tensor, group_size: int) -> torch.Tensor:
    """float32 [out, in] = lut[codes] * scale, group-wise; bit-identical to ``PowerGrid.quantize``'s deq."""
    out_f, in_f = codes.shape
    ng = scale.shape[1]
    g = group_size or in_f
    c = F.pad(codes, (0, ng * g - in_f)) if ng * g != in_f else codes
    w = lut.float()[c.long()].view(out_f, ng, g).mul_(scale.float()[..., None])
    return w.view(out_f, ng * g)[:, :in_f]


# ---------------------------------------------------------------------------------------- data-free search

def exponent_mse(w: torch.Tensor, bits: int, grid: Grid = "half", group_size: int = 0,
                 clip: Literal["absmax", "mse"] = "absmax") -> Callable[[float], float]:
    """f(a) = the weight MSE of nearest-level round-to-nearest of ``w`` ([out, in] or [E, out, in], all entries
    together) on the power grid with exponent a. The absmax scale does not depend on a, so |w| / scale is sorted
    once and each f(a) costs 2^b binary searches into prefix sums (float64) of s^2, s^2 x, s^2 x^2: the squared
    error of the entries whose nearest level is L is s^2 (x - L)^2, summed per level in closed form (both grids
    are odd, so magnitudes suffice). ``clip="mse"``: each row/group takes, for this a, the clipped scale of least
    error (``_clipped_mse``), as ``PowerGrid(clip="mse")`` does."""
    if clip == "mse":
        return _clipped_mse(w, bits, grid, group_size)
    w3 = (w if w.ndim == 3 else w[None]).detach().float()
    pg = PowerGrid(bits, 1.0, grid)
    scale = group_params(w3, pg, group_size)["scale"]
    cols = w3.shape[-1]
    s = _col_scale(scale, cols, group_size)
    x = (w3 / torch.where(s > 0, s, torch.ones_like(s))).abs().flatten()
    x, order = x.double().cpu().sort()
    s2 = s.double().cpu().flatten()[order].square()
    n = x.numel()
    zero = torch.zeros(1, dtype=torch.float64)
    c0, c1, c2 = (torch.cat([zero, t.cumsum(0)]) for t in (s2, s2 * x, s2 * x * x))
    nlev = _n_levels(bits, grid)

    def f(a: float) -> float:
        lv = power_lut(bits, a, grid)[:nlev].double()
        mag = lv[lv >= 0]                                           # ascending magnitudes (0 first for sym)
        cut = torch.searchsorted(x, (mag[1:] + mag[:-1]) / 2, right=True)
        edges = torch.cat([cut.new_zeros(1), cut, cut.new_full((1,), n)])
        lo, hi = edges[:-1], edges[1:]
        sw, sx, sxx = c0[hi] - c0[lo], c1[hi] - c1[lo], c2[hi] - c2[lo]
        return float((sxx - 2 * mag * sx + mag * mag * sw).sum().clamp(min=0)) / n

    return f


def _clipped_mse(w: torch.Tensor, bits: int, grid: Grid, group_size: int) -> Callable[[float], float]:
    """``exponent_mse`` with clipped scales: per row/group g the least error over the scales
    s_c = fp16(c amax / K), c in ``CLIP_RATIOS``. In units of the absmax scale s (x = |w| / s, sorted per group
    once), scale s_c puts the levels at r L with r = s_c / s, and the error is s^2 sum (x - r L)^2: per (a, c)
    one batched binary search of the group's midpoints and prefix sums, as in the absmax case. Padding of a
    partial last group is zeros, taken off in closed form (a zero lands on the smallest magnitude level)."""
    w3 = (w if w.ndim == 3 else w[None]).detach().float()
    pg = PowerGrid(bits, 1.0, grid)
    n = w3.numel()
    g = group_size or w3.shape[-1]
    pad = -w3.shape[-1] % g
    absw = F.pad(w3.abs(), (0, pad)).reshape(-1, g)                      # [G, g]
    amax = absw.amax(-1)
    s = pg._scale(amax)
    safe = torch.where(s > 0, s, torch.ones_like(s))
    ratio = torch.stack([pg._scale(amax * c) for c in CLIP_RATIOS], -1).double().cpu() / safe.double().cpu()[:, None]
    x = (absw / safe[:, None]).double().cpu().sort(-1).values
    zero = x.new_zeros(x.shape[0], 1)
    p1, p2 = torch.cat([zero, x.cumsum(-1)], -1), torch.cat([zero, (x * x).cumsum(-1)], -1)
    npad = torch.zeros(x.shape[0], dtype=torch.float64)
    if pad:
        npad.view(-1, (w3.shape[-1] + pad) // g)[:, -1] = pad
    s2 = s.double().cpu().square()
    nlev = _n_levels(bits, grid)

    def f(a: float) -> float:
        lv = power_lut(bits, a, grid)[:nlev].double()
        mag = lv[lv >= 0]
        best = torch.full_like(s2, math.inf)
        for k in range(ratio.shape[1]):
            lev = ratio[:, k:k + 1] * mag                                    # [G, m]
            cut = torch.searchsorted(x, (lev[:, 1:] + lev[:, :-1]) / 2, right=True)
            edges = torch.cat([cut.new_zeros(x.shape[0], 1), cut, cut.new_full((x.shape[0], 1), g)], -1)
            lo, hi = edges[:, :-1], edges[:, 1:]
            sx, sxx = p1.gather(1, hi) - p1.gather(1, lo), p2.gather(1, hi) - p2.gather(1, lo)
            err = (sxx - 2 * lev * sx + lev * lev * (hi - lo)).sum(-1) - npad * lev[:, 0].square()
            best = torch.minimum(best, err)
        return float((s2 * best.clamp(min=0)).sum()) / n

    return f


def search_exponent(w: torch.Tensor, bits: int, grid: Grid = "half", group_size: int = 0,
                    bounds: tuple[float, float] = BOUNDS, points: int = 12,
                    clip: Literal["absmax", "mse"] = "absmax") -> float:
    """The exponent minimizing ``exponent_mse``: ``points`` evenly spaced a over ``bounds``, then bounded Brent
    (scipy) between the best point's neighbours; the best of that and a = 1 (so never worse than uniform; ties
    keep 1). Rounded to ``DIGITS`` decimals."""
    from scipy.optimize import minimize_scalar

    mse = exponent_mse(w, bits, grid, group_size, clip)
    cache: dict[float, float] = {}

    def f(a: float) -> float:
        a = round(float(a), DIGITS)
        if a not in cache:
            cache[a] = mse(a)
        return cache[a]

    lo, hi = bounds
    scan = [lo + (hi - lo) * i / (points - 1) for i in range(points)]
    i = min(range(points), key=lambda j: f(scan[j]))
    bracket = (scan[max(i - 1, 0)], scan[min(i + 1, points - 1)])
    minimize_scalar(f, bounds=bracket, method="bounded", options={"xatol": 1e-3})
    best = min(cache, key=lambda a: (cache[a], a != 1.0))
    return 1.0 if f(1.0) <= cache[best] else best


# ------------------------------------------------------------------------------------------- data-driven

def output_error(w: torch.Tensor, deq: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr((W - Ŵ) H (W - Ŵ)^T) per expert ([E] for [E, out, in], a scalar for [out, in]); H [(E,) in, in]."""
    dw = (w - deq).float()
    return ((dw @ h.float()) * dw).sum((-2, -1))


@dataclass
class Refined:
    """The refinement's result per expert: codes [E, out, in], deq, exponent [E] (float64), output error [E]."""

    codes: torch.Tensor
    deq: torch.Tensor
    a: torch.Tensor
    err: torch.Tensor


def _nearest(idx: torch.Tensor, x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Update ``idx`` [E, n] (long) to the nearest of ``levels`` [E, L] (ascending) for ``x`` [E, n]: entries still
    inside their bin keep it, the few others are searched (a full binary search every step is the refinement's
    slowest op on the CPU: its branches are unpredictable). Ties go to the lower level, as ``PowerGrid.encode``."""
    inf = levels.new_full((levels.shape[0], 1), math.inf)
    edges = torch.cat([-inf, (levels[:, 1:] + levels[:, :-1]) / 2, inf], -1)        # bin c = (edges[c], edges[c+1]]
    out = (x <= edges.gather(-1, idx)) | (x > edges.gather(-1, idx + 1))
    e, pos = out.nonzero(as_tuple=True)
    if e.numel():
        idx[e, pos] = torch.searchsorted(edges[e, 1:-1], x[e, pos, None])[:, 0]
    return idx


def refine(w: torch.Tensor, h: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor, a: torch.Tensor, bits: int,
           grid: Grid = "half", *, steps: int = 100, lr: float = 0.05, lr_exponent: float = 0.01,
           learn_exponent: bool = True, bounds: tuple[float, float] = BOUNDS) -> Refined:
    """Adam on continuous latent weights x (in steps, [E, out, in], started at the levels of ``codes``) and on
    log a ([E]) against the output error L = tr((W - Ŵ) H (W - Ŵ)^T), H [(E,) in, in]; ``scale`` [E, out, in]
    (per column). Forward: each x takes its nearest level of the current LUT (a code may move anywhere in the
    range), Ŵ = level * scale. Gradients: straight-through for x (dŴ/dx = scale), the exact derivative of the
    chosen levels for log a (autograd through ``power_levels``), and for x a proximal term
    sum H_jj s^2 (x - level)^2 to its current level (held fixed). Without that term the straight-through gradient,
    which does not vanish at a level, drags every latent across its midpoint at the same rate and the codes
    oscillate (the method note's failed run); with it the gradient of x vanishes at level + (dW H)_ij / (H_jj s),
    the coordinate-wise optimal continuous weight, so a code moves when moving it alone would lower L.
    dL/dŴ = -2 (W - Ŵ) H is one GEMM a step; the rest is elementwise. Every forward evaluates an actual
    quantization, so the best iterate per expert is kept (step 0 = the start): its codes, decoded with
    ``PowerGrid`` at its exponent (rounded to ``DIGITS``), i.e. exactly as stored. Runs with autograd on whatever
    the caller's grad mode (the pipeline quantizes under ``no_grad``)."""
    with torch.enable_grad():
        return _refine(w, h, codes, scale, a, bits, grid, steps=steps, lr=lr, lr_exponent=lr_exponent,
                       learn_exponent=learn_exponent, bounds=bounds)


def _refine(w, h, codes, scale, a, bits, grid, *, steps, lr, lr_exponent, learn_exponent, bounds) -> Refined:
    w, h, s = w.float(), h.float(), scale.float()
    e = w.shape[0]
    hs2 = h.diagonal(dim1=-2, dim2=-1).unsqueeze(-2) * s * s                          # H_jj s^2 [E, out, in]
    idx = codes.reshape(e, -1).long()
    x = power_levels(a.double(), bits, grid).float().gather(-1, idx).view(w.shape).requires_grad_(True)
    log_a = a.double().log().float().to(w.device).requires_grad_(learn_exponent)
    groups = [{"params": [x], "lr": lr}] + ([{"params": [log_a], "lr": lr_exponent}] if learn_exponent else [])
    opt = torch.optim.Adam(groups)
    lo, hi = math.log(bounds[0]), math.log(bounds[1])
    best_codes, best_log_a = codes.clone(), log_a.detach().clone()
    best_err = torch.full((e,), math.inf, device=w.device)
    for step in range(steps + 1):
        lv = power_levels(log_a.exp(), bits, grid)                                      # [E, L]
        with torch.no_grad():
            idx = _nearest(idx, x.view(e, -1), lv)
            level = lv.gather(-1, idx).view(w.shape)
            dw = w - level * s
            g = dw @ h
            err = (g * dw).sum((-2, -1))
            better = err < best_err
            if bool(better.any()):
                best_err = torch.where(better, err, best_err)
                best_codes = torch.where(better[:, None, None], idx.view(w.shape).to(codes.dtype), best_codes)
                best_log_a = torch.where(better, log_a, best_log_a)
            if step == steps:
                break
            gw = g.mul_(s).mul_(-2)                                                     # dL/dlevel = dL/dx (STE)
            x.grad = torch.sub(x, level).mul_(hs2).mul_(2).add_(gw)
            if learn_exponent:
                grad_lv = torch.zeros_like(lv).scatter_add_(-1, idx, gw.view(e, -1))
        if learn_exponent:
            log_a.grad = None
            lv.backward(grad_lv)
        opt.step()
        with torch.no_grad():
            log_a.clamp_(lo, hi)
    if learn_exponent:
        a_best = torch.tensor([round(min(max(v, bounds[0]), bounds[1]), DIGITS)
                               for v in best_log_a.double().exp().tolist()], dtype=torch.float64)
    else:
        a_best = a.double().cpu()
    deq = PowerGrid(bits, tuple(a_best.tolist()), grid).decode(best_codes, s)
    return Refined(best_codes, deq, a_best, output_error(w, deq, h))


# ---------------------------------------------------------------------------------------------- the method

class NupesConfig(GPTQOptions):
    bits: int = Field(4, ge=2, le=8, description="bits per weight code")
    group_size: Literal[0, 32, 64, 128] = Field(64, description="inputs per scale group; 0 = one per row")
    grid: Grid = Field("half", description="half: 2^b levels at half-integer points, no zero; sym: -Q..Q (3+ bits)")
    clip: Literal["auto", "absmax", "mse"] = Field(
        "auto", description="scale of a row/group: absmax / K, or the clipped range (1.00-0.02 x) of least squared "
                            "error for the chosen exponent (mse); auto = mse for data-free at 2 and 3 bits, else "
                            "absmax (see clip_mode)")
    search_scales: Literal["absmax", "clipped"] = Field(
        "absmax", description="data-free: the scales the exponent is searched on. absmax: a* minimizes the weight "
                              "error at absmax scales (never worse than a = 1 there), then clip=mse clips each "
                              "row/group for a*; clipped: each candidate a scored with its own clipped scales "
                              "(lower weight error, higher ppl on SmolLM2 at 3 bits: see clip_mode)")
    mode: Literal["data_free", "data_driven"] = Field(
        "data_free", description="data_free: exponent by weight MSE, round to nearest; data_driven: GPTQ on the "
                                 "power grid + Adam refinement of codes and exponent on the layer output error")
    exponent: float | None = Field(None, gt=0, le=8, description="fixed exponent a (skip the search); null = search")
    bounds: tuple[float, float] = Field(BOUNDS, description="exponent range searched / learned")
    search_points: int = Field(12, ge=3, le=200, description="evenly spaced exponents scanned before Brent")
    exponent_factors: tuple[float, ...] = Field(
        (0.85, 1.0, 1.15), description="data-driven: GPTQ tries a* times each factor (and a = 1), keeps the lowest "
                                       "output error")
    refine_steps: int = Field(100, ge=0, description="data-driven: Adam steps of the refinement; 0 = GPTQ only")
    refine_lr: float = Field(0.05, gt=0, description="Adam learning rate of the latent weights (in steps)")
    refine_lr_exponent: float = Field(0.01, gt=0, description="Adam learning rate of log a")

    @model_validator(mode="after")
    def _check(self):
        _check(self.bits, self.grid)
        lo, hi = self.bounds
        if not 0 < lo < hi:
            raise ValueError(f"exponent bounds must satisfy 0 < lo < hi, got {self.bounds}")
        return self

    @property
    def clip_mode(self) -> Literal["absmax", "mse"]:
        """The clip ``auto`` stands for. Data-free at 2 and 3 bits: mse, the exponent searched on absmax scales
        and the scales then clipped for it (``search_scales``). There the grid is too coarse for the absmax scale:
        on tiny-moe (every eval window) W2 g64 goes from ppl 72.78 to 71.52 (uniform RTN: absmax 72.55, clipped
        71.81), W2 per-row from 76.92 to 71.73 (76.15, 71.81), W3 g64 from 68.23 to 68.14 (68.67, 68.55). The
        exponent is not searched with the clipped scales (``search_scales="clipped"``): that lowers the weight
        error further but not the ppl: SmolLM2 W3 g64 122.0 against 67.2, W3 per row 2,695 against 315.8. At
        4 bits absmax is better (SmolLM2 W4 g64: 16.86 clipped against 16.19), and data-driven mode, whose GPTQ
        compensates the rounding, was measured with absmax (``benchmarks/results/nupes_clip.md``)."""
        if self.clip != "auto":
            return self.clip
        return "mse" if self.mode == "data_free" and self.bits <= 3 else "absmax"


def _round(v: float) -> float:
    return float(f"{v:.6g}")


def _weight_mse(w: torch.Tensor, deq: torch.Tensor) -> torch.Tensor:
    return (w.float() - deq.float()).square().mean((-2, -1))


def _col_scale(scale: torch.Tensor, cols: int, group_size: int) -> torch.Tensor:
    """[E, out, n_groups] -> [E, out, cols]."""
    e = scale.shape[0]
    return column_params({"scale": scale}, column_groups(cols, group_size, scale.device).expand(e, cols))["scale"]


@QUANTIZERS.register("nupes")
class NupesQuantizer(Quantizer):
    """NUPES: power-exponent grid, one exponent per 2-D weight (per expert), data-free or data-driven. A weight
    without calibration tokens in data-driven mode is quantized data-free (its ``info`` says so)."""

    name = "nupes"
    codec = "nupes"
    Config = NupesConfig

    def calibration(self, cfg: NupesConfig) -> CalibSpec:
        if cfg.mode != "data_driven":
            return CalibSpec()
        return cfg.calib_spec()

    # -- helpers on stacks [E, out, in] ----------------------------------------------------------------------
    def _exponents(self, w: torch.Tensor, cfg: NupesConfig) -> list[float]:
        if cfg.exponent is not None:
            return [round(cfg.exponent, DIGITS)] * w.shape[0]
        clip = cfg.clip_mode if cfg.search_scales == "clipped" else "absmax"
        return [search_exponent(w[e], cfg.bits, cfg.grid, cfg.group_size, cfg.bounds, cfg.search_points, clip)
                for e in range(w.shape[0])]

    def _uniform_mse(self, w: torch.Tensor, cfg: NupesConfig) -> torch.Tensor:
        return _weight_mse(w, rtn(w, PowerGrid(cfg.bits, 1.0, cfg.grid, cfg.clip_mode), cfg.group_size).deq)

    def _qtensors(self, w, codes, scale, a: list[float], cfg, infos: list[dict],
                  uniform_mse: torch.Tensor | None = None) -> list[QTensor]:
        """One QTensor per expert; ``info`` gains the exponent and ``mse_vs_uniform``: the weight MSE over that of
        a = 1 round-to-nearest on the same grid (above 1 in data-driven mode, which trades weight error for
        output error). ``uniform_mse`` [E]: that of a = 1 when the caller has it."""
        if uniform_mse is None:
            uniform_mse = self._uniform_mse(w, cfg)
        ratio = (_weight_mse(w, PowerGrid(cfg.bits, tuple(a), cfg.grid, cfg.clip_mode).decode(
            codes, _col_scale(scale, w.shape[-1], cfg.group_size))) / uniform_mse.clamp(min=1e-30))
        out = []
        for e in range(w.shape[0]):
            tensors = {"codes": codes[e], "scale": scale[e].half(), "lut": power_lut(cfg.bits, a[e], cfg.grid)}
            meta = {"bits": cfg.bits, "group_size": cfg.group_size, "grid": cfg.grid, "exponent": a[e]}
            info = {"exponent": a[e], "mse_vs_uniform": _round(float(ratio[e])), **infos[e]}
            out.append(QTensor(tuple(codes[e].shape), tensors, meta, info=info))
        return out

    def _data_free(self, w: torch.Tensor, cfg: NupesConfig, note: str | None = None) -> list[QTensor]:
        """Round to nearest at the searched exponent, with the scales of ``clip_mode``. The search is never worse
        than a = 1 on the scales it searched on. With ``search_scales="clipped"`` a = 1 is rounded too and kept
        per expert where its weight error is lower (the search's closed form and the rounding can pick different
        clips at near-ties). With absmax search and clipped scales the weight error can end above clipped a = 1
        (``mse_vs_uniform`` > 1, at 2 bits on tiny-moe) while the ppl is lower: the exponent is not replaced."""
        w = w.detach().float()
        a = self._exponents(w, cfg)
        r = rtn(w, PowerGrid(cfg.bits, tuple(a), cfg.grid, cfg.clip_mode), cfg.group_size)
        uniform = None
        if cfg.clip_mode == "mse" and cfg.search_scales == "clipped" and cfg.exponent is None \
                and any(v != 1.0 for v in a):
            ones = rtn(w, PowerGrid(cfg.bits, 1.0, cfg.grid, "mse"), cfg.group_size)
            uniform = _weight_mse(w, ones.deq)
            worse = (uniform < _weight_mse(w, r.deq)).tolist()
            if any(worse):
                a = [1.0 if x else v for v, x in zip(a, worse)]
                t = torch.tensor(worse, device=w.device)
                r.codes[t], r.params["scale"][t] = ones.codes[t], ones.params["scale"][t]
        info = {"mode": "data_free"} if note is None else {"mode": "data_free", "fallback": note}
        return self._qtensors(w, r.codes, r.params["scale"], a, cfg, [dict(info) for _ in a], uniform)

    def _gptq(self, w, h, a: list[float], cfg) -> GridResult:
        return gptq(w, h, PowerGrid(cfg.bits, tuple(a), cfg.grid, cfg.clip_mode), group_size=cfg.group_size,
                    block_size=cfg.block_size, percdamp=cfg.percdamp, act_order=cfg.act_order, static_groups=True)

    def _best_gptq(self, w, h, a0: list[float], cfg) -> tuple[GridResult, list[float], torch.Tensor]:
        """GPTQ at a0 times each of ``exponent_factors`` and at a = 1 (only a0 if the exponent is fixed); per
        expert the lowest output error: (result, its exponents, its errors [E])."""
        e = w.shape[0]
        lo, hi = cfg.bounds
        cands = [a0] if cfg.exponent is not None else \
            [[round(min(max(v * f, lo), hi), DIGITS) for v in a0] for f in cfg.exponent_factors] + [[1.0] * e]
        best, best_a, best_err = None, list(a0), torch.full((e,), math.inf)
        for cand in dict.fromkeys(tuple(c) for c in cands):
            r = self._gptq(w, h, list(cand), cfg)
            err = output_error(w, r.deq, h).cpu()
            take = err < best_err
            if best is None:
                best = r
            else:   # with clip="mse" the scale depends on the exponent too
                t = take.to(w.device)
                best.codes[t], best.deq[t] = r.codes[t], r.deq[t]
                best.params["scale"][t] = r.params["scale"][t]
            best_a = [c if t else b for c, t, b in zip(cand, take.tolist(), best_a)]
            best_err = torch.where(take, err, best_err)
        return best, best_a, best_err

    def _data_driven(self, w: torch.Tensor, h: torch.Tensor, cfg: NupesConfig) -> list[QTensor]:
        """GPTQ over candidate exponents, then the refinement, kept per expert where it lowers the output error.
        ``h`` [E, in, in]; a pooled [in, in] is expanded (per-expert exponents need per-expert GPTQ rows)."""
        w = w.detach().float()
        e = w.shape[0]
        h = (h if h.ndim == 3 else h.expand(e, *h.shape)).float()
        a0 = self._exponents(w, cfg)
        best, a, err = self._best_gptq(w, h, a0, cfg)
        codes, scale = best.codes, best.params["scale"]
        infos = [{"mode": "data_driven", "search_exponent": a0[i], "gptq_exponent": a[i],
                  "out_err_gptq": _round(float(err[i])), "refined": False} for i in range(e)]
        if cfg.refine_steps:
            ref = refine(w, h, codes, _col_scale(scale, w.shape[-1], cfg.group_size),
                         torch.tensor(a, dtype=torch.float64), cfg.bits, cfg.grid, steps=cfg.refine_steps,
                         lr=cfg.refine_lr, lr_exponent=cfg.refine_lr_exponent, learn_exponent=cfg.exponent is None,
                         bounds=cfg.bounds)
            keep = (ref.err.cpu() < err).tolist()
            codes = torch.where(torch.tensor(keep, device=codes.device)[:, None, None], ref.codes, codes)
            for i, k in enumerate(keep):
                infos[i].update(refined=k, out_err_refined=_round(float(ref.err[i])), refined_exponent=float(ref.a[i]))
            err = torch.minimum(err, ref.err.cpu())
            a = [float(ra) if k else ga for ra, k, ga in zip(ref.a.tolist(), keep, a)]
        total = (w @ h * w).sum((-2, -1)).cpu().clamp(min=1e-30)        # tr(W H W^T): the relative error's base
        for i, info in enumerate(infos):
            info["out_err_rel"] = _round(float(err[i] / total[i]))
        return self._qtensors(w, codes, scale, a, cfg, infos)

    # -- the interface -------------------------------------------------------------------------------------
    def quantize(self, w, cfg, stats, shared=None):
        return self.quantize_experts(w[None], cfg, [stats], shared)[0]

    def quantize_experts(self, w, cfg, stats, shared=None):
        """Each expert gets its own exponent. Data-free: batched round-to-nearest a chunk of experts at a time.
        Data-driven: calibrated experts in chunks (GPTQ and the refinement batched), the rest data-free."""
        out: list[QTensor | None] = [None] * w.shape[0]
        note = "no calibration tokens: quantized data-free" if cfg.mode == "data_driven" else None
        for idx, h in expert_batches(stats, tuple(w.shape[-2:]), cfg.min_tokens, cfg.mode == "data_driven"):
            qs = self._data_free(w[idx], cfg, note) if h is None else self._data_driven(w[idx], h, cfg)
            for e, q in zip(idx, qs):
                out[e] = q
        return out

    def dequantize(self, q: QTensor, shared: dict[str, SharedTable] | None = None) -> torch.Tensor:
        t = q.tensors
        return nupes_dequantize(t["codes"], t["scale"], t["lut"], int(q.meta["group_size"]))
