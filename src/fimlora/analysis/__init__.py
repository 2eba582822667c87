"""Analyses of the Fisher itself: ranking stability across calibration subsets and estimators, and
its movement during training (:mod:`fimlora.analysis.fisher_trajectory`, imported on use: it trains)."""

from fimlora.analysis.calibration import (
    CalibrationStability,
    agreement,
    calibration_stability,
    compare_subsets,
    disjoint_subsets,
    kendall_tau,
    load_calibration,
    spearman_rho,
    top_k_overlap,
)

__all__ = [
    "CalibrationStability",
    "agreement",
    "calibration_stability",
    "compare_subsets",
    "disjoint_subsets",
    "kendall_tau",
    "load_calibration",
    "spearman_rho",
    "top_k_overlap",
]
