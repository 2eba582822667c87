"""LoRA-FA: only B trains, so a rank costs d_out; it is counted and budgeted as what trains."""

from __future__ import annotations

from pathlib import Path

import pytest
from method_runs import prepared_experiment, tiny_config

from fimlora.experiment import build_method, run_method
from fimlora.runs import RunDirectory


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora-fa")
    return prepared_experiment(tiny_config(tiny_bert_dir, sentiment_csv, out, ["lora-fa", "lora"]))


def _b_params(model):
    return sum(p.numel() for n, p in model.named_parameters() if ".lora_B." in n)


def test_a_rank_costs_d_out_and_the_budget_buys_the_ranks_it_affords(prepared):
    built = build_method(prepared, "lora-fa")
    allocation = built.allocation
    assert allocation.rank_costs == {n: d_out for n, (d_out, _) in prepared.shapes.items()}
    # Uniform ranks at the budget in B-only parameters: Σ r·d_out ≤ budget, and one more rank everywhere
    # would not fit.
    sum_out = sum(d_out for d_out, _ in prepared.shapes.values())
    rank = prepared.budget // sum_out
    assert set(allocation.ranks.values()) <= {rank, rank + 1}
    assert (
        allocation.num_params
        <= prepared.budget
        < allocation.num_params + max(d_out for d_out, _ in prepared.shapes.values())
    )
    # At the same budget plain LoRA gets fewer ranks: A's d_in per rank is paid there.
    lora = build_method(prepared, "lora").allocation
    assert all(allocation.ranks[n] > lora.ranks[n] for n in lora.ranks)


def test_the_count_is_what_trains_once_the_optimizer_froze_a(prepared):
    built = build_method(prepared, "lora-fa")
    trainable = {n for n, p in built.model.named_parameters() if p.requires_grad}
    assert trainable and not any(".lora_A." in n for n in trainable)
    assert built.counts["adapter_params"] == _b_params(built.model) == built.allocation.num_params


def test_result_json_records_the_parameters_that_trained(prepared):
    out = Path(prepared.config.output_dir)
    outcome = run_method(prepared, "lora-fa", RunDirectory(out / "lora-fa"), progress=False)
    result = outcome.result
    assert result["adapter_params"] == result["effective_adapter_params"] == _b_params(outcome.model)
    assert result["adapter_params"] <= result["budget"]
    assert result["allocation"]["num_params"] == result["adapter_params"]
