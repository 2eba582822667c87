"""Nothing can be searched that the trials would not honour, nor anything that defines the data: every
config field the preparation step reads is part of the prepared-data cache key or refused as a search
dimension, and the tuned-data_seed leak of test rows is refused."""

from __future__ import annotations

import pytest
import yaml
from pydantic import BaseModel
from tune_runs import defaults, write_spec

from fimlora.cli import main
from fimlora.config import ExperimentConfig, parse_config
from fimlora.data import tokenize
from fimlora.errors import FimloraError
from fimlora.experiment import prepare
from fimlora.sweep import load_spec, parse_spec
from fimlora.tune import expand_tuned, parse_tune
from fimlora.tune.cells import TUNING_SPLITS, with_values
from fimlora.tune.objective import PreparedCache
from fimlora.tune.preparation import HONOURED, PREPARATION_KEYS, REFUSED, covers, preparation_key

# Methods whose reads reach a sub-model as a whole rather than field by field.
_WHOLE = {"model_dump", "model_dump_json", "__dict__", "model_copy"}


def _paths(model: BaseModel, prefix: str = "") -> dict[int, str]:
    """id → dotted path of ``model`` and every config sub-model below it."""
    found = {id(model): prefix.rstrip(".")}
    for name in type(model).model_fields:
        value = object.__getattribute__(model, name)
        if isinstance(value, BaseModel):
            found.update(_paths(value, f"{prefix}{name}."))
    return found


def read_by_prepare(config: ExperimentConfig, monkeypatch) -> set[str]:
    """The dotted config keys that ``prepare(config)`` reads: every attribute access on the config and
    its sub-models is recorded while it runs."""
    paths = _paths(config)
    read: set[str] = set()
    original = BaseModel.__getattribute__

    def recording(self, name):
        value = original(self, name)
        where = paths.get(id(self))
        if where is not None:
            if name in type(self).model_fields and id(value) not in paths:  # a leaf, not a section
                read.add(f"{where}.{name}" if where else name)
            elif name in _WHOLE and where:
                read.add(where)
        return value

    with monkeypatch.context() as patch:
        patch.setattr(BaseModel, "__getattribute__", recording)
        prepare(config, splits=TUNING_SPLITS)
    return read


def trial_config(model, data, tmp_path, **changes) -> ExperimentConfig:
    base = {
        "model": str(model),
        "dataset": str(data),
        "methods": ["fim-lora"],
        "budget": {"uniform_rank": 2},
        "output_dir": str(tmp_path / "run"),
        **defaults(),
    }
    return parse_config(with_values(base, changes))


def test_every_field_the_preparation_reads_is_in_the_cache_key_or_refused(
    small_bert_dir, split_dir, tmp_path, monkeypatch
):
    read = set()
    for head in ("random", "probe"):  # the probe branch reads the fisher.probe settings
        config = trial_config(small_bert_dir, split_dir, tmp_path, **{"fisher.head": head})
        read |= read_by_prepare(config, monkeypatch)
    # The instrument sees what it must: the split, the data, the model, the budget, the probe.
    assert {"data_seed", "dataset", "model", "quantization", "budget.uniform_rank"} <= read
    assert {"train.max_length", "fisher.head", "fisher.probe.l2", "allocation.r_min"} <= read
    uncovered = sorted(key for key in read if not any(covers(key, k) for k in PREPARATION_KEYS))
    assert not uncovered, f"prepare() reads {uncovered}: add them to fimlora.tune.preparation"
    for key in read:  # each is honoured through the cache key, or refused as a search dimension
        honoured = any(covers(key, k) for k in HONOURED)
        refused = any(covers(key, k) for k in REFUSED)
        assert honoured != refused, key


@pytest.mark.parametrize(
    ("key", "before", "after"),
    [
        ("train.max_length", 16, 12),
        ("allocation.r_min", 1, 2),
        ("allocation.r_max", None, 4),
        ("fisher.head", "random", "probe"),
        ("fisher.probe.l2", 1e-3, 1e-2),
        ("fisher.batch_size", 8, 4),
    ],
)
def test_a_searched_preparation_setting_changes_the_cache_key(key, before, after, tmp_path):
    assert any(covers(key, k) for k in HONOURED)
    keys = [
        preparation_key(trial_config("m", "movie-reviews", tmp_path, **{key: value}))
        for value in (before, after)
    ]
    assert keys[0] != keys[1]
    # What a trial varies outside the preparation (the learning rate) leaves the key alone.
    rate = trial_config("m", "movie-reviews", tmp_path, **{key: before, "train.learning_rate": 0.5})
    assert preparation_key(rate) == keys[0]


def test_trials_that_search_the_head_get_a_model_prepared_with_their_head(
    small_bert_dir, split_dir, tmp_path
):
    cache = PreparedCache(capacity=2)
    random_head = trial_config(small_bert_dir, split_dir, tmp_path, **{"fisher.head": "random"})
    probe_head = trial_config(small_bert_dir, split_dir, tmp_path, **{"fisher.head": "probe"})
    first, probed = cache.get(random_head), cache.get(probe_head)
    assert first.head_probe is None and probed.head_probe is not None
    assert cache.get(random_head) is first  # both kept: two entries fit
    rate = trial_config(
        small_bert_dir, split_dir, tmp_path, **{"fisher.head": "random", "train.learning_rate": 0.3}
    )
    assert cache.get(rate) is first  # another learning rate prepares nothing again


GRID = {"model": ["some/model"], "dataset": ["movie-reviews"], "method": ["lora"], "seed": [0]}


@pytest.mark.parametrize(
    "key",
    [
        "data_seed",
        "dataset",
        "dataset.test",  # a split file
        "dataset_options.text_column",
        "model",
        "quantization",
        "trust_remote_code",
        "task",
        "budget.params",
        "budget.uniform_rank",
        "target_modules",
        "seed",
        "train.eval_examples",
    ],
)
def test_what_defines_the_data_model_or_budget_is_refused_naming_the_key(key):
    tune = {"trials": 2, "methods": {"lora": {key: {"choices": [1, 2]}}}}
    with pytest.raises(FimloraError) as info:
        parse_tune(parse_spec({"name": "s", "grid": GRID, "tune": tune}, base_dir="/x"))
    message = str(info.value)
    assert message.startswith(f"tune.methods.lora.{key}: ") and "cannot be searched" in message
    assert "\n" not in message


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_tuning_the_data_seed_on_a_single_file_dataset_is_refused(capsys, tmp_path, sentiment_csv):
    # The reproduction: a tuned data_seed would carve another split for the final test runs, whose
    # test rows the tuning had trained on.
    grid = {**GRID, "model": [str(tmp_path / "model")], "dataset": [str(sentiment_csv)]}
    path = write_spec(tmp_path, grid, {"trials": 2, "methods": {"lora": {"data_seed": {"choices": [1]}}}})
    code, _, err = run_cli(capsys, "tune", path)
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and "Traceback" not in err
    assert "tune.methods.lora.data_seed: data_seed defines the train/validation/test split" in lines[0]
    assert not (tmp_path / "store").exists()
    # A tuned.yaml that carries a data_seed anyway (hand-edited, or older) cannot reach the final runs.
    spec_path = write_spec(tmp_path, grid, {"trials": 2})
    tuned = tmp_path / "tuned.yaml"
    cell = {
        "model": grid["model"][0],
        "dataset": grid["dataset"][0],
        "method": "lora",
        "budget": {},
        "params": {"train.learning_rate": 1e-3, "data_seed": 1},
        "metric": "accuracy",
        "validation_score": 0.8,
        "trials": {"complete": 2, "pruned": 0, "failed": 0},
    }
    document = {"name": "s", "split": "validation", "seed": 0, "trials_per_study": 2, "storage": "x"}
    tuned.write_text(yaml.safe_dump({**document, "cells": [cell]}), encoding="utf-8")
    with pytest.raises(FimloraError, match=r"data_seed: data_seed defines the train/validation/test split"):
        expand_tuned(load_spec(spec_path), tuned)


def test_a_trial_prepares_its_data_without_progress_bars(
    small_bert_dir, split_dir, tmp_path, capfd, monkeypatch
):
    """A tuning worker's output is one line per trial; ``datasets``' tokenizing bars, drawn again by
    every worker for every study, would bury those lines in a log."""
    monkeypatch.setattr(tokenize, "_PROGRESS_MIN_ROWS", 0)  # a split large enough for a bar
    PreparedCache().get(trial_config(small_bert_dir, split_dir, tmp_path))
    assert "Tokenizing" not in capfd.readouterr().err
