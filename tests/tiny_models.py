"""Tiny random-weight models of every MoE architecture moeq must cover, built in-process from configs.

``ROUTERS`` names each architecture's router/gate weights by shape rule, independently of moeq's adapter, so
the tests can count the parameters that MUST be quantized without asking the code under test."""

from __future__ import annotations

import torch
import transformers as tf

V = 128


def _mixtral():
    return tf.MixtralForCausalLM(tf.MixtralConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=128))


def _qwen2_moe():
    return tf.Qwen2MoeForCausalLM(tf.Qwen2MoeConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
        shared_expert_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128))


def _qwen3_moe():
    return tf.Qwen3MoeForCausalLM(tf.Qwen3MoeConfig(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=128))


def _olmoe():
    return tf.OlmoeForCausalLM(tf.OlmoeConfig(
        vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, num_experts=4, num_experts_per_tok=2, max_position_embeddings=128))


def _deepseek_v3():
    return tf.DeepseekV3ForCausalLM(tf.DeepseekV3Config(
        vocab_size=V, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1,
        first_k_dense_replace=1, n_group=1, topk_group=1, q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16, max_position_embeddings=128))


def _gpt_oss():
    return tf.GptOssForCausalLM(tf.GptOssConfig(
        vocab_size=V, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, sliding_window=16,
        layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128))


def _switch():
    return tf.SwitchTransformersForConditionalGeneration(tf.SwitchTransformersConfig(
        vocab_size=V, d_model=64, d_ff=96, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4,
        num_experts=4, encoder_sparse_step=1, decoder_sparse_step=1, expert_capacity=64,
        initializer_factor=0.4))


BUILDERS = {"mixtral": _mixtral, "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "olmoe": _olmoe,
            "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss, "switch_transformers": _switch}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    m = BUILDERS[arch]().eval()
    with torch.no_grad():  # some inits leave expert tensors at exactly zero; give every weight real values
        for name, p in m.named_parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.normal_(0, 0.02)
            if "router" in name and p.ndim == 2:  # decisive routing: near-ties would flip under any rounding
                p.mul_(20)
    return m


def expected_quantized(model) -> tuple[int, int]:
    """(params, number of 3-D expert params) every MoE weight included: all weights of ndim >= 2 except
    embeddings, the output head, and routers (a 2-D weight whose first dim is the expert count, or 1 for
    Qwen2-MoE's shared-expert gate)."""
    n_exp = getattr(model.config, "num_local_experts", None) or getattr(model.config, "num_experts", None) \
        or getattr(model.config, "n_routed_experts")
    emb = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    head = model.get_output_embeddings()
    total, fused = 0, 0
    for name, p in model.named_parameters():
        if p.ndim < 2 or name.endswith("bias") or id(p) in emb or (head is not None and p is head.weight):
            continue
        if p.ndim == 2 and p.shape[0] in (n_exp, 1) and ("gate" in name or "router" in name):
            continue
        total += p.numel()
        fused += p.ndim == 3
    return total, fused
