"""Tiny finished runs for the deployment tests: every preset trained two steps, kept with its model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from fimlora.config import parse_config
from fimlora.experiment import calibrate, prepare, run_method
from fimlora.methods import get_allocation, resolve_method
from fimlora.runs import RunDirectory


def tiny_config(model_dir: Path, dataset: Path, out: Path, methods: list[str], **extra: Any) -> Any:
    classification = dataset.suffix == ".csv"
    data: dict[str, Any] = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": (
            {"text_column": "review", "label_column": "sentiment"}
            if classification
            else {"text_column": "body"}
        ),
        "output_dir": str(out),
        "methods": methods,
        "budget": {"uniform_rank": 4},
        "fisher": {"num_examples": 16, "batch_size": 8},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "learning_rate": 2e-2,
            "max_length": 24,
            "eval_batch_size": 16,
            "eval_examples": 16,
            "report_to": [],
        },
        "method_options": {
            "adalora": {"tinit_ratio": 0.0, "tfinal_ratio": 0.0},
            "delta_lora": {"warmup_ratio": 0.0},
            "hydralora": {"num_heads": 2},
            "fisher_online": {"reallocate_at": [0.5]},  # two steps: one re-allocation, after the first
        },
        "evaluate": {"inference": False, "prompts": [], "forgetting_dataset": None},
    }
    for key, value in extra.items():
        data[key] = {**data[key], **value} if isinstance(data.get(key), dict) else value
    return parse_config(data)


def train_runs(config: Any) -> tuple[Any, dict[str, Any]]:
    """Every method of ``config`` trained into ``<output_dir>/<method>``; the trained models by name."""
    prepared = prepare(config)
    needs: set[str] = set()
    for entry in config.methods:
        needs |= get_allocation(resolve_method(entry).allocation).needs
    calibrate(prepared, needs, progress=False, log=lambda _: None)
    models = {}
    for name in config.method_names:
        outcome = run_method(prepared, name, RunDirectory(Path(config.output_dir) / name), progress=False)
        models[name] = outcome.model
    return prepared, models


PROBE = ("The film was really quite moving and charming.", "Dull plot, awful acting.")


@torch.no_grad()
def logits_of(model: Any, tokenizer: Any, max_length: int = 24) -> torch.Tensor:
    """Logits on the probe texts (right-padded); a causal LM's only at real tokens."""
    enc = tokenizer(list(PROBE), return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    logits = model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    return logits[enc["attention_mask"].bool()] if logits.dim() == 3 else logits


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# Runs in a fresh interpreter where neither fimlora nor PEFT can be imported: sys.modules entries set to
# None make `import` fail and importlib.util.find_spec (what transformers' is_peft_available asks) say
# "not installed".
_PLAIN_LOADER = r"""
import json, sys
for blocked in ("fimlora", "peft"):
    sys.modules[blocked] = None
import importlib.util
assert importlib.util.find_spec("peft") is None and importlib.util.find_spec("fimlora") is None
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

for job in json.loads(sys.argv[1]):
    directory = job["dir"]
    if job["kind"] == "merged":
        auto = AutoModelForSequenceClassification if job["task"] == "classification" else AutoModelForCausalLM
        model, tokenizer = auto.from_pretrained(directory), AutoTokenizer.from_pretrained(directory)
    else:
        sys.path.insert(0, directory)
        import hydralora_loader
        model, tokenizer = hydralora_loader.load(directory)
        sys.path.pop(0)
        del sys.modules["hydralora_loader"]
    enc = tokenizer(
        job["texts"], return_tensors="pt", padding=True, truncation=True, max_length=job["max_length"]
    )
    with torch.no_grad():
        logits = model.eval()(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.float()
    if logits.dim() == 3:
        logits = logits[enc["attention_mask"].bool()]
    save_file({"logits": logits.contiguous()}, job["out"])
    with open(job["out"] + ".json", "w") as handle:
        json.dump({str(k): v for k, v in model.config.id2label.items()}, handle)
loaded = sorted(n for n, m in sys.modules.items() if m is not None and n.split(".")[0] in ("fimlora", "peft"))
assert not loaded, loaded
print("loaded", len(json.loads(sys.argv[1])), "exports without fimlora or peft")
"""


def load_without_fimlora_or_peft(jobs: list[dict[str, Any]], workdir: Path) -> dict[str, torch.Tensor]:
    """Load each export (``{"dir", "kind", "task"}``) in one fresh process that cannot import fimlora or
    PEFT; returns the probe logits and ``id2label`` it found, by directory."""
    from safetensors.torch import load_file

    full = [
        {**job, "texts": list(PROBE), "max_length": 24, "out": str(workdir / f"logits-{i}.safetensors")}
        for i, job in enumerate(jobs)
    ]
    env = {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "OMP_NUM_THREADS": "2",
    }
    done = subprocess.run(
        [sys.executable, "-c", _PLAIN_LOADER, json.dumps(full)],
        cwd=workdir,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = {}
    for job in full:
        out[job["dir"]] = load_file(job["out"])["logits"]
        out[job["dir"] + ":id2label"] = json.loads(Path(job["out"] + ".json").read_text())
    return out
