"""Tiny local model and dataset for sweep tests, and a helper that writes sweep specs."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
import yaml
from tiny_models import make_tiny_bert
from transformers import BertTokenizerFast

from fimlora.config import TrainSettings

WORDS = {"pos": ["great", "wonderful", "funny"], "neg": ["dull", "awful", "boring"]}
FILLER = ["the", "film", "plot", "acting", "story", "was", "really", "quite"]


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide BERT backbone with a 20-word WordPiece tokenizer, saved as a local checkpoint.

    The tiny vocabulary matters for speed: ``datasets`` fingerprints each tokenization by pickling the
    tokenizer, seconds per split for a 30k-word one.
    """
    directory = tmp_path_factory.mktemp("tiny-bert")
    vocab = directory / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(specials + FILLER + WORDS["pos"] + WORDS["neg"]) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    make_tiny_bert(num_labels=2).bert.save_pretrained(directory)  # backbone only: the head is new
    return directory


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    """80 short labelled snippets (8 land in the test split)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for _ in range(80):
            label = rng.choice(["pos", "neg"])
            words = [*rng.sample(FILLER, 4), rng.choice(WORDS[label])]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path


@pytest.fixture(scope="session")
def defaults() -> dict:
    """Experiment defaults (all but model and dataset) for runs of a second or two. Do not modify."""
    train = {"steps": 2, "batch_size": 8, "max_length": 16, "eval_batch_size": 16}
    if "report_to" in TrainSettings.model_fields:
        train["report_to"] = []  # no TensorBoard writer in tests
    return {
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "fisher": {"num_examples": 8, "batch_size": 8},
        "train": train,
    }


@pytest.fixture
def write_spec(tmp_path):
    """``write_spec(grid, **top_level)`` → path of a spec in ``tmp_path`` (runs land in tmp_path/runs)."""

    def write(grid: dict, name: str = "tiny", filename: str = "sweep.yaml", **top) -> Path:
        path = tmp_path / filename
        path.write_text(
            yaml.safe_dump({"name": name, **top, "grid": grid}, sort_keys=False), encoding="utf-8"
        )
        return path

    return write
