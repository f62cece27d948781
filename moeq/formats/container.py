"""The artifact: a directory holding config.json (+ quantization_config), tokenizer files, ``moeq.json`` (the
manifest) and safetensors shards ``model-0000k-of-0000n.safetensors`` of packed parts (``<entry>.<part>``) and
kept tensors (their own name, their own dtype).

Writing is streaming: entries are appended one at a time (a decoder layer at a time), a shard is flushed
whenever it exceeds ``shard_bytes``, and nothing is visible at the destination until ``commit()`` renames the
temporary directory. Reading verifies each entry's sha256 and refuses unknown codecs and versions.

Subset reads (nested precisions). An entry of a nested codec (``Codec.nested``: ``bitplanes``, whose r-bit model is
its first r planes) also records ``part_sha256``, one sha256 per part (``tensors_sha256`` of that part alone), so
``read_packed(name, parts=[...])`` reads and verifies only the parts asked for. The entry's whole sha256 stays (it
is what older readers and full reads check). An entry without ``part_sha256`` (another codec, or an artifact
written before it existed) asked for a subset is read WHOLE and checked against its sha256, then the subset is
returned: always verified, never partial. ``bytes_read`` counts the tensor bytes a reader has fetched.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from moeq.errors import ArtifactError
from moeq.formats.manifest import DTYPES, FORMAT_VERSION, MANIFEST, MAX_MANIFEST_BYTES, validate_manifest
from moeq.quant.base import SharedTable
from moeq.registry import CODECS


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # the tensor's own bytes, no copy
    return h.hexdigest()


class ArtifactWriter:
    """Streaming, resumable writer.

    Content is added in named groups (``with writer.group("layer.3"): ...``), one shard file per group. When a
    group ends, a background thread hashes its tensors, writes its shard and then, atomically, a small record
    (entries, kept tensors, each with its sha256), while the caller goes on with the next group; one group is
    written at a time (the next group's end, and anything that reads the records, waits for it: ``flush``).
    Everything lives in a hidden sibling ``.<out>.moeq-tmp`` until ``commit`` renames it, so a crash leaves no
    artifact; re-running the same command finds the finished groups (those whose shard still holds every recorded
    tensor intact) and skips them (``done(label)``). ``run_key`` identifies the run (model + recipe); a different
    key refuses to mix.
    """

    def __init__(self, out: str | os.PathLike, run_key: str = "", join: bool = False, fresh: bool = False):
        """``join``: attach to the run another process (rank 0) created, never creating or deleting anything.
        ``fresh``: discard an interrupted run's state instead of resuming it."""
        self.out = Path(out)
        check_output_free(self.out)
        self.tmp = self.out.with_name(f".{self.out.name}.moeq-tmp")
        self._records: dict[str, dict] = {}
        self._pending: Future | None = None  # the group being written in the background
        self._pool: ThreadPoolExecutor | None = None
        run = {"run_key": run_key}
        if fresh and not join and self.tmp.exists():
            shutil.rmtree(self.tmp)
        if join or (self.tmp.exists() and (self.tmp / "run.json").is_file()):
            prev = json.loads((self.tmp / "run.json").read_text())
            if prev.get("run_key") != run_key:
                raise ArtifactError(f"{self.tmp} holds an unfinished run with a different model or recipe; refusing "
                                    f"to mix them (add --fresh to discard it, or re-run the original command)")
            self.refresh(drop_parts=not join)
        else:
            if self.tmp.exists():
                shutil.rmtree(self.tmp)
            (self.tmp / "records").mkdir(parents=True)
            _atomic_write(self.tmp / "run.json", json.dumps(run, sort_keys=True))
        self.resumed = sorted(self._records)
        self.tied: dict[str, str] = {}
        self._group: str | None = None
        self.bytes_written = sum(r["bytes"] for r in self._records.values())

    @property
    def records(self) -> dict[str, dict]:
        """The finished groups, by label (waits for the group being written)."""
        self.flush()
        return self._records

    def flush(self) -> None:
        """Wait for the group being written in the background; its error, if any, is raised here."""
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def refresh(self, drop_parts: bool = False) -> None:
        """(Re)read the finished groups on disk; ``drop_parts`` deletes unmerged parts of an interrupted run."""
        for rec in sorted((self.tmp / "records").glob("*.json")):
            if rec.stem in self.records:
                continue
            r = json.loads(rec.read_text())
            if ".part" in r["label"] and drop_parts:
                rec.unlink()
                (self.tmp / r["shard"]).unlink(missing_ok=True)
            elif _intact(self.tmp, r):
                self.records[r["label"]] = r

    def merge_parts(self, label: str, parts: list[str]) -> None:
        """Combine part groups (written by several processes) into the group ``label``; the shard and record are
        byte-identical to those of one process writing the whole group (safetensors orders tensors itself)."""
        self.refresh()
        with self.group(label):
            for p in parts:
                r = self.records.pop(p)
                self._buf.update(load_file(str(self.tmp / r["shard"])))
                self._entries.update(r["entries"])
                self._kept.update(r["kept"])
                self._shared.update(r.get("shared", {}))
        for p in parts:
            (self.tmp / "records" / f"{p}.json").unlink()
            (self.tmp / f"group-{p}.safetensors").unlink()

    def done(self, label: str) -> bool:
        return label in self._records  # a group being written is not asked about: each label is written once

    @property
    def entries(self) -> dict[str, dict]:
        return {k: v for r in self.records.values() for k, v in r["entries"].items()}

    @property
    def kept(self) -> dict[str, dict]:
        return {k: v for r in self.records.values() for k, v in r["kept"].items()}

    @property
    def shared(self) -> dict[str, dict]:
        return {k: v for r in self.records.values() for k, v in r.get("shared", {}).items()}

    @contextmanager
    def group(self, label: str):
        if self._group is not None:
            raise RuntimeError("groups do not nest")
        self._group = label
        self._buf: dict[str, torch.Tensor] = {}
        self._entries: dict[str, dict] = {}
        self._kept: dict[str, dict] = {}
        self._shared: dict[str, dict] = {}
        self._storages: set[int] = set()
        self._unhashed: list[tuple[dict, dict[str, torch.Tensor]]] = []  # (info, tensors) hashed when written
        try:
            yield self
            self._finish_group(label)
        finally:
            self._group = None
            self._buf = {}

    # -- adding content (inside a group) ---------------------------------------------------------
    def _own(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` as a contiguous tensor holding exactly its own bytes, not shared with another tensor of the group:
        a copy only for views (which would pin a larger tensor until the shard is written) and repeats."""
        t = t.detach().contiguous()
        st = t.untyped_storage()
        if t.numel() and (t.storage_offset() or st.nbytes() != t.numel() * t.element_size()
                          or st.data_ptr() in self._storages):
            t = t.clone()
            st = t.untyped_storage()
        self._storages.add(st.data_ptr())
        return t

    def add_packed(self, name: str, codec: str, parts: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        codec_cls = CODECS.get(codec)
        parts = {k: self._own(v) for k, v in parts.items()}
        nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        self._entries[name] = {**info, "codec": codec, "codec_version": codec_cls.version, "parts": sorted(parts),
                               "bytes": nbytes}
        if getattr(codec_cls, "nested", False):  # its lower precisions read a subset of the parts: one hash each (module docstring)
            self._entries[name]["part_sha256"] = {}
        self._unhashed.append((self._entries[name], parts))
        self._buf.update({f"{name}.{k}": v for k, v in parts.items()})

    def add_shared(self, table: SharedTable) -> None:
        """A table fitted over many weights, stored once as ``<name>.<part>``."""
        parts = {k: self._own(v) for k, v in table.tensors.items()}
        self._shared[table.name] = {"parts": sorted(parts), "meta": table.meta,
                                    "bytes": sum(t.numel() * t.element_size() for t in parts.values())}
        self._unhashed.append((self._shared[table.name], parts))
        self._buf.update({f"{table.name}.{k}": v for k, v in parts.items()})

    def add_kept(self, name: str, t: torch.Tensor) -> None:
        t = self._own(t)
        self._kept[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape),
                            "bytes": t.numel() * t.element_size()}
        self._unhashed.append((self._kept[name], {name: t}))
        self._buf[name] = t

    def pending_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._buf.values()) if self._group else 0

    def _finish_group(self, label: str) -> None:
        """Hand the group to the background thread (after the previous one is written)."""
        nbytes = self.pending_bytes()
        rec = {"label": label, "shard": f"group-{label}.safetensors", "bytes": nbytes,
               "entries": self._entries, "kept": self._kept, "shared": self._shared}
        self.flush()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="moeq-writer")
        self._pending = self._pool.submit(self._write_group, rec, self._buf, self._unhashed)
        self.bytes_written += nbytes

    def _write_group(self, rec: dict, buf: dict[str, torch.Tensor], unhashed: list) -> None:
        """Hash, write the shard, then the record (the background thread; hashing and writing release the GIL)."""
        for info, tensors in unhashed:
            info["sha256"] = tensors_sha256(tensors)
            if info.get("part_sha256") == {}:  # asked for by add_packed (a nested codec): one hash per part
                info["part_sha256"] = {k: tensors_sha256({k: t}) for k, t in sorted(tensors.items())}
        # one metadata key only: safetensors writes the map in random order, and resumed runs must be byte-identical
        save_file(buf, str(self.tmp / rec["shard"]), metadata={"format": "pt"})
        os.chmod(self.tmp / rec["shard"], file_mode())  # safetensors creates it 0600; the rest of the artifact is not
        _atomic_write(self.tmp / "records" / f"{rec['label']}.json", json.dumps(rec, sort_keys=True))
        self._records[rec["label"]] = rec

    def read_group(self, label: str) -> "ArtifactReader":
        """A reader over one finished group (used to rebuild already-quantized layers on resume)."""
        return _group_reader(self.tmp, self.records[label])

    # -- finishing --------------------------------------------------------------------------------
    def commit(self, order: list[str], manifest: dict[str, Any], config: dict[str, Any] | None) -> Path:
        """Rename group shards to ``model-0000k-of-0000n`` in ``order``, write manifest and config, move into place."""
        missing = [g for g in order if g not in self.records]
        if missing:
            raise RuntimeError(f"groups not written: {missing}")
        final = {g: f"model-{i + 1:05d}-of-{len(order):05d}.safetensors" for i, g in enumerate(order)}
        entries, kept, shared = {}, {}, {}
        for g in order:
            r = self.records[g]
            entries.update({k: {**v, "shard": final[g]} for k, v in r["entries"].items()})
            kept.update({k: {**v, "shard": final[g]} for k, v in r["kept"].items()})
            shared.update({k: {**v, "shard": final[g]} for k, v in r.get("shared", {}).items()})
            os.replace(self.tmp / r["shard"], self.tmp / final[g])
        shutil.rmtree(self.tmp / "records")
        (self.tmp / "run.json").unlink()
        config_sha = None
        if config is not None:
            text = (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()
            (self.tmp / "config.json").write_bytes(text)
            config_sha = hashlib.sha256(text).hexdigest()
        body = {**manifest, "format_version": FORMAT_VERSION, "shards": [final[g] for g in order],
                "tensors": entries, "kept": kept, "shared": shared, "tied": self.tied}
        body.pop("checksums", None)
        body["checksums"] = {"manifest": manifest_digest(body), "config": config_sha}
        (self.tmp / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        if self.out.exists():
            self.out.rmdir()  # only an empty directory can be here (checked in __init__)
        os.replace(self.tmp, self.out)
        return self.out

    def settle(self) -> None:
        """Wait for the group being written in the background, whatever its outcome (an interrupted run keeps
        what is finished; a failed write left no record, so a resumed run redoes that group)."""
        if self._pending is not None:
            self._pending.exception()
            self._pending = None

    def abort(self) -> None:
        """Drop everything (errors in the user's input). A crash or kill keeps the temp dir for resuming."""
        self.settle()
        shutil.rmtree(self.tmp, ignore_errors=True)


def file_mode() -> int:
    """The mode a new file gets here (0666 less the umask): what config.json and the manifest get."""
    global _FILE_MODE
    if _FILE_MODE is None:
        umask = os.umask(0o022)
        os.umask(umask)
        _FILE_MODE = 0o666 & ~umask
    return _FILE_MODE


_FILE_MODE: int | None = None


def check_output_free(out: Path) -> None:
    """An artifact is only ever written to a new or empty directory."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ArtifactError(f"output {out} already exists and is not empty; remove it or pick another")


def _group_reader(tmp: Path, r: dict) -> "ArtifactReader":
    return ArtifactReader.from_parts(tmp, {
        section: {k: {**v, "shard": r["shard"]} for k, v in r.get(key, {}).items()}
        for section, key in (("tensors", "entries"), ("kept", "kept"), ("shared", "shared"))})


def _intact(tmp: Path, r: dict) -> bool:
    """Whether the shard of record ``r`` holds every tensor the record lists, each with its recorded sha256 (the
    record is written after the shard, but a crash or a full disk can still lose or cut short the shard's data)."""
    if not (tmp / r.get("shard", "")).is_file():
        return False
    reader = _group_reader(tmp, r)
    try:
        for name in reader.tensors:
            reader.read_packed(name)
        for name in reader.kept:
            reader.read_kept(name)
        for name in reader.shared:
            reader.read_shared(name)
    except (ArtifactError, KeyError):
        return False
    finally:
        reader.close()
    return True


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# safetensors' dtype names -> the manifest's (torch) names
ST_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64", "I32": "int32",
             "I16": "int16", "I8": "int8", "U8": "uint8", "U16": "uint16", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
             "F8_E5M2": "float8_e5m2"}


def check_artifact_files(root: Path) -> None:
    """Nothing in the artifact directory may lead outside it or block a reader: every entry is a regular file or
    a directory, and a symlink must resolve to one inside the directory."""
    base = root.resolve()
    for p in root.iterdir():
        if p.is_symlink():
            target = p.resolve()
            if not target.is_relative_to(base):
                raise ArtifactError(f"{p}: a symlink leading outside the artifact ({target}); refusing to follow it")
        if p.exists() and not (p.is_file() or p.is_dir()):
            raise ArtifactError(f"{p}: not a regular file (a device, socket or FIFO); refusing to read it")


def artifact_file(root: Path, name: str, what: str) -> Path:
    """``root / name`` where ``name`` is a plain file name of a regular file inside ``root`` (symlinks included)."""
    p = root / name
    if name != Path(name).name or name in ("", ".", ".."):
        raise ArtifactError(f"{root}: {what} {name!r} is not a plain file name inside the artifact")
    if not p.resolve().is_relative_to(root.resolve()):
        raise ArtifactError(f"{p}: {what} leads outside the artifact")
    if not p.is_file():
        raise ArtifactError(f"{p}: {what} missing" if not p.exists() else f"{p}: {what} is not a regular file")
    return p


def manifest_digest(body: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON (sorted keys, no whitespace) without its ``checksums`` field."""
    text = json.dumps({k: v for k, v in body.items() if k != "checksums"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_json(root: Path, name: str, what: str, max_bytes: int):
    """The JSON document ``name`` of an artifact (``artifact_file``), at most ``max_bytes``; ArtifactError naming
    the file when it is larger, not UTF-8 JSON, or nested too deeply to parse."""
    p = artifact_file(root, name, what)
    size = p.stat().st_size
    if size > max_bytes:
        raise ArtifactError(f"{p}: {what} is {size:,} bytes, over the {max_bytes:,} a {what} may have")
    try:
        return json.loads(p.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{p}: {what} is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
    except RecursionError:
        raise ArtifactError(f"{p}: {what} is nested too deeply") from None


class ArtifactReader:
    """Read-only view of an artifact; tensors are read lazily, one entry at a time, and checksummed.

    Artifacts are untrusted input: opening one validates, before any tensor is read, the manifest (schema and
    cross-references, ``validate_manifest``), the directory (no symlink leaving it, no special files) and every
    shard's safetensors header against the manifest (each listed tensor present with the dtype, shape and byte
    count the manifest declares, nothing unlisted; safetensors itself checks the offsets against the file size).
    Every error is one ``ArtifactError`` naming the file and the field."""

    def __init__(self, path: str | os.PathLike):
        from moeq.registry import load_builtins
        load_builtins()
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: no such artifact directory" if not self.path.exists()
                                else f"{self.path}: not a directory (an artifact is a directory)")
        if not mpath.exists() and not mpath.is_symlink():
            raise ArtifactError(f"{self.path}: not a moeq artifact (no {MANIFEST})")
        check_artifact_files(self.path)
        data = read_json(self.path, MANIFEST, "manifest", MAX_MANIFEST_BYTES)
        self.manifest = validate_manifest(data, str(mpath))
        self._handles: dict[str, Any] = {}
        self.bytes_read = 0
        self.check_shards()
        self.check_checksums(data)

    def check_checksums(self, raw: dict[str, Any]) -> None:
        """The manifest and config.json against the checksums the manifest records (artifacts written before
        them have none): after every structural check, so a malformed field is named as such first."""
        sums = self.manifest.get("checksums")
        if not sums:
            return
        if manifest_digest(raw) != sums["manifest"]:
            raise ArtifactError(f"{self.path / MANIFEST}: does not match its recorded sha256 (edited or corrupt)")
        cfg = self.path / "config.json"
        if sums.get("config") is not None:
            from moeq.formats.config import CONFIG, MAX_CONFIG_BYTES
            p = artifact_file(self.path, CONFIG, "config")
            if p.stat().st_size > MAX_CONFIG_BYTES or hashlib.sha256(p.read_bytes()).hexdigest() != sums["config"]:
                raise ArtifactError(f"{cfg}: does not match the sha256 the manifest records (edited or corrupt)")

    def check_shards(self) -> None:
        """Each shard's header against the manifest (see the class docstring); the handles stay open for reading."""
        expected: dict[str, dict[str, tuple[str, dict]]] = {s: {} for s in self.manifest["shards"]}
        for section in ("tensors", "kept", "shared"):
            for name, e in self.manifest[section].items():
                for part in e.get("parts", [None]):
                    expected[e["shard"]][name if part is None else f"{name}.{part}"] = (f"{section}.{name}", e)
        for shard, want in expected.items():
            path = artifact_file(self.path, shard, "shard")
            h = self._shard(shard)
            where = f"{path}"
            have = set(h.keys())
            missing = sorted(set(want) - have)
            if missing:
                raise ArtifactError(f"{where}: lacks tensor {missing[0]!r} that the manifest's "
                                    f"{want[missing[0]][0]} lists")
            extra = sorted(have - set(want))
            if extra:
                raise ArtifactError(f"{where}: holds tensor {extra[0]!r} that the manifest does not list")
            sizes: dict[str, int] = {}
            for k, (field, e) in want.items():
                sl = h.get_slice(k)
                dtype, shape = ST_DTYPES.get(sl.get_dtype()), list(sl.get_shape())
                if dtype is None:
                    raise ArtifactError(f"{where}: tensor {k!r} has dtype {sl.get_dtype()}, which moeq never writes")
                if field.startswith("kept.") and (dtype != e["dtype"] or shape != e["shape"]):
                    raise ArtifactError(f"{where}: tensor {k!r} is {dtype} {shape}, but the manifest's {field} says "
                                        f"{e['dtype']} {e['shape']}")
                sizes[field] = sizes.get(field, 0) + DTYPES[dtype] * math.prod(shape)
            for field, n in sizes.items():
                section, _, name = field.partition(".")
                e = self.manifest[section][name]
                if n != e["bytes"]:
                    raise ArtifactError(f"{where}: the tensors of {field} hold {n:,} bytes, the manifest says "
                                        f"{e['bytes']:,}")

    @classmethod
    def from_parts(cls, path: Path, manifest: dict[str, Any]) -> "ArtifactReader":
        self = cls.__new__(cls)
        self.path, self.manifest, self._handles = Path(path), manifest, {}
        self.bytes_read = 0
        return self

    def close(self) -> None:
        """Unmap the shards read so far."""
        self._handles.clear()

    @property
    def tensors(self) -> dict[str, dict]:
        return self.manifest["tensors"]

    @property
    def kept(self) -> dict[str, dict]:
        return self.manifest["kept"]

    def _shard(self, name: str):
        h = self._handles.get(name)
        if h is None:
            p = self.path / name
            if not p.is_file():
                raise ArtifactError(f"{p}: shard missing")
            try:
                h = safe_open(str(p), framework="pt")
            except (SafetensorError, OSError) as e:  # safetensors' own error for a malformed header or size
                raise ArtifactError(f"{p}: shard is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
            self._handles[name] = h
        return h

    def _get(self, shard: str, key: str) -> torch.Tensor:
        try:
            t = self._shard(shard).get_tensor(key)
            self.bytes_read += t.numel() * t.element_size()
            return t
        except ArtifactError:
            raise
        except (SafetensorError, OSError, RuntimeError, ValueError) as e:
            raise ArtifactError(f"{self.path / shard}: cannot read {key} ({str(e).splitlines()[0][:120]})") from None

    def read_packed(self, name: str, parts: list[str] | None = None) -> dict[str, torch.Tensor]:
        """The parts of entry ``name`` (all, or those named in ``parts``), checksummed: a subset by the per-part
        hashes where the entry has them, else by reading every part (see the module docstring)."""
        e = self.tensors[name]
        want = list(e["parts"]) if parts is None else list(parts)
        unknown = sorted(set(want) - set(e["parts"]))
        if unknown:
            raise ArtifactError(f"{self.path / e['shard']}: {name} has no part {unknown[0]!r}")
        per_part = e.get("part_sha256")
        if set(want) != set(e["parts"]) and per_part is not None:
            out = {}
            for k in want:
                out[k] = self._get(e["shard"], f"{name}.{k}")
                if tensors_sha256({k: out[k]}) != per_part[k]:
                    raise ArtifactError(f"{self.path / e['shard']}: {name}.{k}: checksum mismatch (artifact corrupt)")
            return out
        got = {k: self._get(e["shard"], f"{name}.{k}") for k in e["parts"]}
        if tensors_sha256(got) != e["sha256"]:
            raise ArtifactError(f"{self.path / e['shard']}: {name}: checksum mismatch (artifact corrupt)")
        return {k: got[k] for k in want}

    def read_kept(self, name: str) -> torch.Tensor:
        e = self.kept[name]
        t = self._get(e["shard"], name)
        if tensors_sha256({name: t}) != e["sha256"]:
            raise ArtifactError(f"{self.path / e['shard']}: {name}: checksum mismatch (artifact corrupt)")
        return t

    @property
    def shared(self) -> dict[str, dict]:
        return self.manifest.get("shared", {})

    def read_shared(self, name: str) -> SharedTable:
        if name not in self.shared:
            raise ArtifactError(f"{self.path}: entry references shared table {name!r}, which the artifact lacks")
        e = self.shared[name]
        parts = {k: self._get(e["shard"], f"{name}.{k}") for k in e["parts"]}
        if tensors_sha256(parts) != e["sha256"]:
            raise ArtifactError(f"{self.path / e['shard']}: {name}: checksum mismatch (artifact corrupt)")
        return SharedTable(name, parts, dict(e.get("meta", {})))
