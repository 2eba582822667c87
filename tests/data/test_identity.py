"""What the data is, by content: file digests (only of the splits that may be loaded), built-in versions;
cross-split duplicates counted and dropped on request; a non-UTF-8 file named; swapped text/label
columns named literally ``text`` and ``label`` told apart; the share of examples truncation cut."""

from __future__ import annotations

import csv
import hashlib
import logging
import shutil
from pathlib import Path

import datasets
import pytest

import fimlora.data.identity as identity_module
from fimlora.data import TaskData, data_changes, data_identity, load_task_data
from fimlora.data.files import check_utf8
from fimlora.data.identity import DataIdentity
from fimlora.data.tokenize import tokenize_splits, truncation_warning
from fimlora.errors import FimloraError


def write_rows(
    path: Path, rows: list[tuple[str, str]], header: tuple[str, str] = ("review", "sentiment")
) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def rows(n: int, offset: int = 0) -> list[tuple[str, str]]:
    return [(f"snippet number {i} " + ("good" if i % 2 else "bad"), "pos" if i % 2 else "neg") for i in
            range(offset, offset + n)]  # fmt: skip


COLUMNS = {"text_column": "review", "label_column": "sentiment"}


# --------------------------------------------------------------------------------------------------
# Identity


def test_a_file_is_identified_by_its_bytes_not_its_path(tmp_path):
    a = write_rows(tmp_path / "a.csv", rows(30))
    moved = Path(shutil.copy(a, tmp_path / "moved.csv"))
    first = data_identity(str(a))
    assert first.fingerprint() == data_identity(str(moved)).fingerprint()  # same bytes elsewhere
    assert first.files[0].sha256 == hashlib.sha256(a.read_bytes()).hexdigest()
    record = first.record()
    assert record["files"][0]["path"] == str(a) and record["files"][0]["bytes"] == a.stat().st_size
    assert DataIdentity.from_record(record) == first
    # One character edited in place: another identity, and what changed names the file.
    a.write_text(a.read_text(encoding="utf-8").replace("number 3 ", "number 3!"), encoding="utf-8")
    edited = data_identity(str(a))
    assert edited.fingerprint() != first.fingerprint()
    change = data_changes({"identity": record}, edited)
    assert change is not None and str(a) in change and "changed" in change
    assert data_changes({"identity": edited.record()}, edited) is None


def test_split_files_count_only_the_splits_that_may_be_loaded(tmp_path, monkeypatch):
    train = write_rows(tmp_path / "train.csv", rows(20))
    write_rows(tmp_path / "validation.csv", rows(6, offset=100))
    test = write_rows(tmp_path / "test.csv", rows(6, offset=200))
    hashed: list[str] = []
    real = identity_module.sha256_file
    monkeypatch.setattr(identity_module, "sha256_file", lambda p: hashed.append(Path(p).name) or real(p))
    tuning = data_identity(str(tmp_path), splits=("train", "validation"))
    assert sorted(hashed) == ["train.csv", "validation.csv"]  # the sealed test file is never read
    everything = data_identity(str(tmp_path))
    test.write_text("review,sentiment\nchanged,pos\n", encoding="utf-8")
    assert data_identity(str(tmp_path), splits=("train", "validation")) == tuning
    assert data_identity(str(tmp_path)).fingerprint() != everything.fingerprint()
    mapping = {"train": str(train), "test": str(test)}
    assert [f.split for f in data_identity(mapping).files] == ["train", "test"]


def test_builtin_datasets_are_identified_by_their_registered_version():
    movies = data_identity("movie-reviews")
    assert movies.source == "builtin" and movies.revision == "vader-3.3.2"
    assert data_identity("brown-fiction").revision == "brown-1.9.80"
    assert data_identity("some-org/some-hub-set", hub_config="en").fingerprint() == {
        "source": "hub",
        "name": "some-org/some-hub-set",
        "revision": "en",
    }


def test_a_run_that_recorded_no_data_is_trusted_for_builtins_only(tmp_path):
    csv_file = write_rows(tmp_path / "a.csv", rows(12))
    assert data_changes(None, data_identity("movie-reviews")) is None
    refusal = data_changes({}, data_identity(str(csv_file)))
    assert refusal is not None and str(csv_file) in refusal and "not recorded" in refusal


def test_a_missing_relative_file_says_what_it_is_relative_to(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FimloraError, match=r"'data/x\.csv' does not exist \(relative to the working directory"
    ):
        data_identity("data/x.csv")


# --------------------------------------------------------------------------------------------------
# Duplicates


@pytest.fixture
def leaky(tmp_path) -> Path:
    """Own split files: 2 validation rows and 3 test rows are train rows (modulo case and spaces); one
    test row is a validation row."""
    train = rows(30)
    write_rows(tmp_path / "train.csv", train)
    validation = [*rows(8, offset=100), (train[0][0].upper(), train[0][1]), ("  " + train[1][0], train[1][1])]
    write_rows(tmp_path / "validation.csv", validation)
    test = [*rows(7, offset=200), (train[2][0], "pos"), (train[3][0], "pos"),
            (train[4][0].replace(" ", "   "), "pos"), (validation[0][0], validation[0][1])]  # fmt: skip
    write_rows(tmp_path / "test.csv", test)
    return tmp_path


def test_duplicates_across_own_split_files_are_counted_and_warned_about(leaky, caplog):
    with caplog.at_level(logging.WARNING):
        data = load_task_data(str(leaky), **COLUMNS)
    assert data.duplicates == {"validation_in_train": 2, "test_in_train": 3, "test_in_validation": 1}
    assert data.dropped_duplicates is None
    assert len(data.splits["validation"]) == 10 and len(data.splits["test"]) == 11  # kept
    lines = [r.getMessage() for r in caplog.records if "also occur" in r.getMessage()]
    assert len(lines) == 1 and "3 of 11 test rows also occur in train" in lines[0]
    assert "drop_eval_duplicates" in lines[0]


def test_drop_eval_duplicates_removes_them_from_validation_and_test_only(leaky):
    data = load_task_data(str(leaky), drop_eval_duplicates=True, **COLUMNS)
    assert data.dropped_duplicates == {"validation": 2, "test": 4}
    assert len(data.splits["train"]) == 30
    assert len(data.splits["validation"]) == 8 and len(data.splits["test"]) == 7
    train = {t.casefold() for t in data.splits["train"]["text"][:]}
    assert not any(" ".join(t.split()).casefold() in train for t in data.splits["test"]["text"][:])


def test_tuning_counts_duplicates_among_the_splits_it_loads(leaky):
    data = load_task_data(str(leaky), splits=("train", "validation"), drop_eval_duplicates=True, **COLUMNS)
    assert data.duplicates == {"validation_in_train": 2}
    assert data.dropped_duplicates == {"validation": 2} and "test" in data.sealed


# --------------------------------------------------------------------------------------------------
# Encoding, columns


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_a_non_utf8_file_is_named_with_its_encoding_problem(tmp_path, suffix):
    path = tmp_path / f"latin{suffix}"
    body = (
        "text,label\nfine,pos\ncafé au lait,neg\n" if suffix == ".csv" else '{"text": "café", "label": "a"}\n'
    )
    path.write_bytes(body.encode("latin-1"))
    with pytest.raises(FimloraError, match=rf"'{path}' is not UTF-8 text: byte 0xe9 at line") as info:
        load_task_data(str(path))
    assert "\n" not in str(info.value)


def test_the_utf8_check_finds_a_bad_byte_across_chunk_boundaries(tmp_path):
    path = tmp_path / "a.csv"
    good = "ab\né\n".encode()  # é is two bytes, split over the first two 4-byte chunks
    path.write_bytes(good + b"x\xff")
    with pytest.raises(FimloraError, match=r"byte 0xff at line 3 \(byte 7\)"):
        check_utf8(path, "a.csv", chunk_bytes=4)
    path.write_bytes(good)
    check_utf8(path, "a.csv", chunk_bytes=4)  # a character split by the chunking is no error


def test_columns_named_text_and_label_but_swapped_are_one_line(tmp_path):
    data = [(f"message {i} about the meeting on day {i}", "spam" if i % 3 else "ham") for i in range(40)]
    path = write_rows(tmp_path / "mail.csv", data, header=("text", "label"))
    with pytest.raises(FimloraError, match="swapped"):
        load_task_data(str(path), text_column="label", label_column="text")
    assert load_task_data(str(path), text_column="text", label_column="label").label_names == ["ham", "spam"]


# --------------------------------------------------------------------------------------------------
# Truncation


def test_the_share_of_examples_cut_at_max_length_is_measured_per_split():
    from transformers import AutoTokenizer

    from fimlora import assets

    tokenizer = AutoTokenizer.from_pretrained(assets.minilm_path())
    long, short = "word " * 30, "short text"
    splits = {
        "train": [long, long, long, short],
        "validation": [short, short],
        "test": [long, short, short, short, short],
    }
    data = TaskData(
        "toy",
        "classification",
        datasets.DatasetDict(
            {s: datasets.Dataset.from_dict({"text": t, "label": [0] * len(t)}) for s, t in splits.items()}
        ),
        ["a", "b"],
    )
    tokenized = tokenize_splits(data, tokenizer, max_length=16)
    assert tokenized.truncated == {"train": 0.75, "validation": 0.0, "test": 0.2}
    assert sorted(tokenized.splits["train"].column_names) == ["attention_mask", "input_ids", "labels"]
    assert max(len(ids) for ids in tokenized.splits["train"]["input_ids"][:]) == 16
    # Texts that exactly fill max_length are not cut: the share counts truncation, not length.
    exact = tokenizer.decode(tokenizer("word " * 14)["input_ids"][1:-1])
    data.splits["validation"] = datasets.Dataset.from_dict({"text": [exact], "label": [0]})
    assert tokenize_splits(data, tokenizer, max_length=16).truncated["validation"] == 0.0
    warning = truncation_warning(tokenized.truncated, 16)
    assert warning is not None and "75% of train" in warning and "max_length=16" in warning
    assert truncation_warning({"train": 0.1, "test": 0.05}, 16) is None
