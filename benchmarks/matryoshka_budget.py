"""Matryoshka bit allocation per expert under a budget, against uniform precision at the same bytes, one run.

    python benchmarks/matryoshka_budget.py                   # tiny-moe, experts at an average of 3 bits

Quantizes the model once with ``moeq quantize --method matryoshka`` (defaults), then extracts three artifacts from
it with ``moeq extract``: ``--budget B`` (the exact MILP allocation), ``--budget B --solver greedy`` (the marginal-gain
baseline) and ``--bits B --attention-bits 8`` (uniform; attention is pinned at 8 bits in the budgeted ones too); each
of these runs as its own ``moeq`` process, as a user would run it. Then evaluates the three in one pass against the
float model (``moeq.eval.perplexity.compare``, as ``moeq eval A B C --baseline MODEL`` does): perplexity and KL on
every window of the embedded eval split by default, float32 compute (bf16 rounding would be noise at this scale),
and the paired per-window NLL difference of each against uniform with its standard error (windows as samples), so
a difference can be told from noise. Writes benchmarks/results/matryoshka_budget_<model>.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def moeq(*args: str) -> float:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "moeq", *args], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"moeq {' '.join(args)} failed:\n{r.stderr[-2000:]}")
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--budget", type=float, default=3.0)
    ap.add_argument("--windows", type=int, default=0, help="the first N eval windows (0: all)")
    ap.add_argument("-O", "--option", action="append", default=[], help="matryoshka option key=value (moeq quantize -O)")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="moeq-budget-"))
    try:
        art = work / "art"
        q_s = moeq("quantize", a.model, "--method", "matryoshka", "-o", str(art), *[x for o in a.option for x in ("-O", o)])
        b = f"{a.budget:g}"
        variants = {"milp": ["--budget", b], "greedy": ["--budget", b, "--solver", "greedy"],
                    "uniform": ["--bits", b, "--attention-bits", "8"]}
        rows, paths = [], {}
        for name, opts in variants.items():
            x_s = moeq("extract", str(art), *opts, "-o", str(work / name))
            paths[name] = work / name
            man = json.loads((work / name / "moeq.json").read_text())
            rows.append({"variant": name, "extract": f"moeq extract ART {' '.join(opts)}", "extract_s": round(x_s, 1),
                         "total_bytes": man["totals"]["total_bytes"], "allocation": man.get("allocation")})
        rows = evaluate(a.model, paths, rows, a.windows)
        out = {"model": a.model, "budget": a.budget, "windows": a.windows, "options": a.option, "quantize_s": round(q_s, 1),
               "rows": rows}
        path = a.json or Path(__file__).parent / "results" / f"matryoshka_budget_{a.model}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"float ppl {rows[0]['baseline_ppl']:.4f}; {rows[0]['protocol']}")
        print("| variant | ppl | ppl - float | KL (nats) | mean NLL vs uniform per token (x1e-4) ± SE | bytes |")
        print("|---|---|---|---|---|---|")
        for r in rows:
            d = r["vs_uniform"]
            print(f"| {r['variant']} | {r['ppl']:.4f} | {r['ppl'] - r['baseline_ppl']:+.4f} | {r['kl_mean']:.6f} | "
                  f"{1e4 * d['mean']:+.2f} ± {1e4 * d['se']:.2f} | {r['total_bytes']:,} |")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def evaluate(model: str, paths: dict[str, Path], rows: list[dict], windows: int) -> list[dict]:
    """Perplexity, KL and the paired per-window NLL difference against ``uniform`` of every artifact in one pass
    (float32 compute, the float model as the baseline, measured once)."""
    from moeq import api
    from moeq.data.corpus import load_text
    from moeq.eval.perplexity import compare, tokenize_windows
    from moeq.models.loader import load_model
    from reference import paired_nll, set_threads
    set_threads()
    base, tok, _ = load_model(model)
    wins = tokenize_windows(tok, load_text("wiki", "eval"), 512, windows or None)
    models = [api.load(str(p), dtype=torch.float32)[0] for p in paths.values()]
    res = compare(models, wins, baseline=base.float())
    uni = res[list(paths).index("uniform")]
    for row, r in zip(rows, res):
        row.update(ppl=r.ppl, baseline_ppl=r.extra["baseline_ppl"], kl_mean=r.kl_mean, protocol=r.describe(),
                   vs_uniform=paired_nll(r, uni))
        print(json.dumps({k: v for k, v in row.items() if k != "allocation"}), flush=True)
    return rows


if __name__ == "__main__":
    main()
