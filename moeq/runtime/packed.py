"""The base of the runtime modules that compute from packed codes."""

from __future__ import annotations

from typing import ClassVar

import torch


class PackedLinear(torch.nn.Module):
    """A Linear whose weight lives only in packed form (codes, scales, a dictionary). ``exact`` names the buffers
    that ARE the code: device moves apply to them, dtype casts (``.to(bf16)``, ``.half()``) do not (a bf16 LUT
    would be another, coarser grid); every other buffer (``bias``) follows the cast."""

    exact: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn, *args, **kwargs):
        before = {k: self._buffers[k] for k in self.exact if self._buffers.get(k) is not None}
        super()._apply(fn, *args, **kwargs)
        for k, old in before.items():
            new = self._buffers[k]
            if new is not None and new.dtype != old.dtype:
                self._buffers[k] = old.to(new.device)
        return self

    @property
    def weight(self) -> torch.Tensor:
        """What model code that probes ``layer.weight`` sees: an empty int8 tensor on the module's device. T5 and
        SwitchTransformers compare ``wo.weight.dtype`` with the activations' and leave int8 weights alone (as with
        bitsandbytes); there is no dense weight to read (``dequantized()`` where a module offers one)."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        return torch.empty(0, dtype=torch.int8, device=device)
