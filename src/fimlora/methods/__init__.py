"""Method registry: allocation rules, adapters and optimizers by name, and the paper presets.

Adding a method: one module in ``allocations/``, ``adapters/`` or ``optimizers/`` defining ``RULE``,
``ADAPTER`` or ``OPTIMIZER``, listed below, a preset in ``presets.py`` if it is a paper method, and a test
of its defining property in ``tests/methods/``.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any

from fimlora.errors import FimloraError
from fimlora.methods.base import (
    AdapterKind,
    AllocationRule,
    MethodContext,
    MethodSpec,
    OptimizerKind,
)
from fimlora.methods.presets import PRESETS

_ALLOCATIONS = {
    "uniform": "uniform",
    "fisher": "fisher",
    "random": "random_rank",
    "gora-score": "gora_score",
    "gora": "gora",
    "spectral": "spectral",
    "whitened-spectral": "spectral",
    "hindsight": "hindsight",
    "adalora": "adalora",
    "fisher-online": "fisher_online",
    "eva": "eva",
    "none": "none",
}
_ADAPTERS = {
    "lora": "lora",
    "dora": "dora",
    "rslora": "rslora",
    "pissa": "pissa",
    "olora": "olora",
    "lora-ga": "lora_ga",
    "gora": "gora",
    "vera": "vera",
    "delta-lora": "delta_lora",
    "hydralora": "hydralora",
    "full": "full_ft",
}
_OPTIMIZERS = {"adamw": "adamw", "loraplus": "loraplus", "lora-fa": "lora_fa", "riemannian": "riemannian"}

ALLOCATIONS: tuple[str, ...] = tuple(_ALLOCATIONS)
ADAPTERS: tuple[str, ...] = tuple(_ADAPTERS)
OPTIMIZERS: tuple[str, ...] = tuple(_OPTIMIZERS)


def get_allocation(name: str) -> AllocationRule:
    module = importlib.import_module(f"fimlora.methods.allocations.{_ALLOCATIONS[name]}")
    rules = getattr(module, "RULES", None)
    return rules[name] if rules is not None else module.RULE


def get_adapter(name: str) -> AdapterKind:
    return importlib.import_module(f"fimlora.methods.adapters.{_ADAPTERS[name]}").ADAPTER


def get_optimizer(name: str) -> OptimizerKind:
    return importlib.import_module(f"fimlora.methods.optimizers.{_OPTIMIZERS[name]}").OPTIMIZER


def method_name(entry: str | Mapping[str, Any] | Any) -> str:
    """The name of a ``methods`` entry of a config: a preset name or a mapping with a ``name``."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping):
        return str(entry["name"])
    return str(entry.name)


def resolve_method(entry: str | Mapping[str, Any] | Any) -> MethodSpec:
    """A preset name, or a mapping/object with ``name`` and any of ``allocation``/``adapter``/``optimizer``.

    A mapping whose name is a preset starts from that preset; otherwise unspecified axes default to
    ``uniform``/``lora``/``adamw``. Raises FimloraError for unknown names and invalid combinations.
    """
    if isinstance(entry, str):
        if entry not in PRESETS:
            raise FimloraError(f"Unknown method {entry!r}; presets: {', '.join(PRESETS)}.")
        spec = PRESETS[entry]
    else:
        fields = dict(entry) if isinstance(entry, Mapping) else entry.model_dump()
        name = fields.get("name")
        if not name:
            raise FimloraError("A method mapping needs a name.")
        base = PRESETS.get(name, MethodSpec(name, "uniform", "lora", "adamw"))
        spec = MethodSpec(
            name=name,
            allocation=fields.get("allocation") or base.allocation,
            adapter=fields.get("adapter") or base.adapter,
            optimizer=fields.get("optimizer") or base.optimizer,
            description=base.description if name in PRESETS else "",
        )
    check_combination(spec)
    return spec


def check_combination(spec: MethodSpec) -> None:
    """Refuse combinations the components cannot implement, with the reason."""
    for axis, value, known in (
        ("allocation", spec.allocation, ALLOCATIONS),
        ("adapter", spec.adapter, ADAPTERS),
        ("optimizer", spec.optimizer, OPTIMIZERS),
    ):
        if value not in known:
            raise FimloraError(
                f"Method {spec.name!r}: unknown {axis} {value!r}; use one of {', '.join(known)}."
            )
    rule, adapter = get_allocation(spec.allocation), get_adapter(spec.adapter)
    where = f"Method {spec.name!r}"
    if rule.adapters is not None and spec.adapter not in rule.adapters:
        raise FimloraError(
            f"{where}: allocation {spec.allocation!r} only works with adapter(s) {sorted(rule.adapters)}, "
            f"not {spec.adapter!r}."
        )
    if not adapter.rank_based and spec.allocation != "none":
        raise FimloraError(
            f"{where}: adapter {spec.adapter!r} takes no rank allocation; use allocation 'none'."
        )
    if adapter.rank_based and spec.allocation == "none":
        raise FimloraError(f"{where}: adapter {spec.adapter!r} needs a rank allocation, not 'none'.")
    if spec.adapter == "vera" and spec.allocation != "uniform":
        raise FimloraError(
            f"{where}: VeRA shares one rank across all layers; only allocation 'uniform' applies."
        )
    if spec.optimizer not in adapter.optimizers:
        raise FimloraError(
            f"{where}: optimizer {spec.optimizer!r} cannot train adapter {spec.adapter!r} "
            f"(supported: {sorted(adapter.optimizers)})."
        )
    if rule.optimizers is not None and spec.optimizer not in rule.optimizers:
        raise FimloraError(
            f"{where}: allocation {spec.allocation!r} trains only with {sorted(rule.optimizers)}, "
            f"not {spec.optimizer!r}."
        )


def check_scaling(spec: MethodSpec, scaling: str) -> None:
    """Refuse a ``lora.scaling`` convention that the method's adapter or allocation rule would ignore."""
    adapter, rule = get_adapter(spec.adapter), get_allocation(spec.allocation)
    for what, name, supported in (
        ("adapter", spec.adapter, adapter.scalings),
        ("allocation", spec.allocation, rule.scalings),
    ):
        if supported is not None and scaling not in supported:
            raise FimloraError(
                f"Method {spec.name!r}: {what} {name!r} does not implement lora.scaling {scaling!r} "
                f"(supported: {', '.join(sorted(supported))})."
            )


def check_rank_zero(spec: MethodSpec) -> None:
    """Refuse ``allocation.r_min: 0`` for a method whose components cannot leave a module without an
    adapter, with the reason."""
    components = (
        ("allocation", spec.allocation, get_allocation(spec.allocation)),
        ("adapter", spec.adapter, get_adapter(spec.adapter)),
    )
    for axis, value, component in components:
        if component.refuses_rank_zero:
            raise FimloraError(
                f"Method {spec.name!r} cannot run with allocation.r_min: 0: {axis} {value!r} "
                f"{component.refuses_rank_zero}; use r_min >= 1 for it"
            )


def check_quantized_base(spec: MethodSpec, quantization: str) -> None:
    """Refuse a method whose components cannot run on a quantised (``int8``/``nf4``) base, with the reason."""
    components = (
        ("allocation", spec.allocation, get_allocation(spec.allocation)),
        ("adapter", spec.adapter, get_adapter(spec.adapter)),
        ("optimizer", spec.optimizer, get_optimizer(spec.optimizer)),
    )
    for axis, value, component in components:
        reason = component.quantized_base_refusal(quantization)
        if reason:
            raise FimloraError(
                f"Method {spec.name!r} cannot run on a quantised ({quantization}) base: {axis} {value!r} "
                f"{reason}; run it with quantization: none"
            )


__all__ = [
    "ADAPTERS",
    "ALLOCATIONS",
    "OPTIMIZERS",
    "PRESETS",
    "AdapterKind",
    "AllocationRule",
    "MethodContext",
    "MethodSpec",
    "OptimizerKind",
    "check_combination",
    "check_quantized_base",
    "check_rank_zero",
    "check_scaling",
    "get_adapter",
    "get_allocation",
    "get_optimizer",
    "method_name",
    "resolve_method",
]
