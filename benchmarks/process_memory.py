"""Peak memory of a whole ``fimlora run``, and of each of its phases, on a float32, int8 or NF4 base.

What a user who turns on quantisation because a float32 run does not fit needs to know: the peak RSS
of the whole process, across loading, the Fisher pass, training and evaluation. Every cell is
``fimlora run`` (the CLI's own entry point, in process) on one experiment config, in a FRESH
subprocess (a process's peak RSS is a lifetime maximum), with the allocator settings the command itself
makes (:mod:`fimlora.glibc_malloc`: what a user gets). A thread samples RSS every millisecond and
attributes each sample to the phase that runs:

    load       ``prepare``: data, tokenisation, tokenizer and model (quantised as it is read)
    fisher     ``calibrate``: the Fisher pass fim-lora allocates from (per-module traces; with
               checkpointing, one example per backward pass)
    build      ``build_method``: the method's copy of the base, the PEFT adapter, the optimizer
    train      ``train``: the training steps (Trainer), gradient checkpointing as the cell says
    evaluate   ``evaluate``: held-out perplexity of the trained model
    records    ``deployment_records``: the base's and the trained model's loss on general text
    other      everything else (imports, allocation, saving the adapter, the results table)

Models:

    smollm2    SmolLM2-135M (the built-in asset), configs/smollm2-brown-fiction.yaml
    llama-1b   a Llama of Llama-3.2-1B's shape (16 blocks of width 2048, MLP 8192, 32 heads and 8 KV
               heads, a tied 128,256-token vocabulary: 1.24 B parameters, 4.9 GB in float32) with random
               weights, written as float32 safetensors on the fly (SmolLM2's tokenizer: its ids are
               valid for the larger vocabulary); the same config, at smaller sizes (CPU time)

Bases: ``float32`` (quantization: none), ``int8`` (LLM.int8()), ``nf4`` (NF4, double quantisation,
float32 compute); checkpointing off and on (``train.gradient_checkpointing``). Method: fim-lora (uses
the Fisher pass), rank pattern from the per-module Fisher traces at the budget of uniform rank 4.
Inference timing and prompt continuations are off (benchmarks/inference.py measures inference): the
run trains, evaluates and measures forgetting on general text.

Target (issue 18): process peak RSS of NF4 over float32 (same config, gradient checkpointing on in
both) ≤ 0.6× on SmolLM2 and ≤ 0.4× on the 1B model, the Fisher pass included. Each cell says which phase
holds its peak, the level at that phase's start (what the process already held) and its rise.

Usage: ``python benchmarks/process_memory.py [--models smollm2 llama-1b] [--quick]``.
Writes ``benchmarks/results/<device>-process-memory.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "smollm2-brown-fiction.yaml"
BASES = {"float32": "none", "int8": "int8", "nf4": "nf4"}
MODELS = ("smollm2", "llama-1b")
TARGETS = {"smollm2": 0.6, "llama-1b": 0.4}
PHASES = ("load", "fisher", "build", "train", "evaluate", "records", "other")
# fimlora.experiment's functions, each the start of a phase (a call inside another phase is its own).
PHASE_FUNCTIONS = {
    "prepare": "load",
    "calibrate": "fisher",
    "build_method": "build",
    "train": "train",
    "evaluate": "evaluate",
    "deployment_records": "records",
}
# Llama-3.2-1B's shape (its config.json), random weights.
LLAMA_1B = {
    "vocab_size": 128256,
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
# --quick: a small model of the same kind, so the script runs end to end in minutes.
LLAMA_QUICK = {**LLAMA_1B, "hidden_size": 256, "intermediate_size": 1024, "num_hidden_layers": 2}
# Lines bitsandbytes prints when its CPU kernel lookup or import is not kept quiet (issue 18).
BNB_MESSAGES = ("bitsandbytes", "kernels-community", "publisher trust", "gemm_4bit")
MIB = 2**20


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--bases", nargs="+", default=list(BASES), choices=list(BASES))
    p.add_argument("--checkpointing", nargs="+", default=["off", "on"], choices=["off", "on"])
    p.add_argument(
        "--synthetic-dir",
        type=Path,
        default=None,
        help="where the synthetic Llama is written (kept; reused when its config matches); default: a "
        "temporary directory, removed at the end",
    )
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--interval-ms", type=float, default=1.0, help="RSS sampling interval")
    p.add_argument(
        "--quick", action="store_true", help="tiny sizes: proves the script runs, measures nothing"
    )
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    p.add_argument("--device", default="cpu", help=argparse.SUPPRESS)  # CPU RSS is what is measured
    p.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell (JSON spec)
    p.add_argument("--write-synthetic", default=None, help=argparse.SUPPRESS)  # internal: JSON spec
    return p.parse_args(argv)


# ------------------------------------------------------------------------------------------------
# The experiment each cell runs
# ------------------------------------------------------------------------------------------------


def experiment(model: str, source: str, base: str, checkpointing: bool, quick: bool, seed: int) -> dict:
    """The config ``fimlora run`` gets: configs/smollm2-brown-fiction.yaml, fim-lora, small sizes."""
    import yaml

    config = yaml.safe_load(CONFIG.read_text())
    small = quick or model == "llama-1b"  # 1B cells: minutes of CPU each even so
    fisher = {"num_examples": 4, "batch_size": 2} if small else {"num_examples": 16, "batch_size": 4}
    train = (
        {"steps": 1, "batch_size": 2, "max_length": 64}
        if small
        else {"steps": 2, "batch_size": 4, "max_length": 128}
    )
    config.update(
        {
            "model": source,
            "methods": ["fim-lora"],
            "seed": seed,
            "quantization": BASES[base],
            "fisher": {**config["fisher"], **fisher},
            "train": {
                **config["train"],
                **train,
                "gradient_checkpointing": checkpointing,
                "eval_examples": 4 if small else 16,
                "eval_batch_size": 4 if small else 8,
                "report_to": [],
            },
            "evaluate": {
                "inference": False,
                "prompts": [],
                "forgetting_blocks": 4 if small else 16,
            },
        }
    )
    return config


# ------------------------------------------------------------------------------------------------
# Inside a cell's subprocess
# ------------------------------------------------------------------------------------------------


class PhaseSampler:
    """Samples this process's RSS every ``interval_s`` and keeps, per phase, its peak and entry level."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.stack = ["other"]
        self.peaks: dict[str, int] = {}
        self.entries: dict[str, list[int]] = {}
        self.peak_entry: dict[str, int] = {}  # the entry level of the call that reached the phase's peak
        self._entry_of_current: list[int] = [common.rss_bytes()]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _record(self, rss: int) -> None:
        phase = self.stack[-1]
        if rss > self.peaks.get(phase, 0):
            self.peaks[phase] = rss
            self.peak_entry[phase] = self._entry_of_current[-1]

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._record(common.rss_bytes())

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._record(common.rss_bytes())

    def wrap(self, fn: Callable[..., Any], phase: str) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            self._record(common.rss_bytes())
            entry = common.rss_bytes()
            self.entries.setdefault(phase, []).append(entry)
            self.stack.append(phase)
            self._entry_of_current.append(entry)
            try:
                return fn(*args, **kwargs)
            finally:
                self._record(common.rss_bytes())
                self.stack.pop()
                self._entry_of_current.pop()

        return wrapped


def run_cell(spec: dict[str, Any]) -> int:
    common.set_threads(spec["threads"])
    from fimlora import lazy_bitsandbytes

    lazy_bitsandbytes.defer()  # as the fimlora command does first: bitsandbytes only for a quantised run
    import fimlora.experiment as pipeline
    from fimlora.cli import main as fimlora_main

    sampler = PhaseSampler(spec["interval_ms"] / 1000)
    for name, phase in PHASE_FUNCTIONS.items():
        setattr(pipeline, name, sampler.wrap(getattr(pipeline, name), phase))
    import yaml

    work = Path(spec["work_dir"])
    config_path = work / "config.yaml"
    config = experiment(
        spec["model"], spec["source"], spec["base"], spec["checkpointing"], spec["quick"], spec["seed"]
    )
    config["output_dir"] = str(work / "run")
    config_path.write_text(yaml.safe_dump(config))
    before = common.rss_bytes()  # the interpreter and fimlora's imports, before the run
    sampler.start()
    started = time.perf_counter()
    try:
        fimlora_main(["run", str(config_path), "--no-progress"])
    except SystemExit as exc:  # the CLI exits 0 after a run (click's standalone mode)
        if exc.code not in (0, None):
            raise
    wall = time.perf_counter() - started
    sampler.stop()
    result = json.loads((work / "run" / "fim-lora" / "result.json").read_text())
    out = {
        "before_run_bytes": before,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "sampled_peak_bytes": max(sampler.peaks.values()),
        "phase_peak_bytes": sampler.peaks,
        "phase_entry_bytes": sampler.entries,
        "phase_peak_entry_bytes": sampler.peak_entry,
        "run_wall_s": wall,
        "perplexity": result["metrics"]["perplexity"],
        "train_peak_bytes": result["train"]["peak_memory_bytes"],
        "config": config,
    }
    Path(spec["result_path"]).write_text(json.dumps(out))
    return 0


def write_synthetic(spec: dict[str, Any]) -> int:
    """A Llama of ``spec["dims"]`` with random weights, float32 safetensors, and SmolLM2's tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from fimlora.assets import smollm2_path

    common.set_threads(spec["threads"])
    directory = Path(spec["directory"])
    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_path()))
    config = LlamaConfig(
        **spec["dims"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype="float32",
    )
    torch.manual_seed(spec["seed"])
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / "fimlora-synthetic.json").write_text(json.dumps(spec["dims"], sort_keys=True))
    return 0


# ------------------------------------------------------------------------------------------------
# The driver: the synthetic model once, one subprocess per cell, then the ratios
# ------------------------------------------------------------------------------------------------


def _subprocess(flag: str, spec: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), flag, json.dumps(spec)],
        capture_output=True,
        text=True,
        env={**os.environ, "TOKENIZERS_PARALLELISM": "false"},
    )


def synthetic_model(directory: Path, dims: dict[str, Any], args: argparse.Namespace) -> Path:
    marker = directory / "fimlora-synthetic.json"
    if marker.is_file() and json.loads(marker.read_text()) == dims:
        print(f"synthetic Llama reused from {directory}", flush=True)
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    spec = {"directory": str(directory), "dims": dims, "seed": args.seed, "threads": args.threads}
    proc = _subprocess("--write-synthetic", spec)
    if proc.returncode != 0:
        raise SystemExit(f"writing the synthetic Llama failed:\n{proc.stderr[-2000:]}")
    size = sum(f.stat().st_size for f in directory.glob("*.safetensors"))
    print(
        f"synthetic Llama written to {directory} ({size / 2**30:.2f} GiB, "
        f"{time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return directory


def launch(spec: dict[str, Any], label: str) -> dict[str, Any]:
    """One cell in a fresh interpreter; its result, or ``{"error": …}`` when it failed."""
    with tempfile.TemporaryDirectory(prefix="fimlora-process-memory-") as tmp:
        spec = {**spec, "work_dir": tmp, "result_path": str(Path(tmp) / "cell.json")}
        started = time.perf_counter()
        proc = _subprocess("--cell", spec)
        wall = time.perf_counter() - started
        output = (proc.stdout or "") + (proc.stderr or "")
        bnb_lines = [line for line in output.splitlines() if any(m in line for m in BNB_MESSAGES)]
        if proc.returncode != 0 or not Path(spec["result_path"]).is_file():
            tail = output.strip().splitlines()[-8:]
            print(f"  {label}: FAILED (exit {proc.returncode}) after {wall:.0f} s", flush=True)
            for line in tail:
                print(f"    {line}", flush=True)
            return {"error": "\n".join(tail), "cell_wall_s": wall}
        result = json.loads(Path(spec["result_path"]).read_text())
    result.update(cell_wall_s=wall, bitsandbytes_lines=bnb_lines)
    print(
        f"  {label}: peak {result['process_peak_bytes'] / MIB:,.0f} MiB in {peak_phase(result)}, "
        f"{wall:.0f} s",
        flush=True,
    )
    return result


def peak_phase(cell: dict[str, Any]) -> str:
    peaks = cell["phase_peak_bytes"]
    return max(peaks, key=lambda phase: peaks[phase])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cell is not None:
        return run_cell(json.loads(args.cell))
    if args.write_synthetic is not None:
        return write_synthetic(json.loads(args.write_synthetic))
    common.set_threads(args.threads)
    device = common.torch_device("cpu")
    assert device is not None
    env = common.environment(device, args.threads)
    print(f"# Whole-process memory of fimlora run on {env['device']} (load {env['load_average_at_start']})")
    started = time.perf_counter()
    cells: dict[str, dict[str, dict[str, Any]]] = {}  # model → "base/checkpointing" → cell
    sources: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="fimlora-synthetic-") as tmp:
        for model in args.models:
            if model == "llama-1b":
                dims = LLAMA_QUICK if args.quick else LLAMA_1B
                directory = args.synthetic_dir or Path(tmp) / "llama"
                sources[model] = str(synthetic_model(directory, dims, args))
            else:
                sources[model] = model
            for base in args.bases:
                for key in args.checkpointing:
                    spec = {
                        "model": model,
                        "source": sources[model],
                        "base": base,
                        "checkpointing": key == "on",
                        "quick": args.quick,
                        "seed": args.seed,
                        "threads": args.threads,
                        "interval_ms": args.interval_ms,
                    }
                    label = f"{model} {base} checkpointing {key}"
                    cells.setdefault(model, {})[f"{base}/{key}"] = launch(spec, label)
    report = {
        "environment": env,
        "settings": common.settings_of(args, skip=("cell", "write_synthetic", "device")),
        "models": {"llama-1b": LLAMA_QUICK if args.quick else LLAMA_1B},
        "targets": {f"{m}: nf4/float32 process peak, checkpointing on": t for m, t in TARGETS.items()},
        "cells": cells,
        "ratios": ratios(cells),
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    markdown = render(report)
    print(markdown)
    common.write_results(args, device, "process-memory", report, markdown)
    failed = [c for by_key in cells.values() for c in by_key.values() if "error" in c]
    return 1 if failed else 0


def ratios(cells: dict[str, dict[str, dict[str, Any]]]) -> dict[str, dict[str, float | None]]:
    """Each cell's process peak over float32's with the same checkpointing setting."""
    out: dict[str, dict[str, float | None]] = {}
    for model, by_key in cells.items():
        for key, cell in by_key.items():
            reference = by_key.get("float32/" + key.split("/")[1], {})
            a, b = cell.get("process_peak_bytes"), reference.get("process_peak_bytes")
            out.setdefault(model, {})[key] = a / b if a and b else None
    return out


def _mib(value: Any) -> str:
    return "—" if not isinstance(value, int | float) else f"{value / MIB:,.0f}"


def render(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    lines = [
        f"# Whole-process memory of `fimlora run` on {env['device']}",
        "",
        f"Measured {env['started']}; torch {env['torch']}, transformers {env['transformers']}, peft "
        f"{env['peft']}; git {env['git_revision']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}."
        + (" **--quick: tiny sizes, the numbers mean nothing.**" if s["quick"] else ""),
        "",
        "Process peak = the cell process's `ru_maxrss` (everything: interpreter, libraries, data, model, "
        "every phase). Phase columns: the peak RSS sampled while that phase ran (absolute, MiB); "
        "before run = RSS once Python and fimlora are imported, before `fimlora run` starts.",
        "",
    ]
    for model, by_key in report["cells"].items():
        target = TARGETS[model]
        example = next((c for c in by_key.values() if "config" in c), None)
        if example is not None:
            c = example["config"]
            lines += [
                f"## {model}",
                "",
                f"fim-lora; Fisher on {c['fisher']['num_examples']} examples (batch "
                f"{c['fisher']['batch_size']}); {c['train']['steps']} training step(s) of "
                f"{c['train']['batch_size']} × {c['train']['max_length']} tokens; "
                f"{c['train']['eval_examples']} evaluation examples; "
                f"{c['evaluate']['forgetting_blocks']} general-text blocks.",
                "",
            ]
        header = [
            "base",
            "checkpointing",
            "process peak (MiB)",
            f"vs float32 (nf4, on: ≤{target}×)",
            "peak in",
            "before run",
            *PHASES[:-1],
            "bitsandbytes lines",
            "cell (s)",
        ]
        rows = []
        for key, cell in by_key.items():
            base, ckpt = key.split("/")
            if "error" in cell:
                rows.append([base, ckpt, "failed", *["—"] * (len(header) - 3)])
                continue
            ratio = report["ratios"][model].get(key)
            text = common.ratio_text(ratio)
            if base == "nf4" and ckpt == "on" and ratio is not None:
                text = common.verdict(ratio, target)
            peaks = cell["phase_peak_bytes"]
            rows.append(
                [
                    base,
                    ckpt,
                    _mib(cell["process_peak_bytes"]),
                    text,
                    peak_phase(cell),
                    _mib(cell["before_run_bytes"]),
                    *[_mib(peaks.get(phase)) for phase in PHASES[:-1]],
                    str(len(cell["bitsandbytes_lines"])),
                    f"{cell['cell_wall_s']:.0f}",
                ]
            )
        lines += [common.markdown_table(header, rows), ""]
        lines += ["Where each cell's peak is: the phase, what the process held when it began, its rise.", ""]
        for key, cell in by_key.items():
            if "error" in cell:
                continue
            phase = peak_phase(cell)
            entry = cell["phase_peak_entry_bytes"].get(phase)
            peak = cell["phase_peak_bytes"][phase]
            before = _mib(cell["before_run_bytes"])
            lines.append(
                f"- {key}: {phase}, from {_mib(entry)} MiB at its start (of which {before} before the "
                f"run) to {_mib(peak)} MiB (+{_mib(peak - (entry or 0))})"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
