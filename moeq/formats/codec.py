"""The codec interface: a lossless mapping between a ``QTensor`` and named storage tensors + scalar metadata.

Every codec has a ``name`` and an integer ``version``; an artifact records both per tensor and a loader refuses
names that are not registered and versions the codec does not read. ``shared``: the shared tables the entry
references (``QTensor.shared``, by name), for codecs whose code lives partly in them (``uses_shared``: a
dictionary stored once per layer); the others ignore it.

Nested precisions: a codec whose lower precisions are a subset of its parts (``bitplanes``: the first r bit-planes)
names that subset in ``parts_at``; a loader reads only those parts and ``decode`` takes them. The others store one
precision and read every part whatever width is asked (``nested = False``)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from moeq.errors import ArtifactError
from moeq.quant.base import QTensor, SharedTable


class Codec:
    name: ClassVar[str]
    version: ClassVar[int]
    readable_versions: ClassVar[tuple[int, ...]]
    uses_shared: ClassVar[bool] = False
    nested: ClassVar[bool] = False

    def parts_at(self, part_names: list[str], meta: dict[str, Any], bits: int | None) -> list[str]:
        """The parts to read for a ``bits``-wide load of an entry stored as ``part_names`` with ``meta`` (None: the
        stored precision). Default: every part (one precision, ``bits`` ignored)."""
        return list(part_names)

    def encode(self, q: QTensor, shared: dict[str, SharedTable] | None = None
               ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        raise NotImplementedError

    def decode(self, parts: dict[str, torch.Tensor], meta: dict[str, Any], shape: tuple[int, int],
               version: int, shared: dict[str, SharedTable] | None = None) -> QTensor:
        raise NotImplementedError

    @staticmethod
    def expect(cond: bool, what: str) -> None:
        if not cond:
            raise ArtifactError(f"corrupt packed tensor: {what}")
