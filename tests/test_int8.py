"""LLM.int8: codec conformance, quantizer conformance, and the runtime's mixed-precision decomposition."""

import pytest
import torch

from moeq.quant.base import QTensor, Stats
from moeq.registry import CODECS, QUANTIZERS, load_builtins
from moeq.runtime.int8 import Int8Linear, quantize_tokens
from tests.conformance import CodecConformance, QuantizerConformance, sqnr_db

load_builtins()
Q = QUANTIZERS.get("int8")()


def _stats(x, threshold):
    return Stats(x.shape[0], {"amax": x.abs().amax(0), "hits": (x.abs() >= threshold).sum(0)})


class TestInt8RowsCodec(CodecConformance):
    codec = CODECS.get("int8-rows")()

    def make(self, shape, seed):
        g = torch.Generator().manual_seed(seed)
        out_f, in_f = shape
        codes = torch.randint(-127, 128, shape, generator=g, dtype=torch.int8)
        codes.view(-1)[: min(255, codes.numel())] = torch.arange(-127, 128, dtype=torch.int8)[: min(255, codes.numel())]
        t = {"qweight": codes, "scale": torch.rand(out_f, generator=g)}
        if in_f > 2:
            t["smooth"] = torch.rand(in_f, generator=g) + 0.5
            k = in_f // 3
            t["outlier_idx"] = torch.arange(0, in_f, 3, dtype=torch.int32)[:k]
            t["outlier_w"] = torch.randn(out_f, k, generator=g).half()
        return QTensor(shape, t, {"mode": "w8a8", "threshold": 6.0, "act_group": 0})


class TestInt8Quantizer(QuantizerConformance):
    quantizer = Q
    configs = [("w8a8", Q.Config(), 40.0), ("t0", Q.Config(threshold=0), 40.0),
               ("weight_only", Q.Config(mode="weight_only"), 40.0), ("group64", Q.Config(act_group=32), 40.0)]

    def stats_for(self, cfg, x):
        return _stats(x, cfg.threshold) if Q.needs_calibration(cfg) else None


def _outlier_input(m, k, cols=(3, 50), scale=30.0, seed=0):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, list(cols)] *= scale
    return x


def test_systematic_outliers_keep_exact_16bit_columns():
    w = torch.randn(32, 64, generator=torch.Generator().manual_seed(0)) * 0.02
    x = _outlier_input(128, 64)
    q = Q.quantize(w, Q.Config(), _stats(x, 6.0))
    idx = q.tensors["outlier_idx"].tolist()
    assert idx == [3, 50]
    assert torch.equal(q.tensors["outlier_w"], w[:, idx].half())    # the exact columns, not int8 round trips
    assert torch.equal(q.tensors["qweight"][:, idx], torch.zeros(32, 2, dtype=torch.int8))
    deq = Q.dequantize(q)
    assert torch.equal(deq[:, idx], w[:, idx].half().float())


def test_decomposition_beats_plain_int8_on_outlier_activations():
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    xc, x = _outlier_input(256, 256, seed=2), _outlier_input(16, 256, seed=3)
    ref = x @ w.t()
    err = {}
    for label, cfg in {"plain": Q.Config(threshold=0, smooth_alpha=None), "decomp": Q.Config(smooth_alpha=None),
                       "smooth+decomp": Q.Config()}.items():
        m = Int8Linear(Q.quantize(w, cfg, _stats(xc, cfg.threshold)), None)
        err[label] = sqnr_db(ref, m(x))
    assert err["decomp"] > err["plain"] + 6, err
    assert err["smooth+decomp"] > err["plain"] + 6, err


def test_dynamic_outliers_are_decomposed_at_run_time():
    """A feature that never exceeded the threshold in calibration but does now is taken out of the int8 GEMM."""
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(4)) * 0.02
    calm = torch.randn(64, 128, generator=torch.Generator().manual_seed(5))
    x = torch.randn(4, 128, generator=torch.Generator().manual_seed(6))
    x[:, 77] = 60.0
    cfg = Q.Config(smooth_alpha=None)
    with_d = Int8Linear(Q.quantize(w, cfg, _stats(calm, 6.0)), None)
    no_d = Int8Linear(Q.quantize(w, Q.Config(threshold=0, smooth_alpha=None), None), None)
    ref = x @ w.t()
    assert sqnr_db(ref, with_d(x)) > sqnr_db(ref, no_d(x)) + 10


def test_token_quantization_bit_layout():
    x = torch.tensor([[1.0, -2.0, 0.5, 0.0]])
    codes, s = quantize_tokens(x)
    # absmax 2.0 -> scale 2/127: 1.0 -> 63.5 -> 64 (round half to even gives 64), -2.0 -> -127
    assert codes.tolist() == [[64, -127, 32, 0]]
    torch.testing.assert_close(s, torch.tensor([[2.0 / 127]]))


def test_weight_only_bf16_kernel_matches_fallback():
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(7)) * 0.02
    m = Int8Linear(Q.quantize(w, Q.Config(mode="weight_only"), None), None)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(8))
    fast = m(x.bfloat16()).float()
    slow = m(x)
    torch.testing.assert_close(fast, slow, rtol=2e-2, atol=2e-2)
    assert isinstance(m, Int8Linear) and m.weight.dtype == torch.int8


def test_weight_only_kernel_gets_an_aligned_weight():
    """Codes decoded from a shard are views at any byte offset; torch's int8 kernel crashes on a misaligned one."""
    w = torch.randn(48, 64, generator=torch.Generator().manual_seed(9)) * 0.02
    q = Q.quantize(w, Q.Config(mode="weight_only"), None)
    buf = torch.zeros(48 * 64 + 64, dtype=torch.int8)
    start = next(o for o in range(1, 64) if (buf.data_ptr() + o) % 64)
    view = buf[start:start + 48 * 64].view(48, 64)
    view.copy_(q.tensors["qweight"])
    q.tensors["qweight"] = view
    m = Int8Linear(q, None)
    assert m.qweight.data_ptr() % 64 == 0
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(10))
    torch.testing.assert_close(m(x.bfloat16()).float(), x @ Q.dequantize(q).t(), rtol=3e-2, atol=3e-2)


def test_routes_agree_across_batch_sizes_and_dtypes():
    """weight-only: the packed kernel (small batches, any dtype) and the dense route (prefill) compute the same
    product; w8a8 calibrated: no per-call outlier search, the static columns exact."""
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(11)) * 0.02
    ref_wo = Int8Linear(Q.quantize(w, Q.Config(mode="weight_only"), None), None)
    deq = Q.dequantize(Q.quantize(w, Q.Config(mode="weight_only"), None))
    for m in (1, Int8Linear.small_batch, Int8Linear.small_batch + 1, 40):
        x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m))
        for dt, tol in ((torch.float32, 2e-2), (torch.bfloat16, 3e-2), (torch.float16, 3e-2)):
            y = ref_wo(x.to(dt))
            assert y.dtype == dt and y.shape == (m, 96)
            torch.testing.assert_close(y.float(), x @ deq.t(), rtol=tol, atol=tol)
    xc = _outlier_input(256, 128, seed=12)
    calibrated = Int8Linear(Q.quantize(w, Q.Config(), _stats(xc, 6.0)), None)
    assert not calibrated.dynamic and calibrated.outlier_idx is not None
    x = _outlier_input(5, 128, seed=13)
    y = calibrated(x)
    assert sqnr_db(x @ w.t(), y) > 30
    torch.testing.assert_close(calibrated(x.bfloat16()).float(), y, rtol=3e-2, atol=3e-2)


def test_w8a8_matvec_route_equals_the_int8_gemm(monkeypatch):
    """At one token the int8 product runs on torch's int8-weight matvec; it must equal the int32 GEMM up to one
    bf16 rounding of each sum. (The torch route: on CPU moeq's fused kernel would take both calls.)"""
    monkeypatch.setenv("MOEQ_KERNEL", "torch")
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(14)) * 0.02
    m = Int8Linear(Q.quantize(w, Q.Config(), _stats(_outlier_input(256, 128, seed=15), 6.0)), None)
    x = _outlier_input(1, 128, seed=16)
    fast = m(x)
    monkeypatch.setattr(Int8Linear, "matvec_rows", 0)
    exact = m(x)
    torch.testing.assert_close(fast, exact, rtol=1e-2, atol=1e-2 * exact.abs().max().item())


def _absmax_rows_whole(w):
    """The whole-matrix formula absmax_rows computes block by block."""
    w = w.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


@pytest.mark.parametrize("route", ["torch", "auto"])  # auto: moeq's C++ kernel where it builds
def test_absmax_rows_blocks_equal_the_whole_matrix_formula(route, monkeypatch):
    from moeq.quant.int8 import BLOCK, absmax_rows
    monkeypatch.setenv("MOEQ_KERNEL", route)
    threads = torch.get_num_threads()
    g = torch.Generator().manual_seed(0)
    big = torch.randn(3 * BLOCK // 1000 + 7, 1000, generator=g) * 0.02  # several blocks and a ragged last one
    big[5] = 0.0                                                          # an all-zero row: scale 1e-12 / 127
    cases = [big, big.bfloat16(), big.half(), big.t()[:300],              # bf16 / fp16 upcast per block; strided
             torch.randn(2, BLOCK + 3, generator=g),                      # rows wider than a block
             torch.randn(1, 1, generator=g), big[:, :999],                # one element more than / less than a
             big[:, 1:17], big[:40, :16]]                                 # vector; row stride != K
    for w in cases:
        codes, scale = absmax_rows(w)
        ref_codes, ref_scale = _absmax_rows_whole(w)
        assert codes.dtype == torch.int8 and scale.dtype == torch.float32 and codes.is_contiguous()
        assert torch.equal(codes, ref_codes) and torch.equal(scale, ref_scale), (w.shape, w.dtype)
    assert torch.get_num_threads() == threads  # the blocks ran on one thread; the setting is restored


def test_quantize_keeps_the_weight_and_its_dtype_untouched():
    w = (torch.randn(64, 48, generator=torch.Generator().manual_seed(1)) * 0.02).bfloat16()
    before = w.clone()
    x = _outlier_input(256, 48, cols=(3, 40))
    for cfg in (Q.Config(mode="weight_only"), Q.Config()):
        q = Q.quantize(w, cfg, _stats(x, cfg.threshold))
        assert torch.equal(w, before) and w.dtype == torch.bfloat16
        ref = Q.quantize(w.float(), cfg, _stats(x, cfg.threshold))  # the same codes as from the float32 weight
        assert all(torch.equal(q.tensors[k], ref.tensors[k]) for k in ref.tensors)
