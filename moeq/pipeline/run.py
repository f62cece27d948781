"""The layer-by-layer run: read a group (the base, then each decoder layer, then the head), calibrate it, fit
and quantize its targets as the plan says, write its shard, and release it.

Phases of one decoder layer: ``materialize`` -> ``calibrate`` (per chunk of targets whose statistics fit the
memory cap; one forward of the layer's calibration inputs per chunk) -> ``fit`` (shared tables) -> ``quantize``
+ write -> ``advance`` (install the packed modules and push the calibration inputs through the quantized layer,
so the next layer is calibrated on what the quantized model produces) -> release.

Which inputs a layer is calibrated on follows what its statistics need (``sequential``, from each accumulator's
declaration): statistics that compensate the earlier layers' error (GPTQ's Hessians) see the quantized layers'
outputs, as above; when every statistic of the run only locates ranges and outliers (int8's absmax and hits,
which SmoothQuant also takes from the float model) they are gathered on the float model's activations, and the
one float forward per layer that feeds them also makes the next layer's inputs (no second pass through the
packed weights).

Data-free streaming reads the next decoder layer in a background thread while this one is quantized and the one
before is written (``MOEQ_PREFETCH=0`` turns it off): two layers in memory instead of one, in return the reading and
the quantizing share the cores instead of taking turns (benchmarks/scale.py).

Resume: every finished group is a checksummed record in ``.<out>.moeq-tmp`` and is skipped on the next run.
Workers: data-free runs split whole layers; calibrated runs split each layer's weights (rank 0 runs the
forwards and broadcasts the statistics, then merges the parts) so the artifact is what one process writes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import signal
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from moeq.formats.container import ArtifactWriter
from moeq.models.adapter import Target, install_packed, target_bias, target_weight
from moeq.models.calib import Collector, observing
from moeq.models.layers import capture_layer_inputs, decoder_layers, layer_of, run_layer
from moeq.parallel import Dist
from moeq.progress import peak_rss_mb
from moeq.pipeline.plan import Plan
from moeq.quant.base import CalibSpec, QTensor, Quantizer, SharedTable, Stats, calibrated
from moeq.registry import CODECS
from moeq.runtime.build import packed_modules, runtime_module


@dataclass
class Group:
    """What is processed (read, quantized, written, released) together: the base (embeddings, norms, head),
    then each decoder layer, then quantized weights outside the layers (lm_head)."""
    label: str
    prefix: str | None           # module fqn of a decoder layer; None for base / head
    index: int | None            # decoder layer index
    targets: list[Target]
    tensors: list[str]           # state-dict names owned by the group (weights and kept tensors)


def plan_groups(model, targets: list[Target]) -> tuple[list[Group], tuple[str, Any] | None]:
    layers = decoder_layers(model)
    names = list(model.state_dict(keep_vars=True))
    if layers is None:
        return [Group("model", None, None, targets, names)], None
    prefix, mlist = layers
    by_layer: dict[int, list[Target]] = {i: [] for i in range(len(mlist))}
    head = []
    for t in targets:
        i = layer_of(t.module, prefix)
        (by_layer[i] if i is not None else head).append(t)
    owned = {i: [] for i in by_layer}
    base = []
    for n in names:
        i = layer_of(n.rpartition(".")[0], prefix)
        (owned[i] if i is not None else base).append(n)
    # the head's quantized weights (lm_head on request) are read, processed and released with the head group
    head_names = [n for t in head for n in (f"{t.module}.{t.param}", f"{t.module}.{t.bias}" if t.bias else None) if n]
    groups = [Group("base", None, None, [], [n for n in base if n not in head_names])]
    groups += [Group(f"layer.{i}", f"{prefix}.{i}", i, by_layer[i], owned[i]) for i in sorted(by_layer)]
    if head:
        groups.append(Group("head", None, None, head, [n for n in base if n in head_names]))
    return groups, layers


def sequential(plan: Plan) -> bool:
    """Whether the calibrated layers see the quantized layers' outputs: when some accumulator of a calibrated
    method needs them (``Accumulator.sequential``); else the float model's activations (see the module docstring)."""
    return any(acc.sequential for a in plan.assignments if a.calibrated
               for acc in a.quantizer.calibration(a.cfg).accumulators)


def run_key(plan: Plan, source: str | None, calib_ids: torch.Tensor | None) -> str:
    """Identifies a run (model, the recipe's quantization part, targets, calibration tokens and the inputs they are
    gathered on): resuming another run is refused. What the artifact does not depend on (the recipe's ``output``,
    ``eval`` and ``expect``) is left out, so editing a limit does not discard an interrupted run."""
    recipe = plan.recipe.model_dump(exclude={"output", "eval", "expect"})
    h = hashlib.sha256(json.dumps({"recipe": recipe, "source": source,
                                   "options": [a.options() for a in plan.assignments],
                                   "targets": [(t.name, t.shape, plan[t].rule) for t in plan.targets]},
                                  sort_keys=True).encode())
    if calib_ids is not None:
        h.update(calib_ids.numpy().tobytes())
        h.update(layer_inputs(plan).encode())
    return h.hexdigest()


def layer_inputs(plan: Plan) -> str:
    """What the manifest says the calibrated layers saw."""
    return "quantized layers" if sequential(plan) else "float layers"


def chunks(targets: list[Target], plan: Plan, cap_bytes: int) -> list[list[Target]]:
    """Consecutive runs of ``targets`` whose calibration statistics fit ``cap_bytes`` together (statistics of
    inputs shared by several targets are counted for each: a safe over-estimate). A chunk is never empty."""
    out: list[list[Target]] = [[]]
    used = 0
    for t in targets:
        a = plan[t]
        size = sum(acc.nbytes(t.shape[1]) for acc in a.quantizer.calibration(a.cfg).accumulators)
        if out[-1] and used + size > cap_bytes:
            out.append([])
            used = 0
        out[-1].append(t)
        used += size
    return out


class Run:
    """One quantization run over ``plan`` (see the module docstring)."""

    def __init__(self, model, plan: Plan, calib_ids, reader, reporter, dist: Dist, writer: ArtifactWriter):
        self.model, self.plan, self.calib_ids, self.reader, self.dist = model, plan, calib_ids, reader, dist
        self.reporter, self.writer = reporter, writer
        self.calib = plan.recipe.calibration
        self.device = self.calib.device
        self.groups, self.layers = plan_groups(model, plan.targets)
        self.sequential = sequential(plan)
        self.target_params = {t.name if t.expert is None else f"{t.module}.{t.param}" for t in plan.targets}
        self.inputs = None      # calibration inputs of the current decoder layer
        self.next_inputs = None  # of the next one, from the float forward (non-sequential runs)
        self.task = None
        self.dtypes = reader.dtypes if reader is not None else {}
        self.fallbacks: list[str] = []
        self.prefetch = (reader is not None and calib_ids is None and dist.world == 1
                         and os.environ.get("MOEQ_PREFETCH", "1") != "0")
        self._ahead: dict[str, Future] = {}  # group label -> its read, under way in the prefetch thread
        self._following = {a.label: b for a, b in zip(self.groups, self.groups[1:])}
        self._pool: ThreadPoolExecutor | None = None  # the prefetch thread, while execute runs

    @property
    def calibrated(self) -> bool:
        return self.calib_ids is not None

    def execute(self) -> None:
        gc.freeze()  # what is alive now (modules, imports) is never garbage: the collection after each layer skips it
        if self.prefetch:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeq-prefetch")
        try:
            with self.reporter.task(f"quantize ({self.plan.recipe.method_label()})", len(self.plan.targets)) as task:
                self.task = task
                for g in self.groups:
                    self.process(g)
            self.writer.flush()  # the last group on disk before the ranks meet and rank 0 commits
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True, cancel_futures=True)
                self._pool = None
            gc.unfreeze()

    # -- reading and releasing -------------------------------------------------------------------------------
    def materialize(self, g: Group) -> None:
        """Read the group's tensors: float32 where calibration computes with them, else in the checkpoint's dtype
        (quantizers take each 2-D weight to float32 themselves, so the bytes written are the same)."""
        ahead = self._ahead.pop(g.label, None)
        if ahead is not None:
            ahead.result()
        else:
            self._read(g)
        nxt = self._following.get(g.label) if self._pool is not None else None
        if nxt is not None and nxt.index is not None and nxt.tensors:
            self._ahead[nxt.label] = self._pool.submit(self._read, nxt)  # the next decoder layer, meanwhile

    def _read(self, g: Group) -> None:
        from moeq.models.stream import materialize
        if self.reader is not None and g.tensors:
            computes = self.calibrated and g.label != "head"
            materialize(self.model, g.tensors, self.reader, torch.float32 if computes else None)

    def release(self, g: Group, layer) -> None:
        """Streaming: drop a processed group (a decoder layer whole, else its own parameters) and unmap its shards."""
        from moeq.models.stream import release, release_params
        if self.reader is None:
            return
        if layer is not None:
            release(layer)
        else:
            release_params(self.model, g.tensors)
        self.reader.close()

    # -- one group -------------------------------------------------------------------------------------------
    def process(self, g: Group) -> None:
        dist, writer = self.dist, self.writer
        if g.label == "base":
            self._base(g)
            return
        split_layers = dist.world > 1 and not self.calibrated and g.index is not None
        split_weights = dist.world > 1 and self.calibrated and g.index is not None
        if not (split_layers or split_weights or dist.main):
            return  # groups outside the decoder layers are rank 0's
        if split_layers and not dist.owns(g.index):
            self.task.advance(len(g.targets), layer=g.label)
            return
        self.materialize(g)
        layer = self.layers[1][g.index] if g.index is not None else None
        if g.label == "model":  # no decoder-layer list (e.g. encoder-decoder): calibrated in one float pass
            writer.tied.update(_ties(self.model, g.tensors))
        modules = None
        if writer.done(g.label):
            self.task.advance(len(g.targets), layer=g.label, status="resumed")
        elif split_weights:
            part = f"{g.label}.part{dist.rank}"
            mine = {t for j, t in enumerate(g.targets) if dist.owns(j)}
            with writer.group(part):
                if dist.main:
                    self._write_kept(g)
                self._quantize_group(g, layer, mine)
            writer.flush()  # every part on disk before rank 0 merges them
            dist.barrier()
            if dist.main:
                writer.merge_parts(g.label, [f"{g.label}.part{r}" for r in range(dist.world)])
        else:
            with writer.group(g.label):
                self._write_kept(g)
                modules = self._quantize_group(g, layer, set(g.targets))
        self._advance(g, layer, modules, fresh=not split_weights)
        self.release(g, layer)
        self.task.advance(0, layer=g.label, read=fmt_bytes(getattr(self.reader, "bytes_read", 0)),
                          written=fmt_bytes(writer.bytes_written), rss=f"{peak_rss_mb():.0f} MB")
        if dist.main:
            crash_point(writer)

    def _base(self, g: Group) -> None:
        dist, writer = self.dist, self.writer
        if dist.main or self.calibrated:
            self.materialize(g)
        if dist.main:
            if not writer.done(g.label):
                with writer.group(g.label):
                    write_kept(self.model, g.tensors, writer, self.dtypes)
            writer.tied.update(_ties(self.model, g.tensors))
            if self.calibrated and self.layers is not None:
                self.inputs = capture_layer_inputs(self.model, self.layers[1][0], list(self.calib_ids.split(8)))
        self.release(g, None)  # embeddings and head are not needed again: one layer at a time from here

    def _write_kept(self, g: Group) -> None:
        write_kept(self.model, [n for n in g.tensors if n not in self.target_params], self.writer, self.dtypes)

    def _advance(self, g: Group, layer, modules, fresh: bool) -> None:
        """Run the packed weights from here on: in memory (the caller keeps the packed model), and for sequential
        calibrated runs to produce the next layer's inputs from this quantized layer (non-sequential runs took
        them from the float forward)."""
        dist = self.dist
        feeds = layer is not None and self.calibrated and dist.main  # the next layer's calibration inputs
        last = feeds and g.index == len(self.layers[1]) - 1        # ... none after the last layer
        if feeds and not last and not self.sequential and self.next_inputs is None:
            # resumed (or no calibrated target): the same forward as an uninterrupted run's gives the same inputs
            specs = next((s for c in self._chunks(g) if (s := self._specs(c))), None)
            if specs:
                self._observe(g, layer, specs)
            else:
                self.next_inputs = self._forward(g, layer, collect=True)
        needs_packed = (self.reader is None and dist.world == 1) or (feeds and not last and self.sequential)
        if needs_packed:
            if modules is None or not fresh:
                group = self.writer.read_group(g.label)
                modules = packed_modules(group)
                group.close()
            install_packed(self.model, modules)
        if feeds:
            nxt, self.next_inputs = self.next_inputs, None
            if not last and self.sequential:
                nxt = self._forward(g, layer, collect=True)
            self.inputs.close()
            self.inputs = nxt

    def _forward(self, g: Group, layer, collect: bool, col: Collector | None = None, forced: bool = False):
        """One pass of the calibration inputs through ``layer`` (feeding ``col``); its outputs with ``collect``."""
        what = "route all" if forced else "calibrate" if col is not None else "forward"

        def progress(done: int, total: int) -> None:  # within the layer: batches of the calibration inputs
            self.task.advance(0, layer=g.label, **{what: f"{done}/{total}"})
        with observing(layer.to(self.device), col, prefix=g.prefix, forced=forced) if col is not None \
                else nullcontext():
            out = run_layer(layer, self.inputs, collect=collect, device=self.device, progress=progress)
        layer.to("cpu")
        return out

    # -- calibrate, fit, quantize ------------------------------------------------------------------------------
    def _chunks(self, g: Group) -> list[list[Target]]:
        return chunks(g.targets, self.plan, self.calib.max_stats_mb * 2**20)

    def _quantize_group(self, g: Group, layer, mine: set[Target]) -> dict[Target, torch.nn.Module]:
        modules: dict[Target, torch.nn.Module] = {}
        for chunk in self._chunks(g):
            stats = self._calibrate(g, layer, chunk)
            tables = self._fit(g, chunk, stats)
            if self.dist.main:
                for table in tables.values():
                    self.writer.add_shared(table)
            modules.update(self._quantize(g, [t for t in chunk if t in mine], stats, tables))
        return modules

    def _calibrate(self, g: Group, layer, chunk: list[Target]) -> dict[str, Stats | None]:
        """Statistics of the chunk's calibrated targets from one forward of the calibration inputs (rank 0's,
        broadcast to the others)."""
        specs = self._specs(chunk)
        if not specs:
            return {}
        return self.dist.broadcast(self._route_starved(g, layer, specs, self._observe(g, layer, specs))
                                   if self.dist.main else None)

    def _route_starved(self, g: Group, layer, specs: dict[Target, CalibSpec], stats: dict[str, Stats | None]):
        """Forced routing for the starved experts whose method asks for it (``starved="route_all"``): one more
        forward gathers their statistics over every calibration token of the layer (``Stats.routed`` keeps what
        their router sent them)."""
        starved = {t: s for t, s in specs.items() if t.role == "expert" and s.starved == "route_all"
                   and s.experts == "routed" and not calibrated(stats.get(t.name), s.min_tokens)}
        if not starved:
            return stats
        forced = self._observe(g, layer, starved, forced=True)
        for t in starved:
            s, routed = forced.get(t.name), stats.get(t.name)
            if s is not None:
                s.routed = 0 if routed is None else routed.tokens
                stats[t.name] = s
        return stats

    def _specs(self, chunk: list[Target]) -> dict[Target, CalibSpec]:
        if not self.calibrated:
            return {}
        return {t: self.plan[t].quantizer.calibration(self.plan[t].cfg) for t in chunk if self.plan[t].calibrated}

    def _observe(self, g: Group, layer, specs: dict[Target, CalibSpec], forced: bool = False
                 ) -> dict[str, Stats | None]:
        """One forward of the calibration inputs feeding ``specs``' accumulators (``forced``: forced routing,
        ``moeq.models.calib``). In non-sequential runs the first such forward of a layer also keeps its outputs:
        the next layer's calibration inputs."""
        col = Collector(specs, self.device)
        if layer is not None:
            collect = not self.sequential and self.next_inputs is None \
                and g.index < len(self.layers[1]) - 1
            out = self._forward(g, layer, collect, col, forced)
            if collect:
                self.next_inputs = out
        else:
            with observing(self.model, col, forced=forced):
                for b in self.calib_ids.split(8):
                    self.model(input_ids=b, decoder_input_ids=b if self.model.config.is_encoder_decoder else None)
        return col.finalize()

    def _fit(self, g: Group, chunk: list[Target], stats) -> dict[str, SharedTable]:
        tables: dict[str, SharedTable] = {}
        for a in self.plan.assignments:
            mine = [t for t in chunk if self.plan[t] is a]
            if not mine or type(a.quantizer).fit_layer is Quantizer.fit_layer:
                continue
            weights = {t.name: target_weight(self.model, t) for t in mine}
            for table in a.quantizer.fit_layer(weights, a.cfg, {t.name: stats.get(t.name) for t in mine},
                                               g.prefix or g.label):
                tables[table.name] = table
        return tables

    def _quantize(self, g: Group, targets: list[Target], stats, tables) -> dict[Target, torch.nn.Module]:
        """Quantize, encode and write ``targets``; the experts of one fused parameter go to the method at once."""
        modules = {}
        batches: dict[tuple, list[Target]] = {}
        for t in targets:
            batches.setdefault(batch_key(t, self.plan[t]), []).append(t)
        for batch in batches.values():
            a = self.plan[batch[0]]
            st = [stats.get(t.name) for t in batch]
            with torch.no_grad():
                if batch[0].expert is not None:
                    qs = a.quantizer.quantize_experts(self._place(expert_stack(self.model, batch)), a.cfg, st, tables)
                else:
                    qs = [a.quantizer.quantize(self._place(target_weight(self.model, t)), a.cfg, s, tables)
                          for t, s in zip(batch, st)]
            del st
            for table in a.quantizer.code_tables(qs, a.cfg, batch_name(batch)):
                tables[table.name] = table
                self.writer.add_shared(table)
            for t, q in zip(batch, qs):
                q = QTensor(q.shape, {k: v.cpu() for k, v in q.tensors.items()}, q.meta, q.shared, q.info)
                modules[t] = self._write_entry(t, q, stats.pop(t.name, None), tables)  # statistics freed as used
                self.task.advance(1, layer=g.label)
        return modules

    def _place(self, w: torch.Tensor) -> torch.Tensor:
        return w.to(self.device) if self.device != "cpu" else w

    def _write_entry(self, t: Target, q: QTensor, s: Stats | None, tables) -> torch.nn.Module:
        """Encode and write one weight; its runtime module is built from the encoded parts, as loading does."""
        a = self.plan[t]
        codec = CODECS.get(a.codec)()
        shared = {n: tables[n] for n in q.shared}
        parts, meta = codec.encode(q, shared)
        info = entry_info(t, parts, target_weight(self.model, t).dtype, self.dtypes)
        info.update(rule=a.rule, method=a.method, options=a.options(), meta=meta, shared=list(q.shared))
        if q.info:
            info["quant_info"] = q.info
        if self.calibrated and a.calibrated:
            spec = a.quantizer.calibration(a.cfg)
            info.update(calib_info(t, s, spec))
            if "fallback" in info:
                self.fallbacks.append(t.name)
        self.writer.add_packed(t.name, codec.name, parts, info)
        bias = target_bias(self.model, t)
        decoded = codec.decode(parts, meta, q.shape, codec.version, shared)
        decoded.shared = q.shared     # the tables the entry references (as the loader sets them from the manifest)
        return runtime_module(a.codec, decoded, bias, shared, a.method)


def calib_info(t: Target, s: Stats | None, spec: CalibSpec) -> dict[str, Any]:
    """What the manifest says of a calibrated weight's statistics: its routed tokens, their gate probabilities'
    sum and sum of squares and, for a starved or unreached weight, which fallback it got and why."""
    routed = 0 if s is None else int(s.tokens if s.routed is None else s.routed)
    info: dict[str, Any] = {"calib_tokens": routed}
    if t.expert is not None and s is not None and s.gate_prob is not None and s.routed is None:
        info["gate_prob"] = round(float(s.gate_prob), 4)
        if s.gate_sq is not None:
            info["gate_sq"] = round(float(s.gate_sq), 4)
    if s is not None and s.routed is not None:
        info["fallback"] = (f"route_all: {routed} routed tokens < min_tokens {spec.min_tokens}; statistics "
                            f"from all {s.tokens} calibration tokens")
    elif s is None:
        info["fallback"] = "rtn: no calibration tokens reached this weight; quantized data-free"
    elif not calibrated(s, spec.min_tokens):
        info["fallback"] = f"rtn: {routed} routed tokens < min_tokens {spec.min_tokens}; quantized data-free"
    return info


def batch_key(t: Target, a) -> tuple:
    """Targets quantized together (and sharing ``code_tables``): the experts of one fused parameter; the same
    Linear of every expert of one experts container (``experts.expert_<i>.wi`` for all i); else one weight."""
    if t.expert is not None:
        return (t.module, t.param, id(a))
    if t.role == "expert" and "experts" in t.module.split(".")[:-2]:
        parts = t.module.split(".")
        i = len(parts) - 2 - parts[:-2][::-1].index("experts")      # index of the container's name
        return (".".join(parts[:i + 1]), ".".join(parts[i + 2:]), id(a))
    return (t.name,)


def batch_name(batch: list[Target]) -> str:
    """A name unique to one quantization batch, the prefix of the tables ``Quantizer.code_tables`` fits on it:
    ``<experts>.<param>`` for the experts of a fused parameter (``.from<e>`` when a chunk starts at expert e > 0),
    else the module of the batch's first weight (``...experts.expert_0.wi`` for that Linear of every expert)."""
    t = batch[0]
    if t.expert is None:
        return t.module
    return f"{t.module}.{t.param}" + (f".from{t.expert}" if t.expert else "")


def expert_stack(model, batch: list[Target]) -> torch.Tensor:
    """[E, out, in] weights of the experts in ``batch`` (one fused parameter): a view of the parameter itself when
    the batch is all of its experts in order (no copy of a layer's experts), else the selected slices."""
    p = getattr(model.get_submodule(batch[0].module), batch[0].param)
    idx = [t.expert for t in batch]
    w = p if idx == list(range(p.shape[0])) else p[idx]
    return w.transpose(1, 2) if batch[0].transposed else w


def entry_info(t: Target, parts: dict[str, torch.Tensor], dtype, dtypes: dict) -> dict[str, Any]:
    """What the manifest says of a packed weight (bits/param from the stored parts: codes, scales, metadata)."""
    src = dtypes.get(f"{t.module}.{t.param}", dtype)
    nbytes = sum(p.numel() * p.element_size() for p in parts.values())
    return {"module": t.module, "param": t.param, "expert": t.expert, "transposed": t.transposed,
            "bias": None if t.bias is None else f"{t.module}.{t.bias}", "shape": list(t.shape),
            "dtype": str(src).removeprefix("torch."), "bits_per_param": round(8 * nbytes / (t.shape[0] * t.shape[1]), 4),
            "kind": t.kind, "role": t.role}


def write_kept(model, names: list[str], writer: ArtifactWriter, dtypes: dict | None = None) -> None:
    """Write the group's tensors that are not quantized weights, once per storage (ties are recorded apart),
    in their checkpoint dtype (``dtypes``; streamed groups are computed in float32)."""
    sd = model.state_dict(keep_vars=True)
    seen = set()
    for name in names:
        t = sd[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in seen:
            continue
        seen.add(key)
        writer.add_kept(name, t.to((dtypes or {}).get(name, t.dtype)))


def _ties(model, names: list[str]) -> dict[str, str]:
    sd = model.state_dict(keep_vars=True)
    first: dict[tuple, str] = {}
    tied = {}
    for name in names:
        t = sd[name]
        key = (t.data_ptr(), tuple(t.shape), t.dtype)
        if t.numel() and key in first:
            tied[name] = first[key]
        else:
            first.setdefault(key, name)
    return tied


def crash_point(writer: ArtifactWriter) -> None:
    """Testing aid: MOEQ_CRASH_AFTER_GROUPS=N sends this process SIGKILL once N groups are on disk (the
    resume tests use it to kill a run at an exact point; nothing is cleaned up, as with a real kill -9)."""
    n = os.environ.get("MOEQ_CRASH_AFTER_GROUPS")
    if n and len(writer.records) >= int(n):  # (reading the records waits for the group being written)
        os.kill(os.getpid(), signal.SIGKILL)


def fmt_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
