"""Fisher information of the frozen weights, from a calibration pass."""

from fimlora.fisher.estimator import ESTIMATORS, estimate_fisher
from fimlora.fisher.result import AGGREGATIONS, FisherResult

__all__ = ["AGGREGATIONS", "ESTIMATORS", "FisherResult", "estimate_fisher"]
