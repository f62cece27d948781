"""Calibration accumulators: pure math on activation batches, ``init / accumulate / finalize``.

A method declares the accumulators it needs (``Quantizer.calibration``); ``moeq.models.calib`` holds the hooks
that feed them, one state per distinct input (q/k/v share one; an expert's statistics see only its routed
tokens). ``x`` is always [n, in] float32; ``weight`` [n] (gate probabilities) or None.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch


def column_counts(mask: torch.Tensor) -> torch.Tensor:
    """True entries per column of a boolean [n, k] mask, int32. On the CPU one int8 GEMM with a row of ones (a
    reduction over dim 0 is ~15x slower there); elsewhere a sum."""
    if mask.device.type == "cpu":
        return torch._int_mm(torch.ones(1, mask.shape[0], dtype=torch.int8), mask.contiguous().view(torch.int8))[0]
    return mask.sum(dim=0, dtype=torch.int32)


class Accumulator:
    name: ClassVar[str]
    # whether the statistic must see the inputs the already-quantized layers produce (it compensates their error)
    # rather than the float model's
    sequential: ClassVar[bool] = True

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
    """Per input feature: max |x| (``amax``) and the number of tokens with |x| >= ``threshold`` (``hits``).
    Ranges and outlier features are properties of the model, not of the earlier layers' quantization error: they
    are gathered on the float model's activations (as SmoothQuant does)."""

    threshold: float = 0.0
    name: ClassVar[str] = "absmax"
    sequential: ClassVar[bool] = False

    def init(self, in_features, device="cpu"):
        return [torch.zeros(in_features, device=device), torch.zeros(in_features, dtype=torch.long, device=device)]

    def accumulate(self, state, x, weight):
        a = x.abs()
        torch.maximum(state[0], a.amax(dim=0), out=state[0])
        if self.threshold > 0:
            state[1] += column_counts(a >= self.threshold)
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
