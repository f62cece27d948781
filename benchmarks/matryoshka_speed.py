"""A 4096x4096 matryoshka weight loaded at r = 8 and r = 4 (one stored parent, the first r bit-planes read) against
bf16 dense ``F.linear``, at M = 1 and M = 64, in one run.

    python benchmarks/matryoshka_speed.py [--rounds 3] [--threads 2]

Weight: Gaussian, symmetric groups of 64 (the method's default), the data-free floor parent; encoded with the
``bitplanes`` codec, decoded at r through the codec (``parts_at``: r planes + scales) into the runtime module
``MatryoshkaLinear``: r in {2, 3, 4} runs the LUT kernel route (``moeq.kernels.lut_linear``), r = 5..8 the uint8
group-scaled C++ matvec for a few tokens and tile dequantization + GEMM above (``moeq.kernels.cpu.u8_*``). bf16 activations. As ../shared/anchors/PROTOCOL.md: everything built first, then
``--rounds`` interleaved rounds of torch.utils.benchmark blocked_autorange; reported = the min of the round medians.
Rows "+4 kept" add 4 kept 16-bit input columns (the data-driven default's layout: ``cols`` / ``col_values``, the
runtime's extra ``x[:, cols] @ col_delta.T``) to the same codes.
Also the batch-1 bound: the bytes the runtime holds for the weight / the measured copy bandwidth. Writes
benchmarks/results/matryoshka_speed.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.benchmark import Timer

from moeq.eval.speed import memory_bandwidth
from moeq.registry import CODECS, QUANTIZERS, load_builtins
from moeq.runtime.build import runtime_module

N = K = 4096


def timed(fn, x, threads: int) -> float:
    t = Timer("fn(x)", globals={"fn": fn, "x": x}, num_threads=threads)
    return t.blocked_autorange(min_run_time=0.4).median


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    load_builtins()
    w = torch.randn(N, K, generator=torch.Generator().manual_seed(0)) * 0.02
    q = QUANTIZERS.get("matryoshka")()
    cfg = q.Config(mode="data_free")
    qt = q.quantize(w, cfg, None)
    codec = CODECS.get("bitplanes")()
    cols = torch.tensor([5, 777, 2048, 4000], dtype=torch.int32)
    kept = type(qt)(qt.shape, {**qt.tensors, "cols": cols, "col_values": w[:, cols.long()].half()},
                    {**qt.meta, "outliers": 4})
    mods = {}
    for label, src in (("", qt), (" +4 kept", kept)):
        parts, meta = codec.encode(src)
        for r in (8, 4):
            names = codec.parts_at(sorted(parts), meta, r)
            back = codec.decode({k: parts[k] for k in names}, meta, qt.shape, codec.version)
            mods[f"matryoshka r={r}{label}"] = runtime_module("bitplanes", back, None, {}, "matryoshka").to(
                torch.bfloat16)
    wb = w.to(torch.bfloat16)
    fns = {"bf16 dense": lambda x: F.linear(x, wb), **{k: m for k, m in mods.items()}}
    held = {k: sum(b.numel() * b.element_size() for b in m.buffers()) for k, m in mods.items()}
    held["bf16 dense"] = wb.numel() * 2
    results = {}
    for m_rows in (1, 64):
        x = torch.randn(m_rows, K, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
        for name, fn in fns.items():   # correctness vs the dequantized weight
            if name != "bf16 dense":
                ref = F.linear(x.float(), mods[name].dequantized(torch.float32))
                err = float((fn(x).float() - ref).norm() / ref.norm())
                results.setdefault(name, {})["rel_err"] = err
        best = {k: float("inf") for k in fns}
        for _ in range(a.rounds):
            for name, fn in fns.items():
                best[name] = min(best[name], timed(fn, x, a.threads))
        for name in fns:
            results.setdefault(name, {})[f"M={m_rows}"] = best[name]
    bw = memory_bandwidth() / 1e9     # 256 MiB copy, read + write, at torch.set_num_threads(a.threads)
    print(f"4096x4096, bf16 activations, {a.threads} threads, copy bandwidth {bw:.1f} GB/s")
    print("| layer | held MiB | M=1 ms | vs bf16 | batch-1 bound ms | of bound | M=64 ms | vs bf16 |")
    print("|---|---|---|---|---|---|---|---|")
    ref1, ref64 = results["bf16 dense"]["M=1"], results["bf16 dense"]["M=64"]
    for name, r in results.items():
        bound = held[name] / (bw * 1e9)
        r.update(held_bytes=held[name], bound_s=bound)
        print(f"| {name} | {held[name] / 2**20:.1f} | {1e3 * r['M=1']:.3f} | {r['M=1'] / ref1:.2f} | "
              f"{1e3 * bound:.3f} | {bound / r['M=1']:.0%} | {1e3 * r['M=64']:.3f} | {r['M=64'] / ref64:.2f} |")
    out = Path(__file__).parent / "results" / "matryoshka_speed.json"
    out.write_text(json.dumps({"threads": a.threads, "copy_gb_s": bw, "results": results}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
