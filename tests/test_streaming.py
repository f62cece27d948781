"""Streaming from shards in the published per-expert layout, resume after kill -9, byte-identical artifacts."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from moeq import api
from moeq.recipes import Recipe


def save_published_layout(model, tok, d, shards=3):
    """Save a transformers-5 Mixtral as the published checkpoints are laid out: per-expert w1/w2/w3 under
    ``block_sparse_moe``, several shards and an index."""
    sd = {}
    for k, v in model.state_dict().items():
        k2 = k.replace(".mlp.", ".block_sparse_moe.")
        if k.endswith("experts.gate_up_proj"):
            inter = v.shape[1] // 2
            for e in range(v.shape[0]):
                sd[k2.replace("gate_up_proj", f"{e}.w1.weight")] = v[e, :inter].clone()
                sd[k2.replace("gate_up_proj", f"{e}.w3.weight")] = v[e, inter:].clone()
        elif k.endswith("experts.down_proj"):
            for e in range(v.shape[0]):
                sd[k2.replace("down_proj", f"{e}.w2.weight")] = v[e].clone()
        elif k != "lm_head.weight" or not model.config.tie_word_embeddings:
            sd[k2] = v.clone()
    keys = sorted(sd)
    d.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for i in range(shards):
        part = keys[i::shards]
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].to(torch.bfloat16).contiguous() for k in part}, str(d / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    model.config.save_pretrained(d)
    tok.save_pretrained(d)
    return sorted(sd)


@pytest.fixture(scope="module")
def published(tiny_model_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    d = tmp_path_factory.mktemp("pub") / "mixtral-layout"
    keys = save_published_layout(m, AutoTokenizer.from_pretrained(tiny_model_dir), d)
    assert any(".block_sparse_moe.experts.3.w1.weight" in k for k in keys)
    return d


def _digest(path):
    h = hashlib.sha256()
    for p in sorted(path.iterdir()):
        h.update(p.name.encode())
        h.update(p.read_bytes())
    return h.hexdigest()


def _quantize(model_dir, out, *extra, env=None):
    cmd = [sys.executable, "-m", "moeq", "quantize", str(model_dir), "-o", str(out),
           "--calib-samples", "8", "--calib-seqlen", "64", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600)


def test_streamed_equals_in_memory_and_maps_per_expert_layout(published, tiny_model_dir, tmp_path):
    """The streaming reader maps w1/w3 -> gate_up_proj and w2 -> down_proj exactly as transformers does."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeq.models.loader import load_model
    from moeq.models.stream import CheckpointReader
    reader = CheckpointReader(published)
    m, tok, _ = load_model(str(published))  # transformers' own loader on the same files
    for name, p in m.state_dict().items():
        if name == "lm_head.weight":
            continue
        assert torch.equal(reader.tensor(name).float(), p.float()), name
    recipe = Recipe(method="int8", calibration={"samples": 8, "seqlen": 64})
    streamed = api.quantize(recipe.model_copy(update={"model": str(published)}), tmp_path / "s")
    calib = api.calibration_ids(tok, recipe)
    in_mem = api.quantize_model(m, tmp_path / "m", recipe, tokenizer=tok, source=str(published), calib_ids=calib)
    assert streamed["quantized_params"] == in_mem["quantized_params"]
    a = json.loads((tmp_path / "s" / "moeq.json").read_text())["tensors"]
    b = json.loads((tmp_path / "m" / "moeq.json").read_text())["tensors"]
    assert {k: v["sha256"] for k, v in a.items()} == {k: v["sha256"] for k, v in b.items()}


def test_streamed_data_free_with_lm_head_equals_in_memory(published, tmp_path):
    """Data-free streaming reads each layer in the checkpoint dtype (bf16 here) and still writes the bytes of the
    in-memory float32 run; a quantized lm_head is read with the head group and stored once (packed, not kept)."""
    from moeq.models.loader import load_model
    recipe = Recipe(model=str(published), method="int8", options={"mode": "weight_only"}, include_lm_head=True)
    streamed = api.quantize(recipe, tmp_path / "s")
    m, tok, _ = load_model(str(published))
    in_mem = api.quantize_model(m, tmp_path / "m", recipe, tokenizer=tok, source=str(published))
    assert streamed["quantized_params"] == in_mem["quantized_params"]
    a = json.loads((tmp_path / "s" / "moeq.json").read_text())
    b = json.loads((tmp_path / "m" / "moeq.json").read_text())
    assert "lm_head.weight" in a["tensors"] and "lm_head.weight" not in a["kept"]
    assert {k: v["sha256"] for k, v in a["tensors"].items()} == {k: v["sha256"] for k, v in b["tensors"].items()}
    assert set(a["kept"]) == set(b["kept"])
    assert {v["dtype"] for v in a["kept"].values()} == {"bfloat16"}  # the checkpoint's dtype, as read


MODES = {"calibrated": [], "data-free": ["--weight-only"]}


@pytest.fixture(scope="module")
def clean_runs(published, tmp_path_factory):
    """The one-process, uninterrupted artifact of each mode: what every other run must reproduce byte for byte."""
    out = {}
    for name, extra in MODES.items():
        d = tmp_path_factory.mktemp("clean") / name
        r = _quantize(published, d, *extra)
        assert r.returncode == 0, r.stderr
        out[name] = _digest(d)
    return out


@pytest.mark.parametrize("mode", MODES)
def test_kill_and_resume_is_byte_identical(published, clean_runs, tmp_path, mode):
    mode, clean = MODES[mode], clean_runs[mode]
    out = tmp_path / "resumed"
    killed = _quantize(published, out, *mode, env={"MOEQ_CRASH_AFTER_GROUPS": "2"})
    assert killed.returncode == -9
    assert not out.exists() and (tmp_path / ".resumed.moeq-tmp").is_dir()
    again = _quantize(published, out, *mode)
    assert again.returncode == 0, again.stderr
    assert "resuming" in again.stderr
    assert _digest(out) == clean
    assert not (tmp_path / ".resumed.moeq-tmp").exists()


def test_resume_with_other_recipe_refuses_to_mix(published, tmp_path):
    out = tmp_path / "o"
    assert _quantize(published, out, env={"MOEQ_CRASH_AFTER_GROUPS": "2"}).returncode == -9
    other = _quantize(published, out, "--threshold", "3")
    assert other.returncode == 2
    assert "refusing to mix" in other.stderr and "Traceback" not in other.stderr


def test_activation_spill_is_transparent(tiny_model_dir, tmp_path, monkeypatch):
    """With a tiny activation cap every calibration batch spills to disk; the artifact is unchanged."""
    from moeq.models import layers
    recipe = Recipe(model=str(tiny_model_dir), method="int8", calibration={"samples": 8, "seqlen": 64})
    api.quantize(recipe, tmp_path / "mem")
    spilled = []
    orig = layers.Activations.append

    def spy(self, args, kwargs):
        self.cap = 0
        orig(self, args, kwargs)
        spilled.append(self.spilled)
    monkeypatch.setattr(layers.Activations, "append", spy)
    api.quantize(recipe, tmp_path / "spill")
    assert spilled and max(spilled) > 0
    assert _digest(tmp_path / "mem") == _digest(tmp_path / "spill")


@pytest.mark.parametrize("mode", MODES)
def test_two_processes_write_the_same_artifact(published, clean_runs, tmp_path, mode):
    two = _quantize(published, tmp_path / "two", *MODES[mode], "--workers", "2")
    assert two.returncode == 0, two.stderr
    assert _digest(tmp_path / "two") == clean_runs[mode]


def _rewrite(src, dst, drop: str):
    """``src``'s checkpoint as one shard without the key ``drop`` (config and tokenizer copied)."""
    import shutil

    from safetensors import safe_open
    dst.mkdir()
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as h:
            sd.update({k: h.get_tensor(k) for k in h.keys() if k != drop})
    save_file(sd, str(dst / "model.safetensors"), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix != ".safetensors" and f.name != "model.safetensors.index.json":
            shutil.copy(f, dst / f.name)
    return dst


@pytest.mark.parametrize("drop,message", [
    ("model.layers.1.post_attention_layernorm.weight", "lacks model.layers.1.post_attention_layernorm.weight"),
    ("model.layers.1.block_sparse_moe.experts.2.w3.weight", "3 tensors match"),
])
def test_checkpoint_lacking_a_tensor_fails_in_one_line(published, tmp_path, drop, message):
    from moeq.errors import ModelLoadError
    src = _rewrite(published, tmp_path / "ckpt", drop)
    with pytest.raises(ModelLoadError) as err:
        api.quantize(Recipe(model=str(src), method="int8", options={"mode": "weight_only"}), tmp_path / "o")
    assert message in str(err.value) and "\n" not in str(err.value)
    assert not (tmp_path / "o").exists()


def test_expert_stacks_are_reused_only_once_released(published):
    """The reader fills a released [E, ...] stack again instead of allocating one (fresh pages cost a fault each),
    and never one that a parameter, a view or a name still holds."""
    from moeq.models.stream import CheckpointReader
    reader = CheckpointReader(published)
    a, b = "model.layers.0.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.gate_up_proj"
    t0 = reader.tensor(a)
    ptr, want = t0.data_ptr(), t0.clone()
    held = t0[0]                                   # a view holds the storage: no reuse
    t1 = reader.tensor(b)
    assert t1.data_ptr() != ptr and torch.equal(reader.tensor(a), want)
    p = torch.nn.Parameter(t1, requires_grad=False)  # as materialize installs it
    del held, t0, t1
    t2 = reader.tensor(a)                          # layer 0's stack is free again; layer 1's is held by p
    assert t2.data_ptr() == ptr and torch.equal(t2, want)
    assert p.data_ptr() != ptr and torch.equal(p, reader.tensor(b))


def test_converter_chains_beyond_the_in_place_merge_run_transformers_ops(published):
    """Expert merges followed by other operations stack each source in place, then run the rest of the chain with
    transformers' own ``WeightConverter.convert``: the same tensors as the in-place merge."""
    import copy

    from transformers.core_model_loading import Concatenate, MergeModulelist, Transpose

    from moeq.models.stream import CheckpointReader
    reader = CheckpointReader(published)
    for name, ops in (("model.layers.0.mlp.experts.gate_up_proj", [Concatenate(dim=1)]),
                      ("model.layers.1.mlp.experts.down_proj", [])):
        fast = reader.tensor(name)
        src = reader.sources[name]
        assert [type(op) for op in src.converter.operations] == [MergeModulelist] + [type(op) for op in ops]
        conv = copy.deepcopy(src.converter)
        conv.operations = [MergeModulelist(dim=0), *ops, Transpose(1, 2)]
        src.converter = conv
        assert torch.equal(reader.tensor(name), fast.transpose(1, 2)), name
