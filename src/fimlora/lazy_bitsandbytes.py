"""bitsandbytes only when a run asks for quantisation, and never its kernel-hub lookup or its chatter.

PEFT imports bitsandbytes whenever it is installed (``peft.helpers`` at ``import peft``, the LoRA layer
dispatch at every ``get_peft_model``), and bitsandbytes 0.50, on a CPU with AVX512-BF16, asks the Hugging
Face kernel hub for a fused 4-bit kernel at import time and logs two warnings when that fails. This
project reaches no hub and runs the same code on every CPU (:func:`fimlora.quantization.keep_unpacked`),
so neither the lookup nor the messages serve a user.

Two mechanisms, both without importing torch:

* :func:`install_quiet_import` (done by ``import fimlora``): whoever imports bitsandbytes after that —
  PEFT, transformers, the user — gets it with the ``kernels`` package hidden during its import (so its
  CPU backend cannot fetch a hub kernel) and its import-time warnings dropped.
* :func:`defer` (done by the ``fimlora`` command and its worker processes): bitsandbytes looks absent to
  PEFT and transformers until :func:`load` is called, which a quantised model load does. A command that
  quantises nothing never imports it (≈ 1 s of start-up on a 2-core machine).

Library users are never deferred: ``import fimlora`` must not stop their own ``import bitsandbytes``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import logging
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import ModuleType
from typing import Any

NAME = "bitsandbytes"
_MISSING = object()


@contextmanager
def _without_hub_kernels() -> Iterator[None]:
    """Hide the ``kernels`` package (its ``get_kernel`` downloads from the hub) and mute bitsandbytes'
    loggers while the block runs; both restored afterwards."""
    saved_kernels = sys.modules.get("kernels", _MISSING)
    sys.modules["kernels"] = None  # type: ignore[assignment]  # `from kernels import …` raises ImportError
    bnb_logger = logging.getLogger(NAME)
    saved_level = bnb_logger.level
    bnb_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        bnb_logger.setLevel(saved_level)
        if saved_kernels is _MISSING:
            sys.modules.pop("kernels", None)
        else:
            sys.modules["kernels"] = saved_kernels  # type: ignore[assignment]


class _QuietLoader(importlib.abc.Loader):
    """Runs the real loader of the ``bitsandbytes`` package inside :func:`_without_hub_kernels`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        with _without_hub_kernels():
            self._loader.exec_module(module)

    def __getattr__(self, name: str) -> Any:  # resource readers and the like: the real loader's
        return getattr(self._loader, name)


class _QuietFinder(importlib.abc.MetaPathFinder):
    """Finds ``bitsandbytes`` with the other finders and wraps its loader in :class:`_QuietLoader`."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != NAME:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _QuietLoader(spec.loader)
                return spec
        return None


def install_quiet_import() -> None:
    """Make every later import of bitsandbytes in this process quiet and hub-free (idempotent)."""
    if not any(isinstance(finder, _QuietFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())


def defer() -> None:
    """Make bitsandbytes look absent (to ``import`` and ``importlib.util.find_spec``) until :func:`load`.

    For the ``fimlora`` command's own processes only; a no-op when bitsandbytes is already imported.
    """
    if NAME not in sys.modules:
        sys.modules[NAME] = None  # type: ignore[assignment]


def is_deferred() -> bool:
    return NAME in sys.modules and sys.modules[NAME] is None


def load() -> ModuleType:
    """Import bitsandbytes (ending a deferral), quietly; raises ImportError when it is not installed.

    PEFT and transformers cache "is bitsandbytes available?" the first time they ask; a deferred process
    may have asked already, so those caches are cleared here and they ask again.
    """
    if is_deferred():
        del sys.modules[NAME]
        _forget_availability_checks()
    install_quiet_import()
    return importlib.import_module(NAME)


def _forget_availability_checks() -> None:
    checks = {
        "peft.import_utils": ("is_bnb_available", "is_bnb_4bit_available"),
        "transformers.utils.import_utils": ("is_bitsandbytes_available",),
    }
    for module_name, names in checks.items():
        module = sys.modules.get(module_name)
        for name in names:
            cache_clear = getattr(getattr(module, name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
