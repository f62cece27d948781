"""Per-layer CPU speed of moeq's LLM.int8 linear vs bf16/fp32 dense and bitsandbytes, side by side in one run.

    python benchmarks/int8_linear.py                      # random weights, 3 rounds, min_run_time 0.4 s
    python benchmarks/int8_linear.py --real --json int8_linear.json
    python benchmarks/int8_linear.py --min-run-time 0.05 --rounds 1    # quick smoke run

Shapes (in->out): 576->1536 and 1536->576 (SmolLM2-135M layer-0 mlp.gate_proj / mlp.down_proj with --real, else
N(0, 0.02^2) random) and 4096->4096 (random), M = 1 and 64 tokens. Inputs are N(0, 1) with a few planted outlier
features (x20); int8 calibration stats come from a separate batch of such inputs. Everything is built first, then
timed in --rounds interleaved rounds (torch.utils.benchmark blocked_autorange median, --threads 2); the reported time is
the min of the round medians. Protocol of the peer anchors: ../shared/anchors/PROTOCOL.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch
from rich.console import Console
from rich.table import Table
from torch.utils.benchmark import Timer

from moeq.quant.base import Stats
from moeq.registry import QUANTIZERS, RUNTIMES, load_builtins

SHAPES = [(576, 1536), (1536, 576), (4096, 4096)]      # (in, out)
REAL = {(576, 1536): "gate_proj", (1536, 576): "down_proj"}
TOKENS = [1, 64]
OUTLIER_COLS = [3, 101, 257]
OUTLIER_GAIN = 20.0
CALIB_TOKENS = 256
W8A8 = "moeq int8 w8a8 (decomp t=6, smooth)"
BF16, FP32, BNB = "bf16 dense", "fp32 dense", "bitsandbytes Linear8bitLt t=6.0"
TARGET_SHAPE, TARGET_VS_BF16, TARGET_VS_BNB = (4096, 4096), 1.5, 10.0


# ---------------------------------------------------------------- builders: (w fp32 [out, in], calib x) -> module
def dense(dtype: torch.dtype) -> Callable:
    def build(w, _calib):
        lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data = w.clone()
        return lin.to(dtype).requires_grad_(False)
    return build


def moeq_int8(**opts) -> Callable:
    def build(w, calib):
        q = QUANTIZERS.get("int8")()
        cfg = q.Config(**opts)
        a = calib.abs()
        stats = Stats(a.shape[0], {"amax": a.amax(0), "hits": (a >= cfg.threshold).sum(0)})
        return RUNTIMES.get(q.codec)(q.quantize(w, cfg, stats), None)
    return build


def bnb_int8(threshold: float) -> Callable:
    def build(w, _calib):
        import bitsandbytes as bnb
        lin = bnb.nn.Linear8bitLt(w.shape[1], w.shape[0], bias=False, has_fp16_weights=False, threshold=threshold)
        lin.weight = bnb.nn.Int8Params(w.clone(), requires_grad=False, has_fp16_weights=False)
        return lin.to("cpu")
    return build


@dataclass
class Row:
    label: str
    module: str            # key into MODULES (rows may share one module with different input dtypes)
    act: torch.dtype


MODULES = {
    "bf16": dense(torch.bfloat16),
    "fp32": dense(torch.float32),
    "w8a8": moeq_int8(),
    "w8a8_t0": moeq_int8(threshold=0.0),
    "w8a8_g64": moeq_int8(act_group=64),
    "wo": moeq_int8(mode="weight_only"),
    "bnb": bnb_int8(6.0),
}
ROWS = [
    Row(BF16, "bf16", torch.bfloat16),
    Row(FP32, "fp32", torch.float32),
    Row(W8A8, "w8a8", torch.float32),
    Row(W8A8 + " bf16 in", "w8a8", torch.bfloat16),
    Row("moeq int8 w8a8 t=0", "w8a8_t0", torch.float32),
    Row("moeq int8 w8a8 act_group=64", "w8a8_g64", torch.float32),
    Row("moeq int8 weight-only bf16 in", "wo", torch.bfloat16),
    Row(BNB, "bnb", torch.float32),
]


# ---------------------------------------------------------------- data
def shape_key(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def activations(n: int, in_f: int, gen: torch.Generator) -> torch.Tensor:
    x = torch.randn(n, in_f, generator=gen)
    x[:, OUTLIER_COLS] *= OUTLIER_GAIN
    return x


def real_weights() -> dict:
    from moeq.models.loader import load_model
    model, _, _ = load_model("smollm2-135m")
    mlp = model.model.layers[0].mlp
    return {shape: getattr(mlp, name).weight.detach().float().clone() for shape, name in REAL.items()}


def weight(shape, real: dict, seed: int) -> tuple[torch.Tensor, str]:
    if shape in real:
        return real[shape], f"layer-0 mlp.{REAL[shape]}"
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape[1], shape[0], generator=gen) * 0.02, "random N(0, 0.02^2)"


def module_bytes(mod: torch.nn.Module) -> int:
    """Bytes held by parameters, buffers and bitsandbytes' row scales SCB (on the weight until the first forward
    moves them to ``mod.state``), each storage counted once."""
    tensors = [*mod.parameters(), *mod.buffers()]
    scb = [getattr(o, "SCB", None) for o in (*mod.parameters(), getattr(mod, "state", None))]
    tensors += [t for t in scb if isinstance(t, torch.Tensor)]
    seen = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(seen.values())


# ---------------------------------------------------------------- measurement
def build_cases(args) -> tuple[list[dict], list[str]]:
    """One case per shape: modules per row, inputs per M, reference outputs, rel. errors, bits/param."""
    skipped = []
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        skipped.append(BNB)
    rows = [r for r in ROWS if r.label not in skipped]
    real = real_weights() if args.real else {}
    cases = []
    for i, shape in enumerate(SHAPES):
        w, source = weight(shape, real, args.seed + i)
        gen = torch.Generator().manual_seed(args.seed + 100 + i)
        calib = activations(CALIB_TOKENS, shape[0], gen)
        xs = {m: activations(m, shape[0], gen) for m in TOKENS}
        mods = {key: MODULES[key](w, calib) for key in {r.module for r in rows}}
        case = {"shape": shape, "source": source, "rows": {}}
        with torch.inference_mode():
            ref = mods["fp32"](xs[64])
            for r in rows:
                mod, x = mods[r.module], {m: xs[m].to(r.act) for m in TOKENS}
                y, nbytes = mod(x[64]).float(), module_bytes(mod)  # the forward is also the warm-up
                case["rows"][r.label] = {"fn": mod, "x": x, "rel_err_M64": float((y - ref).norm() / ref.norm()),
                                         "bytes": nbytes, "bits_per_param": 8.0 * nbytes / w.numel()}
        cases.append(case)
    return cases, skipped


def time_us(fn, x, min_run_time: float, threads: int) -> float:
    t = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
    return t.blocked_autorange(min_run_time=min_run_time).median * 1e6


def run_rounds(cases: list[dict], rounds: int, min_run_time: float, threads: int) -> None:
    """Interleaved rounds over every (shape, row, M); keeps the min of the round medians as ``time_us``."""
    with torch.inference_mode():
        for k in range(rounds):
            for case in cases:
                for r in case["rows"].values():
                    for m in TOKENS:
                        t = time_us(r["fn"], r["x"][m], min_run_time, threads)
                        r.setdefault("time_us", {})[m] = min(t, r.get("time_us", {}).get(m, t))
            print(f"round {k + 1}/{rounds} done", flush=True)


def dram_read_gbps(gib: float, reps: int = 5) -> float:
    """DRAM read bandwidth: median time of ``x.max()`` over a uint8 tensor of ``gib`` GiB."""
    x = torch.full((int(gib * 2**30),), 7, dtype=torch.uint8)
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        x.max()
        ts.append(time.perf_counter() - t)
    return x.numel() / statistics.median(ts) / 1e9


# ---------------------------------------------------------------- report
def columns(cases) -> list[tuple[dict, int]]:
    return [(c, m) for m in TOKENS for c in cases]


def col_name(case, m) -> str:
    return f"{shape_key(case['shape'])} M={m}"


def times_table(cases, labels) -> Table:
    t = Table(title="per-layer time (µs; min over rounds of blocked_autorange medians)")
    for h in ["row", *[col_name(c, m) for c, m in columns(cases)], "bits/param", "rel_err M=64"]:
        t.add_column(h, justify="left" if h == "row" else "right")
    for label in labels:
        rs = [c["rows"][label] for c in cases]
        t.add_row(label, *[f"{c['rows'][label]['time_us'][m]:,.0f}" for c, m in columns(cases)],
                  " / ".join(f"{r['bits_per_param']:.2f}" for r in rs),
                  " / ".join(f"{r['rel_err_M64']:.4f}" for r in rs))
    return t


def ratios(cases, labels) -> dict:
    out = {label: {col_name(c, m): c["rows"][label]["time_us"][m] / c["rows"][BF16]["time_us"][m]
                   for c, m in columns(cases)} for label in labels}
    if BNB in labels:
        out[f"speed-up {W8A8} vs bitsandbytes"] = {
            col_name(c, m): c["rows"][BNB]["time_us"][m] / c["rows"][W8A8]["time_us"][m] for c, m in columns(cases)}
    return out


def ratios_table(cases, rat: dict) -> Table:
    t = Table(title="time / bf16 dense (<1 = faster); last row: bitsandbytes time / moeq w8a8 time (>1 = moeq faster)")
    t.add_column("row")
    for c, m in columns(cases):
        t.add_column(col_name(c, m), justify="right")
    for label, vals in rat.items():
        t.add_row(label, *[f"{v:.2f}" for v in vals.values()])
    return t


def targets(cases) -> dict:
    case = next(c for c in cases if c["shape"] == TARGET_SHAPE)["rows"]
    mine = case[W8A8]["time_us"][1]
    out = {"vs_bf16": {"target": TARGET_VS_BF16, "speedup": case[BF16]["time_us"][1] / mine}}
    if BNB in case:
        out["vs_bnb"] = {"target": TARGET_VS_BNB, "speedup": case[BNB]["time_us"][1] / mine}
    for v in out.values():
        v["met"] = v["speedup"] >= v["target"]
    return out


def bandwidth_bound(cases, gbps: float) -> dict:
    r = next(c for c in cases if c["shape"] == TARGET_SHAPE)["rows"][W8A8]
    bound_us = r["bytes"] / (gbps * 1e9) * 1e6
    return {"dram_read_gbps": gbps, "packed_bytes": r["bytes"], "bound_us": bound_us,
            "measured_us": r["time_us"][1], "measured_over_bound": r["time_us"][1] / bound_us}


def report(cases, skipped, tg: dict, bw: dict) -> None:
    con = Console(width=220)
    labels = list(cases[0]["rows"])
    for label in skipped:
        con.print(f"[yellow]bitsandbytes not importable: skipped row '{label}'[/]")
    con.print("weights: " + ", ".join(f"{shape_key(c['shape'])}: {c['source']}" for c in cases))
    con.print(times_table(cases, labels))
    con.print(ratios_table(cases, ratios(cases, labels)))
    names = {"vs_bf16": "bf16 dense", "vs_bnb": "bitsandbytes"}
    for key, v in tg.items():
        con.print(f"target: {W8A8} at least {v['target']}x faster than {names[key]} at M=1 on 4096x4096: "
                  f"{v['speedup']:.2f}x -> {'MET' if v['met'] else 'NOT met'}")
    con.print(f"bandwidth: DRAM read {bw['dram_read_gbps']:.1f} GB/s; {W8A8} 4096x4096 packs "
              f"{bw['packed_bytes'] / 1e6:.2f} MB -> bound {bw['bound_us']:,.0f} µs; measured M=1 "
              f"{bw['measured_us']:,.0f} µs = {bw['measured_over_bound']:.2f}x the bound")


def to_json(args, cases, skipped, tg, bw) -> dict:
    return {"args": vars(args), "outlier_cols": OUTLIER_COLS, "outlier_gain": OUTLIER_GAIN,
            "skipped": skipped, "targets": tg, "bandwidth": bw,
            "ratios_vs_bf16": ratios(cases, list(cases[0]["rows"])),
            "layers": {shape_key(c["shape"]): {"source": c["source"], "rows": {
                label: {"time_us": {f"M{m}": t for m, t in r["time_us"].items()}, "rel_err_M64": r["rel_err_M64"],
                        "bytes": r["bytes"], "bits_per_param": r["bits_per_param"]}
                for label, r in c["rows"].items()}} for c in cases}}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", action="store_true", help="real SmolLM2-135M layer-0 MLP weights for the small shapes")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.4)
    ap.add_argument("--bw-gib", type=float, default=1.0, help="size of the bandwidth probe tensor")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None, metavar="PATH")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load_builtins()
    cases, skipped = build_cases(args)
    gbps = dram_read_gbps(args.bw_gib)
    run_rounds(cases, args.rounds, args.min_run_time, args.threads)
    tg, bw = targets(cases), bandwidth_bound(cases, gbps)
    report(cases, skipped, tg, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(to_json(args, cases, skipped, tg, bw), f, indent=1)


if __name__ == "__main__":
    main()
