"""On a quantised base a method's copy shares the base's frozen tensors (no second copy of the model),
trains exactly as a deep copy does, and leaves the base as it was: for NF4 and for int8, whose layers
move their codes into a matmul state at their first forward pass (here: the copy's, before the base's).
"""

from __future__ import annotations

import copy

import pytest
import torch
from tiny_models import NO_DEPLOYMENT_FIGURES

import fimlora.experiment as experiment
from fimlora.config import parse_config
from fimlora.experiment import build_method, prepare, run_method
from fimlora.models import load_model
from fimlora.quantization import is_quantized_linear
from fimlora.runs import RunDirectory

pytest.importorskip("bitsandbytes")


def _prepared(model_dir, dataset, out, quantization):
    config = parse_config(
        {
            "model": str(model_dir),
            "dataset": str(dataset),
            "dataset_options": {"text_column": "body"},
            "output_dir": str(out),
            "methods": ["lora"],  # no calibration pass: the copy's forward is the first one
            "quantization": quantization,
            "budget": {"uniform_rank": 2},
            "train": {"steps": 2, "batch_size": 4, "max_length": 16, "learning_rate": 2e-2, "report_to": []},
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )
    return prepare(config)


def _inputs(prepared):
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(4)])
    return {k: v for k, v in batch.items() if k != "labels"}


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_methods_copy_shares_the_frozen_base_trains_as_a_deep_copy_and_leaves_the_base(
    quantization, tiny_llama_dir, text_jsonl, tmp_path, monkeypatch
):
    prepared = _prepared(tiny_llama_dir, text_jsonl, tmp_path / "shared", quantization)
    base = prepared.loaded.model
    inputs = _inputs(prepared)
    fresh = load_model(prepared.config.model, "causal-lm", quantization=quantization).model
    with torch.no_grad():
        expected = fresh(**inputs).logits

    built = build_method(prepared, "lora")
    copied = dict(built.model.get_base_model().named_modules())
    layers = {n: m for n, m in base.named_modules() if is_quantized_linear(m)}
    assert layers
    for name, layer in layers.items():
        assert copied[name].get_base_layer().weight is layer.weight, name
    assert built.model.get_input_embeddings().weight is base.get_input_embeddings().weight

    shared = run_method(prepared, "lora", RunDirectory(tmp_path / "shared" / "lora"), progress=False)
    with torch.no_grad():
        assert torch.equal(base(**inputs).logits, expected)  # after the copy ran and trained first

    reference_prepared = _prepared(tiny_llama_dir, text_jsonl, tmp_path / "deep", quantization)
    monkeypatch.setattr(experiment, "copy_sharing_frozen_tensors", copy.deepcopy)
    deep = run_method(reference_prepared, "lora", RunDirectory(tmp_path / "deep" / "lora"), progress=False)
    assert shared.result["metrics"] == deep.result["metrics"]
    assert shared.result["train"]["final_train_loss"] == deep.result["train"]["final_train_loss"]
    trained = {n: p for n, p in shared.model.named_parameters() if p.requires_grad}
    for name, param in deep.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(trained[name], param), name
