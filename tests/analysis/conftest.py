"""The shared tiny saved BERT (MiniLM's real tokenizer, config-built weights) and a small sentiment CSV."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from tiny_runs import tiny_bert_dir

__all__ = ["reviews_csv", "tiny_bert_dir"]

WORDS = ["the", "film", "plot", "acting", "was", "quite", "great", "dull", "funny", "boring", "and", "ending"]


@pytest.fixture(scope="session")
def reviews_csv(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("calibration-data") / "reviews.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["review", "sentiment"])
        for _ in range(120):
            writer.writerow([" ".join(rng.choices(WORDS, k=8)), rng.choice(["pos", "neg"])])
    return path
