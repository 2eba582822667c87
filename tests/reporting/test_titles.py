"""Figure titles fit the figure: a dataset given as a split mapping (three file paths) made titles wider
than the image, and matplotlib never wraps them, so they were cut off at both edges."""

from __future__ import annotations

import math

import numpy as np
import pytest
from matplotlib.figure import Figure

from fimlora.reporting import plots
from fimlora.reporting.names import Grid

MAPPING = ",".join(
    f"{split}=/home/someone/projects/tweets-2024/data/{split}.jsonl"
    for split in ("train", "validation", "test")
)


@pytest.fixture
def saved(monkeypatch):
    """The titles of every figure as it is saved, with their extents: [(texts, boxes, figure width)]."""
    seen = []
    save = Figure.savefig

    def spy(self, *args, **kwargs):
        self.draw_without_rendering()
        titles = [ax.title for ax in self.axes] + ([self._suptitle] if self._suptitle is not None else [])
        seen.append([(t.get_text(), t.get_window_extent(), self.bbox.width) for t in titles if t.get_text()])
        return save(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", spy)
    return seen


def assert_inside(figure_titles):
    for text, box, width in figure_titles:
        assert box.x0 >= 0 and box.x1 <= width, (text, box.x0, box.x1, width)


def test_a_long_title_is_wrapped_inside_the_figure(saved):
    title = f"{MAPPING} / minilm: accuracy vs trainable adapter parameters"
    plots.pareto_plot(
        {"lora": [plots.ParetoPoint(1000, 0.7, 0.6, 0.8)]},
        metric="accuracy",
        higher_is_better=True,
        title=title,
    )
    grid = Grid(rows=["0", "1"], columns=["q", "v"], values=np.ones((2, 2)))
    plots.heatmaps([("lora — seed 0", grid)], title=f"{MAPPING} / minilm: rank", colorbar_label="rank")
    (pareto,), (*_, heatmap) = saved
    assert_inside([pareto, heatmap])
    text = pareto[0]
    assert text.count("\n") >= 2
    assert "".join(text.split()) == "".join(title.split())  # wrapped, nothing lost


def test_a_title_that_fits_is_left_alone(saved):
    plots.pareto_plot(
        {"lora": [plots.ParetoPoint(1000, 0.7, math.nan, math.nan)]},
        metric="accuracy",
        higher_is_better=True,
        title="movie-reviews / minilm",
    )
    assert saved[0][0][0] == "movie-reviews / minilm"
