"""Every model type with routed experts that the installed transformers ships, through moeq: the table.

    python benchmarks/arch_sweep.py                  # all of them (about 3 minutes on 2 cores)
    python benchmarks/arch_sweep.py mixtral jetmoe   # some

Types come from transformers' auto mappings (causal-LM and seq2seq-LM heads whose config mentions experts); each is
built tiny from its config class's defaults, its routed experts found by structure, saved with save_pretrained (the
original checkpoint layout, through transformers' reverse conversion mapping), quantized streamed with data-free
int8 weight-only, and loaded back (tests/tiny_models.py ``sweep``, the same run tests/test_arch_sweep.py asserts on).
Columns: routed-expert params of the float model and how many the manifest packs, max |logits| error of the loaded
artifact against the in-memory packed model, max and rms error against the float model (relative to its max / rms
logit), and status: ok, skip (why transformers could not build, run or save the tiny model) or the failed check.
Writes benchmarks/results/arch_sweep.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.tiny_models


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("types", nargs="*", help="model types (default: every one the sweep enumerates)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "arch_sweep.json"))
    args = ap.parse_args()

    import torch
    import transformers
    from rich.console import Console
    from rich.table import Table

    from tests.tiny_models import sweep, sweep_types

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    torch.set_num_threads(1)  # tiny tensors: more threads only add wake-up latency
    t0 = time.perf_counter()
    types = [t for t in sweep_types() if not args.types or t[0] in args.types]
    enumerate_s = time.perf_counter() - t0
    console = Console(stderr=True)
    rows = []
    for model_type, head in types:
        with tempfile.TemporaryDirectory() as d:
            rec = sweep(model_type, head, d)
        rows.append(rec)
        console.log(f"{model_type}: {rec['status']} {rec['failed'] or ''} {rec['reason'][:100]}")

    table = Table(title=f"moeq data-free int8 over transformers {transformers.__version__} MoE types")
    for col in ("model type", "routed params", "packed", "max err vs in-mem", "max rel err vs float",
                "rms rel err vs float", "s", "status / reason"):
        table.add_column(col, justify="left" if col in ("model type", "status / reason") else "right")
    for r in rows:
        status = r["status"] if r["status"] == "ok" else \
            f"{r['status']}: {(r['failed'] + ': ') if r['failed'] else ''}{r['reason']}"
        table.add_row(r["model_type"], f"{r['routed_params']:,}", f"{r['packed_routed_params']:,}",
                      _num(r["max_err_loaded_vs_in_memory"]), _num(r["max_rel_err_vs_float"]),
                      _num(r["rms_rel_err_vs_float"]), f"{r['seconds']:.1f}", status)
    Console(width=240).print(table)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "fail", "skip")}
    print(f"{len(rows)} types: {counts['ok']} ok, {counts['fail']} fail, {counts['skip']} skipped; "
          f"{time.perf_counter() - t0:.0f} s")
    out = {"transformers": transformers.__version__, "torch": torch.__version__, "machine": platform.machine(),
           "threads": 1, "method": "int8 weight_only (data-free)", "enumerate_seconds": round(enumerate_s, 1),
           "seconds": round(time.perf_counter() - t0, 1), "counts": counts, "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def _num(x) -> str:
    return "-" if x is None else f"{x:.2g}"


if __name__ == "__main__":
    main()
