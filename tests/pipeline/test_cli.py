"""Bad input → one clear line on stderr, exit code 2, no traceback, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fimlora.cli import main


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exit_info:
        main(list(argv))
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def assert_clean_error(code, err, *words):
    assert code == 2
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: ") and "Traceback" not in err
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture
def write_config(tmp_path):
    def write(text: str):
        path = tmp_path / "config.yaml"
        path.write_text(text, encoding="utf-8")
        return path

    return write


def test_invalid_yaml(capsys, write_config):
    code, _, err = run_cli(capsys, "run", str(write_config("model: [unclosed\n")))
    assert_clean_error(code, err, "not valid YAML", "line")


def test_unknown_key_and_bad_value(capsys, write_config):
    code, _, err = run_cli(
        capsys, "run", str(write_config("model: minilm\ndataset: movie-reviews\nbudjet: 3\n"))
    )
    assert_clean_error(code, err, "budjet", "unknown key")
    code, _, err = run_cli(
        capsys, "run", str(write_config("model: minilm\ndataset: movie-reviews\ntrain: {steps: -1}\n"))
    )
    assert_clean_error(code, err, "train.steps")
    code, _, err = run_cli(
        capsys, "run", str(write_config("model: minilm\ndataset: movie-reviews\nmethods: [lora, adalorra]\n"))
    )
    assert_clean_error(code, err, "adalorra")


def test_missing_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", str(tmp_path / "nope.yaml"))
    assert_clean_error(code, err, "Cannot read config")


def test_unknown_model_dataset_and_module(capsys, write_config, tiny_bert_dir, sentiment_csv, tmp_path):
    opts = "dataset_options: {text_column: review, label_column: sentiment}\n"
    code, _, err = run_cli(
        capsys, "run", str(write_config(f"model: no-such/model-xyz\ndataset: {sentiment_csv}\n{opts}"))
    )
    assert_clean_error(code, err, "no-such/model-xyz")
    code, _, err = run_cli(
        capsys, "run", str(write_config(f"model: {tiny_bert_dir}\ndataset: no-such-dataset\n"))
    )
    assert_clean_error(code, err, "no-such-dataset")
    code, _, err = run_cli(
        capsys,
        "run",
        str(
            write_config(
                f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\n{opts}target_modules: [q_proj]\n"
            )
        ),
    )
    assert_clean_error(code, err, "q_proj", "query")


def test_infeasible_budget_writes_no_result(capsys, write_config, tiny_bert_dir, sentiment_csv, tmp_path):
    out = tmp_path / "runs"
    text = (
        f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\noutput_dir: {out}\n"
        "dataset_options: {text_column: review, label_column: sentiment}\n"
        "methods: [lora]\nbudget: {params: 100}\n"
    )
    code, _, err = run_cli(capsys, "run", str(write_config(text)))
    assert_clean_error(code, err, "budget")
    assert not list(out.rglob("result.json"))


def test_empty_dataset(capsys, write_config, tiny_bert_dir, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n", encoding="utf-8")
    code, _, err = run_cli(capsys, "run", str(write_config(f"model: {tiny_bert_dir}\ndataset: {empty}\n")))
    assert_clean_error(code, err, "empty")


def test_fisher_then_allocate_writes_a_plain_peft_config(capsys, tiny_bert_dir, sentiment_csv, tmp_path):
    from peft import LoraConfig

    fisher_dir, alloc_dir = tmp_path / "fisher", tmp_path / "alloc"
    fisher_args = [
        "--model",
        str(tiny_bert_dir),
        "--dataset",
        str(sentiment_csv),
        "--output",
        str(fisher_dir),
    ]
    fisher_args += ["--num-examples", "16", "--text-column", "review", "--label-column", "sentiment"]
    code, out, _ = run_cli(capsys, "fisher", *fisher_args, "--no-progress")
    assert code == 0 and "16 examples" in out
    code, out, _ = run_cli(
        capsys, "allocate", str(fisher_dir), "--output", str(alloc_dir), "--budget-rank", "2"
    )
    assert code == 0
    config = LoraConfig.from_pretrained(str(alloc_dir))
    allocation = json.loads((alloc_dir / "allocation.json").read_text())
    assert config.base_model_name_or_path == str(tiny_bert_dir)
    assert config.task_type == "SEQ_CLS"
    assert sorted(config.target_modules) == sorted(allocation["ranks"])
    for name, rank in allocation["ranks"].items():
        assert config.rank_pattern.get(name, config.r) == rank
    code, _, err = run_cli(
        capsys, "allocate", str(fisher_dir), "--output", str(alloc_dir), "--strategy", "magic"
    )
    assert_clean_error(code, err, "magic")
    code, _, err = run_cli(capsys, "allocate", str(tmp_path / "nowhere"), "--output", str(alloc_dir))
    assert_clean_error(code, err, "No Fisher")


def test_real_entry_point_prints_no_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n", encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-m", "fimlora.cli", "run", str(bad)], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert "mapping" in proc.stderr


def test_run_prints_the_comparison_and_reuses_finished_runs(
    capsys, write_config, tiny_bert_dir, sentiment_csv, tmp_path
):
    out = tmp_path / "runs"
    text = (
        f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\noutput_dir: {out}\nmethods: [lora]\n"
        "dataset_options: {text_column: review, label_column: sentiment}\nbudget: {uniform_rank: 2}\n"
        "train: {steps: 2, batch_size: 4, max_length: 16}\n"
    )
    config = write_config(text)
    code, stdout, _ = run_cli(capsys, "run", str(config), "--no-progress")
    assert code == 0
    assert "| lora |" in stdout and "adapter params" in stdout
    assert (out / "lora" / "result.json").is_file()
    code, stdout, _ = run_cli(capsys, "run", str(config), "--no-progress")
    assert code == 0 and "already finished" in stdout


def test_quantization_option_refuses_methods_that_need_a_float_w(capsys, write_config):
    config = write_config("model: smollm2\ndataset: brown-fiction\nmethods: [lora, pissa]\n")
    code, _, err = run_cli(capsys, "run", str(config), "--quantization", "nf4")
    assert_clean_error(code, err, "quantization", "'pissa'", "nf4")
    code, _, err = run_cli(capsys, "run", str(config), "--quantization", "fp8")
    assert_clean_error(code, err, "quantization")


def test_quantization_option_runs_on_an_nf4_base(
    capsys, write_config, tiny_bert_dir, sentiment_csv, tmp_path
):
    pytest.importorskip("bitsandbytes")
    out = tmp_path / "runs"
    text = (
        f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\noutput_dir: {out}\nmethods: [lora]\n"
        "dataset_options: {text_column: review, label_column: sentiment}\nbudget: {uniform_rank: 2}\n"
        "train: {steps: 2, batch_size: 4, max_length: 16, eval_examples: 8, report_to: []}\n"
    )
    code, _, _ = run_cli(capsys, "run", str(write_config(text)), "--no-progress", "--quantization", "nf4")
    assert code == 0
    result = json.loads((out / "lora" / "result.json").read_text())
    assert result["quantization"] == "nf4" and result["gradient_checkpointing"] is False
