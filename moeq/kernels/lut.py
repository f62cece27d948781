"""LUT linear: ``y = x @ W.T`` with ``W[o, i] = lut[code[o, i]] * scale[o, i // group_size]``, codes of 2, 3 or 4 bits.

One ``lut`` of ``2**bits`` floats per tensor (shape ``[2**bits]``) or per output row (``[out, 2**bits]``): NUPES
power grids, uniform grids (a LUT like any other) and ternary codes (2-bit codes, lut ``[-1, 0, 1, 0]``) are all
this one operation. ``scales`` is ``[out, in // group_size]`` (group_size = in_features: one scale per row).

Kernel layout (what :func:`pack_for_kernel` writes; codecs convert their storage layout to it at load time).
``packed`` is uint8 ``[out, in * bits / 8]``, one row per output feature; a row is the concatenation of the
*planes* of its width, each plane holding some bits of every code (``PLANES``):

* lanes plane, ``w`` = 4 or 2 bits a code, ``e = 8 / w`` codes a byte: the row's inputs are cut into blocks of
  ``16 * e`` inputs (32 for w = 4, 64 for w = 2), each stored in 16 bytes. Byte ``j`` of a block holds, from bit
  ``w * t`` up, the code of input ``16 * t + j`` of the block. Widened to 16 dwords (one vpmovzxbd), lane ``j``
  holds the codes of inputs j, j+16, ... at shifts 0, w, ...: one shift and one 16-entry vpermps give the
  16 weights of 16 consecutive inputs. w = 4, one block (byte j: ``hi << 4 | lo``)::

      byte j = 0..15:  code[16 + j] code[j]   e.g. 0x76: input j has code 6, input j + 16 code 7

  w = 2, byte j = ``c[48 + j] << 6 | c[32 + j] << 4 | c[16 + j] << 2 | c[j]``, e.g.
  ``0b11_10_01_00`` = inputs j, 16+j, 32+j, 48+j have codes 0, 1, 2, 3.
* bits plane, 1 bit a code, in input order: bit ``i % 8`` of byte ``i // 8`` (16 consecutive inputs are one
  little-endian uint16: an AVX-512 mask register).

Widths: 4 = one lanes plane (w = 4); 3 = lanes plane (w = 2, code bits 0-1) then bits plane (code bit 2);
2 = lanes plane (w = 2). So ``in_features`` must be a multiple of ``group_size`` and ``group_size`` a multiple of
the block (``BLOCK``: 32 inputs at 4 bits, 64 at 2 and 3 bits); anything else is a ValueError.

Routes (``ROUTES``): ``cpp`` (CPU, :mod:`moeq.kernels.cpu`), ``triton`` (CUDA, :mod:`moeq.kernels.triton_lut`),
``torch`` (any device: unpack, gather, scale, ``F.linear``). ``MOEQ_KERNEL`` = ``auto`` (default: the fast route of
the input's device if it loads, else ``torch``), ``torch`` (force the fallback), ``cpp`` or ``triton`` (insist; an
error where it cannot run). On CPU, up to ``MATVEC_MAX_M`` rows of x go through the fused matvec; more rows
(prefill) dequantize W tile by tile into x's dtype with the kernel, one oneDNN GEMM per tile: measured in
``benchmarks/KERNELS.md``.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Callable, NamedTuple

import torch
import torch.nn.functional as F

ENV = "MOEQ_KERNEL"
# CPU: the fused matvec up to this many rows of x, dequantize + GEMM above; by library flavor (KERNELS.md)
MATVEC_MAX_M: dict[str, int] = {"avx512": 4, "portable": 1}


class Plane(NamedTuple):
    """Bits ``[shift, shift + width)`` of every code, stored as a ``lanes`` or a ``bits`` plane (docstring)."""

    width: int
    shift: int
    kind: str


# THE table: code width -> its planes, in row order
PLANES: dict[int, tuple[Plane, ...]] = {
    4: (Plane(4, 0, "lanes"),),
    3: (Plane(2, 0, "lanes"), Plane(1, 2, "bits")),
    2: (Plane(2, 0, "lanes"),),
}
BLOCK: dict[int, int] = {b: max(16 * 8 // p.width for p in ps if p.kind == "lanes") for b, ps in PLANES.items()}


# ---------------------------------------------------------------- layout
def _pack_plane(c: torch.Tensor, p: Plane) -> torch.Tensor:
    """c: uint8 [out, in], the plane's bits of every code -> uint8 [out, in * width / 8]."""
    rows, n = c.shape
    e = 8 // p.width
    if p.kind == "lanes":
        v = c.view(rows, n // (16 * e), e, 16)
        out = torch.zeros(rows, n // (16 * e), 16, dtype=torch.uint8, device=c.device)
    else:
        v = c.view(rows, n // 8, 8)
        out = torch.zeros(rows, n // 8, dtype=torch.uint8, device=c.device)
    for t in range(e):
        out |= v.select(-2 if p.kind == "lanes" else -1, t) << (p.width * t)
    return out.view(rows, -1)


def _unpack_plane(b: torch.Tensor, p: Plane, n: int) -> torch.Tensor:
    """Inverse of :func:`_pack_plane`: uint8 [out, n * width / 8] -> uint8 [out, n]."""
    rows = b.shape[0]
    e, mask = 8 // p.width, (1 << p.width) - 1
    v = b.view(rows, n // (16 * e), 1, 16) if p.kind == "lanes" else b.view(rows, n // 8, 1)
    shifts = torch.arange(0, 8, p.width, dtype=torch.uint8, device=b.device)
    codes = (v >> (shifts.view(e, 1) if p.kind == "lanes" else shifts)) & mask
    return codes.reshape(rows, n)


def packed_row_bytes(in_features: int, bits: int) -> int:
    return in_features * bits // 8


def pack_for_kernel(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """codes uint8 [out, in] (every value < 2**bits, in a multiple of ``BLOCK[bits]``) -> kernel layout."""
    _check_bits(bits)
    if codes.dtype != torch.uint8 or codes.ndim != 2:
        raise ValueError(f"codes must be 2-D uint8, got {codes.dtype} {tuple(codes.shape)}")
    if codes.shape[1] % BLOCK[bits]:
        raise ValueError(f"in_features ({codes.shape[1]}) must be a multiple of {BLOCK[bits]} at {bits} bits")
    if codes.numel() and int(codes.max()) >> bits:
        raise ValueError(f"a code does not fit in {bits} bits (max {int(codes.max())})")
    c = codes.contiguous()
    return torch.cat([_pack_plane((c >> p.shift) & ((1 << p.width) - 1), p) for p in PLANES[bits]], dim=1)


def unpack_from_kernel(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """Kernel layout -> codes uint8 [out, in]."""
    _check_bits(bits)
    codes, start = None, 0
    for p in PLANES[bits]:
        nbytes = in_features * p.width // 8
        part = _unpack_plane(packed[:, start:start + nbytes].contiguous(), p, in_features) << p.shift
        codes = part if codes is None else codes | part
        start += nbytes
    return codes


# ---------------------------------------------------------------- checks
def _check_bits(bits: int) -> None:
    if bits not in PLANES:
        raise ValueError(f"bits must be one of {sorted(PLANES)}, got {bits!r}")


def check_operands(packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
                   out_features: int, in_features: int) -> None:
    """ValueError unless the operands describe one [out, in] weight in the kernel layout."""
    _check_bits(bits)
    if group_size <= 0 or group_size % BLOCK[bits] or in_features % group_size:
        raise ValueError(f"group_size ({group_size}) must be a multiple of {BLOCK[bits]} at {bits} bits and divide "
                         f"in_features ({in_features})")
    want = (out_features, packed_row_bytes(in_features, bits))
    if packed.dtype != torch.uint8 or tuple(packed.shape) != want:
        raise ValueError(f"packed must be uint8 {list(want)}, got {packed.dtype} {list(packed.shape)}")
    if lut.shape not in ((1 << bits,), (out_features, 1 << bits)):
        raise ValueError(f"lut must be [{1 << bits}] or [{out_features}, {1 << bits}], got {list(lut.shape)}")
    if tuple(scales.shape) != (out_features, in_features // group_size):
        raise ValueError(f"scales must be [{out_features}, {in_features // group_size}], got {list(scales.shape)}")


# ---------------------------------------------------------------- math
def dequantize_codes(codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """codes uint8 [out, in] -> W float32 [out, in] = lut[code] * scale of the code's group."""
    idx = codes.long()
    lut = lut.float()
    w = lut[idx] if lut.ndim == 1 else lut.gather(1, idx)
    return (w.view(w.shape[0], -1, group_size) * scales.float().unsqueeze(-1)).view_as(w)


def lut_linear_reference(x: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor,
                         group_size: int) -> torch.Tensor:
    """The float truth from unpacked codes (no kernel layout involved): float64 GEMM, returned in x's dtype."""
    w = dequantize_codes(codes, lut, scales, group_size).double()
    return F.linear(x.double(), w).to(x.dtype)


def dequantize_packed(packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int, bits: int,
                      in_features: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The dense [out, in] weight in ``dtype`` from the kernel layout (pure torch; float32 math, one rounding)."""
    w = dequantize_codes(unpack_from_kernel(packed, bits, in_features), lut, scales, group_size)
    return w.to(dtype)


# ---------------------------------------------------------------- routes: (x2 [M, in], operands) -> y2 [M, out]
def _torch_route(x2, packed, lut, scales, group_size, bits, in_features):
    return F.linear(x2, dequantize_packed(packed, lut, scales, group_size, bits, in_features, x2.dtype))


def _cpp_route(x2, packed, lut, scales, group_size, bits, in_features):
    from moeq.kernels import cpu
    if x2.device.type != "cpu" or packed.device.type != "cpu":
        raise ValueError("the cpp route needs CPU tensors")
    packed, lut, scales = packed.contiguous(), lut.float().contiguous(), scales.float().contiguous()
    if x2.shape[0] <= MATVEC_MAX_M[cpu.flavor()]:
        return cpu.matvec(x2.float().contiguous(), packed, lut, scales, group_size, bits).to(x2.dtype)
    return cpu.linear_tiled(x2.contiguous(), packed, lut, scales, group_size, bits, in_features)


def _triton_route(x2, packed, lut, scales, group_size, bits, in_features):
    from moeq.kernels.triton_lut import lut_linear_triton
    return lut_linear_triton(x2, packed, lut, scales, group_size, bits, in_features)


def _cpp_available() -> bool:
    from moeq.kernels.cpu import library
    return library() is not None


def _triton_available() -> bool:
    return torch.cuda.is_available() and importlib.util.find_spec("triton") is not None


class Route(NamedTuple):
    device: str                       # the device type it runs on ("any": every device)
    run: Callable
    available: Callable[[], bool]


ROUTES: dict[str, Route] = {
    "cpp": Route("cpu", _cpp_route, _cpp_available),
    "triton": Route("cuda", _triton_route, _triton_available),
    "torch": Route("any", _torch_route, lambda: True),
}


def route_for(device: torch.device | str) -> str:
    """The route ``lut_linear`` takes for inputs on ``device`` (``MOEQ_KERNEL`` applied)."""
    dev = torch.device(device).type
    want = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if want == "auto":
        return next(name for name, r in ROUTES.items() if r.device in (dev, "any") and r.available())
    if want not in ROUTES:
        raise ValueError(f"{ENV}={want!r}: expected auto, {', '.join(ROUTES)}")
    r = ROUTES[want]
    if r.device not in (dev, "any") or not r.available():
        raise RuntimeError(f"{ENV}={want}: the {want} route cannot run on {dev} here")
    return want


def lut_linear(x: torch.Tensor, packed: torch.Tensor, lut: torch.Tensor, scales: torch.Tensor, group_size: int,
               bits: int, out_features: int, in_features: int) -> torch.Tensor:
    """``x @ W.T`` for x [..., in] (float32 / bfloat16 / float16) and W in the kernel layout; returns x's dtype.

    ``packed`` from :func:`pack_for_kernel`; ``lut`` [2**bits] or [out, 2**bits] and ``scales`` [out, in //
    group_size] are used as float32 (pass them as float32 contiguous tensors to avoid a conversion per call).
    Inference only: the cpp and triton routes do not record autograd history.
    """
    check_operands(packed, lut, scales, group_size, bits, out_features, in_features)
    if x.shape[-1] != in_features:
        raise ValueError(f"x has {x.shape[-1]} features, the weight {in_features}")
    x2 = x.reshape(-1, in_features)
    y2 = ROUTES[route_for(x.device)].run(x2, packed, lut, scales, group_size, bits, in_features)
    return y2.reshape(*x.shape[:-1], out_features)
