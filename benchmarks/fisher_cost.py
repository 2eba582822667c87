"""What the Fisher costs, relative to one plain forward+backward pass on the same batch.

For each (model, batch size, sequence length) case, on the SAME random calibration batch:

    reference  plain forward + backward, every weight trainable, loss = mean of per-example losses
    exact      ours: estimate_fisher(..., estimator="empirical"), the exact per-example diagonal Fisher
    trace      ours: estimate_fisher(..., statistic="trace"), per-module Fisher trace by the ghost norm
               (run only when the installed fimlora has it)
    vmap       torch.func: vmap(grad(ℓ_n)) over the examples via functional_call, squared and summed
    loop       one forward+backward per example, square each target weight's .grad and add it up
    prior      the prior harness: PEFT LoRA (r=8) at init, one backward of the batch-mean loss, square the
               batch gradient of lora_B. Cheap and wrong (not a Fisher, and a random projection of the
               weight gradient: see /work/shared/FIELD.md); here for its cost only.

Every method targets the same modules: every linear layer inside the transformer blocks
(``fimlora.models.resolve_target_modules(model, None)``). Every method runs in eval mode (dropout off,
as the Fisher is estimated); the batches have no padding. Each method first runs once to measure its
peak memory (see ``_common.PeakMemoryDelta``: on CUDA the allocator's peak above what was allocated
before the run, on CPU the sampled process RSS above the RSS before the run); that run is also the
warm-up. Then the timed repeats are interleaved (reference, exact, trace, … for repeat 1, then again,
rotated, for repeat 2, …) so a change in machine load hits every method alike; the time is the median
of the repeats, as wall-clock and as process CPU time.

A memory-scale case follows: one synthetic 4096×4096 ``nn.Linear`` on 2048-token sequences (a per-token
cross-entropy over 4096 classes as the loss), exact Fisher vs that layer's plain forward+backward.

Usage: ``python benchmarks/fisher_cost.py [--quick | --full] [--device cuda]`` (``make bench`` runs it).
Writes ``benchmarks/results/<device>-fisher-cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

# Known and harmless here: vmap falls back to a per-example loop for CPU flash attention (that slowness
# is part of what is measured), and a transformers deprecation notice raised inside PEFT.
warnings.filterwarnings(
    "ignore", message=".*performance drop because we have not yet implemented the batching rule.*"
)
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TARGETS = {("exact", "time"): 1.3, ("exact", "memory"): 1.5, ("trace", "time"): 1.1}
METHODS = ("reference", "exact", "trace", "vmap", "loop", "prior")
LABELS = {
    "reference": "plain fwd+bwd",
    "exact": "exact diag (ours)",
    "trace": "trace (ours)",
    "vmap": "torch.func vmap",
    "loop": "per-example loop",
    "prior": "prior: lora_B grad²",
}
MODELS = {"minilm": ("classification", {"num_labels": 2}), "smollm2": ("causal-lm", {})}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--models", nargs="+", default=["minilm", "smollm2"], choices=sorted(MODELS))
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 8, 32])
    p.add_argument("--seq-lens", nargs="+", type=int, default=[64, 256])
    p.add_argument(
        "--smollm2-cases",
        nargs="+",
        default=["1x64", "8x64"],
        metavar="BxT",
        help="the SmolLM2 cases to run (default 1x64 8x64: on a 2-core CPU one SmolLM2 fwd+bwd of\n"
        "32×256 tokens takes minutes); the rest of the grid is listed as not run. --full runs the grid.",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS[1:]), choices=METHODS[1:])
    p.add_argument("--repeats", type=int, default=3, help="timed repeats per method (median reported)")
    p.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="extra untimed runs per method and case (the peak-memory run always comes first and\n"
        "doubles as a warm-up)",
    )
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prior-rank", type=int, default=8, help="LoRA rank of the prior harness's adapter")
    p.add_argument(
        "--vmap-max-gb",
        type=float,
        default=4.0,
        help="skip vmap where its per-example gradients alone (batch × target weights × 4 bytes) would\n"
        "exceed this many GB (the machine is shared; textbook vmap materialises them all)",
    )
    p.add_argument(
        "--vmap-chunk-size", type=int, default=None, help="torch.func.vmap chunk_size (default: none)"
    )
    p.add_argument("--scale-width", type=int, default=4096, help="memory-scale case: Linear width")
    p.add_argument("--scale-tokens", type=int, default=2048, help="memory-scale case: sequence length")
    p.add_argument("--scale-batch", type=int, default=2, help="memory-scale case: batch size")
    p.add_argument("--no-scale", action="store_true", help="skip the memory-scale case")
    p.add_argument("--quick", action="store_true", help="smoke sizes (about 3 minutes on 2 shared cores)")
    p.add_argument("--full", action="store_true", help="every SmolLM2 case too (slow on CPU)")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_sizes = [1, 8]
        args.seq_lens = [64]
        args.smollm2_cases = ["1x64"]
        args.repeats = min(args.repeats, 2)
        args.scale_batch = 1
        args.scale_tokens = min(args.scale_tokens, 1024)
    if args.full:
        args.smollm2_cases = [f"{b}x{t}" for t in args.seq_lens for b in args.batch_sizes]
    try:
        args.smollm2_cases = sorted({tuple(int(x) for x in c.lower().split("x")) for c in args.smollm2_cases})
    except ValueError:
        p.error("--smollm2-cases takes BxT items, e.g. 8x64")
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    return args


# ------------------------------------------------------------------------------------------------
# The methods. Each is (prepare, run, cleanup): prepare and cleanup are not timed.
# ------------------------------------------------------------------------------------------------


@dataclass
class Runner:
    prepare: Callable[[], None]
    run: Callable[[], Any]
    cleanup: Callable[[], None]
    skip: str | None = None


@dataclass
class ModelUnderTest:
    name: str
    model: Any
    names: list[str]
    task: str
    peft_model: Any = None

    @property
    def weights(self) -> dict[str, Any]:
        modules = dict(self.model.named_modules())
        return {n: modules[n].weight for n in self.names}

    def set_trainable(self, which: str) -> None:
        """``"all"`` parameters, only the ``"targets"``' weights, or ``"none"``."""
        for p in self.model.parameters():
            p.requires_grad_(which == "all")
        if which == "targets":
            for w in self.weights.values():
                w.requires_grad_(True)


def trace_supported() -> bool:
    """Whether the installed fimlora has ``estimate_fisher(statistic="trace")``."""
    from fimlora import estimate_fisher

    return "statistic" in inspect.signature(estimate_fisher).parameters


def make_runners(mut: ModelUnderTest, batch: dict[str, Any], args: argparse.Namespace) -> dict[str, Runner]:
    import torch
    from torch.func import functional_call, grad, vmap

    from fimlora import estimate_fisher
    from fimlora.fisher.losses import per_example_loss

    model = mut.model
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    nothing = lambda: None  # noqa: E731

    def reference() -> None:
        logits = model(input_ids=ids, attention_mask=mask).logits
        per_example_loss(logits, labels).mean().backward()

    def exact() -> Any:
        return estimate_fisher(
            model, [batch], target_modules=mut.names, estimator="empirical", progress=False
        )

    def trace() -> Any:
        return estimate_fisher(model, [batch], target_modules=mut.names, statistic="trace", progress=False)

    # torch.func: ℓ_n as a function of the target weights, vmapped over examples. No attention_mask is
    # passed: the batches have no padding, and transformers' mask shortcut (a data-dependent branch)
    # cannot run under vmap.
    def example_loss(params: dict[str, Any], example_ids: Any, example_labels: Any) -> Any:
        out = functional_call(model, params, args=(), kwargs={"input_ids": example_ids[None]})
        return per_example_loss(out.logits, example_labels[None]).sum()

    per_example_grads = vmap(grad(example_loss), in_dims=(None, 0, 0), chunk_size=args.vmap_chunk_size)

    def vmapped() -> dict[str, Any]:
        params = {f"{n}.weight": w.detach() for n, w in mut.weights.items()}
        grads = per_example_grads(params, ids, labels)
        return {k: g.square_().sum(dim=0).div_(ids.shape[0]) for k, g in grads.items()}

    def loop() -> dict[str, Any]:
        weights = mut.weights
        sums = {n: torch.zeros_like(w) for n, w in weights.items()}
        for i in range(ids.shape[0]):
            logits = model(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1]).logits
            per_example_loss(logits, labels[i : i + 1]).sum().backward()
            for n, w in weights.items():
                sums[n].add_(w.grad.square())
                w.grad = None
        return sums

    def prior() -> dict[str, Any]:
        peft_model = mut.peft_model
        logits = peft_model(input_ids=ids, attention_mask=mask).logits
        per_example_loss(logits, labels).mean().backward()
        return {n: p.grad.square() for n, p in peft_model.named_parameters() if "lora_B" in n}

    def zero_grads(m: Any) -> Callable[[], None]:
        return lambda: m.zero_grad(set_to_none=True)

    target_numel = sum(w.numel() for w in mut.weights.values())
    vmap_gb = ids.shape[0] * target_numel * 4 / 1e9
    vmap_skip = (
        f"per-example gradients alone need {vmap_gb:.1f} GB > --vmap-max-gb {args.vmap_max_gb:g} "
        "(--vmap-chunk-size runs it in chunks)"
        if vmap_gb > args.vmap_max_gb and args.vmap_chunk_size is None
        else None
    )
    runners = {
        "reference": Runner(lambda: mut.set_trainable("all"), reference, zero_grads(model)),
        "exact": Runner(lambda: mut.set_trainable("none"), exact, nothing),
        "trace": Runner(
            lambda: mut.set_trainable("none"),
            trace,
            nothing,
            None if trace_supported() else "fimlora has no statistic='trace' yet",
        ),
        "vmap": Runner(lambda: mut.set_trainable("none"), vmapped, nothing, vmap_skip),
        "loop": Runner(lambda: mut.set_trainable("targets"), loop, zero_grads(model)),
        "prior": Runner(nothing, prior, lambda: mut.peft_model.zero_grad(set_to_none=True)),
    }
    return {k: v for k, v in runners.items() if k == "reference" or k in args.methods}


def measure(runners: dict[str, Runner], args: argparse.Namespace, device: Any) -> dict[str, dict[str, Any]]:
    """One peak-memory run per method (also the warm-up), then interleaved timed repeats.

    Per method: ``times_s`` / ``cpu_times_s`` (wall / process CPU seconds of each repeat), their medians
    ``median_s`` / ``median_cpu_s``, ``peak_bytes``, and the ratios to the reference ``time_ratio``
    (wall), ``cpu_time_ratio`` and ``memory_ratio``; or ``skipped`` with the reason.
    """
    active = {k: r for k, r in runners.items() if r.skip is None}
    results: dict[str, dict[str, Any]] = {
        k: {"skipped": r.skip} if r.skip else {"times_s": [], "cpu_times_s": []} for k, r in runners.items()
    }

    def once(runner: Runner) -> tuple[float, float]:
        runner.prepare()
        holder: list[Any] = []
        seconds = common.timed(lambda: holder.append(runner.run()), device)
        holder.clear()
        runner.cleanup()
        return seconds

    # The peak-memory run comes first and is also the warm-up (first-call costs land in no timing).
    with common.rss_tracks_tensors():
        for key, runner in active.items():
            runner.prepare()
            holder: list[Any] = []
            with common.PeakMemoryDelta(device) as memory:
                holder.append(runner.run())
                common.synchronize(device)
                holder.clear()
            runner.cleanup()
            results[key]["peak_bytes"] = memory.delta_bytes
    for _ in range(args.warmup):
        for runner in active.values():
            once(runner)
    keys = list(active)
    for repeat in range(args.repeats):
        gc.collect()
        order = keys[repeat % len(keys) :] + keys[: repeat % len(keys)]  # rotate: no fixed position
        for key in order:
            wall, cpu = once(active[key])
            results[key]["times_s"].append(wall)
            results[key]["cpu_times_s"].append(cpu)
    for key in active:
        results[key]["median_s"] = common.median(results[key]["times_s"])
        results[key]["median_cpu_s"] = common.median(results[key]["cpu_times_s"])
    ref = results["reference"]
    for key in active:
        results[key]["time_ratio"] = results[key]["median_s"] / ref["median_s"]
        results[key]["cpu_time_ratio"] = results[key]["median_cpu_s"] / ref["median_cpu_s"]
        results[key]["memory_ratio"] = (
            results[key]["peak_bytes"] / ref["peak_bytes"] if ref["peak_bytes"] > 0 else None
        )
    return results


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


def random_batch(task: str, vocab: int, batch: int, seq: int, seed: int, device: Any) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + batch * 1_009 + seq)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    labels = torch.randint(0, 2, (batch,), generator=g) if task == "classification" else ids.clone()
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in out.items()}


def load(name: str, device: Any, args: argparse.Namespace) -> ModelUnderTest:
    import torch
    from peft import LoraConfig, get_peft_model

    from fimlora.models import load_model, resolve_target_modules

    task, kwargs = MODELS[name]
    torch.manual_seed(args.seed)
    loaded = load_model(name, task, **kwargs)  # type: ignore[arg-type]
    model = loaded.model.to(device).eval()
    names = resolve_target_modules(model, None)
    mut = ModelUnderTest(name=name, model=model, names=names, task=task)
    if "prior" in args.methods:
        torch.manual_seed(args.seed)
        config = LoraConfig(
            r=args.prior_rank, lora_alpha=2 * args.prior_rank, target_modules=names, lora_dropout=0.0
        )
        mut.peft_model = get_peft_model(copy.deepcopy(model), config).eval()
    return mut


def single_linear_model(width: int, device: Any) -> Any:
    """A one-layer "model" for the memory-scale case: logits = W x, per-token cross-entropy."""
    import torch
    from torch import nn

    class SingleLinear(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(width, width, bias=False)])  # the "blocks"

        def forward(self, input_ids: torch.Tensor, attention_mask: Any = None) -> SimpleNamespace:
            # ``input_ids`` carries the float inputs (B, T, width): estimate_fisher passes it through.
            return SimpleNamespace(logits=self.layers[0](input_ids))

    return SingleLinear().to(device).eval()


def run_scale_case(args: argparse.Namespace, device: Any) -> dict[str, Any]:
    import torch

    torch.manual_seed(args.seed)
    model = single_linear_model(args.scale_width, device)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.scale_batch, args.scale_tokens, args.scale_width, generator=g).to(device)
    labels = torch.randint(0, args.scale_width, (args.scale_batch, args.scale_tokens), generator=g).to(device)
    mask = torch.ones(args.scale_batch, args.scale_tokens, dtype=torch.long, device=device)
    batch = {"input_ids": x, "attention_mask": mask, "labels": labels}
    mut = ModelUnderTest(name="linear", model=model, names=["layers.0"], task="causal-lm")
    scale_args = copy.copy(args)
    scale_args.methods = [m for m in ("exact", "trace") if m in args.methods]
    scale_args.repeats = min(args.repeats, 2)
    runners = make_runners(mut, batch, scale_args)
    return {
        "width": args.scale_width,
        "tokens": args.scale_tokens,
        "batch": args.scale_batch,
        "weights": args.scale_width**2,
        "methods": measure(runners, scale_args, device),
    }


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------


def cell(results: dict[str, Any], key: str, kind: str) -> str:
    entry = results.get(key)
    if entry is None:
        return "—"
    if entry.get("skipped"):
        return "skip"
    ratio = entry["time_ratio"] if kind == "time" else entry["memory_ratio"]
    target = TARGETS.get((key, kind))
    return common.verdict(ratio, target) if target is not None else common.ratio_text(ratio)


def header(methods: list[str]) -> list[str]:
    cols = ["model", "batch", "seq", "ref time (s)", "ref peak (MB)"]
    for key in methods:
        for kind in ("time", "memory"):
            target = TARGETS.get((key, kind))
            suffix = f" (≤{target}×)" if target else ""
            cols.append(f"{LABELS[key]} {'time' if kind == 'time' else 'peak'}{suffix}")
    return cols


def row(model: str, batch: int, seq: int, results: dict[str, Any], methods: list[str]) -> list[str]:
    ref = results["reference"]
    cells = [model, str(batch), str(seq), f"{ref['median_s']:.3f}", f"{ref['peak_bytes'] / 2**20:.0f}"]
    for key in methods:
        cells += [cell(results, key, "time"), cell(results, key, "memory")]
    return cells


def summary_lines(cases: list[dict[str, Any]], scale: dict[str, Any] | None) -> list[str]:
    lines = []
    for (key, kind), target in TARGETS.items():
        ratios = [
            c["methods"][key]["time_ratio" if kind == "time" else "memory_ratio"]
            for c in cases
            if key in c["methods"] and not c["methods"][key].get("skipped")
        ]
        ratios = [r for r in ratios if r is not None]
        if not ratios:
            lines.append(f"- {LABELS[key]} {kind} ≤ {target}×: not measured")
            continue
        passed = sum(r <= target for r in ratios)
        lines.append(
            f"- {LABELS[key]} {kind} ≤ {target}×: {passed}/{len(ratios)} cases pass "
            f"(ratios {min(ratios):.2f}–{max(ratios):.2f}×, median {common.median(ratios):.2f}×)"
        )
    if scale is not None:
        exact = scale["methods"].get("exact", {})
        if "memory_ratio" in exact:
            lines.append(
                f"- memory-scale {scale['width']}×{scale['width']} Linear, batch {scale['batch']} × "
                f"{scale['tokens']} tokens: exact peak ≤ 1.5×: "
                f"{common.verdict(exact['memory_ratio'], 1.5)} (time {exact['time_ratio']:.2f}×)"
            )
    return lines


def render(report: dict[str, Any], methods: list[str]) -> str:
    env = report["environment"]
    rows = [row(c["model"], c["batch"], c["seq"], c["methods"], methods) for c in report["cases"]]
    parts = [
        f"# Fisher cost on {env['device']}",
        "",
        f"Measured {env['started']}; torch {env['torch']}, transformers {env['transformers']}, peft "
        f"{env['peft']}; git {env['git_revision']}; {env['threads']} threads; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}.",
        "",
        f"Time: wall clock, median of {report['settings']['repeats']} interleaved repeats (after the "
        f"peak-memory run, which is the warm-up, and {report['settings']['warmup']} more warm-up run(s)). "
        f"Peak memory: {report['memory_method']}. Every ratio is the method's value divided by the plain "
        "forward+backward pass on the same batch (every weight trainable, eval mode, loss = mean of the "
        "per-example losses). `skip` = not run (reason below).",
        "",
        common.markdown_table(header(methods), rows),
        "",
    ]
    if report["not_run"]:
        parts += [f"Not run (see --smollm2-cases, --full): {', '.join(report['not_run'])}.", ""]
    skips = sorted(
        {
            f"{LABELS[k]}: {v['skipped']}"
            for c in report["cases"]
            for k, v in c["methods"].items()
            if v.get("skipped")
        }
    )
    if skips:
        parts += ["Skipped (`skip`): " + "; ".join(skips) + ".", ""]
    cpu_methods = [k for k in ("exact", "trace") if k in methods]
    if cpu_methods:
        cpu_rows = []
        for c in report["cases"]:
            cells = [c["model"], str(c["batch"]), str(c["seq"])]
            for key in cpu_methods:
                entry = c["methods"][key]
                for ratio_key in ("time_ratio", "cpu_time_ratio"):
                    cells.append(
                        "skip"
                        if entry.get("skipped")
                        else common.verdict(entry[ratio_key], TARGETS[(key, "time")])
                    )
            cpu_rows.append(cells)
        cpu_header = ["model", "batch", "seq"]
        for key in cpu_methods:
            target = TARGETS[(key, "time")]
            cpu_header += [f"{LABELS[key]} wall (≤{target}×)", f"{LABELS[key]} CPU time (≤{target}×)"]
        parts += [
            "### Wall-clock vs CPU-time ratios of our estimators",
            "",
            "Process CPU time (all threads) counts only this process's work, so on a shared machine it is "
            "the steadier of the two; both are medians over the same repeats.",
            "",
            common.markdown_table(cpu_header, cpu_rows),
            "",
        ]
    scale = report.get("scale")
    if scale is not None:
        m = scale["methods"]
        ref = m["reference"]
        scale_rows = [
            ["plain fwd+bwd", f"{ref['median_s']:.2f}", "1.00×", f"{ref['peak_bytes'] / 2**20:.0f}", "1.00×"]
        ]
        for key in ("exact", "trace"):
            if key not in m:
                continue
            if m[key].get("skipped"):
                scale_rows.append([LABELS[key], "skip", "skip", "skip", "skip"])
                continue
            scale_rows.append(
                [
                    LABELS[key],
                    f"{m[key]['median_s']:.2f}",
                    cell(m, key, "time"),
                    f"{m[key]['peak_bytes'] / 2**20:.0f}",
                    cell(m, key, "memory"),
                ]
            )
        parts += [
            f"## Memory scale: one {scale['width']}×{scale['width']} Linear "
            f"({scale['weights'] / 1e6:.1f}M weights), batch {scale['batch']} × {scale['tokens']} tokens",
            "",
            common.markdown_table(
                ["method", "time (s)", "time ratio", "peak (MB)", "peak ratio"], scale_rows
            ),
            "",
        ]
    parts += ["## Targets", "", *summary_lines(report["cases"], scale), ""]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.torch_device(args.device)
    if device is None:
        return 2
    methods = [m for m in METHODS[1:] if m in args.methods]
    env = common.environment(device, args.threads)
    print(
        f"# Fisher cost on {env['device']} (torch {env['torch']}, "
        f"load average {env['load_average_at_start']})"
    )
    if "trace" in methods and not trace_supported():
        print("note: this fimlora has no estimate_fisher(statistic='trace') yet; the trace column is skipped")
    memory_method = common.PeakMemoryDelta(device).method
    if device.type == "cpu":
        memory_method += " (glibc mmap threshold 64 KiB while measuring, so freed tensors leave RSS)"
    cases: list[dict[str, Any]] = []
    not_run: list[str] = []
    started = time.perf_counter()
    for name in args.models:
        mut = None
        for seq in args.seq_lens:
            for batch_size in args.batch_sizes:
                if name == "smollm2" and (batch_size, seq) not in args.smollm2_cases:
                    not_run.append(f"{name} {batch_size}×{seq}")
                    continue
                if mut is None:
                    mut = load(name, device, args)
                vocab = mut.model.config.vocab_size
                batch = random_batch(mut.task, vocab, batch_size, seq, args.seed, device)
                case_start = time.perf_counter()
                results = measure(make_runners(mut, batch, args), args, device)
                cases.append(
                    {
                        "model": name,
                        "batch": batch_size,
                        "seq": seq,
                        "methods": results,
                        "wall_s": time.perf_counter() - case_start,
                        "load_average": list(os.getloadavg()),
                    }
                )
                print(
                    " | ".join(row(name, batch_size, seq, results, methods))
                    + f"   [{time.perf_counter() - case_start:.0f} s]",
                    flush=True,
                )
        del mut
        gc.collect()
    scale = None
    if not args.no_scale:
        print(
            f"memory-scale case: {args.scale_width}² Linear, "
            f"batch {args.scale_batch} × {args.scale_tokens} tokens",
            flush=True,
        )
        scale = run_scale_case(args, device)
    report = {
        "environment": env,
        "settings": common.settings_of(args),
        "memory_method": memory_method,
        "targets": {f"{k}_{kind}": v for (k, kind), v in TARGETS.items()},
        "cases": cases,
        "not_run": not_run,
        "scale": scale,
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    markdown = render(report, methods)
    print()
    print(markdown)
    common.write_results(args, device, "fisher-cost", report, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
