"""``data_seed`` draws the split; ``seed`` only the training randomness. Two training seeds are scored on
the same test rows (the ``eval_examples`` subset included); another ``data_seed`` is another split."""

from __future__ import annotations

from pathlib import Path

from fimlora.config import parse_config
from fimlora.experiment import _fisher_fingerprint, evaluation_data, prepare, run_method
from fimlora.runs import RunDirectory


def _config(model_dir, dataset, out, **extra):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "output_dir": str(out),
        "methods": ["lora"],
        "budget": {"uniform_rank": 2},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "max_length": 24,
            "eval_examples": 10,
            "eval_batch_size": 16,
            "report_to": [],
        },
    }
    data.update(extra)
    return parse_config(data)


def _texts(prepared, split: str) -> list[str]:
    return list(prepared.data.splits[split]["text"][:])


def test_two_training_seeds_see_the_same_split_and_test_rows(tiny_bert_dir, sentiment_csv, tmp_path):
    first = prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path / "a", seed=0))
    second = prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path / "b", seed=1))
    assert first.config.data_seed == second.config.data_seed == 0
    for split in ("train", "validation", "test"):
        assert _texts(first, split) == _texts(second, split), split
    scored = [evaluation_data(p, p.config.train.eval_split) for p in (first, second)]
    assert len(scored[0]) == 10 and scored[0]["input_ids"] == scored[1]["input_ids"]
    # ...while the seeds still differ where they should: the task head's initialisation.
    assert not (first.loaded.model.classifier.weight == second.loaded.model.classifier.weight).all()

    other = prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path / "c", seed=0, data_seed=1))
    assert _texts(other, "test") != _texts(first, "test")
    assert set(_texts(other, "test")) | set(_texts(other, "train")) | set(_texts(other, "validation")) == (
        set(_texts(first, "test")) | set(_texts(first, "train")) | set(_texts(first, "validation"))
    )


def test_the_fisher_cache_and_the_result_record_the_data_seed(tiny_bert_dir, sentiment_csv, tmp_path):
    config = _config(tiny_bert_dir, sentiment_csv, tmp_path, data_seed=3)
    moved = config.model_copy(update={"data_seed": 4})
    targets = ["bert.encoder.layer.0.attention.self.query"]
    assert _fisher_fingerprint(config, targets, "diagonal", False) != _fisher_fingerprint(
        moved, targets, "diagonal", False
    )
    prepared = prepare(config)
    result = run_method(prepared, "lora", RunDirectory(Path(tmp_path) / "lora"), progress=False).result
    assert (result["seed"], result["data_seed"]) == (0, 3)
    assert result["task_head"] == {"init": "random"}
