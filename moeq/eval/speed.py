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


def memory_bandwidth(mib: int = 256, repeats: int = 5) -> float:
    """The machine's memory bandwidth, bytes/s: ``y.copy_(x)`` of two ``mib`` MiB float32 tensors (far beyond
    any cache), read + write bytes counted, median of ``repeats`` (after one warm-up copy)."""
    n = (mib << 20) // 4
    x, y = torch.ones(n), torch.empty(n)
    y.copy_(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        y.copy_(x)
        times.append(time.perf_counter() - t)
    return 2 * x.numel() * x.element_size() / statistics.median(times)


def held_bytes(model) -> int:
    """Bytes of every tensor a model holds (parameters and buffers, each storage once: a tied head counts once)
    — what a decode step reads at most per token (a MoE layer reads only the experts it routes to)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        if t.device.type == "meta":
            continue
        s = t.untyped_storage()
        seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    return sum(seen.values())


def effective_bandwidth(model, speed: dict, bandwidth: float | None) -> dict[str, float]:
    """Weight bytes held / decode time per token, and that as a share of ``bandwidth`` (the machine's limit)."""
    if not speed.get("decode_tok_s"):
        return {}
    b = held_bytes(model)
    out = {"held_bytes": b, "effective_gb_s": round(b * speed["decode_tok_s"] / 1e9, 3)}
    if bandwidth:
        out["bandwidth_pct"] = round(100 * b * speed["decode_tok_s"] / bandwidth, 1)
    return out
