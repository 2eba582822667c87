"""The Fisher trace of frozen weights, accumulated from the training step's own forward and backward pass.

A PEFT LoRA layer computes y = W x + b + s·B A dropout(x). The gradient of the loss with respect to the
frozen W would be δ xᵀ summed over tokens, with δ = ∂L/∂y: the δ of the layer's output *is* the δ of W x,
and that output requires grad in every layer (B and A train), the first one included. A forward hook on
each adapted layer keeps its input x; a tensor hook on its output receives δ during the training
backward and hands (x, δ) to :func:`fimlora.fisher.blocks.squared_norms`, the per-example ‖G_n‖_F² by
the ghost norm (or by forming G_n, whichever is cheaper). No extra forward or backward pass runs, no
weight-shaped tensor is formed, nothing touches ``.grad``, and only the examples the model trains on are
seen.

Scale. The training loss is a mean, L = (1/c) Σ_n ℓ_n, so the δ the hooks see is 1/c of the δ of
ℓ_n alone. Each batch's sum is multiplied by c², which makes the quantity the same as
``estimate_fisher(..., statistic="trace")``'s on the same examples and model:

    tr F = (1/N) Σ_n ‖∂ℓ_n/∂W‖_F²,   ℓ_n as in :mod:`fimlora.fisher.losses`

(classification: ℓ_n = cross-entropy of example n, c = the batch's examples; causal LM: ℓ_n = the sum of
sequence n's token NLLs, c = the batch's predicted tokens, ``num_items_in_batch`` when the Trainer passes
it). Each optimizer step's estimate (its examples' mean) enters a running average over steps: an
exponential moving average with bias correction (``ema``: the weights are β^(k−j)(1−β), divided by
their sum, so the first steps are not pulled towards zero) or the plain mean over steps (``mean``).

What it measures and what it does not:

* the *training-mode* Fisher: with dropout on (the model's own, and LoRA's on the adapter branch), it is
  the Fisher of the dropped-out network the optimizer actually follows, at the current adapter;
* padding is not masked out: the gradient of W really is Σ_t δ_t x_tᵀ over every position, and a padded
  position's δ is exactly zero in these models (no label, masked out of every attention), so it adds
  nothing but its share of the ghost-norm cost;
* a layer called several times in one forward adds each call's ‖G‖² separately (the cross terms between
  calls are dropped), and activation checkpointing would run the forward hooks twice: neither happens in
  the supported models (every target is called once, no checkpointing).

Device work is asynchronous: the per-module sums stay on the model's device and nothing is read back to
the host until :meth:`OnlineTrace.averaged` is called.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from fimlora.fisher import blocks
from fimlora.fisher.blocks import Tokens
from fimlora.fisher.losses import IGNORE_INDEX

AVERAGING = ("ema", "mean")
# The bound fimlora.fisher.estimator uses for every temporary block (elements), for the same reasons.
MAX_CHUNK_ELEMENTS = 2**20


def loss_normaliser(task: str) -> Callable[[Mapping[str, Any]], tuple[int, torch.Tensor | float]]:
    """What the task's training loss divides the sum of per-example losses by, from a forward's kwargs.

    Returns a function of the model's keyword arguments giving ``(examples, c)``. Classification: the
    heads' cross-entropy is a mean over the batch's examples, c = B. Causal LM: the loss is the sum of the
    token NLLs divided by ``num_items_in_batch`` when the Trainer passes it (its count of predicted
    tokens), else by the batch's own count of labels ≠ -100 after the shift.
    """
    if task not in ("classification", "causal-lm"):
        raise ValueError(f"unknown task {task!r}")

    def normaliser(kwargs: Mapping[str, Any]) -> tuple[int, torch.Tensor | float]:
        labels = kwargs.get("labels")
        ids = kwargs.get("input_ids")
        reference = labels if labels is not None else ids
        examples = int(reference.shape[0]) if reference is not None else 0
        if task == "classification":
            return examples, float(examples)
        items = kwargs.get("num_items_in_batch")
        if items is not None:
            return examples, items.to(torch.float64) if torch.is_tensor(items) else float(items)
        if labels is None:
            return examples, 0.0
        return examples, (labels[..., 1:] != IGNORE_INDEX).sum().to(torch.float64)

    return normaliser


def _output_requires_grad(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
    if torch.is_grad_enabled() and torch.is_tensor(output) and not output.requires_grad:
        output.requires_grad_(True)


class OnlineTrace:
    """Hooks on linear layers that accumulate tr F of each layer's frozen weight during training.

    ``layers`` maps a module name (as in the base model) to its PEFT ``lora.Linear``, or to the frozen
    ``nn.Linear`` itself (a LoRA layer's ``base_layer``, or a target without an adapter): the output's
    gradient is the same δ either way (a LoRA layer adds its branch out of place). A bare frozen layer's
    output needs a gradient even where nothing before it trains (the first block's attention under
    ``r_min: 0``): ``inputs_require_grad`` makes the input embeddings' output require one while the
    hooks are attached (no parameter's gradient changes; the backward only continues to the embeddings).
    ``model`` is the module the Trainer calls (a pre-hook on it reads the batch's loss normaliser and
    example count). Call :meth:`attach` before training, :meth:`end_step` after each optimizer step and
    :meth:`averaged` for the running average; :meth:`detach` removes every hook.
    """

    def __init__(
        self,
        model: nn.Module,
        layers: Mapping[str, Any],
        *,
        task: str,
        averaging: str = "ema",
        beta: float = 0.9,
        max_chunk_elements: int = MAX_CHUNK_ELEMENTS,
        inputs_require_grad: bool = False,
    ) -> None:
        if averaging not in AVERAGING:
            raise ValueError(f"averaging must be one of {AVERAGING}, got {averaging!r}")
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"beta must lie in [0, 1), got {beta}")
        self.model = model
        self.names = list(layers)
        self.layers = dict(layers)
        self.normaliser = loss_normaliser(task)
        self.averaging = averaging
        self.beta = beta
        self.max_chunk_elements = max_chunk_elements
        self.inputs_require_grad = inputs_require_grad
        device = next(iter(self.layers.values())).weight.device
        # Σ_n ‖c·G_n^observed‖² of the current optimizer step, per module (float64, on the device).
        self._step = torch.zeros(len(self.names), dtype=torch.float64, device=device)
        self._average = torch.zeros_like(self._step)
        self._weight = 0.0
        self._step_examples = 0
        self._scale: torch.Tensor | float = 1.0
        self._tokens: dict[tuple[int, int], Tokens] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        #: Optimizer steps and examples that entered the average.
        self.steps = 0
        self.examples = 0

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self) -> None:
        if self.attached:
            return
        self._handles.append(self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True))
        if self.inputs_require_grad:
            embeddings = self.model.get_input_embeddings()  # type: ignore[operator]
            self._handles.append(embeddings.register_forward_hook(_output_requires_grad))
        for index, name in enumerate(self.names):
            self._handles.append(self.layers[name].register_forward_hook(self._layer_hook(index)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _pre_hook(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not torch.is_grad_enabled():
            return
        examples, c = self.normaliser(kwargs)
        self._step_examples += examples
        self._scale = c * c

    def _layer_hook(self, index: int) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> None:
            if not (torch.is_grad_enabled() and torch.is_tensor(output) and output.requires_grad):
                return
            activation = args[0].detach()
            scale = self._scale
            output.register_hook(lambda delta: self._accumulate(index, activation, delta, scale))

        return hook

    def _accumulate(
        self, index: int, activation: torch.Tensor, delta: torch.Tensor, scale: torch.Tensor | float
    ) -> None:
        batch = activation.shape[0]
        a = activation.reshape(batch, -1, activation.shape[-1])
        d = delta.detach().reshape(batch, -1, delta.shape[-1])
        key = (batch, a.shape[1])
        tokens = self._tokens.get(key)
        if tokens is None:
            tokens = self._tokens[key] = Tokens.from_mask(None, batch, a.shape[1])
        # narrow + add_: one in-place kernel (``_step[index] +=`` would add, then copy back).
        self._step.narrow(0, index, 1).add_(
            blocks.squared_norms(a, d, tokens, self.max_chunk_elements) * scale
        )

    def end_step(self) -> None:
        """Fold the optimizer step's examples into the running average (call once per step)."""
        if self._step_examples == 0:
            return
        estimate = self._step / self._step_examples
        if self.averaging == "ema":
            self._average.mul_(self.beta).add_(estimate, alpha=1.0 - self.beta)
            self._weight = self.beta * self._weight + (1.0 - self.beta)
        else:
            self._average.add_(estimate)
            self._weight += 1.0
        self.steps += 1
        self.examples += self._step_examples
        self._step.zero_()
        self._step_examples = 0

    def averaged(self) -> dict[str, float]:
        """The running average of tr F per module (0.0 everywhere before the first step)."""
        if self._weight == 0.0:
            return dict.fromkeys(self.names, 0.0)
        values = (self._average / self._weight).tolist()
        return dict(zip(self.names, values, strict=True))
