"""Rank allocation under a trainable-parameter budget.

Conventions used throughout this module:

* ``shapes[name] = (d_out, d_in)``, the shape of a ``torch.nn.Linear`` weight.
* A LoRA adapter of rank ``r`` on a module trains ``r * (d_in + d_out)`` parameters (A is ``r x d_in``,
  B is ``d_out x r``); that number is the module's *cost per rank*, unless ``rank_costs`` says what a
  rank trains instead (LoRA-FA freezes A: ``d_out``; HydraLoRA's k heads: ``d_in + k * d_out``).
* ``budget`` counts trainable LoRA parameters, never ranks.
* A module's effective rank cap is ``min(r_max, d_in, d_out)`` (``min(d_in, d_out)`` when ``r_max`` is
  None): a rank above ``min(d_in, d_out)`` adds parameters but no expressiveness.

Every strategy returns ranks that satisfy, for all modules ``i``:

1. ``sum_i r_i * cost_i <= budget``;
2. ``r_min <= r_i <= cap_i``;
3. the budget is spent: no module with ``r_i < cap_i`` has ``cost_i <= budget - num_params``.

``r_min = 0`` is allowed: a module at rank 0 gets no adapter at all (it is left out of the PEFT
config's ``target_modules``) and costs nothing. At least one module must then get a rank, so the budget
must pay for one rank of the cheapest module.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Mapping

import numpy as np

from fimlora.allocation.allocation import Allocation
from fimlora.errors import FimloraError

STRATEGIES: tuple[str, ...] = ("proportional", "uniform", "random")

# How many offending names to quote in an error message before it stops being readable.
_MAX_NAMES_IN_MESSAGE = 3


def uniform_rank_budget(shapes: Mapping[str, tuple[int, int]], rank: int) -> int:
    """Trainable LoRA parameters of a uniform rank-``rank`` adapter on every module: the default budget.

    Returns ``sum over modules of rank * (d_in + d_out)``. The rank is not capped per module, so this is
    exactly the parameter count of a plain ``LoraConfig(r=rank)`` on the same modules.
    """
    _check_shapes(shapes)
    if not _is_int(rank) or rank < 1:
        raise FimloraError(f"The uniform rank must be a positive integer, but got {rank!r}.")
    return int(rank) * sum(_cost_per_rank(shape) for shape in shapes.values())


def allocate_ranks(
    scores: Mapping[str, float] | None,
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int,
    strategy: str = "proportional",
    r_min: int = 1,
    r_max: int | None = None,
    tau: float = 1.0,
    seed: int = 0,
    rank_costs: Mapping[str, int] | None = None,
) -> Allocation:
    """Allocate LoRA ranks to modules so the adapter trains at most ``budget`` parameters.

    Args:
        scores: non-negative importance per module (e.g. a Fisher trace). May be None only for
            ``strategy="uniform"``, which ignores the values.
        shapes: ``(d_out, d_in)`` per module, the same keys as ``scores``.
        budget: number of trainable LoRA parameters allowed, ``sum_i r_i * cost_i``.
        strategy: ``"proportional"`` (rank proportional to ``score ** tau``), ``"uniform"`` (equal ranks)
            or ``"random"`` (proportional's ranks shuffled among modules of identical shape: the control
            that tells whether the scores carry information).
        r_min: smallest rank any module gets.
        r_max: largest rank any module gets; each module's cap is ``min(r_max, d_in, d_out)``.
        tau: temperature on the scores; ``tau < 1`` flattens, ``tau > 1`` sharpens the allocation.
        seed: seed of the permutation used by ``strategy="random"``.
        rank_costs: trainable parameters one rank adds per module (same keys as ``shapes``); None means
            ``d_in + d_out``. Caps stay ``min(r_max, d_in, d_out)`` whatever a rank costs.

    Raises:
        FimloraError: for any invalid input, including a budget below ``r_min * sum_i cost_i``.
    """
    _check_strategy(strategy)
    _check_hyperparameters(budget=budget, r_min=r_min, r_max=r_max, tau=tau, seed=seed)
    _check_shapes(shapes)
    if scores is None:
        if strategy != "uniform":
            raise FimloraError(
                f"Strategy {strategy!r} needs importance scores, but scores is None; "
                "pass a score per module or use strategy='uniform'."
            )
    else:
        _check_scores(scores, shapes, needs_signal=strategy != "uniform")

    _check_rank_costs(rank_costs, shapes)
    names = sorted(shapes)
    costs = np.array([rank_cost(shapes, rank_costs, n) for n in names], dtype=np.int64)
    caps = np.array([_rank_cap(shapes[n], r_max) for n in names], dtype=np.int64)
    _check_caps(names, caps, r_min)
    check_minimum_budget(budget, costs.tolist(), r_min)

    if strategy == "uniform":
        score_vec = np.ones(len(names))
    else:
        assert scores is not None  # checked above
        score_vec = np.array([float(scores[n]) for n in names], dtype=np.float64)
    ranks = _proportional_ranks(names, score_vec, costs, caps, budget=budget, r_min=r_min, tau=tau)
    if strategy == "random":
        ranks = _permute_within_shape_groups(
            ranks, shapes, seed, dict(zip(names, costs.tolist(), strict=True))
        )

    return Allocation(
        ranks={n: int(ranks[n]) for n in names},
        shapes={n: (int(shapes[n][0]), int(shapes[n][1])) for n in names},
        budget=int(budget),
        strategy=strategy,
        scores=None if scores is None else {n: float(scores[n]) for n in names},
        r_min=int(r_min),
        r_max=None if r_max is None else int(r_max),
        tau=float(tau),
        seed=int(seed),
        rank_costs=None if rank_costs is None else {n: int(rank_costs[n]) for n in names},
    )


# --------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------


def _proportional_ranks(
    names: list[str],
    scores: np.ndarray,
    costs: np.ndarray,
    caps: np.ndarray,
    *,
    budget: int,
    r_min: int,
    tau: float,
) -> dict[str, int]:
    """Integer ranks close to ``clip(c * score**tau, r_min, cap)`` that spend the budget."""
    # Normalising by the largest score first keeps score**tau from overflowing for huge scores or tau.
    weights = (scores / scores.max()) ** tau
    targets = _continuous_targets(weights, costs, caps, budget=budget, r_min=r_min)
    ranks = _round_within_budget(names, targets, scores, costs, caps, budget=budget, r_min=r_min)
    return dict(zip(names, ranks, strict=True))


def _continuous_targets(
    weights: np.ndarray, costs: np.ndarray, caps: np.ndarray, *, budget: int, r_min: int
) -> np.ndarray:
    """Real-valued ranks ``clip(c * w_i, r_min, cap_i)`` with ``c`` chosen so they cost exactly ``budget``.

    ``f(c) = sum_i clip(c * w_i, r_min, cap_i) * cost_i`` is continuous, non-decreasing and piecewise
    linear with breakpoints at ``r_min / w_i`` and ``cap_i / w_i``. Solving it exactly on the right piece
    (water-filling) redistributes the excess of capped modules to the others without any iteration
    tolerance. If even ``c -> inf`` cannot spend the budget, every module with a positive weight sits
    at its cap (modules with zero weight stay at ``r_min``; rounding may still top them up).
    """
    lo = np.full(weights.shape, float(r_min))
    hi = caps.astype(np.float64)
    cost_f = costs.astype(np.float64)
    # A weight so small that cap / w overflows would only leave r_min at an infinite c: treat it as 0
    # so no inf (and no inf * 0 = nan) ever reaches the breakpoints.
    with np.errstate(divide="ignore", over="ignore"):
        weights = np.where(np.isfinite(hi / weights), weights, 0.0)
    active = weights > 0
    saturated = np.where(active, hi, lo)
    if budget >= float(saturated @ cost_f):
        return saturated

    breakpoints = np.unique(np.concatenate([lo[active] / weights[active], hi[active] / weights[active]]))

    def spend(c: float) -> float:
        return float(np.clip(c * weights, lo, hi) @ cost_f)

    # Binary search for the first breakpoint whose spend reaches the budget (O(n log n) time, O(n)
    # memory, so thousands of modules are fine). The last breakpoint saturates every active module,
    # which spends more than the budget, so the search always lands on a valid index.
    k_lo, k_hi = 0, len(breakpoints) - 1
    while k_lo < k_hi:
        mid = (k_lo + k_hi) // 2
        if spend(breakpoints[mid]) >= budget:
            k_hi = mid
        else:
            k_lo = mid + 1
    k = k_lo
    if k == 0:
        c = breakpoints[0]
    else:
        # f is linear between consecutive breakpoints, so interpolation is exact up to round-off.
        c0, c1 = breakpoints[k - 1], breakpoints[k]
        f0, f1 = spend(c0), spend(c1)
        c = c0 + (budget - f0) * (c1 - c0) / (f1 - f0)
    return np.clip(c * weights, lo, hi)


def _round_within_budget(
    names: list[str],
    targets: np.ndarray,
    scores: np.ndarray,
    costs: np.ndarray,
    caps: np.ndarray,
    *,
    budget: int,
    r_min: int,
) -> list[int]:
    """Round real targets to integer ranks without exceeding the budget, then spend what is left.

    Start from ``floor(target)`` (never below ``r_min``), then repeatedly give one more rank to the
    module with the largest deficit ``target - rank`` among those that still fit (below cap and
    ``cost <= remaining``); ties go to the higher score, then the smaller name, so the result is
    deterministic. Stops when nothing fits, which is exactly invariant 3.
    """
    n = len(names)
    ranks = [int(min(max(math.floor(targets[i]), r_min), caps[i])) for i in range(n)]
    remaining = budget - sum(ranks[i] * int(costs[i]) for i in range(n))
    # Floating-point error in the targets could in principle overshoot by one rank; undo it where the
    # rank is furthest above its target so the budget invariant never depends on rounding luck.
    while remaining < 0:
        candidates = [i for i in range(n) if ranks[i] > r_min]
        # names are sorted, so -j mirrors the "smaller name first" tie-break of the heap below.
        i = min(candidates, key=lambda j: (targets[j] - ranks[j], scores[j], -j))
        ranks[i] -= 1
        remaining += int(costs[i])

    heap = [_priority(i, targets, ranks, scores, names) for i in range(n) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        *_, i = heapq.heappop(heap)
        cost = int(costs[i])
        # remaining only shrinks, so a module that does not fit now never will: drop it for good.
        if cost > remaining:
            continue
        ranks[i] += 1
        remaining -= cost
        if ranks[i] < caps[i]:
            heapq.heappush(heap, _priority(i, targets, ranks, scores, names))
    return ranks


def _priority(
    i: int, targets: np.ndarray, ranks: list[int], scores: np.ndarray, names: list[str]
) -> tuple[float, float, str, int]:
    """Min-heap key: largest deficit first, then higher score, then smaller name."""
    return (-(float(targets[i]) - ranks[i]), -float(scores[i]), names[i], i)


def _permute_within_shape_groups(
    ranks: Mapping[str, int], shapes: Mapping[str, tuple[int, int]], seed: int, costs: Mapping[str, int]
) -> dict[str, int]:
    """Shuffle ranks among modules of identical shape and rank cost (same cost and cap, so every
    invariant survives).

    Groups and the names within them are visited in sorted order so the result depends only on ``seed``.
    """
    rng = np.random.default_rng(seed)
    groups: dict[tuple[int, int, int], list[str]] = {}
    for name in sorted(ranks):
        groups.setdefault((int(shapes[name][0]), int(shapes[name][1]), int(costs[name])), []).append(name)
    shuffled = dict(ranks)
    for shape in sorted(groups):
        members = groups[shape]
        values = [ranks[n] for n in members]
        for name, j in zip(members, rng.permutation(len(members)), strict=True):
            shuffled[name] = values[int(j)]
    return shuffled


def _cost_per_rank(shape: tuple[int, int]) -> int:
    """Trainable parameters added per unit of rank: ``d_in + d_out``."""
    d_out, d_in = shape
    return int(d_in) + int(d_out)


def rank_cost(shapes: Mapping[str, tuple[int, int]], rank_costs: Mapping[str, int] | None, name: str) -> int:
    """Trainable parameters one rank of module ``name`` adds: ``rank_costs[name]``, else ``d_in + d_out``."""
    return _cost_per_rank(shapes[name]) if rank_costs is None else int(rank_costs[name])


def _rank_cap(shape: tuple[int, int], r_max: int | None) -> int:
    """Largest useful rank of one module: ``min(r_max, d_in, d_out)``."""
    cap = min(int(shape[0]), int(shape[1]))
    return cap if r_max is None else min(cap, int(r_max))


# --------------------------------------------------------------------------------------------------
# Input validation: every message says what was wrong and what to pass instead.
# --------------------------------------------------------------------------------------------------


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _quote(names: list[str]) -> str:
    shown = ", ".join(repr(n) for n in names[:_MAX_NAMES_IN_MESSAGE])
    extra = len(names) - _MAX_NAMES_IN_MESSAGE
    return shown + (f" and {extra} more" if extra > 0 else "")


def _check_strategy(strategy: str) -> None:
    if strategy not in STRATEGIES:
        raise FimloraError(f"Unknown allocation strategy {strategy!r}; use one of {', '.join(STRATEGIES)}.")


def _check_hyperparameters(*, budget: int, r_min: int, r_max: int | None, tau: float, seed: int) -> None:
    if not _is_int(budget):
        raise FimloraError(
            f"The budget must be an integer number of trainable parameters, but got {budget!r}."
        )
    if budget <= 0:
        raise FimloraError(f"The budget must be a positive number of trainable parameters, but got {budget}.")
    if not _is_int(r_min) or r_min < 0:
        raise FimloraError(f"r_min must be an integer >= 0, but got {r_min!r}.")
    if r_max is not None and (not _is_int(r_max) or r_max < max(r_min, 1)):
        raise FimloraError(f"r_max must be None or an integer >= max(r_min, 1), but got {r_max!r}.")
    if not _is_real(tau) or not math.isfinite(tau) or tau <= 0:
        raise FimloraError(f"tau must be a finite number > 0, but got {tau!r}.")
    if not _is_int(seed):
        raise FimloraError(f"seed must be an integer, but got {seed!r}.")


def _check_shapes(shapes: Mapping[str, tuple[int, int]]) -> None:
    if len(shapes) == 0:
        raise FimloraError(
            "The mapping of module shapes is empty; pass at least one module to allocate ranks to."
        )
    for name, shape in shapes.items():
        valid = (
            isinstance(shape, tuple | list) and len(shape) == 2 and all(_is_int(d) and d > 0 for d in shape)
        )
        if not valid:
            raise FimloraError(
                f"Module {name!r} has shape {shape!r}; "
                "shapes must be (d_out, d_in) pairs of positive integers."
            )


def _check_rank_costs(rank_costs: Mapping[str, int] | None, shapes: Mapping[str, tuple[int, int]]) -> None:
    if rank_costs is None:
        return
    if set(rank_costs) != set(shapes):
        odd = sorted(set(rank_costs) ^ set(shapes))
        raise FimloraError(
            f"The keys of rank_costs and shapes differ (e.g. {_quote(odd)}); pass one cost per module."
        )
    for name in sorted(rank_costs):
        value = rank_costs[name]
        if not _is_int(value) or value < 1:
            raise FimloraError(
                f"Module {name!r} has rank cost {value!r}; a rank must cost a positive integer number "
                "of trainable parameters."
            )


def _check_scores(
    scores: Mapping[str, float], shapes: Mapping[str, tuple[int, int]], *, needs_signal: bool
) -> None:
    _check_same_keys(scores, shapes, "score", "shape", "scores and shapes")
    for name in sorted(scores):
        value = scores[name]
        if not _is_real(value) or not math.isfinite(value) or value < 0:
            raise FimloraError(
                f"Module {name!r} has score {value!r}; scores must be finite, non-negative numbers."
            )
    if needs_signal and all(scores[n] == 0 for n in scores):
        raise FimloraError(
            "All scores are zero, so a score-driven allocation is undefined; "
            "check the Fisher estimate or use strategy='uniform'."
        )


def _check_same_keys(
    first: Mapping[str, object], second: Mapping[str, object], a: str, b: str, what: str
) -> None:
    """``first`` and ``second`` name the same modules; the message names what is missing where."""
    if not isinstance(first, Mapping) or len(first) == 0:
        raise FimloraError(f"The mapping of {a}s is empty or not a mapping; pass one {a} per module.")
    missing_first = sorted(set(second) - set(first))
    missing_second = sorted(set(first) - set(second))
    if missing_first or missing_second:
        parts = []
        if missing_first:
            parts.append(f"no {a} for {_quote(missing_first)}")
        if missing_second:
            parts.append(f"no {b} for {_quote(missing_second)}")
        raise FimloraError(
            f"The keys of {what} differ ({'; '.join(parts)}); pass the same module names to both."
        )


def check_minimum_budget(budget: int, costs: list[int], r_min: int) -> None:
    """The budget pays ``r_min`` ranks on every module and, with ``r_min = 0``, one rank somewhere."""
    min_budget = r_min * sum(costs)
    if budget < min_budget:
        raise FimloraError(
            f"A budget of {budget} trainable parameters cannot give every module r_min={r_min}: "
            f"that needs at least {min_budget}; raise the budget or lower r_min."
        )
    if r_min == 0 and budget < min(costs):
        raise FimloraError(
            f"A budget of {budget} trainable parameters cannot pay one rank of any module (the cheapest "
            f"costs {min(costs)}), so no module would get an adapter; raise the budget."
        )


def _check_caps(names: list[str], caps: np.ndarray, r_min: int) -> None:
    too_small = [n for n, cap in zip(names, caps, strict=True) if cap < r_min]
    if too_small:
        raise FimloraError(
            f"Module(s) {_quote(too_small)} cannot take r_min={r_min}, because a module's rank is capped at "
            "min(d_in, d_out); lower r_min or leave those modules out."
        )
