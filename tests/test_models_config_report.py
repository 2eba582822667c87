"""Target resolution, config validation, step-log guard and report tables."""

from __future__ import annotations

import json

import pytest
from tiny_models import make_tiny_bert, make_tiny_llama

from fimlora.config import load_config, parse_config
from fimlora.errors import FimloraError
from fimlora.models import default_target_modules, head_modules, resolve_target_modules, weight_shapes
from fimlora.reporting.tables import rank_table, results_table, split_module_name
from fimlora.train import _StepLog


def test_default_targets_are_block_linears_only():
    bert = make_tiny_bert(layers=3)
    names = default_target_modules(bert)
    assert len(names) == 18 and all(n.startswith("bert.encoder.layer.") for n in names)
    llama = make_tiny_llama(layers=2)
    names = default_target_modules(llama)
    assert len(names) == 14 and all(n.startswith("model.layers.") for n in names)
    assert not any("lm_head" in n for n in names)
    assert weight_shapes(llama, ["model.layers.0.mlp.up_proj"]) == {"model.layers.0.mlp.up_proj": (32, 16)}


def test_target_names_regex_and_errors():
    bert = make_tiny_bert()
    assert len(resolve_target_modules(bert, ["query", "value"])) == 4
    assert resolve_target_modules(bert, r".*layer\.1\.attention\.self\.(query|key)") == [
        "bert.encoder.layer.1.attention.self.query",
        "bert.encoder.layer.1.attention.self.key",
    ]
    with pytest.raises(FimloraError, match="available linear layer names: dense, key, query, value"):
        resolve_target_modules(bert, ["q_proj"])
    with pytest.raises(FimloraError, match="classifier"):
        resolve_target_modules(bert, ["classifier"])  # the head is never a LoRA target
    with pytest.raises(FimloraError, match="matches no linear"):
        resolve_target_modules(bert, "nothing.*here")
    with pytest.raises(FimloraError, match="invalid"):
        resolve_target_modules(bert, "(unclosed")


def test_head_modules_include_newly_initialised_weights():
    bert = make_tiny_bert()
    assert head_modules(bert, "classification", missing_keys=["bert.pooler.dense.weight"]) == [
        "bert.pooler.dense",
        "classifier",
    ]
    assert head_modules(make_tiny_llama(), "causal-lm") == []


def test_config_defaults_and_validation(tmp_path):
    config = parse_config({"model": "minilm", "dataset": "movie-reviews"})
    assert config.methods == ["lora", "fim-lora", "random-rank"]
    assert config.budget.reference_rank == 8 and config.lora_alpha == 16.0
    assert config.for_method("lora").methods == ["lora"]
    with pytest.raises(FimloraError, match="not both"):
        parse_config({"model": "m", "dataset": "d", "budget": {"uniform_rank": 2, "params": 10}})
    with pytest.raises(FimloraError, match=r"fisher\.estimator"):
        parse_config({"model": "m", "dataset": "d", "fisher": {"estimator": "kfac"}})
    with pytest.raises(FimloraError, match="repeat"):
        parse_config({"model": "m", "dataset": "d", "methods": ["lora", "lora"]})
    path = tmp_path / "c.yaml"
    path.write_text(config.to_yaml())
    assert load_config(path) == config
    path.write_text("")
    with pytest.raises(FimloraError, match="empty"):
        load_config(path)


def test_step_log_writes_jsonl_and_stops_on_nan(tmp_path):
    class State:
        global_step = 3
        is_world_process_zero = False

    log = _StepLog(tmp_path / "m.jsonl")
    log.on_log(None, State(), None, logs={"loss": 0.5, "learning_rate": 1e-3})
    assert not (tmp_path / "m.jsonl").exists()  # under torchrun only the main process writes
    State.is_world_process_zero = True
    log.on_log(None, State(), None, logs={"loss": 0.5, "learning_rate": 1e-3})
    record = json.loads((tmp_path / "m.jsonl").read_text())
    assert record["step"] == 3 and record["loss"] == 0.5
    with pytest.raises(FimloraError, match="nan at step 3"):
        log.on_log(None, State(), None, logs={"loss": float("nan")})


def test_results_table_shows_the_trained_ranks_and_methods_without_ranks():
    def result(method, allocation, records=None, **counts):
        return {
            "method": method,
            "task": "classification",
            "metrics": {"accuracy": 0.5, "macro_f1": 0.5},
            "adapter_params": counts.get("adapter_params", 100),
            "effective_adapter_params": counts.get("effective", 100),
            "head_params": 2,
            "budget": 100,
            "allocation": allocation,
            "records": records or {},
            "train": {"wall_time_s": 1.0, "examples_per_s": 8.0, "peak_memory_bytes": 2**20},
        }

    uniform = {"min_rank": 4, "mean_rank": 4.0, "max_rank": 4}
    rows = results_table(
        [
            result("lora", uniform),
            result(
                "adalora",
                uniform,
                {"adalora": {"final_ranks": {"a": 1, "b": 5}}},
                adapter_params=150,
                effective=96,
            ),
            result("full-ft", None, effective=5000),
        ]
    ).splitlines()[2:]
    assert "| 4/4.00/4 |" in rows[0]
    assert "| 96 |" in rows[1] and "| 1/3.00/5 |" in rows[1]  # after pruning, not the init_r adapter
    assert "| 5,000 |" in rows[2] and "| — |" in rows[2]


def test_rank_table_layout():
    assert split_module_name("model.layers.12.self_attn.q_proj") == (12, "self_attn.q_proj")
    table = rank_table({"m.layers.0.q": 2, "m.layers.0.v": 3, "m.layers.1.q": 5, "m.layers.1.v": 1})
    assert table.splitlines()[0] == "| layer | q | v |"
    assert table.splitlines()[2:] == ["| 0 | 2 | 3 |", "| 1 | 5 | 1 |"]


def test_shipped_configs_are_valid_and_the_demo_config_matches_its_file():
    from pathlib import Path

    from fimlora.demo import demo_config

    root = Path(__file__).resolve().parents[1] / "configs"
    configs = {p.name: load_config(p) for p in sorted(root.glob("*.yaml"))}
    assert len(configs) >= 2
    file_config = configs["minilm-movie-reviews.yaml"]
    assert file_config.model_copy(update={"output_dir": "runs/demo"}) == demo_config()
