"""AdaLoRA (Zhang et al., 2023, arXiv 2303.10512) through PEFT's ``AdaLoraConfig``.

PEFT prunes only when ``update_and_allocate(step)`` is called after every optimizer step, which the
Trainer does not do; :class:`AdaLoraCallback` does it (a harness without it trains plain SVD-LoRA at
``init_r`` and never prunes).

Budget. PEFT's allocator keeps the ``target_r × n_modules`` most important singular triplets, a budget in
ranks: when it keeps ranks on wide modules (an MLP's 384×1536) it trains more parameters than uniform LoRA
at ``target_r``. With ``budget_unit="params"`` (default) the same importance scores and the same cubic
schedule are used, but the schedule runs in trainable parameters, from the initial adapter's count down to
the experiment's budget, and the mask keeps the most important triplets while their parameters fit
(a triplet of module i costs d_in + d_out + 1). ``budget_unit="ranks"`` is PEFT's allocator unchanged.

Orthogonality penalty. PEFT adds γ × the mean over factors of ‖PᵀP − I‖_F and ‖QQᵀ − I‖_F to the loss,
with γ = ``orth_reg_weight``: by default the paper's 0.1 (its released GLUE scripts pass
``--reg_orth_coef 0.1``), not PEFT's default 0.5; the run records the value it trained with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from peft.tuners.adalora.layer import RankAllocator
from torch import nn
from transformers import TrainerCallback

from fimlora.allocation import Allocation, allocate_ranks
from fimlora.errors import FimloraError
from fimlora.methods.base import AllocationRule, MethodContext


class ParameterBudgetRankAllocator(RankAllocator):
    """PEFT's AdaLoRA ``RankAllocator`` with its budget counted in trainable parameters."""

    target_params: int
    init_params: int
    triplet_cost: dict[str, int]

    def use_parameter_budget(self, model: nn.Module, target_params: int) -> None:
        self.target_params = int(target_params)
        self.triplet_cost = {}
        shapes: dict[str, dict[str, int]] = {}
        for n, p in model.named_parameters():
            if f"lora_A.{self.adapter_name}" in n:
                shapes.setdefault(n.replace("lora_A", "%s"), {}).update(r=p.shape[0], d_in=p.shape[1])
            elif f"lora_B.{self.adapter_name}" in n:
                shapes.setdefault(n.replace("lora_B", "%s"), {})["d_out"] = p.shape[0]
        self.init_params = 0
        for name_m, s in shapes.items():
            cost = s["d_in"] + s["d_out"] + 1
            self.triplet_cost[name_m % "lora_E"] = cost
            self.init_params += s["r"] * cost

    def budget_schedule(self, step: int) -> tuple[int, bool]:
        cfg = self.peft_config
        if step <= cfg.tinit:
            return self.init_params, False
        if step > cfg.total_step - cfg.tfinal:
            return self.target_params, True
        mul_coeff = 1 - (step - cfg.tinit) / (cfg.total_step - cfg.tfinal - cfg.tinit)
        budget = int((self.init_params - self.target_params) * (mul_coeff**3) + self.target_params)
        return budget, step % cfg.deltaT == 0

    def mask_to_budget(self, model: nn.Module, budget: int) -> dict[str, list[bool]]:
        vector_ipt: dict[str, list[torch.Tensor]] = {}
        value_ipt: dict[str, torch.Tensor] = {}
        for n, _ in model.named_parameters():
            # PEFT's triplet importance, unchanged: mean element score of A's row and B's column plus E's.
            if f"lora_A.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_A", "%s"), []).append(
                    torch.mean(self._element_score(n), dim=1, keepdim=True)
                )
            elif f"lora_B.{self.adapter_name}" in n:
                vector_ipt.setdefault(n.replace("lora_B", "%s"), []).append(
                    torch.mean(self._element_score(n), dim=0, keepdim=False).view(-1, 1)
                )
            elif f"lora_E.{self.adapter_name}" in n:
                value_ipt[n.replace("lora_E", "%s")] = self._element_score(n)
        scored: list[tuple[float, str, int]] = []
        for name_m in sorted(vector_ipt):
            score = self._combine_ipt(value_ipt[name_m], torch.cat(vector_ipt[name_m], dim=1))
            scored.extend((float(s), name_m % "lora_E", i) for i, s in enumerate(score.tolist()))
        # Most important first; ties broken by name and index so the mask is deterministic.
        scored.sort(key=lambda t: (-t[0], t[1], t[2]))
        keep: dict[str, list[bool]] = {
            name_m % "lora_E": [False] * len(value_ipt[name_m].view(-1)) for name_m in value_ipt
        }
        spent = 0
        for _, name_e, index in scored:
            cost = self.triplet_cost[name_e]
            if spent + cost <= budget:
                keep[name_e][index] = True
                spent += cost
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in keep:
                    mask = torch.tensor(keep[n], device=p.device).view(-1, 1)
                    p.masked_fill_(~mask, 0.0)
        return keep


# At most this many snapshots of the rank pattern are recorded over a run (plus the initial one).
_HISTORY_POINTS = 50


class AdaLoraCallback(TrainerCallback):
    """Calls ``update_and_allocate`` after every optimizer step, while the gradients still exist.

    Also records the rank pattern every ``ceil(total_step / 50)`` steps and after the last one
    (``history``: ``{"step": optimizer steps done, "ranks": unmasked triplets per module}``), from the
    masks PEFT keeps in ``rank_pattern`` (every triplet counts until the first mask), so the report can
    draw the ranks over training.
    """

    def __init__(self, model: Any) -> None:
        self.model = model
        self.calls = 0
        config = model.peft_config[model.active_adapter]
        self.interval = max(1, math.ceil(config.total_step / _HISTORY_POINTS))
        self.history: list[dict[str, Any]] = [{"step": 0, "ranks": self.masked_ranks()}]

    def masked_ranks(self) -> dict[str, int]:
        """Triplets per module that the current masks keep (names relative to the base model)."""
        config = self.model.peft_config[self.model.active_adapter]
        if config.rank_pattern:
            return {
                key.split(".lora_E")[0].removeprefix("base_model.model."): int(sum(mask))
                for key, mask in sorted(config.rank_pattern.items())
            }
        return {
            name.split(".lora_E.")[0].removeprefix("base_model.model."): int(param.shape[0])
            for name, param in self.model.named_parameters()
            if ".lora_E." in name
        }

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # state.global_step is the 0-based index of the step being taken (incremented after this event).
        self.model.base_model.update_and_allocate(state.global_step)
        self.calls += 1
        done = state.global_step + 1
        if done % self.interval == 0 or done == state.max_steps:
            self.history.append({"step": done, "ranks": self.masked_ranks()})


def kept_ranks(model: nn.Module) -> dict[str, int]:
    """Unmasked singular triplets per module (names relative to the base model)."""
    ranks = {}
    for name, param in model.named_parameters():
        if ".lora_E." in name:
            module = name.split(".lora_E.")[0].removeprefix("base_model.model.")
            ranks[module] = int((param.detach() != 0).sum())
    return ranks


class AdaLora(AllocationRule):
    name = "adalora"
    description = "AdaLoRA: SVD-parametrised adapters pruned during training by sensitivity, to the budget."
    static_ranks = False
    adapters = frozenset({"lora"})
    optimizers = frozenset({"adamw"})
    # PEFT's AdaLoRA layer scales by lora_alpha / (number of kept triplets) whatever LoraConfig says.
    scalings = frozenset({"alpha_over_r"})

    def initial_rank(self, ctx: MethodContext) -> int:
        return max(1, math.ceil(ctx.options.adalora.init_rank_factor * ctx.config.budget.reference_rank))

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        # AdaLoRA trains with AdamW only (its triplets cost d_in + d_out + 1, counted by its own pruner).
        # The starting point: a uniform init_r on every module. It is above the budget by design; the
        # pruning schedule brings the adapter down to the budget during training.
        r0 = self.initial_rank(ctx)
        return allocate_ranks(
            None,
            shapes,
            budget=sum(r0 * (d_in + d_out) for d_out, d_in in shapes.values()),
            strategy="uniform",
        )

    def peft_config(self, lora_kwargs: dict[str, Any], allocation: Allocation, ctx: MethodContext) -> Any:
        from peft import AdaLoraConfig

        opts = ctx.options.adalora
        steps = ctx.config.train.steps
        tinit = int(opts.tinit_ratio * steps)
        # At least one final step: with tfinal = 0 the cubic schedule is still above the target at the
        # last step (PEFT passes 0-based steps), and the adapter would end over the budget.
        tfinal = max(1, int(opts.tfinal_ratio * steps))
        if steps - tinit - tfinal < 1:
            raise FimloraError(
                f"AdaLoRA needs train.steps > tinit + tfinal ({tinit} + {tfinal} at {steps} steps): "
                "train longer or lower method_options.adalora.tinit_ratio / tfinal_ratio."
            )
        kwargs = {k: v for k, v in lora_kwargs.items() if k not in {"r", "rank_pattern", "alpha_pattern"}}
        return AdaLoraConfig(
            **kwargs,
            init_r=self.initial_rank(ctx),
            target_r=ctx.config.budget.reference_rank,
            tinit=tinit,
            tfinal=tfinal,
            deltaT=opts.delta_t,
            beta1=opts.beta1,
            beta2=opts.beta2,
            orth_reg_weight=opts.orth_reg_weight,
            total_step=steps,
        )

    def after_wrap(self, model: Any, ctx: MethodContext) -> None:
        if ctx.options.adalora.budget_unit == "params":
            allocator = model.base_model.rankallocator
            allocator.__class__ = ParameterBudgetRankAllocator
            # The allocator sees the inner model (names without the "base_model.model." prefix).
            allocator.use_parameter_budget(model.base_model.model, ctx.budget)
        ctx.record["adalora_peak_params"] = sum(
            p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n
        )

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list[TrainerCallback]:
        callback = AdaLoraCallback(model)
        ctx.record["_adalora_callback"] = callback
        return [callback]

    def finalize(self, model: Any, ctx: MethodContext) -> dict[str, Any]:
        ranks = kept_ranks(model)
        modules = dict(model.base_model.model.named_modules())
        final_params = sum(
            r * (modules[n].in_features + modules[n].out_features + 1) for n, r in ranks.items()
        )
        callback = ctx.record.pop("_adalora_callback", None)
        return {
            "adalora": {
                "budget_unit": ctx.options.adalora.budget_unit,
                # γ of the orthogonality penalty: the paper's 0.1 by default (PEFT's own default is 0.5)
                "orth_reg_weight": model.peft_config[model.active_adapter].orth_reg_weight,
                "init_r": self.initial_rank(ctx),
                "peak_params": ctx.record.pop("adalora_peak_params", None),
                "final_params": final_params,
                "final_ranks": ranks,
                "update_and_allocate_calls": None if callback is None else callback.calls,
                "rank_history": None if callback is None else callback.history,
            }
        }


RULE = AdaLora()
