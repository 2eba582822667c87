"""End to end on tiny saved models: equal budgets, complete run directories, skip/resume, PEFT reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import NO_DEPLOYMENT_FIGURES

from fimlora.allocation import Allocation
from fimlora.config import parse_config
from fimlora.experiment import compute_fisher, prepare, run_experiment, run_method
from fimlora.methods import get_allocation, resolve_method
from fimlora.runs import RunDirectory


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


RUN_FILES = {"config.yaml", "environment.json", "allocation.json", "adapter", "metrics.jsonl", "result.json"}


def tiny_config(model_dir, dataset, out, **extra):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "output_dir": str(out),
        "budget": {"uniform_rank": 2},
        "fisher": {"num_examples": 24, "batch_size": 8},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_length": 24,
            "eval_batch_size": 16,
        },
        "evaluate": NO_DEPLOYMENT_FIGURES,
    }
    data.update(extra)
    return parse_config(data)


@pytest.fixture(scope="module")
def classification_runs(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    config = tiny_config(
        tiny_bert_dir,
        sentiment_csv,
        out,
        dataset_options={"text_column": "review", "label_column": "sentiment"},
    )
    prepared, results = run_experiment(config, progress=False, log=lambda _: None)
    return config, prepared, results


def test_every_method_spends_the_same_budget(classification_runs):
    _, prepared, results = classification_runs
    assert [r["method"] for r in results] == ["lora", "fim-lora", "random-rank"]
    # Uniform rank 2 on 12 modules of a 16-wide, 32-FFN BERT: 2·(4·32 + 2·48)·2 layers.
    assert prepared.budget == 2 * (8 * 32 + 4 * 48)
    for r in results:
        assert r["adapter_params"] <= r["budget"] == prepared.budget
        assert r["adapter_params"] == r["allocation"]["num_params"]
    assert len({r["head_params"] for r in results}) == 1 and results[0]["head_params"] > 0
    fim, rnd = results[1]["allocation"], results[2]["allocation"]
    assert fim["num_params"] == rnd["num_params"]
    assert results[0]["allocation"]["min_rank"] == results[0]["allocation"]["max_rank"] == 2


def test_run_directories_are_complete(classification_runs):
    config, _, results = classification_runs
    for r in results:
        run = RunDirectory(f"{config.output_dir}/{r['method']}")
        assert {p.name for p in run.path.iterdir()} >= RUN_FILES
        assert run.is_finished
        steps = [json.loads(line)["step"] for line in run.file("metrics.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3]
        env = json.loads(run.file("environment.json").read_text())
        assert env["seed"] == 0 and env["packages"]["peft"]
        assert 0.0 <= r["metrics"]["accuracy"] <= 1.0 and r["metrics"]["num_examples"] == 16
        assert run.file("adapter").stat().st_mode & 0o777 == 0o777 & ~_umask()  # not tempfile's 0700
        has_fisher = run.file("fisher.safetensors").exists()
        assert has_fisher == (r["method"] != "lora")
        cfg = run.file("config.yaml").read_text()
        assert f"- {r['method']}" in cfg


def test_finished_runs_are_skipped_and_unfinished_ones_rerun(classification_runs):
    config, _, results = classification_runs
    fim_dir = RunDirectory(f"{config.output_dir}/fim-lora")
    stamp = fim_dir.file("result.json").stat().st_mtime_ns
    # Simulate a killed run: random-rank lost its result and left a stray partial file.
    rnd = RunDirectory(f"{config.output_dir}/random-rank")
    rnd.file("result.json").unlink()
    rnd.file("stray.partial").write_text("half")
    assert not rnd.is_finished
    logs: list[str] = []
    _, again = run_experiment(config, progress=False, log=logs.append)
    assert fim_dir.file("result.json").stat().st_mtime_ns == stamp
    assert any("fim-lora: already finished" in line for line in logs)
    assert rnd.is_finished and not rnd.file("stray.partial").exists()
    assert again[2]["adapter_params"] == results[2]["adapter_params"]


def _reload_logits_in_fresh_process(model_class, base_dir, adapter_dir, inputs_path, out_path):
    """Plain transformers + PEFT, nothing from fimlora, in a new interpreter."""
    code = textwrap.dedent(
        f"""
        import torch
        from peft import PeftModel
        from safetensors.torch import load_file, save_file
        from transformers import {model_class}
        base = {model_class}.from_pretrained({str(base_dir)!r})
        model = PeftModel.from_pretrained(base, {str(adapter_dir)!r}).eval()
        inputs = load_file({str(inputs_path)!r})
        with torch.no_grad():
            logits = model(**inputs).logits
        save_file({{"logits": logits.contiguous()}}, {str(out_path)!r})
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"HF_HUB_OFFLINE": "1", "PATH": ""})


def _fresh_process_logits(model_class, base_dir, adapter_dir, inputs, tmp_path):
    save_file(inputs, str(tmp_path / "inputs.safetensors"))
    out = tmp_path / "logits.safetensors"
    _reload_logits_in_fresh_process(model_class, base_dir, adapter_dir, tmp_path / "inputs.safetensors", out)
    return load_file(str(out))["logits"]


def _train_one(config, method):
    prepared = prepare(config)
    if get_allocation(resolve_method(method).allocation).needs:
        prepared.fisher_dir = Path(config.output_dir) / "fisher"
        prepared.fisher = compute_fisher(prepared, prepared.fisher_dir, progress=False)
    outcome = run_method(prepared, method, RunDirectory(Path(config.output_dir) / method), progress=False)
    return prepared, outcome


@pytest.mark.parametrize("scaling", ["alpha_over_r", "constant"])
def test_trained_classifier_reloads_in_plain_peft_with_identical_logits(
    tiny_bert_dir, sentiment_csv, tmp_path, scaling
):
    config = tiny_config(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path / "runs",
        dataset_options={"text_column": "review", "label_column": "sentiment"},
        lora={"scaling": scaling, "dropout": 0.1},
    )
    prepared, outcome = _train_one(config, "fim-lora")
    allocation = Allocation.load(tmp_path / "runs" / "fim-lora" / "allocation.json")
    assert len(set(allocation.ranks.values())) > 1, "the Fisher should give unequal ranks here"
    adapter_dir = tmp_path / "runs" / "fim-lora" / "adapter"
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    assert adapter_config["rank_pattern"] and not any(
        k.startswith("base_model") for k in adapter_config["rank_pattern"]
    )
    for name, module in outcome.model.named_modules():
        if isinstance(getattr(module, "r", None), dict) and "default" in module.r:
            rank = allocation.ranks[name.removeprefix("base_model.model.")]
            assert module.r["default"] == rank
            expected_scale = config.lora_alpha / (
                rank if scaling == "alpha_over_r" else allocation.reference_rank
            )
            assert module.scaling["default"] == pytest.approx(expected_scale)
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    got = _fresh_process_logits(
        "AutoModelForSequenceClassification", prepared.loaded.source, adapter_dir, inputs, tmp_path
    )
    assert torch.equal(got, want)


def test_trained_causal_lm_reloads_in_plain_peft_with_identical_logits(tiny_llama_dir, text_jsonl, tmp_path):
    config = tiny_config(
        tiny_llama_dir,
        text_jsonl,
        tmp_path / "runs",
        methods=["fim-lora"],
        dataset_options={"text_column": "body"},
        train={"steps": 2, "batch_size": 4, "learning_rate": 1e-2, "max_length": 16, "eval_batch_size": 8},
    )
    prepared, outcome = _train_one(config, "fim-lora")
    result = outcome.result
    assert result["task"] == "causal-lm" and result["metrics"]["perplexity"] > 1
    assert result["head_params"] == 0
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(2)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    adapter_dir = tmp_path / "runs" / "fim-lora" / "adapter"
    got = _fresh_process_logits("AutoModelForCausalLM", prepared.loaded.source, adapter_dir, inputs, tmp_path)
    assert torch.equal(got, want)


def test_same_seed_reproduces_the_run_exactly(tiny_bert_dir, sentiment_csv, tmp_path):
    outcomes = []
    for attempt in ("a", "b"):
        config = tiny_config(
            tiny_bert_dir,
            sentiment_csv,
            tmp_path / attempt,
            methods=["fim-lora"],
            dataset_options={"text_column": "review", "label_column": "sentiment"},
        )
        _, results = run_experiment(config, progress=False, log=lambda _: None)
        weights = load_file(str(tmp_path / attempt / "fim-lora" / "adapter" / "adapter_model.safetensors"))
        outcomes.append((results[0], weights))
    (first, w1), (second, w2) = outcomes
    assert first["metrics"] == second["metrics"]
    assert first["train"]["final_train_loss"] == second["train"]["final_train_loss"]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
