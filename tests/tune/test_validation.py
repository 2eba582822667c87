"""`train.eval_every`: validation during training is logged and leaves the training itself unchanged."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file
from tune_runs import defaults

from fimlora.config import parse_config
from fimlora.experiment import run_experiment


def test_periodic_validation_is_logged_and_does_not_change_training(
    small_bert_dir, readable_split_dir, tmp_path
):
    def run(eval_every, name):
        config = parse_config(
            {
                "model": str(small_bert_dir),
                "dataset": str(readable_split_dir),
                "methods": ["fim-lora"],
                "budget": {"uniform_rank": 2},
                "output_dir": str(tmp_path / name),
                **defaults(eval_every=eval_every, learning_rate=0.05),
            }
        )
        _, (result,) = run_experiment(config, progress=False, log=lambda _: None)
        return result, tmp_path / name / "fim-lora"

    plain, plain_dir = run(None, "plain")
    watched, watched_dir = run(2, "watched")
    # BERT's dropout draws from the global RNG: an evaluation that consumed it would change every later
    # step. The evaluations run under a forked RNG, so the trained weights are bit-identical.
    assert watched["metrics"] == plain["metrics"]
    adapter = Path("adapter") / "adapter_model.safetensors"
    a, b = load_file(str(plain_dir / adapter)), load_file(str(watched_dir / adapter))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    lines = [json.loads(line) for line in (watched_dir / "validation.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4]  # not after the last step: the run evaluates then
    assert all(line["num_examples"] == 32 for line in lines)  # the validation split
    assert not (plain_dir / "validation.jsonl").exists()
