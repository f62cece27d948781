"""Artifacts are untrusted input: 1,000 seeded mutations of one tiny artifact (and of the recipes) are each refused
with one MoeqError or loaded with logits identical to the pristine artifact's (``tests/fuzzing.py`` says which
class may do what); named attacks are checked one by one. ``python benchmarks/fuzz.py N`` runs more cases."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter

import pytest
import torch

from moeq.errors import ArtifactError, MoeqError
from tests import fuzzing

CASES = 1000
SEED = 0


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    d = tmp_path_factory.mktemp("fuzz") / "base"
    reference = fuzzing.build_base(d)
    from moeq.models.adapter import find_targets
    from tests.tiny_models import build
    return d, reference, find_targets(build("mixtral"))


def test_fuzzed_artifacts_and_recipes_are_refused_or_identical(base, tmp_path):
    d, reference, targets = base
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: a second thread only waits (4x slower on a busy 2-core machine)
    try:
        res = fuzzing.run(SEED, CASES, d, tmp_path / "work", reference, targets)
    finally:
        torch.set_num_threads(threads)
    assert not res["failures"], "\n".join(res["failures"][:10])
    outcomes = Counter()
    for cls, c in res["by_class"].items():
        outcomes.update(c)
    assert sum(outcomes.values()) == CASES
    assert set(res["by_class"]) == set(fuzzing.EXPECT)  # every class drawn
    # the oracle can tell both ways: harmless edits load identically, recipes are accepted as well as refused
    assert outcomes["identical"] > 20 and outcomes["refused"] > 600 and outcomes["accepted"] > 10, outcomes


def test_the_generator_is_seeded():
    a = [(c.cls, c.recipe) for c in fuzzing.generate(3, 50)]
    b = [(c.cls, c.recipe) for c in fuzzing.generate(3, 50)]
    assert a == b and a != [(c.cls, c.recipe) for c in fuzzing.generate(4, 50)]


def _copy(base, tmp_path):
    dst = tmp_path / "a"
    shutil.copytree(base[0], dst)
    return dst


def _refused(path, needle):
    from moeq.formats.inspect import inspect
    for f in (inspect, fuzzing.logits_of):
        with pytest.raises(ArtifactError) as e:
            f(path)
        assert needle in str(e.value), str(e.value)


def _edit(path, fn):
    m = json.loads((path / "moeq.json").read_text())
    fn(m)
    (path / "moeq.json").write_text(json.dumps(m))


def test_a_shard_may_not_point_outside_the_artifact(base, tmp_path):
    a = _copy(base, tmp_path)
    shard = sorted(a.glob("model-*.safetensors"))[0]
    outside = tmp_path / "elsewhere.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    _refused(a, "outside the artifact")


def test_a_shard_name_may_not_leave_the_artifact(base, tmp_path):
    a = _copy(base, tmp_path)
    _edit(a, lambda m: m["shards"].__setitem__(0, "../a/" + m["shards"][0]))
    _refused(a, "not a plain file name")


def test_a_fifo_is_not_opened(base, tmp_path):
    a = _copy(base, tmp_path)
    (a / "config.json").unlink()
    os.mkfifo(a / "config.json")
    _refused(a, "not a regular file")


def test_a_tensor_the_manifest_does_not_list_is_refused(base, tmp_path):
    from safetensors.torch import load_file, save_file
    a = _copy(base, tmp_path)
    shard = sorted(a.glob("model-*.safetensors"))[0]
    tensors = load_file(str(shard))
    tensors["hidden.payload"] = torch.zeros(4)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    _refused(a, "'hidden.payload' that the manifest does not list")


def test_declared_sizes_are_checked_before_reading(base, tmp_path, monkeypatch):
    """A kept tensor declared 2^40 elements is refused from the manifest and the header alone."""
    from moeq.formats.manifest import totals
    a = _copy(base, tmp_path)

    def huge(m):
        next(iter(m["kept"].values())).update(shape=[2**40], bytes=4 * 2**40)
        m["totals"] = totals(m["tensors"], m["kept"], m["shared"])  # a consistent manifest: only the header disagrees
    _edit(a, huge)
    from moeq.formats import container
    monkeypatch.setattr(container.ArtifactReader, "_get", lambda *a, **k: pytest.fail("a tensor was read"))
    _refused(a, "but the manifest's kept.")


def test_non_finite_numbers_and_control_characters_are_refused(base, tmp_path):
    a = _copy(base, tmp_path)
    _edit(a, lambda m: next(iter(m["tensors"].values())).update(bits_per_param=float("nan")))
    _refused(a, "bits_per_param")
    a = _copy(base, tmp_path / "b")
    _edit(a, lambda m: m.update(tool="moeq \x1b[2J"))
    _refused(a, "control character")


def test_an_entry_must_fit_the_model_of_config_json(base, tmp_path):
    a = _copy(base, tmp_path)
    cfg = json.loads((a / "config.json").read_text())
    cfg["intermediate_size"] = 2 * cfg["intermediate_size"]
    (a / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ArtifactError, match=r"tensors\..*\.shape: \[\d+, \d+\], but the model of config.json has"):
        fuzzing.logits_of(a)


def test_config_values_are_typed_and_bounded(base, tmp_path):
    for key, value, needle in [("num_hidden_layers", 10**6, "0..65536"), ("hidden_act", 3, "expected str"),
                               ("num_experts_per_tok", 9, "experts per token"), ("model_type", "evil", "model_type")]:
        a = _copy(base, tmp_path / key)
        cfg = json.loads((a / "config.json").read_text())
        cfg[key] = value
        (a / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(MoeqError, match=needle):
            fuzzing.logits_of(a)


def test_checksums_cover_the_manifest_and_config(tmp_path):
    """An artifact records the sha256 of its manifest (entry meta and options included, which the part hashes do
    not cover) and of config.json: a consistent-looking edit of either is refused; without the checksums (an
    older artifact) it loads."""
    from moeq.pipeline.quantize import quantize_model
    from moeq.recipes import Recipe
    from tests.tiny_models import build
    art = tmp_path / "art"
    quantize_model(build("mixtral"), art, Recipe(**fuzzing.RECIPE))
    fuzzing.logits_of(art)
    for name, edit in [("config.json", lambda c: c.update(rms_norm_eps=c["rms_norm_eps"] * 2)),
                       ("moeq.json", lambda m: next(e for e in m["tensors"].values()
                                                    if e["codec"] == "int8-rows")["meta"].update(threshold=5.0))]:
        a = _copy((art,), tmp_path / name)
        doc = json.loads((a / name).read_text())
        edit(doc)
        (a / name).write_text(json.dumps(doc))
        with pytest.raises(ArtifactError, match=f"{name}: does not match"):
            fuzzing.logits_of(a)
        fuzzing.unseal(a)
        fuzzing.logits_of(a)                       # consistent once the checksums are gone
