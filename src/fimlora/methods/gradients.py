"""The gradient of the training loss with respect to frozen weights, on the calibration batches.

LoRA-GA and GoRA initialise their adapters from Ḡ = ∂L̄/∂W, where L̄ is the loss the Trainer minimises,
averaged over the whole calibration subset:

* classification: the mean cross-entropy over examples;
* causal LM: the mean next-token NLL over labelled tokens (labels ≠ -100 after the shift).

The model's own loss averages within a batch, so each batch is weighted by its number of examples (or
labelled tokens): Ḡ is the same however the subset is split into batches. The pass runs in eval mode
(dropout off), so Ḡ is a deterministic function of the weights and the data. Autograd sums a weight's
gradient over every call of its layer, so layers that run several times per forward (shared or tied
weights) are exact too. Nothing is left in ``.grad``; train/eval mode and ``requires_grad`` are
restored.

On a quantised base (bitsandbytes layers, whose packed weight cannot require a gradient) Ḡ of the
dequantised weight is summed from hooks instead, Σ over calls and positions of δ·xᵀ (δ the gradient
at the layer's output, x its input): the same quantity, exact for any input layout.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from fimlora.errors import FimloraError
from fimlora.fisher.losses import IGNORE_INDEX
from fimlora.quantization import is_quantized_linear

if TYPE_CHECKING:
    from fimlora.methods.base import MethodContext


def loss_units(labels: torch.Tensor) -> int:
    """How many terms the model's mean loss averages over: examples, or labelled next-token positions."""
    if labels.dim() >= 2:  # causal LM: position t + 1 is predicted from position t
        return int((labels[..., 1:] != IGNORE_INDEX).sum())
    return int(labels.shape[0])


def training_loss_gradient(
    model: nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], targets: Sequence[str]
) -> dict[str, torch.Tensor]:
    """Ḡ per target module: the gradient of the mean training loss over all ``batches``.

    Args:
        model: a Hugging Face model whose forward returns ``loss`` when given ``labels``.
        batches: dicts of tensors the model takes (``input_ids``, ``attention_mask``, ``labels``).
        targets: names (``named_modules()``) of linear layers whose weight gradient is wanted.

    Returns:
        ``{name: Ḡ}``, float32 tensors of the weight's shape ``(d_out, d_in)`` on the weight's device.

    Raises:
        FimloraError: if the batches hold no example or labelled token.
    """
    modules = dict(model.named_modules())
    layers = [modules[name] for name in targets]
    quantized = any(is_quantized_linear(layer) for layer in layers)
    weights = [layer.weight for layer in layers]
    shapes = [(int(layer.out_features), int(layer.in_features)) for layer in layers]  # type: ignore[arg-type]
    device = weights[0].device
    sums = [torch.zeros(shape, dtype=torch.float32, device=device) for shape in shapes]
    was_training = model.training
    flags = [(p, p.requires_grad) for p in model.parameters()]
    total = 0
    try:
        model.eval()
        model.requires_grad_(False)
        if not quantized:
            for weight in weights:
                weight.requires_grad_(True)
        with torch.enable_grad():
            for raw in batches:
                batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in raw.items()}
                units = loss_units(batch["labels"])
                if units == 0:
                    continue
                if quantized:
                    with _output_gradient_hooks(layers, sums) as leaves:
                        loss = model(**batch).loss
                        # The batch's mean loss times its size: its share of the sum over the subset.
                        torch.autograd.backward(loss.float() * units, inputs=leaves or None)
                else:
                    loss = model(**batch).loss
                    grads = torch.autograd.grad(loss.float() * units, weights, allow_unused=True)
                    for acc, grad in zip(sums, grads, strict=True):
                        if grad is not None:
                            acc += grad.float()
                total += units
    finally:
        for param, flag in flags:
            param.requires_grad_(flag)
        model.train(was_training)
    if total == 0:
        raise FimloraError("The calibration batches hold no example or labelled token to take a gradient on.")
    return {name: acc / total for name, acc in zip(targets, sums, strict=True)}


@contextmanager
def _output_gradient_hooks(layers: Sequence[nn.Module], sums: Sequence[torch.Tensor]) -> Iterator[list[Any]]:
    """While open, every call of ``layers[i]`` adds δ·xᵀ (summed over positions) to ``sums[i]`` when the
    backward pass reaches its output. Yields the leaves made of outputs that did not require a gradient
    (the first layers, every parameter being frozen): the backward pass must reach them."""
    leaves: list[Any] = []
    handles = []

    def hook_for(acc: torch.Tensor):  # type: ignore[no-untyped-def]
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor | None:
            x = args[0].detach()
            replaced = None
            if not output.requires_grad:
                replaced = output.detach().requires_grad_(True)
                leaves.append(replaced)
                output = replaced

            def receive(delta: torch.Tensor) -> None:
                acc.add_(delta.reshape(-1, delta.shape[-1]).float().T @ x.reshape(-1, x.shape[-1]).float())

            output.register_hook(receive)
            return replaced

        return hook

    try:
        for layer, acc in zip(layers, sums, strict=True):
            handles.append(layer.register_forward_hook(hook_for(acc)))
        yield leaves
    finally:
        for handle in handles:
            handle.remove()


_CACHE = "_training_loss_gradients"


def calibration_gradients(ctx: MethodContext) -> dict[str, torch.Tensor]:
    """:func:`training_loss_gradient` of the base model on the calibration subset, once per method.

    The allocation rule and the adapter of one method (GoRA's) share the result through ``ctx.record``.
    """
    if _CACHE not in ctx.record:
        if ctx.base_model is None or ctx.calibration_batches is None:
            raise RuntimeError(f"{ctx.spec.name}: the calibration gradient needs the base model and batches")
        ctx.record[_CACHE] = training_loss_gradient(ctx.base_model, ctx.calibration_batches(), ctx.targets)
    return ctx.record[_CACHE]
