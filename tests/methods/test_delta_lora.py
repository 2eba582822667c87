"""Delta-LoRA: W moves by λ·s·Δ(BA) after the K start steps, and the moved W survives save/reload and merge.

The paper's Algorithm 1 runs ``for t = 0, …, T−1`` and moves W ``if t > K``: the 1-based step n moves W
only when n − 1 > K, so steps 1, …, K + 1 leave it alone.
"""

from __future__ import annotations

import gc
import json
import math

import pytest
import torch
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from tiny_models import make_tiny_bert, make_tiny_llama
from torch import nn
from transformers import Trainer, TrainerCallback, TrainerState, TrainingArguments

from fimlora.errors import FimloraError
from fimlora.methods.adapters.delta_lora import (
    DRIFT_CONFIG_NAME,
    DeltaLoraCallback,
    DeltaLoraUpdater,
    apply_weight_drift,
    merged_model,
    save_weight_drift,
)

LAMBDA = 2.0


def _bert_lora(**overrides) -> PeftModel:
    options = dict(
        r=4,
        lora_alpha=8,
        target_modules=["query", "value", "intermediate.dense"],
        rank_pattern={
            "bert.encoder.layer.0.attention.self.query": 2,
            "bert.encoder.layer.1.intermediate.dense": 8,
        },
        alpha_pattern={"bert.encoder.layer.1.attention.self.value": 4},
        lora_dropout=0.0,
        init_lora_weights=True,
        task_type="SEQ_CLS",
    )
    options.update(overrides)
    torch.manual_seed(1)
    return get_peft_model(make_tiny_bert(), LoraConfig(**options))


def _llama_lora() -> PeftModel:
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        rank_pattern={"model.layers.0.self_attn.q_proj": 2, "model.layers.1.mlp.down_proj": 8},
        lora_dropout=0.0,
        init_lora_weights=True,
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(1)
    return get_peft_model(make_tiny_llama(), config)


def _batch(kind: str, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 60, (n, 10), generator=g)
    if kind == "bert":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (n,))}
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


MODELS = {"bert": (_bert_lora, make_tiny_bert), "llama": (_llama_lora, make_tiny_llama)}


def _lora_state(model: PeftModel) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]]:
    """name -> (W, A, B, s) copies, read straight from PEFT's layers (independent of the updater)."""
    state = {}
    for name, module in model.get_base_model().named_modules():
        if isinstance(module, LoraLayer):
            state[name] = (
                module.get_base_layer().weight.detach().clone(),
                module.lora_A["default"].weight.detach().clone(),
                module.lora_B["default"].weight.detach().clone(),
                float(module.scaling["default"]),
            )
    return state


def _optimizer(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)


def _train(model: PeftModel, updater: DeltaLoraUpdater, batch: dict[str, torch.Tensor], steps: int) -> None:
    optimizer = _optimizer(model)
    for _ in range(steps):
        model(**batch).loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_each_step_moves_w_by_lambda_s_delta_ba(kind: str) -> None:
    model = MODELS[kind][0]()
    batch = _batch(kind)
    warmup, steps = 2, 5
    updater = DeltaLoraUpdater(model, lambda_=LAMBDA, warmup_steps=warmup)
    start = _lora_state(model)
    assert len({s for *_, s in start.values()}) >= 3  # the rank/alpha patterns give different scalings
    assert updater.module_names == list(start)
    optimizer = _optimizer(model)
    assert not {id(p) for g in optimizer.param_groups for p in g["params"]} & {
        id(m.get_base_layer().weight) for m in model.modules() if isinstance(m, LoraLayer)
    }
    for step in range(1, steps + 1):
        before = _lora_state(model)
        model(**batch).loss.backward()
        updater.before_step()
        optimizer.step()
        updater.after_step()
        optimizer.zero_grad()
        after = _lora_state(model)
        assert updater.step_count == step
        largest = 0.0
        for name, (w0, a0, b0, s) in before.items():
            w1, a1, b1, _ = after[name]
            if step - 1 <= warmup:  # t = step − 1 is Algorithm 1's 0-based index
                assert torch.equal(w1, w0), (
                    f"W of {name} moved at step {step} (t = {step - 1} ≤ K = {warmup})"
                )
            else:
                expected = LAMBDA * s * (b1 @ a1 - b0 @ a0)
                torch.testing.assert_close(w1 - w0, expected, atol=1e-6, rtol=0)
                largest = max(largest, float(expected.abs().max()))
        if step - 1 > warmup:
            assert largest > 1e-3  # the update is real, not a vacuous zero
    # drift = W_T − W_0 = λ·s·(B_T A_T − B_{K+1} A_{K+1}), exactly reproducible from W_0
    drift = updater.drift
    for name, (w_first, *_) in start.items():
        w_last = after[name][0]
        assert torch.equal((w_first.double() + drift[name]).to(w_first.dtype), w_last)


def test_trainer_callback_fires_around_the_optimizer_step(tmp_path) -> None:
    model = _bert_lora()
    warmup, max_steps = 2, 4
    updater = DeltaLoraUpdater(model, lambda_=LAMBDA, warmup_steps=warmup)
    start = _lora_state(model)
    probe = next(m for m in model.modules() if isinstance(m, LoraLayer)).lora_B["default"].weight
    events: list[tuple[str, int]] = []
    at_warmup_end: dict[str, torch.Tensor] = {}

    class Spy(TrainerCallback):  # runs after DeltaLoraCallback for each event
        def on_pre_optimizer_step(self, args, state, control, **kwargs):
            events.append(("pre", updater.step_count))
            self.b_before = probe.detach().clone()

        def on_optimizer_step(self, args, state, control, **kwargs):
            events.append(("post", updater.step_count))
            assert not torch.equal(probe, self.b_before)  # optimizer.step() ran in between

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == warmup + 1:  # the last step that leaves W alone (t = K)
                at_warmup_end.update({n: b @ a for n, (_, a, b, _) in _lora_state(model).items()})

    data = [{k: v[i] for k, v in _batch("bert", 16).items()} for i in range(16)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        seed=0,
    )
    collate = lambda rows: {k: torch.stack([r[k] for r in rows]) for k in rows[0]}  # noqa: E731
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        data_collator=collate,
        callbacks=[DeltaLoraCallback(updater), Spy()],
    )
    trainer.train()
    assert events == [e for k in range(max_steps) for e in (("pre", k), ("post", k + 1))]
    assert updater.step_count == max_steps
    optimized = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    end = _lora_state(model)
    for name, (w_first, *_) in start.items():
        w_last, a, b, s = end[name]
        assert id(model.get_base_model().get_submodule(name).get_base_layer().weight) not in optimized
        expected = LAMBDA * s * (b @ a - at_warmup_end[name])
        assert float(expected.abs().max()) > 1e-3
        torch.testing.assert_close(w_last - w_first, expected, atol=1e-6, rtol=0)


def test_callback_refuses_to_resume() -> None:
    updater = DeltaLoraUpdater(_bert_lora(), warmup_steps=1)
    with pytest.raises(FimloraError, match="cannot resume"):
        DeltaLoraCallback(updater).on_train_begin(None, TrainerState(global_step=3), None)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_saved_adapter_plus_drift_reloads_bit_identical(kind: str, tmp_path) -> None:
    build, fresh_base = MODELS[kind]
    model = build()
    batch = _batch(kind)
    updater = DeltaLoraUpdater(model, lambda_=LAMBDA, warmup_steps=1)
    _train(model, updater, batch, steps=4)
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    model.save_pretrained(tmp_path / "adapter")
    save_weight_drift(model, tmp_path / "drift")  # the model finds its live updater

    meta = json.loads((tmp_path / "drift" / DRIFT_CONFIG_NAME).read_text())
    assert (meta["lambda"], meta["warmup_steps"], meta["steps"]) == (LAMBDA, 1, 4)
    assert meta["updated_steps"] == 2  # t = 2, 3 > K = 1
    assert meta["modules"] == updater.module_names
    assert meta["scaling"] == updater.scaling()

    base = fresh_base()
    apply_weight_drift(base, tmp_path / "drift")
    reloaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    without = PeftModel.from_pretrained(fresh_base(), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, trained)
        assert not torch.allclose(without(**batch).logits, trained, atol=1e-4)


def test_merged_model_contains_the_drift() -> None:
    model = _bert_lora()
    batch = _batch("bert")
    start = _lora_state(model)
    updater = DeltaLoraUpdater(model, lambda_=LAMBDA, warmup_steps=1)
    _train(model, updater, batch, steps=4)
    drift, end = updater.drift, _lora_state(model)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    merged = merged_model(model)
    for name, (w_0, *_) in start.items():
        _, a, b, s = end[name]
        module = merged.get_submodule(name)
        assert type(module) is nn.Linear
        assert float(drift[name].abs().max()) > 1e-3
        expected = (w_0.double() + drift[name] + s * (b @ a).double()).float()
        torch.testing.assert_close(module.weight.detach(), expected, atol=1e-6, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(RuntimeError, match="merged"):
        updater.before_step()


def test_lambda_zero_leaves_w_unchanged() -> None:
    model = _bert_lora()
    start = _lora_state(model)
    updater = DeltaLoraUpdater(model, lambda_=0.0, warmup_steps=0)
    _train(model, updater, _batch("bert"), steps=3)
    end = _lora_state(model)
    assert updater.step_count == 3
    for name, (w, _, b, _) in start.items():
        assert torch.equal(end[name][0], w)
        assert not torch.equal(end[name][2], b)  # B trained
        assert not updater.drift[name].any()


def test_after_step_without_before_step_is_an_error() -> None:
    updater = DeltaLoraUpdater(_bert_lora(), warmup_steps=0)
    updater.after_step()  # t = 0 is never past K: no snapshot needed
    with pytest.raises(RuntimeError, match="before_step"):
        updater.after_step()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"lambda_": -1.0}, "lambda"),
        ({"lambda_": math.nan}, "lambda"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 1.5}, "warmup_steps"),
        ({"adapter_name": "other"}, "no adapter 'other'"),
    ],
)
def test_bad_arguments(kwargs, match) -> None:
    with pytest.raises(FimloraError, match=match):
        DeltaLoraUpdater(_bert_lora(), **kwargs)


def test_models_it_refuses() -> None:
    with pytest.raises(FimloraError, match="needs a PEFT model"):
        DeltaLoraUpdater(make_tiny_bert())  # type: ignore[arg-type]
    ia3 = get_peft_model(make_tiny_bert(), IA3Config(target_modules=["query"], feedforward_modules=[]))
    with pytest.raises(FimloraError, match="plain LoRA"):
        DeltaLoraUpdater(ia3)
    with pytest.raises(FimloraError, match="lora_dropout=0"):
        DeltaLoraUpdater(_bert_lora(lora_dropout=0.1))
    with pytest.raises(FimloraError, match="variants"):
        DeltaLoraUpdater(_bert_lora(use_dora=True))


def test_no_lora_layers_for_the_adapter() -> None:
    model = _bert_lora()
    # an adapter PEFT registered in the config but that no layer carries
    model.peft_config["empty"] = LoraConfig(r=2, target_modules=["query"])
    with pytest.raises(FimloraError, match="no LoRA layers"):
        DeltaLoraUpdater(model, adapter_name="empty")


def test_one_live_updater_per_adapter() -> None:
    model = _bert_lora()
    first = DeltaLoraUpdater(model)
    with pytest.raises(FimloraError, match="already exists"):
        DeltaLoraUpdater(model)
    del first
    gc.collect()
    DeltaLoraUpdater(model)  # the first one is gone: a new one may take over


def test_drift_io_errors(tmp_path) -> None:
    with pytest.raises(FimloraError, match="no live DeltaLoraUpdater"):
        save_weight_drift(_bert_lora(), tmp_path / "x")
    with pytest.raises(FimloraError, match="not a Delta-LoRA drift directory"):
        apply_weight_drift(make_tiny_bert(), tmp_path / "missing")
    updater = DeltaLoraUpdater(_llama_lora())
    save_weight_drift(updater, tmp_path / "llama")
    bert = make_tiny_bert()
    before = {k: v.clone() for k, v in bert.state_dict().items()}
    with pytest.raises(FimloraError, match="no module"):
        apply_weight_drift(bert, tmp_path / "llama")
    assert all(torch.equal(v, before[k]) for k, v in bert.state_dict().items())  # nothing half-applied
