"""``moeq run RECIPE``: quantize, evaluate and check the recipe's ``expect``; ``moeq recipes``: the shipped ones."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from moeq.cli.common import console, err_console, one_line_errors, options_text, table, write_json

SHIPPED = Path(__file__).resolve().parents[2] / "recipes"  # the source tree's recipes/ (an editable install's)


def default_output(path: Path, recipe) -> Path:
    return Path(recipe.output) if recipe is not None and recipe.output else Path("out") / Path(path).stem


def _kept(kwargs) -> str:
    from moeq.cli.quantize import _kept as kept
    from moeq.recipes import load_recipe
    out = kwargs.get("output")
    if out is None:
        try:
            out = default_output(kwargs["recipe"], load_recipe(kwargs["recipe"]))
        except Exception:  # noqa: BLE001 - only to name the output in this message
            out = Path("out") / Path(kwargs["recipe"]).stem
    return kept({"output": out})


@one_line_errors(on_interrupt=_kept)
def run(
    recipe: Annotated[Path, typer.Argument(help="YAML recipe: model, rules, calibration, eval and expect")],
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="artifact directory to create "
                                                   "[default: the recipe's output, else out/<recipe name>]")] = None,
    fresh: Annotated[bool, typer.Option("--fresh", help="discard the resume state of an interrupted run")] = False,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write quantize + eval + checks as JSON")] = None,
):
    """Run a whole recipe: quantize its model as its rules say, evaluate the artifact as its [bold]eval[/] says
    against the recipe's model, and check its [bold]expect[/] limits.

    Exit code 0 when every limit holds, 1 (with a table of what failed) when one does not, 2 on bad input."""
    from moeq.paths import check_input_file, check_output_dir, check_output_file
    check_input_file(recipe, "recipe")
    check_output_file(json_out)
    from moeq.recipes import load_recipe
    r = load_recipe(recipe)
    r.methods()                    # bad methods and options fail before any loading
    out = output or default_output(recipe, r)
    check_output_dir(out)

    from moeq import api
    from moeq.cli.eval import result_table
    from moeq.progress import RichReporter
    with RichReporter(err_console) as rep:
        res = api.run(r, out, reporter=rep, fresh=fresh)
    rules = "; ".join(f"{', '.join(x.targets)} -> {x.method} {options_text(x.options)}".strip()
                      for x in r.resolved().rules)
    console.print(f"[bold]moeq run[/]: {escape(str(recipe))} ({escape(rules)}) -> {escape(str(res['quantize']['path']))}"
                  f", quantized in {res['quantize']['seconds']:.1f} s", highlight=False)
    result_table(res["eval"], "[bold]evaluation[/]")
    failed = [c for c in res["checks"] if not c["ok"]]
    if res["checks"]:
        expect_table(res["checks"])
    else:
        console.print("[yellow]the recipe sets no expect: nothing was checked[/]")
    write_json(json_out, res)
    if failed:
        err_console.print(f"[bold red]expect not met[/]: {', '.join(c['key'] for c in failed)} "
                          f"({len(failed)} of {len(res['checks'])} limits)", highlight=False)
        raise typer.Exit(1)


def expect_table(checks: list[dict]) -> None:
    t = table("[bold]expect[/]")
    t.add_column("limit", no_wrap=True)
    t.add_column("metric")
    t.add_column("value", justify="right", no_wrap=True)
    t.add_column("", no_wrap=True)
    t.add_column("limit", justify="right", no_wrap=True)
    t.add_column("result", no_wrap=True)
    for c in checks:
        value = "not measured" if c["value"] is None else c["fmt"].format(c["value"])
        t.add_row(c["key"], escape(c["metric"]), value, c["op"], c["fmt"].format(c["limit"]),
                  "[green]pass[/]" if c["ok"] else "[bold red]FAIL[/]")
    console.print(t)


_SHORT = {"ppl_ratio": "ratio", "bits_per_param": "bits", "decode_speedup": "decode x", "prefill_speedup": "prefill x"}


def _targets(targets: list[str]) -> str:
    from moeq.recipes import DEFAULT_TARGETS
    return "linears" if targets == DEFAULT_TARGETS else ", ".join(targets)


@one_line_errors
def recipes(
    folder: Annotated[Optional[Path], typer.Argument(help="folder of recipes [default: the shipped recipes/]")] = None,
):
    """List the recipes (shipped with moeq, or in FOLDER): model, rules, evaluation and expect limits.

    [bold]moeq run recipes/NAME.yaml[/] runs one; the tiny-moe ones are what CI runs."""
    from moeq.errors import MoeqError
    from moeq.recipes import load_recipe
    folder = folder or SHIPPED
    files = sorted(Path(folder).glob("*.yaml")) if Path(folder).is_dir() else []
    if not files:
        raise MoeqError(f"{folder}: no recipes (*.yaml) there")
    t = table(f"[bold]recipes[/] in {escape(str(folder))}")
    for col, width in (("recipe, model", None), ("rules", 22), ("eval", 10), ("expect", 14)):
        t.add_column(col, overflow="fold", no_wrap=width is None, min_width=width)
    bad = []
    for f in files:
        try:
            r = load_recipe(f)
            r.methods()
        except MoeqError as e:
            bad.append(str(e))
            continue
        rules = "\n".join(f"{_targets(x.targets)}: {x.method} {options_text(x.options)}".strip()
                          for x in r.resolved().rules)
        e = r.eval_spec()
        ev = f"{e.protocol} {e.seqlen}x{e.windows or 'all'}" + (f" @{e.bits}b" if e.bits else "")
        lim = r.expect.limits() if r.expect else {}
        t.add_row(escape(f"{f.stem}\n  {r.model or 'tiny-moe'}"), escape(rules), escape(ev),
                  escape("\n".join(f"{_SHORT.get(k[4:], k[4:])}{'<=' if k.startswith('max_') else '>='}{v:g}"
                                   for k, v in lim.items()) or "-"))
    console.print(t)
    for line in bad:
        err_console.print(f"[bold red]invalid:[/] {escape(line)}", highlight=False, soft_wrap=True)
    if bad:
        raise typer.Exit(2)
