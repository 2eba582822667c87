"""``tune.probes``: fixed points every study tries after its ``trials`` trials. The sampler's trials are
exactly those of a study without probes, the probes come last with exactly their values (also when
added to a finished study, which keeps its name), and probes outside a method's space are refused."""

from __future__ import annotations

import math
import re

import optuna
import pandas as pd
import pytest
import yaml
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.errors import FimloraError
from fimlora.sweep import load_spec, parse_spec
from fimlora.tune import TRIALS_FILE, TUNED_FILE, parse_tune, plan_cells
from fimlora.tune.search import PlaceSeededSampler
from fimlora.tune.storage import PROBE_ATTR, default_storage, kind_counts

LOW, HIGH = 3e-4, 5e-2
PROBES = [{"lr": 8e-4}, {"lr": 1.6e-3}]


def objective(trial: optuna.Trial) -> float:
    lr = trial.suggest_float("lr", LOW, HIGH, log=True)
    tau = trial.suggest_float("tau", 0.5, 2.0)
    return -abs(math.log(lr / 1e-2)) - abs(tau - 1.0)


def run(sampler: PlaceSeededSampler, trials: int, study: optuna.Study | None = None) -> optuna.Study:
    study = study or optuna.create_study(sampler=sampler, direction="maximize")
    study.sampler = sampler
    study.optimize(objective, n_trials=trials)
    return study


def test_probes_are_the_last_trials_and_leave_the_samplers_trials_as_they_were():
    plain = run(PlaceSeededSampler(0, 2), 5)
    probed = run(PlaceSeededSampler(0, 2, probes=PROBES, probes_from=5), 7)
    assert [t.params for t in probed.trials[:5]] == [t.params for t in plain.trials]
    assert [t.params["lr"] for t in probed.trials[5:]] == [8e-4, 1.6e-3]
    # A probe fixes only what it names: the other dimension is drawn.
    taus = [t.params["tau"] for t in probed.trials[5:]]
    assert all(0.5 <= tau <= 2.0 for tau in taus) and taus[0] != taus[1]
    # The look-alike, Optuna's enqueue_trial, runs the probes first and moves every sampler trial.
    enqueued = optuna.create_study(sampler=PlaceSeededSampler(0, 2), direction="maximize")
    for probe in PROBES:
        enqueued.enqueue_trial(probe)
    run(PlaceSeededSampler(0, 2), 7, enqueued)
    assert [t.params["lr"] for t in enqueued.trials[:2]] == [8e-4, 1.6e-3]
    assert [t.params for t in enqueued.trials[2:]] != [t.params for t in plain.trials]


def test_probes_added_to_a_finished_study_extend_it_by_exactly_the_probes():
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    run(PlaceSeededSampler(0, 2), 5, study)
    first = [t.params for t in study.trials]
    resumed = optuna.load_study(study_name="s", storage=storage)
    run(PlaceSeededSampler(0, 2, probes=PROBES, probes_from=5), 2, resumed)
    assert [t.params for t in resumed.trials[:5]] == first
    assert [t.params["lr"] for t in resumed.trials[5:]] == [8e-4, 1.6e-3]


GRID = {"model": ["some/model"], "dataset": ["movie-reviews"], "method": ["lora", "fim-lora", "random-rank"]}
TUNE = {
    "trials": 4,
    "learning_rate": {"low": LOW, "high": HIGH},
    "methods": {"fim-lora": {"allocation.tau": {"low": 0.5, "high": 2.0}}},
    "share": {"random-rank": "fim-lora"},
}


def settings(**tune):
    spec = parse_spec({"name": "s", "grid": GRID, "tune": {**TUNE, **tune}})
    return spec, parse_tune(spec)


def test_probes_add_to_the_budget_and_keep_the_study_names():
    spec, plain = settings()
    spec_probed, probed = settings(probes=[{"train.learning_rate": 8e-4}, {"train.learning_rate": 1.6e-3}])
    assert (plain.budget, probed.budget) == (4, 6)
    names = [c.study_name for c in plan_cells(spec, plain)]
    assert [c.study_name for c in plan_cells(spec_probed, probed)] == names


@pytest.mark.parametrize(
    ("probes", "message"),
    [
        ([{"train.learning_rate": 6e-2}], r"tune.probes\[0\]: train.learning_rate = 0.06 is outside lora's"),
        ([{"allocation.tau": 1.0}], r"allocation.tau is not searched for lora"),
        ([{"train.learning_rate": "fast"}], r"outside lora's range"),
        ([{}], r"tune.probes\[0\] names no dimension"),
        ([{"train.learning_rate": 1e-3}, {"train.learning_rate": 1e-3}], "repeats a point"),
    ],
)
def test_a_probe_outside_a_tuned_methods_space_is_refused(probes, message):
    with pytest.raises(FimloraError, match=message):
        settings(probes=probes)


def test_a_probe_may_name_what_only_the_tuned_methods_search():
    # random-rank shares fim-lora's settings and has no study, so only lora and fim-lora must admit it.
    grid = {**GRID, "method": ["fim-lora", "random-rank"]}
    spec = parse_spec({"name": "s", "grid": grid, "tune": {**TUNE, "probes": [{"allocation.tau": 1.0}]}})
    assert parse_tune(spec).probes == [{"allocation.tau": 1.0}]


def _tune(capsys, path) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(path)])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    return out


def test_a_tuning_extended_by_probes_trains_them_last_and_records_them(
    capsys, small_bert_dir, split_dir, tmp_path
):
    tune = {"trials": 2, "metric": "loss", "learning_rate": {"low": 1e-3, "high": 1e-1}}
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), tune)
    _tune(capsys, path)
    assert "probes" not in yaml.safe_load((tmp_path / "store" / TUNED_FILE).read_text())
    assert "probe" not in pd.read_csv(tmp_path / "store" / TRIALS_FILE).columns

    path = write_spec(
        tmp_path, lora_grid(small_bert_dir, split_dir), {**tune, "probes": [{"train.learning_rate": 3e-3}]}
    )
    out = _tune(capsys, path)
    assert "1 studies × 2 trials + 1 probes" in out and "(probe 0)" in out
    spec = load_spec(path)
    (cell,) = plan_cells(spec, parse_tune(spec))
    study = optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path))
    assert sum(kind_counts(study.trials)[k] for k in ("complete", "pruned", "failed")) == 3
    last = study.trials[-1]
    assert last.params == {"train.learning_rate": 3e-3} and last.user_attrs[PROBE_ATTR] == 0
    assert PROBE_ATTR not in study.trials[0].user_attrs
    document = yaml.safe_load((spec.output_path / TUNED_FILE).read_text())
    assert document["trials_per_study"] == 3 and document["probes"] == [{"train.learning_rate": 3e-3}]
    rows = pd.read_csv(spec.output_path / TRIALS_FILE).set_index("number")
    assert rows["probe"].isna().tolist() == [True, True, False] and rows.loc[2, "probe"] == 0
    assert " trial " not in _tune(capsys, path)  # the budget is taken: a rerun trains nothing
    assert (
        len(optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path)).trials)
        == 3
    )

    # A spec that no longer says what the study ran is refused before anything trains: the record would
    # list probes the study never tried, or run one twice.
    for changed, message in [
        ({"trials": 3}, r"trial 2 tried probe 0, but with tune.trials = 3 its place \(2\) is the sampler's"),
        ({"trials": 1}, r"trial 1 \(place 1\) is the sampler's trial \[lr=.*\], where tune.trials = 1"),
        (
            {"probes": [{"train.learning_rate": 5e-3}]},
            r"is probe 0 \[lr=0.003\], .* put probe 0 \[lr=0.005\]",
        ),
    ]:
        path = write_spec(
            tmp_path,
            lora_grid(small_bert_dir, split_dir),
            {**tune, "probes": [{"train.learning_rate": 3e-3}], **changed},
        )
        with pytest.raises(SystemExit) as exit_info:
            main(["tune", str(path)])
        err = capsys.readouterr().err
        assert exit_info.value.code != 0 and "Probes are a study's last trials" in err
        assert re.search(message, err), err
    assert (
        len(optuna.load_study(study_name=cell.study_name, storage=default_storage(spec.output_path)).trials)
        == 3
    )
