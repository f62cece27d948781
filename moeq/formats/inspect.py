"""``moeq inspect``: what an artifact holds, from its manifest alone (no tensor is read)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from moeq.formats.container import ArtifactReader
from moeq.registry import load_builtins


def inspect(path: str | Path) -> dict[str, Any]:
    """Manifest summary: the rules, per module type and method, per expert (routed tokens, fallbacks), totals, and
    the per-expert widths of an artifact written by ``moeq extract --budget`` (``allocation``, with its ``grid``)."""
    from moeq.formats.config import read_config
    load_builtins()
    reader = ArtifactReader(path)  # the manifest and the shard headers, validated
    reader.close()
    read_config(Path(path))        # and the config, on its own
    m = reader.manifest
    kinds: dict[str, dict] = {}
    experts: dict[str, dict] = {}
    for name, e in m["tensors"].items():
        n = math.prod(e["shape"])
        k = kinds.setdefault(f"{e['kind']}|{e['method']}", {"kind": e["kind"], "role": e["role"], "method": e["method"],
                                                            "tensors": 0, "params": 0, "bytes": 0, "codec": e["codec"]})
        k["tensors"] += 1
        k["params"] += n
        k["bytes"] += e["bytes"]
        if e["expert"] is not None:
            key = f"{e['module']}[{e['expert']}]"
            x = experts.setdefault(key, {"module": e["module"], "layer": layer_index(e["module"]),
                                         "expert": e["expert"], "method": e["method"],
                                         "params": 0, "bytes": 0, "codec": e["codec"], "calib_tokens": None,
                                         "gate_prob": None, "fallback": None})
            x["params"] += n
            x["bytes"] += e["bytes"]
            if e.get("calib_tokens") is not None and x["calib_tokens"] is None:
                x["calib_tokens"] = e["calib_tokens"]  # the first parameter's input: the tokens routed to it
                x["gate_prob"] = e.get("gate_prob")
            x["fallback"] = x["fallback"] or e.get("fallback")
    for d in (*kinds.values(), *experts.values()):
        d["bits_per_param"] = round(8 * d["bytes"] / max(d["params"], 1), 3)
    alloc = m.get("allocation")
    return {"path": str(path), "tool": m["tool"], "rules": m["recipe"]["rules"], "ignore": m["recipe"]["ignore"],
            "source": m["source"], "calibration": m["calibration"], "totals": m["totals"],
            "kinds": dict(sorted(kinds.items())), "experts": experts,
            "shared": {n: {"bytes": e["bytes"], "parts": e["parts"]} for n, e in m["shared"].items()},
            "kept": {n: {"dtype": e["dtype"], "bytes": e["bytes"]} for n, e in m["kept"].items()},
            "allocation": None if alloc is None else {**alloc, "grid": allocation_grid(alloc)}}


def allocation_grid(alloc: dict[str, Any]) -> list[dict[str, Any]]:
    """The widths an allocation (the manifest's ``allocation``) gave, one row per experts module (a layer), in
    layer order: ``bits[e]`` is expert e's width (None for an index it did not allocate), with the row's code
    bits per weight and bytes."""
    rows: dict[str, dict] = {}
    for u in alloc["units"].values():
        r = rows.setdefault(u["module"], {"layer": u["layer"], "module": u["module"], "widths": {}, "weights": 0,
                                          "bytes": 0, "code_bits": 0})
        r["widths"][u["expert"]] = u["bits"]
        r["weights"] += u["weights"]
        r["bytes"] += u["bytes"]
        r["code_bits"] += u["bits"] * u["weights"]
    out = []
    for r in sorted(rows.values(), key=lambda r: (r["layer"] is None, r["layer"] or 0, r["module"])):
        n = max(r["widths"]) + 1
        out.append({"layer": r["layer"], "module": r["module"], "bits": [r["widths"].get(e) for e in range(n)],
                    "average_bits": round(r["code_bits"] / max(r["weights"], 1), 4), "bytes": r["bytes"]})
    return out


def layer_index(module: str) -> int | None:
    """The decoder layer a module belongs to: the first number in its name (``model.layers.3.mlp.experts`` -> 3)."""
    for p in module.split("."):
        if p.isdigit():
            return int(p)
    return None
