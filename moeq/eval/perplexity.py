"""Perplexity under named protocols (``PROTOCOLS``). Always report the protocol with the number.

Every protocol tokenizes the eval text once (documents joined with blank lines, no special tokens), cuts it into
windows of ``seqlen`` tokens (a remainder too short for a window is dropped), runs each window as an independent
sequence (no carried-over context, ``use_cache=False``) and reports ppl = exp(sum NLL / count) over the tokens it
scores; a token at position t of a window is predicted by the logits at t - 1. They differ in the windows and
the scored tokens:

- ``gptq``: non-overlapping windows; every predicted token (positions 1..seqlen-1) is scored.
- ``llamacpp`` (``llama.cpp``): llama.cpp's ``perplexity`` tool. Non-overlapping windows of n_ctx (= seqlen),
  only the second half scored: positions n_ctx/2 + 1 .. n_ctx - 1 (n_ctx - 1 - n_ctx/2 tokens per window). When
  the tokenizer adds a BOS token, the text starts with one and each window's first token is replaced by it.
- ``sliding``: windows of seqlen advancing by ``stride`` (default seqlen/2); the first window scores all its
  predicted tokens, each later one only its last ``stride`` (new) tokens, so every token is scored once with at
  least seqlen - stride tokens of context (transformers' "perplexity of fixed-length models").
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from moeq.errors import MoeqError


@dataclass(frozen=True)
class Protocol:
    """How windows are cut (``stride``: tokens between window starts) and which positions are scored."""
    label: str
    first_scored: Callable[[int, int, int], int]  # (seqlen, window index, stride) -> first scored position
    sliding: bool = False                         # windows overlap (stride < seqlen)
    bos: bool = False                             # a BOS token starts the text and every window

    def stride(self, seqlen: int, stride: int | None) -> int:
        return (stride or max(1, seqlen // 2)) if self.sliding else seqlen


PROTOCOLS: dict[str, Protocol] = {
    "gptq": Protocol("gptq protocol", lambda s, i, st: 1),
    "llamacpp": Protocol("llama.cpp protocol", lambda s, i, st: s // 2 + 1, bos=True),
    "sliding": Protocol("sliding-window protocol", lambda s, i, st: 1 if i == 0 else s - st, sliding=True),
}
ALIASES = {"llama.cpp": "llamacpp", "llama-cpp": "llamacpp"}


@dataclass
class PplResult:
    ppl: float
    tokens: int
    windows: int
    protocol: str
    seqlen: int
    kl_mean: float | None = None
    extra: dict = field(default_factory=dict)
    stride: int | None = None

    def describe(self) -> str:
        p = PROTOCOLS[self.protocol]
        how = (f"seqlen {self.seqlen}, stride {self.stride}" if p.sliding
               else f"n_ctx {self.seqlen}, second half scored" if self.protocol == "llamacpp"
               else f"seqlen {self.seqlen}")
        return f"{p.label}, {how}, {self.windows} windows, {self.tokens} predicted tokens"


def adds_bos(tokenizer) -> int | None:
    """The BOS id if the tokenizer puts one in front of a text (what llama.cpp then does too), else None."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bos if ids and ids[0] == bos else None


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None, protocol: str = "gptq",
                     stride: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` cut into the protocol's [n, seqlen] windows (remainder dropped)."""
    p = PROTOCOLS[ALIASES.get(protocol, protocol)]
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    bos = adds_bos(tokenizer) if p.bos else None
    if bos is not None:
        ids = torch.cat([torch.tensor([bos], dtype=ids.dtype), ids])
    step = p.stride(seqlen, stride)
    n = 0 if ids.numel() < seqlen else 1 + (ids.numel() - seqlen) // step
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MoeqError(f"the eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    if step == seqlen:
        windows = ids[: n * seqlen].view(n, seqlen).clone()
    else:
        windows = torch.stack([ids[i * step:i * step + seqlen] for i in range(n)])
    if bos is not None:
        windows[:, 0] = bos
    return windows


LOGITS_BUDGET = 128 << 20   # bytes of float32 logits one forward may produce (windows per forward follow from it)
SCORE_ROWS_BYTES = 32 << 20  # bytes of one float32 chunk of positions x vocabulary while scoring


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, protocol: str = "gptq", batch_size: int = 8,
               baseline=None, progress=None, stride: int | None = None) -> PplResult:
    """Perplexity of ``model`` on pre-cut ``windows`` (``tokenize_windows`` with the same protocol and stride);
    with ``baseline`` also the mean KL(baseline || model) of next-token distributions over the same scored
    positions and the baseline's perplexity (``extra['baseline_ppl']``).

    Memory: ``batch_size`` windows is an upper bound; a forward takes as many windows as keep its logits under
    ``LOGITS_BUDGET`` (one 512-token window of a 49k vocabulary is 100 MB in float32), and NLL/KL are scored in
    chunks of positions, so no full-vocabulary float32 copy of a batch is ever made.

    ``progress``: optional callable(advance:int) called after each forward (the CLI passes a rich task).
    """
    return compare([model], windows, protocol, batch_size, baseline, progress, stride)[0]


@torch.no_grad()
def compare(models: list, windows: torch.Tensor, protocol: str = "gptq", batch_size: int = 8, baseline=None,
            progress=None, stride: int | None = None) -> list[PplResult]:
    """``perplexity`` of several models on the same windows in one pass: each batch runs through the baseline
    once and through every model, so the baseline is measured once for all of them. Each result's
    ``extra["window_nll"]`` holds its summed NLL per window (the same positions for every model: paired
    comparisons between models, window by window)."""
    if ALIASES.get(protocol, protocol) not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {tuple(PROTOCOLS)}")
    protocol = ALIASES.get(protocol, protocol)
    p = PROTOCOLS[protocol]
    seqlen = windows.shape[1]
    step_tokens = p.stride(seqlen, stride)
    firsts = [p.first_scored(seqlen, i, step_tokens) for i in range(windows.shape[0])]
    nll, kl = [0.0] * len(models), [0.0] * len(models)
    per_window: list[list[float]] = [[] for _ in models]
    count, base_nll = 0, 0.0
    step, i = 1, 0  # the first forward takes one window and tells the vocabulary size
    while i < windows.shape[0]:
        batch = windows[i:i + step]
        ref = None if baseline is None else _logits(baseline, batch)
        vocab = 1
        for k, model in enumerate(models):
            logits = _logits(model, batch)
            vocab = logits.shape[-1]
            for j in range(batch.shape[0]):
                f = firsts[i + j]
                s = _score(logits[j, f - 1:-1], batch[j, f:], None if ref is None else ref[j, f - 1:-1])
                nll[k], kl[k] = nll[k] + s[0], kl[k] + s[1]
                per_window[k].append(s[0])
                if k == 0:
                    base_nll, count = base_nll + s[2], count + seqlen - f
            del logits
        del ref
        i += batch.shape[0]
        if progress is not None:
            progress(batch.shape[0])
        step = max(1, min(batch_size, LOGITS_BUDGET // (seqlen * vocab * 4)))
    return [PplResult(ppl=math.exp(nll[k] / count), tokens=count, windows=windows.shape[0], protocol=protocol,
                      seqlen=seqlen, kl_mean=None if baseline is None else kl[k] / count,
                      extra={"window_nll": per_window[k]}
                      | ({} if baseline is None else {"baseline_ppl": math.exp(base_nll / count)}),
                      stride=step_tokens if p.sliding else None)
            for k in range(len(models))]


def _score(logits: torch.Tensor, targets: torch.Tensor, ref: torch.Tensor | None) -> tuple[float, float, float]:
    """(sum NLL of the model, sum KL(ref || model), sum NLL of the reference) over all positions, in float32
    chunks of rows (positions) of at most ``SCORE_ROWS_BYTES``."""
    vocab = logits.shape[-1]
    logits, targets = logits.reshape(-1, vocab), targets.reshape(-1, 1)
    ref = None if ref is None else ref.reshape(-1, vocab)
    rows = max(1, SCORE_ROWS_BYTES // (vocab * 4))
    nll = kl = base_nll = 0.0
    for r in range(0, logits.shape[0], rows):
        logp = F.log_softmax(logits[r:r + rows].float(), dim=-1)
        t = targets[r:r + rows]
        nll -= logp.gather(-1, t).sum().item()
        if ref is not None:
            lq = F.log_softmax(ref[r:r + rows].float(), dim=-1)
            kl += F.kl_div(logp, lq, reduction="sum", log_target=True).item()
            base_nll -= lq.gather(-1, t).sum().item()
    return nll, kl, base_nll


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return model(input_ids=batch.to(device), use_cache=False).logits.cpu()
