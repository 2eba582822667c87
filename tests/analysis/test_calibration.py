"""Ranking agreement on hand-made score vectors, disjoint subsets, and the analysis on a tiny model."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from torch.utils.data import DataLoader

from fimlora.analysis import (
    agreement,
    calibration_stability,
    compare_subsets,
    disjoint_subsets,
    kendall_tau,
    load_calibration,
    spearman_rho,
    top_k_overlap,
)
from fimlora.analysis.calibration import EMPIRICAL_VS_MC, SUBSETS, SubsetScores
from fimlora.cli import main
from fimlora.errors import FimloraError

A = {"m1": 4.0, "m2": 3.0, "m3": 2.0, "m4": 1.0}


def test_kendall_tau_by_hand():
    assert kendall_tau(A, dict(A)) == pytest.approx(1.0)
    assert kendall_tau(A, {k: -v for k, v in A.items()}) == pytest.approx(-1.0)
    # One swapped neighbour pair: 5 concordant, 1 discordant of 6 → τ = 4/6.
    assert kendall_tau(A, {"m1": 4.0, "m2": 2.0, "m3": 3.0, "m4": 1.0}) == pytest.approx(2 / 3)
    # Only the ranking matters, not the scale.
    assert kendall_tau(A, {k: 10 * v**3 for k, v in A.items()}) == pytest.approx(1.0)


def test_spearman_and_top_k_by_hand():
    swapped = {"m1": 4.0, "m2": 2.0, "m3": 3.0, "m4": 1.0}
    # Rank differences (0, 1, 1, 0): ρ = 1 − 6·2 / (4·15) = 0.8.
    assert spearman_rho(A, swapped) == pytest.approx(0.8)
    assert top_k_overlap(A, swapped, 1) == 1.0
    assert top_k_overlap(A, swapped, 2) == 0.5
    assert top_k_overlap(A, {k: -v for k, v in A.items()}, 2) == 0.0
    assert top_k_overlap(A, swapped, 4) == 1.0
    with pytest.raises(FimloraError, match="1 <= k <= 4"):
        top_k_overlap(A, swapped, 5)
    with pytest.raises(FimloraError, match="different modules"):
        kendall_tau(A, {"m1": 1.0})
    assert math.isnan(spearman_rho(A, dict.fromkeys(A, 1.0)))


def test_disjoint_subsets():
    subsets = disjoint_subsets(100, 30, 3, seed=0)
    assert [len(s) for s in subsets] == [30, 30, 30]
    assert len(set(np.concatenate(subsets).tolist())) == 90
    assert all(np.all(np.diff(s) > 0) for s in subsets)
    assert all(
        np.array_equal(a, b) for a, b in zip(subsets, disjoint_subsets(100, 30, 3, seed=0), strict=True)
    )
    with pytest.raises(FimloraError, match="only 100"):
        disjoint_subsets(100, 40, 3)


def test_compare_subsets_records():
    def entry(size, subset, estimator, scores):
        return SubsetScores(size, subset, estimator, {"mean": scores, "trace": scores})

    reversed_ = {k: -v for k, v in A.items()}
    entries = [
        entry(4, 0, "empirical", A),
        entry(4, 1, "empirical", A),
        entry(4, 2, "empirical", reversed_),
        entry(4, 0, "mc", A),
        entry(4, 1, "mc", reversed_),
        entry(4, 2, "mc", reversed_),
    ]
    records = compare_subsets(entries, k=2)
    subsets = [r for r in records if r["comparison"] == SUBSETS and r["aggregation"] == "mean"]
    assert len(subsets) == 2 * 3  # 3 pairs per estimator
    emp = {(r["a"], r["b"]): r["kendall_tau"] for r in subsets if r["estimator"] == "empirical"}
    assert emp == {(0, 1): pytest.approx(1.0), (0, 2): pytest.approx(-1.0), (1, 2): pytest.approx(-1.0)}
    cross = [r for r in records if r["comparison"] == EMPIRICAL_VS_MC and r["aggregation"] == "mean"]
    assert [(r["a"], round(r["kendall_tau"], 6)) for r in cross] == [(0, 1.0), (1, -1.0), (2, 1.0)]
    assert agreement(A, A, 2) == {"kendall_tau": 1.0, "spearman": 1.0, "top_k_overlap": 1.0}


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, reviews_csv, tmp_path_factory):
    from fimlora.config import parse_config
    from fimlora.experiment import prepare

    config = parse_config(
        {
            "model": str(tiny_bert_dir),
            "dataset": str(reviews_csv),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "output_dir": str(tmp_path_factory.mktemp("calibration-runs")),
            "fisher": {"batch_size": 8},
            "train": {"max_length": 16},
        }
    )
    return prepare(config)


def test_identical_subsets_give_tau_one(prepared):
    from fimlora.fisher import estimate_fisher

    train = prepared.tokenized["train"]
    rows = disjoint_subsets(len(train), 12, 1, seed=0)[0].tolist()
    scores = []
    for _ in range(2):
        loader = DataLoader(train.select(rows), batch_size=8, collate_fn=prepared.collator)
        fisher = estimate_fisher(
            prepared.loaded.model, loader, target_modules=prepared.targets, progress=False
        )
        scores.append(fisher.scores("mean"))
    assert kendall_tau(scores[0], scores[1]) == pytest.approx(1.0)
    assert top_k_overlap(scores[0], scores[1], 3) == 1.0


def test_calibration_stability_on_a_tiny_model(prepared, tmp_path):
    result = calibration_stability(prepared, [4, 8], 3, estimators=("empirical", "mc"), seed=0)
    n_modules = len(prepared.targets)
    assert result.info["num_modules"] == n_modules == 12 and result.info["k"] == 3
    records = result.records
    # Per size: 3 pairs × 2 estimators × 2 aggregations, plus 3 subsets × 2 aggregations emp-vs-MC.
    assert len(records) == 2 * (3 * 2 * 2 + 3 * 2)
    assert all(-1.0 <= r["kendall_tau"] <= 1.0 and 0.0 <= r["top_k_overlap"] <= 1.0 for r in records)
    summary = result.summary()
    assert set(summary["size"]) == {4, 8} and set(summary["n_pairs"]) == {3}
    paths = result.write(tmp_path)
    data = json.loads(paths["json"].read_text())
    assert data["kind"] == "fimlora-calibration-stability" and len(data["scores"]) == 2 * 3 * 2
    loaded = load_calibration(paths["json"])
    assert loaded is not None and len(loaded.records) == len(records)
    assert paths["csv"].read_text().count("\n") == len(records) + 1
    with pytest.raises(FimloraError, match="at least 2"):
        calibration_stability(prepared, [4], 1)


def test_cli_calibration(prepared, tiny_bert_dir, reviews_csv, tmp_path, capsys, monkeypatch):
    # The command's own prepare() would load the same tiny model again: reuse the prepared one.
    monkeypatch.setattr("fimlora.experiment.prepare", lambda config, **_: prepared)
    config = tmp_path / "experiment.yaml"
    config.write_text(
        f"model: {tiny_bert_dir}\ndataset: {reviews_csv}\n"
        "dataset_options: {text_column: review, label_column: sentiment}\n"
        f"output_dir: {tmp_path / 'runs'}\nfisher: {{batch_size: 8}}\ntrain: {{max_length: 16}}\n",
        encoding="utf-8",
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["calibration", str(config), "--sizes", "4,6", "--repeats", "2", "--no-mc"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0, out
    assert (tmp_path / "runs" / "calibration" / "calibration.json").is_file()
    assert "Kendall τ" in out
    with pytest.raises(SystemExit) as exit_info:
        main(["calibration", str(config), "--sizes", "4,x"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("error: --sizes")
