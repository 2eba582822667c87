"""bitsandbytes is imported only when a run quantises, never asks the kernel hub, and never prints.

Each case runs in a fresh interpreter: what is imported, and what reaches the terminal, is a property of a
whole process. HF_HUB_OFFLINE is removed from its environment, as on a user's machine with internet, and a
``sitecustomize`` replaces ``kernels.get_kernel`` (what bitsandbytes' CPU backend asks the hub with) by a
recorder of any call.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("bitsandbytes")

RECORD_HUB_KERNELS = """
import pathlib
import kernels
def get_kernel(*args, **kwargs):
    pathlib.Path({marker!r}).write_text(repr(args))
    raise RuntimeError("no hub here")
kernels.get_kernel = get_kernel
"""


def _python(code: str, tmp_path, *args: str) -> subprocess.CompletedProcess[str]:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(RECORD_HUB_KERNELS.format(marker=str(tmp_path / "hub-asked")))
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )


def _run_cli_then_report(argv: str) -> str:
    return f"""
    import sys
    from fimlora.cli import main
    try:
        main({argv})
    except SystemExit as exit:
        code = exit.code
    module = sys.modules.get("bitsandbytes")
    print("exit", code, "bitsandbytes", "loaded" if module is not None else "not loaded", flush=True)
    """


def test_a_bad_config_prints_one_line_and_imports_nothing_quantised(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("- a\n- b\n")
    done = _python(_run_cli_then_report(f"['run', {str(bad)!r}]"), tmp_path)
    assert done.stdout.strip() == "exit 2 bitsandbytes not loaded", done.stdout + done.stderr
    assert done.stderr.strip().splitlines() == [f"error: {bad} must be a YAML mapping of settings, got list."]


def _config(tmp_path, tiny_bert_dir, sentiment_csv):
    path = tmp_path / "config.yaml"
    path.write_text(
        f"model: {tiny_bert_dir}\ndataset: {sentiment_csv}\noutput_dir: {tmp_path / 'runs'}\n"
        "methods: [lora]\ndataset_options: {text_column: review, label_column: sentiment}\n"
        "budget: {uniform_rank: 2}\nevaluate: {inference: false, prompts: [], forgetting_dataset: null}\n"
        "train: {steps: 1, batch_size: 4, max_length: 16, eval_examples: 8, report_to: []}\n"
    )
    return path


@pytest.mark.parametrize(
    ("quantization", "loaded"), [("none", "not loaded"), ("nf4", "loaded")], ids=["float32", "nf4"]
)
def test_a_run_imports_bitsandbytes_only_to_quantise_and_nothing_of_it_is_printed(
    quantization, loaded, tmp_path, tiny_bert_dir, sentiment_csv
):
    config = _config(tmp_path, tiny_bert_dir, sentiment_csv)
    argv = f"['run', {str(config)!r}, '--no-progress', '--quantization', {quantization!r}]"
    done = _python(_run_cli_then_report(argv), tmp_path)
    assert f"exit 0 bitsandbytes {loaded}" in done.stdout, done.stdout + done.stderr
    for chatter in ("kernels-community", "publisher trust", "gemm_4bit", "bitsandbytes"):
        assert chatter not in done.stderr, done.stderr
    assert not (tmp_path / "hub-asked").exists()


def test_importing_bitsandbytes_after_fimlora_asks_no_hub_and_prints_nothing(tmp_path):
    """Library use: ``import fimlora`` defers nothing, but whoever imports bitsandbytes (here PEFT) gets
    it without its kernel-hub lookup."""
    done = _python(
        """
        import sys
        import fimlora, peft
        import bitsandbytes
        assert sys.modules["kernels"] is not None  # hidden during bitsandbytes' import only
        print("ok")
        """,
        tmp_path,
    )
    assert done.stdout.strip() == "ok", done.stderr
    assert done.stderr == ""
    assert not (tmp_path / "hub-asked").exists()
