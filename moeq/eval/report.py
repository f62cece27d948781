"""The comparison report of ``moeq eval A B C``: one row per model (the baseline first), as rows of strings for
the terminal table and for Markdown, and the plot of perplexity (or KL) against bits/param."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from moeq.errors import MoeqError

# column -> (header, how a row's value is read, format); one table for the terminal, Markdown and --json readers
COLUMNS: dict[str, tuple[str, Any, str]] = {
    "method": ("method", lambda r: r.get("method"), "{}"),
    "bits": ("bits/param", lambda r: r.get("bits_per_param"), "{:.3f}"),
    "size": ("size MB", lambda r: r["total_bytes"] / 1e6 if r.get("total_bytes") else None, "{:.2f}"),
    "ppl": ("ppl", lambda r: (r.get("ppl") or {}).get("value") if isinstance(r.get("ppl"), dict) else r.get("ppl"),
            "{:.4f}"),
    "ratio": ("ratio", lambda r: r.get("ppl_ratio"), "{:.4f}"),
    "kl": ("KL nats", lambda r: r.get("kl_mean"), "{:.5f}"),
    "prefill": ("prefill tok/s", lambda r: (r.get("speed") or {}).get("prefill_tok_s"), "{:.1f}"),
    "decode": ("decode tok/s", lambda r: (r.get("speed") or {}).get("decode_tok_s"), "{:.1f}"),
    "eff_bw": ("eff. GB/s", lambda r: (r.get("bandwidth") or {}).get("effective_gb_s"), "{:.2f}"),
    "bw_pct": ("% of bw", lambda r: (r.get("bandwidth") or {}).get("bandwidth_pct"), "{:.1f}"),
    "memory": ("peak MB", lambda r: r.get("memory_mb"), "{:.0f}"),
}


def rows(report: dict[str, Any]) -> list[list[str]]:
    """[name, cells...] per model: the baseline (ratio 1) first, then each target in the order given."""
    out = []
    base = report.get("baseline_result")
    if base:
        b = {**base, "ppl_ratio": 1.0, "method": "baseline"}
        out.append([str(base["model"])] + [_cell(b, c) for c in COLUMNS])
    for r in report["results"]:
        out.append([_label(r["model"])] + [_cell(r, c) for c in COLUMNS])
    return out


def headers() -> list[str]:
    return ["model"] + [h for h, _, _ in COLUMNS.values()]


def _cell(r: dict, col: str) -> str:
    _, get, fmt = COLUMNS[col]
    v = get(r)
    return "-" if v is None else fmt.format(v)


def _label(model: str | None) -> str:
    return Path(model).name if model and ("/" in model) else (model or "tiny-moe")


def caption(report: dict[str, Any]) -> list[str]:
    lines = [f"{report['protocol']}, corpus {report['corpus']}, compute dtype {report['dtype']}"]
    if report.get("baseline"):
        lines.append(f"baseline: {report['baseline']} (measured once, on the same windows)")
    elif report.get("baseline_skipped"):
        lines.append(f"no baseline: {report['baseline_skipped']}")
    if report.get("bandwidth_gb_s"):
        lines.append(f"memory bandwidth (copy, read + write): {report['bandwidth_gb_s']:.2f} GB/s; eff. GB/s = "
                     "weight bytes held x decode tokens/s")
    lines.append("peak MB: resident memory added while loading the model and running its speed test")
    return lines


def markdown(report: dict[str, Any]) -> str:
    head = headers()
    lines = [*(f"{c}  " for c in caption(report)), "", "| " + " | ".join(head) + " |",
             "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows(report)]
    return "\n".join(lines) + "\n"


def check_plot_backend() -> None:
    """matplotlib is optional (``pip install 'moeq[report]'``); --plot says so before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MoeqError("--plot needs matplotlib, which is not installed: pip install 'moeq[report]'") from None


def plot(report: dict[str, Any], path: str | Path, metric: str = "ppl") -> None:
    """``metric`` (ppl or kl) against bits/param, one labelled point per model, on a log scale (quantization
    errors span orders of magnitude); the baseline's perplexity as a dashed line (it has no bits/param here).
    The legend names each point (without the prefix all models share) with its bits and value."""
    check_plot_backend()
    import os

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    pts = [(COLUMNS["bits"][1](r), COLUMNS[metric][1](r), _label(r["model"])) for r in report["results"]]
    pts = sorted((x, y, n) for x, y, n in pts if x is not None and y is not None and y > 0)
    prefix = os.path.commonprefix([n for _, _, n in pts]) if len(pts) > 1 else ""
    prefix = prefix[:prefix.rfind("-") + 1] if "-" in prefix else ""
    fig, ax = plt.subplots(figsize=(8, 5), dpi=120)
    markers = "osD^vP*Xph<>"
    fmt = COLUMNS[metric][2]
    for i, (x, y, name) in enumerate(pts):  # a legend, not labels at the points: crowded points stay readable
        ax.scatter([x], [y], s=40, zorder=3, marker=markers[i % len(markers)],
                   label=f"{name[len(prefix):] or name}: {x:.2f} bits, {fmt.format(y)}")
    base = report.get("baseline_result")
    if metric == "ppl" and base:
        ax.axhline(base["ppl"], color="grey", linestyle="--", linewidth=1)
        ax.annotate(f"baseline {base['model']}: {base['ppl']:.3f}", (0.01, base["ppl"]),
                    xycoords=("axes fraction", "data"), textcoords="offset points", xytext=(0, 4), fontsize=8,
                    color="grey")
    ax.set_yscale("log")
    ax.set_xlabel("bits per quantized parameter")
    ax.set_ylabel("perplexity (log scale)" if metric == "ppl" else "mean KL(baseline || model), nats (log scale)")
    ax.set_title(f"{prefix.rstrip('-') + ': ' if prefix else ''}{report['protocol']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="best", framealpha=0.9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
