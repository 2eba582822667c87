"""NF4 behaves the same on every CPU, with or without AVX512-BF16.

bitsandbytes 0.50's ``Linear4bit`` decides at construction, from ``has_avx512bf16()``, whether to repack
its weight for a CPU kernel at the first eval-mode forward whose input needs no gradient. On such CPUs
that repacking broke tiny models (``N % 32``), changed the numbers (bfloat16 block scales) and made the
next training step fail. The session fixture in ``tests/conftest.py`` makes every machine take that path
(``has_avx512bf16`` patched to True), so the whole quantised suite runs as on such a CPU; the tests here
show that the path is live, that :func:`keep_unpacked` is what survives it, and that runs with and without
the instruction set give the same numbers.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from tiny_models import NO_DEPLOYMENT_FIGURES
from transformers import AutoModelForCausalLM

from fimlora.config import parse_config
from fimlora.deploy.export import export_run
from fimlora.errors import FimloraError
from fimlora.experiment import calibrate, prepare, run_method
from fimlora.methods import get_allocation, resolve_method
from fimlora.models import load_model
from fimlora.quantization import bnb_config, keep_unpacked
from fimlora.runs import RunDirectory

bnb_modules = pytest.importorskip("bitsandbytes.nn.modules")


def _nf4_layers(model):
    return [m for m in model.modules() if isinstance(m, bnb_modules.Linear4bit)]


def test_the_forced_path_repacks_and_breaks_a_layer_that_keep_unpacked_did_not_see(tiny_llama_dir):
    assert bnb_modules.has_avx512bf16(), "tests/conftest.py forces the AVX512-BF16 path on every machine"
    raw = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=bnb_config("nf4", ["lm_head"]), dtype=torch.float32
    ).eval()
    assert all(layer.support_avx512bf16_for_cpu for layer in _nf4_layers(raw))
    inputs = torch.tensor([[1, 5, 9, 2]])
    # hidden size 16: bitsandbytes' repacking needs out_features % 32 == 0
    with torch.no_grad(), pytest.raises(AssertionError, match="divisible"):
        raw(input_ids=inputs)

    fixed = keep_unpacked(
        AutoModelForCausalLM.from_pretrained(
            tiny_llama_dir, quantization_config=bnb_config("nf4", ["lm_head"]), dtype=torch.float32
        )
    ).eval()
    with torch.no_grad():
        fixed(input_ids=inputs)
    for layer in _nf4_layers(fixed):
        assert not layer.support_avx512bf16_for_cpu
        assert not getattr(layer.weight.quant_state, "packing_format_for_cpu", False)


def test_a_layer_already_repacked_is_unpacked_to_the_same_weight():
    """A user's layer that bitsandbytes repacked before fimlora saw it (64 × 128: sizes its kernel takes)."""
    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64)
    layer = bnb_modules.Linear4bit(128, 64, compute_dtype=torch.float32, quant_type="nf4")
    layer.load_state_dict(dense.state_dict())
    layer = layer.to("cpu")  # quantises
    layer.weight.data = layer.weight.data.to("cpu")
    from fimlora.quantization import dequantized_weight

    before = dequantized_weight(layer).clone()
    import bitsandbytes.functional as bnb_functional

    layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu(
        layer.weight.data, layer.weight.quant_state
    )
    keep_unpacked(layer)
    assert not layer.weight.quant_state.packing_format_for_cpu
    # Repacking rounded the block scales to bfloat16: equal to that rounding (2^-8 relative).
    torch.testing.assert_close(dequantized_weight(layer), before, rtol=2**-8, atol=1e-6)


def _validations(prepared, name):
    """The periodic validation records, without their timings."""
    lines = (Path(prepared.config.output_dir) / name / "validation.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if "time" not in k} for line in lines]


def _run_both(prepared, names):
    out = Path(prepared.config.output_dir)
    return {name: run_method(prepared, name, RunDirectory(out / name), progress=False) for name in names}


def _experiment(model_dir, dataset, out, task_options, methods):
    config = parse_config(
        {
            "model": str(model_dir),
            "dataset": str(dataset),
            "dataset_options": task_options,
            "output_dir": str(out),
            "methods": methods,
            "quantization": "nf4",
            "budget": {"uniform_rank": 2},
            "fisher": {"num_examples": 8, "batch_size": 4},
            "train": {
                "steps": 3,
                "batch_size": 4,
                "learning_rate": 2e-2,
                "max_length": 16,
                "eval_every": 1,  # eval-mode forwards between training steps: each could have repacked
                "eval_examples": 8,
                "eval_batch_size": 8,
                "report_to": [],
            },
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )
    prepared = prepare(config)
    needs: set[str] = set()
    for name in methods:
        needs |= get_allocation(resolve_method(name).allocation).needs
    calibrate(prepared, needs, progress=False, log=lambda _: None)
    return prepared, _run_both(prepared, methods)


@pytest.mark.parametrize("avx512_bf16", [True, False], ids=["with-avx512bf16", "without"])
def test_fisher_training_evaluation_reload_and_export_refusal(
    avx512_bf16, tiny_llama_dir, text_jsonl, tmp_path, monkeypatch
):
    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: avx512_bf16)
    prepared, outcomes = _experiment(
        tiny_llama_dir, text_jsonl, tmp_path / "runs", {"text_column": "body"}, ["lora", "fim-lora"]
    )
    for name, outcome in outcomes.items():
        assert math.isfinite(outcome.result["metrics"]["perplexity"]), name
        assert [v["step"] for v in _validations(prepared, name)] == [1, 2], name  # each before a step
        adapter = Path(prepared.config.output_dir) / name / "adapter"
        fresh = load_model(prepared.config.model, "causal-lm", quantization="nf4").model
        batch = prepared.collator([prepared.tokenized["test"][i] for i in range(4)])
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        with torch.no_grad():
            trained = outcome.model.eval()(**inputs).logits
            reloaded = PeftModel.from_pretrained(fresh, str(adapter)).eval()(**inputs).logits
        assert torch.equal(reloaded, trained), name
        with pytest.raises(FimloraError, match="quantised"):
            export_run(Path(prepared.config.output_dir) / name, tmp_path / f"export-{name}")


def test_runs_with_and_without_avx512_bf16_give_the_same_numbers(
    tiny_bert_dir, sentiment_csv, tmp_path, monkeypatch
):
    options = {"text_column": "review", "label_column": "sentiment"}
    results, prepared_by_flag = {}, {}
    for avx512_bf16 in (True, False):
        monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda flag=avx512_bf16: flag)
        prepared, outcomes = _experiment(
            tiny_bert_dir, sentiment_csv, tmp_path / str(avx512_bf16), options, ["lora", "fim-lora"]
        )
        results[avx512_bf16] = (prepared.fisher, outcomes)
        prepared_by_flag[avx512_bf16] = (prepared, outcomes)
    (fisher_on, runs_on), (fisher_off, runs_off) = results[True], results[False]
    assert fisher_on.statistic == "trace" and fisher_on.traces == fisher_off.traces
    for name in runs_on:
        on, off = runs_on[name].result, runs_off[name].result
        assert on["metrics"] == off["metrics"], name
        assert on["train"]["final_train_loss"] == off["train"]["final_train_loss"], name
        assert on["allocation"] == off["allocation"], name
    validations = {
        flag: [_validations(prepared, name) for name in ("lora", "fim-lora")]
        for flag, (prepared, _) in prepared_by_flag.items()
    }
    assert validations[True] == validations[False]


@pytest.mark.integration
def test_minilm_on_nf4_trains_after_a_fisher_pass_and_periodic_validation(tmp_path):
    """The reported crash: MiniLM's widths are multiples of 32, so the repacking succeeded and the next
    training step failed inside bitsandbytes' autograd."""
    config = parse_config(
        {
            "model": "minilm",
            "dataset": "movie-reviews",
            "output_dir": str(tmp_path),
            "methods": ["lora", "fim-lora"],
            "quantization": "nf4",
            "budget": {"uniform_rank": 2},
            "fisher": {"num_examples": 16, "batch_size": 8},
            "train": {
                "steps": 2,
                "batch_size": 8,
                "learning_rate": 2e-3,
                "max_length": 32,
                "eval_every": 1,
                "eval_examples": 16,
                "report_to": [],
            },
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )
    prepared = prepare(config)
    calibrate(
        prepared, get_allocation(resolve_method("fim-lora").allocation).needs, progress=False, log=print
    )
    outcomes = _run_both(prepared, ["lora", "fim-lora"])
    for name, outcome in outcomes.items():
        assert outcome.result["metrics"]["num_examples"] == 16, name
        assert 0.0 <= outcome.result["metrics"]["accuracy"] <= 1.0
