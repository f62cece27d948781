"""Per-unit precision allocation for matryoshka artifacts: pure math, no tensors.

A matryoshka artifact stores every weight at nested widths (e.g. 8, 6, 4, 3, 2 bits); ``moeq extract --budget``
picks one width per *unit* (an expert of one layer with all its matrices, or a group such as ``attention``) so that
the total bytes fit a budget and the summed quality loss is least (hot, sensitive experts get more bits, as in
D²MoE). Unit i at width r costs ``nbytes_i(r)`` and loses ``error_i(r)``, an estimate the caller supplies (e.g. the
routing-weighted proxy output error sum tr(dW_r H dW_r^T) over the unit's matrices). Errors need not decrease with
width: noisy estimates are fine. A *pinned* unit (one allowed width: attention or shared weights kept at their own
setting) only consumes budget.

    problem = AllocationProblem(units, budget=resolve_budget(parse_budget("3"), units))
    best = solve_milp(problem)          # exact multiple-choice knapsack (scipy.optimize.milp / HiGHS)
    base = solve_greedy(problem)        # marginal-gain baseline, never better than best
    flat = uniform(problem, 3)          # the same width everywhere, for comparisons at equal bytes

Budget strings (``parse_budget``). A number with a byte unit is bytes: ``B``, decimal ``KB MB GB TB`` (powers of
1000), binary ``KiB MiB GiB TiB`` (powers of 1024), case-insensitive, fractions floored to whole bytes
(``1.2GiB`` = 1288490188). A bare number, or one followed by ``bits``/``bit``/``bpw``, is average bits per weight
and must lie in (0, 32]; a larger bare number is an error (write ``123456B`` for bytes), never guessed to be bytes.
Average bits count the code bits of the free (not pinned) units' weights, plus their width-independent metadata,
plus the pinned units' fixed bytes: ``--budget 3`` is exactly the bytes of ``uniform(problem, 3)`` when costs are
``ceil(weights * r / 8) + meta_bytes`` (``Unit.from_weights``).
"""

from __future__ import annotations

import heapq
import math
import re
from dataclasses import dataclass
from typing import Literal

# unit suffix (lower case) -> bytes per unit; "bits" suffixes are handled separately
BYTE_UNITS = {
    "b": 1,
    "kb": 1000, "mb": 1000**2, "gb": 1000**3, "tb": 1000**4,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4,
}
BIT_UNITS = ("", "bit", "bits", "bpw")
MAX_BITS = 32.0
# the MILP's objective is scaled to about this (HiGHS's absolute gap 1e-6 is then 1e-9 of the total error)
OBJECTIVE_SCALE = 1e3
_BUDGET_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class Unit:
    """One allocation unit: its allowed ``widths`` and, per width, storage ``nbytes`` and estimated ``error``.

    ``weights`` (the number of weights) and ``meta_bytes`` (width-independent bytes: scales, zero points, ...) are
    only needed to turn an average-bits budget into bytes. A unit with one width is pinned."""

    name: str
    widths: tuple[float, ...]
    nbytes: tuple[int, ...]
    error: tuple[float, ...]
    weights: int = 0
    meta_bytes: int = 0

    def __post_init__(self):
        for f in ("widths", "nbytes", "error"):
            object.__setattr__(self, f, tuple(getattr(self, f)))
        n = len(self.widths)
        if n == 0 or len(self.nbytes) != n or len(self.error) != n:
            raise ValueError(f"unit {self.name!r}: widths, nbytes and error need the same non-zero length")
        if len(set(self.widths)) != n:
            raise ValueError(f"unit {self.name!r}: repeated width in {self.widths}")
        if any(int(b) != b or b < 0 for b in self.nbytes):
            raise ValueError(f"unit {self.name!r}: nbytes must be non-negative integers, got {self.nbytes}")
        object.__setattr__(self, "nbytes", tuple(int(b) for b in self.nbytes))
        if not all(math.isfinite(e) for e in self.error):
            raise ValueError(f"unit {self.name!r}: errors must be finite, got {self.error}")
        if self.weights < 0 or self.meta_bytes < 0:
            raise ValueError(f"unit {self.name!r}: weights and meta_bytes must be non-negative")

    @classmethod
    def from_weights(cls, name: str, widths, error, weights: int, meta_bytes: int = 0) -> Unit:
        """Costs from the weight count: ``ceil(weights * r / 8) + meta_bytes`` per width r (packed codes)."""
        nbytes = tuple(math.ceil(weights * r / 8) + meta_bytes for r in widths)
        return cls(name, tuple(widths), nbytes, tuple(error), weights, meta_bytes)

    @classmethod
    def pinned_at(cls, name: str, width: float, nbytes: int, weights: int = 0) -> Unit:
        """A unit kept at its own fixed setting (attention, shared weights): it only consumes budget."""
        return cls(name, (width,), (nbytes,), (0.0,), weights)

    @property
    def pinned(self) -> bool:
        return len(self.widths) == 1

    def front(self) -> list[int]:
        """Indices of the Pareto-optimal widths, by strictly increasing bytes and strictly decreasing error (an
        option costing no less and losing no less than another is never needed). Exact ties keep the wider."""
        order = sorted(range(len(self.widths)), key=lambda j: (self.nbytes[j], self.error[j], -self.widths[j]))
        keep = []
        for j in order:
            if not keep or self.error[j] < self.error[keep[-1]]:
                keep.append(j)
        return keep


@dataclass(frozen=True)
class AllocationProblem:
    """Units (unique names) and the budget in bytes."""

    units: tuple[Unit, ...]
    budget: int

    def __post_init__(self):
        object.__setattr__(self, "units", tuple(self.units))
        names = [u.name for u in self.units]
        if len(set(names)) != len(names):
            raise ValueError("unit names must be unique")
        if int(self.budget) != self.budget or self.budget < 0:
            raise ValueError(f"budget must be a non-negative whole number of bytes, got {self.budget}")
        object.__setattr__(self, "budget", int(self.budget))

    @classmethod
    def from_spec(cls, units, spec: str | Budget | int) -> AllocationProblem:
        """``spec``: a budget string (``parse_budget``), a ``Budget`` or bytes."""
        units = tuple(units)
        budget = parse_budget(spec) if isinstance(spec, str) else spec
        return cls(units, budget if isinstance(budget, int) else resolve_budget(budget, units))

    def min_bytes(self) -> int:
        return sum(min(u.nbytes) for u in self.units)

    def max_bytes(self) -> int:
        """Bytes with every unit at its least-error width (spending more never helps)."""
        return sum(u.nbytes[u.front()[-1]] for u in self.units)


@dataclass(frozen=True)
class Allocation:
    """The chosen width per unit (in the problem's unit order), the total bytes and error (recomputed from the
    problem, not the solver's), the problem's ``budget``, and ``status``: ``optimal`` (see ``solve_milp``),
    ``time_limit`` (feasible, not proven optimal), ``greedy`` or ``fixed`` (``uniform``, budget not checked)."""

    widths: dict[str, float]
    nbytes: int
    error: float
    status: str
    budget: int = 0


@dataclass(frozen=True)
class Budget:
    """A parsed budget: average bits per weight (``kind="bits"``) or bytes."""

    value: float
    kind: Literal["bits", "bytes"]


def parse_budget(text: str) -> Budget:
    """``"3"``, ``"3.5bits"``, ``"3.5 bpw"`` -> bits per weight in (0, 32]; ``"750MB"``, ``"1.2GiB"``,
    ``"123456B"`` -> whole bytes (>= 1). A bare number above 32 is rejected, not read as bytes."""
    m = _BUDGET_RE.match(text)
    if m is None:
        raise ValueError(f"budget {text!r}: expected a number with an optional unit, e.g. 3, 3.5bits, 750MB, 1.2GiB")
    value, unit = float(m.group(1)), m.group(2).lower()
    if unit in BIT_UNITS:
        if not 0 < value <= MAX_BITS:
            hint = f"; write {m.group(1)}B for bytes" if not unit and value > MAX_BITS else ""
            raise ValueError(f"budget {text!r}: bits per weight must be in (0, {MAX_BITS:g}]{hint}")
        return Budget(value, "bits")
    if unit not in BYTE_UNITS:
        raise ValueError(f"budget {text!r}: unknown unit {m.group(2)!r} (bits, bpw, B, KB, MB, GB, TB, KiB, MiB, "
                         "GiB, TiB)")
    nbytes = math.floor(value * BYTE_UNITS[unit])
    if nbytes < 1:
        raise ValueError(f"budget {text!r}: must be at least 1 byte")
    return Budget(nbytes, "bytes")


def bits_to_bytes(avg_bits: float, weights: int, meta_bytes: int = 0) -> int:
    """Bytes of ``weights`` packed codes at ``avg_bits`` each (rounded up) plus ``meta_bytes``."""
    return math.ceil(weights * avg_bits / 8) + meta_bytes


def resolve_budget(budget: Budget, units) -> int:
    """The budget in bytes. Bits count over the free units (``weights`` and ``meta_bytes`` each, see the module
    docstring); pinned units add their fixed bytes."""
    if budget.kind == "bytes":
        return int(budget.value)
    total = 0
    for u in units:
        if u.pinned:
            total += u.nbytes[0]
        elif u.weights <= 0:
            raise ValueError(f"unit {u.name!r} has no weight count: a budget in bits needs Unit.weights")
        else:
            total += bits_to_bytes(budget.value, u.weights, u.meta_bytes)
    return total


def _fmt_bytes(n: int) -> str:
    return f"{n} bytes ({n / 1024**2:.2f} MiB)"


def _check_feasible(problem: AllocationProblem) -> None:
    need = problem.min_bytes()
    if need > problem.budget:
        raise ValueError(f"budget {_fmt_bytes(problem.budget)} is below the minimum {_fmt_bytes(need)} "
                         "(every unit at its smallest width)")


def _allocation(problem: AllocationProblem, choice: list[int], status: str) -> Allocation:
    """``choice[i]``: index into unit i's widths; bytes and error are recomputed exactly from the problem."""
    units = problem.units
    return Allocation(
        widths={u.name: u.widths[j] for u, j in zip(units, choice)},
        nbytes=sum(u.nbytes[j] for u, j in zip(units, choice)),
        error=math.fsum(u.error[j] for u, j in zip(units, choice)),
        status=status,
        budget=problem.budget,
    )


def solve_milp(problem: AllocationProblem, *, time_limit: float = 60.0, rel_gap: float = 1e-9) -> Allocation:
    """Least total error within the budget, as a 0/1 program: x_ir per unit i and width r, sum_r x_ir = 1,
    sum nbytes_ir x_ir <= budget, minimise sum error_ir x_ir; solved by ``scipy.optimize.milp`` (HiGHS).

    Exact reductions first: only Pareto-optimal widths (``Unit.front``) that fit the budget on their own enter,
    and a width is dropped when the Lagrangian bound of the LP relaxation proves that any allocation using it is
    worse than the greedy one (reduced-cost fixing; HiGHS has no incumbent to do this with, and its own heuristics
    take tens of seconds on 40k binaries). Each unit's least bytes and least error are subtracted (a constant, as
    every unit takes exactly one width), bytes are divided by the budget's slack and errors scaled so the greedy
    allocation's total is ``OBJECTIVE_SCALE``: the solver's absolute tolerances then mean ~1e-9 of the total error
    (errors spanning 1e-8..1e4 are fine). The greedy allocation is the incumbent: the result is never worse. If
    tolerances let the rounded solution exceed the budget, it is re-solved with the overrun taken off.

    ``status``: ``optimal`` (within ``rel_gap`` and the absolute gap above) or ``time_limit`` (feasible, not
    proven). Raises ``ValueError`` if even the smallest widths exceed the budget."""
    import numpy as np

    _check_feasible(problem)
    units = problem.units
    fronts = [u.front() for u in units]
    base_bytes = [u.nbytes[f[0]] for u, f in zip(units, fronts)]
    slack = problem.budget - sum(base_bytes)
    # widths whose extra bytes alone exceed the slack can never be chosen; the cheapest always stays
    fronts = [[j for j in f if u.nbytes[j] - b0 <= slack] for u, f, b0 in zip(units, fronts, base_bytes)]
    free = [i for i, f in enumerate(fronts) if len(f) > 1]
    if sum(units[i].nbytes[fronts[i][-1]] - base_bytes[i] for i in free) <= slack:
        return _allocation(problem, [f[-1] for f in fronts], "optimal")
    greedy = _greedy_choice(problem, fronts)

    # padded [free units, widths] arrays: extra bytes over the cheapest, error over the least (inf = no width)
    kmax = max(len(fronts[i]) for i in free)
    extra, loss = np.full((len(free), kmax), np.inf), np.full((len(free), kmax), np.inf)
    at_greedy = np.zeros(len(free), dtype=np.int64)
    for k, i in enumerate(free):
        u, f = units[i], fronts[i]
        extra[k, :len(f)] = [u.nbytes[j] - base_bytes[i] for j in f]
        loss[k, :len(f)] = [u.error[j] - u.error[f[-1]] for j in f]
        at_greedy[k] = f.index(greedy[i])
    rows = np.arange(len(free))
    cost = loss * (OBJECTIVE_SCALE / math.fsum(loss[rows, at_greedy]))
    keep = _lagrangian_keep(cost, extra / slack, OBJECTIVE_SCALE)
    keep[rows, at_greedy] = True

    choice = list(greedy)
    core = [k for k in range(len(free)) if keep[k].sum() > 1]
    for k in range(len(free)):
        if keep[k].sum() == 1:
            choice[free[k]] = fronts[free[k]][int(np.argmax(keep[k]))]
    in_core = {free[k] for k in core}
    core_slack = problem.budget - sum(u.nbytes[j] for i, (u, j) in enumerate(zip(units, choice)) if i not in in_core)
    status = "optimal"
    if core:
        status = _solve_core(problem, fronts, free, core, keep, cost, extra, core_slack, choice,
                             time_limit=time_limit, rel_gap=rel_gap)
    milp_error = math.fsum(u.error[j] for u, j in zip(units, choice))
    if math.fsum(u.error[j] for u, j in zip(units, greedy)) < milp_error:
        choice = greedy
    return _allocation(problem, choice, status)


def _lagrangian_keep(cost, extra, upper: float):
    """Widths that can appear in an allocation of (scaled) cost <= ``upper``: for any lambda >= 0,
    L = sum_i min_r (cost_ir + lambda extra_ir) - lambda is a lower bound (``extra`` is in units of the slack), and
    a width whose reduced cost exceeds ``upper - L`` cannot be used. lambda is the LP relaxation's (the breakpoint
    where the Lagrangian choice's bytes cross the slack), which makes L the LP bound. Rows sorted by extra."""
    import numpy as np

    with np.errstate(invalid="ignore"):
        slopes = (cost[:, :, None] - cost[:, None, :]) / (extra[:, None, :] - extra[:, :, None])
    lams = np.unique(slopes[np.isfinite(slopes) & (slopes > 0)])

    def spent(lam):
        return np.take_along_axis(extra, np.argmin(cost + lam * extra, axis=1)[:, None], 1).sum()

    lo, hi = 0, len(lams) - 1  # the smallest breakpoint whose choice fits (ties go to the cheaper width)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if spent(lams[mid]) <= 1 else (mid + 1, hi)
    lam = lams[lo]
    value = cost + lam * extra
    best = value.min(axis=1)
    bound = best.sum() - lam
    return value - best[:, None] <= upper - bound + 1e-9 * upper


def _solve_core(problem, fronts, free, core, keep, cost, extra, slack, choice, *, time_limit, rel_gap) -> str:
    """The MILP over the units left with more than one width; writes their widths into ``choice``."""
    import numpy as np
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import csr_array

    opts = [(k, r) for k in core for r in np.flatnonzero(keep[k])]
    n = len(opts)
    row = {k: g for g, k in enumerate(core)}
    group = np.array([row[k] for k, _ in opts])
    c = np.array([cost[k, r] for k, r in opts])
    nbytes = np.array([problem.units[free[k]].nbytes[fronts[free[k]][r]] for k, r in opts], dtype=np.float64)
    low = nbytes.min()
    pick = csr_array((np.ones(n), (group, np.arange(n))), shape=(len(core), n))
    margin = 0
    for _ in range(4):
        cap = slack - margin
        # bytes relative to the core's cheapest option, in units of the budget left over (coefficients ~1)
        scale = max(slack - len(core) * low, 1)
        knap = LinearConstraint(((nbytes - low) / scale)[None, :], -np.inf, (cap - len(core) * low) / scale)
        res = milp(c, constraints=[LinearConstraint(pick, 1, 1), knap], integrality=np.ones(n), bounds=Bounds(0, 1),
                   options={"time_limit": time_limit, "mip_rel_gap": rel_gap})
        if res.x is None:
            raise RuntimeError(f"milp found no solution: {res.message}")
        picked = {}
        for o, (k, r) in enumerate(opts):
            if k not in picked or res.x[o] > res.x[picked[k]]:
                picked[k] = o
        spent = 0
        for k, o in picked.items():
            choice[free[k]] = fronts[free[k]][opts[o][1]]
            spent += int(nbytes[o])
        if spent <= slack:
            return "optimal" if res.status == 0 else "time_limit"
        margin += spent - cap
    raise RuntimeError("milp solutions keep exceeding the budget by the solver's tolerance")


def solve_greedy(problem: AllocationProblem) -> Allocation:
    """Baseline: every unit starts at its cheapest width; repeatedly move the unit whose best upgrade (a Pareto
    width with more bytes that still fits) removes the most error per extra byte, until none fits. Ties go to the
    earlier unit, then the cheaper upgrade. Terminates: each move strictly raises one unit's bytes."""
    _check_feasible(problem)
    return _allocation(problem, _greedy_choice(problem, [u.front() for u in problem.units]), "greedy")


def _greedy_choice(problem: AllocationProblem, fronts: list[list[int]]) -> list[int]:
    units = problem.units
    pos = [0] * len(units)
    left = problem.budget - sum(u.nbytes[f[0]] for u, f in zip(units, fronts))
    version = [0] * len(units)

    def best_upgrade(i: int):
        u, f, p = units[i], fronts[i], pos[i]
        b0, e0 = u.nbytes[f[p]], u.error[f[p]]
        best = None
        for q in range(p + 1, len(f)):
            db = u.nbytes[f[q]] - b0
            if db > left:
                break
            key = (-(e0 - u.error[f[q]]) / db, i, db, q, version[i])
            if best is None or key < best:
                best = key
        return best

    heap = [k for k in map(best_upgrade, range(len(units))) if k is not None]
    heapq.heapify(heap)
    # an entry's gain never underestimates the unit's current best (the budget only shrinks), so a popped entry
    # that is current and still fits is the best move overall
    while heap:
        _, i, db, q, ver = heapq.heappop(heap)
        if ver != version[i]:
            continue
        if db <= left:
            left -= db
            pos[i] = q
        version[i] += 1
        k = best_upgrade(i)
        if k is not None:
            heapq.heappush(heap, k)
    return [f[p] for f, p in zip(fronts, pos)]


def uniform(problem: AllocationProblem, width: float) -> Allocation:
    """Every free unit at ``width`` (pinned units at theirs), whatever the budget: compare ``nbytes`` with it, or
    solve ``AllocationProblem(units, uniform(...).nbytes)`` to compare at equal bytes."""
    choice = []
    for u in problem.units:
        if u.pinned:
            choice.append(0)
        elif width in u.widths:
            choice.append(u.widths.index(width))
        else:
            raise ValueError(f"unit {u.name!r} has no width {width} (has {u.widths})")
    return _allocation(problem, choice, "fixed")


def allocation_counts(alloc: Allocation, names=None) -> dict[float, int]:
    """Units per width, widest first; only the units in ``names`` if given (e.g. to leave pinned ones out)."""
    counts: dict[float, int] = {}
    for name, w in alloc.widths.items():
        if names is None or name in names:
            counts[w] = counts.get(w, 0) + 1
    return dict(sorted(counts.items(), reverse=True))


def average_bits(alloc: Allocation, units) -> float:
    """Code bits per weight over the given units (those with a weight count)."""
    units = [u for u in units if u.weights > 0]
    total = sum(u.weights for u in units)
    if total == 0:
        raise ValueError("no unit has a weight count")
    return sum(u.weights * alloc.widths[u.name] for u in units) / total
