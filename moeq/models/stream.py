"""Reading a model one decoder layer at a time, straight from its safetensors shards.

The model is built on the meta device (parameters only; buffers such as RoPE tables are real), and each
group of parameters (the embeddings and head, then one decoder layer at a time) is materialized from lazy
``safe_open`` reads just before it is processed and released right after. Checkpoints in the published
per-expert layout (Mixtral's ``block_sparse_moe.experts.{e}.w1/w2/w3``, Qwen/DeepSeek's
``mlp.experts.{e}.gate_proj/up_proj/down_proj``) are mapped onto transformers 5.x's fused 3-D expert
parameters the same way transformers does on load.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open

from moeq.errors import ModelLoadError

# checkpoint spelling -> model spelling (transformers' own renames for these families)
RENAMES = ((".block_sparse_moe.", ".mlp."),)
# safetensors dtype names
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# fused model parameter -> per-expert checkpoint tensors concatenated along the output dim, per layout
FUSED_SOURCES = {
    "gate_up_proj": (("w1", "w3"), ("gate_proj", "up_proj")),
    "up_proj": (("w3",), ("up_proj",)),
    "down_proj": (("w2",), ("down_proj",)),
}


class CheckpointReader:
    """Lazy tensor access to a safetensors checkpoint (one file or an indexed set of shards)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / "model.safetensors.index.json"
        self.key_file: dict[str, Path] = {}
        if index.is_file():
            for k, f in json.loads(index.read_text())["weight_map"].items():
                self.key_file[k] = self.path / f
        else:
            for f in sorted(self.path.glob("*.safetensors")):
                with safe_open(str(f), framework="pt") as h:
                    self.key_file.update({k: f for k in h.keys()})
        if not self.key_file:
            raise ModelLoadError(f"{self.path}: no safetensors weights found")
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0
        self.dtypes: dict[str, torch.dtype] = {}  # checkpoint dtype of each model tensor read (kept tensors keep it)

    def _handle(self, key: str):
        f = self.key_file[key]
        h = self._handles.get(f)
        if h is None:
            try:
                h = self._handles[f] = safe_open(str(f), framework="pt")
            except Exception as e:  # safetensors' own error types
                raise ModelLoadError(f"{f}: unreadable shard ({str(e).splitlines()[0][:120]})") from None
        return h

    def _get(self, key: str) -> torch.Tensor:
        t = self._handle(key).get_tensor(key)
        self.bytes_read += t.numel() * t.element_size()
        return t

    def _meta(self, key: str) -> tuple[list[int], torch.dtype]:
        s = self._handle(key).get_slice(key)
        return s.get_shape(), _ST_DTYPES[s.get_dtype()]

    def close(self) -> None:
        """Unmap the shards read so far (their touched pages would otherwise count towards the resident set)."""
        self._handles.clear()

    def _spellings(self, name: str) -> list[str]:
        out = [name]
        for ckpt, model in RENAMES:
            if model in name:
                out.append(name.replace(model, ckpt))
        return out

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The model parameter ``name`` assembled from the checkpoint (floating point cast to ``dtype``; None keeps
        the checkpoint's), or None if the checkpoint lacks it. The shards' pages are unmapped afterwards."""
        try:
            t = self._assemble(name, dtype)
        finally:
            self.close()
        return t

    def _assemble(self, name: str, dtype: torch.dtype | None) -> torch.Tensor | None:
        for k in self._spellings(name):
            if k in self.key_file:
                t = self._get(k)
                self.dtypes[name] = t.dtype
                return t.to(dtype) if dtype is not None and t.is_floating_point() else t
        base, _, param = name.rpartition(".")
        if param in FUSED_SOURCES and base.endswith("experts"):
            for b in self._spellings(base):
                for layout in FUSED_SOURCES[param]:
                    if f"{b}.0.{layout[0]}.weight" in self.key_file:
                        return self._fuse(name, b, layout, dtype)
        return None

    def _fuse(self, name: str, base: str, layout: tuple[str, ...], dtype: torch.dtype | None) -> torch.Tensor:
        """Per-expert [out_p, in] tensors -> one [E, sum(out_p), in] tensor, written in place expert by expert
        (no stacked or concatenated temporaries: the fused tensor is the only full-size allocation)."""
        n = self._count(f"{base}.", layout[0])
        shapes = [self._meta(f"{base}.0.{p}.weight") for p in layout]
        src_dtype = shapes[0][1]
        rows = [s[0][0] for s in shapes]
        out = torch.empty(n, sum(rows), shapes[0][0][1], dtype=dtype or src_dtype)
        for e in range(n):
            r = 0
            for p, k in zip(layout, rows):
                out[e, r:r + k].copy_(self._get(f"{base}.{e}.{p}.weight"))
                r += k
        self.dtypes[name] = src_dtype
        return out

    def _count(self, prefix: str, p: str) -> int:
        n = 0
        while f"{prefix}{n}.{p}.weight" in self.key_file:
            n += 1
        return n


def build_empty(config):
    """The model skeleton on the meta device (buffers real), for causal LMs and seq2seq models alike."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    with init_empty_weights(include_buffers=False):
        if getattr(config, "is_encoder_decoder", False) and type(config) not in AutoModelForCausalLM._model_mapping:
            return AutoModelForSeq2SeqLM.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def materialize(model, names: list[str], reader: CheckpointReader, dtype: torch.dtype | None = torch.float32) -> None:
    """Load the meta parameters ``names`` from the checkpoint (floating point cast to ``dtype``; None keeps the
    checkpoint dtype, which halves a bf16 layer's memory where nothing computes with it). Tied parameters (one object
    under two names, e.g. lm_head.weight and embed_tokens.weight) are read once and stay tied."""
    from accelerate.utils import set_module_tensor_to_device
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases = []
    for name in names:
        if id(sd[name]) in first:
            aliases.append((name, first[id(sd[name])]))
            continue
        first[id(sd[name])] = name
        t = reader.tensor(name, dtype)
        if t is None:
            src = _tied_input_embedding(model, name)
            if src is None:
                raise ModelLoadError(f"{reader.path}: checkpoint lacks {name}")
            if src in names:
                aliases.append((name, src))
                continue
            t = reader.tensor(src, dtype)  # the tied embedding is not in this group (already released): a copy
            if t is None:
                raise ModelLoadError(f"{reader.path}: checkpoint lacks {name} and {src}")
        set_module_tensor_to_device(model, name, "cpu", value=t, dtype=t.dtype)  # dtype given: no cast back
        del t
    for alias, name in aliases:
        set_alias(model, alias, name)


def _tied_input_embedding(model, name: str) -> str | None:
    """For a checkpoint that omits the tied output head: the input embedding's name, else None."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return None
    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    mods = {id(m): n for n, m in model.named_modules()}
    if out is None or inp is None or name != f"{mods.get(id(out))}.weight":
        return None
    return f"{mods[id(inp)]}.weight"


def set_alias(model, alias: str, name: str) -> None:
    """Make parameter ``alias`` the very same tensor as ``name`` (weight tying)."""
    mod_path, _, attr = alias.rpartition(".")
    src_path, _, src_attr = name.rpartition(".")
    setattr(model.get_submodule(mod_path), attr, getattr(model.get_submodule(src_path), src_attr))


def release_params(model, names: list[str]) -> None:
    """Put the parameters ``names`` back on the meta device (buffers stay: e.g. RoPE tables are still needed)."""
    for name in names:
        mod_path, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_path) if mod_path else model
        p = mod._parameters.get(attr)
        if p is not None and p.device.type != "meta":
            mod._parameters[attr] = torch.nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=False)
    _trim_heap()


def release(module: torch.nn.Module) -> None:
    """Drop a processed group's tensors (float and packed) back to the meta device, and hand the freed heap
    back to the OS (glibc keeps it otherwise, and the resident set grows layer after layer)."""
    module.to("meta")
    _trim_heap()


def bound_heap(threshold: int | None = None) -> None:
    """Serve allocations of ``threshold`` bytes and more by mmap, so each freed layer-sized tensor goes back to the
    OS at once (glibc's default threshold adapts upwards to 32 MB, and freed blocks below it stay in the heap).
    Default: ``MOEQ_MMAP_THRESHOLD_MB`` (1); 0 keeps glibc's behaviour: faster calibrated runs, higher peak RSS
    (calibrated int8 of an 8-layer cut of benchmarks/scale.py's checkpoint: 42 s / 2.0 GB instead of 54 s / 1.15 GB)."""
    import ctypes
    if threshold is None:
        threshold = int(float(os.environ.get("MOEQ_MMAP_THRESHOLD_MB", "1")) * 2**20)
    if threshold <= 0:
        return
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, threshold)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _trim_heap() -> None:
    import ctypes
    import gc
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
