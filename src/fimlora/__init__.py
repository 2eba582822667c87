"""fimlora: Fisher-information-guided adaptive LoRA rank allocation.

Pipeline: data → model → fisher → allocation → method → train → evaluate → report.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fimlora.allocation import Allocation, allocate_ranks, uniform_rank_budget
    from fimlora.fisher import FisherResult, estimate_fisher

from fimlora.lazy_bitsandbytes import install_quiet_import

__version__ = "0.1.0"

# Before PEFT or transformers can import bitsandbytes: its import must neither reach the kernel hub nor
# print (see fimlora.lazy_bitsandbytes).
install_quiet_import()

# Imported on first use, so `python -m fimlora.assets` and the CLI's --help start without torch.
_LAZY = {
    "Allocation": "fimlora.allocation",
    "allocate_ranks": "fimlora.allocation",
    "uniform_rank_budget": "fimlora.allocation",
    "FisherResult": "fimlora.fisher",
    "estimate_fisher": "fimlora.fisher",
}

__all__ = [
    "Allocation",
    "FisherResult",
    "__version__",
    "allocate_ranks",
    "estimate_fisher",
    "uniform_rank_budget",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fimlora' has no attribute {name!r}")
