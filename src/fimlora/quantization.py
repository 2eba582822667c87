"""Quantised base models (QLoRA): load the transformer blocks in int8 or NF4 through bitsandbytes.

``quantization`` in the experiment config is one of

* ``none``: float32 weights (the default);
* ``int8``: LLM.int8() (Dettmers et al., 2022): int8 weights with a per-row scale; in eval mode the
  activations are quantised too (outlier columns above 6.0 stay in float16), in train mode the CPU
  kernel dequantises the weight and multiplies in float32;
* ``nf4``: 4-bit NormalFloat with double quantisation (QLoRA, Dettmers et al., 2023), computed in
  float32 (the weight is dequantised block by block, the activations are not rounded).

Only the ``nn.Linear`` layers inside the transformer blocks are quantised; embeddings, norms, the
pooler and the task or LM head stay float32 (a newly initialised head must train in full). Adapters
train in float32 on top of the frozen quantised weights; the base is prepared with PEFT's
``prepare_model_for_kbit_training`` (everything frozen, non-quantised float16/bfloat16 weights cast to
float32), gradient checkpointing left to ``train.gradient_checkpointing``.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import TYPE_CHECKING, Any, Literal

import torch
from torch import nn

from fimlora import lazy_bitsandbytes
from fimlora.errors import FimloraError

if TYPE_CHECKING:
    from transformers import BitsAndBytesConfig

Quantization = Literal["none", "int8", "nf4"]
QUANTIZATIONS: tuple[str, ...] = ("none", "int8", "nf4")

# bitsandbytes logs this from inside every int8 matmul's forward (once per layer and call): thousands of
# lines per run, nothing a user can act on (float32 activations are exactly what this setup feeds it).
_INT8_CAST_MESSAGE = "MatMul8bitLt: inputs will be cast from"


def require_bitsandbytes(quantization: str) -> None:
    """Raise a one-line FimloraError when ``quantization`` needs bitsandbytes and it is missing."""
    if quantization == "none":
        return
    try:
        lazy_bitsandbytes.load()
    except ImportError:
        raise FimloraError(
            f"quantization: {quantization} needs bitsandbytes; install it with pip install 'fimlora[quant]'."
        ) from None


def bnb_config(quantization: str, skip_modules: list[str]) -> BitsAndBytesConfig | None:
    """transformers' ``BitsAndBytesConfig`` for ``quantization`` (None for ``none``).

    ``skip_modules``: full module names (regular expressions, anchored at the start) left unquantised.
    """
    if quantization not in QUANTIZATIONS:
        choices = ", ".join(QUANTIZATIONS)
        raise FimloraError(f"Unknown quantization {quantization!r}; choose one of {choices}.")
    if quantization == "none":
        return None
    require_bitsandbytes(quantization)
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        _silence_int8_casts()
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=skip_modules)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip_modules,  # transformers reads this name for 4-bit too
    )


class _DropInt8CastNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_INT8_CAST_MESSAGE)


@functools.cache
def _silence_int8_casts() -> None:
    """Drop bitsandbytes' per-call int8 cast notice (only that message; its other logs stay)."""
    logging.getLogger("bitsandbytes.autograd._functions").addFilter(_DropInt8CastNotice())


def is_quantized_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a bitsandbytes 4-bit or int8 linear layer (its ``weight`` is packed)."""
    if not isinstance(module, nn.Linear) or type(module).__module__.split(".")[0] != "bitsandbytes":
        return False
    return type(module.weight).__name__ in ("Params4bit", "Int8Params")


def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The float32 ``(out_features, in_features)`` weight the layer multiplies by.

    A plain ``nn.Linear``'s own weight (detached); for a bitsandbytes layer its dequantisation: NF4 →
    the 4-bit codes times their (double-quantised) block scales, int8 → the int8 rows times
    ``scale_row / 127``. A new tensor each call: nothing float32 stays attached to the model.
    """
    layer: Any = module  # a bitsandbytes layer, typed by duck
    if not is_quantized_linear(module):
        return layer.weight.detach()
    import bitsandbytes.functional as bnb_functional

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        _unpack(layer)  # a layer someone ran before keep_unpacked saw it
        return (
            bnb_functional.dequantize_4bit(weight.data, weight.quant_state)
            .float()
            .reshape(layer.out_features, layer.in_features)
        )
    # LLM.int8() moves the row scales from the weight to the layer's matmul state at its first forward.
    scales = layer.state.SCB if layer.state.SCB is not None else weight.SCB
    return bnb_functional.int8_vectorwise_dequant(weight.data, scales).float()


def prepare_quantized_model(model: nn.Module) -> nn.Module:
    """QLoRA's preparation of a quantised base (PEFT's ``prepare_model_for_kbit_training``).

    Freezes every parameter and casts non-quantised float16/bfloat16 weights to float32; gradient
    checkpointing is not switched on here (it is ``train.gradient_checkpointing``, for every base).
    NF4 weights keep the one layout every CPU uses (:func:`keep_unpacked`).
    """
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(keep_unpacked(model), use_gradient_checkpointing=False)


def copy_sharing_frozen_tensors(model: nn.Module) -> nn.Module:
    """A deep copy of a quantised base whose frozen parameters and buffers are the base's own tensors.

    Each method of an experiment trains a copy of the pristine base model, which stays for what every
    method compares against (the base's inference time, loss on general text, continuations). On a
    quantised base no method rewrites a base weight (those that do, PiSSA, OLoRA, LoRA-GA, Delta-LoRA,
    HydraLoRA and full fine-tuning, refuse it: :func:`fimlora.methods.check_quantized_base`), so the
    copy needs new modules (PEFT replaces its layers) but not new frozen tensors: shared, a copy costs
    the modules' bookkeeping instead of the model's size again (its float32 embeddings, above all).
    Tensors that require a gradient are copied. Int8 layers keep their codes and scales in a matmul
    state moved off the weight at their first forward pass: that move is made here, on the base, so that
    the base and its copies share the state's tensors rather than whichever runs first taking them.
    """
    for module in model.modules():
        layer: Any = module  # a bitsandbytes Linear8bitLt, typed by duck
        if hasattr(layer, "init_8bit_state") and getattr(layer.weight, "CB", None) is not None:
            layer.init_8bit_state()
    shared: dict[int, Any] = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        if not tensor.requires_grad:
            shared[id(tensor)] = tensor
    for module in model.modules():
        state = getattr(module, "state", None)
        for name in ("CB", "SCB"):
            held = getattr(state, name, None)
            if torch.is_tensor(held):
                shared[id(held)] = held
    return copy.deepcopy(model, shared)


def keep_unpacked(model: nn.Module) -> nn.Module:
    """Keep bitsandbytes from repacking NF4 weights for its AVX512-BF16 CPU kernel; returns ``model``.

    On a CPU with AVX512-BF16, bitsandbytes 0.50's ``Linear4bit`` repacks its weight at the first
    eval-mode forward whose input does not require a gradient (a Fisher pass, a validation, an
    evaluation). That repacking asserts ``out_features % 32 == 0``, rounds the block scales to bfloat16
    (so the numbers depend on the CPU), and leaves a layer whose next training forward fails in
    bitsandbytes' autograd ("a view of a leaf Variable ... in-place"). With the flag off, every CPU —
    with or without the instruction set — and every GPU runs the same dequantise-and-multiply path.
    A layer already repacked is unpacked first (its block scales keep their bfloat16 rounding).
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            layer: Any = module  # a bitsandbytes Linear4bit, typed by duck
            layer.support_avx512bf16_for_cpu = False
            _unpack(layer)
    return model


def _unpack(layer: Any) -> None:
    """Undo bitsandbytes' CPU repacking of a 4-bit layer in place (weight and its quant state together)."""
    state = getattr(layer.weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    import bitsandbytes.functional as bnb_functional

    layer.weight.data, layer.weight.quant_state = bnb_functional._convert_weight_packed_for_cpu_inverse(
        layer.weight.data, state
    )
