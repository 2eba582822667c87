"""AdaLoRA's orthogonality weight γ: the paper's 0.1 by default (PEFT's own default is 0.5), a
``method_options`` knob, and recorded with the run."""

from __future__ import annotations

import pytest
import torch

from fimlora.config import parse_config
from fimlora.experiment import build_method, prepare


def _prepared(tiny_bert_dir, sentiment_csv, out, **adalora):
    config = parse_config(
        {
            "model": str(tiny_bert_dir),
            "dataset": str(sentiment_csv),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "output_dir": str(out),
            "methods": ["adalora"],
            "budget": {"uniform_rank": 2},
            "train": {"steps": 10, "max_length": 24, "report_to": []},
            "method_options": {"adalora": adalora},
        }
    )
    return prepare(config)


@pytest.mark.parametrize(("options", "expected"), [({}, 0.1), ({"orth_reg_weight": 0.5}, 0.5)])
def test_orth_reg_weight_reaches_peft_and_the_record(
    tiny_bert_dir, sentiment_csv, tmp_path, options, expected
):
    built = build_method(_prepared(tiny_bert_dir, sentiment_csv, tmp_path, **options), "adalora")
    assert built.model.peft_config["default"].orth_reg_weight == expected
    assert built.rule.finalize(built.model, built.ctx)["adalora"]["orth_reg_weight"] == expected
    # PEFT adds γ × (mean ‖PᵀP − I‖, ‖QQᵀ − I‖) to the loss: the weight is live.
    model = built.model.eval()
    assert built.ctx.calibration_batches is not None
    inputs = next(iter(built.ctx.calibration_batches()))
    with torch.no_grad():
        with_penalty = float(model(**inputs).loss)
        model.peft_config["default"].orth_reg_weight = 0.0
        without = float(model(**inputs).loss)
        model.peft_config["default"].orth_reg_weight = 1.0
        penalty = float(model(**inputs).loss) - without
    assert penalty > 0
    assert with_penalty - without == pytest.approx(expected * penalty, rel=1e-4)
