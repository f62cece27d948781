"""The ``ternary-dict`` runtime (QMoE sub-1-bit experts) on a 4096x4096 ternary matrix: bits/weight against the
Shannon bound, decode throughput (pure-torch ``decode_rows`` vs moeq's C++ decoder) and matmul time at M = 1 and
M = 16 for the fused decode-and-multiply kernel, decode + GEMM, bf16 dense and fp32 dense ``F.linear``, in one run;
plus the fused / decode + GEMM crossover over M that sets ``moeq.runtime.ternary_dict.FUSED_MAX_M``.

    python benchmarks/qmoe_speed.py [--rounds 3] [--min-run-time 0.4] [--threads 2]

Matrix: i.i.d. symbols, P(0) = 0.885, P(+1) = P(-1) = 0.0575 (QMoE's reference statistics), lo / hi per row
uniform in [-1, 0) / [0, 1) as float16; the dictionary (2^16 - 1 phrases) is built from the matrix's own symbol
counts, as the quantizer's ``fit_layer`` does. bits/weight, cumulative: the 16-bit codewords; + the int32 row
offsets; + lo / hi (float16 each): the stored entry, the 12 KiB dictionary excluded (one per layer).
Decode: wall time of one full decode, G weights/s = 16.7M / seconds: ``decode_rows`` (the int8 symbols; it also
validates the rows) and the C++ decoder into a reused bf16 [4096, 4096] buffer (the weights in the compute dtype)
and into a fresh tensor (what ``dequantized()`` returns: includes the page faults of 32 MiB), best of 5.
Matmul: as ../shared/anchors/PROTOCOL.md: everything built first, then ``--rounds`` interleaved rounds of
torch.utils.benchmark blocked_autorange; reported = the min of the round medians; bf16 x except fp32 dense. Each
result is checked against F.linear with the float64 weight (rel err). Writes benchmarks/results/qmoe_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from moeq.formats import ternary_dict as td
from moeq.kernels import cpu
from moeq.quant.base import QTensor
from moeq.registry import CODECS, load_builtins
from moeq.runtime import ternary_dict as rt

N = K = 4096
PROBS = (0.0575, 0.885, 0.0575)          # P(-1), P(0), P(+1)
SWEEP = (1, 2, 4, 8, 16, 24, 32, 48, 64)


def ternary(rows: int, cols: int, seed: int) -> torch.Tensor:
    u = torch.rand(rows, cols, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    pm, p0, _ = PROBS
    return torch.where(u < p0, 0, torch.where(u < p0 + pm, -1, 1)).to(torch.int8)


def best_of(fn, n: int = 5) -> float:
    ts = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return min(ts)


def timed(fn, x, threads: int, min_run_time: float) -> float:
    with torch.no_grad():
        return Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads).blocked_autorange(
            min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--min-run-time", type=float, default=0.4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=str(Path(__file__).parent / "results" / "qmoe_speed.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_builtins()
    if cpu.library() is None:
        raise SystemExit("moeq's C++ library does not build here: nothing to measure")
    load_start = [round(v, 2) for v in os.getloadavg()]

    # the matrix, its dictionary, the stored entry and the runtime built from the codec's decoded form
    s = ternary(N, K, 0)
    g = torch.Generator().manual_seed(1)
    lo, hi = -torch.rand(N, generator=g).half(), torch.rand(N, generator=g).half()
    t = time.perf_counter()
    d = td.build_dictionary(s)
    build_s = time.perf_counter() - t
    codec, name = CODECS.get("ternary-dict")(), "layer.ternary_dict"
    shared = {name: d.to_table(name)}
    t = time.perf_counter()
    parts, meta = codec.encode(QTensor((N, K), {"symbols": s, "lo": lo, "hi": hi}, {}, (name,)), shared)
    encode_s = time.perf_counter() - t
    t = time.perf_counter()
    dq = codec.decode(parts, meta, (N, K), codec.version, shared)
    check_s = time.perf_counter() - t
    mod = rt.TernaryDictLinear(dq, None, shared)
    rate = td.rate_report(s, parts["codewords"], parts["row_offsets"])
    print(f"dictionary: {d.size} phrases, depth {d.max_len}, built in {build_s:.1f} s; encode {encode_s:.1f} s; "
          f"codec decode (validation, no expansion) {check_s * 1e3:.1f} ms")
    print(f"bits/weight: bound {rate['entropy']:.4f} | codewords {rate['codewords']:.4f} | +offsets "
          f"{rate['offsets']:.4f} | +lo/hi {rate['total']:.4f} ({100 * rate['efficiency']:.1f}% of bound); "
          f"{rate['symbols_per_codeword']:.1f} symbols/codeword")

    # decode throughput
    w_ref = td.ternary_weight(s, lo, hi)
    code = mod._code()
    buf = torch.empty(N, K, dtype=torch.bfloat16)
    assert torch.equal(cpu.ternary_decode_rows(code, 0, N, buf), w_ref.bfloat16())
    assert torch.equal(td.decode_rows(parts["codewords"], parts["row_offsets"], d, K), s)
    dec = {
        "torch decode_rows (int8 symbols)": best_of(lambda: td.decode_rows(parts["codewords"], parts["row_offsets"],
                                                                           d, K), 3),
        "torch decode_rows + ternary_weight (fp32)": best_of(lambda: td.ternary_weight(td.decode_rows(
            parts["codewords"], parts["row_offsets"], d, K), lo, hi), 3),
        "C++ decode, reused bf16 buffer": best_of(lambda: cpu.ternary_decode_rows(code, 0, N, buf)),
        "C++ decode, fresh bf16 tensor": best_of(lambda: cpu.ternary_decode(code, torch.bfloat16)),
        "C++ decode, fresh fp32 tensor": best_of(lambda: cpu.ternary_decode(code, torch.float32)),
    }
    print("| decode 4096x4096 | ms | G weights/s |")
    print("|---|---|---|")
    for k, v in dec.items():
        print(f"| {k} | {v * 1e3:.1f} | {N * K / v / 1e9:.2f} |")

    # matmul: fused / decode + GEMM / dense, M = 1 and 16; then the crossover sweep
    wb, wf = w_ref.bfloat16(), w_ref
    routes = {
        "fused decode-and-multiply (C++)": (lambda x: cpu.ternary_matvec(code, x), torch.bfloat16),
        "decode + GEMM, 4 MiB tiles (C++)": (lambda x: cpu.ternary_linear_tiled(code, x), torch.bfloat16),
        "bf16 dense F.linear": (lambda x: F.linear(x, wb), torch.bfloat16),
        "fp32 dense F.linear": (lambda x: F.linear(x, wf), torch.float32),
    }
    ms = sorted(set(SWEEP) | {1, 16})
    inputs = {m: torch.randn(m, K, generator=torch.Generator().manual_seed(m)) for m in ms}
    errs = {}
    for label, (fn, dt) in routes.items():
        for m in (1, 16):
            x = inputs[m].to(dt)
            ref = F.linear(x.double(), w_ref.double())
            errs[(label, m)] = float((fn(x).double() - ref).abs().max() / ref.abs().max())
    times = {(label, m): [] for label in routes for m in ms}
    for _ in range(a.rounds):
        for label, (fn, dt) in routes.items():
            for m in ms:
                if m in (1, 16) or label.startswith(("fused", "decode")):
                    times[(label, m)].append(timed(fn, inputs[m].to(dt), a.threads, a.min_run_time))
    best = {k: min(v) for k, v in times.items() if v}
    print(f"| 4096x4096, {a.threads} threads | M=1 ms | vs bf16 | M=16 ms | vs bf16 | rel err |")
    print("|---|---|---|---|---|---|")
    rows = []
    for label in routes:
        t1, t16 = best[(label, 1)], best[(label, 16)]
        r1, r16 = t1 / best[("bf16 dense F.linear", 1)], t16 / best[("bf16 dense F.linear", 16)]
        err = max(errs[(label, 1)], errs[(label, 16)])
        rows.append({"route": label, "m1_ms": t1 * 1e3, "m16_ms": t16 * 1e3, "m1_vs_bf16": r1, "m16_vs_bf16": r16,
                     "rel_err": err, "round_medians_ms": {m: [v * 1e3 for v in times[(label, m)]] for m in (1, 16)}})
        print(f"| {label} | {t1 * 1e3:.2f} | {r1:.2f}x | {t16 * 1e3:.2f} | {r16:.2f}x | {err:.1e} |")
    fused, tiled = "fused decode-and-multiply (C++)", "decode + GEMM, 4 MiB tiles (C++)"
    sweep = [{"m": m, "fused_ms": best[(fused, m)] * 1e3, "decode_gemm_ms": best[(tiled, m)] * 1e3} for m in SWEEP]
    print("crossover (ms): " + ", ".join(f"M={r['m']}: {r['fused_ms']:.2f} / {r['decode_gemm_ms']:.2f}"
                                         for r in sweep))
    wins = [r["m"] for r in sweep if r["fused_ms"] <= r["decode_gemm_ms"]]
    print(f"fused is faster up to M = {max(wins) if wins else 0} (FUSED_MAX_M now "
          f"{rt.FUSED_MAX_M[cpu.flavor()]}, flavor {cpu.flavor()})")
    held = sum(t.numel() * t.element_size() for t in (mod.codewords, mod.row_offsets, mod.lo, mod.hi))
    out = {
        "threads": a.threads, "rounds": a.rounds, "min_run_time": a.min_run_time, "flavor": cpu.flavor(),
        "loadavg_start": load_start, "loadavg_end": [round(v, 2) for v in os.getloadavg()],
        "probs": PROBS, "dictionary": {"phrases": d.size, "depth": d.max_len, "bytes": d.nbytes, "build_s": build_s},
        "encode_s": encode_s, "codec_decode_ms": check_s * 1e3, "bits": rate, "module_bytes": held,
        "bf16_dense_bytes": N * K * 2,
        "decode": {k: {"ms": v * 1e3, "gweights_s": N * K / v / 1e9} for k, v in dec.items()},
        "matmul": rows, "crossover": sweep, "fused_max_m": rt.FUSED_MAX_M,
    }
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(out, indent=1) + "\n")
    print(f"module holds {held / 2**20:.2f} MiB (bf16 dense: {N * K * 2 / 2**20:.0f} MiB); wrote {a.json}")


if __name__ == "__main__":
    main()
