"""Allocation *rules*: what decides each module's rank for a method, one module per rule (``RULE``).

A rule chooses the importance signal and when it is applied (Fisher diagonal, GoRA's score, random, EVA's
explained variance, AdaLoRA's pruning, the online Fisher re-allocation); it hands the scores to the
*solvers* in :mod:`fimlora.allocation`, which turn them into ranks under the parameter budget. The
registry (:mod:`fimlora.methods`) loads these modules by name.
"""
