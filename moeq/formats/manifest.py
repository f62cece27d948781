"""The manifest (``moeq.json``): a pydantic model, validated whenever an artifact is read, so a malformed or
hand-edited manifest is one ``ArtifactError`` naming the field, never a ``KeyError`` deep in the loader.

Per packed entry it records the resolved plan (rule, method, options, codec and codec version), where the parts
live (shard, part names, bytes, sha256), what the weight is (module, param, expert, role, shape, dtype) and what
calibration saw (routed tokens, gate-probability sum, the fallback used when no token reached it).
"""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moeq.errors import ArtifactError

FORMAT_VERSION = 2
MANIFEST = "moeq.json"
MAX_MANIFEST_BYTES = 256 * 2**20  # a manifest is ~300 bytes per entry: room for ~800k entries
# the dtypes a stored tensor may have (torch's names)
DTYPES = {"float64": 8, "float32": 4, "float16": 2, "bfloat16": 2, "int64": 8, "int32": 4, "int16": 2, "int8": 1,
          "uint8": 1, "uint16": 2, "bool": 1, "float8_e4m3fn": 1, "float8_e5m2": 1}  # name -> bytes per element
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_PART = re.compile(r"^[A-Za-z0-9_]{1,64}$")


class _Strict(BaseModel):
    """Exact JSON types (no "3" for 3, no true for 1), finite floats, no unknown keys."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def _plain_file(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{name!r} is not a plain file name inside the artifact")
    return name


_SHA = re.compile(r"^[0-9a-f]{64}$")


def _part_names(v: list[str]) -> list[str]:
    for p in v:
        if not _PART.match(p):
            raise ValueError(f"part name {p!r} is not [A-Za-z0-9_]{{1,64}}")
    if len(set(v)) != len(v):
        raise ValueError(f"part names repeat: {v}")
    return v


class _Stored(_Strict):
    shard: str
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")

    @field_validator("shard")
    @classmethod
    def _in_artifact(cls, v):
        return _plain_file(v)


class Entry(_Stored):
    """One packed 2-D weight (an expert's slice of a fused tensor is its own entry)."""

    rule: int = Field(ge=0)
    method: str
    options: dict[str, Any]
    codec: str
    codec_version: int
    parts: list[str] = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)
    shared: list[str] = Field(default_factory=list)
    module: str = Field(min_length=1)
    param: str = Field(min_length=1)
    expert: int | None = Field(None, ge=0)
    transposed: bool = False
    bias: str | None = None
    role: str
    kind: str
    shape: list[int] = Field(min_length=2, max_length=2)
    dtype: str
    bits_per_param: float = Field(ge=0)
    calib_tokens: int | None = Field(None, ge=0)
    gate_prob: float | None = Field(None, ge=0)
    gate_sq: float | None = Field(None, ge=0)
    fallback: str | None = None
    quant_info: dict[str, Any] | None = None
    # nested-precision codecs (bitplanes): one sha256 per part, so a load at fewer bits verifies what it reads
    part_sha256: dict[str, str] | None = None

    @model_validator(mode="after")
    def _part_hashes(self):
        ph = self.part_sha256
        if ph is not None and (sorted(ph) != sorted(self.parts) or not all(_SHA.match(v) for v in ph.values())):
            raise ValueError("part_sha256 must hold one sha256 hex digest per part of the entry")
        return self

    @field_validator("shape")
    @classmethod
    def _positive(cls, v):
        if any(d < 1 or d > 2**31 for d in v):
            raise ValueError(f"shape {v} has a dimension < 1 or > 2^31")
        return v

    @field_validator("parts")
    @classmethod
    def _parts(cls, v):
        return _part_names(v)

    @field_validator("role")
    @classmethod
    def _role(cls, v):
        from moeq.recipes import KINDS
        if v not in KINDS:
            raise ValueError(f"role {v!r} is not one of {', '.join(KINDS)}")
        return v

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        if v not in DTYPES:
            raise ValueError(f"dtype {v!r} is not one of {', '.join(DTYPES)}")
        return v


class Kept(_Stored):
    dtype: str
    shape: list[int] = Field(max_length=8)

    @field_validator("dtype")
    @classmethod
    def _dtype(cls, v):
        return Entry._dtype(v)

    @field_validator("shape")
    @classmethod
    def _shape(cls, v):
        if any(d < 0 or d > 2**40 for d in v):
            raise ValueError(f"shape {v} has a dimension < 0 or > 2^40")
        return v


class Shared(_Stored):
    """A table fitted over many weights, stored once (``<name>.<part>``); entries reference it by name."""

    parts: list[str] = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)

    @field_validator("parts")
    @classmethod
    def _parts(cls, v):
        return _part_names(v)


class Totals(_Strict):
    quantized_params: int = Field(ge=0)
    quantized_bytes: int = Field(ge=0)
    shared_bytes: int = Field(0, ge=0)
    bits_per_param: float = Field(ge=0)
    kept_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    tensors: int = Field(ge=0)
    fallbacks: int = Field(ge=0)


class Source(_Strict):
    model: str | None


class CalibrationRecord(_Strict):
    """What the calibration was (the recipe's ``calibration`` + what was drawn)."""

    source: str
    samples: int = Field(ge=1)
    seqlen: int = Field(ge=1)
    seed: int
    device: str
    max_stats_mb: float = Field(gt=0)
    tokens: int = Field(ge=0)
    split: str
    layer_inputs: str


class AllocationUnit(_Strict):
    """One expert of one layer (all its nested entries) and the width the allocation gave it."""

    layer: int | None = Field(None, ge=0)
    module: str = Field(min_length=1)            # the experts module (``model.layers.3.mlp.experts``)
    expert: int = Field(ge=0)
    bits: int = Field(ge=1, le=32)
    bytes: int = Field(ge=0)                     # its entries at ``bits``: code planes + scales/offsets
    weights: int = Field(ge=0)
    error: float = Field(ge=0)                   # estimated error at ``bits`` (see ``moeq.pipeline.extract``)
    tokens: float | None = Field(None, ge=0)     # its routed calibration tokens; None: data-free, unweighted
    weight: float | None = Field(None, ge=0)     # its error's weight: sum of their squared gate probabilities
    entries: list[str] = Field(min_length=1)


class UniformRecord(_Strict):
    """The same width for every expert, for comparison (the pinned entries as in the allocation)."""

    bits: int = Field(ge=1, le=32)
    bytes: int = Field(ge=0)
    error: float = Field(ge=0)


class AllocationRecord(_Strict):
    """How ``moeq extract --budget`` chose a width per expert (written by ``moeq.pipeline.extract``)."""

    solver: str
    status: str
    budget: str                                  # as the user wrote it (``3``, ``750MB``)
    budget_bytes: int = Field(ge=0)
    chosen_bytes: int = Field(ge=0)              # every unit and pinned entry at its width
    error: float = Field(ge=0)                   # total estimated error of the experts
    metric: str                                  # out_err's metric: output | weight_mse | mixed
    data_free: bool                              # no routed-token counts: the allocation is hotness-blind
    pinned: dict[str, int]                       # non-expert nested entry -> its width
    units: dict[str, AllocationUnit]
    uniform: UniformRecord | None = None


class Checksums(_Strict):
    """sha256 of the manifest itself (its canonical JSON without this field: every entry's meta, options and
    fields the part hashes do not cover) and of config.json's bytes (None: written without one)."""

    manifest: str = Field(pattern=r"^[0-9a-f]{64}$")
    config: str | None = Field(None, pattern=r"^[0-9a-f]{64}$")


class Manifest(_Strict):
    format_version: int
    tool: str
    source: Source
    recipe: dict[str, Any]
    calibration: CalibrationRecord | None
    totals: Totals
    shards: list[str] = Field(min_length=1)
    tensors: dict[str, Entry]
    kept: dict[str, Kept]
    shared: dict[str, Shared] = Field(default_factory=dict)
    tied: dict[str, str] = Field(default_factory=dict)
    checksums: Checksums | None = None           # absent in artifacts written before moeq 0.1 stop 18
    allocation: AllocationRecord | None = None   # only in artifacts written by ``moeq extract --budget``

    @field_validator("shards")
    @classmethod
    def _in_artifact(cls, v):
        if len(set(v)) != len(v):
            raise ValueError("shard names repeat")
        return [_plain_file(x) for x in v]


def _no_control(x: Any, path: str) -> None:
    """No control characters anywhere (keys or values): names end up in terminals and error lines."""
    if isinstance(x, str):
        if _CONTROL.search(x):
            raise ArtifactError(f"{path}: contains a control character")
    elif isinstance(x, dict):
        for k, v in x.items():
            _no_control(k, f"{path} (a key)")
            _no_control(v, f"{path}.{k}")
    elif isinstance(x, list):
        for i, v in enumerate(x):
            _no_control(v, f"{path}[{i}]")


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against the schema (format version first), then against itself (rules, codecs and
    methods known to this moeq, shards listed, shared tables present, tensor keys unique, totals adding up);
    returned as plain dicts, else one ArtifactError naming ``where`` and the field."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: manifest is not a JSON object")
    fv = data.get("format_version")
    if fv != FORMAT_VERSION or isinstance(fv, bool):
        raise ArtifactError(f"{where}: artifact format version {fv!r} is not supported "
                            f"(this moeq reads {FORMAT_VERSION})")
    _no_control(data, where)
    try:
        m = Manifest.model_validate(data).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ArtifactError(f"{where}: invalid manifest field {loc}: {err['msg']}") from None
    _check_recipe(m, where)
    _check_references(m, where)
    return m


def _check_recipe(m: dict[str, Any], where: str) -> None:
    from moeq.recipes import Recipe
    try:
        recipe = Recipe.model_validate(m["recipe"])
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ArtifactError(f"{where}: invalid manifest field recipe.{loc}: {err['msg']}") from None
    if not recipe.rules and m["tensors"]:
        raise ArtifactError(f"{where}: invalid manifest field recipe.rules: empty, but the artifact holds "
                            "packed entries")
    m["recipe"] = recipe.model_dump(exclude={"method", "options", "include_lm_head"})


def _check_references(m: dict[str, Any], where: str) -> None:
    from moeq.registry import CODECS, QUANTIZERS, load_builtins
    load_builtins()
    shards = set(m["shards"])
    rules = m["recipe"]["rules"]
    keys: dict[str, str] = {}

    def key(k: str, owner: str) -> None:
        if k in keys:
            raise ArtifactError(f"{where}: {owner} and {keys[k]} both store tensor {k!r}")
        keys[k] = owner

    for section in ("tensors", "kept", "shared"):
        for name, e in m[section].items():
            field = f"{section}.{name}"
            if not name or _CONTROL.search(name):
                raise ArtifactError(f"{where}: invalid manifest field {section}: bad name {name!r}")
            if e["shard"] not in shards:
                raise ArtifactError(f"{where}: invalid manifest field {field}.shard: {e['shard']!r} is not in shards")
            for part in e.get("parts", [None]):
                key(name if part is None else f"{name}.{part}", field)
    for name, e in m["tensors"].items():
        field = f"tensors.{name}"
        if e["codec"] not in CODECS:
            raise ArtifactError(f"{where}: {field}.codec: unknown codec {e['codec']!r} (known: {', '.join(CODECS)}); "
                                "written by a newer or different moeq?")
        readable = CODECS.get(e["codec"]).readable_versions
        if e["codec_version"] not in readable:
            raise ArtifactError(f"{where}: {field}.codec_version: codec {e['codec']} version {e['codec_version']!r} "
                                f"is not supported (this moeq reads {', '.join(map(str, readable))})")
        if e["method"] not in QUANTIZERS:
            raise ArtifactError(f"{where}: {field}.method: unknown method {e['method']!r} "
                                f"(known: {', '.join(QUANTIZERS)})")
        if e["rule"] >= len(rules):
            raise ArtifactError(f"{where}: {field}.rule: {e['rule']} but the recipe has {len(rules)} rules")
        for s in e["shared"]:
            if s not in m["shared"]:
                raise ArtifactError(f"{where}: {field}.shared: table {s!r} is not in the manifest's shared tables")
        n = math.prod(e["shape"])
        if abs(e["bits_per_param"] - 8 * e["bytes"] / n) > 1e-3:
            raise ArtifactError(f"{where}: {field}.bits_per_param: {e['bits_per_param']} but bytes/shape give "
                                f"{8 * e['bytes'] / n:.4f}")
    for name, e in m["kept"].items():
        want = math.prod(e["shape"]) * DTYPES[e["dtype"]]
        if e["bytes"] != want:
            raise ArtifactError(f"{where}: kept.{name}.bytes: {e['bytes']} but dtype and shape give {want}")
    want = totals(m["tensors"], m["kept"], m["shared"])
    for k, v in want.items():
        got = m["totals"][k]
        if (abs(got - v) > 1e-3) if isinstance(v, float) else got != v:
            raise ArtifactError(f"{where}: totals.{k}: {got} but the entries add up to {v}")


def totals(entries: dict[str, dict], kept: dict[str, dict], shared: dict[str, dict]) -> dict[str, Any]:
    """Sizes of an artifact. Shared tables count towards the quantized bytes (they are part of the code)."""
    import math
    n_q = sum(math.prod(e["shape"]) for e in entries.values())
    b_s = sum(e["bytes"] for e in shared.values())
    b_q = sum(e["bytes"] for e in entries.values()) + b_s
    b_k = sum(e["bytes"] for e in kept.values())
    return {"quantized_params": n_q, "quantized_bytes": b_q, "shared_bytes": b_s,
            "bits_per_param": round(8 * b_q / max(n_q, 1), 4), "kept_bytes": b_k, "total_bytes": b_q + b_k,
            "tensors": len(entries), "fallbacks": sum(1 for e in entries.values() if e.get("fallback"))}
