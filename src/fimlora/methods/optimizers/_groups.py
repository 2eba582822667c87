"""The Trainer's weight-decay grouping, for optimizers fimlora builds itself (LoRA+, LoRA-FA, Riemannian).

The Trainer's own AdamW decays every parameter except biases and normalisation weights
(``Trainer.get_decay_parameter_names``). An optimizer built elsewhere and handed to the Trainer skips
that rule, so a method would differ from LoRA in its weight decay as well as in what it is meant to
change. :func:`split_weight_decay` re-applies the Trainer's rule to such an optimizer.
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import Trainer, TrainingArguments

#: The Trainer's AdamW defaults (``TrainingArguments``), for optimizers that would use others.
TRAINER_ADAM_EPS: float = TrainingArguments.adam_epsilon
TRAINER_ADAM_BETAS: tuple[float, float] = (TrainingArguments.adam_beta1, TrainingArguments.adam_beta2)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters the Trainer's AdamW decays: all but biases and normalisation weights.

    transformers' own rule, called rather than copied so both stay in step (it reads no Trainer state;
    a test compares the result with the groups a real Trainer builds).
    """
    return set(Trainer.get_decay_parameter_names(cast(Trainer, None), model))


def split_weight_decay(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    weight_decay: float,
    *,
    aligned: tuple[str, ...] = (),
    **overrides: Any,
) -> torch.optim.Optimizer:
    """Split each param group of a fresh ``optimizer`` (no state yet) by the Trainer's rule, in place.

    Every group keeps its other settings (learning rate, …) and becomes one group at ``weight_decay``
    (the parameters the Trainer decays) and one at 0.0 (the rest); empty groups are dropped.
    ``aligned`` names per-parameter lists kept in step with ``params`` (LoRA-FA's ``names`` and
    ``scaling_factors``); ``overrides`` are set on every group (e.g. ``eps``). Returns ``optimizer``.
    """
    if optimizer.state:
        raise RuntimeError("split_weight_decay must run before the optimizer's first step.")
    decayed = decay_parameter_names(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for group in optimizer.param_groups:
        for decay in (True, False):
            keep = [i for i, p in enumerate(group["params"]) if (names.get(id(p)) in decayed) == decay]
            if not keep:
                continue
            new = {k: v for k, v in group.items() if k != "params" and k not in aligned}
            new["params"] = [group["params"][i] for i in keep]
            new.update({key: [group[key][i] for i in keep] for key in aligned})
            new["weight_decay"] = weight_decay if decay else 0.0
            new.update(overrides)
            groups.append(new)
    optimizer.param_groups = groups
    return optimizer
