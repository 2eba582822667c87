"""Tiny saved models (real tokenizers, config-built weights) and small local datasets: run fixtures."""

from __future__ import annotations

import csv
import random
from pathlib import Path

import pytest
from tiny_models import make_tiny_bert, make_tiny_llama
from transformers import AutoTokenizer, BertTokenizerFast

from fimlora.assets import minilm_path, smollm2_path

POSITIVE = ["great", "wonderful", "moving", "brilliant", "funny", "charming"]
NEGATIVE = ["dull", "awful", "boring", "clumsy", "tedious", "bland"]
FILLER = ["the", "film", "plot", "acting", "story", "was", "really", "quite", "and", "ending"]


def write_sentiment_csv(path: Path, n: int = 160, seed: int = 0) -> Path:
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for _ in range(n):
            positive = rng.random() < 0.5
            words = [*rng.sample(FILLER, 5), rng.choice(POSITIVE if positive else NEGATIVE)]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg"])
    return path


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT with MiniLM's real tokenizer, saved like any local checkpoint (no classifier)."""
    directory = tmp_path_factory.mktemp("tiny-bert")
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    model = make_tiny_bert(num_labels=2)
    model.resize_token_embeddings(len(tokenizer))
    model.bert.save_pretrained(directory)  # backbone only: the head must be created fresh, as for MiniLM
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_vocab_bert_dir(tmp_path_factory) -> Path:
    """The tiny BERT with a WordPiece tokenizer of only the words in ``write_sentiment_csv``'s data.

    For tests that run many experiments: ``datasets`` fingerprints every tokenization by pickling the
    tokenizer, seconds per split for MiniLM's 30k-word one, nothing for this one.
    """
    directory = tmp_path_factory.mktemp("tiny-vocab-bert")
    vocab = directory / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab.write_text("\n".join(specials + FILLER + POSITIVE + NEGATIVE) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    make_tiny_bert(num_labels=2).bert.save_pretrained(directory)  # backbone only: the head is new
    return directory


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    model = make_tiny_llama()
    model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def sentiment_csv(tmp_path_factory) -> Path:
    return write_sentiment_csv(tmp_path_factory.mktemp("data") / "reviews.csv")


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("data") / "corpus.jsonl"
    lines = []
    for _ in range(60):
        words = [rng.choice(FILLER + POSITIVE + NEGATIVE) for _ in range(rng.randint(20, 40))]
        lines.append('{"body": "' + " ".join(words) + '."}')
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# A 20-word vocabulary keeps tokenization (and datasets' fingerprinting of the tokenizer) instant.
SMALL_WORDS = {"pos": ["great", "wonderful", "funny"], "neg": ["dull", "awful", "boring"]}
SMALL_FILLER = ["the", "film", "plot", "acting", "story", "was", "really", "quite"]


def write_small_bert(directory: Path) -> Path:
    """A 2-layer, 16-wide BERT backbone with a 20-word WordPiece tokenizer, saved as a checkpoint."""
    from transformers import BertTokenizerFast

    vocab = directory / "vocab.txt"
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    words = specials + SMALL_FILLER + SMALL_WORDS["pos"] + SMALL_WORDS["neg"]
    vocab.write_text("\n".join(words) + "\n", encoding="utf-8")
    BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(directory)
    make_tiny_bert(num_labels=2).bert.save_pretrained(directory)  # backbone only: the head is new
    return directory


def write_small_reviews(path: Path, n: int, seed: int = 0) -> Path:
    """``n`` labelled snippets in the small vocabulary (columns review, sentiment)."""
    rng = random.Random(seed)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for _ in range(n):
            label = rng.choice(["pos", "neg"])
            words = [*rng.sample(SMALL_FILLER, 4), rng.choice(SMALL_WORDS[label])]
            rng.shuffle(words)
            writer.writerow([" ".join(words), label])
    return path
