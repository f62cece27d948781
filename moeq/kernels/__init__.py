"""Kernels for bit-packed weights, shared by every codec: one route per device, chosen once per call site.

``lut_linear`` computes ``x @ W.T`` for 2/3/4-bit codes indexing a lookup table, with per-group scales
(layout, routes and the ``MOEQ_KERNEL`` switch: :mod:`moeq.kernels.lut`; measurements: benchmarks/KERNELS.md).
Importing this package loads no kernel: the C++ extension is built (or loaded from its cache) on first use.
"""

from moeq.kernels.lut import (
    BLOCK,
    ENV,
    PLANES,
    ROUTES,
    check_operands,
    dequantize_packed,
    lut_linear,
    lut_linear_reference,
    pack_for_kernel,
    route_for,
    unpack_from_kernel,
)

__all__ = ["BLOCK", "ENV", "PLANES", "ROUTES", "check_operands", "dequantize_packed", "lut_linear",
           "lut_linear_reference", "pack_for_kernel", "route_for", "unpack_from_kernel"]
