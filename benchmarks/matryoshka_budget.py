"""Matryoshka bit allocation per expert under a budget, against uniform precision at the same bytes, one run.

    python benchmarks/matryoshka_budget.py                   # tiny-moe, experts at an average of 3 bits

Quantizes the model once with ``moeq quantize --method matryoshka`` (defaults), then extracts three artifacts from
it with ``moeq extract``: ``--budget B`` (the exact MILP allocation), ``--budget B --solver greedy`` (the marginal-gain
baseline) and ``--bits B --attention-bits 8`` (uniform; attention is pinned at 8 bits in the budgeted ones too), and
evaluates each with ``moeq eval --baseline MODEL`` (perplexity and KL in the same run, bf16 compute). Each step runs
as its own ``moeq`` process, as a user would run it. Writes benchmarks/results/matryoshka_budget_<model>.json.
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
    ap.add_argument("--windows", type=int, default=32)
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
        rows = []
        for name, opts in variants.items():
            x_s = moeq("extract", str(art), *opts, "-o", str(work / name))
            js = work / f"{name}.json"
            moeq("eval", str(work / name), "--baseline", a.model, "--windows", str(a.windows), "--no-speed",
                 "--json", str(js))
            res = json.loads(js.read_text())
            man = json.loads((work / name / "moeq.json").read_text())
            rows.append({"variant": name, "extract": f"moeq extract ART {' '.join(opts)}", "extract_s": round(x_s, 1),
                         "ppl": res["ppl"]["value"], "baseline_ppl": res["baseline_ppl"],
                         "kl_mean": res.get("kl_mean"), "total_bytes": res["total_bytes"],
                         "bits_per_param": res["bits_per_param"], "allocation": man.get("allocation")})
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "allocation"}), flush=True)
        out = {"model": a.model, "budget": a.budget, "windows": a.windows, "options": a.option, "quantize_s": round(q_s, 1),
               "rows": rows}
        path = a.json or Path(__file__).parent / "results" / f"matryoshka_budget_{a.model}.json"
        path.write_text(json.dumps(out, indent=1) + "\n")
        print(f"| variant | ppl | KL | bytes | bits/param |\n|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['variant']} | {r['ppl']:.4f} | {r['kl_mean']} | {r['total_bytes']:,} | {r['bits_per_param']} |")
        print(f"wrote {path}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
