"""Nothing stale, nothing silent: finished runs and cached Fishers are reused only while they still hold.

Also what a finished classification run records: label names, the majority-class rate, per-class
precision/recall, the confusion matrix and the evaluation time.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import write_sentiment_csv
from transformers import AutoConfig

from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import FISHER_DIR, MODEL_CONFIG_FILE, compute_fisher, prepare, run_experiment
from fimlora.fisher import FisherResult
from fimlora.fisher.result import TENSORS_FILE
from fimlora.reporting.tables import results_table
from fimlora.results import collect_results
from fimlora.runs import RunDirectory


def config_for(model_dir, dataset, out, **changes):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "output_dir": str(out),
        "methods": ["lora", "fim-lora"],
        "budget": {"uniform_rank": 2},
        "fisher": {"num_examples": 16, "batch_size": 8},
        "train": {"steps": 2, "batch_size": 8, "max_length": 16, "eval_batch_size": 16, "report_to": []},
    }
    for key, value in changes.items():
        section, _, leaf = key.partition("__")
        if leaf:
            data[section] = {**data[section], leaf: value}
        else:
            data[key] = value
    return parse_config(data)


@pytest.fixture(scope="module")
def finished(tiny_vocab_bert_dir, sentiment_csv, tmp_path_factory):
    """lora and fim-lora, finished once: (config, results, logs)."""
    out = tmp_path_factory.mktemp("reuse") / "runs"
    config = config_for(tiny_vocab_bert_dir, sentiment_csv, out)
    logs: list[str] = []
    _, results = run_experiment(config, progress=False, log=logs.append)
    return config, results, logs


def _stamps(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_a_finished_run_with_other_settings_is_refused_not_reused(finished, tiny_vocab_bert_dir, tmp_path):
    config, _, _ = finished
    out = Path(config.output_dir)
    before = _stamps(out)
    other_data = write_sentiment_csv(tmp_path / "other.csv", n=120, seed=7)
    changed = config_for(tiny_vocab_bert_dir, other_data, out, train__steps=3)
    with pytest.raises(FimloraError) as info:
        run_experiment(changed, progress=False, log=lambda _: None)
    message = str(info.value)
    assert "lora: dataset (" in message and "train.steps (2 → 3)" in message
    assert "--overwrite" in message and "output_dir" in message and "\n" not in message
    assert _stamps(out) == before  # nothing rewritten: config.yaml still tells the truth
    assert "reviews.csv" in (out / "lora" / "config.yaml").read_text()


def test_settings_that_change_no_number_do_not_block_reuse(finished, tiny_vocab_bert_dir, sentiment_csv):
    config, results, _ = finished
    out = Path(config.output_dir)
    before = _stamps(out)
    same = config_for(tiny_vocab_bert_dir, sentiment_csv, out, train__report_to=["tensorboard"])
    logs: list[str] = []
    _, again = run_experiment(same, progress=False, log=logs.append)
    assert [r["metrics"] for r in again] == [r["metrics"] for r in results]
    assert any("lora: already finished" in line and "same settings" in line for line in logs)
    assert _stamps(out) == before


def test_overwrite_replaces_the_stale_runs(tiny_vocab_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "runs"
    run_experiment(
        config_for(tiny_vocab_bert_dir, sentiment_csv, out, methods=["lora"]), progress=False, log=print
    )
    changed = config_for(tiny_vocab_bert_dir, sentiment_csv, out, methods=["lora"], seed=1)
    with pytest.raises(FimloraError, match=r"seed \(0 → 1\)"):
        run_experiment(changed, progress=False, log=print)
    _, results = run_experiment(changed, progress=False, overwrite=True, log=print)
    assert results[0]["seed"] == 1 and "seed: 1" in (out / "lora" / "config.yaml").read_text()


def test_a_run_without_its_config_is_not_trusted(finished, tmp_path):
    config, _, _ = finished
    copy = tmp_path / "copy"
    (copy / "lora").mkdir(parents=True)
    (copy / "lora" / "result.json").write_bytes(
        (Path(config.output_dir) / "lora" / "result.json").read_bytes()
    )
    moved = config.model_copy(update={"output_dir": str(copy), "methods": ["lora"]})
    with pytest.raises(FimloraError, match=r"config\.yaml is missing"):
        run_experiment(moved, progress=False, log=print)


def test_the_fisher_cache_says_reused_or_recomputed_and_why(
    finished, tiny_vocab_bert_dir, sentiment_csv, tmp_path
):
    config, _, first_logs = finished
    assert any(line.startswith("Fisher (empirical) on 16 calibration examples") for line in first_logs)
    # A third method needs the Fisher again: the cached one is reused, and the log says so.
    logs: list[str] = []
    more = config.model_copy(update={"methods": ["lora", "fim-lora", "random-rank"]})
    run_experiment(more, progress=False, log=logs.append)
    fisher_dir = Path(config.output_dir) / FISHER_DIR
    assert f"Fisher reused from {fisher_dir} (empirical, 16 examples)" in logs
    assert not any("calibration examples" in line for line in logs)

    cache = tmp_path / "cache"
    prepared = prepare(config)
    compute_fisher(prepared, cache, progress=False)
    logs.clear()
    fewer = prepare(config_for(tiny_vocab_bert_dir, sentiment_csv, config.output_dir, fisher__num_examples=8))
    result = compute_fisher(fewer, cache, progress=False, log=logs.append)
    assert result.num_examples == 8
    assert logs == [
        f"Fisher (empirical) on 8 calibration examples, recomputed: settings changed since {cache} was "
        "written (fisher)"
    ]


def test_a_corrupted_cached_fisher_is_recomputed_not_trusted(finished, tmp_path):
    config, _, _ = finished
    prepared = prepare(config)
    cache = tmp_path / "cache"
    original = compute_fisher(prepared, cache, progress=False)
    path = cache / TENSORS_FILE
    raw = bytearray(path.read_bytes())
    raw[-64:-48] = bytes(b ^ 0xFF for b in raw[-64:-48])  # 16 bytes of tensor data, header intact
    path.write_bytes(bytes(raw))
    with pytest.raises(FimloraError, match="SHA-256"):
        FisherResult.load(cache)
    logs: list[str] = []
    again = compute_fisher(prepared, cache, progress=False, log=logs.append)
    assert len(logs) == 1 and "recomputed: the cached copy is unusable" in logs[0] and "SHA-256" in logs[0]
    reloaded = FisherResult.load(cache)  # rewritten, intact
    for name, tensor in original.diagonal.items():
        assert again.diagonal[name].equal(tensor) and reloaded.diagonal[name].equal(tensor)
    path.write_bytes(b"garbage")
    logs.clear()
    compute_fisher(prepared, cache, progress=False, log=logs.append)
    assert "recomputed: the cached copy is unusable" in logs[0]


def test_a_classification_run_records_labels_majority_and_per_class_results(finished, sentiment_csv):
    config, results, _ = finished
    lora = results[0]
    metrics, classes = lora["metrics"], lora["classes"]
    assert lora["id2label"] == {"0": "neg", "1": "pos"} and lora["label2id"] == {"neg": 0, "pos": 1}
    # The evaluation split's true labels, independently: that split of the same seeded data.
    prepared = prepare(config)
    truth = np.asarray(prepared.data.splits[config.train.eval_split]["label"][:])
    counts = np.bincount(truth, minlength=2)
    assert classes["support"] == counts.tolist()
    assert metrics["majority_rate"] == pytest.approx(counts.max() / counts.sum())
    matrix = np.asarray(classes["confusion_matrix"])
    assert matrix.sum(axis=1).tolist() == classes["support"]
    assert matrix.sum(axis=0).tolist() == classes["predicted"]
    assert np.trace(matrix) / matrix.sum() == pytest.approx(metrics["accuracy"])
    for k in range(2):
        assert classes["recall"][k] == pytest.approx(matrix[k, k] / matrix[k].sum())
        predicted = matrix[:, k].sum()
        assert classes["precision"][k] == pytest.approx(matrix[k, k] / predicted if predicted else 0.0)
    assert lora["eval_time_s"] > 0

    table = results_table(results)
    assert "majority-class rate" in table and "neg " in table and "pos " in table

    frame = collect_results(config.output_dir).frame
    assert frame["eval_time_s"].notna().all()
    assert {"majority_rate", "precision.neg", "recall.pos", "confusion_matrix"} <= set(frame.columns)
    assert json.loads(frame["confusion_matrix"].iloc[0]) in (
        [r["classes"]["confusion_matrix"] for r in results]
    )


def test_the_saved_adapter_carries_label_names_and_no_duplicate_heads(finished):
    config, _, _ = finished
    adapter = RunDirectory(Path(config.output_dir) / "lora").file("adapter")
    model_config = AutoConfig.from_pretrained(str(adapter / MODEL_CONFIG_FILE))
    assert model_config.id2label == {0: "neg", 1: "pos"} and model_config.label2id == {"neg": 0, "pos": 1}
    saved = json.loads((adapter / "adapter_config.json").read_text())
    assert (
        len(saved["modules_to_save"]) == len(set(saved["modules_to_save"]))
        and "classifier" in saved["modules_to_save"]
    )


def test_methods_that_used_to_warn_run_without_library_warnings(tiny_vocab_bert_dir, sentiment_csv, tmp_path):
    config = config_for(
        tiny_vocab_bert_dir, sentiment_csv, tmp_path / "runs", methods=["eva", "pissa", "olora", "lora-ga"]
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_experiment(config, progress=False, log=lambda _: None)
    assert [str(w.message)[:80] for w in caught if issubclass(w.category, UserWarning)] == []


def _edit_in_place(path: Path) -> None:
    """One review changed, same path, same size: only the bytes tell the two versions apart."""
    text = path.read_text(encoding="utf-8")
    first = text.splitlines()[1]
    path.write_text(text.replace(first, first.replace("the", "THE", 1), 1), encoding="utf-8")


def test_a_data_file_edited_in_place_is_refused_by_name_not_reused(tiny_vocab_bert_dir, tmp_path):
    data = write_sentiment_csv(tmp_path / "reviews.csv", n=120)
    out = tmp_path / "runs"
    config = config_for(tiny_vocab_bert_dir, data, out, methods=["lora"])
    _, (result,) = run_experiment(config, progress=False, log=lambda _: None)
    (recorded,) = result["data"]["identity"]["files"]
    assert recorded["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()
    assert recorded["path"] == str(data) and result["data"]["rows"]["train"] > 0
    before = _stamps(out)
    _edit_in_place(data)
    for methods in (["lora"], ["lora", "fim-lora"]):  # the same config, and one with a method added
        changed = config_for(tiny_vocab_bert_dir, data, out, methods=methods)
        with pytest.raises(FimloraError) as info:
            run_experiment(changed, progress=False, log=lambda _: None)
        message = str(info.value)
        assert f"lora: data file {data} changed (sha256 {recorded['sha256'][:12]}" in message
        assert "--overwrite" in message and "\n" not in message
    assert _stamps(out) == before
    _, (again,) = run_experiment(config, progress=False, overwrite=True, log=lambda _: None)
    assert again["data"]["identity"]["files"][0]["sha256"] == hashlib.sha256(data.read_bytes()).hexdigest()


def test_a_run_made_before_data_was_recorded_is_not_trusted_for_a_local_file(finished, tmp_path):
    config, _, _ = finished
    copy = tmp_path / "old"
    shutil.copytree(Path(config.output_dir) / "lora", copy / "lora")
    result = json.loads((copy / "lora" / "result.json").read_text())
    del result["data"]
    (copy / "lora" / "result.json").write_text(json.dumps(result))
    old = config.model_copy(update={"output_dir": str(copy), "methods": ["lora"]})
    with pytest.raises(FimloraError, match="were not recorded by the fimlora that made it"):
        run_experiment(old, progress=False, log=lambda _: None)


def test_the_fisher_cache_is_recomputed_when_the_data_file_changes(tiny_vocab_bert_dir, tmp_path):
    data = write_sentiment_csv(tmp_path / "reviews.csv", n=120)
    config = config_for(tiny_vocab_bert_dir, data, tmp_path / "runs")
    cache = tmp_path / "cache"
    compute_fisher(prepare(config), cache, progress=False)
    logs: list[str] = []
    compute_fisher(prepare(config), cache, progress=False, log=logs.append)
    assert logs == [f"Fisher reused from {cache} (empirical, 16 examples)"]
    _edit_in_place(data)
    logs.clear()
    edited = prepare(config)
    compute_fisher(edited, cache, progress=False, log=logs.append)
    assert logs == [
        f"Fisher (empirical) on 16 calibration examples, recomputed: settings changed since {cache} was "
        "written (data)"
    ]
    meta = json.loads((cache / "fisher.json").read_text())["metadata"]
    assert meta["fingerprint_settings"]["data"] == edited.identity.fingerprint()
