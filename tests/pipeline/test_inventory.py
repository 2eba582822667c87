"""`fimlora methods CONFIG [--all]`: counts without training, never touching the config's run store."""

from __future__ import annotations

import pytest
import yaml

import fimlora.methods
from fimlora.cli import main


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.fixture
def store_and_config(tmp_path, tiny_vocab_bert_dir, sentiment_csv):
    store = tmp_path / "store"
    (store / "fisher").mkdir(parents=True)
    (store / "fisher" / "fisher.json").write_text("a run's own Fisher, not to be touched\n")
    (store / "lora").mkdir()
    (store / "lora" / "result.json").write_text('{"status": "finished"}\n')

    def write(methods):
        config = tmp_path / "config.yaml"
        data = {
            "model": str(tiny_vocab_bert_dir),
            "dataset": str(sentiment_csv),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "output_dir": str(store),
            "methods": methods,
            "budget": {"uniform_rank": 2},
            "fisher": {"num_examples": 8, "batch_size": 8},
            "train": {"max_length": 16},
        }
        config.write_text(yaml.safe_dump(data), encoding="utf-8")
        return config

    return store, write


def _snapshot(root):
    return {
        str(p.relative_to(root)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in root.rglob("*")
        if p.is_file()
    }


def test_methods_leaves_the_run_store_alone_and_explains_counts_over_budget(capsys, store_and_config):
    store, write = store_and_config
    before = _snapshot(store)
    code, out, err = run_cli(capsys, "methods", write(["fim-lora", "adalora"]))
    assert code == 0, err
    assert _snapshot(store) == before and sorted(p.name for p in store.iterdir()) == ["fisher", "lora"]
    adalora = next(line for line in out.splitlines() if line.startswith("| adalora |"))
    params, budget = (int(cell.replace(",", "")) for cell in adalora.split("|")[5:8:2])
    assert params > budget and "initial adapter: pruned to the budget while it trains" in adalora


def test_all_presets_list_an_infeasible_one_instead_of_stopping(capsys, monkeypatch, store_and_config):
    _, write = store_and_config
    presets = {name: fimlora.methods.PRESETS[name] for name in ("lora", "hydralora", "vera")}
    monkeypatch.setattr(fimlora.methods, "PRESETS", presets)
    code, out, err = run_cli(capsys, "methods", write(["lora"]), "--all")
    assert code == 0, err
    hydra = next(line for line in out.splitlines() if line.startswith("| hydralora |"))
    assert "cannot be built at this budget" in hydra and "raise the budget" in hydra
    assert "own size" in next(line for line in out.splitlines() if line.startswith("| vera |"))
    code, out, err = run_cli(capsys, "methods", write(["lora", "hydralora"]))  # the config's own: an error
    assert code == 2 and "| hydralora |" in out and err.startswith("error: HydraLoRA")
