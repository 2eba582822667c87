"""Explicit per-rank costs (LoRA-FA's d_out, HydraLoRA's d_in + k·d_out): the allocators' budget rules hold
in those units, caps stay min(d_in, d_out), and no costs means d_in + d_out."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fimlora.allocation import STRATEGIES, Allocation, allocate_ranks, allocate_spectral
from fimlora.errors import FimloraError

pytestmark = pytest.mark.filterwarnings("error::RuntimeWarning")
PROPERTY_SETTINGS = settings(max_examples=120, deadline=None, derandomize=True, database=None)


def cap(shape: tuple[int, int], r_max: int | None) -> int:
    return min(shape[0], shape[1], r_max if r_max is not None else shape[0])


@st.composite
def costed_problems(draw: st.DrawFn) -> dict:
    r_min = draw(st.integers(0, 3))
    r_max = draw(st.one_of(st.none(), st.integers(max(r_min, 1), 8)))
    dim = st.integers(max(2, r_min), 48)
    pool = draw(st.lists(st.tuples(dim, dim), min_size=1, max_size=4))
    n = draw(st.integers(1, 10))
    shapes = {f"m{i:02d}": draw(st.sampled_from(pool)) for i in range(n)}
    # A cost tied to the shape (as every cost model is) but not d_in + d_out: anything from d_out up.
    factor = {s: draw(st.integers(1, 3)) for s in pool}
    rank_costs = {name: factor[s] * s[0] + draw(st.sampled_from([0, s[1]])) for name, s in shapes.items()}
    rank_costs = {name: rank_costs[name] for name in shapes}
    scores = {name: draw(st.floats(1e-3, 1e3)) for name in shapes}
    lowest = max(r_min * sum(rank_costs.values()), min(rank_costs.values()))
    highest = sum(cap(shapes[n], r_max) * rank_costs[n] for n in shapes)
    budget = draw(st.integers(lowest, highest + highest // 4 + 1))
    return {
        "scores": scores, "shapes": shapes, "budget": budget, "r_min": r_min, "r_max": r_max,
        "rank_costs": rank_costs,
    }  # fmt: skip


def assert_rules(allocation: Allocation, problem: dict) -> None:
    shapes, budget, costs = problem["shapes"], problem["budget"], problem["rank_costs"]
    spent = sum(r * costs[n] for n, r in allocation.ranks.items())
    assert spent == allocation.num_params <= budget
    for name, rank in allocation.ranks.items():
        module_cap = cap(shapes[name], problem["r_max"])
        assert problem["r_min"] <= rank <= module_cap
        if rank < module_cap:
            assert costs[name] > budget - spent, f"{name} could still take a rank"


@pytest.mark.parametrize("strategy", STRATEGIES)
@PROPERTY_SETTINGS
@given(problem=costed_problems())
def test_budget_rules_hold_in_the_given_cost_units(strategy: str, problem: dict) -> None:
    allocation = allocate_ranks(**problem, strategy=strategy, seed=3)
    assert_rules(allocation, problem)


@PROPERTY_SETTINGS
@given(problem=costed_problems(), seed=st.integers(0, 1000))
def test_spectral_obeys_the_rules_in_the_given_cost_units(problem: dict, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    gradients = {n: torch.randn(*s, generator=gen, dtype=torch.float64) for n, s in problem["shapes"].items()}
    allocation = allocate_spectral(
        gradients, problem["shapes"], budget=problem["budget"], r_min=problem["r_min"],
        r_max=problem["r_max"], rank_costs=problem["rank_costs"],
    )  # fmt: skip
    assert_rules(allocation, problem)


@PROPERTY_SETTINGS
@given(problem=costed_problems())
def test_costs_of_d_in_plus_d_out_are_the_default(problem: dict) -> None:
    plain = {n: s[0] + s[1] for n, s in problem["shapes"].items()}
    kwargs = {k: v for k, v in problem.items() if k not in {"rank_costs", "budget"}}
    budget = problem["r_min"] * sum(plain.values()) + max(plain.values()) + problem["budget"] % 97
    explicit = allocate_ranks(**kwargs, budget=budget, rank_costs=plain)
    default = allocate_ranks(**kwargs, budget=budget)
    assert explicit.ranks == default.ranks and explicit.num_params == default.num_params
    assert explicit.rank_costs is None  # nothing to record


def test_a_cheaper_rank_buys_more_ranks_at_the_same_budget() -> None:
    shapes = {"a": (384, 384), "b": (1536, 384), "c": (384, 1536)}
    budget = 2 * sum(d_out + d_in for d_out, d_in in shapes.values())
    b_only = {n: d_out for n, (d_out, _) in shapes.items()}  # LoRA-FA: only B trains
    lora = allocate_ranks(None, shapes, budget=budget, strategy="uniform")
    lora_fa = allocate_ranks(None, shapes, budget=budget, strategy="uniform", rank_costs=b_only)
    assert set(lora.ranks.values()) == {2}
    assert lora_fa.num_params <= budget and min(lora_fa.ranks.values()) >= 3
    assert lora_fa.num_params == sum(r * b_only[n] for n, r in lora_fa.ranks.items())


def test_allocation_keeps_its_costs_through_json() -> None:
    allocation = Allocation(
        ranks={"a": 3, "b": 2}, shapes={"a": (8, 4), "b": (6, 6)}, budget=40, strategy="uniform",
        rank_costs={"a": 8, "b": 6},
    )  # fmt: skip
    assert allocation.num_params == 3 * 8 + 2 * 6
    again = Allocation.from_dict(allocation.to_dict())
    assert again == allocation and again.num_params == allocation.num_params
    assert (
        "rank_costs" not in Allocation(ranks={"a": 1}, shapes={"a": (2, 2)}, budget=4, strategy="x").to_dict()
    )


@pytest.mark.parametrize(
    ("rank_costs", "message"),
    [({"a": 4}, "keys of rank_costs and shapes differ"), ({"a": 4, "b": 0}, "positive integer")],
)
def test_bad_costs_are_one_clear_error(rank_costs: dict, message: str) -> None:
    shapes = {"a": (4, 4), "b": (4, 4)}
    with pytest.raises(FimloraError, match=message):
        allocate_ranks(None, shapes, budget=64, strategy="uniform", rank_costs=rank_costs)
