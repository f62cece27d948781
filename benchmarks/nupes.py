"""NUPES against uniform RTN, GPTQ and the peers (HQQ, optimum-quanto) at the same bits, one model, one run.

    python benchmarks/nupes.py --model tiny-moe                              # W4/W3/W2, g64 and per-row
    python benchmarks/nupes.py --model smollm2-135m --configs 4:64,3:64 --methods rtn,nupes_df,nupes_dd,gptq,hqq

Each config is BITS:GROUP (GROUP 0 = per row). Methods (``--methods``, comma-separated):
  rtn        uniform asymmetric min/max round-to-nearest          (moeq ``rtn``)
  rtn_mse    the same with each row's/group's range MSE-clipped   (moeq ``rtn -O clip=mse``)
  rtn_absmax uniform SYMMETRIC absmax round-to-nearest on NUPES's own storage (one float16 scale per row/group, no
             zero point: the same bits/param as NUPES): moeq ``nupes -O exponent=1 -O grid=sym``, the levels
             -Q..Q with Q = 2^(b-1) - 1; at 2 bits, where sym has 3 levels, the 4 uniform levels +-0.5, +-1.5
             (``grid=half``, a = 1). NUPES at a = 1 is exactly this quantizer, so nupes_df against it isolates the
             exponent
  rtn_sym_mse  the same symmetric uniform RTN with each row's/group's range MSE-clipped (``clip=mse``, a = 1)
  nupes_df_sym  NUPES data-free on the symmetric grid (3+ bits)
  nupes_df_absmax  NUPES data-free with absmax scales (``clip=absmax``)
  nupes_df_mse  NUPES data-free with each row's/group's scale MSE-clipped for its exponent (``clip=mse``)
  nupes_df   NUPES data-free: per-weight exponent search, half-integer grid, default clip (mse at 2-3 bits,
             absmax at 4+: moeq ``nupes``); the exponent searched on absmax scales, then the scales clipped for it
  nupes_df_joint  the same with each exponent scored on its own clipped scales (``search_scales=clipped``; the
             default of stop 21-22)
  nupes_dd   NUPES data-driven: GPTQ on the power grid + gradient refinement (moeq ``nupes -O mode=data_driven``)
  gptq       GPTQ on the uniform grid (moeq ``gptq``)
  hqq        HQQLinear(nbits, group_size, fp32 compute) on every nn.Linear but lm_head (hqq 0.2.8)
  quanto     optimum.quanto qint4/qint2 weights (its default group 64; no 3-bit or per-row type: skipped)
moeq methods quantize every decoder linear and expert (the default kinds) sequentially calibrated where they need
data; the peers replace nn.Linear modules only, so the fused experts of an MoE model stay float for them (the
"coverage" column: quantized params / the params moeq quantizes). bits/param counts every byte the quantized
weights hold (codes, scales, zero points, LUTs). Protocol: gptq, seqlen 512, the first N windows of the embedded
eval split, fp32 compute (``../shared/anchors/PROTOCOL.md``); calibration N x 512 tokens of the calibration split.
Prints a table and writes benchmarks/results/nupes_<model>.json.
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

DEFAULT_CONFIGS = "4:64,3:64,2:64,4:0,3:0,2:0"
DEFAULT_METHODS = "rtn,rtn_mse,rtn_absmax,rtn_sym_mse,nupes_df,gptq,hqq,quanto,nupes_dd"
MOEQ = {"rtn": ("rtn", {}), "rtn_mse": ("rtn", {"clip": "mse"}),
        "rtn_absmax": ("nupes", {"mode": "data_free", "exponent": 1.0, "grid": "sym", "clip": "absmax"}),
        "rtn_sym_mse": ("nupes", {"mode": "data_free", "exponent": 1.0, "grid": "sym", "clip": "mse"}),
        "nupes_df_absmax": ("nupes", {"mode": "data_free", "clip": "absmax"}),
        "nupes_df": ("nupes", {"mode": "data_free"}), "nupes_df_sym": ("nupes", {"mode": "data_free", "grid": "sym"}),
        "nupes_df_mse": ("nupes", {"mode": "data_free", "clip": "mse"}),
        "nupes_df_joint": ("nupes", {"mode": "data_free", "search_scales": "clipped"}),
        "nupes_dd": ("nupes", {"mode": "data_driven"}), "gptq": ("gptq", {})}


def held_bytes(module: torch.nn.Module) -> int:
    """Bytes of every tensor a module holds (parameters, buffers, tensor-subclass inner tensors, HQQ's W_q and
    meta), each storage once; biases excluded."""
    seen, total = set(), 0

    def add(t):
        nonlocal total
        if isinstance(t, torch.Tensor):
            if hasattr(t, "__tensor_flatten__"):
                names, _ = t.__tensor_flatten__()
                for n in names:
                    add(getattr(t, n))
                return
            key = t.untyped_storage().data_ptr()
            if key not in seen:
                seen.add(key)
                total += t.untyped_storage().nbytes()
        elif isinstance(t, dict):
            for v in t.values():
                add(v)

    for m in module.modules():
        for name, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
            if name != "bias":
                add(t)
        for name in ("W_q", "meta"):  # HQQLinear keeps its codes and scale/zero outside the state dict
            add(getattr(m, name, None))
    return total


def linears(model) -> dict[str, torch.nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")}


def peer_hqq(model, bits: int, group: int) -> tuple[int, int]:
    from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
    cfg = BaseQuantizeConfig(nbits=bits, group_size=group or None)
    params = nbytes = 0
    for name, lin in linears(model).items():
        params += lin.weight.numel()      # before HQQLinear, which frees the source weight
        q = HQQLinear(lin, cfg, compute_dtype=torch.float32, device="cpu")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, q)
        nbytes += held_bytes(q)
    return params, nbytes


def peer_quanto(model, bits: int, group: int) -> tuple[int, int] | None:
    from optimum.quanto import freeze, qint2, qint4, quantize
    wt = {4: qint4, 2: qint2}.get(bits)
    if wt is None or group not in (64,):
        return None
    names = list(linears(model))
    params = sum(m.weight.numel() for m in linears(model).values())
    quantize(model, weights=wt, exclude=["lm_head"])
    freeze(model)
    return params, sum(held_bytes(model.get_submodule(n)) for n in names)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--configs", default=DEFAULT_CONFIGS)
    ap.add_argument("--methods", default=DEFAULT_METHODS)
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("-O", "--option", action="append", default=[], help="extra nupes option key=value")
    ap.add_argument("--json", default=None)
    ap.add_argument("--resume", action="store_true",
                    help="keep the rows already in the JSON (same model, protocol and calibration) and run the rest")
    a = ap.parse_args()
    extra_nupes = {k: json.loads(v) if v[:1] in "0123456789-[{tfn" else v
                   for k, v in (o.split("=", 1) for o in a.option)}
    base, tok, windows, rb = float_reference(a.model, a.seqlen, a.windows)
    out = Path(a.json or Path(__file__).parent / "results" / f"nupes_{a.model}.json")
    head = {"model": a.model, "protocol": rb.describe(), "calibration": f"{a.calib_samples} x {a.seqlen}"}
    rows = [{"config": "float", "method": "-", "options": {}, "ppl": rb.ppl, "ratio": 1.0, "bits_per_param": 32.0,
             "coverage": 1.0, "seconds": 0.0}]
    moeq_params = None
    if a.resume and out.exists():
        old = json.loads(out.read_text())
        if {k: old.get(k) for k in head} != head:
            raise SystemExit(f"{out} was written for {[old.get(k) for k in head]}, not {list(head.values())}")
        rows, moeq_params = old["rows"], old.get("moeq_params")
        print(f"resuming: {len(rows) - 1} rows from {out}", flush=True)
    done = {(r["config"], r["method"]) for r in rows}

    def save():
        out.write_text(json.dumps({**head, "moeq_params": moeq_params, "rows": rows}, indent=1) + "\n")

    calib = None
    methods = a.methods.split(",")
    configs = [tuple(int(x) for x in c.split(":")) for c in a.configs.split(",")]
    labels = [f"W{bits} g{group or 'row'}" for bits, group in configs]
    for (bits, group), label in zip(configs, labels):
        for name in methods:
            if (label, name) in done:
                continue
            m = copy.deepcopy(base)
            t = time.perf_counter()
            info: dict = {}
            if name in MOEQ:
                method, opts = MOEQ[name]
                opts = {"bits": bits, "group_size": group, **opts, **(extra_nupes if method == "nupes" else {})}
                if bits == 2 and opts.get("grid") == "sym":  # 3 levels: no exponent to search, no 2-bit code
                    if name not in ("rtn_absmax", "rtn_sym_mse"):
                        print(f"{label:10s} {name:9s} skipped (sym grid at 2 bits)", flush=True)
                        continue
                    opts["grid"] = "half"
                recipe = Recipe(model=a.model, method=method, options=opts,
                                calibration={"samples": a.calib_samples, "seqlen": a.seqlen})
                if calib is None and recipe.needs_calibration():
                    calib = api.calibration_ids(tok, recipe)
                d = tempfile.mkdtemp(prefix="moeq-bench-")
                try:
                    res = api.quantize_model(m, f"{d}/art", recipe, source=a.model,
                                             calib_ids=calib if recipe.needs_calibration() else None)
                    if method == "nupes":
                        man = json.loads((Path(d) / "art" / MANIFEST).read_text())
                        exps = [e.get("quant_info", {}).get("exponent") for e in man["tensors"].values()]
                        exps = [x for x in exps if x is not None]
                        if exps:
                            info["exponent_median"] = round(float(torch.tensor(exps).median()), 3)
                            info["exponent_range"] = [round(min(exps), 3), round(max(exps), 3)]
                finally:
                    shutil.rmtree(d, ignore_errors=True)
                moeq_params = res["quantized_params"] if "quantized_params" in res else moeq_params
                bpp, coverage = res["bits_per_param"], 1.0
            else:
                peer = peer_hqq(m, bits, group) if name == "hqq" else peer_quanto(m, bits, group)
                if peer is None:
                    print(f"{label:10s} {name:9s} skipped (no such type)", flush=True)
                    continue
                params, nbytes = peer
                bpp = 8 * nbytes / params
                coverage = params / moeq_params if moeq_params else None
            q_s = time.perf_counter() - t
            r = perplexity(m, windows)
            row = {"config": label, "method": name, "options": opts if name in MOEQ else {"bits": bits, "group": group},
                   "ppl": r.ppl, "ratio": r.ppl / rb.ppl, "bits_per_param": round(bpp, 4),
                   "coverage": None if coverage is None else round(coverage, 3), "seconds": round(q_s, 1), **info}
            rows.append(row)
            save()
            print(f"{label:10s} {name:9s} ppl {r.ppl:14.4f}  x{row['ratio']:10.4f}  {bpp:6.3f} bits/param  "
                  f"coverage {row['coverage']}  {q_s:6.1f}s  {json.dumps(info) if info else ''}", flush=True)
            del m
    print()
    print(f"{a.model}: {rb.describe()}, calibration {a.calib_samples} x {a.seqlen}")
    print("| config | method | ppl | vs float | bits/param | coverage | quantize s | exponent (median, range) |")
    print("|---|---|---|---|---|---|---|---|")
    order = {"-": -1, **{m: i for i, m in enumerate(methods)}}
    for r in sorted(rows, key=lambda r: (labels.index(r["config"]) if r["config"] in labels else -1,
                                         order.get(r["method"], len(order)))):
        ex = f"{r['exponent_median']} {r['exponent_range']}" if "exponent_median" in r else ""
        print(f"| {r['config']} | {r['method']} | {r['ppl']:.4f} | {r['ratio']:.4f} | {r['bits_per_param']:.3f} | "
              f"{r['coverage']} | {r['seconds']} | {ex} |")
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
