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


@pytest.fixture
def columns80():
    """The CLI's consoles at 80 columns (they read COLUMNS once, at import: conftest's 220)."""
    from moeq.cli.common import console, err_console
    before = console.width, err_console.width
    console.width = err_console.width = 80
    yield
    console.width, err_console.width = before


def test_inspect_and_methods(artifact, columns80):
    code, out = run("inspect", artifact)
    assert code == 0, out
    assert "expert gate_up_proj" in out and "int8-rows" in out and "quantized" in out
    assert "…" not in out and max(len(ln) for ln in out.splitlines()) <= 80, out  # nothing cut at 80 columns
    assert re.search(r"^\s*1\s+3\s+int8\s", out, re.M), out  # per expert: layer, expert, method
    code, out = run("methods")
    assert code == 0 and "int8" in out and "int8-rows" in out
    assert "``" not in out and "False" not in out  # docstrings rendered; defaults as a recipe writes them


def test_eval_reports_ppl_kl_speed(artifact, tiny_model_dir, tmp_path):
    js = tmp_path / "e.json"
    code, out = run("eval", artifact, "--windows", "2", "--seqlen", "64", "--no-speed", "--json", js)
    assert code == 0, out        # the artifact names a local directory as its source: never followed unasked
    assert "no baseline" in out and "--baseline PATH" in out
    assert json.loads(js.read_text())["baseline"] is None
    code, out = run("eval", artifact, "--windows", "2", "--seqlen", "64", "--baseline", tiny_model_dir, "--json", js)
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


# -- bad input: one line, exit 2, before any heavy work ------------------------------------------------------------
def _bad_inputs(tmp, art, readme):
    """(argv, what the one line says): the README's bad-input table."""
    return [
        (["quantize", "tiny-moe", "-o", "/proc/moeq-out"], "cannot write in /proc"),
        (["quantize", "tiny-moe", "-o", f"{readme}/sub"], "is not a directory"),
        (["quantize", "--threshold", "abc"], "invalid value for '--threshold'"),
        (["quantize", "--workers", "0"], "invalid value for '--workers'"),
        (["quantize", "--frobnicate"], "no such option: --frobnicate"),
        (["quantize", "-o", f"{tmp}/o", "--json", f"{tmp}/no-dir/q.json"], "no such directory"),
        (["quantize", "-o", f"{tmp}/o", "--recipe", f"{tmp}/none.yaml"], "no such file"),
        (["quantize", f"{tmp}/no-model", "-o", f"{tmp}/o"], "no such file or directory"),
        (["quantize", "-o", art], "not empty"),
        (["eval", f"{tmp}/does-not-exist"], "no such file or directory"),
        (["eval", art, "--seqlen", "100000"], "beyond the model's context of 256"),
        (["eval", art, "--seqlen", "abc"], "invalid value for '--seqlen'"),
        (["eval", art, "--windows", "0"], "--windows"),
        (["eval", art, "--corpus", f"{tmp}/none.txt"], "no such file"),
        (["eval", art, "--protocol", "ppl"], "unknown protocol"),
        (["eval", art, "--max-memory", "lots"], "--max-memory"),
        (["inspect", readme], "not a directory"),
        (["inspect", f"{tmp}/none"], "no such artifact directory"),
        (["inspect"], "missing argument"),
    ]


def test_bad_input_is_one_line_exit_2(artifact, tmp_path):
    readme = os.path.join(os.path.dirname(os.path.dirname(__file__)), "README.md")
    for argv, needle in _bad_inputs(tmp_path, artifact, readme):
        code, out = run(*argv)
        assert code == 2, (argv, out)
        assert_one_line_error(code, out, needle)
        assert "load" not in out.lower().replace("loaded", ""), (argv, out)  # refused before any loading
    assert not (tmp_path / "o").exists()


def test_seqlen_beyond_context_with_allow_long_context_warns(artifact, tmp_path):
    js = tmp_path / "e.json"
    code, out = run("eval", artifact, "--seqlen", "300", "--windows", "1", "--no-speed", "--no-baseline",
                    "--allow-long-context", "--json", js)
    assert code == 0, out
    assert "warning: --seqlen 300 is beyond the model's context of 256" in out
    res = json.loads(js.read_text())
    assert res["long_context"] is True and res["context"] == 256


@pytest.mark.parametrize("edit,needle", [
    (lambda m: m["recipe"].pop("rules"), "recipe.rules"),
    (lambda m: next(iter(m["tensors"].values())).pop("module"), ".module: field required"),
    (lambda m: next(iter(m["tensors"].values())).update(shape=[64, "64"]), ".shape.1"),
    (lambda m: next(iter(m["kept"].values())).update(shard="../../etc/passwd"), "not a plain file name"),
    (lambda m: m["totals"].update(total_bytes=1), "totals.total_bytes"),
])
def test_hand_edited_manifest_is_one_line(artifact, tmp_path, edit, needle):
    a = _copy(artifact, tmp_path)
    m = json.loads((a / "moeq.json").read_text())
    edit(m)
    (a / "moeq.json").write_text(json.dumps(m))
    for cmd in (["inspect", a], ["eval", a, "--windows", "1", "--seqlen", "64", "--no-speed", "--no-baseline"]):
        code, text = run(*cmd)
        assert code == 2, text
        assert_one_line_error(code, text, needle)
        assert "moeq.json" in text


# -- interruption ------------------------------------------------------------------------------------------------
def _interrupt_after(monkeypatch, groups: int):
    from moeq.pipeline import run as run_mod
    real = run_mod.Run.process
    seen = []

    def process(self, g):
        if len(seen) == groups:
            raise KeyboardInterrupt
        seen.append(g.label)
        return real(self, g)
    monkeypatch.setattr(run_mod.Run, "process", process)


def test_ctrl_c_keeps_the_finished_layers_and_says_how_to_resume(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    args = ("quantize", tiny_model_dir, "-o", out, "--weight-only")
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        code, text = run(*args)
    assert code == 130, text
    assert "Traceback" not in text
    assert "interrupted: 2 finished layer groups kept in" in text and "--fresh" in text, text
    assert (tmp_path / ".o.moeq-tmp").is_dir() and not out.exists()
    code, text = run(*args)  # the same command resumes
    assert code == 0, text
    assert re.search(r"resumed\s+2 layer groups", text), text
    assert not (tmp_path / ".o.moeq-tmp").exists()


def test_fresh_discards_the_resume_state(tiny_model_dir, tmp_path, monkeypatch):
    out = tmp_path / "o"
    args = ("quantize", tiny_model_dir, "-o", out, "--weight-only")
    with monkeypatch.context() as mp:
        _interrupt_after(mp, 2)
        assert run(*args)[0] == 130
    code, text = run(*args, "--fresh")
    assert code == 0, text
    assert "resumed" not in text and out.is_dir()


def test_sigterm_behaves_like_ctrl_c():
    import signal
    import time

    import typer

    from moeq.cli.common import OneLineGroup, one_line_errors
    app2 = typer.Typer(cls=OneLineGroup)

    @app2.command()
    @one_line_errors(on_interrupt=lambda kwargs: "3 groups kept (test)")
    def work():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)

    @app2.command()
    def idle():
        pass

    before = signal.getsignal(signal.SIGTERM)
    t0 = time.perf_counter()
    r = runner.invoke(app2, ["work"])
    assert r.exit_code == 130 and "interrupted: 3 groups kept (test)" in r.output, r.output
    assert time.perf_counter() - t0 < 5
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the command's only


def test_a_progress_bar_stops_where_the_work_stopped():
    import io

    from rich.console import Console

    from moeq.progress import RichReporter
    rep = RichReporter(Console(file=io.StringIO(), width=80))
    with pytest.raises(KeyboardInterrupt), rep:
        with rep.task("quantize", 10) as task:
            task.advance(3, layer="layer.2")
            raise KeyboardInterrupt
    t = rep.progress.tasks[0]
    assert t.completed == 3 and "stopped" in t.description and t.fields["info"] == "layer.2"  # no "layer layer.2"
    rep = RichReporter(Console(file=io.StringIO(), width=80))
    with rep, rep.task("load", None):
        pass
    assert rep.progress.tasks[0].finished  # a spinner ends as done
