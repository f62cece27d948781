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
