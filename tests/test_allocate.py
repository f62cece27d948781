"""The per-unit precision allocator (moeq.quant.allocate): the MILP against brute force and the greedy baseline,
budget edge cases, noisy (non-monotone) errors, determinism, budget strings, and a 40k-binary instance."""

import itertools
import math
import random
import time

import pytest

from moeq.quant import allocate
from moeq.quant.allocate import (
    AllocationProblem,
    Budget,
    Unit,
    allocation_counts,
    average_bits,
    parse_budget,
    resolve_budget,
    solve_greedy,
    solve_milp,
    uniform,
)

WIDTHS = (2, 3, 4, 6, 8)


def brute_force(problem):
    """Least error over every combination of widths that fits (the reference for small instances)."""
    best = math.inf
    for combo in itertools.product(*(range(len(u.widths)) for u in problem.units)):
        if sum(u.nbytes[j] for u, j in zip(problem.units, combo)) <= problem.budget:
            best = min(best, math.fsum(u.error[j] for u, j in zip(problem.units, combo)))
    return best


def random_units(rng, n, widths=WIDTHS, noisy=False, span=(-2, 2)):
    """Units of random size and sensitivity; error ~ scale * 4^-r, optionally with noise that breaks monotonicity."""
    units = []
    for i in range(n):
        scale = 10 ** rng.uniform(*span)
        err = [scale * 4.0 ** -r * (rng.uniform(0.3, 3.0) if noisy else rng.uniform(0.8, 1.25)) for r in widths]
        units.append(Unit.from_weights(f"u{i}", widths, err, weights=rng.randint(1, 64) * 64, meta_bytes=rng.randint(0, 40)))
    return units


def random_budget(rng, units):
    lo = sum(min(u.nbytes) for u in units)
    hi = sum(max(u.nbytes) for u in units)
    return rng.randint(lo, hi)


def check_feasible(problem, alloc):
    by_name = {u.name: u for u in problem.units}
    nbytes = sum(by_name[n].nbytes[by_name[n].widths.index(w)] for n, w in alloc.widths.items())
    error = math.fsum(by_name[n].error[by_name[n].widths.index(w)] for n, w in alloc.widths.items())
    assert list(alloc.widths) == [u.name for u in problem.units]
    assert nbytes == alloc.nbytes <= problem.budget
    assert error == pytest.approx(alloc.error, rel=1e-12)


# ---- exactness ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("noisy", [False, True])
def test_milp_matches_brute_force(noisy, monkeypatch):
    calls = []
    solve_core = allocate._solve_core
    monkeypatch.setattr(allocate, "_solve_core", lambda *a, **k: calls.append(1) or solve_core(*a, **k))
    rng = random.Random(1 + noisy)
    for _ in range(60):
        units = random_units(rng, 4, widths=(2, 4, 8) if rng.random() < 0.5 else (3, 4, 6), noisy=noisy)
        problem = AllocationProblem(units, random_budget(rng, units))
        alloc = solve_milp(problem)
        check_feasible(problem, alloc)
        assert alloc.status == "optimal"
        assert alloc.error == pytest.approx(brute_force(problem), rel=1e-9, abs=0)
        greedy = solve_greedy(problem)
        check_feasible(problem, greedy)
        assert alloc.error <= greedy.error
    assert len(calls) >= 10  # the solver itself ran, not only the exact reductions around it


def test_reductions_keep_the_optimum(monkeypatch):
    # the reduced-cost fixing is exact: the same optimum as the MILP over every Pareto width (too many for brute force)
    rng = random.Random(8)
    instances = []
    for trial in range(12):
        units = random_units(rng, 40, noisy=trial % 2 == 1)
        instances.append(AllocationProblem(units, random_budget(rng, units)))
    reduced = [solve_milp(p).error for p in instances]
    monkeypatch.setattr(allocate, "_lagrangian_keep", lambda cost, extra, upper: cost < math.inf)
    monkeypatch.setattr(allocate, "_greedy_choice", lambda problem, fronts: [f[0] for f in fronts])  # no incumbent
    for p, err in zip(instances, reduced):
        assert solve_milp(p).error == pytest.approx(err, rel=1e-9, abs=0)


def test_errors_spanning_twelve_decades_match_brute_force():
    rng = random.Random(7)
    for _ in range(15):
        units = random_units(rng, 6, widths=(2, 4, 8), span=(-8, 4))
        problem = AllocationProblem(units, random_budget(rng, units))
        assert solve_milp(problem).error == pytest.approx(brute_force(problem), rel=1e-9, abs=0)


def test_milp_never_worse_than_greedy_and_often_better():
    rng = random.Random(3)
    better = 0
    for trial in range(80):
        units = random_units(rng, rng.randint(5, 40), noisy=trial % 2 == 1)
        problem = AllocationProblem(units, random_budget(rng, units))
        milp, greedy = solve_milp(problem), solve_greedy(problem)
        check_feasible(problem, milp)
        check_feasible(problem, greedy)
        assert milp.error <= greedy.error
        better += milp.error < greedy.error * (1 - 1e-6)
    assert better >= 5


def naive_greedy(problem):
    """The greedy rule, scanning every unit at every step: best error decrease per extra byte among the upgrades
    that fit, ties to the earlier unit and then the cheaper upgrade."""
    fronts = [u.front() for u in problem.units]
    pos = [0] * len(fronts)
    left = problem.budget - sum(u.nbytes[f[0]] for u, f in zip(problem.units, fronts))
    while True:
        moves = []
        for i, (u, f) in enumerate(zip(problem.units, fronts)):
            for q in range(pos[i] + 1, len(f)):
                db = u.nbytes[f[q]] - u.nbytes[f[pos[i]]]
                if db <= left:
                    moves.append((-(u.error[f[pos[i]]] - u.error[f[q]]) / db, i, db, q))
        if not moves:
            return {u.name: u.widths[f[p]] for u, f, p in zip(problem.units, fronts, pos)}
        _, i, db, q = min(moves)
        left -= db
        pos[i] = q


def test_greedy_follows_its_rule():
    rng = random.Random(2)
    for trial in range(40):
        units = random_units(rng, 15, noisy=trial % 2 == 1)
        problem = AllocationProblem(units, random_budget(rng, units))
        assert solve_greedy(problem).widths == naive_greedy(problem)


def test_greedy_trap():
    # "a" has the best gain per byte but, once upgraded, "b"'s big upgrade no longer fits; the optimum skips "a"
    a = Unit("a", (2, 4), (10, 20), (2.0, 0.0))       # 0.2 error per byte
    b = Unit("b", (2, 4), (10, 100), (100.0, 85.0))   # 15 for 90 bytes: 0.167 per byte
    problem = AllocationProblem([a, b], 110)
    greedy, milp = solve_greedy(problem), solve_milp(problem)
    assert greedy.widths == {"a": 4, "b": 2} and greedy.error == 100.0
    assert milp.widths == {"a": 2, "b": 4} and milp.error == 87.0 and milp.nbytes == 110


# ---- budgets ------------------------------------------------------------------------------------------------------


def test_budget_equal_to_all_min():
    rng = random.Random(11)
    units = random_units(rng, 12)
    problem = AllocationProblem(units, sum(min(u.nbytes) for u in units))
    for alloc in (solve_milp(problem), solve_greedy(problem)):
        assert set(alloc.widths.values()) == {2}
        assert alloc.nbytes == problem.budget
    with pytest.raises(ValueError, match=f"minimum {problem.budget} bytes"):
        solve_milp(AllocationProblem(units, problem.budget - 1))
    with pytest.raises(ValueError, match=f"minimum {problem.budget} bytes"):
        solve_greedy(AllocationProblem(units, problem.budget - 1))


def test_budget_above_all_max():
    rng = random.Random(12)
    units = random_units(rng, 12)
    problem = AllocationProblem(units, sum(max(u.nbytes) for u in units) + 1000)
    for alloc in (solve_milp(problem), solve_greedy(problem)):
        assert set(alloc.widths.values()) == {8}
        assert alloc.status in ("optimal", "greedy")


def test_larger_budget_never_gives_higher_error():
    rng = random.Random(5)
    units = random_units(rng, 30, noisy=True)
    lo, hi = sum(min(u.nbytes) for u in units), sum(max(u.nbytes) for u in units)
    errors = [solve_milp(AllocationProblem(units, lo + (hi - lo) * k // 40)).error for k in range(41)]
    assert all(b <= a for a, b in itertools.pairwise(errors))
    assert errors[-1] < errors[0]


def test_noisy_errors_skip_dominated_widths():
    # 6 bits loses more than 4 bits here: it is never worth its bytes, whatever the budget
    u = Unit("noisy", (2, 4, 6, 8), (10, 20, 30, 40), (5.0, 1.0, 3.0, 0.5))
    other = Unit("o", (2, 8), (10, 40), (4.0, 0.0))
    assert [u.widths[j] for j in u.front()] == [2, 4, 8]
    for budget in range(20, 81):
        problem = AllocationProblem([u, other], budget)
        milp, greedy = solve_milp(problem), solve_greedy(problem)
        assert milp.widths["noisy"] != 6 and greedy.widths["noisy"] != 6
        assert milp.error == brute_force(problem)


def test_flat_errors_terminate():
    # no width improves anything: greedy has no upgrade to make, the MILP nothing to trade
    units = [Unit(f"f{i}", WIDTHS, tuple(10 * r for r in WIDTHS), (1.0,) * 5) for i in range(20)]
    problem = AllocationProblem(units, 10**6)
    for alloc in (solve_milp(problem), solve_greedy(problem)):
        assert set(alloc.widths.values()) == {2} and alloc.error == 20.0


def test_ties_are_deterministic():
    units = [Unit(f"e{i}", (2, 4), (10, 20), (1.0, 0.5)) for i in range(6)]
    problem = AllocationProblem(units, 60 + 30)  # room for three of six identical upgrades
    greedy = solve_greedy(problem)
    assert [n for n, w in greedy.widths.items() if w == 4] == ["e0", "e1", "e2"]  # ties go to the earlier unit
    first = solve_milp(problem)
    assert first.error == 4.5 and allocation_counts(first) == {4: 3, 2: 3}
    assert all(solve_milp(problem).widths == first.widths for _ in range(3))


def test_pinned_units_only_consume_budget():
    rng = random.Random(9)
    units = random_units(rng, 6, widths=(2, 4, 8)) + [Unit.pinned_at("attention", 8, 5000, weights=5000)]
    problem = AllocationProblem(units, random_budget(rng, units))
    for alloc in (solve_milp(problem), solve_greedy(problem)):
        assert alloc.widths["attention"] == 8
    assert solve_milp(problem).error == pytest.approx(brute_force(problem), rel=1e-9)


# ---- uniform, summaries, bits budgets ----------------------------------------------------------------------------


def test_uniform_and_milp_at_equal_bytes():
    rng = random.Random(4)
    units = random_units(rng, 25) + [Unit.pinned_at("attention", 8, 4096, weights=4096)]
    problem = AllocationProblem(units, 0)
    flat = uniform(problem, 3)
    assert flat.nbytes == sum(u.nbytes[u.widths.index(3)] for u in units[:-1]) + 4096
    assert flat.widths["attention"] == 8 and flat.status == "fixed"
    same_bytes = solve_milp(AllocationProblem(units, flat.nbytes))
    assert same_bytes.nbytes <= flat.nbytes and same_bytes.error <= flat.error
    with pytest.raises(ValueError, match="no width 5"):
        uniform(problem, 5)


def test_bits_budget_is_uniform_bytes():
    rng = random.Random(6)
    units = random_units(rng, 20) + [Unit.pinned_at("attention", 8, 777)]
    free = [u.name for u in units if not u.pinned]
    for r in (2, 3, 4):
        problem = AllocationProblem.from_spec(units, str(r))
        assert problem.budget == uniform(problem, r).nbytes
        alloc = solve_milp(problem)
        assert alloc.error <= uniform(problem, r).error
        assert average_bits(alloc, [u for u in units if not u.pinned]) <= r + 1e-9
        assert sum(allocation_counts(alloc, free).values()) == 20
    # 3.5 bits sits between the uniform 3- and 4-bit bytes
    mid = AllocationProblem.from_spec(units, "3.5bits").budget
    assert uniform(problem, 3).nbytes < mid < uniform(problem, 4).nbytes
    assert AllocationProblem.from_spec(units, "1234B").budget == 1234
    with pytest.raises(ValueError, match="no weight count"):
        resolve_budget(Budget(3.0, "bits"), [Unit("x", (2, 4), (1, 2), (1.0, 0.0))])


def test_allocation_counts():
    units = [Unit(f"e{i}", (2, 4, 8), (1, 2, 4), (3.0, 2.0, 1.0)) for i in range(5)]
    alloc = uniform(AllocationProblem(units, 0), 4)
    assert allocation_counts(alloc) == {4: 5}
    # 7 bytes over the minimum: five 2->4 upgrades (1 byte, -1 each) and one 4->8 (2 bytes, -1) is the optimum
    choice = solve_milp(AllocationProblem(units, 5 + 7))
    assert choice.error == 15.0 - 6
    assert allocation_counts(choice) == {8: 1, 4: 4} and list(allocation_counts(choice)) == [8, 4]
    assert sum(allocation_counts(choice, {"e0", "e1"}).values()) == 2


# ---- budget strings -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("3", Budget(3.0, "bits")),
    ("3.5", Budget(3.5, "bits")),
    ("3.5bits", Budget(3.5, "bits")),
    ("2.25 bpw", Budget(2.25, "bits")),
    (" 4bit ", Budget(4.0, "bits")),
    ("32", Budget(32.0, "bits")),
    ("750MB", Budget(750_000_000, "bytes")),
    ("750mb", Budget(750_000_000, "bytes")),
    ("1.2GiB", Budget(1_288_490_188, "bytes")),  # floor(1.2 * 2**30)
    ("1.5 KB", Budget(1500, "bytes")),
    ("123456B", Budget(123456, "bytes")),
    ("2TiB", Budget(2 * 1024**4, "bytes")),
])
def test_parse_budget(text, expected):
    assert parse_budget(text) == expected


@pytest.mark.parametrize("text, message", [
    ("123456", "write 123456B for bytes"),
    ("33", "write 33B for bytes"),
    ("0", r"\(0, 32\]"),
    ("40bits", r"\(0, 32\]"),
    ("0.4B", "at least 1 byte"),
    ("3 parsecs", "unknown unit 'parsecs'"),
    ("", "expected a number"),
    ("-3", "expected a number"),
    ("1e9", "expected a number"),
    ("nan", "expected a number"),
    ("3.5.1", "expected a number"),
])
def test_parse_budget_rejects(text, message):
    with pytest.raises(ValueError, match=message) as info:
        parse_budget(text)
    assert "\n" not in str(info.value)


def test_unit_validation():
    with pytest.raises(ValueError, match="same non-zero length"):
        Unit("x", (2, 4), (1,), (1.0, 0.5))
    with pytest.raises(ValueError, match="repeated width"):
        Unit("x", (2, 2), (1, 2), (1.0, 0.5))
    with pytest.raises(ValueError, match="finite"):
        Unit("x", (2, 4), (1, 2), (float("nan"), 0.5))
    with pytest.raises(ValueError, match="non-negative integers"):
        Unit("x", (2, 4), (1, -2), (1.0, 0.5))
    with pytest.raises(ValueError, match="unique"):
        AllocationProblem([Unit("x", (2,), (1,), (0.0,))] * 2, 10)


# ---- scale --------------------------------------------------------------------------------------------------------


def test_forty_thousand_binaries_in_seconds():
    # 64 layers x 128 experts x 5 widths, expert sizes and sensitivities spread over 12 decades, plus attention
    rng = random.Random(0)
    units = []
    for layer in range(64):
        for e in range(128):
            scale = 10 ** rng.uniform(-6, 4)
            err = [scale * 4.0 ** -r * rng.lognormvariate(0, 0.3) for r in WIDTHS]
            units.append(Unit.from_weights(f"l{layer}.e{e}", WIDTHS, err, rng.choice((1, 2, 3)) * 2**20, 2**15))
    units.append(Unit.pinned_at("attention", 8, 2**30))
    problem = AllocationProblem.from_spec(units, "3.3")
    t = time.perf_counter()
    milp = solve_milp(problem)
    elapsed = time.perf_counter() - t
    greedy = solve_greedy(problem)
    check_feasible(problem, milp)
    assert milp.status == "optimal"
    assert milp.error <= greedy.error
    assert milp.error < uniform(problem, 3).error
    assert elapsed < 10, elapsed
