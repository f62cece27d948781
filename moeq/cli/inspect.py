from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from moeq.cli.common import console, one_line_errors, write_json


@one_line_errors
def inspect(
    artifact: Annotated[Path, typer.Argument(help="artifact directory written by `moeq quantize`")],
    experts: Annotated[bool, typer.Option(help="one row per expert")] = True,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the summary as JSON ('-' for stdout)")] = None,
):
    """Show what an artifact holds: per module type and per expert codec, bits/param and bytes; totals."""
    from moeq import api
    info = api.inspect(artifact)
    tot = info["totals"]
    head = Table(title=f"{artifact}  ({info['tool']})", show_header=False)
    head.add_row("source model", str(info["source"].get("model")))
    for i, rule in enumerate(info["rules"]):
        head.add_row(f"rule {i}", f"{', '.join(rule['targets'])} -> {rule['method']}  {rule['options'] or ''}")
    if info["ignore"]:
        head.add_row("ignore", ", ".join(info["ignore"]))
    cal = info["calibration"]
    head.add_row("calibration", "none (data-free)" if not cal else f"{cal['source']} ({cal['split']} split), "
                 f"{cal['samples']} x {cal['seqlen']} tokens, seed {cal['seed']}")
    console.print(head)
    t = Table(title="per module type")
    for c in ("module type", "method", "codec", "tensors", "params", "bytes", "bits/param"):
        t.add_column(c, justify="right" if c not in ("module type", "method", "codec") else "left")
    for d in info["kinds"].values():
        t.add_row(d["kind"], d["method"], d["codec"], str(d["tensors"]), f"{d['params']:,}", f"{d['bytes']:,}",
                  f"{d['bits_per_param']:.3f}")
    if info["shared"]:
        t.add_row("shared tables", "", "", str(len(info["shared"])), "", f"{tot['shared_bytes']:,}", "")
    t.add_row("[bold]total quantized", "", "", str(tot["tensors"]), f"{tot['quantized_params']:,}",
              f"{tot['quantized_bytes']:,}", f"{tot['bits_per_param']:.3f}")
    t.add_row("kept (16/32-bit)", "", "", str(len(info["kept"])), "", f"{tot['kept_bytes']:,}", "")
    t.add_row("[bold]artifact", "", "", "", "", f"{tot['total_bytes']:,}", "")
    console.print(t)
    if experts and info["experts"]:
        e = Table(title="per expert")
        for c in ("module", "expert", "method", "params", "bytes", "bits/param", "routed tokens", "fallback"):
            e.add_column(c)
        for d in info["experts"].values():
            e.add_row(d["module"], str(d["expert"]), d["method"], f"{d['params']:,}", f"{d['bytes']:,}",
                      f"{d['bits_per_param']:.3f}", "-" if d["calib_tokens"] is None else str(d["calib_tokens"]),
                      "[yellow]data-free (no tokens)[/]" if d["fallback"] else "")
        console.print(e)
    write_json(json_out, info)
