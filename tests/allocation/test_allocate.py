"""Rank allocation: invariants (property tests), hand-computed cases, determinism and input errors."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fimlora.allocation import STRATEGIES, Allocation, allocate_ranks, uniform_rank_budget
from fimlora.allocation.allocate import _continuous_targets
from fimlora.errors import FimloraError

# A numerical warning means an inf or nan slipped into the water-filling, even if the ranks look fine.
pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")

# derandomize + no example database: the same examples on every machine, every run (CI is deterministic).
PROPERTY_SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def cost(shape: tuple[int, int]) -> int:
    return shape[0] + shape[1]


def cap(shape: tuple[int, int], r_max: int | None) -> int:
    return min(shape[0], shape[1], r_max if r_max is not None else shape[0])


def shape_groups(allocation: Allocation) -> dict[tuple[int, int], list[int]]:
    groups: dict[tuple[int, int], list[int]] = {}
    for name, rank in allocation.ranks.items():
        groups.setdefault(allocation.shapes[name], []).append(rank)
    return {shape: sorted(ranks) for shape, ranks in groups.items()}


@st.composite
def problems(draw: st.DrawFn) -> dict:
    """A feasible allocation problem: a few distinct shapes reused across 1-12 modules (r_min 0 too:
    modules without an adapter)."""
    r_min = draw(st.integers(0, 3))
    r_max = draw(st.one_of(st.none(), st.integers(max(r_min, 1), 8)))
    dim = st.integers(max(2, r_min), 64)
    pool = draw(st.lists(st.tuples(dim, dim), min_size=1, max_size=4))
    n = draw(st.integers(1, 12))
    shapes = {f"m{i:02d}": draw(st.sampled_from(pool)) for i in range(n)}
    score = st.one_of(st.just(0.0), st.floats(0.0, 1e3, allow_nan=False), st.floats(1e-6, 1e6))
    scores = {name: draw(score) for name in shapes}
    if all(v == 0 for v in scores.values()):
        scores[draw(st.sampled_from(sorted(shapes)))] = draw(st.floats(1e-3, 1e3))
    # With r_min = 0 the budget must still pay one rank of some module.
    lowest = max(r_min * sum(cost(s) for s in shapes.values()), min(cost(s) for s in shapes.values()))
    highest = sum(cap(s, r_max) * cost(s) for s in shapes.values())
    # Reach past the all-capped budget too, where invariant 3 must hold with money left over.
    budget = draw(st.integers(lowest, highest + highest // 4 + 1))
    tau = draw(st.floats(0.25, 3.0))
    return {"scores": scores, "shapes": shapes, "budget": budget, "r_min": r_min, "r_max": r_max, "tau": tau}


def assert_invariants(allocation: Allocation, problem: dict) -> None:
    shapes, budget = problem["shapes"], problem["budget"]
    assert set(allocation.ranks) == set(shapes)
    spent = sum(r * cost(shapes[n]) for n, r in allocation.ranks.items())
    assert spent == allocation.num_params
    assert spent <= budget  # 1
    left = budget - spent
    for name, rank in allocation.ranks.items():
        module_cap = cap(shapes[name], problem["r_max"])
        assert problem["r_min"] <= rank <= module_cap  # 2
        if rank < module_cap:
            assert cost(shapes[name]) > left, f"{name} could still take a rank"  # 3


@pytest.mark.parametrize("strategy", STRATEGIES)
@PROPERTY_SETTINGS
@given(problem=problems())
def test_invariants_hold_for_every_strategy(strategy: str, problem: dict) -> None:
    allocation = allocate_ranks(**problem, strategy=strategy, seed=7)
    assert allocation.strategy == strategy
    assert_invariants(allocation, problem)


@PROPERTY_SETTINGS
@given(problem=problems(), seed=st.integers(0, 2**32 - 1))
def test_random_keeps_proportional_rank_multiset_per_shape(problem: dict, seed: int) -> None:
    proportional = allocate_ranks(**problem, strategy="proportional")
    shuffled = allocate_ranks(**problem, strategy="random", seed=seed)
    assert shape_groups(shuffled) == shape_groups(proportional)
    assert shuffled.num_params == proportional.num_params


@PROPERTY_SETTINGS
@given(problem=problems())
def test_proportional_is_monotone_within_a_shape(problem: dict) -> None:
    allocation = allocate_ranks(**problem, strategy="proportional")
    scores, shapes = problem["scores"], problem["shapes"]
    for a in shapes:
        for b in shapes:
            if shapes[a] == shapes[b] and scores[a] > scores[b]:
                assert allocation.ranks[a] >= allocation.ranks[b], (a, b)


@PROPERTY_SETTINGS
@given(problem=problems(), data=st.data())
def test_uniform_budget_gives_every_module_that_rank(problem: dict, data: st.DataObject) -> None:
    shapes, r_min, r_max = problem["shapes"], problem["r_min"], problem["r_max"]
    smallest_cap = min(cap(s, r_max) for s in shapes.values())
    rank = data.draw(st.integers(max(r_min, 1), smallest_cap))
    budget = uniform_rank_budget(shapes, rank)
    allocation = allocate_ranks(
        problem["scores"], shapes, budget=budget, strategy="uniform", r_min=r_min, r_max=r_max
    )
    assert set(allocation.ranks.values()) == {rank}
    assert allocation.num_params == budget


@PROPERTY_SETTINGS
@given(problem=problems())
def test_continuous_targets_spend_the_budget_at_one_common_c(problem: dict) -> None:
    names = sorted(problem["shapes"])
    shapes, r_min, r_max = problem["shapes"], problem["r_min"], problem["r_max"]
    scores = np.array([problem["scores"][n] for n in names])
    weights = (scores / scores.max()) ** problem["tau"]  # normalised first, as allocate_ranks does
    costs = np.array([cost(shapes[n]) for n in names])
    caps = np.array([cap(shapes[n], r_max) for n in names])
    targets = _continuous_targets(weights, costs, caps, budget=problem["budget"], r_min=r_min)
    assert np.all((targets >= r_min) & (targets <= caps))
    saturated = float(np.where(weights > 0, caps, r_min) @ costs)
    if problem["budget"] < saturated:
        assert float(targets @ costs) == pytest.approx(problem["budget"], rel=1e-9)
    # Modules strictly between r_min and their cap all share the same c = target / weight.
    free = (targets > r_min + 1e-9) & (targets < caps - 1e-9)
    if free.any():
        ratios = targets[free] / weights[free]
        assert ratios.max() == pytest.approx(ratios.min(), rel=1e-9)
        # ...and every module pinned at r_min or at its cap is there because c * w is beyond that bound.
        # (Modules whose cap equals r_min have no freedom at all and are left out.)
        c = ratios.mean()
        movable = caps > r_min
        at_floor = movable & (targets <= r_min + 1e-9)
        at_cap = movable & (targets >= caps - 1e-9)
        assert np.all(c * weights[at_floor] <= r_min * (1 + 1e-9) + 1e-9)
        assert np.all(c * weights[at_cap] >= caps[at_cap] * (1 - 1e-9))


# --------------------------------------------------------------------------------------------------
# Hand-computed cases
# --------------------------------------------------------------------------------------------------


def test_uniform_rank_budget_counts_parameters() -> None:
    assert uniform_rank_budget({"a": (8, 4), "b": (16, 16)}, 3) == 3 * (12 + 32)


def test_proportional_splits_by_score_ratio() -> None:
    shapes = {"a": (8, 8), "b": (8, 8)}
    allocation = allocate_ranks({"a": 3.0, "b": 1.0}, shapes, budget=uniform_rank_budget(shapes, 4))
    assert allocation.ranks == {"a": 6, "b": 2}
    assert allocation.num_params == 8 * 16


def test_proportional_redistributes_the_excess_of_capped_modules() -> None:
    # Uncapped, 'a' would take 7.5 of 9 ranks; capped at 4, the other 5 split 2.5/2.5, and the one
    # leftover rank goes to 'b' (equal deficit and score, smaller name).
    shapes = {name: (16, 16) for name in "abc"}
    allocation = allocate_ranks({"a": 10.0, "b": 1.0, "c": 1.0}, shapes, budget=9 * 32, r_max=4)
    assert allocation.ranks == {"a": 4, "b": 3, "c": 2}


def test_zero_score_module_stays_at_r_min() -> None:
    shapes = {"a": (8, 8), "b": (8, 8)}
    allocation = allocate_ranks({"a": 1.0, "b": 0.0}, shapes, budget=8 * 16)
    assert allocation.ranks == {"a": 7, "b": 1}


def test_tau_sharpens_and_flattens() -> None:
    shapes = {"a": (16, 16), "b": (16, 16)}
    scores = {"a": 4.0, "b": 1.0}
    budget = 10 * 32
    assert allocate_ranks(scores, shapes, budget=budget, tau=0.5).ranks == {"a": 7, "b": 3}
    assert allocate_ranks(scores, shapes, budget=budget, tau=1.0).ranks == {"a": 8, "b": 2}


def test_leftover_goes_to_modules_that_still_fit() -> None:
    # Costs 8 and 64; after floor(2.5)=2 on both, 40 parameters are left: only the cheap module fits.
    shapes = {"big": (32, 32), "small": (4, 4)}
    allocation = allocate_ranks(None, shapes, budget=2 * 64 + 2 * 8 + 40, strategy="uniform")
    assert allocation.ranks == {"big": 2, "small": 4}  # small is capped at min(4, 4)
    assert allocation.num_params == 2 * 64 + 4 * 8


def test_uniform_spends_leftover_deterministically() -> None:
    shapes = {"b": (8, 8), "a": (8, 8)}
    allocation = allocate_ranks({"a": 1.0, "b": 5.0}, shapes, budget=5 * 16, strategy="uniform")
    assert allocation.ranks == {"a": 3, "b": 2}


def test_budget_beyond_every_cap_leaves_everything_at_cap() -> None:
    shapes = {"a": (4, 8), "b": (2, 6)}
    allocation = allocate_ranks({"a": 1.0, "b": 0.0}, shapes, budget=10_000)
    assert allocation.ranks == {"a": 4, "b": 2}


def test_same_call_gives_the_same_allocation() -> None:
    shapes = {f"m{i}": (16, 8 + i) for i in range(6)}
    scores = {name: float(i % 3) + 0.5 for i, name in enumerate(shapes)}
    budget = uniform_rank_budget(shapes, 3) + 17
    for strategy in STRATEGIES:
        first = allocate_ranks(scores, shapes, budget=budget, strategy=strategy, seed=3)
        second = allocate_ranks(
            dict(reversed(scores.items())), shapes, budget=budget, strategy=strategy, seed=3
        )
        assert first == second


def test_random_depends_on_seed_and_is_reproducible() -> None:
    shapes = {f"m{i}": (16, 16) for i in range(8)}
    scores = {name: float(i + 1) for i, name in enumerate(shapes)}
    budget = uniform_rank_budget(shapes, 6)
    proportional = allocate_ranks(scores, shapes, budget=budget)
    assert len(set(proportional.ranks.values())) > 3
    outcomes = {
        tuple(sorted(allocate_ranks(scores, shapes, budget=budget, strategy="random", seed=s).ranks.items()))
        for s in range(5)
    }
    assert len(outcomes) > 1
    again = allocate_ranks(scores, shapes, budget=budget, strategy="random", seed=2)
    assert again == allocate_ranks(scores, shapes, budget=budget, strategy="random", seed=2)
    assert Counter(again.ranks.values()) == Counter(proportional.ranks.values())


def test_huge_scores_and_tau_do_not_overflow() -> None:
    shapes = {"a": (8, 8), "b": (8, 8)}
    allocation = allocate_ranks({"a": 1e300, "b": 1e299}, shapes, budget=8 * 16, tau=3.0)
    assert allocation.ranks == {"a": 7, "b": 1}


def test_vanishing_score_behaves_like_zero() -> None:
    shapes = {"a": (8, 8), "b": (8, 8), "c": (8, 8)}
    allocation = allocate_ranks({"a": 1.0, "b": 5e-324, "c": 0.0}, shapes, budget=10 * 16, tau=2.0)
    assert allocation.ranks == {"a": 8, "b": 1, "c": 1}


def test_allocation_records_its_settings() -> None:
    shapes = {"a": (8, 8), "b": (8, 8)}
    allocation = allocate_ranks(
        {"a": 3.0, "b": 1.0}, shapes, budget=160, strategy="random", r_min=2, r_max=6, tau=0.5, seed=9
    )
    assert (allocation.budget, allocation.r_min, allocation.r_max, allocation.tau, allocation.seed) == (
        160,
        2,
        6,
        0.5,
        9,
    )
    assert allocation.scores == {"a": 3.0, "b": 1.0}
    summary = allocation.summary()
    assert summary["num_params"] == allocation.num_params
    assert summary["min_rank"] <= summary["mean_rank"] <= summary["max_rank"]
    assert math.isclose(summary["mean_rank"], sum(allocation.ranks.values()) / 2)


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------

SHAPES = {"a": (8, 8), "b": (8, 8)}
SCORES = {"a": 1.0, "b": 2.0}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"strategy": "fisher"}, "proportional, uniform, random"),
        ({"r_min": -1}, "r_min"),
        ({"r_min": 0, "budget": 15}, "cannot pay one rank of any module"),
        ({"r_min": 0, "r_max": 0}, "r_max"),
        ({"r_min": 3, "r_max": 2}, "r_max"),
        ({"budget": 16 * 2 - 1}, "at least 32"),
        ({"r_min": 2, "budget": 63}, "at least 64"),
        ({"budget": 0}, "positive"),
        ({"budget": -5}, "positive"),
        ({"budget": 100.0}, "integer"),
        ({"scores": {"a": -1.0, "b": 1.0}}, "'a'.*non-negative"),
        ({"scores": {"a": 1.0, "b": math.nan}}, "'b'"),
        ({"scores": {"a": math.inf, "b": 1.0}}, "'a'"),
        ({"scores": {"a": 0.0, "b": 0.0}}, "zero"),
        ({"scores": {"a": 0.0, "b": 0.0}, "strategy": "random"}, "zero"),
        ({"scores": {"a": 1.0, "c": 1.0}}, "'b'.*'c'"),
        ({"scores": {"a": 1.0}}, "differ"),
        ({"scores": {}}, "empty"),
        ({"shapes": {}, "scores": {}}, "empty"),
        ({"scores": None}, "needs importance scores"),
        ({"tau": 0.0}, "tau"),
        ({"tau": -1.0}, "tau"),
        ({"tau": math.inf}, "tau"),
        ({"tau": math.nan}, "tau"),
        ({"shapes": {"a": (8, 8), "b": (8, 0)}}, "'b'.*positive"),
        ({"shapes": {"a": (8, 8), "b": (1, 8)}, "r_min": 2}, "'b'.*min\\(d_in, d_out\\)"),
    ],
)
def test_bad_input_raises_fimlora_error(kwargs: dict, match: str) -> None:
    call = {"scores": SCORES, "shapes": SHAPES, "budget": 1000, **kwargs}
    with pytest.raises(FimloraError, match=match):
        allocate_ranks(call.pop("scores"), call.pop("shapes"), **call)


def test_all_zero_scores_are_fine_for_uniform() -> None:
    allocation = allocate_ranks({"a": 0.0, "b": 0.0}, SHAPES, budget=64, strategy="uniform")
    assert allocation.ranks == {"a": 2, "b": 2}


def test_key_mismatch_names_only_a_few_modules() -> None:
    shapes = {f"m{i}": (4, 4) for i in range(10)}
    with pytest.raises(FimloraError, match="and 7 more"):
        allocate_ranks({"x": 1.0}, shapes, budget=1000)


@pytest.mark.parametrize("rank", [0, -1, 2.5])
def test_uniform_rank_budget_rejects_bad_rank(rank: float) -> None:
    with pytest.raises(FimloraError, match="positive integer"):
        uniform_rank_budget(SHAPES, rank)  # type: ignore[arg-type]
