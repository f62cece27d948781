"""Quantizing a model into an artifact: load or stream the source, draw the calibration tokens, plan, run, commit."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from moeq import __version__
from moeq.errors import MoeqError
from moeq.formats.container import ArtifactWriter, check_output_free
from moeq.formats.manifest import totals
from moeq.models.adapter import find_targets
from moeq.pipeline.plan import Plan
from moeq.pipeline.run import Run, layer_inputs, run_key
from moeq.progress import Reporter
from moeq.recipes import Recipe


def quantize(recipe: Recipe, out: str | Path, reporter: Reporter = Reporter(), fresh: bool = False) -> dict[str, Any]:
    """Quantize ``recipe.model`` as the recipe's rules say and write the artifact to ``out``.

    A local safetensors model is streamed: built on the meta device and read one decoder layer at a time from
    its shards. GGUF files and hub ids are loaded whole (their readers need it), then processed the same way.
    ``fresh`` discards the resume state of an interrupted run instead of continuing it. The result's
    ``seconds`` count from here: loading included."""
    from moeq.errors import ModelLoadError
    from moeq.heap import bound_heap
    from moeq.models.loader import hub_reachable, hub_unreachable, load_config, load_model, load_tokenizer, resolve
    from moeq.models.stream import CheckpointReader, build_empty
    from moeq.paths import check_output_dir
    t0 = time.perf_counter()
    recipe.methods()  # bad methods and options fail before any loading
    check_output_dir(out)
    check_output_free(Path(out))
    check_device(recipe.calibration.device)
    src = resolve(recipe.model)  # a bad path fails here, before any progress display
    if src.hub_id and not hub_reachable():
        raise ModelLoadError(hub_unreachable(src.hub_id))
    if src.path is not None and src.gguf_file is None:
        config = load_config(src)
        model, tok = build_empty(config), load_tokenizer(src)
        reader = CheckpointReader(src.path, model)  # checkpoint names through transformers' mapping for this model
        bound_heap()
    else:
        with reporter.task("load model", None):
            model, tok, src = load_model(recipe.model)
        reader = None
    calib = None
    if recipe.needs_calibration():
        with reporter.task(f"calibration tokens ({recipe.calibration.source})", None):
            calib = calibration_ids(tok, recipe)
    res = quantize_model(model, out, recipe, tokenizer=tok, source=src.spec, calib_ids=calib, reporter=reporter,
                         reader=reader, fresh=fresh)
    if "seconds" in res:
        res["seconds"] = round(time.perf_counter() - t0, 2)
    return res


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise MoeqError("--device cuda: no CUDA device is available here")


def calibration_ids(tokenizer, recipe: Recipe) -> torch.Tensor:
    """``samples`` random windows of ``seqlen`` tokens from the calibration text (seeded)."""
    from moeq.data.corpus import load_text
    c = recipe.calibration
    if tokenizer is None:
        raise MoeqError("calibration needs a tokenizer and this model has none; use a data-free method")
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
                   reader=None, fresh: bool = False) -> dict[str, Any]:
    """Quantize decoder layer by decoder layer and write the artifact.

    ``reader`` None: ``model`` is in memory and is left running the packed weights. With a
    ``CheckpointReader``, ``model`` is a meta-device skeleton: each group is read from the shards, processed,
    written and released, so peak memory is one layer plus the calibration activations.
    With ``calib_ids`` every layer is calibrated on the outputs of the already-quantized layers before it.
    An interrupted run leaves its finished layers in ``.<out>.moeq-tmp``; the same command resumes there
    (``fresh`` discards them)."""
    from moeq.parallel import from_env
    plan = Plan(recipe, find_targets(model))
    if not plan.calibrated:
        calib_ids = None
    dist = from_env()
    t0 = time.perf_counter()
    key = run_key(plan, source, calib_ids)
    err = None
    writer = None
    if dist.main:
        try:
            writer = ArtifactWriter(Path(out), key, fresh=fresh)
        except MoeqError as e:
            err = str(e)
    err = dist.broadcast(err)
    if err is not None:
        raise MoeqError(err)
    if not dist.main:
        writer = ArtifactWriter(Path(out), key, join=True)
    if writer.resumed and dist.main:
        reporter.log(f"resuming: {len(writer.resumed)} finished groups found in {writer.tmp}")
    run = Run(model, plan, calib_ids, reader, reporter, dist, writer)
    try:
        run.execute()
        dist.barrier()
        if not dist.main:
            return {"rank": dist.rank}
        writer.refresh()
        manifest = build_manifest(plan, source, writer, calib_ids)
        if tokenizer is not None:
            tokenizer.save_pretrained(writer.tmp)
        config = model.config.to_dict()
        config["quantization_config"] = {"quant_method": "moeq", "methods": plan.recipe.method_label()}
        path = writer.commit([g.label for g in run.groups], manifest, config)
    except MoeqError:
        if dist.main:
            writer.abort()
        raise
    except KeyboardInterrupt:  # Ctrl-C / SIGTERM: the group being written is finished, so it is kept
        writer.settle()
        raise
    return {"path": str(path), **manifest["totals"], "seconds": round(time.perf_counter() - t0, 2),
            "resumed_groups": len(writer.resumed), "workers": dist.world,
            "fallback_names": [n for n, e in writer.entries.items() if e.get("fallback")],
            "fallback_entries": {n: {"calib_tokens": e.get("calib_tokens"), "fallback": e["fallback"]}
                                 for n, e in writer.entries.items() if e.get("fallback")}}


def build_manifest(plan: Plan, source, writer: ArtifactWriter, calib_ids) -> dict[str, Any]:
    recipe = plan.recipe
    return {
        "tool": f"moeq {__version__}",
        "source": {"model": source},
        "recipe": recipe.model_dump(exclude={"method", "options", "include_lm_head"}),
        "calibration": None if calib_ids is None else {**recipe.calibration.model_dump(),
                                                       "tokens": int(calib_ids.numel()), "split": "calib",
                                                       "layer_inputs": layer_inputs(plan)},
        "totals": totals(writer.entries, writer.kept, writer.shared),
    }
