"""GPTQ (Frantar et al. 2022) as pure tensor math: grid-agnostic and batched over experts.

The caller passes the quantization grid (a ``ColumnGrid``: uniform, a power-exponent LUT, ternary, ...), so one
implementation serves every method that wants GPTQ's error feedback. All functions take ``W`` [E, out, in] (or one
matrix [out, in]) and work on whatever device the inputs are on, in float32 (float64 if an input is float64).

Groups. ``group_size`` g > 0 gives each row one set of grid parameters per g consecutive ORIGINAL input columns
(the last group may be shorter); g = 0 gives one set per row computed from the whole row. Parameters are
  - static (``static_groups=True``, always with ``act_order``, always for g = 0): computed up front from the
    original weights (dead columns zeroed), so act-order needs no stored permutation / g_idx;
  - dynamic (``static_groups=False``, no act-order): computed when the group's first column is reached, from the
    weights as updated by every earlier column's error (the IST-DASLab reference's behaviour; unlike the reference,
    which reads the not-yet-updated matrix when a group starts inside a block, the block size is rounded to a
    multiple of g so a group always sees its in-block updates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

# damping multipliers tried in turn when H + λI is not positive definite; after the last, identity H (= RTN)
DAMP_STEPS = (1.0, 10.0, 100.0, 1000.0)


class ColumnGrid(Protocol):
    """A quantization grid applied column by column.

    ``params(w [E, out, k]) -> {name: [E, out]}``: per-row parameters of a group of k columns, from the weights given.
    ``quantize(w, params) -> (deq, codes)``: elementwise, ``w`` of any shape broadcastable with the params
    (GPTQ passes one column [E, out], RTN whole matrices [E, out, in] with column-expanded params); ``deq`` in
    w's dtype, ``codes`` of dtype ``code_dtype``. ``deq`` must be exactly what the stored codes decode to."""

    code_dtype: torch.dtype

    def params(self, w: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def quantize(self, w: torch.Tensor, params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass
class GridResult:
    """codes [E, out, in] in the original column order; params {name: [E, out, n_groups]}; deq [E, out, in]
    (the dequantized weight). Without the E dimension when the input was one [out, in] matrix."""

    codes: torch.Tensor
    params: dict[str, torch.Tensor]
    deq: torch.Tensor


@dataclass
class GPTQResult(GridResult):
    """Adds, per expert: ``row_loss`` [E, out] GPTQ's proxy loss sum_i (w_i - q_i)^2 / (2 Hinv_ii^2) per row
    (``loss`` [E] sums it), ``percdamp`` [E] the damping actually used (NaN where identity was used), and
    ``fallback`` (one string per expert): ``none``, ``damp`` (more damping needed) or ``identity`` (Cholesky
    failed at every damping: round-to-nearest). ``kept`` [E, k] (``gptq(keep=k)``): the input columns left
    unquantized, ascending; ``deq`` holds their float16-rounded values (after every other column's compensation),
    ``codes`` there are the grid's codes of those values, which a format storing the columns apart ignores."""

    row_loss: torch.Tensor = None
    percdamp: torch.Tensor = None
    fallback: tuple[str, ...] = ()
    kept: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.row_loss.sum(-1)


def column_groups(cols: int, group_size: int, device=None) -> torch.Tensor:
    """[cols] the group index of each input column."""
    idx = torch.arange(cols, device=device)
    return idx // group_size if group_size else torch.zeros_like(idx)


def group_params(w: torch.Tensor, grid: ColumnGrid, group_size: int) -> dict[str, torch.Tensor]:
    """Static parameters of every group: w [E, out, in] -> {name: [E, out, n_groups]}."""
    step = group_size or w.shape[-1]
    per_group = [grid.params(w[..., a:a + step]) for a in range(0, w.shape[-1], step)]
    return {k: torch.stack([p[k] for p in per_group], dim=-1) for k in per_group[0]}


def column_params(params: dict[str, torch.Tensor], gidx: torch.Tensor) -> dict[str, torch.Tensor]:
    """{name: [E, out, n_groups]} and gidx [E, k] (group of each column, per expert) -> {name: [E, out, k]}."""
    e, out = next(iter(params.values())).shape[:2]
    idx = gidx[:, None, :].expand(e, out, gidx.shape[-1])
    return {k: v.gather(-1, idx) for k, v in params.items()}


def _dtype(*ts: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in ts) else torch.float32


def rtn(w: torch.Tensor, grid: ColumnGrid, group_size: int = 0) -> GridResult:
    """Round-to-nearest with the same grid and group logic as ``gptq`` (its result with H = identity)."""
    if w.ndim == 2:
        return _squeeze(rtn(w[None], grid, group_size))
    w = w.to(_dtype(w))
    e, _, cols = w.shape
    params = group_params(w, grid, group_size)
    gidx = column_groups(cols, group_size, w.device).expand(e, cols)
    deq, codes = grid.quantize(w, column_params(params, gidx))
    return GridResult(codes, params, deq)


def inverse_cholesky(h: torch.Tensor, percdamp: float) -> tuple[torch.Tensor, torch.Tensor, tuple[str, ...]]:
    """U = upper Cholesky factor of (H + λI)^-1, λ = percdamp·mean(diag H), for H [E, n, n].
    Experts whose factorization fails are retried with ``DAMP_STEPS`` times more damping, then get U = I.
    Returns U, the percdamp used per expert (NaN: identity) and the fallback label per expert."""
    e, n, _ = h.shape
    eye = torch.eye(n, dtype=h.dtype, device=h.device)
    u = None  # allocated only when some expert needs another try (else the first factorization is U itself)
    used = torch.full((e,), float("nan"), dtype=h.dtype, device=h.device)
    labels = ["identity"] * e
    mean_diag = h.diagonal(dim1=-2, dim2=-1).mean(-1)
    todo = torch.arange(e, device=h.device)
    for step, mult in enumerate(DAMP_STEPS):
        hd = h[todo] if todo.numel() < e else h.clone()
        hd.diagonal(dim1=-2, dim2=-1).add_((percdamp * mult * mean_diag[todo])[:, None])
        l, info = torch.linalg.cholesky_ex(hd)
        del hd                                   # one [E, n, n] temporary at a time: Hessians are the big tensors
        ok = info == 0
        l[~ok] = eye
        linv = torch.linalg.solve_triangular(l, eye.expand_as(l), upper=False)  # L^-1 (BLAS-3 TRSM)
        del l
        hinv = linv.transpose(-1, -2) @ linv   # (L L^T)^-1 = L^-T L^-1 (torch.cholesky_inverse is ~10x slower here)
        del linv
        uu, info = torch.linalg.cholesky_ex(hinv, upper=True)
        del hinv
        ok &= (info == 0) & uu.isfinite().all(-1).all(-1)
        done = todo[ok]
        if u is None and bool(ok.all()) and todo.numel() == e:
            u = uu
        else:
            if u is None:
                u = eye.expand(e, n, n).clone()
            u[done] = uu[ok]
        del uu
        used[done] = percdamp * mult
        for i in done.tolist():
            labels[i] = "none" if step == 0 else "damp"
        todo = todo[~ok]
        if not todo.numel():
            break
    if u is None:
        u = eye.expand(e, n, n).clone()
    return u, used, tuple(labels)


def gptq(w: torch.Tensor, h: torch.Tensor, grid: ColumnGrid, *, group_size: int = 0, block_size: int = 128,
         percdamp: float = 0.01, act_order: bool = False, static_groups: bool = True, keep: int = 0) -> GPTQResult:
    """GPTQ-quantize ``w`` [E, out, in] (or [out, in]) against Hessians ``h`` [E, in, in]; an [in, in] ``h`` is
    shared by every expert (pooled statistics: rows are independent given H, so the experts are stacked into one
    matrix). Dead inputs (H_ii == 0) get H_ii = 1 and their weight column zeroed. ``act_order`` processes columns
    by descending diag H (per expert) and needs static groups. See the module docstring for groups.

    ``keep`` k > 0: the k inputs of largest diag H (mean squared activation: the massive-activation channels of
    real LLMs, where a small weight error is multiplied by a huge input) are not quantized (SpQR's outliers, by
    input column). They are processed LAST, so they absorb every other column's compensation, and come back
    float16-rounded in ``deq`` (``GPTQResult.kept`` says which). The grid parameters of their groups are fitted
    without them. Needs static groups."""
    if act_order and group_size and not static_groups:
        raise ValueError("act_order with dynamic groups would need a stored column permutation; "
                         "use static_groups=True")
    if keep and not (static_groups or not group_size):
        raise ValueError("keep needs static groups (the kept columns are moved to the end)")
    if not 0 <= keep < w.shape[-1]:
        raise ValueError(f"keep {keep}: must be in 0..{w.shape[-1] - 1} (fewer than the {w.shape[-1]} inputs)")
    opts = {"group_size": group_size, "block_size": block_size, "percdamp": percdamp, "act_order": act_order,
            "static_groups": static_groups, "keep": keep}
    if w.ndim == 2:
        return _squeeze(gptq(w[None], h if h.ndim == 3 else h[None], grid, **opts))
    if h.ndim == 2:
        e, out, cols = w.shape
        return _unstack(gptq(w.reshape(1, e * out, cols), h[None], grid, **opts), e)
    if h.shape != (w.shape[0], w.shape[2], w.shape[2]):
        raise ValueError(f"Hessians {tuple(h.shape)} do not match weights {tuple(w.shape)}")
    return _gptq(w, h, grid, **opts)


def _gptq(w, h, grid, *, group_size, block_size, percdamp, act_order, static_groups, keep) -> GPTQResult:
    dt = _dtype(w, h)
    w = w.to(dtype=dt, copy=True)
    h = h.to(device=w.device, dtype=dt, copy=True)
    e, _, cols = w.shape
    diag = h.diagonal(dim1=-2, dim2=-1)
    dead = diag == 0
    kept = torch.topk(diag, keep, dim=-1).indices.sort(-1).values if keep else None
    diag[dead] = 1.0
    w.masked_fill_(dead[:, None, :], 0.0)
    static = static_groups or not group_size
    params = group_params(w if kept is None else _without(w, kept, group_size), grid, group_size) if static else None
    gidx = column_groups(cols, group_size, w.device).expand(e, cols)
    perm = None
    if act_order or kept is not None:
        order = diag if act_order else -torch.arange(cols, device=w.device, dtype=dt).expand(e, cols)
        if kept is not None:    # the kept columns last: below every other key
            order = order.scatter(-1, kept, float("-inf"))
        perm = torch.argsort(order, dim=-1, descending=True, stable=True)
        w = w.gather(-1, perm[:, None, :].expand_as(w))
        h = h.gather(-2, perm[:, :, None].expand_as(h)).gather(-1, perm[:, None, :].expand_as(h))
        gidx = gidx.gather(-1, perm)
    u, used, labels = inverse_cholesky(h, percdamp)
    del h, diag                                  # only U is needed from here
    if static:
        codes, deq, row_loss = _sweep_static(w, u, grid, params, gidx, block_size, cols - keep)
    else:
        codes, deq, row_loss, params = _sweep_dynamic(w, u, grid, group_size, block_size)
    if perm is not None:
        inv = torch.argsort(perm, dim=-1)[:, None, :].expand_as(w)
        codes, deq = codes.gather(-1, inv), deq.gather(-1, inv)
    return GPTQResult(codes, params, deq, row_loss, used, labels, kept)


def _without(w: torch.Tensor, kept: torch.Tensor, group_size: int) -> torch.Tensor:
    """``w`` with the kept columns (``kept`` [E, k]) set to the mean of the other columns of their row and group,
    so the groups' parameters are fitted to the columns that are quantized."""
    e, out, cols = w.shape
    g = group_size or cols
    mask = torch.zeros(e, 1, cols, dtype=torch.bool, device=w.device).scatter_(-1, kept[:, None, :], True)
    pad = -cols % g
    wg = torch.nn.functional.pad(w, (0, pad)).view(e, out, -1, g)
    live = torch.nn.functional.pad(~mask, (0, pad)).view(e, 1, -1, g)   # padding counts as not live
    mean = (wg * live).sum(-1) / live.sum(-1).clamp_min(1)
    fill = mean.repeat_interleave(g, dim=-1)[..., :cols]
    return torch.where(mask, fill, w)


def _outputs(w, grid):
    """Empty codes and deq like ``w`` and a zero proxy loss per row."""
    codes = torch.empty(w.shape, dtype=grid.code_dtype, device=w.device)
    return codes, torch.empty_like(w), w.new_zeros(w.shape[:2])


def _sweep_static(w, u, grid, params, gidx, block_size, exact_from=None):
    """The column sweep with per-column parameters known up front (``gidx`` [E, in]: group of each column in
    processing order). Columns from position ``exact_from`` on are kept (float16-rounded), not quantized."""
    cols = w.shape[-1]
    codes, deq, row_loss = _outputs(w, grid)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        p = column_params(params, gidx[:, i1:i2])
        row_loss += _block(w, u, grid, i1, i2, lambda i, w1, p=p: {k: v[..., i] for k, v in p.items()}, codes, deq,
                           exact_from)
    return codes, deq, row_loss


def _sweep_dynamic(w, u, grid, group_size, block_size):
    """The column sweep with each group's parameters taken when its first column is reached (no act-order)."""
    cols = w.shape[-1]
    codes, deq, row_loss = _outputs(w, grid)
    block_size = max(block_size // group_size, 1) * group_size   # a group never straddles two blocks
    groups: list[dict[str, torch.Tensor]] = []

    def params_of(i, w1):   # column i of the block, before it is quantized; w1: the block's updated weights
        if i % group_size == 0:   # blocks start on group boundaries
            groups.append(grid.params(w1[..., i:i + group_size]))
        return groups[-1]

    for i1 in range(0, cols, block_size):
        row_loss += _block(w, u, grid, i1, min(i1 + block_size, cols), params_of, codes, deq)
    params = {k: torch.stack([g[k] for g in groups], dim=-1) for k in groups[0]}
    return codes, deq, row_loss, params


def _block(w, u, grid, i1, i2, params_of, codes, deq, exact_from=None) -> torch.Tensor:
    """Quantize columns [i1, i2) of ``w`` into ``codes``/``deq`` with the lazy-batch scheme: each column's scaled
    error updates the rest of the block at once, the block's errors update every later column of ``w`` with one
    batched GEMM. ``params_of(i, w1)``: the grid parameters of block column i; columns from ``exact_from`` on are
    kept float16-rounded (their codes still the grid's). Returns the block's proxy loss per row [E, out]."""
    w1 = w[..., i1:i2].transpose(-1, -2).contiguous()   # [E, b, out]: column i is w1[:, i], contiguous
    w1_cols = w1.transpose(-1, -2)                       # the same storage seen as [E, out, b] (for params_of)
    u1 = u[:, i1:i2, i1:i2]
    err1 = torch.empty_like(w1)
    q1 = torch.empty_like(w1)
    c1 = torch.empty(w1.shape, dtype=codes.dtype, device=w.device)
    for i in range(i2 - i1):
        col = w1[:, i]
        q, c = grid.quantize(col, params_of(i, w1_cols))
        if exact_from is not None and i1 + i >= exact_from:
            q = col.clamp(-65504.0, 65504.0).half().to(col.dtype)
        q1[:, i], c1[:, i] = q, c
        err = (col - q) / u1[:, i, i, None]
        err1[:, i] = err
        if i + 1 < i2 - i1:   # the rest of the block: w1[:, j] -= u1[i, j] * err, one contiguous rank-1 update
            w1[:, i + 1:].baddbmm_(u1[:, i, i + 1:, None], err[:, None, :], alpha=-1)
    deq[..., i1:i2] = q1.transpose(-1, -2)
    codes[..., i1:i2] = c1.transpose(-1, -2)
    if i2 < w.shape[-1]:
        w[..., i2:] -= err1.transpose(-1, -2) @ u[:, i1:i2, i2:]
    return err1.square().sum(-2) / 2


def _squeeze(r: GridResult) -> GridResult:
    fields = {k: v[0] for k, v in vars(r).items() if isinstance(v, torch.Tensor)}
    fields["params"] = {k: v[0] for k, v in r.params.items()}
    return type(r)(**{**vars(r), **fields})


def _unstack(r: GPTQResult, e: int) -> GPTQResult:
    """One pooled result [1, E*out, ...] -> [E, out, ...] (the shared H's damping/fallback repeated per expert)."""
    def split(t):
        return t.reshape(e, -1, *t.shape[2:])
    return GPTQResult(split(r.codes), {k: split(v) for k, v in r.params.items()}, split(r.deq),
                      r.row_loss.reshape(e, -1), r.percdamp.expand(e).clone(), r.fallback * e,
                      None if r.kept is None else r.kept.expand(e, -1).clone())
