"""Fit a classification head on frozen features (``fisher.head: probe``), before any method starts.

A checkpoint without a task head gets a randomly initialised one, and every gradient-based score
(Fisher, gradnorm, spectral, LoRA-GA) back-propagated through it measures a random readout. The probe
fits the head first, with the body frozen, and the fitted head becomes every method's starting head.

How: with the body frozen and in eval mode (dropout off) the head's inputs do not depend on the head,
so one forward pass over ``num_examples`` training rows caches them (a forward hook on the head
module), and the head is then fitted on the cache by full-batch L-BFGS on

    mean_n CE(head(x_n), y_n) + (l2 / 2) · Σ ‖W‖²_F        (W: the head's weight matrices, not biases),

which for a single ``Linear`` head is L2-regularised multinomial logistic regression (convex: one
optimum, whatever the seeded start), and for a deeper head (RoBERTa's dense → tanh → out_proj) the
same objective trained from the seeded init. It is exactly head-only training through the frozen
model, without re-running the body at every step. Deterministic: the rows are a seeded subset of the
training split (never validation or test), L-BFGS is deterministic on a fixed batch.

Heads: the module producing the model's logits. A head whose output is already per example (BERT's
``classifier``, RoBERTa's two-layer head) is used as is; a per-token ``Linear`` head whose logits the
model pools at the last non-pad token (Llama's and other decoders' ``score``) is fitted on the hidden
states at those positions. Each batch of the capture pass checks that the head's cached output
reproduces the model's logits, so a head pooled some other way is refused, not silently mis-fitted.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from fimlora.data import calibration_subset
from fimlora.errors import FimloraError


@dataclass(frozen=True)
class ProbeRecord:
    """What the probe did, for ``result.json``: accuracy and mean cross-entropy on its training rows
    before (the seeded random head) and after the fit."""

    module: str
    num_examples: int
    max_iter: int
    l2: float
    train_accuracy_before: float
    train_accuracy_after: float
    train_loss_before: float
    train_loss_after: float
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class _Chunk:
    args: tuple[torch.Tensor, ...]
    kwargs: dict[str, Any]
    labels: torch.Tensor


def fit_head_probe(
    model: nn.Module,
    head_name: str,
    train: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    num_examples: int,
    max_iter: int,
    l2: float,
    seed: int,
    batch_size: int = 32,
) -> ProbeRecord:
    """Fit ``model``'s head module ``head_name`` in place on frozen features of ``train`` rows.

    ``train``: the tokenized training split (rows with ``labels``); ``num_examples`` of its rows are
    drawn with ``seed``. Only the head's parameters change; every ``requires_grad`` flag and the
    model's train/eval mode are restored.
    """
    started = time.perf_counter()
    try:
        head = model.get_submodule(head_name)
    except AttributeError:
        raise FimloraError(f"fisher.head: probe: the model has no head module {head_name!r}.") from None
    params = [p for p in head.parameters() if p.is_floating_point()]
    if not params:
        raise FimloraError(f"fisher.head: probe: the head {head_name!r} has no parameters to fit.")
    subset = calibration_subset(train, num_examples, seed=seed)
    loader = DataLoader(subset, batch_size=batch_size, collate_fn=collator)
    was_training = model.training
    flags = [p.requires_grad for p in params]
    model.eval()
    try:
        chunks = _capture(model, head, head_name, loader)
        labels = torch.cat([c.labels for c in chunks])
        loss_before, acc_before = _evaluate(head, chunks, labels)
        for p in params:
            p.requires_grad_(True)
        _fit(head, chunks, labels, params, max_iter=max_iter, l2=l2)
        loss_after, acc_after = _evaluate(head, chunks, labels)
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        model.train(was_training)
    return ProbeRecord(
        module=head_name,
        num_examples=len(subset),
        max_iter=max_iter,
        l2=l2,
        train_accuracy_before=acc_before,
        train_accuracy_after=acc_after,
        train_loss_before=loss_before,
        train_loss_after=loss_after,
        seconds=round(time.perf_counter() - started, 3),
    )


@torch.no_grad()
def _capture(model: nn.Module, head: nn.Module, head_name: str, loader: DataLoader) -> list[_Chunk]:
    """One forward pass: the head's inputs per batch, checked to reproduce the model's logits."""
    seen: dict[str, Any] = {}

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        seen["args"], seen["kwargs"], seen["output"] = args, kwargs, output
        seen["calls"] = seen.get("calls", 0) + 1

    device = next(model.parameters()).device
    handle = head.register_forward_hook(hook, with_kwargs=True)
    chunks: list[_Chunk] = []
    try:
        for batch in loader:
            seen.clear()
            inputs = {k: v.to(device) for k, v in batch.items() if k != "labels"}
            logits = model(**inputs).logits
            if seen.get("calls") != 1 or not isinstance(seen["output"], torch.Tensor):
                raise FimloraError(
                    f"fisher.head: probe needs a head module called once per forward pass that returns the "
                    f"logits; {head_name!r} was called {seen.get('calls', 0)} time(s)."
                )
            args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in seen["args"])
            chunk = _Chunk(args=args, kwargs=dict(seen["kwargs"]), labels=batch["labels"].to(device))
            output = seen["output"]
            if output.dim() == 3 and isinstance(head, nn.Linear) and len(args) == 1:
                # A per-token head: the model pools its logits at one position per example.
                chunk = _pool_per_token(chunk, inputs["input_ids"], model, head_name)
                output = head(*chunk.args)
            if output.shape != logits.shape or not torch.allclose(output, logits, rtol=1e-4, atol=1e-5):
                raise FimloraError(
                    f"fisher.head: probe cannot reproduce the model's logits from the head {head_name!r} "
                    f"(its output has shape {tuple(seen['output'].shape)}, the logits "
                    f"{tuple(logits.shape)}); use fisher.head: random for this model."
                )
            chunks.append(chunk)
    finally:
        handle.remove()
    return _merged(chunks)


def _merged(chunks: list[_Chunk]) -> list[_Chunk]:
    """One chunk when every batch gave one per-example feature matrix (the usual case): each L-BFGS
    evaluation is then one matmul instead of a Python loop over batches."""
    shapes = {tuple(c.args[0].shape[1:]) if len(c.args) == 1 else None for c in chunks}
    if len(shapes) != 1 or None in shapes or any(c.kwargs for c in chunks):
        return chunks
    return [
        _Chunk(
            args=(torch.cat([c.args[0] for c in chunks]),),
            kwargs={},
            labels=torch.cat([c.labels for c in chunks]),
        )
    ]


def _pool_per_token(chunk: _Chunk, input_ids: torch.Tensor, model: nn.Module, head_name: str) -> _Chunk:
    """Keep each example's hidden state at transformers' pooled position: the rightmost non-pad token
    (``*ForSequenceClassification`` of decoder models); the caller checks it against the logits."""
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if config is not None else None
    pad_id = getattr(text_config, "pad_token_id", None)
    if pad_id is None:
        raise FimloraError(
            f"fisher.head: probe: the model has no pad_token_id, so the position its head {head_name!r} "
            "pools at is unknown; use fisher.head: random."
        )
    positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
    last = (positions * (input_ids != pad_id)).argmax(-1)
    hidden = chunk.args[0]
    pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return _Chunk(args=(pooled,), kwargs=chunk.kwargs, labels=chunk.labels)


def _objective(head: nn.Module, chunks: list[_Chunk], count: int) -> tuple[torch.Tensor, int]:
    """Σ_n CE_n / count over every chunk, and the number of correct predictions."""
    total = torch.zeros((), device=chunks[0].labels.device)
    correct = 0
    for chunk in chunks:
        logits = head(*chunk.args, **chunk.kwargs)
        total = total + nn.functional.cross_entropy(logits.float(), chunk.labels, reduction="sum") / count
        correct += int((logits.argmax(-1) == chunk.labels).sum())
    return total, correct


@torch.no_grad()
def _evaluate(head: nn.Module, chunks: list[_Chunk], labels: torch.Tensor) -> tuple[float, float]:
    loss, correct = _objective(head, chunks, len(labels))
    return float(loss), correct / len(labels)


def _fit(
    head: nn.Module,
    chunks: list[_Chunk],
    labels: torch.Tensor,
    params: list[nn.Parameter],
    *,
    max_iter: int,
    l2: float,
) -> None:
    weights = [p for p in params if p.dim() >= 2]
    optimizer = torch.optim.LBFGS(
        params, lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss, _ = _objective(head, chunks, len(labels))
        loss = loss + 0.5 * l2 * sum((w.float() ** 2).sum() for w in weights)
        if not torch.isfinite(loss):
            raise FimloraError(
                "fisher.head: probe: the head's loss became non-finite; raise fisher.probe.l2."
            )
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    for p in params:
        p.grad = None
