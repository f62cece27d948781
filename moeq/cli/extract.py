from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import console, err_console, human_bytes, one_line_errors, table, write_json


@one_line_errors
def extract(
    artifact: Annotated[Path, typer.Argument(help="matryoshka artifact directory (nested widths, codec bitplanes)")],
    output: Annotated[Path, typer.Option("--output", "-o", help="artifact directory to create (absent or empty)")],
    bits: Annotated[Optional[int], typer.Option(help="every nested entry at this width")] = None,
    budget: Annotated[Optional[str], typer.Option(
        help="a width per expert within this budget: average bits per expert weight (3, 3.5bits) or the bytes of "
             "the artifact's tensors (750MB, 1.2GiB)")] = None,
    attention_bits: Annotated[Optional[int], typer.Option(
        help="width of the nested entries that are not routed experts (attention, dense and shared MLPs) "
             "(default: with --budget their largest width, with --bits the experts' width)")] = None,
    solver: Annotated[str, typer.Option(help="--budget: milp (exact) | greedy (marginal gain per byte)")] = "milp",
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write the summary as JSON ('-' for stdout)")] = None,
):
    """A smaller artifact from a matryoshka one: one width, or a width per expert within a budget.

    No re-quantization: [bold]--bits R[/] keeps R bit-planes of every weight; [bold]--budget B[/] gives each
    expert of each layer the width of least estimated error that fits B (the squared gate probabilities of its
    routed calibration tokens x proxy output error per width: hot, trusted experts get more bits), the other
    nested weights pinned at [bold]--attention-bits[/]."""
    from moeq.paths import check_artifact_dir, check_output_dir, check_output_file
    check_artifact_dir(artifact)
    check_output_dir(output)
    check_output_file(json_out)
    from moeq import api
    from moeq.progress import RichReporter
    with RichReporter(err_console) as rep:
        res = api.extract(artifact, output, bits=bits, budget=budget, attention_bits=attention_bits, solver=solver,
                          reporter=rep)
    src, new = res["source_totals"], res["totals"]
    head = table(f"[bold]moeq extract[/]: {escape(str(artifact))} -> {escape(res['path'])}", show_header=False)
    head.add_column(style="bold", no_wrap=True)
    head.add_column(overflow="fold")
    alloc = res["allocation"]
    if alloc is None:
        other = "" if attention_bits is None else f"; other nested entries at {attention_bits} bits"
        head.add_row("widths", f"every expert at {bits} bits{other}")
    else:
        for k, v in allocation_rows(alloc):
            head.add_row(k, v)
        head.add_row("average", f"{res['average_bits']:.3f} code bits per expert weight")
    head.add_row("size", f"{human_bytes(src['total_bytes'])} -> {human_bytes(new['total_bytes'])} "
                 f"({src['bits_per_param']:.3f} -> {new['bits_per_param']:.3f} bits/param of the quantized weights)")
    head.add_row("time", f"{res['seconds']:.1f} s ({res['plan_seconds']:.2f} s reading and allocating, "
                 f"{res['write_seconds']:.1f} s writing)")
    console.print(head)
    if alloc is not None:
        from moeq.formats.inspect import allocation_grid
        console.print(grid_table(allocation_grid(alloc)))
    write_json(json_out, res)


def allocation_rows(alloc: dict) -> list[tuple[str, str]]:
    """(label, text) rows describing an allocation record (shared by ``moeq extract`` and ``moeq inspect``)."""
    how = alloc["solver"] + ("" if alloc["status"] == alloc["solver"] else f" ({alloc['status']})")
    budget = f"{escape(how)}, --budget {escape(alloc['budget'])} = {human_bytes(alloc['budget_bytes'])}"
    rows = [("allocation", budget + " for the nested entries")]
    if alloc["data_free"]:
        why = ("[yellow]data-free[/]: no routed-token counts, so errors are the weight MSE and every expert counts "
               "once (the allocation is blind to hot experts)")
    else:
        why = f"routed calibration tokens x per-width error (metric {escape(alloc['metric'])})"
    rows.append(("error weights", why))
    if alloc["metric"] == "mixed":
        rows.append(("", "[yellow]mixed metrics[/]: some experts' errors are weight MSE, on another scale"))
    widths: dict[int, int] = {}
    for u in alloc["units"].values():
        widths[u["bits"]] = widths.get(u["bits"], 0) + 1
    rows.append(("experts", ", ".join(f"{n} at {w} bits" for w, n in sorted(widths.items(), reverse=True))))
    pinned: dict[int, int] = {}
    for w in alloc["pinned"].values():
        pinned[w] = pinned.get(w, 0) + 1
    if pinned:
        rows.append(("pinned", ", ".join(f"{n} at {w} bits" for w, n in sorted(pinned.items(), reverse=True))
                     + " (attention, dense and shared MLPs)"))
    rows.append(("chosen", f"{human_bytes(alloc['chosen_bytes'])}, estimated error {alloc['error']:.4g}"))
    u = alloc.get("uniform")
    if u is not None:
        ratio = f"{alloc['error'] / u['error']:.3f}x its error" if u["error"] > 0 else "its error"
        rel = alloc["chosen_bytes"] / max(u["bytes"], 1)
        rows.append((f"vs uniform {u['bits']} bits", (f"{human_bytes(u['bytes'])}, estimated error {u['error']:.4g}: "
                                                       f"the allocation has {ratio} at {rel:.3f}x its bytes")))
    return rows


def grid_table(grid: list[dict]):
    """Expert x layer widths: one row per layer, expert 0 first, one digit a width, grouped by 8."""
    labels = [str(r["layer"]) for r in grid]
    if len(set(labels)) < len(labels):  # two experts modules in one layer index (encoder / decoder)
        labels = [r["module"] for r in grid]
    n = max(len(r["bits"]) for r in grid)
    t = table("expert widths (bits)")
    t.add_column("layer", justify="right", overflow="fold")
    t.add_column(f"experts 0..{n - 1}", overflow="fold")
    t.add_column("avg bits", justify="right", no_wrap=True)
    t.add_column("size", justify="right", no_wrap=True)
    for label, r in zip(labels, grid):
        cells = ["·" if b is None else str(b) for b in r["bits"]]
        sep = "" if all(len(c) == 1 for c in cells) else ","  # widths of one digit (bitplanes: 2..8) run together
        groups = " ".join(sep.join(cells[i:i + 8]) for i in range(0, len(cells), 8))
        t.add_row(escape(label), groups, f"{r['average_bits']:.3f}", human_bytes(r["bytes"]))
    return t
