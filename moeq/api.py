"""The Python API: ``quantize``, ``load``, ``evaluate``, ``inspect``. The CLI calls nothing else."""

from __future__ import annotations

import hashlib
import json
import math
import os
import resource
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from moeq import __version__
from moeq.errors import ArtifactError, MoeqError
from moeq.formats.container import MANIFEST, ArtifactReader, ArtifactWriter, check_output_free
from moeq.models.adapter import Target, find_targets, install_packed, target_bias, target_weight
from moeq.models.calib import StatsCollector, observing
from moeq.models.layers import capture_layer_inputs, decoder_layers, layer_of, run_layer
from moeq.models.offload import Offload
from moeq.progress import Reporter
from moeq.recipes import EvalSpec, Recipe
from moeq.registry import CODECS, QUANTIZERS, load_builtins


# ---------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------
def quantize(recipe: Recipe, out: str | Path, reporter: Reporter = Reporter()) -> dict[str, Any]:
    """Quantize ``recipe.model`` with ``recipe.method`` and write the artifact to ``out``.

    A local safetensors model is streamed: built on the meta device and read one decoder layer at a time from
    its shards. GGUF files and hub ids are loaded whole (their readers need it), then processed the same way."""
    from moeq.models.loader import load_config, load_model, load_tokenizer, resolve
    from moeq.models.stream import CheckpointReader, bound_heap, build_empty
    quantizer, cfg = recipe.method_config()
    check_output_free(Path(out))  # before any loading
    src = resolve(recipe.model)  # a bad path fails here, before any progress display
    if src.path is not None and src.gguf_file is None:
        config = load_config(src)
        model, tok = build_empty(config), load_tokenizer(src)
        reader = CheckpointReader(src.path, model)  # checkpoint names through transformers' mapping for this model
        bound_heap()
    else:
        with reporter.task("load model", None):
            model, tok, src = load_model(recipe.model)
        reader = None
    calib = calibration_ids(tok, recipe) if quantizer.needs_calibration(cfg) else None
    return quantize_model(model, out, recipe, tokenizer=tok, source=src.spec, calib_ids=calib, reporter=reporter,
                          reader=reader)


def calibration_ids(tokenizer, recipe: Recipe) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from the calibration text (seeded)."""
    from moeq.data.corpus import load_text
    c = recipe.calibration
    if tokenizer is None:
        raise MoeqError("calibration needs a tokenizer and this model has none; use a data-free mode (e.g. --weight-only)")
    text = load_text(c.source, "calib")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < c.seqlen + 1:
        raise MoeqError(f"calibration text has {ids.numel()} tokens, fewer than seqlen {c.seqlen}")
    g = torch.Generator().manual_seed(c.seed)
    starts = torch.randint(0, ids.numel() - c.seqlen, (c.samples,), generator=g)
    return torch.stack([ids[s:s + c.seqlen] for s in starts.tolist()])


@dataclass
class Group:
    """What is processed (read, quantized, written, released) together: the base (embeddings, norms, head),
    then each decoder layer, then quantized weights outside the layers (lm_head)."""
    label: str
    prefix: str | None           # module fqn of a decoder layer; None for base / head
    index: int | None            # decoder layer index
    targets: list[Target]
    tensors: list[str]           # state-dict names owned by the group (weights and kept tensors)


def plan_groups(model, targets: list[Target]) -> tuple[list[Group], tuple[str, Any] | None]:
    layers = decoder_layers(model)
    names = list(model.state_dict(keep_vars=True))
    if layers is None:
        return [Group("model", None, None, targets, names)], None
    prefix, mlist = layers
    by_layer: dict[int, list[Target]] = {i: [] for i in range(len(mlist))}
    head = []
    for t in targets:
        i = layer_of(t.module, prefix)
        (by_layer[i] if i is not None else head).append(t)
    owned = {i: [] for i in by_layer}
    base = []
    for n in names:
        i = layer_of(n.rpartition(".")[0], prefix)
        (owned[i] if i is not None else base).append(n)
    # the head's quantized weights (lm_head on request) are read, processed and released with the head group
    head_names = [n for t in head for n in (f"{t.module}.{t.param}", f"{t.module}.{t.bias}" if t.bias else None) if n]
    groups = [Group("base", None, None, [], [n for n in base if n not in head_names])]
    groups += [Group(f"layer.{i}", f"{prefix}.{i}", i, by_layer[i], owned[i]) for i in sorted(by_layer)]
    if head:
        groups.append(Group("head", None, None, head, [n for n in base if n in head_names]))
    return groups, layers


@torch.no_grad()
def quantize_model(model, out: str | Path, recipe: Recipe, tokenizer=None, source: str | None = None,
                   calib_ids: torch.Tensor | None = None, reporter: Reporter = Reporter(),
                   reader=None) -> dict[str, Any]:
    """Quantize decoder layer by decoder layer and write the artifact.

    ``reader`` None: ``model`` is in memory and is left running the packed weights. With a
    ``CheckpointReader``, ``model`` is a meta-device skeleton: each group is read from the shards, processed,
    written and released, so peak memory is one layer plus the calibration activations.
    With ``calib_ids`` every layer is calibrated on the outputs of the already-quantized layers before it.
    An interrupted run leaves its finished layers in ``.<out>.moeq-tmp``; the same command resumes there."""
    from moeq.parallel import from_env
    quantizer, cfg = recipe.method_config()
    targets = find_targets(model, recipe.include_lm_head)
    if not targets:
        raise MoeqError("no quantizable weights found in this model")
    dist = from_env()
    run = _Run(model, recipe, quantizer, cfg, targets, calib_ids, reader, reporter, dist)
    t0 = time.perf_counter()
    run_key = _run_key(recipe, cfg, source, targets, calib_ids)
    err = None
    if dist.main:
        try:
            run.writer = ArtifactWriter(Path(out), run_key)
        except MoeqError as e:
            err = str(e)
    err = dist.broadcast(err)
    if err is not None:
        raise MoeqError(err)
    if not dist.main:
        run.writer = ArtifactWriter(Path(out), run_key, join=True)
    if run.writer.resumed and dist.main:
        reporter.log(f"resuming: {len(run.writer.resumed)} finished groups found in {run.writer.tmp}")
    try:
        with reporter.task(f"quantize ({recipe.method})", len(targets)) as task:
            run.task = task
            for g in run.groups:
                run.process(g)
        dist.barrier()
        if not dist.main:
            return {"rank": dist.rank}
        writer = run.writer
        writer.refresh()
        manifest = _manifest(recipe, cfg, source, writer, calib_ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "moeq", "format_version": manifest["moeq_format"],
                                         "method": recipe.method, "options": cfg.model_dump()}
        path = writer.commit([g.label for g in run.groups], manifest, config)
    except MoeqError:
        if dist.main:
            run.writer.abort()
        raise
    return {"path": str(path), **manifest["totals"], "seconds": round(time.perf_counter() - t0, 2),
            "resumed_groups": len(writer.resumed), "workers": dist.world}


class _Run:
    """One quantization run: walks the groups, reading / calibrating / quantizing / writing / releasing each.
    With several processes, data-free runs split whole layers and calibrated runs split each layer's weights
    (rank 0 runs the forwards and merges the parts), so every process writes what one process would."""

    def __init__(self, model, recipe, quantizer, cfg, targets, calib_ids, reader, reporter, dist):
        self.model, self.recipe, self.quantizer, self.cfg = model, recipe, quantizer, cfg
        self.codec = CODECS.get(quantizer.codec)()
        self.targets, self.calib_ids, self.reader, self.dist = targets, calib_ids, reader, dist
        self.groups, self.layers = plan_groups(model, targets)
        self.target_params = {t.name if t.expert is None else f"{t.module}.{t.param}" for t in targets}
        self.threshold = quantizer.outlier_threshold(cfg)
        self.inputs = None
        self.stats: dict = {}
        self.writer: ArtifactWriter | None = None
        self.task = None
        self.dtypes = reader.dtypes if reader is not None else {}

    @property
    def calibrated(self) -> bool:
        return self.calib_ids is not None

    def materialize(self, g: Group) -> None:
        """Read the group's tensors: float32 where calibration computes with them, else in the checkpoint's dtype
        (quantizers take each 2-D weight to float32 themselves, so the bytes written are the same)."""
        from moeq.models.stream import materialize
        if self.reader is not None and g.tensors:
            computes = self.calibrated and g.label != "head"
            materialize(self.model, g.tensors, self.reader, torch.float32 if computes else None)

    def release(self, g: Group, layer) -> None:
        """Streaming: drop a processed group (a decoder layer whole, else its own parameters) and unmap its shards."""
        from moeq.models.stream import release, release_params
        if self.reader is None:
            return
        if layer is not None:
            release(layer)
        else:
            release_params(self.model, g.tensors)
        self.reader.close()

    def process(self, g: Group) -> None:
        dist, writer = self.dist, self.writer
        if g.label == "base":
            if dist.main or self.calibrated:
                self.materialize(g)
            if dist.main:
                if not writer.done(g.label):
                    with writer.group(g.label):
                        _write_kept(self.model, g.tensors, writer, self.dtypes)
                writer.tied.update(_ties(self.model, g.tensors))
                if self.calibrated:
                    self.inputs = capture_layer_inputs(self.model, self.layers[1][0], list(self.calib_ids.split(8)))
            self.release(g, None)  # embeddings and head are not needed again: one layer at a time from here
            return
        split_layers = dist.world > 1 and not self.calibrated and g.index is not None
        split_weights = dist.world > 1 and self.calibrated and g.index is not None
        if not (split_layers or split_weights or dist.main):
            return  # groups outside the decoder layers are rank 0's
        if split_layers and not dist.owns(g.index):
            self.task.advance(len(g.targets), layer=g.label)
            return
        self.materialize(g)
        layer = self.layers[1][g.index] if g.index is not None else None
        if g.label == "model":  # no decoder-layer list (e.g. encoder-decoder): one float pass
            writer.tied.update(_ties(self.model, g.tensors))
            if self.calibrated:
                self.stats = _observe_model(self.model, self.targets, self.threshold, self.calib_ids)
        done = writer.done(g.label)
        if not done and layer is not None and self.calibrated:
            if dist.main:
                col = StatsCollector(self.threshold)
                with observing(layer, g.targets, col, prefix=g.prefix):
                    run_layer(layer, self.inputs, collect=False)
                self.stats = col.stats
            self.stats = dist.broadcast(self.stats if dist.main else None)
        modules = None
        if done:
            self.task.advance(len(g.targets), layer=g.label, status="resumed")
        elif split_weights:
            part = f"{g.label}.part{dist.rank}"
            mine = [t for j, t in enumerate(g.targets) if dist.owns(j)]
            with writer.group(part):
                if dist.main:
                    _write_kept(self.model, [n for n in g.tensors if n not in self.target_params], writer, self.dtypes)
                self._quantize(g, mine)
            dist.barrier()
            if dist.main:
                writer.merge_parts(g.label, [f"{g.label}.part{r}" for r in range(dist.world)])
        else:
            with writer.group(g.label):
                _write_kept(self.model, [n for n in g.tensors if n not in self.target_params], writer, self.dtypes)
                modules = self._quantize(g, g.targets)
        needs_packed = (self.reader is None and dist.world == 1) or (dist.main and self.calibrated and layer is not None)
        if needs_packed:
            if modules is None or split_weights:
                group = writer.read_group(g.label)
                modules = _packed_modules(group, self.quantizer)
                group.close()
            install_packed(self.model, modules)
            if layer is not None and self.calibrated:
                nxt = run_layer(layer, self.inputs)
                self.inputs.close()
                self.inputs = nxt
        self.release(g, layer)
        self.task.advance(0, layer=g.label, read=_fmt_bytes(getattr(self.reader, "bytes_read", 0)),
                          written=_fmt_bytes(writer.bytes_written), rss=f"{peak_rss_mb():.0f} MB")
        if dist.main:
            _crash_point(len(writer.records))

    def _quantize(self, g: Group, targets: list[Target]) -> dict:
        modules = {}
        for t in targets:
            w = target_weight(self.model, t)
            s = self.stats.get(t.name)
            q = self.quantizer.quantize(w, self.cfg, s)
            parts, meta = self.codec.encode(q)
            info = _entry_info(self.recipe.method, t, q, w.dtype, s, self.calibrated)
            info["meta"] = meta
            self.writer.add_packed(t.name, self.codec.name, parts, info)
            modules[t] = self.quantizer.module(q, target_bias(self.model, t))
            self.task.advance(1, layer=g.label)
        return modules


def _crash_point(finished: int) -> None:
    """Testing aid: MOEQ_CRASH_AFTER_GROUPS=N sends this process SIGKILL once N groups are on disk (the
    resume tests use it to kill a run at an exact point; nothing is cleaned up, as with a real kill -9)."""
    n = os.environ.get("MOEQ_CRASH_AFTER_GROUPS")
    if n and finished >= int(n):
        os.kill(os.getpid(), signal.SIGKILL)


def _run_key(recipe, cfg, source, targets, calib_ids) -> str:
    h = hashlib.sha256(json.dumps({"recipe": recipe.model_dump(), "options": cfg.model_dump(), "source": source,
                                   "targets": [(t.name, t.shape) for t in targets]}, sort_keys=True).encode())
    if calib_ids is not None:
        h.update(calib_ids.numpy().tobytes())
    return h.hexdigest()


def _observe_model(model, targets, threshold, calib_ids):
    col = StatsCollector(threshold)
    with observing(model, targets, col):
        for b in calib_ids.split(8):
            model(input_ids=b, decoder_input_ids=b if model.config.is_encoder_decoder else None)
    return col.stats


def _write_kept(model, names: list[str], writer: ArtifactWriter, dtypes: dict | None = None) -> None:
    """Write the group's tensors that are not quantized weights, once per storage (ties are recorded apart),
    in their checkpoint dtype (``dtypes``; streamed groups are computed in float32)."""
    sd = model.state_dict(keep_vars=True)
    seen = set()
    for name in names:
        t = sd[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        writer.add_kept(name, t.to((dtypes or {}).get(name, t.dtype)))


def _ties(model, names: list[str]) -> dict[str, str]:
    sd = model.state_dict(keep_vars=True)
    first: dict[tuple, str] = {}
    tied = {}
    for name in names:
        t = sd[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in first:
            tied[name] = first[key]
        else:
            first.setdefault(key, name)
    return tied


def _packed_modules(reader: ArtifactReader, quantizer, shard: str | None = None) -> dict[Target, torch.nn.Module]:
    """Runtime modules for every packed entry a reader holds, or those in ``shard`` (decoded, checksummed)."""
    modules = {}
    for name, e in reader.tensors.items():
        if shard is not None and e["shard"] != shard:
            continue
        codec = CODECS.get(e["codec"])()
        q = codec.decode(reader.read_packed(name), e.get("meta", {}), tuple(e["shape"]), e["codec_version"])
        bias = None
        if e.get("bias") and e["bias"] in reader.kept:
            b = reader.read_kept(e["bias"])
            bias = b if e["expert"] is None else b[e["expert"]]
        t = Target(name, e["module"], e["param"], e["expert"], e["transposed"], None, tuple(e["shape"]))
        modules[t] = quantizer.module(q, bias)
    return modules


def _entry_info(method, t: Target, q, dtype, stats, calibrated: bool) -> dict[str, Any]:
    info = {"method": method, "module": t.module, "param": t.param, "expert": t.expert, "transposed": t.transposed,
            "bias": None if t.bias is None else f"{t.module}.{t.bias}", "shape": list(t.shape),
            "dtype": str(dtype).removeprefix("torch."), "bits_per_param": round(q.bits_per_param(), 4),
            "kind": t.kind}
    if calibrated:
        info["calib_tokens"] = 0 if stats is None else int(stats.tokens)
        if stats is None:
            info["fallback"] = "no calibration tokens reached this weight: quantized data-free"
    return info


def _manifest(recipe, cfg, source, writer, calib_ids) -> dict[str, Any]:
    entries, kept = writer.entries, writer.kept
    n_q = sum(math.prod(e["shape"]) for e in entries.values())
    b_q = sum(e["bytes"] for e in entries.values())
    b_k = sum(e["bytes"] for e in kept.values())
    return {
        "tool": f"moeq {__version__}", "moeq_format": 1,
        "source": {"model": source},
        "recipe": {**recipe.model_dump(), "options": cfg.model_dump()},
        "calibration": None if calib_ids is None else {**recipe.calibration.model_dump(),
                                                       "tokens": int(calib_ids.numel()), "split": "calib"},
        "totals": {"quantized_params": n_q, "quantized_bytes": b_q, "bits_per_param": round(8 * b_q / max(n_q, 1), 4),
                   "kept_bytes": b_k, "total_bytes": b_q + b_k, "tensors": len(entries),
                   "fallbacks": sum(1 for e in entries.values() if "fallback" in e)},
    }


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


# ---------------------------------------------------------------------------------------------------------
# load
# ---------------------------------------------------------------------------------------------------------
def is_artifact(path: str | Path) -> bool:
    return (Path(path) / MANIFEST).is_file()


def load(path: str | Path, reporter: Reporter = Reporter(), dtype: torch.dtype | None = torch.float32,
         max_memory: int | None = None, offload_dir: str | Path | None = None):
    """Load a packed artifact: (model executing packed weights, tokenizer, ArtifactReader). Kept floating-point
    tensors (embeddings, norms, routers) are cast to ``dtype`` (the compute dtype; None keeps the stored one).

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
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise ArtifactError(f"{path}: unsupported model type {model_type!r} ({e})") from None
    model = build_empty(config)
    method = reader.manifest["recipe"]["method"]
    quantizer = QUANTIZERS.get(method)()
    off = Offload(model, _artifact_sizes(reader, dtype), max_memory, offload_dir) if max_memory is not None else None
    shards = reader.manifest.get("shards") or sorted({e["shard"] for e in (*reader.tensors.values(), *reader.kept.values())})
    label = f"load ({len(off.disk)} layers offloaded to disk)" if off and off.disk else "load"
    with reporter.task(label, len(shards)) as task:
        for shard in shards:  # one group (embeddings / a decoder layer / head) at a time
            kept = [n for n, e in reader.kept.items() if e["shard"] == shard]
            for name in kept:
                t = reader.read_kept(name)
                set_module_tensor_to_device(model, name, "cpu",
                                            value=t.to(dtype) if dtype and t.is_floating_point() else t)
            modules = _packed_modules(reader, quantizer, shard=shard)
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


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------
def load_any(spec: str | None, reporter: Reporter = Reporter(), max_memory: int | None = None):
    """An artifact directory or any model spec the loader understands: (model, tokenizer, manifest|None).
    ``max_memory`` (bytes): place it with accelerate, offloading to disk what does not fit."""
    if spec is not None and is_artifact(spec):
        model, tok, reader = load(spec, reporter, max_memory=max_memory)
        return model, tok, reader.manifest
    from moeq.models.loader import load_model
    with reporter.task(f"load {spec or 'default model'}", None):
        model, tok, _ = load_model(spec, max_memory=max_memory)
    return model, tok, None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate(target: str | None, baseline: str | None = None, spec: EvalSpec = EvalSpec(), speed: bool = True,
             reporter: Reporter = Reporter(), max_memory: int | None = None, use_baseline: bool = True) -> dict[str, Any]:
    """Perplexity (+ mean KL and ppl ratio against ``baseline`` measured in the same run), speed, memory.
    ``max_memory`` (bytes, per model): models larger than that are placed with accelerate and partly run from
    disk (see ``load``)."""
    from moeq.data.corpus import load_text
    from moeq.eval.perplexity import perplexity, tokenize_windows
    from moeq.eval.speed import measure_speed

    t0 = time.perf_counter()
    model, tok, manifest = load_any(target, reporter, max_memory)
    load_s = time.perf_counter() - t0
    if tok is None:
        raise MoeqError(f"{target}: no tokenizer files; cannot evaluate text perplexity")
    if not use_baseline:
        baseline = None
    elif baseline is None and manifest is not None:
        baseline = manifest.get("source", {}).get("model")
    base = load_any(baseline, reporter, max_memory)[0] if baseline else None
    windows = tokenize_windows(tok, load_text(spec.corpus, "eval"), spec.seqlen, spec.windows)
    result: dict[str, Any] = {"model": target, "baseline": baseline, "corpus": spec.corpus, "load_seconds": round(load_s, 2)}
    with reporter.task("perplexity" + (" + baseline, KL" if base is not None else ""), windows.shape[0]) as task:
        r = perplexity(model, windows, spec.protocol, spec.batch_size, baseline=base, progress=task.advance)
    result["ppl"] = {"value": r.ppl, "protocol": spec.protocol, "seqlen": spec.seqlen, "windows": r.windows,
                     "tokens": r.tokens, "describe": r.describe()}
    if base is not None:  # measured in the same pass, on the same windows
        result["baseline_ppl"] = r.extra["baseline_ppl"]
        result["ppl_ratio"] = r.ppl / r.extra["baseline_ppl"]
        result["kl_mean"] = r.kl_mean
    if manifest is not None:
        result["bits_per_param"] = manifest["totals"]["bits_per_param"]
        result["quantized_bytes"] = manifest["totals"]["quantized_bytes"]
        result["total_bytes"] = manifest["totals"]["total_bytes"]
        result["method"] = manifest["recipe"]["method"]
    if speed:
        with reporter.task("speed", None):
            result["speed"] = measure_speed(model, windows[0])
            if base is not None:
                result["baseline_speed"] = measure_speed(base, windows[0])
    if getattr(model, "moeq_placement", {}).get("max_memory") is not None:
        result["placement"] = model.moeq_placement
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


# ---------------------------------------------------------------------------------------------------------
# inspect
# ---------------------------------------------------------------------------------------------------------
def inspect(path: str | Path) -> dict[str, Any]:
    """Manifest summary: per module type, per expert, totals. Reads no tensors."""
    load_builtins()
    m = ArtifactReader(path).manifest
    kinds: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    for name, e in m["tensors"].items():
        n = math.prod(e["shape"])
        k = kinds.setdefault(e["kind"], {"tensors": 0, "params": 0, "bytes": 0, "codec": e["codec"]})
        k["tensors"] += 1
        k["params"] += n
        k["bytes"] += e["bytes"]
        if e["expert"] is not None:
            key = f"{e['module']}[{e['expert']}]"
            x = experts.setdefault(key, {"params": 0, "bytes": 0, "codec": e["codec"], "calib_tokens": None,
                                         "fallback": False})
            x["params"] += n
            x["bytes"] += e["bytes"]
            if e.get("calib_tokens") is not None and e["param"] != "down_proj":
                x["calib_tokens"] = e["calib_tokens"]
            x["fallback"] |= "fallback" in e
    for d in (*kinds.values(), *experts.values()):
        d["bits_per_param"] = round(8 * d["bytes"] / max(d["params"], 1), 3)
    return {"path": str(path), "tool": m["tool"], "method": m["recipe"]["method"], "options": m["recipe"]["options"],
            "source": m["source"], "calibration": m["calibration"], "totals": m["totals"], "kinds": kinds,
            "experts": experts, "kept": {n: {"dtype": e["dtype"], "bytes": e["bytes"]} for n, e in m["kept"].items()}}
