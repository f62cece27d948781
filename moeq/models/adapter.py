"""The one place that knows MoE layouts.

It enumerates every quantizable weight of a transformers model as 2-D ``Target``s:
- ``nn.Linear`` modules (attention, dense MLPs, shared experts, per-expert Linear as in SwitchTransformers);
- FUSED 3-D expert parameters (transformers 5.x): ``gate_up_proj [E, 2I, H]`` / ``up_proj`` and
  ``down_proj [E, H, I]``, or transposed (GPT-OSS: ``[E, H, 2I]``, ``[E, I, H]``) with ``<name>_bias [E, out]``.
  Each expert becomes its own 2-D target ``<module>.<param>.<e>`` of shape [out, in].
Each target has a ``role`` (the selector kinds of recipes): ``attention``, ``dense_mlp``, ``expert``,
``shared_expert``, ``router`` (Linear routers such as Qwen2-MoE's shared_expert_gate or Switch's classifier;
top-k router modules holding a bare weight are not Linear and always stay as they are) or ``lm_head``. Which
targets are quantized, and how, is the plan's decision (``moeq.pipeline.plan``); norms and embeddings are
never targets.

It also runs fused experts with per-expert callables (``experts_forward``), which both calibration (dense
weights plus an observer) and the packed runtime use, so the routing loop exists once.
"""

from __future__ import annotations

import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

FUSED_PARAMS = ("gate_up_proj", "up_proj", "down_proj")
ROUTER_NAMES = {"gate", "router", "classifier", "shared_expert_gate", "wg"}


@dataclass(frozen=True)
class Target:
    name: str               # manifest entry name
    module: str             # fqn of the owning module
    param: str              # "weight" for Linear, the fused parameter name for experts
    expert: int | None      # expert index for fused experts
    transposed: bool        # stored [in, out] per expert
    bias: str | None        # bias parameter name on the owning module
    shape: tuple[int, int]  # [out, in]
    role: str = "dense_mlp"  # attention | dense_mlp | expert | shared_expert | router | lm_head

    @property
    def kind(self) -> str:
        """Module type key for reports: 'self_attn.q_proj', 'experts.gate_up_proj', ..."""
        parts = self.module.split(".")
        tail = [p for p in parts if not p.isdigit()][-2:]
        return ".".join(tail + ([self.param] if self.expert is not None else []))


def _is_router(name: str) -> bool:
    parts = name.split(".")
    return parts[-1] in ROUTER_NAMES or any(p == "router" for p in parts)


def is_fused_experts(mod: nn.Module) -> bool:
    return any(isinstance(getattr(mod, p, None), nn.Parameter) and getattr(mod, p).ndim == 3 for p in FUSED_PARAMS) \
        or getattr(mod, "_moeq_packed", False)


def _fused_transposed(mod: nn.Module, config) -> bool:
    if hasattr(mod, "is_transposed"):
        return bool(mod.is_transposed)
    hidden = getattr(config, "hidden_size", None)
    down = getattr(mod, "down_proj", None)
    return hidden is not None and down is not None and down.shape[1] != hidden


_SHARED = ("shared_expert", "shared_experts", "shared_mlp")
_ATTENTION = ("attn", "attention")


def role_of(name: str, fused: bool = False) -> str:
    """The selector kind of the module ``name`` (a Linear, or a fused-experts module when ``fused``)."""
    parts = name.split(".")
    if _is_router(name):
        return "router"
    if any(p in _SHARED for p in parts):
        return "shared_expert"
    if fused or any(p == "experts" for p in parts):
        return "expert"
    if any(any(a in p.lower() for a in _ATTENTION) for p in parts):
        return "attention"
    return "dense_mlp"


def find_targets(model: nn.Module) -> list[Target]:
    """Every 2-D weight a plan may select (routers and the output head included, with their roles)."""
    lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    out: list[Target] = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            role = "lm_head" if mod is lm_head else role_of(name)
            out.append(Target(f"{name}.weight", name, "weight", None, False,
                              "bias" if mod.bias is not None else None, (mod.out_features, mod.in_features), role))
        elif is_fused_experts(mod) and not getattr(mod, "_moeq_packed", False):
            t = _fused_transposed(mod, config)
            for p in FUSED_PARAMS:
                w = getattr(mod, p, None)
                if not isinstance(w, nn.Parameter) or w.ndim != 3:
                    continue
                shape = (w.shape[2], w.shape[1]) if t else (w.shape[1], w.shape[2])
                bias = f"{p}_bias" if isinstance(getattr(mod, f"{p}_bias", None), nn.Parameter) else None
                role = role_of(name, fused=True)
                out.extend(Target(f"{name}.{p}.{e}", name, p, e, t, bias, shape, role) for e in range(w.shape[0]))
    return out


def target_weight(model: nn.Module, t: Target) -> torch.Tensor:
    """The 2-D [out, in] weight of a target (a view for fused experts)."""
    w = getattr(model.get_submodule(t.module), t.param)
    if t.expert is None:
        return w
    w = w[t.expert]
    return w.t() if t.transposed else w


def target_bias(model: nn.Module, t: Target) -> torch.Tensor | None:
    if t.bias is None:
        return None
    b = getattr(model.get_submodule(t.module), t.bias)
    return b if t.expert is None else b[t.expert]


# ---------------------------------------------------------------------------------------------------------
# Running fused experts with per-expert callables
# ---------------------------------------------------------------------------------------------------------
ExpertLinear = Callable[[str, int, torch.Tensor, torch.Tensor], torch.Tensor]


def experts_forward(mod: nn.Module, linear: ExpertLinear, hidden_states: torch.Tensor,
                    top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
    """The routing loop of transformers' fused experts, with ``linear(param, e, x, gate)`` computing
    x @ W_e.T + b_e for the tokens routed to expert e (``gate``: their routing weights, for observers)."""
    out = torch.zeros_like(hidden_states)
    num_experts = _num_experts(mod)
    for e in torch.unique(top_k_index).tolist():
        if e < 0 or e >= num_experts:
            continue
        token_idx, pos = torch.where(top_k_index == e)
        gate = top_k_weights[token_idx, pos]
        y = run_expert(mod, linear, e, hidden_states[token_idx], gate) * gate[:, None]
        out.index_add_(0, token_idx, y.to(out.dtype))
    return out


def run_expert(mod: nn.Module, linear: ExpertLinear, e: int, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """Expert e of a fused-experts module on tokens ``x`` (before its gate weighting): the up (and gate)
    projection, the activation, the down projection."""
    first = "gate_up_proj" if _has(mod, "gate_up_proj") else "up_proj"
    h = linear(first, e, x, gate)
    if first == "gate_up_proj":
        h = mod._apply_gate(h) if hasattr(mod, "_apply_gate") else _gate(mod, h)
    else:
        h = mod.act_fn(h)
    return linear("down_proj", e, h, gate)


def _has(mod, p) -> bool:
    return p in getattr(mod, "_moeq_params", ()) or isinstance(getattr(mod, p, None), nn.Parameter)


def _num_experts(mod) -> int:
    for attr in ("num_experts", "num_local_experts", "n_routed_experts"):
        if isinstance(getattr(mod, attr, None), int):
            return getattr(mod, attr)
    return mod._moeq_num_experts


def _gate(mod, h):
    gate, up = h.chunk(2, dim=-1)
    return mod.act_fn(gate) * up


def dense_expert_linear(mod: nn.Module, transposed: bool, observe=None) -> ExpertLinear:
    """Per-expert linear on the module's own dense 3-D weights; ``observe(param, e, x, gate)`` sees each input."""
    def linear(p: str, e: int, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        if observe is not None:
            observe(p, e, x, gate)
        w = getattr(mod, p)[e]
        y = x @ w if transposed else F.linear(x, w)
        b = getattr(mod, f"{p}_bias", None)
        return y + b[e] if isinstance(b, nn.Parameter) else y
    return linear


def patch_experts(mod: nn.Module, linear: ExpertLinear,
                  after: Callable[[nn.Module, torch.Tensor], None] | None = None) -> Callable[[], None]:
    """Route ``mod.forward`` through ``experts_forward`` with ``linear``; ``after(mod, hidden_states)`` runs after
    each forward (calibration's forced routing). Returns an undo function."""
    had = "forward" in mod.__dict__
    old = mod.__dict__.get("forward")

    def forward(self, hidden_states, top_k_index, top_k_weights, *args, **kwargs):
        out = experts_forward(self, linear, hidden_states, top_k_index, top_k_weights)
        if after is not None:
            after(self, hidden_states)
        return out
    mod.forward = types.MethodType(forward, mod)

    def undo():
        if had:
            mod.forward = old
        else:
            del mod.forward
    return undo


def install_packed(model: nn.Module, t_modules: dict[Target, nn.Module]) -> None:
    """Replace targets by packed runtime modules: Linear modules are swapped; fused expert parameters are
    removed and served by per-expert modules through ``experts_forward``."""
    fused: dict[str, dict[str, dict[int, nn.Module]]] = {}
    for t, m in t_modules.items():
        if t.expert is None:
            parent, _, child = t.module.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, m)
        else:
            fused.setdefault(t.module, {}).setdefault(t.param, {})[t.expert] = m
    for path, per_param in fused.items():
        mod = model.get_submodule(path)
        packed = nn.ModuleDict()
        for p, experts in per_param.items():
            n = getattr(mod, p).shape[0] if isinstance(getattr(mod, p, None), torch.Tensor) else len(experts)
            if sorted(experts) != list(range(n)):
                raise ValueError(f"{path}.{p}: experts {sorted(set(range(n)) - set(experts))} were not packed")
            if not hasattr(mod, "_moeq_num_experts"):
                mod._moeq_num_experts = n
            packed[p] = nn.ModuleList([experts[e] for e in range(n)])
            if p in mod._parameters:
                del mod._parameters[p]
            if f"{p}_bias" in mod._parameters:  # the bias lives inside each packed expert module
                del mod._parameters[f"{p}_bias"]
        mod.moeq_experts = packed
        mod._moeq_packed = True
        mod._moeq_params = tuple(packed.keys())
        patch_experts(mod, lambda p, e, x, gate, _m=mod: _m.moeq_experts[p][e](x))
