"""The artifact writer (moeq.formats.container): groups are hashed and written in the background, one at a time,
and a resumed run keeps a finished group only if its shard still holds every recorded tensor intact."""

from __future__ import annotations

import pytest
import torch

from moeq.formats import container
from moeq.formats.container import ArtifactWriter, tensors_sha256
from moeq.registry import load_builtins

load_builtins()
G = torch.Generator().manual_seed(0)
BIG = torch.randn(64, 32, generator=G)


def _write(out, labels=("a", "b", "c")):
    w = ArtifactWriter(out, run_key="k")
    for i, label in enumerate(labels):
        with w.group(label):
            codes = torch.randint(-127, 128, (8, 32), generator=G, dtype=torch.int8)
            w.add_packed(f"{label}.w", "int8-rows", {"qweight": codes, "scale": torch.rand(8, generator=G)},
                         {"shape": [8, 32]})
            w.add_kept(f"{label}.norm", BIG[i])  # a view of a larger tensor: stored on its own
    return w


def test_groups_are_written_hashed_and_owned(tmp_path):
    w = _write(tmp_path / "o")
    assert set(w.records) == {"a", "b", "c"}  # reading the records waits for the last group
    for label in "abc":
        r = w.records[label]
        shard = tmp_path / ".o.moeq-tmp" / r["shard"]
        assert shard.is_file() and r["kept"][f"{label}.norm"]["sha256"] and r["entries"][f"{label}.w"]["sha256"]
        assert shard.stat().st_size < BIG.numel() * 4  # the kept row only, not the tensor it was a view of
    group = w.read_group("b")
    assert torch.equal(group.read_kept("b.norm"), BIG[1])
    assert group.read_packed("b.w")["qweight"].shape == (8, 32)  # checksum verified by the reader


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete"])
def test_a_damaged_group_is_not_resumed(tmp_path, damage):
    _write(tmp_path / "o").flush()
    shard = tmp_path / ".o.moeq-tmp" / "group-b.safetensors"
    data = bytearray(shard.read_bytes())
    if damage == "truncate":
        shard.write_bytes(data[:-10])
    elif damage == "flip":
        data[-5] ^= 0xFF  # inside the last tensor's bytes: the header is fine, a checksum is not
        shard.write_bytes(data)
    else:
        shard.unlink()
    again = ArtifactWriter(tmp_path / "o", run_key="k")
    assert again.resumed == ["a", "c"] and not again.done("b") and again.done("a")


def test_a_failed_background_write_surfaces(tmp_path, monkeypatch):
    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(container, "save_file", full_disk)
    w = ArtifactWriter(tmp_path / "o", run_key="k")
    with w.group("a"):
        w.add_kept("x", torch.ones(3))
    with pytest.raises(OSError, match="No space"):
        w.flush()
    assert "a" not in w.records  # no record without its shard: a resumed run redoes the group
    w.abort()
    assert not (tmp_path / ".o.moeq-tmp").exists()


def test_commit_waits_for_the_last_group(tmp_path):
    import json
    w = _write(tmp_path / "o")
    out = w.commit(["a", "b", "c"], {"tool": "t"}, None)  # called right after the last group ends
    manifest = json.loads((out / "moeq.json").read_text())
    assert sorted(p.name for p in out.glob("model-*.safetensors")) == manifest["shards"]
    assert {n: bool(e["sha256"]) for n, e in manifest["tensors"].items()} == {"a.w": True, "b.w": True, "c.w": True}
    assert tensors_sha256({"x": BIG[1]}) == tensors_sha256({"x": BIG[1].clone()})  # bytes, not storage, are hashed


def test_shards_get_the_mode_of_the_other_files(tmp_path):
    import os
    import stat
    out = _write(tmp_path / "o").commit(["a", "b", "c"], {"tool": "t"}, {"model_type": "x"})
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
    assert len(set(modes.values())) == 1, modes  # shards as config.json and moeq.json
    umask = os.umask(0)
    os.umask(umask)
    assert modes["config.json"] == 0o666 & ~umask
