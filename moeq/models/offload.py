"""Running models larger than memory: accelerate's disk offload, filled one decoder layer at a time.

Everything outside the decoder layers (embeddings, norms, head) and the first layers that fit a memory budget stay
in RAM; each other layer is loaded (decoded, for packed artifacts; read from the shards, for float checkpoints),
written to an offload folder the way accelerate's ``OffloadedWeightsLoader`` reads it, and put back on the meta
device before the next one is loaded. ``accelerate.dispatch_model`` then hooks the offloaded layers so that each
forward reads its layer from disk and drops it afterwards. Peak memory: the resident part plus one layer.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from pathlib import Path
from typing import Iterable

import torch

from moeq.errors import MoeqError
from moeq.models.layers import decoder_layers, layer_of


class Offload:
    """Placement of the decoder layers ("cpu" | "disk") and the offload folder being filled."""

    def __init__(self, model, sizes: Iterable[tuple[str, int]], max_memory: int, offload_dir=None):
        """``sizes``: (owning module fqn, in-memory bytes) of every tensor the model will hold."""
        layers = decoder_layers(model)
        if layers is None:
            raise MoeqError("--max-memory offload needs a decoder-only model (this one has no decoder-layer list)")
        prefix, mlist = layers
        per_layer, outside = [0] * len(mlist), 0
        for module, nbytes in sizes:
            i = layer_of(module, prefix)
            if i is None:
                outside += nbytes
            else:
                per_layer[i] += nbytes
        if outside > max_memory:
            raise MoeqError(f"embeddings, norms and head alone need {outside / 2**20:.0f} MiB, more than "
                            f"--max-memory {max_memory / 2**20:.0f} MiB")
        self.model, self.prefix, self.max_memory, self.place, self.index = model, prefix, max_memory, {}, {}
        used, full = outside, False
        for i, n in enumerate(per_layer):  # in order, like accelerate's "sequential" placement
            full = full or used + n > max_memory
            self.place[f"{prefix}.{i}"] = "disk" if full else "cpu"
            used += 0 if full else n
        self.disk = {p for p, d in self.place.items() if d == "disk"}
        self.dir = None
        if self.disk:
            self.dir, temp = offload_folder(offload_dir)
            if temp:
                remove_with(model, self.dir)
        if self.disk:  # layers come and go for every forward: give their memory back to the OS each time
            from moeq.heap import bound_heap
            bound_heap()

    def owner(self, module: str) -> str | None:
        """The decoder layer (``model.layers.3``) that owns ``module``, if any."""
        i = layer_of(module, self.prefix)
        return None if i is None else f"{self.prefix}.{i}"

    def offload_if_disk(self, modules: Iterable[str]) -> None:
        """Offload the disk-placed layers owning any of ``modules`` (just loaded) to the folder."""
        for prefix in self.disk & {self.owner(m) for m in modules}:
            self._offload_layer(prefix)

    def _offload_layer(self, prefix: str) -> None:
        from accelerate.utils import offload_weight, set_module_tensor_to_device

        from moeq.heap import trim_heap
        layer = self.model.get_submodule(prefix)
        for name, t in layer.state_dict(keep_vars=True).items():
            if t is None or t.device.type == "meta":
                continue
            offload_weight(t.detach(), f"{prefix}.{name}", str(self.dir), index=self.index)
            set_module_tensor_to_device(layer, name, "meta")
        trim_heap()

    def dispatch(self) -> None:
        """Hook the offloaded layers (accelerate) and record the placement on the model."""
        if self.disk:
            from accelerate import dispatch_model
            from accelerate.utils import save_offload_index
            save_offload_index(self.index, str(self.dir))
            dm = dict(self.place)
            for name in self.model.state_dict():
                if self.owner(name) is None:
                    dm[name.rpartition(".")[0]] = "cpu"
            dispatch_model(self.model, dm, main_device="cpu", offload_dir=str(self.dir), offload_buffers=True)
        self.model.moeq_placement = {"max_memory": self.max_memory, "disk_layers": len(self.disk),
                                     "cpu_layers": len(self.place) - len(self.disk),
                                     "offload_dir": str(self.dir) if self.dir else None}


def offload_folder(offload_dir=None) -> tuple[Path, bool]:
    """A new or empty folder for offloaded weights: ``offload_dir``, else a fresh temp dir (then True: the caller
    removes it with the model, ``remove_with``)."""
    if offload_dir is None:
        return Path(tempfile.mkdtemp(prefix="moeq-offload-")), True
    d = Path(offload_dir)
    if d.exists() and any(d.iterdir()):
        raise MoeqError(f"offload dir {d} is not empty; give a new or empty directory")
    d.mkdir(parents=True, exist_ok=True)
    return d, False


def remove_with(model, folder: Path) -> None:
    weakref.finalize(model, shutil.rmtree, str(folder), True)


def load_float_offloaded(path: Path, config, max_memory: int, dtype=torch.float32, offload_dir=None):
    """A float safetensors checkpoint placed under ``max_memory``: built on the meta device, read group by group
    through the streaming reader (published per-expert layouts fused as transformers does), offloaded as above."""
    from moeq.models.stream import CheckpointReader, build_empty, materialize
    model = build_empty(config)
    reader = CheckpointReader(path, model)
    sd = model.state_dict(keep_vars=True)
    elem = torch.finfo(dtype).bits // 8
    off = Offload(model, ((n.rpartition(".")[0], t.numel() * (elem if t.is_floating_point() else t.element_size()))
                          for n, t in sd.items()), max_memory, offload_dir)
    groups: dict[str | None, list[str]] = {}
    for n in sd:
        groups.setdefault(off.owner(n), []).append(n)
    for names in groups.values():  # state-dict order: embeddings, then one decoder layer after another
        materialize(model, names, reader, dtype)
        off.offload_if_disk(n.rpartition(".")[0] for n in names)
    off.dispatch()
    model.eval()
    return model
