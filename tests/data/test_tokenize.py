"""Tokenization, collation and calibration subsets with the real MiniLM and SmolLM2 tokenizers."""

from __future__ import annotations

import copy
import pickle
from collections.abc import Iterator
from typing import Any

import datasets
import pytest
import torch
from torch.utils.data import DataLoader

from fimlora import assets
from fimlora.data import TaskData, calibration_subset, load_task_data, make_collator, tokenize_task_data
from fimlora.data.registry import split_three_ways
from fimlora.errors import FimloraError

SPLITS = ("train", "validation", "test")


@pytest.fixture(scope="session", autouse=True)
def _offline() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="session")
def minilm_tokenizer(_offline: None) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(assets.minilm_path())


@pytest.fixture(scope="session")
def smollm2_tokenizer(_offline: None, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    converted = assets.cache_dir() / "smollm2-135m-instruct"
    if assets._smollm2_complete(converted):
        return AutoTokenizer.from_pretrained(converted)
    # Without the converted model, read only the tokenizer from the GGUF (~9 s) and reuse it this session.
    gguf_dir = assets._smollm2_gguf_dir()
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=assets.SMOLLM2_GGUF)
    saved = tmp_path_factory.mktemp("smollm2-tokenizer")
    tokenizer.save_pretrained(saved)
    return AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def movies_small() -> TaskData:
    full = load_task_data("movie-reviews", seed=0)
    splits = datasets.DatasetDict({s: full.splits[s].select(range(200)) for s in SPLITS})
    return TaskData(full.name, full.task, splits, full.label_names)


@pytest.fixture(scope="module")
def fiction() -> TaskData:
    return load_task_data("brown-fiction", seed=0)


def _pad_positions(lengths: list[int], width: int) -> torch.Tensor:
    return torch.arange(width)[None, :] >= torch.tensor(lengths)[:, None]


# ----------------------------------------------------------------------------------------- classification


def test_classification_tokenization(movies_small: TaskData, minilm_tokenizer: Any) -> None:
    tokenized = tokenize_task_data(movies_small, minilm_tokenizer, max_length=16)
    assert list(tokenized) == list(SPLITS)
    for s in SPLITS:
        ds = tokenized[s]
        assert sorted(ds.column_names) == ["attention_mask", "input_ids", "labels"]
        lengths = [len(ids) for ids in ds["input_ids"][:]]
        assert max(lengths) == 16 and min(lengths) < 16  # truncated, yet not padded
        assert all(set(m) == {1} for m in ds["attention_mask"][:])
        assert ds["labels"][:] == movies_small.splits[s]["label"][:]
    first = tokenized["train"][0]["input_ids"]
    assert first[0] == minilm_tokenizer.cls_token_id and first[-1] == minilm_tokenizer.sep_token_id


def test_classification_collator_pads_right(movies_small: TaskData, minilm_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(minilm_tokenizer)
    tokenizer.padding_side = "left"  # must be ignored
    tokenized = tokenize_task_data(movies_small, tokenizer, max_length=32)
    rows = [tokenized["train"][i] for i in range(8)]
    lengths = [len(r["input_ids"]) for r in rows]
    assert len(set(lengths)) > 1
    batch = make_collator(tokenizer, "classification")(rows)
    width = max(lengths)
    assert batch["input_ids"].shape == (8, width) and batch["input_ids"].dtype == torch.long
    pads = _pad_positions(lengths, width)
    assert torch.equal(batch["attention_mask"] == 0, pads)
    assert torch.all(batch["input_ids"][pads] == tokenizer.pad_token_id)
    for i, row in enumerate(rows):
        assert batch["input_ids"][i, : lengths[i]].tolist() == row["input_ids"]
    assert batch["labels"].shape == (8,) and batch["labels"].dtype == torch.long
    assert batch["labels"].tolist() == [r["labels"] for r in rows]


def test_collator_works_in_a_dataloader(movies_small: TaskData, minilm_tokenizer: Any) -> None:
    tokenized = tokenize_task_data(movies_small, minilm_tokenizer, max_length=24)
    collator = make_collator(minilm_tokenizer, "classification")
    pickle.dumps(collator)  # DataLoader workers may need to pickle it
    batch = next(iter(DataLoader(tokenized["validation"], batch_size=5, collate_fn=collator)))
    assert batch["input_ids"].shape[0] == 5 and batch["labels"].shape == (5,)


# ---------------------------------------------------------------------------------------------- causal LM


def test_causal_lm_blocks(fiction: TaskData, smollm2_tokenizer: Any) -> None:
    block = 64
    tokenized = tokenize_task_data(fiction, smollm2_tokenizer, max_length=block)
    eos = smollm2_tokenizer.eos_token_id
    for s in SPLITS:
        ds = tokenized[s]
        assert sorted(ds.column_names) == ["attention_mask", "input_ids", "labels"]
        stream = []
        for ids in smollm2_tokenizer(fiction.splits[s]["text"][:])["input_ids"]:
            stream.extend([*ids, eos])
        ids = ds["input_ids"][:]
        assert len(ids) == len(stream) // block
        assert all(len(b) == block for b in ids)
        assert [t for b in ids for t in b] == stream[: len(ids) * block]
        assert ds["labels"][:] == ids
        assert all(set(m) == {1} for m in ds["attention_mask"][:])
    eos_count = sum(row.count(eos) for row in tokenized["train"]["input_ids"][:])
    assert eos_count >= len(fiction.splits["train"]) - 1


def test_causal_lm_collator_masks_exactly_the_padding(smollm2_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.padding_side = "left"
    eos = tokenizer.eos_token_id
    assert tokenizer.pad_token_id == eos  # padding and a real EOS share an id: masking must go by position
    rows = [
        {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": list(ids)}
        for ids in ([5, 6, 7, eos], [8, eos], [9, 10, 11, 12, 13, eos])
    ]
    batch = make_collator(tokenizer, "causal-lm")(rows)
    lengths = [4, 2, 6]
    pads = _pad_positions(lengths, 6)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, 6)
    assert torch.equal(batch["attention_mask"] == 0, pads)
    assert torch.equal(batch["labels"] == -100, pads)
    assert torch.equal(batch["labels"][~pads], batch["input_ids"][~pads])
    assert batch["labels"][0, 3] == eos and batch["labels"][1, 1] == eos


def test_collator_uses_eos_without_mutating_tokenizer(smollm2_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.pad_token = None
    assert tokenizer.pad_token_id is None
    batch = make_collator(tokenizer, "causal-lm")([{"input_ids": [1, 2, 3]}, {"input_ids": [4]}])
    assert batch["input_ids"][1].tolist() == [4, tokenizer.eos_token_id, tokenizer.eos_token_id]
    assert batch["labels"][1].tolist() == [4, -100, -100]
    assert tokenizer.pad_token is None


def test_causal_lm_split_too_short(smollm2_tokenizer: Any) -> None:
    ds = datasets.Dataset.from_dict({"text": [f"short document {i}" for i in range(30)]})
    data = TaskData("tiny", "causal-lm", split_three_ways(ds, seed=0, source="tiny"))
    with pytest.raises(FimloraError, match=r"split of 'tiny' has only \d+ tokens"):
        tokenize_task_data(data, smollm2_tokenizer, max_length=512)
    with pytest.raises(FimloraError, match="max_length"):
        tokenize_task_data(data, smollm2_tokenizer, max_length=0)


def test_make_collator_rejects_unknown_task(minilm_tokenizer: Any) -> None:
    with pytest.raises(FimloraError, match="Unknown task"):
        make_collator(minilm_tokenizer, "seq2seq")


# -------------------------------------------------------------------------------------------- calibration


def test_calibration_subset() -> None:
    train = datasets.Dataset.from_dict({"x": list(range(100))})
    sub = calibration_subset(train, 10, seed=0)
    assert len(sub) == 10 and len(set(sub["x"][:])) == 10
    assert sub["x"][:] == calibration_subset(train, 10, seed=0)["x"][:]
    assert sub["x"][:] != calibration_subset(train, 10, seed=1)["x"][:]
    assert sub["x"][:] != list(range(10))
    assert len(calibration_subset(train, 1000, seed=0)) == 100
    with pytest.raises(FimloraError, match="at least 1"):
        calibration_subset(train, 0, seed=0)


def test_calibration_subset_rejects_empty_train() -> None:
    with pytest.raises(FimloraError, match="empty"):
        calibration_subset(datasets.Dataset.from_dict({"x": []}), 4, seed=0)
