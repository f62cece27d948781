"""The process heap: large tensors back to the OS as soon as they are freed, and large fresh tensors on huge pages.

Streaming allocates one decoder layer's tensors, uses them once and frees them, layer after layer. Two costs follow
from glibc's and Linux's defaults: freed blocks below glibc's adaptive mmap threshold stay in the heap (the resident
set grows layer after layer: ``bound_heap``, ``trim_heap``), and every 4 KB page of a fresh mmap'd block is faulted
in and zeroed one at a time on first write, which made filling an [E, ...] expert stack from the shards run at
~2.3 GB/s on this machine where a reused buffer takes ~7 GB/s (``empty`` asks for transparent huge pages: ~5 GB/s).
"""

from __future__ import annotations

import ctypes
import gc
import os

import torch

HUGE = 1 << 21            # x86-64 transparent huge page
_MADV_HUGEPAGE = 14


def _libc():
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        return libc
    except (OSError, AttributeError):
        return None


_LIBC = _libc()


def empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """``torch.empty(shape, dtype=dtype)`` on the CPU, its page-aligned interior advised as transparent huge pages
    when it spans at least one (Linux's ``madvise`` mode; elsewhere, or where refused, plain pages)."""
    t = torch.empty(shape, dtype=dtype)
    n = t.numel() * t.element_size()
    if _LIBC is not None and n >= 2 * HUGE:
        p = t.data_ptr()
        lo, hi = (p + HUGE - 1) & ~(HUGE - 1), (p + n) & ~(HUGE - 1)
        if hi > lo:
            _LIBC.madvise(lo, hi - lo, _MADV_HUGEPAGE)
    return t


def bound_heap(threshold: int | None = None) -> None:
    """Serve allocations of ``threshold`` bytes and more by mmap, so each freed layer-sized tensor goes back to the
    OS at once (glibc's default threshold adapts upwards to 32 MB, and freed blocks below it stay in the heap).
    Default: ``MOEQ_MMAP_THRESHOLD_MB`` (1); 0 keeps glibc's behaviour: faster calibrated runs, higher peak RSS
    (calibrated int8 of an 8-layer cut of benchmarks/scale.py's checkpoint: 42 s / 2.0 GB instead of 54 s / 1.15 GB)."""
    if threshold is None:
        threshold = int(float(os.environ.get("MOEQ_MMAP_THRESHOLD_MB", "1")) * 2**20)
    if threshold <= 0:
        return
    if _LIBC is not None:
        _LIBC.mallopt(-3, threshold)  # M_MMAP_THRESHOLD


def trim_heap() -> None:
    """Collect garbage and hand the heap's free memory back to the OS."""
    gc.collect()
    if _LIBC is not None:
        _LIBC.malloc_trim(0)
