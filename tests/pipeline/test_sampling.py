"""``train.sampling: group_by_length``: an epoch still sees every example once, in batches of similar
length, so far fewer padded tokens than random batches; the same seed gives the same batches. The
default stays random batches, and adding the field renamed no run (tests/sweep/test_committed_study.py)."""

from __future__ import annotations

import random
from typing import Any

import torch
from datasets import Dataset
from tiny_models import make_tiny_bert

from fimlora.config import TrainSettings
from fimlora.train import train

EXAMPLES, BATCH = 64, 4


def dataset() -> Dataset:
    rng = random.Random(0)
    lengths = [rng.randint(3, 40) for _ in range(EXAMPLES)]
    return Dataset.from_dict(
        {
            "idx": list(range(EXAMPLES)),
            "input_ids": [[1 + (i + t) % 50 for t in range(n)] for i, n in enumerate(lengths)],
            "labels": [i % 2 for i in range(EXAMPLES)],
        }
    )


class RecordingCollator:
    """Pads a batch like a tokenizer's collator would, and records which examples it held."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.padded_tokens = 0

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        self.batches.append([f["idx"] for f in features])
        width = max(len(f["input_ids"]) for f in features)
        self.padded_tokens += sum(width - len(f["input_ids"]) for f in features)
        ids = torch.zeros(len(features), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, f in enumerate(features):
            ids[row, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
            mask[row, : len(f["input_ids"])] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": torch.tensor([f["labels"] for f in features]),
        }


def one_epoch(sampling: str, work) -> RecordingCollator:
    collator = RecordingCollator()
    settings = TrainSettings(
        steps=EXAMPLES // BATCH, batch_size=BATCH, max_length=64, sampling=sampling, report_to=[]
    )
    train(
        make_tiny_bert(num_labels=2),
        dataset(),
        collator,
        settings,
        seed=0,
        work_dir=work,
        metrics_path=work / f"{sampling}.jsonl",
        progress=False,
    )
    return collator


def test_grouped_batches_see_every_example_once_with_far_less_padding(tmp_path):
    grouped = one_epoch("group_by_length", tmp_path)
    shuffled = one_epoch("random", tmp_path)
    for run in (grouped, shuffled):
        assert len(run.batches) == EXAMPLES // BATCH
        assert sorted(i for batch in run.batches for i in batch) == list(range(EXAMPLES))
    assert grouped.padded_tokens < 0.5 * shuffled.padded_tokens, (
        grouped.padded_tokens,
        shuffled.padded_tokens,
    )
    assert one_epoch("group_by_length", tmp_path).batches == grouped.batches  # seeded


def test_random_sampling_is_the_default():
    assert TrainSettings().sampling == "random"
