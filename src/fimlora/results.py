"""Collect finished runs into one table (one row per run), and list the unfinished ones apart.

A *run* is any directory below the scanned root that holds ``result.json`` (see :mod:`fimlora.runs`).
It is *finished* iff ``result.json`` parses and says ``"status": "finished"``; only finished runs
enter the table. A directory that :class:`fimlora.runs.RunDirectory` started (``environment.json``
or ``metrics.jsonl``, no finished ``result.json``) is *unfinished*, and so is a sweep run directory
that holds only ``failure.txt`` (it raised before its run directory existed): each is counted and
listed with the reason, never mixed into the table.

Columns of the table (``None``/NaN where a run does not have the value):

* identity: ``run_dir`` (relative to the root), ``method``, ``model``, ``dataset``, ``task``, ``seed``,
  ``eval_split``
* budget: ``budget`` (the resolved budget in trainable LoRA parameters, Σ r_i·(d_in + d_out)),
  ``budget_label`` (``"r=4"`` for ``budget.uniform_rank: 4``, else ``"123,456 params"``); full
  fine-tuning, which ignores the budget, has ``budget`` = the weights it trains and the label ``"full"``
* held-out metrics, from ``result.json["metrics"]``: ``accuracy``, ``macro_f1`` (classification),
  ``perplexity`` (causal LM), ``eval_loss`` (``metrics.loss``: mean cross-entropy per example, or mean
  NLL per token in nats), ``eval_num_examples`` / ``eval_num_tokens``, ``majority_rate``
  (classification: share of the evaluation split's most frequent class), and any other number there
* per class (classification, from ``result.json["classes"]``): ``precision.<label>``,
  ``recall.<label>`` for each class name, ``class_labels`` (the names in class-id order) and
  ``confusion_matrix`` (rows: true class, columns: predicted), both JSON-encoded, and ``at_chance``
  (:func:`at_chance`: the run separates no class from the others)
* parameters: ``adapter_params`` (what the method trains at the end: AdaLoRA after pruning,
  fim-lora-dynamic after its last re-allocation; the built adapter is ``peak_adapter_params``),
  ``head_params`` (fully trained task head), ``other_trainable_params``, ``num_target_modules``
* allocation summary: ``alloc_strategy``, ``alloc_num_params``; ``rank_min``, ``rank_mean``,
  ``rank_max`` of the ranks trained at the end, and ``rank_source`` where they come from
  (``allocation``, or AdaLoRA's ``final_ranks`` / EVA's ``redistributed_ranks`` / fim-lora-dynamic's
  ``reallocated_ranks``, see :func:`fimlora.runs.rank_range`); ``lora_alpha``, ``scaling``
* Fisher actually used by the method (``None`` for methods that do not use it): ``fisher_estimator``,
  ``fisher_num_examples``, ``fisher_aggregation``
* cost: ``train_time_s`` (wall seconds of training), ``train_steps``, ``train_examples``,
  ``train_examples_per_s``, ``final_train_loss``, ``peak_memory_mb`` (MiB; CUDA allocator peak on
  GPU, sampled process RSS on CPU, see ``peak_memory_kind``), ``eval_time_s`` (when the run records it)
* deployment (:mod:`fimlora.deploy.records`; None for runs that did not measure them):
  ``forgetting`` (causal LM: general-text loss of the tuned minus the base model, nats per token,
  :mod:`fimlora.forgetting`), ``forgetting_base_loss``, ``forgetting_tuned_loss``,
  ``forgetting_dataset``; ``adapter_size_mb`` (MiB on disk); ``inference_unit`` (``examples/s`` or
  ``tokens/s``), ``inference_{unmerged,merged,base}_per_s`` and ``_peak_mb`` (MiB: weights + peak
  transient memory), ``inference_merged_over_base`` and ``inference_unmerged_over_base`` (throughput ratios)
* data (from ``result.json["data"]``, runs that record it): ``data_version`` (which bytes the run read:
  ``sha256:<12 hex>`` over a local dataset's file digests, ``<name>@<version>`` for a built-in),
  ``truncated.<split>`` (share of the split's examples cut at ``train.max_length``),
  ``duplicates.<split>_in_<split>`` (evaluation rows whose text also occurs in an earlier split) and
  ``dropped_duplicates.<split>`` (dropped with ``dataset_options.drop_eval_duplicates``)
* provenance: ``git_revision``, ``device`` (from ``environment.json``)
* ``tuned_params``: the settings chosen by ``fimlora tune`` (comma-separated config keys) for runs of
  ``fimlora sweep --tuned``, from ``result.json["hyperparameter_sources"]``; None otherwise; ``tuned``:
  whether there are any; ``tuning_metric``: the validation metric those settings were chosen by
* ``sweep.<key>``: the grid coordinates from ``sweep.json``, when a sweep wrote one
* ``<section>.<key>``: every leaf of the run's resolved ``config.yaml`` below a section (e.g.
  ``train.learning_rate``, ``train.steps``, ``budget.uniform_rank``, ``budget.params``,
  ``fisher.num_examples``, ``allocation.tau``, ``lora.scaling``), plus ``target_modules``. Lists are
  JSON-encoded strings so the column types stay flat.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from fimlora.config import with_unkeyed_defaults
from fimlora.errors import FimloraError
from fimlora.io import atomic_write
from fimlora.runs import CONFIG_FILE, rank_range

RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.json"
ENVIRONMENT_FILE = "environment.json"
METRICS_FILE = "metrics.jsonl"
ALLOCATION_FILE = "allocation.json"
FISHER_META_FILE = "fisher.json"

RESULTS_PARQUET = "results.parquet"
RESULTS_CSV = "results.csv"
UNFINISHED_CSV = "unfinished.csv"
#: Statistics over seeds and the paired comparisons with the baseline, raw and Holm-adjusted p-values.
SUMMARY_CSV = "summary.csv"

# Files that only RunDirectory.start / training write: their presence marks a (possibly unfinished) run.
# FullFineTuning.name (a test holds them equal), named here so that reading results never imports torch.
FULL_ADAPTER = "full"

_RUN_MARKERS = (RESULT_FILE, ENVIRONMENT_FILE, METRICS_FILE)
# Written by the sweep runner next to a run that raised (possibly before its run directory existed).
FAILURE_FILE = "failure.txt"
# Top-level config keys that the identity columns already carry (from result.json, which is resolved).
_CONFIG_SKIP = {"model", "dataset", "seed", "task", "methods", "output_dir"}
# Renames of result.json["metrics"] keys: "loss" alone would be ambiguous next to the training loss.
_METRIC_RENAMES = {"loss": "eval_loss", "num_examples": "eval_num_examples", "num_tokens": "eval_num_tokens"}
# Held-out metrics a report may summarise, and whether larger is better.
METRICS: dict[str, bool] = {
    "accuracy": True,
    "macro_f1": True,
    "perplexity": False,
    "forgetting": False,
    "eval_loss": False,
}
INFERENCE_MODELS = ("unmerged", "merged", "base")


@dataclass
class UnfinishedRun:
    """A run directory without a finished ``result.json``, and why it does not count."""

    path: Path
    reason: str


@dataclass
class RunScan:
    """Finished run directories and unfinished ones, both sorted by path."""

    root: Path
    finished: list[Path] = field(default_factory=list)
    unfinished: list[UnfinishedRun] = field(default_factory=list)


@dataclass
class ResultsTable:
    """``frame``: one row per finished run (see the module docstring); ``unfinished``: kept apart."""

    root: Path
    frame: pd.DataFrame
    unfinished: list[UnfinishedRun]

    def write(self, out: str | Path, *, holm_family: str = "table") -> dict[str, Path]:
        """Write ``results.parquet``, ``results.csv``, ``unfinished.csv`` and, when the runs record a
        held-out metric, ``summary.csv`` (:func:`fimlora.stats.summarize`: mean, CI, the paired comparison
        with ``lora`` and its raw and Holm-adjusted p-values, over ``holm_family``) into ``out``, each
        atomically."""
        from fimlora.stats import summarize  # stats needs this module's METRICS

        out = Path(out)
        frame = self.frame
        unfinished = pd.DataFrame(
            {
                "path": [_relative(u.path, self.root) for u in self.unfinished],
                "reason": [u.reason for u in self.unfinished],
            }
        )
        paths = {
            "parquet": atomic_write(out / RESULTS_PARQUET, lambda tmp: frame.to_parquet(tmp, index=False)),
            "csv": atomic_write(out / RESULTS_CSV, lambda tmp: frame.to_csv(tmp, index=False)),
            "unfinished": atomic_write(out / UNFINISHED_CSV, lambda tmp: unfinished.to_csv(tmp, index=False)),
        }
        try:
            summary = summarize(frame, holm_family=holm_family)
        except FimloraError:  # no held-out metric: nothing to summarise
            return paths
        paths["summary"] = atomic_write(out / SUMMARY_CSV, lambda tmp: summary.to_csv(tmp, index=False))
        return paths


def _relative(path: Path, root: Path) -> str:
    try:
        rel = path.resolve().relative_to(root.resolve())
    except ValueError:
        return str(path)
    return str(rel) if str(rel) != "." else "."


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _marked_dirs(root: Path, markers: tuple[str, ...]) -> Iterator[Path]:
    seen: set[Path] = set()
    for marker in markers:
        for path in root.rglob(marker):
            directory = path.parent
            # Skip temporary leftovers (".adapter-…") and anything inside a hidden directory.
            if any(part.startswith(".") for part in directory.relative_to(root).parts):
                continue
            if directory not in seen:
                seen.add(directory)
                yield directory


def scan_runs(root: str | Path) -> RunScan:
    """Find every run directory below ``root`` (recursively) and split finished from unfinished."""
    root = Path(root)
    if not root.exists():
        raise FimloraError(f"{root} does not exist; give the directory that holds the runs.")
    if not root.is_dir():
        raise FimloraError(f"{root} is not a directory; give the directory that holds the runs.")
    scan = RunScan(root=root)
    candidates = sorted(_marked_dirs(root, _RUN_MARKERS))
    failed = set(_marked_dirs(root, (FAILURE_FILE,)))
    for directory in sorted(failed):
        # A sweep run that raised before its run directory existed leaves only failure.txt.
        if not any(c == directory or directory in c.parents for c in candidates):
            scan.unfinished.append(UnfinishedRun(directory, f"failed before it started (see {FAILURE_FILE})"))
    for directory in candidates:
        result_path = directory / RESULT_FILE
        if not result_path.is_file():
            why = f"; failed (see ../{FAILURE_FILE})" if directory.parent in failed else ""
            scan.unfinished.append(UnfinishedRun(directory, "no result.json" + why))
            continue
        try:
            status = _read_json(result_path).get("status")
        except (OSError, ValueError, AttributeError):
            scan.unfinished.append(UnfinishedRun(directory, "result.json unreadable"))
            continue
        if status == "finished":
            scan.finished.append(directory)
        else:
            scan.unfinished.append(UnfinishedRun(directory, f"status {status!r}"))
    return scan


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, Mapping):
        for key, sub in value.items():
            _flatten(f"{prefix}.{key}" if prefix else str(key), sub, out)
    elif isinstance(value, list | tuple):
        out[prefix] = json.dumps(list(value))
    else:
        out[prefix] = value


def budget_label(uniform_rank: Any, budget: Any) -> str:
    """``"r=4"`` for a budget given as a uniform rank, else the parameter count (``"123,456 params"``)."""
    if _is_number(uniform_rank):
        return f"r={int(uniform_rank)}"
    if _is_number(budget):
        return f"{int(budget):,} params"
    return "?"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def read_run(directory: str | Path, root: str | Path | None = None) -> dict[str, Any]:
    """One finished run as a flat row (the columns listed in the module docstring)."""
    directory = Path(directory)
    result = _read_json(directory / RESULT_FILE)
    config: dict[str, Any] = {}
    if (directory / CONFIG_FILE).is_file():
        loaded = yaml.safe_load((directory / CONFIG_FILE).read_text(encoding="utf-8"))
        config = with_unkeyed_defaults(loaded) if isinstance(loaded, dict) else {}
    env = _read_json(directory / ENVIRONMENT_FILE) if (directory / ENVIRONMENT_FILE).is_file() else {}
    sweep = _read_json(directory / SWEEP_FILE) if (directory / SWEEP_FILE).is_file() else {}

    train = result.get("train") or {}
    alloc = result.get("allocation") or {}
    fisher = result.get("fisher") or {}
    row: dict[str, Any] = {
        "run_dir": _relative(directory, Path(root)) if root is not None else str(directory),
        "method": str(result.get("method", "")),
        "model": result.get("model", config.get("model")),
        "dataset": result.get("dataset", config.get("dataset")),
        "task": result.get("task", config.get("task")),
        "seed": result.get("seed", config.get("seed")),
        "eval_split": result.get("eval_split"),
        "budget": result.get("budget"),
    }
    budget_cfg = config.get("budget") or {}
    row["budget_label"] = budget_label(budget_cfg.get("uniform_rank"), row["budget"])
    if (result.get("method_spec") or {}).get("adapter") == FULL_ADAPTER:
        # Full fine-tuning trains every weight whatever budget its config names: under that budget it
        # would be paired with LoRA at a rank it never had, so it is its own group, at what it trains.
        row["budget"] = result.get("adapter_params")
        row["budget_label"] = "full"
    for key, value in (result.get("metrics") or {}).items():
        if _is_number(value):
            row[_METRIC_RENAMES.get(key, key)] = value
    row.update(class_columns(result.get("classes")))
    for key in ("adapter_params", "head_params", "other_trainable_params", "num_target_modules"):
        row[key] = result.get(key)
    # What the method ends up training (AdaLoRA: its pruned triplets, not the initial init_r adapter);
    # the initial count stays in ``peak_adapter_params``.
    row["peak_adapter_params"] = row["adapter_params"]
    if result.get("effective_adapter_params") is not None:
        row["adapter_params"] = result["effective_adapter_params"]
    rank_summary, rank_source = rank_range(result) or (dict.fromkeys(("min", "mean", "max")), "allocation")
    row.update(
        {
            "alloc_strategy": alloc.get("strategy"),
            "alloc_num_params": alloc.get("num_params"),
            "rank_min": rank_summary["min"],
            "rank_mean": rank_summary["mean"],
            "rank_max": rank_summary["max"],
            "rank_source": rank_source,
            "lora_alpha": result.get("lora_alpha"),
            "scaling": result.get("scaling"),
            "fisher_estimator": fisher.get("estimator"),
            "fisher_num_examples": fisher.get("num_examples"),
            "fisher_aggregation": fisher.get("aggregation"),
            "train_time_s": train.get("wall_time_s"),
            "train_steps": train.get("steps"),
            "train_examples": train.get("examples"),
            "train_examples_per_s": train.get("examples_per_s"),
            "final_train_loss": train.get("final_train_loss"),
            "peak_memory_mb": (
                train["peak_memory_bytes"] / 2**20 if _is_number(train.get("peak_memory_bytes")) else None
            ),
            "peak_memory_kind": train.get("peak_memory_kind"),
            "eval_time_s": _eval_time(result),
            "git_revision": env.get("git_revision"),
            "device": env.get("device"),
            "tuned_params": _tuned_params(result),
            "tuning_metric": _mapping(result.get("tuning")).get("metric"),
        }
    )
    row["tuned"] = row["tuned_params"] is not None
    row.update(deployment_columns(result))
    row.update(data_columns(result))
    if isinstance(sweep, Mapping):
        for key, value in sweep.items():
            _flatten(f"sweep.{key}", value, row)
    for key, value in config.items():
        if key not in _CONFIG_SKIP:
            _flatten(key, value, row)
    return row


def class_columns(classes: Any) -> dict[str, Any]:
    """The per-class columns of a result's ``classes`` record (see the module docstring); ``{}`` without."""
    if not isinstance(classes, Mapping) or not isinstance(classes.get("labels"), list):
        return {}
    labels = [str(label) for label in classes["labels"]]
    row: dict[str, Any] = {}
    for key in ("precision", "recall"):
        values = classes.get(key)
        if isinstance(values, list) and len(values) == len(labels):
            row.update({f"{key}.{label}": value for label, value in zip(labels, values, strict=True)})
    row["class_labels"] = json.dumps(labels)
    row["confusion_matrix"] = json.dumps(classes.get("confusion_matrix"))
    recall = classes.get("recall")
    if isinstance(recall, list) and len(recall) == len(labels) > 1:
        row["at_chance"] = at_chance(recall)
    return row


#: How far above chance (1/K) a run's mean recall per class may be and still count as at chance.
CHANCE_MARGIN = 0.01


def at_chance(recall: Sequence[float]) -> bool:
    """Whether a classifier with these per-class recalls is at chance: their mean (balanced accuracy) is
    at most 1/K + :data:`CHANCE_MARGIN` for K classes.

    A run that collapsed to one class scores exactly 1/K whichever class it predicts, and so does one that
    predicts that class for all but a few examples; its accuracy alone says neither (predicting the
    minority class of a binary split scores below the majority rate, and the majority class of a skewed
    split scores high)."""
    return sum(recall) / len(recall) <= 1 / len(recall) + CHANCE_MARGIN


def _tuned_params(result: Mapping[str, Any]) -> str | None:
    sources = result.get("hyperparameter_sources")
    if not isinstance(sources, Mapping):
        return None
    tuned = sorted(k for k, v in sources.items() if isinstance(v, Mapping) and v.get("source") == "tuned")
    return ",".join(tuned) or None


def _mapping(value: Any) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


def _mib(value: Any) -> float | None:
    return float(value) / 2**20 if _is_number(value) else None


def data_columns(result: Mapping[str, Any]) -> dict[str, Any]:
    """The data columns of a result's ``data`` record (see the module docstring); ``{}`` without one."""
    data = result.get("data")
    if not isinstance(data, Mapping):
        return {}
    row: dict[str, Any] = {"data_version": data_version_label(data.get("identity"))}
    for key in ("truncated", "duplicates", "dropped_duplicates"):
        if isinstance(data.get(key), Mapping):
            for name, value in data[key].items():
                row[f"{key}.{name}"] = value
    return row


def data_version_label(identity: Any) -> str | None:
    """One short string per version of the data: ``sha256:<12 hex>`` over a local dataset's file
    digests, a built-in's registered version, a hub id (and config)."""
    if not isinstance(identity, Mapping):
        return None
    if identity.get("source") == "files":
        digests = sorted(f"{f.get('split')}={f.get('sha256')}" for f in identity.get("files") or [])
        return "sha256:" + hashlib.sha256(",".join(digests).encode()).hexdigest()[:12]
    revision = identity.get("revision")
    return f"{identity.get('name')}@{revision}" if revision else str(identity.get("name"))


def deployment_columns(result: Mapping[str, Any]) -> dict[str, Any]:
    """Forgetting, adapter size and inference figures of one run (module docstring); None where absent."""
    forgetting = _mapping(_mapping(result.get("metrics")).get("forgetting"))
    inference = _mapping(result.get("inference"))
    models = _mapping(inference.get("models"))
    size = result.get("adapter_size_bytes")
    row: dict[str, Any] = {
        "forgetting": forgetting.get("delta") if _is_number(forgetting.get("delta")) else None,
        "forgetting_base_loss": forgetting.get("base_loss"),
        "forgetting_tuned_loss": forgetting.get("tuned_loss"),
        "forgetting_dataset": forgetting.get("dataset"),
        "adapter_size_mb": _mib(size),
        "inference_unit": inference.get("unit"),
        "inference_merged_over_base": inference.get("merged_over_base"),
        "inference_unmerged_over_base": inference.get("unmerged_over_base"),
    }
    for name in INFERENCE_MODELS:
        entry = _mapping(models.get(name))
        peak = entry.get("peak_memory_bytes")
        row[f"inference_{name}_per_s"] = entry.get("per_s")
        row[f"inference_{name}_peak_mb"] = _mib(peak)
    return row


def _eval_time(result: Mapping[str, Any]) -> float | None:
    """Evaluation wall time in seconds, wherever a run records it (it is optional)."""
    candidates = [
        result.get("eval_time_s"),
        (result.get("eval") or {}).get("wall_time_s") if isinstance(result.get("eval"), Mapping) else None,
        (result.get("metrics") or {}).get("eval_time_s"),
        (result.get("metrics") or {}).get("wall_time_s"),
    ]
    numbers = [float(v) for v in candidates if v is not None and _is_number(v)]
    return numbers[0] if numbers else None


def collect_results(root: str | Path) -> ResultsTable:
    """Every finished run below ``root`` as one table; unfinished runs listed apart.

    Raises ``FimloraError`` when ``root`` does not exist or holds no finished run.
    """
    root = Path(root)
    scan = scan_runs(root)
    if not scan.finished:
        extra = f" ({len(scan.unfinished)} unfinished)" if scan.unfinished else ""
        raise FimloraError(
            f"No finished runs under {root}{extra}: a run is a directory with result.json whose "
            'status is "finished".'
        )
    rows = []
    for directory in scan.finished:
        try:
            rows.append(read_run(directory, root))
        except (OSError, ValueError, yaml.YAMLError) as exc:
            scan.unfinished.append(UnfinishedRun(directory, f"unreadable: {exc}"))
    if not rows:
        raise FimloraError(f"No readable finished runs under {root}.")
    frame = pd.DataFrame(rows)
    frame = frame.sort_values(
        ["dataset", "model", "budget", "method", "seed", "run_dir"], kind="stable", na_position="last"
    ).reset_index(drop=True)
    frame = _tidy_types(frame)
    scan.unfinished.sort(key=lambda u: str(u.path))
    return ResultsTable(root=root, frame=frame, unfinished=scan.unfinished)


def _tidy_types(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns Parquet can store: a column mixing numbers with strings becomes strings."""
    for column in frame.columns:
        values = frame[column].dropna()
        if values.empty:
            frame[column] = frame[column].astype("object")
            continue
        kinds = {type(v) for v in values}
        if kinds <= {int, float, bool} and bool in kinds and kinds != {bool}:
            frame[column] = frame[column].astype("float64")
        elif str in kinds and kinds != {str}:
            frame[column] = frame[column].map(lambda v: None if v is None or v != v else str(v))
    return frame
