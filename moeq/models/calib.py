"""Calibration: the one place where forward hooks live. Collects per-target input statistics
(``ChannelStats``) for Linear targets (pre-hooks) and per-expert targets (through ``experts_forward``)."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from moeq.models.adapter import Target, dense_expert_linear, patch_experts
from moeq.quant.base import ChannelStats


class StatsCollector:
    def __init__(self, threshold: float):
        self.threshold = threshold
        self.stats: dict[str, ChannelStats] = {}

    @torch.no_grad()
    def observe(self, name: str, x: torch.Tensor) -> None:
        x2 = x.detach().reshape(-1, x.shape[-1])
        if x2.shape[0] == 0:
            return
        a = x2.abs().float()
        amax = a.amax(dim=0)
        hits = (a >= self.threshold).sum(dim=0) if self.threshold > 0 else torch.zeros_like(amax, dtype=torch.long)
        s = self.stats.get(name)
        if s is None:
            self.stats[name] = ChannelStats(x2.shape[0], amax, hits)
        else:
            s.tokens += x2.shape[0]
            torch.maximum(s.amax, amax, out=s.amax)
            s.hits += hits


@contextmanager
def observing(root: nn.Module, targets: list[Target], collector: StatsCollector, prefix: str = ""):
    """Record inputs of ``targets`` (fqns relative to the full model; ``root`` is the model or one of its
    submodules at ``prefix``) into ``collector`` while the block is active."""
    undo = []
    fused: dict[str, bool] = {}
    for t in targets:
        path = t.module[len(prefix):].lstrip(".") if prefix else t.module
        mod = root.get_submodule(path)
        if t.expert is None:
            h = mod.register_forward_pre_hook(lambda m, args, _n=t.name: collector.observe(_n, args[0]))
            undo.append(h.remove)
        else:
            fused[t.module] = t.transposed
    for full, transposed in fused.items():
        path = full[len(prefix):].lstrip(".") if prefix else full
        mod = root.get_submodule(path)
        obs = (lambda p, e, x, _f=full: collector.observe(f"{_f}.{p}.{e}", x))
        undo.append(patch_experts(mod, dense_expert_linear(mod, transposed, observe=obs)))
    try:
        yield collector
    finally:
        for u in reversed(undo):
            u()
