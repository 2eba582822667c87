"""The optimizers fimlora builds, in the harness's own training path.

* Riemannian: every optimiser step the Trainer takes equals AdamW (with the Trainer's lr schedule,
  clipping and weight decay) fed the preconditioned gradients (BᵀB + λI)⁻¹∇A and ∇B(AAᵀ + λI)⁻¹,
  predicted here by hand; plain AdamW does not pass the same check.
* LoRA+, LoRA-FA, Riemannian: weight decay on exactly the parameters the Trainer's own AdamW decays (not
  on biases or normalisation weights), and the Trainer's Adam eps and betas.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from fimlora.config import parse_config
from fimlora.experiment import build_method, prepare
from fimlora.train import train

WEIGHT_DECAY = 0.05
REG = 0.05


@pytest.fixture(scope="module")
def prepared(tiny_bert_dir, sentiment_csv, tmp_path_factory):
    config = parse_config(
        {
            "model": str(tiny_bert_dir),
            "dataset": str(sentiment_csv),
            "dataset_options": {"text_column": "review", "label_column": "sentiment"},
            "output_dir": str(tmp_path_factory.mktemp("optimizers")),
            "methods": ["lora", "riemannian", "loraplus", "lora-fa"],
            "budget": {"uniform_rank": 4},
            "train": {
                "steps": 4,
                "batch_size": 8,
                "learning_rate": 1e-2,
                "weight_decay": WEIGHT_DECAY,
                "warmup_ratio": 0.25,  # one warm-up step: the lr changes from step to step
                "max_length": 24,
                "report_to": [],
            },
            "method_options": {"riemannian": {"reg": REG}},
        }
    )
    return prepare(config)


class RiemannianAdamWReference(TrainerCallback):
    """Predicts each LoRA factor after every optimiser step as AdamW on the Riemannian-preconditioned
    gradient, written out here (float64, own moment estimates); records the largest deviation.

    torch's AdamW: p ← p(1 − η·wd); m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
    p ← p − η · (m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε), with g the preconditioned gradient.
    """

    def __init__(self, model: torch.nn.Module, reg: float) -> None:
        params = dict(model.named_parameters())
        self.pairs = [
            (params[n], params[n.replace(".lora_A.", ".lora_B.")]) for n in params if ".lora_A." in n
        ]
        self.reg = reg
        self.moments: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.steps = 0
        self.predicted: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.largest_deviation = 0.0

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        settings = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        self.steps += 1
        self.predicted = []
        for a_param, b_param in self.pairs:
            a, b = a_param.detach().double(), b_param.detach().double()
            eye = torch.eye(a.shape[0], dtype=torch.float64)
            grads = {
                id(a_param): torch.linalg.inv(b.T @ b + self.reg * eye) @ a_param.grad.double(),
                id(b_param): b_param.grad.double() @ torch.linalg.inv(a @ a.T + self.reg * eye),
            }
            after = []
            for param, value in ((a_param, a), (b_param, b)):
                group = settings[id(param)]
                (beta1, beta2), eps, lr = group["betas"], group["eps"], group["lr"]
                g = grads[id(param)]
                m, v = self.moments.get(id(param), (torch.zeros_like(g), torch.zeros_like(g)))
                m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
                self.moments[id(param)] = (m, v)
                m_hat, v_hat = m / (1 - beta1**self.steps), v / (1 - beta2**self.steps)
                decayed = value * (1 - lr * group["weight_decay"])
                after.append(decayed - lr * m_hat / (v_hat.sqrt() + eps))
            self.predicted.append((after[0], after[1]))

    def on_optimizer_step(self, args, state, control, **kwargs):
        for (a_param, b_param), (a_expected, b_expected) in zip(self.pairs, self.predicted, strict=True):
            for param, expected in ((a_param, a_expected), (b_param, b_expected)):
                deviation = float((param.detach().double() - expected).abs().max())
                self.largest_deviation = max(self.largest_deviation, deviation)


def _train_checked(prepared, method: str, tmp_path: Path) -> RiemannianAdamWReference:
    """Train ``method`` through fimlora's ``train`` (the Trainer), checked against the reference."""
    built = build_method(prepared, method)
    optimizer = built.optimizer_kind.build(built.model, built.ctx)
    reference = RiemannianAdamWReference(built.model, REG)
    train(
        built.model,
        prepared.tokenized["train"],
        prepared.collator,
        prepared.config.train,
        seed=0,
        work_dir=tmp_path,
        metrics_path=tmp_path / "metrics.jsonl",
        progress=False,
        optimizer=optimizer,
        callbacks=[reference],
    )
    return reference


def test_riemannian_trains_as_adamw_on_preconditioned_gradients_in_the_harness(prepared, tmp_path):
    reference = _train_checked(prepared, "riemannian", tmp_path / "r")
    assert reference.steps == prepared.config.train.steps
    assert reference.largest_deviation < 1e-6
    # The same check on plain AdamW (the Trainer's own, for `lora`) fails: the check can tell them apart.
    plain = _train_checked(prepared, "lora", tmp_path / "a")
    assert plain.steps == prepared.config.train.steps
    assert plain.largest_deviation > 1e-3


def _weight_decay_by_name(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> dict[str, float]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}


@pytest.mark.parametrize("method", ["loraplus", "lora-fa", "riemannian"])
def test_weight_decay_follows_the_trainers_adamw(prepared, method, tmp_path):
    built = build_method(prepared, method)
    model = built.model
    for name, param in model.named_parameters():
        if "encoder.layer.1.output.LayerNorm" in name:
            param.requires_grad_(True)  # a trained normalisation layer, which the Trainer never decays
    ours = _weight_decay_by_name(built.optimizer_kind.build(model, built.ctx), model)
    args = TrainingArguments(
        output_dir=str(tmp_path), weight_decay=WEIGHT_DECAY, use_cpu=True, report_to="none"
    )
    theirs = _weight_decay_by_name(Trainer(model=model, args=args).create_optimizer(), model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert set(theirs) == set(trainable)
    assert {n: ours[n] for n in trainable} == theirs
    undecayed = {n for n in trainable if theirs[n] == 0.0}
    assert any(n.endswith("bias") for n in undecayed) and any("LayerNorm" in n for n in undecayed)
    assert any(theirs[n] == WEIGHT_DECAY for n in trainable if "lora_B" in n)


@pytest.mark.parametrize("method", ["loraplus", "lora-fa", "riemannian"])
def test_adam_eps_and_betas_are_the_trainers(prepared, method):
    built = build_method(prepared, method)
    optimizer = built.optimizer_kind.build(built.model, built.ctx)
    defaults = TrainingArguments(output_dir="unused")
    for group in optimizer.param_groups:
        assert group["eps"] == defaults.adam_epsilon
        assert tuple(group["betas"]) == (defaults.adam_beta1, defaults.adam_beta2)
