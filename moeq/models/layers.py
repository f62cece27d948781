"""Decoder-layer-at-a-time execution: capture the inputs of the first decoder layer for a set of calibration
batches, then push them through one layer at a time. This is how calibrated pipelines see each layer's inputs
as produced by the already-quantized layers before it."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

DEFAULT_CAP_BYTES = int(os.environ.get("MOEQ_ACT_CAP_MB", "1024")) * 2**20


class Activations:
    """The (args, kwargs) of one decoder-layer call per calibration batch. Hidden states are held in memory
    up to ``cap_bytes`` in total; beyond that they are spilled to safetensors files in a temp directory."""

    def __init__(self, cap_bytes: int = DEFAULT_CAP_BYTES):
        self.cap = cap_bytes
        self.items: list[tuple[tuple, dict, torch.Tensor | str]] = []
        self.in_memory = 0
        self.spilled = 0
        self._dir: str | None = None

    def append(self, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest_args = args[1:] if args else None
        rest_kwargs = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        n = hidden.numel() * hidden.element_size()
        if self.in_memory + n <= self.cap:
            self.in_memory += n
            self.items.append((rest_args, rest_kwargs, hidden))
        else:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="moeq-act-")
            path = os.path.join(self._dir, f"{len(self.items)}-{os.urandom(4).hex()}.safetensors")
            save_file({"h": hidden.contiguous()}, path)
            self.spilled += n
            self.items.append((rest_args, rest_kwargs, path))

    def __iter__(self):
        for rest_args, rest_kwargs, h in self.items:
            hidden = load_file(h)["h"] if isinstance(h, str) else h
            yield ((hidden, *rest_args), rest_kwargs) if rest_args is not None else ((), {**rest_kwargs, "hidden_states": hidden})

    def nbytes(self) -> int:
        return self.in_memory + self.spilled

    def close(self) -> None:
        if self._dir:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self):
        self.close()


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
    captured = Activations()

    def hook(mod, args, kwargs):
        captured.append(args, dict(kwargs))
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
def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def run_layer(layer: nn.Module, inputs: Activations, collect: bool = True, device: str = "cpu",
              progress=None) -> Activations | None:
    """Apply ``layer`` to each captured call; with ``collect`` return the inputs of the next layer (kept on the
    CPU). ``device``: where the layer runs (the layer must be there; each batch is moved there and back).
    ``progress(done, total)`` is called after each batch."""
    out = Activations(inputs.cap) if collect else None
    total = len(inputs.items)
    for i, (args, kwargs) in enumerate(inputs):
        if progress is not None:
            progress(i, total)
        if device != "cpu":
            args, kwargs = _to(args, device), _to(kwargs, device)
        y = layer(*args, **kwargs)
        if collect:
            hidden = y[0] if isinstance(y, tuple) else y
            if device != "cpu":
                hidden, args, kwargs = hidden.cpu(), _to(args, "cpu"), _to(kwargs, "cpu")
            out.append((hidden, *args[1:]) if args else (), kwargs if args else {**kwargs, "hidden_states": hidden})
    return out


def layer_of(target_module: str, prefix: str) -> int | None:
    """Index of the decoder layer that owns ``target_module`` (fqn), or None if outside the layers."""
    if not target_module.startswith(prefix + "."):
        return None
    head = target_module[len(prefix) + 1:].split(".", 1)[0]
    return int(head) if head.isdigit() else None
