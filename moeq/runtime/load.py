"""Loading an artifact: the model skeleton from its config, kept tensors in the compute dtype, and each packed
entry as the runtime module of its codec (one decoder layer's shard at a time), optionally placed with
accelerate's disk offload for artifacts larger than memory."""

from __future__ import annotations

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
         max_memory: int | None = None, offload_dir: str | Path | None = None, bits: int | None = None):
    """Load a packed artifact: (model executing packed weights, tokenizer, ArtifactReader). ``dtype`` is the
    compute dtype (see ``compute_dtype``; ``"auto"`` reads the artifact's config): kept floating-point tensors
    (embeddings, norms, routers) are stored in it, so activations and the packed kernels run in it; None keeps the
    stored dtypes.

    ``max_memory`` (bytes) places the model with accelerate for artifacts larger than memory: embeddings, head and
    the first decoder layers that fit stay in RAM, the rest is decoded once, one layer at a time, into
    ``offload_dir`` (a temp dir by default, removed with the model) and each offloaded layer is read back from
    disk for its forward (``accelerate.dispatch_model``, disk offload).

    ``bits`` runs the entries of nested-precision codecs (``bitplanes``) at that width, reading only its bit-planes;
    other entries load as stored. A width an entry was not fitted for, or an artifact with no nested entry, is a
    MoeqError before anything is read."""
    from accelerate.utils import set_module_tensor_to_device

    from moeq.formats.config import build_config, build_skeleton, check_fits, read_config
    from moeq.models.stream import set_alias

    load_builtins()
    reader = ArtifactReader(path)  # manifest and shard headers validated here, before any tensor is read
    if bits is not None:
        check_bits(reader, bits)
    model_type, cfg = read_config(Path(path))
    dtype = compute_dtype(dtype, recorded_dtype(cfg))
    config = build_config(Path(path), model_type, cfg, reader.manifest)
    model = build_skeleton(Path(path), config)
    check_fits(model, reader.manifest, str(Path(path) / MANIFEST))
    off = Offload(model, _artifact_sizes(reader, dtype), max_memory, offload_dir) if max_memory is not None else None
    shards = reader.manifest.get("shards") or sorted({e["shard"] for e in (*reader.tensors.values(), *reader.kept.values())})
    label = f"load {Path(path).name}" + (f" ({len(off.disk)} layers offloaded to disk)" if off and off.disk else "")
    with reporter.task(label, len(shards)) as task:
        for shard in shards:  # one group (embeddings / a decoder layer / head) at a time
            kept = [n for n, e in reader.kept.items() if e["shard"] == shard]
            for name in kept:
                t = reader.read_kept(name)
                t = t.to(dtype) if dtype and t.is_floating_point() else t
                set_module_tensor_to_device(model, name, "cpu", value=t, dtype=t.dtype)  # no cast back to the skeleton's
            modules = packed_modules(reader, shard=shard, bits=bits)
            try:
                install_packed(model, modules)
            except (AttributeError, ValueError, KeyError) as err:
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
    return model, load_tokenizer(Path(path)), reader


def check_bits(reader: ArtifactReader, bits: int) -> None:
    """MoeqError unless ``bits`` is a width every nested entry of the artifact can be read at (and one exists)."""
    from moeq.registry import CODECS
    nested = {n: e for n, e in reader.tensors.items() if getattr(CODECS.get(e["codec"]), "nested", False)}
    if not nested:
        raise MoeqError(f"{reader.path}: no entry stores nested precisions (method matryoshka); cannot load it at "
                        f"{bits} bits")
    for name, e in nested.items():
        try:
            CODECS.get(e["codec"])().parts_at(e["parts"], e.get("meta", {}), bits)
        except MoeqError as err:
            raise type(err)(f"{reader.path / MANIFEST}: tensors.{name}: {err}") from None


def load_tokenizer(path: Path):
    """The artifact's tokenizer (local files only, no code: transformers refuses ``auto_map`` without
    ``trust_remote_code``), None when it has none; a broken one is an ArtifactError."""
    from transformers import AutoTokenizer
    if not (path / "tokenizer_config.json").is_file():
        return None
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True, trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ImportError, RecursionError) as e:
        msg = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise ArtifactError(f"{path}: the tokenizer files cannot be loaded ({msg})") from None


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
        from moeq.formats.config import read_config
        return compute_dtype(dtype, recorded_dtype(read_config(Path(spec))[1]))
    from moeq.models.loader import load_config, resolve
    return compute_dtype(dtype, recorded_dtype(load_config(resolve(spec))))


def load_any(spec: str | None, reporter: Reporter = Reporter(), max_memory: int | None = None,
             dtype: str | torch.dtype | None = torch.float32, bits: int | None = None):
    """An artifact directory or any model spec the loader understands: (model, tokenizer, manifest|None), computing
    in ``dtype`` (see ``compute_dtype``; the model's dtype is ``model.dtype``). ``max_memory`` (bytes): place it
    with accelerate, offloading to disk what does not fit. ``bits``: an artifact's nested entries at that width
    (see ``load``); a MoeqError for anything but an artifact."""
    if spec is not None and is_artifact(spec):
        model, tok, reader = load(spec, reporter, dtype=dtype, max_memory=max_memory, bits=bits)
        return model, tok, reader.manifest
    if bits is not None:
        raise MoeqError(f"{spec or 'the default model'} is not a moeq artifact; only an artifact's nested "
                        f"precisions (method matryoshka) can be read at {bits} bits")
    from moeq.models.loader import load_model
    dtype = resolve_dtype(spec, dtype)
    with reporter.task(f"load {spec or 'default model'}", None):
        model, tok, _ = load_model(spec, dtype=compute_dtype(dtype), max_memory=max_memory)
    return model, tok, None


CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def model_context(spec: str | None) -> int | None:
    """The longest sequence the model ``spec`` (artifact or any model spec) was built for, from its config
    (``max_position_embeddings`` or an equivalent), without loading weights; None when the config sets none."""
    if spec is not None and is_artifact(spec):
        from moeq.formats.config import read_config
        cfg = read_config(Path(spec))[1]
    else:
        from moeq.models.loader import load_config, resolve
        cfg = load_config(resolve(spec)).to_dict()
    for key in CONTEXT_KEYS:
        v = cfg.get(key)
        if isinstance(v, int) and not isinstance(v, bool) and v > 0:
            return v
    return None
