"""The ``ternary-dict`` runtime (``moeq.runtime.ternary_dict``): every route (torch, the C++ fused kernel and its
decode + GEMM, the portable C++ build, Triton in its interpreter) equals ``F.linear(x, ternary_weight(symbols, lo,
hi))`` on random, all-zero, all-nonzero and alternating rows, odd and tiny shapes, with bias and after
``.to(bfloat16)``; the phrase records byte by byte; the kernels stay inside their buffers on malformed rows; the
module holds no dense weight unless asked."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from moeq.errors import ArtifactError
from moeq.formats import ternary_dict as td
from moeq.kernels import ENV, cpu
from moeq.quant.base import QTensor
from moeq.registry import CODECS, RUNTIMES, load_builtins
from moeq.runtime import ternary_dict as rt
from moeq.runtime.build import runtime_module

load_builtins()
CODEC = CODECS.get("ternary-dict")()
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}   # max|y - ref| / max|ref|
DICTS = {
    "ref": td.build_dictionary((0.0575, 0.885, 0.0575), 79, 4095),    # <= 4 nonzeros a phrase
    "dense": td.build_dictionary((0.45, 0.1, 0.45), 40, 3000),        # up to 10: the ex_ent entries
}
NAME = "model.layers.0.ternary_dict"


def ternary(shape, p0, seed=0) -> torch.Tensor:
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.where(u < p0, 0, torch.where(u < p0 + (1 - p0) / 2, 1, -1)).to(torch.int8)


def rows(out_f: int, in_f: int, seed: int = 0) -> torch.Tensor:
    """Random rows at P(0) = 0.885, then an all-zero, an all-nonzero and an alternating-sign row where they fit."""
    s = ternary((out_f, in_f), 0.885, seed)
    i = torch.arange(in_f)
    special = [torch.zeros(in_f), 1 - 2 * ternary((in_f,), 0.0, seed + 1).clamp(min=0), 1 - 2 * (i % 2)]
    for r, row in zip(range(out_f - 1, 0, -1), special):
        s[r] = row.to(torch.int8)
    return s


def packed(symbols: torch.Tensor, d: td.Dictionary, seed: int = 0) -> tuple[QTensor, QTensor, dict]:
    """(the quantizer's QTensor, what the codec decodes from its stored parts, the shared tables)."""
    out_f = symbols.shape[0]
    g = torch.Generator().manual_seed(seed)
    lo, hi = -torch.rand(out_f, generator=g).half(), torch.rand(out_f, generator=g).half()
    shared = {NAME: d.to_table(NAME)}
    q = QTensor(tuple(symbols.shape), {"symbols": symbols, "lo": lo, "hi": hi}, {}, (NAME,))
    parts, meta = CODEC.encode(q, shared)
    return q, CODEC.decode(parts, meta, q.shape, CODEC.version, shared), shared


def reference(x: torch.Tensor, q: QTensor, bias=None) -> torch.Tensor:
    w = td.ternary_weight(q.tensors["symbols"], q.tensors["lo"], q.tensors["hi"]).double()
    return F.linear(x.double(), w, None if bias is None else bias.double())


def rel_err(y, ref) -> float:
    return float((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))


@pytest.fixture
def route(request, monkeypatch):
    """MOEQ_KERNEL set to the route under test (forced: a route that cannot run fails the test)."""
    if request.param == "cpp" and cpu.library() is None:
        pytest.skip("the C++ library does not build here")
    monkeypatch.setenv(ENV, request.param)
    return request.param


# ---------------------------------------------------------------- every CPU route vs F.linear
@pytest.mark.parametrize("route", ["torch", "cpp"], indirect=True)
@pytest.mark.parametrize("dname", list(DICTS))
@pytest.mark.parametrize("shape", [(37, 300), (5, 1), (1, 77), (8, 129)])
def test_routes_match_reference(route, dname, shape):
    q, dq, shared = packed(rows(*shape, seed=shape[1]), DICTS[dname], seed=1)
    m = RUNTIMES.get("ternary-dict")(dq, None, shared)
    for i, mm in enumerate((1, 3, 16, 100)):
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(mm, shape[1], generator=torch.Generator().manual_seed(i)).to(dtype)
            y = m(x)
            assert y.dtype == dtype and y.shape == (mm, shape[0])
            assert rel_err(y, reference(x, q)) < TOL[dtype], (mm, dtype)


@pytest.mark.parametrize("route", ["torch", "cpp"], indirect=True)
def test_bias_leading_shape_float16_and_bf16_module(route):
    q, dq, shared = packed(rows(24, 70, 3), DICTS["ref"], seed=2)
    bias = torch.randn(24)
    m = runtime_module("ternary-dict", dq, bias, shared, "qmoe")          # the loader's path
    assert isinstance(m, rt.TernaryDictLinear)
    x = torch.randn(2, 3, 70)
    assert rel_err(m(x), reference(x, q, bias)) < TOL[torch.float32]
    assert rel_err(m(x.half()), reference(x.half(), q, bias)) < TOL[torch.float16]
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    assert (m.codewords.dtype, m.row_offsets.dtype, m.lo.dtype, m.hi.dtype, m.rec.dtype) == (
        torch.uint16, torch.int64, torch.float16, torch.float16, torch.uint8)
    for mm in (1, 3, 16, 100):
        xb = torch.randn(mm, 70).bfloat16()
        y = m(xb)
        assert y.dtype == torch.bfloat16
        assert rel_err(y, reference(xb, q, m.bias.float())) < TOL[torch.bfloat16]


def test_route_catches_a_wrong_weight():
    """The comparison can fail: one flipped symbol changes the result beyond the tolerance."""
    q, _, shared = packed(rows(8, 64, 5), DICTS["ref"])
    bad = q.tensors["symbols"].clone()
    bad[2, 10] = 1 if bad[2, 10] != 1 else -1
    m = rt.TernaryDictLinear(packed(bad, DICTS["ref"])[1], None, shared)
    x = torch.randn(1, 64)
    assert rel_err(m(x), reference(x, q)) > TOL[torch.float32]


def test_routes_dispatch_by_rows(monkeypatch):
    """cpp: the fused kernel up to FUSED_MAX_M rows of x, decode + GEMM above; torch: never the library."""
    if cpu.library() is None:
        pytest.skip("the C++ library does not build here")
    q, dq, shared = packed(rows(16, 96, 6), DICTS["ref"])
    m = rt.TernaryDictLinear(dq, None, shared)
    calls = []
    real_mv, real_tiled = cpu.ternary_matvec, cpu.ternary_linear_tiled
    monkeypatch.setattr(cpu, "ternary_matvec", lambda *a, **k: calls.append("fused") or real_mv(*a, **k))
    monkeypatch.setattr(cpu, "ternary_linear_tiled", lambda *a, **k: calls.append("tiled") or real_tiled(*a, **k))
    monkeypatch.setenv(ENV, "cpp")
    limit = rt.FUSED_MAX_M[cpu.flavor()]
    for mm in (1, limit, limit + 1):
        x = torch.randn(mm, 96)
        assert rel_err(m(x), reference(x, q)) < TOL[torch.float32]
    assert calls == ["fused", "fused", "tiled"]
    monkeypatch.setenv(ENV, "torch")
    calls.clear()
    m(torch.randn(1, 96))
    assert calls == []


def test_no_dense_copy_unless_cached():
    q, dq, shared = packed(rows(64, 512, 7), DICTS["ref"])
    m = rt.TernaryDictLinear(dq, None, shared)
    x = torch.randn(200, 512)
    y = m(x)
    own = sum(b.numel() * b.element_size() for k, b in m.named_buffers() if k not in ("rec", "ex_off", "ex_ent"))
    assert own < 64 * 512 // 4 and not any(b.shape == (64, 512) for b in m.buffers()) and not m._cache.get(
        ("decoded", torch.float32))
    assert set(m.state_dict()) == {"codewords", "row_offsets", "lo", "hi"}       # records: shared, not persisted
    c = rt.TernaryDictLinear(dq, None, shared, cache_decoded=True)
    assert torch.allclose(c(x), y, rtol=1e-5, atol=1e-5)
    for dtype in (torch.float32, torch.bfloat16):
        w = c.dequantized(dtype)
        assert c.dequantized(dtype) is w
        assert torch.equal(w, td.ternary_weight(q.tensors["symbols"], q.tensors["lo"], q.tensors["hi"]).to(dtype))
    c.to(torch.bfloat16)
    assert not c._cache                                                           # moves drop derived state
    assert rt.phrase_records(DICTS["ref"])[0] is m.rec                            # one table per dictionary


def test_symbols_form_without_a_dictionary():
    """The quantizer's QTensor directly (as QuantizerConformance builds runtimes): with its table, or fitted."""
    q, _, shared = packed(rows(12, 90, 8), DICTS["ref"])
    x = torch.randn(3, 90)
    for m in (rt.TernaryDictLinear(q, None, shared), rt.TernaryDictLinear(q, None, None)):
        assert rel_err(m(x), reference(x, q)) < TOL[torch.float32]
    with pytest.raises(ValueError, match="dictionary"):
        rt.TernaryDictLinear(packed(rows(2, 9), DICTS["ref"])[1], None, {})


# ---------------------------------------------------------------- the C++ kernels directly
def test_phrase_records_by_hand():
    d = td.build_dictionary((1, 1, 1), 5, 243)                 # every phrase of 5 symbols
    rec, ex_off, ex_ent = rt.phrase_records(d)
    phrases = [tuple(p) for p in d.phrases().tolist()]
    r = rec[phrases.index((0, 0, 1, 0, -1))].tolist()
    assert r == [5, 2, 2, 4, 4, 4, 0b10_10_10_01, 0b00_00_10_01]
    assert rec[phrases.index((0, 0, 0, 0, 0))].tolist() == [5, 0, 0, 0, 0, 0, 0, 0]
    r = rec[phrases.index((-1, 1, 1, -1, 1))].tolist()         # 5 nonzeros: the 5th in ex_ent
    assert r == [5, 5, 0, 1, 2, 3, 0b10_01_01_10, 0b10_01_01_10]
    c = phrases.index((-1, 1, 1, -1, 1))
    assert ex_ent[ex_off[c]:ex_off[c + 1]].to(torch.int32).tolist() == [4 << 2 | 1]
    assert rec.shape == (65536, 8) and rec[d.size:].tolist() == [[1, 0, 0, 0, 0, 0, 0, 0]] * (65536 - d.size)
    assert int(ex_off[-1]) == ex_ent.numel() == int(((d.phrases() != 0).sum(1) - 4).clamp(min=0).sum())


@pytest.mark.parametrize("dname", list(DICTS))
def test_cpp_decode_is_exact(dname):
    if cpu.library() is None:
        pytest.skip("the C++ library does not build here")
    q, dq, shared = packed(rows(21, 333, 9), DICTS[dname])
    m = rt.TernaryDictLinear(dq, None, shared)
    w = td.ternary_weight(q.tensors["symbols"], q.tensors["lo"], q.tensors["hi"])
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        assert torch.equal(cpu.ternary_decode(m._code(), dtype), w.to(dtype)), dtype


def test_kernels_stay_in_bounds_on_malformed_rows():
    """Codewords the codec would reject (rows under- and over-covered, nonzeros past the end): the kernels read and
    write only inside their buffers (a sentinel after the decoded rows survives) and give finite sums."""
    if cpu.library() is None:
        pytest.skip("the C++ library does not build here")
    d = DICTS["dense"]
    rec, ex_off, ex_ent = rt.phrase_records(d)
    ph = d.phrases()
    longest_nz = int(((ph != 0).sum(1) * 1000 + d.lengths).argmax())      # most nonzeros, then longest
    cw = torch.tensor([longest_nz] * 9 + [0, 1, 65535, 40000], dtype=torch.int32).to(torch.uint16)
    off = torch.tensor([0, 1, 9, 9, 13], dtype=torch.int64)             # 1, 8, 0, 4 codewords for rows of 3
    lo, hi = -torch.ones(4).half(), torch.ones(4).half()
    code = cpu.ternary_code(cw, off, lo, hi, rec, ex_off, ex_ent, 3)
    buf = torch.full((5, 3), 7.0)
    cpu.ternary_decode_rows(code, 0, 4, buf[:4])
    assert buf[4].eq(7.0).all() and buf[:4].abs().le(1).all()
    for mm in (1, 5):
        assert torch.isfinite(cpu.ternary_matvec(code, torch.randn(mm, 3))).all()
    with pytest.raises(ValueError, match="row_offsets"):
        cpu.ternary_code(cw, torch.tensor([0, 5, 4, 9, 13]), lo, hi, rec, ex_off, ex_ent, 3)
    with pytest.raises(ValueError, match="row_offsets"):
        cpu.ternary_code(cw, torch.tensor([0, 1, 9, 9, 14]), lo, hi, rec, ex_off, ex_ent, 3)


def test_codec_rejects_under_covered_rows():
    """A malformed row never reaches a runtime: the codec's decode refuses it (no expansion needed to see it)."""
    q, _, shared = packed(rows(6, 200, 10), DICTS["ref"])
    parts, meta = CODEC.encode(q, shared)
    off = parts["row_offsets"].clone()
    off[2] -= 1                                                          # row 1 one codeword short
    for bad in ({**parts, "row_offsets": off},
                {**parts, "codewords": parts["codewords"][:-1],
                 "row_offsets": torch.cat([parts["row_offsets"][:-1], parts["row_offsets"][-1:] - 1])}):
        with pytest.raises(ArtifactError, match="fewer than 200 symbols"):
            CODEC.decode(bad, meta, q.shape, CODEC.version, shared)


def test_cpp_portable_build(tmp_path, monkeypatch):
    """The same source without AVX-512 (the loops other CPUs get) agrees with the reference."""
    if cpu._compiler() is None:
        pytest.skip("no C++ compiler on this machine")
    lib = cpu.load(cpu.build(tmp_path, [*cpu.FLAGS, "-mno-avx512f"]))
    assert lib.moeq_lut_avx512() == 0
    monkeypatch.setitem(cpu._state, "lib", lib)
    monkeypatch.setenv(ENV, "cpp")
    for dname, d in DICTS.items():
        q, dq, shared = packed(rows(19, 150, 11), d)
        m = rt.TernaryDictLinear(dq, None, shared)
        for mm in (1, 3, rt.FUSED_MAX_M["portable"] + 1, 70):
            x = torch.randn(mm, 150, dtype=torch.bfloat16)
            assert rel_err(m(x), reference(x, q)) < TOL[torch.bfloat16], (dname, mm)
        w = td.ternary_weight(q.tensors["symbols"], q.tensors["lo"], q.tensors["hi"])
        assert torch.equal(cpu.ternary_decode(m._code(), torch.bfloat16), w.bfloat16())


# ---------------------------------------------------------------- CUDA / Triton
@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_route_matches_reference(dtype, monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    for d in DICTS.values():
        q, dq, shared = packed(rows(96, 200, 12), d)
        m = rt.TernaryDictLinear(dq, torch.randn(96), shared).cuda()
        for mm in (1, 33, 100):
            x = torch.randn(mm, 200).to(dtype)
            y = m(x.cuda())
            assert y.is_cuda and y.dtype == dtype
            assert rel_err(y.cpu(), reference(x, q, m.bias.cpu())) < TOL[dtype]


_INTERPRETED = """
import torch
import torch.nn.functional as F
from moeq.formats import ternary_dict as td
from moeq.kernels.triton_ternary import ternary_decode_triton, ternary_linear_triton
from moeq.runtime.ternary_dict import TernaryDictLinear
from tests.test_ternary_runtime import DICTS, packed, rows
for name, d in DICTS.items():
    for shape in ((19, 130), (3, 1), (1, 77)):
        q, dq, shared = packed(rows(*shape, seed=shape[1]), d)
        m = TernaryDictLinear(dq, None, shared)
        longest, extra = m._bounds()
        assert (extra > 0) == (name == "dense")
        w = td.ternary_weight(q.tensors["symbols"], q.tensors["lo"], q.tensors["hi"])
        assert torch.equal(ternary_decode_triton(*m._operands(), shape[1], longest, extra, torch.float16), w.half())
        for mm, dtype, tol in ((1, torch.float32, 1e-5), (5, torch.float16, 2e-3), (70, torch.float32, 1e-5)):
            x = torch.randn(mm, shape[1]).to(dtype)
            y = ternary_linear_triton(x, *m._operands(), shape[1], longest, extra)
            ref = F.linear(x.double(), w.double())
            err = float((y.double() - ref).abs().max() / ref.abs().max().clamp(min=1e-12))
            assert y.dtype == dtype and err < tol, (name, shape, mm, dtype, err)
print("ok")
"""


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")
def test_triton_kernels_in_interpreter():
    """The Triton kernels' walk, masks and overflow entries on CPU (TRITON_INTERPRET=1; float32 and float16). A
    subprocess: the interpreter is chosen when the kernels are decorated."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", _INTERPRETED], capture_output=True, text=True, env=env, timeout=300,
                         check=False, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
