"""Matryoshka quality, bytes read and extraction time: one nested artifact read at every width against the
strongest data-free nesting and independent GPTQ models per width, per model, one run.

    python benchmarks/matryoshka.py                         # tiny-moe, smollm2-moe, smollm2-135m
    python benchmarks/matryoshka.py --models tiny-moe --windows 32

Rows per model, perplexity at r = 8, 6, 4, 3, 2 (group 64, symmetric, the same calibration tokens for every
calibrated method):
  (a) matryoshka   moeq ``matryoshka`` (GPTQ on the multi-width objective), ONE artifact loaded at each r
  (b) floor        moeq ``matryoshka -O mode=data_free``: the floor-rounded 8-bit parent read at r bits as the
                   centre of its bucket (MSE-optimal at every width at once: the strongest data-free nesting)
  (c) gptq         moeq ``gptq --bits r`` (asymmetric, group 64): an independent model per width
  int8             moeq ``int8`` (LLM.int8 w8a8, the project's 8-bit default): the r = 8 reference
What is quantized: every decoder linear and expert (the default kinds). Also per model: code bytes read when loading
(a) at each r (``ArtifactReader.bytes_read``, the parts of the nested entries only), (a)'s quantization time and
the time to extract r = 4 and r = 2 artifacts from it. Protocol: gptq, seqlen 512, the first N windows of the
embedded eval split, fp32 compute. Prints tables and writes benchmarks/results/matryoshka.json.
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
from moeq.formats.container import ArtifactReader
from moeq.pipeline.extract import extract
from moeq.recipes import Recipe
from reference import float_reference

WIDTHS = (8, 6, 4, 3, 2)
DEFAULT_MODELS = "tiny-moe,smollm2-moe,smollm2-135m"


def nested_bytes_read(path: Path, bits: int) -> tuple[int, int]:
    """(bytes of the nested entries' parts a load at ``bits`` reads, their bytes on disk)."""
    r = ArtifactReader(path)
    try:
        names = [n for n, e in r.tensors.items() if e["codec"] == "bitplanes"]
        total = sum(r.tensors[n]["bytes"] for n in names)
        before = r.bytes_read
        from moeq.registry import CODECS
        for n in names:
            e = r.tensors[n]
            r.read_packed(n, parts=CODECS.get("bitplanes")().parts_at(e["parts"], e["meta"], bits))
        return r.bytes_read - before, total
    finally:
        r.close()


def quantized(model: torch.nn.Module, out: Path, recipe: Recipe, times: dict, key: str, **kw) -> torch.nn.Module:
    """``model`` quantized into ``out`` (the packed model in memory), its time in ``times[key]``; an artifact
    already finished at ``out`` (``--work`` of an interrupted run) is loaded instead, and a run stopped midway
    resumes (the time then counts the resumed part only, and ``times[key + "_resumed_groups"]`` says so)."""
    if (out / "moeq.json").exists():
        times[key] = "reused"
        return api.load(str(out), dtype=torch.float32)[0]
    t = time.perf_counter()
    res = api.quantize_model(model, out, recipe, **kw)
    times[key] = round(time.perf_counter() - t, 1)
    if res.get("resumed_groups"):
        times[key + "_resumed_groups"] = res["resumed_groups"]
    return model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default=DEFAULT_MODELS)
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--gptq-widths", default="8,4,3,2", help="widths of the independent GPTQ models (c)")
    ap.add_argument("--windows", type=int, default=16)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--options", default="{}", help="JSON options of (a), e.g. '{\"feedback\": \"averaged\"}'")
    ap.add_argument("--keep", type=Path, default=None,
                    help="copy each model's (a) artifact to KEEP/<model>/matryoshka (e.g. the decode benchmark's cache, "
                         "/tmp/moeq-bench-decode)")
    ap.add_argument("--work", type=Path, default=None,
                    help="working directory of the artifacts (kept); an interrupted run given the same directory resumes "
                         "its quantizations where they stopped (one model per run)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    widths = [int(x) for x in a.widths.split(",")]
    results = []
    out = Path(a.json or Path(__file__).parent / "results" / "matryoshka.json")

    def save(partial=None):
        """Write the results so far (the model under way as ``partial``): a stopped run keeps its rows."""
        rows = results + ([dict(partial, partial=True)] if partial is not None else [])
        out.write_text(json.dumps({"protocol": f"gptq seqlen {a.seqlen} windows {a.windows}",
                                   "calibration": f"{a.calib_samples} x {a.seqlen}", "results": rows},
                                  indent=1) + "\n")
    for model in a.models.split(","):
        base, tok, windows, rb = float_reference(model, a.seqlen, a.windows)
        res = {"model": model, "float": rb.ppl, "ppl": {}, "bytes_read": {}, "times": {},
               "options": json.loads(a.options)}
        calib_cfg = {"samples": a.calib_samples, "seqlen": a.seqlen}
        calib = api.calibration_ids(tok, Recipe(model=model, method="gptq", calibration=calib_cfg))
        work = a.work or Path(tempfile.mkdtemp(prefix="moeq-mat-"))
        try:
            for label, opts in (("matryoshka", json.loads(a.options)), ("floor", {"mode": "data_free"})):
                recipe = Recipe(model=model, method="matryoshka", options=opts, calibration=calib_cfg)
                quantized(copy.deepcopy(base), work / label, recipe, res["times"], f"quantize_{label}", tokenizer=tok,
                          source=model, calib_ids=calib if recipe.needs_calibration() else None)
                for r in widths:
                    m, _, _ = api.load(str(work / label), dtype=torch.float32, bits=r)
                    p = perplexity(m, windows).ppl
                    res["ppl"].setdefault(label, {})[r] = p
                    print(f"{model:13s} {label:10s} r={r}  ppl {p:12.4f}  x{p / rb.ppl:.4f}", flush=True)
                    save(res)
                    del m
            if a.keep is not None:
                dest = a.keep / model / "matryoshka"
                shutil.rmtree(dest, ignore_errors=True)
                shutil.copytree(work / "matryoshka", dest)
            for r in widths:
                res["bytes_read"][r] = nested_bytes_read(work / "matryoshka", r)
            for r in (4, 2):
                shutil.rmtree(work / f"x{r}", ignore_errors=True)
                t = time.perf_counter()
                extract(work / "matryoshka", r, work / f"x{r}")
                res["times"][f"extract_{r}"] = round(time.perf_counter() - t, 2)
            for r in [int(x) for x in a.gptq_widths.split(",")]:
                recipe = Recipe(model=model, method="gptq", options={"bits": r, "group_size": 64},
                                calibration=calib_cfg)
                m = quantized(copy.deepcopy(base), work / f"g{r}", recipe, res["times"], f"quantize_gptq{r}",
                              source=model, calib_ids=calib)
                p = perplexity(m, windows).ppl
                res["ppl"].setdefault("gptq", {})[r] = p
                print(f"{model:13s} {'gptq':10s} r={r}  ppl {p:12.4f}  x{p / rb.ppl:.4f}", flush=True)
                save(res)
                del m
            recipe = Recipe(model=model, method="int8", calibration=calib_cfg)
            m = quantized(copy.deepcopy(base), work / "int8", recipe, res["times"], "quantize_int8", source=model,
                          calib_ids=calib)
            res["ppl"]["int8"] = {8: perplexity(m, windows).ppl}
            print(f"{model:13s} int8       r=8  ppl {res['ppl']['int8'][8]:12.4f}", flush=True)
            del m
        finally:
            if a.work is None:
                shutil.rmtree(work, ignore_errors=True)
        results.append(res)
        save()
        del base
    print()
    print(f"protocol: gptq, seqlen {a.seqlen}, {a.windows} windows; calibration {a.calib_samples} x {a.seqlen}; g64")
    for res in results:
        pp = res["ppl"]
        print(f"\n{res['model']} (float {res['float']:.4f})")
        print("| r | (a) matryoshka | (b) floor parent | (c) gptq r-bit | (a) vs (b) | (a) vs (c) | (a) vs int8 |")
        print("|---|---|---|---|---|---|---|")
        for r in widths:
            ma, fl, gq = pp["matryoshka"].get(r), pp["floor"].get(r), pp.get("gptq", {}).get(r)
            i8 = pp["int8"][8] if r == 8 else None
            cells = [f"{x:.4f}" if x is not None else "-" for x in (ma, fl, gq)]
            rel = [f"{100 * (ma / x - 1):+.2f}%" if x else "-" for x in (fl, gq, i8)]
            print(f"| {r} | " + " | ".join(cells + rel) + " |")
        br = res["bytes_read"]
        print("| r | nested code bytes read | of the stored | ")
        for r in widths:
            print(f"| {r} | {br[r][0]:,} | {br[r][0] / br[r][1]:.3f} |")
        print("times (s):", json.dumps(res["times"]))
    save()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
