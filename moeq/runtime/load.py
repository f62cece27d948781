"""Loading an artifact: the model skeleton from its config, kept tensors in the compute dtype, and each packed
entry as the runtime module of its codec (one decoder layer's shard at a time), optionally placed with
accelerate's disk offload for artifacts larger than memory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from moeq.errors import ArtifactError, MoeqError
from moeq.formats.container import ArtifactReader
from moeq.formats.manifest import MANIFEST
from moeq.models.adapter import install_packed
from moeq.models.offload import Offload
from moeq.progress import Reporter
from moeq.registry import load_builtins
from moeq.runtime.build import packed_modules


def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


def recorded_dtype(config) -> torch.dtype | None:
    """The dtype a checkpoint records (transformers' ``dtype``, formerly ``torch_dtype``), from a config object
    or its dict; None when absent or not a floating-point dtype."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    d = get("dtype") or get("torch_dtype")
    if isinstance(d, str):
        d = DTYPES.get(d.removeprefix("torch."))
    return d if isinstance(d, torch.dtype) and d.is_floating_point else None


def compute_dtype(dtype: str | torch.dtype | None, recorded: torch.dtype | None = None) -> torch.dtype | None:
    """The compute dtype a request names: ``auto`` = the checkpoint's recorded dtype, bfloat16 where that is
    float32 or unrecorded (the 16-bit kernels are the fast ones); ``bf16``/``fp16``/``fp32``; a torch dtype; None
    keeps every tensor's stored dtype."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        return recorded if recorded in (torch.bfloat16, torch.float16) else torch.bfloat16
    if dtype not in DTYPES:
        raise MoeqError(f"unknown dtype {dtype!r} (auto | bf16 | fp16 | fp32)")
    return DTYPES[dtype]


def load(path: str | Path, reporter: Reporter = Reporter(), dtype: str | torch.dtype | None = torch.float32,
         max_memory: int | None = None, offload_dir: str | Path | None = None):
    """Load a packed artifact: (model executing packed weights, tokenizer, ArtifactReader). ``dtype`` is the
    compute dtype (see ``compute_dtype``; ``"auto"`` reads the artifact's config): kept floating-point tensors
    (embeddings, norms, routers) are stored in it, so activations and the packed kernels run in it; None keeps the
    stored dtypes.

    ``max_memory`` (bytes) places the model with accelerate for artifacts larger than memory: embeddings, head and
    the first decoder layers that fit stay in RAM, the rest is decoded once, one layer at a time, into
    ``offload_dir`` (a temp dir by default, removed with the model) and each offloaded layer is read back from
    disk for its forward (``accelerate.dispatch_model``, disk offload)."""
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoTokenizer

    from moeq.models.stream import build_empty, set_alias

    load_builtins()
    reader = ArtifactReader(path)
    cfg_path = Path(path) / "config.json"
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ArtifactError(f"{cfg_path}: missing or not valid JSON") from None
    qc = cfg.pop("quantization_config", None) or {}
    if qc.get("quant_method") != "moeq":
        raise ArtifactError(f"{path}: config.json has no moeq quantization_config")
    model_type = cfg.pop("model_type", None)
    dtype = compute_dtype(dtype, recorded_dtype(cfg))
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: unsupported model type {model_type!r} ({e})") from None
    model = build_empty(config)
    off = Offload(model, _artifact_sizes(reader, dtype), max_memory, offload_dir) if max_memory is not None else None
    shards = reader.manifest.get("shards") or sorted({e["shard"] for e in (*reader.tensors.values(), *reader.kept.values())})
    label = f"load ({len(off.disk)} layers offloaded to disk)" if off and off.disk else "load"
    with reporter.task(label, len(shards)) as task:
        for shard in shards:  # one group (embeddings / a decoder layer / head) at a time
            kept = [n for n, e in reader.kept.items() if e["shard"] == shard]
            for name in kept:
                t = reader.read_kept(name)
                t = t.to(dtype) if dtype and t.is_floating_point() else t
                set_module_tensor_to_device(model, name, "cpu", value=t, dtype=t.dtype)  # no cast back to the skeleton's
            modules = packed_modules(reader, shard=shard)
            try:
                install_packed(model, modules)
            except (AttributeError, ValueError) as err:
                raise ArtifactError(f"{path}: packed tensors do not fit the model ({err})") from None
            reader.close()
            if off is not None:
                off.offload_if_disk([t.module for t in modules] + [n.rpartition(".")[0] for n in kept])
            task.advance(1)
        for alias, name in reader.manifest.get("tied", {}).items():
            set_alias(model, alias, name)
    offloaded = set(off.index) if off is not None else set()
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers())
               if p.device.type == "meta" and n not in offloaded]
    if missing:
        raise ArtifactError(f"{path}: artifact lacks {len(missing)} tensors, e.g. {missing[0]}")
    if off is not None:
        off.dispatch()
    if dtype is not None:
        model.config.dtype = dtype  # what generate() and the KV cache read
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path)) if (Path(path) / "tokenizer_config.json").is_file() else None
    return model, tok, reader


def _artifact_sizes(reader: ArtifactReader, dtype):
    """(owning module, in-memory bytes) of every tensor of an artifact: packed as stored, kept in ``dtype``."""
    for e in reader.tensors.values():
        yield e["module"], e["bytes"]
    for name, e in reader.kept.items():
        stored = getattr(torch, e["dtype"])
        scale = torch.finfo(dtype).bits / torch.finfo(stored).bits if dtype and stored.is_floating_point else 1
        yield name.rpartition(".")[0], int(e["bytes"] * scale)


def resolve_dtype(spec: str | None, dtype: str | torch.dtype | None) -> torch.dtype | None:
    """The compute dtype ``load_any(spec, dtype=dtype)`` will use, read from the artifact's or model's config
    without loading weights (``auto`` needs the recorded dtype)."""
    if dtype != "auto":
        return compute_dtype(dtype)
    if spec is not None and is_artifact(spec):
        try:
            cfg = json.loads((Path(spec) / "config.json").read_text())
        except (OSError, json.JSONDecodeError):
            raise ArtifactError(f"{Path(spec) / 'config.json'}: missing or not valid JSON") from None
        return compute_dtype(dtype, recorded_dtype(cfg))
    from moeq.models.loader import load_config, resolve
    return compute_dtype(dtype, recorded_dtype(load_config(resolve(spec))))


def load_any(spec: str | None, reporter: Reporter = Reporter(), max_memory: int | None = None,
             dtype: str | torch.dtype | None = torch.float32):
    """An artifact directory or any model spec the loader understands: (model, tokenizer, manifest|None), computing
    in ``dtype`` (see ``compute_dtype``; the model's dtype is ``model.dtype``). ``max_memory`` (bytes): place it
    with accelerate, offloading to disk what does not fit."""
    if spec is not None and is_artifact(spec):
        model, tok, reader = load(spec, reporter, dtype=dtype, max_memory=max_memory)
        return model, tok, reader.manifest
    from moeq.models.loader import load_model
    dtype = resolve_dtype(spec, dtype)
    with reporter.task(f"load {spec or 'default model'}", None):
        model, tok, _ = load_model(spec, dtype=compute_dtype(dtype), max_memory=max_memory)
    return model, tok, None
