"""Zoo caches: models built once into ``cache_root()`` and reused (``smollm2-135m``: the GGUF converted to
safetensors; ``smollm2-moe``: the upcycled Mixtral).

A cache is built in a temporary sibling directory and renamed into place, so it is complete or absent. Its record
``moeq-build.json`` says how it was built (the builder's recipe; the source file's size and sha256) and gives the
size and sha256 of every file the build wrote. ``check`` validates a cache each time it is used:

- always (about a millisecond): the record parses and matches the current recipe; every recorded file exists with
  its recorded size; every safetensors file has a well-formed header whose tensors end exactly where the file
  does; the source, when installed, has its recorded size. A truncated or overwritten file fails here.
- the full sha256 (about 0.7 s per GB here) only of files whose stamp (size, mtime, ctime, inode) differs from the
  one recorded when their hash last matched: once after a build or a copy, and after any write to them. Stamps
  live apart from the record, in ``moeq-verified.json``, so the record stays byte-for-byte deterministic; only a
  change that bypasses the file system (bit rot) goes unseen between two verifications.

``ensure`` returns a valid cache, (re)building it when it is missing or fails its check (one line on stderr says
why); the failed copy is replaced only once the new build is complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RECORD = "moeq-build.json"
STAMPS = "moeq-verified.json"
MISSING = "missing"
MAX_HEADER = 100 * 2**20  # safetensors caps its JSON header at 100 MB


def cache_root() -> Path:
    """``$MOEQ_CACHE``, else ``$XDG_CACHE_HOME/moeq``, else ``~/.cache/moeq``."""
    if os.environ.get("MOEQ_CACHE"):
        return Path(os.environ["MOEQ_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "moeq"


def ensure(dest: Path, recipe: dict, build: Callable[[Path], dict], what: str, source: Path | None = None,
           unavailable: Callable[[], str | None] = lambda: None) -> Path:
    """The cache at ``dest``, built first when ``check`` finds it missing or invalid: ``build(tmp)`` writes the
    model into ``tmp`` and returns extra record fields. ``what`` names the model in messages; ``source``: the file
    the cache is made from (None: not checked); ``unavailable()``: why it cannot be built here (raised as a
    ModelLoadError), or None."""
    from moeq.errors import ModelLoadError
    dest = Path(dest)
    problem = check(dest, recipe, source)
    if problem is None:
        return dest
    reason = unavailable()
    if reason:
        raise ModelLoadError(reason)
    why = "once" if problem == MISSING else f"the cache failed its check: {problem}"
    print(f"moeq: building {what} into {dest} ({why})", file=sys.stderr)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f"{dest.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        extra = build(tmp)
        write_record(tmp, recipe, source, extra)
        _publish(tmp, dest, recipe, source)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    problem = check(dest, recipe, source)
    if problem is not None:
        raise OSError(f"{dest}: the cache just built fails its check ({problem})")
    return dest


def check(dest: Path, recipe: dict, source: Path | None = None) -> str | None:
    """None when ``dest`` holds a complete, intact build of ``recipe`` (from ``source``, when given and present);
    else why not, in a few words (``MISSING`` when there is nothing there)."""
    dest = Path(dest)
    if not dest.is_dir():
        return MISSING
    try:
        record = json.loads((dest / RECORD).read_text())
        files, made_from = record["files"], record.get("source")
        if not (isinstance(files, dict) and files and all(_file_entry(v) for v in files.values())
                and (made_from is None or _file_entry(made_from))):
            raise ValueError
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"no valid {RECORD}"
    if record.get("recipe") != recipe:
        return "built by another version of its recipe"
    if not (dest / "config.json").is_file():
        return "config.json is missing"
    stamps = {}
    for name, info in sorted(files.items()):
        p = dest / name
        try:
            st = p.stat()
        except OSError:
            return f"{name} is missing"
        if st.st_size != info["bytes"]:
            return f"{name} {'is truncated' if st.st_size < info['bytes'] else 'has changed'} " \
                   f"({st.st_size} bytes, recorded {info['bytes']})"
        if name.endswith(".safetensors"):
            bad = safetensors_problem(p)
            if bad:
                return f"{name}: {bad}"
        stamps[name] = _stamp(st)
    if source is not None and made_from is not None and source.is_file():
        st = source.stat()
        if st.st_size != made_from["bytes"]:
            return f"its source {source.name} changed"
        stamps[str(source)] = _stamp(st)
    seen = _read_stamps(dest)
    for key, stamp in stamps.items():
        if seen.get(key) == stamp:
            continue
        path, want = (dest / key, files[key]["sha256"]) if key in files else (source, made_from["sha256"])
        if sha256_file(path) != want:
            return f"{path.name} does not match its sha256" if key in files else f"its source {path.name} changed"
    if seen != stamps:
        _write_stamps(dest, stamps)
    return None


def write_record(d: Path, recipe: dict, source: Path | None, extra: dict | None = None) -> dict:
    """Write ``d``'s record: ``recipe``, the source's size and sha256, every file's size and sha256, ``extra``."""
    paths = [p for p in sorted(d.iterdir()) if p.is_file() and p.name not in (RECORD, STAMPS)]
    if not any(p.name.endswith(".safetensors") for p in paths):
        raise OSError(f"{d}: the build wrote no safetensors file")
    stamps = {p.name: _stamp(p.stat()) for p in paths}  # taken before hashing: a write meanwhile shows
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in paths}
    record = {**(extra or {}), "recipe": recipe, "files": files}
    if source is not None:
        stamps[str(source)] = _stamp(source.stat())
        record["source"] = {"file": source.name, "bytes": source.stat().st_size, "sha256": sha256_file(source)}
    (d / RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    _write_stamps(d, stamps)  # just hashed: the first use does not hash again (renaming d keeps the stamps)
    return record


def safetensors_problem(path: Path) -> str | None:
    """Why ``path`` is not a whole safetensors file (header length, JSON, tensors tiling the data exactly to the
    end of the file), or None. Reads the header only."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "truncated (no header)"
        n = struct.unpack("<Q", head)[0]
        if n > MAX_HEADER or 8 + n > size:
            return "truncated or not safetensors (bad header length)"
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, ValueError):
            return "corrupt header"
    try:
        spans = sorted((int(v["data_offsets"][0]), int(v["data_offsets"][1]))
                       for k, v in header.items() if k != "__metadata__")
    except (AttributeError, TypeError, KeyError, IndexError, ValueError):
        return "corrupt header"
    end = 0
    for b, e in spans:
        if b != end or e < b:
            return "corrupt header (tensor offsets)"
        end = e
    if 8 + n + end != size:
        return f"truncated ({size} bytes, its header needs {8 + n + end})"
    return None


def _file_entry(v) -> bool:
    return isinstance(v, dict) and isinstance(v.get("bytes"), int) and isinstance(v.get("sha256"), str)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def _stamp(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _read_stamps(dest: Path) -> dict[str, Any]:
    try:
        seen = json.loads((dest / STAMPS).read_text())
        return seen if isinstance(seen, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_stamps(dest: Path, stamps: dict) -> None:
    """Best effort (a read-only cache is hashed on each use instead)."""
    tmp = dest / f".{STAMPS}.{os.getpid()}"
    try:
        tmp.write_text(json.dumps(stamps, sort_keys=True))
        os.replace(tmp, dest / STAMPS)
    except OSError:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, dest: Path, recipe: dict, source: Path | None) -> None:
    """Rename ``tmp`` to ``dest``, moving a failed cache aside first (a rename cannot replace a non-empty
    directory). When another process finished the same build first, its valid cache is kept and ``tmp`` dropped."""
    if dest.exists():
        if check(dest, recipe, source) is None:  # built meanwhile by another process
            shutil.rmtree(tmp, ignore_errors=True)
            return
        old = dest.with_name(f"{dest.name}.old-{os.getpid()}")
        _remove(old)
        try:
            os.replace(dest, old)
        except OSError:
            pass
        _remove(old)
    try:
        os.replace(tmp, dest)
    except OSError:
        if check(dest, recipe, source) is not None:
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _remove(p: Path) -> None:
    """Delete a directory tree, or just the link when ``p`` is a symbolic link (the files it points to are kept)."""
    if p.is_symlink():
        p.unlink()
    else:
        shutil.rmtree(p, ignore_errors=True)
