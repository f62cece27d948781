"""The embedded default model ``tiny-moe`` (moeq/zoo/tiny-moe, built by ``python -m moeq.zoo.train_tiny_moe``):
loads through the user-facing loader, is a routed 8-expert top-2 Mixtral, reproduces the perplexity recorded in
its card, and uses every expert."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import moeq

ZOO_DIR = Path(moeq.__file__).resolve().parent / "zoo" / "tiny-moe"
CARD = ZOO_DIR / "card.json"


@pytest.fixture(scope="module")
def card() -> dict:
    return json.loads(CARD.read_text())


@pytest.fixture(scope="module")
def loaded():
    from moeq.models.loader import load_model

    loaded = load_model("tiny-moe", dtype=torch.float32)  # (model, tokenizer[, source])
    model, tokenizer = loaded[0], loaded[1]
    model.eval()
    return model, tokenizer


@pytest.fixture(scope="module")
def check_windows(loaded, card):
    from moeq.data.corpus import wiki_split
    from moeq.eval.perplexity import tokenize_windows

    _, tokenizer = loaded
    return tokenize_windows(tokenizer, "\n\n".join(wiki_split("eval")), card["seqlen"],
                            max_windows=card["ppl_check"]["windows"])


def test_directory_is_a_small_bf16_hf_model(card):
    names = {p.name for p in ZOO_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "README.md", "card.json"} <= names
    config = json.loads((ZOO_DIR / "config.json").read_text())
    assert config["dtype"] == "bfloat16"
    assert not config.get("output_router_logits", False)
    total = sum(p.stat().st_size for p in ZOO_DIR.iterdir() if p.is_file())
    assert total < 21_000_000
    from safetensors import safe_open
    with safe_open(str(ZOO_DIR / "model.safetensors"), "pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    assert card["eval_ppl"] < card["unigram_ppl"] / 2  # clearly better than the unigram baseline


def test_architecture(loaded):
    from transformers import MixtralForCausalLM

    model, tokenizer = loaded
    assert isinstance(model, MixtralForCausalLM)
    cfg = model.config
    assert cfg.num_local_experts == 8 and cfg.num_experts_per_tok == 2
    assert 5e6 <= sum(p.numel() for p in model.parameters()) <= 15e6
    assert next(model.parameters()).dtype == torch.float32
    layer = model.model.layers[0]
    assert layer.mlp.experts.gate_up_proj.shape[0] == 8 and layer.mlp.gate.weight.shape[0] == 8
    assert 4000 <= len(tokenizer) <= 8192 and tokenizer.eos_token is not None
    text = "The river flows north.\n\nIt"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def _routed_ppl(model, windows):
    """Perplexity plus the per-layer count of token slots each expert received."""
    from moeq.eval.perplexity import perplexity

    n_experts = model.config.num_local_experts
    counts = [torch.zeros(n_experts, dtype=torch.float64) for _ in model.model.layers]

    def make_hook(c):
        def hook(_mod, _inp, out):  # MixtralTopKRouter -> (logits, top-k weights, top-k indices)
            c.add_(torch.bincount(out[2].reshape(-1), minlength=n_experts).double())
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(make_hook(c)) for layer, c in zip(model.model.layers, counts)]
    try:
        res = perplexity(model, windows, "gptq", batch_size=8)
    finally:
        for h in hooks:
            h.remove()
    return res, counts


@pytest.fixture(scope="module")
def routed(loaded, check_windows):
    return _routed_ppl(loaded[0], check_windows)


def test_ppl_matches_card(routed, card, loaded, check_windows):
    res, counts = routed
    expected = card["ppl_check"]["ppl"]
    assert res.windows == card["ppl_check"]["windows"]
    assert math.isfinite(res.ppl)
    assert abs(res.ppl - expected) / expected < 0.01, (res.ppl, expected)
    for c in counts:
        assert c.sum().item() == check_windows.numel() * loaded[0].config.num_experts_per_tok


@pytest.fixture(scope="module")
def eval_routing(loaded, card):
    """Routing over the WHOLE eval split (the card's histogram is measured there, and 8 windows are too few
    for the hot-expert figure: they give 1.48x where the split gives 1.54x)."""
    from moeq.data.corpus import wiki_split
    from moeq.eval.perplexity import tokenize_windows
    windows = tokenize_windows(loaded[1], "\n\n".join(wiki_split("eval")), card["seqlen"])
    res, counts = _routed_ppl(loaded[0], windows)
    assert res.windows == card["eval_windows"]
    return [c / c.sum() for c in counts]


def test_routing_matches_card(eval_routing, card):
    for li, share in enumerate(eval_routing):
        assert torch.allclose(share.float(), torch.tensor(card["routing_hist_eval"][li]), atol=2e-3), li


def test_routing_is_neither_uniform_nor_collapsed(eval_routing):
    assert max((s.max() * s.numel()).item() for s in eval_routing) >= 1.5  # real MoEs have hot experts


def test_every_expert_gets_two_percent(eval_routing):
    for li, share in enumerate(eval_routing):
        assert share.min().item() >= 0.02, f"layer {li}: expert share {share.tolist()}"
