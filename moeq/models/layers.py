"""Decoder-layer-at-a-time execution: capture the inputs of the first decoder layer for a set of calibration
batches, then push them through one layer at a time. This is how calibrated pipelines see each layer's inputs
as produced by the already-quantized layers before it."""

from __future__ import annotations

import torch
import torch.nn as nn


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(fqn, ModuleList) of the decoder layers of a decoder-only model, or None (encoder-decoder etc.)."""
    n = getattr(model.config, "num_hidden_layers", None)
    if getattr(model.config, "is_encoder_decoder", False) or n is None:
        return None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and name.split(".")[-1] in ("layers", "h", "blocks"):
            return name, mod
    return None


class _Captured(Exception):
    pass


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, first_layer: nn.Module, batches: list[torch.Tensor]):
    """Run the model up to ``first_layer`` for each batch; returns [(args, kwargs)] of that layer's call."""
    captured = []

    def hook(mod, args, kwargs):
        captured.append((args, dict(kwargs)))
        raise _Captured

    h = first_layer.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                model(input_ids=b, use_cache=False)
            except _Captured:
                pass
    finally:
        h.remove()
    return captured


@torch.no_grad()
def run_layer(layer: nn.Module, inputs):
    """Apply ``layer`` to each captured (args, kwargs) and return the same structure for the next layer."""
    out = []
    for args, kwargs in inputs:
        y = layer(*args, **kwargs)
        hidden = y[0] if isinstance(y, tuple) else y
        if args:
            out.append(((hidden, *args[1:]), kwargs))
        else:
            out.append(((), {**kwargs, "hidden_states": hidden}))
    return out


def layer_of(target_module: str, prefix: str) -> int | None:
    """Index of the decoder layer that owns ``target_module`` (fqn), or None if outside the layers."""
    if not target_module.startswith(prefix + "."):
        return None
    head = target_module[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
