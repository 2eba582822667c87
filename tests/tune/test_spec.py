"""The tune section and the cells it makes: equal effort enforced, clear refusals, stable study names."""

from __future__ import annotations

import pytest
from tune_runs import write_spec

from fimlora.cli import main
from fimlora.config import parse_config
from fimlora.errors import FimloraError
from fimlora.sweep import load_spec, parse_spec
from fimlora.tune import parse_tune, plan_cells

GRID = {
    "model": ["some/model"],
    "dataset": ["movie-reviews"],
    "method": ["lora", "fim-lora", "adalora"],
    "budget": [{"uniform_rank": 2}, {"uniform_rank": 4}],
    "seed": [3, 4, 5],
}
TUNE = {
    "trials": 8,
    "learning_rate": {"low": 1e-4, "high": 1e-2},
    "methods": {
        "fim-lora": {
            "allocation.tau": {"low": 0.5, "high": 2.0},
            "lora.scaling": {"choices": ["alpha_over_r", "alpha_over_sqrt_r"]},
        },
        "adalora": {"method_options.adalora.tinit_ratio": {"low": 0.0, "high": 0.3}},
    },
}


def spec_of(tune=TUNE, grid=GRID, defaults=None):
    data = {"name": "s", "grid": grid, "tune": tune}
    if defaults is not None:
        data["defaults"] = defaults
    return parse_spec(data, base_dir="/x")


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def test_unequal_trial_counts_are_refused_before_anything_runs(capsys, tmp_path):
    tune = {**TUNE, "methods": {**TUNE["methods"], "adalora": {**TUNE["methods"]["adalora"], "trials": 16}}}
    path = write_spec(tmp_path, {**GRID, "model": [str(tmp_path / "no-model")]}, tune)
    code, _, err = run_cli(capsys, "tune", path)
    assert code == 2 and "Traceback" not in err
    assert "every method gets the same tuning effort" in err and "adalora: 16" in err
    assert not (tmp_path / "store").exists()  # nothing was started, not even the storage
    # Repeating the common count is allowed; --trials then sets every study's count alike.
    same = {**TUNE, "methods": {**TUNE["methods"], "lora": {"trials": 8}}}
    settings = parse_tune(spec_of(same), trials=5)
    assert settings.trials == 5
    assert all("trials" not in dims for dims in settings.methods.values())


def test_every_cell_gets_the_same_learning_rate_range_and_its_own_extras():
    settings = parse_tune(spec_of())
    cells = plan_cells(spec_of(), settings)
    assert len(cells) == 3 * 2  # methods × budgets: seeds collapse to the tuning seed
    for cell in cells:
        keys = [p.key for p in cell.space]
        assert keys[0] == "train.learning_rate"
        # log-uniform unless the spec says `log: false`
        assert (cell.space[0].low, cell.space[0].high, cell.space[0].log) == (1e-4, 1e-2, True)
        assert cell.config.seed == 3  # the grid's first seed
        assert cell.config.train.eval_split == "validation"
        assert cell.config.train.eval_every == 100 // 4  # default: a quarter of the steps
        assert cell.metric == "accuracy"  # movie-reviews is a classification dataset
    extras = {c.method: [p.key for p in c.space[1:]] for c in cells}
    assert extras == {
        "lora": [],
        "fim-lora": ["allocation.tau", "lora.scaling"],
        "adalora": ["method_options.adalora.tinit_ratio"],
    }


def test_a_learning_rate_range_is_log_uniform_unless_it_says_otherwise():
    uniform = parse_tune(spec_of({**TUNE, "learning_rate": {"low": 1e-4, "high": 1e-2, "log": False}}))
    assert parse_tune(spec_of()).learning_rate.log and not uniform.learning_rate.log
    assert parse_tune(spec_of({"trials": 2})).learning_rate.log  # the default range


def test_study_names_are_deterministic_and_follow_every_setting_but_the_trial_count():
    names = [c.study_name for c in plan_cells(spec_of(), parse_tune(spec_of()))]
    assert len(set(names)) == len(names)
    assert names == [c.study_name for c in plan_cells(spec_of(), parse_tune(spec_of()))]
    more = plan_cells(spec_of(), parse_tune(spec_of(), trials=20))
    assert [c.study_name for c in more] == names  # more trials extend the same studies
    longer = spec_of(defaults={"train": {"steps": 50}})
    assert not set(c.study_name for c in plan_cells(longer, parse_tune(longer))) & set(names)
    wider = spec_of(tune={**TUNE, "learning_rate": {"low": 1e-5, "high": 1e-2, "log": True}})
    assert not set(c.study_name for c in plan_cells(wider, parse_tune(wider))) & set(names)


@pytest.mark.parametrize(
    ("tune", "grid", "message"),
    [
        ({**TUNE, "methods": {"dora": {}}}, GRID, "tune.methods names dora, not in the grid"),
        ({**TUNE, "methods": {"lora": {"budget.params": {"low": 1, "high": 9}}}}, GRID, "cannot be searched"),
        (
            {**TUNE, "methods": {"lora": {"train.learning_rate": {"low": 1, "high": 9}}}},
            GRID,
            "tune.learning_rate",
        ),
        ({**TUNE, "methods": {"lora": {"allocation.tau": {"low": 2, "high": 1}}}}, GRID, "low < high"),
        ({**TUNE, "methods": {"lora": {"allocation.tau": 3}}}, GRID, "must be {low, high}"),
        (TUNE, {**GRID, "learning_rate": [1e-3]}, "must not have a learning_rate axis"),
        ({**TUNE, "learning_rate": None}, {**GRID, "learning_rate": [1e-3, 2e-3]}, "would need one each"),
        ({**TUNE, "learning_rate": None}, GRID, "nothing to search for lora"),
        ({"learning_rate": {"low": 1e-4, "high": 1e-2}}, GRID, "tune.trials: Field required"),
    ],
)
def test_bad_tune_sections_are_refused_with_the_reason(tune, grid, message):
    with pytest.raises(FimloraError) as info:
        parse_tune(spec_of(tune, grid))
    assert message in str(info.value)


def test_a_value_a_method_cannot_take_is_refused_when_the_cells_are_planned():
    # AdaLoRA's PEFT layer scales by alpha / kept ranks whatever the config says: rsLoRA scaling would be
    # silently ignored, so searching it is refused up front, naming the cell and the value.
    tune = {
        **TUNE,
        "methods": {"adalora": {"lora.scaling": {"choices": ["alpha_over_r", "alpha_over_sqrt_r"]}}},
    }
    with pytest.raises(FimloraError) as info:
        plan_cells(spec_of(tune), parse_tune(spec_of(tune)))
    assert "lora.scaling = 'alpha_over_sqrt_r'" in str(info.value) and "adalora" in str(info.value)
    typo = {**TUNE, "methods": {"fim-lora": {"allocation.tua": {"low": 0.5, "high": 2.0}}}}
    with pytest.raises(FimloraError, match=r"allocation\.tua: unknown key"):
        plan_cells(spec_of(typo), parse_tune(spec_of(typo)))


def test_rslora_scaling_is_a_config_value_for_lora_and_refused_where_ignored():
    base = {"model": "m", "dataset": "movie-reviews", "lora": {"scaling": "alpha_over_sqrt_r"}}
    assert parse_config({**base, "methods": ["fim-lora"]}).lora.scaling == "alpha_over_sqrt_r"
    for method in ("adalora", "hydralora"):
        with pytest.raises(FimloraError, match=r"does not implement lora\.scaling 'alpha_over_sqrt_r'"):
            parse_config({**base, "methods": [method]})
    parse_config({**base, "methods": ["full-ft"]})  # no LoRA scaling at all: the setting does not apply


def test_a_spec_without_tune_section_is_refused_and_sweeps_ignore_the_section(tmp_path):
    with pytest.raises(FimloraError, match="has no tune: section"):
        parse_tune(spec_of(tune=None))
    path = write_spec(tmp_path, GRID, TUNE)
    assert load_spec(path).tune == TUNE  # the same file serves fimlora sweep


def test_seeds_and_aggregate_name_new_studies_and_one_seed_keeps_the_old_names(capsys, tmp_path):
    names = [c.study_name for c in plan_cells(spec_of(), parse_tune(spec_of()))]
    # One seed: its mean is its worst, and studies made before tune.seeds existed keep their names.
    worst_one = spec_of({**TUNE, "seeds": 1, "aggregate": "worst"})
    assert [c.study_name for c in plan_cells(worst_one, parse_tune(worst_one))] == names
    two = parse_tune(spec_of(), seeds=2)
    cells = plan_cells(spec_of(), two)
    assert all(c.seeds == (3, 4) and c.aggregate == "mean" for c in cells)  # from the grid's first seed
    assert not {c.study_name for c in cells} & set(names)
    worst = spec_of({**TUNE, "seeds": 2, "aggregate": "worst"})
    assert not {c.study_name for c in plan_cells(worst, parse_tune(worst))} & {c.study_name for c in cells}
    with pytest.raises(FimloraError, match="--seeds must be at least 1"):
        parse_tune(spec_of(), seeds=0)
    path = write_spec(
        tmp_path, {**GRID, "model": [str(tmp_path / "no-model")]}, {**TUNE, "aggregate": "best"}
    )
    code, _, err = run_cli(capsys, "tune", path)
    assert code == 2 and "tune.aggregate" in err and "Traceback" not in err
