"""The small interface every method is made of: an allocation rule, an adapter and an optimizer.

A *method* is one choice on each of three axes, resolved from a preset name (``fim-lora``) or an explicit
mapping in the config (``{name: fim-dora, allocation: fisher, adapter: dora}``):

* an :class:`AllocationRule` decides how many ranks each target module gets under the parameter budget
  (before training, or during training for AdaLoRA and fisher-online);
* an :class:`AdapterKind` wraps the base model (PEFT LoRA and its variants, VeRA, Delta-LoRA, HydraLoRA,
  full fine-tuning), says what a rank costs in parameters, and saves/loads what it trained;
* an :class:`OptimizerKind` builds the optimizer (AdamW, LoRA+, LoRA-FA, the Riemannian preconditioner).

Each component may also contribute training callbacks, an auxiliary loss and a record of what it did
(e.g. AdaLoRA's final rank pattern). Every method of an experiment sees the same targets, budget, seed
and training settings through a :class:`MethodContext`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    from transformers import TrainerCallback

    from fimlora.allocation import Allocation
    from fimlora.config import ExperimentConfig
    from fimlora.fisher import FisherResult

# What a calibration pass may have to provide for an allocation rule. Scores (one Fisher importance
# per module, ``FisherResult.scores``) come from the trace statistic, which holds no weight-sized
# tensor; the diagonal itself (a float32 copy of every target weight's shape) only for a rule reading it.
NEEDS_SCORES = "scores"
NEEDS_DIAGONAL = "diagonal"
NEEDS_GRADIENTS = "gradients"
NEEDS_KFAC = "kfac"


@dataclass(frozen=True)
class MethodSpec:
    """A resolved method: its name and one component per axis."""

    name: str
    allocation: str
    adapter: str
    optimizer: str
    description: str = ""

    def to_dict(self) -> dict[str, str]:
        return {
            "name": self.name,
            "allocation": self.allocation,
            "adapter": self.adapter,
            "optimizer": self.optimizer,
        }


@dataclass
class MethodContext:
    """Everything a method may look at; identical for all methods of an experiment except ``spec``."""

    config: ExperimentConfig
    spec: MethodSpec
    task: str
    targets: list[str]
    shapes: dict[str, tuple[int, int]]
    budget: int
    head_modules: list[str]
    base_name_or_path: str
    seed: int
    base_model: nn.Module | None = None  # the pristine base model, read-only
    fisher: FisherResult | None = None
    kfac: FisherResult | None = None
    calibration_batches: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    # This process's share of them under torchrun (the whole set in a single process), for code that
    # gathers its inputs across processes itself (PEFT's EVA).
    calibration_shard: Callable[[], Iterable[dict[str, torch.Tensor]]] | None = None
    train_texts: Callable[[], list[str]] | None = None
    # Evaluation batches per domain, for datasets with a ``domain`` column (e.g. sentiment-domains).
    domain_batches: Callable[[], dict[str, Iterable[dict[str, torch.Tensor]]]] | None = None
    # Content hash of each loaded split (fimlora.data.registry.split_fingerprints).
    data_fingerprint: dict[str, str] = field(default_factory=dict)
    # Filled in while the method is built, for the result record.
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def task_type(self) -> str:
        return {"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}[self.task]

    @property
    def peft_modules_to_save(self) -> list[str] | None:
        """``modules_to_save`` for a PEFT config (see :func:`peft_modules_to_save`)."""
        return peft_modules_to_save(self.head_modules, self.task)

    @property
    def options(self) -> Any:
        """The experiment's ``method_options`` section."""
        return self.config.method_options


# PEFT adds these to modules_to_save itself for sequence classification (PeftModelForSequenceClassification).
_PEFT_CLASSIFIER_NAMES = ("classifier", "score")


def peft_modules_to_save(head_modules: list[str], task: str) -> list[str] | None:
    """The head modules to name in a PEFT config: those PEFT does not add on its own (it appends
    ``classifier`` and ``score`` for sequence classification, so naming them too lists them twice)."""
    own = _PEFT_CLASSIFIER_NAMES if task == "classification" else ()
    return [m for m in head_modules if m not in own] or None


@dataclass(frozen=True)
class CostModel:
    """Trainable parameters of an adapter on one module: ``rank * per_rank + fixed``.

    ``per_rank`` is what one rank trains (plain LoRA: ``d_in + d_out``; HydraLoRA with k heads:
    ``d_in + k·d_out``; LoRA-FA, whose A is frozen: ``d_out``), ``fixed`` what the module trains
    whatever its rank (DoRA's magnitude vector, HydraLoRA's router). The allocators spend the budget in
    these units; a module's rank cap stays ``min(d_in, d_out)``.
    """

    per_rank: int
    fixed: int = 0


class Component:
    """Hooks shared by all three axes; the defaults do nothing."""

    name: str = ""
    description: str = ""
    #: Why this component cannot run on a quantised (int8/NF4) base model, completing "<axis> <name> …";
    #: None when it can. Checked when the config is read (:meth:`quantized_base_refusal`).
    refuses_quantized_base: str | None = None
    #: Why this component cannot leave a module at rank 0 (no adapter, ``allocation.r_min: 0``),
    #: completing "<axis> <name> …"; None when it can. Checked when the config is read.
    refuses_rank_zero: str | None = None

    def quantized_base_refusal(self, quantization: str) -> str | None:
        """Why this component cannot run on a ``quantization`` (``int8``/``nf4``) base; None when it can."""
        return self.refuses_quantized_base

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list[TrainerCallback]:
        """Trainer callbacks that implement this component during training (e.g. AdaLoRA's pruning)."""
        return []

    def extra_loss(self, model: nn.Module, ctx: MethodContext) -> Callable[[], torch.Tensor] | None:
        """An auxiliary loss added to the task loss at every step (e.g. a router balance loss)."""
        return None

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        """After training: what this component did, for the run record."""
        return {}


class AllocationRule(Component):
    """How the parameter budget is spread over the target modules."""

    #: What the calibration pass must provide (``NEEDS_*``); empty for score-free rules.
    needs: frozenset[str] = frozenset()
    #: Adapters this rule can drive; None = every rank-based adapter.
    adapters: frozenset[str] | None = None
    #: Optimizers this rule can train with; None = any the adapter accepts.
    optimizers: frozenset[str] | None = None
    #: True when the built adapter must match the allocation's ranks exactly (they may still move during
    #: training, as fisher-online's do); False when the adapter sets its own initial ranks (AdaLoRA, EVA).
    static_ranks: bool = True
    #: The ``lora.scaling`` conventions this rule honours; None = whatever the adapter supports.
    scalings: frozenset[str] | None = None
    #: True when the rule reads another, finished run (``hindsight``): the config must name that run.
    reads_source_run: bool = False

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        """Ranks per module such that ``Σ r_i cost_i <= budget`` over ``shapes`` (``(d_out, d_in)``).

        ``rank_costs[name]`` is what one rank of that module trains under this method's adapter and
        optimizer (:class:`CostModel`); None means plain LoRA's ``d_in + d_out``.
        """
        raise NotImplementedError

    def peft_config(self, lora_kwargs: dict[str, Any], allocation: Allocation, ctx: MethodContext) -> Any:
        """The PEFT config of a PEFT-LoRA adapter under this rule; default: a plain ``LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(**lora_kwargs)

    def after_wrap(self, model: nn.Module, ctx: MethodContext) -> None:
        """Data-dependent initialisation once the adapter exists (e.g. EVA)."""


class AdapterKind(Component):
    """What gets trained, how it is injected, and how it is saved and reloaded."""

    #: False for adapters that take no rank allocation (full fine-tuning).
    rank_based: bool = True
    #: False for adapters whose size is set by their own rule (VeRA), not by the budget.
    budget_matched: bool = True
    #: Optimizers that can train this adapter.
    optimizers: frozenset[str] = frozenset({"adamw"})
    #: The scaling conventions this adapter supports (``lora.scaling`` in the config); None: the adapter
    #: has no LoRA scaling at all (full fine-tuning, VeRA), so the setting does not apply to it.
    scalings: frozenset[str] | None = frozenset({"alpha_over_r", "constant"})

    def cost(self, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        """Trainable parameters per rank and fixed, on a module of weight shape ``(d_out, d_in)``."""
        return CostModel(per_rank=shape[0] + shape[1])

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        """Wrap ``model`` (a private copy of the base model) and return the trainable model."""
        raise NotImplementedError

    def trainable_counts(self, model: nn.Module, ctx: MethodContext) -> dict[str, int]:
        """Trainable parameters: ``adapter_params`` (the method's own), ``head_params`` (task head).

        Called once the optimizer is built (which may freeze tensors, as LoRA-FA's freezes A), on the
        tensors that require a gradient; the caller checks that each of them is in the optimizer.
        """
        from fimlora.train import parameter_counts

        return parameter_counts(model)

    def save(self, model: nn.Module, directory: Path, ctx: MethodContext) -> None:
        """Write what was trained so that :meth:`load` reproduces the trained outputs exactly."""
        raise NotImplementedError

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        """Rebuild the trained model from a freshly loaded base model and :meth:`save`'s output."""
        raise NotImplementedError

    #: Why the trained update cannot be folded into the base weights; None when :meth:`merge` can.
    unmergeable_reason: str | None = None

    def merge(self, model: nn.Module) -> nn.Module:
        """The trained model (as :meth:`build` or :meth:`load` returned it) with its update folded into
        the base weights: plain transformers modules, no adapter code left. Consumes ``model``.

        Default: PEFT's ``merge_and_unload(safe_merge=True)`` for a PEFT model (LoRA and its variants,
        VeRA, AdaLoRA; ``modules_to_save`` become the trained modules), the model itself otherwise
        (full fine-tuning already is a plain model). Adapters that cannot merge set
        ``unmergeable_reason`` and raise here.
        """
        from peft import PeftModel

        if self.unmergeable_reason is not None:
            from fimlora.errors import FimloraError

            raise FimloraError(self.unmergeable_reason)
        if isinstance(model, PeftModel):
            return model.merge_and_unload(safe_merge=True).eval()  # type: ignore[operator,no-any-return]
        return model.eval()


class OptimizerKind(Component):
    """The optimizer; ``None`` from :meth:`build` means the Trainer's default AdamW."""

    def build(self, model: nn.Module, ctx: MethodContext) -> torch.optim.Optimizer | None:
        raise NotImplementedError

    def cost(self, adapter_cost: CostModel, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        """What a module costs once this optimizer decides what trains; default: the adapter's cost."""
        return adapter_cost
