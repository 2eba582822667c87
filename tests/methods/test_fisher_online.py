"""fisher-online (fim-lora-dynamic): the online Fisher, re-allocation at a fixed budget, its guarantees."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils.other import get_pattern_key
from pipeline.test_experiment import _fresh_process_logits
from tiny_models import NO_DEPLOYMENT_FIGURES, make_tiny_bert, make_tiny_llama

from fimlora.allocation import allocate_ranks
from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.experiment import build_method, calibrate, prepare, run_method
from fimlora.fisher import estimate_fisher
from fimlora.fisher.losses import per_example_loss
from fimlora.fisher.online import OnlineTrace
from fimlora.methods.allocations import fisher_online
from fimlora.methods.base import NEEDS_DIAGONAL
from fimlora.methods.resize import lora_layers, lora_update, replace_in_optimizer, set_ranks
from fimlora.models import resolve_target_modules, weight_shapes
from fimlora.runs import RunDirectory, trained_ranks

STEPS = 8


def _config(model_dir, dataset, out, **extra):
    data = {
        "model": str(model_dir),
        "dataset": str(dataset),
        "dataset_options": {"text_column": "review", "label_column": "sentiment"},
        "output_dir": str(out),
        "methods": ["lora", "fim-lora-dynamic"],
        "budget": {"uniform_rank": 3},
        "fisher": {"num_examples": 24, "batch_size": 8},
        "train": {
            "steps": STEPS,
            "batch_size": 8,
            "learning_rate": 1e-2,
            "max_length": 24,
            "eval_batch_size": 16,
            "report_to": [],
        },
        # Start uniform, so that the first re-allocation certainly moves ranks.
        "method_options": {"fisher_online": {"start": "uniform", "reallocate_at": [0.25, 0.5]}},
        "evaluate": NO_DEPLOYMENT_FIGURES,
    }
    data.update(extra)
    return parse_config(data)


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    prepared = prepare(_config(tiny_bert_dir, sentiment_csv, tmp_path_factory.mktemp("online")))
    calibrate(prepared, {NEEDS_DIAGONAL}, progress=False, log=lambda _: None)
    return prepared


def _run(prepared, name):
    return run_method(prepared, name, RunDirectory(Path(prepared.config.output_dir) / name), progress=False)


@pytest.fixture(scope="module")
def outcomes(prepared):
    return {name: _run(prepared, name) for name in ("lora", "fim-lora-dynamic")}


def _with_config(prepared, **changes):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    for section, values in changes.items():
        data[section] = {**data.get(section, {}), **values} if isinstance(values, dict) else values
    clone = copy.copy(prepared)
    clone.config = parse_config(data)
    return clone


# --------------------------------------------------------------------------------------------------
# The online Fisher
# --------------------------------------------------------------------------------------------------


def _peft(base, task_type, rank=2, **kwargs):
    targets = resolve_target_modules(base, None)
    model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=4, target_modules=targets, task_type=task_type, **kwargs)
    )
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, so the Fisher is not the base model's
                param.normal_(std=0.3)
    return model


def _brute_force_traces(model, batch):
    """(1/N) Σ_n ‖∂ℓ_n/∂W‖² per frozen weight, one example at a time through autograd."""
    weights = {name: layer.base_layer.weight for name, layer in lora_layers(model).items()}
    for weight in weights.values():
        weight.requires_grad_(True)
    totals = dict.fromkeys(weights, 0.0)
    count = batch["input_ids"].shape[0]
    for n in range(count):
        logits = model(
            input_ids=batch["input_ids"][n : n + 1], attention_mask=batch["attention_mask"][n : n + 1]
        )
        loss = per_example_loss(logits.logits, batch["labels"][n : n + 1]).sum()
        for name, grad in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            totals[name] += float(grad.double().square().sum())
    for weight in weights.values():
        weight.requires_grad_(False)
    return {name: total / count for name, total in totals.items()}


def _padded_batch(task):
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 60, (5, 12), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[3, 5:] = 0
    ids = ids * mask
    labels = torch.tensor([0, 1, 1, 0, 1]) if task == "classification" else ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("task", ["classification", "causal-lm"])
def test_online_trace_is_the_per_example_fisher_of_the_frozen_weights(task):
    """One training-style step (batch-mean loss, padding) gives (1/N) Σ_n ‖G_n‖² of every frozen W.

    A squared batch gradient, a missing loss normaliser or a per-token instead of per-sequence loss all
    give different numbers.
    """
    if task == "classification":
        model = _peft(make_tiny_bert(num_labels=2), "SEQ_CLS")
    else:
        model = _peft(make_tiny_llama(), "CAUSAL_LM")
    kwargs = {}
    model.eval()  # dropout off, so one pass and the per-example loop see the same network
    batch = _padded_batch(task)
    if task == "causal-lm":  # what the Trainer passes: the batch's predicted tokens
        kwargs["num_items_in_batch"] = (batch["labels"][:, 1:] != -100).sum()
    trace = OnlineTrace(model, lora_layers(model), task=task, averaging="mean")
    trace.attach()
    model(**batch, **kwargs).loss.backward()
    trace.end_step()
    trace.detach()
    online = trace.averaged()
    expected = _brute_force_traces(model, batch)
    assert set(online) == set(expected) and len(online) == (12 if task == "classification" else 14)
    for name, value in expected.items():
        assert online[name] == pytest.approx(value, rel=1e-5), name
    assert trace.steps == 1 and trace.examples == 5


def test_online_trace_averages_over_steps_and_ignores_evaluation():
    model = _peft(make_tiny_bert(num_labels=2), "SEQ_CLS").eval()
    batch = _padded_batch("classification")
    halves = [{k: v[:2] for k, v in batch.items()}, {k: v[2:] for k, v in batch.items()}]
    per_step = [_brute_force_traces(model, half) for half in halves]
    for averaging, beta in (("mean", 0.9), ("ema", 0.5)):
        trace = OnlineTrace(model, lora_layers(model), task="classification", averaging=averaging, beta=beta)
        trace.attach()
        for half in halves:
            model(**half).loss.backward()
            with torch.no_grad():  # an evaluation pass: not a training example
                model(**batch)
            trace.end_step()
        trace.detach()
        model(**batch).loss.backward()  # detached: not counted
        weights = (0.5, 0.5) if averaging == "mean" else ((1 - beta) * beta, 1 - beta)
        for name, value in trace.averaged().items():
            want = (weights[0] * per_step[0][name] + weights[1] * per_step[1][name]) / sum(weights)
            assert value == pytest.approx(want, rel=1e-5)
        assert trace.examples == 5


# --------------------------------------------------------------------------------------------------
# Re-sizing: the function is kept
# --------------------------------------------------------------------------------------------------


def _uneven_model(scaling):
    base = make_tiny_bert(num_labels=2)
    targets = resolve_target_modules(base, None)
    shapes = weight_shapes(base, targets)
    allocation = allocate_ranks(
        None, shapes, budget=sum(3 * (a + b) for a, b in shapes.values()), strategy="uniform"
    )
    allocation.ranks[targets[0]] = 2
    model = get_peft_model(
        base, allocation.to_lora_config(lora_alpha=8, scaling=scaling, task_type="SEQ_CLS")
    )
    torch.manual_seed(2)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model.eval()


def _inputs():
    return {"input_ids": torch.randint(1, 60, (4, 10), generator=torch.Generator().manual_seed(3))}


@pytest.mark.parametrize("scaling", ["alpha_over_r", "constant"])
def test_growth_only_leaves_every_update_and_the_outputs_unchanged(scaling):
    model = _uneven_model(scaling)
    layers = lora_layers(model)
    before = {name: lora_update(layer, "default") for name, layer in layers.items()}
    old_ranks = {name: layer.r["default"] for name, layer in layers.items()}
    old_factors = {
        name: (
            layer.lora_A["default"].weight.detach().clone(),
            layer.lora_B["default"].weight.detach().clone(),
        )
        for name, layer in layers.items()
    }
    with torch.no_grad():
        logits = model(**_inputs()).logits
    ranks = {name: r + (i % 3) for i, (name, r) in enumerate(sorted(old_ranks.items()))}
    changes = set_ranks(model, ranks, scaling=scaling, generator=torch.Generator().manual_seed(0))
    assert {c.name for c in changes} == {n for n in ranks if ranks[n] != old_ranks[n]}
    assert all(c.truncation_error == 0.0 for c in changes)
    config = model.peft_config["default"]
    for name, layer in layers.items():
        r, r0 = ranks[name], old_ranks[name]
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        assert (
            a.shape == (r, layer.in_features)
            and b.shape == (layer.out_features, r)
            and layer.r["default"] == r
        )
        assert torch.count_nonzero(b[:, r0:]) == 0 and bool((a[r0:].abs().sum(dim=1) > 0).all())
        expected_alpha = 8 if scaling == "alpha_over_r" else 8 * r / config.r
        assert layer.scaling["default"] == pytest.approx(expected_alpha / r)
        assert torch.equal(a[:r0], old_factors[name][0])
        if scaling == "constant":  # s' = s (to the last bit of α·r'/r_ref / r'): A and B stay as they are
            assert torch.equal(b[:, :r0], old_factors[name][1])
            torch.testing.assert_close(lora_update(layer, "default"), before[name], rtol=1e-12, atol=0)
        else:  # s' = α/r' ≠ s: B absorbs s/s' (one float32 rounding)
            torch.testing.assert_close(lora_update(layer, "default"), before[name], rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs()).logits, logits, rtol=0, atol=1e-6)


def test_shrinking_keeps_the_best_low_rank_approximation_and_loses_exactly_the_truncation_error():
    model = _uneven_model("alpha_over_r")
    layers = lora_layers(model)
    set_ranks(model, {n: layer.r["default"] + 2 for n, layer in layers.items()}, scaling="alpha_over_r")
    with torch.no_grad():  # make the grown directions count, so the shrink has something to lose
        for layer in layers.values():
            layer.lora_B["default"].weight.normal_(std=0.3)
    before = {name: lora_update(layer, "default") for name, layer in layers.items()}
    generator = torch.Generator().manual_seed(4)
    inputs = {name: torch.randn(7, layer.in_features, generator=generator) for name, layer in layers.items()}
    with torch.no_grad():
        outputs = {name: layer(inputs[name]) for name, layer in layers.items()}
    ranks = {name: max(1, layer.r["default"] - 3) for name, layer in layers.items()}
    changes = set_ranks(model, ranks, scaling="alpha_over_r")
    assert len(changes) == len(layers)
    for change in changes:
        layer, old = layers[change.name], before[change.name]
        sigma = torch.linalg.svdvals(old)
        tail = float(sigma[change.new_rank :].square().sum().sqrt())
        lost = lora_update(layer, "default") - old
        assert tail > 0.05  # something was really cut
        # Eckart–Young: no rank-r' matrix is closer in Frobenius norm than the truncated SVD.
        assert float(torch.linalg.matrix_norm(lost)) == pytest.approx(tail, rel=1e-5)
        assert change.truncation_error == pytest.approx(tail, rel=1e-9)
        assert change.update_norm == pytest.approx(float(torch.linalg.matrix_norm(old)), rel=1e-9)
        sigma_next = float(sigma[change.new_rank])
        assert float(torch.linalg.matrix_norm(lost, ord=2)) == pytest.approx(sigma_next, rel=1e-5)
        x = inputs[change.name]
        with torch.no_grad():
            moved = (layer(x) - outputs[change.name]).norm(dim=1)
        assert bool((moved <= sigma_next * x.norm(dim=1) * (1 + 1e-5)).all())
        a = layer.lora_A["default"].weight.detach().double()
        gram = a @ a.T  # A's rows: orthogonal, all of one (trained) length, never zero
        torch.testing.assert_close(
            gram, gram[0, 0] * torch.eye(change.new_rank, dtype=gram.dtype), atol=1e-5, rtol=1e-5
        )
        assert float(gram[0, 0]) > 0


def test_optimizer_keeps_unchanged_modules_state_and_starts_changed_ones_afresh():
    model = _uneven_model("alpha_over_r").train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    batch = _padded_batch("classification")
    for _ in range(2):
        model(**batch).loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    layers = lora_layers(model)
    names = sorted(layers)
    # Three modules grow, two shrink, the rest keep their rank.
    ranks = {n: layers[n].r["default"] + (i < 3) - (3 <= i < 5) for i, n in enumerate(names)}
    kept = {n: layers[n] for n in names[5:]}
    saved = {
        id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
        for layer in kept.values()
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
    }
    changes = set_ranks(model, ranks, scaling="alpha_over_r")
    old_tensors = [old for c in changes for old, _ in c.replaced]
    lr_before = [g["lr"] for g in optimizer.param_groups]
    replace_in_optimizer(optimizer, [pair for c in changes for pair in c.replaced])
    in_groups = [p for g in optimizer.param_groups for p in g["params"]]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(in_groups) == len(trainable) and {id(p) for p in in_groups} == {id(p) for p in trainable}
    assert not any(any(p is old for p in in_groups) or old in optimizer.state for old in old_tensors)
    for change in changes:
        for _, new in change.replaced:
            assert new not in optimizer.state  # fresh: AdamW initialises it at the next step
    for layer in kept.values():
        for p in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            for key, value in saved[id(p)].items():
                assert torch.equal(optimizer.state[p][key], value)
    model(**batch).loss.backward()
    optimizer.step()
    scheduler.step()
    lr_after = [g["lr"] for g in optimizer.param_groups]
    assert lr_after == pytest.approx([lr * 3 / 4 for lr in lr_before])  # the schedule went on: 1/3 → 1/4
    for change in changes:
        for _, new in change.replaced:
            assert int(optimizer.state[new]["step"]) == 1
    for layer in kept.values():
        assert int(optimizer.state[layer.lora_A["default"].weight]["step"]) == 3


# --------------------------------------------------------------------------------------------------
# Training: budget, records, PEFT-native reload
# --------------------------------------------------------------------------------------------------


def test_training_reallocates_within_the_budget_and_records_it(prepared, outcomes):
    result = outcomes["fim-lora-dynamic"].result
    record = result["records"]["fisher_online"]
    reallocations = result["records"]["reallocations"]
    budget = prepared.budget
    assert record["reallocate_at_steps"] == [2, 4] and [r["step"] for r in reallocations] == [2, 4]
    initial = record["rank_history"][0]["ranks"]
    assert set(initial.values()) == {3}  # start: uniform
    assert reallocations[0]["ranks"] != initial and reallocations[0]["grown"] and reallocations[0]["shrunk"]
    for entry in reallocations:
        assert entry["params"] <= budget
        shapes = prepared.shapes
        assert entry["params"] == sum(r * sum(shapes[n]) for n, r in entry["ranks"].items())
        assert entry["fisher_examples"] == entry["step"] * prepared.config.train.batch_size
    # Checked before each of the 8 steps and after each of the 2 re-allocations, never over the budget.
    assert record["budget_checks"] == STEPS + 2
    assert record["peak_adapter_params"] <= budget == record["budget"]
    assert record["peak_trainable_params"] == record["peak_adapter_params"] + result["head_params"]
    assert record["final_params"] == reallocations[-1]["params"] == result["effective_adapter_params"]
    assert record["fisher_steps"] == 4  # the hooks came off after the last re-allocation
    assert record["rank_history"][1:] == [{"step": r["step"], "ranks": r["ranks"]} for r in reallocations]
    assert trained_ranks(result) == (reallocations[-1]["ranks"], "reallocated_ranks")


def test_the_learning_rate_schedule_and_the_new_tensors_keep_training(prepared, outcomes):
    run = Path(prepared.config.output_dir)

    def rates(name):
        lines = (run / name / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["learning_rate"] for line in lines if "learning_rate" in line]

    assert rates("fim-lora-dynamic") == rates("lora") and len(rates("lora")) == STEPS
    # Grown modules started with zero columns in B: after the later steps none is left, so the optimizer
    # stepped the new tensors (with stale references they would stay exactly zero).
    for layer in lora_layers(outcomes["fim-lora-dynamic"].model).values():
        b = layer.lora_B["default"].weight
        assert bool((b.abs().sum(dim=0) > 0).all())


def test_the_final_adapter_is_peft_native_and_reloads_in_a_fresh_process(prepared, outcomes, tmp_path):
    result = outcomes["fim-lora-dynamic"].result
    final = result["records"]["fisher_online"]["reallocated_ranks"]
    adapter_dir = Path(prepared.config.output_dir) / "fim-lora-dynamic" / "adapter"
    saved = json.loads((adapter_dir / "adapter_config.json").read_text())
    pattern = saved["rank_pattern"]
    assert pattern and not any(key.startswith("base_model") for key in pattern)
    resolved = {n: pattern.get(get_pattern_key(list(pattern), n), saved["r"]) for n in final}
    assert resolved == final
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcomes["fim-lora-dynamic"].model.eval()(**inputs).logits
    got = _fresh_process_logits(
        "AutoModelForSequenceClassification", prepared.loaded.source, adapter_dir, inputs, tmp_path
    )
    assert torch.equal(got, want)


def test_a_count_over_the_budget_stops_training(prepared, monkeypatch):
    """The per-step check really runs: with the budget lowered below the adapter, step 0 fails."""
    original = fisher_online.FisherOnline.allocate

    def allocate(self, ctx, shapes, budget, rank_costs=None):
        allocation = original(self, ctx, shapes, budget, rank_costs)
        ctx.record[fisher_online._PLAN].budget = allocation.num_params - 1
        return allocation

    monkeypatch.setattr(fisher_online.FisherOnline, "allocate", allocate)
    out = Path(prepared.config.output_dir) / "over-budget"
    with pytest.raises(RuntimeError, match="over the budget"):
        run_method(prepared, "fim-lora-dynamic", RunDirectory(out), progress=False)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"reallocate_at": [0.0]}, "each in \\(0, 1\\)"),
        ({"reallocate_at": [0.5, 1.0]}, "each in \\(0, 1\\)"),
        ({"reallocate_at": [0.3, 0.2]}, "strictly increasing"),
        ({"reallocate_at": []}, "at least 1"),
    ],
)
def test_invalid_schedules_fail_when_the_config_is_read(prepared, options, message):
    data = prepared.config.model_dump(mode="json", by_alias=True)
    data["method_options"]["fisher_online"].update(options)
    with pytest.raises(FimloraError, match=message):
        parse_config(data)


def test_schedules_that_collide_on_a_step_and_several_processes_are_refused(prepared, monkeypatch):
    short = _with_config(prepared, method_options={"fisher_online": {"reallocate_at": [0.1, 0.12]}})
    with pytest.raises(FimloraError, match="different step"):
        build_method(short, "fim-lora-dynamic")
    late = _with_config(prepared, method_options={"fisher_online": {"reallocate_at": [0.97]}})
    with pytest.raises(FimloraError, match="before the last"):
        build_method(late, "fim-lora-dynamic")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(FimloraError, match="single process"):
        build_method(prepared, "fim-lora-dynamic")


def test_fisher_start_is_fim_loras_allocation(prepared):
    start = _with_config(
        prepared,
        methods=["fim-lora", "fim-lora-dynamic"],
        method_options={"fisher_online": {"start": "fisher"}},
    )
    dynamic = build_method(start, "fim-lora-dynamic").allocation
    static = build_method(start, "fim-lora").allocation
    assert dynamic is not None and static is not None and dynamic.ranks == static.ranks


# --------------------------------------------------------------------------------------------------
# Causal LM: the online trace is the calibration trace, and the adapter reloads
# --------------------------------------------------------------------------------------------------


def test_causal_lm_online_trace_matches_the_calibration_pass_and_reloads(
    tiny_llama_dir, text_jsonl, tmp_path
):
    config = _config(
        tiny_llama_dir,
        text_jsonl,
        tmp_path / "runs",
        dataset_options={"text_column": "body"},
        methods=["fim-lora-dynamic"],
        train={"steps": 4, "batch_size": 1, "learning_rate": 1e-2, "max_length": 16, "report_to": []},
        method_options={"fisher_online": {"reallocate_at": [0.25]}},
    )
    prepared = prepare(config)
    train = prepared.tokenized["train"]
    # One batch holding the whole training split: step 1 sees every example, at the base model's
    # function (B = 0), as the calibration pass does.
    prepared = _with_config(prepared, train={"batch_size": len(train)})
    calibrate(prepared, {NEEDS_DIAGONAL}, progress=False, log=lambda _: None)
    outcome = _run(prepared, "fim-lora-dynamic")
    first = outcome.result["records"]["reallocations"][0]
    assert first["step"] == 1 and first["fisher_examples"] == len(train)
    loader = torch.utils.data.DataLoader(train, batch_size=4, collate_fn=prepared.collator)
    reference = estimate_fisher(prepared.loaded.model, loader, statistic="trace", progress=False).traces
    assert reference is not None and set(first["traces"]) == set(reference)
    for name, value in reference.items():
        assert first["traces"][name] == pytest.approx(value, rel=1e-4), name
    assert outcome.result["records"]["fisher_online"]["peak_adapter_params"] <= prepared.budget
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(2)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    adapter_dir = Path(config.output_dir) / "fim-lora-dynamic" / "adapter"
    got = _fresh_process_logits("AutoModelForCausalLM", prepared.loaded.source, adapter_dir, inputs, tmp_path)
    assert torch.equal(got, want)
    assert not math.isnan(outcome.result["metrics"]["perplexity"])


# --------------------------------------------------------------------------------------------------
# allocation.r_min: 0: modules without an adapter are scored, and adapters come and go
# --------------------------------------------------------------------------------------------------


def _partly_adapted_model():
    """The tiny BERT with LoRA on every target except the first block's attention (no adapter there)."""
    base = make_tiny_bert(num_labels=2)
    targets = resolve_target_modules(base, None)
    left_out = [t for t in targets if ".layer.0.attention." in t]
    adapted = [t for t in targets if t not in left_out]
    model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=adapted, task_type="SEQ_CLS"))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.3)
    return model, targets, left_out


def test_online_trace_scores_modules_without_an_adapter_on_their_frozen_layers():
    model, targets, left_out = _partly_adapted_model()
    model.eval()
    batch = _padded_batch("classification")
    frozen = {n: fisher_online.frozen_linear(model, n) for n in targets}
    assert all(type(m) is torch.nn.Linear for m in frozen.values())
    weights = {n: m.weight for n, m in frozen.items()}
    for w in weights.values():
        w.requires_grad_(True)
    expected = dict.fromkeys(targets, 0.0)
    for n in range(batch["input_ids"].shape[0]):
        logits = model(
            input_ids=batch["input_ids"][n : n + 1], attention_mask=batch["attention_mask"][n : n + 1]
        )
        loss = per_example_loss(logits.logits, batch["labels"][n : n + 1]).sum()
        for name, grad in zip(weights, torch.autograd.grad(loss, list(weights.values())), strict=True):
            expected[name] += float(grad.double().square().sum()) / batch["input_ids"].shape[0]
    for w in weights.values():
        w.requires_grad_(False)
    traces = {}
    for inputs_require_grad in (True, False):
        trace = OnlineTrace(
            model, frozen, task="classification", averaging="mean", inputs_require_grad=inputs_require_grad
        )
        trace.attach()
        model(**batch).loss.backward()
        trace.end_step()
        trace.detach()
        model.zero_grad()
        traces[inputs_require_grad] = trace.averaged()
    for name, value in expected.items():
        assert value > 0 and traces[True][name] == pytest.approx(value, rel=1e-5), name
    # Without it, the first block's bare attention layers see no output gradient: nothing trains before them.
    assert all(traces[False][n] == 0.0 for n in left_out)


def test_set_ranks_removes_and_adds_adapters_and_the_optimizer_follows(tmp_path):
    model, targets, left_out = _partly_adapted_model()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _padded_batch("classification")
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    layers = lora_layers(model)
    removed = sorted(layers)[:2]
    with torch.no_grad():
        model.eval()
        reference = copy.deepcopy(model)
        for name in removed:  # what the model computes once those adapters are gone
            lora_layers(reference)[name].lora_B["default"].weight.zero_()
        want = reference(**batch).logits
    ranks = {n: (0 if n in removed or n in left_out else 2) for n in targets}
    ranks[left_out[0]] = 3  # and one module without an adapter gets one
    generator = torch.Generator().manual_seed(0)
    changes = set_ranks(model, ranks, scaling="alpha_over_r", generator=generator)
    assert {c.name: (c.old_rank, c.new_rank) for c in changes} == {
        removed[0]: (2, 0),
        removed[1]: (2, 0),
        left_out[0]: (0, 3),
    }
    assert all(c.truncation_error == c.update_norm > 0 for c in changes if c.new_rank == 0)
    with torch.no_grad():
        torch.testing.assert_close(model(**batch).logits, want)  # removal drops s·BA, addition adds 0
    adapted = {n for n, r in ranks.items() if r > 0}
    assert set(lora_layers(model)) == adapted
    config = model.peft_config["default"]
    assert set(config.target_modules) == adapted and config.rank_pattern == {left_out[0]: 3}
    kept = lora_layers(model)[sorted(adapted - {left_out[0]})[0]]
    replace_in_optimizer(
        optimizer, [pair for c in changes for pair in c.replaced], like=kept.lora_A["default"].weight
    )
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_groups == {id(p) for p in model.parameters() if p.requires_grad}
    model.train()
    model(**batch).loss.backward()
    optimizer.step()
    new_b = lora_layers(model)[left_out[0]].lora_B["default"].weight
    assert bool(new_b.abs().sum() > 0)  # the added adapter trains
    model.save_pretrained(str(tmp_path / "adapter"))
    from peft import PeftModel

    model.eval()
    with torch.no_grad():
        reloaded = PeftModel.from_pretrained(make_tiny_bert(num_labels=2), str(tmp_path / "adapter")).eval()
        # The classifier head is not in this adapter: compare the encoders' outputs.
        encoder = model.base_model.model.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
        again = reloaded.base_model.model.bert(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        )
    assert torch.equal(encoder.last_hidden_state, again.last_hidden_state)


def test_training_with_r_min_0_leaves_modules_out_within_the_budget_and_reloads(
    tiny_bert_dir, sentiment_csv, tmp_path
):
    config = _config(
        tiny_bert_dir,
        sentiment_csv,
        tmp_path / "runs",
        methods=["fim-lora-dynamic"],
        budget={"uniform_rank": 1},
        allocation={"r_min": 0},
    )
    prepared = prepare(config)
    calibrate(prepared, {NEEDS_DIAGONAL}, progress=False, log=lambda _: None)
    outcome = _run(prepared, "fim-lora-dynamic")
    record = outcome.result["records"]["fisher_online"]
    reallocations = outcome.result["records"]["reallocations"]
    assert set(record["rank_history"][0]["ranks"].values()) == {1}  # start: uniform rank 1 everywhere
    final = record["reallocated_ranks"]
    assert 0 in final.values() and max(final.values()) > 1
    assert any(r["shrunk"] for r in reallocations)
    assert record["peak_adapter_params"] <= prepared.budget
    assert record["final_params"] == sum(r * sum(prepared.shapes[n]) for n, r in final.items())
    assert set(lora_layers(outcome.model)) == {n for n, r in final.items() if r > 0}
    assert all(v > 0 for v in reallocations[0]["traces"].values())  # every module scored, adapter or not
    batch = prepared.collator([prepared.tokenized["test"][i] for i in range(6)])
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        want = outcome.model.eval()(**inputs).logits
    adapter_dir = Path(config.output_dir) / "fim-lora-dynamic" / "adapter"
    got = _fresh_process_logits(
        "AutoModelForSequenceClassification", prepared.loaded.source, adapter_dir, inputs, tmp_path
    )
    assert torch.equal(got, want)


def test_an_added_adapter_joins_the_lora_group_when_every_adapted_module_changes():
    # A re-allocation at r_min 0 can change the rank of every adapted module and give one without an
    # adapter its first ranks: no unchanged LoRA tensor is left to say where the new ones train.
    model, targets, left_out = _partly_adapted_model()
    model.train()
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    other = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    optimizer = torch.optim.AdamW(
        [{"params": lora, "weight_decay": 0.1}, {"params": other, "weight_decay": 0.0}], lr=1e-2
    )
    adapted = sorted(lora_layers(model))
    ranks = {n: 0 for n in targets}
    ranks.update({n: lora_layers(model)[n].r["default"] + 1 for n in adapted})  # every adapted one grows
    ranks[left_out[0]] = 2  # and one module gets its first adapter
    changes = set_ranks(model, ranks, scaling="alpha_over_r", generator=torch.Generator().manual_seed(0))
    assert {c.name for c in changes} == {*adapted, left_out[0]}
    replace_in_optimizer(optimizer, [pair for c in changes for pair in c.replaced])  # no `like`
    lora_group, other_group = optimizer.param_groups
    now_lora = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" in n]
    assert {id(p) for p in lora_group["params"]} == {id(p) for p in now_lora}  # the added one included
    assert {id(p) for p in other_group["params"]} == {id(p) for p in other}
    model(**_padded_batch("classification")).loss.backward()
    optimizer.step()
    assert bool(lora_layers(model)[left_out[0]].lora_B["default"].weight.abs().sum() > 0)
