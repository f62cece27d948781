"""The engine end to end: mixed per-tensor plans, chunked calibration under a memory cap, the starved-expert
fallback, shared tables, and a manifest validated on read."""

import json
import shutil
from contextlib import contextmanager

import pytest
import torch
from typer.testing import CliRunner

from moeq import api
from moeq.cli.app import app
from moeq.errors import ArtifactError
from moeq.quant.base import MethodConfig, QTensor, Quantizer, SharedTable
from moeq.recipes import EvalSpec, Recipe
from moeq.registry import CODECS, QUANTIZERS, load_builtins
from tests.test_calib import starve
from tests.tiny_models import V, build

MIXED = [{"targets": ["attention"], "method": "int8"},
         {"targets": ["expert"], "method": "gptq", "options": {"bits": 4, "group_size": 32}}]
CALIB = {"samples": 4, "seqlen": 64}


def _entries(path):
    return json.loads((path / "moeq.json").read_text())["tensors"]


@pytest.fixture(scope="module")
def mixed(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mixed") / "art"
    res = api.quantize(Recipe(model=str(tiny_model_dir), rules=MIXED, calibration=CALIB), out)
    return out, res


def test_mixed_artifact_quantizes_loads_and_evaluates(mixed, tiny_model_dir):
    out, res = mixed
    entries = _entries(out)
    roles = {(e["role"], e["method"], e["codec"]) for e in entries.values()}
    assert roles == {("attention", "int8", "int8-rows"), ("expert", "gptq", "affine-packed")}
    assert all(e["options"]["bits"] == 4 for e in entries.values() if e["method"] == "gptq")
    kept = json.loads((out / "moeq.json").read_text())["kept"]
    assert "model.layers.0.mlp.gate.weight" in kept and kept["model.layers.0.mlp.gate.weight"]["dtype"] == "float32"
    assert not any("mlp.gate.weight" in n for n in entries)                 # the router stays as it was
    assert all(e["calib_tokens"] > 0 for e in entries.values())              # every expert saw routed tokens
    r = api.evaluate(str(out), str(tiny_model_dir), spec=EvalSpec(seqlen=64, windows=2, batch_size=2), speed=False)
    assert 0.9 < r["ppl_ratio"] < 1.2 and r["method"] == "int8+gptq"
    code = CliRunner().invoke(app, ["inspect", str(out)])
    assert code.exit_code == 0 and "gptq" in code.output and "int8" in code.output


def test_memory_cap_calibrates_in_chunks_with_identical_results(mixed, tiny_model_dir, tmp_path, monkeypatch):
    from moeq.pipeline import run as run_mod
    seen = []
    orig = run_mod.chunks
    monkeypatch.setattr(run_mod, "chunks", lambda *a: seen.append(orig(*a)) or seen[-1])
    capped = dict(CALIB, max_stats_mb=0.02)  # 20 KB: one 64x64 Hessian (16 KB) at a time
    api.quantize(Recipe(model=str(tiny_model_dir), rules=MIXED, calibration=capped), tmp_path / "capped")
    assert min(len(c) for c in seen) >= 8  # every layer was calibrated in 8 chunks (one per expert Hessian)
    a, b = _entries(mixed[0]), _entries(tmp_path / "capped")
    assert {n: e["sha256"] for n, e in a.items()} == {n: e["sha256"] for n, e in b.items()}


def test_starved_expert_falls_back_visibly_and_evaluates(tmp_path):
    m = build("mixtral")
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    starve(m.model.layers[0].mlp.gate, 2)
    calib = torch.randint(0, V, (4, 24), generator=torch.Generator().manual_seed(2))
    recipe = Recipe(rules=[{"targets": ["expert", "attention"], "method": "gptq", "options": {"group_size": 32}}])
    res = api.quantize_model(m, tmp_path / "art", recipe, calib_ids=calib)
    entries = _entries(tmp_path / "art")
    starved = {n for n, e in entries.items() if e.get("fallback")}
    assert starved == {"model.layers.0.mlp.experts.gate_up_proj.2", "model.layers.0.mlp.experts.down_proj.2"}
    assert res["fallbacks"] == 2 and entries["model.layers.0.mlp.experts.gate_up_proj.2"]["calib_tokens"] == 0
    info = api.inspect(tmp_path / "art")
    assert info["experts"]["model.layers.0.mlp.experts[2]"]["fallback"]
    assert not info["experts"]["model.layers.0.mlp.experts[1]"]["fallback"]
    out = CliRunner().invoke(app, ["inspect", str(tmp_path / "art")]).output
    assert "fallback" in out and "rtn" in out
    loaded, _, _ = api.load(tmp_path / "art")  # the real router again: expert 2 runs its RTN weights
    with torch.no_grad():
        got = loaded(input_ids=ids).logits
    assert torch.isfinite(got).all() and ((got - ref).norm() / ref.norm()) < 0.1


# -- shared tables: a toy method whose 16-level codebook is fitted per layer and stored once; it has no runtime of
# its own (the fallback decodes it once at load) -----------------------------------------------------------------
class _LutConfig(MethodConfig):
    pass


class _LutQuantizer(Quantizer):
    name, codec, Config = "test-lut", "test-lut-codes", _LutConfig

    def fit_layer(self, weights, cfg, stats, prefix):
        allw = torch.cat([w.detach().float().flatten() for w in weights.values()])
        levels = torch.quantile(allw[:100_000], torch.linspace(0.02, 0.98, 16))
        return [SharedTable(f"{prefix}.lut", {"levels": levels})]

    def quantize(self, w, cfg, stats, shared=None):
        (name, table), = shared.items()
        codes = (w.float()[..., None] - table.tensors["levels"]).abs().argmin(-1).to(torch.uint8)
        return QTensor(tuple(w.shape), {"codes": codes}, {}, (name,))

    def dequantize(self, q, shared=None):
        (table,) = (shared[n] for n in q.shared)  # the entry's table names are set by the loader
        return table.tensors["levels"][q.tensors["codes"].long()]


class _LutCodec:
    name, version, readable_versions = "test-lut-codes", 1, (1,)

    def encode(self, q, shared=None):
        return {"codes": q.tensors["codes"]}, {}

    def decode(self, parts, meta, shape, version, shared=None):
        return QTensor(shape, dict(parts), {})


@contextmanager
def _registered():
    load_builtins()
    for reg, name, obj in ((QUANTIZERS, "test-lut", _LutQuantizer), (CODECS, "test-lut-codes", _LutCodec)):
        reg.register(name)(obj)
    try:
        yield
    finally:
        for reg, name in ((QUANTIZERS, "test-lut"), (CODECS, "test-lut-codes")):
            reg._items.pop(name)


def test_shared_tables_are_stored_once_and_referenced(tmp_path):
    m = build("mixtral")
    ids = torch.randint(0, V, (2, 16), generator=torch.Generator().manual_seed(3))
    with _registered():
        api.quantize_model(m, tmp_path / "art", Recipe(rules=[{"targets": ["expert"], "method": "test-lut"}]))
        with torch.no_grad():
            got = m(input_ids=ids).logits
        man = json.loads((tmp_path / "art" / "moeq.json").read_text())
        assert set(man["shared"]) == {"model.layers.0.lut", "model.layers.1.lut"}
        assert man["totals"]["shared_bytes"] == 2 * 16 * 4
        e = man["tensors"]["model.layers.1.mlp.experts.down_proj.3"]
        assert e["shared"] == ["model.layers.1.lut"] and e["bytes"] == 64 * 96
        loaded, _, _ = api.load(tmp_path / "art")
        with torch.no_grad():
            torch.testing.assert_close(loaded(input_ids=ids).logits, got)


# -- the manifest is validated when read ----------------------------------------------------------------------
@pytest.mark.parametrize("edit, field", [
    (lambda m: m["tensors"][next(iter(m["tensors"]))].pop("codec"), "codec"),
    (lambda m: m["tensors"][next(iter(m["tensors"]))].update(shape="64x64"), "shape"),
    (lambda m: m["tensors"][next(iter(m["tensors"]))].update(shard="../../etc/passwd"), "shard"),
    (lambda m: m["kept"][next(iter(m["kept"]))].update(sha256="zz"), "sha256"),
    (lambda m: m.update(totals=[]), "totals"),
    (lambda m: m.update(format_version=99), "format version"),
])
def test_malformed_manifest_is_one_artifact_error(mixed, tmp_path, edit, field):
    bad = tmp_path / "bad"
    shutil.copytree(mixed[0], bad)
    m = json.loads((bad / "moeq.json").read_text())
    edit(m)
    (bad / "moeq.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match=field):
        api.load(bad)
    r = CliRunner().invoke(app, ["inspect", str(bad)])
    assert r.exit_code == 2 and r.output.count("\n") <= 2 and "error:" in r.output


def test_dump_recipe_prints_the_resolved_rules():
    r = CliRunner().invoke(app, ["quantize", "--method", "gptq", "-O", "bits=3", "--lm-head", "--dump-recipe"])
    assert r.exit_code == 0, r.output
    rules = __import__("yaml").safe_load(r.output)["rules"]
    assert rules == [{"targets": ["attention", "dense_mlp", "expert", "shared_expert", "lm_head"], "method": "gptq",
                      "options": {"bits": 3}}]
    bad = CliRunner().invoke(app, ["quantize", "--method", "gptq", "-O", "bitz=3", "--dump-recipe"])
    assert bad.exit_code == 2 and "bitz" in bad.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on machines without CUDA")
def test_device_cuda_without_a_gpu_is_one_line_before_loading(tmp_path):
    r = CliRunner().invoke(app, ["quantize", "--method", "gptq", "--device", "cuda", "-o", str(tmp_path / "o")])
    assert r.exit_code == 2 and "no CUDA device" in r.output and not (tmp_path / "o").exists()


def test_int8_calibrates_on_the_float_model_and_gptq_on_the_quantized_layers(tmp_path):
    """int8's statistics (absmax, hits) are taken from the float model's activations, one forward per layer that
    also makes the next layer's inputs; GPTQ's Hessians from what the already-quantized layers produce. Checked
    through the second layer's smoothing scales, which follow from the float model's input to its q/k/v."""
    from safetensors.torch import load_file

    from moeq.quant.int8 import smoothing_scales
    from tests.test_calib import _capture
    calib = torch.randint(0, V, (4, 32), generator=torch.Generator().manual_seed(5))
    ref, seen = build("mixtral"), {}
    hook = _capture(ref.model.layers[1].self_attn.q_proj, seen, "x")
    with torch.no_grad():
        ref(input_ids=calib)
    hook.remove()
    name = "model.layers.1.self_attn.q_proj.weight"
    expected = smoothing_scales(seen["x"].abs().amax(0), ref.get_parameter(name).float(), 0.5)

    runs = {"int8": Recipe(method="int8"), "gptq": Recipe(method="gptq"),
            "mixed": Recipe(rules=[{"targets": ["attention"], "method": "int8"},
                                   {"targets": ["expert"], "method": "gptq"}])}
    for label, recipe in runs.items():
        api.quantize_model(build("mixtral"), tmp_path / label, recipe, calib_ids=calib)
    manifests = {k: json.loads((tmp_path / k / "moeq.json").read_text()) for k in runs}
    assert manifests["int8"]["calibration"]["layer_inputs"] == "float layers"
    assert manifests["gptq"]["calibration"]["layer_inputs"] == "quantized layers"
    assert manifests["mixed"]["calibration"]["layer_inputs"] == "quantized layers"  # one method needs them: all see them

    def smooth(label):
        e = manifests[label]["tensors"][name]
        return load_file(str(tmp_path / label / e["shard"]))[f"{name}.smooth"]
    torch.testing.assert_close(smooth("int8"), expected, rtol=1e-6, atol=0)
    # the sequential run's second layer saw the int8 first layer's outputs: visibly different scales
    assert not torch.allclose(smooth("mixed"), expected, rtol=1e-4, atol=0)
