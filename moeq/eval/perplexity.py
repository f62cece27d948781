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
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].view(n, seqlen)


def _scored_from(protocol: str, seqlen: int) -> int:
    """First target position (in logits[:, :-1] coordinates) that the protocol scores."""
    return 0 if protocol == "gptq" else seqlen // 2 - 1


@torch.no_grad()
def perplexity(model, windows: torch.Tensor, protocol: str = "gptq", batch_size: int = 8,
               baseline=None, progress=None) -> PplResult:
    """Perplexity of ``model`` on pre-cut ``windows``; with ``baseline`` also the mean KL(baseline || model)
    of next-token distributions over the same scored positions.

    ``progress``: optional callable(advance:int) called after each batch (the CLI passes a rich task).
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")
    start = _scored_from(protocol, windows.shape[1])
    nll, count, kl_sum, base_nll = 0.0, 0, 0.0, 0.0
    for i in range(0, windows.shape[0], batch_size):
        batch = windows[i:i + batch_size]
        logits = _logits(model, batch)[:, start:-1]
        targets = batch[:, start + 1:]
        logp = F.log_softmax(logits.float(), dim=-1)
        nll += -logp.gather(-1, targets.unsqueeze(-1)).sum().item()
        count += targets.numel()
        if baseline is not None:
            ref = F.log_softmax(_logits(baseline, batch)[:, start:-1].float(), dim=-1)
            kl_sum += (ref.exp() * (ref - logp)).sum().item()
            base_nll += -ref.gather(-1, targets.unsqueeze(-1)).sum().item()
        if progress is not None:
            progress(batch.shape[0])
    return PplResult(ppl=math.exp(nll / count), tokens=count, windows=windows.shape[0],
                     protocol=protocol, seqlen=windows.shape[1],
                     kl_mean=None if baseline is None else kl_sum / count,
                     extra={} if baseline is None else {"baseline_ppl": math.exp(base_nll / count)})


def _logits(model, batch: torch.Tensor) -> torch.Tensor:
    device = next((p.device for p in model.parameters() if p.device.type != "meta"), torch.device("cpu"))
    return model(input_ids=batch.to(device), use_cache=False).logits.cpu()
