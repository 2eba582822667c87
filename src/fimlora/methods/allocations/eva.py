"""EVA, explained-variance adaptation (Paischer et al., 2024, arXiv 2410.07170), budgeted in parameters.

EVA puts the top right-singular vectors of each target layer's (centred) calibration inputs into A
(B = 0) and gives more ranks to layers whose leading components explain more of their inputs' variance.

Initialisation. For every target layer the calibration inputs x (one row per token the model attends to;
causal LM: also labelled, as PEFT's ``use_label_mask``) are summed into Σx and Σxxᵀ in one pass over the
same calibration subset the Fisher uses, in float64. The covariance C = E[xxᵀ] − E[x]E[x]ᵀ has the
eigenvectors of the centred input matrix's right-singular vectors, its eigenvalues are their explained
variances, and λ_k / tr C is component k's explained-variance ratio: what PEFT's incremental PCA
approximates (``peft.tuners.lora.eva``), here exact (up to the float32 round-off of each batch's Gram
matrix), deterministic and in a single pass. A module of rank
r gets its top r components as the rows of A; PEFT builds the adapter (``init_lora_weights="eva"``:
B = 0) and saves/loads it natively.

Redistribution in parameters. PEFT's EVA starts from uniform ranks r_i (here: uniform LoRA at the
budget), caps module i at round(ρ·r_i) components and keeps the Σ r_i components with the largest
explained-variance ratios over all modules: a budget in *ranks*, which spends more parameters than the
budget when wide modules win. Here the same components are taken in the same order (largest ratio first;
ties: module name, then component index) while their *parameters* fit: every module first gets its
r_min top components, then each next component is taken if its module is below its cap
(min(round(ρ·r_i), d_in, d_out, r_max)) and one more rank of it (d_in + d_out, or what a rank trains
under the method's optimizer) fits in what is left; a component that does not fit is skipped and the
next one tried. The pass ends when nothing fits, so at most one module-rank of the budget is left over,
and the adapter never trains more than the budget. Ranks never fall below ``allocation.r_min``; with
``r_min: 0`` a module may end at rank 0 and get no adapter, as PEFT's EVA may drop a layer.

Scaling: as PEFT's ``adjust_scaling_factors`` (EVA's default), a module's lora_alpha is multiplied by
its final rank over its starting rank r_i, so under α/r scaling it keeps α / r_i whatever rank it ends
with.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from fimlora.allocation import Allocation, allocate_ranks
from fimlora.allocation.allocate import rank_cost
from fimlora.errors import FimloraError
from fimlora.fisher.distributed import all_reduce_sum
from fimlora.methods.base import AllocationRule, MethodContext

_COMPONENTS = "_eva_components"
_START = "_eva_start_ranks"


class _InputMoments:
    """Forward hooks summing each target layer's selected input rows: Σx, Σxxᵀ (float64) and a count."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.rows: torch.Tensor | None = None  # (B, T) bool: the tokens of the current batch to use
        self.sum: dict[str, torch.Tensor] = {}
        self.outer: dict[str, torch.Tensor] = {}
        for name, module in self.modules.items():
            weight = module.get_parameter("weight")
            d = int(module.in_features)  # type: ignore[arg-type]  # a packed (quantised) weight has another shape
            self.sum[name] = torch.zeros(d, dtype=torch.float64, device=weight.device)
            self.outer[name] = torch.zeros(d, d, dtype=torch.float64, device=weight.device)
        self.count: dict[str, int] = dict.fromkeys(self.modules, 0)
        self.handles: list[Any] = []

    def __enter__(self) -> _InputMoments:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def _hook(self, name: str):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            x = _selected_rows(name, x, self.rows)
            xf = x.float()
            self.sum[name] += xf.sum(0).double()
            self.outer[name] += (xf.T @ xf).double()
            self.count[name] += int(x.shape[0])

        return hook


def _selected_rows(name: str, x: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
    """The input rows of the selected tokens, ``(n, d_in)``, for inputs ``(B, T, d)`` or ``(B·T, d)``."""
    if rows is None:
        return x.reshape(-1, x.shape[-1])
    if x.dim() == 3 and tuple(x.shape[:2]) == tuple(rows.shape):
        return x[rows]
    if x.dim() == 2 and x.shape[0] == rows.numel():
        return x[rows.reshape(-1)]
    raise FimloraError(
        f"EVA cannot tell which tokens module {name!r}'s input of shape {tuple(x.shape)} belongs to "
        f"(batch × tokens = {tuple(rows.shape)}); leave it out of target_modules."
    )


@torch.no_grad()
def input_components(
    model: nn.Module,
    batches: Iterable[Mapping[str, torch.Tensor]],
    targets: list[str],
    *,
    use_label_mask: bool,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Principal directions of each target layer's calibration inputs, exact.

    Returns ``{name: (components, ratios)}``: ``components`` ``(d_in, d_in)`` float64, row k the k-th
    right-singular vector of the centred input matrix (the k-th eigenvector of its covariance);
    ``ratios`` ``(d_in,)``: their explained-variance ratios λ_k / tr C, non-increasing, summing to 1
    (all 0 for a constant input).
    Tokens: those with a nonzero attention mask (and, with ``use_label_mask``, a label ≠ -100). Under
    ``torch.distributed`` each process passes its own batches; the moments are summed over processes.
    """
    modules = dict(model.named_modules())
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with _InputMoments({n: modules[n] for n in targets}) as moments:
            for raw in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in raw.items()}
                mask = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
                if use_label_mask and "labels" in batch and batch["labels"].shape == mask.shape:
                    mask = mask & (batch["labels"] != -100)
                moments.rows = mask
                model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        model.train(was_training)
    # Under torchrun each process passes its shard: the sums over all shards are the single-process sums.
    counts = torch.tensor([moments.count[n] for n in targets], dtype=torch.float64, device=device)
    all_reduce_sum([counts, *(moments.sum[n] for n in targets), *(moments.outer[n] for n in targets)])
    result = {}
    for name, count in zip(targets, counts.tolist(), strict=True):
        n = int(count)
        if n == 0:
            raise FimloraError(
                f"EVA saw no calibration token at module {name!r}; check the calibration data."
            )
        mean = moments.sum[name] / n
        covariance = moments.outer[name] / n - torch.outer(mean, mean)
        values, vectors = torch.linalg.eigh((covariance + covariance.T) / 2)
        values, vectors = values.flip(0).clamp_min(0.0), vectors.flip(1)
        total = float(values.sum())
        ratios = values / total if total > 0 else torch.zeros_like(values)
        result[name] = (vectors.T.contiguous().cpu(), ratios.cpu())
    return result


def eva_ranks(
    ratios: Mapping[str, torch.Tensor],
    costs: Mapping[str, int],
    caps: Mapping[str, int],
    *,
    budget: int,
    r_min: int,
) -> dict[str, int]:
    """EVA's redistribution with a parameter budget (module docstring): ranks with Σ r_i·cost_i ≤ budget.

    ``ratios[name]``: explained-variance ratios, non-increasing; ``costs``: parameters per rank;
    ``caps``: largest rank per module (≥ r_min). Raises FimloraError if r_min everywhere does not fit.
    """
    names = sorted(ratios)
    ranks = dict.fromkeys(names, r_min)
    left = budget - sum(r_min * costs[n] for n in names)
    if left < 0:
        raise FimloraError(
            f"A budget of {budget} trainable parameters cannot give every module r_min={r_min}; "
            "raise the budget or lower r_min."
        )
    # Each module's ratios are non-increasing, so a heap of its next component yields EVA's global order.
    heap = [(-float(ratios[n][r_min]), n) for n in names if ranks[n] < caps[n]]
    heapq.heapify(heap)
    while heap:
        _, name = heapq.heappop(heap)
        if costs[name] > left:  # left only shrinks: this module's later components never fit either
            continue
        ranks[name] += 1
        left -= costs[name]
        if ranks[name] < caps[name]:
            heapq.heappush(heap, (-float(ratios[name][ranks[name]]), name))
    return ranks


class Eva(AllocationRule):
    name = "eva"
    description = "EVA: A from the SVD of layer inputs; explained-variance redistribution in parameters."
    adapters = frozenset({"lora", "rslora"})

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        settings = ctx.config.allocation
        batches = ctx.calibration_shard or ctx.calibration_batches
        if batches is None or ctx.base_model is None:
            raise RuntimeError("EVA needs the base model and calibration batches")
        # EVA's starting point: uniform ranks at the budget.
        start = allocate_ranks(
            None, shapes, budget=budget, strategy="uniform", r_min=settings.r_min, r_max=settings.r_max,
            rank_costs=rank_costs,
        )  # fmt: skip
        pca = input_components(
            ctx.base_model, batches(), sorted(shapes), use_label_mask=ctx.task == "causal-lm"
        )
        rho = ctx.options.eva.rho
        caps = {}
        for name, (d_out, d_in) in shapes.items():
            cap = min(round(start.ranks[name] * rho), d_in, d_out)
            caps[name] = max(settings.r_min, cap if settings.r_max is None else min(cap, settings.r_max))
        costs = {name: rank_cost(shapes, rank_costs, name) for name in shapes}
        ranks = eva_ranks(
            {n: ratios for n, (_, ratios) in pca.items()}, costs, caps, budget=budget, r_min=settings.r_min
        )
        ctx.record[_COMPONENTS] = {n: pca[n][0][: ranks[n]] for n in ranks}
        ctx.record[_START] = dict(start.ranks)
        explained = {n: float(pca[n][1][: ranks[n]].sum()) for n in ranks}
        ctx.record["eva"] = {
            "rho": rho,
            "budget_unit": "params",
            "initial_ranks": dict(start.ranks),
            "redistributed_ranks": ranks,
            "explained_variance_ratio": explained,
            "initialized": False,
        }
        return Allocation(
            ranks=ranks,
            shapes=dict(shapes),
            budget=budget,
            strategy="eva",
            scores=explained,
            r_min=settings.r_min,
            r_max=settings.r_max,
            rank_costs=None if rank_costs is None else dict(rank_costs),
        )

    def peft_config(self, lora_kwargs: dict[str, Any], allocation: Allocation, ctx: MethodContext) -> Any:
        from peft import EvaConfig, LoraConfig

        from fimlora.allocation.allocation import _resolvable_pattern

        opts = ctx.options.eva
        start = ctx.record[_START]
        alpha = lora_kwargs["lora_alpha"]
        # PEFT's adjust_scaling_factors: alpha_i = alpha · r_i / r_start, so alpha_i / r_i = alpha / r_start.
        alphas = {
            n: alpha if r == start[n] else alpha * r / start[n] for n, r in allocation.adapted_ranks.items()
        }
        kwargs = {**lora_kwargs, "alpha_pattern": _resolvable_pattern(alphas, default=alpha)}
        eva_config = EvaConfig(
            rho=opts.rho,
            tau=opts.tau,
            use_label_mask=ctx.task == "causal-lm",
            whiten=False,
            adjust_scaling_factors=True,
        )
        # init_lora_weights="eva": PEFT sets B = 0 and the adapter config says what A is.
        return LoraConfig(**kwargs, init_lora_weights="eva", eva_config=eva_config)

    @torch.no_grad()
    def after_wrap(self, model: nn.Module, ctx: MethodContext) -> None:
        from fimlora.methods.adapters.lora import lora_layers

        components = ctx.record.pop(_COMPONENTS)
        ctx.record.pop(_START, None)
        for name, layer in lora_layers(model).items():
            weight = layer.lora_A["default"].weight
            if weight.shape != components[name].shape:
                raise RuntimeError(
                    f"EVA: {name} has A of shape {tuple(weight.shape)}, expected "
                    f"{tuple(components[name].shape)}"
                )
            weight.copy_(components[name].to(dtype=weight.dtype, device=weight.device))
        ctx.record["eva"]["initialized"] = True

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        return {"eva": ctx.record.pop("eva", None)}


RULE = Eva()
