"""Every MoE architecture: every expert weight ends up packed, the packed model stays close to the float one,
and the artifact loads back to the very same outputs."""

import json

import pytest
import torch

from moeq import api
from moeq.models.adapter import find_targets
from moeq.pipeline.plan import Plan
from moeq.recipes import Recipe
from tests.tiny_models import BUILDERS, V, build, expected_quantized

ARCHS = sorted(BUILDERS)


def _logits(model, ids):
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits
        return model(input_ids=ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_targets_cover_every_expert(arch):
    model = build(arch)
    expected, n_fused = expected_quantized(model)
    targets = Plan(Recipe(method="int8"), find_targets(model)).targets  # the default kinds
    assert sum(t.shape[0] * t.shape[1] for t in targets) == expected
    if arch != "switch_transformers":
        assert n_fused >= 2 and any(t.expert is not None for t in targets)
    else:
        assert sum(".experts.expert_" in t.name for t in targets) == 4 * 2 * 2 * 2  # experts x wi/wo x enc/dec x layers


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
def test_quantize_packs_all_experts_and_stays_close(arch, mode, tmp_path):
    model = build(arch)
    expected, _ = expected_quantized(model)
    ids = torch.randint(0, V, (2, 24), generator=torch.Generator().manual_seed(1))
    ref = _logits(model, ids)
    calib = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(2))
    recipe = Recipe(method="int8", options={"mode": mode})
    res = api.quantize_model(model, tmp_path / "art", recipe, calib_ids=calib if mode == "w8a8" else None)
    manifest = json.loads((tmp_path / "art" / "moeq.json").read_text())
    assert res["quantized_params"] == expected == manifest["totals"]["quantized_params"]
    # no float expert weight is left anywhere in the running model
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    assert res["bits_per_param"] < 9.6  # tiny shapes: per-row scales weigh more than at real sizes
    got = _logits(model, ids)
    rel = ((got - ref).norm() / ref.norm()).item()
    assert rel < 0.03, rel
    loaded, _, _ = api.load(tmp_path / "art")
    # the same packed tensors; only buffers rebuilt from config.json (RoPE) may differ in the last float bit
    torch.testing.assert_close(_logits(loaded, ids), got, rtol=1e-5, atol=1e-5)
