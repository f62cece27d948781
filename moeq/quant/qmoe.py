"""QMoE (Frantar & Alistarh 2023, see ../shared/methods/qmoe.md): sub-1-bit experts by ternary GPTQ and a
dictionary code over the ternary symbols.

The experts of each fused parameter go through the GPTQ core at once (``moeq.quant.gptq``, batched over experts,
each with the Hessian of the tokens its router sent it), on one of two grids, per output row:
  - ``ternary`` (default): levels {lo, 0, hi}, lo = min(row, 0), hi = max(row, 0), both rounded to float16 as
    stored; a weight goes to the nearest level (w > hi / 2 -> hi, w < lo / 2 -> lo, else 0; a level that is 0
    is never chosen as a nonzero symbol, so it costs no code). Codec ``ternary-dict``: after quantizing a
    parameter's experts, one Tunstall dictionary is built from THEIR symbol statistics (``code_tables``; the
    reference assumes P(0) = 0.885 for every layer) and stored once as a shared table.
  - ``2bit``: the uniform asymmetric 2-bit grid per row (``UniformGrid``), codec ``affine-packed``: the
    quality-preserving variant the paper reports next to ternary.
Experts with fewer than ``min_tokens`` routed calibration tokens are starved: ``starved="rtn"`` rounds them to
nearest on the same grid (GPTQ with identity Hessian), ``starved="route_all"`` has the pipeline run them on every
calibration token of the layer for their Hessian (``moeq.models.calib``); the manifest records which and why.
``gate_weighted`` weights each routed token's Hessian contribution by its gate probability (MoEQuant).

Only what the recipe selects is compressed: by default the experts (``default_targets``); attention, dense and
shared MLPs, routers and embeddings stay as stored unless a rule names them.

QTensor (ternary): tensors ``symbols`` int8 [out, in] in {-1, 0, 1}, ``lo`` and ``hi`` float16 [out]; no meta;
``shared`` = (the dictionary's name,) once ``code_tables`` ran. Decoded from an artifact, the same weight holds
the code itself instead of ``symbols`` (``codewords``, ``row_offsets``); ``dequantize`` reads either.
QTensor (2bit): as ``affine-packed`` (``moeq.quant.uniform``), bits 2, one group per row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from moeq.formats import ternary_dict as td
from moeq.quant.base import CalibSpec, QTensor, Quantizer, SharedTable
from moeq.quant.gptq import GPTQResult, GridResult, gptq, rtn
from moeq.quant.uniform import FP16_MAX, GPTQOptions, UniformConfig, UniformGrid, _split, affine_dequantize, \
    expert_batches
from moeq.registry import QUANTIZERS

GRIDS = ("ternary", "2bit")
CODECS = {"ternary": "ternary-dict", "2bit": "affine-packed"}


def _half(x: torch.Tensor) -> torch.Tensor:
    """x rounded to float16 as stored (finite), back in x's dtype."""
    return x.clamp(-FP16_MAX, FP16_MAX).half().to(x.dtype)


@dataclass(frozen=True)
class TernaryGrid:
    """The per-row ternary grid {lo, 0, hi} as a ``moeq.quant.gptq.ColumnGrid``: ``params`` lo = min(w, 0),
    hi = max(w, 0) over the row, float16-rounded; ``quantize`` the nearest level and its symbol (int8)."""

    code_dtype: ClassVar[torch.dtype] = torch.int8

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"lo": _half(w.amin(-1).clamp(max=0)), "hi": _half(w.amax(-1).clamp(min=0))}

    def quantize(self, w, params):
        lo, hi = params["lo"], params["hi"]
        pos = (w > hi / 2) & (hi > 0)
        neg = (w < lo / 2) & (lo < 0)
        deq = torch.where(pos, hi, torch.where(neg, lo, torch.zeros_like(w)))
        return deq, pos.to(torch.int8) - neg.to(torch.int8)


class QMoEConfig(GPTQOptions):
    grid: Literal["ternary", "2bit"] = Field("ternary", description="ternary {min,0,max} per row, or uniform "
                                             "2-bit per row")
    percdamp: float = Field(0.1, gt=0, description="GPTQ damping λ = percdamp * mean(diag H) (the reference's 0.1)")
    calibrate: bool = Field(True, description="GPTQ on routed-token Hessians; false: round to nearest (RTN)")
    dictionary_size: int = Field(td.MAX_SIZE, ge=3, le=td.MAX_SIZE,
                                 description="ternary: phrases in each parameter's dictionary (16-bit codewords)")


def dictionary_size(n_symbols: int, cap: int = td.MAX_SIZE) -> int:
    """Phrases in the dictionary of ``n_symbols`` weights: ``cap``, but no more than a power of two <= n / 16
    (at least 256): the stored tree costs ~1.5 bits a phrase, which a small weight would not pay back."""
    return min(cap, max(256, 1 << max(0, (n_symbols // 16).bit_length() - 1)))


def _ternary_qtensors(r: GridResult) -> list[QTensor]:
    out = []
    for e in range(r.codes.shape[0]):
        tensors = {"symbols": r.codes[e].contiguous(), "lo": r.params["lo"][e, :, 0].half(),
                   "hi": r.params["hi"][e, :, 0].half()}
        q = QTensor(tuple(r.codes[e].shape), tensors, {})
        if isinstance(r, GPTQResult):
            q.info = {"gptq_fallback": r.fallback[e], "gptq_loss": round(float(r.loss[e]), 6)}
        out.append(q)
    return out


@QUANTIZERS.register("qmoe")
class QMoEQuantizer(Quantizer):
    """Ternary (or 2-bit) GPTQ over the experts of a layer; see the module docstring."""

    name = "qmoe"
    codec = "ternary-dict"
    Config = QMoEConfig
    default_targets = ("expert",)

    def codec_for(self, cfg: QMoEConfig) -> str:
        return CODECS[cfg.grid]

    def calibration(self, cfg: QMoEConfig) -> CalibSpec:
        return cfg.calib_spec() if cfg.calibrate else CalibSpec()

    @staticmethod
    def _grid(cfg: QMoEConfig):
        return TernaryGrid() if cfg.grid == "ternary" else UniformGrid(2)

    def quantize(self, w, cfg, stats, shared=None):
        return self.quantize_experts(w[None], cfg, [stats], shared)[0]

    def quantize_experts(self, w, cfg, stats, shared=None):
        grid = self._grid(cfg)
        out: list[QTensor | None] = [None] * w.shape[0]
        for idx, h in expert_batches(stats, tuple(w.shape[-2:]), cfg.min_tokens, cfg.calibrate):
            x = w[idx].detach().float()
            r = rtn(x, grid) if h is None else gptq(x, h.float(), grid, block_size=cfg.block_size,
                                                     percdamp=cfg.percdamp, act_order=cfg.act_order)
            qs = _ternary_qtensors(r) if cfg.grid == "ternary" else _split(r, UniformConfig(bits=2, group_size=0))
            for e, q in zip(idx, qs):
                out[e] = q
        return out

    def code_tables(self, qs: list[QTensor], cfg: QMoEConfig, name: str) -> list[SharedTable]:
        """Ternary: one dictionary over the symbols of the batch (a parameter's experts), from their own counts."""
        if cfg.grid != "ternary":
            return []
        counts = torch.ones(3, dtype=torch.float64)     # add-one: every symbol keeps a codeword path
        for q in qs:
            counts += torch.bincount(q.tensors["symbols"].reshape(-1).long() + 1, minlength=3).double()
        d = td.build_dictionary(tuple((counts / counts.sum()).tolist()),                       # P(-1), P(0), P(+1)
                                size=dictionary_size(int(counts.sum()) - 3, cfg.dictionary_size))
        table = d.to_table(f"{name}.dict")
        for q in qs:
            q.shared = (table.name,)
            q.info = {**q.info, "p_zero": round(float((q.tensors["symbols"] == 0).float().mean()), 6)}
        return [table]

    def dequantize(self, q: QTensor, shared: dict[str, SharedTable] | None = None) -> torch.Tensor:
        t = q.tensors
        if "codes" in t:   # the 2-bit grid (affine-packed)
            return affine_dequantize(t["codes"], t["scale"], t["zero"], int(q.meta["group_size"]))
        symbols = t.get("symbols")
        if symbols is None:
            if not shared or len(q.shared) != 1 or q.shared[0] not in shared:
                raise ValueError(f"a dictionary-coded weight needs its dictionary {q.shared} passed as shared=")
            d = td.Dictionary.from_table(shared[q.shared[0]])
            symbols = td.decode_rows(t["codewords"], t["row_offsets"], d, q.shape[1])
        return td.ternary_weight(symbols, t["lo"], t["hi"])
