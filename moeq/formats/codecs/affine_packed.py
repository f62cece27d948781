"""``affine-packed`` v1: uniform b-bit codes, bit-packed, with a float16 scale and an integer zero point per row
and group of inputs (``rtn``, ``gptq``).

parts      dtype     shape                       meaning
  qweight  uint8     [out, ceil(in/8) * bits]    codes [out, in] packed by ``moeq.formats.bitpack`` (plane-major,
                                                 8 codes -> bits bytes, rows padded with zero codes)
  scale    float16   [out, n_groups]             w = scale * (code - zero)
  zero     uint8     [out, n_groups]             zero point, 0 .. 2^bits - 1
meta: bits (int, 1..8), group_size (int >= 0; 0 = one group per row, else group j = inputs [j*g, (j+1)*g), the last
one shorter), sym (bool, informational: how the zero points were chosen). n_groups = ceil(in / group_size), 1 if 0.
"""

from __future__ import annotations

import torch

from moeq.formats import bitpack
from moeq.formats.codec import Codec
from moeq.quant.base import QTensor
from moeq.registry import CODECS

PARTS = {"qweight", "scale", "zero"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@CODECS.register("affine-packed")
class AffinePackedCodec(Codec):
    name = "affine-packed"
    version = 1
    readable_versions = (1,)

    def encode(self, q: QTensor, shared=None):
        t, m = q.tensors, q.meta
        parts = {"qweight": bitpack.pack(t["codes"].contiguous(), int(m["bits"])),
                 "scale": t["scale"].contiguous(), "zero": t["zero"].contiguous()}
        return parts, {"bits": int(m["bits"]), "group_size": int(m["group_size"]), "sym": bool(m["sym"])}

    def decode(self, parts, meta, shape, version, shared=None):
        e = self.expect
        e(version in self.readable_versions, f"{self.name} version {version!r}")
        e(len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape), f"shape {shape!r}")
        e(set(parts) == PARTS, f"parts {sorted(parts)}")
        e(set(meta) == {"bits", "group_size", "sym"}, f"meta keys {sorted(meta)}")
        bits, g, sym = meta["bits"], meta["group_size"], meta["sym"]
        e(_is_int(bits) and 1 <= bits <= 8, f"bits {bits!r}")
        e(_is_int(g) and g >= 0, f"group_size {g!r}")
        e(isinstance(sym, bool), f"sym {sym!r}")
        out_f, in_f = shape
        ng = -(-in_f // g) if g else 1
        qw, scale, zero = parts["qweight"], parts["scale"], parts["zero"]
        e(qw.dtype == torch.uint8 and tuple(qw.shape) == (out_f, bitpack.packed_bytes(in_f, bits)),
          f"qweight {qw.dtype} {tuple(qw.shape)}")
        e(scale.dtype == torch.float16 and tuple(scale.shape) == (out_f, ng), f"scale {scale.dtype} {tuple(scale.shape)}")
        e(zero.dtype == torch.uint8 and tuple(zero.shape) == (out_f, ng), f"zero {zero.dtype} {tuple(zero.shape)}")
        e(int(zero.max()) < 1 << bits, f"zero point above {(1 << bits) - 1}")
        full = bitpack.unpack(qw, bits, 8 * -(-in_f // 8))
        e(not full[:, in_f:].any(), "nonzero padding codes (wrong in_features?)")
        return QTensor((out_f, in_f), {"codes": full[:, :in_f].contiguous(), "scale": scale, "zero": zero},
                       {"bits": bits, "group_size": g, "sym": sym})
