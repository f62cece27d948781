"""Inherited conformance suites: each codec / quantizer gets a subclass that sets a factory; a meta-test checks
that every registered name has one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from moeq.quant.base import QTensor
from moeq.registry import CODECS, load_builtins
from moeq.runtime.build import runtime_module

GOLDEN = Path(__file__).parent / "golden"


def _equal(a: QTensor, b: QTensor) -> bool:
    return (a.shape == b.shape and a.meta == b.meta and set(a.tensors) == set(b.tensors)
            and all(a.tensors[k].dtype == b.tensors[k].dtype and torch.equal(a.tensors[k], b.tensors[k])
                    for k in a.tensors))


class CodecConformance:
    """Subclasses set ``codec`` (instance) and ``make(shape, seed) -> QTensor`` covering every code value."""

    codec = None
    shapes = [(1, 1), (3, 5), (17, 31), (64, 130)]

    def make(self, shape, seed) -> QTensor:
        raise NotImplementedError

    def roundtrip(self, q):
        parts, meta = self.codec.encode(q)
        return self.codec.decode(parts, json.loads(json.dumps(meta)), q.shape, self.codec.version)

    def test_exact_roundtrip_odd_shapes(self):
        for i, shape in enumerate(self.shapes):
            q = self.make(shape, i)
            assert _equal(self.roundtrip(q), q), shape

    def test_file_roundtrip(self, tmp_path):
        q = self.make((33, 70), 7)
        parts, meta = self.codec.encode(q)
        save_file(parts, str(tmp_path / "t.safetensors"))
        back = self.codec.decode(load_file(str(tmp_path / "t.safetensors")), meta, q.shape, self.codec.version)
        assert _equal(back, q)

    def test_golden_file(self):
        """The committed file of this codec version decodes to exactly what ``make`` builds today."""
        path = GOLDEN / f"{self.codec.name}-v{self.codec.version}.safetensors"
        meta = json.loads(path.with_suffix(".json").read_text())
        back = self.codec.decode(load_file(str(path)), meta["meta"], tuple(meta["shape"]), meta["version"])
        assert _equal(back, self.make(tuple(meta["shape"]), meta["seed"]))

    def test_rejects_inconsistent_parts(self):
        import pytest

        from moeq.errors import ArtifactError
        q = self.make((8, 12), 3)
        parts, meta = self.codec.encode(q)
        with pytest.raises(ArtifactError):
            self.codec.decode(parts, meta, (8, 13), self.codec.version)

    @classmethod
    def write_golden(cls, shape=(9, 40), seed=1234):
        self = cls()
        q = self.make(shape, seed)
        parts, meta = self.codec.encode(q)
        GOLDEN.mkdir(exist_ok=True)
        path = GOLDEN / f"{self.codec.name}-v{self.codec.version}.safetensors"
        save_file(parts, str(path))
        path.with_suffix(".json").write_text(json.dumps({"shape": list(shape), "seed": seed, "meta": meta,
                                                         "version": self.codec.version}, indent=1) + "\n")


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - approx).pow(2).sum().clamp(min=1e-30))).item()


class QuantizerConformance:
    """Subclasses set ``quantizer``, ``configs`` [(label, cfg, min_sqnr_db)] and optionally ``stats_for``."""

    quantizer = None
    configs: list = []

    def weight(self, shape=(96, 160), seed=0):
        g = torch.Generator().manual_seed(seed)
        return torch.randn(shape, generator=g) * 0.02

    def stats_for(self, cfg, x):
        return None

    def test_sqnr_floor(self):
        w = self.weight()
        x = torch.randn(64, w.shape[1], generator=torch.Generator().manual_seed(1))
        for label, cfg, floor in self.configs:
            q = self.quantizer.quantize(w, cfg, self.stats_for(cfg, x))
            tables = {t.name: t for t in self.quantizer.code_tables([q], cfg, "w")}
            assert sqnr_db(w, self.quantizer.dequantize(q, tables)) >= floor, label
            y = self.packed_module(q, cfg, tables)(x)       # stored and loaded as the pipeline does
            assert sqnr_db(x @ w.t(), y) >= floor - 3, label

    def packed_module(self, q, cfg, tables):
        """The runtime module of ``q`` after a trip through its codec (``codec_for(cfg)``), as loading builds it."""
        load_builtins()
        codec = CODECS.get(self.quantizer.codec_for(cfg))()
        shared = {n: tables[n] for n in q.shared}
        parts, meta = codec.encode(q, shared)
        back = codec.decode(parts, meta, q.shape, codec.version, shared)
        return runtime_module(codec.name, back, None, shared, self.quantizer.name)

    def constant_row(self, cfg, row):
        """(what a constant row decodes to, relative tolerance): exactly itself, to float32 precision."""
        return row, 1e-6

    def test_zero_and_constant_rows(self):
        w = self.weight()
        w[0] = 0
        w[1] = 0.5
        for label, cfg, _ in self.configs:
            deq = self.quantizer.dequantize(self.quantizer.quantize(w, cfg, None))
            assert torch.isfinite(deq).all(), label
            assert torch.equal(deq[0], torch.zeros_like(deq[0])), label
            expect, rtol = self.constant_row(cfg, w[1])
            torch.testing.assert_close(deq[1], expect, rtol=rtol, atol=1e-6)
