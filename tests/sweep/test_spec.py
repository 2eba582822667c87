"""Sweep specs and their expansion: counts, stable keys, deep-merged defaults, clear errors."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest

from fimlora.cli import main
from fimlora.errors import FimloraError
from fimlora.sweep import config_hash, expand, load_spec, parse_spec

GRID = {
    "model": ["some/model"],
    "dataset": ["movie-reviews"],
    "method": ["lora", "fim-lora", "random-rank"],
    "budget": [{"uniform_rank": 2}, {"uniform_rank": 4}],
    "seed": [0, 1],
    "learning_rate": [1e-3, "2e-3"],  # YAML reads 2e-3 (no dot) as a string: accepted as a number
}


@pytest.fixture
def spec_of(defaults):
    def make(grid=None):
        return parse_spec({"name": "s", "defaults": defaults, "grid": grid or GRID}, base_dir="/x")

    return make


def test_expansion_counts_configs_and_directories(spec_of, defaults):
    runs = expand(spec_of())
    assert len(runs) == 3 * 2 * 2 * 2
    assert len({run.key for run in runs}) == len(runs)
    for run in runs:
        config = run.config
        assert len(config.methods) == 1 and run.method in run.key
        assert run.key.startswith(f"{run.method}-r{config.budget.uniform_rank}-s{config.seed}-")
        assert Path(config.output_dir) == Path("/x/runs") / run.key
        assert run.run_directory.path == Path("/x/runs") / run.key / run.method
        assert run.axes["learning_rate"] == config.train.learning_rate
        assert run.status == "new"
    # seed outermost, method innermost: the first three runs are the three methods of seed 0
    assert [run.method for run in runs[:3]] == GRID["method"]
    assert {run.config.seed for run in runs[:12]} == {0}
    assert sorted({run.config.train.learning_rate for run in runs}) == [1e-3, 2e-3]


def test_defaults_are_merged_deeply(spec_of, defaults):
    (run, *_) = expand(spec_of())
    assert run.config.train.steps == 2 and run.config.train.max_length == 16  # from defaults.train
    assert run.config.train.learning_rate == 1e-3  # from the grid, next to them
    assert run.config.dataset_options.text_column == "review"
    assert run.config.fisher.num_examples == 8


def test_keys_do_not_depend_on_grid_order_name_or_store(spec_of, defaults):
    keys = {run.key for run in expand(spec_of())}
    rng = random.Random(0)
    shuffled = {axis: rng.sample(values, len(values)) for axis, values in GRID.items()}
    other = parse_spec(
        {"name": "renamed", "output_dir": "/elsewhere", "defaults": defaults, "grid": shuffled},
        base_dir="/y",
    )
    assert {run.key for run in expand(other)} == keys
    # a grid that grows keeps the keys of the runs it already had
    grown = expand(spec_of({**GRID, "seed": [0, 1, 2]}))
    assert keys < {run.key for run in grown}


def test_different_settings_give_different_keys(spec_of, defaults):
    base = {run.key for run in expand(spec_of())}
    changed_defaults = {**defaults, "train": {**defaults["train"], "steps": 3}}
    changed = parse_spec({"name": "s", "defaults": changed_defaults, "grid": GRID}, base_dir="/x")
    assert base.isdisjoint(run.key for run in expand(changed))
    run = expand(spec_of())[0]
    assert config_hash(run.config) == config_hash(run.config.model_copy(update={"output_dir": "/z"}))
    assert config_hash(run.config) != config_hash(run.config.model_copy(update={"seed": 7}))


def test_axes_may_come_from_defaults(defaults):
    defaults = {**defaults, "model": "m", "dataset": "d", "seed": 3, "budget": {"params": 5000}}
    runs = expand(parse_spec({"name": "s", "defaults": defaults, "grid": {"method": ["lora"]}}))
    assert len(runs) == 1
    assert runs[0].key.startswith("lora-p5000-s3-")
    assert runs[0].axes == {
        "model": "m",
        "dataset": "d",
        "method": "lora",
        "budget": {"uniform_rank": None, "params": 5000},
        "seed": 3,
        "learning_rate": runs[0].config.train.learning_rate,
    }


def test_output_dir_is_relative_to_the_spec_file(write_spec, tmp_path):
    spec = load_spec(
        write_spec({"method": ["lora"]}, output_dir="store", defaults={"model": "m", "dataset": "d"})
    )
    assert spec.output_path == tmp_path / "store"
    assert Path(expand(spec)[0].config.output_dir).parent == tmp_path / "store"


@pytest.mark.parametrize(
    ("change", "words"),
    [
        ({"grid": {**GRID, "optimizer": ["adamw"]}}, ["grid.optimizer", "unknown key"]),
        ({"grdi": {}}, ["grdi", "unknown key"]),
        ({"grid": {k: v for k, v in GRID.items() if k != "method"}}, ["grid.method", "required"]),
        ({"grid": {**GRID, "seed": []}}, ["grid.seed"]),
        ({"grid": {**GRID, "method": [{"allocation": "fisher"}]}}, ["name"]),
        ({"defaults": {"seed": 1}}, ["defaults", "seed"]),
        ({"defaults": {"methods": ["lora"]}}, ["methods"]),
        ({"defaults": {"output_dir": "x"}}, ["output_dir"]),
        ({"defaults": {"train": {"learning_rate": 0.1}}}, ["train.learning_rate"]),
        ({"defaults": {"train": 5}}, ["defaults.train", "mapping"]),
        ({"defaults": {"train": {"stepz": 3}}}, ["train.stepz", "unknown key", "method=lora"]),
        ({"grid": {**GRID, "budget": [{"uniform_rank": 0}]}}, ["budget.uniform_rank"]),
        ({"grid": {**GRID, "method": ["lora", "adalorra"]}}, ["adalorra"]),
        ({"grid": {**GRID, "seed": [0, 0]}}, ["same run"]),
        ({"grid": {"method": ["lora"]}, "defaults": {}}, ["model", "required"]),
        ({"defaults": {"trust_remote_code": "yes"}}, ["trust_remote_code", "boolean"]),
    ],
)
def test_invalid_specs_fail_before_anything_runs(defaults, change, words):
    data = {"name": "s", "defaults": defaults, "grid": GRID, **change}
    with pytest.raises(FimloraError) as info:
        expand(parse_spec(data, base_dir="/nonexistent"))
    for word in words:
        assert word in str(info.value), str(info.value)


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_cli_errors_are_one_line(capsys, tmp_path, write_spec):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("name: [unclosed\n", encoding="utf-8")
    unknown_axis = write_spec({"method": ["lora"], "colour": ["red"]}, filename="axis.yaml")
    valid = write_spec({"method": ["lora"]}, defaults={"model": "m", "dataset": "d"})
    for argv, word in [
        ([bad_yaml], "line"),
        ([tmp_path / "missing.yaml"], "Cannot read"),
        ([unknown_axis], "grid.colour"),
        ([valid, "--backend", "slurm"], "slurm"),
        ([valid, "--gpus-per-run", "1"], "Ray"),
        ([valid, "--backend", "ray", "--workers", "2"], "local backend"),
    ]:
        code, _, err = run_cli(capsys, "sweep", *map(str, argv))
        assert code == 2, err
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and word in lines[0], err
    assert not (tmp_path / "runs").exists()


def test_ray_missing_is_a_clear_error(monkeypatch):
    from fimlora.sweep.ray_backend import import_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` sees when it is not installed
    with pytest.raises(FimloraError, match=r"pip install 'fimlora\[ray\]'"):
        import_ray()
