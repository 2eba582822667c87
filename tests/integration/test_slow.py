"""Long runs: the full demo and SmolLM2 causal LM. `make test-slow`; not in CI."""

from __future__ import annotations

import pytest

from fimlora.config import parse_config
from fimlora.demo import demo_config, run_demo
from fimlora.experiment import run_experiment

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def test_full_demo(tmp_path):
    lines: list[str] = []
    report = run_demo(demo_config(output_dir=str(tmp_path / "demo")), log=lines.append)
    text = report.read_text()
    for method in ("lora", "fim-lora", "random-rank"):
        assert f"| {method} |" in text
    assert "Rank allocation: fim-lora" in text
    assert any("| layer |" in line for line in lines)


def test_smollm2_causal_lm_few_steps(tmp_path):
    config = parse_config(
        {
            "model": "smollm2",
            "dataset": "brown-fiction",
            "output_dir": str(tmp_path),
            "budget": {"uniform_rank": 2},
            "fisher": {"num_examples": 8, "batch_size": 4},
            "train": {
                "steps": 2,
                "batch_size": 2,
                "max_length": 64,
                "eval_examples": 8,
                "eval_batch_size": 4,
            },
        }
    )
    prepared, results = run_experiment(config, progress=False, log=lambda _: None)
    assert len(prepared.targets) == 210
    for r in results:
        assert r["adapter_params"] <= r["budget"] and r["head_params"] == 0
        assert r["metrics"]["perplexity"] > 1


def _every_preset_config(model, dataset, out, **train):
    from method_runs import SELF_CONTAINED_PRESETS

    return parse_config(
        {
            "model": model,
            "dataset": dataset,
            "output_dir": str(out),
            "methods": SELF_CONTAINED_PRESETS,
            "budget": {"uniform_rank": 4},
            "fisher": {"num_examples": 16, "batch_size": 4},
            "train": {"steps": 3, "eval_examples": 16, "eval_batch_size": 8, "report_to": [], **train},
            "method_options": {
                "adalora": {"tinit_ratio": 0.0, "tfinal_ratio": 0.34},
                # 3 steps: the default [0.1, 0.3] would put both re-allocations on step 1.
                "fisher_online": {"reallocate_at": [0.34]},
            },
        }
    )


def test_every_method_on_minilm_classification(tmp_path):
    config = _every_preset_config("minilm", "movie-reviews", tmp_path, batch_size=8, max_length=32)
    _, results = run_experiment(config, progress=False, log=lambda _: None)
    assert {r["method"] for r in results} == set(config.method_names)
    for r in results:
        if r["budget_matched"]:
            assert r["effective_adapter_params"] <= r["budget"], r["method"]
        assert 0 <= r["metrics"]["accuracy"] <= 1


def test_every_method_on_smollm2_causal_lm(tmp_path):
    config = _every_preset_config(
        "smollm2", "brown-fiction", tmp_path, batch_size=2, max_length=32, learning_rate=1e-4
    )
    _, results = run_experiment(config, progress=False, log=lambda _: None)
    assert {r["method"] for r in results} == set(config.method_names)
    for r in results:
        if r["budget_matched"]:
            assert r["effective_adapter_params"] <= r["budget"], r["method"]
        assert r["metrics"]["perplexity"] > 1
