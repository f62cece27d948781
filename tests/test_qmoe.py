"""QMoE: the ternary grid, ternary GPTQ on routed-token Hessians against round-to-nearest, one dictionary per fused
parameter from its own symbol statistics, starved experts (rtn / route_all) recorded in the manifest, and every
expert of every MoE architecture compressed (a skipped expert fails the parameter count)."""

import json

import pytest
import torch

from moeq import api
from moeq.formats import ternary_dict as td
from moeq.quant.base import Stats
from moeq.quant.qmoe import GRIDS, QMoEQuantizer, TernaryGrid
from moeq.quant.uniform import FP16_MAX
from moeq.recipes import Recipe
from tests.conformance import QuantizerConformance, sqnr_db
from tests.tiny_models import V, build, expected_quantized

Q = QMoEQuantizer()


class TestQMoEQuantizer(QuantizerConformance):
    quantizer = Q
    # floors on the WEIGHT's SQNR, measured minus ~0.5 dB (96x160 Gaussian; ternary is harsh: GPTQ trades weight
    # error for output error on its 64 calibration tokens, see the output test below)
    configs = [("ternary-rtn", Q.Config(calibrate=False), 2.2),
               ("ternary-gptq", Q.Config(), -0.5),
               ("2bit-rtn", Q.Config(grid="2bit", calibrate=False), 5.2),
               ("2bit-gptq", Q.Config(grid="2bit"), 2.7)]

    def stats_for(self, cfg, x):
        return Stats(tokens=x.shape[0], values={"hessian": 2 * x.T @ x / x.shape[0]})

    def constant_row(self, cfg, row):
        """Ternary keeps a constant row exactly (its level is the row's max, float16-exact here); the 2-bit grid
        to its float16 scale's precision."""
        return row, 2.0 ** -11

    def test_output_beats_rtn_on_calibration_inputs(self):
        w = self.weight()
        x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(1))
        for grid in GRIDS:
            got = [sqnr_db(x @ w.T, x @ Q.dequantize(Q.quantize(w, Q.Config(grid=grid, calibrate=c),
                                                                  self.stats_for(None, x))).T) for c in (True, False)]
            assert got[0] > got[1] + 5, (grid, got)


def _entries(path):
    return json.loads((path / "moeq.json").read_text())


def _correlated(n=2048, d=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)
    x = torch.randn(n, d, generator=g) @ mix * torch.linspace(0.2, 3, d)   # correlated, uneven scales
    return x, 2 * x.T @ x / n


def test_ternary_grid_is_nearest_level():
    w = torch.randn(7, 50, dtype=torch.float64) * torch.tensor([1, 0, 1e-9, 3, 1, 1, 1e6])[:, None].double()
    w[1] = 0
    w[4] = w[4].abs()          # no negative weight: lo = 0 is never a symbol
    g = TernaryGrid()
    p = g.params(w)
    assert torch.equal(p["lo"], p["lo"].half().double()) and torch.equal(p["hi"], p["hi"].half().double())
    assert float(p["hi"].max()) <= FP16_MAX
    deq, sym = g.quantize(w, {k: v[:, None] for k, v in p.items()})
    levels = torch.stack([p["lo"], torch.zeros_like(p["lo"]), p["hi"]], -1)[:, None, :]      # [rows, 1, 3]
    best = (w[..., None] - levels).abs().min(-1).values
    assert torch.equal((w - deq).abs(), best)                                                  # nearest level
    assert not bool((sym[4] == -1).any()) and not bool(sym[1].any())
    assert torch.equal(deq, td.ternary_weight(sym, p["lo"], p["hi"]).double())                 # what decoding gives


def test_gptq_beats_rtn_on_output_error():
    x, h = _correlated()
    w = torch.randn(3, 64, 96, generator=torch.Generator().manual_seed(1)) * 0.05
    cfg = Q.Config()
    gq = Q.quantize_experts(w, cfg, [Stats(2048, {"hessian": h})] * 3)
    rq = Q.quantize_experts(w, Q.Config(calibrate=False), [None] * 3)
    for e in range(3):
        err = [float(((Q.dequantize(q[e]) - w[e]) @ h * (Q.dequantize(q[e]) - w[e])).sum()) for q in (gq, rq)]
        assert err[0] < 0.7 * err[1], err
        assert gq[e].info["gptq_fallback"] == "none"


def test_dictionary_follows_the_symbol_statistics():
    """A skewed parameter (mostly zeros) gets a dictionary of longer phrases, and codes shorter with it than with
    the reference's fixed P(0) = 0.885 dictionary."""
    g = torch.Generator().manual_seed(0)
    heavy = torch.randn(2, 64, 512, generator=g) * torch.where(torch.rand(2, 64, 512, generator=g) < 0.05, 8.0, 0.3)
    qs = Q.quantize_experts(heavy, Q.Config(calibrate=False, dictionary_size=4096), [None, None])
    (table,) = Q.code_tables(qs, Q.Config(dictionary_size=4096), "layers.0.experts.down_proj")
    assert table.name == "layers.0.experts.down_proj.dict" and all(q.shared == (table.name,) for q in qs)
    d = td.Dictionary.from_table(table)
    sym = torch.cat([q.tensors["symbols"] for q in qs])
    probs = td.symbol_probs(sym)
    assert probs[1] > 0.9
    reference = td.build_dictionary((0.0575, 0.885, 0.0575), size=4096)    # QMoE's fixed assumption
    own, fixed = (td.encode_rows(sym, x)[0].numel() for x in (d, reference))
    assert own < 0.85 * fixed                                # a skewed layer codes shorter with its own statistics
    balanced = td.build_dictionary((1 / 3, 1 / 3, 1 / 3), size=4096)
    assert float(d.lengths.float().mean()) > 2 * float(balanced.lengths.float().mean())


def test_two_bit_grid_uses_affine_packed():
    cfg = Q.Config(grid="2bit", calibrate=False)
    assert Q.codec_for(cfg) == "affine-packed" and Q.codec_for(Q.Config()) == "ternary-dict"
    w = torch.randn(16, 40)
    q = Q.quantize(w, cfg, None)
    assert q.meta == {"bits": 2, "group_size": 0, "sym": False} and int(q.tensors["codes"].max()) <= 3
    assert Q.code_tables([q], cfg, "x") == []


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "switch_transformers"])
def test_every_expert_is_compressed_and_the_rest_kept(arch, tmp_path):
    torch.set_num_threads(1)
    m = build(arch)
    ids = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method="qmoe")
    res = api.quantize_model(m, tmp_path / "art", recipe, calib_ids=ids)
    man = _entries(tmp_path / "art")
    experts = {n: e for n, e in man["tensors"].items()}
    assert experts and all(e["role"] == "expert" and e["codec"] == "ternary-dict" for e in experts.values())
    ref = build(arch)
    n_expert_params = sum(p.numel() for n, p in ref.named_parameters()
                          if not n.endswith("bias") and (p.ndim == 3 or (".experts." in n and p.ndim == 2)))
    assert res["quantized_params"] == n_expert_params            # every expert, and nothing but experts
    assert expected_quantized(ref)[0] > n_expert_params           # attention etc. kept as stored
    # one dictionary per fused parameter (per expert Linear for per-expert modules), stored once, referenced
    assert set(man["shared"]) == {s for e in experts.values() for s in e["shared"]}
    assert all(len(e["shared"]) == 1 for e in experts.values())
    assert res["bits_per_param"] < 8.0      # rows of 32-64 weights: the 64 bits of row metadata dominate here
    loaded, _, _ = api.load(str(tmp_path / "art"))
    with torch.no_grad():
        args = {"decoder_input_ids": ids} if m.config.is_encoder_decoder else {}
        assert torch.isfinite(loaded(input_ids=ids, **args).logits).all()


@pytest.mark.parametrize("starved", ["rtn", "route_all"])
def test_starved_experts_fall_back_visibly(starved, tmp_path):
    """An expert given fewer routed tokens than min_tokens falls back as configured; the manifest says which
    and why, the routed token count stays the router's, and the artifact loads."""
    torch.set_num_threads(1)
    m = build("mixtral")
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    recipe = Recipe(method="qmoe", options={"min_tokens": 10, "starved": starved})
    res = api.quantize_model(m, tmp_path / "art", recipe, calib_ids=ids)
    entries = _entries(tmp_path / "art")["tensors"]
    starved_entries = {n: e for n, e in entries.items() if e["calib_tokens"] < 10}
    assert starved_entries, "the test needs an expert with < 10 routed tokens"
    for n, e in entries.items():
        if n in starved_entries:
            assert e["fallback"].startswith(f"{starved}:"), e["fallback"]
            assert f"{e['calib_tokens']} routed tokens < min_tokens 10" in e["fallback"]
            if starved == "route_all":
                assert "from all 32 calibration tokens" in e["fallback"]
                assert e["quant_info"]["gptq_fallback"] in ("none", "damp")     # calibrated, on all tokens
            else:
                assert "gptq_fallback" not in e["quant_info"]                   # round-to-nearest
        else:
            assert "fallback" not in e and e["quant_info"]["gptq_fallback"] in ("none", "damp")
    assert res["fallbacks"] == len(starved_entries) and set(res["fallback_entries"]) == set(starved_entries)
    loaded, _, _ = api.load(str(tmp_path / "art"))
    with torch.no_grad():
        assert torch.isfinite(loaded(input_ids=ids).logits).all()


def test_route_all_statistics_see_every_token():
    """Forced routing: the starved expert's Hessian is the Hessian of every token that reached the experts."""
    from moeq.models.adapter import find_targets
    from moeq.models.calib import Collector, observing
    from moeq.models.layers import decoder_layers
    from moeq.quant.stats import Hessian
    from moeq.quant.base import CalibSpec
    torch.manual_seed(0)
    m = build("mixtral")
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(0))
    t = next(t for t in find_targets(m) if t.role == "expert" and t.expert == 1 and t.param != "down_proj")
    seen = []
    experts_mod = m.get_submodule(t.module)
    hook = experts_mod.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    col = Collector({t: CalibSpec([Hessian()])})
    with torch.no_grad(), observing(m, col, forced=True):
        m(input_ids=ids)
    hook.remove()
    s = col.finalize()[t.name]
    x = seen[0].reshape(-1, seen[0].shape[-1]).float()
    assert s.tokens == x.shape[0] == 32
    torch.testing.assert_close(s.hessian, 2 * x.T @ x / 32, rtol=1e-4, atol=1e-5)
    assert decoder_layers(m) is not None
