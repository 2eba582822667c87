"""Dataset loading: built-ins on the real offline corpora, local files, hub errors, the registry."""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pytest

from fimlora.data import TaskData, available_datasets, load_task_data, register_dataset
from fimlora.data import registry as registry_module
from fimlora.data.files import normalize_splits
from fimlora.errors import FimloraError

SPLITS = ("train", "validation", "test")
BUILTINS = ["brown", "brown-fiction", "brown-genre", "brown-nonfiction", "movie-reviews", "sentiment-domains"]


def _keys(ds: datasets.Dataset, *columns: str) -> list[tuple]:
    return list(zip(*(ds[c][:] for c in columns), strict=True))


@pytest.fixture(scope="module")
def movies() -> TaskData:
    return load_task_data("movie-reviews", seed=0)


@pytest.fixture(scope="module")
def brown() -> TaskData:
    return load_task_data("brown", seed=0)


# -------------------------------------------------------------------------------------------------- built-ins


def test_available_datasets_lists_builtins() -> None:
    assert available_datasets() == BUILTINS


def test_movie_reviews_counts_and_labels(movies: TaskData) -> None:
    assert movies.task == "classification"
    assert movies.label_names == ["negative", "positive"]
    assert movies.num_labels == 2
    sizes = {s: len(movies.splits[s]) for s in SPLITS}
    # 80/10/10 of 10,072, give or take a duplicated snippet kept with its twin.
    assert sizes == {"train": 8057, "validation": 1007, "test": 1008}
    assert sum(sizes.values()) == 10_072
    labels = [label for s in SPLITS for label in movies.splits[s]["label"][:]]
    assert labels.count(1) == 4_996
    assert labels.count(0) == 5_076
    for s in SPLITS:
        scores = movies.splits[s]["score"][:]
        assert all(abs(x) >= 0.5 for x in scores)
        assert all(lab == int(x > 0) for lab, x in zip(movies.splits[s]["label"][:], scores, strict=True))
        assert all(isinstance(t, str) and t for t in movies.splits[s]["text"][:])


def test_movie_reviews_splits_are_disjoint(movies: TaskData) -> None:
    keys = {s: set(_keys(movies.splits[s], "id", "text")) for s in SPLITS}
    assert sum(len(k) for k in keys.values()) == 10_072  # ids are unique, so nothing collapsed
    assert not keys["train"] & keys["validation"]
    assert not keys["train"] & keys["test"]
    assert not keys["validation"] & keys["test"]
    # The source repeats a few snippets under two ids; every copy lands in the same split.
    texts = {s: set(movies.splits[s]["text"][:]) for s in SPLITS}
    assert sum(len(t) for t in texts.values()) < 10_072
    assert not texts["train"] & texts["test"] and not texts["train"] & texts["validation"]
    assert not texts["validation"] & texts["test"]


def test_movie_reviews_deterministic_per_seed(movies: TaskData) -> None:
    again = load_task_data("movie-reviews", seed=0)
    other = load_task_data("movie-reviews", seed=1)
    for s in SPLITS:
        assert _keys(again.splits[s], "id", "text", "label") == _keys(movies.splits[s], "id", "text", "label")
    assert set(other.splits["test"]["id"][:]) != set(movies.splits["test"]["id"][:])
    assert abs(len(other.splits["test"]) - len(movies.splits["test"])) <= 2


def test_sentiment_domains() -> None:
    data = load_task_data("sentiment-domains", seed=0)
    assert data.task == "classification" and data.num_labels == 2
    counts: dict[str, int] = {}
    for s in SPLITS:
        domains = data.splits[s]["domain"][:]
        assert set(domains) == {"movie", "tweets", "amazon", "nyt"}, s
        for d in domains:
            counts[d] = counts.get(d, 0) + 1
    assert counts == {"movie": 10_072, "tweets": 3_432, "amazon": 2_985, "nyt": 2_970}
    keys = {s: set(_keys(data.splits[s], "domain", "id")) for s in SPLITS}
    assert sum(len(k) for k in keys.values()) == sum(counts.values())
    assert not keys["train"] & keys["test"]


def test_brown_split_by_file(brown: TaskData) -> None:
    assert brown.task == "causal-lm" and brown.label_names is None
    files = {s: brown.splits[s]["file"][:] for s in SPLITS}
    assert [len(files[s]) for s in SPLITS] == [450, 25, 25]
    all_files = [f for s in SPLITS for f in files[s]]
    assert len(set(all_files)) == 500 == len(all_files)
    assert not set(files["train"]) & set(files["test"])
    assert not set(files["validation"]) & set(files["test"])
    assert set(brown.splits["train"]["genre"][:]) == set("abcdefghjklmnpr")
    assert all(g == f[1] for g, f in zip(brown.splits["test"]["genre"][:], files["test"], strict=True))


def test_brown_tags_are_stripped(brown: TaskData) -> None:
    # A tag ends its token; the corpus also has words like ``material/hr./*0F./in.`` that contain slashes.
    tag = re.compile(r"\S/(at|nn|nns|np|vbd|vbz|in|jj|cc|rb|dt|pps|cs|to|vb)(-[a-z]+)*\$?(?=\s|$)")
    first = brown.splits["train"][0]["text"]
    assert first.startswith("The Fulton County Grand Jury said Friday")  # ca01 sorts first in train
    for s in SPLITS:
        for text in brown.splits[s]["text"][:]:
            assert not tag.search(text), tag.search(text)
            assert "\t" not in text and text == text.strip()
    # Words that contain a slash survive tag stripping (``1-1/2/cd`` -> ``1-1/2``).
    assert any("1-1/2" in t for s in SPLITS for t in brown.splits[s]["text"][:])


def test_brown_deterministic_and_fiction_subset(brown: TaskData) -> None:
    again = load_task_data("brown", seed=0)
    assert again.splits["test"]["file"][:] == brown.splits["test"]["file"][:]
    assert load_task_data("brown", seed=3).splits["test"]["file"][:] != brown.splits["test"]["file"][:]
    fiction = load_task_data("brown-fiction", seed=0)
    genres = {g for s in SPLITS for g in fiction.splits[s]["genre"][:]}
    assert genres == set("klmnpr")
    assert sum(len(fiction.splits[s]) for s in SPLITS) == 126
    assert [len(fiction.splits[s]) for s in SPLITS] == [114, 6, 6]


def test_brown_nonfiction_is_every_file_fiction_leaves_out(brown: TaskData) -> None:
    fiction = load_task_data("brown-fiction", seed=0)
    nonfiction = load_task_data("brown-nonfiction", seed=0)
    assert nonfiction.task == "causal-lm"
    files = {s: set(nonfiction.splits[s]["file"][:]) for s in SPLITS}
    assert {g for s in SPLITS for g in nonfiction.splits[s]["genre"][:]} == set("abcdefghj")
    fiction_files = {f for s in SPLITS for f in fiction.splits[s]["file"][:]}
    every_file = {f for s in SPLITS for f in brown.splits[s]["file"][:]}
    assert not fiction_files & set().union(*files.values())  # general text a fiction run never saw
    assert fiction_files | set().union(*files.values()) == every_file
    assert [len(files[s]) for s in SPLITS] == [336, 19, 19]


def test_brown_genre_is_split_by_document_with_every_genre_in_every_split() -> None:
    genre = load_task_data("brown-genre", seed=0)
    assert genre.task == "classification" and genre.num_labels == 15
    files = {s: set(genre.splits[s]["file"][:]) for s in SPLITS}
    assert not files["train"] & files["validation"]
    assert not files["train"] & files["test"]
    assert not files["validation"] & files["test"]
    assert [len(files[s]) for s in SPLITS] == [396, 52, 52]
    assert [len(genre.splits[s]) for s in SPLITS] == [14532, 1905, 1914]
    for split in SPLITS:
        rows = genre.splits[split]
        assert set(rows["label"][:]) == set(range(15))  # every genre in every split
        # The label is the genre of the passage's file: the 2nd letter of its name, in letter order.
        letters = sorted({f[1] for f in rows["file"][:]})
        assert all(
            letters[label] == f[1] == g
            for label, f, g in zip(rows["label"][:], rows["file"][:], rows["genre"][:], strict=True)
        )
    assert genre.label_names[0] == "press-reportage" and genre.label_names[-1] == "humor"
    texts = genre.splits["train"]["text"][:]
    words = [len(t.split()) for t in texts]
    assert min(words) >= 25 and sorted(words)[len(words) // 2] < 80  # 2–3 sentences, about 50 words
    assert "/" not in texts[0].split()[1]  # tags stripped
    again = load_task_data("brown-genre", seed=0)
    assert again.splits["test"]["file"][:] == genre.splits["test"]["file"][:]
    other = load_task_data("brown-genre", seed=1)
    assert set(other.splits["test"]["file"][:]) != files["test"]


def test_split_documents_by_group_keeps_each_document_in_one_split() -> None:
    from fimlora.data.builtin import split_documents_by_group

    documents = {f"{g}{i:02d}": g for g in "xyz" for i in range({"x": 3, "y": 10, "z": 25}[g])}
    splits = split_documents_by_group(documents, seed=4)
    assert set(splits) == set(documents)
    for group, n in (("x", 3), ("y", 10), ("z", 25)):
        held = max(1, round(0.1 * n))
        chosen = [splits[d] for d, g in documents.items() if g == group]
        assert chosen.count("validation") == chosen.count("test") == held
    with pytest.raises(FimloraError, match="too few"):
        split_documents_by_group({"a1": "a", "a2": "a"}, seed=0)


def test_causal_lm_has_no_num_labels(brown: TaskData) -> None:
    with pytest.raises(FimloraError, match="no labels"):
        _ = brown.num_labels


def test_builtin_rejects_file_options_and_wrong_task() -> None:
    with pytest.raises(FimloraError, match="text_column"):
        load_task_data("movie-reviews", text_column="review")
    with pytest.raises(FimloraError, match="classification dataset, not causal-lm"):
        load_task_data("movie-reviews", task="causal-lm")
    with pytest.raises(FimloraError, match="Unknown task"):
        load_task_data("movie-reviews", task="regression")


# ----------------------------------------------------------------------------------------------- registry


def test_register_custom_dataset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))

    @register_dataset("tiny", task="causal-lm")
    def load_tiny(*, seed: int) -> TaskData:
        ds = datasets.Dataset.from_dict({"text": [f"document {i}" for i in range(20)]})
        return TaskData("tiny", "causal-lm", registry_module.split_three_ways(ds, seed=seed, source="tiny"))

    assert "tiny" in available_datasets()
    data = load_task_data("tiny", seed=5)
    assert [len(data.splits[s]) for s in SPLITS] == [16, 2, 2]
    with pytest.raises(FimloraError, match="already registered"):
        register_dataset("tiny", task="causal-lm")(load_tiny)
    with pytest.raises(FimloraError, match="Unknown task"):
        register_dataset("other", task="regression")


# -------------------------------------------------------------------------------------------- local files


def _write_csv(path: Path, rows: list[dict]) -> Path:
    header = list(rows[0])
    lines = [",".join(header)] + [",".join(json.dumps(r[h]) for h in header) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _rows(n: int) -> list[dict]:
    sentiments = ["pos", "neg", "neutral"]
    return [{"review": f"review number {i}", "stars": sentiments[i % 3], "extra": i} for i in range(n)]


def test_csv_with_custom_columns_and_string_labels(tmp_path: Path) -> None:
    rows = _rows(60)
    path = _write_csv(tmp_path / "reviews.csv", rows)
    data = load_task_data(str(path), seed=0, text_column="review", label_column="stars")
    assert data.task == "classification"
    assert data.label_names == ["neg", "neutral", "pos"]  # sorted order
    assert [len(data.splits[s]) for s in SPLITS] == [48, 6, 6]
    truth = {r["review"]: r["stars"] for r in rows}
    seen = []
    for s in SPLITS:
        for text, label in _keys(data.splits[s], "text", "label"):
            assert data.label_names[label] == truth[text]
            seen.append(text)
    assert sorted(seen) == sorted(truth)


def test_jsonl_round_trip_and_determinism(tmp_path: Path) -> None:
    rows = _rows(40)
    path = tmp_path / "reviews.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_task_data(str(path), seed=1, text_column="review", label_column="stars")
    again = load_task_data(str(path), seed=1, text_column="review", label_column="stars")
    truth = {r["review"]: r["stars"] for r in rows}
    assert sum(len(data.splits[s]) for s in SPLITS) == 40
    for s in SPLITS:
        assert _keys(data.splits[s], "text", "label") == _keys(again.splits[s], "text", "label")
        for text, label in _keys(data.splits[s], "text", "label"):
            assert data.label_names[label] == truth[text]


def test_json_array_with_default_columns_and_int_labels(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    rows = [{"text": f"t{i}", "label": [3, 7][i % 2]} for i in range(30)]
    path.write_text(json.dumps(rows), encoding="utf-8")
    data = load_task_data(str(path))
    assert data.label_names == ["3", "7"]
    for s in SPLITS:
        for text, label in _keys(data.splits[s], "text", "label"):
            assert int(data.label_names[label]) == [3, 7][int(text[1:]) % 2]


def test_file_without_label_column_is_causal_lm(tmp_path: Path) -> None:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"body": f"doc {i}"}) + "\n" for i in range(30)), encoding="utf-8")
    data = load_task_data(str(path), text_column="body")
    assert data.task == "causal-lm" and data.label_names is None
    assert "label" not in data.splits["train"].column_names


def test_missing_column_names_it_and_lists_available(tmp_path: Path) -> None:
    path = _write_csv(tmp_path / "r.csv", _rows(10))
    with pytest.raises(FimloraError, match=r"'body'.*\['review', 'stars', 'extra'\]"):
        load_task_data(str(path), text_column="body", label_column="stars")
    with pytest.raises(FimloraError, match=r"'sentiment'.*available columns"):
        load_task_data(str(path), text_column="review", label_column="sentiment")
    with pytest.raises(FimloraError, match=r"no text column.*'review'"):
        load_task_data(str(path), label_column="stars")  # no default text column exists
    with pytest.raises(FimloraError, match="no label column"):
        load_task_data(str(path), text_column="review", task="classification")


def test_empty_and_bad_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(FimloraError, match="empty"):
        load_task_data(str(empty))
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n")
    with pytest.raises(FimloraError, match="no data rows"):
        load_task_data(str(header_only))
    with pytest.raises(FimloraError, match="does not exist"):
        load_task_data(str(tmp_path / "missing.jsonl"))
    other = tmp_path / "data.tsv"
    other.write_text("a\tb\n")
    with pytest.raises(FimloraError, match=r"not a \.csv"):
        load_task_data(str(other))
    tiny = _write_csv(tmp_path / "tiny.csv", _rows(2))
    with pytest.raises(FimloraError, match="too few"):
        load_task_data(str(tiny), text_column="review", label_column="stars")


def test_rows_with_missing_text_are_dropped(tmp_path: Path) -> None:
    path = tmp_path / "gaps.jsonl"
    rows = [{"text": None if i % 5 == 0 else f"x{i}", "label": i % 2} for i in range(50)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    data = load_task_data(str(path))
    assert sum(len(data.splits[s]) for s in SPLITS) == 40


# ---------------------------------------------------------------------------------------------------- hub


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # datasets reads these variables at import time, so its config flag is patched as well.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)


def test_hub_id_offline_is_a_clear_error(offline: None) -> None:
    with pytest.raises(FimloraError, match=r"stanfordnlp/sst2.*Hugging Face hub.*HF_HUB_OFFLINE") as err:
        load_task_data("stanfordnlp/sst2", hub_config="default")
    assert "\n" not in str(err.value)


def test_unknown_name_lists_builtins(offline: None) -> None:
    with pytest.raises(FimloraError) as err:
        load_task_data("movie-review")
    message = str(err.value)
    for name in BUILTINS:
        assert name in message
    assert ".csv/.json/.jsonl" in message and "hub" in message
    assert "did you mean 'movie-reviews'" in message


def test_hub_style_splits_are_normalised() -> None:
    # What a hub dataset looks like: a ClassLabel column, a "dev" split and an unlabeled test split.
    label = datasets.ClassLabel(names=["neg", "pos"])
    features = datasets.Features({"sentence": datasets.Value("string"), "label": label})

    def make(texts: list[str], labels: list[int]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"sentence": texts, "label": labels}, features=features)

    raw = datasets.DatasetDict(
        {
            "train": make([f"s{i}" for i in range(50)], [i % 2 for i in range(50)]),
            "dev": make(["d0", "d1"], [0, 1]),
            "test": make(["t0", "t1"], [-1, -1]),
        }
    )
    data = normalize_splits(raw, name="glue-like", seed=0, task=None, text_column=None, label_column=None)
    assert data.task == "classification" and data.label_names == ["neg", "pos"]
    assert data.splits["validation"]["text"][:] == ["d0", "d1"]
    assert [len(data.splits[s]) for s in SPLITS] == [45, 2, 5]  # test carved from train (10%)
    assert not set(data.splits["test"]["text"][:]) & set(data.splits["train"]["text"][:])


def test_regression_labels_are_rejected() -> None:
    raw = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"text": ["a", "b", "c", "d"], "label": [0.1, 0.5, 2.7, 1.0]})}
    )
    with pytest.raises(FimloraError, match="regression"):
        normalize_splits(raw, name="sts", seed=0, task=None, text_column=None, label_column=None)


def test_split_fingerprints_identify_content_not_path(tmp_path: Path) -> None:
    from fimlora.data.registry import split_fingerprints

    rows = "text,label\n" + "".join(f"example {i},{'ab'[i % 2]}\n" for i in range(40))
    (tmp_path / "a.csv").write_text(rows)
    (tmp_path / "b.csv").write_text(rows)
    first = split_fingerprints(load_task_data(str(tmp_path / "a.csv"), seed=0))
    assert set(first) == set(SPLITS)
    assert split_fingerprints(load_task_data(str(tmp_path / "b.csv"), seed=0)) == first
    assert split_fingerprints(load_task_data(str(tmp_path / "a.csv"), seed=1))["train"] != first["train"]
    relabelled = rows.replace(",a\n", ",c\n")
    (tmp_path / "c.csv").write_text(relabelled)
    assert split_fingerprints(load_task_data(str(tmp_path / "c.csv"), seed=0))["train"] != first["train"]
    sealed = split_fingerprints(
        load_task_data(str(tmp_path / "a.csv"), seed=0, splits=("train", "validation"))
    )
    assert sealed == {k: first[k] for k in ("train", "validation")}  # a sealed split is never read
