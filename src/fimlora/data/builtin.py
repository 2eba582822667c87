"""Built-in datasets, all from offline assets (see :mod:`fimlora.assets`); deterministic given ``seed``.

Classification (VADER human-rated snippets, Hutto & Gilbert 2014; each line ``id<TAB>score<TAB>text``
with a mean rating in -4..+4):

- ``movie-reviews``: 10,072 Rotten Tomatoes snippets with ``|score| >= 0.5`` (4,996 positive / 5,076
  negative), split 80/10/10 (8,058 / 1,007 / 1,007).
- ``sentiment-domains``: the same rule over all four VADER sources (movie, tweets, amazon, nyt): 19,459
  snippets with a ``domain`` column, split 80/10/10.

Snippets rated near zero are dropped because their polarity is not clear to human raters either. Extra
columns ``id`` (the source id, unique within a domain) and ``score`` are kept.

Causal language modelling (Brown corpus, 1961 American English, 15 genres):

- ``brown``: one example per corpus file (500 files, ~2,000 words each), split by file 90/5/5
  (450 / 25 / 25) so no document spans two splits; columns ``text``, ``file`` and ``genre`` (the
  genre letter, 2nd letter of the file name).
- ``brown-fiction``: only the fiction genres k, l, m, n, p, r (general fiction, mystery, science fiction,
  adventure, romance, humour): 126 files split 114 / 6 / 6.
- ``brown-nonfiction``: the other nine genres a–j (press, religion, hobbies, popular lore,
  belles-lettres, government documents, learned): 374 files split 336 / 19 / 19 at seed 0. Disjoint from
  ``brown-fiction`` file by file, so it is general text a fiction fine-tune never saw: the default
  held-out text of the forgetting measure (:mod:`fimlora.forgetting`).

Classification of the Brown corpus by genre:

- ``brown-genre``: passages labelled with their file's genre (15 classes, the 2nd letter of the file
  name; label names in ``BROWN_GENRE_LABELS``). A passage is a run of consecutive sentences of one file,
  cut as soon as it reaches ``PASSAGE_WORDS`` = 50 words (punctuation counted as words, as the corpus
  tokenises it): 2–3 sentences, median 69 MiniLM WordPiece tokens (95th percentile 100; 0.6 % exceed
  128), so MiniLM at ``max_length`` 128 sees nearly every passage whole; a file's last passage is kept
  only if it reaches half that. 18,351 passages. Split **by document**: within each genre the files are
  permuted (seeded) and round(10 %) of them, at least one, go to validation and as many to test, so
  every genre is in every split and no file has passages in two splits. At seed 0: 14,532 / 1,905 /
  1,914 passages (396 / 52 / 52 files). The classes are uneven (from 6 files of science fiction to 80 of
  learned prose; the largest class is 15.5 % of the training split), so report macro-F1 beside accuracy
  (the evaluation records both). Passages per class over all splits: learned 2,824, belles-lettres
  2,675, popular lore 1,719, press reportage 1,583, skills and hobbies 1,310, adventure 1,161, romance
  1,148, general fiction 1,119, government 1,067, press editorial 975, mystery 957, press reviews 631,
  religion 606, humor 339, science fiction 237. Columns ``text``, ``label``,
  ``genre`` (the letter), ``file`` and ``passage`` (its index within the file).
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np

from fimlora.assets import BROWN_VERSION, VADER_VERSION, brown_dir, vader_dir
from fimlora.data.registry import SPLITS, TaskData, register_dataset, split_three_ways
from fimlora.errors import FimloraError

MIN_ABS_SCORE = 0.5
# What each loader's rows are made of (registry versions: a finished run is reused only while they hold).
VADER_CONTENT = f"vader-{VADER_VERSION}"
BROWN_CONTENT = f"brown-{BROWN_VERSION}"
SENTIMENT_LABELS = ["negative", "positive"]
VADER_DOMAINS = {
    "movie": "movieReviewSnippets_GroundTruth.txt",
    "tweets": "tweets_GroundTruth.txt",
    "amazon": "amazonReviewSnippets_GroundTruth.txt",
    "nyt": "nytEditorialSnippets_GroundTruth.txt",
}
BROWN_FICTION_GENRES = frozenset("klmnpr")
BROWN_NONFICTION_GENRES = frozenset("abcdefghj")
BROWN_GENRES = {
    "a": "press: reportage",
    "b": "press: editorial",
    "c": "press: reviews",
    "d": "religion",
    "e": "skill and hobbies",
    "f": "popular lore",
    "g": "belles-lettres",
    "h": "miscellaneous: government and house organs",
    "j": "learned",
    "k": "fiction: general",
    "l": "fiction: mystery and detective",
    "m": "fiction: science",
    "n": "fiction: adventure and western",
    "p": "fiction: romance and love story",
    "r": "humor",
}


# --------------------------------------------------------------------------------------------------------
# VADER sentiment snippets


def read_vader_file(path: Path, domain: str) -> dict[str, list]:
    """Rows of one ``*_GroundTruth.txt`` with ``|score| >= MIN_ABS_SCORE``, as columns.

    The files are UTF-8 with CRLF line ends and no trailing newline; a few texts carry stray spaces.
    """
    columns: dict[str, list] = {"text": [], "label": [], "domain": [], "id": [], "score": []}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("\t", 2)
        if len(parts) != 3:
            raise FimloraError(
                f"{path}:{lineno} is not id<TAB>score<TAB>text; delete {path.parent} so that it is "
                "fetched again."
            )
        ident, score_str, text = parts
        score = float(score_str)
        text = text.strip()
        if abs(score) < MIN_ABS_SCORE or not text:
            continue
        columns["text"].append(text)
        columns["label"].append(int(score > 0))
        columns["domain"].append(domain)
        columns["id"].append(ident)
        columns["score"].append(score)
    return columns


def _vader_task(name: str, domains: list[str], seed: int) -> TaskData:
    root = vader_dir()
    merged: dict[str, list] = {}
    for domain in domains:
        for key, values in read_vader_file(root / VADER_DOMAINS[domain], domain).items():
            merged.setdefault(key, []).extend(values)
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=SENTIMENT_LABELS),
            "domain": datasets.Value("string"),
            "id": datasets.Value("string"),
            "score": datasets.Value("float64"),
        }
    )
    full = datasets.Dataset.from_dict(merged, features=features)
    splits = split_three_ways(full, seed=seed, source=f"The {name} dataset")
    return TaskData(name, "classification", splits, list(SENTIMENT_LABELS))


@register_dataset("movie-reviews", task="classification", version=VADER_CONTENT)
def load_movie_reviews(*, seed: int) -> TaskData:
    """VADER Rotten Tomatoes snippets, positive vs negative (10,072 examples)."""
    return _vader_task("movie-reviews", ["movie"], seed)


@register_dataset("sentiment-domains", task="classification", version=VADER_CONTENT)
def load_sentiment_domains(*, seed: int) -> TaskData:
    """All four VADER sources with a ``domain`` column (19,459 examples)."""
    return _vader_task("sentiment-domains", list(VADER_DOMAINS), seed)


# --------------------------------------------------------------------------------------------------------
# Brown corpus

# The corpus writes opening/closing double quotes as `` and ''; plain quotes read more like the text a
# pretrained LM has seen, which keeps perplexities comparable with other corpora.
_QUOTE_TOKENS = {"``": '"', "''": '"'}


def brown_plain_text(tagged: str) -> str:
    """Strip POS tags from one Brown file: one sentence per line, tokens joined by single spaces.

    Tags are removed with ``tok.rsplit("/", 1)[0]`` so words containing a slash (``1-1/2/cd``) survive.
    """
    sentences = []
    for line in tagged.splitlines():
        words = [tok.rsplit("/", 1)[0] for tok in line.split()]
        if words:
            sentences.append(" ".join(_QUOTE_TOKENS.get(w, w) for w in words))
    return "\n".join(sentences)


def _brown_task(name: str, genres: frozenset[str] | None, seed: int) -> TaskData:
    root = brown_dir()
    columns: dict[str, list[str]] = {"text": [], "file": [], "genre": []}
    for path in sorted(root.glob("c[a-r][0-9][0-9]")):
        genre = path.name[1]
        if genres is not None and genre not in genres:
            continue
        # The files are latin-1 (in practice plain ASCII); latin-1 cannot fail to decode.
        columns["text"].append(brown_plain_text(path.read_text(encoding="latin-1")))
        columns["file"].append(path.name)
        columns["genre"].append(genre)
    full = datasets.Dataset.from_dict(columns)
    splits = split_three_ways(full, seed=seed, fractions=(0.05, 0.05), source=f"The {name} dataset")
    return TaskData(name, "causal-lm", splits)


PASSAGE_WORDS = 50
# Short label names in genre-letter order (class id k is the k-th genre letter of BROWN_GENRES).
BROWN_GENRE_LABELS = {
    "a": "press-reportage",
    "b": "press-editorial",
    "c": "press-reviews",
    "d": "religion",
    "e": "skills-hobbies",
    "f": "popular-lore",
    "g": "belles-lettres",
    "h": "government",
    "j": "learned",
    "k": "general-fiction",
    "l": "mystery",
    "m": "science-fiction",
    "n": "adventure",
    "p": "romance",
    "r": "humor",
}


def brown_passages(text: str, words: int = PASSAGE_WORDS) -> list[str]:
    """Consecutive sentences of one file (one per line, as :func:`brown_plain_text` gives them), cut as
    soon as a passage reaches ``words`` words; a last passage shorter than ``words // 2`` is dropped."""
    passages, current, count = [], [], 0
    for sentence in text.splitlines():
        current.append(sentence)
        count += len(sentence.split())
        if count >= words:
            passages.append(" ".join(current))
            current, count = [], 0
    if count >= words // 2:
        passages.append(" ".join(current))
    return passages


def split_documents_by_group(documents: dict[str, str], *, seed: int, share: float = 0.1) -> dict[str, str]:
    """``{document: split}``: within each group (``documents[name]`` is its group), a seeded permutation
    sends round(share · n), at least 1, documents to validation, as many to test, the rest to train.

    Groups are visited in sorted order, each permuting its sorted names, so the result depends only on
    the names, their groups and ``seed``. A group needs at least 3 documents.
    """
    rng = np.random.default_rng(seed)
    groups: dict[str, list[str]] = {}
    for name in sorted(documents):
        groups.setdefault(documents[name], []).append(name)
    assigned = {}
    for group in sorted(groups):
        names = groups[group]
        held = max(1, round(share * len(names)))
        if len(names) < 2 * held + 1:
            raise FimloraError(f"Group {group!r} has {len(names)} documents, too few for three splits.")
        order = [names[i] for i in rng.permutation(len(names))]
        for i, name in enumerate(order):
            assigned[name] = "validation" if i < held else "test" if i < 2 * held else "train"
    return assigned


@register_dataset("brown-genre", task="classification", version=BROWN_CONTENT)
def load_brown_genre(*, seed: int) -> TaskData:
    """Brown corpus passages labelled by genre (15 classes), split by document within each genre."""
    root = brown_dir()
    letters = sorted(BROWN_GENRE_LABELS)
    files = {path.name: path for path in sorted(root.glob("c[a-r][0-9][0-9]"))}
    splits_of = split_documents_by_group({name: name[1] for name in files}, seed=seed)
    columns: dict[str, dict[str, list]] = {
        split: {"text": [], "label": [], "genre": [], "file": [], "passage": []} for split in SPLITS
    }
    for name, path in files.items():
        genre = name[1]
        text = brown_plain_text(path.read_text(encoding="latin-1"))
        target = columns[splits_of[name]]
        for index, passage in enumerate(brown_passages(text)):
            target["text"].append(passage)
            target["label"].append(letters.index(genre))
            target["genre"].append(genre)
            target["file"].append(name)
            target["passage"].append(index)
    label_names = [BROWN_GENRE_LABELS[g] for g in letters]
    features = datasets.Features(
        {
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=label_names),
            "genre": datasets.Value("string"),
            "file": datasets.Value("string"),
            "passage": datasets.Value("int64"),
        }
    )
    splits = datasets.DatasetDict(
        {split: datasets.Dataset.from_dict(columns[split], features=features) for split in SPLITS}
    )
    return TaskData("brown-genre", "classification", splits, label_names)


@register_dataset("brown", task="causal-lm", version=BROWN_CONTENT)
def load_brown(*, seed: int) -> TaskData:
    """The whole Brown corpus, one example per file (500 files, 15 genres)."""
    return _brown_task("brown", None, seed)


@register_dataset("brown-fiction", task="causal-lm", version=BROWN_CONTENT)
def load_brown_fiction(*, seed: int) -> TaskData:
    """The fiction genres of the Brown corpus (126 files)."""
    return _brown_task("brown-fiction", BROWN_FICTION_GENRES, seed)


@register_dataset("brown-nonfiction", task="causal-lm", version=BROWN_CONTENT)
def load_brown_nonfiction(*, seed: int) -> TaskData:
    """The non-fiction genres of the Brown corpus (374 files): what ``brown-fiction`` leaves out."""
    return _brown_task("brown-nonfiction", BROWN_NONFICTION_GENRES, seed)
