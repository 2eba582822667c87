"""Fisher information of the frozen weights, from a calibration pass."""

from fimlora.fisher.estimator import DEFAULT_MAX_CHUNK_ELEMENTS, ESTIMATORS, estimate_fisher
from fimlora.fisher.result import AGGREGATIONS, STATISTICS, FisherResult

__all__ = [
    "AGGREGATIONS",
    "DEFAULT_MAX_CHUNK_ELEMENTS",
    "ESTIMATORS",
    "STATISTICS",
    "FisherResult",
    "estimate_fisher",
]
