from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import console, err_console, human_bytes, one_line_errors, parse_size, table, write_json


@one_line_errors
def evaluate(
    model: Annotated[Optional[str], typer.Argument(help="artifact directory, or any model spec (zoo name, "
                                                        "HF directory, .gguf) [default: tiny-moe]")] = None,
    baseline: Annotated[Optional[str], typer.Option(help="reference model for KL and ppl ratio "
                                                         "[default: the artifact's source model]")] = None,
    no_baseline: Annotated[bool, typer.Option("--no-baseline", help="skip the reference model")] = False,
    corpus: Annotated[str, typer.Option(help="'wiki' (embedded eval split), a text file, or hf:NAME[:CONFIG]")] = "wiki",
    protocol: Annotated[str, typer.Option(help="gptq | llamacpp")] = "gptq",
    seqlen: Annotated[int, typer.Option(help="window length in tokens")] = 512,
    windows: Annotated[Optional[int], typer.Option(help="evaluate the first N windows [default: 64]")] = 64,
    batch_size: Annotated[int, typer.Option(help="windows per forward pass")] = 8,
    dtype: Annotated[str, typer.Option(help="compute dtype of the model and its baseline: auto (the checkpoint's; "
                                            "bf16 where that is fp32 or unrecorded) | bf16 | fp16 | fp32")] = "auto",
    speed: Annotated[bool, typer.Option(help="measure prefill/decode tokens/s")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write results as JSON ('-' for stdout)")] = None,
    max_memory: Annotated[Optional[str], typer.Option(
        help="RAM per model (e.g. 2GB): models larger are placed with accelerate (device_map auto) and the decoder "
             "layers that do not fit run from a disk offload")] = None,
    allow_long_context: Annotated[bool, typer.Option(
        "--allow-long-context", help="allow --seqlen beyond the model's context (a warning instead of an error)")] = False,
    bits: Annotated[Optional[int], typer.Option(
        help="a matryoshka artifact at this width, reading only its bit-planes (no extraction)")] = None,
):
    """Perplexity, mean KL against the float model, speed, memory and bytes/param of a packed model."""
    from moeq.paths import check_input_file, check_local_spec, check_output_file
    check_local_spec(model)  # paths first: one line before anything is imported or loaded
    check_local_spec(baseline, "--baseline")
    check_output_file(json_out)
    if corpus != "wiki" and not corpus.startswith("hf:"):
        check_input_file(corpus, "--corpus")

    from pydantic import ValidationError

    from moeq.errors import MoeqError
    from moeq.recipes import EvalSpec

    try:
        spec = EvalSpec(corpus=corpus, protocol=protocol, seqlen=seqlen, windows=windows, batch_size=batch_size)
    except ValidationError as e:
        raise MoeqError(f"--{str(e.errors()[0]['loc'][0]).replace('_', '-')}: {e.errors()[0]['msg']}") from None
    if protocol not in ("gptq", "llamacpp"):
        raise MoeqError(f"unknown protocol {protocol!r} (gptq | llamacpp)")
    if dtype not in ("auto", "bf16", "fp16", "fp32"):
        raise MoeqError(f"unknown dtype {dtype!r} (auto | bf16 | fp16 | fp32)")
    mem = parse_size(max_memory)

    from moeq import api
    from moeq.progress import RichReporter
    with RichReporter(err_console) as rep:
        res = api.evaluate(model, baseline, spec, speed=speed, reporter=rep, max_memory=mem,
                           use_baseline=not no_baseline, dtype=dtype, allow_long_context=allow_long_context,
                           bits=bits)
    title = (f"[bold]moeq eval[/]: {escape(model or 'tiny-moe')}\n"
             f"{escape(res['ppl']['describe'])}, corpus {escape(corpus)}")
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
    t.add_row("load time", f"{res['load_seconds']:.2f} s", "", "")
    if res.get("placement"):
        p = res["placement"]
        t.add_row("decoder layers in RAM / on disk", f"{p['cpu_layers']} / {p['disk_layers']}", "", "")
    t.add_row("peak RSS (process)", f"{res['peak_rss_mb']:.0f} MB", "", "")
    console.print(t)
    write_json(json_out, res)
