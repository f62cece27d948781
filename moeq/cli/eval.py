from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import console, err_console, human_bytes, one_line_errors, parse_size, table, write_json


@one_line_errors
def evaluate(
    models: Annotated[Optional[list[str]], typer.Argument(
        help="artifact directories or any model specs (zoo name, HF directory, .gguf) [default: tiny-moe]; several "
             "are compared in one table against one baseline; ART@R is a matryoshka artifact at R bits")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="reference model for KL and ppl ratio "
                                                         "[default: the artifact's source model]")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the reference model")] = False,
    corpus: Annotated[str, typer.Option(help="'wiki' (embedded eval split), a text file, or hf:NAME[:CONFIG]")] = "wiki",
    protocol: Annotated[str, typer.Option(help="gptq | llamacpp (llama.cpp: second half of each n_ctx window "
                                               "scored) | sliding (windows advance by --stride)")] = "gptq",
    seqlen: Annotated[int, typer.Option(help="window length in tokens (llama.cpp's n_ctx)")] = 512,
    stride: Annotated[Optional[int], typer.Option(help="sliding: tokens a window advances [default: seqlen/2]")] = None,
    windows: Annotated[Optional[int], typer.Option(help="evaluate the first N windows [default: 64]")] = 64,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    dtype: Annotated[str, typer.Option(help="compute dtype of the model and its baseline: auto (the checkpoint's; "
                                            "bf16 where that is fp32 or unrecorded) | bf16 | fp16 | fp32")] = "auto",
    speed: Annotated[bool, typer.Option(help="measure prefill/decode tokens/s, the machine's memory bandwidth and "
                                             "each model's effective bandwidth in decode")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON ('-' for stdout)")] = None,
    markdown: Annotated[Optional[Path], typer.Option(help="write the comparison table as Markdown")] = None,
    plot: Annotated[Optional[Path], typer.Option(help="draw perplexity (or --plot-metric kl) against bits/param "
                                                      "as a PNG (needs matplotlib: moeq[report])")] = None,
    plot_metric: Annotated[str, typer.Option(help="ppl | kl")] = "ppl",
    max_memory: Annotated[Optional[str], typer.Option(
        help="RAM per model (e.g. 2GB): models larger are placed with accelerate (device_map auto) and the decoder "
             "layers that do not fit run from a disk offload")] = None,
    allow_long_context: Annotated[bool, typer.Option(
        "--allow-long-context", help="allow --seqlen beyond the model's context (a warning instead of an error)")] = False,
    bits: Annotated[Optional[int], typer.Option(
        help="a matryoshka artifact at this width, reading only its bit-planes (no extraction)")] = None,
):
    """Perplexity, mean KL against the float model, speed, memory and bytes/param of packed models.

    One model: a table of its metrics beside the baseline's. Several (or [bold]--markdown[/] / [bold]--plot[/]):
    one row per model, the baseline measured once on the same windows."""
    from moeq.paths import check_input_file, check_local_spec, check_output_file
    models = list(models or [None])
    for m in models:  # paths first: one line before anything is imported or loaded
        check_local_spec(m if m is None or "@" not in m else m.rpartition("@")[0])
    check_local_spec(baseline, "--baseline")
    check_output_file(json_out)
    check_output_file(markdown, "--markdown")
    check_output_file(plot, "--plot")
    if corpus != "wiki" and not corpus.startswith("hf:"):
        check_input_file(corpus, "--corpus")

    from pydantic import ValidationError

    from moeq.errors import MoeqError
    from moeq.recipes import EvalSpec

    try:
        spec = EvalSpec(corpus=corpus, protocol=protocol, seqlen=seqlen, stride=stride, windows=windows,
                        batch_size=batch_size, dtype=dtype, speed=speed)
    except ValidationError as e:
        err = e.errors()[0]
        name = str(err["loc"][0]).replace("_", "-") if err["loc"] else "protocol"
        raise MoeqError(f"--{name}: {err['msg'].removeprefix('Value error, ')}") from None
    if plot_metric not in ("ppl", "kl"):
        raise MoeqError(f"--plot-metric {plot_metric!r}: expected ppl or kl")
    if plot is not None:
        from moeq.eval.report import check_plot_backend
        check_plot_backend()
    if bits is not None and len(models) > 1:
        raise MoeqError("--bits with several models: name each width as ART@R instead")
    mem = parse_size(max_memory)

    from moeq import api
    from moeq.progress import RichReporter
    if len(models) == 1 and markdown is None and plot is None:
        target, at = api.split_bits(models[0]) if models[0] else (None, None)
        with RichReporter(err_console) as rep:
            res = api.evaluate(target, baseline, spec, speed=speed, reporter=rep, max_memory=mem,
                               use_baseline=not no_baseline, dtype=dtype, allow_long_context=allow_long_context,
                               bits=bits if bits is not None else at, bandwidth=speed)
        result_table(res, f"[bold]moeq eval[/]: {escape(models[0] or 'tiny-moe')}")
        write_json(json_out, res)
        return
    targets = [api.split_bits(m) if m else (None, None) for m in models]
    if bits is not None:
        targets = [(targets[0][0], bits)]
    with RichReporter(err_console) as rep:
        report = api.evaluate_many(targets, baseline, spec, speed=speed, reporter=rep, max_memory=mem,
                                   use_baseline=not no_baseline, dtype=dtype, allow_long_context=allow_long_context,
                                   bandwidth=speed)
    comparison_table(report)
    from moeq.eval import report as rpt
    if markdown is not None:
        markdown.write_text(rpt.markdown(report))
        err_console.print(f"wrote {markdown}")
    if plot is not None:
        rpt.plot(report, plot, plot_metric)
        err_console.print(f"wrote {plot}")
    write_json(json_out, report)


def comparison_table(report: dict) -> None:
    """Several models in one table, the baseline first (``moeq.eval.report.COLUMNS``)."""
    from moeq.eval import report as rpt
    console.print("[bold]moeq eval[/]: " + escape("\n".join(rpt.caption(report))), highlight=False)
    t = table()
    for i, h in enumerate(rpt.headers()):
        t.add_column(escape(h), justify="left" if i < 2 else "right", no_wrap=i > 0, overflow="fold")
    for row in rpt.rows(report):
        t.add_row(*map(escape, row))
    console.print(t)


def result_table(res: dict, title: str) -> None:
    """One model beside its baseline: perplexity, ratio, KL, bits/param, size, speed, bandwidth, memory."""
    title = f"{title}\n{escape(res['ppl']['describe'])}, corpus {escape(res['corpus'])}"
    if res.get("baseline"):
        title += f"\nbaseline: {escape(str(res['baseline']))} (measured in the same run)"
    elif res.get("baseline_skipped"):
        title += f"\n[yellow]no baseline[/]: {escape(res['baseline_skipped'])}"
    if res.get("long_context"):
        title += f"\n[yellow]seqlen beyond the model's context of {res['context']} tokens[/]"
    console.print(title, highlight=False)
    t = table()
    t.add_column("metric", no_wrap=True)
    t.add_column("moeq", justify="right", no_wrap=True)
    t.add_column("baseline", justify="right", no_wrap=True)
    t.add_column("ratio", justify="right", no_wrap=True)
    b = res.get("baseline_ppl")
    t.add_row("compute dtype", res["dtype"], res["dtype"] if b else "-", "")
    t.add_row("perplexity", f"{res['ppl']['value']:.4f}", f"{b:.4f}" if b else "-",
              f"{res['ppl_ratio']:.4f}" if b else "-")
    if res.get("kl_mean") is not None:
        t.add_row("mean KL(baseline || moeq), nats", f"{res['kl_mean']:.5f}", "", "")
    if res.get("bits") is not None:
        t.add_row("width (nested entries)", f"{res['bits']} bits", "", "")
        t.add_row("code bytes read", human_bytes(res["code_bytes_read"]), "", "")
    if "bits_per_param" in res:
        t.add_row("bits/param (quantized weights)", f"{res['bits_per_param']:.3f}", "", "")
        t.add_row("artifact size", human_bytes(res["total_bytes"]), "", "")
    sp, bs = res.get("speed"), res.get("baseline_speed")
    if sp:
        for k, label in (("prefill_tok_s", "prefill tokens/s"), ("decode_tok_s", "decode tokens/s")):
            if k in sp:
                t.add_row(label, f"{sp[k]:.1f}", f"{bs[k]:.1f}" if bs else "-",
                          f"{sp[k] / bs[k]:.2f}x" if bs else "-")
    bw, bbw = res.get("bandwidth") or {}, res.get("baseline_bandwidth") or {}
    if bw.get("effective_gb_s") is not None:
        t.add_row("effective bandwidth (held bytes x decode tok/s)", f"{bw['effective_gb_s']:.2f} GB/s",
                  f"{bbw['effective_gb_s']:.2f} GB/s" if bbw.get("effective_gb_s") else "-", "")
        if bw.get("bandwidth_pct") is not None:
            t.add_row(f"  % of the machine's {res['bandwidth_gb_s']:.1f} GB/s", f"{bw['bandwidth_pct']:.1f} %",
                      f"{bbw['bandwidth_pct']:.1f} %" if bbw.get("bandwidth_pct") is not None else "-", "")
    t.add_row("load time", f"{res['load_seconds']:.2f} s", "", "")
    if res.get("placement"):
        p = res["placement"]
        t.add_row("decoder layers in RAM / on disk", f"{p['cpu_layers']} / {p['disk_layers']}", "", "")
    if res.get("memory_mb") is not None:
        t.add_row("peak memory (load + speed test)", f"{res['memory_mb']:.0f} MB", "", "")
    t.add_row("peak RSS (process)", f"{res['peak_rss_mb']:.0f} MB", "", "")
    console.print(t)
