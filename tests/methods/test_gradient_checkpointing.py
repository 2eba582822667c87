"""``train.gradient_checkpointing``: the blocks are recomputed in the backward pass, the gradients are not
changed by it, for every method kind (its callbacks, optimizer and auxiliary loss included), on a float32
and on an NF4 base.

Each case trains a few steps twice from the same built method (same seed, same batches), once without
and once with checkpointing, and reads every trainable gradient of the first step right before the
optimizer step.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from method_runs import SELF_CONTAINED_PRESETS
from tiny_models import NO_DEPLOYMENT_FIGURES
from transformers import TrainerCallback

from fimlora.config import parse_config
from fimlora.experiment import _summed, build_method, calibrate, prepare
from fimlora.methods.base import NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC
from fimlora.train import train

# Adapters that change the forward or the trained tensors (DoRA, HydraLoRA with its auxiliary loss, full
# fine-tuning, Delta-LoRA below) and AdaLoRA (orthogonality loss, pruning callback); the other presets
# run with the slow tests.
FAST = ("lora", "adalora", "dora", "hydralora", "full-ft")
STEPS = 2  # AdaLoRA needs a step past its final phase; the first step's gradients are compared


def _config(model_dir, dataset, out, methods, quantization="none"):
    return parse_config(
        {
            "model": str(model_dir),
            "dataset": str(dataset),
            "dataset_options": {"text_column": "body"},
            "output_dir": str(out),
            "methods": methods,
            "quantization": quantization,
            "budget": {"uniform_rank": 4},
            "fisher": {"num_examples": 8, "batch_size": 4},
            "lora": {"dropout": 0.1},  # dropout on: checkpointing must replay the same random mask
            "train": {"steps": STEPS, "batch_size": 4, "max_length": 16, "report_to": []},
            "method_options": {
                "adalora": {"tinit_ratio": 0.0, "tfinal_ratio": 0.0},  # prunes from the first step
                "hydralora": {"num_heads": 2, "balance_weight": 0.1},  # its auxiliary loss too
                "delta_lora": {"warmup_ratio": 0.0},
                "fisher_online": {"reallocate_at": [0.5]},  # two steps: one re-allocation, after step 1
            },
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )


def _prepared(model_dir, dataset, out, methods, quantization="none"):
    prepared = prepare(_config(model_dir, dataset, out, methods, quantization))
    calibrate(prepared, {NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC}, progress=False, log=lambda _: None)
    return prepared


@pytest.fixture(scope="module")
def float_base(tiny_llama_dir, text_jsonl, tmp_path_factory):
    # Delta-LoRA refuses LoRA dropout (its update rule needs it off): it gets its own config below.
    methods = [m for m in SELF_CONTAINED_PRESETS if m != "delta-lora"]
    return _prepared(tiny_llama_dir, text_jsonl, tmp_path_factory.mktemp("ckpt"), methods)


@pytest.fixture(scope="module")
def nf4_base(tiny_llama_dir, text_jsonl, tmp_path_factory):
    pytest.importorskip("bitsandbytes")
    out = tmp_path_factory.mktemp("ckpt-nf4")
    return _prepared(tiny_llama_dir, text_jsonl, out, ["lora", "fim-lora"], "nf4")


class _Gradients(TrainerCallback):
    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if self.grads:
            return
        self.grads = {
            n: p.grad.detach().clone()
            for n, p in self.model.named_parameters()
            if p.requires_grad and p.grad is not None
        }


def _first_step(prepared, name, checkpointing, work):
    """Trainable gradients of the first step, and how often the first block's attention ran per step."""
    clone = copy.copy(prepared)
    train_settings = prepared.config.train.model_copy(update={"gradient_checkpointing": checkpointing})
    clone.config = prepared.config.model_copy(update={"train": train_settings})
    built = build_method(clone, name)
    model = built.model
    capture = _Gradients(model)
    calls = []
    # A pre-hook: the recomputation stops once it has every tensor the backward needs, before the
    # block's last modules return, so their forward hooks would not see it.
    attention = next(m for n, m in model.named_modules() if n.endswith("layers.0.self_attn"))
    handle = attention.register_forward_pre_hook(lambda *_: calls.append(1))
    callbacks = [cb for c in built.components for cb in c.callbacks(model, built.ctx)]
    losses = [fn for c in built.components if (fn := c.extra_loss(model, built.ctx)) is not None]
    try:
        train(
            model,
            prepared.tokenized["train"],
            prepared.collator,
            train_settings,
            seed=prepared.config.seed,
            work_dir=work,
            metrics_path=work / f"{name}-{checkpointing}.jsonl",
            progress=False,
            optimizer=built.optimizer_kind.build(model, built.ctx),
            callbacks=[*callbacks, capture],
            extra_loss=_summed(losses),
        )
    finally:
        handle.remove()
    return capture.grads, len(calls) / STEPS


def _check(prepared, name, work: Path):
    plain, plain_calls = _first_step(prepared, name, False, work)
    checkpointed, checkpointed_calls = _first_step(prepared, name, True, work)
    assert plain_calls == 1 and checkpointed_calls == 2, "checkpointing did not recompute the block"
    assert plain and set(checkpointed) == set(plain)
    assert any(bool(grad.abs().sum() > 0) for grad in plain.values())
    for param, grad in plain.items():
        torch.testing.assert_close(checkpointed[param], grad, rtol=1e-5, atol=1e-8, msg=param)


@pytest.mark.parametrize(
    "name",
    [
        n if n in FAST else pytest.param(n, marks=pytest.mark.slow)
        for n in SELF_CONTAINED_PRESETS
        if n != "delta-lora"
    ],
)
def test_checkpointing_leaves_every_gradient_unchanged(float_base, name, tmp_path):
    _check(float_base, name, tmp_path)


def test_checkpointing_with_delta_lora(tiny_llama_dir, text_jsonl, tmp_path):
    prepared = _prepared(tiny_llama_dir, text_jsonl, tmp_path / "runs", ["delta-lora"])
    clone = copy.copy(prepared)
    no_dropout = prepared.config.lora.model_copy(update={"dropout": 0.0})
    clone.config = prepared.config.model_copy(update={"lora": no_dropout})
    _check(clone, "delta-lora", tmp_path)


@pytest.mark.parametrize("name", ["lora", pytest.param("fim-lora", marks=pytest.mark.slow)])
def test_checkpointing_on_an_nf4_base(nf4_base, name, tmp_path):
    _check(nf4_base, name, tmp_path)
