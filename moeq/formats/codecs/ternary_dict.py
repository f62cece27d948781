"""``ternary-dict`` v1: ternary codes {-1, 0, +1} per weight, each row variable-to-fixed coded with a dictionary
of up to 2^16 phrases stored once as a shared table, and the row's two levels (``qmoe``).

parts          dtype     shape            meaning
  codewords    uint16    [n_codewords]    every row's phrase ids, rows concatenated (``moeq.formats.ternary_dict``:
                                          greedy parse, the last phrase of a row completed with zeros)
  row_offsets  int32     [out + 1]        row r is codewords[row_offsets[r]:row_offsets[r + 1]]: 0 first,
                                          n_codewords last, strictly increasing; int64 only past 2^31 - 1 codewords
  lo           float16   [out]            the row's negative level (<= 0, finite): w = lo where the code is -1
  hi           float16   [out]            the row's positive level (>= 0, finite): w = hi where +1, 0 where 0
meta: {}. shared: exactly one table, the dictionary (``Dictionary.to_table``: ``tree`` uint8, meta version and
max_len), passed to ``encode`` / ``decode`` as ``shared={name: SharedTable}``.

The QTensor, two forms. ``encode`` takes the quantizer's: tensors ``symbols`` int8 [out, in] in {-1, 0, 1},
``lo`` and ``hi`` float16 [out]; meta {}; ``shared`` = (the dictionary table's name,). ``decode`` returns the
compressed one, the rows NOT expanded: tensors ``codewords``, ``row_offsets``, ``lo``, ``hi`` exactly as stored
(validated completely: ``ternary_dict.check_rows``, a gather and a cumulative sum, so a kernel walking the rows can
trust every row to cover exactly its ``in`` symbols), meta {}, the same ``shared``. The runtime
(``moeq.runtime.ternary_dict``) executes that form directly; ``ternary_dict.symbols_of(q, dictionary)`` expands
either form to the symbols. ``encode`` also takes the decoded form back (checked, stored as it is).

Unlike the other codecs this one needs a shared table to encode and to decode, so ``encode`` and ``decode`` take
``shared`` (``uses_shared = True``); without it they refuse.
"""

from __future__ import annotations

import torch

from moeq.errors import ArtifactError
from moeq.formats import ternary_dict as td
from moeq.formats.codec import Codec
from moeq.quant.base import QTensor, SharedTable
from moeq.registry import CODECS

PARTS = {"codewords", "row_offsets", "lo", "hi"}


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


@CODECS.register("ternary-dict")
class TernaryDictCodec(Codec):
    name = "ternary-dict"
    version = 1
    readable_versions = (1,)
    uses_shared = True          # encode / decode need the entry's shared tables (the dictionary)

    def dictionary(self, shared) -> tuple[str, td.Dictionary]:
        """The one dictionary in ``shared`` (name -> SharedTable), validated (untrusted)."""
        e = self.expect
        e(isinstance(shared, dict) and len(shared) == 1,
          f"{self.name} needs exactly one shared table (its dictionary), got "
          f"{sorted(shared) if isinstance(shared, dict) else type(shared).__name__}")
        (name, table), = shared.items()
        e(isinstance(table, SharedTable), f"shared table {name!r} is a {type(table).__name__}")
        return name, td.Dictionary.from_table(table)

    def encode(self, q: QTensor, shared: dict[str, SharedTable] | None = None):
        """The quantizer's form (symbols / lo / hi) is coded with the dictionary; the decoded form (codewords /
        row_offsets / lo / hi, e.g. an entry copied from another artifact) is checked and stored as it is."""
        t = q.tensors
        if set(t) not in ({"symbols", "lo", "hi"}, PARTS) or q.meta:
            raise ValueError(f"{self.name} encodes tensors symbols/lo/hi (or {'/'.join(sorted(PARTS))}) and no "
                             f"meta, got {sorted(t)} {q.meta}")
        if not (isinstance(shared, dict) and len(q.shared) == 1 and q.shared[0] in shared):
            raise ValueError(f"{self.name} needs the dictionary table {q.shared} passed as shared=")
        d = td.Dictionary.from_table(shared[q.shared[0]])
        out_f, in_f = q.shape
        for k in ("lo", "hi"):
            if t[k].dtype != torch.float16 or tuple(t[k].shape) != (out_f,):
                raise ValueError(f"{k} must be float16 [{out_f}], got {_desc(t[k])}")
        if "codewords" in t:
            try:
                td.check_rows(t["codewords"], t["row_offsets"], d, in_f)
            except ArtifactError as err:
                raise ValueError(f"{self.name}: the coded rows do not match the dictionary: {err}") from None
            codewords, offsets = t["codewords"].contiguous(), t["row_offsets"].contiguous()
            return {"codewords": codewords, "row_offsets": offsets,
                    "lo": t["lo"].contiguous(), "hi": t["hi"].contiguous()}, {}
        if tuple(t["symbols"].shape) != (out_f, in_f):
            raise ValueError(f"symbols must be [{out_f}, {in_f}], got {_desc(t['symbols'])}")
        codewords, offsets = td.encode_rows(t["symbols"], d)
        return {"codewords": codewords, "row_offsets": offsets,
                "lo": t["lo"].contiguous(), "hi": t["hi"].contiguous()}, {}

    def decode(self, parts, meta, shape, version, shared: dict[str, SharedTable] | None = None) -> QTensor:
        e = self.expect
        e(_is_int(version) and version in self.readable_versions, f"{self.name} version {version!r}")
        e(len(shape) == 2 and all(_is_int(s) and s > 0 for s in shape), f"shape {shape!r}")
        e(isinstance(parts, dict) and set(parts) == PARTS, f"parts {sorted(parts) if isinstance(parts, dict) else parts}")
        e(meta == {}, f"meta {meta!r} (expected none)")
        name, d = self.dictionary(shared)
        out_f, in_f = shape
        lo, hi, offsets = parts["lo"], parts["hi"], parts["row_offsets"]
        for k, v in (("lo", lo), ("hi", hi)):
            e(isinstance(v, torch.Tensor) and v.dtype == torch.float16 and tuple(v.shape) == (out_f,),
              f"{k} {_desc(v)}")
            e(bool(torch.isfinite(v).all()), f"non-finite {k}")
        e(bool((lo <= 0).all()), "lo > 0 (the negative level)")
        e(bool((hi >= 0).all()), "hi < 0 (the positive level)")
        e(isinstance(offsets, torch.Tensor) and tuple(offsets.shape) == (out_f + 1,),
          f"row_offsets {_desc(offsets)} for {out_f} rows")
        td.check_rows(parts["codewords"], offsets, d, in_f)
        return QTensor((out_f, in_f), {"codewords": parts["codewords"], "row_offsets": offsets, "lo": lo, "hi": hi},
                       {}, (name,))
