"""NUPES W4 g64 on a 4096x4096 layer: the packed runtime (moeq's LUT kernel route) against bf16 / fp32 dense, HQQ's
4-bit CPU path and torch's affine int4 kernel (moeq ``rtn`` W4 g64 at bf16), at M = 1 and M = 64, in one run; the
4-bit bandwidth bound; and the quantization time of both NUPES modes.

    python benchmarks/nupes_speed.py [--rounds 3] [--min-run-time 0.4] [--threads 2]

Timing as ../shared/anchors/PROTOCOL.md: everything built first, then ``--rounds`` interleaved rounds of
torch.utils.benchmark blocked_autorange; reported = the min of the round medians. Bound = packed bytes (codes,
scales, LUT) / the best 1 GiB fp32 ``x.sum()`` read rate. Weights N(0, 0.02^2); x N(0, 1). Each row's result is
checked against its own dequantized weight (rel err). Writes benchmarks/results/nupes_speed.json.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from moeq.quant.base import Stats
from moeq.quant.nupes import NupesConfig, NupesQuantizer
from moeq.quant.uniform import RTNQuantizer, UniformConfig
from moeq.registry import RUNTIMES, load_builtins

N = K = 4096


def read_rate() -> float:
    x = torch.ones(1 << 28)          # 1 GiB fp32
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        x.sum()
        ts.append(time.perf_counter() - t)
    return x.numel() * 4 / min(ts)


def held(m: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(m.buffers()) + list(m.parameters()) if t is not None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "nupes_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_builtins()
    torch.manual_seed(0)
    w = torch.randn(N, K) * 0.02

    # quantization time, both modes (data-driven: Hessian of 4096 correlated tokens)
    q = NupesQuantizer()
    t = time.perf_counter()
    qt = q.quantize(w, NupesConfig(bits=4, group_size=64), None)
    df_s = time.perf_counter() - t
    x_cal = torch.randn(4096, K) @ (torch.eye(K) + 0.05 * torch.randn(K, K))
    h = x_cal.T @ x_cal / x_cal.shape[0]
    del x_cal
    t = time.perf_counter()
    q.quantize(w, NupesConfig(bits=4, group_size=64, mode="data_driven"), Stats(4096, {"hessian": h}))
    dd_s = time.perf_counter() - t
    del h
    print(f"quantize 4096x4096 W4 g64: data-free {df_s:.1f} s, data-driven {dd_s:.1f} s", flush=True)

    nupes = RUNTIMES.get("nupes")(qt, None, {})
    ut = RTNQuantizer().quantize(w, UniformConfig(bits=4, group_size=64), None)
    affine = RUNTIMES.get("affine-packed")(ut, None, {})
    w_nupes = nupes.dequantized(torch.float32)
    w_aff = affine.dequantized(torch.float32)
    wb = w.bfloat16()
    rows = {
        "bf16 dense": (lambda x: F.linear(x, wb), torch.bfloat16, w),
        "fp32 dense": (lambda x: F.linear(x, w), torch.float32, w),
        "moeq nupes W4 g64, bf16 x": (nupes, torch.bfloat16, w_nupes),
        "moeq nupes W4 g64, fp32 x": (nupes, torch.float32, w_nupes),
        "torch int4 affine W4 g64 (moeq rtn), bf16 x": (affine, torch.bfloat16, w_aff),
    }
    hqq_note = None
    try:
        from hqq.core.quantize import BaseQuantizeConfig, HQQLinear
        for dt, label in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            lin = torch.nn.Linear(K, N, bias=False)
            lin.weight.data.copy_(w)
            hq = HQQLinear(lin, BaseQuantizeConfig(nbits=4, group_size=64), compute_dtype=dt, device="cpu")
            rows[f"hqq 4-bit g64, {label} compute"] = (hq, dt, hq.dequantize().float())
    except ImportError as e:
        hqq_note = f"hqq not installed ({e})"
    results = {name: {"times": {1: [], 64: []}} for name in rows}
    inputs = {m: torch.randn(m, K) for m in (1, 64)}
    for name, (fn, dt, ref_w) in rows.items():       # build / warm / check
        for m, x in inputs.items():
            with torch.no_grad():
                y = fn(x.to(dt)).float()
            ref = x.to(dt).float() @ ref_w.float().T
            results[name][f"rel_err_m{m}"] = float((y - ref).abs().max() / ref.abs().max())
    for r in range(a.rounds):
        for name, (fn, dt, _) in rows.items():
            for m, x in inputs.items():
                xx = x.to(dt)
                with torch.no_grad():
                    med = Timer("fn(x)", globals={"fn": fn, "x": xx}, num_threads=a.threads).blocked_autorange(
                        min_run_time=a.min_run_time).median
                results[name]["times"][m].append(med)
    rate = read_rate()
    packed = held(nupes)
    bound = packed / rate
    base = {m: min(results["bf16 dense"]["times"][m]) for m in (1, 64)}
    print(f"read rate {rate / 1e9:.1f} GB/s; nupes module {packed / 2**20:.2f} MiB -> bound {bound * 1e6:.0f} us")
    print("| layer 4096x4096 | M=1 us | vs bf16 | % of bound | M=64 us | vs bf16 | rel err |")
    print("|---|---|---|---|---|---|---|")
    out_rows = []
    for name, res in results.items():
        t1, t64 = min(res["times"][1]), min(res["times"][64])
        row = {"name": name, "m1_us": t1 * 1e6, "m64_us": t64 * 1e6, "m1_vs_bf16": t1 / base[1],
               "m64_vs_bf16": t64 / base[64], "rel_err": max(res["rel_err_m1"], res["rel_err_m64"]),
               "round_medians_us": {m: [v * 1e6 for v in res["times"][m]] for m in (1, 64)}}
        out_rows.append(row)
        pct = f"{100 * bound / t1:.0f}%" if "nupes" in name else ""
        print(f"| {name} | {t1 * 1e6:.0f} | {t1 / base[1]:.2f}x | {pct} | {t64 * 1e6:.0f} | {t64 / base[64]:.2f}x | "
              f"{row['rel_err']:.1e} |")
    hq = [r for r in out_rows if r["name"].startswith("hqq")]
    nu = [r for r in out_rows if r["name"].startswith("moeq nupes")]
    if hq and nu:
        print(f"HQQ best / moeq nupes best at M=1: {min(r['m1_us'] for r in hq) / min(r['m1_us'] for r in nu):.1f}x")
    Path(a.json).write_text(json.dumps({
        "threads": a.threads, "rounds": a.rounds, "read_gb_s": rate / 1e9, "nupes_bytes": packed,
        "bound_us": bound * 1e6, "quantize_s": {"data_free": df_s, "data_driven": dd_s}, "hqq": hqq_note,
        "loadavg": open("/proc/loadavg").read().split()[:3], "rows": out_rows}, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
