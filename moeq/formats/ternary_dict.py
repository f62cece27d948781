"""Variable-to-fixed (Tunstall) coding of ternary rows with 16-bit codewords, as in QMoE, with the dictionary
stored in the artifact. Pure functions; the codec ``ternary-dict`` (``moeq.formats.codecs.ternary_dict``) uses them.

The code
  A complete ternary tree with at most 2^16 leaves. Every internal node has three children, in the order of
  ``CHILD_SYMBOLS`` (0, +1, -1); a leaf's path from the root is its phrase (1..255 symbols), and its codeword is
  its rank among the leaves in breadth-first order. A row is parsed greedily from its first symbol: each phrase is
  the unique leaf the next symbols lead to. At the row's end an unfinished phrase is completed with zeros (the
  leaf reached by following 0-children), and the decoder drops what lies past the row's ``n`` symbols. So in a
  valid row every phrase but the last ends before ``n``, the last reaches ``n`` or beyond, and its overhang is
  zeros. Rows are independent: row r is ``codewords[row_offsets[r]:row_offsets[r + 1]]``.

The dictionary (Tunstall): from the root, repeatedly expand the most probable leaf (never one at ``max_len``)
into its three children until the next expansion would pass ``size`` leaves. With the symbol probabilities of
the weights it codes, the leaves are near-equiprobable and a codeword covers ~log2(size) / H symbols.

Stored dictionary (a ``SharedTable``, ``Dictionary.to_table`` / ``Dictionary.from_table``)
  tree   uint8  [ceil(B / 8)]  the tree in breadth-first order, one bit per node, least significant bit first:
                               1 = internal (the k-th internal node's children are nodes 3k+1, 3k+2, 3k+3),
                               0 = leaf. B = 1 + 3 * (internal nodes); the bits past B are 0.
  meta   version 1, max_len (the tree's depth: its longest phrase).
  Any such bitmap is a complete prefix-free code, so a decoder only checks that it is one (every node's parent
  comes before it, B matches the bytes, depth <= 255, <= 2^16 leaves). 32,767 internal nodes take 12 KiB.

Decoding needs no loop over codewords: per codeword, its length and the positions and signs of its nonzero
symbols (``Dictionary.lengths / nz_pos / nz_val``, derived once per dictionary) are gathered, a cumulative sum
of the lengths places each phrase in its row, and the nonzeros are scattered into a zeroed [rows, n] tensor.
The checks of untrusted rows need only the gather and the cumulative sum (``check_rows``): the codec validates
with them and hands the runtime the compressed rows; ``decode_rows`` / ``symbols_of`` expand where needed.
Encoding walks all rows in parallel, one column per step (a loop over the n columns, vectorized over rows);
both sides work in bounded blocks (``ENCODE_BLOCK``, ``DECODE_BLOCK``) so an odd dictionary cannot blow up memory.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import torch

from moeq.errors import ArtifactError
from moeq.quant.base import QTensor, SharedTable

CHILD_SYMBOLS = (0, 1, -1)      # child c of an internal node appends symbol CHILD_SYMBOLS[c]
MAX_SIZE = 1 << 16              # leaves: codewords are uint16
MAX_LEN = 255                   # longest phrase the format allows (a kernel may hold lengths in uint8)
VERSION = 1
TABLE_PARTS = {"tree"}
TABLE_META = {"version", "max_len"}
MINMAX_BITS = 32                # per row: lo and hi, float16
ENCODE_BLOCK = 1 << 26          # entries of the encoder's int32 step grid per block of rows (256 MiB)
DECODE_BLOCK = 1 << 22          # nonzero slots the decoder scatters at once (32 MiB of int64 indices)


def _check(cond: bool, what: str) -> None:
    if not cond:
        raise ArtifactError(f"corrupt ternary-dict data: {what}")


@dataclass(frozen=True, eq=False)
class Dictionary:
    """A validated code tree: ``tree`` / ``max_len`` are what is stored; the rest is derived from them.

    lengths  int64 [S]      phrase length of each codeword (S = leaves)
    nz_pos   int64 [S, K]   positions of the phrase's nonzero symbols (K = the most any phrase has); unused slots
    nz_val   int8  [S, K]   repeat the first nonzero (position 0, value 0 in an all-zero phrase), so a decoder
                            scatters all K slots without a mask: a repeated write stores the same value
    last_nz  int64 [S]      position of the phrase's last nonzero symbol, -1 if none (the row-end check)
    child    int64 [I, 3]   encoder transitions of internal node i: 3 * j for internal child j, -1 - leaf for a leaf
    zero_leaf int64 [I]     the leaf reached from internal node i by following 0-children (row-end completion)
    """

    tree: torch.Tensor
    max_len: int
    lengths: torch.Tensor
    nz_pos: torch.Tensor
    nz_val: torch.Tensor
    last_nz: torch.Tensor
    child: torch.Tensor
    zero_leaf: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.lengths.numel())

    @property
    def nbytes(self) -> int:
        """Bytes stored in the artifact."""
        return int(self.tree.numel())

    @classmethod
    def from_tree(cls, tree: torch.Tensor, max_len: int) -> Dictionary:
        """Validate a stored tree bitmap (untrusted: raises ``ArtifactError``) and derive the coding tables."""
        _check(isinstance(tree, torch.Tensor) and tree.dtype == torch.uint8 and tree.ndim == 1
               and 1 <= tree.numel() <= (3 * MAX_SIZE) // 8 + 1, f"tree {_desc(tree)}")
        _check(isinstance(max_len, int) and not isinstance(max_len, bool) and 1 <= max_len <= MAX_LEN,
               f"max_len {max_len!r}")
        bits = ((tree.long()[:, None] >> torch.arange(8)) & 1).view(-1)
        n_int = int(bits.sum())
        n_nodes = 1 + 3 * n_int
        _check(bits[0] == 1, "the root is a leaf (empty phrase)")
        _check(1 + 2 * n_int <= MAX_SIZE, f"{1 + 2 * n_int} leaves > {MAX_SIZE}")
        _check(tree.numel() == -(-n_nodes // 8), f"{tree.numel()} bytes for a tree of {n_nodes} nodes")
        _check(not bits[n_nodes:].any(), "nonzero padding bits after the tree")
        cum = bits[:n_nodes].cumsum(0)
        # node p + 1 must be a child of an internal node at a position <= p: p + 1 <= 3 * cum[p]
        p = torch.arange(n_nodes - 1)
        _check(bool((p + 1 <= 3 * cum[:-1]).all()), "a node without a parent before it")
        # breadth-first levels: level d is nodes [starts[d], starts[d + 1])
        cum_l = cum.tolist()
        starts = [0, 1]
        while starts[-1] < n_nodes:
            _check(len(starts) - 1 <= max_len, f"phrases longer than max_len {max_len}")
            starts.append(1 + 3 * cum_l[starts[-1] - 1])
        _check(len(starts) - 2 == max_len, f"max_len {max_len} but the tree's depth is {len(starts) - 2}")
        internal = bits[:n_nodes].bool()
        ipos = internal.nonzero().squeeze(1)
        node = torch.arange(1, n_nodes)
        parent = torch.cat([torch.zeros(1, dtype=torch.long), ipos[(node - 1) // 3]])        # root: itself
        sym = torch.cat([torch.zeros(1, dtype=torch.int8),
                         torch.tensor(CHILD_SYMBOLS, dtype=torch.int8)[(node - 1) % 3]])
        levels = [(d, starts[d], starts[d + 1]) for d in range(1, len(starts) - 1)]
        depth = torch.zeros(n_nodes, dtype=torch.long)
        nnz = torch.zeros(n_nodes, dtype=torch.long)            # nonzero symbols on the path to each node
        for d, a, b in levels:
            depth[a:b] = d
            nnz[a:b] = nnz[parent[a:b]] + (sym[a:b] != 0)
        leaves = (~internal).nonzero().squeeze(1)
        k = max(int(nnz[leaves].max()), 1)
        pos = torch.zeros(n_nodes, k, dtype=torch.int16)        # their positions and signs, slot by slot
        val = torch.zeros(n_nodes, k, dtype=torch.int8)
        for d, a, b in levels:
            pos[a:b], val[a:b] = pos[parent[a:b]], val[parent[a:b]]
            j = a + (sym[a:b] != 0).nonzero().squeeze(1)
            slot = nnz[parent[j]]
            pos[j, slot] = d - 1
            val[j, slot] = sym[j]
        count = nnz[leaves]
        used = torch.arange(k) < count[:, None]
        nz_pos = torch.where(used, pos[leaves], pos[leaves, :1])  # unused: repeat slot 0
        nz_val = torch.where(used, val[leaves], val[leaves, :1])
        last_nz = torch.where(count > 0, nz_pos.long().gather(1, (count - 1).clamp(min=0)[:, None])[:, 0], -1)
        rank_int = cum - 1                       # internal rank at internal nodes
        rank_leaf = torch.arange(n_nodes) - cum  # leaf rank at leaves
        code = torch.where(internal, 3 * rank_int, -1 - rank_leaf)
        child = code[1:].view(n_int, 3)
        zero_leaf = child[:, 0].clone()
        for _ in range(max_len):
            inner = zero_leaf >= 0
            if not inner.any():
                break
            zero_leaf[inner] = child[zero_leaf[inner] // 3, 0]
        return cls(tree, max_len, depth[leaves], nz_pos.long(), nz_val.contiguous(), last_nz, child,
                   -1 - zero_leaf)

    def phrases(self) -> torch.Tensor:
        """int8 [S, max_len]: each codeword's symbols, 0-padded past its length (for inspection and tests)."""
        out = torch.zeros(self.size, self.max_len, dtype=torch.int8)
        out.scatter_(1, self.nz_pos, self.nz_val)
        return out

    def to_table(self, name: str) -> SharedTable:
        return SharedTable(name, {"tree": self.tree}, {"version": VERSION, "max_len": self.max_len})

    @classmethod
    def from_table(cls, table: SharedTable) -> Dictionary:
        """The dictionary a stored table holds (validated; the derived tables are cached by content)."""
        _check(isinstance(table, SharedTable), f"dictionary is a {type(table).__name__}")
        t, m = table.tensors, table.meta
        _check(isinstance(t, dict) and set(t) == TABLE_PARTS, f"dictionary parts {sorted(t)}")
        _check(isinstance(m, dict) and set(m) == TABLE_META, f"dictionary meta {sorted(m)}")
        _check(type(m["version"]) is int and m["version"] == VERSION, f"dictionary version {m['version']!r}")
        tree = t["tree"]
        _check(isinstance(tree, torch.Tensor), f"tree {_desc(tree)}")
        key = (bytes(tree.detach().cpu().contiguous().view(torch.uint8).numpy()), str(tree.dtype),
               tuple(tree.shape), m["max_len"], type(m["max_len"]).__name__)
        d = _CACHE.get(key)
        if d is None:
            d = _CACHE[key] = cls.from_tree(tree.detach().cpu(), m["max_len"])
            while len(_CACHE) > 16:         # the oldest first
                _CACHE.pop(next(iter(_CACHE)), None)
        return d


_CACHE: dict[tuple, Dictionary] = {}        # stored content -> validated dictionary (decoding many entries)


def _desc(t) -> str:
    return f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _check_symbols(symbols: torch.Tensor) -> None:
    if not (isinstance(symbols, torch.Tensor) and symbols.dtype == torch.int8):
        raise ValueError(f"symbols must be an int8 tensor, got {_desc(symbols)}")
    if symbols.numel() and int(symbols.abs().max()) > 1:
        raise ValueError("symbols must be in {-1, 0, 1}")


# ------------------------------------------------------------------------------------------ statistics

def symbol_probs(symbols: torch.Tensor) -> tuple[float, float, float]:
    """Empirical (P(-1), P(0), P(+1)) of a ternary tensor."""
    _check_symbols(symbols)
    counts = torch.bincount(symbols.reshape(-1).long() + 1, minlength=3).double()
    return tuple((counts / counts.sum().clamp(min=1)).tolist())


def entropy_bits(probs) -> float:
    """Shannon entropy (bits per symbol) of a distribution: the bound on any code for a memoryless source."""
    return -sum(p * math.log2(p) for p in probs if p > 0)


# ------------------------------------------------------------------------------------------ dictionary

def build_dictionary(stats, max_len: int = MAX_LEN, size: int = MAX_SIZE) -> Dictionary:
    """The Tunstall dictionary of at most ``size`` phrases of at most ``max_len`` symbols for ``stats``: either
    sample symbols (an int8 tensor in {-1, 0, 1}, counted with add-one smoothing so every symbol keeps a nonzero
    probability) or the probabilities (P(-1), P(0), P(+1)) (positive; normalized). Deterministic: ties in
    probability expand the older leaf first."""
    if isinstance(stats, torch.Tensor) and stats.dtype == torch.int8:
        _check_symbols(stats)
        counts = torch.bincount(stats.reshape(-1).long() + 1, minlength=3).double() + 1
        pm, p0, pp = (counts / counts.sum()).tolist()
    else:
        pm, p0, pp = (float(x) for x in stats)
        if not all(math.isfinite(x) and x > 0 for x in (pm, p0, pp)):
            raise ValueError(f"probabilities must be positive and finite, got {(pm, p0, pp)}")
    total = pm + p0 + pp
    child_p = {0: p0 / total, 1: pp / total, -1: pm / total}
    if not (isinstance(max_len, int) and 1 <= max_len <= MAX_LEN):
        raise ValueError(f"max_len must be in 1..{MAX_LEN}, got {max_len!r}")
    if not (isinstance(size, int) and 3 <= size <= MAX_SIZE):
        raise ValueError(f"size must be in 3..{MAX_SIZE}, got {size!r}")
    children: dict[int, int] = {}       # expanded node -> id of its first child (the others follow)
    depth = [0]
    heap = [(-1.0, 0)]
    expansions = (size - 1) // 2        # each expansion turns one leaf into three
    while expansions and heap:
        neg_p, i = heapq.heappop(heap)
        if depth[i] >= max_len:
            continue                    # stays a leaf
        children[i] = len(depth)
        for s in CHILD_SYMBOLS:
            heapq.heappush(heap, (neg_p * child_p[s], len(depth)))
            depth.append(depth[i] + 1)
        expansions -= 1
    bits, queue = [], [0]
    for node in queue:                  # breadth-first; ``queue`` grows while iterated
        bits.append(node in children)
        if node in children:
            queue.extend(range(children[node], children[node] + 3))
    b = torch.zeros(-(-len(bits) // 8) * 8, dtype=torch.uint8)
    b[:len(bits)] = torch.tensor(bits, dtype=torch.uint8)
    tree = (b.view(-1, 8).long() << torch.arange(8)).sum(1).to(torch.uint8)
    return Dictionary.from_tree(tree, max(depth))


# ------------------------------------------------------------------------------------------ rows

def encode_rows(symbols: torch.Tensor, d: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [rows, n] in {-1, 0, 1} -> (codewords uint16 [total], row_offsets [rows + 1]: int32, or int64 past
    2^31 - 1 codewords). All rows of a block advance together, one column per step (blocks of rows keep the
    int32 step grid under ``ENCODE_BLOCK`` entries)."""
    _check_symbols(symbols)
    if symbols.ndim != 2 or symbols.shape[1] < 1:
        raise ValueError(f"symbols must be [rows, n >= 1], got {tuple(symbols.shape)}")
    rows, n = symbols.shape
    block = max(1, ENCODE_BLOCK // (n + 1))
    parts = [_encode_block(symbols[r:r + block], d) for r in range(0, rows, block)]
    codewords = torch.cat([c for c, _ in parts]) if parts else torch.zeros(0, dtype=torch.uint16)
    counts = torch.cat([k for _, k in parts]) if parts else torch.zeros(0, dtype=torch.long)
    off_dtype = torch.int32 if codewords.numel() < 2**31 else torch.int64
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), counts.cumsum(0)]).to(off_dtype)
    return codewords, offsets


def _encode_block(symbols: torch.Tensor, d: Dictionary) -> tuple[torch.Tensor, torch.Tensor]:
    """One block of rows -> (its codewords, codewords per row)."""
    rows, n = symbols.shape
    col = torch.remainder(symbols.t(), 3).contiguous()           # child index: 0 -> 0, +1 -> 1, -1 -> 2 (int8)
    child = d.child.view(-1).to(torch.int32)
    state = torch.zeros(rows, dtype=torch.int32)                 # 3 * internal node (0: the root)
    step = torch.empty(n + 1, rows, dtype=torch.int32)           # per column: -1 - leaf where a phrase ends
    idx = torch.empty(rows, dtype=torch.int32)
    for j in range(n):
        torch.add(state, col[j], out=idx)
        torch.index_select(child, 0, idx, out=step[j])
        torch.clamp(step[j], min=0, out=state)
    step[n] = torch.where(state > 0, -1 - d.zero_leaf[state.long() // 3], 0)   # complete with zeros
    grid = step.t()
    ends = grid < 0
    return (-1 - grid[ends]).to(torch.uint16), ends.sum(1)


def check_rows(codewords: torch.Tensor, row_offsets: torch.Tensor, d: Dictionary, n: int) -> None:
    """``ArtifactError`` unless (codewords, row_offsets) is exactly what ``encode_rows`` writes for some rows of
    length ``n`` with ``d``, without expanding a row (a gather and a cumulative sum over the codewords): what a
    kernel walking the rows may rely on (module docstring: every phrase but a row's last ends before ``n``, the
    last reaches ``n`` and its nonzeros lie before ``n``)."""
    _row_layout(codewords, row_offsets, d, n)


def _row_layout(codewords, row_offsets, d: Dictionary, n: int):
    """The checks of :func:`check_rows`; returns (codewords as int64, codewords per row, phrase lengths, their
    cumulative sum over the stream, each row's start in it) for :func:`decode_rows`."""
    _check(isinstance(n, int) and not isinstance(n, bool) and n >= 1, f"row length {n!r}")
    _check(isinstance(codewords, torch.Tensor) and codewords.dtype == torch.uint16 and codewords.ndim == 1,
           f"codewords {_desc(codewords)}")
    ncw = codewords.numel()
    want = torch.int32 if ncw < 2**31 else torch.int64
    _check(isinstance(row_offsets, torch.Tensor) and row_offsets.dtype == want and row_offsets.ndim == 1
           and row_offsets.numel() >= 2, f"row_offsets {_desc(row_offsets)} (want {want} [rows + 1])")
    off = row_offsets.long()
    rows = off.numel() - 1
    _check(int(off[0]) == 0 and int(off[-1]) == ncw, f"row_offsets span {int(off[0])}..{int(off[-1])}, not 0..{ncw}")
    counts = off.diff()
    _check(bool((counts >= 1).all()), "a row without codewords (offsets must increase)")
    _check(ncw <= rows * n, f"{ncw} codewords for {rows} x {n} symbols")
    cw = codewords.long()
    _check(int(cw.max()) < d.size, f"codeword {int(cw.max())} outside the dictionary of {d.size}")
    length = torch.index_select(d.lengths, 0, cw)
    cs = length.cumsum(0)
    last = off[1:] - 1
    end = cs[last]
    start = torch.cat([torch.zeros(1, dtype=torch.long), end[:-1]])
    _check(bool((end - start >= n).all()), f"a row decodes to fewer than {n} symbols")
    _check(bool((end - start - length[last] < n).all()), f"a row holds codewords past its {n} symbols")
    # only a row's last phrase reaches past n: its overhang must be zeros
    _check(bool((end - length[last] - start + d.last_nz[cw[last]] < n).all()),
           "nonzero symbols past the row's end (wrong in_features?)")
    return cw, counts, length, cs, start


def decode_rows(codewords: torch.Tensor, row_offsets: torch.Tensor, d: Dictionary, n: int) -> torch.Tensor:
    """(codewords, row_offsets) -> int8 [rows, n]. The inputs are untrusted: anything that is not exactly what
    ``encode_rows`` writes for some rows of length ``n`` raises ``ArtifactError`` (:func:`check_rows`)."""
    cw, counts, length, cs, start = _row_layout(codewords, row_offsets, d, n)
    rows, ncw = counts.numel(), cw.numel()
    shift = torch.arange(rows) * n - start                       # stream position -> flat [rows, n] index
    dst = (cs - length) + torch.repeat_interleave(shift, counts, output_size=ncw)
    out = torch.zeros(rows * n, dtype=torch.int8)
    step = max(1, DECODE_BLOCK // d.nz_pos.shape[1])              # one block unless the dictionary is odd
    for a in range(0, ncw, step):
        c = cw[a:a + step]
        idx = torch.index_select(d.nz_pos, 0, c)
        idx += dst[a:a + step, None]
        out.scatter_(0, idx.view(-1), torch.index_select(d.nz_val, 0, c).view(-1))  # repeats write equal values
    return out.view(rows, n)


def symbols_of(q: QTensor, d: Dictionary) -> torch.Tensor:
    """int8 [out, in] symbols of a ``ternary-dict`` QTensor in either form: the quantizer's (``symbols``, returned
    as is) or the codec's decoded one (``codewords`` / ``row_offsets``, expanded with :func:`decode_rows`)."""
    t = q.tensors
    if "symbols" in t:
        return t["symbols"]
    return decode_rows(t["codewords"], t["row_offsets"], d, q.shape[1])


def ternary_weight(symbols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """The float32 weight the codes stand for: ``lo[r]`` where -1, 0 where 0, ``hi[r]`` where +1."""
    s = symbols.long()
    return torch.where(s > 0, hi.float()[:, None], torch.where(s < 0, lo.float()[:, None], 0.0))


# ------------------------------------------------------------------------------------------ efficiency

def rate_report(symbols: torch.Tensor, codewords: torch.Tensor, row_offsets: torch.Tensor) -> dict[str, float]:
    """Bits per weight of a coded matrix, cumulative: the codewords alone, + the row offsets, + each row's two
    float16 levels; and the empirical (order-0) entropy of the symbols, the bound for any code of independent
    symbols (what a Tunstall code approaches), with the achieved rate's efficiency = bound / rate."""
    rows, n = symbols.shape
    w = rows * n
    cw = 16 * codewords.numel() / w
    offs = cw + 8 * row_offsets.element_size() * row_offsets.numel() / w
    full = offs + MINMAX_BITS * rows / w
    h = entropy_bits(symbol_probs(symbols))
    return {"entropy": h, "codewords": cw, "offsets": offs, "total": full,
            "efficiency": h / full if full else float("nan"),
            "symbols_per_codeword": w / max(codewords.numel(), 1)}
