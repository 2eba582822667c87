"""Load a finished run's trained model the way the run built it: its base model, then its adapter.

A run directory (:mod:`fimlora.runs`) holds the resolved ``config.yaml`` (one method), ``result.json``
and ``adapter/``. The base model is loaded from the config's ``model`` exactly as the run loaded it
(:func:`fimlora.models.load_model`, same task, number of labels and ``trust_remote_code``); the method's
:meth:`~fimlora.methods.base.AdapterKind.load` then restores what was trained (the PEFT adapter, Delta-LoRA's
weight drift, HydraLoRA's heads and routers, full fine-tuning's weights), task head included.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from fimlora.errors import FimloraError
from fimlora.runs import ADAPTER_DIR, CONFIG_FILE

# transformers' own deprecation notice, raised from inside PEFT; nothing a user can act on (as in train.py).
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


@dataclass
class LoadedRun:
    """A finished run with its trained model (unmerged, eval mode) and the tokenizer it used."""

    path: Path
    config: Any  # ExperimentConfig
    result: dict[str, Any]
    spec: Any  # MethodSpec
    adapter: Any  # AdapterKind
    task: str
    model: nn.Module
    tokenizer: Any
    source: str  # the base model's directory or hub id
    label_names: list[str] | None

    @property
    def adapter_dir(self) -> Path:
        return self.path / ADAPTER_DIR


def finished_run(path: str | Path) -> tuple[Path, dict[str, Any], Any, dict[str, Any]]:
    """``(directory, raw config mapping, ExperimentConfig, result)`` of a finished run; a FimloraError
    naming what is wrong otherwise (not a run, unfinished, trained on a quantised base)."""
    from fimlora.config import parse_config, read_yaml_file
    from fimlora.runs import RESULT_FILE, RunDirectory

    directory = Path(path)
    run = RunDirectory(directory)
    if not directory.exists():
        raise FimloraError(f"Run directory {directory} does not exist; give <output_dir>/<method> of a run.")
    if not directory.is_dir():
        raise FimloraError(f"{directory} is not a directory; give a run directory (<output_dir>/<method>).")
    if not run.is_finished:
        below = sorted(p.parent.name for p in directory.glob(f"*/{RESULT_FILE}"))
        hint = f" It holds runs: {', '.join(below[:5])}; give one of them." if below else ""
        raise FimloraError(f"{directory} is not a finished run (no finished {RESULT_FILE}).{hint}")
    raw = read_yaml_file(directory / CONFIG_FILE, "run config")
    if isinstance(raw, dict) and raw.get("quantization") not in (None, "none"):
        # Merging folds the update into full-precision weights the run never used, and the run's exact
        # base (quantised) is not something plain transformers rebuilds from a saved directory: refuse.
        raise FimloraError(
            f"{directory} was trained on a quantised base (quantization: {raw['quantization']}); fimlora "
            "export/generate load the base in full precision, which is not the model the run trained on. "
            f"Load {directory / ADAPTER_DIR} with PEFT onto the same quantised base instead."
        )
    config = parse_config(raw, source=str(directory / CONFIG_FILE))
    if len(config.methods) != 1:
        raise FimloraError(f"{directory}/config.yaml names {len(config.methods)} methods; a run has one.")
    if not (directory / ADAPTER_DIR).is_dir():
        # The committed experiments keep every record of their runs but not the adapters (megabytes of
        # weights each): say how to re-create this one rather than only that it is missing.
        raise FimloraError(
            f"{directory} holds the records of a finished run but not its trained {ADAPTER_DIR}/ (runs "
            "committed to a repository leave adapters out); re-create it by running that method again: "
            f"fimlora run {directory / 'config.yaml'} --output-dir {directory.parent} --overwrite"
        )
    return directory, raw, config, run.read_result()


def _label_names(config: Any, result: dict[str, Any]) -> list[str]:
    labels = result.get("labels")
    if isinstance(labels, list) and labels:
        return [str(label) for label in labels]
    # Runs written before result.json recorded the label names: read them from the dataset.
    from fimlora.data import load_task_data

    options = config.dataset_options
    data = load_task_data(
        config.dataset,
        seed=config.seed,
        task="classification",
        text_column=options.text_column,
        label_column=options.label_column,
        hub_config=options.hub_config,
        trust_remote_code=config.trust_remote_code,
    )
    return list(data.label_names or [])


def load_base(config: Any, task: str, label_names: list[str] | None) -> Any:
    """The run's base model and tokenizer (:class:`fimlora.models.LoadedModel`), loaded as the run did."""
    from transformers import set_seed

    from fimlora.models import load_model

    set_seed(config.seed)  # the task head is random until the adapter restores it: keep it reproducible
    return load_model(
        config.model,
        task,  # type: ignore[arg-type]
        num_labels=len(label_names) if label_names else None,
        trust_remote_code=config.trust_remote_code,
    )


def load_run(path: str | Path) -> LoadedRun:
    """The trained model of the finished run at ``path`` (see the module docstring)."""
    from fimlora.methods import get_adapter, resolve_method

    directory, _raw, config, result = finished_run(path)
    spec = resolve_method(config.methods[0])
    adapter = get_adapter(spec.adapter)
    task = str(result.get("task") or config.task)
    labels = _label_names(config, result) if task == "classification" else None
    loaded = load_base(config, task, labels)
    model = adapter.load(loaded.model, directory / ADAPTER_DIR).eval()
    return LoadedRun(
        path=directory,
        config=config,
        result=result,
        spec=spec,
        adapter=adapter,
        task=task,
        model=model,
        tokenizer=loaded.tokenizer,
        source=loaded.source,
        label_names=labels,
    )
