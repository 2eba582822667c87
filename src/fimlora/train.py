"""Wrap a base model with a PEFT LoRA adapter and train it with the transformers ``Trainer``."""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import (
    PrinterCallback,
    ProgressCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)

from fimlora.config import TrainSettings
from fimlora.errors import FimloraError
from fimlora.fisher.losses import CausalLMHead
from fimlora.processes import world_size

# transformers' own deprecation notice, raised from inside PEFT and Trainer; nothing a user can act on.
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


def build_peft_model(model: nn.Module, lora_config: LoraConfig, *, seed: int) -> PeftModel:
    """Wrap ``model`` (modified in place) after seeding, so every method starts from the same RNG state."""
    set_seed(seed)
    return get_peft_model(model, lora_config)


def parameter_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters split into the LoRA adapter and the fully trained head (modules_to_save)."""
    adapter = head = other = 0
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if "lora_" in name:
            adapter += param.numel()
        elif "modules_to_save" in name:
            head += param.numel()
        else:
            other += param.numel()
    return {"adapter_params": adapter, "head_params": head, "other_trainable_params": other}


class PeakMemory:
    """Peak memory of a phase: CUDA's allocator peak on GPU, else the process's sampled peak RSS.

    ``ru_maxrss`` is a lifetime maximum of the process, useless for comparing phases run one after
    another, so RSS is sampled every 20 ms from ``/proc/self/statm`` while the phase runs.
    """

    def __init__(self, device: torch.device, *, interval_s: float = 0.02) -> None:
        self.device = device
        self.interval_s = interval_s
        self.start_bytes = 0  # the level at entry: allocated CUDA memory, or RSS
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _rss_bytes() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            return 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.peak_bytes = max(self.peak_bytes, self._rss_bytes())

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = int(torch.cuda.memory_allocated(self.device))
        else:
            self.start_bytes = self.peak_bytes = self._rss_bytes()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            self.peak_bytes = max(self.peak_bytes, self._rss_bytes())

    @property
    def above_start_bytes(self) -> int:
        """The peak above the level at entry (0 when nothing was seen above it)."""
        return max(0, self.peak_bytes - self.start_bytes)

    @property
    def kind(self) -> str:
        return "cuda_max_allocated" if self.device.type == "cuda" else "process_peak_rss"


class _LossInProgressBar(ProgressCallback):
    """Trainer's progress bar, with the loss shown on the bar instead of a printed dict every step."""

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if self.training_bar is not None and logs and "loss" in logs:
            self.training_bar.set_postfix(loss=f"{float(logs['loss']):.4f}", refresh=False)


class _StepLog(TrainerCallback):
    """Appends one JSON line per logged step and stops the run on a non-finite loss."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.started = time.perf_counter()
        self.last_loss: float | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        loss = float(logs["loss"])
        if not math.isfinite(loss):
            raise FimloraError(
                f"Training loss became {loss} at step {state.global_step}; lower the learning rate."
            )
        self.last_loss = loss
        record = {"step": state.global_step, "elapsed_s": round(time.perf_counter() - self.started, 3)}
        record.update({k: v for k, v in logs.items() if isinstance(v, int | float)})
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


class PeriodicValidation(TrainerCallback):
    """Evaluates the model every ``every`` optimiser steps during training (not after the last step: the
    run's own evaluation follows) and appends ``{"step": …, <metric>: …}`` to ``path``.

    ``on_result(step, metrics)`` sees each evaluation (e.g. to report it to an Optuna pruner; it may
    raise to stop training). The evaluation runs inside ``torch.random.fork_rng``, so the training
    trajectory (dropout masks, data order) is exactly that of a run without it.
    """

    def __init__(
        self,
        every: int,
        evaluate: Callable[[nn.Module], dict[str, float]],
        path: Path,
        on_result: Callable[[int, dict[str, float]], None] | None = None,
    ) -> None:
        self.every = every
        self.evaluate = evaluate
        self.path = path
        self.on_result = on_result

    def on_step_end(self, args, state, control, model=None, **kwargs):  # type: ignore[no-untyped-def]
        step = state.global_step
        if step % self.every or step >= state.max_steps or not state.is_world_process_zero:
            return
        assert model is not None
        device = next(model.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            metrics = self.evaluate(model)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"step": step, **metrics}) + "\n")
        if self.on_result is not None:
            self.on_result(step, metrics)


class _MethodTrainer(Trainer):
    """The Trainer, plus an optional auxiliary loss of the method (e.g. HydraLoRA's router balance).

    With ``lm_head`` (a causal LM), the model returns its hidden states and ``compute_loss_func`` (the
    head's :meth:`~fimlora.fisher.losses.CausalLMHead.trainer_loss`) applies the head chunk by chunk:
    the Trainer's own reduction (``num_items_in_batch``, the multi-process scaling) is unchanged.
    """

    extra_loss: Callable[[], torch.Tensor] | None = None
    lm_head: CausalLMHead | None = None

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
        with self.lm_head.hidden_states() if self.lm_head is not None else contextlib.nullcontext():
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
        if self.extra_loss is not None:
            loss = loss + self.extra_loss()
        return (loss, outputs) if return_outputs else loss


def _loggers(report_to: list[str], logging_dir: Path | None) -> tuple[list[str], list[TrainerCallback]]:
    """Trainer ``report_to`` passthrough; TensorBoard writes into the run's own ``logging_dir``."""
    if "tensorboard" not in report_to or logging_dir is None:
        return list(report_to) or ["none"], []
    from torch.utils.tensorboard import SummaryWriter
    from transformers.integrations import TensorBoardCallback

    others = [r for r in report_to if r != "tensorboard"]
    return others or ["none"], [TensorBoardCallback(tb_writer=SummaryWriter(log_dir=str(logging_dir)))]


def _sampling_arguments(sampling: str) -> dict[str, Any]:
    """The Trainer's order of training examples; transformers 5.x names it train_sampling_strategy, 4.x
    had a group_by_length flag."""
    if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__:
        return {"train_sampling_strategy": sampling}
    return {"group_by_length": sampling == "group_by_length"}


def _checkpointing_arguments(enabled: bool) -> dict[str, Any]:
    """transformers' own activation (gradient) checkpointing, non-reentrant.

    Non-reentrant checkpointing needs no block input that requires grad, so gradients still reach the
    adapters of the first block behind a frozen embedding. transformers 5.2x renamed the arguments.
    """
    kwargs = {"use_reentrant": False}
    if "activation_checkpointing" in TrainingArguments.__dataclass_fields__:
        return {"activation_checkpointing": enabled, "activation_checkpointing_kwargs": kwargs}
    return {"gradient_checkpointing": enabled, "gradient_checkpointing_kwargs": kwargs}


@dataclass
class TrainOutcome:
    steps: int
    examples: int
    wall_time_s: float
    examples_per_s: float
    final_train_loss: float | None
    peak_memory_bytes: int
    peak_memory_kind: str
    processes: int = 1  # training processes (DDP); memory and loss are the main process's

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def train(
    model: nn.Module,
    train_dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    settings: TrainSettings,
    *,
    seed: int,
    work_dir: Path,
    metrics_path: Path,
    progress: bool = True,
    optimizer: torch.optim.Optimizer | None = None,
    callbacks: Sequence[TrainerCallback] = (),
    extra_loss: Callable[[], torch.Tensor] | None = None,
    learning_rate: float | None = None,
    logging_dir: Path | None = None,
    loss_per_token: bool = False,
) -> TrainOutcome:
    """Train for ``settings.steps`` optimiser steps; per-step metrics go to ``metrics_path``.

    ``optimizer`` replaces the Trainer's AdamW (the Trainer still builds the warm-up/decay schedule
    around it); ``callbacks`` and ``extra_loss`` are the method's training-time hooks;
    ``learning_rate`` overrides ``settings.learning_rate`` (full fine-tuning's scaled rate).
    ``loss_per_token``: the model's loss is a mean over tokens that honours ``num_items_in_batch``
    (causal LM); otherwise a mean over the process's examples (sequence classification).
    """
    if len(train_dataset) == 0:
        raise FimloraError("The training split is empty.")
    processes = world_size()
    if settings.batch_size % processes:
        raise FimloraError(
            f"train.batch_size {settings.batch_size} is the global batch and must split evenly over the "
            f"{processes} processes."
        )
    report_to, logger_callbacks = _loggers(settings.report_to, logging_dir)
    args = TrainingArguments(
        output_dir=str(work_dir),
        max_steps=settings.steps,
        # One optimiser step sees train.batch_size examples however many processes share it.
        per_device_train_batch_size=settings.batch_size // processes,
        learning_rate=settings.learning_rate if learning_rate is None else learning_rate,
        weight_decay=settings.weight_decay,
        warmup_steps=int(settings.warmup_ratio * settings.steps),
        lr_scheduler_type=settings.lr_scheduler,
        logging_steps=1,
        save_strategy="no",
        eval_strategy="no",
        report_to=report_to,
        seed=seed,
        data_seed=seed,
        disable_tqdm=not progress,
        dataloader_num_workers=0,
        remove_unused_columns=False,
        label_names=["labels"],
        use_cpu=not torch.cuda.is_available(),
        # With several processes the Trainer multiplies the loss by their number, expecting the model to
        # divide by the token count of the whole global batch. Classification heads average over their
        # own examples and ignore that count: scaled, their gradients would be N times too large (and
        # clipped differently); DDP's average of the per-process means is already the global mean.
        average_tokens_across_devices=loss_per_token,
        **_checkpointing_arguments(settings.gradient_checkpointing),
        **_sampling_arguments(settings.sampling),
    )
    step_log = _StepLog(metrics_path)
    # A causal LM's loss without the batch's full logits (fimlora.fisher.losses.CausalLMHead).
    lm_head = CausalLMHead.of(model) if loss_per_token else None
    trainer = _MethodTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        data_collator=collator,
        callbacks=[step_log, *logger_callbacks, *callbacks],
        optimizers=(optimizer, None),
        compute_loss_func=lm_head.trainer_loss if lm_head is not None else None,
    )
    trainer.extra_loss = extra_loss
    trainer.lm_head = lm_head
    if progress:
        trainer.remove_callback(ProgressCallback)
        trainer.add_callback(_LossInProgressBar())
    else:
        # Without a bar the Trainer prints every log dict; the step log already keeps them.
        trainer.remove_callback(PrinterCallback)
    device = next(model.parameters()).device
    started = time.perf_counter()
    with PeakMemory(device) as memory:
        trainer.train()
    wall = time.perf_counter() - started
    for callback in logger_callbacks:
        writer = getattr(callback, "tb_writer", None)
        if writer is not None:
            writer.close()
    examples = settings.steps * settings.batch_size
    model.eval()
    return TrainOutcome(
        steps=settings.steps,
        examples=examples,
        wall_time_s=round(wall, 3),
        examples_per_s=round(examples / wall, 3),
        final_train_loss=step_log.last_loss,
        peak_memory_bytes=memory.peak_bytes,
        peak_memory_kind=memory.kind,
        processes=processes,
    )
