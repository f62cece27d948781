"""The manifest (``moeq.json``): a pydantic model, validated whenever an artifact is read, so a malformed or
hand-edited manifest is one ``ArtifactError`` naming the field, never a ``KeyError`` deep in the loader.

Per packed entry it records the resolved plan (rule, method, options, codec and codec version), where the parts
live (shard, part names, bytes, sha256), what the weight is (module, param, expert, role, shape, dtype) and what
calibration saw (routed tokens, gate-probability sum, the fallback used when no token reached it).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from moeq.errors import ArtifactError

FORMAT_VERSION = 2
MANIFEST = "moeq.json"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _plain_file(name: str) -> str:
    if not name or "/" in name or "\\" in name or name in (".", "..") or name.startswith("."):
        raise ValueError(f"{name!r} is not a plain file name inside the artifact")
    return name


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
    module: str
    param: str
    expert: int | None = Field(None, ge=0)
    transposed: bool = False
    bias: str | None = None
    role: str
    kind: str
    shape: list[int] = Field(min_length=2, max_length=2)
    dtype: str
    bits_per_param: float = Field(ge=0)
    calib_tokens: int | None = Field(None, ge=0)
    gate_prob: float | None = None
    fallback: str | None = None
    quant_info: dict[str, Any] | None = None

    @field_validator("shape")
    @classmethod
    def _positive(cls, v):
        if any(d < 1 for d in v):
            raise ValueError(f"shape {v} has a dimension < 1")
        return v


class Kept(_Stored):
    dtype: str
    shape: list[int]


class Shared(_Stored):
    """A table fitted over many weights, stored once (``<name>.<part>``); entries reference it by name."""

    parts: list[str] = Field(min_length=1)
    meta: dict[str, Any] = Field(default_factory=dict)


class Totals(_Strict):
    quantized_params: int = Field(ge=0)
    quantized_bytes: int = Field(ge=0)
    shared_bytes: int = Field(0, ge=0)
    bits_per_param: float = Field(ge=0)
    kept_bytes: int = Field(ge=0)
    total_bytes: int = Field(ge=0)
    tensors: int = Field(ge=0)
    fallbacks: int = Field(ge=0)


class Manifest(_Strict):
    format_version: int
    tool: str
    source: dict[str, Any]
    recipe: dict[str, Any]
    calibration: dict[str, Any] | None
    totals: Totals
    shards: list[str]
    tensors: dict[str, Entry]
    kept: dict[str, Kept]
    shared: dict[str, Shared] = Field(default_factory=dict)
    tied: dict[str, str] = Field(default_factory=dict)

    @field_validator("shards")
    @classmethod
    def _in_artifact(cls, v):
        return [_plain_file(x) for x in v]


def validate_manifest(data: Any, where: str) -> dict[str, Any]:
    """``data`` checked against the schema (format version first), returned as plain dicts; else ArtifactError."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{where}: manifest is not a JSON object")
    fv = data.get("format_version")
    if fv != FORMAT_VERSION:
        raise ArtifactError(f"{where}: artifact format version {fv!r} is not supported (this moeq reads {FORMAT_VERSION})")
    try:
        return Manifest.model_validate(data).model_dump()
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ArtifactError(f"{where}: invalid manifest field {loc}: {err['msg']}") from None


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
