"""What the calibration pass computes for the methods: per-module scores come from the trace statistic (no
weight-sized tensor), with the same scores and the same rank allocations as from the diagonal; the
diagonal itself only for a rule that asks for it. With gradient checkpointing, the pass back-propagates one
example at a time: the same scores and allocations.
"""

from __future__ import annotations

import pytest
from tiny_models import NO_DEPLOYMENT_FIGURES

import fimlora.experiment as experiment
from fimlora.config import parse_config
from fimlora.experiment import build_method, calibrate, prepare
from fimlora.methods import get_allocation, resolve_method
from fimlora.methods.base import NEEDS_DIAGONAL, NEEDS_GRADIENTS, NEEDS_SCORES

SCORED = ("fim-lora", "random-rank", "fim-lora-dynamic")


def _prepared(model_dir, dataset, out, options, aggregation, checkpointing=False):
    config = parse_config(
        {
            "model": str(model_dir),
            "dataset": str(dataset),
            "dataset_options": options,
            "output_dir": str(out),
            "methods": list(SCORED),
            "budget": {"uniform_rank": 2},
            "fisher": {"num_examples": 12, "batch_size": 4, "aggregation": aggregation},
            "train": {
                "steps": 10,
                "batch_size": 4,
                "max_length": 16,
                "gradient_checkpointing": checkpointing,
            },
            "evaluate": NO_DEPLOYMENT_FIGURES,
        }
    )
    return prepare(config)


@pytest.mark.parametrize("aggregation", ["mean", "trace"])
@pytest.mark.parametrize("task", ["causal-lm", "classification"])
def test_scores_come_from_the_trace_with_the_diagonals_scores_and_allocations(
    task, aggregation, tiny_llama_dir, text_jsonl, tiny_bert_dir, sentiment_csv, tmp_path
):
    if task == "causal-lm":
        args = (tiny_llama_dir, text_jsonl, {"text_column": "body"})
    else:
        args = (tiny_bert_dir, sentiment_csv, {"text_column": "review", "label_column": "sentiment"})
    by_statistic = {}
    for needs in ({NEEDS_SCORES}, {NEEDS_DIAGONAL}):
        prepared = _prepared(*args[:2], tmp_path / next(iter(needs)), args[2], aggregation)
        calibrate(prepared, needs, progress=False, log=lambda _: None)
        assert prepared.fisher is not None
        allocations = {name: build_method(prepared, name).allocation for name in SCORED}
        by_statistic[prepared.fisher.statistic] = (prepared.fisher, allocations)
    (trace, trace_allocations), (diagonal, diagonal_allocations) = (
        by_statistic["trace"],
        by_statistic["diagonal"],
    )
    assert trace.diagonal is None and trace.traces is not None
    expected = diagonal.scores(aggregation)
    assert trace.scores(aggregation) == pytest.approx(expected, rel=1e-5)
    for name in SCORED:
        assert trace_allocations[name].ranks == diagonal_allocations[name].ranks, name


def test_the_methods_needs_decide_the_statistic(tiny_llama_dir, text_jsonl, tmp_path):
    for name in SCORED:
        assert get_allocation(resolve_method(name).allocation).needs == {NEEDS_SCORES}, name
    cases = [({NEEDS_SCORES}, "trace", False), ({NEEDS_GRADIENTS}, "trace", True)]
    cases += [({NEEDS_SCORES, NEEDS_DIAGONAL}, "diagonal", False)]
    for index, (needs, statistic, with_gradient) in enumerate(cases):
        prepared = _prepared(
            tiny_llama_dir, text_jsonl, tmp_path / str(index), {"text_column": "body"}, "mean"
        )
        calibrate(prepared, needs, progress=False, log=lambda _: None)
        assert prepared.fisher is not None
        assert prepared.fisher.statistic == statistic, needs
        assert (prepared.fisher.gradients is not None) == with_gradient, needs


def test_with_gradient_checkpointing_the_pass_backpropagates_one_example_at_a_time(
    tiny_llama_dir, text_jsonl, tmp_path, monkeypatch
):
    estimate = experiment.estimate_fisher
    per_backward: list[int | None] = []

    def recording(*args, **kwargs):
        per_backward.append(kwargs.get("examples_per_backward"))
        return estimate(*args, **kwargs)

    monkeypatch.setattr(experiment, "estimate_fisher", recording)
    runs = {}
    for checkpointing in (False, True):
        prepared = _prepared(
            tiny_llama_dir,
            text_jsonl,
            tmp_path / str(checkpointing),
            {"text_column": "body"},
            "mean",
            checkpointing,
        )
        calibrate(prepared, {NEEDS_SCORES}, progress=False, log=lambda _: None)
        assert prepared.fisher is not None
        runs[checkpointing] = (prepared.fisher, build_method(prepared, "fim-lora").allocation)
    assert per_backward == [None, 1]
    (off, off_allocation), (on, on_allocation) = runs[False], runs[True]
    assert on.scores("mean") == pytest.approx(off.scores("mean"), rel=1e-5)
    assert on_allocation.ranks == off_allocation.ranks
