"""HydraLoRA (Tian et al. 2024, arXiv 2404.19245): one shared A, k routed B heads per linear layer.

Each adapted ``nn.Linear`` ``y = W x + b`` becomes

    y = W x + b + s · Σ_i g_i(x) · B_i A dropout(x),      g(x) = softmax(W_r x)  (per token)

with ``A ∈ ℝ^{r×d_in}`` shared by the ``k`` heads ``B_i ∈ ℝ^{d_out×r}`` and a bias-free router
``W_r ∈ ℝ^{k×d_in}`` that sees the undropped input. ``W`` and ``b`` stay frozen. The rank ``r`` may
differ per module (a rank pattern); ``k`` is the same everywhere.

Initialisation (as in the authors' reference code): ``A`` and ``W_r`` kaiming-uniform with
``a = √5`` (uniform on ±1/√d_in, ``nn.Linear``'s default), every ``B_i = 0``. So the adapted model
starts exactly equal to the base model. The router must *not* start at zero: with ``B_i = 0`` and a
uniform router every head receives the same gradient, the router's gradient vanishes, and the heads
stay identical forever (a symmetric fixed point). A small random router breaks that symmetry. All
random draws come from a ``torch.Generator`` seeded by ``seed``, in ``named_modules()`` order, so the
global RNG is untouched and the same call gives the same adapter.

Scaling ``s`` (the same two conventions as :meth:`fimlora.allocation.Allocation.to_lora_config`):

* ``"alpha_over_r"``: ``s_m = α / r_m`` per module;
* ``"constant"``: ``s_m = α / r_ref`` for every module, ``r_ref`` the most common rank (ties: the
  smaller), exactly as ``Allocation.reference_rank``.

Trainable parameters per module: ``r·d_in + k·r·d_out + k·d_in`` (A, the heads, the router); see
:func:`hydralora_param_count`. At equal rank this is more than LoRA's ``r·(d_in + d_out)``, so a fair
comparison must fix the parameter count, not the rank.

**No merging.** The routing weights depend on each token's input, so ``Σ_i g_i B_i A`` is not one
matrix and cannot be folded into ``W``; the adapted model always runs the extra path.

**Padding.** A layer only sees hidden states, so it cannot tell padding from real tokens. The model
that :func:`apply_hydralora` adapts gets a forward pre-hook that reads its ``attention_mask`` argument
(by keyword or by position) and shows it to every HydraLoRA layer for the duration of that forward;
nothing else is needed when the model is called as ``model(input_ids=…, attention_mask=…)``. When a
sub-module is called directly, wrap the call in ``with routing_mask(model, attention_mask): …``. A
layer uses the mask when its input is shaped ``(*mask.shape, d_in)``; with a KV cache (fewer query
positions than mask columns) it uses the mask's last columns; for any other shape (e.g. a pooler
that sees one vector per sequence) every row counts. The mask only affects the routing *statistics*
(:func:`load_balance_loss`, :func:`router_usage`), never the forward output.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import math
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fimlora.allocation import Allocation
from fimlora.errors import FimloraError
from fimlora.io import ordinary_permissions
from fimlora.methods.base import AdapterKind, AllocationRule, CostModel, MethodContext

SCALINGS: tuple[str, ...] = ("alpha_over_r", "constant")
CONFIG_NAME = "hydralora_config.json"
WEIGHTS_NAME = "hydralora.safetensors"
_CONFIG_KEYS: tuple[str, ...] = (
    "method",
    "ranks",
    "num_heads",
    "alpha",
    "scaling",
    "dropout",
    "modules_to_save",
    "seed",
    "base_model_name_or_path",
)
# Silhouette is O(n²) in the number of texts; above this many it is computed on a seeded sample.
_SILHOUETTE_SAMPLE = 2000


# --------------------------------------------------------------------------------------------------
# Per-forward state shared between the top model and its layers
# --------------------------------------------------------------------------------------------------


class _RoutingMask:
    """The attention mask of the forward in progress, shared by all HydraLoRA layers of one model."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None
        self.saved: list[torch.Tensor | None] = []


class _LastRouting:
    """Routing of a layer's last forward. ``deepcopy`` yields an empty record: the gates are part of an
    autograd graph (non-leaf tensors cannot be deep-copied) and belong to one forward only."""

    def __init__(self) -> None:
        self.gates: torch.Tensor | None = None
        self.token_mask: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict[int, Any]) -> _LastRouting:
        return _LastRouting()


def _token_mask(mask: torch.Tensor | None, lead: torch.Size) -> torch.Tensor | None:
    """The boolean mask over the token positions ``lead`` (= input shape without ``d_in``), or None
    when the mask does not describe them (every row counts)."""
    if mask is None or mask.dim() != len(lead) or mask.dim() == 0:
        return None
    if mask.shape == lead:
        return mask != 0
    if mask.shape[:-1] == lead[:-1] and mask.shape[-1] > lead[-1]:  # KV cache: the newest positions
        return mask[..., mask.shape[-1] - lead[-1] :] != 0
    return None


# --------------------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------------------


class HydraLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a HydraLoRA update ``s · Σ_i softmax(W_r x)_i · B_i A dropout(x)``.

    Attributes:
        base_layer: the wrapped ``nn.Linear`` (weights frozen by :func:`apply_hydralora`).
        lora_A: ``(r, d_in)``, shared by all heads.
        lora_B: ``(k, d_out, r)``; ``lora_B[i]`` is head ``B_i``; zero at init.
        router: ``nn.Linear(d_in, k, bias=False)``; ``router.weight`` is ``W_r``, ``(k, d_in)``.
        lora_dropout: dropout on the input of ``A`` only (the router sees the undropped input).
        scaling: the scalar ``s`` (see the module docstring for the two conventions).

    Adapter parameters are float32 when the base weight is float16/bfloat16 (the update is computed in
    float32 and cast back, like PEFT's default), else the base weight's dtype. The softmax is always
    computed in float32.
    """

    def __init__(
        self,
        base_layer: nn.Linear,
        *,
        rank: int,
        num_heads: int,
        scaling: float,
        dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise FimloraError(f"HydraLoRA wraps nn.Linear layers, not {type(base_layer).__name__}.")
        _check_positive_int("rank", rank)
        _check_positive_int("num_heads", num_heads)
        weight = base_layer.weight
        dtype = torch.float32 if weight.dtype in (torch.float16, torch.bfloat16) else weight.dtype
        d_out, d_in = weight.shape
        self.base_layer = base_layer
        self.rank = rank
        self.num_heads = num_heads
        self.scaling = float(scaling)
        self.lora_dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        bound = 1.0 / math.sqrt(d_in)  # kaiming_uniform_(a=√5) on a (·, d_in) weight
        a = torch.empty(rank, d_in, dtype=dtype).uniform_(-bound, bound, generator=generator)
        self.lora_A = nn.Parameter(a.to(weight.device))
        self.lora_B = nn.Parameter(torch.zeros(num_heads, d_out, rank, dtype=dtype, device=weight.device))
        self.router = nn.Linear(d_in, num_heads, bias=False, device=weight.device, dtype=dtype)
        with torch.no_grad():
            w_r = torch.empty(num_heads, d_in, dtype=dtype).uniform_(-bound, bound, generator=generator)
            self.router.weight.copy_(w_r)
        self._routing_mask = _RoutingMask()  # replaced by the model-wide one in apply_hydralora
        self._last = _LastRouting()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @property
    def last_gates(self) -> torch.Tensor | None:
        """Routing weights of the last forward, shaped ``(*input.shape[:-1], k)``, float32, rows summing
        to 1; still attached to the autograd graph when that forward was."""
        return self._last.gates

    @property
    def last_token_mask(self) -> torch.Tensor | None:
        """Boolean ``input.shape[:-1]`` mask of the last forward's real tokens (None: all count)."""
        return self._last.token_mask

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        dtype = self.lora_A.dtype
        x = x.to(dtype)
        gates = torch.softmax(self.router(x), dim=-1, dtype=torch.float32)  # (..., k)
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., r)
        # Σ_i g_i B_i h as ONE matmul: [g_1 h, …, g_k h] (k·r wide) times [B_1 … B_k] (d_out × k·r).
        mixed = (gates.to(dtype).unsqueeze(-1) * h.unsqueeze(-2)).flatten(-2)
        heads = self.lora_B.permute(1, 0, 2).reshape(self.out_features, self.num_heads * self.rank)
        update = F.linear(mixed, heads) * self.scaling
        self._last.gates = gates
        self._last.token_mask = _token_mask(self._routing_mask.mask, x.shape[:-1])
        return result + update.to(result.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, num_heads={self.num_heads}, scaling={self.scaling:g}"


# --------------------------------------------------------------------------------------------------
# Injection
# --------------------------------------------------------------------------------------------------


def apply_hydralora(
    model: nn.Module,
    ranks: Mapping[str, int],
    *,
    num_heads: int,
    alpha: float,
    scaling: str = "alpha_over_r",
    dropout: float = 0.0,
    modules_to_save: Sequence[str] = (),
    seed: int = 0,
) -> nn.Module:
    """Replace the named ``nn.Linear`` modules of ``model`` by :class:`HydraLoraLinear`, in place.

    Args:
        model: the base model; names are those of its ``named_modules()`` (e.g.
            ``"bert.encoder.layer.0.attention.self.query"``).
        ranks: rank ``r`` per target module (integers >= 1; a rank pattern is fine).
        num_heads: ``k``, the number of B heads per module (>= 1; see :func:`choose_num_heads`).
        alpha: ``α`` (> 0); the scaling is ``α/r_m`` or ``α/r_ref``, see ``scaling``.
        scaling: ``"alpha_over_r"`` or ``"constant"`` (module docstring).
        dropout: dropout probability on the input of ``A``, in ``[0, 1)``.
        modules_to_save: modules trained in full (e.g. ``["classifier"]``) and saved with the adapter.
        seed: seeds the initialisation of ``A`` and the routers (the global RNG is not used).

    Every parameter of ``model`` is frozen except the adapters (``lora_A``, ``lora_B``,
    ``router.weight``) and the parameters of ``modules_to_save``. The model also gets a forward pre-hook
    that passes its ``attention_mask`` to the layers (module docstring, "Padding"). Returns ``model``.
    """
    config = _check_config(
        {
            "ranks": dict(ranks),
            "num_heads": num_heads,
            "alpha": alpha,
            "scaling": scaling,
            "dropout": dropout,
            "modules_to_save": list(modules_to_save),
            "seed": seed,
        }
    )
    if any(isinstance(m, HydraLoraLinear) for m in model.modules()):
        raise FimloraError(
            "This model already has HydraLoRA layers; apply HydraLoRA once, to a fresh base model, "
            "with all target modules in `ranks`."
        )
    modules = dict(model.named_modules())
    targets: dict[str, int] = config["ranks"]
    for name in targets:
        if name not in modules or name == "":
            raise FimloraError(f"HydraLoRA target {name!r} is not a module of the model{_examples(model)}.")
        if not isinstance(modules[name], nn.Linear):
            raise FimloraError(
                f"HydraLoRA target {name!r} is a {type(modules[name]).__name__}; only nn.Linear "
                "layers can be adapted."
            )
    for name in config["modules_to_save"]:
        if name not in modules or name == "":
            raise FimloraError(
                f"modules_to_save entry {name!r} is not a module of the model{_examples(model)}."
            )
        clash = next((t for t in targets if _nested(name, t)), None)
        if clash is not None:
            raise FimloraError(
                f"modules_to_save entry {name!r} overlaps the HydraLoRA target {clash!r}; a module is "
                "either adapted or trained in full, not both."
            )

    r_ref = _reference_rank(targets)
    generator = torch.Generator().manual_seed(int(config["seed"]))
    for param in model.parameters():
        param.requires_grad_(False)
    shared = _RoutingMask()
    for name in [n for n in modules if n in targets]:  # named_modules() order: deterministic init
        base = modules[name]
        assert isinstance(base, nn.Linear)
        rank = targets[name]
        s = config["alpha"] / (rank if config["scaling"] == "alpha_over_r" else r_ref)
        layer = HydraLoraLinear(
            base, rank=rank, num_heads=num_heads, scaling=s, dropout=config["dropout"], generator=generator
        )
        layer._routing_mask = shared
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer)
    for name in config["modules_to_save"]:
        for param in model.get_submodule(name).parameters():
            param.requires_grad_(True)

    model._hydralora_config = config  # type: ignore[assignment]  # read by save_hydralora
    model._hydralora_routing_mask = shared  # type: ignore[assignment]  # read by the hooks below
    model.register_forward_pre_hook(_stash_attention_mask, with_kwargs=True)
    model.register_forward_hook(_restore_attention_mask, always_call=True)
    return model


def _stash_attention_mask(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Forward pre-hook on the adapted model: show its ``attention_mask`` to the HydraLoRA layers."""
    state: _RoutingMask = module._hydralora_routing_mask  # type: ignore[assignment]
    state.saved.append(state.mask)
    mask = kwargs.get("attention_mask")
    if mask is None and args:
        with contextlib.suppress(TypeError, ValueError):
            mask = (
                inspect.signature(module.forward)
                .bind_partial(*args, **kwargs)
                .arguments.get("attention_mask")
            )
    if isinstance(mask, torch.Tensor):
        state.mask = mask


def _restore_attention_mask(module: nn.Module, args: Any, output: Any) -> None:
    state: _RoutingMask = module._hydralora_routing_mask  # type: ignore[assignment]
    state.mask = state.saved.pop() if state.saved else None


@contextlib.contextmanager
def routing_mask(model: nn.Module, attention_mask: torch.Tensor | None) -> Iterator[None]:
    """Within the block, HydraLoRA layers of ``model`` treat ``attention_mask`` (nonzero = real token,
    shaped like the token positions, e.g. ``(batch, seq)``) as the padding mask for their routing
    statistics. Only needed when calling a sub-module directly; a call of the adapted model itself with
    an ``attention_mask`` argument takes precedence inside that call."""
    states = {id(m._routing_mask): m._routing_mask for m in model.modules() if isinstance(m, HydraLoraLinear)}
    previous = {key: state.mask for key, state in states.items()}
    for state in states.values():
        state.mask = attention_mask
    try:
        yield
    finally:
        for key, state in states.items():
            state.mask = previous[key]


def hydralora_layers(model: nn.Module) -> dict[str, HydraLoraLinear]:
    """The HydraLoRA layers of ``model`` by name (the name of the module they replaced)."""
    return {n: m for n, m in model.named_modules() if isinstance(m, HydraLoraLinear)}


def hydralora_param_count(
    shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int], num_heads: int
) -> int:
    """Trainable HydraLoRA parameters: ``Σ_m r_m·d_in + k·r_m·d_out + k·d_in`` (A, k heads, router).

    ``shapes`` gives ``(d_out, d_in)`` per module (an ``nn.Linear`` weight shape) for at least every
    module of ``ranks``. ``modules_to_save`` are not included.
    """
    _check_positive_int("num_heads", num_heads)
    missing = sorted(set(ranks) - set(shapes))
    if missing:
        raise FimloraError(f"No shape given for HydraLoRA module(s) {missing[:3]}.")
    total = 0
    for name, rank in ranks.items():
        _check_positive_int(f"rank of {name!r}", rank)
        d_out, d_in = shapes[name]
        total += rank * d_in + num_heads * rank * d_out + num_heads * d_in
    return total


def hydralora_trainable_counts(model: nn.Module) -> dict[str, int]:
    """Trainable parameters of an adapted model, split like ``fimlora.train.parameter_counts``:
    ``adapter_params`` (A, heads, routers: equals :func:`hydralora_param_count`), ``head_params``
    (``modules_to_save``) and ``other_trainable_params`` (anything else left trainable; 0 after
    :func:`apply_hydralora`). Needed because the router's name has no ``lora_`` in it."""
    config = _config_of(model)
    counted: set[int] = set()
    adapter = head = 0
    for layer in hydralora_layers(model).values():
        for param in (layer.lora_A, layer.lora_B, layer.router.weight):
            if param.requires_grad and id(param) not in counted:
                counted.add(id(param))
                adapter += param.numel()
    for name in config["modules_to_save"]:
        for param in model.get_submodule(name).parameters():
            if param.requires_grad and id(param) not in counted:
                counted.add(id(param))
                head += param.numel()
    other = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in counted)
    return {"adapter_params": adapter, "head_params": head, "other_trainable_params": other}


# --------------------------------------------------------------------------------------------------
# Routing statistics
# --------------------------------------------------------------------------------------------------


def _mean_gates(layer: HydraLoraLinear) -> torch.Tensor | None:
    """``P_i``: the mean routing weight of head ``i`` over the last forward's real tokens (None: none)."""
    gates = layer.last_gates
    if gates is None:
        raise FimloraError("No routing recorded yet: run a forward pass of the model before asking for it.")
    flat = gates.reshape(-1, layer.num_heads)
    mask = layer.last_token_mask
    if mask is not None:
        flat = flat[mask.reshape(-1).to(flat.device)]
    return flat.mean(dim=0) if flat.shape[0] else None


def load_balance_loss(model: nn.Module) -> torch.Tensor:
    """Auxiliary balance loss of the last forward: the mean over HydraLoRA layers of ``CV²(P)``.

    ``P_i`` is layer's mean routing weight of head ``i`` over non-padding tokens and
    ``CV²(P) = Var(P)/Mean(P)² = k·Σ_i (P_i − 1/k)²`` (population variance; the "importance" loss of
    Shazeer et al. 2017, the ``cv_squared`` of the HydraLoRA reference code). It is 0 exactly when every
    head gets the same share of the routing mass on average, in particular for uniform routing, and at
    most ``k − 1`` (everything on one head). It does not penalise confident per-token routing, only
    imbalance between heads. Differentiable w.r.t. the routers when the forward was. Layers that saw no
    real token are skipped; returns a zero scalar when the model has no HydraLoRA layers (or none saw a
    token). Add it as ``loss + λ · load_balance_loss(model)`` right after the forward.
    """
    terms = []
    for layer in hydralora_layers(model).values():
        p = _mean_gates(layer)
        if p is not None:
            terms.append(layer.num_heads * ((p - p.mean()) ** 2).sum())
    if not terms:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        return torch.zeros((), device=device)
    return torch.stack(terms).mean()


@torch.no_grad()
def router_usage(model: nn.Module, batches: Iterable[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    """Mean routing weight per head, per HydraLoRA layer, over every real token of ``batches``.

    Each batch is a mapping of model inputs (``input_ids``, ``attention_mask``, …; a ``labels`` entry is
    ignored) and is moved to the model's device. Runs in eval mode without gradients and restores the
    training flag. Padding positions (``attention_mask == 0``) are ignored; every real token weighs the
    same, whatever batch it is in. Returns ``{layer name: float32 tensor (k,)}`` summing to 1; feed one
    domain's batches to see which heads that domain uses.
    """
    layers = hydralora_layers(model)
    if not layers:
        raise FimloraError("router_usage needs a model with HydraLoRA layers (see apply_hydralora).")
    device = next(model.parameters()).device
    sums = {n: torch.zeros(m.num_heads, dtype=torch.float64) for n, m in layers.items()}
    counts = dict.fromkeys(layers, 0)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            inputs.pop("labels", None)
            model(**inputs)
            for name, layer in layers.items():
                gates = layer.last_gates
                assert gates is not None
                flat = gates.reshape(-1, layer.num_heads)
                mask = layer.last_token_mask
                if mask is not None:
                    flat = flat[mask.reshape(-1)]
                sums[name] += flat.sum(dim=0).double().cpu()
                counts[name] += flat.shape[0]
    finally:
        model.train(was_training)
    if not any(counts.values()):
        raise FimloraError("router_usage saw no real token: the batches are empty or fully padded.")
    return {n: (sums[n] / max(counts[n], 1)).float() for n in layers}


# --------------------------------------------------------------------------------------------------
# Choosing k
# --------------------------------------------------------------------------------------------------


def choose_num_heads(texts: Sequence[str], *, k_max: int = 8, seed: int = 0) -> int:
    """The number of heads ``k`` by clustering the training corpus, in the spirit of HydraLoRA's
    "intrinsic components".

    TF-IDF vectors of ``texts`` (scikit-learn defaults: lower-cased word unigrams, L2-normalised rows),
    k-means (``n_init=10``, ``random_state=seed``) for every ``k`` in ``2..min(k_max, len(texts) − 1)``,
    and the ``k`` with the highest mean silhouette (Euclidean, on a seeded sample of at most 2,000
    texts); ties go to the smaller ``k``. Deterministic for a given input and seed. Never returns 1:
    the silhouette is undefined for a single cluster, so an unstructured corpus still gets ``k = 2``
    (and a low silhouette). Needs at least 3 texts and ``k_max >= 2``.
    """
    import numpy as np
    from sklearn.cluster import KMeans
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.metrics import silhouette_score

    _check_positive_int("k_max", k_max)
    if k_max < 2:
        raise FimloraError(f"k_max must be >= 2 to compare clusterings, but got {k_max}.")
    texts = list(texts)
    if len(texts) < 3:
        raise FimloraError(f"choose_num_heads needs at least 3 texts, but got {len(texts)}.")
    try:
        features = TfidfVectorizer().fit_transform(texts)
    except ValueError as exc:  # empty vocabulary
        raise FimloraError(f"choose_num_heads could not vectorise the texts: {exc}.") from exc
    sample = min(len(texts), _SILHOUETTE_SAMPLE)
    best_k, best_score = 2, -math.inf
    for k in range(2, min(k_max, len(texts) - 1) + 1):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)  # fewer distinct texts than k
            labels = KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(features)
        if not 2 <= len(np.unique(labels)) <= len(texts) - 1:
            continue
        score = float(
            silhouette_score(
                features, labels, sample_size=sample if sample < len(texts) else None, random_state=seed
            )
        )
        if score > best_score:
            best_k, best_score = k, score
    return best_k


# --------------------------------------------------------------------------------------------------
# Saving and loading
# --------------------------------------------------------------------------------------------------


def hydralora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What :func:`save_hydralora` stores: every layer's ``lora_A``, ``lora_B``, ``router.weight`` and
    the full state (parameters and buffers) of ``modules_to_save``, by name in ``model``."""
    config = _config_of(model)
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in hydralora_layers(model).items():
        tensors[f"{name}.lora_A"] = layer.lora_A
        tensors[f"{name}.lora_B"] = layer.lora_B
        tensors[f"{name}.router.weight"] = layer.router.weight
    for name in config["modules_to_save"]:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{name}.{key}"] = value
    return tensors


def save_hydralora(
    model: nn.Module, directory: str | os.PathLike[str], *, base_model_name_or_path: str | None
) -> None:
    """Write ``hydralora_config.json`` and ``hydralora.safetensors`` into ``directory``.

    The config holds ranks, ``num_heads``, ``alpha``, ``scaling``, ``dropout``, ``modules_to_save``,
    ``seed`` and ``base_model_name_or_path`` (provenance only; :func:`load_hydralora` takes the base
    model as an argument). The weights are :func:`hydralora_state_dict` (adapters plus the full
    ``modules_to_save``, never the frozen base weights). Both files are written into a temporary sibling
    directory that is then renamed onto ``directory`` (an existing one is replaced), so a reader never
    sees a half-written adapter.
    """
    from safetensors.torch import save_file

    config = dict(_config_of(model))
    config["base_model_name_or_path"] = base_model_name_or_path
    config["ranks"] = dict(sorted(config["ranks"].items()))
    # clone: safetensors refuses tensors that share storage (e.g. tied weights in modules_to_save)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in hydralora_state_dict(model).items()}
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        for path in (tmp / WEIGHTS_NAME, tmp / CONFIG_NAME):
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        ordinary_permissions(tmp)
        if directory.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".old", dir=directory.parent))
            os.replace(directory, trash / "old")
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_hydralora(base_model: nn.Module, directory: str | os.PathLike[str]) -> nn.Module:
    """Apply the saved HydraLoRA of ``directory`` to a freshly built ``base_model`` (in place) and load
    its weights; returns the model. With the same base weights the outputs equal the saved model's
    bit for bit (eval mode). Refuses a config or weight file that does not match the model."""
    from safetensors.torch import load_file

    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    if not (config_path.is_file() and weights_path.is_file()):
        raise FimloraError(
            f"{directory} is not a HydraLoRA directory (needs {CONFIG_NAME} and {WEIGHTS_NAME})."
        )
    try:
        raw = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FimloraError(f"{config_path} is not valid JSON: {exc}.") from exc
    if not isinstance(raw, dict) or raw.get("method") != "hydralora":
        raise FimloraError(f"{config_path} is not a HydraLoRA config.")
    unknown = sorted(set(raw) - set(_CONFIG_KEYS))
    if unknown:
        raise FimloraError(f"{config_path} has unknown key(s) {unknown}.")
    config = _check_config({k: v for k, v in raw.items() if k not in ("method", "base_model_name_or_path")})
    model = apply_hydralora(
        base_model,
        config["ranks"],
        num_heads=config["num_heads"],
        alpha=config["alpha"],
        scaling=config["scaling"],
        dropout=config["dropout"],
        modules_to_save=config["modules_to_save"],
        seed=config["seed"],
    )
    saved = load_file(str(weights_path))
    expected = hydralora_state_dict(model)
    if set(saved) != set(expected):
        odd = sorted(set(saved) ^ set(expected))[:3]
        raise FimloraError(f"{weights_path} does not match its config (e.g. {odd}).")
    with torch.no_grad():
        for key, target in expected.items():
            if saved[key].shape != target.shape:
                raise FimloraError(
                    f"{weights_path}: {key} has shape {tuple(saved[key].shape)}, the model expects "
                    f"{tuple(target.shape)}; was the adapter saved from a different base model?"
                )
            target.copy_(saved[key])
    return model


# --------------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------------


def _check_positive_int(what: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise FimloraError(f"{what} must be an integer >= 1, but got {value!r}.")


def _check_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate and normalise the settings of :func:`apply_hydralora` (also a loaded config)."""
    expected = set(_CONFIG_KEYS) - {"method", "base_model_name_or_path"}
    missing = sorted(expected - set(config))
    if missing:
        raise FimloraError(f"HydraLoRA config lacks {missing}.")
    ranks = config["ranks"]
    if not isinstance(ranks, dict) or not ranks:
        raise FimloraError("HydraLoRA needs at least one target module, but ranks is empty.")
    for name, rank in ranks.items():
        _check_positive_int(f"The rank of {name!r}", rank)
    _check_positive_int("num_heads (the number of B heads k)", config["num_heads"])
    alpha = config["alpha"]
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, int | float)
        or not (math.isfinite(alpha) and alpha > 0)
    ):
        raise FimloraError(f"alpha must be a finite number > 0, but got {alpha!r}.")
    if config["scaling"] not in SCALINGS:
        raise FimloraError(
            f"Unknown HydraLoRA scaling {config['scaling']!r}; use one of {', '.join(SCALINGS)}."
        )
    dropout = config["dropout"]
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        raise FimloraError(f"dropout must be a probability in [0, 1), but got {dropout!r}.")
    to_save = config["modules_to_save"]
    if isinstance(to_save, str) or not all(isinstance(n, str) for n in to_save):
        raise FimloraError(f"modules_to_save must be a list of module names, but got {to_save!r}.")
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FimloraError(f"seed must be an integer, but got {seed!r}.")
    return {
        "method": "hydralora",
        "ranks": {str(n): int(r) for n, r in ranks.items()},
        "num_heads": int(config["num_heads"]),
        "alpha": float(alpha),
        "scaling": str(config["scaling"]),
        "dropout": float(dropout),
        "modules_to_save": list(to_save),
        "seed": seed,
    }


def _config_of(model: nn.Module) -> dict[str, Any]:
    config = getattr(model, "_hydralora_config", None)
    if not isinstance(config, dict):
        raise FimloraError("This model was not adapted with apply_hydralora (pass the model it returned).")
    return config


def _reference_rank(ranks: Mapping[str, int]) -> int:
    """The most common rank, ties to the smaller (``Allocation.reference_rank``)."""
    counts = Counter(ranks.values())
    return max(counts, key=lambda r: (counts[r], -r))


def _nested(a: str, b: str) -> bool:
    """Whether module ``a`` contains ``b`` or the other way round (or they are the same)."""
    return a == b or b.startswith(a + ".") or a.startswith(b + ".")


def _examples(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)][:3]
    return f" (linear layers are named like {', '.join(repr(n) for n in names)})" if names else ""


class HydraLoraAdapter(AdapterKind):
    """The registry's ``hydralora`` adapter, budget-matched: a rank costs d_in + k·d_out, a router k·d_in."""

    name = "hydralora"
    description = "HydraLoRA: shared A, k routed B heads per module (k from clustering the training texts)."
    refuses_quantized_base = (
        "is not a PEFT adapter, and transformers' Trainer trains a quantised model only through PEFT "
        "adapters (its layers also read the float weight's shape and dtype)"
    )
    refuses_rank_zero = (
        "pays each module's router out of the budget before any rank is allocated, so a module left "
        "without an adapter would still be charged for one"
    )
    unmergeable_reason = (
        "HydraLoRA cannot be merged into the base weights: its router mixes the k B heads with weights "
        "g(x) that depend on each token's input, so s·Σ_i g_i(x)·B_i·A is not one fixed matrix."
    )

    def num_heads(self, ctx: MethodContext) -> int:
        if "_hydralora_heads" not in ctx.record:
            opts = ctx.options.hydralora
            if opts.num_heads == "auto":
                if ctx.train_texts is None:
                    raise FimloraError("HydraLoRA with num_heads='auto' needs the training texts.")
                k_max = min(opts.k_max, self._largest_affordable_k(ctx))
                if k_max < 2:
                    raise FimloraError(
                        f"HydraLoRA: the budget ({ctx.budget:,}) cannot pay for 2 heads at rank "
                        f"{ctx.config.allocation.r_min} on every module; raise the budget or set num_heads."
                    )
                k = choose_num_heads(ctx.train_texts(), k_max=k_max, seed=ctx.seed)
                ctx.record["hydralora"] = {
                    "num_heads": k,
                    "chosen_by": f"clustering (TF-IDF + KMeans, silhouette over k = 2..{k_max})",
                }
            else:
                k = int(opts.num_heads)
                ctx.record["hydralora"] = {"num_heads": k, "chosen_by": "user"}
            ctx.record["_hydralora_heads"] = k
        return int(ctx.record["_hydralora_heads"])

    @staticmethod
    def _largest_affordable_k(ctx: MethodContext) -> int:
        """The most heads for which r_min on every module, routers included, fits in the budget."""
        r_min = ctx.config.allocation.r_min
        sum_in = sum(d_in for _, d_in in ctx.shapes.values())
        sum_out = sum(d_out for d_out, _ in ctx.shapes.values())
        # k·Σd_in (routers) + r_min·(Σd_in + k·Σd_out) <= budget
        return (ctx.budget - r_min * sum_in) // (sum_in + r_min * sum_out)

    def cost(self, shape: tuple[int, int], ctx: MethodContext) -> CostModel:
        k = self.num_heads(ctx)
        d_out, d_in = shape
        return CostModel(per_rank=d_in + k * d_out, fixed=k * d_in)

    def build(
        self, model: nn.Module, allocation: Allocation | None, rule: AllocationRule, ctx: MethodContext
    ) -> nn.Module:
        assert allocation is not None
        return apply_hydralora(
            model,
            allocation.ranks,
            num_heads=self.num_heads(ctx),
            alpha=ctx.config.lora_alpha,
            scaling=ctx.config.lora.scaling,
            dropout=ctx.config.lora.dropout,
            modules_to_save=ctx.head_modules,
            seed=ctx.seed,
        )

    def trainable_counts(self, model: nn.Module, ctx: MethodContext) -> dict[str, int]:
        return hydralora_trainable_counts(model)

    def extra_loss(self, model: nn.Module, ctx: MethodContext) -> Callable[[], torch.Tensor] | None:
        weight = ctx.options.hydralora.balance_weight
        if weight == 0:
            return None
        return lambda: weight * load_balance_loss(model)

    def finalize(self, model: nn.Module, ctx: MethodContext) -> dict[str, Any]:
        record = dict(ctx.record.pop("hydralora", {}))
        ctx.record.pop("_hydralora_heads", None)
        if ctx.domain_batches is not None:
            # What the router learned: mean gate per head for each domain, averaged over the layers.
            record["router_usage_by_domain"] = {
                domain: torch.stack(list(router_usage(model, batches).values())).mean(0).tolist()
                for domain, batches in ctx.domain_batches().items()
            }
        return {"hydralora": record}

    def save(self, model: nn.Module, directory: Path, ctx: MethodContext) -> None:
        save_hydralora(model, directory, base_model_name_or_path=ctx.base_name_or_path)

    def load(self, base_model: nn.Module, directory: Path) -> nn.Module:
        return load_hydralora(base_model, directory).eval()


ADAPTER = HydraLoraAdapter()
