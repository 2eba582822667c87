"""Change the ranks of a PEFT LoRA model in place, mid-training, keeping it PEFT-native.

A LoRA module adds ``s·B·A`` to its frozen weight (``A``: r × d_in, ``B``: d_out × r, ``s`` = its
scaling). Changing r to r' replaces A and B by new tensors and sets the layer's ``r``, ``lora_alpha`` and
``scaling`` and the config's ``rank_pattern``/``alpha_pattern`` to what PEFT itself builds for rank r'
(:func:`fimlora.allocation.peft_patterns`), so ``save_pretrained`` writes an adapter that
``PeftModel.from_pretrained`` rebuilds exactly. The new update ``s'·B'·A'``:

* **grow** (r' > r): A' = [A; A_new], B' = [B·s/s', 0]. ``A_new`` is drawn as PEFT draws A
  (``kaiming_uniform_(a=√5)``, a row's distribution does not depend on r) and B' is zero on the new
  columns, so s'·B'A' = s·BA: the function is unchanged (up to float round-off in s/s', exact when the
  scaling does not move, as under ``constant``). Under ``alpha_over_r``, s' = α/r' ≠ s = α/r, hence the
  factor s/s' = r'/r on B.
* **add** (0 → r', ``allocation.r_min: 0``): a module without an adapter gets PEFT's own ``lora.Linear``
  around its frozen layer, A drawn as above and B = 0: the function is unchanged.
* **remove** (r → 0): the LoRA layer is replaced by its frozen base layer; the whole update s·B·A is
  lost (the best rank-0 approximation), its Frobenius norm the truncation error.
* **shrink** (r' < r): the best rank-r' approximation of s·BA (Eckart–Young), from the SVD of the r × r
  core of the QR factors of B and Aᵀ (never a d_out × d_in matrix): s·BA = U Σ Vᵀ, then
  A' = κ·V_{r'}ᵀ and B' = U_{r'} Σ_{r'} / (s'·κ), with κ the RMS row norm of the current A. The
  discarded part has Frobenius norm √(Σ_{i>r'} σ_i²), the truncation error (``RankChange``), and
  spectral norm σ_{r'+1}: no layer output moves by more than σ_{r'+1}·‖x‖. The singular values go to B,
  not √Σ to both factors, so that A keeps PEFT's shape of state: orthonormal directions of a trained
  scale, with B carrying the magnitudes. A direction with σ ≈ 0 is then exactly a fresh LoRA direction
  (B column ≈ 0, A row of norm κ), which keeps receiving gradient; split √Σ-wise, both of its factors
  would be ≈ 0 and it could never learn again.

The SVD runs in float64; the new tensors take the old ones' dtype and device.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from fimlora.allocation.allocation import module_alpha, peft_patterns
from fimlora.errors import FimloraError

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class RankChange:
    """One module's re-sizing: ranks, what was lost, and the tensors that replaced the old ones.

    ``truncation_error`` = ‖s'·B'A' − s·BA‖_F (0 for growth); ``update_norm`` = ‖s·BA‖_F before;
    ``replaced`` = ((old A, new A), (old B, new B)), with None for the old tensors of an added adapter
    and for the new ones of a removed adapter.
    """

    name: str
    old_rank: int
    new_rank: int
    truncation_error: float
    update_norm: float
    replaced: tuple[tuple[nn.Parameter | None, nn.Parameter | None], ...]


# PEFT's layers are typed loosely (attributes resolve to ``Tensor | Module``): they are ``Any`` here.
def lora_layers(model: nn.Module) -> dict[str, Any]:
    """The PEFT ``LoraLayer``s of a ``PeftModel`` (or its inner model), keyed by their base-model name."""
    return {
        name.removeprefix(_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, LoraLayer)
    }


def lora_update(layer: Any, adapter: str) -> torch.Tensor:
    """``s·B·A`` of one layer, float64 (d_out × d_in): what the adapter adds to the frozen weight."""
    a = layer.lora_A[adapter].weight.detach().double()
    b = layer.lora_B[adapter].weight.detach().double()
    return layer.scaling[adapter] * (b @ a)


def adapter_parameter_count(layers: Iterable[Any], adapter: str) -> int:
    """Trainable entries of A and B (and B's bias, if any) over ``layers``."""
    total = 0
    for layer in layers:
        for module in (layer.lora_A[adapter], layer.lora_B[adapter]):
            total += sum(p.numel() for p in module.parameters() if p.requires_grad)
    return total


def resize_layer(
    layer: Any,
    adapter: str,
    new_rank: int,
    new_alpha: float,
    *,
    generator: torch.Generator | None = None,
    name: str = "",
) -> RankChange:
    """Give one PEFT LoRA layer rank ``new_rank`` and ``lora_alpha`` ``new_alpha`` (see the module doc)."""
    if layer.use_dora.get(adapter) or layer.use_rslora.get(adapter) or adapter in layer.lora_variant:
        raise FimloraError(f"{name or 'layer'}: only plain LoRA layers (no DoRA, rsLoRA) can be re-sized.")
    if layer.lora_B[adapter].bias is not None:
        raise FimloraError(f"{name or 'layer'}: LoRA layers with a bias on B cannot be re-sized.")
    lora_a, lora_b = layer.lora_A[adapter], layer.lora_B[adapter]
    a, b = lora_a.weight, lora_b.weight
    old_rank, scaling = a.shape[0], float(layer.scaling[adapter])
    d_out, d_in = b.shape[0], a.shape[1]
    if not 1 <= new_rank <= min(d_in, d_out):
        raise FimloraError(f"{name or 'layer'}: rank {new_rank} is outside [1, min(d_in, d_out)].")
    new_scaling = new_alpha / new_rank  # PEFT's own formula, so a reloaded adapter has the same float
    with torch.no_grad():
        a64, b64 = a.detach().double(), b.detach().double()
        update_norm = float(torch.linalg.matrix_norm(scaling * (b64 @ a64)))
        if new_rank >= old_rank:
            fresh = torch.empty(new_rank - old_rank, d_in, dtype=a.dtype, device=a.device)
            nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
            new_a = torch.cat([a.detach(), fresh])
            zeros = torch.zeros(d_out, new_rank - old_rank, dtype=b.dtype, device=b.device)
            new_b = torch.cat([(b64 * (scaling / new_scaling)).to(b.dtype), zeros], dim=1)
            error = 0.0
        else:
            q_b, r_b = torch.linalg.qr(b64)
            q_a, r_a = torch.linalg.qr(a64.T)
            u, sigma, vh = torch.linalg.svd(scaling * (r_b @ r_a.T))
            left, right = q_b @ u[:, :new_rank], q_a @ vh[:new_rank].T
            kappa = float(torch.linalg.matrix_norm(a64)) / math.sqrt(old_rank) or 1.0
            new_a = (kappa * right.T).to(a.dtype)
            new_b = (left * (sigma[:new_rank] / (new_scaling * kappa))).to(b.dtype)
            error = float(sigma[new_rank:].square().sum().sqrt())
    replaced: list[tuple[nn.Parameter | None, nn.Parameter | None]] = []
    for module, tensor in ((lora_a, new_a), (lora_b, new_b)):
        old = module.weight
        module.weight = nn.Parameter(tensor.contiguous(), requires_grad=old.requires_grad)
        replaced.append((old, module.weight))
    lora_a.out_features = lora_b.in_features = new_rank
    layer.r[adapter] = new_rank
    layer.lora_alpha[adapter] = new_alpha
    layer.scaling[adapter] = new_scaling
    return RankChange(name, old_rank, new_rank, error, update_norm, tuple(replaced))


def set_ranks(
    model: Any,
    ranks: Mapping[str, int],
    *,
    scaling: str,
    adapter: str = "default",
    generator: torch.Generator | None = None,
) -> list[RankChange]:
    """Re-size the LoRA layers of a ``PeftModel`` to ``ranks`` and rewrite its config's patterns.

    ``ranks`` must name every LoRA layer (names as in the base model); rank 0 removes a module's adapter,
    and a rank above 0 for a frozen ``nn.Linear`` without one adds it (``target_modules`` follows).
    ``scaling`` is the convention the
    adapter was built with (``alpha_over_r`` or ``constant``, as in ``Allocation.to_lora_config``);
    ``config.r`` and ``config.lora_alpha`` stay, so under ``constant`` every module keeps
    s = lora_alpha / r. Returns the modules whose rank changed (the others are not touched: same tensors).
    """
    if scaling not in ("alpha_over_r", "constant"):
        raise FimloraError(
            f"Ranks can only be re-sized under alpha_over_r or constant scaling, not {scaling!r}."
        )
    config = model.peft_config[adapter]
    if config.init_lora_weights is not True:
        raise FimloraError("Ranks can only be re-sized for LoRA's default init (init_lora_weights=True).")
    layers = lora_layers(model)
    unnamed = sorted(set(layers) - set(ranks))
    if unnamed:
        raise FimloraError(f"The new ranks leave out LoRA layer(s) of the model (e.g. {unnamed[:3]}).")
    adapted = {n: int(r) for n, r in ranks.items() if int(r) > 0}
    if not adapted:
        raise FimloraError("The new ranks are all 0: the model would have no adapter left.")
    changes = []
    for name in sorted(ranks):
        layer, rank = layers.get(name), int(ranks[name])
        if layer is None:
            if rank > 0:
                alpha = module_alpha(
                    rank, reference_rank=config.r, lora_alpha=config.lora_alpha, scaling=scaling
                )
                changes.append(add_layer(model, name, adapter, rank, alpha, generator=generator))
            continue
        if rank == layer.r[adapter]:
            continue
        if rank == 0:
            changes.append(remove_layer(model, name, layer, adapter))
            continue
        alpha = module_alpha(rank, reference_rank=config.r, lora_alpha=config.lora_alpha, scaling=scaling)
        changes.append(resize_layer(layer, adapter, rank, alpha, generator=generator, name=name))
    rank_pattern, alpha_pattern = peft_patterns(
        adapted, reference_rank=config.r, lora_alpha=config.lora_alpha, scaling=scaling
    )
    config.rank_pattern = rank_pattern
    config.alpha_pattern = alpha_pattern
    config.target_modules = set(adapted)
    return changes


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module holding base-model module ``name`` inside a ``PeftModel``, and its attribute name."""
    parent, _, child = (_PREFIX + name).rpartition(".")
    return model.get_submodule(parent), child


def add_layer(
    model: Any, name: str, adapter: str, rank: int, alpha: float, *, generator: torch.Generator | None = None
) -> RankChange:
    """Wrap the frozen ``nn.Linear`` ``name`` of a ``PeftModel`` in PEFT's ``lora.Linear`` of rank ``rank``
    (A drawn as PEFT draws it, from ``generator``; B = 0, so the function does not change)."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    parent, child = _parent(model, name)
    base = getattr(parent, child)
    if not isinstance(base, nn.Linear):
        raise FimloraError(
            f"{name}: only a plain nn.Linear can get a LoRA adapter, not {type(base).__name__}."
        )
    if not 1 <= rank <= min(base.in_features, base.out_features):
        raise FimloraError(f"{name}: rank {rank} is outside [1, min(d_in, d_out)].")
    config = model.peft_config[adapter]
    # PEFT's layers are typed loosely (attributes resolve to ``Tensor | Module``): ``Any`` here.
    layer: Any = LoraLinear(base, adapter, config=config, r=rank, lora_alpha=alpha)  # type: ignore[arg-type]
    weight = base.weight
    layer.to(device=weight.device, dtype=weight.dtype)
    a, b = layer.lora_A[adapter].weight, layer.lora_B[adapter].weight
    with torch.no_grad():
        nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
        b.zero_()
    layer.train(model.training)
    setattr(parent, child, layer)
    return RankChange(name, 0, rank, 0.0, 0.0, ((None, a), (None, b)))


def remove_layer(model: Any, name: str, layer: Any, adapter: str) -> RankChange:
    """Replace the LoRA layer ``name`` by its frozen base layer: the whole update s·B·A is dropped."""
    norm = float(torch.linalg.matrix_norm(lora_update(layer, adapter)))
    parent, child = _parent(model, name)
    setattr(parent, child, layer.get_base_layer())
    old_rank = int(layer.r[adapter])
    return RankChange(
        name,
        old_rank,
        0,
        norm,
        norm,
        ((layer.lora_A[adapter].weight, None), (layer.lora_B[adapter].weight, None)),
    )


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer,
    replaced: Iterable[tuple[nn.Parameter | None, nn.Parameter | None]],
    *,
    like: nn.Parameter | None = None,
) -> None:
    """Put each new tensor where the old one was (same param group) and drop the old one's state.

    ``(old, None)`` removes ``old`` (a removed adapter); ``(None, new)`` adds ``new`` to the group that
    holds ``like``, or without one to the group of the first tensor replaced (an added adapter goes where
    the other LoRA tensors are: same learning rate and weight decay; at a re-allocation where every adapted
    module changes rank, no unchanged LoRA tensor is left to name as ``like``). The new tensors start
    with no optimizer state: AdamW initialises their moments and step count
    at their first update, as for a freshly built adapter. Parameters not in ``replaced`` keep theirs. The
    groups' settings (learning rate, weight decay, the LR schedule's base rate) are not touched, so a
    scheduler that holds the optimizer keeps going.
    """
    while isinstance(inner := getattr(optimizer, "optimizer", None), torch.optim.Optimizer):
        optimizer = inner  # accelerate's wrapper: work on the optimizer it wraps
    pairs = list(replaced)
    mapping = {id(old): new for old, new in pairs if old is not None}
    added = [new for old, new in pairs if old is None and new is not None]
    found = set()
    first_replaced: dict[str, Any] | None = None
    for group in optimizer.param_groups:
        params = []
        for param in group["params"]:
            if id(param) in mapping:
                found.add(id(param))
                first_replaced = group if first_replaced is None else first_replaced
                optimizer.state.pop(param, None)
                if mapping[id(param)] is not None:
                    params.append(mapping[id(param)])
            else:
                params.append(param)
        group["params"] = params
    missing = set(mapping) - found
    if missing:
        raise RuntimeError(f"{len(missing)} re-sized LoRA tensor(s) were not in the optimizer's param groups")
    if added:
        home = next((g for g in optimizer.param_groups if any(p is like for p in g["params"])), None)
        if like is None:
            home = first_replaced
        if home is None:
            raise RuntimeError(
                "added LoRA tensors need a group: pass a LoRA tensor the optimizer holds as like, or "
                "replace one in the same call"
            )
        home["params"].extend(added)
