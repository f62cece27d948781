"""The ternary dictionary code (``moeq.formats.ternary_dict``) and the ``ternary-dict`` codec: Tunstall dictionaries
are complete prefix-free codes with the Tunstall property, rows round-trip exactly (random rows at many P(0),
adversarial rows, odd lengths, tiny and full-size dictionaries), the encoder is the greedy parse a naive reference
writes, statistics-fitted dictionaries compress skewed layers better, and every corruption of untrusted parts or of
the stored dictionary is an ``ArtifactError``."""

import json
import math
from typing import ClassVar

import pytest
import torch
from safetensors.torch import load_file, save_file

from moeq.errors import ArtifactError
from moeq.formats import ternary_dict as td
from moeq.quant.base import QTensor, SharedTable
from moeq.registry import CODECS, load_builtins
from tests.conformance import GOLDEN, CodecConformance, _equal

load_builtins()
CODEC = CODECS.get("ternary-dict")()
REF = (0.0575, 0.885, 0.0575)                            # (P(-1), P(0), P(+1)) the reference assumes
FULL = td.build_dictionary(REF)                          # 2^16 - 1 phrases
SMALL = {                                                # (probs, size, max_len) -> dictionary
    "3x1": td.build_dictionary((1, 1, 1), 1, 3),
    "9x2": td.build_dictionary((1, 1, 1), 2, 27),        # capped: all 9 phrases of length 2
    "27": td.build_dictionary((0.05, 0.9, 0.05), 6, 27),
    "255": td.build_dictionary((0.3, 0.4, 0.3), 12, 255),
    "4096x8": td.build_dictionary(REF, 8, 4096),
}
GOLDEN_DICT = ("model.layers.0.ternary_dict", (0.1, 0.8, 0.1), 10, 255)    # name, probs, max_len, size


def ternary(shape, p0, seed=0, p_plus=None) -> torch.Tensor:
    """Random int8 codes: 0 with probability p0, +1 with p_plus (default (1 - p0) / 2), else -1."""
    pp = (1 - p0) / 2 if p_plus is None else p_plus
    u = torch.rand(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return torch.where(u < p0, 0, torch.where(u < p0 + pp, 1, -1)).to(torch.int8)


def adversarial(n: int) -> dict[str, torch.Tensor]:
    i = torch.arange(n)
    rows = {
        "zeros": torch.zeros(n), "plus": torch.ones(n), "minus": -torch.ones(n),
        "alternating": 1 - 2 * (i % 2), "alternating0": torch.tensor([0, 1, 0, -1]).repeat(n)[:n],
        "no zeros": 1 - 2 * ternary((n,), 0.0, n).clamp(min=0),
        "one at the end": (i == n - 1).long(), "one at the start": -(i == 0).long(),
        "zero run then signs": torch.where(i < n // 2, 0, 1 - 2 * (i % 2)),
    }
    return {k: v.to(torch.int8) for k, v in rows.items()}


def naive_encode(rows: torch.Tensor, d: td.Dictionary) -> tuple[list[int], list[int]]:
    """Greedy longest match through the phrase set, the last phrase completed with zeros (written out naively)."""
    phrases = {tuple(p[:n].tolist()): c for c, (p, n) in enumerate(zip(d.phrases(), d.lengths.tolist()))}
    codewords, offsets = [], [0]
    for row in rows.tolist():
        j = 0
        while j < len(row):
            for n in range(1, d.max_len + 1):
                key = tuple(row[j:j + n]) + (0,) * max(0, j + n - len(row))
                if key in phrases:
                    codewords.append(phrases[key])
                    j += n
                    break
            else:
                raise AssertionError("no phrase matches: not a complete code")
        offsets.append(len(codewords))
    return codewords, offsets


def naive_decode(codewords, offsets, d: td.Dictionary, n: int) -> torch.Tensor:
    ph, ln = d.phrases().tolist(), d.lengths.tolist()
    out = []
    for r in range(len(offsets) - 1):
        row = [s for c in codewords[offsets[r]:offsets[r + 1]] for s in ph[c][:ln[c]]]
        out.append(row[:n])
    return torch.tensor(out, dtype=torch.int8)


def check_roundtrip(s: torch.Tensor, d: td.Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    cw, off = td.encode_rows(s, d)
    assert cw.dtype == torch.uint16 and off.dtype == torch.int32 and off.shape == (s.shape[0] + 1,)
    back = td.decode_rows(cw, off, d, s.shape[1])
    assert back.dtype == torch.int8 and torch.equal(back, s)
    return cw, off


# ---------------------------------------------------------------------------------------------- dictionary

def _leaf_probs(d: td.Dictionary, probs) -> torch.Tensor:
    pm, p0, pp = probs
    ph, n = d.phrases().double(), d.lengths
    mask = torch.arange(d.max_len) < n[:, None]
    k0 = ((ph == 0) & mask).sum(1).double()
    return p0 ** k0 * pp ** (ph == 1).sum(1).double() * pm ** (ph == -1).sum(1).double()


@pytest.mark.parametrize("key", list(SMALL) + ["full"])
def test_dictionary_is_a_complete_prefix_free_code(key):
    d = FULL if key == "full" else SMALL[key]
    lengths = d.lengths.tolist()
    assert min(lengths) >= 1 and max(lengths) == d.max_len
    assert sum(3 ** (d.max_len - n) for n in lengths) == 3 ** d.max_len       # Kraft equality: complete
    phrases = [tuple(p[:n]) for p, n in zip(d.phrases().tolist(), lengths)]
    assert len(set(phrases)) == len(phrases)
    if d.size <= 4096:                                                        # prefix-free
        prefixes = {p[:k] for p in phrases for k in range(1, len(p))}
        assert not prefixes & set(phrases)
    assert set(d.phrases().unique().tolist()) <= {-1, 0, 1}


def test_dictionary_sizes_and_tunstall_property():
    assert FULL.size == 2**16 - 1 and FULL.nbytes == -(-(1 + 3 * 32767) // 8) == 12288
    assert SMALL["3x1"].size == 3 and SMALL["9x2"].size == 9                  # capped at max_len
    assert SMALL["27"].size == 27 and SMALL["255"].size == 255 and SMALL["4096x8"].size == 4095
    # Tunstall: every leaf still below max_len is at most as probable as the least probable expanded node, and
    # the expected phrase length is what the tree's leaf probabilities give (~24.4 symbols at P(0) = 0.885)
    p = _leaf_probs(FULL, REF)
    assert abs(float(p.sum()) - 1) < 1e-9
    el = float((p * FULL.lengths).sum())
    assert 24.3 < el < 24.5, el
    d = SMALL["255"]
    pl = _leaf_probs(d, (0.3, 0.4, 0.3))
    phrases = [tuple(x[:n]) for x, n in zip(d.phrases().tolist(), d.lengths.tolist())]
    internal = {x[:k] for x in phrases for k in range(len(x))}
    w = {-1: 0.3, 0: 0.4, 1: 0.3}
    p_int = min(math.prod(w[s] for s in x) for x in internal)
    assert float(pl[d.lengths < d.max_len].max()) <= p_int + 1e-15


def test_build_is_deterministic_and_table_roundtrips():
    d = td.build_dictionary(REF)
    assert torch.equal(d.tree, FULL.tree) and d.max_len == FULL.max_len == 79
    t = FULL.to_table("x.ternary_dict")
    assert t.meta == {"version": 1, "max_len": 79} and set(t.tensors) == {"tree"}
    back = td.Dictionary.from_table(SharedTable("y", {"tree": t.tensors["tree"].clone()}, dict(t.meta)))
    for k in ("lengths", "nz_pos", "nz_val", "last_nz", "child", "zero_leaf"):
        assert torch.equal(getattr(back, k), getattr(FULL, k)), k
    # from sample symbols: counted with add-one smoothing, the same code as the probabilities it implies
    s = ternary((64, 100), 0.9, 1)
    c = torch.bincount(s.view(-1).long() + 1, minlength=3).double() + 1
    assert torch.equal(td.build_dictionary(s, 20, 1001).tree, td.build_dictionary(tuple(c.tolist()), 20, 1001).tree)


@pytest.mark.parametrize("bad", [{"stats": (0.0, 0.5, 0.5)}, {"stats": (math.nan, 1, 1)}, {"max_len": 0},
                                 {"max_len": 256}, {"size": 2}, {"size": 2**16 + 1},
                                 {"stats": torch.tensor([2], dtype=torch.int8)}])
def test_build_rejects_bad_arguments(bad):
    with pytest.raises(ValueError):
        td.build_dictionary(**{"stats": REF, **bad})


# ---------------------------------------------------------------------------------------------- rows

@pytest.mark.parametrize("key", list(SMALL) + ["full"])
def test_roundtrip_random_rows(key):
    d = FULL if key == "full" else SMALL[key]
    for i, (p0, shape) in enumerate([(0.0, (5, 64)), (0.3, (7, 31)), (0.885, (33, 130)), (0.95, (9, 1000)),
                                     (0.99, (4, 777)), (1.0, (3, 129)), (0.885, (1, 1)), (0.5, (20, 7))]):
        check_roundtrip(ternary(shape, p0, i), d)
    check_roundtrip(ternary((6, 300), 0.8, 9, p_plus=0.19), d)               # lopsided signs


@pytest.mark.parametrize("n", [1, 2, 7, 31, 130, 1000])
@pytest.mark.parametrize("key", ["3x1", "9x2", "255", "full"])
def test_adversarial_rows(n, key):
    d = FULL if key == "full" else SMALL[key]
    rows = adversarial(n)
    s = torch.stack(list(rows.values()))
    cw, off = check_roundtrip(s, d)
    for k, row in rows.items():                                              # each row alone: the same codewords
        c1, o1 = td.encode_rows(row[None], d)
        r = list(rows).index(k)
        assert torch.equal(c1, cw[off[r]:off[r + 1]]) and o1.tolist() == [0, off[r + 1] - off[r]], k


@pytest.mark.parametrize("key", ["9x2", "27", "255", "4096x8", "full"])
def test_encoder_is_the_greedy_parse(key):
    d = FULL if key == "full" else SMALL[key]
    s = torch.cat([ternary((6, 61), 0.885, 3), ternary((4, 61), 0.4, 4), torch.stack(list(adversarial(61).values()))])
    cw, off = td.encode_rows(s, d)
    ref_cw, ref_off = naive_encode(s, d)
    assert cw.to(torch.int32).tolist() == ref_cw and off.tolist() == ref_off
    assert torch.equal(naive_decode(ref_cw, ref_off, d, 61), s)


def test_encode_rejects_bad_symbols():
    for bad in (torch.tensor([[2]], dtype=torch.int8), torch.zeros(2, 3), torch.zeros(3, dtype=torch.int8),
                torch.zeros(2, 0, dtype=torch.int8)):
        with pytest.raises(ValueError):
            td.encode_rows(bad, FULL)


def test_skewed_dictionary_compresses_better():
    """A layer far sparser than the reference's assumption: its own statistics give a longer-phrase code."""
    s = ternary((64, 2048), 0.97, 5)
    own = td.build_dictionary(s)
    cw_ref, off = td.encode_rows(s, FULL)
    cw_own, off_own = check_roundtrip(s, own)
    r_ref, r_own = td.rate_report(s, cw_ref, off), td.rate_report(s, cw_own, off_own)
    assert r_own["codewords"] < 0.82 * r_ref["codewords"] and r_own["total"] < 0.85 * r_ref["total"], (r_own, r_ref)
    assert r_own["entropy"] / r_own["codewords"] > 0.88 and r_own["total"] > r_own["entropy"]
    # and on the reference distribution the reference dictionary is within 1% of one fitted to the sample
    s = ternary((64, 2048), 0.885, 6)
    a = td.rate_report(s, *td.encode_rows(s, FULL))["codewords"]
    b = td.rate_report(s, *td.encode_rows(s, td.build_dictionary(s)))["codewords"]
    assert abs(a - b) / b < 0.01


def test_rate_report_counts_every_byte():
    assert abs(td.entropy_bits((0.0575, 0.885, 0.0575)) - 0.6298) < 1e-4
    s = ternary((128, 1024), 0.885, 7)
    cw, off = td.encode_rows(s, FULL)
    r = td.rate_report(s, cw, off)
    w = 128 * 1024
    assert r["codewords"] == 16 * cw.numel() / w
    assert r["total"] == (16 * cw.numel() + 32 * 129 + 32 * 128) / w
    assert r["entropy"] < r["codewords"] < r["offsets"] < r["total"] < 0.75
    assert r["efficiency"] == r["entropy"] / r["total"]


def test_ternary_weight():
    s = torch.tensor([[1, 0, -1], [-1, -1, 1]], dtype=torch.int8)
    w = td.ternary_weight(s, torch.tensor([-0.5, -2.0]).half(), torch.tensor([0.25, 0.0]).half())
    assert torch.equal(w, torch.tensor([[0.25, 0.0, -0.5], [-2.0, -2.0, 0.0]]))


# ---------------------------------------------------------------------------------------------- codec

def golden_dictionary() -> tuple[str, td.Dictionary]:
    name, probs, max_len, size = GOLDEN_DICT
    return name, td.build_dictionary(probs, max_len, size)


def expanded(q: QTensor, d: td.Dictionary) -> QTensor:
    """The symbols form of a decoded (compressed) QTensor: what the quantizer wrote, if the code round-trips."""
    t = q.tensors
    return QTensor(q.shape, {"symbols": td.symbols_of(q, d), "lo": t["lo"], "hi": t["hi"]}, q.meta, q.shared)


def make_q(shape, seed, name) -> QTensor:
    out_f, _ = shape
    g = torch.Generator().manual_seed(seed)
    s = ternary(shape, (0.3, 0.885, 0.6)[seed % 3], seed)
    s.view(-1)[:3] = torch.tensor([-1, 0, 1], dtype=torch.int8)[:s.numel()]   # every code value where it fits
    lo = -torch.rand(out_f, generator=g).half()
    hi = torch.rand(out_f, generator=g).half()
    lo[0], hi[-1] = 0.0, 0.0                                                  # a row without -1 / +1 levels
    return QTensor(shape, {"symbols": s, "lo": lo, "hi": hi}, {}, (name,))


class TestTernaryDictCodec(CodecConformance):
    """The inherited suite with the dictionary passed as ``shared`` (the base suite calls encode / decode without
    shared tables, so the tests that call them are restated here). ``decode`` returns the compressed rows; the
    round trip compares their expansion (``symbols_of``) with what the quantizer wrote."""

    codec = CODEC
    shapes = CodecConformance.shapes + [(1, 1000), (5, 7), (2, 4097)]

    name, d = golden_dictionary()
    shared: ClassVar[dict] = {name: d.to_table(name)}

    def make(self, shape, seed):
        return make_q(shape, seed, self.name)

    def roundtrip(self, q):
        parts, meta = self.codec.encode(q, self.shared)
        back = self.codec.decode(parts, json.loads(json.dumps(meta)), q.shape, self.codec.version, self.shared)
        assert set(back.tensors) == {"codewords", "row_offsets", "lo", "hi"}
        assert all(back.tensors[k] is v for k, v in parts.items())                # as stored, not expanded
        return expanded(back, self.d)

    def test_file_roundtrip(self, tmp_path):
        q = self.make((33, 70), 7)
        parts, meta = self.codec.encode(q, self.shared)
        save_file(parts, str(tmp_path / "t.safetensors"))
        save_file(self.shared[self.name].tensors, str(tmp_path / "d.safetensors"))
        table = SharedTable(self.name, load_file(str(tmp_path / "d.safetensors")), self.shared[self.name].meta)
        back = self.codec.decode(load_file(str(tmp_path / "t.safetensors")), meta, q.shape, self.codec.version,
                                 {self.name: table})
        assert _equal(expanded(back, self.d), q) and back.shared == q.shared

    def test_golden_file(self):
        """The committed file (parts + ``dictionary.<part>``) decodes to what ``make`` builds today, and the
        stored dictionary is what ``build_dictionary`` builds today."""
        path = GOLDEN / f"{self.codec.name}-v{self.codec.version}.safetensors"
        info = json.loads(path.with_suffix(".json").read_text())
        tensors = load_file(str(path))
        parts = {k: v for k, v in tensors.items() if not k.startswith("dictionary.")}
        table = SharedTable(self.name, {k.removeprefix("dictionary."): v for k, v in tensors.items()
                                        if k.startswith("dictionary.")}, info["dictionary_meta"])
        back = self.codec.decode(parts, info["meta"], tuple(info["shape"]), info["version"], {self.name: table})
        assert _equal(expanded(back, self.d), self.make(tuple(info["shape"]), info["seed"]))
        # the stored bytes are what encode writes today (format unchanged), and re-encoding the decoded form
        # stores them again
        again, _ = self.codec.encode(self.make(tuple(info["shape"]), info["seed"]), self.shared)
        assert all(torch.equal(again[k], parts[k]) and again[k].dtype == parts[k].dtype for k in parts)
        copied, _ = self.codec.encode(back, self.shared)
        assert all(torch.equal(copied[k], parts[k]) for k in parts)
        assert torch.equal(table.tensors["tree"], self.d.tree) and table.meta == self.shared[self.name].meta

    @classmethod
    def write_golden(cls, shape=(9, 40), seed=1234):
        self = cls()
        parts, meta = self.codec.encode(self.make(shape, seed), self.shared)
        table = self.shared[self.name]
        path = GOLDEN / f"{self.codec.name}-v{self.codec.version}.safetensors"
        save_file({**parts, **{f"dictionary.{k}": v for k, v in table.tensors.items()}}, str(path))
        path.with_suffix(".json").write_text(json.dumps({"shape": list(shape), "seed": seed, "meta": meta,
                                                         "version": self.codec.version,
                                                         "dictionary_meta": table.meta}, indent=1) + "\n")

    def test_rejects_inconsistent_parts(self):
        """Shapes the parts cannot hold (a longer row may be invisible where every row's last phrase overhangs
        with zeros, as padding is in the bit-packed codecs: not asserted)."""
        q = self.make((8, 12), 3)
        parts, meta = self.codec.encode(q, self.shared)
        for shape in [(8, 11), (8, 4), (9, 12), (7, 12), (8, 300), (8, 0), (0, 12), (8, 12, 1), (8, 12.0),
                      (True, 12)]:
            with pytest.raises(ArtifactError):
                self.codec.decode(parts, meta, shape, self.codec.version, self.shared)
        assert _equal(expanded(self.codec.decode(parts, meta, (8, 12), self.codec.version, self.shared), self.d), q)

    def test_full_dictionary_and_adversarial_rows(self):
        shared = {"d": FULL.to_table("d")}
        rows = torch.stack(list(adversarial(130).values()))
        n = rows.shape[0]
        q = QTensor(rows.shape, {"symbols": rows, "lo": -torch.ones(n).half(), "hi": torch.ones(n).half()}, {},
                    ("d",))
        parts, meta = self.codec.encode(q, shared)
        assert _equal(expanded(self.codec.decode(parts, meta, q.shape, 1, shared), FULL), q)


def test_layout():
    name, d = golden_dictionary()
    shared = {name: d.to_table(name)}
    q = make_q((6, 50), 1, name)
    parts, meta = CODEC.encode(q, shared)
    assert meta == {} and set(parts) == {"codewords", "row_offsets", "lo", "hi"}
    cw, off = td.encode_rows(q.tensors["symbols"], d)
    assert parts["codewords"].dtype == torch.uint16 and torch.equal(parts["codewords"], cw)
    assert parts["row_offsets"].dtype == torch.int32 and torch.equal(parts["row_offsets"], off)
    assert torch.equal(parts["lo"], q.tensors["lo"]) and torch.equal(parts["hi"], q.tensors["hi"])
    back = CODEC.decode(parts, meta, q.shape, 1, shared)
    assert back.shared == (name,) and back.meta == {}
    assert set(back.tensors) == {"codewords", "row_offsets", "lo", "hi"}
    assert all(torch.equal(back.tensors[k], parts[k]) for k in parts)
    assert torch.equal(td.symbols_of(back, d), q.tensors["symbols"])
    assert td.symbols_of(q, d) is q.tensors["symbols"]


def test_decode_does_not_expand(monkeypatch):
    """The codec's decode validates with a gather and a cumulative sum; the rows are never expanded."""
    name, d = golden_dictionary()
    shared = {name: d.to_table(name)}
    q = make_q((40, 300), 2, name)
    parts, meta = CODEC.encode(q, shared)

    def no_expand(*a, **k):
        raise AssertionError("decode expanded the rows")
    monkeypatch.setattr(td, "decode_rows", no_expand)
    monkeypatch.setattr(torch.Tensor, "scatter_", no_expand)
    back = CODEC.decode(parts, meta, q.shape, 1, shared)
    assert back.tensors["codewords"] is parts["codewords"]


def test_encode_takes_the_decoded_form_checked():
    name, d = golden_dictionary()
    shared = {name: d.to_table(name)}
    q = make_q((6, 70), 1, name)
    parts, meta = CODEC.encode(q, shared)
    back = CODEC.decode(parts, meta, q.shape, 1, shared)
    bad = QTensor(q.shape, {**back.tensors, "row_offsets": parts["row_offsets"].clone()}, {}, (name,))
    bad.tensors["row_offsets"][1] -= 1                        # row 0 one codeword short
    with pytest.raises(ValueError, match="do not match"):
        CODEC.encode(bad, shared)
    with pytest.raises(ValueError, match="do not match"):
        CODEC.encode(QTensor((6, 30), back.tensors, {}, (name,)), shared)


def test_needs_its_dictionary():
    name, d = golden_dictionary()
    q = make_q((4, 20), 2, name)
    shared = {name: d.to_table(name)}
    parts, meta = CODEC.encode(q, shared)
    for bad in (None, {}, {name: shared[name], "other": shared[name]}, {name: d}, [shared[name]]):
        with pytest.raises(ArtifactError, match="corrupt packed tensor"):
            CODEC.decode(parts, meta, q.shape, 1, bad)
    for bad in (None, {}, {"other": shared[name]}):
        with pytest.raises(ValueError):
            CODEC.encode(q, bad)
    with pytest.raises(ValueError):
        CODEC.encode(QTensor(q.shape, {**q.tensors, "lo": q.tensors["lo"].float()}, {}, (name,)), shared)


def _corrupt_parts(parts):
    cw, off, lo, hi = parts["codewords"], parts["row_offsets"], parts["lo"], parts["hi"]

    def with_(t, i, v):
        t = t.clone()
        t[i] = v
        return t
    return {
        "codewords int16": {**parts, "codewords": cw.to(torch.int32).to(torch.int16)},
        "codewords int32": {**parts, "codewords": cw.to(torch.int32)},
        "codewords 2-D": {**parts, "codewords": cw.view(1, -1)},
        "codeword out of range": {**parts, "codewords": with_(cw.to(torch.int32), 0, 255).to(torch.uint16)},
        "codeword 65535": {**parts, "codewords": with_(cw.to(torch.int32), 1, 65535).to(torch.uint16)},
        "codewords truncated": {**parts, "codewords": cw[:-1]},
        "codewords extra": {**parts, "codewords": torch.cat([cw, cw[:1]])},
        "offsets int64": {**parts, "row_offsets": off.long()},
        "offsets float": {**parts, "row_offsets": off.float()},
        "offsets 2-D": {**parts, "row_offsets": off.view(1, -1)},
        "offsets not from 0": {**parts, "row_offsets": with_(off, 0, 1)},
        "offsets short of the end": {**parts, "row_offsets": with_(off, -1, off[-1] - 1)},
        "offsets past the end": {**parts, "row_offsets": with_(off, -1, off[-1] + 1)},
        "empty row": {**parts, "row_offsets": with_(off, 2, off[1])},
        "offsets decreasing": {**parts, "row_offsets": with_(off, 2, off[3] + 1)},
        "offsets rows": {**parts, "row_offsets": off[:-1]},
        "row too short": {**parts, "row_offsets": with_(off, 1, off[1] - 1)},
        "row too long": {**parts, "row_offsets": with_(off, 1, off[1] + 1)},
        "lo positive": {**parts, "lo": with_(lo, 1, 0.5)},
        "hi negative": {**parts, "hi": with_(hi, 1, -0.5)},
        "lo nan": {**parts, "lo": with_(lo, 2, math.nan)},
        "hi inf": {**parts, "hi": with_(hi, 2, math.inf)},
        "lo -inf": {**parts, "lo": with_(lo, 2, -math.inf)},
        "lo float32": {**parts, "lo": lo.float()},
        "hi bf16": {**parts, "hi": hi.bfloat16()},
        "lo rows": {**parts, "lo": lo[1:]},
        "hi 2-D": {**parts, "hi": hi.view(-1, 1)},
        "missing hi": {k: v for k, v in parts.items() if k != "hi"},
        "extra part": {**parts, "scale": hi},
        "not a tensor": {**parts, "lo": lo.tolist()},
        "offsets not a tensor": {**parts, "row_offsets": off.tolist()},
    }


def test_rejects_corrupt_parts_and_meta():
    name, d = golden_dictionary()
    shared = {name: d.to_table(name)}
    q = make_q((6, 70), 1, name)
    parts, meta = CODEC.encode(q, shared)
    assert _equal(expanded(CODEC.decode(parts, meta, q.shape, 1, shared), d), q)
    for what, p in _corrupt_parts(parts).items():
        with pytest.raises(ArtifactError, match="corrupt"):
            CODEC.decode(p, meta, q.shape, 1, shared)
            pytest.fail(what)
    for m in ({"max_len": 10}, None, [], {"version": 1}):
        with pytest.raises(ArtifactError, match="corrupt"):
            CODEC.decode(parts, m, q.shape, 1, shared)
    for version in (0, 2, True, "1"):
        with pytest.raises(ArtifactError, match="version"):
            CODEC.decode(parts, meta, q.shape, version, shared)


def test_rejects_nonzero_overhang():
    """The last phrase of a row may reach past n only with zeros (as the encoder completes it)."""
    d = SMALL["9x2"]                                          # the 9 phrases of length 2
    code = {tuple(p.tolist()): c for c, p in enumerate(d.phrases())}
    s = torch.tensor([[1, -1, 1]], dtype=torch.int8)
    cw, off = td.encode_rows(s, d)
    assert cw.to(torch.int32).tolist() == [code[(1, -1)], code[(1, 0)]]
    assert torch.equal(td.decode_rows(cw, off, d, 3), s)
    bad = torch.tensor([code[(1, -1)], code[(1, 1)]], dtype=torch.int32).to(torch.uint16)
    with pytest.raises(ArtifactError, match="past the row's end"):
        td.decode_rows(bad, off, d, 3)
    with pytest.raises(ArtifactError):
        td.decode_rows(cw, off, d, 5)                         # in_features larger than the row holds
    with pytest.raises(ArtifactError):
        td.decode_rows(cw, off, d, 2)                         # smaller: a whole codeword too many
    for n in (0, -1, 3.0, True):
        with pytest.raises(ArtifactError):
            td.decode_rows(cw, off, d, n)


def _bits_to_tree(bits: str) -> torch.Tensor:
    bits = bits + "0" * (-len(bits) % 8)
    return torch.tensor([int(bits[i:i + 8][::-1], 2) for i in range(0, len(bits), 8)], dtype=torch.uint8)


def test_tree_bitmap_by_hand():
    # root, then its children 0, +1, -1; the 0-child internal: its children 00, 0+, 0-
    d = td.Dictionary.from_tree(_bits_to_tree("1100000"), 2)
    assert d.size == 5 and d.lengths.tolist() == [1, 1, 2, 2, 2]
    assert d.phrases().tolist() == [[1, 0], [-1, 0], [0, 0], [0, 1], [0, -1]]
    assert d.zero_leaf.tolist() == [2, 2]                    # from the root and from "0": the phrase 00


def test_rejects_corrupt_dictionary():
    name, d = golden_dictionary()
    q = make_q((6, 70), 1, name)
    shared = {name: d.to_table(name)}
    parts, meta = CODEC.encode(q, shared)
    tree, m = d.tree, shared[name].meta
    pad = tree.clone()
    pad[-1] |= 0x80                                          # (the golden tree does not fill its last byte)
    assert (1 + 3 * int(((tree.long()[:, None] >> torch.arange(8)) & 1).sum())) % 8 != 0
    flip = tree.clone()
    flip[3] ^= 0x04
    cases = {
        "tree int8": ({"tree": tree.to(torch.int8)}, m),
        "tree 2-D": ({"tree": tree.view(1, -1)}, m),
        "tree truncated": ({"tree": tree[:-1]}, m),
        "tree longer": ({"tree": torch.cat([tree, tree[:1] * 0])}, m),
        "tree padding bit": ({"tree": pad}, m),
        "tree bit flipped": ({"tree": flip}, m),
        "root a leaf": ({"tree": torch.zeros(1, dtype=torch.uint8)}, {**m, "max_len": 1}),
        "child before its parent": ({"tree": _bits_to_tree("1000100")}, {**m, "max_len": 2}),
        "too many leaves": ({"tree": torch.full((12289,), 0xFF, dtype=torch.uint8)}, m),
        "max_len above depth": ({"tree": tree}, {**m, "max_len": d.max_len + 1}),
        "max_len below depth": ({"tree": tree}, {**m, "max_len": d.max_len - 1}),
        "max_len 256": ({"tree": tree}, {**m, "max_len": 256}),
        "max_len float": ({"tree": tree}, {**m, "max_len": float(d.max_len)}),
        "max_len bool": ({"tree": _bits_to_tree("1000")}, {**m, "max_len": True}),
        "version 2": ({"tree": tree}, {**m, "version": 2}),
        "version bool": ({"tree": tree}, {**m, "version": True}),
        "meta extra": ({"tree": tree}, {**m, "size": 255}),
        "meta missing": ({"tree": tree}, {"version": 1}),
        "parts extra": ({"tree": tree, "lengths": d.lengths}, m),
        "tree not a tensor": ({"tree": tree.tolist()}, m),
        "empty tree": ({"tree": tree[:0]}, m),
    }
    for what, (tensors, meta_d) in cases.items():
        with pytest.raises(ArtifactError, match="corrupt"):
            CODEC.decode(parts, meta, q.shape, 1, {name: SharedTable(name, tensors, meta_d)})
            pytest.fail(what)
    # a deep chain of 0-children: depth 255 is the format's limit
    def chain(depth):
        return _bits_to_tree("1" + "100" * (depth - 1) + "000")
    d = td.Dictionary.from_tree(chain(255), 255)
    assert d.size == 511 and int(d.lengths.max()) == 255 and d.zero_leaf.unique().numel() == 1
    with pytest.raises(ArtifactError, match="longer than max_len"):
        td.Dictionary.from_tree(chain(256), 255)


def test_blocks_and_deep_dictionaries(monkeypatch):
    """Row blocks (encoder) and codeword blocks (decoder) give the same code; a legal but extreme dictionary (a
    chain of +1-children 255 deep: phrases with up to 255 nonzeros) decodes in bounded blocks."""
    s = torch.cat([ternary((20, 97), 0.885, 11), torch.stack(list(adversarial(97).values()))])
    cw, off = td.encode_rows(s, FULL)
    monkeypatch.setattr(td, "ENCODE_BLOCK", 3 * 98)           # 3 rows a block
    monkeypatch.setattr(td, "DECODE_BLOCK", 16)               # 4 codewords a block
    c2, o2 = td.encode_rows(s, FULL)
    assert torch.equal(c2, cw) and torch.equal(o2, off)
    assert torch.equal(td.decode_rows(cw, off, FULL, 97), s)
    deep = td.Dictionary.from_tree(_bits_to_tree("1" + "010" * 254 + "000"), 255)
    assert deep.nz_pos.shape == (511, 255) and deep.size == 511
    s = torch.cat([torch.ones(2, 600, dtype=torch.int8), ternary((3, 600), 0.3, 12)])
    check_roundtrip(s, deep)
    cw, _ = td.encode_rows(s[:1], deep)
    assert deep.lengths[cw.long()].tolist() == [255, 255, 91]    # 600 = 255 + 255 + 90, then one 0 completes
