"""Runtime modules from packed entries: each entry's codec decodes it and ``RUNTIMES[codec]`` executes it, so an
artifact may mix methods freely (there is no artifact-wide method). A codec without a runtime of its own runs
as ``DequantizedLinear``: its method's ``dequantize`` once at load, then a dense matmul (correct, not lean)."""

from __future__ import annotations

import torch

from moeq.errors import ArtifactError, MoeqError
from moeq.formats.container import ArtifactReader
from moeq.formats.manifest import MANIFEST
from moeq.models.adapter import Target
from moeq.quant.base import QTensor, SharedTable
from moeq.registry import CODECS, QUANTIZERS, RUNTIMES


class DequantizedLinear(torch.nn.Module):
    """Fallback runtime: the weight decoded to float once (by its method), then ``F.linear``."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.register_buffer("weight", weight.float())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return torch.nn.functional.linear(x, self.weight.to(x.dtype), b)


def runtime_module(codec: str, q: QTensor, bias: torch.Tensor | None,
                   shared: dict[str, SharedTable] | None = None, method: str | None = None) -> torch.nn.Module:
    """The nn.Module computing ``x @ W.T + bias`` from the packed weight ``q`` of ``codec`` (written by ``method``)."""
    if codec in RUNTIMES:
        return RUNTIMES.get(codec)(q, bias, shared or {})
    return DequantizedLinear(QUANTIZERS.get(method)().dequantize(q, shared or {}), bias)


def entry_target(name: str, e: dict) -> Target:
    return Target(name, e["module"], e["param"], e["expert"], e["transposed"], None, tuple(e["shape"]), e["role"])


def packed_modules(reader: ArtifactReader, shard: str | None = None,
                   bits: int | None = None) -> dict[Target, torch.nn.Module]:
    """Runtime modules for every packed entry a reader holds, or those in ``shard`` (decoded, checksummed).
    ``bits``: the width to run entries of nested codecs at (``Codec.parts_at``: only the parts of that width are
    read); entries of other codecs ignore it. None: every entry at its stored precision."""
    modules = {}
    tables: dict[str, SharedTable] = {}
    for name, e in reader.tensors.items():
        if shard is not None and e["shard"] != shard:
            continue
        codec = CODECS.get(e["codec"])()
        try:
            nested = bits is not None and getattr(codec, "nested", False)
            wanted = codec.parts_at(e["parts"], e.get("meta", {}), bits) if nested else None
        except MoeqError as err:  # a width the entry cannot give: say which entry of which artifact
            raise type(err)(f"{reader.path / MANIFEST}: tensors.{name}: {err}") from None
        parts = reader.read_packed(name, wanted)  # checksummed
        for s in e.get("shared", []):
            if s not in tables:
                tables[s] = reader.read_shared(s)
        bias = None
        if e.get("bias") and e["bias"] in reader.kept:
            b = reader.read_kept(e["bias"])
            bias = b if e["expert"] is None else b[e["expert"]]
        try:
            q = codec.decode(parts, e.get("meta", {}), tuple(e["shape"]), e["codec_version"],
                             {s: tables[s] for s in e.get("shared", [])})
            q.shared = tuple(e.get("shared", ()))  # the tables the entry references (the manifest, not the codec)
            modules[entry_target(name, e)] = runtime_module(e["codec"], q, bias,
                                                            {s: tables[s] for s in e.get("shared", [])}, e["method"])
        except ArtifactError as err:  # a codec's own check: say which entry of which artifact
            raise ArtifactError(f"{reader.path / MANIFEST}: tensors.{name} ({e['codec']}): {err}") from None
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, ZeroDivisionError) as err:
            # the manifest's meta (not checksummed) disagrees with the parts in a way the codec did not foresee
            msg = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
            raise ArtifactError(f"{reader.path / MANIFEST}: tensors.{name}: the {e['codec']} parts and meta do "
                                f"not decode ({type(err).__name__}: {msg})") from None
    return modules
