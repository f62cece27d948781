from pathlib import Path

import pytest
import yaml

from moeq.errors import MoeqError
from moeq.models.adapter import find_targets
from moeq.pipeline.plan import Plan
from moeq.recipes import Recipe, load_recipe
from tests.tiny_models import build

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    r = load_recipe(path)
    for rule, q, cfg in r.methods():
        assert q.name == rule.method


def test_typos_are_errors(tmp_path):
    for text, needle in [("methd: int8\n", "methd"), ("method: int8\noptions: {mode: w4a4}\n", "mode"),
                         ("calibration: {samples: 0}\n", "samples"), ("- a\n", "mapping"),
                         ("rules: [{targets: [expert], method: int8, optons: {}}]\n", "optons"),
                         ("rules: [{targets: [expert], method: nosuch}]\n", "nosuch"),
                         ("rules: [{targets: ['re:(('], method: int8}]\n", "pattern"),
                         ("method: int8\nrules: [{targets: [expert], method: int8}]\n", "either")]:
        p = tmp_path / "r.yaml"
        p.write_text(text)
        with pytest.raises(MoeqError, match=needle):
            load_recipe(p).methods()


def test_shorthand_resolves_to_one_rule_and_dumps():
    r = Recipe(method="int8", options={"mode": "weight_only"}, include_lm_head=True)
    rules = r.resolved().rules
    assert len(rules) == 1 and rules[0].targets[-1] == "lm_head" and rules[0].options == {"mode": "weight_only"}
    back = Recipe(**yaml.safe_load(r.dump()))
    assert back.resolved().rules == rules


def test_plan_first_match_wins_ignore_and_routers():
    m = build("qwen2_moe")
    targets = find_targets(m)
    r = Recipe(rules=[{"targets": ["re:.*layers\\.0\\..*q_proj"], "method": "rtn", "options": {"bits": 3}},
                      {"targets": ["attention"], "method": "int8"},
                      {"targets": ["expert", "shared_expert"], "method": "rtn"}],
               ignore=["re:.*layers\\.1\\.mlp\\.shared_expert\\.down_proj"])
    plan = Plan(r, targets)
    by = {t.name: plan.of.get(t) for t in targets}
    assert by["model.layers.0.self_attn.q_proj.weight"].rule == 0   # the first matching rule wins
    assert by["model.layers.1.self_attn.q_proj.weight"].rule == 1
    assert by["model.layers.0.mlp.experts.gate_up_proj.3"].method == "rtn"
    assert by["model.layers.1.mlp.shared_expert.down_proj.weight"] is None  # ignored
    assert by["model.layers.0.mlp.shared_expert_gate.weight"] is None      # a router: no kind but router selects it
    assert by["lm_head.weight"] is None
    routers = Plan(Recipe(rules=[{"targets": ["router"], "method": "int8"}]), targets)
    assert {t.role for t in routers.targets} == {"router"}


def test_plan_that_selects_nothing_is_an_error():
    with pytest.raises(MoeqError, match="selects no"):
        Plan(Recipe(rules=[{"targets": ["re:nothing"], "method": "int8"}]), find_targets(build("mixtral")))


def test_method_shorthand_takes_the_methods_default_kinds():
    """qmoe compresses experts only by default; a dense model then has nothing it selects, and says so."""
    assert Recipe(method="qmoe").resolved().rules[0].targets == ["expert"]
    assert "attention" in Recipe(method="gptq").resolved().rules[0].targets
    from tests.tiny_models import build as build_tiny
    with pytest.raises(MoeqError, match="selects expert; the model has"):
        Plan(Recipe(method="qmoe"), [t for t in find_targets(build_tiny("mixtral")) if t.role != "expert"])


@pytest.mark.parametrize("text, where, needle", [
    ("method: int8\noptions:\n  treshold: 6\n", ":3: options.treshold", "did you mean 'threshold'?"),
    ("model: tiny-moe\nrules:\n  - targets: [expert]\n    method: gptq\n    options: {bits: 3, grup_size: 64}\n",
     ":5: rules[0].options.grup_size", "did you mean 'group_size'?"),
    ("rules:\n  - targets: [expert]\n    method: gtpq\n", ":3: rules[0].method", "did you mean 'gptq'?"),
    ("method: int8\ncalibration:\n  seed: 1\n  sampels: 4\n", ":4: calibration.sampels", "did you mean 'samples'?"),
    ("method: int8\neval: {windows: 4, protocl: gptq}\n", ":2: eval.protocl", "did you mean 'protocol'?"),
    ("method: int8\neval:\n  protocol: gtpq\n", ":3: eval.protocol", "did you mean 'gptq'?"),
    ("method: int8\nexpect:\n  max_ppl_ration: 1.1\n", ":3: expect.max_ppl_ration", "did you mean 'max_ppl_ratio'?"),
    ("method: int8\nexpect:\n  max_kl: lots\n", ":3: expect.max_kl", "valid number"),
    ("method: int8\nevall: {}\n", ":2: evall", "did you mean 'eval'?"),
    ("version: 2\nmethod: int8\n", ":1: version", "not supported"),
    ("method: int8\nmethod: gptq\n", ":2: method", "repeated key (first on line 1)"),
])
def test_errors_name_file_line_field_and_the_closest_name(tmp_path, text, where, needle):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    with pytest.raises(MoeqError) as e:
        load_recipe(p).methods()
    msg = str(e.value)
    assert msg.startswith(f"{p}{where}:"), msg
    assert needle in msg, msg
    if "unknown field" in msg:
        assert "(allowed: " in msg


def test_unknown_option_lists_the_methods_allowed_options(tmp_path):
    p = tmp_path / "r.yaml"
    p.write_text("method: nupes\noptions: {bitz: 3}\n")
    with pytest.raises(MoeqError) as e:
        load_recipe(p).methods()
    from moeq.registry import QUANTIZERS
    assert f"(allowed: {', '.join(QUANTIZERS.get('nupes').Config.model_fields)})" in str(e.value)


def test_eval_and_expect_schema():
    r = Recipe(method="int8", eval={"protocol": "llama.cpp", "seqlen": 512}, expect={"min_decode_speedup": 0.5})
    assert r.eval.protocol == "llamacpp" and r.eval_spec().speed  # a speed limit turns speed measurement on
    assert not Recipe(method="int8", expect={"max_kl": 0.1}).eval_spec().speed
    with pytest.raises(ValueError, match="sliding protocol only"):
        Recipe(method="int8", eval={"stride": 128})
    back = Recipe(**yaml.safe_load(r.dump()))
    assert back.expect == r.expect and back.eval == r.eval and back.version == 1


def test_shipped_recipes_cover_every_pipeline_for_both_models_with_expect():
    by = {p.stem: load_recipe(p) for p in RECIPES}
    for model, prefix in (("tiny-moe", "tiny-moe-"), ("smollm2-135m", "smollm2-")):
        mine = {k: r for k, r in by.items() if k.startswith(prefix)}
        assert all(r.model == model and r.eval is not None and r.expect is not None for r in mine.values()), model
        methods = {m for r in mine.values() for m in r.method_label().split("+")}
        assert {"int8", "gptq", "nupes", "qmoe", "matryoshka"} <= methods, (model, methods)
        assert any("+" in r.method_label() for r in mine.values()), f"{model}: no mixed recipe"


def test_resume_key_ignores_eval_expect_and_output_but_not_rules():
    from moeq.pipeline.run import run_key
    targets = find_targets(build("qwen2_moe"))
    base = dict(method="rtn", options={"bits": 4})
    key = run_key(Plan(Recipe(**base), targets), "m", None)
    edited = Recipe(**base, output="elsewhere", eval={"windows": 3}, expect={"max_ppl_ratio": 1.1})
    assert run_key(Plan(edited, targets), "m", None) == key      # an edited limit resumes the same run
    assert run_key(Plan(Recipe(method="rtn", options={"bits": 3}), targets), "m", None) != key
