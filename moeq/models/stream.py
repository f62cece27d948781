"""Reading a model one decoder layer at a time, straight from its safetensors shards.

The model is built on the meta device (parameters only; buffers such as RoPE tables are real), and each
group of parameters (the embeddings and head, then one decoder layer at a time) is materialized from lazy
``safe_open`` reads just before it is processed and released right after.

Checkpoint names reach model names through transformers' own conversion mapping, the one ``from_pretrained``
applies (``transformers.conversion_mapping.get_model_conversion_mapping``): its ``WeightRenaming``s rename keys
(Mixtral's ``block_sparse_moe`` -> ``mlp``, PhiMoE's ``gate`` -> ``router``, GraniteMoE's ``input_linear`` ->
``experts.gate_up_proj``, ...) and its ``WeightConverter``s build one model tensor from many checkpoint tensors
(per-expert ``experts.{e}.w1/w3`` or ``gate_proj/up_proj`` merged into a fused ``[E, 2I, H]`` ``gate_up_proj``,
``Transpose``, ``Chunk``, ...). Keys are matched with transformers' ``rename_source_key`` once, when the reader is
opened; a group then reads only the checkpoint keys of its own tensors and runs the converters' operations.
The common expert merge (``MergeModulelist`` then ``Concatenate``) is written in place into the fused tensor,
so it is the only full-size allocation; other operation chains run transformers' own ``convert``.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from moeq.errors import ModelLoadError
from moeq.heap import empty, trim_heap

# safetensors dtype names
_ST_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
              "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
              "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass
class Source:
    """Where model tensors come from: checkpoint keys per source pattern (natural order: expert 0, 1, ...) and the
    converter that builds the tensors from them (None: a key read as it is, perhaps renamed)."""
    target: str                                   # the model name transformers files it under (a converter's first)
    converter: object | None = None               # transformers WeightConverter
    keys: dict[str, list[str]] = field(default_factory=dict)

    def targets(self) -> list[str]:
        """Every model name this source produces (several for one-to-many converters, e.g. qkv -> q, k, v)."""
        if self.converter is None or len(self.converter.target_patterns) == 1:
            return [self.target]
        first = self.converter.target_patterns[0]
        return [self.target.replace(first, t) for t in self.converter.target_patterns]


def conversion_sources(model, keys) -> dict[str, Source]:
    """Model tensor name -> its ``Source``, for checkpoint ``keys``, matched the way ``from_pretrained`` matches them
    (renamings, then at most one converter, then the base-model prefix added or stripped). Keys that fit no model
    tensor are left out, as transformers leaves them ("unexpected keys")."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, dot_natural_key, rename_source_key
    mapping = get_model_conversion_mapping(model)
    renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
    converters = [t for t in mapping if isinstance(t, WeightConverter)]
    by_pattern = {p: c for c in converters for p in c.source_patterns}
    names = dict.fromkeys(model.state_dict(keep_vars=True), True)
    prefix = model.base_model_prefix
    out: dict[str, Source] = {}
    for key in sorted(keys, key=dot_natural_key):
        name, pattern = rename_source_key(key, renamings, converters, prefix, names)
        if name not in names and key in names:  # not to be renamed after all (transformers' own fallback)
            name, pattern = rename_source_key(key, [], [], prefix, names)
        if name not in names:
            continue
        src = out.get(name)
        if src is None:
            src = Source(name, by_pattern[pattern] if pattern is not None else None)
            for t in src.targets():
                out.setdefault(t, src)
        if src.converter is None:
            src.keys.setdefault(key, [key])  # two keys for one tensor: the first wins, as in transformers
        else:
            src.keys.setdefault(pattern, []).append(key)
    return out


class CheckpointReader:
    """Lazy tensor access to a safetensors checkpoint (one file or an indexed set of shards), in the model's names.

    ``model``: the (meta-device) model the checkpoint is read into; transformers' conversion mapping is looked up
    for it. None builds a skeleton from the checkpoint's own config.json."""

    def __init__(self, path: str | Path, model=None):
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
        if model is None:
            from transformers import AutoConfig
            model = build_empty(AutoConfig.from_pretrained(str(self.path)))
        self.model = model
        self.sources = conversion_sources(model, self.key_file)
        self._handles: dict[Path, object] = {}
        self.bytes_read = 0
        self.dtypes: dict[str, torch.dtype] = {}  # checkpoint dtype of each model tensor read (kept tensors keep it)
        self._stacks: dict[tuple, list[torch.Tensor]] = {}  # _merge's [E, ...] buffers, reused once released
        self._stacks_used: set[int] = set()  # ids of the stacks the current tensors() call has handed out
        self._lock = threading.RLock()  # one group read at a time (a prefetch thread reads while the caller releases)

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
        with self._lock:
            self._handles.clear()

    def tensor(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor | None:
        """The model tensor ``name`` assembled from the checkpoint (floating point cast to ``dtype``; None keeps
        the checkpoint's), or None if the checkpoint lacks it. The shards' pages are unmapped afterwards."""
        return next(self.tensors([name], dtype))[1]

    def tensors(self, names: list[str], dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor | None]]:
        """(name, tensor or None if the checkpoint lacks it) for each of ``names``, one source at a time: a tensor
        built together with others (q, k, v chunked from one qkv) is kept until asked for within this call."""
        made: dict[str, torch.Tensor] = {}
        used: set[int] = set()  # stacks handed out by this call
        for name in names:
            if name not in made:
                src = self.sources.get(name)
                if src is None:
                    yield name, None
                    continue
                with self._lock:
                    self._stacks_used = used
                    try:
                        made.update(self._read(src, dtype))
                    finally:
                        self.close()
            yield name, made.pop(name, None)
        with self._lock:
            self._stacks_used = used
            self._drop_stale_stacks()

    def _read(self, src: Source, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
        conv = src.converter
        if conv is None:
            t = self._get(src.keys[next(iter(src.keys))][0])
            self.dtypes[src.target] = t.dtype
            return {src.target: _cast(t, dtype)}
        from transformers.core_model_loading import Concatenate, MergeModulelist
        patterns = [p for p in conv.source_patterns if p in src.keys]  # the converter's order: gate before up
        ops = list(conv.operations)
        try:
            if isinstance(ops[0], MergeModulelist) and ops[0].dim == 0 and len(conv.target_patterns) == 1:
                cat = ops[1].dim if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim > 0 else None
                if cat is not None or (len(ops) == 1 and len(patterns) == 1):
                    out = {src.target: self._merge(src, patterns, dtype, cat)}
                else:  # the stacks stand in for MergeModulelist's output; the rest is transformers' own
                    stacks = {p: [self._merge(src, [p], dtype)] for p in patterns}
                    out = self._convert(src, stacks, ops[1:])
            else:
                out = self._convert(src, {p: [_cast(self._get(k), dtype) for k in src.keys[p]] for p in patterns}, ops)
        except ModelLoadError:
            raise
        except (RuntimeError, ValueError, IndexError, KeyError) as e:
            ckpt = ", ".join(f"{len(src.keys[p])} x {src.keys[p][0]}" for p in patterns)
            raise ModelLoadError(f"{self.path}: cannot build {src.target} from {ckpt} with {conv.operations} "
                                 f"({str(e).splitlines()[0][:160]})") from None
        src_dtype = self._meta(src.keys[patterns[0]][0])[1]
        self.dtypes.update({n: src_dtype for n in out})
        return out

    def _merge(self, src: Source, patterns: list[str], dtype: torch.dtype | None,
               cat: int | None = None) -> torch.Tensor:
        """``MergeModulelist(dim=0)`` of each pattern's per-expert tensors, then ``Concatenate(dim=cat)`` of the
        stacks, written in place expert by expert into one [E, ...] tensor (no per-expert lists, stacks or
        concatenation temporaries: the result is the only full-size allocation)."""
        n = len(src.keys[patterns[0]])
        for p in patterns:
            if len(src.keys[p]) != n:
                raise ModelLoadError(f"{self.path}: {src.target}: {len(src.keys[p])} tensors match {p!r}, "
                                     f"{n} match {patterns[0]!r}")
        metas = [self._meta(src.keys[p][0]) for p in patterns]
        shape, src_dtype = list(metas[0][0]), metas[0][1]
        widths = [s[cat - 1] for s, _ in metas] if cat is not None else [None]
        if cat is not None:
            shape[cat - 1] = sum(widths)
        out = self._stack((n, *shape), dtype if dtype is not None and src_dtype.is_floating_point else src_dtype)
        for e in range(n):
            off = 0
            for p, w in zip(patterns, widths):
                dst = out[e] if cat is None else out[e].narrow(cat - 1, off, w)
                dst.copy_(self._get(src.keys[p][e]))
                off += w or 0
        return out

    def _stack(self, shape: tuple, dtype: torch.dtype) -> torch.Tensor:
        """An uninitialized [E, ...] buffer for ``_merge``: one that an earlier group filled and nothing holds any
        more (the model released that layer), else a fresh one, kept for the next group. The decoder layers of a
        model share their expert shapes, so from the second layer on no stack is allocated: fresh memory is faulted
        in and zeroed page by page on first write (a stack filled at ~2.3 GB/s on this machine, a reused one at
        ~7 GB/s). Memory: the same one layer, held from its release to the next group's read."""
        pool = self._stacks.setdefault((tuple(shape), dtype), [])
        for i in range(len(pool)):
            if id(pool[i]) not in self._stacks_used and _unheld(pool, i):
                self._stacks_used.add(id(pool[i]))
                return pool[i]
        t = empty(shape, dtype)
        pool.append(t)
        self._stacks_used.add(id(t))
        return t

    def _drop_stale_stacks(self) -> None:
        """Forget the buffers this read did not reuse that nothing else holds (shapes of an earlier kind of layer)."""
        for key, pool in list(self._stacks.items()):
            pool[:] = [t for i, t in enumerate(pool) if id(t) in self._stacks_used or not _unheld(pool, i)]
            if not pool:
                del self._stacks[key]

    def _convert(self, src: Source, collected: dict[str, list[torch.Tensor]], ops) -> dict[str, torch.Tensor]:
        """Run ``ops`` of the source's converter on ``collected`` with transformers' ``WeightConverter.convert``
        (which also expands the target patterns into full names)."""
        conv = deepcopy(src.converter)
        conv.operations = ops
        conv.collected_tensors = {p: [lambda t=t: t for t in ts] for p, ts in collected.items()}
        collected.clear()
        out = conv.convert(src.target, model=self.model, config=self.model.config)
        return {n: t[0] if isinstance(t, list) else t for n, t in out.items()}


def _unheld(pool: list[torch.Tensor], i: int) -> bool:
    """Whether ``pool[i]`` is referenced by nothing but ``pool``: no other Python name for the tensor, and no other
    tensor (a model parameter, a view, a quantizer's slice) on its storage. Where torch offers no storage use
    count, never (no reuse)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    if count is None:
        return False
    return sys.getrefcount(pool[i]) <= 2 and count(pool[i].untyped_storage()._cdata) <= 2  # + the probes' own


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def build_empty(config):
    """The model skeleton on the meta device (buffers real): the causal LM, else the seq2seq LM the config maps to."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
    with init_empty_weights(include_buffers=False):
        kind = type(config)
        if kind not in AutoModelForCausalLM._model_mapping and kind in AutoModelForSeq2SeqLM._model_mapping:
            return AutoModelForSeq2SeqLM.from_config(config)
        return AutoModelForCausalLM.from_config(config)


def materialize(model, names: list[str], reader: CheckpointReader, dtype: torch.dtype | None = torch.float32) -> None:
    """Load the meta tensors ``names`` (one group) from the checkpoint (floating point cast to ``dtype``; None keeps
    the checkpoint dtype, which halves a bf16 layer's memory where nothing computes with it). Tied parameters (one
    object under two names, e.g. lm_head.weight and embed_tokens.weight) are read once and stay tied; a tied tensor
    the checkpoint omits (the output head, usually) is read from the tensor it is tied to."""
    from accelerate.utils import set_module_tensor_to_device
    sd = model.state_dict(keep_vars=True)
    first: dict[int, str] = {}
    aliases, missing = [], []
    for name in names:
        if id(sd[name]) in first:
            aliases.append((name, first[id(sd[name])]))
        else:
            first[id(sd[name])] = name
    for name, t in reader.tensors(list(first.values()), dtype):
        if t is None:
            missing.append(name)
            continue
        _check_shape(reader, name, t, sd[name])
        set_module_tensor_to_device(model, name, "cpu", value=t, dtype=t.dtype)  # dtype given: no cast back
        del t
    for name in missing:
        src = _tied_source(model, name)
        if src is None:
            raise ModelLoadError(f"{reader.path}: checkpoint lacks {name} (no checkpoint key maps to it through "
                                 f"transformers' conversion mapping for {type(model).__name__})")
        if src in names:
            aliases.append((name, src))
            continue
        t = reader.tensor(src, dtype)  # the tied tensor is not in this group (already released): a copy
        if t is None:
            raise ModelLoadError(f"{reader.path}: checkpoint lacks {name} and {src}, to which it is tied")
        _check_shape(reader, name, t, sd[name])
        set_module_tensor_to_device(model, name, "cpu", value=t, dtype=t.dtype)
        del t
    for alias, name in aliases:
        set_alias(model, alias, name)


def _check_shape(reader: CheckpointReader, name: str, t: torch.Tensor, expected: torch.Tensor) -> None:
    if tuple(t.shape) != tuple(expected.shape):
        raise ModelLoadError(f"{reader.path}: {name} has shape {list(t.shape)} in the checkpoint, the model "
                             f"(config.json) expects {list(expected.shape)}")


def _tied_source(model, name: str) -> str | None:
    """The tensor ``name`` is tied to (transformers' ``all_tied_weights_keys``; else the input embedding, for a
    tied output head), or None."""
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    if name in tied:
        return tied[name]
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
    trim_heap()


def release(module: torch.nn.Module) -> None:
    """Drop a processed group's tensors (float and packed) back to the meta device, and hand the freed heap
    back to the OS (glibc keeps it otherwise, and the resident set grows layer after layer)."""
    module.to("meta")
    trim_heap()
