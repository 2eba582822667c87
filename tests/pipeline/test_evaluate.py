"""Classification metrics by hand: a model that never predicts one class cannot hide behind accuracy."""

from __future__ import annotations

from types import SimpleNamespace

import datasets
import pytest
import torch
from torch import nn

from fimlora.data.tokenize import make_collator
from fimlora.evaluate import evaluate


class _Fixed(nn.Module):
    """Predicts the class written in each example's first token (ids 1..3 → classes 0..2)."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask):
        logits = torch.nn.functional.one_hot(input_ids[:, 0] - 1, 3).float() * 5 + self.dummy
        return SimpleNamespace(logits=logits)


def test_majority_rate_per_class_results_and_confusion_matrix():
    # True labels 0,0,0,0,1,1,2,2 (majority: class 0, 4 of 8); class 1 is never predicted.
    truth = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 0, 2, 0, 2, 2, 2]
    data = datasets.Dataset.from_dict(
        {
            "input_ids": [[p + 1, 9] for p in predicted],
            "attention_mask": [[1, 1]] * 8,
            "labels": truth,
        }
    )
    collator = make_collator(SimpleNamespace(pad_token_id=0, eos_token_id=None), "classification")
    metrics = evaluate(
        _Fixed(), data, collator, "classification", batch_size=3, progress=False, label_names=["a", "b", "c"]
    )
    assert metrics["accuracy"] == pytest.approx(5 / 8)
    assert metrics["majority_rate"] == pytest.approx(4 / 8)
    classes = metrics["classes"]
    assert classes["labels"] == ["a", "b", "c"]
    assert classes["confusion_matrix"] == [[3, 0, 1], [1, 0, 1], [0, 0, 2]]
    assert classes["support"] == [4, 2, 2] and classes["predicted"] == [4, 0, 4]
    assert classes["recall"] == pytest.approx([3 / 4, 0.0, 1.0])
    assert classes["precision"] == pytest.approx([3 / 4, 0.0, 2 / 4])
