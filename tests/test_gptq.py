"""The GPTQ core (moeq.quant.gptq) against an independent column-by-column reference, batching, error
reduction over RTN, act-order with static groups, and the Cholesky fallbacks."""

from dataclasses import dataclass
from itertools import pairwise
from typing import ClassVar

import pytest
import torch

from moeq.quant.base import Stats
from moeq.quant.gptq import gptq, rtn
from moeq.quant.uniform import GPTQQuantizer, UniformGrid, affine_dequantize


@dataclass(frozen=True)
class LutGrid:
    """A non-uniform test grid: the nearest of ``levels`` times the row's absmax (what a LUT method plugs in)."""

    levels: tuple = (-1.0, -0.6, -0.25, 0.0, 0.25, 0.6, 1.0)
    code_dtype: ClassVar[torch.dtype] = torch.uint8

    def params(self, w):
        return {"scale": w.abs().amax(-1).clamp(min=1e-8)}

    def quantize(self, w, params):
        lut = torch.tensor(self.levels, dtype=w.dtype, device=w.device)
        codes = (w / params["scale"])[..., None].sub(lut).abs().argmin(-1)
        return lut[codes] * params["scale"], codes.to(torch.uint8)


def correlated(n_tokens, n_in, seed, dtype=torch.float32):
    """Inputs with strongly correlated features and uneven scales, like a transformer layer's."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(n_in) + torch.randn(n_in, n_in, generator=g) / n_in ** 0.5
    x = torch.randn(n_tokens, n_in, generator=g) @ mix * (0.5 + torch.rand(n_in, generator=g) * 2)
    return x.to(dtype)


def hessian(x):
    return 2 * x.T @ x / x.shape[0]


def weights(shape, seed, dtype=torch.float32):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 0.02).to(dtype)


def reference_gptq(w, h, grid, group_size=0, percdamp=0.01, act_order=False, static=True, keep=0):
    """The paper's algorithm, one column at a time, no lazy blocks: every column's error immediately updates all
    later columns. Returns (codes, deq) in the original column order. ``keep``: that many columns of largest
    diag H are processed last and kept float16-rounded; group parameters are fitted with each kept weight
    replaced by the mean of the other weights of its row and group."""
    w, h = w.clone(), h.clone()
    n = w.shape[1]
    kept = sorted(torch.topk(h.diag(), keep).indices.tolist()) if keep else []
    dead = h.diag() == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    g = group_size or n

    def params(cols):
        return {k: v[0] for k, v in grid.params(cols[None]).items()}

    fit = w.clone()
    for a in range(0, n, g):
        live = [j for j in range(a, min(a + g, n)) if j not in kept]
        for j in range(a, min(a + g, n)):
            if j in kept:
                fit[:, j] = w[:, live].mean(1) if live else 0
    fixed = [params(fit[:, a:a + g]) for a in range(0, n, g)]
    perm = torch.argsort(h.diag(), descending=True, stable=True) if act_order else torch.arange(n)
    perm = torch.tensor([j for j in perm.tolist() if j not in kept] + kept)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * h.diag().mean() * torch.eye(n, dtype=h.dtype)
    u = torch.linalg.cholesky(torch.linalg.inv(h), upper=True)
    codes, deq = torch.zeros(w.shape, dtype=torch.uint8), torch.zeros_like(w)
    for j in range(n):
        if static:
            p = fixed[int(perm[j]) // g]
        elif j % g == 0:
            p = params(w[:, j:j + g])
        q, c = grid.quantize(w[:, j], p)
        if int(perm[j]) in kept:
            q = w[:, j].half().to(w.dtype)
        err = (w[:, j] - q) / u[j, j]
        w[:, j + 1:] -= err[:, None] * u[j, j + 1:][None, :]
        codes[:, perm[j]], deq[:, perm[j]] = c, q
    return codes, deq


def out_err(x, w, deq):
    return (x @ (w - deq).T).pow(2).mean().item()


# (a) the blocked, batched core computes exactly the paper's algorithm (float64: no ties broken differently)
@pytest.mark.parametrize("grid", [UniformGrid(3), UniformGrid(4, sym=True), LutGrid()], ids=["u3", "u4sym", "lut"])
@pytest.mark.parametrize("group_size,act_order,static", [(0, False, True), (32, False, True), (32, False, False),
                                                         (0, True, True), (32, True, True)])
def test_matches_column_by_column_reference(grid, group_size, act_order, static):
    x = correlated(256, 96, seed=1, dtype=torch.float64)
    w = weights((24, 96), seed=2, dtype=torch.float64)
    h = hessian(x)
    ref_codes, ref_deq = reference_gptq(w, h, grid, group_size, act_order=act_order, static=static)
    r = gptq(w, h, grid, group_size=group_size, block_size=64, act_order=act_order, static_groups=static)
    assert torch.equal(r.codes, ref_codes)
    torch.testing.assert_close(r.deq, ref_deq, rtol=0, atol=1e-12)
    assert r.fallback == ("none",)


@pytest.mark.parametrize("group_size,act_order", [(0, False), (32, False), (32, True)])
def test_kept_columns_match_the_reference_and_absorb_the_compensation(group_size, act_order):
    x = correlated(256, 96, seed=1, dtype=torch.float64)
    x[:, 7] *= 40                                   # one massive-activation channel (and 3 more strong ones)
    w = weights((24, 96), seed=2, dtype=torch.float64)
    h = hessian(x)
    ref_codes, ref_deq = reference_gptq(w, h, UniformGrid(3), group_size, act_order=act_order, keep=4)
    r = gptq(w, h, UniformGrid(3), group_size=group_size, block_size=64, act_order=act_order, keep=4)
    assert r.kept.tolist() == sorted(torch.topk(h.diag(), 4).indices.tolist()) and 7 in r.kept.tolist()
    torch.testing.assert_close(r.deq, ref_deq, rtol=0, atol=1e-12)
    kept_mask = torch.zeros(96, dtype=torch.bool)
    kept_mask[r.kept] = True
    assert torch.equal(r.codes[:, ~kept_mask], ref_codes[:, ~kept_mask])
    # the kept values are not the original weights: they carry the other columns' compensation
    assert not torch.allclose(r.deq[:, kept_mask], w[:, kept_mask].half().double())
    plain = gptq(w, h, UniformGrid(3), group_size=group_size, block_size=64, act_order=act_order)
    assert out_err(x, w, r.deq) < 0.5 * out_err(x, w, plain.deq)
    with pytest.raises(ValueError, match="static"):
        gptq(w, h, UniformGrid(3), group_size=32, static_groups=False, keep=2)


def test_float32_agrees_with_reference():
    x, w = correlated(256, 128, seed=3), weights((32, 128), seed=4)
    ref_codes, _ = reference_gptq(w.double(), hessian(x).double(), UniformGrid(4), 32, act_order=True)
    r = gptq(w, hessian(x), UniformGrid(4), group_size=32, act_order=True)
    assert r.codes.dtype == torch.uint8 and r.deq.dtype == torch.float32
    assert (r.codes == ref_codes).float().mean() > 0.99


# (b) batching over experts
def test_batched_equals_looped():
    e, grid = 4, UniformGrid(4)
    w = torch.stack([weights((16, 64), seed=10 + i) for i in range(e)])
    h = torch.stack([hessian(correlated(128, 64, seed=20 + i)) for i in range(e)])
    opts = {"group_size": 32, "block_size": 32, "act_order": True}
    r = gptq(w, h, grid, **opts)
    for i in range(e):
        one = gptq(w[i], h[i], grid, **opts)
        assert torch.equal(r.codes[i], one.codes)
        torch.testing.assert_close(r.deq[i], one.deq, rtol=0, atol=0)
        torch.testing.assert_close(r.params["scale"][i], one.params["scale"], rtol=0, atol=0)
        torch.testing.assert_close(r.loss[i], one.loss)
    assert r.codes.shape == (e, 16, 64) and r.params["zero"].shape == (e, 16, 2) and r.loss.shape == (e,)


def test_shared_hessian_equals_each_expert_alone():
    """Pooled statistics: one [in, in] H for every expert, computed as one stacked matrix."""
    w = torch.stack([weights((16, 64), seed=30 + i) for i in range(3)])
    h = hessian(correlated(128, 64, seed=33))
    r = gptq(w, h, UniformGrid(3), group_size=32)
    for i in range(3):
        one = gptq(w[i], h, UniformGrid(3), group_size=32)
        assert torch.equal(r.codes[i], one.codes)
        torch.testing.assert_close(r.loss[i], one.loss)
    assert r.fallback == ("none",) * 3 and r.codes.shape == (3, 16, 64)


def test_quantize_experts_equals_quantize_each():
    q = GPTQQuantizer()
    cfg = q.Config(bits=3, group_size=32)
    w = torch.stack([weights((16, 64), seed=40 + i) for i in range(4)])
    xs = [correlated(96, 64, seed=50 + i) for i in range(4)]
    stats = [Stats(96, {"hessian": hessian(xs[0])}), None, Stats(0, {"hessian": torch.zeros(64, 64)}),
             Stats(96, {"hessian": hessian(xs[3])})]
    batched = q.quantize_experts(w, cfg, stats)
    for e in range(4):
        one = q.quantize(w[e], cfg, stats[e])
        assert all(torch.equal(batched[e].tensors[k], one.tensors[k]) for k in one.tensors), e
        assert batched[e].meta == one.meta == {"bits": 3, "group_size": 32, "sym": False}


def test_uncalibrated_expert_is_round_to_nearest_not_zeroed():
    """No tokens: H = 0 would mark every input dead and zero the expert; it is rounded to nearest instead."""
    q = GPTQQuantizer()
    cfg = q.Config()
    w = weights((16, 128), seed=5)
    rtn_q = q.quantize(w, cfg, None)
    for stats in (None, Stats(0, {"hessian": torch.zeros(128, 128)})):
        got = q.quantize(w, cfg, stats)
        assert torch.equal(got.tensors["codes"], rtn_q.tensors["codes"])
    assert q.dequantize(rtn_q).abs().sum() > 0


# (c) the point of GPTQ: lower layer-output error than RTN on correlated inputs
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("group_size", [0, 64])
def test_beats_rtn_on_layer_output(bits, group_size):
    x, w = correlated(512, 256, seed=6), weights((64, 256), seed=7)
    grid = UniformGrid(bits)
    e_gptq = out_err(x, w, gptq(w, hessian(x), grid, group_size=group_size, act_order=True).deq)
    e_rtn = out_err(x, w, rtn(w, grid, group_size).deq)
    assert e_gptq < 0.75 * e_rtn, (e_gptq, e_rtn)


def test_identity_hessian_is_rtn():
    w = weights((32, 96), seed=8)
    for g in (0, 32):
        r, ref = gptq(w, torch.eye(96), UniformGrid(4), group_size=g, act_order=True), rtn(w, UniformGrid(4), g)
        assert torch.equal(r.codes, ref.codes) and torch.equal(r.deq, ref.deq)


# (d) act-order with static groups: codes in the original order, parameters per ORIGINAL column group
def test_act_order_static_groups_decode_without_permutation():
    x, w = correlated(256, 128, seed=9), weights((32, 128), seed=10)
    h = hessian(x)
    assert not torch.equal(torch.argsort(h.diag(), descending=True), torch.arange(128))   # a real permutation
    r = gptq(w, h, UniformGrid(4), group_size=32, act_order=True)
    assert torch.equal(r.params["scale"], rtn(w, UniformGrid(4), 32).params["scale"])     # from the original W
    deq = affine_dequantize(r.codes, r.params["scale"].half(), r.params["zero"].to(torch.uint8), 32)
    assert torch.equal(deq, r.deq)
    no_order = gptq(w, h, UniformGrid(4), group_size=32, act_order=False)
    assert out_err(x, w, r.deq) < out_err(x, w, no_order.deq) * 1.05


def test_act_order_with_dynamic_groups_is_refused():
    with pytest.raises(ValueError, match="static_groups"):
        gptq(weights((4, 64), 0), torch.eye(64), UniformGrid(4), group_size=32, act_order=True, static_groups=False)
    with pytest.raises(ValueError, match="static_groups"):
        GPTQQuantizer.Config(act_order=True, static_groups=False)
    GPTQQuantizer.Config(act_order=True, static_groups=False, group_size=0)   # one group per row: nothing to store


# (e) failures: dead inputs, Hessians that need more damping, Hessians that cannot be factored
def test_fallbacks_are_reported_per_expert():
    n = 64
    good = hessian(correlated(256, n, seed=11))
    low_rank = hessian(correlated(16, n, seed=12))          # rank 16: PSD, min eigenvalue 0
    needs_damp = low_rank - 0.05 * low_rank.diag().mean() * torch.eye(n)   # indefinite by 5% of mean diag
    indefinite = -good
    w = torch.stack([weights((8, n), seed=13 + i) for i in range(4)])
    h = torch.stack([good, needs_damp, indefinite, torch.full((n, n), float("nan"))])
    r = gptq(w, h, UniformGrid(4), group_size=32, act_order=True)
    assert r.fallback == ("none", "damp", "identity", "identity")
    assert r.percdamp[0] == 0.01 and r.percdamp[1] > 0.01 and r.percdamp[2:].isnan().all()
    assert torch.isfinite(r.deq).all() and torch.isfinite(r.loss[:2]).all()
    ref = rtn(w[2:], UniformGrid(4), 32)
    assert torch.equal(r.codes[2:], ref.codes)


def test_dead_inputs_are_zeroed():
    x = correlated(256, 64, seed=14)
    x[:, [3, 40]] = 0                          # these inputs never fire
    w = weights((16, 64), seed=15) + 0.05      # nonzero everywhere
    r = gptq(w, hessian(x), UniformGrid(4), group_size=32, act_order=True)
    assert torch.equal(r.deq[:, [3, 40]], torch.zeros(16, 2))
    assert (r.deq[:, [0, 1, 2, 4]] != 0).any()
    assert r.fallback == ("none",)
    all_dead = gptq(w, torch.zeros(64, 64), UniformGrid(4))
    assert torch.equal(all_dead.deq, torch.zeros_like(w)) and all_dead.fallback == ("none",)


# (f) more bits never worse
def test_more_bits_never_worse():
    x, w = correlated(256, 128, seed=16), weights((32, 128), seed=17)
    h = hessian(x)
    for method in ("gptq", "rtn"):
        errs = []
        for bits in range(2, 9):
            grid = UniformGrid(bits)
            deq = gptq(w, h, grid, group_size=32).deq if method == "gptq" else rtn(w, grid, 32).deq
            errs.append(out_err(x, w, deq))
        assert all(b < a for a, b in pairwise(errs)), (method, errs)


def test_uniform_grid_bit_layout():
    """bits=2, one row [-0.3, 0, 0.1, 0.6]: range [-0.3, 0.6], scale 0.9/3 = 0.3, zero round(0.3/0.3) = 1."""
    w = torch.tensor([[[-0.3, 0.0, 0.1, 0.6]]])
    grid = UniformGrid(2)
    p = grid.params(w)
    assert torch.equal(p["zero"], torch.tensor([[1.0]]))
    assert p["scale"].item() == torch.tensor(0.3).half().item()      # rounded to float16, as stored
    deq, codes = grid.quantize(w, {k: v[..., None] for k, v in p.items()})
    assert codes.tolist() == [[[0, 1, 1, 3]]]                        # 0.1 / 0.3 = 0.33 rounds to 0 (+ zero 1)
    assert torch.equal(deq, p["scale"][..., None] * (codes.float() - 1))
    sym = UniformGrid(2, sym=True).params(w)                         # zero fixed at 2: range [-0.6, 0.6]
    assert sym["zero"].item() == 2 and sym["scale"].item() == torch.tensor(1.2 / 3).half().item()


@pytest.mark.cuda
def test_cuda_matches_cpu():
    e = 3
    w = torch.stack([weights((64, 256), seed=60 + i) for i in range(e)])
    h = torch.stack([hessian(correlated(512, 256, seed=70 + i)) for i in range(e)])
    h[2] = -h[2]                                                       # forces the identity fallback
    opts = {"group_size": 64, "act_order": True}
    cpu, gpu = gptq(w, h, UniformGrid(4), **opts), gptq(w.cuda(), h.cuda(), UniformGrid(4), **opts)
    assert gpu.codes.device.type == "cuda" and gpu.fallback == cpu.fallback == ("none", "none", "identity")
    assert (gpu.codes.cpu() == cpu.codes).float().mean() > 0.99         # float rounding may flip a few codes
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-2, atol=0)
    from moeq.runtime.affine import AffineLinear
    q = GPTQQuantizer().quantize(w[0], GPTQQuantizer.Config(), Stats(512, {"hessian": h[0]}))
    m = AffineLinear(q, None)
    x = torch.randn(5, 256)
    torch.testing.assert_close(m.cuda()(x.cuda()).cpu(), m.cpu()(x), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(m.cuda()(x.cuda().bfloat16()).float().cpu(), m.cpu()(x), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("sym", [False, True])
@pytest.mark.parametrize("group_size", [0, 32])
def test_mse_clip_never_worse_than_absmax_and_decodes_exactly(sym, group_size):
    torch.manual_seed(7)
    w = torch.distributions.StudentT(3.0).sample((24, 96)) * 0.02   # heavy tails: clipping pays
    errs = {}
    for clip in ("absmax", "mse"):
        r = rtn(w, UniformGrid(3, sym, clip), group_size)
        # what the codec stores decodes to exactly what the quantizer reported
        assert torch.equal(affine_dequantize(r.codes, r.params["scale"].half(), r.params["zero"].to(torch.uint8),
                                             group_size), r.deq)
        errs[clip] = (r.deq - w).square().sum(-1)
    assert (errs["mse"] <= errs["absmax"] * (1 + 1e-6)).all()
    assert errs["mse"].sum() < 0.95 * errs["absmax"].sum()
