"""End-to-end speed: prefill tokens/s on one window, greedy decode tokens/s with the KV cache (medians)."""

from __future__ import annotations

import statistics
import time

import torch


@torch.no_grad()
def measure_speed(model, window: torch.Tensor, prefill_len: int = 256, prompt_len: int = 32, new_tokens: int = 32,
                  repeats: int = 3) -> dict[str, float]:
    ids = window[:prefill_len].unsqueeze(0)
    model(input_ids=ids[:, :8], use_cache=False)  # warm-up
    pre = []
    for _ in range(repeats):
        t = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        pre.append(time.perf_counter() - t)
    out = {"prefill_tokens": ids.shape[1], "prefill_tok_s": round(ids.shape[1] / statistics.median(pre), 1)}
    if hasattr(model, "generate") and not getattr(model.config, "is_encoder_decoder", False):
        prompt = window[:prompt_len].unsqueeze(0)
        dec = []
        for _ in range(repeats):
            t = time.perf_counter()
            model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, use_cache=True, pad_token_id=0)
            dec.append(time.perf_counter() - t)
        out["decode_tokens"] = new_tokens
        out["decode_tok_s"] = round(new_tokens / statistics.median(dec), 1)
    return out
