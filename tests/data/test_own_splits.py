"""Datasets that bring their own splits (a directory or a split → file mapping), and sealed splits: a
split a run may not see is never opened, and touching it raises."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from fimlora.config import parse_config
from fimlora.data import load_task_data, tokenize_task_data
from fimlora.errors import FimloraError

COLUMNS = {"text_column": "review", "label_column": "sentiment"}
POISON = b"\x00\xff\xfe not a csv \x00"


def write_csv(path: Path, n: int, offset: int = 0) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(offset, offset + n):
            writer.writerow(
                [f"snippet number {i} " + ("good" if i % 2 else "bad"), "pos" if i % 2 else "neg"]
            )
    return path


@pytest.fixture
def own_splits(tmp_path) -> Path:
    write_csv(tmp_path / "train.csv", 40)
    write_csv(tmp_path / "dev.csv", 12, offset=100)  # "dev" means validation
    write_csv(tmp_path / "test.csv", 9, offset=200)
    (tmp_path / "README.md").write_text("other files are ignored\n", encoding="utf-8")
    return tmp_path


def texts(data, split) -> list[str]:
    return list(data.splits[split]["text"][:])


def test_a_directory_with_its_own_splits_is_used_as_is(own_splits):
    data = load_task_data(str(own_splits), **COLUMNS)
    assert {s: len(data.splits[s]) for s in ("train", "validation", "test")} == {
        "train": 40,
        "validation": 12,
        "test": 9,
    }  # nothing carved
    assert texts(data, "validation")[0] == "snippet number 100 bad"
    assert data.label_names == ["neg", "pos"]


def test_a_mapping_of_split_files_carves_only_what_is_missing(own_splits):
    mapping = {"train": str(own_splits / "train.csv"), "val": str(own_splits / "dev.csv")}
    data = load_task_data(mapping, **COLUMNS)
    assert len(data.splits["validation"]) == 12
    assert len(data.splits["train"]) + len(data.splits["test"]) == 40  # test carved from train
    assert data.name == f"train={own_splits / 'train.csv'},validation={own_splits / 'dev.csv'}"


def test_a_sealed_split_file_is_never_opened_and_reading_the_split_raises(own_splits):
    (own_splits / "test.csv").write_bytes(POISON)
    with pytest.raises(FimloraError, match=r"test\.csv.* is not UTF-8 text"):
        load_task_data(str(own_splits), **COLUMNS)  # the poison is real
    data = load_task_data(str(own_splits), **COLUMNS, splits=("train", "validation"))
    assert sorted(data.splits) == ["train", "validation"] and data.sealed == {"test"}
    with pytest.raises(FimloraError, match="test split is sealed"):
        data.splits["test"]

    class Tokenizer:  # the smallest tokenizer tokenize_task_data needs
        model_max_length = 512

        def __call__(self, texts, truncation, max_length, verbose):
            ids = [[len(t)] for t in texts]
            return {"input_ids": ids, "attention_mask": [[1] for _ in texts]}

    tokenized = tokenize_task_data(data, Tokenizer(), max_length=8)
    assert sorted(tokenized) == ["train", "validation"]
    with pytest.raises(FimloraError, match="test split is sealed"):
        tokenized["test"]


@pytest.mark.parametrize("test_file", [True, False])
def test_train_and_validation_do_not_depend_on_whether_test_is_loaded(tmp_path, test_file):
    write_csv(tmp_path / "train.csv", 50)
    if test_file:
        write_csv(tmp_path / "test.csv", 10, offset=300)
    # No validation file: it is carved from train, with the same rows whether test is sealed or not.
    full = load_task_data(str(tmp_path), seed=3, **COLUMNS)
    sealed = load_task_data(str(tmp_path), seed=3, **COLUMNS, splits=["train", "validation"])
    for split in ("train", "validation"):
        assert texts(full, split) == texts(sealed, split)
    for name in ("movie-reviews",):
        full_builtin = load_task_data(name, seed=1)
        sealed_builtin = load_task_data(name, seed=1, splits=["train", "validation"])
        assert texts(full_builtin, "validation") == texts(sealed_builtin, "validation")
        assert sealed_builtin.sealed == {"test"}


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"validation.csv": 5}, "has no train file"),
        ({"train.csv": 5, "train.jsonl": 5}, "two train files"),
        ({"train.csv": 5, "validation.jsonl": 5}, "mixes file formats"),
    ],
)
def test_bad_split_directories_are_refused(tmp_path, files, message):
    for name, n in files.items():
        if name.endswith(".csv"):
            write_csv(tmp_path / name, n)
        else:
            (tmp_path / name).write_text(
                "\n".join(json.dumps({"review": f"r {i}", "sentiment": "pos"}) for i in range(n)),
                encoding="utf-8",
            )
    with pytest.raises(FimloraError, match=message):
        load_task_data(str(tmp_path), **COLUMNS)


def test_split_mappings_in_configs_are_validated(own_splits):
    config = parse_config({"model": "m", "dataset": {"train": "a.csv", "test": "b.csv"}, "methods": ["lora"]})
    assert config.dataset_label == "train=a.csv,test=b.csv"
    with pytest.raises(FimloraError, match="dataset mapping key 'holdout' is not a split"):
        parse_config({"model": "m", "dataset": {"train": "a.csv", "holdout": "b.csv"}})
    with pytest.raises(FimloraError, match="needs a train file"):
        parse_config({"model": "m", "dataset": {"validation": "a.csv"}})
    with pytest.raises(FimloraError, match="must include train"):
        load_task_data(str(own_splits), **COLUMNS, splits=["validation"])


def test_the_evaluation_split_defaults_to_validation():
    config = parse_config({"model": "m", "dataset": "movie-reviews"})
    assert config.train.eval_split == "validation"
