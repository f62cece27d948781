"""The plan: which method, options and codec each target gets, from a recipe's ordered rules (first match wins;
``ignore`` and unmatched targets stay as they are)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from moeq.errors import MoeqError
from moeq.models.adapter import Target
from moeq.quant.base import MethodConfig, Quantizer
from moeq.recipes import KINDS, Recipe


@dataclass(frozen=True, eq=False)
class Assignment:
    """What one rule of the recipe does to the targets it selects."""

    rule: int
    method: str
    quantizer: Quantizer
    cfg: MethodConfig

    @property
    def codec(self) -> str:
        return self.quantizer.codec_for(self.cfg)

    @property
    def calibrated(self) -> bool:
        return self.quantizer.needs_calibration(self.cfg)

    def options(self) -> dict[str, Any]:
        return self.cfg.model_dump()


def matches(selector: str, t: Target) -> bool:
    """Kinds select by role (only ``router`` selects routers); ``re:`` and exact names select anything."""
    if selector in KINDS:
        return t.role == selector
    if selector.startswith("re:"):
        pat = selector[3:]
        return re.match(pat, t.name) is not None or re.match(pat, t.module) is not None
    return selector in (t.name, t.module, f"{t.module}.{t.param}")


class Plan:
    """Resolved per-target assignments. ``targets``: the quantized ones, in model order."""

    def __init__(self, recipe: Recipe, targets: list[Target]):
        self.recipe = recipe.resolved()
        rules = recipe.methods()
        self.assignments = [Assignment(i, rule.method, q, cfg) for i, (rule, q, cfg) in enumerate(rules)]
        self.of: dict[Target, Assignment] = {}
        for t in targets:
            if any(matches(s, t) for s in self.recipe.ignore):
                continue
            for a, (rule, _, _) in zip(self.assignments, rules):
                if any(matches(s, t) for s in rule.targets):
                    self.of[t] = a
                    break
        self.targets = [t for t in targets if t in self.of]
        if not self.targets:
            wanted = sorted({sel for r, _, _ in rules for sel in r.targets})
            has = sorted({t.role for t in targets})
            raise MoeqError(f"the recipe selects no quantizable weight in this model (it selects "
                            f"{', '.join(wanted)}; the model has {', '.join(has) or 'none'}): write a rule, e.g. "
                            f"targets: [{has[0] if has else 'dense_mlp'}]")

    @property
    def calibrated(self) -> bool:
        used = {id(a) for a in self.of.values()}
        return any(a.calibrated for a in self.assignments if id(a) in used)

    def __getitem__(self, t: Target) -> Assignment:
        return self.of[t]
