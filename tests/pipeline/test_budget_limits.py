"""A budget above what full-rank adapters can spend is refused, naming how much is spendable, for every
method: each would otherwise train less than the budget it is credited with (MiniLM trained 15.9M
parameters for `budget: {params: 1e8}`, without a word)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.methods import PRESETS, get_allocation
from fimlora.preflight import PlannedRun, _Cache, check_config

# The tiny BERT: 2 layers of query/key/value/output 16×16, intermediate 32×16, output 16×32; full rank 16
# everywhere, so LoRA at full rank trains 2 × (4 × 16 × 32 + 2 × 16 × 48) parameters.
FULL_RANK_LORA = 2 * (4 * 16 * 32 + 2 * 16 * 48)
# LoRA-FA freezes A: a rank trains d_out only.
FULL_RANK_LORA_FA = 2 * 16 * (4 * 16 + 32 + 16)


# A hindsight rule must name its source run: one the same sweep will make, so preflight lets it through.
SWEEP = [PlannedRun("full-ft", 0, Path("sweep"))]


def config(model, data, method, **budget):
    needs_source = get_allocation(PRESETS[method].allocation).reads_source_run
    options = {"method_options": {"hindsight": {"source": "sweep/full-ft"}}} if needs_source else {}
    return parse_config(
        {
            **options,
            "model": str(model),
            "dataset": str(data),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "methods": [method],
            "budget": budget,
            "train": {"max_length": 16},
        }
    )


@pytest.fixture(scope="module")
def loaded() -> _Cache:
    """Data and model shells shared by the checks (preflight's own cache)."""
    return _Cache()


@pytest.mark.parametrize("method", list(PRESETS))
def test_every_method_refuses_a_budget_full_rank_adapters_cannot_spend(
    tiny_bert_dir, sentiment_csv, loaded, method
):
    with pytest.raises(FimloraError, match=f"{FULL_RANK_LORA:,} parameters at full rank") as info:
        check_config(config(tiny_bert_dir, sentiment_csv, method, params=FULL_RANK_LORA + 1), loaded, SWEEP)
    assert f"lower the budget to at most {FULL_RANK_LORA:,}" in str(info.value)
    with pytest.raises(FimloraError, match="uniform_rank 17"):
        check_config(config(tiny_bert_dir, sentiment_csv, method, uniform_rank=17), loaded, SWEEP)
    if method != "lora-fa":  # exactly full rank is spendable (LoRA-FA's ranks cost less: below)
        check_config(config(tiny_bert_dir, sentiment_csv, method, uniform_rank=16), loaded, SWEEP)


def test_a_method_whose_ranks_cost_less_is_refused_at_its_own_limit(tiny_bert_dir, sentiment_csv):
    check_config(config(tiny_bert_dir, sentiment_csv, "lora-fa", params=FULL_RANK_LORA_FA))
    with pytest.raises(FimloraError) as info:
        check_config(config(tiny_bert_dir, sentiment_csv, "lora-fa", params=FULL_RANK_LORA_FA + 1))
    assert "Method 'lora-fa'" in str(info.value) and f"{FULL_RANK_LORA_FA:,} at most" in str(info.value)


def test_r_max_lowers_what_can_be_spent(tiny_bert_dir, sentiment_csv):
    capped = config(tiny_bert_dir, sentiment_csv, "fim-lora", uniform_rank=8)
    capped = capped.model_copy(update={"allocation": capped.allocation.model_copy(update={"r_max": 4})})
    with pytest.raises(FimloraError, match=r"capped by allocation\.r_max=4"):
        check_config(capped)
