"""Tokenization, padding and calibration subsets for :class:`~fimlora.data.registry.TaskData`.

Conventions:

- classification rows: ``input_ids`` and ``attention_mask`` truncated to ``max_length`` but not padded
  (the collator pads each batch dynamically) and ``labels`` (int class id); nothing else. The share of
  each split's examples that truncation cut is :attr:`Tokenized.truncated` (the run records it and warns
  above :data:`TRUNCATION_WARN_SHARE`).
- causal-LM rows: every document of a split is tokenized with the tokenizer's own special tokens and
  followed by EOS, the split is concatenated and cut into blocks of exactly ``max_length`` tokens (the
  tail shorter than a block is dropped); ``labels`` equals ``input_ids`` because HF causal-LM models shift
  labels internally; ``attention_mask`` is all ones. A block may therefore span two documents, as in
  GPT-2-style packing.
- batches are always right-padded; padded positions have ``attention_mask`` 0 and, for causal-LM,
  ``labels`` -100 (ignored by the loss).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from fimlora.data.registry import SPLITS, SealedSplits, TaskData, check_task
from fimlora.errors import FimloraError
from fimlora.fisher.losses import IGNORE_INDEX
from fimlora.runs import TRUNCATION_WARN_SHARE

logger = logging.getLogger(__name__)

_PROGRESS_MIN_ROWS = 20_000
_PROGRESS_MIN_CHARS = 1_000_000
# Small map batches for whole documents, so that the progress bar of a long corpus actually moves.
_DOCUMENT_BATCH_SIZE = 32
_TRUNCATED = "__fimlora_truncated"


@dataclass(frozen=True)
class Tokenized:
    """Tokenized splits, and per split the share of examples cut at ``max_length`` (classification only:
    causal-LM text is packed into blocks, nothing is cut; empty then)."""

    splits: datasets.DatasetDict
    truncated: dict[str, float]


@contextlib.contextmanager
def _progress_only_if_large(ds: datasets.Dataset) -> Iterator[None]:
    """Hide datasets' progress bars for maps that finish in about a second, where they are only noise."""
    was_enabled = datasets.is_progress_bar_enabled()
    if was_enabled and not _is_large(ds):
        datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _is_large(ds: datasets.Dataset) -> bool:
    # Few rows can still mean a lot of text (Brown: 500 rows, 6M characters, ~5 s to tokenize).
    return len(ds) >= _PROGRESS_MIN_ROWS or sum(len(t or "") for t in ds["text"][:]) >= _PROGRESS_MIN_CHARS


def tokenize_task_data(data: TaskData, tokenizer: Any, *, max_length: int) -> datasets.DatasetDict:
    """Tokenize every split of ``data`` for its task (see module docstring); returns a new DatasetDict
    (sealed splits stay sealed in it)."""
    return tokenize_splits(data, tokenizer, max_length=max_length).splits


def tokenize_splits(data: TaskData, tokenizer: Any, *, max_length: int) -> Tokenized:
    """:func:`tokenize_task_data`, with the share of examples truncation cut per split."""
    if max_length < 1:
        raise FimloraError(f"max_length must be a positive number of tokens, got {max_length}.")
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and max_length > model_max:
        logger.warning("max_length=%d exceeds the tokenizer's model_max_length=%d", max_length, model_max)
    check_task(data.task)
    out = {}
    truncated = {}
    for split in (s for s in SPLITS if s in data.splits):  # sealed splits stay sealed
        ds = data.splits[split]
        with _progress_only_if_large(ds):
            if data.task == "classification":
                rows = _tokenize_classification(ds, tokenizer, max_length, split)
                # A column of the map's own output, so a cached map brings it back too.
                cut = rows[_TRUNCATED][:]
                truncated[split] = sum(cut) / len(cut) if len(cut) else 0.0
                out[split] = rows.remove_columns(_TRUNCATED)
            else:
                out[split] = _tokenize_causal_lm(ds, tokenizer, max_length, split, data.name)
    splits = SealedSplits(out, data.sealed) if data.sealed else datasets.DatasetDict(out)
    return Tokenized(splits, truncated)


def truncation_warning(truncated: dict[str, float], max_length: int) -> str | None:
    """One warning line when a split had more than :data:`TRUNCATION_WARN_SHARE` of its examples cut."""
    if not any(share > TRUNCATION_WARN_SHARE for share in truncated.values()):
        return None
    shares = ", ".join(f"{share:.0%} of {split}" for split, share in truncated.items())
    return (
        f"warning: examples longer than train.max_length={max_length} tokens are cut: {shares}; the "
        "model never sees their end (raise train.max_length if the model takes more)."
    )


def _tokenize_classification(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, split: str
) -> datasets.Dataset:
    def encode(batch: dict[str, list]) -> dict[str, list]:
        enc = tokenizer(batch["text"], truncation=True, max_length=max_length, verbose=False)
        return {
            "input_ids": enc["input_ids"],
            "attention_mask": enc["attention_mask"],
            "labels": batch["label"],
            _TRUNCATED: _was_cut(enc, batch["text"], tokenizer, max_length),
        }

    return ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")


def _was_cut(enc: Any, texts: list[str], tokenizer: Any, max_length: int) -> list[bool]:
    """Per text: whether truncation cut it. A fast tokenizer keeps what it cut (``overflowing``); any
    other is asked for the untruncated length."""
    encodings = getattr(enc, "encodings", None)
    if encodings is not None:
        return [bool(e.overflowing) for e in encodings]
    full = tokenizer(texts, truncation=False, max_length=None, verbose=False)["input_ids"]
    return [len(ids) > max_length for ids in full]


def _document_separator(tokenizer: Any) -> int:
    for attr in ("eos_token_id", "sep_token_id"):
        token_id = getattr(tokenizer, attr, None)
        if token_id is not None:
            return int(token_id)
    raise FimloraError(
        "The tokenizer has neither an EOS nor a SEP token to separate documents; use a "
        "causal-LM tokenizer for a causal-lm dataset."
    )


def _tokenize_causal_lm(
    ds: datasets.Dataset, tokenizer: Any, max_length: int, split: str, name: str
) -> datasets.Dataset:
    eos = _document_separator(tokenizer)

    def encode(batch: dict[str, list]) -> dict[str, list]:
        # verbose=False: whole documents are longer than model_max_length by design (they are chunked).
        ids = tokenizer(batch["text"], verbose=False)["input_ids"]
        return {"input_ids": [seq if seq and seq[-1] == eos else [*seq, eos] for seq in ids]}

    docs = ds.map(
        encode,
        batched=True,
        batch_size=_DOCUMENT_BATCH_SIZE,
        remove_columns=ds.column_names,
        desc=f"Tokenizing {split} ({name})",
    )
    flat = pc.list_flatten(docs.data.column("input_ids")).to_numpy().astype(np.int64, copy=False)
    num_blocks = len(flat) // max_length
    if num_blocks == 0:
        raise FimloraError(
            f"The {split} split of {name!r} has only {len(flat)} tokens, fewer than one block "
            f"of max_length={max_length}; use a smaller max_length or more data."
        )
    # Building the Arrow lists directly from the flat buffer avoids a slow per-row Python conversion.
    offsets = pa.array(np.arange(0, (num_blocks + 1) * max_length, max_length, dtype=np.int32))
    ids = pa.ListArray.from_arrays(offsets, pa.array(flat[: num_blocks * max_length]))
    mask = pa.ListArray.from_arrays(offsets, pa.array(np.ones(num_blocks * max_length, dtype=np.int64)))
    return datasets.Dataset(pa.table({"input_ids": ids, "attention_mask": mask, "labels": ids}))


def tokenize_causal_lm_split(
    ds: datasets.Dataset, tokenizer: Any, *, max_length: int, name: str
) -> datasets.Dataset:
    """One split of texts (a ``text`` column) as causal-LM blocks, exactly as :func:`tokenize_task_data`
    cuts a causal-LM split (module docstring), for text that is not part of a task's own splits."""
    with _progress_only_if_large(ds):
        return _tokenize_causal_lm(ds, tokenizer, max_length, "text", name)


@dataclass(frozen=True)
class _Collator:
    """Right-pads a list of tokenized rows into tensors; a class (not a closure) so DataLoader workers can
    pickle it."""

    pad_id: int
    task: str

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise FimloraError("Cannot collate an empty batch; check the DataLoader's batch size.")
        seqs = [torch.as_tensor(f["input_ids"], dtype=torch.long) for f in features]
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(seqs), width), dtype=torch.long)
        causal = self.task == "causal-lm"
        labels = torch.full((len(seqs), width), IGNORE_INDEX, dtype=torch.long) if causal else None
        for i, (seq, feature) in enumerate(zip(seqs, features, strict=True)):
            n = len(seq)
            input_ids[i, :n] = seq
            mask = feature.get("attention_mask")
            attention[i, :n] = 1 if mask is None else torch.as_tensor(mask, dtype=torch.long)
            if labels is not None:
                target = feature.get("labels")
                labels[i, :n] = seq if target is None else torch.as_tensor(target, dtype=torch.long)
        if labels is None:
            try:
                labels = torch.as_tensor([int(f["labels"]) for f in features], dtype=torch.long)
            except KeyError as exc:
                raise FimloraError(
                    "Classification rows need a 'labels' field; tokenize the data with "
                    "tokenize_task_data first."
                ) from exc
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def make_collator(tokenizer: Any, task: str) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """A collator that right-pads with the tokenizer's pad id (EOS if it has none); the tokenizer itself
    is never modified."""
    check_task(task)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id
    if pad_id is None:
        raise FimloraError(
            "The tokenizer has neither a pad nor an EOS token, so batches cannot be padded; "
            "use a tokenizer that defines one of them."
        )
    return _Collator(int(pad_id), task)


def calibration_subset(train: datasets.Dataset, num_examples: int, seed: int) -> datasets.Dataset:
    """A seeded random subset of ``min(num_examples, len(train))`` training rows, in their original order.

    Only the training split should be used for calibration, so that the Fisher never sees evaluation data.
    """
    if num_examples < 1:
        raise FimloraError(
            f"The calibration subset needs at least 1 example, got num_examples={num_examples}."
        )
    if len(train) == 0:
        raise FimloraError("The training split is empty, so no calibration subset can be drawn from it.")
    size = min(num_examples, len(train))
    chosen = np.random.default_rng(seed).choice(len(train), size=size, replace=False)
    return train.select(np.sort(chosen))
