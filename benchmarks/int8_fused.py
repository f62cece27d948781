"""Per-call CPU time of moeq's LLM.int8 w8a8 linear at decode: the fused C++ kernel against the torch route it
replaces, int8 weight-only (``torch._weight_int8pack_mm``) and dense bf16 / fp32 ``F.linear``, in one process.

    nice -n 19 python benchmarks/int8_fused.py                    # 5 interleaved rounds, min_run_time 0.2 s
    python benchmarks/int8_fused.py --rounds 1 --min-run-time 0.05 # smoke run
    python benchmarks/int8_fused.py --tokens 1 2 4 --threads 1 --json /tmp/int8_fused.json

Shapes are weights [out, in]: tiny-moe (hidden 256: 256x256 attention, 512x256 / 256x512 experts) and SmolLM2-135M
(576x576 attention, 1536x576 gate/up, 576x1536 down). Weights N(0, 0.02^2); inputs N(0, 1) with three planted
outlier features (x20); the w8a8 layer is calibrated (``moeq quantize --method int8`` defaults: SmoothQuant 0.5 and
exact 16-bit outlier columns) on a separate 256-token batch. Every module is called at M = ``--tokens`` rows (one
table each; the old route is torch's int8-weight matvec up to 2 rows, the int8 GEMM above) inside
``torch.inference_mode``; each time is a ``torch.utils.benchmark`` blocked_autorange median, taken in ``--rounds``
interleaved rounds. The table shows the median over rounds and, as a noise figure, the spread (max - min) / median
of the round medians (the machine may be shared). "err" columns: max|y - ref| / max|ref| against the exact w8a8
result (the same integer codes, int64 sums, float64 scaling), which both w8a8 routes should meet within rounding.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from moeq.quant.base import Stats
from moeq.registry import QUANTIZERS, RUNTIMES, load_builtins

SHAPES = [(256, 256), (512, 256), (256, 512), (576, 576), (1536, 576), (576, 1536)]   # weight [out, in]
OUTLIER_COLS = [3, 101, 200]
OUTLIER_GAIN = 20.0
CALIB_TOKENS = 256
# label -> (module key, activation dtype, MOEQ_KERNEL)
ROWS = {
    "w8a8 torch route (old), fp32 x": ("w8a8", torch.float32, "torch"),
    "w8a8 fused kernel, fp32 x": ("w8a8", torch.float32, "auto"),
    "w8a8 torch route (old), bf16 x": ("w8a8", torch.bfloat16, "torch"),
    "w8a8 fused kernel, bf16 x": ("w8a8", torch.bfloat16, "auto"),
    "int8 weight-only (int8pack_mm), bf16 x": ("wo", torch.bfloat16, "auto"),
    "int8 weight-only (int8pack_mm), fp32 x": ("wo", torch.float32, "auto"),
    "bf16 F.linear": ("bf16", torch.bfloat16, "auto"),
    "fp32 F.linear": ("fp32", torch.float32, "auto"),
}
OLD, FUSED, BF16 = "w8a8 torch route (old), fp32 x", "w8a8 fused kernel, fp32 x", "bf16 F.linear"


def int8_module(w: torch.Tensor, calib: torch.Tensor, **opts) -> torch.nn.Module:
    q = QUANTIZERS.get("int8")()
    cfg = q.Config(**opts)
    a = calib.abs()
    stats = Stats(a.shape[0], {"amax": a.amax(0), "hits": (a >= cfg.threshold).sum(0)})
    return RUNTIMES.get(q.codec)(q.quantize(w, cfg, stats), None)


def dense(w: torch.Tensor, dtype: torch.dtype):
    wd = w.to(dtype).contiguous()
    return lambda x: F.linear(x, wd)


def exact_w8a8(mod, x: torch.Tensor) -> torch.Tensor:
    """The w8a8 formula with the torch route's integer codes, int64 sums and float64 scaling."""
    c = mod._const("act_scale", torch.float32, x.device)
    xs = x * c
    amax = xs.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)
    codes = (xs * (127.0 / amax)).round_()
    y = (codes.long() @ mod.qweight.long().t()).double() * (amax.double() * (mod.scale.double() / 127.0))
    if mod.outlier_idx is not None:
        y += x.index_select(1, mod.outlier_idx).double() @ mod.outlier_w.double().t()
    return y


def rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max())


def time_us(fn, x, env: str, min_run_time: float, threads: int) -> float:
    old = os.environ.get("MOEQ_KERNEL")
    os.environ["MOEQ_KERNEL"] = env
    try:
        t = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
        return t.blocked_autorange(min_run_time=min_run_time).median * 1e6
    finally:
        if old is None:
            os.environ.pop("MOEQ_KERNEL", None)
        else:
            os.environ["MOEQ_KERNEL"] = old


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-run-time", type=float, default=0.2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1], help="rows of x, one table each (decode: 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    load_builtins()
    torch.set_num_threads(a.threads)
    from moeq.kernels import cpu
    lib = cpu.library()
    flavor = "unavailable (torch route only)" if lib is None else cpu.int8_flavor()

    results = [run(a, m, flavor) for m in a.tokens]
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"threads": a.threads, "rounds": a.rounds, "kernel": flavor, "results": results}, f, indent=1)


def run(a, tokens: int, flavor: str) -> dict:
    cases = []
    for i, (out_f, in_f) in enumerate(SHAPES):
        g = torch.Generator().manual_seed(a.seed + i)
        w = torch.randn(out_f, in_f, generator=g) * 0.02
        calib = torch.randn(CALIB_TOKENS, in_f, generator=g)
        calib[:, OUTLIER_COLS] *= OUTLIER_GAIN
        x = torch.randn(tokens, in_f, generator=g)
        x[:, OUTLIER_COLS] *= OUTLIER_GAIN
        mods = {"w8a8": int8_module(w, calib), "wo": int8_module(w, calib, mode="weight_only"),
                "bf16": dense(w, torch.bfloat16), "fp32": dense(w, torch.float32)}
        case = {"shape": (out_f, in_f), "rows": {}, "times": {}, "err": {}}
        with torch.inference_mode():
            ref = exact_w8a8(mods["w8a8"], x)
            for label, (key, dt, env) in ROWS.items():
                os.environ["MOEQ_KERNEL"] = env
                y = mods[key](x.to(dt))                     # also the warm-up (builds the per-layer constants)
                os.environ.pop("MOEQ_KERNEL")
                case["rows"][label] = (mods[key], x.to(dt), env)
                if key == "w8a8":
                    case["err"][label] = rel_err(y, ref)
        cases.append(case)

    with torch.inference_mode():
        for r in range(a.rounds):
            for case in cases:
                for label, (fn, x, env) in case["rows"].items():
                    case["times"].setdefault(label, []).append(time_us(fn, x, env, a.min_run_time, a.threads))
            print(f"M={tokens}: round {r + 1}/{a.rounds} done", flush=True)

    shapes = [f"{c['shape'][0]}x{c['shape'][1]}" for c in cases]
    print(f"\nper-call µs at M={tokens}, {a.threads} thread(s), int8 kernel: {flavor}; median of {a.rounds} round "
          f"medians ± spread (max - min) / median over rounds")
    width = max(len(k) for k in ROWS) + 2
    print("W [out x in]".ljust(width) + "".join(s.rjust(17) for s in shapes))
    for label in ROWS:
        cells = []
        for c in cases:
            ts = c["times"][label]
            med = statistics.median(ts)
            cells.append(f"{med:8.1f} ±{100 * (max(ts) - min(ts)) / med:3.0f}%".rjust(17))
        print(label.ljust(width) + "".join(cells))
    for num, den in ((OLD, BF16), (FUSED, BF16), (FUSED, OLD), ("w8a8 fused kernel, bf16 x", BF16),
                     ("int8 weight-only (int8pack_mm), bf16 x", BF16)):
        cells = [f"{statistics.median(c['times'][num]) / statistics.median(c['times'][den]):.2f}".rjust(17)
                 for c in cases]
        name = f"ratio {num.replace('w8a8 ', '').replace('int8 ', '')} / {den.split(',')[0]}"
        print(name[:width - 1].ljust(width) + "".join(cells))
    print(f"\nmax|y - exact| / max|exact| at M={tokens} (w8a8 rows; bf16 x: bf16 output):")
    for label in (l for l in ROWS if l.startswith("w8a8")):
        print(label.ljust(width) + "".join(f"{c['err'][label]:.1e}".rjust(17) for c in cases))
    return {"tokens": tokens, "cases": [{"shape": c["shape"], "times_us": c["times"], "rel_err": c["err"]}
                                        for c in cases]}


if __name__ == "__main__":
    main()
