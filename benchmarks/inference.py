"""Inference cost per method: the adapter unmerged, merged into W, and the base model, side by side.

Two workloads, each on a real model with every linear layer of the transformer blocks adapted at the
budget of uniform rank r (``--budget-rank``, default 8):

    classification  MiniLM, forward passes over ``--cls-batch`` × ``--cls-seq`` random tokens → examples/s
    causal LM       SmolLM2, greedy generation of ``--new-tokens`` tokens (EOS suppressed, KV cache) from
                    ``--gen-batch`` prompts of ``--prompt-len`` random tokens → generated tokens/s

Methods (adapters built on a copy of the base model with random, non-zero weights, so a merge changes
W; no training, which does not change the cost):

    lora       uniform rank r (PEFT LoRA)
    fim-lora   uneven ranks at the same budget: ``allocate_ranks`` on synthetic scores spread
               log-uniformly over ``--skew`` (as benchmarks/train_step.py), ``Allocation.to_lora_config``
    dora       DoRA (PEFT): uniform rank r plus the magnitude vector and the column norm of W + s·BA
    vera       VeRA (PEFT): shared random projections of rank ``--vera-rank``, per-layer scaling vectors
    adalora    AdaLoRA (PEFT): P·diag(E)·Q at init_r = 1.5·r
    hydralora  HydraLoRA (fimlora): shared A, k = ``--heads`` routed B heads; it does not merge

Each method's unmerged model, its merged model (``AdapterKind.merge``: PEFT's ``merge_and_unload``) and the
base model are timed together with :func:`fimlora.deploy.inference.measure` — one warm-up each, then
``--repeats`` interleaved rounds with the order rotated, median wall time — so the base is re-measured
next to every method and machine load hits the three alike. Peak memory (separate passes, glibc's mmap
threshold pinned so freed tensors leave RSS, :mod:`_common`): the model's weights + the peak above the
start of the pass. Adapter size: the files ``save_pretrained`` (HydraLoRA: ``save_hydralora``) writes.

Target: merged within 3 % of the base model (base time / merged time ≤ 1.03 — a merged model has the
base model's modules, so anything beyond noise would be a bug); the unmerged overhead is stated per method.

Usage: ``python benchmarks/inference.py [--quick] [--device cuda] [--tasks classification causal-lm]``
(``make bench`` runs it). Writes ``benchmarks/results/<device>-inference.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as common

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

TARGET = 1.03
METHODS = ("lora", "fim-lora", "dora", "vera", "adalora", "hydralora")
TASKS = ("classification", "causal-lm")
# Where each method's unmerged forward spends more than the base model's.
OVERHEAD = {
    "lora": "two rank-r matmuls per adapted layer",
    "fim-lora": "the same with uneven ranks (one pair of rank-r_i matmuls per layer)",
    "dora": "also the column norm of W + s·BA, recomputed every forward",
    "vera": "rank-R shared projections (R = --vera-rank) scaled by per-layer vectors",
    "adalora": "P·diag(E)·Q at init_r, masked",
    "hydralora": "a router (softmax over k heads) and k B heads per layer; cannot merge",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budget-rank", type=int, default=8, help="budget = what uniform rank r costs")
    p.add_argument("--skew", type=float, default=300.0, help="max/min of fim-lora's synthetic scores")
    p.add_argument("--vera-rank", type=int, default=256)
    p.add_argument("--heads", type=int, default=4, help="HydraLoRA's number of B heads")
    p.add_argument("--cls-batch", type=int, default=32)
    p.add_argument("--cls-seq", type=int, default=64)
    p.add_argument("--gen-batch", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="interleaved timed rounds (median reported)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (OMP_NUM_THREADS)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="small workloads and 2 repeats: proves it runs")
    p.add_argument("--output-dir", type=Path, default=common.RESULTS_DIR)
    p.add_argument("--tag", default=None, help="results file stem (default: derived from the device)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 2)
        args.cls_batch, args.cls_seq = min(args.cls_batch, 8), min(args.cls_seq, 32)
        args.gen_batch, args.prompt_len, args.new_tokens = (
            1,
            min(args.prompt_len, 16),
            min(args.new_tokens, 8),
        )
        args.vera_rank = min(args.vera_rank, 64)
    if args.repeats < 1 or args.budget_rank < 1:
        p.error("--repeats and --budget-rank must be >= 1")
    return args


# ------------------------------------------------------------------------------------------------
# Models
# ------------------------------------------------------------------------------------------------


def base_model(task: str, device: Any) -> tuple[Any, list[str], dict[str, tuple[int, int]]]:
    from fimlora.models import load_model, resolve_target_modules, weight_shapes

    if task == "classification":
        model = load_model("minilm", "classification", num_labels=2).model
    else:
        model = load_model("smollm2", "causal-lm").model
    names = resolve_target_modules(model, None)
    return model.to(device).eval(), names, weight_shapes(model, names)


def build(method: str, base: Any, task: str, names: list[str], shapes: dict, args: argparse.Namespace) -> Any:
    """The unmerged adapted model (a copy of ``base``) with random non-zero adapter weights."""
    import torch
    from peft import AdaLoraConfig, VeraConfig, get_peft_model

    from fimlora.allocation import allocate_ranks, uniform_rank_budget
    from fimlora.methods.adapters.hydralora import apply_hydralora

    torch.manual_seed(args.seed)
    model = copy.deepcopy(base)
    task_type = "SEQ_CLS" if task == "classification" else "CAUSAL_LM"
    alpha = 2 * args.budget_rank
    budget = uniform_rank_budget(shapes, args.budget_rank)
    if method == "hydralora":
        # The budget in true parameters, as fimlora's allocator spends it: a rank costs d_in + k·d_out.
        k = args.heads
        ranks = allocate_ranks(
            None,
            {n: (k * o, i) for n, (o, i) in shapes.items()},
            budget=budget - k * sum(i for _, i in shapes.values()),
            strategy="uniform",
        ).ranks
        model = apply_hydralora(model, ranks, num_heads=k, alpha=alpha, seed=args.seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lora_B"):
                    p.normal_(0, 0.02)
        return model.eval()
    if method == "vera":
        config: Any = VeraConfig(
            r=args.vera_rank, target_modules=names, projection_prng_key=args.seed, task_type=task_type
        )
    elif method == "adalora":
        config = AdaLoraConfig(
            init_r=max(args.budget_rank + 1, round(1.5 * args.budget_rank)),
            target_r=args.budget_rank,
            total_step=100,
            lora_alpha=alpha,
            target_modules=names,
            task_type=task_type,
        )
    else:
        if method == "fim-lora":
            g = torch.Generator().manual_seed(args.seed)
            exponents = torch.rand(len(names), generator=g, dtype=torch.float64).tolist()
            scores = {n: float(args.skew**u) for n, u in zip(names, exponents, strict=True)}
            allocation = allocate_ranks(scores, shapes, budget=budget, strategy="proportional")
        else:
            allocation = allocate_ranks(None, shapes, budget=budget, strategy="uniform")
        config = allocation.to_lora_config(lora_alpha=alpha, task_type=task_type, use_dora=method == "dora")
    model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # B = 0 (LoRA), λ_b = 0 (VeRA), E = 0 (AdaLoRA) at init: give them values so a merge moves W.
            if any(key in name for key in ("lora_B", "vera_lambda_b", "lora_E")):
                p.normal_(0, 0.02)
    return model.eval()


def describe(method: str, model: Any) -> dict[str, Any]:
    """Adapter parameters, ranks and the bytes its saved files take."""
    from fimlora.deploy.inference import directory_bytes
    from fimlora.methods.adapters.hydralora import hydralora_layers, save_hydralora

    with tempfile.TemporaryDirectory() as tmp:
        if method == "hydralora":
            save_hydralora(model, tmp, base_model_name_or_path=None)
            ranks = [layer.rank for layer in hydralora_layers(model).values()]
        else:
            model.save_pretrained(tmp)
            ranks = [
                int(m.r["default"]) for m in model.modules() if hasattr(m, "r") and isinstance(m.r, dict)
            ]
        size = directory_bytes(tmp)
    params = sum(
        p.numel()
        for n, p in model.named_parameters()
        if any(k in n for k in ("lora_", "vera_lambda", "router", "magnitude"))
    )
    return {
        "adapter_params": params,
        "adapter_bytes": size,
        "ranks": {"min": min(ranks), "max": max(ranks), "mean": sum(ranks) / len(ranks)} if ranks else None,
    }


def workload(task: str, base: Any, args: argparse.Namespace, device: Any) -> Any:
    import torch

    from fimlora.deploy.inference import classification_workload, generation_workload

    g = torch.Generator().manual_seed(args.seed)
    vocab = base.config.vocab_size
    if task == "classification":
        ids = torch.randint(5, vocab, (args.cls_batch, args.cls_seq), generator=g).to(device)
        return classification_workload([{"input_ids": ids, "attention_mask": torch.ones_like(ids)}])
    prompts = torch.randint(5, vocab, (args.gen_batch, args.prompt_len), generator=g).to(device)
    pad = base.config.pad_token_id if base.config.pad_token_id is not None else 0
    return generation_workload(prompts, new_tokens=args.new_tokens, pad_token_id=int(pad))


def peak_memory(model: Any, load: Any, device: Any) -> int:
    """Weights + the peak above the start of one pass, with RSS following the live tensors on a CPU."""
    import torch

    from fimlora.deploy.inference import weights_bytes

    with common.rss_tracks_tensors(), torch.no_grad(), common.PeakMemoryDelta(device) as peak:
        load.run(model)
    return weights_bytes(model) + peak.delta_bytes


# ------------------------------------------------------------------------------------------------
# Run
# ------------------------------------------------------------------------------------------------


def run_task(task: str, args: argparse.Namespace, device: Any) -> dict[str, Any]:
    from fimlora.deploy.inference import measure
    from fimlora.methods import get_adapter

    base, names, shapes = base_model(task, device)
    load = workload(task, base, args, device)
    out: dict[str, Any] = {
        "workload": load.description,
        "unit": load.unit,
        "modules": len(names),
        "methods": {},
    }
    print(f"## {task}: {load.description}, {len(names)} adapted modules", flush=True)
    for method in args.methods:
        started = time.perf_counter()
        unmerged = build(method, base, task, names, shapes, args)
        entry: dict[str, Any] = describe(method, unmerged)
        adapter = get_adapter({"fim-lora": "lora", "adalora": "lora"}.get(method, method))
        models = {"base": base, "unmerged": unmerged}
        if adapter.unmergeable_reason is None:
            models["merged"] = adapter.merge(copy.deepcopy(unmerged))
        timing = measure(models, load, repeats=args.repeats)
        base_s = timing["models"]["base"]["seconds"]
        for name, record in timing["models"].items():
            entry[name] = {
                "per_s": record["per_s"],
                "seconds": record["seconds"],
                "peak_memory_bytes": peak_memory(models[name], load, device),
            }
            entry[name]["time_over_base"] = record["seconds"] / base_s
        entry["overhead_source"] = OVERHEAD[method]
        out["methods"][method] = entry
        merged = entry.get("merged", {}).get("time_over_base")
        print(
            f"  {method}: unmerged {entry['unmerged']['time_over_base']:.2f}× base time, merged "
            f"{'—' if merged is None else f'{merged:.2f}×'} ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )
        del models, unmerged
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    common.set_threads(args.threads)
    device = common.torch_device(args.device)
    if device is None:
        return 2
    env = common.environment(device, args.threads)
    print(f"# Inference cost on {env['device']} (load average {env['load_average_at_start']})", flush=True)
    started = time.perf_counter()
    tasks = {task: run_task(task, args, device) for task in args.tasks}
    report = {
        "environment": env,
        "settings": common.settings_of(args),
        "target_merged_time_over_base": TARGET,
        "tasks": tasks,
        "load_average_at_end": list(os.getloadavg()),
        "wall_s": time.perf_counter() - started,
    }
    markdown = render(report)
    print(markdown)
    common.write_results(args, device, "inference", report, markdown)
    return 0


def render(report: dict[str, Any]) -> str:
    env, s = report["environment"], report["settings"]
    mb = functools.partial(lambda b: f"{b / 2**20:,.1f}")
    parts = [
        f"# Inference cost on {env['device']}",
        "",
        f"Measured {env['started']}; torch {env['torch']}, transformers {env['transformers']}, peft "
        f"{env['peft']}; git {env['git_revision']}; load average at start "
        f"{', '.join(f'{x:.2f}' for x in env['load_average_at_start'])}, at end "
        f"{', '.join(f'{x:.2f}' for x in report['load_average_at_end'])}. Budget = uniform rank "
        f"{s['budget_rank']} on every linear layer of the blocks; median of {s['repeats']} interleaved "
        "rounds "
        "(base, unmerged, merged) per method after one warm-up each.",
        "",
    ]
    for task, result in report["tasks"].items():
        header = [
            "method",
            "adapter params",
            "ranks min/mean/max",
            "adapter on disk (MiB)",
            f"unmerged ({result['unit']})",
            f"merged ({result['unit']})",
            f"base ({result['unit']})",
            f"merged time / base (≤{TARGET}×)",
            "unmerged time / base",
            "peak memory unmerged / merged / base (MiB)",
        ]
        rows = []
        for method, e in result["methods"].items():
            ranks = e["ranks"]
            merged = e.get("merged")
            rows.append(
                [
                    method,
                    f"{e['adapter_params']:,}",
                    f"{ranks['min']}/{ranks['mean']:.2f}/{ranks['max']}" if ranks else "—",
                    mb(e["adapter_bytes"]),
                    f"{e['unmerged']['per_s']:.1f}",
                    "—" if merged is None else f"{merged['per_s']:.1f}",
                    f"{e['base']['per_s']:.1f}",
                    "— (does not merge)"
                    if merged is None
                    else common.verdict(merged["time_over_base"], TARGET),
                    common.ratio_text(e["unmerged"]["time_over_base"]),
                    " / ".join(
                        "—" if e.get(k) is None else mb(e[k]["peak_memory_bytes"])
                        for k in ("unmerged", "merged", "base")
                    ),
                ]
            )
        parts += [f"## {task}: {result['workload']}, {result['modules']} adapted modules", ""]
        parts += [common.markdown_table(header, rows), ""]
        parts += ["Unmerged overhead per method (time over the base model's, minus 1):", ""]
        for method, e in result["methods"].items():
            overhead = e["unmerged"]["time_over_base"] - 1
            parts.append(f"- {method}: {overhead:+.0%} — {e['overhead_source']}")
        parts.append("")
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
