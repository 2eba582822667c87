"""Memory, time and perplexity of training SmolLM2 on a float32, int8 or NF4 base (QLoRA), with and
without gradient checkpointing, for uniform LoRA and fim-lora.

Three kinds of cell, each in a FRESH subprocess (a process's peak RSS is a lifetime maximum, and freed
memory need not leave it: only a new process per cell measures that cell alone):

    fisher  <base>                          the Fisher pass (``estimate_fisher``, the experiment's
                                            calibration batches) on that base; writes its per-module
                                            scores, from which fim-lora's ranks on that base come
    step    <shape> <base> <checkpointing>   training steps of a PEFT LoRA model on that base: forward
            <method>                        (train mode) + backward + AdamW + zero_grad on real
                                            brown-fiction blocks of ``shape`` = batch × tokens (the
                                            config's 4 × 128, and 2 × 1024); lora = uniform rank r,
                                            fim-lora = the Fisher allocation at the same budget;
                                            checkpointing = the model's own non-reentrant activation
                                            checkpointing, as ``train.gradient_checkpointing: true``
                                            switches it on
    ppl     <base>                          ``fimlora``'s experiment of configs/smollm2-brown-fiction.yaml
                                            on that base (``quantization:``), the same short training for
                                            every base; held-out perplexity before and after, training
                                            wall time and peak memory as the run records them

Bases: ``float32`` (quantization: none), ``int8`` (LLM.int8()), ``nf4`` (NF4, double quantisation,
float32 compute); only the 210 linear layers of the transformer blocks are quantised.

Memory (see ``_common``): on CUDA the allocator's peak; on CPU the process RSS sampled every 1 ms, with
glibc returning every freed tensor to the OS while the cell runs (``rss_tracks_tensors``), so RSS
follows the live tensors. transformers memory-maps the checkpoint: float weights would stay file-backed
pages, and the pages a quantised load read would stay mapped and resident for as long as any tensor
(the float32 embeddings) views the file. So every cell copies the model's floating-point tensors into
process memory right after loading, which unmaps the file: RSS then holds each base's weights once, as
what they are (float32, int8 codes, NF4 codes). "peak" is the peak above what the fresh process held
before it loaded anything (interpreter and libraries): the model, the data and the step (or the pass)
itself. A step cell measures memory over its first ``--memory-steps`` steps (the first one allocates
AdamW's state), then times ``--steps`` more steps with glibc's default allocator settings; its time is
their median.

Targets (issue 12): NF4 training-step peak ≤ 0.5× float32's; checkpointing lowers the step's peak at
long sequences (on/off < 1); NF4 perplexity within 5 % of float32's after the same steps.

Usage: ``python benchmarks/memory.py [--quick] [--device cuda]`` (``make bench`` runs it).
Writes ``benchmarks/results/<device>-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-brown-fiction.yaml"
BASES = {"float32": "none", "int8": "int8", "nf4": "nf4"}
METHODS = ("lora", "fim-lora")
TARGET_NF4_PEAK = 0.5
TARGET_CHECKPOINTING = 1.0  # strictly below: checkpointing must lower the peak
TARGET_NF4_PERPLEXITY = 0.05
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument(
        "--shapes",
        nargs="+",
        default=["4x128", "2x1024"],
        help="training-step cells: batch x tokens (default: the config's 4x128, and a long 2x1024)",
    )
    p.add_argument("--memory-steps", type=int, default=2, help="steps whose peak memory is measured")
    p.add_argument("--steps", type=int, default=2, help="timed steps per step cell (median reported)")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument(
        "--fisher-examples",
        type=int,
        default=None,
        help="calibration examples of the Fisher cells (default: the config's); the peak depends on the "
        "batch, not on how many batches",
    )
    p.add_argument(
        "--ppl-steps", type=int, default=None, help="training steps of the ppl cells (default: the config's)"
    )
    p.add_argument("--ppl-methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0, help="the experiment's seed (data split, adapter init)")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: proves the script runs, measures nothing"
    )
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell (JSON spec)
    args = p.parse_args(argv)
    if args.quick:
        args.shapes, args.memory_steps, args.steps = ["1x64"], 2, 1
        args.ppl_steps, args.ppl_methods = 2, ["lora"]
    try:
        args.shapes = [tuple(int(x) for x in shape.lower().split("x")) for shape in args.shapes]
    except ValueError:
        p.error("--shapes takes BATCHxTOKENS values, e.g. 4x128")
    if any(len(shape) != 2 or min(shape) < 1 for shape in args.shapes):
        p.error("--shapes takes BATCHxTOKENS values of positive integers, e.g. 4x128")
    if min(args.memory_steps, args.steps) < 1:
        p.error("--memory-steps and --steps must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Inside a cell's subprocess
# ------------------------------------------------------------------------------------------------


def experiment_config(spec: dict[str, Any], output_dir: Path, methods: list[str], **train: Any) -> Any:
    """configs/smollm2-brown-fiction.yaml on ``spec``'s base; ``--quick`` shrinks every size."""
    from fimlora.config import load_config

    config = load_config(
        CONFIG,
        {
            "quantization": BASES[spec["base"]],
            "output_dir": str(output_dir),
            "methods": methods,
            "seed": spec["seed"],
        },
    )
    fisher: dict[str, Any] = {}
    if spec.get("fisher_examples"):
        fisher["num_examples"] = spec["fisher_examples"]
    train_updates: dict[str, Any] = {"report_to": [], **train}
    if spec["quick"]:
        fisher = {"num_examples": 4, "batch_size": 2}
        train_updates.setdefault("max_length", 64)
        train_updates.update(eval_examples=4, eval_batch_size=4, batch_size=2)
    return config.model_copy(
        update={
            "fisher": config.fisher.model_copy(update=fisher),
            "train": config.train.model_copy(update=train_updates),
            # Only the held-out perplexity counts here; inference timing and forgetting are another
            # benchmark's (inference.py) and would only add minutes per cell.
            "evaluate": config.evaluate.model_copy(
                update={"inference": False, "prompts": [], "forgetting_dataset": None}
            ),
        }
    )


def _start_bytes(device: Any) -> int:
    import torch

    return int(torch.cuda.memory_allocated(device)) if device.type == "cuda" else common.rss_bytes()


def _in_process_memory(model: Any) -> None:
    """Copy every floating-point parameter and buffer out of the memory-mapped checkpoint (see above).

    Quantised codes were created at load time and are process memory already. A tied weight is one
    Parameter, so it is copied once.
    """
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.is_floating_point():
                param.data = param.data.clone()
        for module in model.modules():
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer is not None and buffer.is_floating_point():
                    module._buffers[name] = buffer.clone()


def _on_device(model: Any, device: Any) -> Any:
    # fimlora loads a float32 model on the CPU (the Trainer moves it); a quantised one sits on the GPU.
    return model.to(device) if device.type == "cuda" and next(model.parameters()).device != device else model


def fisher_cell(spec: dict[str, Any], device: Any) -> dict[str, Any]:
    from fimlora.experiment import calibration_loader, prepare
    from fimlora.fisher import estimate_fisher

    start = _start_bytes(device)
    with tempfile.TemporaryDirectory() as tmp, common.rss_tracks_tensors():
        config = experiment_config(spec, Path(tmp), ["fim-lora"])
        prepared = prepare(config)
        _in_process_memory(prepared.loaded.model)
        model = _on_device(prepared.loaded.model, device)
        loaded = _start_bytes(device)
        with common.PeakMemoryDelta(device) as memory:
            result = estimate_fisher(
                model,
                calibration_loader(prepared),
                target_modules=prepared.targets,
                estimator=config.fisher.estimator,
                seed=config.seed,
                progress=False,
            )
    scores = result.scores(config.fisher.aggregation)
    Path(spec["scores_path"]).write_text(json.dumps(scores))
    return {
        "start_bytes": start,
        "loaded_bytes": loaded,
        "peak_bytes": memory.peak_bytes,
        "peak_above_start_bytes": memory.peak_bytes - start,
        "pass_bytes": memory.delta_bytes,
        "num_examples": result.num_examples,
        "batch_size": config.fisher.batch_size,
        "max_length": config.train.max_length,
    }


def step_cell(spec: dict[str, Any], device: Any) -> dict[str, Any]:
    import torch

    from fimlora.allocation import allocate_ranks
    from fimlora.experiment import lora_config_for, prepare
    from fimlora.train import build_peft_model

    start = _start_bytes(device)
    with tempfile.TemporaryDirectory() as tmp, common.rss_tracks_tensors():
        config = experiment_config(spec, Path(tmp), [spec["method"]], max_length=spec["seq_len"])
        prepared = prepare(config)
        _in_process_memory(prepared.loaded.model)
        settings = config.allocation
        scores = json.loads(Path(spec["scores_path"]).read_text()) if spec["method"] == "fim-lora" else None
        allocation = allocate_ranks(
            scores,
            prepared.shapes,
            budget=prepared.budget,
            strategy="proportional" if scores is not None else "uniform",
            r_min=settings.r_min,
            r_max=settings.r_max,
            tau=settings.tau,
        )
        # No deep copy (fimlora gives each method one): a second model would be measured too.
        model = build_peft_model(
            prepared.loaded.model, lora_config_for(prepared, allocation), seed=config.seed
        )
        model = _on_device(model, device)
        if spec["checkpointing"]:
            # What Trainer does for train.gradient_checkpointing: true (fimlora.train).
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        model.train()
        optimizer = torch.optim.AdamW(
            [p for p in model.parameters() if p.requires_grad], lr=spec["learning_rate"]
        )
        train = prepared.tokenized["train"]
        needed = spec["batch_size"] * (spec["memory_steps"] + spec["steps"])
        if len(train) < spec["batch_size"]:
            raise SystemExit(f"only {len(train)} blocks of {spec['seq_len']} tokens in the training split")
        rows = [train[i % len(train)] for i in range(needed)]
        batches = [
            {k: v.to(device) for k, v in prepared.collator(rows[i : i + spec["batch_size"]]).items()}
            for i in range(0, needed, spec["batch_size"])
        ]

        def step(batch: dict[str, Any]) -> None:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        loaded = _start_bytes(device)
        with common.PeakMemoryDelta(device) as memory:
            for batch in batches[: spec["memory_steps"]]:
                step(batch)
    walls, cpus = [], []
    for batch in batches[spec["memory_steps"] :]:
        wall, cpu = common.timed(lambda b=batch: step(b), device)
        walls.append(wall)
        cpus.append(cpu)
    ranks = list(allocation.ranks.values())
    return {
        "start_bytes": start,
        "loaded_bytes": loaded,
        "peak_bytes": memory.peak_bytes,
        "peak_above_start_bytes": memory.peak_bytes - start,
        "step_times_s": walls,
        "step_cpu_times_s": cpus,
        "median_step_s": common.median(walls),
        "median_step_cpu_s": common.median(cpus),
        "adapter_params": allocation.num_params,
        "budget": prepared.budget,
        "ranks": {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)},
    }


def ppl_cell(spec: dict[str, Any], device: Any) -> dict[str, Any]:
    from fimlora.evaluate import evaluate
    from fimlora.experiment import run_experiment

    with tempfile.TemporaryDirectory() as tmp:
        train: dict[str, Any] = {} if spec["ppl_steps"] is None else {"steps": spec["ppl_steps"]}
        config = experiment_config(spec, Path(tmp), spec["ppl_methods"], **train)
        prepared, results = run_experiment(config, progress=False, log=lambda _: None)
        settings = config.train
        eval_data = prepared.tokenized[settings.eval_split]
        if settings.eval_examples is not None:  # the subset every run evaluated (experiment.run_method)
            eval_data = eval_data.shuffle(seed=config.seed).select(
                range(min(settings.eval_examples, len(eval_data)))
            )
        before = evaluate(
            prepared.loaded.model,
            eval_data,
            prepared.collator,
            prepared.data.task,
            batch_size=settings.eval_batch_size,
            progress=False,
        )
    return {
        "steps": settings.steps,
        "batch_size": settings.batch_size,
        "max_length": settings.max_length,
        "eval_tokens": before["num_tokens"],
        "untrained_perplexity": before["perplexity"],
        "methods": {
            r["method"]: {
                "perplexity": r["metrics"]["perplexity"],
                "train_wall_s": r["train"]["wall_time_s"],
                "train_peak_bytes": r["train"]["peak_memory_bytes"],
                "train_peak_kind": r["train"]["peak_memory_kind"],
                "quantization": r["quantization"],
            }
            for r in results
        },
    }


def run_cell(spec: dict[str, Any]) -> int:
    common.set_threads(spec["threads"])
    device = common.torch_device(spec["device"])
    if device is None:
        return 2
    cell = {"fisher": fisher_cell, "step": step_cell, "ppl": ppl_cell}[spec["kind"]]
    result = cell(spec, device)
    Path(spec["result_path"]).write_text(json.dumps(result))
    return 0


# ------------------------------------------------------------------------------------------------
# The driver: one subprocess per cell, then the ratios
# ------------------------------------------------------------------------------------------------


def launch(spec: dict[str, Any], work: Path, label: str) -> dict[str, Any]:
    """Run one cell in a fresh interpreter; its result, or ``{"error": …}`` when it failed."""
    result_path = work / f"{common.slug(label)}.json"
    spec = {**spec, "result_path": str(result_path)}
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--cell", json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not result_path.is_file():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        print(f"  {label}: FAILED (exit {proc.returncode}) after {wall:.0f} s", flush=True)
        for line in tail:
            print(f"    {line}", flush=True)
        return {"error": "\n".join(tail), "cell_wall_s": wall}
    result = json.loads(result_path.read_text())
    result["cell_wall_s"] = wall
    print(f"  {label}: done in {wall:.0f} s", flush=True)
    return result


def _ratio(a: Any, b: Any) -> float | None:
    return a / b if isinstance(a, int | float) and isinstance(b, int | float) and b else None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell is not None:
        return run_cell(json.loads(args.cell))
    common.set_threads(args.threads)
    device = common.torch_device(args.device)
    if device is None:
        return 2
    env = common.environment(device, args.threads)
    print(
        f"# Quantised-base memory benchmark on {env['device']} (load average {env['load_average_at_start']})"
    )
    started = time.perf_counter()
    shared = {
        "device": args.device,
        "threads": args.threads,
        "seed": args.seed,
        "quick": args.quick,
        "learning_rate": args.learning_rate,
        "ppl_steps": args.ppl_steps,
        "ppl_methods": args.ppl_methods,
        "fisher_examples": args.fisher_examples,
    }
    fisher: dict[str, Any] = {}
    steps: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}  # shape → base → checkpointing → method
    perplexity: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fimlora-memory-bench-") as tmp:
        work = Path(tmp)
        for base in args.bases:
            scores = work / f"scores-{base}.json"
            fisher[base] = launch(
                {**shared, "kind": "fisher", "base": base, "scores_path": str(scores)}, work, f"fisher {base}"
            )
            for batch_size, seq_len in args.shapes:
                shape = f"{batch_size}x{seq_len}"
                for checkpointing in (False, True):
                    key = "on" if checkpointing else "off"
                    cells = steps.setdefault(shape, {}).setdefault(base, {}).setdefault(key, {})
                    for method in args.methods:
                        if method == "fim-lora" and "error" in fisher[base]:
                            cells[method] = {"error": "no Fisher"}
                            continue
                        spec = {
                            **shared,
                            "kind": "step",
                            "base": base,
                            "checkpointing": checkpointing,
                            "method": method,
                            "scores_path": str(scores),
                            "batch_size": batch_size,
                            "seq_len": seq_len,
                            "memory_steps": args.memory_steps,
                            "steps": args.steps,
                        }
                        label = f"step {shape} {base} checkpointing {key} {method}"
                        cells[method] = launch(spec, work, label)
            perplexity[base] = launch({**shared, "kind": "ppl", "base": base}, work, f"ppl {base}")
    report = {
        "environment": env,
        "settings": common.settings_of(args, skip=("cell",))
        | {"shapes": [f"{b}x{t}" for b, t in args.shapes]},
        "targets": {
            "nf4_step_peak_over_float32": TARGET_NF4_PEAK,
            "checkpointing_on_over_off": f"< {TARGET_CHECKPOINTING}",
            "nf4_perplexity_relative_difference": TARGET_NF4_PERPLEXITY,
        },
        "fisher": fisher,
        "steps": steps,
        "perplexity": perplexity,
        "ratios": ratios(fisher, steps, perplexity),
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    markdown = render(report)
    print(markdown)
    common.write_results(args, device, "memory", report, markdown)
    failed = [c for c in [*fisher.values(), *perplexity.values()] if "error" in c] + [
        c
        for by_base in steps.values()
        for by_key in by_base.values()
        for by_method in by_key.values()
        for c in by_method.values()
        if "error" in c
    ]
    return 1 if failed else 0


def ratios(fisher: dict, steps: dict, perplexity: dict) -> dict[str, Any]:
    """Every ratio the targets are about, next to float32 (or checkpointing off) of the same cell."""
    out: dict[str, Any] = {
        "step_peak_vs_float32": {},
        "step_time_vs_float32": {},
        "checkpointing_on_vs_off": {},
    }
    for shape, by_base in steps.items():
        reference = by_base.get("float32", {})
        for base, by_key in by_base.items():
            for key, by_method in by_key.items():
                for method, cell in by_method.items():
                    ref = reference.get(key, {}).get(method, {})
                    name = f"{shape}/{base}/checkpointing {key}/{method}"
                    out["step_peak_vs_float32"][name] = _ratio(
                        cell.get("peak_above_start_bytes"), ref.get("peak_above_start_bytes")
                    )
                    out["step_time_vs_float32"][name] = _ratio(
                        cell.get("median_step_s"), ref.get("median_step_s")
                    )
            for method in by_key.get("on", {}):
                on, off = by_key["on"][method], by_key.get("off", {}).get(method, {})
                out["checkpointing_on_vs_off"][f"{shape}/{base}/{method}"] = {
                    "peak": _ratio(on.get("peak_above_start_bytes"), off.get("peak_above_start_bytes")),
                    "time": _ratio(on.get("median_step_s"), off.get("median_step_s")),
                }
    out["fisher_peak_vs_float32"] = {
        base: _ratio(
            cell.get("peak_above_start_bytes"), fisher.get("float32", {}).get("peak_above_start_bytes")
        )
        for base, cell in fisher.items()
    }
    out["perplexity_vs_float32"] = {}
    reference_ppl = perplexity.get("float32", {}).get("methods", {})
    for base, cell in perplexity.items():
        for method, run in cell.get("methods", {}).items():
            ratio = _ratio(run["perplexity"], reference_ppl.get(method, {}).get("perplexity"))
            out["perplexity_vs_float32"][f"{base}/{method}"] = ratio
    return out


def _mib(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{value / MIB:,.0f}"


def _pass(ok: bool | None, text: str) -> str:
    return text if ok is None else f"{text} {'PASS' if ok else 'MISS'}"


def render(report: dict[str, Any]) -> str:
    env, s, r = report["environment"], report["settings"], report["ratios"]
    lines = [
        f"# Quantised-base memory benchmark on {env['device']}",
        "",
        f"Measured {env['started']}; torch {env['torch']}, transformers {env['transformers']}, peft "
        f"{env['peft']}; git {env['git_revision']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}."
        + (" **--quick: tiny sizes, the numbers mean nothing.**" if s["quick"] else ""),
        "",
        "## Training step: SmolLM2",
        "",
        "Loaded = memory above the fresh process's own before loading, once model, adapter and batches "
        "are ready; peak = the same during the "
        f"first {s['memory_steps']} step(s) (AdamW's state included); time = median of {s['steps']} "
        "further step(s).",
        "",
    ]
    header = [
        "batch × tokens",
        "base",
        "checkpointing",
        "method",
        "adapter params",
        "loaded (MiB)",
        "peak (MiB)",
        f"peak vs float32 (nf4 ≤{TARGET_NF4_PEAK}×)",
        "step (s, wall)",
        "step vs float32",
    ]
    rows = []
    for shape, by_base in report["steps"].items():
        for base, by_key in by_base.items():
            for key, by_method in by_key.items():
                for method, cell in by_method.items():
                    if "error" in cell:
                        rows.append([shape, base, key, method, "failed", "—", "—", "—", "—", "—"])
                        continue
                    name = f"{shape}/{base}/checkpointing {key}/{method}"
                    peak_ratio = r["step_peak_vs_float32"].get(name)
                    ratio_text = common.ratio_text(peak_ratio)
                    if base == "nf4" and peak_ratio is not None:
                        ratio_text = common.verdict(peak_ratio, TARGET_NF4_PEAK)
                    rows.append(
                        [
                            shape.replace("x", " × "),
                            base,
                            key,
                            method,
                            f"{cell['adapter_params']:,}",
                            _mib(cell["loaded_bytes"] - cell["start_bytes"]),
                            _mib(cell["peak_above_start_bytes"]),
                            ratio_text,
                            f"{cell['median_step_s']:.2f}",
                            common.ratio_text(r["step_time_vs_float32"].get(name)),
                        ]
                    )
    lines += [common.markdown_table(header, rows), ""]
    rows = []
    for name, pair in r["checkpointing_on_vs_off"].items():
        peak = pair["peak"]
        ok = None if peak is None else peak < TARGET_CHECKPOINTING
        rows.append([name, _pass(ok, common.ratio_text(peak)), common.ratio_text(pair["time"])])
    lines += [
        "Checkpointing on vs off (same base, method and sizes):",
        "",
        common.markdown_table(["shape/base/method", "peak on/off (< 1×)", "step time on/off"], rows),
        "",
        "## Fisher pass",
        "",
    ]
    rows = []
    for base, cell in report["fisher"].items():
        if "error" in cell:
            rows.append([base, "failed", "—", "—", "—"])
            continue
        rows.append(
            [
                base,
                f"{cell['num_examples']} × {cell['max_length']} (batch {cell['batch_size']})",
                _mib(cell["peak_above_start_bytes"]),
                _mib(cell["pass_bytes"]),
                common.ratio_text(r["fisher_peak_vs_float32"].get(base)),
            ]
        )
    lines += [
        common.markdown_table(
            ["base", "examples × tokens", "peak (MiB)", "of which the pass (MiB)", "peak vs float32"], rows
        ),
        "",
        "## Perplexity after the same short training (configs/smollm2-brown-fiction.yaml, per base)",
        "",
    ]
    rows = []
    for base, cell in report["perplexity"].items():
        if "error" in cell:
            rows.append([base, "failed", "—", "—", "—", "—", "—", "—"])
            continue
        for method, run in cell["methods"].items():
            ratio = r["perplexity_vs_float32"].get(f"{base}/{method}")
            text = common.ratio_text(ratio)
            if base == "nf4" and ratio is not None:
                text = _pass(abs(ratio - 1) <= TARGET_NF4_PERPLEXITY, text)
            rows.append(
                [
                    base,
                    method,
                    f"{cell['steps']} × {cell['batch_size']} × {cell['max_length']}",
                    f"{cell['untrained_perplexity']:.2f}",
                    f"{run['perplexity']:.2f}",
                    text,
                    f"{run['train_wall_s']:.0f}",
                    _mib(run["train_peak_bytes"]),
                ]
            )
    header = [
        "base",
        "method",
        "steps × batch × tokens",
        "ppl before",
        "ppl after",
        f"vs float32 (nf4 within {TARGET_NF4_PERPLEXITY:.0%})",
        "train (s)",
        "train peak RSS (MiB)",
    ]
    lines += [common.markdown_table(header, rows), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
