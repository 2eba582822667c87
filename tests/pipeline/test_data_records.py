"""What a run records and says about its data: the share of examples cut at ``train.max_length`` and the
evaluation rows that also occur in an earlier split (``result.json``, one warning line, the report, the
results table), ``drop_eval_duplicates``, and ``--no-progress`` hiding ``datasets``' tokenizing bars (bars
shown by default, by ``run`` and by the analyses that train or take the Fisher too)."""

from __future__ import annotations

import csv
import json
import logging
import random
from pathlib import Path

import pytest
from tiny_runs import FILLER, NEGATIVE, POSITIVE, write_sentiment_csv

import fimlora.data.tokenize as tokenize_module
from fimlora.cli import main
from fimlora.config import parse_config
from fimlora.experiment import run_experiment
from fimlora.reporting.report import build_report
from fimlora.results import collect_results


def review(rng: random.Random, words: int) -> tuple[str, str]:
    positive = rng.random() < 0.5
    text = [*(rng.choice(FILLER) for _ in range(words - 1)), rng.choice(POSITIVE if positive else NEGATIVE)]
    rng.shuffle(text)
    return " ".join(text), "pos" if positive else "neg"


def write(path: Path, rows: list[tuple[str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        writer.writerows(rows)
    return path


@pytest.fixture(scope="module")
def leaky_splits(tmp_path_factory) -> Path:
    """Own split files: train of long and short reviews; 5 of the 20 test reviews are train reviews
    (one upper-cased), 2 of the 16 validation reviews too."""
    rng = random.Random(0)
    directory = tmp_path_factory.mktemp("leaky")
    train = [review(rng, 30 if i % 2 else 5) for i in range(80)]  # half longer than 16 tokens
    write(directory / "train.csv", train)
    write(directory / "validation.csv", [*(review(rng, 6) for _ in range(14)), train[0], train[2]])
    test = [*(review(rng, 6) for _ in range(15)), *train[4:8], (train[8][0].upper(), train[8][1])]
    write(directory / "test.csv", test)
    return directory


def config_for(model: Path, data: Path, out: Path, **options):
    return parse_config(
        {
            "model": str(model),
            "dataset": str(data),
            "dataset_options": {"text_column": "review", "label_column": "sentiment", **options},
            "output_dir": str(out),
            "methods": ["lora"],
            "budget": {"uniform_rank": 2},
            "train": {"steps": 2, "batch_size": 8, "max_length": 16, "report_to": []},
            "evaluate": {"inference": False},
        }
    )


def test_truncation_and_duplicates_are_recorded_warned_about_and_reported(
    tiny_vocab_bert_dir, leaky_splits, tmp_path, caplog
):
    out = tmp_path / "runs"
    with caplog.at_level(logging.WARNING):
        _, (result,) = run_experiment(
            config_for(tiny_vocab_bert_dir, leaky_splits, out), progress=False, log=lambda _: None
        )
    data = result["data"]
    assert data["truncated"] == {"train": 0.5, "validation": 0.0, "test": 0.1}  # 2 long train copies
    assert data["duplicates"] == {"validation_in_train": 2, "test_in_train": 5, "test_in_validation": 0}
    assert data["dropped_duplicates"] is None and data["rows"] == {"train": 80, "validation": 16, "test": 20}
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len([w for w in warnings if "are cut: 50% of train" in w]) == 1
    assert len([w for w in warnings if "5 of 20 test rows also occur in train" in w]) == 1

    frame = collect_results(out).frame
    assert frame["truncated.train"].tolist() == [0.5] and frame["duplicates.test_in_train"].tolist() == [5]
    assert frame["data_version"].iloc[0].startswith("sha256:")
    report = build_report(out, tmp_path / "report", n_resamples=100).markdown.read_text(encoding="utf-8")
    assert (
        "Examples cut at `train.max_length` (most in any run): 50% of train, 0% of validation, 10% of test"
        in report
    )
    assert "5 test rows also in train" in report and "drop_eval_duplicates: true" in report


def test_drop_eval_duplicates_scores_only_unseen_rows(tiny_vocab_bert_dir, leaky_splits, tmp_path):
    config = config_for(tiny_vocab_bert_dir, leaky_splits, tmp_path / "runs", drop_eval_duplicates=True)
    config = config.model_copy(update={"train": config.train.model_copy(update={"eval_split": "test"})})
    _, (result,) = run_experiment(config, progress=False, log=lambda _: None)
    assert result["data"]["dropped_duplicates"] == {"validation": 2, "test": 5}
    assert result["data"]["rows"]["test"] == 15 and sum(result["classes"]["support"]) == 15
    assert result["data"]["duplicates"]["test_in_train"] == 5  # what was found stays on record


def stderr_of(
    capsys, monkeypatch, model: Path, tmp_path: Path, argv: list[str], seed: int, methods=("lora",)
) -> str:
    """``fimlora <argv[0]> CONFIG <argv[1:]>`` on fresh reviews; its stderr once it exited 0. ``seed``
    must differ between the calls of a session, so that no split's tokenized copy is cached."""
    # Small data shows no tokenizing bar anyway; make every split count as large, as a big file would.
    monkeypatch.setattr(tokenize_module, "_PROGRESS_MIN_ROWS", 1)
    data = write_sentiment_csv(tmp_path / "reviews.csv", n=60, seed=seed)
    config = tmp_path / "config.yaml"
    settings = config_for(model, data, tmp_path / "runs").model_dump(mode="json")
    settings["methods"] = list(methods)
    config.write_text(json.dumps(settings), encoding="utf-8")
    with pytest.raises(SystemExit) as exit_info:
        main([argv[0], str(config), *argv[1:]])
    err = capsys.readouterr().err
    assert exit_info.value.code == 0, err
    return err


@pytest.mark.parametrize("progress", [False, True])
def test_no_progress_also_hides_the_tokenizing_bars(
    capsys, monkeypatch, tiny_vocab_bert_dir, tmp_path, progress
):
    argv = ["run", "--progress" if progress else "--no-progress"]
    err = stderr_of(capsys, monkeypatch, tiny_vocab_bert_dir, tmp_path, argv, seed=int(progress))
    assert ("Tokenizing" in err) is progress, err


# Per analysis: its options, what it shows besides tokenizing (the calibration's Fisher passes, the
# trajectory's training, the Fisher pass `methods` takes to count fim-lora), a data seed of its own (2 to
# 7: the test above takes 0 and 1) and the config's methods.
ANALYSES = {
    "calibration": (
        ["--sizes", "4", "--repeats", "2", "--no-mc"],
        "Fisher diagonal (empirical)",
        2,
        ("lora",),
    ),
    "fisher-trajectory": ([], "loss=", 4, ("lora",)),
    "methods": ([], "Fisher trace (empirical)", 6, ("lora", "fim-lora")),
}


@pytest.mark.parametrize("command", sorted(ANALYSES))
@pytest.mark.parametrize("flag", [[], ["--no-progress"]], ids=["default", "no-progress"])
def test_the_analyses_show_progress_by_default_and_hide_all_of_it_when_asked(
    capsys, monkeypatch, tiny_vocab_bert_dir, tmp_path, command, flag
):
    options, own_bar, seed, methods = ANALYSES[command]
    argv = [command, *options, *flag]
    err = stderr_of(
        capsys, monkeypatch, tiny_vocab_bert_dir, tmp_path, argv, seed=seed + len(flag), methods=methods
    )
    assert ("Tokenizing" in err) is (not flag), err
    assert (own_bar in err) is (not flag), err
