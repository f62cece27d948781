"""End-to-end decode and prefill tokens/s of float models, moeq int8 artifacts and int8 peers, in one process.

    PYTHONPATH=. python benchmarks/decode.py                          # smollm2-135m and tiny-moe, every variant
    PYTHONPATH=. python benchmarks/decode.py --model tiny-moe --only moeq --threads 1    # a quick iteration

Variants (``VARIANTS``): fp32 / bf16 float models (``load_model``); moeq int8 w8a8 (calibrated LLM.int8, the
``moeq quantize --method int8`` default) and int8 weight-only, each loaded with ``moeq.api.load`` in fp32 and in
bf16; peers on every nn.Linear but lm_head (PROTOCOL.md "Methods": float model loaded in fp32, cast to the act
dtype): optimum-quanto qint8 (bf16), torchao Int8WeightOnlyConfig (bf16), bitsandbytes Linear8bitLt t=6 (fp32);
moeq NUPES W4 g64 data-free (bf16: the LUT kernel route, ``moeq.kernels``); moeq QMoE ternary experts (bf16: the
fused ternary-dict kernel; a dense model has no experts, so its row says the recipe selects nothing); one moeq
matryoshka artifact loaded at 8 and at 4 bits (bf16).
A peer that is not installed or fails is a row saying so. bf16 always runs: it is the reference of the ratios and
of the token check. ``--only`` keeps the variants whose name contains one of the given substrings.

Protocol (../shared/anchors/PROTOCOL.md "Decode", with N new tokens, 64 by default): prompt = first 32 tokens of
eval window 0 (512-token windows of the embedded eval split); greedy ``generate(max_new_tokens=N,
min_new_tokens=N, do_sample=False, use_cache=True)`` after one 8-token warm-up, 3 timed runs, tok/s = N / median;
prefill tok/s = 256 / median of 3 forwards of the first 256 tokens (use_cache=False) after one warm-up forward.
``torch.set_num_threads(2)``. The float models are measured again at the end as a drift check. Every model is
built (and held) before the first is timed; ``--rounds R`` measures them all R times in turn and reports each
row's best round median, as PROTOCOL.md "Speed" does for single layers on a shared machine (default 1: the
protocol's plain median of 3).

Also per row: the dtype of the embedding weight and of decoder layer 0's output (a forward hook), to show when a
requested compute dtype is not honoured; MiB held (parameters + buffers, tensor subclasses through
``__tensor_flatten__``, bitsandbytes' SCB, deduplicated by storage); the share of the float model's parameters
held as int8 (peers quantize nn.Linear only: fused MoE experts stay float); the length of the generated prefix
equal to bf16's (and fp32's). Artifacts are quantized once into ``--work`` and reused (``--rebuild`` to redo;
``--prepare`` only quantizes: calibrated int8 of SmolLM2 takes minutes).
Results: a rich table and ``benchmarks/results/decode_<model>.json`` (not written for ``--only`` runs unless
``--json DIR`` is given).
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

from moeq.data.corpus import load_text
from moeq.eval.perplexity import tokenize_windows
from moeq.models.loader import load_model, load_tokenizer, resolve

PROMPT_LEN, PREFILL_LEN, WARMUP_TOKENS, REPEATS, WINDOW = 32, 256, 8, 3, 512
RESULTS = Path(__file__).resolve().parent / "results"
F32, BF16 = torch.float32, torch.bfloat16


class NotInstalled(Exception):
    pass


# ---- variants: name -> how to build the model -------------------------------------------------------------------

@dataclass
class Variant:
    act: torch.dtype                                 # the compute dtype asked for
    build: Callable[[str, Path, torch.dtype], torch.nn.Module]   # (model spec, artifact dir, act) -> model
    note: str
    artifact: dict | None = None                     # moeq options (+ method, default int8); built once per model
    peer: str | None = None                          # the distribution a peer needs


def float_model(spec, _art, act):
    return load_model(spec, dtype=act)[0]


def moeq_model(_spec, art, act):
    from moeq import api
    return api.load(art, dtype=act)[0]


def moeq_at(bits: int):
    """A builder loading the (matryoshka) artifact at ``bits``: only that many bit-planes are read."""
    def build(_spec, art, act):
        from moeq import api
        return api.load(art, dtype=act, bits=bits)[0]
    return build


def linears(model):
    """(parent, child name, module) of every nn.Linear but lm_head."""
    for name, mod in list(model.named_modules()):
        for cname, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear) and f"{name}.{cname}".lstrip(".") != "lm_head":
                yield mod, cname, child


def peer_base(spec, act):
    """PROTOCOL.md: the float model loaded in fp32, then cast to the act dtype."""
    return load_model(spec, dtype=F32)[0].to(act)


def quanto_model(spec, _art, act):
    try:
        from optimum.quanto import freeze, qint8, quantize
    except ImportError:
        raise NotInstalled("optimum-quanto") from None
    m = peer_base(spec, act)
    quantize(m, weights=qint8, exclude=["lm_head"])
    freeze(m)
    return m


def torchao_model(spec, _art, act):
    try:
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise NotInstalled("torchao") from None
    m = peer_base(spec, act)
    quantize_(m, Int8WeightOnlyConfig(),
              filter_fn=lambda mod, fqn: isinstance(mod, torch.nn.Linear) and fqn != "lm_head")
    return m


def bnb_model(spec, _art, act, threshold=6.0):
    try:
        import bitsandbytes as bnb
    except ImportError:
        raise NotInstalled("bitsandbytes") from None
    m = peer_base(spec, act)
    for parent, cname, lin in linears(m):
        new = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                                  has_fp16_weights=False, threshold=threshold)
        new.weight = bnb.nn.Int8Params(lin.weight.data.clone(), requires_grad=False, has_fp16_weights=False)
        if lin.bias is not None:
            new.bias = torch.nn.Parameter(lin.bias.data.clone(), requires_grad=False)
        setattr(parent, cname, new.to("cpu"))  # .to quantizes
    return m.eval()  # in training mode bitsandbytes' CPU path dequantizes (weight-only)


W8A8, WEIGHT_ONLY = {}, {"mode": "weight_only"}
NUPES4 = {"method": "nupes", "bits": 4, "group_size": 64}
QMOE = {"method": "qmoe"}                 # ternary experts (a dense model has none: the row says so)
MATRYOSHKA = {"method": "matryoshka"}     # one artifact, loaded at 8 and at 4 bits
VARIANTS = {
    "fp32": Variant(F32, float_model, "transformers, load_model(dtype=fp32)"),
    "bf16": Variant(BF16, float_model, "transformers, load_model(dtype=bf16)"),
    "moeq_int8/fp32": Variant(F32, moeq_model, "moeq int8 w8a8 (calibrated), load(dtype=fp32)", W8A8),
    "moeq_int8/bf16": Variant(BF16, moeq_model, "moeq int8 w8a8 (calibrated), load(dtype=bf16)", W8A8),
    "moeq_int8_wo/fp32": Variant(F32, moeq_model, "moeq int8 --weight-only, load(dtype=fp32)", WEIGHT_ONLY),
    "moeq_int8_wo/bf16": Variant(BF16, moeq_model, "moeq int8 --weight-only, load(dtype=bf16)", WEIGHT_ONLY),
    "moeq_nupes4/bf16": Variant(BF16, moeq_model, "moeq nupes W4 g64 data-free, load(dtype=bf16)", NUPES4),
    "moeq_qmoe/bf16": Variant(BF16, moeq_model, "moeq qmoe ternary experts (calibrated), load(dtype=bf16)", QMOE),
    "moeq_mat_r8/bf16": Variant(BF16, moeq_at(8), "moeq matryoshka, load(dtype=bf16, bits=8)", MATRYOSHKA),
    "moeq_mat_r4/bf16": Variant(BF16, moeq_at(4), "moeq matryoshka, load(dtype=bf16, bits=4)", MATRYOSHKA),
    "quanto_qint8": Variant(BF16, quanto_model, "quantize(weights=qint8, exclude=lm_head)+freeze",
                            peer="optimum-quanto"),
    "ao_int8wo": Variant(BF16, torchao_model, "quantize_(Int8WeightOnlyConfig()), not lm_head", peer="torchao"),
    "bnb_int8_t6": Variant(F32, bnb_model, "Linear8bitLt threshold=6 has_fp16_weights=False", peer="bitsandbytes"),
}
REFERENCE = "bf16"


def artifact_name(opts: dict) -> str:
    """``opts``: the method's options, plus ``method`` (default int8)."""
    opts = dict(opts)
    return opts.pop("method", "int8") + "".join(f"_{k}={v}" for k, v in sorted(opts.items()))


def ensure_artifact(spec: str, opts: dict, work: Path, rebuild: bool) -> tuple[Path, dict]:
    """The artifact of ``moeq quantize spec --method int8`` with ``opts`` (the defaults, calibration included, for
    the rest) under ``work``, quantized now if absent or ``rebuild``."""
    from moeq import api
    from moeq.recipes import Recipe
    out = work / spec / artifact_name(opts)
    if api.is_artifact(out) and not rebuild:
        return out, {"artifact": str(out), "quantized": "reused", "artifact_mtime": time.ctime(out.stat().st_mtime)}
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    opts = dict(opts)
    method = opts.pop("method", "int8")
    print(f"quantizing {spec} {method} {opts or 'default'} -> {out}", flush=True)
    res = api.quantize(Recipe(model=spec, method=method, options=opts), out)
    print(f"  done in {res['seconds']:.0f} s", flush=True)
    return out, {"artifact": str(out), "quantized": "now", "quantize_s": res["seconds"],
                 "bits_per_param": res.get("bits_per_param")}


# ---- measurement --------------------------------------------------------------------------------------------------

@torch.no_grad()
def measure(model, prompt: torch.Tensor, prefill: torch.Tensor, n: int, pad_id: int) -> dict:
    """Decode tok/s (N / median of REPEATS greedy generations) and prefill tok/s; the generated tokens; the dtypes
    the model actually computes in."""
    mask = torch.ones_like(prompt)

    def generate(k):
        return model.generate(prompt, attention_mask=mask, max_new_tokens=k, min_new_tokens=k, do_sample=False,
                              use_cache=True, pad_token_id=pad_id)

    generate(WARMUP_TOKENS)
    dec = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        out = generate(n)
        dec.append(time.perf_counter() - t)
    seen = {}

    def probe(_module, _inputs, output):  # returns None: the output is left as it is
        seen.setdefault("l0", first_tensor(output).dtype)

    hook = first_layer(model).register_forward_hook(probe)
    try:
        model(input_ids=prefill, use_cache=False)  # warm-up
    finally:
        hook.remove()
    pre = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        model(input_ids=prefill, use_cache=False)
        pre.append(time.perf_counter() - t)
    return {"decode_tok_s": n / statistics.median(dec), "prefill_tok_s": prefill.shape[1] / statistics.median(pre),
            "decode_s": [round(x, 4) for x in dec], "prefill_s": [round(x, 4) for x in pre],
            "tokens": out[0, prompt.shape[1]:].tolist(),
            "embed_dtype": dtype_name(model.get_input_embeddings().weight.dtype),
            "layer0_out_dtype": dtype_name(seen.get("l0"))}


def first_layer(model) -> torch.nn.Module:
    return next(m for name, m in model.named_modules() if name.endswith("layers.0"))


def first_tensor(o):
    while isinstance(o, (tuple, list)):
        o = o[0]
    return o


def dtype_name(d) -> str:
    return str(d).removeprefix("torch.").replace("bfloat16", "bf16").replace("float32", "fp32")


def held(model) -> tuple[int, int]:
    """(bytes, int8 elements) held by the model's parameters and buffers: tensor subclasses are walked through
    ``__tensor_flatten__``, bitsandbytes' ``SCB``/``CB`` attributes included, each storage counted once."""
    storages: dict[int, tuple[int, int]] = {}

    def walk(t):
        if not isinstance(t, torch.Tensor) or t.device.type == "meta":
            return
        if hasattr(type(t), "__tensor_flatten__"):
            names, _ = t.__tensor_flatten__()
            for n in names:
                walk(getattr(t, n))
            return
        for attr in ("SCB", "CB"):
            walk(getattr(t, attr, None))
        s = t.untyped_storage()
        nbytes, int8 = storages.get(s.data_ptr(), (0, 0))
        storages[s.data_ptr()] = (max(nbytes, s.nbytes()), max(int8, s.nbytes() if t.dtype == torch.int8 else 0))

    for t in list(model.parameters()) + list(model.buffers()):
        walk(t)
    return sum(b for b, _ in storages.values()), sum(i for _, i in storages.values())


def same_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def eval_window(tok) -> torch.Tensor:
    return tokenize_windows(tok, load_text("wiki", "eval"), WINDOW, 1)[0]


# ---- one model ----------------------------------------------------------------------------------------------------

def run_model(spec: str, names: list[str], a) -> dict:
    """Every variant built first (artifacts quantized if missing), then ``a.rounds`` interleaved rounds of
    measurement, each closed by the float models again (the drift check); per row the best round median."""
    tok = load_tokenizer(resolve(spec))
    window = eval_window(tok)
    prompt, prefill = window[:PROMPT_LEN].unsqueeze(0), window[:PREFILL_LEN].unsqueeze(0)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    n_params = sum(p.numel() for p in load_model(spec, dtype=F32)[0].parameters())

    artifacts = prepare(spec, names, a)
    rows, models = {}, {}
    for name in names:
        rows[name], models[name] = build(spec, name, artifacts, n_params)
    floats = [n for n in names if VARIANTS[n].build is float_model and models[n] is not None]
    for n in floats:
        rows[f"{n} (rerun)"] = {**rows[n], "variant": f"{n} (rerun)"}
    for r in range(a.rounds):
        for key, row in rows.items():
            if row["status"] != "ok":
                continue
            print(f"[{spec}] round {r + 1}/{a.rounds} {key} ...", end=" ", flush=True)
            load0 = os.getloadavg()[0]
            try:
                m = measure(models[key.removesuffix(" (rerun)")], prompt, prefill, a.new_tokens, pad_id)
            except Exception as e:  # noqa: BLE001 - a runtime in flux fails as a row, not the run
                traceback.print_exc()
                row["status"] = f"failed: {one_line(e)}"
                continue
            m["loadavg_1m"] = [round(load0, 2), round(os.getloadavg()[0], 2)]
            row.setdefault("rounds", []).append(m)
            print(f"decode {m['decode_tok_s']:.1f} tok/s, prefill {m['prefill_tok_s']:.0f} tok/s, "
                  f"emb {m['embed_dtype']}, layer0 out {m['layer0_out_dtype']}", flush=True)
    models.clear()
    gc.collect()
    for row in rows.values():
        if row["status"] == "ok":
            best(row)
    relate(list(rows.values()))
    return {"model": spec, "params": n_params, "rounds": a.rounds, "rows": list(rows.values())}


def prepare(spec: str, names: list[str], a) -> dict[str, tuple[Path | None, dict]]:
    """artifact name -> (directory, how it was obtained) for the moeq variants among ``names``."""
    artifacts = {}
    for opts in {artifact_name(VARIANTS[n].artifact): VARIANTS[n].artifact for n in names
                 if VARIANTS[n].artifact is not None}.values():
        try:
            artifacts[artifact_name(opts)] = ensure_artifact(spec, opts, a.work, a.rebuild)
        except Exception as e:  # noqa: BLE001 - a failed quantization is a row; the rest still runs
            traceback.print_exc()
            artifacts[artifact_name(opts)] = (None, {"error": one_line(e)})
    return artifacts


def build(spec: str, name: str, artifacts: dict, n_params: int) -> tuple[dict, torch.nn.Module | None]:
    """(row, model) of one variant; the model is None and the row says why when it could not be built."""
    v = VARIANTS[name]
    row = {"model": spec, "variant": name, "act": dtype_name(v.act), "note": v.note}
    art, info = artifacts[artifact_name(v.artifact)] if v.artifact is not None else (None, {})
    row.update(info)
    if v.peer:
        row["version"] = version(v.peer)
    if "error" in info:
        row["status"] = f"failed: {info['error']}"
        return row, None
    try:
        t = time.perf_counter()
        model = v.build(spec, art, v.act)
    except NotInstalled as e:
        row["status"] = f"not installed ({e})"
        return row, None
    except Exception as e:  # noqa: BLE001 - a peer or a runtime in flux fails as a row, not the run
        if not v.peer:
            traceback.print_exc()
        row["status"] = f"failed: {one_line(e)}"
        return row, None
    nbytes, int8 = held(model)
    row.update(status="ok", build_s=round(time.perf_counter() - t, 2), mib=nbytes / 2**20,
               int8_share=int8 / n_params)
    return row, model


def best(row: dict) -> None:
    """The row's figures: the best round median (one round: the protocol's median of 3)."""
    rounds = row["rounds"]
    row["decode_tok_s"] = max(r["decode_tok_s"] for r in rounds)
    row["prefill_tok_s"] = max(r["prefill_tok_s"] for r in rounds)
    row.update({k: rounds[-1][k] for k in ("tokens", "embed_dtype", "layer0_out_dtype")})
    row["loadavg_1m"] = [x for r in rounds for x in r["loadavg_1m"]]


def relate(rows: list[dict]) -> None:
    """Ratios vs the first bf16 row; generated prefix equal to bf16's and fp32's."""
    ref = {r["variant"]: r for r in rows if r.get("status") == "ok"}
    bf, fp = ref.get(REFERENCE), ref.get("fp32")
    for r in rows:
        if r.get("status") != "ok":
            continue
        if bf is not None:
            r["decode_vs_bf16"] = r["decode_tok_s"] / bf["decode_tok_s"]
            r["prefill_vs_bf16"] = r["prefill_tok_s"] / bf["prefill_tok_s"]
            r["same_as_bf16"] = same_prefix(r["tokens"], bf["tokens"])
        if fp is not None:
            r["same_as_fp32"] = same_prefix(r["tokens"], fp["tokens"])


# ---- output -------------------------------------------------------------------------------------------------------

def table(results: list[dict], n: int, rounds: int):
    from rich.table import Table
    stat = f"median of {REPEATS}" if rounds == 1 else f"best of {rounds} interleaved round medians of {REPEATS}"
    t = Table(title=f"decode {n} new tokens after {PROMPT_LEN}, prefill {PREFILL_LEN} "
                    f"(tok/s, {stat}; ratios vs bf16 of the same run)")
    for col in ("model", "variant", "act", "emb / L0 out", "decode tok/s", "x bf16", "prefill tok/s", "x bf16",
                "MiB", "int8 %", f"= bf16 / fp32 (of {n})"):
        t.add_column(col, justify="left" if col in ("model", "variant", "act", "emb / L0 out") else "right")
    for res in results:
        for r in res["rows"]:
            if r["status"] != "ok":
                t.add_row(r["model"], r["variant"], r["act"], f"[yellow]{r['status']}[/]")
                continue
            seen = f"{r['embed_dtype']} / {r['layer0_out_dtype']}"
            if r["layer0_out_dtype"] != r["act"] or r["embed_dtype"] != r["act"]:
                seen = f"[red]{seen}[/]"
            same = f"{r.get('same_as_bf16', '–')} / {r.get('same_as_fp32', '–')}"
            t.add_row(r["model"], r["variant"], r["act"], seen, f"{r['decode_tok_s']:.1f}", ratio(r, "decode_vs_bf16"),
                      f"{r['prefill_tok_s']:.0f}", ratio(r, "prefill_vs_bf16"), f"{r['mib']:.1f}",
                      f"{100 * r['int8_share']:.0f}", same)
    return t


def ratio(r: dict, key: str) -> str:
    return f"{r[key]:.2f}" if key in r else "–"


def one_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:160]


def version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def environment(a) -> dict:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else None
    return {"cpu": cpu, "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "versions": {d: version(d) for d in ("torch", "transformers", "moeq", "bitsandbytes", "optimum-quanto",
                                                 "torchao")},
            "protocol": f"prompt = first {PROMPT_LEN} tokens of eval window 0 ({WINDOW}-token windows, embedded eval "
                        f"split); greedy generate {a.new_tokens} new tokens (min=max, use_cache), one "
                        f"{WARMUP_TOKENS}-token warm-up, median of {REPEATS}; prefill = forward of {PREFILL_LEN} "
                        f"tokens, use_cache=False, one warm-up, median of {REPEATS}",
            "argv": sys.argv[1:]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", help="zoo name or model spec (repeatable; default both zoo models)")
    ap.add_argument("--only", action="append", help="keep variants whose name contains this (repeatable); "
                                                    f"{REFERENCE} always runs")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each row reports its best round "
                                                          "median (a shared machine: try 3)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/moeq-bench-decode"), help="artifact cache")
    ap.add_argument("--rebuild", action="store_true", help="quantize the artifacts again")
    ap.add_argument("--prepare", action="store_true", help="only quantize the missing artifacts, time nothing")
    ap.add_argument("--json", type=Path, default=None,
                    help=f"folder for decode_<model>.json (default {RESULTS}; --only runs write none unless given)")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "inputs will be cast to float16", every call
    names = [n for n in VARIANTS if n == REFERENCE or not a.only or any(s in n for s in a.only)]
    if a.prepare:
        for spec in a.model or ["smollm2-135m", "tiny-moe"]:
            for _, info in prepare(spec, names, a).values():
                print(spec, info, flush=True)
        return
    env = environment(a)
    results = [run_model(spec, names, a) for spec in a.model or ["smollm2-135m", "tiny-moe"]]
    from rich.console import Console
    console = Console(width=200)
    console.print(table(results, a.new_tokens, a.rounds))
    loads = [x for res in results for r in res["rows"] for x in r.get("loadavg_1m", [])] or [float("nan")]
    console.print(f"1-min load average during the run: {min(loads):.2f}–{max(loads):.2f} on {os.cpu_count()} CPUs; "
                  f"{env['cpu']}, {a.threads} threads")
    out = a.json or (None if a.only else RESULTS)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        for res in results:
            p = out / f"decode_{res['model'].replace('/', '_')}.json"
            p.write_text(json.dumps({**env, **res}, indent=1))
            console.print(f"wrote {p}")


if __name__ == "__main__":
    main()
