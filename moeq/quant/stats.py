"""Calibration accumulators: pure math on activation batches, ``init / accumulate / finalize``.

A method declares the accumulators it needs (``Quantizer.calibration``); ``moeq.models.calib`` holds the hooks
that feed them, one state per distinct input (q/k/v share one; an expert's statistics see only its routed
tokens). ``x`` is always [n, in] float32; ``weight`` [n] (gate probabilities) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


class Accumulator:
    name: ClassVar[str]

    def init(self, in_features: int, device: torch.device | str = "cpu") -> Any:
        raise NotImplementedError

    def accumulate(self, state: Any, x: torch.Tensor, weight: torch.Tensor | None) -> Any:
        raise NotImplementedError

    def finalize(self, state: Any, tokens: int) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def nbytes(self, in_features: int) -> int:
        """Memory one state takes (the calibration memory cap is checked against it)."""
        raise NotImplementedError


@dataclass
class AbsMaxHits(Accumulator):
    """Per input feature: max |x| (``amax``) and the number of tokens with |x| >= ``threshold`` (``hits``)."""

    threshold: float = 0.0
    name: ClassVar[str] = "absmax"

    def init(self, in_features, device="cpu"):
        return [torch.zeros(in_features, device=device), torch.zeros(in_features, dtype=torch.long, device=device)]

    def accumulate(self, state, x, weight):
        a = x.abs()
        torch.maximum(state[0], a.amax(dim=0), out=state[0])
        if self.threshold > 0:
            state[1] += (a >= self.threshold).sum(dim=0)
        return state

    def finalize(self, state, tokens):
        return {"amax": state[0].cpu(), "hits": state[1].cpu()}

    def nbytes(self, in_features):
        return 12 * in_features


@dataclass
class Hessian(Accumulator):
    """H = 2 XᵀX / n over the tokens seen (GPTQ's proxy Hessian of the layer-output error), as a running sum in
    float32. With gate weights, token t counts w_t times and n = sum of the weights."""

    name: ClassVar[str] = "hessian"

    def init(self, in_features, device="cpu"):
        return [torch.zeros(in_features, in_features, device=device), 0.0]

    def accumulate(self, state, x, weight):
        if weight is not None:
            xw = x * weight.sqrt()[:, None].to(x.dtype)
            state[1] += float(weight.sum())
        else:
            xw = x
            state[1] += x.shape[0]
        state[0].addmm_(xw.t(), xw)
        return state

    def finalize(self, state, tokens):
        h = state[0]
        if state[1] > 0:
            h.mul_(2.0 / state[1])
        return {"hessian": h}

    def nbytes(self, in_features):
        return 4 * in_features * in_features
