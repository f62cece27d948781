"""Recipe schema (pydantic, extra="forbid": a typo is an error) and the YAML loader.

A recipe holds ordered ``rules``: each maps target selectors to a method and its typed options; the first rule
whose selector matches a weight wins, and ``ignore`` keeps weights as they are. Selectors, in the syntax of
llm-compressor recipes plus moeq's module kinds:

- a kind: ``attention``, ``dense_mlp``, ``expert``, ``shared_expert``, ``router`` (Linear routers only), ``lm_head``;
- ``re:<pattern>``: a regular expression matched (``re.match``) against the entry name (``model.layers.0.mlp.
  experts.gate_up_proj.3``) or the module name;
- anything else: an exact module or entry name.

Routers, norms and embeddings stay in their dtype unless a rule names them (no kind but ``router`` selects a
router). ``method`` + ``options`` (what the CLI flags write) is shorthand for one rule over the method's default kinds
(``Quantizer.default_targets``: attention, dense MLPs, experts and shared experts; experts only for ``qmoe``).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeq.errors import MoeqError

KINDS = ("attention", "dense_mlp", "expert", "shared_expert", "router", "lm_head")
DEFAULT_TARGETS = ["attention", "dense_mlp", "expert", "shared_expert"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    source: str = Field("wiki", description="'wiki' (embedded, calibration split), a text file, or hf:NAME")
    samples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0
    device: Literal["cpu", "cuda"] = Field("cpu", description="where calibration forwards and GPTQ run")
    max_stats_mb: float = Field(4096, gt=0, description="cap on one layer's statistics (Hessians); a layer whose "
                              "statistics exceed it is calibrated in chunks of experts, one forward per chunk")


class EvalSpec(Strict):
    corpus: str = "wiki"
    protocol: str = "gptq"
    seqlen: int = Field(512, ge=8)
    windows: int | None = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


class Rule(Strict):
    targets: list[str] = Field(min_length=1, description="selectors: kinds, re:<pattern> or exact names")
    method: str
    options: dict[str, Any] = Field(default_factory=dict)

    @field_validator("targets")
    @classmethod
    def _selectors(cls, v: list[str]) -> list[str]:
        return check_selectors(v)


def check_selectors(v: list[str]) -> list[str]:
    """``re:`` selectors must compile (a bad pattern is a recipe error, not a crash when the plan is made)."""
    for s in v:
        if s.startswith("re:"):
            try:
                re.compile(s[3:])
            except re.error as e:
                raise ValueError(f"bad pattern {s!r}: {e}") from None
    return v


class Recipe(Strict):
    model: str | None = None
    method: str | None = Field(None, description="shorthand: one rule over the default kinds")
    options: dict[str, Any] = Field(default_factory=dict)
    include_lm_head: bool = Field(False, description="shorthand: the one rule also selects lm_head")
    rules: list[Rule] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    calibration: Calibration = Field(default_factory=Calibration)
    eval: EvalSpec | None = None

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        return check_selectors(v)

    @model_validator(mode="after")
    def _one_form(self):
        if self.rules and (self.method is not None or self.options or self.include_lm_head):
            raise ValueError("give either rules or method/options/include_lm_head, not both")
        return self

    def resolved(self) -> "Recipe":
        """The same recipe with the shorthand written out as rules (what the manifest and --dump-recipe show)."""
        if self.rules:
            return self
        method = self.method or "int8"
        from moeq.registry import QUANTIZERS, load_builtins
        load_builtins()
        kinds = list(QUANTIZERS.get(method).default_targets) if method in QUANTIZERS else DEFAULT_TARGETS
        targets = kinds + (["lm_head"] if self.include_lm_head else [])
        rule = Rule(targets=targets, method=method, options=dict(self.options))
        return self.model_copy(update={"method": None, "options": {}, "include_lm_head": False, "rules": [rule]})

    def methods(self) -> list[tuple[Rule, Any, Any]]:
        """(rule, quantizer, typed options) per rule, validated: unknown methods and bad options are errors."""
        from moeq.registry import QUANTIZERS, load_builtins
        load_builtins()
        out = []
        for i, rule in enumerate(self.resolved().rules):
            where = f"rules[{i}]" if self.rules else "method"
            if rule.method not in QUANTIZERS:
                raise MoeqError(f"{where}: unknown method {rule.method!r} (known: {', '.join(QUANTIZERS)})")
            q = QUANTIZERS.get(rule.method)
            try:
                out.append((rule, q(), q.Config(**rule.options)))
            except ValidationError as e:
                raise MoeqError(f"{where} ({rule.method}): {_one_line(e)}") from None
        return out

    def needs_calibration(self) -> bool:
        return any(q.needs_calibration(cfg) for _, q, cfg in self.methods())

    def method_label(self) -> str:
        return "+".join(dict.fromkeys(r.method for r in self.resolved().rules))

    def dump(self) -> str:
        """The resolved recipe as YAML."""
        data = self.resolved().model_dump(exclude={"method", "options", "include_lm_head"}, exclude_none=True)
        return yaml.safe_dump(data, sort_keys=False)


def _one_line(e: ValidationError) -> str:
    errs = e.errors()
    parts = [f"{'.'.join(str(x) for x in err['loc']) or 'options'}: {err['msg']}" for err in errs[:3]]
    return "; ".join(parts)


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise MoeqError(f"recipe {p}: no such file")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise MoeqError(f"recipe {p}: not valid YAML ({str(e).splitlines()[0]})") from None
    try:
        return Recipe(**data)
    except ValidationError as e:
        raise MoeqError(f"recipe {p}: {_one_line(e)}") from None
    except TypeError:
        raise MoeqError(f"recipe {p}: expected a mapping at the top level") from None
