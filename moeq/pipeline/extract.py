"""Extraction: a smaller artifact holding fewer widths of a nested-precision artifact (``matryoshka``), without
re-quantizing. Each entry of a nested codec (``Codec.nested``) keeps only the parts of its width
(``Codec.parts_at``: the first r bit-planes and the scales), re-encoded through its codec so the new entry is
checked and self-describing (meta bits = r, the parent's widths kept); every other entry, kept tensor and shared
table is copied as stored. The width is one for every nested entry (``extract(art, 3, out)``) or one per entry
(``extract(art, {name: 3, ...}, out)``, what ``extract_artifact(..., budget=...)`` writes after choosing a width per
expert). Written like a quantization run (``ArtifactWriter``: one group per source shard, in a hidden temporary
directory renamed into place at the end, hashes recomputed); the manifest's recipe, source and calibration are
carried over, its totals recomputed, and the allocation recorded (``allocation``, only for a budget). The other
plain files of the artifact directory (tokenizer, README) are copied; subdirectories are not.

Per-expert allocation (``moeq extract --budget``), on the manifest alone:

- a *unit* is one expert of one layer with all its nested entries (fused ``gate_up_proj.e`` and ``down_proj.e``,
  or the Linears under ``experts.e``); it takes one width from the widths all its entries can give (fitted for
  and still stored). Every other nested entry (attention, dense or shared MLP) is pinned at ``attention_bits``
  (default: its largest width) and only consumes budget.
- error of unit i at width r: sum over its entries of ``G * quant_info.out_err[r]``; out_err is the per-token
  proxy output error tr(dW H dW^T) (H = 2 X^T X / n over the routed tokens), and G = ``gate_sq``, the sum over
  those tokens of the squared gate probability g_t: the expert's output reaches the residual stream times g_t, so
  its error there is g_t dW x_t. Hot experts count more, and so do experts the router trusts (g near 1) over those
  it mixes in with a small weight. On tiny-moe at 3 bits this weighting lowered both KL and perplexity against
  weighting by routed tokens (``benchmarks/results/matryoshka_budget_tiny-moe.json``). An entry without
  ``gate_sq`` (per-expert Linear experts, whose router weights are not seen, or an artifact written before it was
  recorded) counts its ``calib_tokens`` (as if g = 1); one without either, its layer's mean; in an artifact
  without any (data-free: out_err is then the weight MSE) every entry counts once: the allocation is data-free and
  blind to hotness.
- bytes of a unit at r: its entries' r code planes (``out * ceil(in/8) * r`` each) plus their scales and offsets
  (fixed), exactly what the extracted entries hold.
- budget: average bits per weight of the experts (``3``, ``3.5bits``; scales and the pinned entries come on top,
  so ``3`` costs what every expert at 3 bits costs) or bytes (``750MB``, ``1.2GiB``) of the whole artifact's
  tensors (kept tensors and entries of other codecs, which extraction copies, are taken off first).
- solved by ``moeq.quant.allocate.solve_milp`` (exact) or ``solve_greedy``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from moeq.errors import MoeqError
from moeq.formats.container import ArtifactReader, ArtifactWriter, read_json
from moeq.formats.manifest import MANIFEST, MAX_MANIFEST_BYTES, AllocationRecord, totals
from moeq.progress import Reporter
from moeq.registry import CODECS

# entry fields the writer sets itself (from the parts) or at commit
WRITER_FIELDS = ("codec", "codec_version", "parts", "bytes", "sha256", "part_sha256", "shard")
COMMIT_FIELDS = ("format_version", "shards", "tensors", "kept", "shared", "tied", "allocation")


def extract(artifact: str | Path, bits: int | Mapping[str, int], out: str | Path, *,
            allocation: dict[str, Any] | None = None, reporter: Reporter = Reporter()) -> Path:
    """Write to ``out`` (new or empty) the artifact ``artifact`` with its nested entries at ``bits``: one width for
    every nested entry, or a mapping entry name -> width (nested entries it does not name are copied as stored).
    ``allocation`` (an ``AllocationRecord`` as a dict) is recorded in the new manifest. Returns ``out``; MoeqError
    when the artifact has no nested entry or an entry cannot give its width. Nothing is left at ``out`` (nor a
    temporary directory) when it fails."""
    src = Path(artifact)
    if Path(out).resolve() == src.resolve():
        raise MoeqError(f"{out}: extract writes a new artifact; pick another output than its source")
    reader = ArtifactReader(src)
    try:
        if isinstance(bits, Mapping):
            widths = dict(bits)
            key = hashlib.sha256(json.dumps(widths, sort_keys=True).encode()).hexdigest()[:16]
        else:
            widths = {n: bits for n in nested_entries(reader.manifest)}
            key = f"{bits} bits"
        check_widths(reader, widths)
        if allocation is not None:
            AllocationRecord.model_validate(allocation)  # what readers will check, before anything is written
        raw = read_json(src, MANIFEST, "manifest", MAX_MANIFEST_BYTES)  # the recipe as written, not as validated
        writer = ArtifactWriter(Path(out), run_key=f"extract {src.resolve()} at {key}", fresh=True)
    except BaseException:
        reader.close()
        raise
    try:
        shards = reader.manifest["shards"]
        with reporter.task(f"extract {src.name}", len(shards)) as task:
            for shard in shards:
                with writer.group(Path(shard).stem):
                    _copy_shard(reader, shard, widths, writer)
                task.advance(1)
        writer.tied = dict(raw.get("tied", {}))
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name != MANIFEST and p.name != "config.json" and p.name not in raw["shards"]:
                shutil.copyfile(p, writer.tmp / p.name)
        body = {k: v for k, v in raw.items() if k not in COMMIT_FIELDS}  # an old allocation no longer holds
        if allocation is not None:
            body["allocation"] = allocation
        body["totals"] = totals(writer.entries, writer.kept, writer.shared)
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
        return writer.commit([Path(s).stem for s in shards], body, config)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()


def check_widths(reader: ArtifactReader, widths: Mapping[str, int]) -> None:
    """MoeqError unless every name is a nested entry of the artifact that can give its width."""
    nested = nested_entries(reader.manifest)
    if not nested:
        raise MoeqError(f"{reader.path}: no entry stores nested precisions (method matryoshka); nothing to extract")
    for name, r in widths.items():
        where = f"{reader.path / MANIFEST}: tensors.{name}"
        if name not in nested:
            raise MoeqError(f"{where}: " + ("not an entry of the artifact" if name not in reader.tensors
                                            else "not a nested-precision entry; it can only be copied as stored"))
        e = nested[name]
        try:
            CODECS.get(e["codec"])().parts_at(e["parts"], e.get("meta", {}), r)
        except MoeqError as err:
            raise type(err)(f"{where}: {err}") from None


def _copy_shard(reader: ArtifactReader, shard: str, widths: Mapping[str, int], writer: ArtifactWriter) -> None:
    """Every entry, shared table and kept tensor of one source shard into the writer's current group."""
    for name, e in reader.tensors.items():
        if e["shard"] != shard:
            continue
        codec = CODECS.get(e["codec"])()
        info = {k: v for k, v in e.items() if k not in WRITER_FIELDS}
        if getattr(codec, "nested", False) and name in widths:
            parts = reader.read_packed(name, codec.parts_at(e["parts"], e["meta"], widths[name]))
            shared = {s: reader.read_shared(s) for s in e.get("shared", [])}
            q = codec.decode(parts, e["meta"], tuple(e["shape"]), e["codec_version"], shared)
            parts, info["meta"] = codec.encode(q, shared)
            n = e["shape"][0] * e["shape"][1]
            info["bits_per_param"] = round(8 * sum(t.numel() * t.element_size() for t in parts.values()) / n, 4)
        else:
            parts = reader.read_packed(name)
        writer.add_packed(name, e["codec"], parts, info)
    for name, e in reader.shared.items():
        if e["shard"] == shard:
            writer.add_shared(reader.read_shared(name))
    for name, e in reader.kept.items():
        if e["shard"] == shard:
            writer.add_kept(name, reader.read_kept(name))


# -- sizes of nested entries at a width ------------------------------------------------------------------------

def _bitplanes_bytes_at(e: dict, bits: int) -> int:
    """``bitplanes``: plane k is uint8 [out, ceil(in/8)]; the scales (and offsets) are the rest, whatever the width."""
    from moeq.formats.bitplanes import plane_bytes
    plane = e["shape"][0] * plane_bytes(e["shape"][1])
    return e["bytes"] - (e["meta"]["bits"] - bits) * plane


# nested codec -> bytes of an entry's parts read at a width (0: its width-independent parts alone)
BYTES_AT = {"bitplanes": _bitplanes_bytes_at}


def nested_entries(manifest: dict) -> dict[str, dict]:
    return {n: e for n, e in manifest["tensors"].items() if getattr(CODECS.get(e["codec"]), "nested", False)}


def bytes_at(e: dict, bits: int) -> int:
    """Bytes of a nested entry's parts at ``bits`` (what a load at that width reads, what extraction keeps)."""
    if e["codec"] not in BYTES_AT:
        raise MoeqError(f"codec {e['codec']}: its byte layout per width is unknown to the allocation")
    return BYTES_AT[e["codec"]](e, bits)


def packed_bytes_at(manifest: dict, bits: int | None) -> int:
    """Packed bytes an artifact's load at ``bits`` reads: nested entries' parts of that width, other entries and
    shared tables whole (None: everything)."""
    n = sum(e["bytes"] for e in manifest["shared"].values())
    for e in manifest["tensors"].values():
        nested = bits is not None and getattr(CODECS.get(e["codec"]), "nested", False)
        n += bytes_at(e, bits) if nested else e["bytes"]
    return n


def readable_widths(e: dict) -> tuple[int, ...]:
    """The widths a nested entry can be read at: fitted for, and with its planes still stored (widest first)."""
    return tuple(w for w in e["meta"]["widths"] if w <= e["meta"]["bits"])


# -- per-expert allocation -------------------------------------------------------------------------------------

def expert_of(e: dict) -> tuple[str, int] | None:
    """(experts module, expert index) of a routed-expert entry, None for any other: a fused 3-D slice carries its
    index, a per-expert Linear has it in its module name (``...experts.3.w1``, ``...experts.expert_3.wi``)."""
    if e["role"] != "expert":
        return None
    if e["expert"] is not None:
        return e["module"], e["expert"]
    parts = e["module"].split(".")
    if "experts" in parts:
        i = len(parts) - 1 - parts[::-1].index("experts")
        m = re.search(r"(\d+)$", parts[i + 1]) if i + 1 < len(parts) else None
        if m:
            return ".".join(parts[:i + 1]), int(m.group(1))
    return None


def unit_name(module: str, expert: int) -> str:
    return f"{module}[{expert}]"  # as ``moeq inspect`` names experts


@dataclass(frozen=True)
class AllocationPlan:
    """The allocation problem of an artifact: ``units`` (experts, free; then pinned entries), which entries each
    free unit holds, what the grid shows of it, and the budget."""

    problem: Any                      # moeq.quant.allocate.AllocationProblem
    members: dict[str, list[str]]     # free unit -> its entries
    about: dict[str, dict]            # free unit -> layer, module, expert, weights, tokens, weight
    pinned: dict[str, int]            # pinned entry -> width
    budget: str
    budget_kind: str                  # bits | bytes
    budget_value: float
    fixed_bytes: int                  # tensors outside the allocation (kept, other codecs, shared tables)
    metric: str
    data_free: bool

    @property
    def free(self) -> list:
        return [u for u in self.problem.units if not u.pinned]

    def common_widths(self) -> list[int]:
        """Widths every expert can take (for a uniform comparison), widest first."""
        sets = [set(u.widths) for u in self.free]
        return sorted(set.intersection(*sets), reverse=True) if sets else []


def plan_allocation(manifest: dict, budget: str, attention_bits: int | None = None,
                    where: str = MANIFEST) -> AllocationPlan:
    """The allocation problem of a (validated) manifest under ``budget`` (see the module docstring); MoeqError when
    the artifact has nothing to allocate, an entry lacks its per-width errors, or the budget is malformed or below
    the minimum (every expert at its smallest width)."""
    from moeq.formats.inspect import layer_index
    from moeq.quant.allocate import AllocationProblem, Unit, parse_budget, resolve_budget

    nested = nested_entries(manifest)
    if not nested:
        raise MoeqError(f"{where}: no entry stores nested precisions (method matryoshka); nothing to extract")
    members: dict[str, list[str]] = {}
    about: dict[str, dict] = {}
    pinned: dict[str, int] = {}
    for name, e in nested.items():
        owner = expert_of(e)
        if owner is None:
            pinned[name] = _pinned_width(name, e, attention_bits, where)
            continue
        u = unit_name(*owner)
        members.setdefault(u, []).append(name)
        about.setdefault(u, {"layer": layer_index(owner[0]), "module": owner[0], "expert": owner[1]})
    if not members:
        raise MoeqError(f"{where}: no routed-expert entry stores nested precisions; nothing to allocate per "
                        "expert (use --bits)")
    weight, data_free = _token_weights(nested, members, about)
    metrics = {str((nested[n].get("quant_info") or {}).get("metric", "unknown")) for ns in members.values() for n in ns}
    units = []
    for u, names in members.items():
        widths = set.intersection(*(set(readable_widths(nested[n])) for n in names))
        if not widths:
            raise MoeqError(f"{where}: the entries of expert {u} share no width ("
                            + "; ".join(f"{n}: {list(readable_widths(nested[n]))}" for n in names) + ")")
        widths = sorted(widths, reverse=True)
        errs = {n: _out_err(n, nested[n], widths, where) for n in names}
        units.append(Unit(
            u, tuple(widths),
            tuple(sum(bytes_at(nested[n], r) for n in names) for r in widths),
            tuple(math.fsum(weight[n] * errs[n][r] for n in names) for r in widths),
            weights=sum(math.prod(nested[n]["shape"]) for n in names),
            meta_bytes=sum(bytes_at(nested[n], 0) for n in names)))
        about[u]["weights"] = units[-1].weights
        about[u]["tokens"] = None if data_free else nested[names[0]].get("calib_tokens")
        about[u]["weight"] = None if data_free else weight[names[0]]
    units += [Unit.pinned_at(n, r, bytes_at(nested[n], r), math.prod(nested[n]["shape"])) for n, r in pinned.items()]
    fixed = (sum(e["bytes"] for n, e in manifest["tensors"].items() if n not in nested)
             + sum(e["bytes"] for e in manifest["kept"].values())
             + sum(e["bytes"] for e in manifest["shared"].values()))
    try:
        parsed = parse_budget(budget)
        nbytes = resolve_budget(parsed, units) if parsed.kind == "bits" else int(parsed.value) - fixed
        problem = AllocationProblem(tuple(units), max(nbytes, 0))
    except ValueError as e:
        raise MoeqError(f"--budget {budget}: {e}") from None
    plan = AllocationPlan(problem, members, about, pinned, budget, parsed.kind, parsed.value, fixed,
                          metrics.pop() if len(metrics) == 1 else "mixed", data_free)
    least = problem.min_bytes()
    if least > nbytes:
        smallest = sorted({min(u.widths) for u in plan.free})
        extra = fixed if parsed.kind == "bytes" else 0  # a bytes budget counts every tensor of the artifact
        raise MoeqError(f"--budget {budget} ({_human(max(nbytes + extra, 0))}) is below the minimum "
                        f"{_human(least + extra)}: every expert at its smallest width "
                        f"({'/'.join(map(str, smallest))} bits), the other nested entries at their pinned widths"
                        + (f", {_human(fixed)} of other tensors as stored" if extra else ""))
    return plan


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return str(n)


def error_weight(e: dict) -> float | None:
    """The weight of an expert entry's per-token error: the sum of its routed tokens' squared gate probabilities,
    else its routed tokens (gate not recorded), else None (no calibration)."""
    g, t = e.get("gate_sq"), e.get("calib_tokens")
    if t is None:
        return None
    return float(g) if g is not None and t else float(t)


def _token_weights(nested: dict, members: dict[str, list[str]],
                   about: dict[str, dict]) -> tuple[dict[str, float], bool]:
    """(entry -> the weight of its error (``error_weight``), data_free): an entry without one takes its layer's
    mean over the experts that have one, else 1 (no expert entry of the artifact has any: data-free)."""
    out: dict[str, float] = {}
    per_layer: dict[str, list[float]] = {}
    for u, names in members.items():
        for n in names:
            w = error_weight(nested[n])
            if w is not None:
                per_layer.setdefault(about[u]["module"], []).append(w)
    for u, names in members.items():
        seen = per_layer.get(about[u]["module"])
        mean = sum(seen) / len(seen) if seen else 1.0
        for n in names:
            w = error_weight(nested[n])
            out[n] = w if w is not None else mean
    return out, not per_layer


def _out_err(name: str, e: dict, widths, where: str) -> dict[int, float]:
    oe = (e.get("quant_info") or {}).get("out_err")
    got = {}
    for r in widths:
        v = oe.get(str(r)) if isinstance(oe, dict) else None
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise MoeqError(f"{where}: tensors.{name}: quant_info.out_err has no error for {r} bits (the "
                            "allocation needs the per-width errors matryoshka records)")
        got[r] = float(v)
    return got


def _pinned_width(name: str, e: dict, attention_bits: int | None, where: str) -> int:
    widths = readable_widths(e)
    if attention_bits is None:
        return max(widths)
    if attention_bits not in widths:
        raise MoeqError(f"--attention-bits {attention_bits}: {where}: tensors.{name} cannot give it (it can be read "
                        f"at {', '.join(map(str, widths))})")
    return attention_bits


SOLVERS = ("milp", "greedy")


def solve_plan(plan: AllocationPlan, solver: str = "milp"):
    """The allocation (``moeq.quant.allocate.Allocation``) of a plan by ``solver``: milp | greedy."""
    from moeq.quant import allocate
    solve = {"milp": allocate.solve_milp, "greedy": allocate.solve_greedy}.get(solver)
    if solve is None:
        raise MoeqError(f"unknown solver {solver!r} ({' | '.join(SOLVERS)})")
    try:
        return solve(plan.problem)
    except (ValueError, RuntimeError) as e:
        raise MoeqError(f"--budget {plan.budget}: {e}") from None


def uniform_width(plan: AllocationPlan) -> int | None:
    """The width to compare with: for a bits budget the common width nearest to it (the lower on a tie), for
    bytes the widest common width that fits; None when there is none."""
    from moeq.quant.allocate import uniform
    common = plan.common_widths()
    if not common:
        return None
    if plan.budget_kind == "bits":
        return min(common, key=lambda w: (abs(w - plan.budget_value), w))
    fits = [w for w in common if uniform(plan.problem, w).nbytes <= plan.problem.budget]
    return max(fits) if fits else None


def allocation_record(plan: AllocationPlan, alloc, solver: str) -> dict[str, Any]:
    """What the manifest keeps of an allocation (``AllocationRecord``)."""
    from moeq.quant.allocate import uniform
    units = {u.name: u for u in plan.free}
    rec_units = {}
    for name, u in units.items():
        j = u.widths.index(alloc.widths[name])
        rec_units[name] = {**plan.about[name], "bits": int(u.widths[j]), "bytes": u.nbytes[j],
                           "error": float(u.error[j]), "entries": list(plan.members[name])}
    w = uniform_width(plan)
    flat = uniform(plan.problem, w) if w is not None else None
    return {"solver": solver, "status": alloc.status, "budget": plan.budget, "budget_bytes": plan.problem.budget,
            "chosen_bytes": alloc.nbytes, "error": float(alloc.error), "metric": plan.metric,
            "data_free": plan.data_free, "pinned": dict(plan.pinned), "units": rec_units,
            "uniform": None if flat is None else {"bits": int(w), "bytes": flat.nbytes, "error": float(flat.error)}}


def extract_artifact(artifact: str | Path, out: str | Path, *, bits: int | None = None, budget: str | None = None,
                     attention_bits: int | None = None, solver: str = "milp",
                     reporter: Reporter = Reporter()) -> dict[str, Any]:
    """``moeq extract``: ``bits`` (every expert at one width) or ``budget`` (a width per expert, see the module
    docstring), the other nested entries at ``attention_bits`` (default: ``bits``, resp. their largest width);
    writes ``out`` and returns a summary: the allocation record (budget), sizes before and after, times."""
    if (bits is None) == (budget is None):
        raise MoeqError("give one of --bits R (every nested entry at R bits) and --budget B (a width per expert)")
    if solver not in SOLVERS:
        raise MoeqError(f"unknown solver {solver!r} ({' | '.join(SOLVERS)})")
    t0 = time.perf_counter()
    reader = ArtifactReader(artifact)  # validated: manifest, files, shard headers
    reader.close()
    m = reader.manifest
    where = str(Path(artifact) / MANIFEST)
    record = None
    if budget is not None:
        plan = plan_allocation(m, budget, attention_bits, where)
        alloc = solve_plan(plan, solver)
        record = allocation_record(plan, alloc, solver)
        widths = dict(plan.pinned)
        for unit in record["units"].values():
            widths.update(dict.fromkeys(unit["entries"], unit["bits"]))
    elif attention_bits is not None:
        nested = nested_entries(m)
        widths = {n: bits if expert_of(e) is not None else _pinned_width(n, e, attention_bits, where)
                  for n, e in nested.items()}
    else:
        widths = bits
    t1 = time.perf_counter()
    path = extract(artifact, widths, out, allocation=record, reporter=reporter)
    t2 = time.perf_counter()
    new = ArtifactReader(path).manifest
    res: dict[str, Any] = {"path": str(path), "source": str(artifact), "bits": bits, "budget": budget,
                           "attention_bits": attention_bits, "solver": solver if budget is not None else None,
                           "source_totals": m["totals"], "totals": new["totals"],
                           "plan_seconds": round(t1 - t0, 3), "write_seconds": round(t2 - t1, 3),
                           "seconds": round(t2 - t0, 3), "allocation": record}
    if record is not None:
        from moeq.quant.allocate import allocation_counts, average_bits
        res["fixed_bytes"] = plan.fixed_bytes
        res["average_bits"] = round(average_bits(alloc, plan.free), 4)  # code bits per expert weight
        res["width_counts"] = {str(k): v for k, v in allocation_counts(alloc, record["units"]).items()}
    return res
