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
