"""Perplexity under named protocols. Always report the protocol with the number.

- ``gptq``: join documents with blank lines, tokenize once (no special tokens), non-overlapping windows of
  ``seqlen``, remainder dropped, each window an independent sequence; ppl = exp(mean NLL of predicted tokens).
- ``llamacpp``: windows of ``n_ctx`` (= seqlen, 512 by default), only the second half of each window is scored.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from moeq.errors import MoeqError

PROTOCOLS = ("gptq", "llamacpp")


@dataclass
class PplResult:
    ppl: float
    tokens: int
    windows: int
    protocol: str
    seqlen: int
    kl_mean: float | None = None
    extra: dict = field(default_factory=dict)

    def describe(self) -> str:
        return f"{self.protocol} protocol, seqlen {self.seqlen}, {self.windows} windows, {self.tokens} predicted tokens"


def tokenize_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Token ids of ``text`` cut into non-overlapping [n, seqlen] windows, remainder dropped."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    n = ids.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise MoeqError(f"the eval text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _scored_from(protocol: str, seqlen: int) -> int:
    """First target position (in logits[:, :-1] coordinates) that the protocol scores."""
    return 0 if protocol == "gptq" else seqlen // 2 - 1


LOGITS_BUDGET = 128 << 20   # bytes of float32 logits one forward may produce (windows per forward follow from it)
SCORE_ROWS_BYTES = 32 << 20  # bytes of one float32 chunk of positions x vocabulary while scoring


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, protocol: str = "gptq", batch_size: int = 8,
               baseline=None, progress=None) -> PplResult:
    """Perplexity of ``model`` on pre-cut ``windows``; with ``baseline`` also the mean KL(baseline || model)
    of next-token distributions over the same scored positions.

    Memory: ``batch_size`` windows is an upper bound; a forward takes as many windows as keep its logits under
    ``LOGITS_BUDGET`` (one 512-token window of a 49k vocabulary is 100 MB in float32), and NLL/KL are scored in
    chunks of positions, so no full-vocabulary float32 copy of a batch is ever made.

    ``progress``: optional callable(advance:int) called after each forward (the CLI passes a rich task).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    seqlen = windows.shape[1]
    start = _scored_from(protocol, seqlen)
    nll, count, kl_sum, base_nll = 0.0, 0, 0.0, 0.0
    step, i = 1, 0  # the first forward takes one window and tells the vocabulary size
    while i < windows.shape[0]:
        batch = windows[i:i + step]
        logits = _logits(model, batch)[:, start:-1]
        ref = None if baseline is None else _logits(baseline, batch)[:, start:-1]
        targets = batch[:, start + 1:]
        vocab = logits.shape[-1]
        s = _score(logits, targets, ref)
        nll, count = nll + s[0], count + targets.numel()
        kl_sum, base_nll = kl_sum + s[1], base_nll + s[2]
        del logits, ref
        i += batch.shape[0]
        if progress is not None:
            progress(batch.shape[0])
        step = max(1, min(batch_size, LOGITS_BUDGET // (seqlen * vocab * 4)))
    return PplResult(ppl=math.exp(nll / count), tokens=count, windows=windows.shape[0],
                     protocol=protocol, seqlen=seqlen,
                     kl_mean=None if baseline is None else kl_sum / count,
                     extra={} if baseline is None else {"baseline_ppl": math.exp(base_nll / count)})


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
