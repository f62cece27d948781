"""``bitplanes`` v2: nested-precision codes (``matryoshka``) stored as bit-planes, most significant first, so that
the r-bit model is a prefix of the parts: reading it at r bits reads r planes, extracting it drops the others.

parts      dtype     shape                    meaning
  plane0   uint8     [out, ceil(in/8)]        bit 7 (the MSB) of every 8-bit parent code, packed 8 inputs a byte
  ...                                         (``moeq.formats.bitplanes``: bit i % 8 of byte i // 8, pad bits 0)
  plane{B-1}                                  bit 8 - B of every parent code (B = meta bits planes stored; 8 unless
                                              the artifact was extracted at fewer bits)
  scale    float16   [out, n_groups]          s, the parent step: deq_r = lut_r[c] * s (+ offset), c = the r-bit
                                              code = the first r planes (``moeq.quant.matryoshka``)
  offset   float16   [out, n_groups]          lo, the bottom of each group's range (asymmetric only)
  cols     int32     [k]                      (k = meta outliers > 0 only) the input columns kept in 16 bits,
                                              strictly ascending: every width reads them as stored
  col_values float16 [out, k]                 their weights (the codes in those columns are not used)
meta: bits (int, the number of planes stored, 2..8), widths (list of distinct descending ints in 2..8: the widths
the parent was fitted for and may be read at), group_size (0, 64 or 128; 0 = one group per row, else group j =
inputs [j*g, (j+1)*g), the last one shorter), sym (bool: symmetric grid, no offset part), in_features (int, the
entry's shape[1] again: a plane row of ceil(in/8) bytes cannot tell in = 8k+1 .. 8k+8 apart, so decoding checks the
shape against it), outliers (int >= 0, v2: the number of kept columns). n_groups = ceil(in / group_size), 1 if 0.
Version 1 (no outliers key, no kept columns) is read as well.

Decoding takes the planes it is given: plane0 .. plane{r-1} (a prefix, r in widths, r <= bits) decode to a QTensor
at r bits (codes = the r-bit children, meta bits = r, widths as stored). ``parts_at`` names the parts to read for
a width, so a loader can leave the other planes on disk.
"""

from __future__ import annotations

import torch

from moeq.errors import MoeqError
from moeq.formats import bitplanes
from moeq.formats.codec import Codec
from moeq.quant.base import QTensor
from moeq.registry import CODECS

META = {"bits", "widths", "group_size", "sym", "in_features"}
META_V2 = META | {"outliers"}
GROUP_SIZES = (0, 64, 128)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _plane(k: int) -> str:
    return f"plane{k}"


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _widths_ok(w) -> bool:
    return (isinstance(w, list) and bool(w) and all(_is_int(x) and 2 <= x <= 8 for x in w)
            and w == sorted(set(w), reverse=True))


@CODECS.register("bitplanes")
class BitplanesCodec(Codec):
    name = "bitplanes"
    version = 2
    readable_versions = (1, 2)
    nested = True

    def encode(self, q: QTensor, shared=None):
        t, m = q.tensors, q.meta
        bits = int(m["bits"])
        parts = {_plane(k): p for k, p in enumerate(bitplanes.split_planes(t["codes"].contiguous(), bits))}
        parts["scale"] = t["scale"].contiguous()
        if not m["sym"]:
            parts["offset"] = t["offset"].contiguous()
        k = int(m.get("outliers", 0))
        if k:
            parts["cols"] = t["cols"].to(torch.int32).contiguous()
            parts["col_values"] = t["col_values"].to(torch.float16).contiguous()
        meta = {"bits": bits, "widths": [int(x) for x in m["widths"]], "group_size": int(m["group_size"]),
                "sym": bool(m["sym"]), "in_features": int(q.shape[1]), "outliers": k}
        return parts, meta

    def parts_at(self, part_names: list[str], meta: dict, bits: int | None) -> list[str]:
        """The parts of an r-bit read: the first ``bits`` planes and the scales (all parts when None). A width the
        entry was not fitted for, or more planes than it stores, is a MoeqError."""
        if bits is None:
            return list(part_names)
        widths, stored = meta.get("widths"), meta.get("bits")
        if not _widths_ok(widths) or not _is_int(stored):
            self.expect(False, f"meta widths {widths!r} bits {stored!r}")
        if bits not in widths:
            raise MoeqError(f"{bits} bits is not a width of this artifact (it holds {', '.join(map(str, widths))})")
        if bits > stored:
            raise MoeqError(f"{bits} bits asked, but only {stored} bit-planes are stored (an extracted artifact)")
        return [_plane(k) for k in range(bits)] + [p for p in part_names if not p.startswith("plane")]

    def decode(self, parts, meta, shape, version, shared=None):
        e = self.expect
        e(_is_int(version) and version in self.readable_versions, f"{self.name} version {version!r}")
        e(len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape), f"shape {shape!r}")
        keys = META if version == 1 else META_V2
        e(isinstance(meta, dict) and set(meta) == keys, f"meta keys {sorted(meta) if isinstance(meta, dict) else meta}")
        stored, widths, g, sym = meta["bits"], meta["widths"], meta["group_size"], meta["sym"]
        k = meta.get("outliers", 0)
        e(_is_int(k) and 0 <= k < shape[1], f"outliers {k!r}")
        e(_is_int(stored) and 2 <= stored <= 8, f"bits {stored!r}")
        e(_widths_ok(widths), f"widths {widths!r}")
        e(_is_int(g) and g in GROUP_SIZES, f"group_size {g!r}")
        e(isinstance(sym, bool), f"sym {sym!r}")
        e(meta["in_features"] == shape[1] and _is_int(meta["in_features"]),
          f"in_features {meta['in_features']!r} but shape {shape!r}")
        r = sum(1 for i in range(8) if _plane(i) in parts)
        want = ({_plane(i) for i in range(r)} | {"scale"} | (set() if sym else {"offset"})
                | ({"cols", "col_values"} if k else set()))
        e(set(parts) == want, f"parts {sorted(parts)} (a prefix plane0.. and the scales expected)")
        e(r <= stored and r in widths, f"{r} planes given; {stored} stored, widths {widths}")
        out_f, in_f = shape
        ng = -(-in_f // g) if g else 1
        planes = [parts[_plane(k)] for k in range(r)]
        for i, p in enumerate(planes):
            e(isinstance(p, torch.Tensor) and p.dtype == torch.uint8
              and tuple(p.shape) == (out_f, bitplanes.plane_bytes(in_f)), f"plane{i} {_desc(p)}")
            e(bitplanes.pad_bits_clear(p, in_f), f"plane{i}: nonzero pad bits (wrong in_features?)")
        names = ["scale"] if sym else ["scale", "offset"]
        for n in names:
            t = parts[n]
            e(isinstance(t, torch.Tensor) and t.dtype == torch.float16 and tuple(t.shape) == (out_f, ng),
              f"{n} {_desc(t)}")
            e(bool(torch.isfinite(t).all()), f"non-finite {n}")
        e(bool((parts["scale"] >= 0).all()), "negative scale")
        tensors = {"codes": bitplanes.join_planes(planes, in_f).contiguous(), **{n: parts[n] for n in names}}
        if k:
            cols, vals = parts["cols"], parts["col_values"]
            e(isinstance(cols, torch.Tensor) and cols.dtype == torch.int32 and tuple(cols.shape) == (k,),
              f"cols {_desc(cols)}")
            e(bool((cols >= 0).all() and (cols < in_f).all() and (cols[1:] > cols[:-1]).all()),
              "cols: not strictly ascending input columns")
            e(isinstance(vals, torch.Tensor) and vals.dtype == torch.float16 and tuple(vals.shape) == (out_f, k),
              f"col_values {_desc(vals)}")
            e(bool(torch.isfinite(vals).all()), "non-finite col_values")
            tensors.update(cols=cols, col_values=vals)
        return QTensor((out_f, in_f), tensors, {"bits": r, "widths": list(widths), "group_size": g, "sym": sym,
                                                "outliers": k})
