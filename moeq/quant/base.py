"""The quantizer interface. Quantizers are pure tensor math on 2-D weights [out, in]; the MoE adapter hands
them per-expert 2-D views of fused 3-D expert tensors, and the codec packs what they return."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from pydantic import BaseModel, ConfigDict


class MethodConfig(BaseModel):
    """Base of every method's options: typos are errors (extra="forbid")."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class QTensor:
    """A quantized 2-D weight: named tensors plus scalar metadata, as the quantizer produced them."""

    method: str
    shape: tuple[int, int]
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes() / (self.shape[0] * self.shape[1])


@dataclass
class ChannelStats:
    """Calibration statistics of one quantizable weight's input activations."""

    tokens: int
    amax: torch.Tensor          # [in] max |x| per input feature
    hits: torch.Tensor          # [in] tokens with |x| >= the method's outlier threshold


class Quantizer:
    """One lossy method. Subclasses set ``name``, ``codec``, ``Config`` and implement the three methods."""

    name: ClassVar[str]
    codec: ClassVar[str]
    Config: ClassVar[type[MethodConfig]]

    def needs_calibration(self, cfg: MethodConfig) -> bool:
        return False

    def outlier_threshold(self, cfg: MethodConfig) -> float:
        """Activation magnitude counted into ``ChannelStats.hits`` during calibration."""
        return 0.0

    def quantize(self, w: torch.Tensor, cfg: MethodConfig, stats: ChannelStats | None) -> QTensor:
        raise NotImplementedError

    def dequantize(self, q: QTensor) -> torch.Tensor:
        """The effective [out, in] weight (for inspection and tests)."""
        raise NotImplementedError

    def module(self, q: QTensor, bias: torch.Tensor | None) -> torch.nn.Module:
        """A runtime nn.Module computing ``x @ W.T + bias`` from the packed weight."""
        raise NotImplementedError
