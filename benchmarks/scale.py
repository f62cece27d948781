"""Models larger than memory: quantize a synthetic Mixtral-shaped checkpoint of >= 6 GB and report peak RSS
(from the OS), throughput in GB/s of input weights, and projected wall time for Mixtral-8x7B and DeepSeek-V3.
Throughput is given over the whole process (``gb_per_s``: start-up, imports and model skeleton included) and over
the layer-by-layer run alone (``gb_per_s_run``: the ``seconds`` moeq reports), which is what grows with the model.

    python benchmarks/scale.py                       # int8 weight-only (data-free) and calibrated w8a8
    python benchmarks/scale.py --method int8 --mode w8a8 --calib-samples 16
    python benchmarks/scale.py --method gptq --mode calibrated -O bits=4     # GPTQ W4 g128, per-expert Hessians

The checkpoint (random N(0, 0.02^2) bf16 weights, fixed seed, one shard per layer, outside the repo) is laid out
as the published Mixtral checkpoints are: per-expert ``block_sparse_moe.experts.{e}.w1/w2/w3`` tensors, which
transformers fuses on load and moeq's streaming reader maps the same way. It is written once and reused.
Each quantization runs as its own process under GNU time (-v); its maximum resident set size is the figure.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

# Mixtral-8x7B's layout at 1/4 width: 8 experts, top-2, GQA 32/8 -> 8/2 heads of 128
SHAPE = dict(hidden_size=1024, intermediate_size=3584, num_attention_heads=8, num_key_value_heads=2, head_dim=128,
             num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=4096, rms_norm_eps=1e-5,
             rope_theta=1e6, tie_word_embeddings=False)
MIXTRAL_8X7B_BYTES = 46.7e9 * 2          # bf16
DEEPSEEK_V3_BYTES = 671e9 * 2            # bf16 equivalent (the release is FP8: half this)


def write_checkpoint(d: Path, layers: int, tokenizer: Path, seed: int = 0) -> int:
    from transformers import AutoTokenizer, MixtralConfig
    tok = AutoTokenizer.from_pretrained(tokenizer)
    cfg = MixtralConfig(vocab_size=len(tok), num_hidden_layers=layers, dtype="bfloat16", **SHAPE)
    tmp = d.with_name(d.name + ".part")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    h, i, kv = cfg.hidden_size, cfg.intermediate_size, cfg.num_key_value_heads * cfg.head_dim
    q = cfg.num_attention_heads * cfg.head_dim
    weight_map, total = {}, 0
    n_shards = layers + 1

    def rnd(g, *shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    for s in range(n_shards):
        g = torch.Generator().manual_seed(seed * 1000 + s)
        if s == 0:
            t = {"model.embed_tokens.weight": rnd(g, cfg.vocab_size, h), "lm_head.weight": rnd(g, cfg.vocab_size, h),
                 "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
        else:
            p = f"model.layers.{s - 1}."
            t = {p + "input_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "post_attention_layernorm.weight": torch.ones(h, dtype=torch.bfloat16),
                 p + "self_attn.q_proj.weight": rnd(g, q, h), p + "self_attn.k_proj.weight": rnd(g, kv, h),
                 p + "self_attn.v_proj.weight": rnd(g, kv, h), p + "self_attn.o_proj.weight": rnd(g, h, q),
                 p + "block_sparse_moe.gate.weight": rnd(g, cfg.num_local_experts, h)}
            for e in range(cfg.num_local_experts):
                x = p + f"block_sparse_moe.experts.{e}."
                t.update({x + "w1.weight": rnd(g, i, h), x + "w3.weight": rnd(g, i, h), x + "w2.weight": rnd(g, h, i)})
        name = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(t, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in t})
        total += sum(v.numel() * v.element_size() for v in t.values())
        print(f"  wrote {name} ({total / 1e9:.2f} GB so far)", flush=True)
        del t
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}))
    cfg.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, d)
    return total


def timed_moeq(args: list[str], what: str) -> tuple[float, float]:
    """Run ``python -m moeq ARGS`` under GNU time: (wall seconds, peak RSS in MB as the OS measured it)."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "moeq", *args]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "COLUMNS": "160"})
    wall = time.perf_counter() - t
    if r.returncode != 0:
        raise SystemExit(f"{what} failed:\n{r.stderr[-3000:]}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", r.stderr).group(1))
    return wall, rss_kb / 1024


def run_quantize(model_dir: Path, out: Path, method: str, mode: str, calib_samples: int, calib_seqlen: int,
                 extra: list[str] = ()):
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(out.with_name(f".{out.name}.moeq-tmp"), ignore_errors=True)
    args = ["quantize", str(model_dir), "-o", str(out), "--method", method, "--json",
            str(out.parent / f"{out.name}.json"), "--calib-samples", str(calib_samples), "--calib-seqlen", str(calib_seqlen)]
    wall, rss = timed_moeq(args + list(extra) + (["--weight-only"] if mode == "weight_only" else []), "quantize")
    return wall, rss, json.loads((out.parent / f"{out.name}.json").read_text())


def run_eval(art: Path, max_memory: str) -> dict:
    """``moeq eval`` of the artifact with ``--max-memory``: layers that do not fit are run from a disk offload.
    One short window (the weights are random: the perplexity means nothing, the memory and the time do)."""
    js = art.parent / f"{art.name}.eval.json"
    wall, rss = timed_moeq(["eval", str(art), "--max-memory", max_memory, "--no-baseline", "--windows", "1",
                            "--seqlen", "128", "--batch-size", "1", "--no-speed", "--json", str(js)], "eval")
    res = json.loads(js.read_text())
    return {"max_memory": max_memory, "wall_s": wall, "peak_rss_mb": rss, "load_s": res["load_seconds"],
            "artifact_gb": res["total_bytes"] / 1e9, **res["placement"]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/moeq-scale/mixtral-synth"))
    ap.add_argument("--layers", type=int, default=34)
    ap.add_argument("--tokenizer", type=Path, default=Path(__file__).resolve().parent.parent / "moeq/zoo/tiny-moe")
    ap.add_argument("--method", default="int8")
    ap.add_argument("--mode", action="append", choices=["weight_only", "w8a8", "calibrated"], default=None,
                    help="int8: weight_only / w8a8; other methods: calibrated (their options via -O)")
    ap.add_argument("-O", "--option", action="append", default=[], help="method option key=value (moeq quantize -O)")
    ap.add_argument("--max-stats-mb", type=float, default=None, help="cap on one layer's calibration statistics")
    ap.add_argument("--calib-samples", type=int, default=16)
    ap.add_argument("--calib-seqlen", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1,
                    help="quantize this many times per mode: median wall and run time, highest peak RSS (each run's in "
                         "the JSON)")
    ap.add_argument("--keep", action="store_true", help="keep the quantized outputs")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--eval-max-memory", default="1GB",
                    help="then `moeq eval` the first artifact with this --max-memory (disk offload); '' skips it")
    a = ap.parse_args()
    if not (a.dir / "config.json").is_file():
        print(f"writing synthetic checkpoint to {a.dir} ...", flush=True)
        t = time.perf_counter()
        write_checkpoint(a.dir, a.layers, a.tokenizer)
        print(f"  done in {time.perf_counter() - t:.0f} s", flush=True)
    ckpt = sum(f.stat().st_size for f in a.dir.glob("*.safetensors"))
    params = json.loads((a.dir / "model.safetensors.index.json").read_text())["metadata"]["total_size"] / 2
    rows = []
    for mode in a.mode or ["weight_only", "w8a8"]:
        out = a.dir.parent / f"out-{a.method}-{mode}"
        extra = [x for o in a.option for x in ("-O", o)]
        if a.max_stats_mb is not None:
            extra += ["--max-stats-mb", str(a.max_stats_mb)]
        runs = [run_quantize(a.dir, out, a.method, mode, a.calib_samples, a.calib_seqlen, extra)
                for _ in range(a.repeat)]
        walls, run_ss = sorted(r[0] for r in runs), sorted(r[2]["seconds"] for r in runs)
        wall, run_s = walls[len(walls) // 2], run_ss[len(run_ss) // 2]
        rss, res = max(r[1] for r in runs), runs[-1][2]
        rate = ckpt / wall / 1e9
        calib_buf = a.calib_samples * a.calib_seqlen * SHAPE["hidden_size"] * 4 if mode != "weight_only" else 0
        rows.append({"method": a.method, "mode": mode, "checkpoint_gb": ckpt / 1e9, "params": params,
                     "wall_s": wall, "gb_per_s": rate, "run_s": run_s, "gb_per_s_run": ckpt / run_s / 1e9,
                     "peak_rss_mb": rss, "rss_over_checkpoint": rss * 2**20 / ckpt,
                     "calib_buffer_mb": calib_buf / 2**20, "output_gb": res["total_bytes"] / 1e9,
                     "bits_per_param": res["bits_per_param"], "runs": [
                         {"wall_s": w, "run_s": r["seconds"], "peak_rss_mb": m} for w, m, r in runs],
                     "projected_mixtral_8x7b_h": MIXTRAL_8X7B_BYTES / (rate * 1e9) / 3600,
                     "projected_deepseek_v3_h": DEEPSEEK_V3_BYTES / (rate * 1e9) / 3600})
        if a.eval_max_memory and len(rows) == 1:
            rows[0]["eval"] = run_eval(out, a.eval_max_memory)
        if not a.keep:
            shutil.rmtree(out, ignore_errors=True)
    from rich.console import Console
    from rich.table import Table
    t = Table(title=f"streaming quantization of a {ckpt / 1e9:.2f} GB Mixtral-shaped checkpoint ({params / 1e9:.2f} B params)")
    for c in ("mode", "wall s", "GB/s in", "run s", "GB/s run", "peak RSS MB", "RSS/ckpt", "calib buffer MB",
              "out GB", "bits/param", "Mixtral-8x7B h", "DeepSeek-V3 h"):
        t.add_column(c, justify="right")
    for r in rows:
        t.add_row(f"{r['method']} {r['mode']}", f"{r['wall_s']:.0f}", f"{r['gb_per_s']:.3f}", f"{r['run_s']:.0f}",
                  f"{r['gb_per_s_run']:.3f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['rss_over_checkpoint']:.3f}", f"{r['calib_buffer_mb']:.0f}", f"{r['output_gb']:.2f}",
                  f"{r['bits_per_param']:.3f}", f"{r['projected_mixtral_8x7b_h']:.2f}", f"{r['projected_deepseek_v3_h']:.1f}")
    Console().print(t)
    print("projections: bf16 bytes / measured input rate on this 2-core machine (Mixtral-8x7B 93.4 GB, "
          "DeepSeek-V3 1342 GB bf16-equivalent)")
    ev = rows[0].get("eval") if rows else None
    if ev:
        print(f"moeq eval {rows[0]['mode']} artifact ({ev['artifact_gb']:.2f} GB) with --max-memory {ev['max_memory']}: "
              f"{ev['cpu_layers']} layers in RAM, {ev['disk_layers']} on disk; peak RSS {ev['peak_rss_mb']:.0f} MB, "
              f"load {ev['load_s']:.0f} s, total {ev['wall_s']:.0f} s (1 window of 128 tokens)")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
