"""``fimlora export RUN --out DIR``: a finished run as something to deploy.

Three kinds of export, each checked before it is handed over (the check's numbers go into
``fimlora_export.json``):

* **merged** (default, every method whose update folds into W): the run's base model loaded as the run
  loaded it, the trained adapter applied (:mod:`fimlora.deploy.loading`), then merged by the method's
  :meth:`~fimlora.methods.base.AdapterKind.merge` — PEFT's ``merge_and_unload`` for the LoRA family with
  any rank pattern, DoRA, rsLoRA, VeRA, AdaLoRA, EVA; Delta-LoRA's moved W is already in the base weights
  when its adapter merges on top; PiSSA/OLoRA/LoRA-GA merge through PEFT's conversion to a plain LoRA on
  the original base; full fine-tuning is saved as it is. Written with ``save_pretrained`` (safetensors;
  transformers 5 writes no other format), with the tokenizer and, for classification, the label names
  as ``id2label``/``label2id``. ``AutoModelFor….from_pretrained(DIR)`` loads it with neither fimlora nor
  PEFT installed. Check: the reloaded directory's logits on fixed probe texts equal the run's (the
  unmerged trained model's) to ``MAX_RELATIVE_ERROR`` = 1e-4 (max |Δ| / max |reference|).
* **adapter + loader** (HydraLoRA, whose per-token router does not merge): ``base/`` (the base model and
  tokenizer), ``adapter/`` (the run's ``hydralora_config.json`` + ``hydralora.safetensors``) and
  ``hydralora_loader.py``, a standalone loader needing torch, transformers and safetensors only. Check:
  that loader's logits equal the run's.
* **adapter only** (``--adapter-only``, PEFT adapters): ``adapter/`` (``adapter_config.json`` +
  ``adapter_model.safetensors``) and ``serving.json``, what a serving engine needs (and, for
  classification, ``num_labels``/``id2label``/``label2id``: the base model's head must be built for the
  run's classes before the adapter, which holds the trained head, loads onto it): the largest rank
  (vLLM's ``--max-lora-rank`` must be at least that), the target modules, and the features engines
  refuse. Serving engines apply one scaling to every module (vLLM computes ``lora_alpha / r`` from the
  config and ignores ``rank_pattern``/``alpha_pattern``), so a LoRA adapter whose modules have different
  scalings — fim-lora's ranks under the ``alpha_over_r`` convention — is written with each module's
  scaling folded into its B (``B_i ← B_i · s_i / s``, ``alpha_pattern`` set so PEFT applies that one
  ``s``): PEFT computes the same function and an engine that ignores the patterns does too. Check: plain
  PEFT's logits with the written adapter equal the run's. Refused where the adapter alone is not the
  trained model (Delta-LoRA also moved W; full fine-tuning has no adapter; HydraLoRA is not a PEFT type).

Each export is written into a temporary sibling directory and renamed onto ``DIR``; an existing ``DIR``
is only replaced when it is empty or a previous export (holds ``fimlora_export.json``).
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fimlora.deploy.loading import ADAPTER_DIR, LoadedRun, load_base, load_run
from fimlora.errors import FimloraError

EXPORT_FILE = "fimlora_export.json"
SERVING_FILE = "serving.json"
LOADER_FILE = "hydralora_loader.py"
LOADER_USAGE = (
    "sys.path.insert(0, DIR); import hydralora_loader; model, tokenizer = hydralora_loader.load(DIR)"
)
FORMAT = "fimlora-export/1"
MAX_RELATIVE_ERROR = 1e-4
# Texts the export check runs through both models: fixed, so every export of a run checks the same.
PROBE_TEXTS = (
    "The committee met on Tuesday to discuss the new budget for the county schools.",
    "She laughed, put down the letter and walked out into the rain without a word.",
    "Results were mixed.",
)
# vLLM sizes its LoRA buffers by --max-lora-rank and accepts only these values (late 2025).
VLLM_MAX_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@dataclass
class ExportResult:
    """What an export wrote: its kind, directory, files (relative) and the check's numbers."""

    out: Path
    kind: str
    files: list[str]
    check: dict[str, Any]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------
# Checking
# --------------------------------------------------------------------------------------------------


def probe_inputs(tokenizer: Any, max_length: int) -> dict[str, torch.Tensor]:
    """The fixed probe texts, right-padded, truncated to the run's ``max_length``."""
    return dict(
        tokenizer(
            list(PROBE_TEXTS), return_tensors="pt", padding=True, truncation=True, max_length=max_length
        )
    )


@torch.no_grad()
def probe_logits(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of the probe inputs (float32, on the CPU); for a causal LM only at real tokens."""
    device = next(model.parameters()).device
    batch = {k: inputs[k].to(device) for k in ("input_ids", "attention_mask")}
    logits = model(**batch).logits.float().cpu()  # type: ignore[operator]
    if logits.dim() == 3:
        logits = logits[inputs["attention_mask"].bool()]
    return logits


def compare(reference: torch.Tensor, other: torch.Tensor) -> dict[str, float]:
    """``max_abs_diff`` and ``max_rel_diff`` = max |other − reference| / max |reference|."""
    if reference.shape != other.shape:
        raise FimloraError(
            f"Export check: logits of shape {tuple(other.shape)}, expected {tuple(reference.shape)}."
        )
    diff = float((other - reference).abs().max())
    scale = float(reference.abs().max())
    return {"max_abs_diff": diff, "max_rel_diff": diff / scale if scale > 0 else diff}


def _checked(reference: torch.Tensor, other: torch.Tensor, what: str) -> dict[str, Any]:
    result: dict[str, Any] = compare(reference, other)
    if not math.isfinite(result["max_rel_diff"]) or result["max_rel_diff"] > MAX_RELATIVE_ERROR:
        raise FimloraError(
            f"Export check failed: {what} gives logits {result['max_rel_diff']:.3g} (relative) away from the "
            f"run's, above {MAX_RELATIVE_ERROR:g}; nothing was written."
        )
    result.update(tolerance=MAX_RELATIVE_ERROR, probe_texts=len(PROBE_TEXTS))
    return result


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _check_target(out: Path, run: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FimloraError(f"--out {out} is a file; give a directory.")
    resolved, run_resolved = out.resolve(), run.resolve()
    if resolved == run_resolved or resolved in run_resolved.parents or resolved == run_resolved / ADAPTER_DIR:
        raise FimloraError(f"--out {out} would replace the run itself; choose a directory outside it.")
    if out.is_dir() and any(out.iterdir()) and not (out / EXPORT_FILE).is_file():
        raise FimloraError(
            f"--out {out} exists and is not a fimlora export (no {EXPORT_FILE}); choose another directory."
        )


def _write(out: Path, fill: Any, info: dict[str, Any]) -> list[str]:
    """``fill(tmp)`` writes the export's files into a temporary sibling, then ``fimlora_export.json``
    is added and the directory renamed onto ``out``. Returns the files written, relative to ``out``."""
    from fimlora.experiment import save_atomically
    from fimlora.io import atomic_write_json
    from fimlora.models import _quiet_transformers

    files: list[str] = []

    def write(tmp: Path) -> None:
        with _quiet_transformers():  # no shard-writing / weight-loading bars around the export's own lines
            fill(tmp)
        files.extend(sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()))
        if EXPORT_FILE not in files:
            files.append(EXPORT_FILE)
        atomic_write_json(tmp / EXPORT_FILE, {**info, "files": files})

    out.parent.mkdir(parents=True, exist_ok=True)
    save_atomically(write, out)
    return files


def _info(loaded: LoadedRun, kind: str) -> dict[str, Any]:
    import fimlora

    return {
        "format": FORMAT,
        "kind": kind,
        "run": str(loaded.path.resolve()),
        "method": loaded.spec.to_dict(),
        "task": loaded.task,
        "base_model": loaded.source,
        "fimlora_version": fimlora.__version__,
    }


def _set_labels(model: nn.Module, label_names: list[str] | None) -> None:
    if label_names:
        config: Any = model.config
        config.id2label = dict(enumerate(label_names))
        config.label2id = {name: i for i, name in enumerate(label_names)}


def _auto_class(task: str) -> Any:
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM


def export_run(run_dir: str | Path, out: str | Path, *, adapter_only: bool = False) -> ExportResult:
    """Export the finished run at ``run_dir`` into ``out`` (see the module docstring)."""
    run_dir, out = Path(run_dir), Path(out)
    _check_target(out, run_dir)
    loaded = load_run(run_dir)
    if adapter_only:
        return _export_adapter(loaded, out)
    if loaded.adapter.unmergeable_reason is not None:
        if loaded.spec.adapter == "hydralora":
            return _export_hydralora(loaded, out)
        raise FimloraError(loaded.adapter.unmergeable_reason)
    return _export_merged(loaded, out)


def _export_merged(loaded: LoadedRun, out: Path) -> ExportResult:
    inputs = probe_inputs(loaded.tokenizer, loaded.config.train.max_length)
    reference = probe_logits(loaded.model, inputs)
    merged = loaded.adapter.merge(loaded.model)
    _set_labels(merged, loaded.label_names)
    check: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        merged.save_pretrained(str(tmp))
        loaded.tokenizer.save_pretrained(str(tmp))
        reloaded = _auto_class(loaded.task).from_pretrained(str(tmp), dtype=torch.float32)
        check.update(_checked(reference, probe_logits(reloaded, inputs), "the merged model"))

    info = _info(loaded, "merged")
    info["check"] = check  # filled in by fill() before the info file is written
    files = _write(out, fill, info)
    return ExportResult(out, "merged", files, check)


def _export_hydralora(loaded: LoadedRun, out: Path) -> ExportResult:
    import importlib.util

    inputs = probe_inputs(loaded.tokenizer, loaded.config.train.max_length)
    reference = probe_logits(loaded.model, inputs)
    base = load_base(loaded.config, loaded.task, loaded.label_names).model
    _set_labels(base, loaded.label_names)
    check: dict[str, Any] = {}
    reason = loaded.adapter.unmergeable_reason

    def fill(tmp: Path) -> None:
        base.save_pretrained(str(tmp / "base"))
        loaded.tokenizer.save_pretrained(str(tmp / "base"))
        shutil.copytree(loaded.adapter_dir, tmp / "adapter")
        shutil.copy2(Path(__file__).with_name(LOADER_FILE), tmp / LOADER_FILE)
        (tmp / EXPORT_FILE).write_text(json.dumps({"task": loaded.task}), encoding="utf-8")  # for the loader
        spec = importlib.util.spec_from_file_location("_fimlora_export_check_loader", tmp / LOADER_FILE)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model, _ = module.load(tmp)
        check.update(_checked(reference, probe_logits(model, inputs), f"{LOADER_FILE}'s model"))

    info = _info(loaded, "adapter+loader")
    info.update(
        not_merged=reason,
        usage=LOADER_USAGE,
        check=check,
    )
    files = _write(out, fill, info)
    notes = [
        f"not merged: {reason}",
        "written instead: base/ (the base model and tokenizer), adapter/ (hydralora_config.json, "
        f"hydralora.safetensors) and {LOADER_FILE} (needs torch, transformers, safetensors; no fimlora, "
        "no PEFT)",
        f"load it with: {info['usage']}",
    ]
    return ExportResult(out, "adapter+loader", files, check, notes)


# --------------------------------------------------------------------------------------------------
# Adapter only
# --------------------------------------------------------------------------------------------------

_NO_ADAPTER_ONLY = {
    "delta-lora": "Delta-LoRA also moved the base weights W (adapter/delta_lora_drift.safetensors): the PEFT "
    "adapter alone is not the trained model. Export it merged (without --adapter-only).",
    "full": "full fine-tuning trains every weight and has no adapter. Export it merged (without "
    "--adapter-only).",
    "hydralora": "HydraLoRA is not a PEFT adapter type serving engines load. Export it without "
    "--adapter-only: "
    "that writes its adapter with a standalone loader.",
}


@torch.no_grad()
def fold_scalings(model: Any) -> dict[str, Any]:
    """Make every LoRA module of a PEFT LoRA model use one scaling ``s`` = what an engine computes from
    the config (``lora_alpha / r``, or ``/ √r`` with rsLoRA), without changing the function: each B is
    multiplied by ``s_i / s`` and ``alpha_pattern`` set so PEFT's scaling is ``s`` everywhere.

    Returns ``{"scaling": s, "folded_modules": n}`` (n = modules whose B changed)."""
    from peft.tuners.lora import LoraLayer

    config = model.peft_config["default"]
    root = model.get_base_model()
    target = config.lora_alpha / (math.sqrt(config.r) if config.use_rslora else config.r)
    alpha_pattern = dict(config.alpha_pattern or {})
    folded = 0
    for name, module in root.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        scaling = float(module.scaling["default"])
        rank = int(module.r["default"])
        if math.isclose(scaling, target, rel_tol=1e-12):
            continue
        weight: torch.Tensor = module.lora_B["default"].weight  # type: ignore[assignment]
        weight.mul_(scaling / target)
        module.scaling["default"] = target
        alpha_pattern[name] = target * (math.sqrt(rank) if config.use_rslora else rank)
        folded += 1
    config.alpha_pattern = alpha_pattern
    return {"scaling": target, "folded_modules": folded}


def label_settings(task: str, label_names: list[str] | None) -> dict[str, Any]:
    """What a classification adapter's base model must be built with (``task``, ``num_labels``,
    ``id2label``, ``label2id``): the adapter holds the trained head, sized for these classes, and
    ``from_pretrained`` without them builds a 2-class head the adapter does not fit."""
    out: dict[str, Any] = {"task": task}
    if task == "classification" and label_names:
        out.update(
            num_labels=len(label_names),
            id2label={str(i): name for i, name in enumerate(label_names)},
            label2id={name: i for i, name in enumerate(label_names)},
        )
    return out


def _serving_note(model: Any, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    config = model.peft_config["default"]
    peft_type = str(getattr(config.peft_type, "value", config.peft_type))
    ranks = [int(t.shape[0]) for k, t in tensors.items() if "lora_A" in k and t.dim() == 2]
    max_rank = max(ranks) if ranks else int(getattr(config, "r", 0))
    modules = sorted(
        {k.split(".lora_A")[0].removeprefix("base_model.model.") for k in tensors if "lora_A" in k}
    ) or sorted(config.target_modules or [])
    leaves = sorted({m.rsplit(".", 1)[-1] for m in modules})
    engine_rank = next((r for r in VLLM_MAX_LORA_RANKS if r >= max_rank), None)
    refusals = []
    if peft_type != "LORA":
        refusals.append(f"a {peft_type} adapter, not plain LoRA: LoRA serving engines do not load it")
    if getattr(config, "use_dora", False):
        refusals.append("DoRA: vLLM refuses DoRA adapters")
    if config.modules_to_save:
        refusals.append(
            f"modules_to_save {sorted(config.modules_to_save)} (the trained task head): vLLM refuses "
            "adapters with modules_to_save"
        )
    return {
        "peft_type": peft_type,
        "base_model_name_or_path": config.base_model_name_or_path,
        "max_rank": max_rank,
        "ranks": {"min": min(ranks), "max": max_rank, "modules": len(ranks)} if ranks else None,
        "vllm_max_lora_rank": engine_rank,
        "target_modules": leaves,
        "num_target_modules": len(modules),
        "use_rslora": bool(getattr(config, "use_rslora", False)),
        "engine_refusals": refusals,
    }


def _export_adapter(loaded: LoadedRun, out: Path) -> ExportResult:
    from peft import PeftModel
    from safetensors.torch import load_file

    if loaded.spec.adapter in _NO_ADAPTER_ONLY:
        raise FimloraError(f"--adapter-only: {_NO_ADAPTER_ONLY[loaded.spec.adapter]}")
    model = loaded.model
    if not isinstance(model, PeftModel):
        raise FimloraError(
            f"--adapter-only needs a PEFT adapter; {loaded.path} holds {type(model).__name__}."
        )
    inputs = probe_inputs(loaded.tokenizer, loaded.config.train.max_length)
    reference = probe_logits(model, inputs)
    config = model.peft_config["default"]
    folding = fold_scalings(model) if str(getattr(config.peft_type, "value", "")) == "LORA" else None
    check: dict[str, Any] = {}
    serving: dict[str, Any] = {}

    def fill(tmp: Path) -> None:
        model.save_pretrained(str(tmp / ADAPTER_DIR))
        tensors = load_file(str(tmp / ADAPTER_DIR / "adapter_model.safetensors"))
        serving.update(_serving_note(model, tensors))
        serving["scaling"] = (
            {**folding, "convention": "one scaling for every module; per-module scalings folded into B"}
            if folding is not None
            else None
        )
        serving.update(label_settings(loaded.task, loaded.label_names))
        (tmp / SERVING_FILE).write_text(json.dumps(serving, indent=2) + "\n", encoding="utf-8")
        fresh = load_base(loaded.config, loaded.task, loaded.label_names).model
        reloaded = PeftModel.from_pretrained(fresh, str(tmp / ADAPTER_DIR)).eval()
        check.update(
            _checked(reference, probe_logits(reloaded, inputs), "plain PEFT with the written adapter")
        )

    info = _info(loaded, "adapter")
    info["check"] = check
    files = _write(out, fill, info)
    notes = [
        f"largest rank {serving['max_rank']} (vLLM: --max-lora-rank {serving['vllm_max_lora_rank']} or more)",
        *(
            [
                f"{serving['num_labels']} classes ({', '.join(serving['label2id'])}): load the base with "
                f"num_labels/id2label/label2id from {SERVING_FILE} (docs/deployment.md)"
            ]
            if "num_labels" in serving
            else []
        ),
        f"target modules: {', '.join(serving['target_modules'])} ({serving['num_target_modules']} modules)",
    ]
    if folding is not None and folding["folded_modules"]:
        notes.append(
            f"{folding['folded_modules']} module scaling(s) folded into B: every module now uses "
            f"s = {folding['scaling']:g}, as engines that ignore rank_pattern/alpha_pattern apply"
        )
    notes += [f"serving engines refuse: {r}" for r in serving["engine_refusals"]]
    return ExportResult(out, "adapter", files, check, notes)
