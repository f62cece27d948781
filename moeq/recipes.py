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

A whole run (``moeq run``) adds ``version`` (1), ``output`` (the artifact directory), ``eval`` (protocol, corpus,
windows, dtype, speed) and ``expect``: the limits a result must meet (``max_ppl_ratio``, ``max_kl``,
``max_bits_per_param``, ``min_decode_speedup`` ...). A recipe read from a file keeps the line of every key, so
any error there (an unknown key at any level, method options included, a wrong type, an unknown method) names
``file:line``, the field, and the closest allowed name.
"""

from __future__ import annotations

import difflib
import operator
import re
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from moeq.errors import MoeqError

KINDS = ("attention", "dense_mlp", "expert", "shared_expert", "router", "lm_head")
DEFAULT_TARGETS = ["attention", "dense_mlp", "expert", "shared_expert"]
RECIPE_VERSION = 1


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
    """How ``moeq eval`` / ``moeq run`` measure: perplexity protocol (``moeq.eval.perplexity.PROTOCOLS``), corpus,
    windows, compute dtype, and whether speed is measured."""

    corpus: str = Field("wiki", description="'wiki' (embedded eval split), a text file, or hf:NAME[:CONFIG]")
    protocol: str = Field("gptq", description="gptq | llamacpp (llama.cpp) | sliding")
    seqlen: int = Field(512, ge=8, description="window length (llama.cpp's n_ctx)")
    stride: int | None = Field(None, ge=1, description="sliding: tokens a window advances; null = seqlen / 2")
    windows: int | None = Field(64, ge=1, description="evaluate the first N windows; null = all")
    batch_size: int = Field(8, ge=1)
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="compute dtype of the model and its baseline (auto: the checkpoint's, bf16 for fp32)")
    speed: bool = Field(False, description="measure prefill/decode tokens/s (also when expect asks for a speedup)")
    bits: int | None = Field(None, ge=1, le=16, description="a matryoshka artifact evaluated at this width")

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol(cls, v: Any) -> Any:
        from moeq.eval.perplexity import ALIASES, PROTOCOLS
        v = ALIASES.get(v, v) if isinstance(v, str) else v
        if isinstance(v, str) and v not in PROTOCOLS:
            raise ValueError(f"unknown protocol {v!r}{_did_you_mean(v, PROTOCOLS)} (allowed: {', '.join(PROTOCOLS)})")
        return v

    @model_validator(mode="after")
    def _stride(self):
        if self.stride is not None and self.protocol != "sliding":
            raise ValueError(f"stride applies to the sliding protocol only (this spec's is {self.protocol})")
        if self.stride is not None and self.stride > self.seqlen:
            raise ValueError(f"stride {self.stride} is longer than seqlen {self.seqlen}")
        return self


def _speedup(key: str) -> Callable[[dict], float | None]:
    def get(r: dict) -> float | None:
        sp, bs = r.get("speed") or {}, r.get("baseline_speed") or {}
        return sp[key] / bs[key] if sp.get(key) and bs.get(key) else None
    return get


@dataclass(frozen=True)
class Metric:
    """One thing ``expect`` can bound: its label, how to read it from an evaluation result, and the unit."""
    label: str
    value: Callable[[dict], float | None]
    fmt: str = "{:.4f}"
    needs_speed: bool = False


# expect key -> metric; ``max_`` keys are upper limits, ``min_`` keys lower limits (the one allow-list of expect)
EXPECT_METRICS: dict[str, Metric] = {
    "max_ppl": Metric("perplexity", lambda r: (r.get("ppl") or {}).get("value")),
    "max_ppl_ratio": Metric("ppl ratio (vs baseline)", lambda r: r.get("ppl_ratio")),
    "max_kl": Metric("mean KL (baseline || model), nats", lambda r: r.get("kl_mean"), "{:.5f}"),
    "max_bits_per_param": Metric("bits/param", lambda r: r.get("bits_per_param"), "{:.3f}"),
    "max_size_mb": Metric("artifact size, MB", lambda r: r["total_bytes"] / 1e6 if r.get("total_bytes") else None,
                          "{:.2f}"),
    "min_prefill_speedup": Metric("prefill speedup (x baseline)", _speedup("prefill_tok_s"), "{:.2f}", True),
    "min_decode_speedup": Metric("decode speedup (x baseline)", _speedup("decode_tok_s"), "{:.2f}", True),
}


class Expect(Strict):
    """What result is acceptable: every limit set must hold (``moeq run`` exits 1 otherwise). Each limit reads
    one metric of the evaluation (``EXPECT_METRICS``); a metric that was not measured fails its limit."""

    max_ppl: float | None = Field(None, gt=0, description="perplexity under the eval protocol")
    max_ppl_ratio: float | None = Field(None, gt=0, description="perplexity / the baseline's (same windows)")
    max_kl: float | None = Field(None, ge=0, description="mean KL(baseline || model) per scored token, nats")
    max_bits_per_param: float | None = Field(None, gt=0, description="bits per quantized parameter")
    max_size_mb: float | None = Field(None, gt=0, description="artifact tensors, 10^6 bytes")
    min_prefill_speedup: float | None = Field(None, gt=0, description="prefill tokens/s / the baseline's")
    min_decode_speedup: float | None = Field(None, gt=0, description="decode tokens/s / the baseline's")

    def limits(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v is not None}

    def needs_speed(self) -> bool:
        return any(EXPECT_METRICS[k].needs_speed for k in self.limits())

    def check(self, result: dict) -> list[dict[str, Any]]:
        """One row per limit: key, metric label, measured value (None: not measured), limit, ok."""
        rows = []
        for key, limit in self.limits().items():
            m = EXPECT_METRICS[key]
            value = m.value(result)
            cmp = operator.le if key.startswith("max_") else operator.ge
            rows.append({"key": key, "metric": m.label, "value": value, "limit": limit,
                         "op": "<=" if cmp is operator.le else ">=", "fmt": m.fmt,
                         "ok": value is not None and cmp(value, limit)})
        return rows


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


@dataclass(frozen=True)
class YamlSource:
    """Where a recipe was read: the file and the 1-based line of every key (a path of keys and list indices)."""
    path: str
    lines: dict[tuple, int] = field(default_factory=dict)

    def at(self, loc: tuple) -> str:
        """``file:line`` of the deepest part of ``loc`` the file has (an extra key is found itself)."""
        for n in range(len(loc), -1, -1):
            if loc[:n] in self.lines:
                return f"{self.path}:{self.lines[loc[:n]]}"
        return self.path


class Recipe(Strict):
    version: int = Field(RECIPE_VERSION, description="recipe schema version")
    model: str | None = None
    method: str | None = Field(None, description="shorthand: one rule over the default kinds")
    options: dict[str, Any] = Field(default_factory=dict)
    include_lm_head: bool = Field(False, description="shorthand: the one rule also selects lm_head")
    rules: list[Rule] = Field(default_factory=list)
    ignore: list[str] = Field(default_factory=list)
    calibration: Calibration = Field(default_factory=Calibration)
    output: str | None = Field(None, description="artifact directory moeq run writes [default: out/<recipe name>]")
    eval: EvalSpec | None = None
    expect: Expect | None = None
    _source: YamlSource | None = PrivateAttr(None)

    @field_validator("version")
    @classmethod
    def _version(cls, v: int) -> int:
        if v != RECIPE_VERSION:
            raise ValueError(f"recipe version {v} is not supported (this moeq reads version {RECIPE_VERSION})")
        return v

    @field_validator("ignore")
    @classmethod
    def _ignore(cls, v: list[str]) -> list[str]:
        return check_selectors(v)

    @model_validator(mode="after")
    def _one_form(self):
        if self.rules and (self.method is not None or self.options or self.include_lm_head):
            raise ValueError("give either rules or method/options/include_lm_head, not both")
        return self

    @property
    def source(self) -> YamlSource | None:
        return self._source

    def with_source(self, source: YamlSource | None) -> "Recipe":
        self._source = source
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
        """(rule, quantizer, typed options) per rule, validated: unknown methods and bad options are errors that
        name the rule (and, for a recipe read from a file, its file and line) and the closest allowed name."""
        from moeq.registry import QUANTIZERS, load_builtins
        load_builtins()
        out = []
        for i, rule in enumerate(self.resolved().rules):
            at: tuple = ("rules", i) if self.rules else ()
            if rule.method not in QUANTIZERS:
                loc = at + ("method",)
                raise MoeqError(self._locate(loc) + f"unknown method {rule.method!r}"
                                f"{_did_you_mean(rule.method, QUANTIZERS)} (known: {', '.join(QUANTIZERS)})")
            q = QUANTIZERS.get(rule.method)
            try:
                out.append((rule, q(), q.Config(**rule.options)))
            except ValidationError as e:
                raise MoeqError(_explain(e, q.Config, at + ("options",), self._source,
                                         f" ({rule.method} option)")) from None
        return out

    def _locate(self, loc: tuple) -> str:
        where = f"{self._source.at(loc)}: " if self._source else ""
        return f"{where}{_dotted(loc) or 'method'}: "

    def needs_calibration(self) -> bool:
        return any(q.needs_calibration(cfg) for _, q, cfg in self.methods())

    def method_label(self) -> str:
        return "+".join(dict.fromkeys(r.method for r in self.resolved().rules))

    def eval_spec(self) -> EvalSpec:
        """The recipe's evaluation, speed measured when ``expect`` bounds a speedup."""
        spec = self.eval or EvalSpec()
        if self.expect is not None and self.expect.needs_speed() and not spec.speed:
            spec = spec.model_copy(update={"speed": True})
        return spec

    def dump(self) -> str:
        """The resolved recipe as YAML."""
        data = self.resolved().model_dump(exclude={"method", "options", "include_lm_head"}, exclude_none=True)
        for k in ("eval", "expect"):
            if isinstance(data.get(k), dict):
                data[k] = {a: b for a, b in data[k].items() if b is not None}
        return yaml.safe_dump(data, sort_keys=False)


def _did_you_mean(word: str, allowed) -> str:
    close = difflib.get_close_matches(str(word), [str(a) for a in allowed], n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else ""


def _dotted(loc: tuple) -> str:
    """('rules', 0, 'options', 'bits') -> 'rules[0].options.bits'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _model_at(cls: Any, loc: tuple) -> Any:
    """The pydantic model class at ``loc`` under ``cls`` (following fields, list items, optionals), or None."""
    t = cls
    for part in loc:
        t = _unwrap(t)
        if isinstance(part, int):
            args = get_args(t)
            t = args[0] if get_origin(t) is list and args else None
        elif isinstance(t, type) and issubclass(t, BaseModel) and part in t.model_fields:
            t = t.model_fields[part].annotation
        else:
            return None
    t = _unwrap(t)
    return t if isinstance(t, type) and issubclass(t, BaseModel) else None


def _unwrap(t: Any) -> Any:
    if get_origin(t) in (Union, types.UnionType):
        members = [a for a in get_args(t) if a is not type(None)]
        return members[0] if len(members) == 1 else t
    return t


def _explain(e: ValidationError, cls: Any, prefix: tuple, source: YamlSource | None, what: str = "") -> str:
    """A ValidationError as one line: ``file:line: field: message`` with, for an unknown field, the closest
    allowed name and all allowed names."""
    errs = e.errors()
    err = errs[0]
    loc = prefix + tuple(err["loc"])
    if err["type"] == "extra_forbidden":
        model = _model_at(cls, tuple(err["loc"])[:-1])
        allowed = list(model.model_fields) if model is not None else []
        msg = (f"unknown field{what}{_did_you_mean(err['loc'][-1], allowed)}"
               + (f" (allowed: {', '.join(allowed)})" if allowed else ""))
    elif err["type"] == "literal_error":
        expected = re.findall(r"'([^']*)'", (err.get("ctx") or {}).get("expected", ""))
        msg = f"{err['msg']}{_did_you_mean(err.get('input'), expected)}"
    else:
        msg = err["msg"].removeprefix("Value error, ")
    more = f" (and {len(errs) - 1} more)" if len(errs) > 1 else ""
    where = f"{source.at(loc)}: " if source else ""
    return f"{where}{_dotted(loc) or 'recipe'}: {msg}{more}"


def _key_lines(node: yaml.Node, path: tuple, lines: dict[tuple, int], file: str) -> None:
    """The 1-based line of every key and list item under ``node``; a repeated key is an error (YAML would keep
    the last one silently)."""
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if not isinstance(k, yaml.ScalarNode):
                continue  # a complex key: the loader refuses it below
            key = (path + (k.value,))
            if key in lines:
                raise MoeqError(f"{file}:{k.start_mark.line + 1}: {_dotted(key)}: repeated key (first on line "
                                f"{lines[key]})")
            lines[key] = k.start_mark.line + 1
            _key_lines(v, key, lines, file)
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[path + (i,)] = v.start_mark.line + 1
            _key_lines(v, path + (i,), lines, file)


def load_recipe(path: str | Path) -> Recipe:
    """A recipe file, validated; errors name ``file:line``, the field and the closest allowed name."""
    p = Path(path)
    if not p.is_file():
        raise MoeqError(f"recipe {p}: no such file")
    text = p.read_text()
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark is not None else str(p)
        raise MoeqError(f"{where}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]})") \
            from None
    if not isinstance(data, dict):
        raise MoeqError(f"recipe {p}: expected a mapping at the top level")
    lines: dict[tuple, int] = {(): 1 if node is None else node.start_mark.line + 1}
    if node is not None:
        _key_lines(node, (), lines, str(p))
    source = YamlSource(str(p), lines)
    try:
        return Recipe(**data).with_source(source)
    except ValidationError as e:
        raise MoeqError(_explain(e, Recipe, (), source)) from None
