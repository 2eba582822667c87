"""An adapter-only export of a classifier carries its label names, and the Deployment page's recipe loads
it with plain transformers + PEFT into the run's model; a run without its adapter (the committed experiments)
says how to re-create it."""

from __future__ import annotations

import csv
import json
import random
import re
import shutil
from pathlib import Path

import pytest
import yaml
from deploy.trained import logits_of, relative_error, tiny_config, train_runs
from tiny_runs import FILLER

from fimlora.config import parse_config
from fimlora.deploy import export_run
from fimlora.deploy.export import SERVING_FILE
from fimlora.deploy.loading import finished_run
from fimlora.errors import FimloraError

REPO = Path(__file__).resolve().parents[2]
TOPICS = {"sport": ["goal", "match"], "food": ["bread", "soup"], "music": ["song", "band"]}


@pytest.fixture(scope="module")
def three_classes(tiny_bert_dir, tmp_path_factory):
    """A finished lora run on three classes (so a base model built with the default two cannot load it)."""
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("topics")
    data = root / "topics.csv"
    with data.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "sentiment"])
        for i in range(90):
            topic = sorted(TOPICS)[i % 3]
            writer.writerow([" ".join([*rng.sample(FILLER, 4), rng.choice(TOPICS[topic])]), topic])
    _, models = train_runs(tiny_config(tiny_bert_dir, data, root / "runs", ["lora"]))
    return root / "runs" / "lora", models["lora"]


def test_an_adapter_only_export_loads_with_plain_peft_as_the_readme_says(three_classes, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    run, trained = three_classes
    result = export_run(run, tmp_path / "deploy", adapter_only=True)
    serving = json.loads((result.out / SERVING_FILE).read_text())
    assert serving["task"] == "classification" and serving["num_labels"] == 3
    assert serving["id2label"] == {"0": "food", "1": "music", "2": "sport"}
    assert serving["label2id"] == {"food": 0, "music": 1, "sport": 2}
    assert any("3 classes (food, music, sport)" in note for note in result.notes)

    # The Deployment page's recipe, as written there, on this export.
    page = (REPO / "docs" / "deployment.md").read_text(encoding="utf-8")
    recipe = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    namespace: dict = {}
    exec(compile(recipe.replace("deploy/adapter", str(result.out)), "docs/deployment.md", "exec"), namespace)
    model = namespace["model"]
    assert isinstance(model, PeftModel) and model.config.id2label == {0: "food", 1: "music", 2: "sport"}
    tokenizer = AutoTokenizer.from_pretrained(serving["base_model_name_or_path"])
    assert relative_error(logits_of(model, tokenizer), logits_of(trained, tokenizer)) <= 1e-4
    # Without the label settings the base gets a 2-class head the adapter's head does not fit.
    base = AutoModelForSequenceClassification.from_pretrained(serving["base_model_name_or_path"])
    with pytest.raises(RuntimeError, match="size mismatch"):
        PeftModel.from_pretrained(base, str(result.out / "adapter"))


def test_a_run_without_its_adapter_says_how_to_recreate_it(three_classes, tmp_path):
    run, _ = three_classes
    records = Path(shutil.copytree(run, tmp_path / "runs" / "lora"))
    shutil.rmtree(records / "adapter")
    with pytest.raises(FimloraError) as info:
        finished_run(records)
    command = f"fimlora run {records / 'config.yaml'} --output-dir {records.parent} --overwrite"
    assert command in str(info.value)


def test_the_committed_smollm2_runs_name_a_command_that_recreates_their_adapters():
    """The Deployment page's `fimlora generate` experiment commits its records, not its adapters: the
    command the error names re-runs exactly that method into exactly that directory."""
    runs = REPO / "experiments" / "smollm2-brown-fiction" / "runs"
    for method in ("lora", "fim-lora"):
        directory = runs / method
        assert not (directory / "adapter").exists()  # a fresh clone holds none
        with pytest.raises(FimloraError, match="--overwrite"):
            finished_run(directory)
        config = parse_config(yaml.safe_load((directory / "config.yaml").read_text(encoding="utf-8")))
        assert config.method_names == [method] and config.model == "smollm2"
        assert (REPO / config.output_dir).resolve() == runs.resolve()  # from the repository root
