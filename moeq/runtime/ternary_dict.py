"""Executing ``ternary-dict`` weights (QMoE's sub-1-bit experts): ``y = x @ W.T + bias`` computed from the
dictionary-coded rows, where W[o, i] = ``lo[o]`` / 0 / ``hi[o]`` for the symbol -1 / 0 / +1.

The module holds the code as the codec decodes it (``moeq.formats.codecs.ternary_dict``: the compressed rows,
already validated), never a dense copy unless asked (``cache_decoded``):

  codewords    uint16   [C]            every row's phrase ids, rows concatenated (as stored)
  row_offsets  int64    [out + 1]      row r is codewords[row_offsets[r]:row_offsets[r + 1]] (stored int32: widened)
  lo, hi       float16  [out]          the row's two levels (as stored)
  rec          uint8    [65536, 8]     the dictionary's phrase records (below), one per uint16 value
  ex_off       int32    [65537]        nonzeros past a phrase's 4th: ex_ent[ex_off[c]:ex_off[c + 1]]
  ex_ent       uint16   [E]            pos << 2 | code

The last three are derived once per dictionary (:func:`phrase_records`) and shared by every module that uses it
(non-persistent buffers: not in the state dict). All buffers keep their dtypes through ``.to(dtype)`` (they are the
code); ``bias`` follows the move. A QTensor in the quantizer's form (``symbols``) is encoded with the dictionary at
construction (with none given, one is fitted to the symbols, as the quantizer's ``fit_layer`` would).

Phrase record of codeword c (8 bytes; codewords past the dictionary get a one-symbol zero phrase, so any uint16
indexes a record)::

    byte 0     len      phrase length, 1..255
    byte 1     nnz      nonzero symbols in the phrase (past the 4th: in ex_ent)
    bytes 2-5  pos[4]   positions of nonzeros 0..3, ascending; unused slots repeat the last nonzero (0 if none)
    byte 6     codes    2 bits a slot from bit 0: 0 = zero, 1 = +1 (hi), 2 = -1 (lo); unused slots repeat the
                        last nonzero's (a decoder writes all 4 slots: a repeated write stores the same value)
    byte 7     codes    the same with unused slots 0 (a matvec adds all 4 slots: each nonzero counted once)

    e.g. 0 0 +1 0 -1:  len 5, nnz 2, pos 2 4 4 4, codes 0b10_10_10_01 (0xA9), 0b00_00_10_01 (0x09)

Routes (``MOEQ_KERNEL`` = auto | torch | cpp | triton, as ``moeq.kernels.lut.route_for`` reads it):

* cpp (CPU, moeq's C++ library, ``moeq.kernels.cpu``), up to ``FUSED_MAX_M`` rows of x: fused decode-and-multiply,
  no multiplies inside: per row of W its phrases are walked and x is summed over the +1 and over the -1 positions,
  ``y = hi * sum+ + lo * sum-`` (float32; x converted once, transposed [in, M] for M > 1 so each nonzero is one
  vector add of M floats). OpenMP over rows. More rows (prefill): W decoded tile by tile (~4 MiB) into x's dtype
  by the C++ decoder (float32 for float16 x: CPU float16 GEMMs are slow), one GEMM per tile.
* triton (CUDA): :mod:`moeq.kernels.triton_ternary`, decode-and-multiply (one program per block of rows).
* torch (anywhere, the fallback): ``decode_rows`` + ``ternary_weight`` into a dense weight, ``F.linear``.

``cache_decoded=True`` keeps the decoded weight of each compute dtype after first use, for the routes that decode
(prefill, the torch fallback): 2 bytes a weight in bfloat16 (4 in float32) against ~0.1 byte a weight packed, i.e.
~20x the module's memory. Off by default. The threshold ``FUSED_MAX_M`` is measured in benchmarks/qmoe_speed.py
(benchmarks/KERNELS.md).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from moeq.formats import ternary_dict as td
from moeq.kernels import lut as lut_kernels
from moeq.quant.base import QTensor, SharedTable
from moeq.registry import RUNTIMES
from moeq.runtime.packed import PackedLinear

SLOTS = 4                         # nonzeros a record holds
RECORDS = 1 << 16                 # one record per uint16 codeword
# CPU: the fused kernel up to this many rows of x, decode + GEMM above; by library flavor. Measured on 4096x4096
# (benchmarks/qmoe_speed.py, KERNELS.md): AVX-512 fused wins to M = 16 and loses from 24 (its 32-column tile costs
# twice the 16-column one); the portable build (-mno-avx512f) wins only at M = 1 (2.3 vs 6.6 ms, 1 thread).
FUSED_MAX_M: dict[str, int] = {"avx512": 16, "portable": 1}
EXACT = ("codewords", "row_offsets", "lo", "hi", "rec", "ex_off", "ex_ent")   # buffers whose dtype is the format
_RECORDS_CACHE: dict[tuple, tuple] = {}      # dictionary content -> its records (the 16 newest)


# ------------------------------------------------------------------------------------------ phrase records

def _codes(val: torch.Tensor) -> torch.Tensor:
    """Symbols -> record codes: 0 -> 0, +1 -> 1, -1 -> 2."""
    return torch.where(val > 0, 1, torch.where(val < 0, 2, 0))


def phrase_records(d: td.Dictionary) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(rec uint8 [65536, 8], ex_off int32 [65537], ex_ent uint16 [E]) of a dictionary (layout: module docstring);
    cached by the dictionary's content, so the modules of one layer share one copy."""
    key = (bytes(d.tree.numpy()), d.max_len)
    out = _RECORDS_CACHE.get(key)
    if out is not None:
        return out
    s, k = d.nz_pos.shape
    count = (d.phrases() != 0).sum(1)                                       # nonzeros per phrase
    slot = torch.arange(SLOTS)
    idx = torch.minimum(slot, (count - 1).clamp(min=0)[:, None]).clamp(max=k - 1)   # unused: the last nonzero
    pos = d.nz_pos.gather(1, idx)
    code = _codes(d.nz_val.long().gather(1, idx))
    shift = 2 * slot
    rec = torch.zeros(RECORDS, 8, dtype=torch.uint8)
    rec[:, 0] = 1                                                           # past the dictionary: one zero
    rec[:s, 0] = d.lengths.to(torch.uint8)
    rec[:s, 1] = count.to(torch.uint8)
    rec[:s, 2:6] = pos.to(torch.uint8)
    rec[:s, 6] = (code << shift).sum(1).to(torch.uint8)
    rec[:s, 7] = ((code * (slot < count[:, None])) << shift).sum(1).to(torch.uint8)
    extra = (count - SLOTS).clamp(min=0)
    ex_off = torch.zeros(RECORDS + 1, dtype=torch.int32)
    ex_off[1:s + 1] = extra.cumsum(0).to(torch.int32)
    ex_off[s + 1:] = ex_off[s]
    if k > SLOTS:                                     # codeword-major, ascending positions
        used = torch.arange(SLOTS, k) < count[:, None]
        p, v = d.nz_pos[:, SLOTS:][used], d.nz_val[:, SLOTS:][used]
        ex_ent = ((p << 2) | _codes(v.long())).to(torch.int32).to(torch.uint16)
    else:
        ex_ent = torch.zeros(0, dtype=torch.uint16)
    out = _RECORDS_CACHE[key] = (rec, ex_off, ex_ent)
    while len(_RECORDS_CACHE) > 16:
        _RECORDS_CACHE.pop(next(iter(_RECORDS_CACHE)))
    return out


def dictionary_for(q: QTensor, shared: dict[str, SharedTable] | None) -> td.Dictionary:
    """The entry's dictionary: the table ``q.shared`` names (or the only one given); for a QTensor in the
    quantizer's form without one, a dictionary fitted to its symbols."""
    shared = shared or {}
    name = q.shared[0] if len(q.shared) == 1 else None
    table = shared.get(name) if name is not None else None
    if table is None and len(shared) == 1:
        table = next(iter(shared.values()))
    if table is not None:
        return td.Dictionary.from_table(table)
    if "symbols" in q.tensors:
        return td.build_dictionary(q.tensors["symbols"])
    raise ValueError(f"ternary-dict runtime needs the dictionary table {q.shared} passed as shared=")


# ------------------------------------------------------------------------------------------ the module

@RUNTIMES.register("ternary-dict")
class TernaryDictLinear(PackedLinear):
    """``x @ W.T + bias`` for x of any leading shape (float32 / bfloat16 / float16), from the coded rows; one instance
    per weight (per expert in an MoE layer). Inference only: no route records autograd history."""

    exact = EXACT

    def __init__(self, q: QTensor, bias: torch.Tensor | None, shared: dict[str, SharedTable] | None = None,
                 cache_decoded: bool = False):
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.dictionary = d = dictionary_for(q, shared)
        t = q.tensors
        if "symbols" in t:
            codewords, offsets = td.encode_rows(t["symbols"], d)
        else:
            codewords, offsets = t["codewords"], t["row_offsets"]
        self.register_buffer("codewords", codewords.contiguous())
        self.register_buffer("row_offsets", offsets.long().contiguous())
        self.register_buffer("lo", t["lo"].contiguous())
        self.register_buffer("hi", t["hi"].contiguous())
        for name, table in zip(("rec", "ex_off", "ex_ent"), phrase_records(d)):
            self.register_buffer(name, table, persistent=False)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.cache_decoded = cache_decoded
        self._cache: dict = {}        # the C++ struct, the row-length maximum, decoded weights (cache_decoded)

    def extra_repr(self) -> str:
        bits = 16 * self.codewords.numel() / (self.out_features * self.in_features)
        return (f"in={self.in_features}, out={self.out_features}, phrases={self.dictionary.size}, "
                f"codeword_bits_per_weight={bits:.3f}, cache_decoded={self.cache_decoded}, bias={self.bias is not None}")

    def _apply(self, fn, *args, **kwargs):
        """Device moves apply to every buffer; dtype casts only to ``bias`` (``PackedLinear``); the kernel
        operands are rebuilt after a move."""
        self._cache.clear()
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cache.clear()
        super()._load_from_state_dict(*args, **kwargs)

    # ---------------------------------------------------------------------------------------- operands
    def _operands(self) -> tuple[torch.Tensor, ...]:
        return tuple(self._buffers[k] for k in EXACT)

    def _code(self) -> tuple:
        """The C++ struct over the buffers (rebuilt when a buffer is replaced or modified in place)."""
        from moeq.kernels import cpu
        ops = self._operands()
        key = tuple((t.data_ptr(), t._version) for t in ops)
        hit = self._cache.get("code")
        if hit is None or hit[0] != key:
            hit = self._cache["code"] = (key, cpu.ternary_code(*ops, self.in_features))
        return hit[1]

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense [out, in] weight in ``dtype`` (lo / hi rounded once from float16), on the buffers' device."""
        key = ("decoded", dtype)
        if key in self._cache:
            return self._cache[key]
        dev = self.codewords.device
        if dev.type == "cpu" and dtype in (torch.float32, torch.bfloat16, torch.float16) and _cpp_ok():
            from moeq.kernels import cpu
            w = cpu.ternary_decode(self._code(), dtype)
        else:
            w = self._expand_torch().to(device=dev, dtype=dtype)
        if self.cache_decoded:
            self._cache[key] = w
        return w

    def _expand_torch(self) -> torch.Tensor:
        """The float32 weight by the pure-torch decoder (on CPU; it re-validates the rows)."""
        cw, off = self.codewords.cpu(), self.row_offsets.cpu()
        off = off.to(torch.int32 if cw.numel() < 2**31 else torch.int64)
        symbols = td.decode_rows(cw, off, self.dictionary, self.in_features)
        return td.ternary_weight(symbols, self.lo.cpu(), self.hi.cpu())

    # ---------------------------------------------------------------------------------------- routes
    def _torch_route(self, x2: torch.Tensor) -> torch.Tensor:
        key = ("decoded", x2.dtype)
        w = self._cache.get(key)
        if w is None:
            w = self._expand_torch().to(device=x2.device, dtype=x2.dtype)
            if self.cache_decoded:
                self._cache[key] = w
        return F.linear(x2, w)

    def _cpp_route(self, x2: torch.Tensor) -> torch.Tensor:
        from moeq.kernels import cpu
        if x2.device.type != "cpu" or self.codewords.device.type != "cpu":
            raise ValueError("the cpp route needs CPU tensors")
        if x2.dtype not in cpu.DTYPES:                  # float64 and the like: the reference route
            return self._torch_route(x2)
        x2 = x2.contiguous()
        if x2.shape[0] <= FUSED_MAX_M[cpu.flavor()]:
            return cpu.ternary_matvec(self._code(), x2)
        cdt = torch.float32 if x2.dtype == torch.float16 else x2.dtype      # CPU float16 GEMMs are slow
        if self.cache_decoded:
            return F.linear(x2.to(cdt), self.dequantized(cdt)).to(x2.dtype)
        return cpu.ternary_linear_tiled(self._code(), x2.to(cdt)).to(x2.dtype)

    def _bounds(self) -> tuple[int, int]:
        """(the most codewords in a row, the most nonzeros past a phrase's 4th): the Triton kernels' loop bounds,
        computed once (a host sync on CUDA)."""
        b = self._cache.get("bounds")
        if b is None:
            b = self._cache["bounds"] = (int(self.row_offsets.diff().max()), int(self.ex_off.diff().max()))
        return b

    def _triton_route(self, x2: torch.Tensor) -> torch.Tensor:
        from moeq.kernels.triton_ternary import ternary_linear_triton
        return ternary_linear_triton(x2, *self._operands(), self.in_features, *self._bounds())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x has {x.shape[-1]} features, the weight {self.in_features}")
        x2 = x.reshape(-1, self.in_features)
        y2 = ROUTES[lut_kernels.route_for(x.device)](self, x2)
        y = y2.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)


def _cpp_ok() -> bool:
    """Whether the C++ decoder may run (``MOEQ_KERNEL`` not ``torch``, the library builds)."""
    if os.environ.get(lut_kernels.ENV, "auto").strip().lower() == "torch":
        return False
    return lut_kernels.ROUTES["cpp"].available()


# route name (moeq.kernels.lut.route_for) -> the module's implementation
ROUTES = {
    "cpp": TernaryDictLinear._cpp_route,
    "triton": TernaryDictLinear._triton_route,
    "torch": TernaryDictLinear._torch_route,
}
