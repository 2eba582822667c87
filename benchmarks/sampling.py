"""How much faster is a training step with length-grouped batches (``train.sampling: group_by_length``)?

On MiniLM with uniform LoRA at rank 1 (the converged study's setting), for movie-reviews (snippets cut at
64 tokens) and brown-genre (passages cut at 128): the same number of steps with random batches and with
transformers' LengthGroupedSampler, from the same built model, alternating the two ``--repeats`` times so
that a change in machine load hits both alike. Reported per task: the padded share of the tokens the
batches held, the step time (median over repeats of each run's mean step after ``--warmup-steps``) and
the ratio grouped / random. Grouping changes which examples share a batch, so it is another training
run, not the same one faster: the numbers say what a study would gain by choosing it before it starts.

Usage: ``python benchmarks/sampling.py [--quick] [--threads 1]``. Writes
``benchmarks/results/<device>-sampling.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

TASKS = {"movie-reviews": 64, "brown-genre": 128}
SAMPLINGS = ("random", "group_by_length")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=list(TASKS))
    p.add_argument("--steps", type=int, default=100, help="training steps per run (two 50-batch megabatches)")
    p.add_argument("--warmup-steps", type=int, default=5, help="steps left out of each run's mean")
    p.add_argument("--repeats", type=int, default=2, help="runs per sampling and task, alternating")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--quick", action="store_true", help="30 steps, one repeat")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.repeats = min(args.steps, 30), 1
    if args.steps <= args.warmup_steps or args.repeats < 1:
        p.error("--steps must exceed --warmup-steps, and --repeats must be at least 1")
    return args


class CountingCollator:
    """The run's own collator, counting the real and the padded token positions it hands out."""

    def __init__(self, collator: Any) -> None:
        self.collator = collator
        self.real = self.padded = 0

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        batch = self.collator(features)
        mask = batch["attention_mask"]
        self.real += int(mask.sum())
        self.padded += int(mask.numel() - mask.sum())
        return batch


def step_time(metrics: Path, warmup: int) -> float:
    """Mean seconds per step after ``warmup`` steps, from the run's step log."""
    elapsed = {}
    for line in metrics.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "elapsed_s" in row:
            elapsed[int(row["step"])] = float(row["elapsed_s"])
    last = max(elapsed)
    return (elapsed[last] - elapsed[warmup]) / (last - warmup)


def measure(args: argparse.Namespace, task: str, device: Any) -> dict[str, Any]:
    from fimlora.config import parse_config
    from fimlora.experiment import build_method, prepare
    from fimlora.train import train

    config = parse_config(
        {
            "model": "minilm",
            "dataset": task,
            "methods": ["lora"],
            "budget": {"uniform_rank": 1},
            "seed": args.seed,
            "output_dir": tempfile.mkdtemp(prefix="fimlora-bench-sampling-"),
            "train": {
                "steps": args.steps,
                "batch_size": args.batch_size,
                "max_length": TASKS[task],
                "report_to": [],
            },
        }
    )
    prepared = prepare(config, splits=("train", "validation"), progress=False)
    runs: dict[str, list[dict[str, float]]] = {s: [] for s in SAMPLINGS}
    for repeat in range(args.repeats):
        for sampling in SAMPLINGS if repeat % 2 == 0 else SAMPLINGS[::-1]:
            built = build_method(prepared, "lora")
            built.model.to(device)
            collator = CountingCollator(prepared.collator)
            settings = config.train.model_copy(update={"sampling": sampling})
            with tempfile.TemporaryDirectory(prefix="fimlora-bench-") as work:
                metrics = Path(work) / "metrics.jsonl"
                train(
                    built.model,
                    prepared.tokenized["train"],
                    collator,
                    settings,
                    seed=args.seed,
                    work_dir=Path(work),
                    metrics_path=metrics,
                    progress=False,
                    optimizer=built.optimizer,
                )
                seconds = step_time(metrics, args.warmup_steps)
            share = collator.padded / (collator.real + collator.padded)
            runs[sampling].append({"step_s": seconds, "padded_share": share})
            print(f"  {task} {sampling} (repeat {repeat + 1}): {seconds:.3f} s/step, {share:.0%} padding")
    random_s = common.median([r["step_s"] for r in runs["random"]])
    grouped_s = common.median([r["step_s"] for r in runs["group_by_length"]])
    return {
        "task": task,
        "max_length": TASKS[task],
        "runs": runs,
        "random_step_s": random_s,
        "grouped_step_s": grouped_s,
        "ratio": grouped_s / random_s,
        "random_padded_share": common.median([r["padded_share"] for r in runs["random"]]),
        "grouped_padded_share": common.median([r["padded_share"] for r in runs["group_by_length"]]),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.torch_device(args.device)
    if device is None:
        sys.exit(1)
    started = time.perf_counter()
    report: dict[str, Any] = {"environment": common.environment(device, args.threads)}
    report["settings"] = common.settings_of(args)
    report["tasks"] = [measure(args, task, device) for task in args.tasks]
    report["wall_s"] = time.perf_counter() - started
    rows = [
        [
            t["task"],
            str(t["max_length"]),
            f"{t['random_padded_share']:.0%}",
            f"{t['grouped_padded_share']:.0%}",
            f"{t['random_step_s']:.3f}",
            f"{t['grouped_step_s']:.3f}",
            common.ratio_text(t["ratio"]),
        ]
        for t in report["tasks"]
    ]
    header = ["task", "max tokens", "padding, random", "padding, grouped", "s/step, random"]
    table = common.markdown_table([*header, "s/step, grouped", "grouped / random"], rows)
    markdown = (
        f"# Length-grouped batches: step time (MiniLM, LoRA r = 1, batch {args.batch_size})\n\n"
        f"{report['environment']['device']}; {args.steps} steps per run, {args.repeats} repeat(s), "
        f"median of the runs' mean step after {args.warmup_steps}.\n\n{table}\n"
    )
    print(markdown)
    common.write_results(args, device, "sampling", report, markdown)


if __name__ == "__main__":
    main()
