"""Calibration: the one place where forward hooks live.

A ``Collector`` feeds the accumulators each target's method declares (``Quantizer.calibration``), for one
decoder layer (or one chunk of its experts) at a time:
- Linear targets through forward pre-hooks. Targets that read the very same input tensor in a forward (q/k/v,
  a shared expert's gate and up) share one state: the first of them names the input.
- Fused 3-D experts through ``experts_forward``: expert e sees only the tokens its router sends it, with their
  gate probabilities (token counts, gate-probability sums and their squares' sums are recorded per expert). An
  expert's gate and up live in one fused parameter, so they share one state by construction. ``experts="pooled"``
  pools the routed tokens of every expert of a parameter into one state.
- Per-expert ``nn.Linear`` experts (SwitchTransformers) are hooked like any Linear: their modules receive only
  their routed tokens (no gate weighting there).

Forced routing (``observing(..., forced=True)``, for starved experts, ``CalibSpec.starved = "route_all"``): the
layer runs as usual, and after each experts module has run, every expert the collector holds targets of is run
once more, for statistics only, on ALL the tokens that reached the module (unweighted, output discarded); its
statistics come from that pass alone.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from moeq.errors import MoeqError
from moeq.models.adapter import Target, dense_expert_linear, patch_experts, run_expert
from moeq.quant.base import CalibSpec, Stats


class _State:
    """The accumulator states of one input key."""

    def __init__(self):
        self.tokens = 0
        self.gate_prob = 0.0
        self.gate_sq = 0.0      # sum of squared gate probabilities: how much the expert's output error counts
        self.acc: dict[str, tuple] = {}  # repr(accumulator) -> (accumulator, state)


class Collector:
    """Statistics of ``targets`` (each with its method's ``CalibSpec``), finalized into ``Stats`` per target name.
    States live on ``device``; inputs are fed to them in float32."""

    def __init__(self, specs: dict[Target, CalibSpec], device: str | torch.device = "cpu"):
        self.specs = {t: s for t, s in specs.items() if s.accumulators}
        self.device = torch.device(device)
        self.key_of: dict[str, str] = {}          # target name -> input key
        self.states: dict[str, _State] = {}       # input key -> states
        self._seen: dict[int, tuple[torch.Tensor, str]] = {}   # id(input) -> (input kept alive, key), per forward
        self._fed: set[tuple[str, int, str]] = set()  # (key, id(input), accumulator) fed in this forward
        self._alive: list[torch.Tensor] = []      # inputs fed in this forward: their ids stay unique
        self.forced = False                       # set by observing(forced=True)
        self.forcing = False                      # inside a forced all-token pass

    def new_forward(self) -> None:
        self._seen.clear()
        self._fed.clear()
        self._alive.clear()

    def _feed(self, key: str, spec: CalibSpec, x: torch.Tensor, gate: torch.Tensor | None) -> None:
        st = self.states.get(key)
        if st is None:
            st = self.states[key] = _State()
        x2 = x.detach().reshape(-1, x.shape[-1]).to(self.device, torch.float32)
        if x2.shape[0] == 0:
            return
        self._alive.append(x)
        if (key, id(x), "") not in self._fed:  # the same input read by several targets counts once
            self._fed.add((key, id(x), ""))
            st.tokens += x2.shape[0]
            if gate is not None:
                g = gate.detach().float()
                st.gate_prob += float(g.sum())
                st.gate_sq += float(g.square().sum())
        for acc in spec.accumulators:
            name = repr(acc)
            if (key, id(x), name) in self._fed:
                continue
            self._fed.add((key, id(x), name))
            if name not in st.acc:
                st.acc[name] = (acc, acc.init(x2.shape[1], self.device))
            w = gate.to(self.device, torch.float32) if (gate is not None and spec.gate_weighted) else None
            st.acc[name] = (acc, acc.accumulate(st.acc[name][1], x2, w))

    def observe_linear(self, t: Target, x: torch.Tensor) -> None:
        if self.forced and not self.forcing:  # forced routing: only the extra all-token pass counts
            return
        seen = self._seen.get(id(x))
        key = self.key_of.get(t.name) or (seen[1] if seen is not None else t.name)
        self.key_of[t.name] = key
        if seen is None:
            self._seen[id(x)] = (x, key)  # kept alive for this forward, so its id names only this tensor
        self._feed(key, self.specs[t], x, None)

    def observe_expert(self, module: str, param: str, e: int, x: torch.Tensor, gate: torch.Tensor,
                       wanted: dict[tuple[str, int], Target]) -> None:
        t = wanted.get((param, e))
        if t is None:
            return
        spec = self.specs[t]
        key = f"{module}.{param}" if spec.experts == "pooled" else t.name
        self.key_of[t.name] = key
        self._feed(key, spec, x, gate)

    def finalize(self) -> dict[str, Stats | None]:
        """Stats per target name (one object per input key, shared by the targets reading that input);
        None for targets no calibration token reached."""
        made: dict[str, Stats] = {}
        for key, st in self.states.items():
            values = {}
            for acc, state in st.acc.values():
                values.update(acc.finalize(state, st.tokens))
            made[key] = Stats(st.tokens, values, st.gate_prob, gate_sq=st.gate_sq)
        out = {}
        for t in self.specs:
            key = self.key_of.get(t.name)
            s = made.get(key) if key is not None else None
            out[t.name] = s if s is not None and s.tokens > 0 else None
        self.states.clear()
        return out


@contextmanager
def observing(root: nn.Module, collector: Collector, prefix: str = "", forced: bool = False):
    """Feed ``collector`` with the inputs of its targets (fqns relative to the full model; ``root`` is the model
    or one of its submodules at ``prefix``) while the block is active; ``forced``: forced routing (module
    docstring)."""
    collector.forced = forced
    undo = [root.register_forward_pre_hook(lambda m, args: collector.new_forward()).remove]
    fused: dict[str, dict[tuple[str, int], Target]] = {}
    transposed: dict[str, bool] = {}
    linear_experts: dict[str, set[str]] = {}     # forced: experts container -> expert modules under it

    def local(path: str) -> str:
        return path[len(prefix):].lstrip(".") if prefix else path

    for t in collector.specs:
        if t.expert is None:
            h = root.get_submodule(local(t.module)).register_forward_pre_hook(
                lambda m, args, _t=t: collector.observe_linear(_t, args[0]))
            undo.append(h.remove)
            if forced:
                container, expert = expert_module(t)
                linear_experts.setdefault(container, set()).add(expert)
        else:
            fused.setdefault(t.module, {})[(t.param, t.expert)] = t
            transposed[t.module] = t.transposed
    for full, wanted in fused.items():
        mod = root.get_submodule(local(full))
        obs = (lambda p, e, x, gate, _f=full, _w=wanted: collector.observe_expert(_f, p, e, x, gate, _w))
        observed = dense_expert_linear(mod, transposed[full], observe=obs)
        if forced:  # the routed pass unobserved, then the wanted experts on every token, observed
            undo.append(patch_experts(mod, dense_expert_linear(mod, transposed[full]),
                                      after=_all_tokens(observed, sorted({e for _, e in wanted}))))
        else:
            undo.append(patch_experts(mod, observed))
    for container, experts in linear_experts.items():
        undo.append(root.get_submodule(local(container)).register_forward_hook(
            lambda m, args, out, _c=container, _x=sorted(experts): _run_all(root, collector, local, _x, args)).remove)
    try:
        yield collector
    finally:
        for u in reversed(undo):
            u()
        collector.forced = False


def expert_module(t: Target) -> tuple[str, str]:
    """(experts container, expert module) of a per-expert Linear target (``...mlp.experts.expert_3.wi`` ->
    ``...mlp.experts``, ``...mlp.experts.expert_3``)."""
    parts = t.module.split(".")
    if "experts" not in parts[:-1]:
        raise MoeqError(f"{t.name}: starved=route_all needs the expert's module under an 'experts' container; "
                        "use starved=rtn")
    i = len(parts) - 1 - parts[:-1][::-1].index("experts") - 1
    return ".".join(parts[:i + 1]), ".".join(parts[:i + 2])


def _all_tokens(observed, experts: list[int]):
    """``patch_experts``' ``after`` hook of forced routing: each expert of ``experts`` on every token that reached
    the module, through the observing ``linear``, for statistics only (unweighted, output discarded)."""
    def after(mod: nn.Module, hidden_states: torch.Tensor) -> None:
        ones = hidden_states.new_ones(hidden_states.shape[0])
        with torch.no_grad():
            for e in experts:
                run_expert(mod, observed, e, hidden_states, ones)
    return after


def _run_all(root: nn.Module, collector: Collector, local, experts: list[str], args) -> None:
    """After a per-Linear experts container ran: its forced experts on every token it received (``args[0]``)."""
    x = args[0]
    collector.forcing = True
    try:
        with torch.no_grad():
            for path in experts:
                root.get_submodule(local(path))(x.reshape(-1, x.shape[-1]))
    finally:
        collector.forcing = False
