"""Does the Fisher move during training? The per-module Fisher of the frozen weights along a LoRA run.

One run of a fixed-rank LoRA method (uniform LoRA, as the study asks) is trained as ``fimlora run`` would
train it, and at fractions ``f`` of its ``train.steps`` (default 0, 10 %, 50 % and 100 %: optimizer
steps ``round(f · steps)``) the Fisher of every target module's frozen weight W is estimated **through
the adapted model as trained so far** (the gradient of the loss with respect to W of
``y = W x + s·B A x``; at step 0, B = 0, so it is the Fisher at initialisation that fim-lora allocates
by). Every snapshot uses the same calibration examples (the experiment's ``fisher.num_examples`` from
the training split, the same subset fim-lora uses), its estimator, and eval mode; it is computed
inside ``torch.random.fork_rng`` and touches no ``.grad``, so the run trains exactly as it would without
the snapshots. Scores per module as :meth:`fimlora.fisher.FisherResult.scores`: ``"trace"`` = tr F and
``"mean"`` = tr F / (d_out·d_in).

Each snapshot is compared with

* (a) the snapshot at step 0 (the Fisher at initialisation), and
* (b) the *hindsight* scores: the energy of the update training made to each module, ‖ΔW_i‖_F² =
  Σ_k σ_k² (``"trace"``) or that over d_out·d_in (``"mean"``), from a finished source run (``--source``:
  full fine-tuning or uniform LoRA of the same model, data and steps, checked as the ``hindsight`` rule
  checks it, :mod:`fimlora.methods.allocations.hindsight`), or by default from this run's own final
  adapter ΔW = s·B·A,

by Kendall τ-b (with its two-sided p-value, ``scipy.stats.kendalltau``), Spearman ρ and the top-k
overlap (:mod:`fimlora.analysis.calibration`). τ near 1 against (a) at every fraction means the Fisher
at initialisation already ranks the modules as they rank later; τ against (b) says whether the Fisher
ranks modules as training ends up using them.

Written to ``fisher-trajectory.json`` (everything: settings, per-snapshot scores, the comparisons) and
``fisher-trajectory.csv`` (one row per comparison); ``fimlora report`` draws τ against the fraction of
training. The training run itself is kept in ``<out>/.run/<method>`` (hidden, so that a report or a
hindsight selector over a run store does not take it for one of the store's runs).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from scipy import stats as scipy_stats
from transformers import TrainerCallback

from fimlora.analysis.calibration import agreement, default_k
from fimlora.errors import FimloraError
from fimlora.io import read_json_of_kind, write_json_and_records

KIND = "fimlora-fisher-trajectory"
JSON_FILE = "fisher-trajectory.json"
CSV_FILE = "fisher-trajectory.csv"
RUN_DIR = ".run"
DEFAULT_FRACTIONS: tuple[float, ...] = (0.0, 0.1, 0.5, 1.0)
VERSUS_INIT, VERSUS_HINDSIGHT = "init", "hindsight"
_AGGREGATIONS = ("mean", "trace")


def snapshot_steps(fractions: Sequence[float], steps: int) -> list[int]:
    """Optimizer steps ``round(f · steps)`` of the fractions (sorted, distinct); 0 must be among them."""
    if not fractions or any(not (0.0 <= f <= 1.0) or math.isnan(f) for f in fractions):
        raise FimloraError(f"Fractions of training must lie in [0, 1], got {list(fractions)}.")
    chosen = sorted({round(float(f) * steps) for f in fractions})
    if chosen[0] != 0:
        raise FimloraError("The fractions must include 0: every snapshot is compared with the one at init.")
    if len(chosen) < 2:
        raise FimloraError(
            f"Fractions {list(fractions)} give one snapshot at {steps} steps; give a later one."
        )
    return chosen


def inner_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a ``PeftModel`` (LoRA layers injected), or ``model`` itself."""
    base = getattr(model, "base_model", None)
    return getattr(base, "model", model) if hasattr(model, "peft_config") else model


def frozen_weight_names(model: torch.nn.Module, targets: Sequence[str]) -> dict[str, str]:
    """``{target: name of the nn.Linear holding its frozen W}`` in :func:`inner_model`: a LoRA layer's
    ``base_layer``, or the target itself where it has no adapter."""
    modules = dict(inner_model(model).named_modules())
    return {t: f"{t}.base_layer" if f"{t}.base_layer" in modules else t for t in targets}


class FisherSnapshots(TrainerCallback):
    """Estimates the Fisher of the frozen target weights at the given optimizer steps of training."""

    def __init__(
        self,
        steps: Sequence[int],
        loader: Callable[[], Any],
        targets: Sequence[str],
        *,
        estimator: str,
        seed: int,
    ) -> None:
        self.steps = list(steps)
        self.loader = loader
        self.targets = list(targets)
        self.estimator = estimator
        self.seed = seed
        self.scores: dict[int, dict[str, dict[str, float]]] = {}
        self.seconds: dict[int, float] = {}

    def take(self, model: torch.nn.Module, step: int) -> None:
        from fimlora.fisher import estimate_fisher

        started = time.perf_counter()
        names = frozen_weight_names(model, self.targets)
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            result = estimate_fisher(
                inner_model(model),
                self.loader(),
                target_modules=list(names.values()),
                estimator=self.estimator,
                statistic="trace",
                seed=self.seed,
                progress=False,
            )
        back = {weight: target for target, weight in names.items()}
        self.scores[step] = {
            aggregation: {back[n]: v for n, v in result.scores(aggregation).items()}
            for aggregation in _AGGREGATIONS
        }
        self.seconds[step] = round(time.perf_counter() - started, 3)

    def on_train_begin(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if 0 in self.steps and model is not None:
            self.take(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step in self.steps and model is not None:
            self.take(model, state.global_step)


def compare(a: Mapping[str, float], b: Mapping[str, float], k: int) -> dict[str, float]:
    """:func:`fimlora.analysis.calibration.agreement` plus the two-sided p-value of Kendall's τ-b."""
    names = sorted(a)
    out = agreement(a, b, k)
    x, y = [a[n] for n in names], [b[n] for n in names]
    out["kendall_p"] = (
        float(scipy_stats.kendalltau(x, y).pvalue) if len(set(x)) > 1 and len(set(y)) > 1 else math.nan
    )
    return out


@dataclass
class FisherTrajectory:
    """Snapshots of the Fisher scores along training, the hindsight scores, and their comparisons."""

    info: dict[str, Any]
    snapshots: dict[int, dict[str, dict[str, float]]]  # step -> aggregation -> module -> score
    hindsight: dict[str, dict[str, float]]  # aggregation -> module -> update energy
    records: list[dict[str, Any]]

    def to_json(self) -> dict[str, Any]:
        steps = self.info["steps"]
        return {
            "kind": KIND,
            **self.info,
            "snapshots": [
                {"step": step, "fraction": step / steps, "scores": scores}
                for step, scores in sorted(self.snapshots.items())
            ],
            "hindsight_scores": self.hindsight,
            "records": self.records,
        }

    def write(self, out: str | Path) -> dict[str, Path]:
        """``fisher-trajectory.json`` (everything) and ``.csv`` (one row per comparison), atomically."""
        return write_json_and_records(out, JSON_FILE, self.to_json(), CSV_FILE, self.records)


def comparison_records(
    snapshots: Mapping[int, Mapping[str, Mapping[str, float]]],
    hindsight: Mapping[str, Mapping[str, float]],
    steps: int,
    k: int,
) -> list[dict[str, Any]]:
    """One record per (snapshot, aggregation, reference): the snapshot vs init and vs hindsight."""
    records = []
    for step in sorted(snapshots):
        for aggregation in _AGGREGATIONS:
            scores = snapshots[step][aggregation]
            for versus, reference in (
                (VERSUS_INIT, snapshots[0][aggregation]),
                (VERSUS_HINDSIGHT, hindsight[aggregation]),
            ):
                records.append(
                    {
                        "step": step,
                        "fraction": step / steps,
                        "aggregation": aggregation,
                        "versus": versus,
                        "k": k,
                        **compare(scores, reference, k),
                    }
                )
    return records


def load_fisher_trajectory(path: str | Path) -> FisherTrajectory | None:
    """Read a ``fisher-trajectory.json``; None if it is not one."""
    data = read_json_of_kind(path, KIND)
    if data is None:
        return None
    info = {k: v for k, v in data.items() if k not in {"kind", "snapshots", "hindsight_scores", "records"}}
    snapshots = {int(s["step"]): s["scores"] for s in data.get("snapshots", [])}
    return FisherTrajectory(
        info, snapshots, data.get("hindsight_scores") or {}, list(data.get("records", []))
    )


def fisher_trajectory(
    prepared: Any,
    out: str | Path,
    *,
    method: str | None = None,
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    source: str | Path | None = None,
    k: int | None = None,
    tuning: Mapping[str, Any] | None = None,
    progress: bool = False,
    log: Callable[[str], None] = lambda _: None,
) -> FisherTrajectory:
    """Train ``method`` (default: the config's first) with Fisher snapshots and compare them (module doc).

    ``prepared`` is :func:`fimlora.experiment.prepare`'s result. The method must train a PEFT LoRA
    adapter of fixed ranks. Raises FimloraError for bad fractions, another kind of method, or a source
    the hindsight rule would refuse. ``tuning``, when the run takes tuned settings (``fimlora
    fisher-trajectory --tuned``), is recorded as the result's ``tuning``.
    """
    from fimlora.experiment import calibrate, calibration_loader, method_context, run_method
    from fimlora.methods import get_allocation, resolve_method
    from fimlora.methods.allocations.hindsight import (
        check_source,
        read_run,
        source_gains,
        spectrum_energy,
        update_energy,
    )
    from fimlora.methods.resize import lora_layers
    from fimlora.runs import RunDirectory

    config = prepared.config
    name = method or config.method_names[0]
    if name not in config.method_names:
        raise FimloraError(f"Method {name!r} is not in the config; it has {', '.join(config.method_names)}.")
    spec = resolve_method(config.methods[config.method_names.index(name)])
    rule = get_allocation(spec.allocation)
    if spec.adapter != "lora" or not rule.static_ranks:
        raise FimloraError(
            f"The Fisher trajectory follows a plain LoRA adapter of fixed ranks (e.g. lora); method {name!r} "
            f"has adapter {spec.adapter!r} and allocation {spec.allocation!r}."
        )
    steps = config.train.steps
    chosen = snapshot_steps(fractions, steps)
    ctx = method_context(prepared, spec)
    source_run = None
    if source is not None:  # checked before anything trains
        source_run = read_run(source)
        check_source(source_run, ctx)
    calibrate(prepared, set(rule.needs), progress=progress, log=log)
    snapshots = FisherSnapshots(
        chosen,
        lambda: calibration_loader(prepared),
        prepared.targets,
        estimator=config.fisher.estimator,
        seed=config.seed,
    )
    out = Path(out)
    log(f"training {name} for {steps} steps with Fisher snapshots at steps {chosen}")
    outcome = run_method(
        prepared,
        name,
        RunDirectory(out / RUN_DIR / name),
        progress=progress,
        extra_callbacks=[snapshots],
        result_extras={"analysis": KIND},
    )
    missing = [s for s in chosen if s not in snapshots.scores]
    if missing:
        raise RuntimeError(f"no Fisher snapshot was taken at step(s) {missing}")
    if source_run is not None:
        gains, _ = source_gains(source_run, ctx)
        hindsight_source: dict[str, Any] = {"path": str(source_run.path.resolve()), "kind": source_run.kind}
        hindsight = {a: spectrum_energy(gains, prepared.shapes, a) for a in _AGGREGATIONS}
    else:
        layers = lora_layers(outcome.model)
        with torch.no_grad():
            updates = {n: layers[n].get_delta_weight("default").detach().cpu() for n in prepared.targets}
        hindsight_source = {"path": str((out / RUN_DIR / name).resolve()), "kind": "this run (s·B·A)"}
        hindsight = {aggregation: update_energy(updates, aggregation) for aggregation in _AGGREGATIONS}
    kk = k or default_k(len(prepared.targets))
    info = {
        "model": config.model,
        "dataset": config.dataset_label,
        "method": name,
        "seed": config.seed,
        "steps": steps,
        "fractions": [s / steps for s in chosen],
        "estimator": config.fisher.estimator,
        "num_examples": min(config.fisher.num_examples, len(prepared.tokenized["train"])),
        "aggregation": config.fisher.aggregation,
        "num_modules": len(prepared.targets),
        "k": kk,
        "hindsight_source": hindsight_source,
        "budget": prepared.budget,
        "final_metrics": {m: v for m, v in outcome.result["metrics"].items() if isinstance(v, int | float)},
        "seconds_per_snapshot": {str(s): t for s, t in sorted(snapshots.seconds.items())},
        "learning_rate": config.train.learning_rate,
        "tuning": dict(tuning) if tuning is not None else None,
    }
    records = comparison_records(snapshots.scores, hindsight, steps, kk)
    return FisherTrajectory(info, dict(snapshots.scores), hindsight, records)
