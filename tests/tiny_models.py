"""Tiny random-weight models of every MoE architecture moeq must cover, built in-process from configs.

``ROUTERS`` names each architecture's router/gate weights by shape rule, independently of moeq's adapter, so
the tests can count the parameters that MUST be quantized without asking the code under test."""

from __future__ import annotations

import math
import re

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


# ---------------------------------------------------------------------------------------------------------
# The architecture sweep: every model type the installed transformers ships with routed experts, built tiny
# from its config class's defaults (nothing hand-listed: the types come from transformers' auto mappings, the
# experts are found in the built model's structure).
# ---------------------------------------------------------------------------------------------------------
SWEEP_EXPERTS, SWEEP_LAYERS = 4, 2  # distinct, so an expert list is never mistaken for the decoder-layer list
# a tiny value for each config attribute of these names, wherever a config (or sub-config) has it
TINY = {
    "vocab_size": V, "unpadded_vocab_size": V - 8, "hidden_size": 64, "d_model": 64, "n_embd": 64,
    "intermediate_size": 96, "intermediate_size_mlp": 96, "ffn_dim": 96, "d_ff": 96, "ffn_hidden_size": 96,
    "decoder_ffn_dim": 96, "encoder_ffn_dim": 96, "moe_intermediate_size": 48, "shared_expert_intermediate_size": 48,
    "moe_shared_expert_intermediate_size": 48, "shared_experts_intermediate_size": 48, "expert_ffn_hidden_size": 48,
    "hidden_size_per_layer_input": 16, "vocab_size_per_layer_input": V, "audio_hidden_size": 64,
    "num_hidden_layers": SWEEP_LAYERS, "num_layers": SWEEP_LAYERS, "n_layers": SWEEP_LAYERS, "n_layer": SWEEP_LAYERS,
    "num_decoder_layers": SWEEP_LAYERS, "decoder_layers": SWEEP_LAYERS, "encoder_layers": SWEEP_LAYERS,
    "num_attention_heads": 4, "n_heads": 4, "n_head": 4, "num_heads": 4, "decoder_attention_heads": 4,
    "encoder_attention_heads": 4, "num_key_value_heads": 2, "kv_n_heads": 2, "head_dim": 16, "d_kv": 16,
    "num_local_experts": SWEEP_EXPERTS, "num_experts": SWEEP_EXPERTS, "n_routed_experts": SWEEP_EXPERTS,
    "moe_num_experts": SWEEP_EXPERTS, "num_experts_per_tok": 2, "num_experts_per_token": 2, "moe_topk": 2,
    "moe_top_k": 2, "moe_k": 2, "top_k_experts": 2, "n_group": 1, "topk_group": 1, "num_expert_group": 1,
    "n_shared_experts": 1, "num_shared_experts": 1, "moe_num_shared_experts": 1,
    # MLA (DeepSeek-style) attention: head_dim is the rope part
    "q_lora_rank": 32, "kv_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "qk_head_dim": 16,
    "v_head_dim": 16,
    # expert layers in a 2-layer model: the first may stay dense, the second is sparse
    "first_k_dense_replace": 1, "num_dense_layers": 1, "mlp_only_layers": [], "decoder_sparse_step": 1,
    "encoder_sparse_step": 1, "moe_layer_freq": 1, "expert_capacity": 64,
    "max_position_embeddings": 128, "sliding_window": 16,
    # Mamba / linear-attention mixers of hybrid models
    "ssm_state_size": 16, "mamba_num_heads": 4, "mamba_head_dim": 16, "n_groups": 1, "chunk_size": 16,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_n_groups": 1, "mamba_d_state": 16, "mamba_chunk_size": 16,
    "mamba_dt_rank": 8, "linear_head_dim": 16, "linear_num_heads": 4, "linear_key_head_dim": 16,
    "linear_value_head_dim": 16, "linear_num_key_heads": 2, "linear_num_value_heads": 4,
    # DeepSeek-V3.2-style sparse-attention indexers
    "index_n_heads": 4, "index_head_dim": 16, "index_topk": 64, "zero_expert_num": 2,
}


def sweep_types() -> list[tuple[str, str]]:
    """(model type, head class name) for every model type with a causal-LM or seq2seq-LM head whose default
    config mentions experts anywhere (the routed experts themselves are then found structurally)."""
    from transformers import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )
    heads = {**MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES, **MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
    out = []
    for model_type in sorted(heads):
        if model_type not in CONFIG_MAPPING:
            continue
        try:
            keys = _keys(CONFIG_MAPPING[model_type]().to_dict())
        except Exception:  # noqa: BLE001 - defaults that do not validate: kept, the sweep reports why
            out.append((model_type, heads[model_type]))
            continue
        if any("expert" in k for k in keys):
            out.append((model_type, heads[model_type]))
    return out


def _keys(d: dict) -> set[str]:
    out = set()
    for k, v in d.items():
        out.add(str(k).lower())
        if isinstance(v, dict):
            out |= _keys(v)
    return out


LAYER_COUNTS = ("num_hidden_layers", "num_layers", "n_layers", "n_layer", "num_decoder_layers", "decoder_layers",
                "encoder_layers")


def _shrink(cfg) -> dict:
    """Constructor arguments that make ``cfg`` (a config instance with its class's defaults) tiny. Relations the
    defaults hold are kept: as many key/value heads as query heads, top-1 routing, and one layer of each kind the
    per-layer lists and overrides describe (attention / linear attention / Mamba, dense / sparse MLP, ...)."""
    from transformers import PreTrainedConfig
    d = cfg.to_dict()
    n_layers = next((getattr(cfg, k) for k in LAYER_COUNTS if isinstance(getattr(cfg, k, None), int)), None)
    kw = {k: v for k, v in TINY.items() if k in d}
    if "qk_rope_head_dim" in d:
        kw["head_dim"] = TINY["qk_rope_head_dim"]
    for heads, kv in (("num_attention_heads", "num_key_value_heads"), ("n_heads", "kv_n_heads")):
        if kv in kw and d.get(kv) is not None and d.get(kv) == d.get(heads):
            kw[kv] = kw[heads]
    for k in ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "moe_top_k", "moe_k", "top_k_experts"):
        if d.get(k) == 1:
            kw[k] = 1
    indices = {k: v for k, v in d.items() if k not in kw and n_layers and _layer_indices(v, n_layers)}
    per_layer = {k: v for k, v in d.items()
                 if k not in kw and k not in indices and n_layers and _per_layer(v, n_layers)}
    keep = _layers_to_keep(per_layer, n_layers) if per_layer else None
    if keep is not None:
        kw.update({k: len(keep) for k in LAYER_COUNTS if k in kw})
    if indices:
        kept = keep or [0, n_layers - 1]
        kw.update({k: [j for j, i in enumerate(kept) if i in v] for k, v in indices.items()})
    for k, v in d.items():
        if k in kw:
            continue
        sub = getattr(cfg, k, None)
        if isinstance(sub, PreTrainedConfig):
            kw[k] = {**v, **_shrink(sub)}
        elif v is False and re.match(r"(enable|use|is)_moe", k):
            kw[k] = True  # the config's MoE variant (e.g. enable_moe_block)
        elif k in per_layer and isinstance(v, list):
            kw[k] = [v[i] for i in keep]
        elif k in per_layer:  # overrides {layer: {attr: value}}, their values made tiny too
            over = {int(i): o for i, o in v.items()}
            kw[k] = {j: {a: kw.get(a, TINY.get(a, x)) for a, x in over[i].items()}
                     for j, i in enumerate(keep) if i in over}
    vocab = kw.get("vocab_size", d.get("vocab_size"))
    ids = sorted(k for k, v in d.items() if k.endswith("token_id") and isinstance(v, int) and vocab and v >= vocab)
    kw.update({k: vocab - 1 - i for i, k in enumerate(ids)})  # special tokens inside the tiny vocabulary
    return kw


def _layer_indices(v, n_layers: int) -> bool:
    """A list of layer indices (e.g. Llama4's ``moe_layers``)."""
    return isinstance(v, list) and len(v) > 1 and all(type(i) is int for i in v) and v == sorted(set(v)) \
        and v[-1] < n_layers


def _per_layer(v, n_layers: int) -> bool:
    """A list with one entry per layer, or per-layer overrides ``{layer index: {attr: value}}``."""
    if isinstance(v, list):
        return len(v) == n_layers > SWEEP_LAYERS
    return isinstance(v, dict) and bool(v) and all(str(i).isdigit() and isinstance(o, dict) for i, o in v.items())


def _layers_to_keep(per_layer: dict, n_layers: int) -> list[int]:
    """The first layer of each distinct kind (its entries across all per-layer lists and overrides), and at least
    the first and the last layer."""
    def kind(i):
        return tuple(repr(v[i]) if isinstance(v, list) else repr(v.get(f"{i:02d}", v.get(str(i), v.get(i))))
                     for v in per_layer.values())
    first: dict[tuple, int] = {}
    for i in range(n_layers):
        first.setdefault(kind(i), i)
    return sorted(set(first.values()) | {0, n_layers - 1})


def tiny_config(model_type: str):
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    return cls(**_shrink(cls()))


def build_tiny(model_type: str, head: str, seed: int = 0) -> torch.nn.Module:
    """A tiny random model of ``model_type`` with the ``head`` class, every weight real and routing decisive."""
    cfg = tiny_config(model_type)
    cls = getattr(tf, head)
    if not isinstance(cfg, cls.config_class) and isinstance(getattr(cfg, "text_config", None), cls.config_class):
        cfg = cfg.text_config  # e.g. Llama4ForCausalLM is the text part of a composite config
    torch.manual_seed(seed)
    return _realistic(cls(cfg).eval())


def _realistic(m: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():  # some inits leave expert tensors at exactly zero; give every weight real values
        for name, p in m.named_parameters():
            if p.ndim >= 2 and p.abs().max() == 0:
                p.normal_(0, 0.02)
            if ("router" in name or name.endswith("gate.weight")) and p.ndim == 2:
                p.mul_(20)  # decisive routing: near-ties would flip under any rounding
    return m


def routed_experts(model: torch.nn.Module, n_experts: int = SWEEP_EXPERTS) -> dict[str, int]:
    """Routed-expert weight matrices found by structure alone, name -> params: 3-D parameters with one slice per
    expert (not convolution kernels), and the >= 2-D weights inside per-expert module lists (``n_experts``
    identical modules beside a router: a 2-D weight with ``n_experts`` rows or columns)."""
    convs = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)
    out = {}
    for mname, mod in model.named_modules():
        if isinstance(mod, convs):
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if p.ndim == 3 and p.shape[0] == n_experts:
                out[f"{mname}.{pname}"] = p.numel()
        for cname, child in mod.named_children():
            if _expert_list(mod, child, n_experts):
                for pname, p in child.named_parameters():
                    if p.ndim >= 2:
                        out[f"{mname}.{cname}.{pname}"] = p.numel()
    return out


def _expert_list(parent, child, n_experts: int) -> bool:
    """``child`` holds one module per expert (a ModuleList, ModuleDict or own class whose parameterized children are
    ``n_experts`` alike MLPs: two or more weighted layers each) and ``parent`` holds a router beside it (a 2-D weight
    with a dim of ``n_experts``)."""
    members = [m for m in child.children() if any(True for _ in m.parameters())]
    if len(members) != n_experts or any(True for _ in child.parameters(recurse=False)):
        return False
    if any(sum(1 for x in m.modules() if any(True for _ in x.parameters(recurse=False))) < 2 for m in members):
        return False
    shapes = [[tuple(p.shape) for p in m.parameters()] for m in members]
    if any(type(m) is not type(members[0]) or s != shapes[0] for m, s in zip(members, shapes)):
        return False
    if any(isinstance(x, (torch.nn.ModuleList, torch.nn.ModuleDict)) for m in members for x in m.modules()):
        return False
    own = {id(p) for p in child.parameters()}
    return any(p.ndim == 2 and n_experts in p.shape for p in parent.parameters() if id(p) not in own)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(input_ids=ids, decoder_input_ids=ids).logits.float()
        return model(input_ids=ids, use_cache=False).logits.float()


# the checks of one sweep, in order; the first two are the streaming reader's, the rest moeq's adapter and runtime
CHECKS = ("reader_equals_from_pretrained", "streamed_equals_in_memory", "experts_packed", "loaded_equals_in_memory",
          "close_to_float")
LOADED_TOL = 1e-5  # max |loaded - in-memory packed| / max |logits|: the same packed bytes run by the same modules
FLOAT_TOL = 0.3    # rms |loaded - float| / rms |float logits|: int8 weight-only error, routing flips included


def sweep(model_type: str, head: str, workdir) -> dict:
    """One architecture through moeq, data-free int8 weight-only. A tiny random model is saved with
    ``save_pretrained``, which writes the checkpoint layout transformers' reverse conversion mapping gives (the
    original per-expert tensors, for most MoEs), and then, in ``CHECKS`` order:

    - the streaming reader's tensors equal ``from_pretrained``'s, name by name;
    - streamed quantization (``moeq.api.quantize``) writes the same packed and kept tensors (sha256) as in-memory
      quantization of the model itself (``moeq.api.quantize_model``);
    - every routed-expert weight (found in the float model's structure by ``routed_experts``, not by moeq) is
      packed: the manifest's expert entries plus the entries inside per-expert module lists add up to them;
    - ``moeq.api.load`` runs the artifact to the logits of the in-memory packed model (``LOADED_TOL``), and near the
      float model's (``FLOAT_TOL``).

    Returns a record: ``status`` "ok", "skip" (transformers cannot build, run or save the tiny model, or it has no
    routed experts) or "fail" (``failed`` names the first check that failed), ``reason``, and the numbers."""
    import json
    import time
    from pathlib import Path

    from moeq import api
    from moeq.models.stream import CheckpointReader, build_empty
    from moeq.recipes import Recipe

    rec = {"model_type": model_type, "head": head, "status": "ok", "failed": None, "reason": "", "routed_params": 0,
           "packed_routed_params": 0, "max_err_loaded_vs_in_memory": None, "max_rel_err_vs_float": None,
           "rms_rel_err_vs_float": None, "seconds": None}
    t0 = time.perf_counter()

    def done(status="ok", reason="", failed=None):
        return {**rec, "status": status, "reason": reason, "failed": failed,
                "seconds": round(time.perf_counter() - t0, 2)}

    try:
        model = build_tiny(model_type, head)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the sweep classifies it
        return done("skip", _build_failure(model_type, head, e))
    routed = routed_experts(model)
    rec["routed_params"] = sum(routed.values())
    if not routed:
        return done("skip", "no routed experts in the model its config builds")
    ids = torch.randint(0, V - 3, (2, 16), generator=torch.Generator().manual_seed(0))
    work = Path(workdir)
    src, streamed, in_mem = work / "float", work / "streamed", work / "in-memory"
    try:
        float_logits = _logits(model, ids)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the sweep classifies it
        return done("skip", f"float forward fails: {_line(e)}")
    try:
        model.save_pretrained(src)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the sweep classifies it
        return done("skip", f"save_pretrained fails: {_line(e)}")
    check = CHECKS[0]
    try:
        reader = CheckpointReader(src, build_empty(model.config))
        ref = type(model).from_pretrained(src).eval()
        tied = getattr(ref, "all_tied_weights_keys", None) or {}
        for name, t in ref.state_dict().items():
            got = reader.tensor(name)
            if got is None and name in tied:
                continue
            if got is None or got.shape != t.shape or not torch.equal(got, t):
                return done("fail", f"reader differs from from_pretrained at {name}", check)
        del ref, reader
        check = CHECKS[1]
        recipe = Recipe(model=str(src), method="int8", options={"mode": "weight_only"})
        api.quantize(recipe, streamed)
        api.quantize_model(model, in_mem, recipe, source=str(src))
        manifest, other = (json.loads((d / "moeq.json").read_text()) for d in (streamed, in_mem))
        for part in ("tensors", "kept"):
            if {k: v["sha256"] for k, v in manifest[part].items()} != {k: v["sha256"] for k, v in other[part].items()}:
                return done("fail", f"streamed {part} differ from the in-memory run", check)
        check = CHECKS[2]
        entries = manifest["tensors"].values()
        in_lists = {n for n in routed if n.endswith(".weight")} & {f"{e['module']}.{e['param']}" for e in entries}
        rec["packed_routed_params"] = sum(math.prod(e["shape"]) for e in entries
                                          if e["expert"] is not None or f"{e['module']}.{e['param']}" in in_lists)
        if rec["packed_routed_params"] != rec["routed_params"]:
            unpacked = sorted(n for n in routed if n not in in_lists and not any(n == f"{e['module']}.{e['param']}"
                                                                               for e in entries))
            return done("fail", f"{rec['routed_params']} routed-expert params, {rec['packed_routed_params']} packed"
                        + (f" ({unpacked[0]} is not)" if unpacked else ""), check)
        check = CHECKS[3]
        in_mem_logits = _logits(model, ids)
        loaded_logits = _logits(api.load(streamed)[0], ids)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises, the sweep classifies it
        return done("fail", f"{type(e).__name__}: {_line(e)}", check)
    err = loaded_logits - float_logits
    rec["max_err_loaded_vs_in_memory"] = float((loaded_logits - in_mem_logits).abs().max())
    rec["max_rel_err_vs_float"] = float(err.abs().max() / float_logits.abs().max())
    rec["rms_rel_err_vs_float"] = float(err.pow(2).mean().sqrt() / float_logits.pow(2).mean().sqrt())
    if rec["max_err_loaded_vs_in_memory"] > LOADED_TOL * float(in_mem_logits.abs().max()):
        return done("fail", f"loaded logits differ from the in-memory packed model's by "
                            f"{rec['max_err_loaded_vs_in_memory']:.3g}", CHECKS[3])
    if not rec["rms_rel_err_vs_float"] < FLOAT_TOL:
        return done("fail", f"rms error vs float {rec['rms_rel_err_vs_float']:.3g} >= {FLOAT_TOL}", CHECKS[4])
    return done()


def _line(e: BaseException) -> str:
    """The error's message on one line (a validation error's reason is on its second)."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()] or [type(e).__name__]
    return " ".join(lines[:2])[:200]


def _build_failure(model_type: str, head: str, e: BaseException) -> str:
    """Why the tiny model could not be built: its defaults fail too (a transformers limitation), or shrinking."""
    from transformers import CONFIG_MAPPING
    try:
        cfg = CONFIG_MAPPING[model_type]()
        cls = getattr(tf, head)
        if not isinstance(cfg, cls.config_class) and isinstance(getattr(cfg, "text_config", None), cls.config_class):
            cfg = cfg.text_config
        with torch.device("meta"):
            cls(cfg)
    except Exception as d:  # noqa: BLE001
        return f"its default config does not build a model either: {_line(d)}"
    return f"config cannot be shrunk generically: {_line(e)}"
