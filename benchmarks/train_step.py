"""Training-step cost of fim-lora's uneven ranks vs uniform LoRA at the same budget, of AdaLoRA, and of
fim-lora-dynamic's online Fisher.

On MiniLM (classification head, every linear layer inside the transformer blocks adapted):

    lora              uniform rank r on every module; its parameter count is the budget
    fim-lora          a skewed rank pattern at the same budget: ``allocate_ranks`` ("proportional") on
                      synthetic scores spread log-uniformly over ``--skew`` (max/min; 300 ≈ what the real
                      MiniLM Fisher gives, see the README), as ``Allocation.to_lora_config``
    adalora           peft.AdaLoraConfig(init_r=1.5·r, target_r=r), ``update_and_allocate(step)`` every
                      step (the importance EMAs, the cubic budget schedule and the masking are part of it)
    fim-lora-dynamic  fim-lora's ranks with the online Fisher's hooks on (``fimlora.fisher.online``: the
                      per-example trace of every frozen weight from the step's own pass, folded into the
                      running average after the step), as in the steps before its last re-allocation

A step is forward (train mode, dropout on) + backward + AdamW step (+ AdaLoRA's update, + the online
Fisher) + zero_grad, on random token ids from a fixed seed, the same batches for every method. The
methods' steps are interleaved (lora, fim-lora, adalora, fim-lora-dynamic, lora, …) so a change in
machine load hits them alike; the step time is the median after warm-up steps. Targets: fim-lora within
5 % of uniform LoRA (ratio ≤ 1.05); fim-lora-dynamic within 15 % (ratio ≤ 1.15). One re-allocation of
fim-lora-dynamic (re-solve on the accumulated trace, re-size the layers, swap the optimizer's tensors)
is timed once at the end: it happens twice per run by default, not every step.

Usage: ``python benchmarks/train_step.py [--quick] [--device cuda]`` (``make bench`` runs it).
Writes ``benchmarks/results/<device>-train-step.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TARGET = 1.05
TARGET_DYNAMIC = 1.15
METHODS = ("lora", "fim-lora", "adalora", "fim-lora-dynamic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="timed steps per method (median reported)")
    p.add_argument("--warmup-steps", type=int, default=5, help="untimed steps per method first")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--budget-rank", type=int, default=4, help="budget = what uniform rank r costs")
    p.add_argument("--skew", type=float, default=300.0, help="max/min of fim-lora's synthetic scores")
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="10 timed steps after 2 warm-up steps")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.warmup_steps = min(args.steps, 10), min(args.warmup_steps, 2)
    if args.steps < 1 or args.warmup_steps < 0:
        p.error("--steps must be >= 1 and --warmup-steps >= 0")
    return args


def build(args: argparse.Namespace, device: Any) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """The PEFT models (deep copies of one seeded base model) and what each one trains."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    from fimlora.allocation import allocate_ranks, uniform_rank_budget
    from fimlora.models import linear_modules, load_model, resolve_target_modules

    torch.manual_seed(args.seed)
    base = load_model("minilm", "classification", num_labels=2).model
    names = resolve_target_modules(base, None)
    linears = linear_modules(base)
    shapes = {n: (linears[n].out_features, linears[n].in_features) for n in names}
    budget = uniform_rank_budget(shapes, args.budget_rank)
    g = torch.Generator().manual_seed(args.seed)
    exponents = torch.rand(len(names), generator=g, dtype=torch.float64).tolist()
    scores = {n: float(args.skew**u) for n, u in zip(names, exponents, strict=True)}
    allocations = {
        "lora": allocate_ranks(None, shapes, budget=budget, strategy="uniform"),
        "fim-lora": allocate_ranks(scores, shapes, budget=budget, strategy="proportional"),
    }
    allocations["fim-lora-dynamic"] = allocations["fim-lora"]
    alpha = 2 * args.budget_rank
    total_steps = args.warmup_steps + args.steps
    init_r = max(args.budget_rank + 1, round(1.5 * args.budget_rank))
    configs = {
        key: allocation.to_lora_config(lora_alpha=alpha, task_type="SEQ_CLS", lora_dropout=0.0)
        for key, allocation in allocations.items()
    }
    # AdaLoRA's schedule squeezed into the run: tinit steps of warm-up, then the cubic budget decrease
    # with a re-mask every step (deltaT=1), then tfinal steps of fine-tuning at the final ranks.
    configs["adalora"] = AdaLoraConfig(
        init_r=init_r,
        target_r=args.budget_rank,
        tinit=max(1, total_steps // 10),
        tfinal=max(1, total_steps // 5),
        deltaT=1,
        total_step=total_steps,
        lora_alpha=alpha,
        lora_dropout=0.0,
        target_modules=names,
        task_type="SEQ_CLS",
    )
    models, info = {}, {}
    for key in METHODS:
        torch.manual_seed(args.seed)
        model = get_peft_model(copy.deepcopy(base), configs[key]).to(device)
        model.train()
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        models[key] = model
        entry: dict[str, Any] = {
            "adapter_params_at_start": adapter,
            "trainable_params": trainable,
            "budget": budget,
        }
        if key in allocations:
            ranks = list(allocations[key].ranks.values())
            entry["ranks"] = {"min": min(ranks), "mean": sum(ranks) / len(ranks), "max": max(ranks)}
            entry["allocation_params"] = allocations[key].num_params
        else:
            entry["ranks"] = {"init_r": init_r, "target_r": args.budget_rank, "note": "AdaLoRA budgets ranks"}
        info[key] = entry
    return models, info


def online_trace(model: Any) -> Any:
    """fim-lora-dynamic's online Fisher as its callback attaches it: on every target's frozen linear
    layer, the input embeddings' output requiring a gradient."""
    from fimlora.fisher.online import OnlineTrace
    from fimlora.methods.allocations.fisher_online import frozen_linear
    from fimlora.methods.resize import lora_layers

    layers = {name: frozen_linear(model, name) for name in lora_layers(model)}
    trace = OnlineTrace(model, layers, task="classification", inputs_require_grad=True)
    trace.attach()
    return trace


def time_reallocation(model: Any, optimizer: Any, trace: Any, info: dict[str, Any], device: Any) -> dict:
    """One re-allocation as the callback runs it: re-solve on the averaged trace, re-size, swap tensors."""
    from fimlora.allocation import allocate_ranks
    from fimlora.methods.resize import lora_layers, replace_in_optimizer, set_ranks

    layers = lora_layers(model)
    shapes = {n: (layer.out_features, layer.in_features) for n, layer in layers.items()}
    changed: list[Any] = []

    def reallocate() -> None:
        traces = trace.averaged()
        scores = {n: v / (shapes[n][0] * shapes[n][1]) for n, v in traces.items()}
        allocation = allocate_ranks(scores, shapes, budget=info["budget"], strategy="proportional")
        changes = set_ranks(model, allocation.ranks, scaling="alpha_over_r")
        replace_in_optimizer(optimizer, [pair for c in changes for pair in c.replaced])
        changed.extend(changes)

    wall, cpu = common.timed(reallocate, device)
    return {"wall_s": wall, "cpu_s": cpu, "changed_modules": len(changed), "fisher_steps": trace.steps}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    import torch

    device = common.torch_device(args.device)
    if device is None:
        return 2
    env = common.environment(device, args.threads)
    print(f"# Training-step cost on {env['device']} (load average {env['load_average_at_start']})")
    started = time.perf_counter()
    models, info = build(args, device)
    optimizers = {
        k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=args.learning_rate)
        for k, m in models.items()
    }
    g = torch.Generator().manual_seed(args.seed)
    vocab = models["lora"].config.vocab_size
    batches = []
    for _ in range(8):
        ids = torch.randint(5, vocab, (args.batch_size, args.seq_len), generator=g)
        labels = torch.randint(0, 2, (args.batch_size,), generator=g)
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    batches = [{k: v.to(device) for k, v in b.items()} for b in batches]
    trace = online_trace(models["fim-lora-dynamic"])

    def step(key: str, index: int) -> None:
        model, optimizer = models[key], optimizers[key]
        loss = model(**batches[index % len(batches)]).loss  # AdaLoRA adds its orthogonality penalty here
        loss.backward()
        optimizer.step()
        if key == "adalora":
            model.base_model.update_and_allocate(index)
        elif key == "fim-lora-dynamic":
            trace.end_step()
        optimizer.zero_grad(set_to_none=True)

    walls: dict[str, list[float]] = {k: [] for k in METHODS}
    cpus: dict[str, list[float]] = {k: [] for k in METHODS}
    for index in range(args.warmup_steps + args.steps):
        shift = index % len(METHODS)
        order = METHODS[shift:] + METHODS[:shift]  # rotate: no method always runs first
        for key in order:
            wall, cpu = common.timed(functools.partial(step, key, index), device)
            if index >= args.warmup_steps:
                walls[key].append(wall)
                cpus[key].append(cpu)
    results = {}
    for key in METHODS:
        results[key] = {
            **info[key],
            "step_times_s": walls[key],
            "step_cpu_times_s": cpus[key],
            "median_step_s": common.median(walls[key]),
            "median_step_cpu_s": common.median(cpus[key]),
        }
    for key in METHODS:
        results[key]["time_ratio"] = results[key]["median_step_s"] / results["lora"]["median_step_s"]
        results[key]["cpu_time_ratio"] = (
            results[key]["median_step_cpu_s"] / results["lora"]["median_step_cpu_s"]
        )
    dynamic = results["fim-lora-dynamic"]
    dynamic["time_ratio_vs_fim_lora"] = dynamic["median_step_s"] / results["fim-lora"]["median_step_s"]
    dynamic["cpu_time_ratio_vs_fim_lora"] = (
        dynamic["median_step_cpu_s"] / results["fim-lora"]["median_step_cpu_s"]
    )
    dynamic["reallocation"] = time_reallocation(
        models["fim-lora-dynamic"], optimizers["fim-lora-dynamic"], trace, info["fim-lora-dynamic"], device
    )
    adalora_model = models["adalora"]
    final_ranks = adalora_model.peft_config["default"].rank_pattern
    if final_ranks:
        kept = [int(sum(mask)) for mask in final_ranks.values()]
        results["adalora"]["ranks"]["final_total"] = sum(kept)
    report = {
        "environment": env,
        "settings": common.settings_of(args),
        "target_fim_lora_over_lora": TARGET,
        "target_fim_lora_dynamic_over_lora": TARGET_DYNAMIC,
        "methods": results,
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    markdown = render(report)
    print(markdown)
    common.write_results(args, device, "train-step", report, markdown)
    return 0


def render(report: dict[str, Any]) -> str:
    env, s, m = report["environment"], report["settings"], report["methods"]
    dynamic = m["fim-lora-dynamic"]
    realloc = dynamic["reallocation"]
    rows = []
    for key in METHODS:
        r = m[key]
        ranks = r["ranks"]
        rank_text = (
            f"{ranks['min']}/{ranks['mean']:.2f}/{ranks['max']}"
            if "min" in ranks
            else f"init {ranks['init_r']} → target {ranks['target_r']} (avg)"
        )
        if key in ("fim-lora", "fim-lora-dynamic"):
            target = TARGET if key == "fim-lora" else TARGET_DYNAMIC
            wall, cpu = common.verdict(r["time_ratio"], target), common.verdict(r["cpu_time_ratio"], target)
        else:
            wall, cpu = common.ratio_text(r["time_ratio"]), common.ratio_text(r["cpu_time_ratio"])
        rows.append(
            [
                key,
                f"{r['adapter_params_at_start']:,}",
                f"{r['budget']:,}",
                rank_text,
                f"{r['median_step_s'] * 1e3:.0f}",
                wall,
                f"{r['median_step_cpu_s'] * 1e3:.0f}",
                cpu,
            ]
        )
    header = [
        "method",
        "adapter params",
        "budget",
        "ranks min/mean/max",
        "step (ms, wall)",
        f"vs lora, wall (fim-lora ≤{TARGET}×, dynamic ≤{TARGET_DYNAMIC}×)",
        "step (ms, CPU)",
        f"vs lora, CPU (fim-lora ≤{TARGET}×, dynamic ≤{TARGET_DYNAMIC}×)",
    ]
    return "\n".join(
        [
            f"# Training-step cost on {env['device']}",
            "",
            f"Measured {env['started']}; torch {env['torch']}, transformers {env['transformers']}, peft "
            f"{env['peft']}; git {env['git_revision']}; load average at start "
            f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}, at end "
            f"{', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}.",
            "",
            f"MiniLM, batch {s['batch_size']} × {s['seq_len']} tokens, "
            f"budget = uniform rank {s['budget_rank']}; "
            f"median of {s['steps']} interleaved steps after {s['warmup_steps']} warm-up steps "
            "(forward + backward + AdamW + AdaLoRA's update_and_allocate + fim-lora-dynamic's online "
            "Fisher). AdaLoRA's adapter starts at init_r (over the budget) and masks down to target_r on "
            "average; its params are counted at start. fim-lora-dynamic has fim-lora's ranks and its "
            "online-Fisher hooks on (as before its last re-allocation).",
            "",
            common.markdown_table(header, rows),
            "",
            f"fim-lora-dynamic over fim-lora (the online Fisher alone): "
            f"{common.ratio_text(dynamic['time_ratio_vs_fim_lora'])} wall, "
            f"{common.ratio_text(dynamic['cpu_time_ratio_vs_fim_lora'])} CPU. One re-allocation "
            f"(re-solve on the trace of {realloc['fisher_steps']} steps, re-size "
            f"{realloc['changed_modules']} modules, swap the optimizer's tensors): "
            f"{realloc['wall_s'] * 1e3:.0f} ms wall, {realloc['cpu_s'] * 1e3:.0f} ms CPU, once per "
            "scheduled re-allocation (twice per run by default).",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
