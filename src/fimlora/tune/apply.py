"""``fimlora sweep SPEC --tuned tuned.yaml``: the final runs, each cell with its tuned settings, on test.

Every grid point takes the ``params`` of its cell (model × dataset × method × budget) from ``tuned.yaml``
and ``train.eval_split: test``; its ``result.json`` gains

- ``hyperparameter_sources``: for every setting of ``train``, ``lora``, ``allocation``, ``fisher``,
  ``budget`` and ``method_options``, its value and where it came from: ``tuned`` (chosen on validation
  by ``fimlora tune``), ``spec`` (written in the sweep spec), ``default`` (fimlora's default) or
  ``--tuned`` (the evaluation split, set to test by this command);
- ``tuning``: the tuning behind it (for a control of ``tune.share``, its reference's, named in
  ``shared_from``): the file, the metric, the best validation score (the aggregate over
  the tuning seeds), its score at each tuning seed and their spread, the trials the study ran
  (complete / pruned / failed, and lost ones retried) and the trials every study was given.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fimlora.config import ExperimentConfig, parse_config
from fimlora.errors import FimloraError
from fimlora.sweep.expand import PlannedRun, budget_label, deep_merge, expand
from fimlora.sweep.spec import SweepSpec
from fimlora.tune.cells import TUNING_SPLITS, with_values
from fimlora.tune.output import TunedCell, TunedFile, cell_key, load_tuned
from fimlora.tune.preparation import refusal
from fimlora.tune.spec import parse_tune

#: Config sections whose settings a result records the source of.
SOURCE_SECTIONS = ("train", "lora", "allocation", "fisher", "budget", "method_options")


def _leaves(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for key, sub in value.items():
            _leaves(f"{prefix}.{key}" if prefix else str(key), sub, out)
    else:
        out[prefix] = value


def _has(data: dict[str, Any], key: str) -> bool:
    node: Any = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def hyperparameter_sources(
    spec_settings: dict[str, Any], config: ExperimentConfig, tuned: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """``{key: {"value": …, "source": "tuned" | "spec" | "default" | "--tuned"}}`` for every setting of
    :data:`SOURCE_SECTIONS` in the final ``config``; ``spec_settings`` is what the spec wrote."""
    values: dict[str, Any] = {}
    dump = config.model_dump(mode="json")
    for section in SOURCE_SECTIONS:
        _leaves(section, dump[section], values)
    sources = {}
    for key, value in values.items():
        if key in tuned:
            source = "tuned"
        elif key == "train.eval_split":
            source = "--tuned"
        elif _has(spec_settings, key):
            source = "spec"
        else:
            source = "default"
        sources[key] = {"value": value, "source": source}
    return sources


def tuning_record(
    path: Path, tuned: TunedFile, entry: TunedCell, shared_from: str | None = None
) -> dict[str, Any]:
    probes = {} if tuned.probes is None else {"probes": tuned.probes}  # records without stay as they were
    return {
        "shared_from": shared_from,
        "file": str(path.resolve()),
        "metric": entry.metric,
        "validation_score": entry.validation_score,
        "seed_scores": {str(k): v for k, v in entry.seed_scores.items()} if entry.seed_scores else None,
        "seed_spread": entry.seed_spread,
        "params": entry.params,
        "trials": entry.trials.model_dump(),
        "trials_per_study": tuned.trials_per_study,
        "seed": tuned.seed,
        "seeds": tuned.seeds or [tuned.seed],
        "aggregate": tuned.aggregate,
        **probes,
    }


def _changed(before: dict[str, Any], now: dict[str, Any]) -> str:
    """Which part of a data fingerprint differs: the files by split, else the dataset's version."""
    if before.get("source") == now.get("source") == "files":
        old, new = before.get("sha256") or {}, now.get("sha256") or {}
        splits = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        return "the " + ", ".join(splits) + " file's content" + ("s" if len(splits) > 1 else "")
    return f"{before.get('name')} {before.get('revision')} then, {now.get('name')} {now.get('revision')} now"


def tuned_entry(
    tuned: TunedFile, path: Path, config: ExperimentConfig, *, reference: str | None = None
) -> TunedCell:
    """The entry of ``tuned`` (read from ``path``) for the cell of ``config``'s first method, or of the
    method ``reference`` whose settings it shares (``tune.share``).

    Raises :class:`FimloraError` when the cell has no entry, no completed trial, a tuned setting that
    cannot be searched, or was tuned on other data than ``config`` names now.
    """
    method = config.method_names[0]
    budget = config.budget.model_dump(mode="json")
    index = {cell.key(): cell for cell in tuned.cells}
    entry = index.get(cell_key(config.model, config.dataset, reference or method, budget))
    where = f"{method} {budget_label(budget)} ({config.model}, {config.dataset_label})"
    if entry is None:
        whose = f"{reference} (whose settings {method} shares, tune.share)" if reference else where
        raise FimloraError(
            f"{path} has no tuned settings for {whose}; run `fimlora tune` on this spec first."
        )
    if entry.params is None:
        raise FimloraError(
            f"{path}: no trial of {where} completed (trials: {entry.trials.model_dump()}); "
            "there are no tuned settings to run it with."
        )
    for key in entry.params:
        reason = refusal(key)
        if reason is not None:
            raise FimloraError(
                f"{path}: {where} has a tuned {key}: {reason} and cannot be searched; "
                "remove it (the final runs must use the data, model and budget of the tuning)."
            )
    if entry.data is not None:
        now = config.data_identity(splits=TUNING_SPLITS).fingerprint()
        if now != entry.data:
            raise FimloraError(
                f"{path}: the data of {where} changed since it was tuned ({_changed(entry.data, now)}); "
                "its tuned settings were chosen on other data. Tune again (fimlora tune starts new "
                "studies for the new data), or restore the data."
            )
    return entry


def expand_tuned(spec: SweepSpec, path: Path) -> list[PlannedRun]:
    """The spec's runs with each cell's tuned settings applied and ``eval_split: test``.

    Raises :class:`FimloraError` when a cell of the grid has no entry in ``tuned.yaml``, or one without
    a completed trial.
    """
    tuned = load_tuned(path)
    # The same checks as fimlora tune (e.g. no learning-rate axis when it is tuned), and the controls.
    share = parse_tune(spec).share if spec.tune is not None else {}

    def adjust(settings: dict[str, Any], config: ExperimentConfig) -> tuple[dict[str, Any], dict[str, Any]]:
        reference = share.get(config.method_names[0])
        entry = tuned_entry(tuned, path, config, reference=reference)
        assert entry.params is not None  # tuned_entry refuses a cell without a completed trial
        where = f"{config.method_names[0]} {budget_label(config.budget.model_dump(mode='json'))}"
        final = deep_merge(with_values(settings, entry.params), {"train": {"eval_split": "test"}})
        resolved = parse_config(
            final, source=f"tuned run of {where} ({config.model}, {config.dataset_label})"
        )
        extras = {
            "hyperparameter_sources": hyperparameter_sources(settings, resolved, entry.params),
            "tuning": tuning_record(path, tuned, entry, shared_from=reference),
        }
        return final, extras

    return expand(spec, adjust=adjust)


def with_tuned(
    config: ExperimentConfig, path: Path, *, method: str | None = None
) -> tuple[ExperimentConfig, dict[str, Any]]:
    """``config`` reduced to ``method`` (default: its first) and run with that cell's tuned settings
    from ``path``, for an analysis that must train what the final runs train (``fimlora
    fisher-trajectory --tuned``). The evaluation split is left as ``config`` has it: an analysis is not a
    final number. Returns the config and the tuning record (:func:`tuning_record`)."""
    name = method or config.method_names[0]
    if name not in config.method_names:
        raise FimloraError(f"Method {name!r} is not in the config; it has {', '.join(config.method_names)}.")
    tuned = load_tuned(path)
    settings = config.model_dump(mode="json")
    settings["methods"] = [settings["methods"][config.method_names.index(name)]]
    single = parse_config(settings, source=f"{name} of the config")
    entry = tuned_entry(tuned, path, single)
    assert entry.params is not None
    resolved = parse_config(with_values(settings, entry.params), source=f"tuned run of {name}")
    return resolved, tuning_record(path, tuned, entry)
