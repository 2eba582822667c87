"""Every preset counts exactly the tensors its optimizer trains: those in the optimizer that require a
gradient, counted after the optimizer was built; one optimizer step moves nothing else."""

from __future__ import annotations

import pytest
import torch
from method_runs import SELF_CONTAINED_PRESETS, prepared_experiment, tiny_config

from fimlora.experiment import build_method
from fimlora.methods.base import NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("counts")
    config = tiny_config(tiny_bert_dir, sentiment_csv, out, SELF_CONTAINED_PRESETS)
    return prepared_experiment(config, {NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_KFAC})


def _one_step(built, prepared):
    """One optimizer step as the run takes it: the method's optimizer (built again here; building it may
    freeze tensors, as LoRA-FA's freezes A), or the Trainer's AdamW over every tensor that requires a
    gradient."""
    model = built.model
    optimizer = built.optimizer_kind.build(model, built.ctx)
    if optimizer is None:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    batch = prepared.collator([prepared.tokenized["train"][i] for i in range(8)])
    loss = model(**batch).loss
    for component in built.components:
        extra = component.extra_loss(model, built.ctx)
        if extra is not None:
            loss = loss + extra()
    loss.backward()
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("name", SELF_CONTAINED_PRESETS)
def test_the_count_is_the_optimizers_trainable_tensors_and_only_they_move(prepared, name):
    built = build_method(prepared, name)
    model = built.model
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = _one_step(built, prepared)
    optimized = {id(p) for group in optimizer.param_groups for p in group["params"]}
    counted = {n for n, p in model.named_parameters() if p.requires_grad and id(p) in optimized}
    assert all(id(p) in optimized for p in model.parameters() if p.requires_grad)
    params = dict(model.named_parameters())
    total = (
        built.counts["adapter_params"] + built.counts["head_params"] + built.counts["other_trainable_params"]
    )
    assert total == sum(params[n].numel() for n in counted), name
    moved = {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}
    assert moved, name
    assert moved <= counted, sorted(moved - counted)[:3]
