"""Data-free NUPES against uniform RTN, every variant in ONE evaluation pass with paired per-window differences.

    python benchmarks/nupes_paired.py --model tiny-moe --config 2:64            # every eval window
    python benchmarks/nupes_paired.py --model smollm2-135m --config 3:64 --windows 16

``benchmarks/nupes.py`` is the whole matrix (data-driven, GPTQ, HQQ, quanto); this script settles small
differences between the data-free rows: each variant quantizes a copy of the model, then one
``moeq.eval.perplexity.compare`` pass (fp32, gptq protocol, seqlen 512) scores all of them against the float
model, and each row reports its per-token NLL difference against the first variant with a standard error over
windows. Variants (``--variants``):
  rtn_absmax   symmetric uniform, absmax scale (nupes a = 1, clip absmax; half grid at 2 bits)
  rtn_sym_mse  the same with MSE-clipped scales (nupes a = 1, clip mse)
  nupes_df_absmax  NUPES data-free, exponent searched, absmax scales
  nupes_df     NUPES data-free, defaults (clip auto: mse at 2-3 bits, exponent searched on absmax scales, then clipped)
  nupes_df_joint  the same with each exponent scored on its own clipped scales (search_scales=clipped)
  rtn          affine min/max uniform RTN (moeq rtn: a zero point per group)
Writes benchmarks/results/nupes_paired_<model>_W<b>g<g>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from pathlib import Path

from moeq import api
from moeq.data.corpus import load_text
from moeq.eval.perplexity import compare, tokenize_windows
from moeq.models.loader import load_model
from moeq.recipes import Recipe
from reference import paired_nll, set_threads


def variants(bits: int) -> dict[str, tuple[str, dict]]:
    uniform = {"mode": "data_free", "exponent": 1.0, "grid": "sym" if bits > 2 else "half"}
    return {"rtn_absmax": ("nupes", {**uniform, "clip": "absmax"}), "rtn_sym_mse": ("nupes", {**uniform, "clip": "mse"}),
            "nupes_df_absmax": ("nupes", {"mode": "data_free", "clip": "absmax"}),
            "nupes_df": ("nupes", {"mode": "data_free"}),
            "nupes_df_joint": ("nupes", {"mode": "data_free", "search_scales": "clipped"}), "rtn": ("rtn", {})}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--config", default="2:64", help="BITS:GROUP (GROUP 0 = per row)")
    ap.add_argument("--windows", type=int, default=0, help="the first N eval windows (0: all)")
    ap.add_argument("--variants", default="rtn_absmax,rtn_sym_mse,nupes_df_absmax,nupes_df,nupes_df_joint,rtn")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    bits, group = (int(x) for x in a.config.split(":"))
    set_threads()
    base, tok, _ = load_model(a.model)
    wins = tokenize_windows(tok, load_text("wiki", "eval"), 512, a.windows or None)
    table = variants(bits)
    names = a.variants.split(",")
    models, seconds = [], {}
    for name in names:
        method, opts = table[name]
        m = copy.deepcopy(base)
        t = time.perf_counter()
        with tempfile.TemporaryDirectory() as d:
            api.quantize_model(m, f"{d}/art", Recipe(model=a.model, method=method,
                                                     options={"bits": bits, "group_size": group, **opts}),
                               source=a.model)
        seconds[name] = round(time.perf_counter() - t, 1)
        models.append(m)
    res = compare(models, wins, baseline=base)
    rows = [{"variant": n, "ppl": r.ppl, "kl_mean": r.kl_mean, "quantize_s": seconds[n],
             f"vs_{names[0]}": paired_nll(r, res[0])} for n, r in zip(names, res)]
    print(f"{a.model} W{bits} g{group or 'row'}: float ppl {res[0].extra['baseline_ppl']:.4f}; {res[0].describe()}")
    print(f"| variant | ppl | KL | NLL/token vs {names[0]} (x1e-4) ± SE | quantize s |\n|---|---|---|---|---|")
    for r in rows:
        d = r[f"vs_{names[0]}"]
        print(f"| {r['variant']} | {r['ppl']:.4f} | {r['kl_mean']:.5f} | {1e4 * d['mean']:+.2f} ± {1e4 * d['se']:.2f} | "
              f"{r['quantize_s']} |")
    path = a.json or Path(__file__).parent / "results" / f"nupes_paired_{a.model}_W{bits}g{group}.json"
    path.write_text(json.dumps({"model": a.model, "config": a.config, "protocol": res[0].describe(),
                                "baseline_ppl": res[0].extra["baseline_ppl"], "rows": rows}, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
