"""The README's main job: `moeq quantize --method int8` with no model packs the embedded tiny-moe (every
expert of every layer), and `moeq eval` reports it against the float model."""

import json

from typer.testing import CliRunner

from moeq.cli.app import app
from moeq.recipes import load_recipe
from tests.test_recipes import RECIPES

runner = CliRunner()


def test_default_job_quantizes_and_evaluates_tiny_moe(tmp_path):
    out = tmp_path / "tiny-moe-int8"
    r = runner.invoke(app, ["quantize", "--method", "int8", "-o", str(out), "--json", str(tmp_path / "q.json")])
    assert r.exit_code == 0, r.output
    m = json.loads((out / "moeq.json").read_text())
    assert m["source"]["model"] == "tiny-moe"
    cfg = json.loads((out / "config.json").read_text())
    n_layers, n_exp = cfg["num_hidden_layers"], cfg["num_local_experts"]
    experts = [e for e in m["tensors"].values() if e["expert"] is not None]
    assert len(experts) == n_layers * n_exp * 2  # gate_up_proj and down_proj of every expert
    # experts the router never picks get no calibration tokens: quantized data-free, visibly, and counted
    starved = [e for e in experts if e["calib_tokens"] == 0]
    assert all("fallback" in e for e in starved) and m["totals"]["fallbacks"] == len(starved)
    assert not starved  # tiny-moe has no dead experts: calibration reaches every expert of every layer
    r = runner.invoke(app, ["eval", str(out), "--windows", "4", "--seqlen", "256", "--no-speed",
                            "--json", str(tmp_path / "e.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "e.json").read_text())
    assert res["baseline"] == "tiny-moe"
    assert res["ppl_ratio"] < 1.02 and res["kl_mean"] < 0.02, res


def test_tiny_moe_recipe_is_the_default_job():
    r = load_recipe([p for p in RECIPES if p.name == "tiny-moe-int8.yaml"][0])
    assert r.model == "tiny-moe" and r.method == "int8"
