"""The real pretrained MiniLM and the real movie-review data, end to end (small, so it runs in CI)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from fimlora.config import parse_config
from fimlora.experiment import compute_fisher, prepare, run_method
from fimlora.models import default_target_modules
from fimlora.runs import RunDirectory

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    out = tmp_path_factory.mktemp("minilm-runs")
    config = parse_config(
        {
            "model": "minilm",
            "dataset": "movie-reviews",
            "output_dir": str(out),
            "budget": {"uniform_rank": 4},
            "fisher": {"num_examples": 32, "batch_size": 16},
            "train": {"steps": 4, "batch_size": 8, "learning_rate": 2e-3, "eval_examples": 64},
        }
    )
    prepared = prepare(config)
    prepared.fisher_dir = out / "fisher"
    prepared.fisher = compute_fisher(prepared, prepared.fisher_dir, progress=False)
    return prepared


def test_minilm_targets_and_budget(prepared):
    assert len(prepared.targets) == 36 == len(default_target_modules(prepared.loaded.model))
    assert not any("pooler" in n or "classifier" in n or "embeddings" in n for n in prepared.targets)
    # 6 layers × (4 attention maps 384→384 + 384→1536 + 1536→384), rank 4.
    assert prepared.budget == 4 * 6 * (4 * 768 + 2 * 1920) == 165_888
    assert prepared.loaded.head_modules == ["classifier"]
    assert prepared.fisher.num_examples == 32
    scores = prepared.fisher.scores("mean")
    assert all(v > 0 for v in scores.values())


def test_fim_lora_on_minilm_reloads_in_plain_peft(prepared, tmp_path):
    config = prepared.config
    run = RunDirectory(f"{config.output_dir}/fim-lora")
    outcome = run_method(prepared, "fim-lora", run, progress=False)
    result = outcome.result
    assert result["adapter_params"] <= 165_888 and result["head_params"] == 384 * 2 + 2
    assert result["metrics"]["num_examples"] == 64
    assert json.loads(run.file("result.json").read_text())["status"] == "finished"

    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(4)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    code = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import AutoModelForSequenceClassification
        base = AutoModelForSequenceClassification.from_pretrained({prepared.loaded.source!r}, num_labels=2)
        model = PeftModel.from_pretrained(base, {str(run.file("adapter"))!r}).eval()
        with torch.no_grad():
            logits = model(**load_file({str(tmp_path / "inputs.safetensors")!r})).logits
        save_file({{"logits": logits.contiguous()}}, {str(tmp_path / "out.safetensors")!r})
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["logits"], want)
