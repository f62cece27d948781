"""RTN vs GPTQ (uniform asymmetric b-bit, groups) on one model, against the float model measured in the same run.

    python benchmarks/gptq.py --model smollm2-135m                      # W4 g128, W4 g64, W3 g64, W4 per-row
    python benchmarks/gptq.py --model tiny-moe --configs 3:64,2:64 --expert-variants

Each config is BITS:GROUP (GROUP 0 = per row) and runs both ``rtn`` and ``gptq`` (sequential: each decoder
layer is calibrated on the outputs of the already-quantized layers). ``--expert-variants`` adds, for MoE models,
GPTQ with one Hessian pooled over all experts of a layer (instead of per-expert routed-token Hessians) and
with gate-probability-weighted Hessians. Every linear of the decoder except lm_head is quantized (the default
kinds). Protocol: gptq, seqlen 512, first N windows of the embedded eval split; calibration: N x 512 tokens of
the calibration split (seed 0). bits/param counts codes, scales and zero points of the quantized weights.
Prints a table and writes benchmarks/results/gptq_<model>.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time
from pathlib import Path


from moeq import api
from moeq.eval.perplexity import perplexity
from moeq.recipes import Recipe
from reference import float_reference

DEFAULT_CONFIGS = "4:128,4:64,3:64,4:0"


def variants(configs: str, expert_variants: bool, rtn: bool = True) -> list[tuple[str, str, dict]]:
    out = []
    for c in configs.split(","):
        bits, group = (int(x) for x in c.split(":"))
        base = {"bits": bits, "group_size": group}
        if rtn:
            out.append((f"W{bits} g{group or 'row'}", "rtn", base))
        out.append((f"W{bits} g{group or 'row'}", "gptq", base))
        if expert_variants:
            out.append((f"W{bits} g{group or 'row'}", "gptq", {**base, "experts": "pooled"}))
            out.append((f"W{bits} g{group or 'row'}", "gptq", {**base, "gate_weighted": True}))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--expert-variants", action="store_true")
    ap.add_argument("--no-rtn", action="store_true", help="skip the round-to-nearest rows")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base, tok, windows, rb = float_reference(a.model, a.seqlen, a.windows)
    rows = [{"config": "float", "method": "-", "options": {}, "ppl": rb.ppl, "ratio": 1.0, "bits_per_param": 32.0,
             "seconds": 0.0}]
    calib = None
    for label, method, opts in variants(a.configs, a.expert_variants, not a.no_rtn):
        recipe = Recipe(model=a.model, method=method, options=opts,
                        calibration={"samples": a.calib_samples, "seqlen": a.seqlen})
        if calib is None and recipe.needs_calibration():
            calib = api.calibration_ids(tok, recipe)
        m = copy.deepcopy(base)
        d = tempfile.mkdtemp(prefix="moeq-bench-")
        try:
            t = time.perf_counter()
            res = api.quantize_model(m, f"{d}/art", recipe, source=a.model,
                                     calib_ids=calib if recipe.needs_calibration() else None)
            q_s = time.perf_counter() - t
            r = perplexity(m, windows)
        finally:
            shutil.rmtree(d, ignore_errors=True)
        extra = {k: v for k, v in opts.items() if k not in ("bits", "group_size")}
        row = {"config": label, "method": method, "options": opts, "ppl": r.ppl, "ratio": r.ppl / rb.ppl,
               "bits_per_param": res["bits_per_param"], "seconds": round(q_s, 1), "fallbacks": res["fallbacks"]}
        rows.append(row)
        print(f"{label:12s} {method:5s} {json.dumps(extra):36s} ppl {r.ppl:10.4f}  x{row['ratio']:.4f}  "
              f"{res['bits_per_param']:.3f} bits/param  {q_s:6.1f}s  fallbacks {res['fallbacks']}", flush=True)
        del m
    print()
    print("| config | method | options | ppl | vs float | bits/param | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        extra = {k: v for k, v in r["options"].items() if k not in ("bits", "group_size")}
        print(f"| {r['config']} | {r['method']} | {json.dumps(extra) if extra else ''} | {r['ppl']:.4f} | "
              f"{r['ratio']:.4f} | {r['bits_per_param']:.3f} | {r['seconds']} |")
    out = Path(a.json or Path(__file__).parent / "results" / f"gptq_{a.model}.json")
    out.write_text(json.dumps({"model": a.model, "protocol": rb.describe(), "calibration": f"{a.calib_samples} x {a.seqlen}",
                               "rows": rows}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
