"""The CLI end to end on a tiny local model, and every kind of bad input: one line, non-zero exit, no
traceback, no partial output."""

import json
import re
import os

import pytest
from typer.testing import CliRunner

from moeq.cli.app import app

runner = CliRunner()
FAST = ["--calib-samples", "4", "--calib-seqlen", "64"]


def run(*args, env=None):
    r = runner.invoke(app, [str(a) for a in args], env=env)
    return r.exit_code, r.output  # stdout and stderr together


def assert_one_line_error(code, out, needle):
    assert code != 0
    assert "Traceback" not in out
    lines = [ln for ln in out.splitlines() if ln.strip()]
    err = [ln for ln in lines if ln.startswith("error:")]
    assert len(err) == 1, out
    assert needle.lower() in " ".join(lines).lower(), out


@pytest.fixture(scope="module")
def artifact(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "packed"
    code, text = run("quantize", tiny_model_dir, "-o", out, *FAST, "--json", out.parent / "q.json")
    assert code == 0, text
    return out


def test_quantize_writes_self_describing_artifact(artifact):
    files = sorted(p.name for p in artifact.iterdir())
    assert "moeq.json" in files and "config.json" in files and "tokenizer.json" in files
    assert any(f.startswith("model-00001-of-") for f in files)
    cfg = json.loads((artifact / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "moeq"
    m = json.loads((artifact / "moeq.json").read_text())
    e = m["tensors"]["model.layers.0.mlp.experts.gate_up_proj.3"]
    assert e["codec"] == "int8-rows" and e["codec_version"] == 1 and e["shape"] == [192, 64] and len(e["sha256"]) == 64
    assert e["calib_tokens"] >= 0
    assert m["calibration"]["split"] == "calib"
    assert not [p for p in artifact.parent.iterdir() if "moeq-tmp" in p.name]


def test_inspect_and_methods(artifact):
    code, out = run("inspect", artifact)
    assert code == 0, out
    assert "experts.gate_up_proj" in out and "int8-rows" in out and "total quantized" in out
    assert re.search(r"model\.layers\.1\.mlp\.experts\s*│\s*3\s*│\s*int8", out), out  # module, expert, method
    code, out = run("methods")
    assert code == 0 and "int8" in out and "int8-rows" in out


def test_eval_reports_ppl_kl_speed(artifact, tmp_path):
    js = tmp_path / "e.json"
    code, out = run("eval", artifact, "--windows", "2", "--seqlen", "64", "--json", js)
    assert code == 0, out
    res = json.loads(js.read_text())
    assert res["ppl"]["protocol"] == "gptq" and res["ppl"]["windows"] == 2
    assert res["kl_mean"] is not None and res["kl_mean"] >= 0
    assert 0.9 < res["ppl_ratio"] < 1.1
    assert res["speed"]["decode_tok_s"] > 0 and res["bits_per_param"] > 8


def test_missing_model_path(tmp_path):
    out = tmp_path / "o"
    code, text = run("quantize", tmp_path / "nope", "-o", out)
    assert_one_line_error(code, text, "no such")
    assert not out.exists()


def test_offline_hub_id(tmp_path):
    out = tmp_path / "o"
    code, text = run("quantize", "mistralai/Mixtral-8x7B-v0.1", "-o", out, env={"HF_HUB_OFFLINE": "1"})
    assert_one_line_error(code, text, "offline alternatives")
    assert "tiny-moe" in text and not out.exists()


def test_bad_threshold(tiny_model_dir, tmp_path):
    out = tmp_path / "o"
    code, text = run("quantize", tiny_model_dir, "-o", out, "--threshold", "-1")
    assert_one_line_error(code, text, "threshold")
    assert not out.exists()


def test_recipe_typo(tiny_model_dir, tmp_path):
    r = tmp_path / "r.yaml"
    r.write_text("method: int8\noptions:\n  treshold: 6\n")
    code, text = run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--recipe", r)
    assert_one_line_error(code, text, "treshold")


def test_unknown_method(tiny_model_dir, tmp_path):
    code, text = run("quantize", tiny_model_dir, "-o", tmp_path / "o", "--method", "int3")
    assert_one_line_error(code, text, "unknown method")


def _copy(artifact, tmp_path):
    import shutil
    dst = tmp_path / "copy"
    shutil.copytree(artifact, dst)
    return dst


def test_truncated_shard(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    shard = sorted(a.glob("model-*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    code, text = run("eval", a, "--windows", "1", "--seqlen", "64", "--no-speed")
    assert_one_line_error(code, text, "truncated")


def test_flipped_byte_fails_checksum(artifact, tmp_path):
    a = _copy(artifact, tmp_path)
    shard = sorted(a.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-100] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, text = run("eval", a, "--windows", "1", "--seqlen", "64", "--no-speed")
    assert_one_line_error(code, text, "checksum")


@pytest.mark.parametrize("field,value,needle", [("codec", "int9-magic", "unknown codec"),
                                                ("codec_version", 99, "version 99")])
def test_unknown_codec_or_version(artifact, tmp_path, field, value, needle):
    a = _copy(artifact, tmp_path)
    m = json.loads((a / "moeq.json").read_text())
    next(iter(m["tensors"].values()))[field] = value
    (a / "moeq.json").write_text(json.dumps(m))
    for cmd in (["inspect", a], ["eval", a, "--windows", "1", "--seqlen", "64", "--no-speed"]):
        code, text = run(*cmd)
        assert_one_line_error(code, text, needle)


def test_existing_output_is_not_overwritten(artifact, tiny_model_dir):
    before = sorted(os.listdir(artifact))
    code, text = run("quantize", tiny_model_dir, "-o", artifact, "--weight-only")
    assert_one_line_error(code, text, "not empty")
    assert sorted(os.listdir(artifact)) == before
