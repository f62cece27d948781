"""An artifact's ``config.json``, read as untrusted input: a JSON object of bounded size, a moeq
``quantization_config``, a ``model_type`` transformers knows, values of the types its config class declares, sizes
within bounds; then the model skeleton it builds (on the meta device) against the manifest: every packed entry and
kept tensor names a weight of that model with the same shape (and expert, layout, bias), and every weight of the
model is stored. Nothing is read from the shards before this passes, and no code named by the artifact is run
(``auto_map`` is ignored: the config class is transformers' own for ``model_type``)."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from moeq.errors import ArtifactError

CONFIG = "config.json"
MAX_CONFIG_BYTES = 16 * 2**20
MAX_INT = 2**40
# counts of modules the skeleton builds one by one: bounded before anything is built
# sizes whose 0 or negative value some forward divides or masks by (None, where allowed, means "not used")
_POSITIVE = ("sliding_window", "max_position_embeddings", "head_dim", "num_attention_heads", "num_key_value_heads",
             "hidden_size", "intermediate_size", "moe_intermediate_size", "vocab_size", "attention_chunk_size")
_TOPK = ("num_experts_per_tok", "moe_topk", "top_k", "num_selected_experts")
_EXPERTS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
# how the model is run is moeq's choice, not the artifact's: these flags change what a forward returns
RUNTIME_FLAGS = {"return_dict": True, "output_attentions": False, "output_hidden_states": False, "torchscript": False}
_COUNT = re.compile(r"^(num|n)_.*(layers|experts)$|^(num_hidden_layers|num_layers|n_layer|num_decoder_layers)$")


def read_config(root: Path) -> tuple[str, dict[str, Any]]:
    """``(model_type, config dict without model_type, quantization_config and auto_map)``, validated on its own
    (see the module docstring); ``ArtifactError`` naming the file and the field otherwise."""
    from moeq.formats.container import read_json
    path = root / CONFIG
    cfg = read_json(root, CONFIG, "config", MAX_CONFIG_BYTES)
    if not isinstance(cfg, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    qc = cfg.pop("quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "moeq":
        raise ArtifactError(f"{path}: quantization_config: not a moeq one (quant_method 'moeq' expected)")
    cfg.pop("auto_map", None)  # code a hub repo would run: never used (the class comes from model_type)
    model_type = cfg.pop("model_type", None)
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    if not isinstance(model_type, str) or model_type not in CONFIG_MAPPING:
        raise ArtifactError(f"{path}: model_type: {model_type!r} is not a model type this transformers knows")
    defaults = CONFIG_MAPPING[model_type]().to_dict()
    for key, value in cfg.items():
        if key == "sliding_window" and cfg.get("use_sliding_window") is False and value == 0:
            continue  # Qwen2-MoE style: the window is off, its 0 never reaches a mask
        _check_value(path, key, value, defaults.get(key))
    topk = next((k for k in _TOPK if isinstance(cfg.get(k), int)), None)
    experts = next((k for k in _EXPERTS if isinstance(cfg.get(k), int)), None)
    if topk and experts and not 1 <= cfg[topk] <= cfg[experts]:
        raise ArtifactError(f"{path}: {topk}: {cfg[topk]} experts per token, but {experts} is {cfg[experts]} "
                            f"(1..{cfg[experts]} expected)")
    return model_type, cfg


def _check_value(path: Path, key: str, value: Any, default: Any) -> None:
    def bad(what: str):
        raise ArtifactError(f"{path}: {key}: {what} (got {_short(value)})")

    if isinstance(value, float) and not math.isfinite(value):
        bad("not a finite number")
    if isinstance(value, int) and not isinstance(value, bool):
        if abs(value) > MAX_INT:
            bad("beyond +-2^40")
        if key in _POSITIVE and value < 1:
            bad("must be at least 1")
        if _COUNT.match(key) and not 0 <= value <= 2**16:
            bad("a count of layers or experts must be 0..65536")
    if default is None:
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer()),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          list: lambda v: isinstance(v, list),
          dict: lambda v: isinstance(v, dict)}
    check = ok.get(type(default))
    if check is not None and value is not None and not check(value):
        bad(f"expected {type(default).__name__}")


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 40 else r[:37] + "..."


def build_config(root: Path, model_type: str, cfg: dict[str, Any], manifest: dict[str, Any]):
    """The transformers config object; layer counts bounded by what the manifest stores (each decoder layer
    has at least one tensor)."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig
    path = root / CONFIG
    stored = len(manifest["tensors"]) + len(manifest["kept"])
    for key, value in cfg.items():
        if _COUNT.match(key) and "layers" in key and isinstance(value, int) and value > stored:
            raise ArtifactError(f"{path}: {key}: {value} layers, but the manifest stores only {stored} tensors")
    try:
        return AutoConfig.for_model(model_type, **{**cfg, **RUNTIME_FLAGS})
    except (StrictDataclassError, ValueError, TypeError, KeyError, AttributeError) as e:  # strict: its type checks
        raise ArtifactError(f"{path}: {model_type} config refused by transformers ({_first_line(e)})") from None


def build_skeleton(root: Path, config):
    """The model on the meta device. transformers' constructors run on values from the artifact and raise what
    they raise (RuntimeError for a negative size, AssertionError for a padding index, ...): any failure here is
    the config's, reported as such."""
    from moeq.models.stream import build_empty
    try:
        return build_empty(config)
    except Exception as e:  # noqa: BLE001 - the trust boundary: an untrusted config inside third-party code
        raise ArtifactError(f"{root / CONFIG}: does not build a {config.model_type} model "
                            f"({type(e).__name__}: {_first_line(e)})") from None


def check_fits(model, manifest: dict[str, Any], where: str) -> None:
    """Every packed entry and kept tensor is a weight of ``model`` with its shape; every weight is stored."""
    import torch

    from moeq.models.adapter import find_targets
    targets = {t.name: t for t in find_targets(model)}
    state = model.state_dict(keep_vars=True)
    covered: set[str] = set()
    for name, e in manifest["tensors"].items():
        t = targets.get(name)
        field = f"{where}: tensors.{name}"
        if t is None:
            raise ArtifactError(f"{field}: the {model.config.model_type} model of config.json has no such weight")
        bias = None if t.bias is None else f"{t.module}.{t.bias}"
        for key, want in (("module", t.module), ("param", t.param), ("expert", t.expert),
                          ("transposed", t.transposed), ("shape", list(t.shape)), ("bias", bias)):
            if e[key] != want:
                raise ArtifactError(f"{field}.{key}: {_short(e[key])}, but the model of config.json has {_short(want)}")
        covered.add(f"{t.module}.{t.param}")
    for name, e in manifest["kept"].items():
        p = state.get(name)
        if p is None:
            raise ArtifactError(f"{where}: kept.{name}: the {model.config.model_type} model of config.json has no "
                                "such tensor")
        if e["shape"] != list(p.shape):
            raise ArtifactError(f"{where}: kept.{name}.shape: {e['shape']}, but the model of config.json has "
                                f"{list(p.shape)}")
        if getattr(torch, e["dtype"]).is_floating_point != p.dtype.is_floating_point:
            raise ArtifactError(f"{where}: kept.{name}.dtype: {e['dtype']}, but the model's tensor is {p.dtype}")
        covered.add(name)
    for alias, name in manifest["tied"].items():
        if alias not in state or name not in manifest["kept"] or tuple(state[alias].shape) != tuple(state[name].shape):
            raise ArtifactError(f"{where}: tied.{alias}: not a tensor of the model tied to a kept tensor of its shape")
        covered.add(alias)
    missing = [n for n in state if n not in covered]
    if missing:
        raise ArtifactError(f"{where}: the model of config.json has {len(missing)} tensors the artifact does not "
                            f"store, e.g. {missing[0]}")


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return (lines[0] if lines else type(e).__name__)[:160]
