"""The result of a rank allocation, its PEFT config and its JSON form."""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from fimlora.errors import FimloraError
from fimlora.io import atomic_write_text

SCALINGS: tuple[str, ...] = ("alpha_over_r", "constant", "alpha_over_sqrt_r")

# LoraConfig arguments that to_lora_config sets itself, or that would change which modules get an
# adapter, their rank or their scaling, and so break the one-to-one link with the allocation.
_RESERVED_LORA_KWARGS: tuple[str, ...] = (
    "r",
    "target_modules",
    "rank_pattern",
    "alpha_pattern",
    "lora_alpha",
    "layers_to_transform",
    "layers_pattern",
    "exclude_modules",
    "target_parameters",
)

# Derived values written to JSON for readers; from_dict checks them instead of storing them.
_DERIVED_KEYS: tuple[str, ...] = ("num_params",)


@dataclass
class Allocation:
    """LoRA ranks per module, chosen under a budget of trainable parameters.

    Attributes:
        ranks: rank per module, keyed by the module's name in the base model's ``named_modules()``;
            0 means the module gets no adapter (``allocation.r_min: 0``).
        shapes: ``(d_out, d_in)`` per module (a ``torch.nn.Linear`` weight shape).
        budget: allowed trainable LoRA parameters; ``num_params <= budget``.
        strategy: the strategy that produced the ranks.
        scores: the importance scores used (None for a score-free uniform allocation).
        r_min, r_max, tau, seed: the allocation's settings, kept for provenance.
        rank_costs: trainable parameters one rank adds per module, when that is not ``d_in + d_out``
            (LoRA-FA trains only B: ``d_out``); None for plain LoRA. ``num_params`` counts with it.
        source: what the scores were read from when that is another run (the ``hindsight`` rule: the
            source run's path, method and identity); None otherwise.
    """

    ranks: dict[str, int]
    shapes: dict[str, tuple[int, int]]
    budget: int
    strategy: str
    scores: dict[str, float] | None = None
    r_min: int = 1
    r_max: int | None = None
    tau: float = 1.0
    seed: int = 0
    rank_costs: dict[str, int] | None = None
    source: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        self.ranks = {str(n): int(r) for n, r in self.ranks.items()}
        self.shapes = {str(n): (int(s[0]), int(s[1])) for n, s in self.shapes.items()}
        if self.scores is not None:
            self.scores = {str(n): float(v) for n, v in self.scores.items()}
        if not self.ranks:
            raise FimloraError("An allocation needs at least one module, but ranks is empty.")
        if set(self.ranks) != set(self.shapes):
            odd = sorted(set(self.ranks) ^ set(self.shapes))[:3]
            raise FimloraError(f"ranks and shapes name different modules (e.g. {odd}); they must match.")
        bad = sorted(n for n, r in self.ranks.items() if r < 0)
        if bad:
            raise FimloraError(
                f"Every rank must be >= 0, but module {bad[0]!r} has rank {self.ranks[bad[0]]}."
            )
        if not any(self.ranks.values()):
            raise FimloraError("Every module has rank 0, so there is no adapter; give some module a rank.")
        if self.rank_costs is not None:
            self.rank_costs = {str(n): int(c) for n, c in self.rank_costs.items()}
            if set(self.rank_costs) != set(self.ranks):
                odd = sorted(set(self.rank_costs) ^ set(self.ranks))[:3]
                raise FimloraError(
                    f"rank_costs and ranks name different modules (e.g. {odd}); they must match."
                )
            if any(c < 1 for c in self.rank_costs.values()):
                raise FimloraError("Every rank cost must be a positive number of trainable parameters.")
            if all(c == sum(self.shapes[n]) for n, c in self.rank_costs.items()):
                self.rank_costs = None  # plain LoRA's d_in + d_out: nothing to record

    # ----------------------------------------------------------------------------------------------
    # Derived quantities
    # ----------------------------------------------------------------------------------------------

    def rank_cost(self, name: str) -> int:
        """Trainable parameters one rank of module ``name`` adds (``d_in + d_out`` unless ``rank_costs``)."""
        if self.rank_costs is not None:
            return self.rank_costs[name]
        return self.shapes[name][0] + self.shapes[name][1]

    @property
    def num_params(self) -> int:
        """Trainable adapter parameters: ``sum_i r_i * cost_i`` (plain LoRA: A and B, ``d_in + d_out``)."""
        return sum(r * self.rank_cost(n) for n, r in self.ranks.items())

    @property
    def adapted_ranks(self) -> dict[str, int]:
        """The modules that get an adapter (rank >= 1) and their ranks; a rank-0 module gets none."""
        return {n: r for n, r in self.ranks.items() if r > 0}

    @property
    def reference_rank(self) -> int:
        """The most common rank of the adapted modules (ties: the smaller); it becomes ``LoraConfig.r``."""
        counts = Counter(self.adapted_ranks.values())
        return max(counts, key=lambda r: (counts[r], -r))

    def summary(self) -> dict[str, Any]:
        """A short overview: strategy, budget, num_params and min/max/mean rank."""
        ranks = list(self.ranks.values())
        return {
            "strategy": self.strategy,
            "budget": self.budget,
            "num_params": self.num_params,
            "num_modules": len(ranks),
            "num_adapted_modules": len(self.adapted_ranks),
            "min_rank": min(ranks),
            "max_rank": max(ranks),
            "mean_rank": sum(ranks) / len(ranks),
            **({"source": self.source} if self.source is not None else {}),
        }

    # ----------------------------------------------------------------------------------------------
    # PEFT
    # ----------------------------------------------------------------------------------------------

    def to_lora_config(self, *, lora_alpha: float, scaling: str = "alpha_over_r", **kwargs: Any):
        """Build a ``peft.LoraConfig`` that puts exactly these ranks on exactly these modules.

        ``target_modules`` is the sorted list of the adapted module names (a module at rank 0 gets no
        adapter and is left out), ``r`` their most common rank (ties: the smaller) and ``rank_pattern``
        maps every adapted module whose rank differs from ``r`` to its rank. Names
        are those of the base model's ``named_modules()`` (no ``base_model.model.`` prefix), because that
        is what PEFT matches while it injects the adapters.

        Scaling conventions (the LoRA update of module ``i`` is ``scaling_i * B_i A_i``):

        * ``"alpha_over_r"``: PEFT's default. Every module uses the same ``lora_alpha``, so
          ``scaling_i = lora_alpha / r_i``; a module with a larger rank gets a smaller scaling. No
          ``alpha_pattern`` is set.
        * ``"constant"``: every module gets ``scaling_i = lora_alpha / r``, with ``r`` the config's
          reference rank, independent of its own rank. Implemented with
          ``alpha_pattern[name] = lora_alpha * r_i / r`` for each module whose rank differs from ``r``.
        * ``"alpha_over_sqrt_r"``: rsLoRA (Kalajdzievski, 2023), ``scaling_i = lora_alpha / sqrt(r_i)``,
          through PEFT's own ``use_rslora=True``.

        ``kwargs`` pass through to ``LoraConfig`` (e.g. ``lora_dropout``, ``task_type``,
        ``modules_to_save``). Arguments that would override the ranks, targets or scaling (``r``,
        ``target_modules``, ``rank_pattern``, ``alpha_pattern``, ``lora_alpha``, layer filters) and
        ``use_rslora`` (choose ``scaling="alpha_over_sqrt_r"`` instead) are refused.

        Caveat inherited from PEFT: a target name also matches any module whose name ends with
        ``"." + name``; with full names from ``named_modules()`` that only happens in models that nest a
        whole copy of a path under another prefix.
        """
        from peft import LoraConfig

        self._check_lora_kwargs(lora_alpha, scaling, kwargs)
        r_ref = self.reference_rank
        adapted = self.adapted_ranks
        rank_pattern, alpha_pattern = peft_patterns(
            adapted, reference_rank=r_ref, lora_alpha=lora_alpha, scaling=scaling
        )
        config_kwargs: dict[str, Any] = {
            "r": r_ref,
            "lora_alpha": lora_alpha,
            "target_modules": sorted(adapted),
            "rank_pattern": rank_pattern,
        }
        if scaling == "constant":
            config_kwargs["alpha_pattern"] = alpha_pattern
        elif scaling == "alpha_over_sqrt_r":
            config_kwargs["use_rslora"] = True
        return LoraConfig(**config_kwargs, **kwargs)

    @staticmethod
    def _check_lora_kwargs(lora_alpha: float, scaling: str, kwargs: dict[str, Any]) -> None:
        if scaling not in SCALINGS:
            raise FimloraError(f"Unknown LoRA scaling {scaling!r}; use one of {', '.join(SCALINGS)}.")
        if (
            isinstance(lora_alpha, bool)
            or not isinstance(lora_alpha, int | float)
            or not (math.isfinite(lora_alpha) and lora_alpha > 0)
        ):
            raise FimloraError(f"lora_alpha must be a finite number > 0, but got {lora_alpha!r}.")
        conflicts = sorted(set(kwargs) & set(_RESERVED_LORA_KWARGS))
        if conflicts:
            raise FimloraError(
                f"to_lora_config sets {', '.join(conflicts)} from the allocation itself; "
                "remove them from the keyword arguments (pass lora_alpha as the named argument)."
            )
        if "use_rslora" in kwargs:
            raise FimloraError(
                "use_rslora is set by the scaling convention; drop it and pass "
                "scaling='alpha_over_sqrt_r' for rsLoRA's lora_alpha / sqrt(r)."
            )

    # ----------------------------------------------------------------------------------------------
    # Serialisation
    # ----------------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (shapes as ``[d_out, d_in]`` lists; ``num_params`` for readers;
        ``rank_costs`` only when a rank does not cost ``d_in + d_out``; ``source`` only when set)."""
        names = sorted(self.ranks)
        data = {
            "strategy": self.strategy,
            "budget": self.budget,
            "num_params": self.num_params,
            "r_min": self.r_min,
            "r_max": self.r_max,
            "tau": self.tau,
            "seed": self.seed,
            "ranks": {n: self.ranks[n] for n in names},
            "shapes": {n: list(self.shapes[n]) for n in names},
            "scores": None if self.scores is None else {n: self.scores[n] for n in sorted(self.scores)},
        }
        if self.rank_costs is not None:
            data["rank_costs"] = {n: self.rank_costs[n] for n in names}
        if self.source is not None:
            data["source"] = self.source
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Allocation:
        """Inverse of :meth:`to_dict`; refuses unknown or missing keys and a stale ``num_params``."""
        if not isinstance(data, dict):
            raise FimloraError(f"An allocation must be a JSON object, but got {type(data).__name__}.")
        known = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - known - set(_DERIVED_KEYS))
        if unknown:
            raise FimloraError(f"Unknown allocation field(s) {unknown}; expected only {sorted(known)}.")
        missing = sorted({"ranks", "shapes", "budget", "strategy"} - set(data))
        if missing:
            raise FimloraError(
                f"The allocation is missing field(s) {missing}; it may be truncated or corrupt."
            )
        try:
            allocation = cls(**{k: v for k, v in data.items() if k in known})
        except (TypeError, ValueError, IndexError) as exc:
            raise FimloraError(f"The allocation data is malformed ({exc}); regenerate it.") from exc
        stored = data.get("num_params")
        if stored is not None and stored != allocation.num_params:
            raise FimloraError(
                f"The allocation says num_params={stored} but its ranks and shapes give "
                f"{allocation.num_params}; the file was edited inconsistently, regenerate it."
            )
        return allocation

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the allocation as JSON, atomically: a temp file in the same directory, then ``os.replace``.

        Readers therefore see either the old file or the complete new one, never a partial write.
        """
        return atomic_write_text(path, json.dumps(self.to_dict(), indent=2, allow_nan=False) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Allocation:
        """Read an allocation written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as exc:
            raise FimloraError(f"No allocation file at {path}; run the allocation step first.") from exc
        except json.JSONDecodeError as exc:
            raise FimloraError(
                f"The allocation file {path} is not valid JSON ({exc}); regenerate it."
            ) from exc
        return cls.from_dict(data)


def module_alpha(rank: int, *, reference_rank: int, lora_alpha: float, scaling: str) -> float:
    """The ``lora_alpha`` PEFT gives a module of rank ``rank`` under a scaling convention.

    ``"constant"``: ``lora_alpha * rank / reference_rank`` (so ``alpha / rank = lora_alpha /
    reference_rank`` for every module); a module at the reference rank keeps ``lora_alpha`` itself, so
    float round-off never lands it in the pattern. Otherwise ``lora_alpha`` (PEFT divides by r or √r).
    """
    if scaling != "constant" or rank == reference_rank:
        return lora_alpha
    return lora_alpha * rank / reference_rank


def peft_patterns(
    ranks: dict[str, int], *, reference_rank: int, lora_alpha: float, scaling: str
) -> tuple[dict[str, int], dict[str, float]]:
    """PEFT's ``rank_pattern`` and ``alpha_pattern`` for these ranks around ``r = reference_rank``.

    Every module resolves to its own rank and to :func:`module_alpha`'s value through PEFT's pattern
    matching (see :func:`_resolvable_pattern`); ``alpha_pattern`` is empty except under ``"constant"``.
    """
    rank_pattern = _resolvable_pattern(ranks, default=reference_rank)
    alpha_pattern: dict[str, float] = {}
    if scaling == "constant":
        alphas = {
            n: module_alpha(r, reference_rank=reference_rank, lora_alpha=lora_alpha, scaling=scaling)
            for n, r in ranks.items()
        }
        alpha_pattern = _resolvable_pattern(alphas, default=lora_alpha)
    return rank_pattern, alpha_pattern


def _resolvable_pattern(values: dict[str, Any], *, default: Any) -> dict[str, Any]:
    """A PEFT ``rank_pattern``/``alpha_pattern`` that resolves to ``values[name]`` for every module.

    PEFT takes the *first* pattern key ``k`` that matches ``(.*\\.)?k$`` as a regex. With full names that
    is almost always an exact match, but a key can also match a longer name that ends with it (or, via
    ``.`` wildcards, a same-length one). Longest keys go first, and any module that would pick up
    another's value is pinned with its own key, so the pattern never leaks between modules.
    """
    from peft.utils.other import get_pattern_key

    def ordered(pattern: dict[str, Any]) -> dict[str, Any]:
        return {k: pattern[k] for k in sorted(pattern, key=lambda k: (-len(k), k))}

    def resolve(pattern: dict[str, Any], name: str) -> Any:
        return pattern.get(get_pattern_key(list(pattern), name), default)

    pattern = ordered({n: v for n, v in values.items() if v != default})
    for _ in range(len(values) + 1):
        leaks = [n for n in sorted(values) if resolve(pattern, n) != values[n]]
        if not leaks:
            return pattern
        pattern = ordered({**pattern, **{n: values[n] for n in leaks}})
    raise FimloraError(
        f"Module names such as {leaks[:3]} cannot be told apart by PEFT's pattern matching; "
        "rename the modules or allocate them separately."
    )
