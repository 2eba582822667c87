"""Tiny local model and dataset for sweep tests, and a helper that writes sweep specs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_runs import write_small_bert, write_small_reviews

from fimlora.config import TrainSettings


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer, 16-wide BERT backbone with a 20-word WordPiece tokenizer, saved as a local checkpoint.

    The tiny vocabulary matters for speed: ``datasets`` fingerprints each tokenization by pickling the
    tokenizer, seconds per split for a 30k-word one.
    """
    return write_small_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    """80 short labelled snippets (8 land in the test split)."""
    return write_small_reviews(tmp_path_factory.mktemp("data") / "reviews.csv", 80)


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
