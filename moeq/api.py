"""The Python API: ``quantize``, ``load``, ``evaluate``, ``inspect``. The CLI calls nothing else."""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from moeq import __version__
from moeq.errors import ArtifactError, MoeqError
from moeq.formats.container import MANIFEST, ArtifactReader, ArtifactWriter
from moeq.models.adapter import Target, find_targets, install_packed, target_bias, target_weight
from moeq.models.calib import StatsCollector, observing
from moeq.models.layers import capture_layer_inputs, decoder_layers, layer_of, run_layer
from moeq.progress import Reporter
from moeq.recipes import EvalSpec, Recipe
from moeq.registry import CODECS, QUANTIZERS, load_builtins


# ---------------------------------------------------------------------------------------------------------
# quantize
# ---------------------------------------------------------------------------------------------------------
def quantize(recipe: Recipe, out: str | Path, reporter: Reporter = Reporter()) -> dict[str, Any]:
    """Load ``recipe.model``, quantize it with ``recipe.method`` and write the artifact to ``out``."""
    from moeq.models.loader import load_model, resolve
    quantizer, cfg = recipe.method_config()
    _check_out(out)
    resolve(recipe.model)  # a bad path fails here, before any progress display
    with reporter.task("load model", None):
        model, tok, src = load_model(recipe.model)
    calib = calibration_ids(tok, recipe) if quantizer.needs_calibration(cfg) else None
    return quantize_model(model, out, recipe, tokenizer=tok, source=src.spec, calib_ids=calib, reporter=reporter)


def _check_out(out) -> None:
    p = Path(out)
    if p.exists() and (not p.is_dir() or any(p.iterdir())):
        raise MoeqError(f"output {p} already exists and is not empty; remove it or pick another")


def calibration_ids(tokenizer, recipe: Recipe) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from the calibration text (seeded)."""
    from moeq.data.corpus import load_text
    c = recipe.calibration
    text = load_text(c.source, "calib")
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if ids.numel() < c.seqlen + 1:
        raise MoeqError(f"calibration text has {ids.numel()} tokens, fewer than seqlen {c.seqlen}")
    g = torch.Generator().manual_seed(c.seed)
    starts = torch.randint(0, ids.numel() - c.seqlen, (c.samples,), generator=g)
    return torch.stack([ids[s:s + c.seqlen] for s in starts.tolist()])


@torch.no_grad()
def quantize_model(model, out: str | Path, recipe: Recipe, tokenizer=None, source: str | None = None,
                   calib_ids: torch.Tensor | None = None, reporter: Reporter = Reporter(),
                   shard_bytes: int | None = None) -> dict[str, Any]:
    """Quantize an in-memory model decoder layer by decoder layer, write the artifact, and leave ``model``
    running the packed weights. With ``calib_ids`` every layer is calibrated on the outputs of the
    already-quantized layers before it."""
    quantizer, cfg = recipe.method_config()
    codec = CODECS.get(quantizer.codec)()
    targets = find_targets(model, recipe.include_lm_head)
    if not targets:
        raise MoeqError("no quantizable weights found in this model")
    t0 = time.perf_counter()
    writer = ArtifactWriter(Path(out), **({"shard_bytes": shard_bytes} if shard_bytes else {}))
    try:
        tied = _write_kept(model, targets, writer)
        groups, layers = _layer_groups(model, targets)
        stats = {}
        inputs = None
        threshold = quantizer.outlier_threshold(cfg)
        if calib_ids is not None:
            batches = list(calib_ids.split(8))
            if layers is not None:
                with reporter.task("calibration inputs", None):
                    inputs = capture_layer_inputs(model, layers[1][0], batches)
            else:  # no decoder-layer list (e.g. encoder-decoder): one full pass over the float model
                col = StatsCollector(threshold)
                with observing(model, targets, col), reporter.task("calibration", len(batches)) as task:
                    for b in batches:
                        model(input_ids=b, decoder_input_ids=b if model.config.is_encoder_decoder else None)
                        task.advance(1)
                stats = col.stats
        infos = {}
        with reporter.task(f"quantize ({recipe.method})", len(targets)) as task:
            for label, idx, group in groups:
                if inputs is not None and idx is not None:
                    layer = layers[1][idx]
                    col = StatsCollector(threshold)
                    with observing(layer, group, col, prefix=f"{layers[0]}.{idx}"):
                        run_layer(layer, inputs)
                    stats = col.stats
                modules = {}
                for t in group:
                    s = stats.get(t.name)
                    q = quantizer.quantize(target_weight(model, t), cfg, s)
                    parts, meta = codec.encode(q)
                    info = _entry_info(recipe.method, t, q, target_weight(model, t).dtype, s, calib_ids is not None)
                    info["meta"] = meta
                    writer.add_packed(t.name, codec.name, parts, info)
                    infos[t.name] = info
                    modules[t] = quantizer.module(q, target_bias(model, t))
                    task.advance(1, layer=label, written=_fmt_bytes(writer.bytes_written + writer._buf_bytes))
                install_packed(model, modules)
                if inputs is not None and idx is not None:
                    inputs = run_layer(layers[1][idx], inputs)
        manifest = _manifest(recipe, cfg, source, infos, writer, tied, calib_ids, time.perf_counter() - t0)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "moeq", "format_version": manifest["moeq_format"],
                                         "method": recipe.method, "options": cfg.model_dump()}
        path = writer.commit(manifest, config)
    except BaseException:
        writer.abort()
        raise
    return {"path": str(path), **manifest["totals"], "seconds": manifest["seconds"]}


def _layer_groups(model, targets: list[Target]):
    """[(label, layer index | None, targets)] in layer order, then whatever lies outside the layers."""
    layers = decoder_layers(model)
    if layers is None:
        return [("model", None, targets)], None
    prefix, mlist = layers
    by: dict[int, list[Target]] = {}
    rest = []
    for t in targets:
        i = layer_of(t.module, prefix)
        (by.setdefault(i, []) if i is not None else rest).append(t)
    groups = [(f"layer {i}", i, by[i]) for i in sorted(by)]
    if rest:
        groups.append(("head", None, rest))
    return groups, layers


def _write_kept(model, targets: list[Target], writer: ArtifactWriter) -> dict[str, str]:
    """Write every tensor that is not a quantized weight, once per storage; return {alias: stored name}."""
    skip = {t.name if t.expert is None else f"{t.module}.{t.param}" for t in targets}
    seen: dict[tuple, str] = {}
    tied = {}
    for name, t in model.state_dict(keep_vars=True).items():
        if name in skip:
            continue
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            tied[name] = seen[key]
            continue
        seen[key] = name
        writer.add_kept(name, t)
    writer.tied.update(tied)
    return tied


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


def _manifest(recipe, cfg, source, infos, writer, tied, calib_ids, seconds) -> dict[str, Any]:
    n_q = sum(math.prod(e["shape"]) for e in infos.values())
    b_q = sum(e["bytes"] for e in writer.entries.values())
    b_k = sum(e["bytes"] for e in writer.kept.values())
    return {
        "tool": f"moeq {__version__}", "moeq_format": 1, "seconds": round(seconds, 2),
        "source": {"model": source},
        "recipe": {**recipe.model_dump(), "options": cfg.model_dump()},
        "calibration": None if calib_ids is None else {**recipe.calibration.model_dump(),
                                                       "tokens": int(calib_ids.numel()), "split": "calib"},
        "totals": {"quantized_params": n_q, "quantized_bytes": b_q, "bits_per_param": round(8 * b_q / max(n_q, 1), 4),
                   "kept_bytes": b_k, "total_bytes": b_q + b_k, "tensors": len(infos),
                   "fallbacks": sum(1 for e in infos.values() if "fallback" in e)},
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


def load(path: str | Path, reporter: Reporter = Reporter()):
    """Load a packed artifact: (model executing packed weights, tokenizer, ArtifactReader)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
    with init_empty_weights(include_buffers=False):
        if getattr(config, "is_encoder_decoder", False) and type(config) not in AutoModelForCausalLM._model_mapping:
            from transformers import AutoModelForSeq2SeqLM
            model = AutoModelForSeq2SeqLM.from_config(config)
        else:
            model = AutoModelForCausalLM.from_config(config)
    method = reader.manifest["recipe"]["method"]
    quantizer = QUANTIZERS.get(method)()
    with reporter.task("load kept tensors", len(reader.kept)) as task:
        for name in reader.kept:
            set_module_tensor_to_device(model, name, "cpu", value=reader.read_kept(name))
            task.advance(1)
        for alias, name in reader.manifest.get("tied", {}).items():
            _set_alias(model, alias, name)
    modules = {}
    with reporter.task("load packed tensors", len(reader.tensors)) as task:
        for name, e in reader.tensors.items():
            codec = CODECS.get(e["codec"])()
            q = codec.decode(reader.read_packed(name), e.get("meta", {}), tuple(e["shape"]), e["codec_version"])
            bias = None
            if e.get("bias"):
                b = reader.read_kept(e["bias"]) if e["bias"] in reader.kept else None
                bias = b if b is None or e["expert"] is None else b[e["expert"]]
            t = Target(name, e["module"], e["param"], e["expert"], e["transposed"], None, tuple(e["shape"]))
            modules[t] = quantizer.module(q, bias)
            task.advance(1)
    try:
        install_packed(model, modules)
    except (AttributeError, ValueError) as err:
        raise ArtifactError(f"{path}: packed tensors do not fit the model ({err})") from None
    missing = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.device.type == "meta"]
    if missing:
        raise ArtifactError(f"{path}: artifact lacks {len(missing)} tensors, e.g. {missing[0]}")
    model.eval()
    tok = AutoTokenizer.from_pretrained(str(path)) if (Path(path) / "tokenizer_config.json").is_file() else None
    return model, tok, reader


def _set_alias(model, alias: str, name: str) -> None:
    mod_path, _, attr = alias.rpartition(".")
    src_path, _, src_attr = name.rpartition(".")
    src = getattr(model.get_submodule(src_path), src_attr)
    setattr(model.get_submodule(mod_path), attr, src)


# ---------------------------------------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------------------------------------
def load_any(spec: str | None, reporter: Reporter = Reporter()):
    """An artifact directory or any model spec the loader understands: (model, tokenizer, manifest|None)."""
    if spec is not None and is_artifact(spec):
        model, tok, reader = load(spec, reporter)
        return model, tok, reader.manifest
    from moeq.models.loader import load_model
    with reporter.task(f"load {spec or 'default model'}", None):
        model, tok, _ = load_model(spec)
    return model, tok, None


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def evaluate(target: str | None, baseline: str | None = None, spec: EvalSpec = EvalSpec(), speed: bool = True,
             reporter: Reporter = Reporter()) -> dict[str, Any]:
    """Perplexity (+ mean KL and ppl ratio against ``baseline`` measured in the same run), speed, memory."""
    from moeq.data.corpus import load_text
    from moeq.eval.perplexity import perplexity, tokenize_windows
    from moeq.eval.speed import measure_speed

    t0 = time.perf_counter()
    model, tok, manifest = load_any(target, reporter)
    load_s = time.perf_counter() - t0
    if tok is None:
        raise MoeqError(f"{target}: no tokenizer files; cannot evaluate text perplexity")
    if baseline is None and manifest is not None:
        baseline = manifest.get("source", {}).get("model")
    base = load_any(baseline, reporter)[0] if baseline else None
    windows = tokenize_windows(tok, load_text(spec.corpus, "eval"), spec.seqlen, spec.windows)
    result: dict[str, Any] = {"model": target, "baseline": baseline, "corpus": spec.corpus, "load_seconds": round(load_s, 2)}
    with reporter.task("perplexity", windows.shape[0]) as task:
        r = perplexity(model, windows, spec.protocol, spec.batch_size, baseline=base, progress=task.advance)
    result["ppl"] = {"value": r.ppl, "protocol": spec.protocol, "seqlen": spec.seqlen, "windows": r.windows,
                     "tokens": r.tokens, "describe": r.describe()}
    if base is not None:
        with reporter.task("baseline perplexity", windows.shape[0]) as task:
            rb = perplexity(base, windows, spec.protocol, spec.batch_size, progress=task.advance)
        result["baseline_ppl"] = rb.ppl
        result["ppl_ratio"] = r.ppl / rb.ppl
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
