"""QMoE quality and size: ternary and 2-bit GPTQ against round-to-nearest on the same grids, per model, one run.

    python benchmarks/qmoe.py                                    # tiny-moe, smollm2-moe, smollm2-135m
    python benchmarks/qmoe.py --models tiny-moe --variants qmoe_t,qmoe_t_gw --windows 32

Variants (``--variants``, comma-separated; moeq ``qmoe`` with these options):
  qmoe_t     ternary GPTQ, per-expert Hessians from routed tokens          {}
  qmoe_2     2-bit GPTQ (uniform per row, affine-packed)                    {grid: 2bit}
  rtn_t      ternary round-to-nearest                                      {calibrate: false}
  rtn_2      2-bit round-to-nearest                                        {grid: 2bit, calibrate: false}
  qmoe_t_gw  ternary GPTQ, affinity-weighted Hessians (MoEQuant)           {gate_weighted: true}
  qmoe_t_ra  ternary GPTQ, experts with < 64 routed tokens get forced routing {min_tokens: 64, starved: route_all}
What is compressed: the routed experts of an MoE model (QMoE's default: attention, routers, embeddings and the
head stay as stored); the dense MLPs of a dense model (SmolLM2-135M has no experts; a rule selects ``dense_mlp``).
Columns: ppl (protocol gptq, seqlen 512, the first N windows of the embedded eval split, fp32 compute), bits/param
of the compressed weights counting codes, row metadata and their share of the dictionaries, the whole artifact on
disk against the model's bf16 checkpoint (2 bytes a parameter), the zero fraction of the ternary symbols, fallbacks.
Prints a table and writes benchmarks/results/qmoe.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from moeq import api
from moeq.eval.perplexity import perplexity
from moeq.formats.manifest import MANIFEST
from moeq.recipes import Recipe
from reference import float_reference

VARIANTS = {"qmoe_t": {}, "qmoe_2": {"grid": "2bit"}, "rtn_t": {"calibrate": False},
            "rtn_2": {"grid": "2bit", "calibrate": False}, "qmoe_t_gw": {"gate_weighted": True},
            "qmoe_t_ra": {"min_tokens": 64, "starved": "route_all"}}
DEFAULT_MODELS = "tiny-moe,smollm2-moe,smollm2-135m"
DEFAULT_VARIANTS = "qmoe_t,qmoe_2,rtn_t,rtn_2,qmoe_t_gw"


def has_experts(model) -> bool:
    from moeq.models.adapter import find_targets
    return any(t.role == "expert" for t in find_targets(model))


def artifact_stats(path: Path) -> dict:
    """bits/param of the compressed weights (their parts plus the dictionaries they share), the artifact's bytes
    on disk, mean zero fraction of the ternary symbols, fallbacks."""
    man = json.loads((path / MANIFEST).read_text())
    ents = man["tensors"]
    params = sum(e["shape"][0] * e["shape"][1] for e in ents.values())
    part_bits = sum(e["bits_per_param"] * e["shape"][0] * e["shape"][1] for e in ents.values())
    shared_bytes = man["totals"].get("shared_bytes", 0)
    zeros = [e["quant_info"]["p_zero"] for e in ents.values() if "p_zero" in e.get("quant_info", {})]
    disk = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return {"params": params, "bits_per_param": round((part_bits + 8 * shared_bytes) / params, 4),
            "disk_bytes": disk, "p_zero": round(sum(zeros) / len(zeros), 4) if zeros else None,
            "fallbacks": man["totals"].get("fallbacks", 0)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--variants", default=DEFAULT_VARIANTS)
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rows = []
    for model in a.models.split(","):
        base, tok, windows, rb = float_reference(model, a.seqlen, a.windows)
        n_params = sum(p.numel() for p in base.parameters())
        targets = ["expert"] if has_experts(base) else ["dense_mlp"]
        rows.append({"model": model, "variant": "float", "ppl": rb.ppl, "ratio": 1.0, "targets": "-",
                     "bits_per_param": 32.0, "disk_vs_bf16": 2.0, "seconds": 0.0})
        calib = None
        for name in a.variants.split(","):
            opts = VARIANTS[name]
            recipe = Recipe(model=model, rules=[{"targets": targets, "method": "qmoe", "options": opts}],
                            calibration={"samples": a.calib_samples, "seqlen": a.seqlen})
            if calib is None and recipe.needs_calibration():
                calib = api.calibration_ids(tok, recipe)
            m = copy.deepcopy(base)
            d = Path(tempfile.mkdtemp(prefix="moeq-qmoe-"))
            t = time.perf_counter()
            try:
                api.quantize_model(m, d / "art", recipe, source=model,
                                   calib_ids=calib if recipe.needs_calibration() else None)
                secs = time.perf_counter() - t
                st = artifact_stats(d / "art")
            finally:
                shutil.rmtree(d, ignore_errors=True)
            r = perplexity(m, windows)
            row = {"model": model, "variant": name, "options": opts, "targets": ",".join(targets), "ppl": r.ppl,
                   "ratio": r.ppl / rb.ppl, "seconds": round(secs, 1), **st,
                   "disk_vs_bf16": round(st["disk_bytes"] / (2 * n_params), 4)}
            rows.append(row)
            print(f"{model:13s} {name:10s} ppl {r.ppl:12.3f} x{row['ratio']:9.3f}  {st['bits_per_param']:.3f} b/p  "
                  f"artifact {row['disk_vs_bf16']:.3f} of bf16  p0 {st['p_zero']}  fallbacks {st['fallbacks']}  "
                  f"{secs:.0f}s", flush=True)
            del m
        del base
    print()
    print(f"protocol: gptq, seqlen {a.seqlen}, {a.windows} windows; calibration {a.calib_samples} x {a.seqlen}")
    print("| model | variant | targets | ppl | vs float | bits/param (compressed) | artifact / bf16 checkpoint | "
          "P(0) | fallbacks | quantize s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['variant']} | {r['targets']} | {r['ppl']:.3f} | {r['ratio']:.3f} | "
              f"{r['bits_per_param']:.3f} | {r['disk_vs_bf16']:.3f} | {r.get('p_zero') or '-'} | "
              f"{r.get('fallbacks', '-')} | {r['seconds']} |")
    out = Path(a.json or Path(__file__).parent / "results" / "qmoe.json")
    out.write_text(json.dumps({"protocol": f"gptq seqlen {a.seqlen} windows {a.windows}",
                               "calibration": f"{a.calib_samples} x {a.seqlen}", "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
