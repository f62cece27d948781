from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import console, human_bytes, human_count, one_line_errors, options_text, table, write_json


def module_type(d: dict) -> str:
    """A per-module-type row's label: what kind of weight and which one (``attention q_proj``, ``expert down_proj``)."""
    return f"{d['role']} {d['kind'].rsplit('.', 1)[-1]}"


@one_line_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="artifact directory written by `moeq quantize`")],
    experts: Annotated[bool, typer.Option(help="one row per expert")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the summary as JSON ('-' for stdout)")] = None,
):
    """Show what an artifact holds: per module type and per expert codec, bits/param and bytes; totals.

    Reads the manifest, the config and the shard headers only (all validated), no tensor. An artifact written
    by [bold]moeq extract --budget[/] also shows the width each expert got (layer x expert)."""
    from moeq.paths import check_artifact_dir, check_output_file
    check_artifact_dir(artifact)
    check_output_file(json_out)
    from moeq import api
    info = api.inspect(artifact)
    tot = info["totals"]
    head = table(f"[bold]{escape(str(artifact))}[/]  ({escape(info['tool'])})", show_header=False)
    head.add_column(style="bold")
    head.add_column(overflow="fold")
    head.add_row("source model", escape(str(info["source"].get("model"))))
    for i, rule in enumerate(info["rules"]):
        rule_text = f"{', '.join(rule['targets'])} -> {rule['method']} {options_text(rule['options'])}"
        head.add_row(f"rule {i}", escape(rule_text))
    if info["ignore"]:
        head.add_row("ignore", escape(", ".join(info["ignore"])))
    cal = info["calibration"]
    head.add_row("calibration", "none (data-free)" if not cal else escape(
        f"{cal['source']} ({cal['split']} split), {cal['samples']} x {cal['seqlen']} tokens, seed {cal['seed']}"))
    head.add_row("size", f"{human_bytes(tot['total_bytes'])}: {human_bytes(tot['quantized_bytes'])} packed "
                 f"({tot['bits_per_param']:.3f} bits/param), {human_bytes(tot['kept_bytes'])} kept as stored")
    console.print(head)
    t = table("per module type")
    for c in ("module type", "method", "codec", "tensors", "params", "size", "bits/param"):
        t.add_column(c, justify="left" if c in ("module type", "method", "codec") else "right", no_wrap=True)
    from moeq.recipes import KINDS
    for d in sorted(info["kinds"].values(), key=lambda d: (KINDS.index(d["role"]), d["kind"], d["method"])):
        t.add_row(escape(module_type(d)), escape(d["method"]), escape(d["codec"]), str(d["tensors"]),
                  human_count(d["params"]), human_bytes(d["bytes"]), f"{d['bits_per_param']:.3f}")
    t.add_section()
    if info["shared"]:
        t.add_row("shared tables", "", "", str(len(info["shared"])), "", human_bytes(tot["shared_bytes"]), "")
    t.add_row("[bold]quantized", "", "", str(tot["tensors"]), human_count(tot["quantized_params"]),
              human_bytes(tot["quantized_bytes"]), f"{tot['bits_per_param']:.3f}")
    t.add_row("kept (as stored)", "", "", str(len(info["kept"])), "", human_bytes(tot["kept_bytes"]), "")
    t.add_row("[bold]artifact", "", "", "", "", human_bytes(tot["total_bytes"]), "")
    console.print(t)
    if experts and info["experts"]:
        rows = list(info["experts"].values())
        several = len({(d["layer"], d["module"]) for d in rows}) > len({d["layer"] for d in rows})
        e = table("per expert")
        cols = ["layer"] + (["module"] if several else []) + ["expert", "method", "params", "size", "bits/param",
                                                                "routed tokens", "fallback"]
        for c in cols:
            e.add_column(c, justify="right" if c in ("layer", "expert", "params", "size", "bits/param",
                                                      "routed tokens") else "left")
        for d in rows:
            cells = ["-" if d["layer"] is None else str(d["layer"])]
            if several:
                cells.append(escape(d["module"].split(f".{d['layer']}.", 1)[-1]))
            cells += [str(d["expert"]), escape(d["method"]), human_count(d["params"]), human_bytes(d["bytes"]),
                      f"{d['bits_per_param']:.3f}", "-" if d["calib_tokens"] is None else f"{d['calib_tokens']:,}",
                      f"[yellow]{escape(d['fallback'].split(':')[0])}[/]" if d["fallback"] else ""]
            e.add_row(*cells)
        console.print(e)
        starved = sum(1 for d in rows if d["fallback"])
        if starved:
            console.print(f"[yellow]fallback[/]: {starved} experts got too few routed calibration tokens: [yellow]rtn[/] "
                          "= quantized data-free, [yellow]route_all[/] = statistics from every calibration token")
    if info["allocation"] is not None:
        from moeq.cli.extract import allocation_rows, grid_table
        alloc = info["allocation"]
        t = table("allocation (moeq extract --budget)", show_header=False)
        t.add_column(style="bold", no_wrap=True)
        t.add_column(overflow="fold")
        for k, v in allocation_rows(alloc):
            t.add_row(k, v)
        console.print(t)
        console.print(grid_table(alloc["grid"]))
    write_json(json_out, info)
