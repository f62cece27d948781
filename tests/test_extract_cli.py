"""``moeq eval --bits`` and ``moeq extract`` (--bits / --budget) on a tiny matryoshka artifact: a load at r bits is
the r-bit extract, the per-expert allocation beats uniform at equal budget and favours hot experts, the allocation
is recorded and inspectable, and every bad input is one line that leaves nothing behind."""

from __future__ import annotations

import copy
import itertools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from moeq import api
from moeq.cli.app import app
from moeq.errors import MoeqError
from moeq.formats.container import ArtifactReader
from moeq.formats.inspect import layer_index
from moeq.pipeline import extract as ex
from moeq.recipes import Recipe
from moeq.runtime.build import packed_modules
from tests.tiny_models import build

runner = CliRunner()
FAST = ["--calib-samples", "4", "--calib-seqlen", "64"]
EVAL = ["--windows", "2", "--seqlen", "64", "--no-speed", "--no-baseline"]


def run(*args):
    r = runner.invoke(app, [str(a) for a in args])
    return r.exit_code, r.output


def assert_one_line_error(code, out, needle):
    assert code != 0, out
    assert "Traceback" not in out, out
    err = [ln for ln in out.splitlines() if ln.startswith("error:")]
    assert len(err) == 1, out
    assert needle.lower() in err[0].lower(), out


def manifest(path):
    return json.loads((path / "moeq.json").read_text())


def left_behind(out):
    """The output directory or the writer's temporary sibling, if either exists."""
    return [p for p in (out, out.with_name(f".{out.name}.moeq-tmp")) if p.exists()]


@pytest.fixture(scope="module")
def art(tiny_model_dir, tmp_path_factory):
    """A calibrated matryoshka artifact of a tiny Mixtral, with its tokenizer (for eval)."""
    out = tmp_path_factory.mktemp("mq") / "art"
    code, text = run("quantize", tiny_model_dir, "-o", out, "--method", "matryoshka", *FAST)
    assert code == 0, text
    return out


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "rtn"
    api.quantize_model(build("mixtral"), out, Recipe(method="rtn", options={"bits": 4}))
    return out


@pytest.fixture(scope="module")
def budget35(art, tmp_path_factory):
    d = tmp_path_factory.mktemp("b35")
    code, text = run("extract", art, "-o", d / "art", "--budget", "3.5", "--json", d / "res.json")
    assert code == 0, text
    return d / "art", json.loads((d / "res.json").read_text()), text


def _eval(path, tmp_path, *extra):
    js = tmp_path / "e.json"
    code, out = run("eval", path, *EVAL, *extra, "--json", js)
    assert code == 0, out
    return json.loads(js.read_text()), out


def test_eval_at_bits_is_the_extracted_artifact(art, tmp_path):
    code, out = run("extract", art, "-o", tmp_path / "x3", "--bits", "3")
    assert code == 0, out
    at3, text = _eval(art, tmp_path, "--bits", "3")
    ext, _ = _eval(tmp_path / "x3", tmp_path)
    full, _ = _eval(art, tmp_path)
    assert at3["ppl"]["value"] == ext["ppl"]["value"]              # the same model, read two ways
    assert at3["ppl"]["value"] != full["ppl"]["value"]
    assert at3["bits"] == 3 and "bits" not in full
    x3 = manifest(tmp_path / "x3")
    assert at3["code_bytes_read"] == x3["totals"]["quantized_bytes"] < manifest(art)["totals"]["quantized_bytes"]
    reader = ArtifactReader(art)                                   # what the loader really reads at 3 bits
    packed_modules(reader, bits=3)
    assert reader.bytes_read == at3["code_bytes_read"]
    assert "code bytes read" in text and "3 bits" in text


def test_extract_bits_2_is_smaller_and_loads(art, tmp_path):
    out = tmp_path / "x2"
    code, text = run("extract", art, "-o", out, "--bits", "2", "--json", tmp_path / "r.json")
    assert code == 0, text
    m, src = manifest(out), manifest(art)
    assert all(e["meta"]["bits"] == 2 and sum(p.startswith("plane") for p in e["parts"]) == 2
               for e in m["tensors"].values())
    assert m["totals"]["total_bytes"] < src["totals"]["total_bytes"]
    assert m["totals"]["quantized_bytes"] < 0.35 * src["totals"]["quantized_bytes"]
    assert m.get("allocation") is None
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["totals"] == m["totals"] and res["seconds"] > 0
    from moeq.eval.perplexity import perplexity
    model, _, _ = api.load(str(out))
    ppl = perplexity(model, torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(0))).ppl
    assert math.isfinite(ppl)


def _recomputed_error(src: dict, widths: dict[str, int]) -> float:
    """sum of gate_sq * out_err[width] over the expert entries, straight from the source manifest."""
    assert all(0 < e["gate_sq"] < e["calib_tokens"] for e in src["tensors"].values() if e["role"] == "expert")
    return math.fsum(e["gate_sq"] * e["quant_info"]["out_err"][str(widths[n])]
                     for n, e in src["tensors"].items() if e["role"] == "expert")


def test_budget_3_is_no_worse_than_uniform_3(art, tmp_path):
    code, text = run("extract", art, "-o", tmp_path / "b3", "--budget", "3", "--json", tmp_path / "b3.json")
    assert code == 0, text
    code, text = run("extract", art, "-o", tmp_path / "u3", "--bits", "3", "--attention-bits", "8")
    assert code == 0, text
    res = json.loads((tmp_path / "b3.json").read_text())
    alloc, src = res["allocation"], manifest(art)
    uni = alloc["uniform"]
    assert uni["bits"] == 3 and alloc["status"] == "optimal"
    assert alloc["chosen_bytes"] <= alloc["budget_bytes"] == uni["bytes"]
    assert alloc["error"] <= uni["error"] * (1 + 1e-9)
    # the estimates are what the module docstring says, recomputed from the source manifest
    at3 = {n: 3 for n in src["tensors"]}
    assert uni["error"] == pytest.approx(_recomputed_error(src, at3), rel=1e-9)
    chosen = {n: u["bits"] for u in alloc["units"].values() for n in u["entries"]}
    assert alloc["error"] == pytest.approx(_recomputed_error(src, chosen), rel=1e-9)
    # and the bytes are the artifact's: the allocated entries + everything copied as stored
    b3, u3 = manifest(tmp_path / "b3"), manifest(tmp_path / "u3")
    assert b3["totals"]["total_bytes"] == alloc["chosen_bytes"] + res["fixed_bytes"]
    assert b3["totals"]["quantized_bytes"] <= u3["totals"]["quantized_bytes"]
    for n, e in b3["tensors"].items():
        assert e["meta"]["bits"] == (chosen[n] if e["role"] == "expert" else 8), n
    # a budget in bytes: the artifact's tensors fit it
    limit = u3["totals"]["total_bytes"] + 5000
    code, text = run("extract", art, "-o", tmp_path / "bb", "--budget", f"{limit}B", "--solver", "greedy")
    assert code == 0, text
    assert manifest(tmp_path / "bb")["totals"]["total_bytes"] <= limit


def test_allocation_is_in_the_manifest_and_in_inspect(budget35, art, tmp_path):
    path, res, text = budget35
    m = manifest(path)
    alloc = m["allocation"]
    assert alloc == res["allocation"] and alloc["solver"] == "milp" and alloc["budget"] == "3.5"
    assert len(alloc["units"]) == 8 and len({u["bits"] for u in alloc["units"].values()}) > 1  # widths differ
    assert sorted(alloc["pinned"]) == sorted(n for n, e in m["tensors"].items() if e["role"] != "expert")
    assert res["average_bits"] == pytest.approx(3.5, abs=1e-9)
    assert "expert widths" in text and "vs uniform" in text and "time" in text
    code, out = run("inspect", path, "--json", tmp_path / "i.json")
    assert code == 0, out
    info = json.loads((tmp_path / "i.json").read_text())
    assert info["allocation"]["units"] == alloc["units"]
    for row in info["allocation"]["grid"]:                       # expert x layer: one row per layer
        digits = "".join(str(b) for b in row["bits"])
        want = [alloc["units"][f"{row['module']}[{e}]"]["bits"] for e in range(4)]
        assert digits == "".join(map(str, want))
        assert any(ln.split()[:2] == [str(row["layer"]), digits] for ln in out.splitlines()), out
    code, out = run("inspect", art, "--json", tmp_path / "j.json")
    assert code == 0 and "expert widths" not in out
    assert json.loads((tmp_path / "j.json").read_text())["allocation"] is None


def test_milp_is_no_worse_than_greedy(art):
    plan = ex.plan_allocation(ArtifactReader(art).manifest, "3.5")
    best, base = ex.solve_plan(plan, "milp"), ex.solve_plan(plan, "greedy")
    assert best.nbytes <= plan.problem.budget and base.nbytes <= plan.problem.budget
    assert best.error <= base.error * (1 + 1e-9)


@pytest.mark.parametrize("field", ["gate_sq", "calib_tokens"])
def test_hot_experts_never_get_fewer_bits(art, field):
    """Every expert given the same per-width errors and a different error weight: a hotter expert never gets
    fewer bits than a colder one, whichever solver. The weight is the sum of the routed tokens' squared gate
    probabilities (gate_sq: equal token counts, different gates), or the routed tokens where no gate_sq is
    recorded (per-expert Linear experts, older artifacts)."""
    m = copy.deepcopy(ArtifactReader(art).manifest)
    experts = [(n, e) for n, e in m["tensors"].items() if e["role"] == "expert"]
    ref = {e["kind"]: e["quant_info"]["out_err"] for n, e in experts if e["expert"] == 0}
    order = torch.randperm(8, generator=torch.Generator().manual_seed(1)).tolist()
    for n, e in experts:
        e["quant_info"]["out_err"] = dict(ref[e["kind"]])
        hot = 10 + 13 * order[4 * layer_index(e["module"]) + e["expert"]]
        if field == "gate_sq":
            e["calib_tokens"], e["gate_sq"] = 200, hot / 2
        else:
            e["calib_tokens"] = hot
            e.pop("gate_sq")
    plan = ex.plan_allocation(m, "3.25")
    tokens = {u: m["tensors"][names[0]][field] for u, names in plan.members.items()}  # as set above
    assert len(set(tokens.values())) == 8
    assert all(plan.about[u]["weight"] == t for u, t in tokens.items())
    assert all(plan.about[u]["tokens"] == m["tensors"][plan.members[u][0]]["calib_tokens"] for u in tokens)
    for u in plan.free:                                          # the solver's input: tokens x the shared errors
        per_kind = [sum(ref[m["tensors"][n]["kind"]][str(r)] for n in plan.members[u.name]) for r in u.widths]
        assert list(u.error) == pytest.approx([tokens[u.name] * x for x in per_kind], rel=1e-12)
    for solver in ex.SOLVERS:
        widths = ex.solve_plan(plan, solver).widths
        assert len({widths[u] for u in tokens}) > 1, solver
        for a, b in itertools.permutations(tokens, 2):
            if tokens[a] > tokens[b]:
                assert widths[a] >= widths[b], (solver, a, b, widths)


def test_data_free_allocation_says_so(tmp_path):
    src = tmp_path / "df"
    api.quantize_model(build("mixtral"), src, Recipe(method="matryoshka", options={"mode": "data_free"}))
    code, out = run("extract", src, "-o", tmp_path / "o", "--budget", "3", "--json", tmp_path / "r.json")
    assert code == 0, out
    alloc = json.loads((tmp_path / "r.json").read_text())["allocation"]
    assert alloc["data_free"] and alloc["metric"] == "weight_mse"
    assert all(u["tokens"] is None for u in alloc["units"].values())
    assert "data-free" in out and "blind to hot experts" in out


def test_per_entry_widths_api(art, tmp_path):
    m = manifest(art)
    name = next(n for n, e in m["tensors"].items() if e["role"] == "attention")
    out = ex.extract(art, {name: 2}, tmp_path / "one")
    got = manifest(out)["tensors"]
    assert got[name]["meta"]["bits"] == 2
    assert all(e["meta"]["bits"] == 8 for n, e in got.items() if n != name)   # not named: copied as stored
    with pytest.raises(MoeqError, match="not an entry"):
        ex.extract(art, {"no.such.entry": 2}, tmp_path / "bad")
    with pytest.raises(MoeqError, match="not a width"):
        ex.extract(art, {name: 5}, tmp_path / "bad")
    assert not left_behind(tmp_path / "bad")


def test_bad_input_is_one_line_and_leaves_nothing(art, plain, tmp_path):
    out = tmp_path / "out"
    cases = [
        (["extract", art, "-o", out, "--budget", "1"], "below the minimum"),
        (["extract", art, "-o", out, "--budget", "1KB"], "below the minimum"),
        (["extract", art, "-o", out, "--budget", "3", "--bits", "3"], "one of --bits"),
        (["extract", art, "-o", out], "one of --bits"),
        (["extract", art, "--bits", "3"], "missing option"),
        (["extract", plain, "-o", out, "--bits", "3"], "no entry stores nested"),
        (["extract", plain, "-o", out, "--budget", "3"], "no entry stores nested"),
        (["extract", art, "-o", out, "--bits", "5"], "5 bits is not a width"),
        (["extract", art, "-o", out, "--budget", "3", "--attention-bits", "5"], "--attention-bits 5"),
        (["extract", art, "-o", out, "--bits", "3", "--attention-bits", "7"], "--attention-bits 7"),
        (["extract", art, "-o", out, "--budget", "3", "--solver", "cplex"], "unknown solver"),
        (["extract", art, "-o", out, "--budget", "3GHz"], "unknown unit"),
        (["extract", art, "-o", out, "--budget", "3000"], "write 3000B for bytes"),
        (["extract", tmp_path / "none", "-o", out, "--bits", "3"], "no such artifact"),
        (["extract", art, "-o", art, "--bits", "3"], "not empty"),
        (["eval", art, *EVAL, "--bits", "5"], "5 bits is not a width"),
        (["eval", plain, *EVAL, "--bits", "3"], "no entry stores nested"),
    ]
    for argv, needle in cases:
        code, text = run(*argv)
        assert_one_line_error(code, text, needle)
        assert not left_behind(out), argv
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    code, text = run("extract", art, "-o", full, "--bits", "3")
    assert_one_line_error(code, text, "not empty")
    assert [p.name for p in full.iterdir()] == ["keep.txt"]


def test_a_failure_while_writing_leaves_nothing(art, tmp_path, monkeypatch):
    calls = []

    def fail_on_second(*args):
        calls.append(1)
        if len(calls) == 2:
            raise MoeqError("disk full (simulated)")
        return copy_shard(*args)

    copy_shard = ex._copy_shard
    monkeypatch.setattr(ex, "_copy_shard", fail_on_second)
    out = tmp_path / "o"
    code, text = run("extract", art, "-o", out, "--budget", "3")
    assert_one_line_error(code, text, "disk full")
    assert len(calls) == 2 and not left_behind(out)
