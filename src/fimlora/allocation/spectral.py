"""Spectral rank allocation: spend the budget on the largest singular values of each module's gradient.

Notation: module ``i`` has weight ``W_i`` of shape ``(d_out, d_in)`` and expected gradient
``Ḡ_i = E[∂ℓ/∂W_i]`` (the same shape). Its singular values are ``σ_1 ≥ σ_2 ≥ … ≥ 0``.

Why singular values (the Euclidean view, strategy ``"spectral"``)
    Model the loss near ``W`` as ``L(W + ΔW) ≈ L(W) + ⟨Ḡ, ΔW⟩ + ‖ΔW‖²_F / (2η)`` (a gradient step of
    size ``η``). A LoRA update ``ΔW = B A`` has rank at most ``r``. The best rank-``k`` step is
    ``ΔW = -η [Ḡ]_k``, the truncated SVD of the gradient (Eckart–Young), and it lowers the model by
    ``(η/2) Σ_{j≤k} σ_j²``; the plain projected step ``-η [Ḡ]_k`` has first-order decrease
    ``η Σ_{j≤k} σ_j²``. Either way a module's value of rank ``k`` is proportional to
    ``Σ_{j≤k} σ_j²``, so ``σ_k²`` is the *marginal* value of its ``k``-th rank. A rank costs
    ``d_in + d_out`` trainable parameters, so the exchange rate is ``σ_k² / (d_in + d_out)``.

Whitened (``"whitened-spectral"``): the K-FAC metric
    K-FAC approximates the Fisher of ``vec(W)`` by ``A ⊗ S`` with ``A = E[a aᵀ]`` (``d_in × d_in``,
    layer inputs) and ``S = E[δ δᵀ]`` (``d_out × d_out``, output gradients). The quadratic model
    becomes ``L + ⟨Ḡ, ΔW⟩ + ½ ‖S^{1/2} ΔW A^{1/2}‖²_F``. Substituting ``Z = S^{1/2} ΔW A^{1/2}``
    (same rank as ``ΔW``) gives ``L + ⟨G̃, Z⟩ + ½ ‖Z‖²_F`` with ``G̃ = S^{-1/2} Ḡ A^{-1/2}``: the best
    rank-``k`` step is ``Z = -[G̃]_k`` and it lowers the loss model by ``½ Σ_{j≤k} σ̃_j²``. At full
    rank that step is the K-FAC natural-gradient step ``ΔW = -S^{-1} Ḡ A^{-1}``; at rank ``k`` it is
    that step's best rank-``k`` truncation in the Fisher metric. The squared singular values of the
    whitened gradient are thus the loss decrease bought by each rank of a natural-gradient update.
    The Euclidean view is the special case ``A = I``, ``S = I``.

    Damping: each factor ``F`` is replaced by ``F + damping · mean(diag F) · I`` (relative Tikhonov
    damping). It makes the factors invertible and bounds their condition number by
    ``1 + d / damping``.

Numerical rank
    Singular values at or below ``σ_1 · max(d_out, d_in) · eps`` (``torch.linalg.matrix_rank``'s
    tolerance, with ``eps`` that of the gradient's dtype, float32 at most) are set to exactly zero, so
    a rank-1 gradient is worth exactly one rank and round-off never decides where spare rank goes.

The optimisation problem
    Maximise ``Σ_i Σ_{k≤r_i} gain_{i,k}`` subject to the budget rules of
    :mod:`fimlora.allocation.allocate` (``Σ r_i cost_i ≤ budget``, ``r_min ≤ r_i ≤ cap_i``, the budget
    is spent). Gains are non-increasing in ``k``: a multiple-choice knapsack with concave utilities.
    Every module first gets ``r_min`` ranks (no choice there). Then:

    * **exact**: a dynamic program over the remaining budget in units of ``g = gcd(cost_i)`` (every
      rank vector spends a multiple of ``g``, so nothing is lost by the discretisation) whenever its
      table has at most ``_MAX_DP_CELLS`` cells (``(units + 1) · Σ_i (options_i + 1)``). The result's
      total gain equals the optimum over all rank vectors that satisfy rules 1 and 2 (up to float
      round-off in summing gains). MiniLM at the demo's budget needs about 1.5 million cells (≈ 0.03 s);
      the limit costs at most ≈ 0.1 s and 64 MB. SmolLM2 (210 modules) at rank 8 needs ≈ 10⁹: greedy.
    * **greedy** otherwise: repeatedly take the rank with the largest ``gain / cost`` that still fits.
      It is optimal when every module costs the same; in general its total is at least
      ``OPT - gain_crit``, where ``gain_crit`` is the gain of the first rank that did not fit (at most the
      largest gain among the ranks it left out): the fractional relaxation, which greedy solves up to
      that rank, bounds ``OPT``.

    Finally any budget left over is spent by the same greedy rule (next ``gain / cost``, ties by module
    name), so rule 3 holds. Gains are non-negative, so this never lowers the total: an exact result
    stays optimal. Ties inside the dynamic program keep fewer ranks for the module considered last.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
from collections.abc import Mapping, Sequence
from functools import reduce
from typing import TYPE_CHECKING, Any

import numpy as np

from fimlora.allocation.allocate import (
    _check_caps,
    _check_hyperparameters,
    _check_rank_costs,
    _check_same_keys,
    _check_shapes,
    _is_real,
    _rank_cap,
    check_minimum_budget,
    rank_cost,
)
from fimlora.allocation.allocation import Allocation
from fimlora.errors import FimloraError

if TYPE_CHECKING:
    import torch

# torch itself is imported where it is used, so `import fimlora.allocation` stays torch-free.

SPECTRAL_STRATEGIES: tuple[str, ...] = ("spectral", "whitened-spectral")
HINDSIGHT_STRATEGY = "hindsight"
DEFAULT_DAMPING = 1e-3

# Largest dynamic-programming table solved exactly; beyond it the greedy solver runs (see module doc).
_MAX_DP_CELLS = 16_000_000


def marginal_gains(
    gradients: Mapping[str, torch.Tensor],
    *,
    kfac: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    damping: float = DEFAULT_DAMPING,
) -> dict[str, np.ndarray]:
    """Marginal value of each rank per module: the squared singular values of its (whitened) gradient.

    Args:
        gradients: expected gradient ``Ḡ`` per module, shape ``(d_out, d_in)``, any float dtype/device.
        kfac: optional K-FAC factors ``(A, S)`` per module (same keys), ``A = E[a aᵀ]`` of shape
            ``(d_in, d_in)`` and ``S = E[δ δᵀ]`` of shape ``(d_out, d_out)``, symmetric positive
            semi-definite. When given, the gains are those of ``S^{-1/2} Ḡ A^{-1/2}`` (damped factors).
        damping: relative damping ``λ ≥ 0``; each factor ``F`` becomes ``F + λ · mean(diag F) · I``.

    Returns:
        ``{name: gains}`` in sorted name order; ``gains`` is a float64 array of length
        ``min(d_out, d_in)``, non-increasing and non-negative, ``gains[k-1] = σ_k²`` (units: squared
        gradient, or squared natural gradient when whitened). Round-off singular values are exactly 0.

    Raises:
        FimloraError: for a non-tensor, non-2-D or non-finite gradient, mismatched K-FAC keys or shapes,
            a factor that is not symmetric positive semi-definite or stays singular after damping, or a
            negative / non-finite damping.
    """
    _check_damping(damping)
    _check_gradients(gradients)
    if kfac is not None:
        _check_kfac(kfac, gradients)
    return _gains(gradients, kfac, damping)


def allocate_spectral(
    gradients: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int,
    r_min: int = 1,
    r_max: int | None = None,
    kfac: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    damping: float = DEFAULT_DAMPING,
    rank_costs: Mapping[str, int] | None = None,
) -> Allocation:
    """Allocate LoRA ranks to maximise the total captured squared singular values under ``budget``.

    Module ``i``'s ``k``-th rank is worth ``σ_k²`` of its gradient (whitened by K-FAC when ``kfac`` is
    given; see the module docstring for why) and costs ``d_in + d_out`` parameters (or
    ``rank_costs[name]``, what a rank trains when that differs, e.g. LoRA-FA's ``d_out``). The ranks maximise
    ``Σ_i Σ_{k≤r_i} σ_{i,k}²`` exactly when the dynamic program is small enough, and greedily by
    ``σ² / cost`` otherwise (optimal for equal costs, within one rank's gain of optimal in general).

    Args:
        gradients: expected gradient ``Ḡ`` per module, shape ``(d_out, d_in)``, the same keys as ``shapes``.
        shapes: ``(d_out, d_in)`` per module.
        budget: trainable LoRA parameters allowed, ``Σ_i r_i · (d_in_i + d_out_i)``.
        r_min: smallest rank any module gets (given first, whatever the gains).
        r_max: largest rank any module gets; each module's cap is ``min(r_max, d_in, d_out)``.
        kfac: optional K-FAC factors ``(A, S)`` per module; switches to ``strategy="whitened-spectral"``.
        damping: relative damping of the K-FAC factors (ignored without ``kfac``).
        rank_costs: trainable parameters one rank adds per module; None means ``d_in + d_out``.

    Returns:
        An :class:`Allocation` with ``strategy`` ``"spectral"`` or ``"whitened-spectral"`` and
        ``scores[name]`` = the module's **captured gain** ``Σ_{k≤r_i} σ_k²``, so ``sum(scores.values())``
        is the objective value. It satisfies the three budget rules of
        :mod:`fimlora.allocation.allocate`. Deterministic: the result depends only on the inputs' values.

    Raises:
        FimloraError: for any invalid input (see :func:`marginal_gains`), mismatched keys, a gradient
            whose shape differs from ``shapes``, all-zero gradients, or a budget below
            ``r_min · Σ_i cost_i``.
    """
    _check_hyperparameters(budget=budget, r_min=r_min, r_max=r_max, tau=1.0, seed=0)
    _check_damping(damping)
    _check_shapes(shapes)
    _check_same_keys(gradients, shapes, "gradient", "shape", "gradients and shapes")
    _check_gradients(gradients, shapes)
    if kfac is not None:
        _check_kfac(kfac, gradients)

    names = _check_budget_fits(shapes, budget=budget, r_min=r_min, r_max=r_max, rank_costs=rank_costs)

    gains = _gains(gradients, kfac, damping)
    if all(not gains[n].any() for n in names):
        raise FimloraError(
            "All gradients are zero, so a spectral allocation is undefined; "
            "check the gradient estimate or use strategy='uniform'."
        )
    strategy = SPECTRAL_STRATEGIES[0] if kfac is None else SPECTRAL_STRATEGIES[1]
    return _allocate_gains(
        gains, shapes, strategy, budget=budget, r_min=r_min, r_max=r_max, rank_costs=rank_costs
    )


def _check_budget_fits(
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int,
    r_min: int,
    r_max: int | None,
    rank_costs: Mapping[str, int] | None,
) -> list[str]:
    """Rank costs, per-module caps and the minimum budget checked; the module names, sorted."""
    _check_rank_costs(rank_costs, shapes)
    names = sorted(shapes)
    _check_caps(names, np.array([_rank_cap(shapes[n], r_max) for n in names]), r_min)
    check_minimum_budget(budget, [rank_cost(shapes, rank_costs, n) for n in names], r_min)
    return names


def _allocate_gains(
    gains: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
    strategy: str,
    *,
    budget: int,
    r_min: int,
    r_max: int | None,
    rank_costs: Mapping[str, int] | None,
) -> Allocation:
    """The knapsack on checked inputs; ``gains[name][k-1]`` is what module ``name``'s k-th rank is worth."""
    names = sorted(shapes)
    costs = [rank_cost(shapes, rank_costs, n) for n in names]
    caps = [_rank_cap(shapes[n], r_max) for n in names]
    ranks, _ = _spectral_ranks(
        names, [gains[n] for n in names], costs, caps, budget=int(budget), r_min=int(r_min)
    )
    return Allocation(
        ranks=dict(zip(names, ranks, strict=True)),
        shapes={n: (int(shapes[n][0]), int(shapes[n][1])) for n in names},
        budget=int(budget),
        strategy=strategy,
        scores={n: float(gains[n][:r].sum()) for n, r in zip(names, ranks, strict=True)},
        r_min=int(r_min),
        r_max=None if r_max is None else int(r_max),
        rank_costs=None if rank_costs is None else {n: int(rank_costs[n]) for n in names},
    )


def allocate_hindsight(
    updates: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int,
    source: Mapping[str, Any],
    r_min: int = 1,
    r_max: int | None = None,
    rank_costs: Mapping[str, int] | None = None,
) -> Allocation:
    """The spectral knapsack on *trained updates*: ranks maximising ``Σ_i Σ_{k≤r_i} σ_k(ΔW_i)²``.

    ``updates[name]`` is the update training made to module ``name``'s weight in a finished source run
    (``W_trained − W`` for full fine-tuning, ``s·B·A`` for LoRA), ``(d_out, d_in)``; its dtype sets the
    numerical-rank tolerance as for a gradient. The solver and its guarantee are :func:`allocate_spectral`'s;
    the result has ``strategy="hindsight"``, ``scores`` = the captured ``Σ_{k≤r_i} σ_k²`` per module, and
    ``source`` = the given record of the source run. Raises FimloraError when every update is zero.
    """
    _check_shapes(shapes)
    _check_same_keys(updates, shapes, "update", "shape", "updates and shapes")
    _check_gradients(updates, shapes)
    return allocate_hindsight_gains(
        _gains(updates, None, DEFAULT_DAMPING),  # marginal_gains without checking the updates again
        shapes,
        budget=budget,
        source=source,
        r_min=r_min,
        r_max=r_max,
        rank_costs=rank_costs,
    )


def allocate_hindsight_gains(
    gains: Mapping[str, np.ndarray],
    shapes: Mapping[str, tuple[int, int]],
    *,
    budget: int,
    source: Mapping[str, Any],
    r_min: int = 1,
    r_max: int | None = None,
    rank_costs: Mapping[str, int] | None = None,
) -> Allocation:
    """:func:`allocate_hindsight` from the updates' spectra, ``gains[name]`` = ``σ_k(ΔW)²`` as
    :func:`marginal_gains` returns them (what a source run's ``update-spectrum.safetensors`` keeps once
    its weights are gone): the same ranks as from the updates themselves."""
    _check_hyperparameters(budget=budget, r_min=r_min, r_max=r_max, tau=1.0, seed=0)
    _check_shapes(shapes)
    _check_same_keys(gains, shapes, "update spectrum", "shape", "update spectra and shapes")
    for name, values in gains.items():
        array = np.asarray(values, dtype=np.float64)
        valid = array.ndim == 1 and len(array) == min(shapes[name])
        if not valid or not np.isfinite(array).all() or (array < 0).any():
            raise FimloraError(
                f"The update spectrum of module {name!r} is not min(d_out, d_in) = {min(shapes[name])} "
                "finite non-negative squared singular values; it belongs to another model or is damaged."
            )
    names = _check_budget_fits(shapes, budget=budget, r_min=r_min, r_max=r_max, rank_costs=rank_costs)
    if all(not np.asarray(gains[n]).any() for n in names):
        raise FimloraError(
            "Every update of the source run is zero (its weights did not move), so there is nothing to "
            "allocate by; check that the source run trained."
        )
    arrays = {n: np.asarray(gains[n], dtype=np.float64) for n in names}
    allocation = _allocate_gains(
        arrays, shapes, HINDSIGHT_STRATEGY, budget=budget, r_min=r_min, r_max=r_max, rank_costs=rank_costs
    )
    return dataclasses.replace(allocation, source=dict(source))


# --------------------------------------------------------------------------------------------------
# The math
# --------------------------------------------------------------------------------------------------


def _gains(
    gradients: Mapping[str, torch.Tensor],
    kfac: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    damping: float,
) -> dict[str, np.ndarray]:
    return {
        name: _module_gains(name, gradients[name], None if kfac is None else kfac[name], float(damping))
        for name in sorted(gradients)
    }


def _module_gains(
    name: str, gradient: torch.Tensor, factors: tuple[torch.Tensor, torch.Tensor] | None, damping: float
) -> np.ndarray:
    """Squared singular values of ``Ḡ`` or of ``S^{-1/2} Ḡ A^{-1/2}``, descending, float64."""
    import torch

    matrix = gradient.detach().to(device="cpu", dtype=torch.float64)
    if factors is not None:
        # With A = U diag(a) Uᵀ and S = V diag(s) Vᵀ, S^{-1/2} Ḡ A^{-1/2} = V [s^{-1/2} Vᵀ Ḡ U a^{-1/2}] Uᵀ;
        # the outer orthogonal factors do not change singular values, so they are never multiplied in.
        a_values, a_vectors = _damped_eigh(name, "A", factors[0], damping)
        s_values, s_vectors = _damped_eigh(name, "S", factors[1], damping)
        matrix = (s_vectors.T @ matrix @ a_vectors) * s_values.rsqrt()[:, None] * a_values.rsqrt()[None, :]
    sigma = torch.linalg.svdvals(matrix)
    eps = min(torch.finfo(gradient.dtype).eps, torch.finfo(torch.float32).eps)
    sigma = torch.where(sigma > sigma[0] * max(matrix.shape) * eps, sigma, 0.0)
    gains = (sigma * sigma).numpy()
    if not np.isfinite(gains).all():
        raise FimloraError(
            f"The squared singular values of module {name!r}'s gradient overflow float64; "
            "rescale the gradient (the allocation only depends on ratios between modules)."
        )
    return gains


def _damped_eigh(name: str, label: str, factor: torch.Tensor, damping: float) -> tuple[torch.Tensor, ...]:
    """Eigen-decomposition of ``F + damping · mean(diag F) · I`` for a symmetric PSD K-FAC factor ``F``."""
    import torch

    matrix = factor.detach().to(device="cpu", dtype=torch.float64)
    eps = torch.finfo(factor.dtype).eps
    scale = float(matrix.abs().max())
    if float((matrix - matrix.T).abs().max()) > math.sqrt(eps) * scale:
        raise FimloraError(
            f"K-FAC factor {label} of module {name!r} is not symmetric; pass E[a aᵀ] and E[δ δᵀ] as "
            "(A, S), not their square roots or a transposed product."
        )
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    if float(values[0]) < -max(matrix.shape) * eps * float(values.abs().max()):
        raise FimloraError(
            f"K-FAC factor {label} of module {name!r} has a negative eigenvalue ({float(values[0]):.3g}); "
            "it must be positive semi-definite, like any second-moment matrix."
        )
    values = values.clamp_min(0.0) + damping * float(matrix.diagonal().mean())
    if float(values[0]) <= 0:
        reason = "is all zero" if scale == 0 else "is singular"
        raise FimloraError(
            f"K-FAC factor {label} of module {name!r} {reason}, so it cannot whiten the gradient"
            + ("; pass damping > 0." if scale != 0 and damping == 0 else "; check the K-FAC statistics.")
        )
    return values, vectors


def _spectral_ranks(
    names: Sequence[str],
    gains: Sequence[np.ndarray],
    costs: Sequence[int],
    caps: Sequence[int],
    *,
    budget: int,
    r_min: int,
    max_cells: int | None = None,
) -> tuple[list[int], bool]:
    """Ranks maximising the captured gain; also whether the exact solver was used (see module doc).

    ``gains[i][k - 1]`` is module ``i``'s gain from its ``k``-th rank (non-increasing, non-negative,
    at least ``caps[i]`` long); ``max_cells`` defaults to ``_MAX_DP_CELLS``.
    """
    if max_cells is None:
        max_cells = _MAX_DP_CELLS
    n = len(names)
    ranks = [r_min] * n
    remaining = budget - r_min * sum(costs)
    unit = reduce(math.gcd, costs)
    weights = [c // unit for c in costs]
    options = [min(caps[i] - r_min, (remaining // unit) // weights[i]) for i in range(n)]
    capacity = min(remaining // unit, sum(e * w for e, w in zip(options, weights, strict=True)))
    exact = (capacity + 1) * sum(e + 1 for e in options) <= max_cells
    if exact:
        values = [
            np.concatenate([[0.0], np.cumsum(gains[i][r_min : r_min + options[i]], dtype=np.float64)])
            for i in range(n)
        ]
        extra = _knapsack(values, weights, capacity)
        ranks = [r_min + e for e in extra]
        remaining -= sum(e * c for e, c in zip(extra, costs, strict=True))
    return _greedy(names, gains, costs, caps, ranks, remaining), exact


def _knapsack(values: Sequence[np.ndarray], weights: Sequence[int], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack: ``e_i`` extra ranks maximising ``Σ values[i][e_i]``.

    ``values[i][e]`` is the gain of ``e`` extra ranks (``values[i][0] = 0``), which weigh ``e · weights[i]``
    budget units; ``Σ e_i · weights[i] ≤ capacity``. ``best[u]`` is the best total of the modules seen so
    far within ``u`` units; one vectorised pass per (module, option).
    """
    best = np.zeros(capacity + 1)
    choices = []
    for value, weight in zip(values, weights, strict=True):
        new = best.copy()
        choice = np.zeros(capacity + 1, dtype=np.int32)
        for e in range(1, len(value)):
            shift = e * weight
            candidate = best[: capacity + 1 - shift] + value[e]
            better = candidate > new[shift:]  # strict: a tie keeps fewer ranks
            new[shift:][better] = candidate[better]
            choice[shift:][better] = e
        best = new
        choices.append(choice)
    extra = [0] * len(values)
    left = capacity
    for i in reversed(range(len(values))):
        extra[i] = int(choices[i][left])
        left -= extra[i] * weights[i]
    return extra


def _greedy(
    names: Sequence[str],
    gains: Sequence[np.ndarray],
    costs: Sequence[int],
    caps: Sequence[int],
    ranks: Sequence[int],
    remaining: int,
) -> list[int]:
    """Add ranks by largest ``gain / cost`` (ties: smaller name) while any fits; returns the new ranks.

    Each module's ratios are non-increasing, so the heap yields ranks in global ratio order.
    ``remaining`` only shrinks, so a module whose next rank does not fit is dropped for good; the loop
    ends when nothing fits (budget rule 3).
    """
    ranks = list(ranks)

    def key(i: int) -> tuple[float, str, int]:
        return (-float(gains[i][ranks[i]]) / costs[i], names[i], i)

    heap = [key(i) for i in range(len(names)) if ranks[i] < caps[i]]
    heapq.heapify(heap)
    while heap:
        *_, i = heapq.heappop(heap)
        if costs[i] > remaining:
            continue
        ranks[i] += 1
        remaining -= costs[i]
        if ranks[i] < caps[i]:
            heapq.heappush(heap, key(i))
    return ranks


# --------------------------------------------------------------------------------------------------
# Input validation
# --------------------------------------------------------------------------------------------------


def _check_damping(damping: float) -> None:
    if not _is_real(damping) or not math.isfinite(damping) or damping < 0:
        raise FimloraError(f"damping must be a finite number >= 0, but got {damping!r}.")


def _check_matrix(what: str, value: object, shape: tuple[int, int] | None) -> None:
    import torch

    if not isinstance(value, torch.Tensor):
        raise FimloraError(f"{what} must be a torch.Tensor, but got {type(value).__name__}.")
    if not value.is_floating_point():
        raise FimloraError(f"{what} must be a real floating-point tensor, but has dtype {value.dtype}.")
    expected = "a 2-D matrix" if shape is None else f"{shape}"
    if value.dim() != 2 or (shape is not None and tuple(value.shape) != shape):
        raise FimloraError(f"{what} has shape {tuple(value.shape)}, but must be {expected}.")
    if value.numel() == 0:
        raise FimloraError(f"{what} is empty (shape {tuple(value.shape)}); every dimension must be >= 1.")
    if not bool(torch.isfinite(value).all()):
        raise FimloraError(f"{what} contains NaN or inf values; check the statistics that produced it.")


def _check_gradients(
    gradients: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, int]] | None = None
) -> None:
    if not isinstance(gradients, Mapping) or len(gradients) == 0:
        raise FimloraError("The mapping of gradients is empty or not a mapping; pass one tensor per module.")
    for name in sorted(gradients):
        shape = None if shapes is None else (int(shapes[name][0]), int(shapes[name][1]))
        _check_matrix(f"The gradient of module {name!r}", gradients[name], shape)


def _check_kfac(
    kfac: Mapping[str, tuple[torch.Tensor, torch.Tensor]], gradients: Mapping[str, torch.Tensor]
) -> None:
    _check_same_keys(kfac, gradients, "K-FAC factor pair", "gradient", "kfac and gradients")
    for name in sorted(kfac):
        pair = kfac[name]
        if not isinstance(pair, tuple | list) or len(pair) != 2:
            raise FimloraError(
                f"kfac[{name!r}] must be a pair (A, S) of tensors, but got {type(pair).__name__}."
            )
        d_out, d_in = gradients[name].shape
        _check_matrix(f"K-FAC factor A (E[a aᵀ]) of module {name!r}", pair[0], (int(d_in), int(d_in)))
        _check_matrix(f"K-FAC factor S (E[δ δᵀ]) of module {name!r}", pair[1], (int(d_out), int(d_out)))
