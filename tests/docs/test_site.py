"""The documentation cannot drift from the code: every configuration field is described, every command
is in the generated CLI reference, the site builds with ``--strict`` (broken links and references fail),
and the worked notebook runs (at tiny settings)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _reference():
    spec = importlib.util.spec_from_file_location("docs_reference", ROOT / "docs" / "hooks" / "reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["docs_reference"] = module
    spec.loader.exec_module(module)
    return module


def _models():
    from fimlora.config import ExperimentConfig
    from fimlora.sweep.spec import SweepSpec
    from fimlora.tune.spec import TuneSettings

    return [(ExperimentConfig, ""), (SweepSpec, ""), (TuneSettings, "tune.")]


@pytest.mark.parametrize("index", range(3), ids=["experiment", "sweep", "tune"])
def test_every_configuration_field_has_a_description(index):
    reference = _reference()
    model, prefix = _models()[index]
    fields = list(reference.config_fields(model, prefix))
    assert len(fields) > 5
    undescribed = [f.path for f in fields if not f.description]
    assert not undescribed, f"fields without a description (add Field(description=...)): {undescribed}"


def test_the_configuration_reference_has_every_field_with_its_default_and_choices():
    reference = _reference()
    page = reference.config_reference()
    from fimlora.config import ExperimentConfig

    for field in reference.config_fields(ExperimentConfig):
        assert f"`{field.path}`" in page
    row = next(line for line in page.splitlines() if line.startswith("| `quantization` "))
    assert "`none`, `int8`, `nf4`" in row and '`"none"`' in row


def test_the_cli_reference_lists_every_command_and_option():
    import typer

    from fimlora.cli import app

    reference = _reference()
    page = reference.cli_reference()
    group = typer.main.get_command(app)
    for name, command in group.commands.items():  # type: ignore[attr-defined]
        assert f"### `fimlora {name}`" in page
        for param in command.params:
            if param.name != "help" and not type(param).__name__.endswith("Argument"):
                assert param.opts[0] in page, (name, param.opts)


def test_the_site_builds_strictly(tmp_path):
    pytest.importorskip("mkdocs")
    done = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    site = tmp_path / "site"
    assert (site / "index.html").exists()
    configuration = (site / "reference" / "configuration" / "index.html").read_text(encoding="utf-8")
    assert "train.learning_rate" in configuration
    # the notebook is a rendered page of the site (with its committed outputs), not a file to download
    notebook = (site / "examples" / "fisher_allocation" / "index.html").read_text(encoding="utf-8")
    assert "Fisher-guided rank allocation, step by step" in notebook and "<img" in notebook
    # the home page is the README, its links into docs/ rewritten for the site
    home = (site / "index.html").read_text(encoding="utf-8")
    assert "Your own data in ten lines" in home and 'href="getting-started/' in home


@pytest.mark.integration
def test_the_notebook_runs_at_tiny_settings():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    notebook = nbformat.read(ROOT / "examples" / "fisher_allocation.ipynb", as_version=4)
    previous = os.environ.get("FIMLORA_NOTEBOOK_QUICK")
    os.environ["FIMLORA_NOTEBOOK_QUICK"] = "1"  # the kernel inherits this process's environment
    try:
        nbclient.NotebookClient(
            notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(ROOT)}}
        ).execute()
    finally:
        if previous is None:
            os.environ.pop("FIMLORA_NOTEBOOK_QUICK")
        else:
            os.environ["FIMLORA_NOTEBOOK_QUICK"] = previous
    outputs = "".join(
        "".join(o.get("text", "")) for c in notebook.cells if c.cell_type == "code" for o in c.outputs
    )
    assert "plain PEFT reproduces the trained logits exactly: True" in outputs
