"""``fimlora tune SPEC --status``: where every study stands, read from the storage without training or
writing anything (not even an empty database), with the best trial so far and whether a probe chose it."""

from __future__ import annotations

import pytest
from tune_runs import lora_grid, write_spec

from fimlora.cli import main
from fimlora.tune.storage import DB_FILE

TUNE = {"trials": 2, "metric": "loss", "learning_rate": {"low": 1e-3, "high": 1e-1}}
PROBED = {**TUNE, "probes": [{"train.learning_rate": 3e-3}]}


def tune(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", *map(str, argv)])
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return captured.out


def test_status_reads_each_study_where_it_stands_and_writes_nothing(
    capsys, small_bert_dir, split_dir, tmp_path
):
    # Two specs of one store: the second adds a probe (write_spec names its file spec.yaml).
    probed = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), PROBED).rename(
        tmp_path / "probed.yaml"
    )
    plain = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    store = tmp_path / "store"

    out = tune(capsys, plain, "--status")
    assert "0/2 trials ended over 1 studies" in out and "not started (0/2)" in out
    assert not store.exists()  # no database, no store: nothing was written

    tune(capsys, plain)
    before = (store / DB_FILE).read_bytes()
    out = tune(capsys, probed, "--status")
    assert "2/3 ended (2 complete, 0 pruned, 0 failed); best so far loss" in out
    assert "(probe" not in out and "probes tried 0 of 1" in out
    assert " trial " not in out  # nothing trained
    assert (store / DB_FILE).read_bytes() == before

    tune(capsys, probed)
    out = tune(capsys, probed, "--status")
    assert "3/3 ended (3 complete, 0 pruned, 0 failed); best so far loss" in out
    assert "with lr=0.003 (probe 0)" in out and "probes tried" not in out


def test_status_refuses_retry_failed(capsys, small_bert_dir, split_dir, tmp_path):
    path = write_spec(tmp_path, lora_grid(small_bert_dir, split_dir), TUNE)
    with pytest.raises(SystemExit) as exit_info:
        main(["tune", str(path), "--status", "--retry-failed"])
    assert exit_info.value.code != 0
    assert "--status only reads the studies" in capsys.readouterr().err
