"""``nupes`` v1: b-bit indices into one lookup table of 2^b float32 levels (a power-exponent grid), bit-packed,
with a float16 scale per row and group of inputs (``nupes``).

parts      dtype     shape                       meaning
  qweight  uint8     [out, ceil(in/8) * bits]    codes [out, in] packed by ``moeq.formats.bitpack`` (plane-major,
                                                 8 codes -> bits bytes, rows padded with zero codes)
  scale    float16   [out, n_groups]             w = lut[code] * scale, computed in float32
  lut      float32   [2^bits]                    the levels, ascending (non-decreasing: a grid with 2^b - 1 levels
                                                 repeats its top level in the spare entry); stored bit-exact, since
                                                 it is what decoding reads
meta: bits (int, 2..8), group_size (0, 32, 64 or 128; 0 = one group per row, else group j = inputs [j*g, (j+1)*g),
the last one shorter), grid ("half": codes at half-integer power-domain steps, "sym": integer steps with a zero
level), exponent (float > 0, the power a the levels were built with). grid and exponent are informational: the
stored lut is the truth. n_groups = ceil(in / group_size), 1 if 0.
"""

from __future__ import annotations

import math

import torch

from moeq.formats import bitpack
from moeq.formats.codec import Codec
from moeq.quant.base import QTensor
from moeq.registry import CODECS

PARTS = {"qweight", "scale", "lut"}
META = {"bits", "group_size", "grid", "exponent"}
BITS = range(2, 9)
GROUP_SIZES = (0, 32, 64, 128)
GRIDS = ("half", "sym")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_float(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


@CODECS.register("nupes")
class NupesCodec(Codec):
    name = "nupes"
    version = 1
    readable_versions = (1,)

    def encode(self, q: QTensor, shared=None):
        t, m = q.tensors, q.meta
        parts = {"qweight": bitpack.pack(t["codes"].contiguous(), int(m["bits"])),
                 "scale": t["scale"].contiguous(), "lut": t["lut"].contiguous()}
        meta = {"bits": int(m["bits"]), "group_size": int(m["group_size"]), "grid": str(m["grid"]),
                "exponent": float(m["exponent"])}
        return parts, meta

    def decode(self, parts, meta, shape, version, shared=None):
        e = self.expect
        e(_is_int(version) and version in self.readable_versions, f"{self.name} version {version!r}")
        e(len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape), f"shape {shape!r}")
        e(set(parts) == PARTS, f"parts {sorted(parts)}")
        e(isinstance(meta, dict) and set(meta) == META, f"meta keys {sorted(meta) if isinstance(meta, dict) else meta}")
        bits, g, grid, a = meta["bits"], meta["group_size"], meta["grid"], meta["exponent"]
        e(_is_int(bits) and bits in BITS, f"bits {bits!r}")
        e(_is_int(g) and g in GROUP_SIZES, f"group_size {g!r}")
        e(isinstance(grid, str) and grid in GRIDS, f"grid {grid!r}")
        e(_is_float(a) and a > 0, f"exponent {a!r}")
        out_f, in_f = shape
        ng = -(-in_f // g) if g else 1
        qw, scale, lut = parts["qweight"], parts["scale"], parts["lut"]
        e(isinstance(qw, torch.Tensor) and qw.dtype == torch.uint8
          and tuple(qw.shape) == (out_f, bitpack.packed_bytes(in_f, bits)), f"qweight {_desc(qw)}")
        e(isinstance(scale, torch.Tensor) and scale.dtype == torch.float16 and tuple(scale.shape) == (out_f, ng),
          f"scale {_desc(scale)}")
        e(isinstance(lut, torch.Tensor) and lut.dtype == torch.float32 and tuple(lut.shape) == (1 << bits,),
          f"lut {_desc(lut)}")
        e(bool(torch.isfinite(scale).all()), "non-finite scale")
        e(bool(torch.isfinite(lut).all()), "non-finite lut entry")
        e(bool((lut[1:] >= lut[:-1]).all()), "lut not ascending")
        full = bitpack.unpack(qw, bits, 8 * -(-in_f // 8))
        e(not full[:, in_f:].any(), "nonzero padding codes (wrong in_features?)")
        return QTensor((out_f, in_f), {"codes": full[:, :in_f].contiguous(), "scale": scale, "lut": lut},
                       {"bits": bits, "group_size": g, "grid": grid, "exponent": float(a)})


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
