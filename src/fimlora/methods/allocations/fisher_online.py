"""fisher-online (ours, preset ``fim-lora-dynamic``): ranks re-solved during training, at a fixed budget.

The adapter starts from fim-lora's static Fisher allocation (``start: fisher``) or from uniform ranks
(``start: uniform``). While it trains, hooks on every target's frozen linear layer (inside its LoRA
layer, or bare where the module has rank 0) accumulate tr F of that weight from the training step's own
forward and backward pass (:mod:`fimlora.fisher.online`: exact per example, training examples only, no
extra pass); the input embeddings' output requires a gradient meanwhile, so even a first-block layer
without an adapter gets its output gradient (no parameter's gradient changes). After the optimizer steps
listed by ``reallocate_at`` (fractions of ``train.steps``; default 10 % and 30 %) the allocation is
solved again by the same allocator as fim-lora (:func:`fimlora.allocation.allocate_ranks`, proportional,
with the experiment's ``allocation`` settings tau, r_min, r_max) on the running average of that trace,
aggregated like the static Fisher (``fisher.aggregation``: ``mean`` = tr F / (d_out·d_in), ``trace`` = tr
F), under the same budget in trainable parameters. The modules whose rank changes are re-sized in place
(:mod:`fimlora.methods.resize`): a shrinking module keeps the best rank-r' approximation of its current
update s·B·A, a growing one gets new directions with B = 0 on the new columns (the function does not
change). With ``allocation.r_min: 0`` a module may drop to rank 0 (its adapter is removed, its update
lost) and one at rank 0 may get an adapter again (PEFT's ``lora.Linear``, B = 0). After the last
re-allocation the hooks are removed, so the remaining steps cost what fim-lora's do.

Optimizer state. The re-sized tensors of a changed module start with fresh AdamW state (no moments,
step count 0: bias correction starts again, as for a new adapter); every unchanged module keeps its
moments and step count. The new tensors take the old ones' place in their param group, so weight decay
and the learning-rate schedule carry on unchanged.

Guarantees, checked while training: the adapter's trainable parameters are counted before every step
and after every re-allocation, and the run stops with an error if a count ever exceeds the budget
(``records.fisher_online.budget_checks`` counts the checks, ``peak_adapter_params`` is the largest
count seen). The saved adapter is PEFT-native: ``rank_pattern`` (and ``alpha_pattern`` under
``constant`` scaling) hold the final ranks.

Limits: one process only (DistributedDataParallel cannot follow parameters that change shape); LoRA
with AdamW only; the adapter's scaling must be ``alpha_over_r`` or ``constant``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import TrainerCallback

from fimlora.allocation import Allocation, allocate_ranks
from fimlora.errors import FimloraError
from fimlora.fisher.online import OnlineTrace
from fimlora.methods.allocations._scored import fisher_scores
from fimlora.methods.base import NEEDS_SCORES, AllocationRule, MethodContext
from fimlora.methods.resize import adapter_parameter_count, lora_layers, replace_in_optimizer, set_ranks
from fimlora.processes import launched_world_size, world_size

_PEFT_PREFIX = "base_model.model."

_PLAN = "_fisher_online_plan"
_CALLBACK = "_fisher_online_callback"


def frozen_linear(model: nn.Module, name: str) -> nn.Module:
    """The frozen ``nn.Linear`` of target ``name`` in a ``PeftModel``: its LoRA layer's base layer, or the
    layer itself where the module has no adapter (rank 0)."""
    module = model.get_submodule(_PEFT_PREFIX + name)
    return module.get_base_layer() if isinstance(module, LoraLayer) else module


def reallocation_steps(fractions: list[float], steps: int) -> list[int]:
    """Optimizer steps after which the allocation is re-solved: ``round(f · steps)``, at least 1.

    Raises FimloraError when two fractions land on the same step or one on the last step (nothing would
    train at the new ranks).
    """
    chosen = [max(1, round(f * steps)) for f in fractions]
    if len(set(chosen)) != len(chosen) or chosen[-1] >= steps:
        raise FimloraError(
            f"method_options.fisher_online.reallocate_at {fractions} gives steps {chosen} of {steps}: each "
            "must be a different step before the last; train longer or use fewer fractions."
        )
    return chosen


@dataclass
class _Plan:
    shapes: dict[str, tuple[int, int]]
    budget: int
    steps: list[int]
    initial: Allocation
    rank_costs: dict[str, int] | None = None  # None: a rank costs d_in + d_out (plain LoRA)


class ReallocationCallback(TrainerCallback):
    """Accumulates the online Fisher, re-allocates at the scheduled steps and checks the budget."""

    def __init__(self, model: Any, ctx: MethodContext, plan: _Plan) -> None:
        opts = ctx.options.fisher_online
        self.model = model
        self.ctx = ctx
        self.plan = plan
        self.adapter = model.active_adapter
        self.layers = self.current_layers()
        # The trace hooks the frozen nn.Linear of every target (inside its LoRA layer, or bare at rank 0):
        # the same objects whatever ranks the modules get, so a module can be scored with no adapter.
        self.trace = OnlineTrace(
            model,
            {name: frozen_linear(model, name) for name in plan.shapes},
            task=ctx.task,
            averaging=opts.averaging,
            beta=opts.ema_beta,
            inputs_require_grad=True,
        )
        self.reallocations: list[dict[str, Any]] = []
        self.history: list[dict[str, Any]] = [{"step": 0, "ranks": dict(plan.initial.ranks)}]
        self.budget_checks = 0
        self.peak_adapter_params = 0
        self.head_params = 0

    def current_layers(self) -> dict[str, Any]:
        return {name: layer for name, layer in lora_layers(self.model).items() if name in self.plan.shapes}

    def adapter_params(self) -> int:
        return adapter_parameter_count(self.layers.values(), self.adapter)

    def check_budget(self, step: int) -> None:
        count = self.adapter_params()
        self.budget_checks += 1
        self.peak_adapter_params = max(self.peak_adapter_params, count)
        if count > self.plan.budget:
            raise RuntimeError(
                f"fisher-online: the adapter trains {count:,} parameters at step {step}, over the budget "
                f"of {self.plan.budget:,}."
            )

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.head_params = trainable - self.adapter_params()
        self.trace.attach()

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.check_budget(state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):  # type: ignore[no-untyped-def]
        if not self.trace.attached:
            return
        self.trace.end_step()
        step = state.global_step  # optimizer steps done
        if step in self.plan.steps:
            if optimizer is None:
                raise RuntimeError("fisher-online needs the Trainer's optimizer to re-allocate")
            self.reallocate(step, optimizer)
        if step >= self.plan.steps[-1]:
            self.trace.detach()

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.trace.detach()

    def scores(self, traces: Mapping[str, float]) -> dict[str, float]:
        """tr F aggregated as the static Fisher's scores are (``fisher.aggregation``)."""
        if self.ctx.config.fisher.aggregation == "trace":
            return dict(traces)
        return {n: v / (self.plan.shapes[n][0] * self.plan.shapes[n][1]) for n, v in traces.items()}

    def reallocate(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        traces = self.trace.averaged()
        settings = self.ctx.config.allocation
        allocation = allocate_ranks(
            self.scores(traces),
            self.plan.shapes,
            budget=self.plan.budget,
            strategy="proportional",
            r_min=settings.r_min,
            r_max=settings.r_max,
            tau=settings.tau,
            seed=self.ctx.seed,
            rank_costs=self.plan.rank_costs,
        )
        device = next(iter(self.layers.values())).lora_A[self.adapter].weight.device
        generator = torch.Generator(device=device).manual_seed(self.ctx.seed * 1_000_003 + step)
        changes = set_ranks(
            self.model,
            allocation.ranks,
            scaling=self.ctx.config.lora.scaling,
            adapter=self.adapter,
            generator=generator,
        )
        self.layers = self.current_layers()
        kept = next(
            (layer for name, layer in sorted(self.layers.items()) if name not in {c.name for c in changes}),
            None,
        )
        replace_in_optimizer(
            optimizer,
            [pair for change in changes for pair in change.replaced],
            like=None if kept is None else kept.lora_A[self.adapter].weight,
        )
        self.check_budget(step)
        shrunk = [c for c in changes if c.new_rank < c.old_rank]
        self.reallocations.append(
            {
                "step": step,
                "params": self.adapter_params(),
                "ranks": dict(allocation.ranks),
                "grown": sum(c.new_rank > c.old_rank for c in changes),
                "shrunk": len(shrunk),
                "max_relative_truncation_error": max(
                    (c.truncation_error / c.update_norm for c in shrunk if c.update_norm > 0), default=0.0
                ),
                "fisher_steps": self.trace.steps,
                "fisher_examples": self.trace.examples,
                "traces": traces,
            }
        )
        self.history.append({"step": step, "ranks": dict(allocation.ranks)})

    def final_ranks(self) -> dict[str, int]:
        """Every target's rank at the end (0: no adapter)."""
        return {
            name: int(self.layers[name].r[self.adapter]) if name in self.layers else 0
            for name in sorted(self.plan.shapes)
        }


class FisherOnline(AllocationRule):
    name = "fisher-online"
    description = "Fisher ranks re-solved during training on the training pass's own Fisher, same budget."
    needs = frozenset({NEEDS_SCORES})
    adapters = frozenset({"lora"})
    optimizers = frozenset({"adamw"})

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        if max(launched_world_size(), world_size()) > 1:
            raise FimloraError(
                f"Method {ctx.spec.name!r} changes the adapter's shapes while it trains, which "
                "DistributedDataParallel cannot follow; run it in a single process."
            )
        opts = ctx.options.fisher_online
        steps = reallocation_steps(list(opts.reallocate_at), ctx.config.train.steps)
        settings = ctx.config.allocation
        scores = fisher_scores(ctx) if opts.start == "fisher" else None
        initial = allocate_ranks(
            scores,
            shapes,
            budget=budget,
            strategy="proportional" if scores is not None else "uniform",
            r_min=settings.r_min,
            r_max=settings.r_max,
            tau=settings.tau,
            seed=ctx.seed,
            rank_costs=rank_costs,
        )
        ctx.record[_PLAN] = _Plan(
            {n: (int(s[0]), int(s[1])) for n, s in shapes.items()},
            budget,
            steps,
            initial,
            dict(rank_costs) if rank_costs is not None else None,
        )
        return initial

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list[TrainerCallback]:
        callback = ReallocationCallback(model, ctx, ctx.record[_PLAN])
        ctx.record[_CALLBACK] = callback
        return [callback]

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        callback: ReallocationCallback | None = ctx.record.pop(_CALLBACK, None)
        plan: _Plan | None = ctx.record.pop(_PLAN, None)
        if callback is None or plan is None:
            return {}
        opts = ctx.options.fisher_online
        final = callback.final_ranks()
        return {
            "reallocations": callback.reallocations,
            "fisher_online": {
                "start": opts.start,
                "averaging": opts.averaging,
                "ema_beta": opts.ema_beta if opts.averaging == "ema" else None,
                "reallocate_at_steps": plan.steps,
                "budget": plan.budget,
                "budget_checks": callback.budget_checks,
                "initial_params": plan.initial.num_params,
                "peak_adapter_params": callback.peak_adapter_params,
                "peak_trainable_params": callback.peak_adapter_params + callback.head_params,
                "final_params": callback.adapter_params(),
                "fisher_steps": callback.trace.steps,
                "fisher_examples": callback.trace.examples,
                "rank_history": callback.history,
                "reallocated_ranks": final,
            },
        }


RULE = FisherOnline()
