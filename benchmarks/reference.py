"""What the quality benchmarks share: the float model, the eval windows and its perplexity, measured first in the
same run (protocol: gptq, first N windows of the embedded eval split; ../shared/anchors/PROTOCOL.md)."""

from __future__ import annotations

import os
import time

import torch

from moeq.data.corpus import load_text
from moeq.eval.perplexity import perplexity, tokenize_windows
from moeq.models.loader import load_model


def set_threads() -> None:
    """The quality benchmarks' threads: 2 (the anchors' machine), or ``OMP_NUM_THREADS`` when set (e.g. 1 each for
    two benchmarks side by side: forcing 2 there oversubscribes the cores and runs ~7x slower)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", 2)))


def float_reference(model: str, seqlen: int, windows: int):
    """(float model, tokenizer, eval windows, its PplResult), with the float perplexity printed."""
    set_threads()
    base, tok, _ = load_model(model)
    wins = tokenize_windows(tok, load_text("wiki", "eval"), seqlen, windows)
    t = time.perf_counter()
    rb = perplexity(base, wins)
    print(f"{model} float: ppl {rb.ppl:.4f} ({rb.describe()}) {time.perf_counter() - t:.0f}s", flush=True)
    return base, tok, wins, rb


def paired_nll(result, ref) -> dict:
    """Per-token NLL difference of ``result`` against ``ref`` (PplResults of one ``compare`` pass, the same
    windows): the mean over windows, its standard error (windows as samples) and how many windows are better."""
    import math
    per_token = ref.tokens / ref.windows  # every window scores the same positions (gptq protocol)
    d = [(a - b) / per_token for a, b in zip(result.extra["window_nll"], ref.extra["window_nll"])]
    mean = math.fsum(d) / len(d)
    se = math.sqrt(math.fsum((x - mean) ** 2 for x in d) / (len(d) - 1) / len(d))
    return {"mean": mean, "se": se, "windows_better": sum(x < 0 for x in d)}
