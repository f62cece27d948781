"""`moeq eval` / `api.load` of an artifact larger than the memory it is given: accelerate places the decoder
layers that do not fit on disk and runs them from there, with the same outputs as a fully loaded model."""

import json

import pytest
import torch
from typer.testing import CliRunner

from moeq import api
from moeq.cli.app import app
from moeq.recipes import Recipe


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("offload") / "art"
    api.quantize(Recipe(model=str(tiny_model_dir), method="int8", calibration={"samples": 8, "seqlen": 64}), out)
    return out


def _layer_bytes(artifact):
    m = json.loads((artifact / "moeq.json").read_text())
    return sum(e["bytes"] for e in m["tensors"].values() if e["module"].startswith("model.layers.0."))


def test_offloaded_model_matches_in_memory(artifact, tmp_path):
    full, tok, _ = api.load(artifact)
    ids = torch.randint(0, full.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    ref = full(ids).logits
    embeddings = sum(p.numel() * 4 for n, p in full.named_parameters() if not n.startswith("model.layers."))
    budget = embeddings + int(1.5 * _layer_bytes(artifact))  # room for about one of the two layers
    off, _, _ = api.load(artifact, max_memory=budget, offload_dir=tmp_path / "off")
    assert off.moeq_placement["disk_layers"] >= 1
    assert any(p.device.type == "meta" for p in off.model.layers[-1].parameters()) or \
        any(b.device.type == "meta" for b in off.model.layers[-1].buffers())
    assert (tmp_path / "off" / "index.json").is_file()
    torch.testing.assert_close(off(ids).logits, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(off(ids).logits, ref, rtol=0, atol=1e-5)  # twice: reloads from disk each forward


def test_cli_eval_with_max_memory(artifact, tiny_model_dir, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(artifact), "--max-memory", "300KB", "--windows", "2", "--seqlen", "64",
                                 "--dtype", "fp32", "--no-speed", "--baseline", str(tiny_model_dir),
                                 "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["placement"]["disk_layers"] >= 1
    assert "layers in RAM / on disk" in r.output
    r2 = CliRunner().invoke(app, ["eval", str(artifact), "--windows", "2", "--seqlen", "64", "--no-speed",
                                  "--dtype", "fp32", "--baseline", str(tiny_model_dir),
                                  "--json", str(tmp_path / "full.json")])
    assert r2.exit_code == 0, r2.output
    full = json.loads((tmp_path / "full.json").read_text())
    assert "placement" not in full
    assert res["ppl"]["value"] == pytest.approx(full["ppl"]["value"], rel=1e-5)
    assert res["baseline_ppl"] == pytest.approx(full["baseline_ppl"], rel=1e-5)  # the float baseline offloaded too


@pytest.mark.parametrize("size,msg", [("1KB", "alone need"), ("lots", "expected a positive size")])
def test_cli_bad_max_memory_is_one_line(artifact, size, msg):
    r = CliRunner().invoke(app, ["eval", str(artifact), "--max-memory", size, "--windows", "1", "--seqlen", "64",
                                 "--no-speed"])
    assert r.exit_code == 2
    assert msg in r.output and "Traceback" not in r.output


def test_float_model_offloaded_matches(tiny_model_dir, tmp_path):
    """The float baseline under a budget is streamed layer by layer into the offload, same logits."""
    from moeq.models.loader import load_model
    full, _, _ = load_model(str(tiny_model_dir))
    off, _, _ = load_model(str(tiny_model_dir), max_memory=300 * 1024, offload_dir=tmp_path / "off")
    assert off.moeq_placement["disk_layers"] >= 1
    ids = torch.randint(0, full.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(off(ids).logits, full(ids).logits, rtol=0, atol=1e-5)


def test_no_baseline_skips_the_source_model(artifact, tmp_path):
    r = CliRunner().invoke(app, ["eval", str(artifact), "--no-baseline", "--windows", "1", "--seqlen", "64",
                                 "--no-speed", "--json", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["baseline"] is None and "baseline_ppl" not in res and "kl_mean" not in res
