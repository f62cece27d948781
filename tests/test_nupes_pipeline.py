"""NUPES through the whole engine: a per-tensor plan mixing NUPES and int8 in one artifact, one exponent per expert
on every MoE architecture, sequential calibration in data-driven mode, and the artifact loading back to the same
logits the in-memory quantized model computes."""

import json

import pytest
import torch

from moeq import api
from moeq.recipes import Recipe
from tests.tiny_models import V, build, expected_quantized

MIXED = [{"targets": ["expert"], "method": "nupes", "options": {"bits": 3, "group_size": 32, "mode": "data_driven",
                                                                "refine_steps": 10}},
         {"targets": ["attention"], "method": "int8"},
         {"targets": ["dense_mlp", "shared_expert"], "method": "nupes", "options": {"bits": 4, "group_size": 0}}]


def _entries(path):
    return json.loads((path / "moeq.json").read_text())["tensors"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_mixed_plan_every_expert_has_its_own_exponent(arch, tmp_path):
    torch.set_num_threads(1)
    m = build(arch)
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    res = api.quantize_model(m, tmp_path / "art", Recipe(rules=MIXED), calib_ids=ids)
    entries = _entries(tmp_path / "art")
    params, _ = expected_quantized(build(arch))
    assert res["quantized_params"] == params                 # nothing skipped, experts included
    experts = {n: e for n, e in entries.items() if e["role"] == "expert"}
    assert experts and all(e["codec"] == "nupes" and e["meta"]["bits"] == 3 for e in experts.values())
    assert {e["codec"] for e in entries.values() if e["role"] == "attention"} == {"int8-rows"}
    assert all(e["calib_tokens"] > 0 or e.get("fallback") for e in experts.values())
    exps = [e["meta"]["exponent"] for e in experts.values()]
    assert len(set(exps)) > len(exps) // 2                   # fitted per expert, not one per layer
    with torch.no_grad():
        out = m(input_ids=ids).logits
        loaded, _, _ = api.load(str(tmp_path / "art"))
        back = loaded(input_ids=ids).logits
    torch.testing.assert_close(back, out, rtol=1e-4, atol=1e-4)  # the artifact is what was evaluated in memory
    assert (out.argmax(-1) == ref.argmax(-1)).float().mean() > 0.5


def test_data_free_needs_no_calibration_and_reports_exponents(tmp_path):
    m = build("mixtral")
    recipe = Recipe(method="nupes", options={"bits": 4, "group_size": 64})
    assert not recipe.needs_calibration()
    api.quantize_model(m, tmp_path / "art", recipe)
    infos = [e["quant_info"] for e in _entries(tmp_path / "art").values()]
    assert all(0.2 <= i["exponent"] <= 2.0 and i["mse_vs_uniform"] <= 1.0 + 1e-6 for i in infos)
