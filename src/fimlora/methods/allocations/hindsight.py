"""hindsight (preset ``hindsight-lora``): the allocation made knowing where training went; an upper bound.

The rule reads a *finished source run* of the same model, data and training length, takes the update
training made to each target weight there,

* full fine-tuning (``full-ft``): ``ΔW_i = W_i,trained − W_i`` (no rank cap);
* uniform LoRA (allocation ``uniform``, adapter ``lora``): ``ΔW_i = s_i·B_i·A_i`` (PEFT's own
  ``get_delta_weight``); its rank caps every module (a source at r = 8 caps every module at 8, so it
  must be at least the largest rank the allocation may give, and must be able to spend the budget),

and spends the parameter budget on the largest total ``Σ_i Σ_{k≤r_i} σ_k(ΔW_i)²`` with the spectral
rule's exact allocator (:func:`fimlora.allocation.allocate_hindsight`). Then the method trains from
scratch like every other one: only the ranks come from the source. No rule that allocates before
training sees where training goes, so none should beat this one; where it does not beat uniform LoRA,
no allocation can matter.

Naming the source (``method_options.hindsight``): ``source`` for every hindsight method, or ``sources:
{<method name>: …}`` per method (one config or sweep can then hold a full-ft-sourced and a LoRA-sourced
hindsight method). A source is a run directory (``<output_dir>/<method>``), or a selector ``{method,
seed, store, where}``: the one finished run below ``store`` (default: this experiment's ``output_dir``)
of that method and seed (``same``: this run's seed) that is compatible (below) and whose config.yaml has
every ``where`` value (dotted keys, e.g. ``budget.uniform_rank: 8``); tuning trials and runs inside
hidden directories are never picked.
None or several matches are a FimloraError listing what was found.

Refused, each with one line naming the reason: a run that is not finished; another model or
quantisation; other data (the content fingerprints of the training and validation splits differ, or
the run predates them: see ``data_fingerprint`` in result.json); another ``train.steps``; a method
that is neither full fine-tuning nor uniform plain LoRA; a LoRA source without an adapter on one of
this run's target modules, or whose rank cannot spend the budget.

What the source's weights may depend on. Only the training split: its content must be this run's
training split (the fingerprint), and nothing in a finished run feeds other data into its weights:
periodic validation (``train.eval_every``) only measures (it runs inside ``torch.random.fork_rng``, so
the trajectory is that of a run without it), the final evaluation (validation or test) runs after
training, runs keep no checkpoints to pick from (``save_strategy: no``), a run a pruner stopped early
never finishes, and ``fisher.head: probe`` fits the head on the training split. Hyperparameters chosen
on validation (``fimlora sweep --tuned``) are allowed, as for every method of a comparison; the source
record says whether they were tuned.

What is read of the source: only the spectrum of each update, ``σ_k(ΔW_i)²`` (float64, as
:func:`fimlora.allocation.marginal_gains` computes it). ``fimlora update-spectrum RUN`` writes it next to
the run's result.json (``update-spectrum.safetensors``, a few hundred KB where the weights are tens of
MB); where that file exists it is read instead of the weights, with the same ranks as a result, so a
source stays usable in a clone that has its records and not its (uncommitted) weights.

The source is recorded in ``allocation.json`` and ``result.json["allocation"]["source"]``: its path,
how it was selected, method, kind, rank, seed, the sha256 of its config.yaml and result.json, and
whether its settings were tuned.
"""

from __future__ import annotations

import copy
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fimlora.allocation import Allocation, allocate_hindsight_gains, marginal_gains
from fimlora.allocation.allocate import rank_cost
from fimlora.config import ExperimentConfig, HindsightSource, parse_config, read_yaml_file
from fimlora.errors import FimloraError
from fimlora.io import sha256_file
from fimlora.methods.allocations.spectral import PLAIN_RANK_ADAPTERS
from fimlora.methods.base import AllocationRule, MethodContext
from fimlora.runs import ADAPTER_DIR, CONFIG_FILE, RESULT_FILE

FULL_FT_WEIGHTS = "model.safetensors"
LORA_CONFIG = "adapter_config.json"
SPECTRUM_FILE = "update-spectrum.safetensors"
SPECTRUM_FORMAT = "fimlora-update-spectrum/1"
FULL_FT, LORA = "full-ft", "lora"


@dataclass
class SourceRun:
    """A finished run read for its trained updates."""

    path: Path
    config: ExperimentConfig
    result: dict[str, Any]

    @property
    def kind(self) -> str | None:
        """``full-ft``, ``lora`` (uniform plain LoRA), or None for any other method."""
        spec = self.result.get("method_spec") or {}
        if spec.get("adapter") == "full":
            return FULL_FT
        if spec.get("adapter") == "lora" and spec.get("allocation") == "uniform":
            return LORA
        return None

    def identity(self, selected_by: str | dict[str, Any], rank: int | None) -> dict[str, Any]:
        """What the allocation records about its source."""
        return {
            "path": str(self.path.resolve()),
            "selected_by": selected_by,
            "method": self.result.get("method"),
            "kind": self.kind,
            "rank": rank,
            "seed": self.result.get("seed"),
            "train_steps": self.config.train.steps,
            "config_sha256": sha256_file(self.path / CONFIG_FILE),
            "result_sha256": sha256_file(self.path / RESULT_FILE),
            "tuned": "tuning" in self.result,
        }


def read_run(path: str | Path) -> SourceRun:
    """The finished run at ``path``; a FimloraError when it is not one."""
    directory = Path(path)
    result_path = directory / RESULT_FILE
    try:
        result = json.loads(result_path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        result = None
    if not isinstance(result, dict) or result.get("status") != "finished":
        raise FimloraError(
            f"The hindsight source {directory} is not a finished run (no finished {RESULT_FILE}); give "
            "<output_dir>/<method> of a run that finished."
        )
    raw = read_yaml_file(directory / CONFIG_FILE, "run config")
    config = parse_config(raw, source=str(directory / CONFIG_FILE))
    return SourceRun(directory, config, result)


def incompatibilities(run: SourceRun, ctx: MethodContext) -> list[str]:
    """Why ``run`` cannot be this run's hindsight source (empty when it can); see the module docstring."""
    config, own = run.config, ctx.config
    reasons = []
    if run.kind is None:
        reasons.append(
            f"its method {run.result.get('method')!r} is neither full fine-tuning nor uniform plain LoRA"
        )
    if config.model != own.model:
        reasons.append(f"model {config.model!r}, not {own.model!r}")
    if config.quantization != own.quantization:
        reasons.append(f"quantization {config.quantization}, not {own.quantization}")
    if config.train.steps != own.train.steps:
        reasons.append(f"train.steps {config.train.steps}, not {own.train.steps}")
    reasons += _data_differences(run, ctx)
    return reasons


def _data_differences(run: SourceRun, ctx: MethodContext) -> list[str]:
    theirs = run.result.get("data_fingerprint")
    if not isinstance(theirs, Mapping) or "train" not in theirs:
        return [
            "it records no data_fingerprint (made before fimlora recorded what runs trained on), so its "
            "training data cannot be checked; re-run it"
        ]
    if run.config.data_seed != ctx.config.data_seed:
        return [f"data_seed {run.config.data_seed} (another split of the data), not {ctx.config.data_seed}"]
    ours = ctx.data_fingerprint
    if theirs["train"] != ours.get("train"):
        return ["its training split holds other examples than this run's (content fingerprints differ)"]
    if "validation" in theirs and "validation" in ours and theirs["validation"] != ours["validation"]:
        return ["its validation split holds other examples than this run's (content fingerprints differ)"]
    return []


def _weights(run: SourceRun) -> Path:
    """The file whose presence says ``run``'s weights were kept."""
    return run.path / ADAPTER_DIR / (FULL_FT_WEIGHTS if run.kind == FULL_FT else LORA_CONFIG)


def unreadable(run: SourceRun) -> str | None:
    """Why nothing of ``run``'s updates can be read (None when its spectrum or its weights are there)."""
    if (run.path / SPECTRUM_FILE).is_file():
        return None
    weights = _weights(run)
    if run.kind is None or weights.is_file():
        return None
    return (
        f"it has neither {SPECTRUM_FILE} nor its weights ({ADAPTER_DIR}/{weights.name}; weights are not "
        f"committed): run `fimlora update-spectrum {run.path}` where its weights are, or train it again"
    )


def check_source(run: SourceRun, ctx: MethodContext) -> None:
    """Raise a one-line FimloraError when ``run`` cannot be this run's hindsight source."""
    reasons = incompatibilities(run, ctx)
    missing = unreadable(run)
    if missing:
        reasons.append(missing)
    if reasons:
        raise FimloraError(
            f"Method {ctx.spec.name!r}: the hindsight source {run.path} cannot be used: {'; '.join(reasons)}."
        )


def find_source(selector: HindsightSource, ctx: MethodContext) -> Path:
    """The one compatible finished run below the selector's store (see the module docstring)."""
    store = Path(selector.store if selector.store is not None else ctx.config.output_dir)
    seed = ctx.seed if selector.seed == "same" else int(selector.seed)
    what = f"method {selector.method!r}, seed {seed}" + (
        f", {', '.join(f'{k}={v!r}' for k, v in sorted(selector.where.items()))}" if selector.where else ""
    )
    if not store.is_dir():
        raise FimloraError(
            f"Method {ctx.spec.name!r}: the hindsight store {store} is not a directory; set "
            "method_options.hindsight.source.store to the directory holding the source runs."
        )
    matches: list[Path] = []
    rejected: list[str] = []
    for result_path in sorted(store.rglob(RESULT_FILE)):
        directory = result_path.parent
        if any(part.startswith(".") for part in directory.relative_to(store).parts):
            continue  # hidden: leftovers, and the runs analyses keep out of reports (as fimlora results)
        try:
            result = json.loads(result_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if (
            not isinstance(result, dict)
            or result.get("status") != "finished"
            or result.get("method") != selector.method
            or result.get("seed") != seed
            or "tuning_trial" in result
        ):
            continue
        try:
            run = read_run(directory)
        except FimloraError as exc:
            rejected.append(f"{directory}: {exc}")
            continue
        differing = _where_differences(run, selector.where)
        reasons = incompatibilities(run, ctx) + differing
        if reasons:
            rejected.append(f"{directory}: {'; '.join(reasons)}")
        else:
            matches.append(directory)
    if len(matches) == 1:
        return matches[0]
    if not matches:
        near = f" Runs of that method and seed there: {' | '.join(rejected[:3])}." if rejected else ""
        raise FimloraError(
            f"Method {ctx.spec.name!r}: no finished run of {what} below {store} trained the same model on "
            f"the same data for the same steps, to read hindsight updates from.{near}"
        )
    listed = ", ".join(str(m) for m in matches[:4]) + (" …" if len(matches) > 4 else "")
    raise FimloraError(
        f"Method {ctx.spec.name!r}: {len(matches)} finished runs of {what} below {store} could be the "
        f"hindsight source ({listed}); narrow the selector with 'where' (e.g. budget.uniform_rank) or "
        "name the run directory."
    )


def _where_differences(run: SourceRun, where: Mapping[str, Any]) -> list[str]:
    from fimlora.resolved import result_settings

    settings = result_settings(run.config)
    out = []
    for key, wanted in sorted(where.items()):
        have = settings.get(key, "<absent>")
        if json.dumps(have, sort_keys=True, default=str) != json.dumps(wanted, sort_keys=True, default=str):
            out.append(f"{key} {have!r}, not {wanted!r}")
    return out


def resolve_source(ctx: MethodContext) -> tuple[SourceRun, str | dict[str, Any]]:
    """The checked source run of this method and how it was named."""
    named = ctx.options.hindsight.source_for(ctx.spec.name)
    if named is None:
        raise FimloraError(
            f"Method {ctx.spec.name!r} needs a hindsight source: set method_options.hindsight.source."
        )
    if isinstance(named, HindsightSource):
        path = find_source(named, ctx)
        selected_by: str | dict[str, Any] = named.model_dump(mode="json")
    else:
        path, selected_by = Path(named), "path"
    run = read_run(path)
    check_source(run, ctx)
    return run, selected_by


def source_gains(run: SourceRun, ctx: MethodContext) -> tuple[dict[str, np.ndarray], int | None]:
    """``(σ_k(ΔW)² per target module, the LoRA source's smallest rank over them)``: from the source's
    ``update-spectrum.safetensors`` where it has one, else from its weights (the same values)."""
    if (run.path / SPECTRUM_FILE).is_file():
        return read_update_spectrum(run, ctx.targets, ctx.shapes)
    updates, rank = source_updates(run, ctx)
    return marginal_gains(updates), rank


def check_spectrum_source(run: SourceRun) -> None:
    """Raise a one-line FimloraError unless ``run`` is a hindsight source whose weights are here; checked
    before any base model is loaded for it."""
    if run.kind is None:
        raise FimloraError(
            f"{run.path} is a run of {run.result.get('method')!r}: only full fine-tuning and uniform plain "
            "LoRA runs are hindsight sources, so only theirs have an update spectrum."
        )
    weights = _weights(run)
    if not weights.is_file():
        raise FimloraError(
            f"{run.path} has no {ADAPTER_DIR}/{weights.name}: its update spectrum is written from its "
            "weights (they are not committed), so run this where it was trained, or train it again."
        )


def write_update_spectrum(run: SourceRun, base_model: torch.nn.Module, targets: list[str]) -> Path:
    """Write ``update-spectrum.safetensors`` into ``run``'s directory (atomically) from its weights:
    ``σ_k(ΔW_i)²`` of every target module, float64, and (metadata) the source kind and LoRA rank."""
    from safetensors.torch import save_file

    from fimlora.io import atomic_write

    check_spectrum_source(run)
    updates, rank = updates_from_weights(run, base_model, targets, run.path.name)
    gains = marginal_gains(updates)
    tensors = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in gains.items()}
    metadata = {"format": SPECTRUM_FORMAT, "kind": str(run.kind), "rank": "" if rank is None else str(rank)}
    metadata["result_sha256"] = sha256_file(run.path / RESULT_FILE)
    return atomic_write(run.path / SPECTRUM_FILE, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def read_update_spectrum(
    run: SourceRun, targets: list[str], shapes: Mapping[str, tuple[int, int]]
) -> tuple[dict[str, np.ndarray], int | None]:
    """The spectra of ``targets`` from ``run``'s ``update-spectrum.safetensors`` and the LoRA rank it
    records; refused when it was written for another record of the run (its result.json changed)."""
    from safetensors import SafetensorError, safe_open

    path = run.path / SPECTRUM_FILE
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != SPECTRUM_FORMAT:
                raise FimloraError(f"{path} is not an update spectrum (format {metadata.get('format')!r}).")
            if metadata.get("result_sha256") != sha256_file(run.path / RESULT_FILE):
                raise FimloraError(
                    f"{path} was written for another record of this run (its {RESULT_FILE} changed since): "
                    f"write it again (`fimlora update-spectrum --force {run.path}`) where the weights are."
                )
            missing = [n for n in targets if n not in set(handle.keys())]
            if missing:
                raise FimloraError(
                    f"{path}: no spectrum for {missing[0]!r}; this run's targets are another model's modules."
                )
            gains = {n: handle.get_tensor(n).numpy() for n in targets}
    except (OSError, SafetensorError) as exc:
        raise FimloraError(f"{path} cannot be read as an update spectrum ({exc}).") from exc
    for name in targets:
        if gains[name].shape != (min(shapes[name]),):
            raise FimloraError(
                f"{path}: module {name!r} has {gains[name].shape[0]} singular values, not "
                f"min{tuple(shapes[name])} = {min(shapes[name])}: another model."
            )
    rank = metadata.get("rank") or None
    return gains, None if rank is None else int(rank)


def source_updates(run: SourceRun, ctx: MethodContext) -> tuple[dict[str, torch.Tensor], int | None]:
    """``(ΔW per target module, the LoRA source's smallest rank over them)``; the rank is None for full
    fine-tuning. ΔW keeps the dtype training used, ``(d_out, d_in)``."""
    if ctx.base_model is None:
        raise RuntimeError("the hindsight rule needs the base model's weights")
    return updates_from_weights(run, ctx.base_model, ctx.targets, ctx.spec.name)


def updates_from_weights(
    run: SourceRun, base_model: torch.nn.Module, targets: list[str], who: str
) -> tuple[dict[str, torch.Tensor], int | None]:
    """:func:`source_updates` for a base model and target list; ``who`` names the caller in errors."""
    adapter_dir = run.path / ADAPTER_DIR
    modules = dict(base_model.named_modules())
    if run.kind == FULL_FT:
        from safetensors.torch import load_file

        weights_path = adapter_dir / FULL_FT_WEIGHTS
        if not weights_path.is_file():
            raise FimloraError(f"The hindsight source {run.path} has no {ADAPTER_DIR}/{FULL_FT_WEIGHTS}.")
        trained = load_file(str(weights_path))
        missing = [n for n in targets if f"{n}.weight" not in trained]
        if missing:
            raise FimloraError(
                f"The hindsight source {run.path} has no trained weight for {missing[0]!r}: another model."
            )
        updates = {}
        for name in targets:
            base = modules[name].weight.detach()
            new = trained[f"{name}.weight"]
            if new.shape != base.shape:
                raise FimloraError(
                    f"The hindsight source {run.path} trained {name!r} at shape {tuple(new.shape)}, not "
                    f"{tuple(base.shape)}: another model."
                )
            updates[name] = new.to(base.dtype) - base.cpu()
        return updates, None
    return _lora_updates(run, base_model, targets, who)


def _lora_updates(
    run: SourceRun, base_model: torch.nn.Module, targets: list[str], who: str
) -> tuple[dict[str, torch.Tensor], int]:
    from peft import PeftModel

    from fimlora.methods.resize import lora_layers

    if not (run.path / ADAPTER_DIR / LORA_CONFIG).is_file():
        raise FimloraError(f"The hindsight source {run.path} has no {ADAPTER_DIR}/ (its LoRA weights).")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. a head saved in modules_to_save
        warnings.simplefilter("ignore", FutureWarning)  # transformers deprecations PEFT still calls
        model = PeftModel.from_pretrained(copy.deepcopy(base_model), str(run.path / ADAPTER_DIR))
    layers = lora_layers(model)
    missing = [n for n in targets if n not in layers]
    if missing:
        raise FimloraError(
            f"Method {who!r}: the hindsight source {run.path} has no LoRA adapter on "
            f"{len(missing)} of this run's target modules (e.g. {missing[0]!r}); train it on the same "
            "target_modules."
        )
    with torch.no_grad():
        updates = {n: layers[n].get_delta_weight("default").detach().cpu() for n in targets}
    rank = min(int(layers[n].r["default"]) for n in targets)
    return updates, rank


def spectrum_energy(
    gains: Mapping[str, np.ndarray], shapes: Mapping[str, tuple[int, int]], aggregation: str
) -> dict[str, float]:
    """:func:`update_energy` from the updates' spectra: ``Σ_k σ_k²`` = ‖ΔW‖_F² (up to round-off)."""
    out = {}
    for name, values in gains.items():
        energy = float(np.asarray(values, dtype=np.float64).sum())
        out[name] = energy if aggregation == "trace" else energy / (shapes[name][0] * shapes[name][1])
    return out


def update_energy(updates: Mapping[str, torch.Tensor], aggregation: str) -> dict[str, float]:
    """One score per module from its update: ``"trace"`` = ‖ΔW‖_F² = Σ_k σ_k², ``"mean"`` = that over
    ``d_out·d_in`` (per weight, as the Fisher's ``mean`` score)."""
    out = {}
    for name, update in updates.items():
        energy = float(update.double().square().sum())
        out[name] = energy if aggregation == "trace" else energy / update.numel()
    return out


class Hindsight(AllocationRule):
    name = "hindsight"
    description = "Exact knapsack on σ_k² of the updates a finished full-FT or uniform-LoRA run trained."
    adapters = PLAIN_RANK_ADAPTERS  # a rank is one rank of the decomposed weight, as for spectral
    reads_source_run = True

    def allocate(
        self,
        ctx: MethodContext,
        shapes: Mapping[str, tuple[int, int]],
        budget: int,
        rank_costs: Mapping[str, int] | None = None,
    ) -> Allocation:
        run, selected_by = resolve_source(ctx)
        gains, rank = source_gains(run, ctx)
        settings = ctx.config.allocation
        r_max = settings.r_max
        if rank is not None:
            r_max = rank if r_max is None else min(r_max, rank)
            if r_max < settings.r_min:
                raise FimloraError(
                    f"Method {ctx.spec.name!r}: the LoRA hindsight source {run.path} has rank {rank}, below "
                    f"allocation.r_min {settings.r_min}; use a source of higher rank or full-ft."
                )
            reachable = sum(min(r_max, *shapes[n]) * rank_cost(shapes, rank_costs, n) for n in shapes)
            if reachable < budget:
                raise FimloraError(
                    f"Method {ctx.spec.name!r}: the LoRA hindsight source {run.path} has rank {rank}, which "
                    f"caps every module at {r_max}: at most {reachable:,} of the budget's {budget:,} "
                    "parameters could be spent. Use a source of higher rank or full-ft."
                )
        return allocate_hindsight_gains(
            {n: gains[n] for n in shapes},
            shapes,
            budget=budget,
            source=run.identity(selected_by, rank),
            r_min=settings.r_min,
            r_max=r_max,
            rank_costs=rank_costs,
        )


RULE = Hindsight()
