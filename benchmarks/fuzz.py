"""The artifact and recipe fuzzer of tests/test_fuzz.py at a larger count: every case refused with one MoeqError
or loaded with identical logits (or, for the classes that make a consistent but different artifact, loaded).

    python benchmarks/fuzz.py 20000 [--seed 1] [--json benchmarks/results/fuzz.json]

Prints the counts by class and outcome and every failure (a case is reproduced by its seed and index alone)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.fuzzing, tests.tiny_models


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("count", type=int, help="number of cases")
    ap.add_argument("--seed", type=int, default=1, help="generator seed (the test suite uses 0)")
    ap.add_argument("--json", type=Path, help="write the counts and failures here")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from moeq.cli.app import quiet_libraries
    quiet_libraries()
    from moeq.models.adapter import find_targets
    from tests import fuzzing
    from tests.tiny_models import build

    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        reference = fuzzing.build_base(base)
        targets = find_targets(build("mixtral"))
        t0 = time.perf_counter()
        done = [0]

        def tick(case, outcome):
            done[0] += 1
            if done[0] % 500 == 0:
                print(f"  {done[0]}/{args.count} cases, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        res = fuzzing.run(args.seed, args.count, base, Path(tmp) / "work", reference, targets, on_case=tick)
        res["seconds"] = round(time.perf_counter() - t0, 1)

    print(f"{args.count} cases, seed {args.seed}, {res['seconds']} s, {len(res['failures'])} failures")
    width = max(map(len, res["by_class"]))
    for cls in sorted(res["by_class"]):
        counts = ", ".join(f"{k} {v}" for k, v in sorted(res["by_class"][cls].items()))
        print(f"  {cls:<{width}}  {fuzzing.EXPECT[cls]:<6}  {counts}")
    for f in res["failures"]:
        print("FAILED", f)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1) + "\n")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
