"""The Pareto front of the metric against peak memory."""

from __future__ import annotations

import math

from fimlora.reporting.plots import MemoryPoint, memory_pareto_plot, pareto_front


def _point(label: str, memory: float, mean: float) -> MemoryPoint:
    return MemoryPoint(label, memory, mean, math.nan, math.nan)


def test_front_keeps_what_nothing_beats_with_less_memory():
    points = [
        _point("cheap", 100, 0.70),
        _point("dominated", 150, 0.69),  # more memory and worse than "cheap"
        _point("better", 200, 0.80),
        _point("tie-but-heavier", 250, 0.80),  # same metric as "better", more memory
        _point("best", 400, 0.85),
    ]
    front = pareto_front(points, higher_is_better=True)
    assert [p.label for p in front] == ["cheap", "better", "best"]
    # Lower is better (perplexity, forgetting): the order of quality flips.
    front = pareto_front(points, higher_is_better=False)
    assert [p.label for p in front] == ["cheap", "dominated"]


def test_memory_pareto_plot_is_a_deterministic_png():
    panels = [("training peak memory (MiB)", [_point("lora", 100, 0.7), _point("dora", 120, 0.72)])]
    first = memory_pareto_plot(panels, metric="accuracy", higher_is_better=True, title="t")
    assert first.startswith(b"\x89PNG") and first == memory_pareto_plot(
        panels, metric="accuracy", higher_is_better=True, title="t"
    )
