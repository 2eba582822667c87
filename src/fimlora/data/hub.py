"""Hugging Face hub datasets, loaded with ``datasets.load_dataset`` and normalised like local files.

This needs network access (or a populated local ``datasets`` cache); every failure, including being
offline (``HF_HUB_OFFLINE=1``) or an unknown id, becomes one FimloraError naming the alternatives.
"""

from __future__ import annotations

import difflib
import os

import datasets

from fimlora.data.files import normalize_splits
from fimlora.data.registry import TaskData, available_datasets
from fimlora.errors import FimloraError


def load_hub_dataset(
    name: str,
    *,
    seed: int,
    task: str | None = None,
    text_column: str | None = None,
    label_column: str | None = None,
    hub_config: str | None = None,
    trust_remote_code: bool = False,
) -> TaskData:
    """Load hub dataset ``name`` (config ``hub_config``) and normalise it (see :mod:`fimlora.data.files`)."""
    try:
        raw = datasets.load_dataset(name, hub_config, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise FimloraError(_unknown_message(name, exc)) from exc
    if not isinstance(raw, datasets.DatasetDict):
        raise FimloraError(
            f"Hub dataset {name!r} did not load as a set of splits; use a dataset with "
            "ordinary (non-streaming) splits."
        )
    return normalize_splits(
        raw, name=name, seed=seed, task=task, text_column=text_column, label_column=label_column
    )


def _unknown_message(name: str, exc: BaseException) -> str:
    builtins = available_datasets()
    reason = (str(exc).strip() or type(exc).__name__).splitlines()[0].rstrip(".")
    close = difflib.get_close_matches(name, builtins, n=1)
    advice = f"did you mean {close[0]!r}? Otherwise " if close else ""
    offline = datasets.config.HF_HUB_OFFLINE or any(
        os.environ.get(var, "").upper() in ("1", "ON", "YES", "TRUE")
        for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    )
    advice += "check the hub id and config" + (
        " and unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE" if offline else " and your network connection"
    )
    return (
        f"Could not load dataset {name!r}: it is not a built-in ({', '.join(builtins)}), not an existing "
        f".csv/.json/.jsonl file, and loading it from the Hugging Face hub failed ({reason}); {advice}."
    )
