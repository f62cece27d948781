"""The artifact: a directory holding config.json (+ quantization_config), tokenizer files, ``moeq.json`` (the
manifest) and safetensors shards ``model-0000k-of-0000n.safetensors`` of packed parts (``<entry>.<part>``) and
kept tensors (their own name, their own dtype).

Writing is streaming: entries are appended one at a time (a decoder layer at a time), a shard is flushed
whenever it exceeds ``shard_bytes``, and nothing is visible at the destination until ``commit()`` renames the
temporary directory. Reading verifies each entry's sha256 and refuses unknown codecs and versions.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from moeq.errors import ArtifactError
from moeq.registry import CODECS

MANIFEST = "moeq.json"
FORMAT_VERSION = 1
DEFAULT_SHARD_BYTES = 2 * 1024 ** 3


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, raw bytes) of each tensor, in name order."""
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k].detach().contiguous().cpu()
        h.update(f"{k}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@dataclass
class ArtifactWriter:
    out: Path
    shard_bytes: int = DEFAULT_SHARD_BYTES
    entries: dict[str, dict] = field(default_factory=dict)
    kept: dict[str, dict] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.out = Path(self.out)
        if self.out.exists() and (not self.out.is_dir() or any(self.out.iterdir())):
            raise ArtifactError(f"output {self.out} already exists and is not empty; remove it or pick another")
        self.tmp = self.out.with_name(f".{self.out.name}.moeq-tmp")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self._buf: dict[str, torch.Tensor] = {}
        self._buf_bytes = 0
        self._shards: list[str] = []
        self.bytes_written = 0

    # -- adding content -------------------------------------------------------------------------
    def add_packed(self, name: str, codec: str, parts: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
        codec_cls = CODECS.get(codec)
        parts = {k: v.detach().contiguous().clone() for k, v in parts.items()}
        nbytes = sum(t.numel() * t.element_size() for t in parts.values())
        self.entries[name] = {**info, "codec": codec, "codec_version": codec_cls.version, "parts": sorted(parts),
                              "bytes": nbytes, "sha256": tensors_sha256(parts), "shard": self._current_shard()}
        self._append({f"{name}.{k}": v for k, v in parts.items()}, nbytes)

    def add_kept(self, name: str, t: torch.Tensor) -> None:
        t = t.detach().contiguous().clone()
        nbytes = t.numel() * t.element_size()
        self.kept[name] = {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "bytes": nbytes,
                           "sha256": tensors_sha256({name: t}), "shard": self._current_shard()}
        self._append({name: t}, nbytes)

    def _current_shard(self) -> int:
        return len(self._shards)

    def _append(self, tensors: dict[str, torch.Tensor], nbytes: int) -> None:
        self._buf.update(tensors)
        self._buf_bytes += nbytes
        if self._buf_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        name = f"shard-{len(self._shards):05d}.safetensors"
        save_file(self._buf, str(self.tmp / name), metadata={"format": "pt", "producer": "moeq"})
        self.bytes_written += self._buf_bytes
        self._shards.append(name)
        self._buf, self._buf_bytes = {}, 0

    # -- finishing --------------------------------------------------------------------------------
    def commit(self, manifest: dict[str, Any], config: dict[str, Any] | None, extra_files: list[Path] = ()) -> Path:
        """Write the last shard, the manifest and config, then move the directory into place."""
        self.flush()
        n = len(self._shards)
        final = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        for old, new in zip(self._shards, final):
            os.replace(self.tmp / old, self.tmp / new)
        for d in (self.entries, self.kept):
            for e in d.values():
                e["shard"] = final[e["shard"]]
        for f in extra_files:
            shutil.copy2(f, self.tmp / Path(f).name)
        if config is not None:
            (self.tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        body = {**manifest, "format_version": FORMAT_VERSION, "shards": final,
                "tensors": self.entries, "kept": self.kept, "tied": self.tied}
        (self.tmp / MANIFEST).write_text(json.dumps(body, indent=1, sort_keys=True) + "\n")
        if self.out.exists():
            self.out.rmdir()  # only an empty directory can be here (checked in __post_init__)
        os.replace(self.tmp, self.out)
        return self.out

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class ArtifactReader:
    """Read-only view of an artifact; tensors are read lazily, one entry at a time, and checksummed."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not self.path.is_dir():
            raise ArtifactError(f"{self.path}: no such artifact directory")
        if not mpath.is_file():
            raise ArtifactError(f"{self.path}: not a moeq artifact (no {MANIFEST})")
        try:
            self.manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ArtifactError(f"{mpath}: manifest is not valid JSON ({e.msg if hasattr(e, 'msg') else e})") from None
        fv = self.manifest.get("format_version")
        if fv != FORMAT_VERSION:
            raise ArtifactError(f"{self.path}: artifact format version {fv!r} is not supported (this moeq reads {FORMAT_VERSION})")
        for name, e in self.manifest.get("tensors", {}).items():
            codec = e.get("codec")
            if codec not in CODECS:
                raise ArtifactError(f"{name}: unknown codec {codec!r} (known: {', '.join(CODECS)}); "
                                    "written by a newer or different moeq?")
            if e.get("codec_version") not in CODECS.get(codec).readable_versions:
                raise ArtifactError(f"{name}: codec {codec} version {e.get('codec_version')!r} is not supported "
                                    f"(this moeq reads {CODECS.get(codec).readable_versions})")
        self._handles: dict[str, Any] = {}

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
            except Exception as e:  # safetensors raises its own error type for any malformed file
                raise ArtifactError(f"{p}: shard is corrupt or truncated ({str(e).splitlines()[0][:120]})") from None
            self._handles[name] = h
        return h

    def _get(self, shard: str, key: str) -> torch.Tensor:
        try:
            return self._shard(shard).get_tensor(key)
        except ArtifactError:
            raise
        except Exception as e:
            raise ArtifactError(f"{self.path / shard}: cannot read {key} ({str(e).splitlines()[0][:120]})") from None

    def read_packed(self, name: str) -> dict[str, torch.Tensor]:
        e = self.tensors[name]
        parts = {k: self._get(e["shard"], f"{name}.{k}") for k in e["parts"]}
        if tensors_sha256(parts) != e["sha256"]:
            raise ArtifactError(f"{name}: checksum mismatch in {e['shard']} (artifact corrupt)")
        return parts

    def read_kept(self, name: str) -> torch.Tensor:
        e = self.kept[name]
        t = self._get(e["shard"], name)
        if tensors_sha256({name: t}) != e["sha256"]:
            raise ArtifactError(f"{name}: checksum mismatch in {e['shard']} (artifact corrupt)")
        return t
