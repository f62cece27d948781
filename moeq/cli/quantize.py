from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import (console, err_console, human_bytes, human_count, one_line_errors, options_text,
                              table, write_json)
from moeq.errors import MoeqError


def _kept(kwargs) -> str:
    """What an interrupted ``moeq quantize`` leaves (the resume state) and how to go on."""
    out = kwargs.get("output")
    if out is None and kwargs.get("recipe"):
        from moeq.recipes import load_recipe
        try:
            out = load_recipe(kwargs["recipe"]).output
        except Exception:  # noqa: BLE001 - only to name the output in this message
            out = None
    out = Path(out or "out/moeq")
    tmp = out.with_name(f".{out.name}.moeq-tmp")
    groups = len(list((tmp / "records").glob("*.json"))) if tmp.is_dir() else 0
    if not groups:
        partial = f" (partial state in {tmp})" if tmp.is_dir() else ""
        return f"no finished layer to keep; {out} was not written{partial}"
    return (f"{groups} finished layer groups kept in {tmp}; run the same command again to resume "
            f"from there, or add --fresh to discard them")


@one_line_errors(on_interrupt=_kept)
def quantize(
    model: Annotated[Optional[str], typer.Argument(help="zoo name, local HF directory, .gguf file or hub id "
                                                        "[default: tiny-moe, the embedded model]")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="artifact directory to create "
                                                   "[default: the recipe's output, else out/moeq]")] = None,
    method: Annotated[Optional[str], typer.Option(help="quantization method (see `moeq methods`)")] = None,
    recipe: Annotated[Optional[Path], typer.Option(help="YAML recipe; command-line options override it")] = None,
    threshold: Annotated[Optional[float], typer.Option(help="int8: activation outlier threshold, 0 disables the decomposition")] = None,
    weight_only: Annotated[bool, typer.Option("--weight-only", help="int8: int8 weights, float activations")] = False,
    smooth: Annotated[Optional[float], typer.Option(help="int8: SmoothQuant alpha; negative turns smoothing off")] = None,
    act_group: Annotated[Optional[int], typer.Option(help="int8: activation scales per group of N inputs")] = None,
    option: Annotated[Optional[list[str]], typer.Option("--option", "-O", help="any method option as key=value")] = None,
    lm_head: Annotated[bool, typer.Option("--lm-head", help="also quantize the output head")] = False,
    calib_samples: Annotated[Optional[int], typer.Option(help="calibration windows")] = None,
    calib_seqlen: Annotated[Optional[int], typer.Option(help="calibration window length in tokens")] = None,
    calib_data: Annotated[Optional[str], typer.Option(help="'wiki' (embedded, calibration split), a text file or hf:NAME")] = None,
    max_stats_mb: Annotated[Optional[float], typer.Option(help="cap on one layer's calibration statistics (Hessians), "
                                                                "MB; beyond it the layer is calibrated in chunks")] = None,
    device: Annotated[Optional[str], typer.Option(help="cpu | cuda: where calibration forwards and GPTQ run")] = None,
    dump_recipe: Annotated[bool, typer.Option("--dump-recipe", help="print the resolved recipe (YAML) and exit")] = False,
    workers: Annotated[int, typer.Option(min=1, help="processes (torch.distributed, gloo on CPU); the artifact is "
                                                     "byte-identical to a one-process run")] = 1,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard the resume state of an interrupted run "
                                                        "(.<output>.moeq-tmp) and start over")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the summary as JSON ('-' for stdout)")] = None,
):
    """Quantize a model and write a packed, self-describing artifact directory.

    An interrupted run (Ctrl-C, SIGTERM, a crash) keeps its finished layers in [bold].<output>.moeq-tmp[/].
    The same command resumes there; [bold]--fresh[/] discards them and starts over."""
    import os
    import sys

    from moeq.paths import check_input_file, check_local_spec, check_output_dir, check_output_file
    # every path first: one line now, not a traceback after the model is loaded
    check_input_file(recipe, "recipe")
    check_local_spec(model)
    if calib_data not in (None, "wiki") and not calib_data.startswith("hf:"):
        check_input_file(calib_data, "--calib-data")
    if not dump_recipe:
        if output is not None:
            check_output_dir(output)
        check_output_file(json_out)

    from moeq import api
    from moeq.parallel import launch
    from moeq.progress import Reporter, RichReporter
    from moeq.recipes import Recipe, load_recipe

    r = build_recipe(load_recipe(recipe) if recipe else Recipe(), model, method, option, lm_head,
                     {"threshold": threshold, "mode": "weight_only" if weight_only else None,
                      "smooth_alpha": smooth if smooth is None or smooth >= 0 else _OFF, "act_group": act_group},
                     {"samples": calib_samples, "seqlen": calib_seqlen, "source": calib_data, "device": device,
                      "max_stats_mb": max_stats_mb})
    r.methods()                    # fail on bad methods and options before any loading
    if dump_recipe:
        sys.stdout.write(r.dump())
        return
    if output is None:
        output = Path(r.output or "out/moeq")
        check_output_dir(output)
    if workers > 1 and "WORLD_SIZE" not in os.environ:
        argv = [a for a in sys.argv[1:] if not a.startswith("--workers")]
        if "--workers" in sys.argv:
            i = sys.argv.index("--workers")
            argv = sys.argv[1:i] + sys.argv[i + 2:]
        raise typer.Exit(launch(argv, workers))
    if int(os.environ.get("RANK", "0")) != 0:
        api.quantize(r, output, reporter=Reporter(), fresh=fresh)
        return
    with RichReporter(err_console) as rep:
        res = api.quantize(r, output, reporter=rep, fresh=fresh)
    t = table(f"[bold]moeq quantize[/]: {escape(r.model or 'tiny-moe')} -> {escape(str(res['path']))}",
              show_header=False)
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for i, rule in enumerate(r.resolved().rules):
        t.add_row(f"rule {i}", escape(f"{', '.join(rule.targets)} -> {rule.method} {options_text(rule.options)}"))
    t.add_row("quantized", f"{res['tensors']} tensors, {human_count(res['quantized_params'])} params -> "
              f"{human_bytes(res['quantized_bytes'])} ({res['bits_per_param']:.3f} bits/param)")
    t.add_row("kept", f"{human_bytes(res['kept_bytes'])} (embeddings, norms, routers, head: as stored)")
    names = f" ({', '.join(res['fallback_names'][:4])}{', ...' if res['fallbacks'] > 4 else ''})"
    t.add_row("calibration fallbacks", str(res["fallbacks"]) + (escape(names) if res["fallbacks"] else ""))
    if res.get("resumed_groups"):
        t.add_row("resumed", f"{res['resumed_groups']} layer groups from an interrupted run")
    t.add_row("time", f"{res['seconds']:.1f} s (loading included)")
    console.print(t)
    fallback_table(res.get("fallback_entries") or {})
    write_json(json_out, res)


_OFF = object()  # a flag that sets an option to null (--smooth -1)


def build_recipe(r, model, method, option, lm_head, flags: dict, calibration: dict):
    """The recipe the command line says: ``r`` (from --recipe, or empty) with the model, a one-rule method from
    --method / -O / the method flags (``flags``: option -> value, None = not given), and calibration overrides."""
    import yaml
    from pydantic import ValidationError

    from moeq.recipes import Recipe
    if model is not None:
        r.model = model
    opts = {k: (None if v is _OFF else v) for k, v in flags.items() if v is not None}
    for kv in option or []:
        if "=" not in kv:
            raise MoeqError(f"--option {kv!r}: expected key=value")
        k, v = kv.split("=", 1)
        opts[k] = yaml.safe_load(v)
    if r.rules and (method is not None or opts or lm_head):
        raise MoeqError("the recipe has rules; --method, --option and the method flags build a one-rule recipe "
                        "and cannot be combined with them (edit the rules instead)")
    if not r.rules:
        if method is not None:
            r.method = method
        r.options = {**r.options, **opts}
        r.include_lm_head = r.include_lm_head or lm_head
    for field, val in calibration.items():
        if val is not None:
            setattr(r.calibration, field, val)
    try:
        return Recipe(**r.model_dump()).with_source(r.source)  # re-validate the merged recipe
    except ValidationError as e:
        from moeq.recipes import _explain
        raise MoeqError("recipe: " + _explain(e, Recipe, (), None)) from None


FALLBACK_ROWS = 12   # the summary lists this many fallbacks; `moeq inspect --experts` lists them all


def fallback_table(entries: dict[str, dict]) -> None:
    """Which weights fell back from calibration, with their routed tokens and why (the manifest's words)."""
    if not entries:
        return
    t = table(f"calibration fallbacks ({len(entries)})")
    t.add_column("weight", overflow="fold")
    t.add_column("routed tokens", justify="right")
    t.add_column("fallback: why", overflow="fold")
    for name, e in list(entries.items())[:FALLBACK_ROWS]:
        t.add_row(escape(name), "-" if e["calib_tokens"] is None else f"{e['calib_tokens']:,}", escape(e["fallback"]))
    if len(entries) > FALLBACK_ROWS:
        t.add_row(f"... {len(entries) - FALLBACK_ROWS} more (moeq inspect --experts)", "", "")
    console.print(t)
