"""Calibration accumulators and their hooks: one state per distinct input (q/k/v share one Hessian), experts see
only the tokens their router sends them (fused 3-D experts and per-expert Linear alike), gate weighting, pooling.
Routing is recomputed here from the router weights, independently of the code under test."""

import torch

from moeq.models.adapter import find_targets
from moeq.models.calib import Collector, observing
from moeq.quant.base import CalibSpec
from moeq.quant.stats import AbsMaxHits, Hessian
from tests.tiny_models import V, build


def _ids(n=2, length=12, seed=1):
    return torch.randint(0, V, (n, length), generator=torch.Generator().manual_seed(seed))


def _collect(model, targets, spec, ids):
    col = Collector({t: spec for t in targets})
    with observing(model, col), torch.no_grad():
        if model.config.is_encoder_decoder:
            model(input_ids=ids, decoder_input_ids=ids)
        else:
            model(input_ids=ids)
    return col.finalize()


def _capture(module, into, key):
    def hook(m, args):
        into.setdefault(key, args[0].detach().reshape(-1, args[0].shape[-1]).clone())  # returns None: args unchanged
    return module.register_forward_pre_hook(hook)


def _h(x, w=None):
    if w is None:
        return 2 * x.T @ x / x.shape[0]
    xw = x * w.sqrt()[:, None]
    return 2 * xw.T @ xw / w.sum()


def test_shared_inputs_share_one_state_and_experts_see_only_their_routed_tokens():
    m = build("mixtral")
    layer = m.model.layers[0]
    targets = [t for t in find_targets(m) if t.module.startswith("model.layers.0.")]
    seen = {}
    hooks = [_capture(layer.self_attn.q_proj, seen, "attn"), _capture(layer.self_attn.o_proj, seen, "o"),
             _capture(layer.mlp, seen, "moe")]
    stats = _collect(m, targets, CalibSpec([Hessian(), AbsMaxHits(0.5)]), _ids())
    for h in hooks:
        h.remove()
    p = "model.layers.0.self_attn."
    q, k, v, o = (stats[f"{p}{n}_proj.weight"] for n in "qkvo")
    assert q is k is v and o is not q                       # one Hessian for the input q/k/v read
    torch.testing.assert_close(q.hessian, _h(seen["attn"]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(o.hessian, _h(seen["o"]), rtol=1e-4, atol=1e-5)
    assert torch.equal(q.amax, seen["attn"].abs().amax(0))
    assert torch.equal(q.hits, (seen["attn"].abs() >= 0.5).sum(0))
    x = seen["moe"]
    probs = torch.softmax(x @ layer.mlp.gate.weight.T, dim=-1)
    top_p, top_i = probs.topk(2, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    counts = []
    for e in range(4):
        routed = (top_i == e).any(-1)
        s = stats[f"model.layers.0.mlp.experts.gate_up_proj.{e}"]
        counts.append(s.tokens)
        assert s.tokens == int(routed.sum()) > 0
        torch.testing.assert_close(s.hessian, _h(x[routed]), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(s.gate_prob), (top_p * (top_i == e)).sum(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(torch.tensor(s.gate_sq), (top_p.square() * (top_i == e)).sum(), rtol=1e-5,
                                   atol=1e-6)
        down = stats[f"model.layers.0.mlp.experts.down_proj.{e}"]
        assert down is not s and down.tokens == s.tokens and down.hessian.shape == (96, 96)
    assert sum(counts) == x.shape[0] * 2                     # top-2: every token reaches two experts


def test_gate_weighted_and_pooled_expert_statistics():
    m = build("mixtral")
    layer = m.model.layers[1]
    targets = [t for t in find_targets(m) if t.module == "model.layers.1.mlp.experts"]
    seen = {}
    h = _capture(layer.mlp, seen, "moe")
    weighted = _collect(m, targets, CalibSpec([Hessian()], gate_weighted=True), _ids())
    h.remove()
    x = seen["moe"]
    probs = torch.softmax(x @ layer.mlp.gate.weight.T, dim=-1)
    top_p, top_i = probs.topk(2, dim=-1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    for e in range(4):
        w = (top_p * (top_i == e)).sum(-1)
        s = weighted[f"model.layers.1.mlp.experts.gate_up_proj.{e}"]
        torch.testing.assert_close(s.hessian, _h(x[w > 0], w[w > 0]), rtol=1e-4, atol=1e-5)
    pooled = _collect(m, targets, CalibSpec([Hessian()], experts="pooled"), _ids())
    first = pooled["model.layers.1.mlp.experts.gate_up_proj.0"]
    assert all(pooled[f"model.layers.1.mlp.experts.gate_up_proj.{e}"] is first for e in range(4))
    assert first.tokens == x.shape[0] * 2
    torch.testing.assert_close(first.hessian, _h(torch.cat([x, x])), rtol=1e-4, atol=1e-5)  # every token, twice


def test_per_expert_linear_experts_see_only_routed_tokens():
    m = build("switch_transformers")
    targets = [t for t in find_targets(m) if t.name.startswith("encoder.block.1.layer.1.mlp.experts.") and t.name.endswith("wi.weight")]
    assert len(targets) == 4
    stats = _collect(m, targets, CalibSpec([Hessian()]), _ids(2, 8))
    tokens = [stats[t.name].tokens if stats[t.name] is not None else 0 for t in targets]
    assert sum(tokens) == 16                                  # top-1 routing of 16 tokens, capacity 64
    assert max(tokens) < 16                                   # the tokens are split, not broadcast


def starve(router, expert: int) -> None:
    """Make a Mixtral-style top-k router never pick ``expert`` (its logit is -inf), as a calibration set that
    routes no token to it would."""
    import types

    def forward(self, hidden_states):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        logits = torch.nn.functional.linear(hidden_states, self.weight)
        logits[:, expert] = float("-inf")
        probs = torch.softmax(logits.float(), dim=-1)
        top_p, top_i = torch.topk(probs, self.top_k, dim=-1)
        return logits, top_p / top_p.sum(-1, keepdim=True), top_i
    router.forward = types.MethodType(forward, router)


def test_expert_without_tokens_gets_no_statistics():
    m = build("mixtral")
    starve(m.model.layers[0].mlp.gate, 2)
    targets = [t for t in find_targets(m) if t.module == "model.layers.0.mlp.experts"]
    stats = _collect(m, targets, CalibSpec([Hessian()]), _ids())
    assert stats["model.layers.0.mlp.experts.gate_up_proj.2"] is None
    assert stats["model.layers.0.mlp.experts.down_proj.2"] is None
    assert all(stats[f"model.layers.0.mlp.experts.gate_up_proj.{e}"] is not None for e in (0, 1, 3))


def test_column_counts_equal_a_sum_over_tokens():
    from moeq.quant.stats import column_counts
    g = torch.Generator().manual_seed(0)
    for n, k in [(0, 5), (1, 1), (3, 7), (4097, 33), (300, 1536)]:
        mask = torch.rand(n, k, generator=g) > 0.7
        assert torch.equal(column_counts(mask), mask.sum(0, dtype=torch.int32)), (n, k)
    strided = (torch.rand(64, 20, generator=g) > 0.5)[:, ::3]  # a non-contiguous view
    assert torch.equal(column_counts(strided), strided.sum(0, dtype=torch.int32))
