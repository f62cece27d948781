"""``moeq eval``: perplexity, KL and ppl ratio against a baseline measured in the same pass, speed, memory."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moeq.errors import MoeqError
from moeq.progress import Reporter, peak_rss_mb
from moeq.recipes import EvalSpec
from moeq.formats.container import ArtifactReader
from moeq.registry import load_builtins
from moeq.runtime.load import is_artifact, load_any, model_context, resolve_dtype

def evaluate(target: str | None, baseline: str | None = None, spec: EvalSpec = EvalSpec(), speed: bool = True,
             reporter: Reporter = Reporter(), max_memory: int | None = None, use_baseline: bool = True,
             dtype: str | torch.dtype = "auto", allow_long_context: bool = False,
             bits: int | None = None, bandwidth: bool = False) -> dict[str, Any]:
    """Perplexity (+ mean KL and ppl ratio against ``baseline`` measured in the same run), speed, memory.
    ``dtype``: the compute dtype of ``target`` (``auto``: the checkpoint's, bfloat16 where that is float32); the
    baseline computes in the same one. ``max_memory`` (bytes, per model): models larger than that are placed with
    accelerate and partly run from disk (see ``load``). A ``spec.seqlen`` beyond the model's context (its config's
    ``max_position_embeddings``) is refused before anything is loaded, or with ``allow_long_context`` reported
    in the result (``long_context``) and logged.

    ``bits``: a matryoshka artifact evaluated at that width, reading only its bit-planes (no extraction); the
    result says the width (``bits``) and the packed bytes that load read (``code_bytes_read``: the planes of that
    width and the scales, other entries whole), and ``bits_per_param`` is the loaded model's. A width the artifact
    cannot give is a MoeqError before anything is loaded. ``bandwidth``: also measure the machine's memory
    bandwidth and the model's effective bandwidth in decode (needs ``speed``)."""
    many = evaluate_many([(target, bits)], baseline, spec, speed, reporter, max_memory, use_baseline, dtype,
                         allow_long_context, bandwidth)
    res = many["results"][0]
    base = many.get("baseline_result") or {}
    if base.get("speed"):
        res["baseline_speed"] = base["speed"]
    res["peak_rss_mb"] = many["peak_rss_mb"]
    if many.get("bandwidth_gb_s"):
        res["bandwidth_gb_s"] = many["bandwidth_gb_s"]
        res["baseline_bandwidth"] = base.get("bandwidth")
    return res


def split_bits(spec: str) -> tuple[str, int | None]:
    """``ART@3`` -> (``ART``, 3): a nested-precision artifact at a width, where ``ART@3`` is not itself a path."""
    head, sep, tail = spec.rpartition("@")
    if sep and tail.isdigit() and not Path(spec).exists() and is_artifact(head):
        return head, int(tail)
    return spec, None


def evaluate_many(targets: list[tuple[str | None, int | None]], baseline: str | None = None,
                  spec: EvalSpec = EvalSpec(), speed: bool = True, reporter: Reporter = Reporter(),
                  max_memory: int | None = None, use_baseline: bool = True, dtype: str | torch.dtype = "auto",
                  allow_long_context: bool = False, bandwidth: bool = False) -> dict[str, Any]:
    """``evaluate`` for several (target, bits) at once, all on the same windows and in one compute dtype (the
    first target's): the baseline is loaded once and each batch runs through it once for every target's KL
    (``moeq.eval.perplexity.compare``); its perplexity and speed are measured once (``baseline_result``). All
    models are in memory together. Per target, ``memory_mb`` is the largest rise of the resident set while
    loading it or running its speed test."""
    from moeq.data.corpus import load_text
    from moeq.eval.memory import PhasePeak
    from moeq.eval.perplexity import compare, tokenize_windows
    from moeq.eval.speed import effective_bandwidth, measure_speed, memory_bandwidth
    from moeq.heap import trim_heap

    if not targets:
        raise MoeqError("nothing to evaluate")
    for target, bits in targets:
        if bits is not None:  # before the baseline is loaded: a width the artifact cannot give is one line now
            if target is None or not is_artifact(target):
                raise MoeqError(f"--bits {bits}: {target or 'tiny-moe'} is not a moeq artifact; --bits reads a "
                                "matryoshka artifact at fewer bits")
            from moeq.runtime.load import check_bits
            check_bits(ArtifactReader(target), bits)
    dtype = resolve_dtype(targets[0][0], dtype)
    contexts = {t: model_context(t) for t, _ in targets}
    long_context = False
    for t, context in contexts.items():
        if context is not None and spec.seqlen > context:
            if not allow_long_context:
                raise MoeqError(f"--seqlen {spec.seqlen} is beyond the model's context of {context} tokens "
                                f"(max_position_embeddings); use --seqlen {context} or less, or --allow-long-context")
            long_context = True
            reporter.log(f"warning: --seqlen {spec.seqlen} is beyond the model's context of {context} tokens"
                         + (f" ({t})" if len(targets) > 1 else "")
                         + ": positions past it were never trained, so the perplexity says little")
    baseline, skipped = _baseline_for(targets, baseline, use_baseline)
    if skipped:
        reporter.log(f"no baseline: {skipped}")
    # the baseline first: its load's transient peak (a float32 checkpoint read to compute in 16 bits) is over
    # before the targets are in memory
    base, base_mem = None, None
    if baseline:
        with PhasePeak() as mem:
            base = load_any(baseline, reporter, max_memory, dtype=dtype)[0]
        base_mem = mem.mb
    trim_heap()
    loaded = []
    for target, bits in targets:
        t0 = time.perf_counter()
        with PhasePeak() as mem:
            model, tok, manifest = load_any(target, reporter, max_memory, dtype=dtype, bits=bits)
        loaded.append((model, tok, manifest, round(time.perf_counter() - t0, 2), mem.mb))
        trim_heap()
    dtype = loaded[0][0].dtype
    tok = next((x[1] for x in loaded if x[1] is not None), None)
    if tok is None:
        raise MoeqError(f"{targets[0][0]}: no tokenizer files; cannot evaluate text perplexity")
    windows = tokenize_windows(tok, load_text(spec.corpus, "eval"), spec.seqlen, spec.windows, spec.protocol,
                               spec.stride)
    what = "perplexity" + (" + baseline, KL" if base is not None else "")
    with reporter.task(what, windows.shape[0] * len(loaded)) as task:
        def advance(n: int) -> None:  # freed forward temporaries back to the OS after each batch: glibc keeps
            task.advance(n * len(loaded))  # them per thread arena otherwise (+250-600 MB of peak RSS on SmolLM2)
            trim_heap()
        trim_heap()
        ppls = compare([x[0] for x in loaded], windows, spec.protocol, spec.batch_size, baseline=base,
                       progress=advance, stride=spec.stride)
    bw = None
    if speed and bandwidth:
        with reporter.task("memory bandwidth", None):
            bw = memory_bandwidth()
    out: dict[str, Any] = {"baseline": baseline, "baseline_skipped": skipped, "corpus": spec.corpus,
                           "dtype": str(dtype).removeprefix("torch."), "protocol": ppls[0].describe(),
                           "bandwidth_gb_s": None if bw is None else round(bw / 1e9, 2), "results": []}
    if base is not None:
        b = {"model": baseline, "ppl": ppls[0].extra["baseline_ppl"], "memory_mb": base_mem}
        if speed:
            with reporter.task("speed (baseline)", None), PhasePeak() as mem:
                b["speed"] = measure_speed(base, windows[0])
            b["memory_mb"] = _max(base_mem, mem.mb)
            b["bandwidth"] = effective_bandwidth(base, b["speed"], bw)
        out["baseline_result"] = b
    for (target, bits), (model, _, manifest, load_s, load_mem), r in zip(targets, loaded, ppls):
        res: dict[str, Any] = {"model": target if bits is None else f"{target}@{bits}", "baseline": baseline,
                               "baseline_skipped": skipped, "corpus": spec.corpus, "dtype": out["dtype"],
                               "load_seconds": load_s, "context": contexts[target],
                               "long_context": long_context, "memory_mb": load_mem}
        res["ppl"] = {"value": r.ppl, "protocol": r.protocol, "seqlen": r.seqlen, "stride": r.stride,
                      "windows": r.windows, "tokens": r.tokens, "describe": r.describe()}
        if base is not None:  # measured in the same pass, on the same windows
            res["baseline_ppl"] = r.extra["baseline_ppl"]
            res["ppl_ratio"] = r.ppl / r.extra["baseline_ppl"]
            res["kl_mean"] = r.kl_mean
        if manifest is not None:
            res.update(_artifact_totals(manifest, bits))
        if speed:
            with reporter.task(f"speed ({Path(str(target)).name if target else 'tiny-moe'})", None), \
                    PhasePeak() as mem:
                res["speed"] = measure_speed(model, windows[0])
            res["memory_mb"] = _max(load_mem, mem.mb)
            res["bandwidth"] = effective_bandwidth(model, res["speed"], bw)
            if base is not None:
                res["baseline_speed"] = out["baseline_result"]["speed"]
        if getattr(model, "moeq_placement", {}).get("max_memory") is not None:
            res["placement"] = model.moeq_placement
        out["results"].append(res)
    out["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return out


def _max(a: float | None, b: float | None) -> float | None:
    return None if a is None and b is None else max(a or 0.0, b or 0.0)


def _artifact_totals(manifest: dict, bits: int | None) -> dict[str, Any]:
    res = {"bits_per_param": manifest["totals"]["bits_per_param"],
           "quantized_bytes": manifest["totals"]["quantized_bytes"],
           "total_bytes": manifest["totals"]["total_bytes"],
           "method": "+".join(dict.fromkeys(r["method"] for r in manifest["recipe"]["rules"]))}
    if bits is not None:
        from moeq.pipeline.extract import packed_bytes_at
        res["bits"] = bits
        res["code_bytes_read"] = packed_bytes_at(manifest, bits)
        params = max(manifest["totals"]["quantized_params"], 1)
        res["bits_per_param"] = round(8 * res["code_bytes_read"] / params, 4)
    return res


def _baseline_for(targets, baseline: str | None, use_baseline: bool) -> tuple[str | None, str | None]:
    """The baseline: the one given, else the one every artifact among ``targets`` records (if moeq may follow
    it, see ``recorded_baseline``); (None, why) when there is none to follow."""
    if not use_baseline:
        return None, None
    if baseline is not None:
        return baseline, None
    artifacts = [t for t, _ in targets if t is not None and is_artifact(t)]
    if not artifacts:
        return None, None
    load_builtins()
    found = {recorded_baseline(ArtifactReader(t).manifest.get("source", {}).get("model")) for t in artifacts}
    if len(found) > 1:
        return None, ("the artifacts record different source models; pass --baseline MODEL to compare them "
                      "against one")
    return found.pop()


def run_recipe(recipe, out: str | Path, reporter: Reporter = Reporter(), fresh: bool = False) -> dict[str, Any]:
    """A whole recipe: quantize ``recipe.model`` into ``out``, evaluate the artifact with the recipe's ``eval``
    against the recipe's model as the baseline, check its ``expect`` (``checks``: one row per limit; ``passed``:
    all hold)."""
    from moeq.pipeline.quantize import quantize
    spec = recipe.eval_spec()
    q = quantize(recipe, out, reporter=reporter, fresh=fresh)
    e = evaluate(str(q["path"]), recipe.model or "tiny-moe", spec, speed=spec.speed, reporter=reporter,
                 dtype=spec.dtype, bits=spec.bits)
    checks = recipe.expect.check(e) if recipe.expect is not None else []
    return {"recipe": recipe.model_dump(exclude_none=True), "quantize": q, "eval": e, "checks": checks,
            "passed": all(c["ok"] for c in checks)}


def recorded_baseline(source) -> tuple[str | None, str | None]:
    """The baseline an artifact's manifest names (``source.model``), if moeq may follow it: a zoo name or a hub
    id. A local path is never followed (an artifact is untrusted input: it could name any file on this machine);
    then (None, why), and ``--baseline PATH`` gives the same comparison explicitly."""
    from moeq.models.loader import ZOO
    from moeq.paths import looks_local
    if not isinstance(source, str) or not source:
        return None, None
    if source in ZOO or (source.count("/") == 1 and not looks_local(source) and not Path(source).exists()):
        return source, None
    return None, (f"the artifact's source {source!r} is a local path, which moeq does not follow from an "
                  "artifact; pass --baseline PATH to compare")
