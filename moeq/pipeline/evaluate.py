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
             bits: int | None = None) -> dict[str, Any]:
    """Perplexity (+ mean KL and ppl ratio against ``baseline`` measured in the same run), speed, memory.
    ``dtype``: the compute dtype of ``target`` (``auto``: the checkpoint's, bfloat16 where that is float32); the
    baseline computes in the same one. ``max_memory`` (bytes, per model): models larger than that are placed with
    accelerate and partly run from disk (see ``load``). A ``spec.seqlen`` beyond the model's context (its config's
    ``max_position_embeddings``) is refused before anything is loaded, or with ``allow_long_context`` reported
    in the result (``long_context``) and logged.

    ``bits``: a matryoshka artifact evaluated at that width, reading only its bit-planes (no extraction); the
    result says the width (``bits``) and the packed bytes that load read (``code_bytes_read``: the planes of that
    width and the scales, other entries whole), and ``bits_per_param`` is the loaded model's. A width the artifact
    cannot give is a MoeqError before anything is loaded."""
    from moeq.data.corpus import load_text
    from moeq.eval.perplexity import perplexity, tokenize_windows
    from moeq.eval.speed import measure_speed

    from moeq.models.stream import trim_heap
    if bits is not None:  # before the baseline is loaded: a width the artifact cannot give is one line now
        if target is None or not is_artifact(target):
            raise MoeqError(f"--bits {bits}: {target or 'tiny-moe'} is not a moeq artifact; --bits reads a "
                            "matryoshka artifact at fewer bits")
        from moeq.runtime.load import check_bits
        check_bits(ArtifactReader(target), bits)
    dtype = resolve_dtype(target, dtype)
    context = model_context(target)
    long_context = context is not None and spec.seqlen > context
    if long_context and not allow_long_context:
        raise MoeqError(f"--seqlen {spec.seqlen} is beyond the model's context of {context} tokens "
                        f"(max_position_embeddings); use --seqlen {context} or less, or --allow-long-context")
    if long_context:
        reporter.log(f"warning: --seqlen {spec.seqlen} is beyond the model's context of {context} tokens: "
                     "positions past it were never trained, so the perplexity says little")
    skipped = None
    if not use_baseline:
        baseline = None
    elif baseline is None and target is not None and is_artifact(target):
        load_builtins()
        baseline, skipped = recorded_baseline(ArtifactReader(target).manifest.get("source", {}).get("model"))
        if skipped:
            reporter.log(f"no baseline: {skipped}")
    # the baseline first: its load's transient peak (a float32 checkpoint read to compute in 16 bits) is over
    # before the target is in memory
    base = load_any(baseline, reporter, max_memory, dtype=dtype)[0] if baseline else None
    trim_heap()
    t0 = time.perf_counter()
    model, tok, manifest = load_any(target, reporter, max_memory, dtype=dtype, bits=bits)
    dtype = model.dtype
    load_s = time.perf_counter() - t0
    if tok is None:
        raise MoeqError(f"{target}: no tokenizer files; cannot evaluate text perplexity")
    windows = tokenize_windows(tok, load_text(spec.corpus, "eval"), spec.seqlen, spec.windows)
    result: dict[str, Any] = {"model": target, "baseline": baseline, "baseline_skipped": skipped, "corpus": spec.corpus,
                              "dtype": str(dtype).removeprefix("torch."), "load_seconds": round(load_s, 2),
                              "context": context, "long_context": long_context}
    with reporter.task("perplexity" + (" + baseline, KL" if base is not None else ""), windows.shape[0]) as task:
        def advance(n: int) -> None:  # freed forward temporaries back to the OS after each batch: glibc keeps
            task.advance(n)            # them per thread arena otherwise (+250-600 MB of peak RSS on SmolLM2)
            trim_heap()
        trim_heap()
        r = perplexity(model, windows, spec.protocol, spec.batch_size, baseline=base, progress=advance)
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
        result["method"] = "+".join(dict.fromkeys(r["method"] for r in manifest["recipe"]["rules"]))
        if bits is not None:
            from moeq.pipeline.extract import packed_bytes_at
            result["bits"] = bits
            result["code_bytes_read"] = packed_bytes_at(manifest, bits)
            params = max(manifest["totals"]["quantized_params"], 1)
            result["bits_per_param"] = round(8 * result["code_bytes_read"] / params, 4)
    if speed:
        with reporter.task("speed", None):
            result["speed"] = measure_speed(model, windows[0])
            if base is not None:
                result["baseline_speed"] = measure_speed(base, windows[0])
    if getattr(model, "moeq_placement", {}).get("max_memory") is not None:
        result["placement"] = model.moeq_placement
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    return result


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
