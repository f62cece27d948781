"""Perplexity / KL of int8 variants on one model, all against the float model measured in the same run.

    python benchmarks/int8_quality.py --model smollm2-135m --windows 64 \
        --variant default --variant 'threshold=0' --variant 'mode=weight_only'

Each --variant is a comma list of int8 options (key=value; 'none' for null). Prints a table and writes JSON.
Protocol: gptq, seqlen 512, first N windows of the embedded eval split (see ../shared/anchors/PROTOCOL.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import shutil
import tempfile
import time

import torch
import yaml

from moeq import api
from moeq.eval.perplexity import perplexity
from moeq.recipes import Recipe
from reference import float_reference


def parse_variant(s: str) -> dict:
    if s == "default":
        return {}
    out = {}
    for kv in s.split(","):
        k, v = kv.split("=")
        out[k] = yaml.safe_load(v) if v != "none" else None
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--variant", action="append", default=[])
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    base, tok, windows, rb = float_reference(a.model, a.seqlen, a.windows)
    rows = [{"variant": "float", "ppl": rb.ppl, "ratio": 1.0, "kl": 0.0}]
    for v in a.variant or ["default"]:
        if v.startswith("bnb"):
            rows.append(_peer_bnb(base, windows, rb.ppl, float(v.split("=")[1]) if "=" in v else 6.0))
            continue
        opts = parse_variant(v)
        recipe = Recipe(model=a.model, method="int8", options=opts)
        recipe.calibration.samples = a.calib_samples
        q, cfg = recipe.method_config()
        calib = api.calibration_ids(tok, recipe) if q.needs_calibration(cfg) else None
        m = copy.deepcopy(base)
        d = tempfile.mkdtemp()
        t = time.perf_counter()
        res = api.quantize_model(m, f"{d}/art", recipe, tokenizer=tok, source=a.model, calib_ids=calib)
        tq = time.perf_counter() - t
        manifest = json.load(open(f"{d}/art/moeq.json"))
        n_out = sum(len(e.get("parts", [])) and (e["bytes"] > 0) and
                    (1 if "outlier_idx" in e["parts"] else 0) for e in manifest["tensors"].values())
        r = perplexity(m, windows, baseline=base)
        row = {"variant": v, "options": cfg.model_dump(), "ppl": r.ppl, "ratio": r.ppl / rb.ppl, "kl": r.kl_mean,
               "bits_per_param": res["bits_per_param"], "tensors_with_outlier_cols": n_out,
               "outlier_cols": _outlier_cols(f"{d}/art"), "quantize_s": round(tq, 1)}
        rows.append(row)
        print(f"{v:40s} ppl {r.ppl:.4f} ratio {row['ratio']:.4f} KL {r.kl_mean:.5f} bits {row['bits_per_param']:.3f} "
              f"outlier cols {row['outlier_cols']} (in {n_out} tensors)", flush=True)
        shutil.rmtree(d)
        del m
    if a.json:
        json.dump({"model": a.model, "protocol": rb.describe(), "rows": rows}, open(a.json, "w"), indent=1)


def _peer_bnb(base, windows, base_ppl, threshold):
    """bitsandbytes LLM.int8 on the same model and windows (PROTOCOL.md: Linear8bitLt, has_fp16_weights=False,
    quantized by .to('cpu'), fp32 model, every nn.Linear but lm_head)."""
    import bitsandbytes as bnb
    m = copy.deepcopy(base)
    for name, mod in list(m.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{cname}".lstrip(".") != "lm_head":
                new = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                          has_fp16_weights=False, threshold=threshold)
                new.weight = bnb.nn.Int8Params(child.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
                if child.bias is not None:
                    new.bias = torch.nn.Parameter(child.bias.data.clone(), requires_grad=False)
                setattr(mod, cname, new.to("cpu"))
    m.eval()  # a fresh Linear8bitLt is in training mode, where bitsandbytes' CPU path dequantizes (weight-only)
    r = perplexity(m, windows, baseline=base)
    row = {"variant": f"bitsandbytes Linear8bitLt t={threshold}", "ppl": r.ppl, "ratio": r.ppl / base_ppl, "kl": r.kl_mean}
    print(f"{row['variant']:40s} ppl {r.ppl:.4f} ratio {row['ratio']:.4f} KL {r.kl_mean:.5f}", flush=True)
    return row


def _outlier_cols(path) -> int:
    from safetensors import safe_open
    import glob
    n = 0
    for f in glob.glob(f"{path}/*.safetensors"):
        with safe_open(f, "pt") as h:
            n += sum(h.get_slice(k).get_shape()[0] for k in h.keys() if k.endswith(".outlier_idx"))
    return n


if __name__ == "__main__":
    main()
