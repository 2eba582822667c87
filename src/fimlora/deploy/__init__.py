"""From a finished run to deployment: load it, export it (merged, or adapter + loader, or adapter only),
generate with it, and the inference and forgetting figures every run records.

* :mod:`fimlora.deploy.loading`: :func:`load_run`, the trained model of a run directory;
* :mod:`fimlora.deploy.export`: :func:`export_run` (``fimlora export``);
* :mod:`fimlora.deploy.generate`: :func:`continue_prompts` (``fimlora generate``, the report's samples);
* :mod:`fimlora.deploy.inference`: throughput and peak memory unmerged / merged / base;
* :mod:`fimlora.deploy.records`: what a run adds to ``result.json`` after training;
* ``hydralora_loader.py``: the standalone loader copied into HydraLoRA exports.
"""

from __future__ import annotations

from fimlora.deploy.export import ExportResult, export_run
from fimlora.deploy.generate import continue_prompts
from fimlora.deploy.loading import LoadedRun, load_run

__all__ = ["ExportResult", "LoadedRun", "continue_prompts", "export_run", "load_run"]
