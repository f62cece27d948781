"""A seeded fuzzer over artifacts and recipes (no hypothesis: the generator is ours, so a case is reproduced by its
seed and index alone).

One tiny artifact is built (tests.tiny_models' Mixtral: attention in int8 w8a8, experts in rtn 4-bit) and its
logits on fixed tokens recorded; each case copies it, applies one mutation and loads the copy as ``moeq eval``
would (``moeq.runtime.load.load``, then a forward) and as ``moeq inspect`` would. The outcome must be:

- ``refused``: a ``MoeqError`` (the CLI's one ``error:`` line); any other exception type fails the case;
- ``identical``: loaded, with logits equal to the pristine artifact's, bit for bit;
- ``changed``: loaded with other logits: allowed only for the mutations that make a different but consistent
  artifact (``EXPECT`` says which: config hyperparameters, int8 ``meta``, forged data with its checksum redone).

Classes: truncation, bit flips in shard data / shard headers / the manifest / the config, structured edits of
every manifest and config field (delete, every JSON type, out-of-range and path-like values, unknown keys,
values swapped between entries), missing and extra files (symlinks out of the artifact, FIFOs), shards swapped,
forged shards (consistent headers, checksums redone), and recipe edits (schema and plan, on three recipes).
"""

from __future__ import annotations

import copy
import json
import math
import os
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from moeq.errors import MoeqError

ROOT = Path(__file__).resolve().parent.parent
RECIPE = {"rules": [{"targets": ["attention"], "method": "int8", "options": {"smooth_alpha": None}},
                    {"targets": ["expert"], "method": "rtn", "options": {"bits": 4, "group_size": 32}}]}
TOKENS = torch.arange(3, 35).view(2, 16) % 128

# what a mutation class may do: "refuse" (must be refused), "same" (refused or identical), "any" (refused,
# identical, or changed: a consistent but different artifact)
EXPECT = {"truncate": "refuse", "flip-data": "refuse", "flip-header": "same", "flip-manifest": "same",
          "flip-config": "any", "edit-manifest": "same", "edit-manifest-meta": "any", "edit-config": "any",
          "missing-file": "refuse", "extra-file": "same", "escape": "refuse", "swap-shards": "refuse",
          "forge": "any", "forge-shape": "refuse", "recipe": "recipe"}


@dataclass
class Case:
    index: int
    cls: str
    what: str
    apply: Callable[[Path], None] | None = None     # mutates an artifact copy
    recipe: Any = None                              # recipe cases: the YAML text

    @property
    def expect(self) -> str:
        return EXPECT[self.cls]


# -- the base artifact --------------------------------------------------------------------------------------------
def build_base(dst: Path) -> torch.Tensor:
    """Write the tiny artifact to ``dst``; its logits on ``TOKENS`` as loaded back (the reference). Its
    manifest's ``checksums`` are removed (``unseal``): they would refuse every edit of the manifest or config up
    front, and whoever forges an artifact drops them too; the fuzzer tests the checks behind them."""
    from moeq.pipeline.quantize import quantize_model
    from moeq.recipes import Recipe
    from tests.tiny_models import build
    quantize_model(build("mixtral"), dst, Recipe(**RECIPE))
    unseal(dst)
    return logits_of(dst)


def unseal(path: Path) -> None:
    """Remove the checksums of an artifact's manifest and config.json (an artifact written before them)."""
    m = json.loads((path / "moeq.json").read_text())
    m.pop("checksums", None)
    (path / "moeq.json").write_text(json.dumps(m, indent=1, sort_keys=True) + "\n")


def logits_of(path: Path) -> torch.Tensor:
    from moeq.runtime.load import load
    model, _, reader = load(path, dtype=torch.float32)
    with torch.no_grad():
        return model(TOKENS).logits


# -- JSON paths ---------------------------------------------------------------------------------------------------
def paths(x: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path into a JSON value (dict keys and list indices), the root excluded."""
    out = []
    if isinstance(x, dict):
        for k, v in x.items():
            out.append(prefix + (k,))
            out += paths(v, prefix + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            out.append(prefix + (i,))
            out += paths(v, prefix + (i,))
    return out


def _get(x, path):
    for p in path:
        x = x[p]
    return x


WEIRD = [None, True, False, 0, -1, 1, 3, 2**31, 2**63, -2**63, 0.5, -1e308, float("nan"), float("inf"), "", "x",
         "../escape", "/etc/passwd", "sub/dir", ".hidden", "\x1b[31mred", "[bold]markup[/]", "int9-magic", [], [1, 2],
         {}, {"a": 1}, "a" * 300]


def _edit_json(rng: random.Random, data: Any, pool: list[tuple]) -> str:
    """One structured edit of ``data`` in place, at a random path of ``pool``; returns what it did."""
    path = rng.choice(pool)
    parent, key = _get(data, path[:-1]), path[-1]
    op = rng.choice(["delete", "weird", "weird", "weird", "number", "extra-key", "swap", "wrap"])
    if op == "delete":
        if isinstance(parent, dict):
            del parent[key]
        else:
            parent.pop(key)
    elif op == "number" and isinstance(parent[key], (int, float)) and not isinstance(parent[key], bool):
        v = parent[key]
        parent[key] = rng.choice([v + 1, v - 1, -v, v * 2, v * 1000, 0, int(v) if isinstance(v, float) else v + 0.5])
    elif op == "extra-key" and isinstance(parent[key], dict):
        parent[key]["unexpected_" + str(rng.randrange(100))] = rng.choice(WEIRD)
    elif op == "swap":
        other = rng.choice(pool)
        try:
            parent[key] = copy.deepcopy(_get(data, other))
        except (KeyError, IndexError, TypeError):
            parent[key] = None
        return f"{op} {_fmt(path)} <- {_fmt(other)}"
    elif op == "wrap":
        parent[key] = [parent[key]]
    else:
        op = "weird"
        parent[key] = copy.deepcopy(rng.choice(WEIRD))
        return f"{op} {_fmt(path)} = {parent[key]!r:.40}"
    return f"{op} {_fmt(path)}"


def _fmt(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def _dump(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=1))  # NaN and Infinity are written as such: readers must refuse them


# -- mutations ---------------------------------------------------------------------------------------------------
def _shards(d: Path) -> list[Path]:
    return sorted(d.glob("model-*.safetensors"))


def _header_len(p: Path) -> int:
    return struct.unpack("<Q", p.read_bytes()[:8])[0]


def _flip(p: Path, lo: int, hi: int, rng: random.Random) -> str:
    data = bytearray(p.read_bytes())
    i = rng.randrange(lo, hi)
    bit = rng.randrange(8)
    data[i] ^= 1 << bit
    p.write_bytes(bytes(data))
    return f"{p.name} byte {i} bit {bit}"


def _truncate(rng, d):
    files = _shards(d) + [d / "moeq.json", d / "config.json"]
    p = rng.choice(files)
    data = p.read_bytes()
    n = len(data.rstrip()) if p.suffix == ".json" else len(data)  # a JSON file's trailing newline is not content
    cut = rng.choice([0, 1, 7, 8, 9, rng.randrange(n), n - 1, n // 2])
    p.write_bytes(data[:cut])
    return f"{p.name} cut to {cut} of {len(data)} bytes"


def _forge(rng, d, shape_too: bool):
    """Rewrite one tensor of a shard (other values, or another shape) as a valid safetensors file, and redo the
    manifest's checksum (and bytes/shape) so that only the model's own structure can refuse it."""
    from safetensors.torch import load_file, save_file

    from moeq.formats.container import tensors_sha256
    m = json.loads((d / "moeq.json").read_text())
    section = rng.choice(["tensors", "kept"])
    name = rng.choice(sorted(m[section]))
    e = m[section][name]
    shard = d / e["shard"]
    tensors = load_file(str(shard))
    if section == "kept":
        keys = [name]
    else:
        keys = [f"{name}.{p}" for p in e["parts"]]
    k = rng.choice(keys)
    t = tensors[k]
    if shape_too:
        t = torch.cat([t.reshape(-1), t.reshape(-1)[:1]]).reshape(-1)  # one more element, flattened
    else:
        g = torch.Generator().manual_seed(rng.randrange(2**31))
        if t.is_floating_point():
            t = t + torch.randn(t.shape, generator=g).to(t.dtype) * 0.01
        else:
            t = t.clone()
            t.view(-1)[0] = t.view(-1)[0] ^ 1 if t.dtype != torch.bool else ~t.view(-1)[0]
    tensors[k] = t.contiguous()
    save_file(tensors, str(shard), metadata={"format": "pt"})
    own = {kk: tensors[kk] for kk in keys}
    if section == "kept":
        e["sha256"] = tensors_sha256({name: own[name]})
        e["shape"] = list(own[name].shape)
        e["bytes"] = own[name].numel() * own[name].element_size()
    else:
        e["sha256"] = tensors_sha256({kk.rpartition(".")[2]: v for kk, v in own.items()})
        e["bytes"] = sum(v.numel() * v.element_size() for v in own.values())
        e["bits_per_param"] = round(8 * e["bytes"] / math.prod(e["shape"]), 4)
    from moeq.formats.manifest import totals
    m["totals"] = totals(m["tensors"], m["kept"], m["shared"])
    _dump(d / "moeq.json", m)
    return f"{k} {'reshaped' if shape_too else 'values changed'}, checksum redone"


def _file_op(rng, d, cls):
    if cls == "missing-file":
        p = rng.choice(_shards(d) + [d / "moeq.json", d / "config.json"])
        p.unlink()
        return f"deleted {p.name}"
    if cls == "swap-shards":
        a, b = rng.sample(_shards(d), 2)
        tmp = d / "swap.tmp"
        a.rename(tmp)
        b.rename(a)
        tmp.rename(b)
        return f"swapped {a.name} and {b.name}"
    if cls == "escape":  # a file of the artifact replaced by a symlink out of it, or by a FIFO
        p = rng.choice(_shards(d) + [d / "moeq.json", d / "config.json"])
        outside = d.parent / f"outside-{p.name}"
        shutil.copy(p, outside)
        p.unlink()
        if rng.random() < 0.8:
            p.symlink_to(outside if rng.random() < 0.5 else Path("..") / outside.name)
            return f"{p.name} -> symlink out of the artifact"
        os.mkfifo(p)
        return f"{p.name} -> FIFO"
    # extra-file: harmless additions (loads identically) or foreign shards / symlinks inside
    kind = rng.choice(["text", "shard", "dir", "symlink-inside", "unlisted-shard"])
    if kind == "text":
        (d / "NOTES.txt").write_bytes(bytes(rng.randrange(256) for _ in range(64)))
    elif kind == "shard":
        (d / "model-00009-of-00009.safetensors").write_bytes(b"\x00" * 16)
    elif kind == "dir":
        (d / "sub").mkdir()
        (d / "sub" / "x.json").write_text("{}")
    elif kind == "symlink-inside":
        (d / "alias.json").symlink_to("config.json")
    else:
        shutil.copy(_shards(d)[0], d / "model-extra.safetensors")
    return f"added {kind}"


def _manifest_edit(rng, d, meta_only: bool):
    m = json.loads((d / "moeq.json").read_text())
    pool = paths(m)
    if meta_only:
        pool = [p for p in pool if len(p) >= 4 and p[0] == "tensors" and p[2] == "meta"]
    else:
        pool = [p for p in pool if not (len(p) >= 3 and p[0] == "tensors" and p[2] == "meta")]
    what = _edit_json(rng, m, pool)
    _dump(d / "moeq.json", m)
    return what


def _config_edit(rng, d):
    c = json.loads((d / "config.json").read_text())
    what = _edit_json(rng, c, paths(c))
    _dump(d / "config.json", c)
    return what


def _recipe_case(rng) -> str:
    """A recipe's YAML with one edit: structured (as for JSON) or of the text (cut, flipped byte)."""
    import yaml
    base = yaml.safe_load((ROOT / "recipes" / rng.choice(["tiny-moe-mixed.yaml", "tiny-moe-gptq.yaml",
                                                          "tiny-moe-int8.yaml"])).read_text())
    r = rng.random()
    if r < 0.75:
        _edit_json(rng, base, paths(base))
        return yaml.safe_dump(base, sort_keys=False)
    text = yaml.safe_dump(base, sort_keys=False)
    if r < 0.88:
        return text[:rng.randrange(len(text))]
    i = rng.randrange(len(text))
    return text[:i] + chr(ord(text[i]) ^ (1 << rng.randrange(7))) + text[i + 1:]


def generate(seed: int, n: int) -> list[Case]:
    """``n`` cases from ``seed``: the same seed always gives the same cases."""
    weights = {"edit-manifest": 30, "edit-manifest-meta": 4, "edit-config": 14, "truncate": 7, "flip-data": 7,
               "flip-header": 7, "flip-manifest": 6, "flip-config": 3, "missing-file": 3, "extra-file": 3,
               "escape": 3, "swap-shards": 1, "forge": 3, "forge-shape": 2, "recipe": 12}
    rng = random.Random(seed)
    classes = rng.choices(list(weights), list(weights.values()), k=n)
    cases = []
    for i, cls in enumerate(classes):
        sub = random.Random(f"{seed}/{i}")
        if cls == "recipe":
            cases.append(Case(i, cls, "recipe edit", recipe=_recipe_case(sub)))
        else:
            cases.append(Case(i, cls, "", apply=_mutation(cls, sub)))
    return cases


def _mutation(cls: str, rng: random.Random) -> Callable[[Path], str]:
    def apply(d: Path) -> str:
        if cls == "truncate":
            return _truncate(rng, d)
        if cls == "flip-data":
            p = rng.choice(_shards(d))
            return _flip(p, 8 + _header_len(p), p.stat().st_size, rng)
        if cls == "flip-header":
            p = rng.choice(_shards(d))
            return _flip(p, 0, 8 + _header_len(p), rng)
        if cls in ("flip-manifest", "flip-config"):
            p = d / ("moeq.json" if cls == "flip-manifest" else "config.json")
            return _flip(p, 0, p.stat().st_size, rng)
        if cls in ("edit-manifest", "edit-manifest-meta"):
            return _manifest_edit(rng, d, cls == "edit-manifest-meta")
        if cls == "edit-config":
            return _config_edit(rng, d)
        if cls in ("forge", "forge-shape"):
            return _forge(rng, d, cls == "forge-shape")
        return _file_op(rng, d, cls)
    return apply


# -- running -----------------------------------------------------------------------------------------------------
def run_case(case: Case, base: Path, work: Path, reference: torch.Tensor, targets=None) -> str:
    """The outcome of ``case`` (``refused`` / ``identical`` / ``changed`` / ``accepted`` for recipes); raises
    AssertionError when it breaks the contract (another exception type, or an outcome its class forbids)."""
    if case.cls == "recipe":
        return _run_recipe(case, work, targets)
    d = work / f"case-{case.index}"
    shutil.copytree(base, d)
    try:
        case.what = case.apply(d)
        outcome = _load(case, d, reference)
    finally:
        shutil.rmtree(work)
        work.mkdir()
    allowed = {"refuse": {"refused"}, "same": {"refused", "identical"},
               "any": {"refused", "identical", "changed"}}[case.expect]
    if outcome not in allowed:
        raise AssertionError(f"case {case.index} [{case.cls}] {case.what}: {outcome}, expected {sorted(allowed)}")
    return outcome


def _load(case: Case, d: Path, reference: torch.Tensor) -> str:
    from moeq.formats.inspect import inspect
    try:
        inspect(d)
    except MoeqError:
        pass
    except Exception as e:  # noqa: BLE001 - the contract under test
        raise AssertionError(f"case {case.index} [{case.cls}] {case.what}: inspect raised {type(e).__name__}: {e}")
    try:
        got = logits_of(d)
    except MoeqError:
        return "refused"
    except Exception as e:  # noqa: BLE001 - the contract under test
        raise AssertionError(f"case {case.index} [{case.cls}] {case.what}: load raised {type(e).__name__}: {e}") from e
    return "identical" if got.shape == reference.shape and torch.equal(got, reference) else "changed"


def _run_recipe(case: Case, work: Path, targets) -> str:
    from moeq.pipeline.plan import Plan
    from moeq.recipes import load_recipe
    p = work / "recipe.yaml"
    p.write_text(case.recipe)
    try:
        r = load_recipe(p)
        r.methods()
        r.dump()
        Plan(r, targets)
        return "accepted"
    except MoeqError:
        return "refused"
    except Exception as e:  # noqa: BLE001 - the contract under test
        raise AssertionError(f"case {case.index} [recipe] raised {type(e).__name__}: {e}\n{case.recipe}") from e


def run(seed: int, n: int, base: Path, work: Path, reference: torch.Tensor, targets, on_case=None) -> dict:
    """Every case of ``generate(seed, n)``; counts by class and outcome. Failures are collected, not raised."""
    counts: dict[str, dict[str, int]] = {}
    failures: list[str] = []
    work.mkdir(parents=True, exist_ok=True)
    for case in generate(seed, n):
        try:
            outcome = run_case(case, base, work, reference, targets)
        except AssertionError as e:
            outcome = "FAILED"
            failures.append(str(e))
        c = counts.setdefault(case.cls, {})
        c[outcome] = c.get(outcome, 0) + 1
        if on_case:
            on_case(case, outcome)
    return {"seed": seed, "cases": n, "by_class": counts, "failures": failures}

