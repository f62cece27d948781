"""The base of the runtime modules that compute from packed codes."""

from __future__ import annotations

import torch


class PackedLinear(torch.nn.Module):
    """A Linear whose weight lives only in packed form (codes, scales, a dictionary)."""

    @property
    def weight(self) -> torch.Tensor:
        """What model code that probes ``layer.weight`` sees: an empty int8 tensor on the module's device. T5 and
        SwitchTransformers compare ``wo.weight.dtype`` with the activations' and leave int8 weights alone (as with
        bitsandbytes); there is no dense weight to read (``dequantized()`` where a module offers one)."""
        device = next(iter(self.buffers()), torch.empty(0)).device
        return torch.empty(0, dtype=torch.int8, device=device)
