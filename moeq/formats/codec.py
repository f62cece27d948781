"""The codec interface: a lossless mapping between a ``QTensor`` and named storage tensors + scalar metadata.

Every codec has a ``name`` and an integer ``version``; an artifact records both per tensor and a loader refuses
names that are not registered and versions the codec does not read. ``shared``: the shared tables the entry
references (``QTensor.shared``, by name), for codecs whose code lives partly in them (``uses_shared``: a
dictionary stored once per layer); the others ignore it."""

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
