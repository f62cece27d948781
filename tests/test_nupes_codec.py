"""NUPES power-grid weights: the ``nupes`` codec (conformance, strict validation of untrusted parts) and the
``NupesLinear`` runtime (kernel route for 2/3/4-bit kernel shapes, dequantize + GEMM otherwise), on QTensors built
here with random codes and scales and a power LUT computed in the test (independent of ``moeq.quant.nupes``)."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from moeq.errors import ArtifactError
from moeq.formats import bitpack
from moeq.kernels import ENV
from moeq.kernels import lut as lut_mod
from moeq.quant.base import QTensor
from moeq.registry import CODECS, RUNTIMES, load_builtins
from moeq.runtime.build import runtime_module
from moeq.runtime.nupes import NupesLinear
from tests.conformance import CodecConformance, _equal

load_builtins()
CODEC = CODECS.get("nupes")()
GRIDS = ("half", "sym")
GROUPS = (0, 32, 64, 128)


def power_lut(bits: int, grid: str, a: float) -> torch.Tensor:
    """Ascending float32 levels sign(k) (|k| / kmax)^(1/a) * kmax. half: k = ±0.5 .. ±(Q + 0.5) (2^b levels);
    sym: k = -Q .. Q (2^b - 1 levels, the spare top entry repeats the last one). Q = 2^(b-1) - 1."""
    q = 2 ** (bits - 1) - 1
    if grid == "half":
        k = torch.arange(-(q + 0.5), q + 1, 1.0, dtype=torch.float64)
        kmax = q + 0.5
    else:
        k = torch.arange(-q, q + 1, 1.0, dtype=torch.float64)
        kmax = q
        k = torch.cat([k, k[-1:]])
    lut = (torch.sign(k) * kmax * (k.abs() / kmax) ** (1 / a)).float()
    assert lut.shape == (1 << bits,)
    return lut


def make_q(shape, bits, grid="half", group=64, seed=0, a=0.7) -> QTensor:
    g = torch.Generator().manual_seed(seed)
    out_f, in_f = shape
    ng = -(-in_f // group) if group else 1
    codes = torch.randint(0, 1 << bits, shape, generator=g, dtype=torch.uint8)
    k = min(codes.numel(), 1 << bits)
    codes.view(-1)[:k] = torch.arange(k, dtype=torch.uint8)             # every code value where it fits
    scale = (0.5 + torch.rand(out_f, ng, generator=g)).mul(0.01).half()
    return QTensor(shape, {"codes": codes, "scale": scale, "lut": power_lut(bits, grid, a)},
                   {"bits": bits, "group_size": group, "grid": grid, "exponent": a})


def reference_weight(q: QTensor) -> torch.Tensor:
    """W = lut[code] * float32(scale of the input's group), the contract, written out naively."""
    t, g = q.tensors, q.meta["group_size"]
    in_f = q.shape[1]
    s = t["scale"].float().repeat_interleave(g or in_f, dim=1)[:, :in_f]
    return t["lut"][t["codes"].long()] * s


def roundtrip(q):
    parts, meta = CODEC.encode(q)
    return CODEC.decode(parts, json.loads(json.dumps(meta)), q.shape, CODEC.version)


# ---------------------------------------------------------------------------------------------- codec

class TestNupesCodec(CodecConformance):
    codec = CODEC
    # seed s -> bits 2 + s % 7, grid (s // 7) % 2, group (0, 32, 64, 128)[s % 4]: seeds 0..13 cover every
    # (bits, grid) pair
    shapes = CodecConformance.shapes + [(5, 9), (2, 257), (7, 64), (4, 100), (3, 129), (6, 33), (1, 256), (9, 17),
                                        (16, 128), (11, 65)]

    def make(self, shape, seed):
        return make_q(shape, 2 + seed % 7, GRIDS[(seed // 7) % 2], GROUPS[seed % 4], seed,
                      0.4 + 0.05 * (seed % 14))

    def test_rejects_inconsistent_parts(self):
        """Shapes the parts cannot hold (in_features 12 -> 13 is invisible: rows are padded to 8 codes with zero
        codes; a shrunk row shows as nonzero padding)."""
        q = self.make((8, 12), 3)
        parts, meta = self.codec.encode(q)
        for shape in [(8, 11), (9, 12), (8, 17), (8, 4), (8, 0), (0, 12), (8, 12, 1), (8, 12.0), (True, 12)]:
            with pytest.raises(ArtifactError):
                self.codec.decode(parts, meta, shape, self.codec.version)
        assert _equal(self.codec.decode(parts, meta, (8, 12), self.codec.version), q)


@pytest.mark.parametrize("grid", GRIDS)
@pytest.mark.parametrize("bits", range(2, 9))
def test_roundtrip_every_width_and_grid(bits, grid):
    for i, shape in enumerate([(1, 1), (3, 5), (17, 31), (64, 130)]):
        for group in GROUPS:
            q = make_q(shape, bits, grid, group, seed=i)
            assert _equal(roundtrip(q), q), (shape, group)
    q = make_q((64, 130), bits, grid, 64)
    assert set(roundtrip(q).tensors["codes"].unique().tolist()) == set(range(1 << bits))


def test_layout():
    q = make_q((3, 21), 5, "sym", 0, a=0.55)
    parts, meta = CODEC.encode(q)
    assert meta == {"bits": 5, "group_size": 0, "grid": "sym", "exponent": 0.55}
    assert set(parts) == {"qweight", "scale", "lut"}
    assert parts["qweight"].dtype == torch.uint8 and parts["qweight"].shape == (3, 3 * 5)
    assert torch.equal(parts["qweight"], bitpack.pack(q.tensors["codes"], 5))
    assert parts["scale"].dtype == torch.float16 and parts["scale"].shape == (3, 1)
    assert parts["lut"].dtype == torch.float32 and parts["lut"].shape == (32,)
    assert parts["lut"][-1] == parts["lut"][-2] == 15.0         # sym: spare entry repeats the top level Q


def _corrupt_cases(parts, meta):
    lut, scale, qw = parts["lut"], parts["scale"], parts["qweight"]
    nan_lut, down_lut, inf_scale = lut.clone(), lut.flip(0).contiguous(), scale.clone()
    nan_lut[3] = float("nan")
    inf_scale[1, 0] = float("inf")
    pad = qw.clone()
    pad[0, -1] |= 0x80     # 3 bits, in 70 -> G = 9: the row's last byte holds the top bits of padded code 71
    bad_parts = {
        "qweight int8": {**parts, "qweight": qw.to(torch.int8)},
        "qweight short": {**parts, "qweight": qw[:, 1:]},
        "qweight rows": {**parts, "qweight": qw[1:]},
        "scale float32": {**parts, "scale": scale.float()},
        "scale bf16": {**parts, "scale": scale.bfloat16()},
        "scale groups": {**parts, "scale": scale[:, :1]},
        "scale inf": {**parts, "scale": inf_scale},
        "lut float64": {**parts, "lut": lut.double()},
        "lut float16": {**parts, "lut": lut.half()},
        "lut length": {**parts, "lut": torch.cat([lut, lut[-1:]])},
        "lut 2-D": {**parts, "lut": lut.view(1, -1)},
        "lut nan": {**parts, "lut": nan_lut},
        "lut decreasing": {**parts, "lut": down_lut},
        "padding codes": {**parts, "qweight": pad},
        "missing lut": {k: v for k, v in parts.items() if k != "lut"},
        "extra part": {**parts, "zero": scale},
        "not a tensor": {**parts, "lut": lut.tolist()},
    }
    bad_meta = {
        "grid": {**meta, "grid": "uniform"}, "grid None": {**meta, "grid": None},
        "exponent bool": {**meta, "exponent": True}, "exponent nan": {**meta, "exponent": math.nan},
        "exponent inf": {**meta, "exponent": math.inf}, "exponent 0": {**meta, "exponent": 0.0},
        "exponent str": {**meta, "exponent": "0.7"},
        "bits 9": {**meta, "bits": 9}, "bits 1": {**meta, "bits": 1}, "bits str": {**meta, "bits": "3"},
        "bits bool": {**meta, "bits": True}, "bits float": {**meta, "bits": 3.0},
        "group 48": {**meta, "group_size": 48}, "group -1": {**meta, "group_size": -1},
        "group float": {**meta, "group_size": 64.0}, "group 32": {**meta, "group_size": 32},
        "extra key": {**meta, "sym": True}, "missing key": {k: v for k, v in meta.items() if k != "exponent"},
    }
    return bad_parts, bad_meta


def test_rejects_corrupt_parts_and_meta():
    q = make_q((6, 70), 3, "half", 64)          # 3 bits, 2 groups, 2 padded codes a row
    parts, meta = CODEC.encode(q)
    assert _equal(CODEC.decode(parts, meta, q.shape, 1), q)     # the uncorrupted parts decode
    bad_parts, bad_meta = _corrupt_cases(parts, meta)
    for what, p in bad_parts.items():
        with pytest.raises(ArtifactError, match="corrupt packed tensor"):
            CODEC.decode(p, meta, q.shape, 1)
            pytest.fail(what)
    for what, m in bad_meta.items():
        with pytest.raises(ArtifactError, match="corrupt packed tensor"):
            CODEC.decode(parts, m, q.shape, 1)
            pytest.fail(what)
    for version in (0, 2, True, "1"):
        with pytest.raises(ArtifactError, match="version"):
            CODEC.decode(parts, meta, q.shape, version)


def test_lut_with_repeated_levels_and_int_exponent_decode():
    q = make_q((4, 16), 2, "sym", 0)
    parts, meta = CODEC.encode(q)
    back = CODEC.decode(parts, {**meta, "exponent": 1}, q.shape, 1)
    assert back.meta["exponent"] == 1.0 and isinstance(back.meta["exponent"], float)
    assert torch.equal(back.tensors["lut"], q.tensors["lut"])


# ---------------------------------------------------------------------------------------------- runtime

@pytest.fixture(params=["torch", "auto"])
def kernel_env(request, monkeypatch):
    """MOEQ_KERNEL as lut.py reads it: ``torch`` forces the fallback, ``auto`` the fast route where it builds
    (on CPU the C++ library, compiled once into moeq's cache on first use, or torch with one warning)."""
    monkeypatch.setenv(ENV, request.param)
    return request.param


KERNEL_CASES = [(2, 64, (48, 256)), (3, 64, (48, 256)), (4, 64, (48, 256)),
                (2, 0, (32, 128)), (3, 0, (32, 192)), (4, 0, (48, 256)), (4, 32, (40, 96))]
FALLBACK_CASES = [(5, 64, (40, 130)), (6, 64, (40, 130)), (7, 32, (24, 130)), (8, 64, (40, 130)),
                  (8, 0, (16, 256)), (4, 64, (40, 130)), (3, 32, (32, 128)), (2, 0, (16, 96))]
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}        # max|y - ref| / max|ref|


def _rel_err(y, ref):
    return float((y.double() - ref.double()).abs().max() / ref.double().abs().max())


def _check_forward(m, q, bias, dtype):
    w = reference_weight(q).double()
    for lead in ((1,), (5,), (64,), (2, 3)):
        x = torch.randn(*lead, q.shape[1], generator=torch.Generator().manual_seed(len(lead) * 7 + lead[0]))
        x = x.to(dtype)
        ref = F.linear(x.double(), w, None if bias is None else bias.to(dtype).double())
        y = m(x)
        assert y.dtype == dtype and y.shape == (*lead, q.shape[0])
        assert _rel_err(y, ref) < TOL[dtype], (lead, dtype, _rel_err(y, ref))


@pytest.mark.parametrize("bits,group,shape", KERNEL_CASES + FALLBACK_CASES,
                         ids=[f"{b}b-g{g}-{s[0]}x{s[1]}" for b, g, s in KERNEL_CASES + FALLBACK_CASES])
def test_runtime_matches_dequantized_weight(bits, group, shape, kernel_env):
    q = roundtrip(make_q(shape, bits, GRIDS[bits % 2], group, seed=bits))
    m = RUNTIMES.get("nupes")(q, None)
    assert isinstance(m, NupesLinear)
    assert (m.kernel_group is not None) == ((bits, group, shape) in KERNEL_CASES)
    ref = reference_weight(q)
    assert torch.equal(m.dequantized(), ref)
    assert torch.equal(m.dequantized(torch.bfloat16), ref.bfloat16())
    bias = torch.randn(shape[0], generator=torch.Generator().manual_seed(1)) * 0.1
    for dtype in (torch.float32, torch.bfloat16):
        _check_forward(m, q, None, dtype)
        _check_forward(NupesLinear(q, bias), q, bias, dtype)


def test_kernel_route_calls_lut_linear(monkeypatch):
    calls = []
    real = lut_mod.lut_linear
    monkeypatch.setattr(lut_mod, "lut_linear", lambda *a, **k: calls.append(a[4:]) or real(*a, **k))
    for bits, group, shape in KERNEL_CASES:
        NupesLinear(make_q(shape, bits, "half", group), None)(torch.randn(1, shape[1]))
    assert [c[0] for c in calls] == [g or s[1] for _, g, s in KERNEL_CASES]       # group_size 0 -> in_features
    calls.clear()
    for bits, group, shape in FALLBACK_CASES:
        NupesLinear(make_q(shape, bits, "half", group), None)(torch.randn(1, shape[1]))
    assert not calls


def test_runtime_float16_activations():
    for bits, group, shape in (KERNEL_CASES[2], FALLBACK_CASES[0]):
        q = make_q(shape, bits, "half", group)
        x = torch.randn(3, shape[1]).half()
        y = NupesLinear(q, None)(x)
        assert y.dtype == torch.float16
        assert _rel_err(y, F.linear(x.double(), reference_weight(q).double())) < 2e-3


def test_runtime_holds_packed_bytes_only():
    m = NupesLinear(make_q((64, 256), 3, "half", 64), None)           # kernel route
    state = m.state_dict()
    assert set(state) == {"packed", "scales", "lut"}
    assert state["packed"].dtype == torch.uint8 and state["packed"].shape == (64, 256 * 3 // 8)
    assert state["scales"].dtype == torch.float32 and state["scales"].shape == (64, 4)
    assert sum(t.numel() * t.element_size() for t in state.values()) == 64 * 96 + 64 * 4 * 4 + 8 * 4
    m = NupesLinear(make_q((40, 130), 6, "sym", 64), torch.zeros(40))  # fallback: the stored bytes as they are
    state = m.state_dict()
    assert set(state) == {"qweight", "scale", "lut", "bias"}
    assert state["qweight"].shape == (40, bitpack.packed_bytes(130, 6)) and state["scale"].dtype == torch.float16
    assert not [t for t in state.values() if t.is_floating_point() and t.numel() >= 40 * 130]


@pytest.mark.parametrize("case", [KERNEL_CASES[2], FALLBACK_CASES[0]], ids=["kernel", "fallback"])
def test_state_dict_roundtrip_replaces_the_weight(case):
    bits, group, shape = case
    q1, q2 = (make_q(shape, bits, "half", group, seed=s) for s in (1, 2))
    b1, b2 = torch.zeros(shape[0]), torch.ones(shape[0])
    m, other = NupesLinear(q1, b1), NupesLinear(q2, b2)
    x = torch.randn(4, shape[1])
    y1 = m(x)
    m.load_state_dict(other.state_dict())
    torch.testing.assert_close(m(x), other(x), rtol=0, atol=0)
    assert not torch.equal(m(x), y1)
    assert torch.equal(m.dequantized(), reference_weight(q2))


@pytest.mark.parametrize("case", [KERNEL_CASES[1], FALLBACK_CASES[1]], ids=["kernel", "fallback"])
def test_dtype_moves_keep_the_code_exact(case):
    bits, group, shape = case
    q = make_q(shape, bits, "sym", group)
    bias = torch.randn(shape[0]) * 0.1
    m = NupesLinear(q, bias)
    before = {k: v.clone() for k, v in m.state_dict().items() if k != "bias"}
    m.to(torch.bfloat16)
    assert m.bias.dtype == torch.bfloat16
    for k, v in m.state_dict().items():
        if k != "bias":
            assert v.dtype == before[k].dtype and torch.equal(v, before[k]), k
    _check_forward(m, q, bias.bfloat16(), torch.bfloat16)
    m.half().float()
    assert torch.equal(m.dequantized(), reference_weight(q))
    _check_forward(m, q, bias.bfloat16().half().float(), torch.float32)
    m.to("cpu", torch.float16)
    assert m.lut.dtype == torch.float32 and m.bias.dtype == torch.float16


# ---------------------------------------------------------------------------------------------- in a model

def _nearest_level_q(w: torch.Tensor, bits: int, group: int) -> QTensor:
    """A minimal NUPES-like quantizer for the test: per-group absmax scale, nearest level of a 0.7 power LUT."""
    lut = power_lut(bits, "half", 0.7)
    out_f, in_f = w.shape
    g = group or in_f
    ng = -(-in_f // g)
    wp = F.pad(w.float(), (0, ng * g - in_f)).view(out_f, ng, g)
    scale = (wp.abs().amax(-1) / lut[-1]).clamp(min=1e-6).half()
    codes = torch.bucketize((wp / scale.float()[..., None]).contiguous(), (lut[1:] + lut[:-1]) / 2)
    codes = codes.view(out_f, ng * g)[:, :in_f].to(torch.uint8).contiguous()
    return QTensor((out_f, in_f), {"codes": codes, "scale": scale, "lut": lut},
                   {"bits": bits, "group_size": group, "grid": "half", "exponent": 0.7})


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_dense_and_fused_expert_modules_in_a_model(arch):
    """Every attention / MLP / expert weight of a tiny MoE (gpt_oss: transposed fused experts with biases) runs as
    a NupesLinear (4 bits g32: kernel route where in_features allows, else the fallback); the model gives the
    logits of the same model with the dequantized weights written back into its float parameters."""
    from moeq.models.adapter import (
        find_targets,
        install_packed,
        target_bias,
        target_weight,
    )
    from tests.tiny_models import V, build

    model = build(arch)
    ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(3))
    modules, routes = {}, set()
    with torch.no_grad():
        for t in find_targets(model):
            if t.role not in ("attention", "dense_mlp", "expert", "shared_expert"):
                continue
            w = target_weight(model, t)
            q = roundtrip(_nearest_level_q(w, 4, 32))
            w.copy_(reference_weight(q))                     # a view: writes into the fused parameter
            m = runtime_module("nupes", q, target_bias(model, t), {}, "nupes")
            modules[t] = m
            routes.add(m.kernel_group is not None)
        ref = model(input_ids=ids).logits
        install_packed(model, modules)
        got = model(input_ids=ids).logits
    assert routes == ({True, False} if arch == "gpt_oss" else {True})
    assert any(t.expert is not None for t in modules)
    assert not [n for n, p in model.named_parameters() if p.ndim == 3]
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
