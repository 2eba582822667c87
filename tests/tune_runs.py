"""Tuning fixtures: tiny model, a dataset directory with its own splits (and an unreadable test file)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tiny_runs import write_small_bert, write_small_reviews

# Bytes no CSV reader accepts: loading this split fails loudly, so a tuning that succeeds never read it.
POISON = b"\x00\xff\xfe not a csv \x00"


@pytest.fixture(scope="session")
def small_bert_dir(tmp_path_factory) -> Path:
    return write_small_bert(tmp_path_factory.mktemp("small-bert"))


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory) -> Path:
    """train.csv (96 rows) and validation.csv (32) of their own, and a test.csv that cannot be read."""
    directory = tmp_path_factory.mktemp("reviews")
    write_small_reviews(directory / "train.csv", 96, seed=0)
    write_small_reviews(directory / "validation.csv", 32, seed=1)
    (directory / "test.csv").write_bytes(POISON)
    return directory


@pytest.fixture(scope="session")
def readable_split_dir(tmp_path_factory) -> Path:
    """The same train and validation splits, with a readable test split (for the final runs)."""
    directory = tmp_path_factory.mktemp("reviews-final")
    write_small_reviews(directory / "train.csv", 96, seed=0)
    write_small_reviews(directory / "validation.csv", 32, seed=1)
    write_small_reviews(directory / "test.csv", 32, seed=2)
    return directory


def defaults(**train) -> dict:
    """Experiment defaults for runs of a second or two."""
    return {
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "fisher": {"num_examples": 8, "batch_size": 8},
        "train": {
            "steps": 6,
            "batch_size": 8,
            "max_length": 16,
            "eval_batch_size": 32,
            "report_to": [],
            **train,
        },
    }


def lora_grid(model, data) -> dict:
    """A grid of one cell: uniform LoRA at rank 2, seed 0, on ``model`` and ``data``."""
    return {
        "model": [str(model)],
        "dataset": [str(data)],
        "method": ["lora"],
        "budget": [{"uniform_rank": 2}],
        "seed": [0],
    }


def write_spec(directory: Path, grid: dict, tune: dict | None, name: str = "tiny", **extra) -> Path:
    spec = {"name": name, "output_dir": "store", "defaults": defaults(), "grid": grid, **extra}
    if tune is not None:
        spec["tune"] = tune
    path = directory / "spec.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False), encoding="utf-8")
    return path


def tuned_file(path, cells):
    """A tuned.yaml of ``cells`` (see :func:`cell`), as `fimlora tune` writes it."""
    document = {
        "name": "tiny",
        "split": "validation",
        "seed": 0,
        "trials_per_study": 4,
        "storage": "sqlite:///x",
        "cells": cells,
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False), encoding="utf-8")
    return path


def cell(method, params, trials=(3, 1, 0), model="some/model", dataset="movie-reviews"):
    """One tuned.yaml entry at budget r2 (``params`` None: no trial completed)."""
    return {
        "model": model,
        "dataset": dataset,
        "method": method,
        "budget": {"uniform_rank": 2},
        "params": params,
        "metric": "accuracy",
        "validation_score": 0.8 if params else None,
        "trials": dict(zip(("complete", "pruned", "failed"), trials, strict=True)),
    }
