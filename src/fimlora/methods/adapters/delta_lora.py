"""Delta-LoRA (Zi et al. 2023, arXiv 2309.02411) on top of a PEFT LoRA model, written by hand.

Plain LoRA trains ``h = W x + s·B A x`` with ``W`` frozen. Delta-LoRA also moves ``W``, but not by
autograd: past ``K`` start steps, every optimiser step that changes the low-rank product also adds
that change to the pretrained weight (the paper's Algorithm 1: ``for t = 0, …, T−1: … if t > K``),

    W_{t+1} = W_t + λ · s · (B_{t+1} A_{t+1} − B_t A_t),        for t > K  (t: the 0-based step index),

with ``s`` the PEFT layer's scaling for the adapter (``layer.scaling[adapter_name]``: α/r, α/√r under
rsLoRA, per module under ``rank_pattern``/``alpha_pattern``). The sum telescopes: after ``T`` steps
``W_T − W_0 = λ · s · (B_T A_T − B_{K+1} A_{K+1})``. ``W`` keeps ``requires_grad=False`` (no gradient, no
optimiser state); the update is applied in place under ``torch.no_grad()``.

Conventions:

- Steps are **optimiser steps** (with gradient accumulation, one per accumulated batch). The step with
  0-based index ``t`` (``t`` steps already done) updates ``W`` when ``t > warmup_steps``, as in
  Algorithm 1: the first ``K + 1`` steps leave ``W`` alone (``warmup_steps=0``: all but the first).
- Module names are relative to the base model (``bert.encoder.layer.0.attention.self.query``), never
  ``base_model.model.…`` — the names ``rank_pattern`` and ``PeftModel.from_pretrained`` use.
- Dropout on the LoRA path is refused: the paper drops it, because the update rule rests on
  ∂L/∂(BA) being the gradient of the same function ``W`` sits in, which dropout on ``x`` breaks. A
  model with ``lora_dropout > 0`` raises ``FimloraError`` (a warning would let a run silently train a
  different method). Likewise refused: LoRA variants that change the forward (DoRA and other
  ``lora_variant``), ``lora_bias``, non-``Linear`` LoRA layers (embeddings, convolutions, quantised
  layers), two LoRA layers sharing one weight.

Memory. The paper snapshots ``B_t A_t``, one d_out × d_in buffer per module. Here the snapshot is the
factors ``A_t``, ``B_t`` (r·(d_in + d_out) per module) taken only for steps past the warm-up, and
``B_{t+1}A_{t+1} − B_t A_t`` is formed one module at a time in ``after_step``: a single transient
d_out × d_in buffer for the whole model, at the price of one extra r-rank matmul per module and step.
The updater also keeps ``W_0`` (one copy of every targeted weight, in **host** memory, never on the
accelerator): ``drift`` and the saved drift are ``W_t − W_0`` taken exactly, which is what lets a fresh
base + drift + adapter reproduce the trained model bit for bit (a telescoped ``λ·s·ΔBA`` would not).

Exporting. PEFT's ``save_pretrained`` saves the adapter only; the moved ``W`` is not in it. Save it with
``save_weight_drift`` and reload with ``apply_weight_drift`` on the freshly loaded base model *before*
``PeftModel.from_pretrained``. ``merged_model`` (``merge_and_unload``) needs nothing extra: the drift is
already in the base weights. The drift is not part of Trainer checkpoints either, so resuming a Trainer
run from a checkpoint is refused by the callback.

Not supported: FSDP / DeepSpeed ZeRO-3 (sharded or flattened parameters). Under plain data parallelism
every rank applies the same deterministic update, so ``W`` stays in sync.
"""

from __future__ import annotations

import json
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel, PeftType
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import TrainerCallback

from fimlora.allocation import Allocation
from fimlora.errors import FimloraError
from fimlora.io import atomic_write, atomic_write_json
from fimlora.methods.adapters.lora import PeftLora
from fimlora.methods.base import AllocationRule, MethodContext

DRIFT_WEIGHTS_NAME = "delta_lora_drift.safetensors"
DRIFT_CONFIG_NAME = "delta_lora_drift.json"
_FORMAT = "fimlora-delta-lora-drift/1"

# model -> {adapter_name: weakref to its live updater}; weak both ways, so dropping the model or the
# updater frees everything. Lets ``save_weight_drift(model)`` find the updater and refuses two live
# updaters on one adapter (each would add the update again).
_REGISTRY: weakref.WeakKeyDictionary[nn.Module, dict[str, weakref.ref[DeltaLoraUpdater]]] = (
    weakref.WeakKeyDictionary()
)


@dataclass
class _Target:
    name: str  # relative to the base model
    layer: LoraLinear
    weight: nn.Parameter  # the frozen pretrained W (the base layer's weight), updated in place
    initial: torch.Tensor  # W_0 on the CPU, in W's dtype


def _live_updaters(model: nn.Module) -> dict[str, DeltaLoraUpdater]:
    refs = _REGISTRY.get(model, {})
    live = {name: ref() for name, ref in refs.items()}
    return {name: updater for name, updater in live.items() if updater is not None and not updater.closed}


class DeltaLoraUpdater:
    """Applies the Delta-LoRA update to the frozen base weights of ``model``'s LoRA layers.

    Call ``before_step()`` right before ``optimizer.step()`` and ``after_step()`` right after it
    (``DeltaLoraCallback`` does this inside the HF ``Trainer``)::

        updater = DeltaLoraUpdater(model, lambda_=2.0, warmup_steps=100)
        loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()

    Args:
        model: a ``PeftModel`` with a LoRA adapter ``adapter_name`` on ``nn.Linear`` layers, no LoRA
            dropout, base weights frozen.
        lambda_: λ ≥ 0, the multiplier of the low-rank change added to ``W`` (the paper uses 2);
            0 makes this plain LoRA.
        warmup_steps: K ≥ 0, the paper's start steps: the step with 0-based index t moves ``W`` only
            when t > K (steps 0, …, K leave it alone).
        adapter_name: which LoRA adapter's product drives the update.

    ``W_0`` is the base weights at construction (a host copy of each targeted weight).
    """

    def __init__(
        self,
        model: PeftModel,
        *,
        lambda_: float = 2.0,
        warmup_steps: int = 0,
        adapter_name: str = "default",
    ) -> None:
        if isinstance(lambda_, bool) or not isinstance(lambda_, int | float) or not math.isfinite(lambda_):
            raise FimloraError(f"Delta-LoRA's lambda must be a finite number, got {lambda_!r}.")
        if lambda_ < 0:
            raise FimloraError(f"Delta-LoRA's lambda must be ≥ 0, got {lambda_}.")
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise FimloraError(f"Delta-LoRA's warmup_steps must be an integer ≥ 0, got {warmup_steps!r}.")
        self.model = model
        self.lambda_ = float(lambda_)
        self.warmup_steps = warmup_steps
        self.adapter_name = adapter_name
        self.step_count = 0  # optimiser steps completed (after_step calls)
        self.closed = False  # set by merged_model: the LoRA layers are gone, W holds s·BA
        self._targets = _find_targets(model, adapter_name)
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None

        registered = _REGISTRY.setdefault(model, {})
        if adapter_name in _live_updaters(model):
            raise FimloraError(
                f"A DeltaLoraUpdater for adapter {adapter_name!r} of this model already exists; "
                "use that one (two would each apply the update)."
            )
        registered[adapter_name] = weakref.ref(self)

    @property
    def module_names(self) -> list[str]:
        """The updated modules, in model order, named relative to the base model."""
        return [t.name for t in self._targets]

    def scaling(self) -> dict[str, float]:
        """Each module's current LoRA scaling ``s`` for the adapter (PEFT's ``layer.scaling``)."""
        return {t.name: float(t.layer.scaling[self.adapter_name]) for t in self._targets}

    def _updates_next_step(self) -> bool:
        # Algorithm 1's "if t > K", t the 0-based index of the coming step = the steps done so far.
        return self.lambda_ != 0.0 and self.step_count > self.warmup_steps

    def _check_open(self) -> None:
        if self.closed:
            raise RuntimeError("This DeltaLoraUpdater's model was merged (merged_model); it cannot step.")

    @torch.no_grad()
    def before_step(self) -> None:
        """Snapshot ``A_t``, ``B_t`` of every module, if the coming step is past the warm-up.

        During the warm-up (and with λ = 0) this does nothing. The snapshot is the factors, not the
        d_out × d_in product (see the module docstring).
        """
        self._check_open()
        if not self._updates_next_step():
            self._snapshot = None
            return
        for t in self._targets:
            if t.layer.merged:
                raise RuntimeError(f"LoRA layer {t.name} is merged; unmerge it before training.")
        factors = (_factors(t.layer, self.adapter_name) for t in self._targets)
        self._snapshot = [(a.detach().clone(), b.detach().clone()) for a, b in factors]

    @torch.no_grad()
    def after_step(self) -> None:
        """Add ``λ·s·(B_{t+1}A_{t+1} − B_t A_t)`` to each ``W`` if this step is past the warm-up;
        then count the step.

        ``s`` is read from the layer at this call. The difference is formed in float32 (or the LoRA
        dtype if wider) and added to ``W`` in one rounding to ``W``'s dtype.
        """
        self._check_open()
        if self._updates_next_step():
            if self._snapshot is None:
                raise RuntimeError(
                    "DeltaLoraUpdater.after_step() was called without before_step() before the "
                    "optimizer step; call before_step() right before optimizer.step()."
                )
            name = self.adapter_name
            for t, (a_old, b_old) in zip(self._targets, self._snapshot, strict=True):
                a_new, b_new = _factors(t.layer, name)
                dtype = torch.promote_types(a_new.dtype, torch.float32)
                change = b_new.to(dtype) @ a_new.to(dtype) - b_old.to(dtype) @ a_old.to(dtype)
                if t.layer.fan_in_fan_out:  # W is stored (d_in, d_out), e.g. GPT-2's Conv1D
                    change = change.T
                change.mul_(self.lambda_ * float(t.layer.scaling[name]))
                t.weight.add_(change.to(t.weight.device))
                del change
        self._snapshot = None
        self.step_count += 1

    @property
    def drift(self) -> dict[str, torch.Tensor]:
        """``W_t − W_0`` per module (names relative to the base model), float64 on the CPU.

        Float64 makes the difference exact for float32/16 weights, so ``(W_0 + drift).to(W.dtype)``
        gives back ``W_t`` bit for bit.
        """
        self._check_open()
        return {
            t.name: t.weight.detach().to("cpu", torch.float64) - t.initial.to(torch.float64)
            for t in self._targets
        }


def _factors(layer: LoraLinear, adapter_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` of one layer: A is (r, d_in), B is (d_out, r)."""
    return cast(torch.Tensor, layer.lora_A[adapter_name].weight), cast(
        torch.Tensor, layer.lora_B[adapter_name].weight
    )


def _find_targets(model: nn.Module, adapter_name: str) -> list[_Target]:
    if not isinstance(model, PeftModel):
        raise FimloraError(
            "Delta-LoRA needs a PEFT model (peft.get_peft_model with a LoraConfig), "
            f"got {type(model).__name__}."
        )
    config = model.peft_config.get(adapter_name)
    if config is None:
        present = ", ".join(model.peft_config) or "none"
        raise FimloraError(f"The PEFT model has no adapter {adapter_name!r}; it has {present}.")
    if config.peft_type != PeftType.LORA:
        raise FimloraError(
            f"Delta-LoRA needs a plain LoRA adapter; adapter {adapter_name!r} is a {type(config).__name__}."
        )
    targets: list[_Target] = []
    seen: dict[int, str] = {}
    for name, module in model.get_base_model().named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if not isinstance(module, LoraLinear):
            raise FimloraError(
                f"Delta-LoRA supports LoRA on nn.Linear layers only; {name} is a {type(module).__name__}."
            )
        variants = getattr(module, "lora_variant", {})
        if adapter_name in variants or module.use_dora.get(adapter_name, False):
            variant = type(variants[adapter_name]).__name__ if adapter_name in variants else "DoRA"
            raise FimloraError(f"Delta-LoRA does not support LoRA variants (DoRA, …); {name} uses {variant}.")
        if getattr(module, "lora_bias", {}).get(adapter_name, False):
            raise FimloraError(f"Delta-LoRA does not support lora_bias=True (module {name}).")
        dropout = module.lora_dropout[adapter_name]
        if isinstance(dropout, nn.Dropout) and dropout.p > 0:
            raise FimloraError(
                f"Delta-LoRA needs lora_dropout=0 (the paper drops it: the update rule assumes the LoRA "
                f"path sees the same input as W); module {name} has dropout {dropout.p}."
            )
        weight = getattr(module.get_base_layer(), "weight", None)
        if not isinstance(weight, nn.Parameter) or weight.dim() != 2 or not weight.is_floating_point():
            raise FimloraError(f"Delta-LoRA needs a 2-D floating-point base weight; {name} has none.")
        if weight.requires_grad:
            raise FimloraError(
                f"The base weight of {name} is trainable; Delta-LoRA moves W itself and needs it frozen."
            )
        if weight.data_ptr() in seen:
            raise FimloraError(
                f"LoRA layers {seen[weight.data_ptr()]} and {name} share one base weight (tied weights); "
                "Delta-LoRA would update it twice."
            )
        seen[weight.data_ptr()] = name
        initial = weight.detach().to("cpu", copy=True)
        targets.append(_Target(name=name, layer=module, weight=weight, initial=initial))
    if not targets:
        raise FimloraError(f"The PEFT model has no LoRA layers for adapter {adapter_name!r}.")
    return targets


class DeltaLoraCallback(TrainerCallback):
    """Runs a ``DeltaLoraUpdater`` inside the HF ``Trainer``.

    The Trainer calls ``on_pre_optimizer_step`` right before ``optimizer.step()`` (after gradient
    clipping) and ``on_optimizer_step`` right after it (before ``lr_scheduler.step()``,
    ``zero_grad()`` and the ``global_step`` increment), once per optimiser step (once per accumulated
    batch under gradient accumulation); these call ``before_step`` / ``after_step``.

    ``on_train_begin`` refuses a run that resumes from a checkpoint or a second ``train()`` call (the
    Trainer's step count differs from the updater's: the moved W is not in Trainer checkpoints), a
    Trainer whose model does not hold the updater's weights, and an optimiser that holds a base weight.
    """

    def __init__(self, updater: DeltaLoraUpdater) -> None:
        self.updater = updater

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step != self.updater.step_count:
            raise FimloraError(
                f"Delta-LoRA cannot resume: the Trainer is at step {state.global_step} but the updater at "
                f"step {self.updater.step_count} (the moved base weights are not saved in Trainer "
                "checkpoints); start from a fresh model and updater."
            )
        weight_ids = {id(t.weight) for t in self.updater._targets}
        model = kwargs.get("model")
        if model is not None and not any(id(p) in weight_ids for p in model.parameters()):
            raise FimloraError("DeltaLoraCallback's updater belongs to a different model than the Trainer's.")
        optimizer = kwargs.get("optimizer")
        if optimizer is not None:
            for group in optimizer.param_groups:
                if any(id(p) in weight_ids for p in group["params"]):
                    raise FimloraError(
                        "The optimizer holds a base weight that Delta-LoRA updates; only the LoRA "
                        "factors (and any modules_to_save) may be trained."
                    )

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.updater.before_step()

    def on_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.updater.after_step()


def _resolve_updater(updater_or_model: DeltaLoraUpdater | nn.Module) -> DeltaLoraUpdater:
    if isinstance(updater_or_model, DeltaLoraUpdater):
        return updater_or_model
    live = _live_updaters(updater_or_model)
    if len(live) == 1:
        return next(iter(live.values()))
    if not live:
        raise FimloraError(
            "This model has no live DeltaLoraUpdater; pass the updater used in training to save_weight_drift."
        )
    raise FimloraError(
        f"This model has Delta-LoRA updaters for adapters {sorted(live)}; pass the one to save."
    )


def save_weight_drift(
    updater_or_model: DeltaLoraUpdater | nn.Module, directory: str | os.PathLike[str]
) -> None:
    """Write ``W_t − W_0`` of every updated module to ``directory``, atomically.

    Files: ``delta_lora_drift.safetensors`` (one float64 tensor per module, keyed by its name relative
    to the base model, shaped like its weight) and ``delta_lora_drift.json`` (λ, K, step count, adapter,
    module list, per-module scaling), written last. Pass the updater, or the ``PeftModel`` it runs on.
    """
    updater = _resolve_updater(updater_or_model)
    directory = Path(directory)
    tensors = {name: tensor.contiguous() for name, tensor in updater.drift.items()}
    atomic_write(
        directory / DRIFT_WEIGHTS_NAME,
        lambda tmp: save_file(tensors, str(tmp), metadata={"format": _FORMAT}),
    )
    atomic_write_json(
        directory / DRIFT_CONFIG_NAME,
        {
            "format": _FORMAT,
            "method": "delta-lora",
            "reference": "arXiv:2309.02411",
            "lambda": updater.lambda_,
            "warmup_steps": updater.warmup_steps,
            "steps": updater.step_count,
            "updated_steps": max(0, updater.step_count - updater.warmup_steps - 1) if updater.lambda_ else 0,
            "adapter_name": updater.adapter_name,
            "modules": updater.module_names,
            "scaling": updater.scaling(),
            "drift_dtype": "float64",
        },
    )


@torch.no_grad()
def apply_weight_drift(base_model: nn.Module, directory: str | os.PathLike[str]) -> None:
    """Add a saved drift to the weights of a freshly loaded base model, in place.

    Module names are relative to the base model. Call it once, before ``PeftModel.from_pretrained``;
    it also accepts a ``PeftModel`` (it then updates the LoRA layers' base weights). Each weight becomes
    ``(W_0 + drift).to(W.dtype)``, computed in float64 on the CPU, which is the trained ``W_t`` exactly
    when ``W_0`` is the same checkpoint the run started from.
    """
    directory = Path(directory)
    config_path, weights_path = directory / DRIFT_CONFIG_NAME, directory / DRIFT_WEIGHTS_NAME
    if not config_path.is_file() or not weights_path.is_file():
        raise FimloraError(
            f"{directory} is not a Delta-LoRA drift directory "
            f"(needs {DRIFT_WEIGHTS_NAME} and {DRIFT_CONFIG_NAME})."
        )
    config: dict[str, Any] = json.loads(config_path.read_text(encoding="utf-8"))
    drift = load_file(str(weights_path), device="cpu")
    if config.get("format") != _FORMAT or sorted(drift) != sorted(config.get("modules", [])):
        raise FimloraError(f"{directory}: the drift files do not match each other; save them again.")
    root = base_model.get_base_model() if isinstance(base_model, PeftModel) else base_model
    updates: list[tuple[torch.Tensor, torch.Tensor]] = []
    for name in config["modules"]:  # check everything before changing anything
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise FimloraError(f"The model has no module {name!r} to add the Delta-LoRA drift to.") from None
        if isinstance(module, BaseTunerLayer):
            module = module.get_base_layer()
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.shape != drift[name].shape:
            got = None if not isinstance(weight, torch.Tensor) else tuple(weight.shape)
            raise FimloraError(
                f"Module {name!r} has weight shape {got}, the saved drift {tuple(drift[name].shape)}."
            )
        updates.append((weight, drift[name]))
    for weight, delta in updates:
        moved = weight.detach().to("cpu", torch.float64) + delta.to(torch.float64)
        weight.copy_(moved.to(weight.dtype))


def merged_model(peft_model: PeftModel) -> nn.Module:
    """``merge_and_unload`` of a (Delta-)LoRA model: plain modules with ``W_t + s·B A``.

    ``W_t`` already contains the Delta-LoRA drift (it was applied in place), so nothing is added here.
    The merge is in place: ``peft_model`` is consumed, and any ``DeltaLoraUpdater`` on it is closed
    (save the drift first if you need it). Uses PEFT's ``safe_merge`` (fails on NaNs).
    """
    if not isinstance(peft_model, PeftModel):
        raise FimloraError(f"merged_model needs a PeftModel, got {type(peft_model).__name__}.")
    for updater in _live_updaters(peft_model).values():
        updater.closed = True
    merged = peft_model.merge_and_unload(safe_merge=True)
    return merged  # type: ignore[no-any-return]


class DeltaLoraAdapter(PeftLora):
    """The registry's ``delta-lora`` adapter: PEFT LoRA plus the W update and its saved drift."""

    name = "delta-lora"
    description = "Delta-LoRA: LoRA, and after a warm-up W moves by λ·Δ(s·BA) every step."
    optimizers = frozenset({"adamw", "loraplus"})
    refuses_quantized_base = (
        "adds λ·Δ(s·BA) to W in place after every step, and a quantised W cannot hold that update without "
        "being re-quantised (most small updates would round away)"
    )

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        peft_model = super().build(model, allocation, rule, ctx)
        opts = ctx.options.delta_lora
        ctx.record[_UPDATER] = DeltaLoraUpdater(
            peft_model,  # type: ignore[arg-type]
            lambda_=opts.lambda_,
            warmup_steps=int(opts.warmup_ratio * ctx.config.train.steps),
        )
        return peft_model

    def callbacks(self, model: nn.Module, ctx: MethodContext) -> list[TrainerCallback]:
        return [DeltaLoraCallback(ctx.record[_UPDATER])]

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        updater: DeltaLoraUpdater = ctx.record[_UPDATER]
        drift = updater.drift
        return {
            "delta_lora": {
                "lambda": updater.lambda_,
                "warmup_steps": updater.warmup_steps,
                "steps": updater.step_count,
                "drift_fro_norm": float(sum(float(d.pow(2).sum()) for d in drift.values()) ** 0.5),
            }
        }

    def save(self, model: Any, directory: Path, ctx: MethodContext) -> None:
        super().save(model, directory, ctx)
        save_weight_drift(ctx.record.pop(_UPDATER), directory)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        apply_weight_drift(base_model, directory)
        return super().load(base_model, directory)


_UPDATER = "_delta_lora_updater"
ADAPTER = DeltaLoraAdapter()
