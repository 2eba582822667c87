"""``torchrun --nproc_per_node 2 -m fimlora.cli run``: one set of run files, and the single-process result.

Two processes split the Fisher pass (sums all-reduced) and each optimiser step's batch (DDP). With
dropout off, the same global batch and the same data order, they must reproduce the single-process run
up to floating-point summation order: Fisher, allocation, per-step losses, adapter weights, metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from safetensors.torch import load_file

from fimlora.config import TrainSettings
from fimlora.errors import FimloraError
from fimlora.train import train


def _without_dropout(model_dir, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    for key in config:
        if "dropout" in key and isinstance(config[key], int | float):
            config[key] = 0.0
    (copy / "config.json").write_text(json.dumps(config))
    return copy


def _run(config_path, out, *, processes):
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
        if processes > 1
        else [sys.executable]
    )
    command = [
        *launcher,
        "-m",
        "fimlora.cli",
        "run",
        str(config_path),
        "--output-dir",
        str(out),
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def _losses(path):
    return [json.loads(line)["loss"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_two_processes_reproduce_the_single_process_run(
    task, tiny_bert_dir, tiny_llama_dir, sentiment_csv, text_jsonl, tmp_path
):
    if task == "classification":
        model, data, methods = tiny_bert_dir, sentiment_csv, ["lora", "fim-lora"]
        options = {"text_column": "review", "label_column": "sentiment"}
    else:
        model, data, options, methods = tiny_llama_dir, text_jsonl, {"text_column": "body"}, ["fim-lora"]
    config = {
        "model": str(_without_dropout(model, tmp_path)),
        "dataset": str(data),
        "dataset_options": options,
        "methods": methods,
        "budget": {"uniform_rank": 2},
        "fisher": {"num_examples": 16, "batch_size": 4},
        "train": {
            "steps": 3,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_length": 16,
            "eval_batch_size": 8,
            "report_to": [],
        },
        # Timings and greedy continuations are not what two processes must reproduce (forgetting is).
        "evaluate": {"inference": False, "prompts": []},
    }
    config_path = tmp_path / "config.yaml"
    config_path.write_text(yaml.safe_dump(config), encoding="utf-8")
    single = _run(config_path, tmp_path / "single", processes=1)
    both = _run(config_path, tmp_path / "ddp", processes=2)

    # The main process alone logs and prints.
    assert both.count("| method |") == 1 and both.count("calibration examples") == 1, both
    assert single.count("| method |") == 1
    fisher_single = load_file(str(tmp_path / "single" / "fisher" / "fisher.safetensors"))
    fisher_ddp = load_file(str(tmp_path / "ddp" / "fisher" / "fisher.safetensors"))
    assert fisher_single.keys() == fisher_ddp.keys()
    for name in fisher_single:
        torch.testing.assert_close(fisher_ddp[name], fisher_single[name], rtol=1e-5, atol=1e-12)
    for method in methods:
        a, b = tmp_path / "single" / method, tmp_path / "ddp" / method
        result_a = json.loads((a / "result.json").read_text())
        result_b = json.loads((b / "result.json").read_text())
        assert (result_a["train"]["processes"], result_b["train"]["processes"]) == (1, 2)
        assert result_a["train"]["examples"] == result_b["train"]["examples"] == 3 * 8
        alloc_a = json.loads((a / "allocation.json").read_text())["ranks"]
        assert json.loads((b / "allocation.json").read_text())["ranks"] == alloc_a
        # The losses the Trainer logs are the global batch's: scaled per process, they would differ by 2×.
        torch.testing.assert_close(
            torch.tensor(_losses(b / "metrics.jsonl")),
            torch.tensor(_losses(a / "metrics.jsonl")),
            rtol=1e-5,
            atol=0,
        )
        weights_a = load_file(str(a / "adapter" / "adapter_model.safetensors"))
        weights_b = load_file(str(b / "adapter" / "adapter_model.safetensors"))
        assert weights_a.keys() == weights_b.keys()
        for name in weights_a:
            torch.testing.assert_close(weights_b[name], weights_a[name], rtol=1e-4, atol=1e-5)
        for key, value in result_a["metrics"].items():
            if isinstance(value, dict):  # forgetting: its two losses (delta, their difference, is ~0 here)
                numbers = {k: value[k] for k in ("base_loss", "tuned_loss")}
                assert numbers and {k: result_b["metrics"][key][k] for k in numbers} == pytest.approx(
                    numbers, rel=1e-4
                ), key
                continue
            assert result_b["metrics"][key] == pytest.approx(value, rel=1e-4), key


def test_a_global_batch_that_does_not_split_over_the_processes_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr("fimlora.train.world_size", lambda: 3)
    settings = TrainSettings(steps=1, batch_size=8)
    with pytest.raises(FimloraError, match=r"train\.batch_size 8 is the global batch .* 3 processes"):
        train(
            torch.nn.Linear(2, 2),
            [1],
            lambda rows: {},
            settings,
            seed=0,
            work_dir=tmp_path,
            metrics_path=tmp_path / "m",
        )
