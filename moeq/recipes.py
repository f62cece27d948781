"""Recipe schema (pydantic, extra="forbid": a typo is an error) and the YAML loader."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moeq.errors import MoeqError


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Calibration(Strict):
    source: str = Field("wiki", description="'wiki' (embedded, calibration split), a text file, or hf:NAME")
    samples: int = Field(32, ge=1)
    seqlen: int = Field(512, ge=8)
    seed: int = 0


class EvalSpec(Strict):
    corpus: str = "wiki"
    protocol: str = "gptq"
    seqlen: int = Field(512, ge=8)
    windows: int | None = Field(64, ge=1)
    batch_size: int = Field(8, ge=1)


class Recipe(Strict):
    model: str | None = None
    method: str = "int8"
    options: dict[str, Any] = Field(default_factory=dict)
    include_lm_head: bool = False
    calibration: Calibration = Field(default_factory=Calibration)
    eval: EvalSpec | None = None

    def method_config(self):
        """The method's typed options (validated: unknown keys and bad values are errors)."""
        from moeq.registry import QUANTIZERS, load_builtins
        load_builtins()
        try:
            q = QUANTIZERS.get(self.method)
        except KeyError as e:
            raise MoeqError(str(e.args[0])) from None
        try:
            return q(), q.Config(**self.options)
        except ValidationError as e:
            raise MoeqError(f"method {self.method}: {_one_line(e)}") from None


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
