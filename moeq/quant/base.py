"""The quantizer interface. Quantizers are pure tensor math on 2-D weights [out, in]; the MoE adapter hands
them per-expert 2-D views of fused 3-D expert tensors (or the whole [E, out, in] stack, for methods that batch
over experts), and the codec packs what they return.

Lifecycle of one decoder layer (``moeq.pipeline.run``):
  1. ``calibration(cfg)`` says which statistics the method needs (accumulators, see ``moeq.quant.stats``);
     an empty list means data-free. Statistics are gathered for one decoder layer at a time, on the inputs the
     already-quantized layers before it produce, and for an expert only from the tokens its router sends it.
  2. ``fit_layer`` (optional) fits what spans many tensors of the layer (an exponent, a dictionary, a bit
     allocation) and returns shared tables, stored once in the artifact and referenced by the entries.
  3. ``quantize`` / ``quantize_experts`` turn each weight into a ``QTensor``; ``code_tables`` (optional) fits
     tables on the codes of a batch (a dictionary from their symbol statistics); the codec packs it losslessly.
  4. At load time the codec's runtime module (``moeq.runtime.registry.RUNTIMES``) executes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict

from moeq.recipes import DEFAULT_TARGETS


class MethodConfig(BaseModel):
    """Base of every method's options: typos are errors (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QTensor:
    """A quantized 2-D weight: named tensors plus scalar metadata, as the quantizer produced them.
    ``shared`` names the shared tables (``SharedTable.name``) the weight is decoded with. ``info``: diagnostics
    for the manifest (e.g. which fallback GPTQ used, its proxy loss); not part of the code, never decoded."""

    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)
    shared: tuple[str, ...] = ()
    info: dict[str, Any] = field(default_factory=dict)



@dataclass
class SharedTable:
    """Tensors fitted over many weights (a per-layer LUT, a dictionary) and stored once in the artifact.
    ``name`` is unique in the artifact (e.g. ``model.layers.3.lut``); entries list it in ``QTensor.shared``."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Stats:
    """Finalized calibration statistics of one weight's input (shared by the weights that read the same input:
    q/k/v, an expert's gate and up). ``tokens``: how many tokens reached it (routed tokens for an expert);
    ``gate_prob``: the sum of their gate probabilities (experts only), ``gate_sq`` the sum of their squares (an expert's
    output reaches the residual times its gate probability, so its error counts squared); ``values``: what the
    accumulators made, by name (``amax``, ``hits``, ``hessian``, ...), also readable as attributes. ``routed``: set
    when the statistics come from forced routing (``CalibSpec.starved = "route_all"``): the tokens the router itself
    sent, while ``tokens`` counts every token the expert was run on."""

    tokens: int
    values: dict[str, Any] = field(default_factory=dict)
    gate_prob: float | None = None
    routed: int | None = None
    gate_sq: float | None = None

    def __getattr__(self, name: str):
        try:
            return self.__dict__["values"][name]
        except KeyError:
            raise AttributeError(name) from None


@dataclass
class CalibSpec:
    """What a method needs from calibration. ``accumulators``: instances of ``moeq.quant.stats.Accumulator``
    (empty: data-free). ``experts``: ``routed`` = one set of statistics per expert from its routed tokens,
    ``pooled`` = one set shared by all experts of a layer (the routed tokens of every expert pooled).
    ``gate_weighted``: each routed token counts with its gate probability (MoEQuant's affinity weighting).
    ``min_tokens``: an expert its router sent fewer tokens is *starved*; ``starved`` says what it gets: ``rtn``
    (its method's data-free fallback: GPTQ with identity Hessian) or ``route_all`` (a second forward runs it on
    every calibration token of the layer, unweighted, and its statistics come from those)."""

    accumulators: list = field(default_factory=list)
    experts: Literal["routed", "pooled"] = "routed"
    gate_weighted: bool = False
    min_tokens: int = 1
    starved: Literal["rtn", "route_all"] = "rtn"


def calibrated(s: Stats | None, min_tokens: int = 1) -> bool:
    """Whether ``s`` holds statistics to calibrate with: at least ``min_tokens`` tokens (and at least one)."""
    return s is not None and s.tokens >= max(1, min_tokens)


class Quantizer:
    """One lossy method. Subclasses set ``name``, ``codec``, ``Config`` and implement ``quantize`` and
    ``dequantize``; calibrated methods override ``calibration``."""

    name: ClassVar[str]
    codec: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]
    # the selector kinds the ``method`` shorthand of a recipe (and ``moeq quantize --method``) applies it to
    default_targets: ClassVar[tuple[str, ...]] = tuple(DEFAULT_TARGETS)

    def codec_for(self, cfg: MethodConfig) -> str:
        """The codec that stores this method's weights with options ``cfg`` (default: ``codec``)."""
        return self.codec

    def calibration(self, cfg: MethodConfig) -> CalibSpec:
        return CalibSpec()

    def needs_calibration(self, cfg: MethodConfig) -> bool:
        return bool(self.calibration(cfg).accumulators)

    def fit_layer(self, weights: dict[str, torch.Tensor], cfg: MethodConfig,
                  stats: dict[str, Stats | None], prefix: str) -> list[SharedTable]:
        """Fit shared tables over the layer's ``weights`` (entry name -> 2-D weight) assigned to this method.
        ``prefix`` is the layer's fqn (shared table names start with it). Default: none."""
        return []

    def code_tables(self, qs: list[QTensor], cfg: MethodConfig, name: str) -> list[SharedTable]:
        """Tables fitted on the quantized codes of one batch (the experts of one fused parameter, or one weight),
        before they are encoded: e.g. a dictionary built from the codes' own symbol statistics. ``name`` is unique
        to the batch (table names start with it); the method sets each QTensor's ``shared`` accordingly.
        Default: none."""
        return []

    def quantize(self, w: torch.Tensor, cfg: MethodConfig, stats: Stats | None,
                 shared: dict[str, SharedTable] | None = None) -> QTensor:
        raise NotImplementedError

    def quantize_experts(self, w: torch.Tensor, cfg: MethodConfig, stats: list[Stats | None],
                         shared: dict[str, SharedTable] | None = None) -> list[QTensor]:
        """The experts of one fused parameter at once: ``w`` [E, out, in]. Default: one at a time."""
        return [self.quantize(w[e], cfg, stats[e], shared) for e in range(w.shape[0])]

    def dequantize(self, q: QTensor, shared: dict[str, SharedTable] | None = None) -> torch.Tensor:
        """The effective [out, in] weight (for inspection and tests)."""
        raise NotImplementedError
