from pathlib import Path

import pytest

from moeq.errors import MoeqError
from moeq.recipes import load_recipe

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_validates(path):
    r = load_recipe(path)
    q, cfg = r.method_config()
    assert q.name == r.method


def test_typos_are_errors(tmp_path):
    for text, needle in [("methd: int8\n", "methd"), ("method: int8\noptions: {mode: w4a4}\n", "mode"),
                         ("calibration: {samples: 0}\n", "samples"), ("- a\n", "mapping")]:
        p = tmp_path / "r.yaml"
        p.write_text(text)
        with pytest.raises(MoeqError, match=needle):
            load_recipe(p).method_config()
