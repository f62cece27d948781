"""The fused CPU w8a8 kernel of Int8Linear (moeq.kernels.cpu.int8_matvec): the same integer codes as the torch route,
exact int32 sums, against an exact reference (int64 sums, float64 scaling); the routing and MOEQ_KERNEL.

The torch route's int8-weight matvec (``torch._weight_int8pack_mm``, torch 2.13 CPU) returns garbage (often NaN), and
at K = 7 even crashed (SIGSEGV), when in_features is not a multiple of 16
(``test_torch_int8pack_mm_needs_k_multiple_of_16``), so comparisons with that route use such widths only; the fused
kernel takes any width.
"""

import pytest
import torch

from moeq.kernels import cpu
from moeq.quant.base import QTensor, Stats
from moeq.registry import QUANTIZERS, load_builtins
from moeq.runtime.int8 import Int8Linear

load_builtins()
Q = QUANTIZERS.get("int8")()
EPS32 = 2.0 ** -24


@pytest.fixture(autouse=True)
def kernel(monkeypatch):
    """Every test here needs the C++ library (skipped where it cannot be built) and the auto route."""
    if cpu._compiler() is None or cpu.library() is None:
        pytest.skip("the C++ kernel library cannot be built on this machine")
    monkeypatch.delenv("MOEQ_KERNEL", raising=False)


def _stats(x, threshold=6.0):
    return Stats(x.shape[0], {"amax": x.abs().amax(0), "hits": (x.abs() >= threshold).sum(0)})


def _input(m, k, cols=(3, 50), gain=30.0, seed=0):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, [c for c in cols if c < k]] *= gain
    return x


def layer(out_f, in_f, *, calibrated=True, outliers=True, bias=False, seed=0):
    """A w8a8 Int8Linear: calibrated with SmoothQuant (and outlier columns 3, 50 where ``outliers``), or plain
    per-token (threshold 0, no smoothing: not dynamic either)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g) * 0.02
    b = torch.randn(out_f, generator=g) if bias else None
    if calibrated:
        xc = _input(256, in_f, cols=(3, 50) if outliers else (), seed=seed + 1)
        mod = Int8Linear(Q.quantize(w, Q.Config(), _stats(xc)), b)
        assert mod.inv_smooth is not None and (mod.outlier_idx is not None) == (outliers and in_f > 3)
    else:
        mod = Int8Linear(Q.quantize(w, Q.Config(threshold=0.0, smooth_alpha=None), None), b)
    assert not mod.dynamic
    return mod


def exact(mod: Int8Linear, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The w8a8 formula with the torch route's integer codes (float32 ops, torch.round), int64 sums and float64
    scaling. Returns (y, magnitude): the sum of the absolute values of the terms of each output (error bounds)."""
    c = mod._const("act_scale", torch.float32, x.device)
    xs = x * c
    amax = xs.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)
    codes = (xs * (127.0 / amax)).round_()
    assert codes.abs().max() <= 127
    acc = codes.long() @ mod.qweight.long().t()
    f = amax.double() * (mod.scale.double() / 127.0)
    y, mag = acc.double() * f, acc.abs().double() * f
    if mod.outlier_idx is not None:
        xo, wo = x.index_select(1, mod.outlier_idx).double(), mod.outlier_w.double().t()
        y, mag = y + xo @ wo, mag + xo.abs() @ wo.abs()
    if mod.bias is not None:
        y, mag = y + mod.bias.double(), mag + mod.bias.double().abs()
    return y, mag


def torch_route(mod, x, monkeypatch):
    with monkeypatch.context() as mp:
        mp.setenv("MOEQ_KERNEL", "torch")
        return mod(x)


def count_fused(monkeypatch) -> list:
    calls = []
    real = Int8Linear._w8a8_fused
    monkeypatch.setattr(Int8Linear, "_w8a8_fused", lambda self, lib, x: calls.append(x.shape) or real(self, lib, x))
    return calls


# ---------------------------------------------------------------- against the exact reference
@pytest.mark.parametrize("shape", [(40, 130), (16, 64), (33, 257), (70, 7), (24, 144), (50, 576)])
@pytest.mark.parametrize("m", [1, 2, 4])
@pytest.mark.parametrize("kind", ["smooth+outliers", "smooth", "plain", "bias"])
def test_fused_matches_exact_reference_fp32(shape, m, kind, monkeypatch):
    out_f, in_f = shape
    mod = layer(out_f, in_f, calibrated=kind != "plain", outliers=kind in ("smooth+outliers", "bias"),
                bias=kind == "bias", seed=out_f + in_f)
    x = _input(m, in_f, seed=7 * m + in_f)
    calls = count_fused(monkeypatch)
    y = mod(x)
    assert calls == [(m, in_f)] and y.dtype == torch.float32 and y.shape == (m, out_f)
    ref, mag = exact(mod, x)
    # a handful of float32 roundings (int32 -> float32, the scale product, one per added term) of the terms
    assert ((y.double() - ref).abs() <= 8 * EPS32 * mag + 1e-30).all()
    if m > Int8Linear.matvec_rows:                            # torch's int8 GEMM: exact sums as well
        old = torch_route(mod, x, monkeypatch)
        assert ((old.double() - ref).abs() <= 8 * EPS32 * mag + 1e-30).all()
    elif in_f % 16 == 0:      # torch's int8-weight matvec (sums rounded to bf16; other widths: wrong or SIGSEGV)
        old = torch_route(mod, x, monkeypatch)
        assert (y.double() - ref).abs().max() <= (old.double() - ref).abs().max()   # at least as close


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 2])
def test_fused_matches_exact_reference_16bit(dtype, m, monkeypatch):
    """16-bit x: the codes come from x upcast exactly; the output is the float32 result rounded once to x's dtype."""
    mod = layer(48, 144, bias=True, seed=3)
    x = _input(m, 144, seed=4).to(dtype)
    y = mod(x)
    assert y.dtype == dtype
    ref, mag = exact(mod, x)
    half_ulp = 2.0 ** (-8 if dtype == torch.bfloat16 else -11)
    assert ((y.double() - ref).abs() <= half_ulp * ref.abs() + 8 * EPS32 * mag + 1e-30).all()
    old = torch_route(mod, x, monkeypatch)
    assert (y.double() - ref).norm() <= (old.double() - ref).norm() * 1.01


def test_same_integer_codes_as_torch_exactly():
    """Scales chosen so that every float32 step is exact: y / (amax * scale_q) is then the int32 sum itself, which
    must equal the int64 sum over torch's codes, ties (x.5 -> even) included."""
    out_f, in_f = 37, 130
    g = torch.Generator().manual_seed(5)
    qw = torch.randint(-3, 4, (out_f, in_f), dtype=torch.int8, generator=g)
    scale = torch.full((out_f,), 127.0 * 2.0 ** -10)                      # scale_q = 2^-10 exactly
    mod = Int8Linear(QTensor((out_f, in_f), {"qweight": qw, "scale": scale},
                             {"mode": "w8a8", "threshold": 0.0, "act_group": 0}), None)
    x = torch.randint(-253, 254, (2, in_f), generator=g).float() / 2       # halves: ties of round()
    x[:, 0] = 127.0                                                        # amax 127: 127 / amax = 1, codes = x
    x[1, 1:5] = torch.tensor([0.5, 1.5, 2.5, -2.5])
    y = mod(x)
    acc = torch.round(x).long() @ qw.long().t()
    assert torch.equal(torch.round(x)[1, 1:5], torch.tensor([0.0, 2.0, 2.0, -2.0]))
    assert torch.equal((y.double() / (127.0 * 2.0 ** -10)), acc.double())


def test_all_zero_and_nonfinite_rows(monkeypatch):
    mod = layer(40, 128, bias=True, seed=8)
    x = _input(2, 128, seed=9)
    x[0] = 0.0
    y = mod(x)
    assert torch.equal(y[0], mod.bias)                                     # codes 0, no outliers: the bias
    ref, _ = exact(mod, x)
    torch.testing.assert_close(y[1].double(), ref[1], rtol=1e-6, atol=1e-6)
    for bad in (float("nan"), float("inf")):                               # torch's route: the whole row NaN
        xb = x.clone()
        xb[1, 7] = bad
        for out in (mod(xb), torch_route(mod, xb, monkeypatch)):
            assert out[1].isnan().all() and torch.equal(out[0], y[0])


def test_large_layer_runs_threaded():
    """Above INT8_PARALLEL_MIN the output rows are split over threads; the result must not change."""
    mod = layer(1030, 576, bias=True, seed=10)
    assert mod.qweight.numel() >= cpu.INT8_PARALLEL_MIN
    x = _input(1, 576, seed=11)
    ref, mag = exact(mod, x)
    threads = torch.get_num_threads()
    try:
        ys = []
        for n in (1, 2):
            torch.set_num_threads(n)
            ys.append(mod(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(ys[0], ys[1])
    assert ((ys[0].double() - ref).abs() <= 8 * EPS32 * mag).all()


def test_kernel_entry_point_and_operand_checks():
    g = torch.Generator().manual_seed(12)
    qw = torch.randint(-127, 128, (20, 65), dtype=torch.int8, generator=g)
    c, sq = torch.rand(65, generator=g) + 0.5, torch.rand(20, generator=g) / 127
    lay = cpu.int8_layer(c, qw, qw.sum(1, dtype=torch.int32) * 128, sq)
    x = torch.randn(3, 65, generator=g)
    y = cpu.int8_matvec(lay, x)
    xs = x * c
    amax = xs.abs().amax(-1, keepdim=True).clamp(min=1e-8)
    acc = (xs * (127.0 / amax)).round().long() @ qw.long().t()
    assert torch.equal(y, acc.float() * (amax * sq))                      # the float32 formula, bit for bit
    assert cpu.int8_matvec(lay, x, torch.bfloat16).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="contiguous"):
        cpu.int8_layer(c.double(), qw, qw.sum(1, dtype=torch.int32), sq)
    with pytest.raises(ValueError, match="x must be"):
        cpu.int8_matvec(lay, x[:, :64])
    with pytest.raises(ValueError, match="out of range"):
        cpu.int8_layer(c, qw, qw.sum(1, dtype=torch.int32), sq, torch.tensor([3, 65]), torch.zeros(2, 20))


def test_torch_int8pack_mm_needs_k_multiple_of_16():
    """Why the comparisons above avoid other widths (a torch 2.13 CPU bug: the kernel reads past each row): at
    K = 130 torch's int8-weight matvec is wrong, and the fused route that replaces it at decode is right."""
    g = torch.Generator().manual_seed(30)
    wrong = 0
    for _ in range(5):
        q = torch.randint(-127, 128, (40, 130), dtype=torch.int8, generator=g)
        x = torch.randint(-127, 128, (1, 130), generator=g).float()
        y = torch._weight_int8pack_mm(x.bfloat16(), q.clone(), torch.ones(40, dtype=torch.bfloat16)).double()
        ref = x.double() @ q.double().t()
        wrong += not bool(((y - ref).abs() <= 0.01 * ref.abs().max()).all())
    if not wrong:
        pytest.skip("this torch's int8pack_mm handles K = 130 (the bug is fixed)")
    mod = layer(40, 130, seed=31)
    x = _input(1, 130, seed=32)
    ref, mag = exact(mod, x)
    assert ((mod(x).double() - ref).abs() <= 8 * EPS32 * mag).all()


# ---------------------------------------------------------------- routing
def test_routes_taken(monkeypatch):
    calls = count_fused(monkeypatch)
    mod = layer(24, 130, seed=13)
    x = _input(Int8Linear.fused_rows + 1, 130, seed=14)
    mod(x[:1]), mod(x[:Int8Linear.fused_rows])
    assert calls == [(1, 130), (Int8Linear.fused_rows, 130)]
    mod(x)                                                                 # M > fused_rows: the int8 GEMM
    torch_route(mod, x[:1], monkeypatch)                                   # MOEQ_KERNEL=torch: the old route
    assert len(calls) == 2
    dyn = Int8Linear(Q.quantize(torch.randn(24, 130) * 0.02, Q.Config(), None), None)
    grouped = Int8Linear(Q.quantize(torch.randn(24, 128) * 0.02, Q.Config(act_group=32), _stats(_input(64, 128))),
                         None)
    assert dyn.dynamic and grouped.act_group == 32
    dyn(x[:1]), grouped(_input(1, 128))
    assert len(calls) == 2                                                 # neither is fused
    xg = x[:1].clone().requires_grad_(True)
    mod(xg)                                                                # autograd: the torch route
    assert len(calls) == 2


def test_torch_env_gives_the_old_route(monkeypatch):
    """MOEQ_KERNEL=torch is the route from before the kernel, value for value."""
    mod = layer(40, 128, bias=True, seed=15)
    x = _input(1, 128, seed=16)
    old = torch_route(mod, x, monkeypatch)
    assert torch.isfinite(old).all()
    xs = x * mod._const("act_scale", torch.float32, x.device)
    amax = xs.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-8)
    codes = (xs * (127.0 / amax)).round_()
    acc = torch._weight_int8pack_mm(codes.to(torch.bfloat16), mod.qweight, torch.ones(40, dtype=torch.bfloat16))
    want = torch.addmm(acc * (amax * (mod.scale / 127.0)), x.index_select(1, mod.outlier_idx),
                       mod.outlier_w.t().float().contiguous()) + mod.bias
    torch.testing.assert_close(old, want, rtol=0, atol=0)


def test_unavailable_library_falls_back_or_insists(monkeypatch):
    mod = layer(16, 64, seed=17)
    x = _input(1, 64, seed=18)
    ref = torch_route(mod, x, monkeypatch)
    monkeypatch.setitem(cpu._state, "lib", None)                           # as if the build had failed
    assert torch.equal(mod(x), ref)
    monkeypatch.setenv("MOEQ_KERNEL", "cpp")
    with pytest.raises(RuntimeError, match="MOEQ_KERNEL=cpp"):
        mod(x)


def test_constants_follow_the_module(monkeypatch):
    """The kernel's per-layer constants are rebuilt when the buffers move or are replaced."""
    mod = layer(24, 130, seed=19)
    x = _input(1, 130, seed=20)
    y = mod(x)
    other = layer(24, 130, seed=21)
    mod.load_state_dict(other.state_dict())
    assert torch.equal(mod(x), other(x)) and not torch.equal(mod(x), y)
    mod.qweight = other.qweight.clone()                                    # a new tensor: the cache notices
    assert torch.equal(mod(x), other(x))
    third = layer(24, 130, seed=22)
    with torch.no_grad():
        mod.qweight.copy_(third.qweight)                                   # modified in place: so does it
    torch.testing.assert_close(mod(x), exact(mod, x)[0].float(), rtol=1e-6, atol=1e-6)
    mod.float()                                                            # _apply: everything is rebuilt
    torch.testing.assert_close(mod(x), exact(mod, x)[0].float(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("flag", ["-mno-avx512f", "-mno-avx512vnni"])
def test_portable_build(flag, tmp_path, monkeypatch):
    """The same source without AVX-512 (plain loops), or AVX-512 without VNNI (vector quantization, plain int32 dot
    products), computes the same values."""
    lib = cpu.load(cpu.build(tmp_path, [*cpu.FLAGS, flag]))
    assert lib.moeq_int8_vnni() == 0
    mod = layer(40, 130, bias=True, seed=22)
    x = _input(2, 130, seed=23)
    fast = mod(x)
    monkeypatch.setitem(cpu._state, "lib", lib)
    slow = mod(x)
    ref, mag = exact(mod, x)
    assert ((slow.double() - ref).abs() <= 8 * EPS32 * mag).all()
    torch.testing.assert_close(slow, fast, rtol=1e-6, atol=1e-6)
    xb = x.bfloat16()
    torch.testing.assert_close(mod(xb).float(), exact(mod, xb)[0].float(), rtol=2 ** -8, atol=1e-6)


def test_weight_only_route_is_right_for_any_k():
    """The weight-only route avoids torch's int8-weight kernel where K % 16 != 0 (the bug above)."""
    from moeq.quant.base import QTensor
    from moeq.runtime.int8 import Int8Linear
    torch.manual_seed(0)
    for k in (7, 24, 130):
        codes = torch.randint(-127, 128, (32, k), dtype=torch.int8)
        scale = torch.rand(32) * 0.01 + 0.001
        q = QTensor((32, k), {"qweight": codes, "scale": scale}, {"mode": "weight_only"})
        mod = Int8Linear(q, None)
        x = torch.randn(1, k).bfloat16()
        ref = x.float() @ (codes.float() * scale[:, None]).T
        torch.testing.assert_close(mod(x).float(), ref, rtol=2e-2, atol=2e-2)
