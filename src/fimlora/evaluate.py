"""Held-out metrics: accuracy, macro-F1 and per-class results for classification, perplexity for causal
LM (dropout off)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import confusion_matrix, f1_score, precision_recall_fscore_support
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fimlora.errors import FimloraError
from fimlora.fisher.losses import IGNORE_INDEX, CausalLMHead


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    task: str,
    *,
    batch_size: int = 64,
    progress: bool = True,
    label_names: list[str] | None = None,
) -> dict[str, Any]:
    """Classification: ``loss`` (mean cross-entropy), ``accuracy``, ``macro_f1``, ``majority_rate`` (the
    share of the split's most frequent true class: the accuracy of always predicting it),
    ``num_examples``, and ``classes`` (see :func:`class_report`; ``label_names`` name the ids 0..K-1).
    Causal LM: ``loss`` (mean NLL per predicted token, nats) and ``perplexity`` = exp(loss)."""
    if len(dataset) == 0:
        raise FimloraError("The evaluation split is empty.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    # Metrics do not depend on order; batching examples of similar length wastes far less on padding.
    lengths = np.array([len(ids) for ids in dataset["input_ids"][:]])  # [:] reads the column at once
    ordered = dataset.select(np.argsort(lengths, kind="stable"))
    loader = DataLoader(ordered, batch_size=batch_size, shuffle=False, collate_fn=collator)
    total_loss, total_count = 0.0, 0
    predictions: list[np.ndarray] = []
    references: list[np.ndarray] = []
    # A causal LM's head runs on chunks of tokens: the batch's B·T·V logits are never held at once.
    lm_head = CausalLMHead.of(model) if task != "classification" else None
    for batch in tqdm(loader, desc="Evaluating", unit="batch", disable=not progress, leave=False):
        batch = {k: v.to(device) for k, v in batch.items()}
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        labels = batch["labels"]
        if lm_head is not None:
            with lm_head.hidden_states():
                hidden = model(**inputs).logits
            nll, count = lm_head.token_nll(hidden, labels)
            total_loss += float(nll.sum())
            total_count += count
            continue
        logits = model(**inputs).logits.float()
        if task == "classification":
            total_loss += float(F.cross_entropy(logits, labels, reduction="sum"))
            total_count += int(labels.numel())
            predictions.append(logits.argmax(dim=-1).cpu().numpy())
            references.append(labels.cpu().numpy())
        else:
            targets = labels[:, 1:]
            total_loss += float(
                F.cross_entropy(
                    logits[:, :-1].reshape(-1, logits.shape[-1]),
                    targets.reshape(-1),
                    ignore_index=IGNORE_INDEX,
                    reduction="sum",
                )
            )
            total_count += int((targets != IGNORE_INDEX).sum())
    model.train(was_training)
    loss = total_loss / max(total_count, 1)
    if not math.isfinite(loss):
        raise FimloraError("The evaluation loss is not finite; the trained model diverged.")
    if task == "classification":
        y_pred, y_true = np.concatenate(predictions), np.concatenate(references)
        names = label_names or [str(i) for i in range(int(logits.shape[-1]))]
        return {
            "loss": loss,
            "accuracy": float((y_pred == y_true).mean()),
            "macro_f1": float(f1_score(y_true, y_pred, average="macro")),
            "majority_rate": float(np.bincount(y_true).max() / len(y_true)),
            "num_examples": len(y_true),
            "classes": class_report(y_true, y_pred, names),
        }
    return {"loss": loss, "perplexity": math.exp(loss), "num_tokens": total_count}


def class_report(y_true: np.ndarray, y_pred: np.ndarray, label_names: list[str]) -> dict[str, Any]:
    """Per-class results over classes ``0..K-1`` (K = ``len(label_names)``), lists in class-id order.

    ``precision[k]`` = correct k predictions / k predictions (0 when k is never predicted, see
    ``predicted``), ``recall[k]`` = correct k predictions / true k examples (0 without any), ``support[k]``
    = true k examples, ``predicted[k]`` = k predictions, ``confusion_matrix[i][j]`` = examples of true
    class i predicted as j (rows: true, columns: predicted).
    """
    ids = list(range(len(label_names)))
    precision, recall, _, support = precision_recall_fscore_support(
        y_true, y_pred, labels=ids, average=None, zero_division=0
    )
    matrix = confusion_matrix(y_true, y_pred, labels=ids)
    return {
        "labels": list(label_names),
        "precision": [float(v) for v in precision],
        "recall": [float(v) for v in recall],
        "support": [int(v) for v in support],
        "predicted": [int(v) for v in matrix.sum(axis=0)],
        "confusion_matrix": matrix.astype(int).tolist(),
    }
