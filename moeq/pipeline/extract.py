"""Extraction: a smaller artifact holding one width of a nested-precision artifact (``matryoshka``), without
re-quantizing. Each entry of a nested codec (``Codec.nested``) keeps only the parts of that width
(``Codec.parts_at``: the first r bit-planes and the scales), re-encoded through its codec so the new entry is
checked and self-describing (meta bits = r, the parent's widths kept); every other entry, kept tensor and shared
table is copied as stored. Written like a quantization run (``ArtifactWriter``: one group per source shard, in a
hidden temporary directory renamed into place at the end, hashes recomputed); the manifest's recipe, source and
calibration are carried over and its totals recomputed. The other plain files of the artifact directory
(tokenizer, README) are copied; subdirectories are not.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from moeq.errors import MoeqError
from moeq.formats.container import ArtifactReader, ArtifactWriter, read_json
from moeq.formats.manifest import MANIFEST, MAX_MANIFEST_BYTES, totals
from moeq.registry import CODECS

# entry fields the writer sets itself (from the parts) or at commit
WRITER_FIELDS = ("codec", "codec_version", "parts", "bytes", "sha256", "part_sha256", "shard")
COMMIT_FIELDS = ("format_version", "shards", "tensors", "kept", "shared", "tied")


def extract(artifact: str | Path, bits: int, out: str | Path) -> Path:
    """Write to ``out`` (new or empty) the artifact ``artifact`` at ``bits`` (a width every nested entry was
    fitted for and still stores); returns ``out``. MoeqError when the artifact has no nested entry or cannot give
    that width."""
    from moeq.runtime.load import check_bits

    src = Path(artifact)
    if Path(out).resolve() == src.resolve():
        raise MoeqError(f"{out}: extract writes a new artifact; pick another output than its source")
    reader = ArtifactReader(src)
    check_bits(reader, bits)
    raw = read_json(src, MANIFEST, "manifest", MAX_MANIFEST_BYTES)  # the recipe as written, not as validated
    writer = ArtifactWriter(Path(out), run_key=f"extract {src.resolve()} at {bits} bits", fresh=True)
    try:
        for shard in reader.manifest["shards"]:
            with writer.group(Path(shard).stem):
                _copy_shard(reader, shard, bits, writer)
        writer.tied = dict(raw.get("tied", {}))
        for p in sorted(src.iterdir()):
            if p.is_file() and p.name != MANIFEST and p.name != "config.json" and p.name not in raw["shards"]:
                shutil.copyfile(p, writer.tmp / p.name)
        body = {k: v for k, v in raw.items() if k not in COMMIT_FIELDS}
        body["totals"] = totals(writer.entries, writer.kept, writer.shared)
        config = json.loads((src / "config.json").read_text()) if (src / "config.json").is_file() else None
        return writer.commit([Path(s).stem for s in reader.manifest["shards"]], body, config)
    except BaseException:
        writer.abort()
        raise
    finally:
        reader.close()


def _copy_shard(reader: ArtifactReader, shard: str, bits: int, writer: ArtifactWriter) -> None:
    """Every entry, shared table and kept tensor of one source shard into the writer's current group."""
    for name, e in reader.tensors.items():
        if e["shard"] != shard:
            continue
        codec = CODECS.get(e["codec"])()
        info = {k: v for k, v in e.items() if k not in WRITER_FIELDS}
        if getattr(codec, "nested", False):
            parts = reader.read_packed(name, codec.parts_at(e["parts"], e["meta"], bits))
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
