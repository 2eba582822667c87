"""The own-data examples are valid as written: Getting started's (three hand-split CSV files and their
config) loads the way the page says, and the README front page's ten lines pass the same checks. The
path rules hold: a spec's store is relative to the spec file, the dataset and model paths in it to the
working directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import config_data
from fimlora.preflight import check_config, check_runs
from fimlora.sweep import expand, load_spec

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
GETTING_STARTED = (ROOT / "docs" / "getting-started.md").read_text(encoding="utf-8")
README = (ROOT / "README.md").read_text(encoding="utf-8")


def own_data_section() -> str:
    start = GETTING_STARTED.index("## Your own CSV or JSONL")
    return GETTING_STARTED[start : GETTING_STARTED.index("## Paths: relative to what")]


def test_the_own_data_example_runs_as_written(tmp_path, monkeypatch):
    section = own_data_section()
    rows = re.search(r"```csv\n(.*?)```", section, re.S).group(1)
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    (tmp_path / "tweets").mkdir()
    for split in ("train", "validation", "test"):
        (tmp_path / "tweets" / f"{split}.csv").write_text(rows, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # "run from the directory that holds tweets/"
    parsed = parse_config(config)
    check_config(parsed)  # what `fimlora methods tweets.yaml` checks: data, model, budget
    data = config_data(parsed)
    assert data.label_names == ["negative", "neutral", "positive"]  # sorted, as the README says
    assert {s: len(data.splits[s]) for s in data.splits} == {"train": 3, "validation": 3, "test": 3}
    assert data.duplicates == {"validation_in_train": 3, "test_in_train": 3, "test_in_validation": 3}


def test_the_front_page_example_passes_the_checks_of_fimlora_methods(tmp_path, monkeypatch):
    section = README[README.index("## Your own data in ten lines") :]
    config = yaml.safe_load(re.search(r"```yaml\n(.*?)```", section, re.S).group(1))
    (tmp_path / "tweets").mkdir()
    rows = ["tweet,sentiment", *(f"tweet {i},{('negative', 'positive')[i % 2]}" for i in range(12))]
    for split in ("train", "validation", "test"):
        (tmp_path / "tweets" / f"{split}.csv").write_text("\n".join(rows), encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    parsed = parse_config(config)
    check_config(parsed)
    assert parsed.methods == ["lora", "fim-lora", "random-rank"]
    assert config_data(parsed).label_names == ["negative", "positive"]


def test_a_spec_store_is_relative_to_the_spec_and_its_data_paths_to_the_working_directory(
    tmp_path, monkeypatch
):
    rows = [f"tweet number {i},{('negative', 'neutral', 'positive')[i % 3]}" for i in range(30)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "tweets.csv").write_text("\n".join(["tweet,sentiment", *rows]), encoding="utf-8")
    (tmp_path / "specs").mkdir()
    spec_path = tmp_path / "specs" / "spec.yaml"
    spec_path.write_text(
        yaml.safe_dump(
            {
                "name": "paths",
                "output_dir": "store",
                "defaults": {"dataset_options": {"text_column": "tweet", "label_column": "sentiment"}},
                "grid": {"model": ["minilm"], "dataset": ["data/tweets.csv"], "method": ["lora"]},
            }
        ),
        encoding="utf-8",
    )
    monkeypatch.chdir(tmp_path)
    spec = load_spec("specs/spec.yaml")
    (run,) = expand(spec)
    assert spec.output_path == (tmp_path / "specs" / "store").resolve()  # next to the spec
    assert run.config.dataset == "data/tweets.csv"  # as written: it goes into config.yaml and the key
    check_runs([(run.key, run.config)])  # found from the working directory
    monkeypatch.chdir(tmp_path / "specs")
    with pytest.raises(FimloraError, match=r"does not exist \(relative to the working directory"):
        check_runs([(run.key, run.config)])
    assert expand(load_spec("spec.yaml"))[0].key == run.key  # same key from anywhere
