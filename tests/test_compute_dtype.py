"""Compute dtype: ``load(dtype=)`` stores kept tensors in it, so activations and the packed kernels run in it;
``auto`` follows the checkpoint; eval runs the baseline in the same dtype and scores in bounded memory."""

import math

import pytest
import torch
import torch.nn.functional as F

from moeq import api
from moeq.errors import MoeqError
from moeq.eval import perplexity as ppl_mod
from moeq.recipes import Recipe
from moeq.runtime.load import compute_dtype, recorded_dtype


@pytest.fixture(scope="module")
def artifacts(tiny_model_dir, tmp_path_factory):
    base = tmp_path_factory.mktemp("dtype")
    out = {}
    for mode in ("w8a8", "weight_only"):
        recipe = Recipe(model=str(tiny_model_dir), method="int8", options={"mode": mode},
                        calibration={"samples": 4, "seqlen": 64})
        api.quantize(recipe, base / mode)
        out[mode] = base / mode
    return out


def test_auto_follows_the_checkpoint_and_prefers_16_bit():
    assert compute_dtype("auto", torch.float16) == torch.float16
    assert compute_dtype("auto", torch.bfloat16) == torch.bfloat16
    assert compute_dtype("auto", torch.float32) == torch.bfloat16
    assert compute_dtype("auto", None) == torch.bfloat16
    assert compute_dtype("fp32") == torch.float32 and compute_dtype(None) is None
    assert recorded_dtype({"torch_dtype": "float16"}) == torch.float16
    assert recorded_dtype({"dtype": "int8"}) is None
    with pytest.raises(MoeqError, match="unknown dtype"):
        compute_dtype("fp8")


@pytest.mark.parametrize("mode", ["w8a8", "weight_only"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_loaded_model_computes_in_the_requested_dtype(artifacts, mode, dtype):
    model, _, _ = api.load(artifacts[mode], dtype=dtype)
    assert model.get_input_embeddings().weight.dtype == dtype
    assert model.config.dtype == dtype
    seen = {}
    layer = model.model.layers[0]

    def hook(module, args, out):
        seen["out"] = (out[0] if isinstance(out, tuple) else out).dtype

    layer.register_forward_hook(hook)
    logits = model(input_ids=torch.arange(1, 17)[None]).logits
    assert seen["out"] == dtype and logits.dtype == dtype
    assert torch.isfinite(logits.float()).all()


def test_bf16_and_fp32_agree(artifacts):
    ids = torch.arange(1, 33)[None]
    lo32 = api.load(artifacts["weight_only"], dtype=torch.float32)[0](input_ids=ids).logits.float()
    lo16 = api.load(artifacts["weight_only"], dtype="bf16")[0](input_ids=ids).logits.float()
    p32, p16 = F.softmax(lo32, -1), F.log_softmax(lo16, -1)
    kl = (p32 * (p32.log() - p16)).sum(-1).mean().item()
    assert kl < 5e-3, kl


def _naive(model, windows, baseline):
    """The unchunked definition: one forward over every window, full float32 log-softmax."""
    with torch.no_grad():
        lp = F.log_softmax(model(input_ids=windows).logits[:, :-1].float(), -1)
        lq = F.log_softmax(baseline(input_ids=windows).logits[:, :-1].float(), -1)
    t = windows[:, 1:, None]
    n = t.numel()
    return (math.exp(-lp.gather(-1, t).sum().item() / n), (lq.exp() * (lq - lp)).sum().item() / n,
            math.exp(-lq.gather(-1, t).sum().item() / n))


def test_chunked_scoring_equals_the_definition(artifacts, tiny_model_dir, monkeypatch):
    model = api.load(artifacts["w8a8"], dtype=torch.float32)[0]
    base = api.load_any(str(tiny_model_dir), dtype=torch.float32)[0]
    windows = torch.randint(1, 300, (5, 48), generator=torch.Generator().manual_seed(0))
    want = _naive(model, windows, base)
    calls = []
    monkeypatch.setattr(ppl_mod, "LOGITS_BUDGET", 2 * 48 * 384 * 4)   # two windows per forward
    monkeypatch.setattr(ppl_mod, "SCORE_ROWS_BYTES", 10 * 384 * 4)    # ten positions per scoring chunk
    r = ppl_mod.perplexity(model, windows, batch_size=8, baseline=base, progress=calls.append)
    assert calls == [1, 2, 2]  # one window first (it tells the vocabulary), then as many as the budget allows
    assert r.ppl == pytest.approx(want[0], rel=1e-5)
    assert r.kl_mean == pytest.approx(want[1], rel=1e-4, abs=1e-7)
    assert r.extra["baseline_ppl"] == pytest.approx(want[2], rel=1e-5)


def test_eval_runs_the_baseline_in_the_same_dtype(artifacts, tiny_model_dir):
    from moeq.recipes import EvalSpec
    res = api.evaluate(str(artifacts["w8a8"]), str(tiny_model_dir), spec=EvalSpec(seqlen=64, windows=2), speed=False,
                       dtype="auto")
    assert res["dtype"] == "bfloat16"  # the tiny model records float32
    assert 0.9 < res["ppl_ratio"] < 1.1
    res32 = api.evaluate(str(artifacts["w8a8"]), str(tiny_model_dir), spec=EvalSpec(seqlen=64, windows=2), speed=False,
                         dtype="fp32")
    assert res32["dtype"] == "float32" and res32["baseline_ppl"] != res["baseline_ppl"]
