"""What a run's numbers depend on: its resolved config, minus the keys that cannot change a result.

A finished run is reused only when the config it was made with (its ``config.yaml``) and the new one
agree on every result-affecting key. The comparison is generic over :class:`ExperimentConfig`: every
leaf of the dumped config counts (new options included, the moment they exist) except the dotted keys
in :data:`NON_RESULT_KEYS`. A stored config is read through today's schema, so an option added since
the run was made counts as its default there (adding an option does not change what old runs did);
a stored config today's schema rejects is compared as written.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from fimlora.config import ExperimentConfig
from fimlora.runs import CONFIG_FILE

#: Dotted config keys that cannot change a run's numbers: where it is written and where it logs.
NON_RESULT_KEYS: frozenset[str] = frozenset({"output_dir", "train.report_to"})

_ABSENT = object()


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings → ``{"dotted.key": leaf}``; lists and scalars are leaves."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping) and value:
            out.update(flatten(value, dotted))
        else:
            out[dotted] = value
    return out


def _affects_results(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NON_RESULT_KEYS)


def result_settings(config: ExperimentConfig) -> dict[str, Any]:
    """Every result-affecting leaf of ``config`` as ``{"dotted.key": value}`` (JSON-typed values)."""
    return {k: v for k, v in flatten(config.model_dump(mode="json")).items() if _affects_results(k)}


def stored_settings(data: Any) -> dict[str, Any]:
    """:func:`result_settings` of a stored config mapping (see the module docstring for old configs)."""
    if not isinstance(data, Mapping):
        return {}
    try:
        return result_settings(ExperimentConfig.model_validate(dict(data)))
    except (ValidationError, ValueError):
        return {k: v for k, v in flatten(data).items() if _affects_results(k)}


def differences(stored: Mapping[str, Any], current: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, stored value, current value)`` for every key whose values differ (absent: ``None``)."""
    keys = list(dict.fromkeys([*current, *stored]))
    out = []
    for key in keys:
        old, new = stored.get(key, _ABSENT), current.get(key, _ABSENT)
        if _canonical(old) != _canonical(new):
            out.append((key, None if old is _ABSENT else old, None if new is _ABSENT else new))
    return out


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str) if value is not _ABSENT else "<absent>"


def describe(diffs: list[tuple[str, Any, Any]], limit: int = 4) -> str:
    """``dataset ('a.csv' → 'b.csv'), train.steps (100 → 50) and 2 more``: the differing keys, old → new."""

    def short(value: Any) -> str:
        text = repr(value)
        return text if len(text) <= 40 else text[:37] + "..."

    shown = [f"{key} ({short(old)} → {short(new)})" for key, old, new in diffs[:limit]]
    more = f" and {len(diffs) - limit} more" if len(diffs) > limit else ""
    return ", ".join(shown) + more


def run_config_differences(run_dir: Path, config: ExperimentConfig) -> list[tuple[str, Any, Any]] | None:
    """How the config a finished run in ``run_dir`` was made with differs from ``config`` (its resolved,
    one-method config); ``[]`` when they agree, ``None`` when the run's ``config.yaml`` is missing or
    unreadable (nothing shows what it was made with)."""
    try:
        stored = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    if not isinstance(stored, Mapping):
        return None
    return differences(stored_settings(stored), result_settings(config))
