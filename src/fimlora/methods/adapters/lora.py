"""PEFT LoRA and the variants PEFT implements as LoraConfig options (DoRA, rsLoRA, PiSSA, OLoRA, LoRA-GA).

Adapters are PEFT-native: ``rank_pattern``/``alpha_pattern`` keys are module names of the base model, and
``PeftModel.from_pretrained(base, adapter_dir)`` in a fresh process reproduces the trained logits. Inits
that rewrite the base weights (PiSSA, OLoRA, LoRA-GA subtract their initial B·A from W) are saved with
PEFT's own conversion to a plain LoRA adapter on the *original* base model (rank 2r), so they load into an
unmodified base model too.
"""

from __future__ import annotations

import tempfile
import warnings
from pathlib import Path
from typing import Any

from peft import PeftModel, get_peft_model
from torch import nn
from transformers import set_seed

from fimlora.allocation import Allocation
from fimlora.methods.base import AdapterKind, AllocationRule, MethodContext

_LORA_STYLE_OPTIMIZERS = frozenset({"adamw", "loraplus", "lora-fa", "riemannian"})
_INITIAL_ADAPTER = "_initial_adapter_dir"


class PeftLora(AdapterKind):
    """LoRA through ``peft.LoraConfig``; subclasses set the variant's options."""

    name = "lora"
    description = "LoRA (Hu et al., 2021): W + s·BA, B = 0 at init."
    optimizers = _LORA_STYLE_OPTIMIZERS
    scalings = frozenset({"alpha_over_r", "constant", "alpha_over_sqrt_r"})
    #: LoraConfig options of the variant.
    lora_options: dict[str, Any] = {}  # noqa: RUF012 - class-level constant, never mutated
    #: Whether the init rewrites the base weights (needs conversion on save).
    rewrites_base = False

    def scaling(self, ctx: MethodContext) -> str:
        return ctx.config.lora.scaling

    def lora_kwargs(self, allocation: Allocation, ctx: MethodContext) -> dict[str, Any]:
        config = allocation.to_lora_config(
            lora_alpha=ctx.config.lora_alpha,
            scaling=self.scaling(ctx),
            lora_dropout=ctx.config.lora.dropout,
            task_type=ctx.task_type,
            modules_to_save=ctx.peft_modules_to_save,
        )
        keys = (
            "r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_rslora",
            "lora_dropout", "task_type", "modules_to_save",
        )  # fmt: skip
        kwargs = {key: getattr(config, key) for key in keys}
        kwargs.update(self.lora_options)
        return kwargs

    def before_wrap(self, model: nn.Module, peft_config: Any, ctx: MethodContext) -> None:
        """Work on the base model the init needs before wrapping (LoRA-GA's gradient estimate)."""

    def initialise(self, peft_model: Any, ctx: MethodContext) -> None:
        """Set the adapter's initial weights once PEFT has built it (inits PEFT does not implement)."""

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        assert allocation is not None
        peft_config = rule.peft_config(self.lora_kwargs(allocation, ctx), allocation, ctx)
        self.before_wrap(model, peft_config, ctx)
        set_seed(ctx.seed)
        with warnings.catch_warnings():
            # EVA: PEFT suggests low_cpu_mem_usage for the SVD batch size; EVA initialises after the
            # wrap (AllocationRule.after_wrap), at the batch size the calibration pass already uses.
            warnings.filterwarnings("ignore", message="lora with eva initialization", category=UserWarning)
            peft_model = get_peft_model(model, peft_config)
        self.initialise(peft_model, ctx)
        rule.after_wrap(peft_model, ctx)
        if self.rewrites_base:
            # PEFT converts the trained adapter against this snapshot of the initial one on save.
            initial = tempfile.TemporaryDirectory(prefix="fimlora-initial-adapter-")
            peft_model.save_pretrained(initial.name)
            ctx.record[_INITIAL_ADAPTER] = initial
        return peft_model

    def save(self, model: Any, directory: Path, ctx: MethodContext) -> None:
        initial = ctx.record.pop(_INITIAL_ADAPTER, None)
        if initial is None:
            model.save_pretrained(str(directory))
            return
        try:
            with warnings.catch_warnings():
                # PEFT loads the initial adapter next to the trained one to convert it, then warns
                # that PiSSA/OLoRA should not share a model with another adapter: the conversion it
                # recommends is what this call does.
                warnings.filterwarnings(
                    "ignore", message=r"(PiSSA|OLoRA|CorDA) changes the base weights", category=UserWarning
                )
                model.save_pretrained(str(directory), path_initial_model_for_weight_conversion=initial.name)
        finally:
            initial.cleanup()
        _restore_modules_to_save(model, directory)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        with warnings.catch_warnings():
            # PEFT ≥ 0.21 checks rank_pattern keys against module names when it injects an adapter. A
            # trained AdaLoRA's rank_pattern holds ``<module>.lora_E`` masks, applied after injection, so
            # every key trips that check although the ranks are restored exactly.
            warnings.filterwarnings(
                "ignore", message=r"The following rank_pattern keys .*lora_E", category=RuntimeWarning
            )
            return PeftModel.from_pretrained(base_model, str(directory)).eval()


ADAPTER = PeftLora()


def _restore_modules_to_save(model: Any, directory: Path) -> None:
    """Put the trained task head back into a converted adapter.

    PEFT 0.21's conversion of PiSSA/OLoRA/LoRA-GA adapters to plain LoRA keeps only the LoRA tensors and
    drops ``modules_to_save`` (the classifier head), so the converted adapter would reload with a fresh,
    random head. The head needs no conversion: copy its tensors from the unconverted state dict.
    """
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    path = directory / "adapter_model.safetensors"
    saved = load_file(str(path))
    state = get_peft_model_state_dict(model)
    missing = {k: v for k, v in state.items() if "lora_" not in k and k not in saved}
    if missing:
        saved.update({k: v.detach().contiguous().cpu() for k, v in missing.items()})
        save_file(saved, str(path), metadata={"format": "pt"})


def lora_layers(peft_model: Any) -> dict[str, Any]:
    """PEFT's LoRA layers by the base model's module name (no ``base_model.model.`` prefix)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.removeprefix("base_model.model."): module
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    }
