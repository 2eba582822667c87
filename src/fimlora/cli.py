"""The ``fimlora`` command line. Bad input → one line on stderr and exit code 2, never a traceback."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any, get_args

import typer

from fimlora import glibc_malloc, lazy_bitsandbytes
from fimlora.config import LoraSettings
from fimlora.errors import FimloraError
from fimlora.io import ensure_directory

# The values of the config's lora.scaling, so that `allocate` offers exactly what a config accepts.
SCALINGS: tuple[str, ...] = get_args(LoraSettings.model_fields["scaling"].annotation)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Fisher-information-guided adaptive LoRA rank allocation.",
)

EXIT_USAGE = 2


def _echo(message: str) -> None:
    typer.echo(message)


def _echo_error(message: str) -> None:
    typer.echo(message, err=True)


def _target_spec(value: str | None) -> str | list[str] | None:
    """``query,value`` → a list of names; ``re:<pattern>`` → a regex; empty → the default targets."""
    if not value:
        return None
    if value.startswith("re:"):
        return value[3:]
    return [v.strip() for v in value.split(",") if v.strip()]


@app.command()
def run(
    config: Annotated[Path, typer.Argument(help="Experiment YAML (see docs/reference/configuration.md).")],
    output_dir: Annotated[str | None, typer.Option(help="Override the config's output_dir.")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Re-run methods that already finished (without it, one made with other settings is refused)."
        ),
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
    quantization: Annotated[
        str | None, typer.Option(help="Override the config's quantization: none, int8 or nf4 (QLoRA).")
    ] = None,
) -> None:
    """Run every method of an experiment config and print the comparison."""
    from fimlora.config import load_config
    from fimlora.experiment import run_experiment
    from fimlora.processes import is_main_process
    from fimlora.reporting.tables import results_table

    overrides: dict[str, Any] = {"output_dir": output_dir} if output_dir else {}
    if quantization is not None:
        overrides["quantization"] = quantization
    cfg = load_config(config, overrides)
    _, results = run_experiment(cfg, progress=progress, overwrite=overwrite, log=_echo)
    if is_main_process():  # under torchrun / accelerate launch, one table, not one per process
        _echo("")
        _echo(results_table(results))


@app.command()
def fisher(
    model: Annotated[str, typer.Option(help="Built-in name (minilm, smollm2), local directory or hub id.")],
    dataset: Annotated[str, typer.Option(help="Built-in dataset, local .csv/.json/.jsonl or hub id.")],
    output: Annotated[Path, typer.Option(help="Directory for fisher.safetensors and fisher.json.")],
    num_examples: Annotated[int, typer.Option(help="Calibration examples from the training split.")] = 256,
    batch_size: int = 16,
    estimator: Annotated[str, typer.Option(help="empirical or mc.")] = "empirical",
    max_length: int = 64,
    target_modules: Annotated[
        str | None, typer.Option(help="Comma-separated names, or re:<regex>; default: all linear layers.")
    ] = None,
    text_column: str | None = None,
    label_column: str | None = None,
    seed: int = 0,
    trust_remote_code: bool = False,
    quantization: Annotated[
        str,
        typer.Option(
            help="none, int8 or nf4: the Fisher of the dequantised weights, on the quantised model."
        ),
    ] = "none",
    progress: bool = True,
) -> None:
    """Estimate the per-example diagonal Fisher of the target weights and save it (safetensors + JSON)."""
    from fimlora.config import parse_config
    from fimlora.experiment import compute_fisher, prepare
    from fimlora.fisher.result import summarize_scores

    cfg = parse_config(
        {
            "model": model,
            "dataset": dataset,
            "methods": ["fim-lora"],
            "seed": seed,
            "target_modules": _target_spec(target_modules),
            "trust_remote_code": trust_remote_code,
            "quantization": quantization,
            "dataset_options": {"text_column": text_column, "label_column": label_column},
            "fisher": {"estimator": estimator, "num_examples": num_examples, "batch_size": batch_size},
            "train": {"max_length": max_length},
        },
        source="fisher options",
    )
    ensure_directory(output, "--output")
    prepared = prepare(cfg, progress=progress)
    result = compute_fisher(prepared, output, progress=progress)
    scores = result.scores("mean")
    spread = summarize_scores(scores)
    _echo(f"Fisher of {len(scores)} modules from {result.num_examples} examples written to {output}")
    _echo(f"mean-score spread: max/min = {spread['max_over_min']:.3g}")
    for name, value in sorted(scores.items(), key=lambda kv: -kv[1])[:10]:
        _echo(f"  {value:.4e}  {name}")


@app.command()
def allocate(
    fisher_dir: Annotated[Path, typer.Argument(help="Directory written by `fimlora fisher`.")],
    output: Annotated[Path, typer.Option(help="Directory for allocation.json and adapter_config.json.")],
    budget_rank: Annotated[
        int | None, typer.Option(help="Budget = what uniform LoRA of this rank costs (default 8).")
    ] = None,
    budget_params: Annotated[int | None, typer.Option(help="Budget in trainable LoRA parameters.")] = None,
    strategy: Annotated[str, typer.Option(help="proportional, uniform or random.")] = "proportional",
    aggregation: Annotated[str, typer.Option(help="Per-module Fisher score: mean or trace.")] = "mean",
    tau: float = 1.0,
    r_min: int = 1,
    r_max: int | None = None,
    lora_alpha: Annotated[
        float | None, typer.Option(help="Default: 2 × the budget's reference rank.")
    ] = None,
    scaling: Annotated[str, typer.Option(help=f"{' or '.join(SCALINGS)} (as lora.scaling).")] = SCALINGS[0],
    seed: int = 0,
) -> None:
    """Allocate ranks from a saved Fisher; write allocation.json and a PEFT adapter_config.json."""
    from fimlora.allocation import allocate_ranks, uniform_rank_budget
    from fimlora.fisher import FisherResult
    from fimlora.reporting.tables import rank_table

    if budget_rank is not None and budget_params is not None:
        raise FimloraError("Give either --budget-rank or --budget-params, not both.")
    if scaling not in SCALINGS:
        raise FimloraError(f"--scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}.")
    ensure_directory(output, "--output")
    result = FisherResult.load(fisher_dir)
    shapes = result.shapes
    reference_rank = budget_rank or 8
    budget = budget_params or uniform_rank_budget(shapes, reference_rank)
    allocation = allocate_ranks(
        result.scores(aggregation),
        shapes,
        budget=budget,
        strategy=strategy,
        r_min=r_min,
        r_max=r_max,
        tau=tau,
        seed=seed,
    )
    task = result.metadata.get("task")
    lora_config = allocation.to_lora_config(
        lora_alpha=lora_alpha if lora_alpha is not None else 2.0 * reference_rank,
        scaling=scaling,
        task_type={"classification": "SEQ_CLS", "causal-lm": "CAUSAL_LM"}.get(str(task)),
        base_model_name_or_path=result.metadata.get("base_model_name_or_path"),
    )
    allocation.save(output / "allocation.json")
    # PEFT's own writer: it serialises target_modules (a set) the way LoraConfig.from_pretrained reads it.
    lora_config.save_pretrained(str(output))
    _echo(rank_table(allocation.ranks))
    _echo(f"{allocation.num_params:,} of {budget:,} budgeted parameters; written to {output}")


@app.command()
def methods(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML: count parameters at its budget (no training).")
    ] = None,
    every_preset: Annotated[bool, typer.Option("--all", help="Count every preset instead.")] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """List the method presets, or what each method trains at a config's budget (nothing is trained, and
    the config's output_dir is left untouched)."""
    from fimlora.inventory import inventory_table, parameter_inventory, presets_table

    if config is None:
        _echo(presets_table())
        return
    from fimlora.config import load_config
    from fimlora.methods import PRESETS

    cfg = load_config(config)
    rows = parameter_inventory(cfg, list(PRESETS) if every_preset else None, progress=progress, log=_echo)
    _echo(inventory_table(rows))
    failed = [row for row in rows if row["error"]]
    if failed and not every_preset:  # the config's own methods: its run would fail the same way
        raise FimloraError(failed[0]["error"])


@app.command()
def demo(
    output_dir: Annotated[str, typer.Option(help="Where the runs and report.md go.")] = "runs/demo",
    steps: Annotated[int | None, typer.Option(help="Training steps per method (default 100).")] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="Re-run methods that already finished (without it, one made with other settings is refused)."
        ),
    ] = False,
) -> None:
    """MiniLM + movie reviews: Fisher-guided vs uniform vs random ranks at the same budget."""
    from fimlora.demo import demo_config, run_demo

    run_demo(demo_config(output_dir=output_dir, steps=steps), overwrite=overwrite, log=_echo)


HolmFamilyOption = Annotated[
    str,
    typer.Option(
        help="What one Holm adjustment covers: table (every budget × method of a results table) or "
        "budget (each budget's comparisons on their own, for a study that reads each budget as a cell)."
    ),
]


@app.command()
def results(
    runs_dir: Annotated[Path, typer.Argument(help="Directory searched recursively for run directories.")],
    out: Annotated[
        Path | None, typer.Option(help="Where results.parquet/.csv and unfinished.csv go (default: DIR).")
    ] = None,
    holm_family: HolmFamilyOption = "table",
) -> None:
    """Collect every finished run below DIR into one table (Parquet + CSV); unfinished runs kept apart."""
    from fimlora.results import collect_results
    from fimlora.stats import check_holm_family

    check_holm_family(holm_family)
    if out is not None:
        ensure_directory(out, "--out")
    table = collect_results(runs_dir)
    paths = table.write(out or runs_dir, holm_family=holm_family)
    _echo(f"{len(table.frame)} finished run(s) written to {paths['parquet']} and {paths['csv']}")
    counts = table.frame.groupby(["dataset", "model", "budget_label", "method"], dropna=False).size()
    for (dataset, model, budget, method), n in counts.items():
        _echo(f"  {dataset} / {model} / {budget} / {method}: {n} run(s)")
    if "summary" in paths:
        import pandas as pd

        from fimlora.stats import BASELINE, comparison_lines, primary_metric

        lines = comparison_lines(pd.read_csv(paths["summary"]), primary_metric(table.frame))
        _echo(
            f"statistics over seeds in {paths['summary']}; paired comparisons with {BASELINE} "
            f"(p-values raw and Holm-adjusted over each dataset × model × metric"
            f"{' × budget' if holm_family == 'budget' else ''}): {len(lines) or 'none'}"
        )
        for line in lines:
            _echo(f"  {line}")
    if table.unfinished:
        _echo(f"{len(table.unfinished)} unfinished run(s), not in the table (see {paths['unfinished']}):")
        for run_ in table.unfinished:
            _echo(f"  {run_.path} ({run_.reason})")


@app.command()
def report(
    runs_dir: Annotated[Path, typer.Argument(help="Directory searched recursively for runs.")],
    out: Annotated[
        Path | None, typer.Option(help="Where report.md, report.html, report_files/ go (default: DIR).")
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            help="Primary metric (default: the one the runs were tuned on, else accuracy, or perplexity "
            "for causal LM)."
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(help="Method the paired comparisons are made against (default: lora, if present)."),
    ] = None,
    resamples: Annotated[int, typer.Option(help="Bootstrap resamples (at least 10,000).")] = 10_000,
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap.")] = 0,
    holm_family: HolmFamilyOption = "table",
) -> None:
    """Statistics over seeds, paired comparisons and plots of every finished run below DIR: md + html."""
    from fimlora.reporting import build_report
    from fimlora.stats import check_holm_family

    check_holm_family(holm_family)
    if resamples < 10_000:
        raise FimloraError(f"--resamples must be at least 10000 for stable 95% intervals, got {resamples}.")
    if out is not None:
        ensure_directory(out, "--out")
    files = build_report(
        runs_dir,
        out,
        metric=metric,
        baseline=baseline,
        n_resamples=resamples,
        seed=seed,
        holm_family=holm_family,
    )
    _echo(f"report: {files.markdown} and {files.html} ({len(files.images)} figures in {files.html.parent})")


@app.command()
def calibration(
    config: Annotated[Path, typer.Argument(help="Experiment YAML: model, dataset, targets, Fisher batch.")],
    sizes: Annotated[str, typer.Option(help="Comma-separated calibration sizes.")] = "16,64,256",
    repeats: Annotated[int, typer.Option(help="Disjoint subsets per size (pairs compared: all).")] = 3,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: <output_dir>/calibration).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="k of the top-k overlap (default: modules / 4).")] = None,
    mc: Annotated[bool, typer.Option(help="Also estimate the Monte-Carlo Fisher and compare.")] = True,
    seed: Annotated[
        int | None, typer.Option(help="Seed of the subsets and MC labels (default: the config's).")
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Fisher ranking stability across disjoint calibration subsets, per size; empirical vs MC Fisher."""
    from fimlora.analysis import calibration_stability
    from fimlora.config import load_config
    from fimlora.experiment import prepare

    try:
        size_list = [int(s) for s in sizes.split(",") if s.strip()]
    except ValueError:
        raise FimloraError(f"--sizes must be comma-separated integers, got {sizes!r}.") from None
    cfg = load_config(config)
    target = ensure_directory(out or Path(cfg.output_dir) / "calibration", "--out" if out else "output_dir")
    prepared = prepare(cfg, progress=progress)
    result = calibration_stability(
        prepared,
        size_list,
        repeats,
        estimators=("empirical", "mc") if mc else ("empirical",),
        k=top_k,
        seed=seed,
        progress=progress,
        log=_echo,
    )
    paths = result.write(target)
    summary = result.summary()
    for _, row in summary[summary["aggregation"] == cfg.fisher.aggregation].iterrows():
        _echo(
            f"  size {row['size']:>5}  {row['comparison']:<16} {row['estimator']:<13} "
            f"Kendall τ {row['kendall_tau_mean']:.3f}  top-{row['k']} overlap {row['top_k_overlap_mean']:.2f}"
        )
    _echo(f"written to {paths['json']} and {paths['csv']}")


@app.command("fisher-trajectory")
def fisher_trajectory(
    config: Annotated[Path, typer.Argument(help="Experiment YAML whose method trains fixed-rank LoRA.")],
    method: Annotated[
        str | None, typer.Option(help="Method of the config to train (default: its first).")
    ] = None,
    fractions: Annotated[
        str, typer.Option(help="Comma-separated fractions of train.steps for the snapshots; 0 included.")
    ] = "0,0.1,0.5,1",
    source: Annotated[
        Path | None,
        typer.Option(
            help="Finished full-FT or uniform-LoRA run for the hindsight scores (default: this run)."
        ),
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Output directory (default: <output_dir>/fisher-trajectory).")
    ] = None,
    top_k: Annotated[int | None, typer.Option(help="k of the top-k overlap (default: modules / 4).")] = None,
    tuned: Annotated[
        Path | None,
        typer.Option(
            help="tuned.yaml from `fimlora tune`: train the method with its cell's tuned settings "
            "(evaluation stays on the config's split)."
        ),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Does the Fisher move during training? Its per-module scores along a LoRA run vs init and hindsight."""
    from fimlora.analysis.fisher_trajectory import VERSUS_HINDSIGHT, fisher_trajectory
    from fimlora.config import load_config
    from fimlora.experiment import prepare

    try:
        fraction_list = [float(f) for f in fractions.split(",") if f.strip()]
    except ValueError:
        raise FimloraError(f"--fractions must be comma-separated numbers, got {fractions!r}.") from None
    cfg = load_config(config)
    tuning = None
    if tuned is not None:
        from fimlora.tune.apply import with_tuned

        cfg, tuning = with_tuned(cfg, tuned, method=method)
    target = ensure_directory(
        out or Path(cfg.output_dir) / "fisher-trajectory", "--out" if out else "output_dir"
    )
    prepared = prepare(cfg, progress=progress)
    result = fisher_trajectory(
        prepared,
        target,
        method=method,
        fractions=fraction_list,
        source=source,
        k=top_k,
        tuning=tuning,
        progress=progress,
        log=_echo,
    )
    paths = result.write(target)
    for record in result.records:
        if record["aggregation"] == cfg.fisher.aggregation:
            against = "hindsight" if record["versus"] == VERSUS_HINDSIGHT else "init"
            _echo(
                f"  {record['fraction']:>5.0%} of training  vs {against:<9}  Kendall τ "
                f"{record['kendall_tau']:+.3f} (p {record['kendall_p']:.3g})  "
                f"top-{record['k']} overlap {record['top_k_overlap']:.2f}"
            )
    _echo(f"written to {paths['json']} and {paths['csv']}")


@app.command("update-spectrum")
def update_spectrum(
    runs: Annotated[
        list[Path],
        typer.Argument(help="Finished full-FT or uniform-LoRA run directories (<output_dir>/<method>)."),
    ],
    force: Annotated[bool, typer.Option(help="Write it again where a run already has one.")] = False,
) -> None:
    """Keep what a hindsight source gives: each update's singular values, next to the run's result.json.

    Weights are not committed; `update-spectrum.safetensors` (σ_k(ΔW)² per target module) is small enough
    to be, and the hindsight rule and `fisher-trajectory --source` read it instead of the weights.
    """
    from fimlora.methods.allocations.hindsight import (
        SPECTRUM_FILE,
        check_spectrum_source,
        read_run,
        write_update_spectrum,
    )
    from fimlora.models import load_model, resolve_target_modules

    todo = []
    for path in runs:  # every run checked before the first base model loads
        run = read_run(path)
        if (run.path / SPECTRUM_FILE).is_file() and not force:
            _echo(f"{run.path}: has {SPECTRUM_FILE} (--force writes it again)")
            continue
        check_spectrum_source(run)
        todo.append(run)
    bases: dict[str, Any] = {}
    for run in todo:
        labels = run.result.get("labels")
        key = repr((run.config.model, run.result.get("task"), labels, run.config.quantization))
        if key not in bases:
            bases[key] = load_model(
                run.config.model,
                run.result["task"],
                label_names=labels,
                trust_remote_code=run.config.trust_remote_code,
                quantization=run.config.quantization,
            ).model
        targets = resolve_target_modules(bases[key], run.config.target_modules)
        written = write_update_spectrum(run, bases[key], targets)
        _echo(f"{run.path}: wrote {written.name} ({len(targets)} modules)")


ThreadsOption = Annotated[
    int | None,
    typer.Option(
        help="Torch threads per worker (default: the CPUs divided among the workers). Runs record it "
        "(environment.json); the same count is what makes a re-made CPU run bit-identical."
    ),
]


@app.command()
def sweep(
    spec: Annotated[Path, typer.Argument(help="Sweep spec YAML (see docs/experiments.md).")],
    dry_run: Annotated[bool, typer.Option(help="List the runs and which are done; run nothing.")] = False,
    backend: Annotated[str, typer.Option(help="local or ray.")] = "local",
    workers: Annotated[
        int | None, typer.Option(help="Local worker processes (default 1: runs in this process).")
    ] = None,
    threads: ThreadsOption = None,
    ray_address: Annotated[
        str | None, typer.Option(help="Ray cluster to join ('auto': the running one); default: start one.")
    ] = None,
    cpus_per_run: Annotated[float | None, typer.Option(help="Ray: CPUs per run (default 1).")] = None,
    gpus_per_run: Annotated[float | None, typer.Option(help="Ray: GPUs per run (default 0).")] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar over runs.")] = True,
    output_dir: Annotated[
        Path | None,
        typer.Option(help="Run store instead of the spec's output_dir (run keys do not depend on it)."),
    ] = None,
    tuned: Annotated[
        Path | None,
        typer.Option(help="tuned.yaml from `fimlora tune`: each cell runs with its tuned settings, on test."),
    ] = None,
) -> None:
    """Run every grid point of a sweep spec once: finished runs are skipped, unfinished ones re-run.

    Every run still to do is checked first (dataset, model, targets, max_length, budget): a run that
    would refuse to start stops the sweep before anything runs. Exit code 1 when any run failed (the
    others still ran; the failures are on stderr), 2 for a bad spec or bad options.
    """
    from fimlora.sweep import load_spec, run_sweep

    loaded = load_spec(spec)
    if output_dir is not None:
        loaded = loaded.model_copy(update={"output_dir": str(output_dir.resolve())})
    summary = run_sweep(
        loaded,
        dry_run=dry_run,
        backend=backend,  # type: ignore[arg-type]
        workers=workers,
        threads=threads,
        ray_address=ray_address,
        cpus_per_run=cpus_per_run,
        gpus_per_run=gpus_per_run,
        progress=progress,
        log=_echo,
        log_failure=_echo_error,
        tuned=tuned,
    )
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def tune(
    spec: Annotated[
        Path, typer.Argument(help="Sweep spec with a tune: section (see docs/experiments.md, 'Tuning').")
    ],
    trials: Annotated[int | None, typer.Option(help="Trials per study, for every study.")] = None,
    seeds: Annotated[
        int | None, typer.Option(help="Seeds every trial trains at (tune.seeds), scored by tune.aggregate.")
    ] = None,
    workers: Annotated[int, typer.Option(help="Local worker processes sharing the storage.")] = 1,
    threads: ThreadsOption = None,
    storage: Annotated[
        str | None,
        typer.Option(
            help="Optuna storage URL (default: sqlite:///<store>/tuning.db); share it across machines."
        ),
    ] = None,
    output_dir: Annotated[
        Path | None, typer.Option(help="Store instead of the spec's output_dir (tuned.yaml goes there).")
    ] = None,
    retry_failed: Annotated[
        bool,
        typer.Option(
            help="First give every failed trial again with its parameters (after fixing what failed it); "
            "the failed one stays on record as retried and no longer counts."
        ),
    ] = False,
    status: Annotated[
        bool,
        typer.Option(
            help="Only say where each study stands (trials ended, running, best so far) and what is left "
            "(trials, and hours at the ended trials' wall time), then exit; reads the storage, trains and "
            "writes nothing, also while other processes tune."
        ),
    ] = False,
) -> None:
    """Tune every cell of a sweep on the validation split, the same search for every method; write
    tuned.yaml. Run again to resume; then `fimlora sweep SPEC --tuned <store>/tuned.yaml`."""
    from fimlora.sweep import load_spec
    from fimlora.tune import run_tuning
    from fimlora.tune.objective import format_params

    loaded = load_spec(spec)
    if output_dir is not None:
        loaded = loaded.model_copy(update={"output_dir": str(output_dir.resolve())})
    if status:
        from fimlora.tune.status import print_status, tuning_status

        if retry_failed:
            raise FimloraError("--status only reads the studies; run --retry-failed without it.")
        print_status(*tuning_status(loaded, trials=trials, seeds=seeds, storage=storage), log=_echo)
        return
    report = run_tuning(
        loaded,
        trials=trials,
        seeds=seeds,
        workers=workers,
        threads=threads,
        storage=storage,
        retry_failed=retry_failed,
        log=_echo,
    )
    _echo("")
    for summary in report.summaries:
        entry, counts = summary.entry, summary.entry.trials
        best = (
            f"{entry.metric} {entry.validation_score:.4f} with {format_params(entry.params)}"
            if entry.params is not None and entry.validation_score is not None
            else "no completed trial"
        )
        if entry.seed_scores and len(entry.seed_scores) > 1:
            listed = ", ".join(f"{seed}: {score:.4f}" for seed, score in entry.seed_scores.items())
            best += f" ({summary.cell.aggregate} of seeds {listed}; spread {entry.seed_spread:.4f})"
        lost = f", {counts.lost} lost and retried" if counts.lost else ""
        lost += f", {counts.retried} failed and given again" if counts.retried else ""
        _echo(
            f"{summary.cell.describe()}: {best} "
            f"({counts.complete} complete, {counts.pruned} pruned, {counts.failed} failed{lost})"
        )
    _echo(f"written: {report.tuned_file} and {report.trials_file}")


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(help="A finished run directory (<output_dir>/<method>).")],
    out: Annotated[Path, typer.Option(help="Directory to write (replaced only if it is a previous export).")],
    adapter_only: Annotated[
        bool, typer.Option(help="Write the PEFT adapter and a serving note instead of a merged model.")
    ] = False,
) -> None:
    """A run as a plain transformers model (merged), HydraLoRA's adapter + loader, or the adapter alone."""
    from fimlora.deploy import export_run

    result = export_run(run_dir, out, adapter_only=adapter_only)
    _echo(f"{result.kind} export of {run_dir} written to {result.out}:")
    for name in result.files:
        _echo(f"  {name}")
    for note in result.notes:
        _echo(note)
    check = result.check
    _echo(
        f"check: logits on {check['probe_texts']} probe texts within {check['max_rel_diff']:.2e} "
        f"(relative) of the run's (tolerance {check['tolerance']:g})"
    )


@app.command()
def generate(
    run_dir: Annotated[Path, typer.Argument(help="A finished causal-LM run directory.")],
    prompt: Annotated[list[str], typer.Option(help="Text to continue (repeat the option for several).")],
    max_new_tokens: Annotated[int, typer.Option(help="New tokens per prompt at most.")] = 64,
    sample: Annotated[bool, typer.Option(help="Sample instead of greedy decoding.")] = False,
    seed: Annotated[int, typer.Option(help="Seed of the sampling.")] = 0,
    temperature: Annotated[float, typer.Option(help="Sampling temperature.")] = 1.0,
    top_p: Annotated[float, typer.Option(help="Nucleus sampling: keep the top-p probability mass.")] = 1.0,
) -> None:
    """Continue prompts with a causal-LM run's trained model (greedy unless --sample)."""
    from fimlora.deploy import continue_prompts, load_run

    loaded = load_run(run_dir)
    if loaded.task != "causal-lm":
        raise FimloraError(f"{run_dir} is a {loaded.task} run; generate needs a causal-LM run.")
    texts = continue_prompts(
        loaded.model,
        loaded.tokenizer,
        prompt,
        max_new_tokens=max_new_tokens,
        sample=sample,
        seed=seed,
        temperature=temperature,
        top_p=top_p,
    )
    for given, text in zip(prompt, texts, strict=True):
        _echo(f"{given}{text}")


def main(argv: list[str] | None = None) -> None:
    # Before torch loads OpenMP (nothing above imports torch): idle OpenMP threads sleep instead of
    # spinning at a barrier. On a shared CPU a spinning thread waits for its descheduled sibling; MiniLM
    # training steps took about 4x as long with the default policy on the 2-core reference machine under
    # load, with bit-identical results (docs/experiments.md). A policy set by the user wins;
    # sweep and tuning workers inherit it.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # A command imports bitsandbytes only when its config quantises (fimlora.lazy_bitsandbytes).
    lazy_bitsandbytes.defer()
    # Freed tensors go back to the OS, not into glibc's heap (fimlora.glibc_malloc).
    glibc_malloc.pin_mmap_threshold(glibc_malloc.COMMAND_MMAP_THRESHOLD)
    try:
        app(args=argv, standalone_mode=True)
    except FimloraError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        typer.echo("interrupted: unfinished runs have no result.json and will re-run.", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
