"""Matryoshka nested precisions: the grid (children are top bits, the floor parent is the multi-width optimum,
decoding is bit-exact at every width), GPTQ on the multi-width objective, the ``bitplanes`` codec (prefix decode,
per-part checksums, r/8 of the code bytes read), the runtime at every width, loading and extracting at r bits."""

from __future__ import annotations

import json
import struct

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from moeq import api
from moeq.errors import ArtifactError, MoeqError
from moeq.formats import bitplanes
from moeq.formats.codecs.bitplanes import BitplanesCodec
from moeq.formats.container import ArtifactReader
from moeq.kernels import cpu
from moeq.pipeline.extract import extract
from moeq.quant.base import QTensor, Stats
from moeq.quant.gptq import group_params
from moeq.quant.matryoshka import (
    MatryoshkaConfig,
    MatryoshkaQuantizer,
    NestedGrid,
    child,
    decode,
    floor_parent,
    width_errors,
    width_lut,
)
from moeq.recipes import Recipe
from moeq.registry import load_builtins
from moeq.runtime.build import packed_modules
from moeq.runtime.matryoshka import MatryoshkaLinear, u8_offset
from tests.conformance import GOLDEN, CodecConformance, QuantizerConformance, _equal
from tests.tiny_models import V, build

load_builtins()
Q = MatryoshkaQuantizer()
CODEC = BitplanesCodec()
WIDTHS = (8, 6, 4, 3, 2)


def _gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------- the grid

def test_lut_is_the_bucket_centres():
    assert width_lut(2, True).tolist() == [-96.0, -32.0, 32.0, 96.0]      # 64 parent steps a bucket, centred
    assert width_lut(2, False).tolist() == [32.0, 96.0, 160.0, 224.0]
    assert width_lut(8, True)[[0, 127, 128, 255]].tolist() == [-127.5, -0.5, 0.5, 127.5]


def test_children_are_the_top_bits_and_the_plane_prefixes():
    q = torch.randint(0, 256, (7, 45), dtype=torch.uint8, generator=_gen(0))
    planes = bitplanes.split_planes(q, 8)
    for r in WIDTHS:
        c = child(q, r)
        assert int(c.max()) < 1 << r
        assert torch.equal(c, q // (1 << (8 - r)))
        assert torch.equal(bitplanes.join_planes(planes[:r], 45), c)


def test_plane_bit_order_example():
    """The docstring's example: codes 5 0 7 1 2 3 6 4 (3 bits), inputs 7..0 read right to left."""
    codes = torch.tensor([[5, 0, 7, 1, 2, 3, 6, 4]], dtype=torch.uint8)
    planes = bitplanes.split_planes(codes, 3)
    assert [int(p[0, 0]) for p in planes] == [0b1100_0101, 0b0111_0100, 0b0010_1101]


@pytest.mark.parametrize("sym", [True, False])
def test_floor_parent_is_the_brute_force_multi_width_optimum(sym):
    """For random λ, the floor parent minimizes sum_r λ_r (w - deq_r(q))^2 over all 256 parents."""
    w = torch.randn(6, 64, generator=_gen(1), dtype=torch.float64) * 0.03
    p = NestedGrid(sym).params(w)
    scale, offset = p["scale"][:, None], (p["offset"][:, None] if not sym else None)
    lam = torch.rand(len(WIDTHS), generator=_gen(2), dtype=torch.float64) + 0.1
    allq = torch.arange(256, dtype=torch.uint8)

    def objective(q):   # q [..., out, in] broadcast against w
        return sum(lam[i] * (w - decode(child(q, r), r, scale, offset).double()).square()
                   for i, r in enumerate(WIDTHS))

    every = objective(allq[:, None, None].expand(256, *w.shape))            # [256, out, in]
    best = every.argmin(0).to(torch.uint8)
    fq = floor_parent(w, scale, offset)
    torch.testing.assert_close(objective(fq), every.min(0).values, rtol=0, atol=1e-15)
    assert torch.equal(fq, best)


@pytest.mark.parametrize("sym", [True, False])
def test_deq_is_bit_exact_what_the_codec_decodes_at_every_width(sym):
    w = torch.randn(24, 200, generator=_gen(3)) * 0.05
    w[3, :64] = 0                                                      # an all-zero group
    q = Q.quantize(w, MatryoshkaConfig(mode="data_free", sym=sym), None)
    parts, meta = _encode_json(q)
    params = group_params(w[None], NestedGrid(sym), 64)
    for r in WIDTHS:
        names = CODEC.parts_at(sorted(parts), meta, r)
        back = CODEC.decode({k: parts[k] for k in names}, meta, q.shape, CODEC.version)
        assert back.meta == {"bits": r, "widths": list(WIDTHS), "group_size": 64, "sym": sym, "outliers": 0}
        assert torch.equal(back.tensors["codes"], child(q.tensors["codes"], r))
        # the grid's deq at this width alone (λ only on r) is exactly what the stored parts decode to
        grid = NestedGrid(sym, ((r, 1.0),))
        gidx = torch.arange(200) // 64
        cols = {k: v[0][:, gidx] for k, v in params.items()}
        deq, codes = grid.quantize(w, cols)
        assert torch.equal(codes, q.tensors["codes"])
        assert torch.equal(deq, Q.dequantize(back))
    assert torch.equal(Q.dequantize(q)[3, :64], torch.zeros(64))


def _encode_json(q):
    parts, meta = CODEC.encode(q)
    return parts, json.loads(json.dumps(meta))


# ------------------------------------------------------------------------------------------------ the method

def _hessian_stats(in_f, seed=0, n=512):
    """Correlated inputs (a random mixing of a few strong directions), their H = 2 X^T X / n."""
    g = _gen(seed)
    z = torch.randn(n, in_f, generator=g)
    mix = torch.eye(in_f) + 0.8 * torch.randn(in_f, in_f, generator=g) / in_f ** 0.5
    x = z @ mix * (torch.rand(in_f, generator=g) * 3 + 0.2)
    return Stats(tokens=n, values={"hessian": 2 * x.t() @ x / n})


class TestMatryoshkaQuantizer(QuantizerConformance):
    quantizer = Q
    # data-driven: the 8-bit parent lives in the bucket the low widths chose, so its weight SQNR is far below the
    # floor parent's (the price of nesting, see the module); floors measured minus ~0.5 dB
    configs = [("data-free sym", MatryoshkaConfig(mode="data_free"), 43.0),
               ("data-free asym", MatryoshkaConfig(mode="data_free", sym=False), 43.0),
               ("data-driven averaged", MatryoshkaConfig(feedback="averaged"), 17.3),
               ("data-driven averaged asym per-row", MatryoshkaConfig(feedback="averaged", sym=False, group_size=0),
                16.0),
               ("data-driven per-width (default)", MatryoshkaConfig(), 15.0),
               ("data-driven per-width asym per-row", MatryoshkaConfig(sym=False, group_size=0), 15.0)]

    def stats_for(self, cfg, x):
        return Stats(tokens=x.shape[0], values={"hessian": 2 * x.t() @ x / x.shape[0]}) if Q.needs_calibration(cfg) \
            else None

    def constant_row(self, cfg, row):
        """Symmetric: the top centre, absmax (1 - 2^-8); asymmetric: a zero-width range decodes to lo itself."""
        return (row * (1 - 2 ** -8), 1e-6) if cfg.sym else (row, 1e-6)


def test_gptq_multi_width_beats_the_floor_parent_at_low_widths():
    w = torch.randn(4, 64, 256, generator=_gen(5)) * 0.02
    st = [_hessian_stats(256, seed=e) for e in range(4)]
    df = Q.quantize_experts(w, MatryoshkaConfig(mode="data_free"), st)
    dd = Q.quantize_experts(w, MatryoshkaConfig(), st)

    def err(e, q, r):
        kept = q.tensors.get("cols")
        return float(width_errors(w[e:e + 1], q.tensors["codes"][None], q.tensors["scale"][None], None, (r,), 64,
                                  st[e].hessian, None if kept is None else kept[None],
                                  None if kept is None else q.tensors["col_values"][None])[r])

    def out_err(qs, r):
        return sum(err(e, q, r) for e, q in enumerate(qs))

    for r in (3, 2):
        assert out_err(dd, r) < 0.9 * out_err(df, r), r
    # the manifest diagnostics are those output errors
    assert dd[0].info["metric"] == "output" and df[0].info["metric"] == "weight_mse"
    assert dd[0].info["out_err"]["2"] == pytest.approx(err(0, dd[0], 2), rel=1e-5)
    assert set(dd[0].info["out_err"]) == {str(r) for r in WIDTHS}


def test_uncalibrated_experts_get_the_floor_parent():
    w = torch.randn(3, 16, 128, generator=_gen(6)) * 0.02
    st = [_hessian_stats(128), None, Stats(tokens=0)]
    qs = Q.quantize_experts(w, MatryoshkaConfig(), st)
    assert [q.info["mode"] for q in qs] == ["data_driven", "data_free", "data_free"]
    ref = Q.quantize_experts(w[1:], MatryoshkaConfig(mode="data_free"), [None, None])
    assert all(torch.equal(a.tensors["codes"], b.tensors["codes"]) for a, b in zip(qs[1:], ref))


def test_config_is_checked():
    for bad in ({"widths": [6, 4]}, {"widths": [8, 4, 4]}, {"widths": [8, 1]}, {"weights": [1, 1]},
                {"group_size": 32}, {"typo": 1}):
        with pytest.raises(ValueError):
            MatryoshkaConfig(**bad)


# ------------------------------------------------------------------------------------------------- the codec

def _make(shape, seed, sym=True, bits=8, outliers=True):
    g = _gen(seed)
    out_f, in_f = shape
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.uint8, generator=g)
    codes.view(-1)[:min(codes.numel(), 1 << bits)] = torch.arange(min(codes.numel(), 1 << bits), dtype=torch.uint8)
    ng = -(-in_f // 64)
    t = {"codes": codes, "scale": (torch.rand(out_f, ng, generator=g) * 0.01).half()}
    if not sym:
        t["offset"] = (-torch.rand(out_f, ng, generator=g) * 0.5).half()
    k = min(3, in_f - 1) if outliers else 0       # kept 16-bit columns (v2); none when in_features is 1
    if k:
        t["cols"] = torch.randperm(in_f, generator=g)[:k].sort().values.to(torch.int32)
        t["col_values"] = torch.randn(out_f, k, generator=g).half()
    return QTensor(shape, t, {"bits": bits, "widths": list(WIDTHS), "group_size": 64, "sym": sym, "outliers": k})


class TestBitplanesCodec(CodecConformance):
    codec = CODEC

    def make(self, shape, seed):
        return _make(shape, seed)


def test_version_1_files_still_decode():
    """bitplanes v1 (no kept columns, no outliers key) decodes as it did."""
    path = GOLDEN / "bitplanes-v1.safetensors"
    info = json.loads(path.with_suffix(".json").read_text())
    back = CODEC.decode(load_file(str(path)), info["meta"], tuple(info["shape"]), 1)
    assert _equal(back, _make(tuple(info["shape"]), info["seed"], outliers=False))
    with pytest.raises(ArtifactError):     # a v2 meta key in a v1 entry
        CODEC.decode(load_file(str(path)), {**info["meta"], "outliers": 0}, tuple(info["shape"]), 1)


def test_kept_column_parts_are_checked():
    q = _make((6, 70), 5)
    parts, meta = CODEC.encode(q)
    for bad in ({**parts, "cols": parts["cols"].flip(0)},                       # not ascending
                {**parts, "cols": parts["cols"] + 70},                          # out of range
                {**parts, "cols": parts["cols"].long()},
                {**parts, "col_values": parts["col_values"].float()},
                {**parts, "col_values": parts["col_values"].fill_(float("inf"))},
                {k: v for k, v in parts.items() if k != "col_values"}):
        with pytest.raises(ArtifactError):
            CODEC.decode(bad, meta, q.shape, CODEC.version)


class TestBitplanesCodecAsym(CodecConformance):
    codec = CODEC

    def make(self, shape, seed):
        return _make(shape, seed, sym=False, bits=3)

    def test_golden_file(self):
        pytest.skip("one golden file per codec version: TestBitplanesCodec's")


def test_prefix_decode_and_its_checks():
    q = _make((5, 70), 0, sym=False)
    parts, meta = CODEC.encode(q)
    back = CODEC.decode({k: parts[k] for k in CODEC.parts_at(sorted(parts), meta, 3)}, meta, q.shape, CODEC.version)
    assert back.meta["bits"] == 3 and torch.equal(back.tensors["codes"], q.tensors["codes"] >> 5)
    assert torch.equal(back.tensors["offset"], q.tensors["offset"])
    assert CODEC.parts_at(sorted(parts), meta, None) == sorted(parts)
    with pytest.raises(MoeqError, match="not a width"):
        CODEC.parts_at(sorted(parts), meta, 5)
    bad = {"plane0": parts["plane0"], "plane2": parts["plane2"], "scale": parts["scale"], "offset": parts["offset"]}
    cases = [bad,                                                                  # not a prefix
             {k: v for k, v in parts.items() if k != "offset"},                     # asym without its offset
             {**parts, "plane7": parts["plane7"][:, :-1]},                          # a short plane
             {**parts, "plane1": parts["plane1"] | 0x80},                           # pad bits set (70 % 8 = 6)
             {**parts, "scale": parts["scale"].float()},
             {**parts, "scale": -parts["scale"]},
             {k: v for k, v in parts.items() if k not in ("plane5", "plane6", "plane7")}]  # 5 planes: not a width
    for p in cases:
        with pytest.raises(ArtifactError):
            CODEC.decode(p, meta, q.shape, CODEC.version)
    for m in ({**meta, "widths": [6, 8]}, {**meta, "bits": 9}, {**meta, "group_size": 32}, {**meta, "sym": 1},
              {**meta, "in_features": 71}, {**meta, "outliers": -1}, {**meta, "outliers": 2},
              {k: v for k, v in meta.items() if k != "widths"}):
        with pytest.raises(ArtifactError):
            CODEC.decode(parts, m, q.shape, CODEC.version)
    with pytest.raises(ArtifactError):
        CODEC.decode(parts, meta, q.shape, CODEC.version + 1)


# ----------------------------------------------------------------------------------------------- the runtime

@pytest.mark.parametrize("sym", [True, False])
def test_runtime_at_every_width_is_the_dequantized_linear(sym):
    w = torch.randn(48, 192, generator=_gen(7)) * 0.02
    bias = torch.randn(48, generator=_gen(8))
    parts, meta = CODEC.encode(Q.quantize(w, MatryoshkaConfig(mode="data_free", sym=sym), None))
    x = torch.randn(3, 5, 192, generator=_gen(9))
    for r in (8, 4, 3, 2):
        q = CODEC.decode({k: parts[k] for k in CODEC.parts_at(sorted(parts), meta, r)}, meta, (48, 192), CODEC.version)
        mod = MatryoshkaLinear(q, bias)
        assert (mod.kernel_group is not None) == (sym and r <= 4)             # the LUT kernel where it applies
        deq = Q.dequantize(q)
        assert torch.equal(mod.dequantized(), deq)
        torch.testing.assert_close(mod(x), torch.nn.functional.linear(x, deq, bias), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(mod(x[0, :1]), torch.nn.functional.linear(x[0, :1], deq, bias),
                                   rtol=1e-5, atol=1e-5)                      # one token: the matvec
        xb = x.bfloat16()
        torch.testing.assert_close(mod.to(torch.bfloat16)(xb).float(),
                                   torch.nn.functional.linear(xb, deq.bfloat16(), bias.bfloat16()).float(),
                                   rtol=2e-2, atol=2e-2)



def _massive_channel_stats(in_f, seed=0, n=512, channels=(5, 77), factor=60.0):
    """Inputs with a few massive-activation channels (as in real LLMs), their H = 2 X^T X / n."""
    g = _gen(seed)
    x = torch.randn(n, in_f, generator=g) * (torch.rand(in_f, generator=g) + 0.5)
    x[:, list(channels)] *= factor
    return x, Stats(tokens=n, values={"hessian": 2 * x.t() @ x / n})


@pytest.mark.parametrize("sym", [True, False])
def test_kept_columns_cut_the_low_width_error_and_run_at_every_width(sym):
    """Data-driven matryoshka keeps the inputs of largest mean squared activation in 16 bits: on a layer with
    massive-activation channels its output error at 4, 3 and 2 bits is a fraction of the same run without them;
    every width's runtime (LUT kernel, uint8 route, fallback) reads those columns as stored."""
    w = torch.randn(48, 192, generator=_gen(21)) * 0.02
    x, st = _massive_channel_stats(192)
    with_kept = Q.quantize(w, MatryoshkaConfig(sym=sym), st)
    without = Q.quantize(w, MatryoshkaConfig(sym=sym, outliers=0), st)
    assert with_kept.meta["outliers"] == 4 and without.meta["outliers"] == 0 and "cols" not in without.tensors
    assert {5, 77} <= set(with_kept.tensors["cols"].tolist())
    for r in (4, 3, 2):
        assert with_kept.info["out_err"][str(r)] < 0.5 * without.info["out_err"][str(r)], r
    bias = torch.randn(48, generator=_gen(8))
    parts, meta = CODEC.encode(with_kept)
    xs = x[:7].reshape(1, 7, 192)
    for r in (8, 6, 4, 3, 2):
        q = CODEC.decode({k: parts[k] for k in CODEC.parts_at(sorted(parts), meta, r)}, meta, (48, 192), CODEC.version)
        mod = MatryoshkaLinear(q, bias)
        deq = Q.dequantize(q)
        cols = q.tensors["cols"].long()
        assert torch.equal(deq[:, cols], q.tensors["col_values"].float())        # kept as stored at every width
        assert torch.equal(mod.dequantized(), deq)
        ref = torch.nn.functional.linear(xs, deq, bias)
        torch.testing.assert_close(mod(xs), ref, rtol=1e-4, atol=1e-3 * ref.abs().max().item())
        torch.testing.assert_close(mod(xs[0, :1]), ref[0, :1], rtol=1e-4, atol=1e-3 * ref.abs().max().item())
    with pytest.raises(ValueError, match="data_driven"):
        MatryoshkaConfig(mode="data_free", outliers=2)


# ------------------------------------------------------------------- the uint8 route (symmetric, r = 5..8, C++)

ALL_WIDTHS = (8, 7, 6, 5, 4, 3, 2)
needs_cpp = pytest.mark.skipif(cpu.library() is None, reason="the C++ kernel library does not build here")


def _width(r, group_size, shape=(40, 200), seed=11):
    """A weight's QTensor read at r bits (symmetric, data-free) and a bias."""
    w = torch.randn(*shape, generator=_gen(seed)) * 0.02
    cfg = MatryoshkaConfig(mode="data_free", widths=ALL_WIDTHS, group_size=group_size)
    parts, meta = CODEC.encode(Q.quantize(w, cfg, None))
    q = CODEC.decode({k: parts[k] for k in CODEC.parts_at(sorted(parts), meta, r)}, meta, shape, CODEC.version)
    return q, torch.randn(shape[0], generator=_gen(seed + 1))


def _spy(monkeypatch, name):
    """Count the calls of ``cpu.<name>`` (the route a forward takes)."""
    calls = []
    fn = getattr(cpu, name)
    monkeypatch.setattr(cpu, name, lambda *a, **k: calls.append(1) or fn(*a, **k))
    return calls


@needs_cpp
@pytest.mark.parametrize("group_size", [64, 0])
@pytest.mark.parametrize("r", [5, 6, 7, 8])
def test_u8_route_is_the_dequantized_linear(r, group_size, monkeypatch):
    q, bias = _width(r, group_size)                            # in_features 200: not a multiple of 16 or 64
    mod = MatryoshkaLinear(q, bias)
    assert mod.u8 and mod.kernel_group is None and "route=u8_matvec" in repr(mod)
    assert mod.codes.dtype == torch.uint8 and tuple(mod.codes.shape) == (40, 200)      # one byte a weight
    deq = Q.dequantize(q)
    assert torch.equal(mod.dequantized(), deq)                 # the C++ decode: bit for bit
    for dt in (torch.bfloat16, torch.float16):
        assert torch.equal(mod.dequantized(dt), deq.to(dt))   # one rounding
    monkeypatch.setattr(cpu, "U8_TILE_BYTES", 1)               # prefill: several tiles (16 rows each)
    matvec, tiled = _spy(monkeypatch, "u8_matvec"), _spy(monkeypatch, "u8_linear_tiled")
    modb = MatryoshkaLinear(q, bias).to(torch.bfloat16)
    assert modb.codes.dtype == torch.uint8 and modb.scales.dtype == torch.float32
    for m in (1, 3, 64):
        x = torch.randn(m, 200, generator=_gen(20 + m))
        y = mod(x)
        torch.testing.assert_close(y, F.linear(x, deq, bias), rtol=1e-5, atol=1e-5)
        xb = x.bfloat16()
        torch.testing.assert_close(modb(xb).float(), F.linear(xb, deq.bfloat16(), bias.bfloat16()).float(),
                                   rtol=2e-2, atol=2e-2)
        with monkeypatch.context() as mp:                       # the torch route: the same numbers
            mp.setenv("MOEQ_KERNEL", "torch")
            n = len(matvec) + len(tiled)
            torch.testing.assert_close(mod(x), y, rtol=1e-5, atol=1e-5)
            assert torch.equal(mod.dequantized(), deq)
            assert len(matvec) + len(tiled) == n
    small = cpu.U8_MATVEC_MAX_M[cpu.flavor()]
    fused = sum(m <= small for m in (1, 3, 64))                 # two modules (float32, bf16) per M
    assert len(matvec) == 2 * fused and len(tiled) == 2 * (3 - fused)
    x = torch.randn(2, 3, 200, generator=_gen(30))              # leading dims
    torch.testing.assert_close(mod(x), F.linear(x, deq, bias), rtol=1e-5, atol=1e-5)


def test_u8_route_falls_back_without_the_library(monkeypatch):
    monkeypatch.setattr(cpu, "library", lambda: None)
    q, bias = _width(8, 64)
    mod = MatryoshkaLinear(q, bias)
    assert not mod.u8 and mod.qweight.numel() == 40 * 200 and "route=dequantize+linear" in repr(mod)
    x = torch.randn(3, 200, generator=_gen(31))
    deq = Q.dequantize(q)
    assert torch.equal(mod.dequantized(), deq)
    torch.testing.assert_close(mod(x), F.linear(x, deq, bias), rtol=1e-5, atol=1e-5)


@needs_cpp
@pytest.mark.parametrize("k,group_size", [(16, 0), (200, 64), (200, 0), (192, 64), (4 * 64 + 5, 128)])
def test_u8_kernels_against_the_formula(k, group_size):
    """Every code value, float16-valued scales, every x dtype, odd shapes (a row tail per group), M past a block of
    4 rows and 13 output rows (past a block of 4)."""
    n, off = 13, u8_offset(8)
    codes = (torch.arange(n * k) * 37 % 256).to(torch.uint8).view(n, k)
    g = group_size or k
    scales = (torch.rand(n, -(-k // g), generator=_gen(40)) * 1e-3).half().float()
    w = (codes.float() + off) * scales.repeat_interleave(g, dim=1)[:, :k]
    assert torch.equal(cpu.u8_dequantize(codes, scales, group_size, off), w)
    assert torch.equal(cpu.u8_dequantize(codes, scales, group_size, off, torch.bfloat16), w.bfloat16())
    assert torch.equal(cpu.u8_dequantize(codes, scales, group_size, off, torch.float16), w.half())
    for m in (1, 2, 3, 4, 7, 9):
        x = torch.randn(m, k, generator=_gen(41 + m))
        ref = F.linear(x.double(), w.double())
        torch.testing.assert_close(cpu.u8_matvec(x, codes, scales, group_size, off).double(), ref,
                                   rtol=1e-5, atol=1e-6)
        for dt in (torch.bfloat16, torch.float16):
            xd = x.to(dt)
            exact = F.linear(xd.double(), w.double())           # only the output rounding differs
            y = cpu.u8_matvec(xd, codes, scales, group_size, off)
            assert y.dtype == dt
            torch.testing.assert_close(y.double(), exact.to(dt).double(), rtol=1e-2, atol=1e-4)
            assert torch.equal(cpu.u8_matvec(xd, codes, scales, group_size, off, torch.float32).to(dt), y)
        torch.testing.assert_close(cpu.u8_linear_tiled(x, codes, scales, group_size, off).double(), ref,
                                   rtol=1e-5, atol=1e-6)
    threads = torch.get_num_threads()
    try:                                                        # the OpenMP split over blocks of output rows
        torch.set_num_threads(2)
        x = torch.randn(5, k, generator=_gen(50))
        want = cpu.u8_matvec(x, codes, scales, group_size, off)
        cpu.U8_PARALLEL_MIN, saved = 0, cpu.U8_PARALLEL_MIN
        try:
            assert torch.equal(cpu.u8_matvec(x, codes, scales, group_size, off), want)
            assert torch.equal(cpu.u8_dequantize(codes, scales, group_size, off), w)
        finally:
            cpu.U8_PARALLEL_MIN = saved
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError):
        cpu.u8_matvec(torch.randn(1, k + 1), codes, scales, group_size, off)
    with pytest.raises(ValueError):
        cpu.u8_matvec(torch.randn(1, k), codes, scales[:, :1].contiguous() if scales.shape[1] > 1 else scales[:1],
                      group_size, off)


# -------------------------------------------------------------------------------------- artifact end to end

@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    """A tiny Mixtral whose LM head is sharpened (confident next-token predictions), quantized data-driven, and
    text sampled from the float model (what a quantized model should still predict)."""
    torch.manual_seed(0)
    m = build("mixtral")
    with torch.no_grad():
        m.lm_head.weight.mul_(40)
        text = m.generate(torch.randint(0, V, (8, 1), generator=_gen(10)), max_new_tokens=39, do_sample=True,
                          min_new_tokens=39, pad_token_id=0)
    out = tmp_path_factory.mktemp("mq") / "art"
    api.quantize_model(m, out, Recipe(method="matryoshka"), calib_ids=text[:4])
    return out, text[4:]


def _nll(path, ids, bits):
    from moeq.eval.perplexity import perplexity
    model, _, _ = api.load(str(path), bits=bits)
    return perplexity(model, ids).ppl


def test_loading_at_fewer_bits_degrades_gracefully(artifact):
    path, ids = artifact
    entries = json.loads((path / "moeq.json").read_text())["tensors"]
    assert entries and all(e["codec"] == "bitplanes" and e["meta"]["bits"] == 8 for e in entries.values())
    assert all(set(e["quant_info"]["out_err"]) == {"8", "6", "4", "3", "2"} for e in entries.values())
    p8, p3 = _nll(path, ids, 8), _nll(path, ids, 3)
    assert torch.isfinite(torch.tensor([p8, p3])).all()
    assert p3 > p8 * 1.01, (p3, p8)
    assert _nll(path, ids, None) == p8                                       # the default is the full parent


def test_reading_r_bits_reads_r_planes(artifact):
    path, _ = artifact
    full = ArtifactReader(path)
    packed_modules(full)
    at2 = ArtifactReader(path)
    packed_modules(at2, bits=2)
    scales = sum(e["bytes"] - 8 * e["shape"][0] * bitplanes.plane_bytes(e["shape"][1])
                 for e in full.tensors.values())
    assert (at2.bytes_read - scales) * 4 == full.bytes_read - scales         # 2 of 8 planes of code bytes
    with pytest.raises(MoeqError, match="not a width"):
        api.load(str(path), bits=5)


def _flip(path, entry, part):
    """Flip one byte of tensor ``entry.part`` in its shard (safetensors: u64 header size, JSON header, data)."""
    e = json.loads((path / "moeq.json").read_text())["tensors"][entry]
    shard = path / e["shard"]
    raw = bytearray(shard.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    start = json.loads(raw[8:8 + n])[f"{entry}.{part}"]["data_offsets"][0]
    raw[8 + n + start] ^= 0xFF
    shard.write_bytes(bytes(raw))


def test_per_part_checksums(artifact, tmp_path):
    import shutil
    path = tmp_path / "art"
    shutil.copytree(artifact[0], path)
    name = next(iter(json.loads((path / "moeq.json").read_text())["tensors"]))
    _flip(path, name, "plane5")
    with pytest.raises(ArtifactError, match="checksum"):
        api.load(str(path), bits=8)
    with pytest.raises(ArtifactError, match="checksum"):
        api.load(str(path))
    api.load(str(path), bits=4)                        # plane5 is not read at 4 bits
    # an artifact without per-part hashes (written before them): a subset is read whole and verified
    man = json.loads((path / "moeq.json").read_text())
    for e in man["tensors"].values():
        del e["part_sha256"]
    (path / "moeq.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="checksum"):
        api.load(str(path), bits=4)
    # a malformed per-part map is refused before anything is read
    man["tensors"][name]["part_sha256"] = {"plane0": "0" * 64}
    (path / "moeq.json").write_text(json.dumps(man))
    with pytest.raises(ArtifactError, match="part_sha256"):
        ArtifactReader(path)


def test_extract_keeps_r_planes(artifact, tmp_path):
    path, ids = artifact
    out = extract(path, 3, tmp_path / "x3")
    man = json.loads((out / "moeq.json").read_text())
    src = json.loads((path / "moeq.json").read_text())
    e = next(iter(man["tensors"].values()))
    assert sorted(e["parts"]) == ["col_values", "cols", "plane0", "plane1", "plane2", "scale"] and e["meta"]["bits"] == 3
    assert man["totals"]["quantized_bytes"] < 0.5 * src["totals"]["quantized_bytes"]
    assert man["kept"].keys() == src["kept"].keys()
    assert _nll(out, ids, None) == _nll(path, ids, 3)                       # the same model as a 3-bit load
    assert _nll(out, ids, 2) == _nll(path, ids, 2)
    with pytest.raises(MoeqError, match="only 3 bit-planes"):
        api.load(str(out), bits=4)
    with pytest.raises(MoeqError, match="no entry stores nested"):
        api.load(str(_plain_artifact(tmp_path)), bits=3)


def _plain_artifact(tmp_path):
    out = tmp_path / "plain"
    api.quantize_model(build("mixtral"), out, Recipe(method="rtn", options={"bits": 4}))
    return out


def test_a_width_read_reencodes_to_its_planes():
    """A decoded r-bit QTensor re-encodes to r planes that decode back to it (extraction's step)."""
    q = _make((9, 130), 4)
    parts, meta = CODEC.encode(q)
    q3 = CODEC.decode({k: parts[k] for k in CODEC.parts_at(sorted(parts), meta, 3)}, meta, q.shape, CODEC.version)
    p3, m3 = CODEC.encode(q3)
    assert sorted(p3) == ["col_values", "cols", "plane0", "plane1", "plane2", "scale"] and m3["bits"] == 3
    assert _equal(CODEC.decode(p3, m3, q.shape, CODEC.version), q3)


def test_per_width_states_beat_the_averaged_residual_on_a_correlated_layer():
    """feedback=per_width: each width's GPTQ state compensates its own error only; on a layer with correlated
    inputs its output error is below the averaged residual's at 8 and at 2 bits, at the same λ."""
    g = torch.Generator().manual_seed(0)
    d = 256
    x = torch.randn(4096, d, generator=g) @ (torch.randn(d, d, generator=g) / d ** 0.5 + torch.eye(d)) \
        * torch.linspace(0.2, 3, d)
    h = 2 * x.T @ x / 4096
    w = torch.randn(1, 128, d, generator=g) * 0.02
    errs = {}
    for fb in ("per_width", "averaged"):
        cfg = MatryoshkaConfig(feedback=fb, weights=(2, 1, 1, 1, 1))
        q = Q.quantize_experts(w, cfg, [Stats(4096, {"hessian": h})])[0]
        errs[fb] = q.info["out_err"]
    assert errs["per_width"]["8"] < errs["averaged"]["8"] and errs["per_width"]["2"] < errs["averaged"]["2"], errs
