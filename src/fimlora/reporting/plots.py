"""The report's figures, as PNG bytes: fixed style, Agg canvas, no global pyplot state, no timestamps.

Every function builds a ``matplotlib.figure.Figure`` on its own ``FigureCanvasAgg`` (so importing this
module never changes the process's matplotlib backend) inside a fixed ``rc_context``; PNGs are saved
without the "Software" metadata, so the same inputs give byte-identical files.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import matplotlib
import numpy as np
from matplotlib import ticker, transforms
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from fimlora.reporting.names import Grid

STYLE: dict[Any, Any] = {
    "font.family": "DejaVu Sans",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    "image.interpolation": "nearest",
    "svg.hashsalt": "fimlora",
}
DPI = 110
# Fixed colours for the built-in methods; any other method takes the next free tab10 colour by name.
_METHOD_COLOURS = {"lora": "#4c72b0", "fim-lora": "#dd8452", "random-rank": "#55a868"}
_PALETTE = ["#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c", "#ccb974", "#64b5cd", "#1f77b4"]


def method_colours(methods: Sequence[str]) -> dict[str, str]:
    """One stable colour per method (built-ins fixed, the rest in sorted order)."""
    colours = {m: _METHOD_COLOURS[m] for m in methods if m in _METHOD_COLOURS}
    others = sorted(m for m in set(methods) if m not in colours)
    for i, method in enumerate(others):
        colours[method] = _PALETTE[i % len(_PALETTE)]
    return colours


def _new_figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Figure) -> bytes:
    fit_titles(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, metadata={"Software": None})
    return buffer.getvalue()


def fit_titles(figure: Figure) -> None:
    """Wrap every axes title and the suptitle onto as many lines as it takes to lie inside the figure:
    matplotlib never wraps them, and a long dataset name (a split mapping's file paths) ran off both
    edges of the image."""
    titles = [ax.title for ax in figure.axes]
    suptitle = getattr(figure, "_suptitle", None)  # where matplotlib keeps it; None when there is none
    if suptitle is not None:
        titles.append(suptitle)
    for title in titles:
        text = title.get_text()
        # Constrained layout keeps a title inside the figure while it is narrower than the figure.
        if not text or title.get_window_extent().width <= 0.9 * figure.bbox.width:
            continue
        columns = len(text)
        while columns > 8:
            figure.draw_without_rendering()  # lays the figure out, so the extent is where it will be drawn
            box = title.get_window_extent()
            if box.x0 >= 0 and box.x1 <= figure.bbox.width:
                break
            columns = max(8, int(columns * min(0.95, 0.98 * figure.bbox.width / max(box.width, 1.0))))
            title.set_text(textwrap.fill(text, columns, break_long_words=True, break_on_hyphens=False))


@dataclass
class ParetoPoint:
    """One configuration: its mean adapter size, mean metric and CI (NaN CI: no error bar)."""

    params: float
    mean: float
    ci_low: float
    ci_high: float
    label: str = ""


def pareto_plot(
    series: Mapping[str, Sequence[ParetoPoint]], *, metric: str, higher_is_better: bool, title: str
) -> bytes:
    """Metric vs trainable adapter parameters, one line per method, error bars = the CI."""
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(6.4, 3.9)
        ax = figure.add_subplot()
        colours = method_colours(list(series))
        all_x: list[float] = []
        for offset, (method, points) in enumerate(series.items()):
            points = sorted(points, key=lambda p: p.params)
            x = np.array([p.params for p in points], float)
            y = np.array([p.mean for p in points], float)
            low = np.array([p.mean - p.ci_low if math.isfinite(p.ci_low) else 0.0 for p in points])
            high = np.array([p.ci_high - p.mean if math.isfinite(p.ci_high) else 0.0 for p in points])
            # Methods at the same budget would hide each other's error bars: draw each series a few
            # points apart on screen (a fixed visual dodge, not a change of its parameter count).
            dodge = transforms.offset_copy(
                ax.transData, fig=figure, x=5.0 * (offset - (len(series) - 1) / 2), units="points"
            )
            ax.errorbar(
                x,
                y,
                yerr=np.vstack([np.maximum(low, 0), np.maximum(high, 0)]),
                marker="o",
                markersize=4,
                capsize=3,
                linewidth=1.4,
                color=colours[method],
                label=method,
                transform=dodge,
            )
            # A custom transform keeps matplotlib from autoscaling: register the data extent by hand.
            ax.update_datalim(np.column_stack([np.concatenate([x, x]), np.concatenate([y - low, y + high])]))
            all_x.extend(x.tolist())
        ax.autoscale_view()
        if all_x and max(all_x) / max(min(all_x), 1.0) > 4:
            ax.set_xscale("log")
        elif all_x and max(all_x) - min(all_x) < 0.05 * max(all_x):
            # One budget: a few hundred parameters apart must not look like a wide spread.
            ax.set_xlim(0.95 * min(all_x), 1.05 * max(all_x))
        ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
        for label in ax.get_xticklabels():
            label.set_rotation(20)
        ax.set_xlabel("trainable adapter parameters (mean over seeds)")
        ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
        ax.set_title(title)
        ax.legend(loc="best")
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
        return _png(figure)


def heatmaps(
    panels: Sequence[tuple[str, Grid]],
    *,
    title: str,
    colorbar_label: str,
    integer: bool = False,
    cmap: str = "viridis",
    shared_scale: bool = True,
) -> bytes:
    """Side-by-side layer × module-type heatmaps (missing cells blank), on one shared colour scale or,
    with ``shared_scale=False``, each with its own colour bar."""

    def limits(grids: Sequence[Grid]) -> tuple[float, float]:
        values = np.concatenate([g.values[np.isfinite(g.values)] for g in grids])
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
        return (low - 0.5, high + 0.5) if low == high else (low, high)

    n_rows = max(g.shape[0] for _, g in panels)
    n_cols = max(g.shape[1] for _, g in panels)
    cell = 0.42 if n_rows <= 16 else 0.24
    width = min(18.0, len(panels) * (max(n_cols, 3) * 0.62 + 1.4) + 1.2)
    height = min(22.0, n_rows * cell + 2.6)
    annotate = n_rows * n_cols <= 400
    with matplotlib.rc_context({**STYLE, "axes.grid": False}):
        figure = _new_figure(width, height)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        shared = limits([g for _, g in panels])
        colour_map = matplotlib.colormaps[cmap].with_extremes(bad="#f0f0f0")
        image = None
        for ax, (panel_title, grid) in zip(axes, panels, strict=True):
            vmin, vmax = shared if shared_scale else limits([grid])
            image = ax.imshow(
                np.ma.masked_invalid(grid.values), cmap=colour_map, vmin=vmin, vmax=vmax, aspect="auto"
            )
            ax.set_xticks(range(len(grid.columns)), grid.columns, rotation=40, ha="right", fontsize=8)
            ax.set_yticks(range(len(grid.rows)), grid.rows, fontsize=8 if n_rows <= 16 else 6)
            ax.set_ylabel("layer")
            ax.set_title(panel_title, fontsize=9)
            if annotate:
                mid = (vmin + vmax) / 2
                for (i, j), v in np.ndenumerate(grid.values):
                    if math.isfinite(v):
                        ax.text(
                            j,
                            i,
                            f"{round(v):d}" if integer else f"{v:.1f}",
                            ha="center",
                            va="center",
                            fontsize=7 if n_rows <= 16 else 5,
                            color="white" if v < mid else "black",
                        )
            if not shared_scale:
                bar = figure.colorbar(image, ax=ax, shrink=0.85, pad=0.02)
                bar.set_label(colorbar_label)
        if shared_scale and image is not None:
            bar = figure.colorbar(image, ax=list(axes), shrink=0.85, pad=0.02)
            bar.set_label(colorbar_label)
            if integer:
                bar.locator = ticker.MaxNLocator(integer=True)
                bar.update_ticks()
        figure.suptitle(title, fontsize=10)
        return _png(figure)


@dataclass
class Curve:
    """A mean curve over seeds: ``y`` at ``steps``, ``spread`` (std over seeds; NaN for one seed)."""

    steps: np.ndarray
    y: np.ndarray
    spread: np.ndarray
    n_runs: int


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (shorter at the start); ``window`` ≤ 1 → unchanged."""
    if window <= 1 or y.size == 0:
        return y.astype(float)
    cumulative = np.cumsum(np.insert(y.astype(float), 0, 0.0))
    out = np.empty(y.size)
    for i in range(y.size):
        start = max(0, i + 1 - window)
        out[i] = (cumulative[i + 1] - cumulative[start]) / (i + 1 - start)
    return out


def loss_curves(
    train: Mapping[str, Curve],
    evaluation: Mapping[str, Curve] | None,
    *,
    title: str,
    window: int,
) -> bytes:
    """Training loss per method (mean over seeds, smoothed, ± std band) and evaluation loss if any."""
    panels = 2 if evaluation else 1
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(6.2 * panels, 3.6)
        axes = figure.subplots(1, panels, squeeze=False)[0]
        colours = method_colours(sorted({*train, *(evaluation or {})}))
        ax = axes[0]
        for method, curve in train.items():
            colour = colours[method]
            ax.plot(curve.steps, curve.y, color=colour, alpha=0.18, linewidth=0.8)
            smoothed = smooth(curve.y, window)
            ax.plot(curve.steps, smoothed, color=colour, linewidth=1.6, label=f"{method} (n={curve.n_runs})")
            if curve.n_runs > 1:
                spread = smooth(np.nan_to_num(curve.spread), window)
                ax.fill_between(curve.steps, smoothed - spread, smoothed + spread, color=colour, alpha=0.12)
        ax.set_xlabel("optimiser step")
        ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
        ax.set_ylabel("training loss")
        smoothing = f"moving average over {window} steps" if window > 1 else "no smoothing"
        ax.set_title(f"training loss ({smoothing}; band ± std over seeds)", fontsize=9)
        ax.legend(loc="upper right")
        if evaluation:
            ax = axes[1]
            for method in [
                *(m for m in train if m in evaluation),
                *(m for m in evaluation if m not in train),
            ]:
                curve = evaluation[method]
                ax.errorbar(
                    curve.steps,
                    curve.y,
                    yerr=np.nan_to_num(curve.spread) if curve.n_runs > 1 else None,
                    marker="o",
                    markersize=3,
                    capsize=2,
                    color=colours[method],
                    label=f"{method} (n={curve.n_runs})",
                )
            ax.set_xlabel("optimiser step")
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            ax.set_ylabel("evaluation loss")
            ax.set_title("evaluation loss during training (± std over seeds)", fontsize=9)
            ax.legend(loc="upper right")
        figure.suptitle(title, fontsize=10)
        return _png(figure)


@dataclass
class StabilityLine:
    """Agreement vs calibration size: mean and [min, max] over the compared pairs."""

    label: str
    sizes: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    dashed: bool = False


def stability_plot(
    tau: Sequence[StabilityLine], overlap: Sequence[StabilityLine], *, title: str, k: int
) -> bytes:
    """Kendall τ and top-k overlap vs calibration size (log x), error bars = min–max over pairs."""
    colours = ["#4c72b0", "#dd8452", "#55a868", *_PALETTE]
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(11.0, 3.8)
        axes = figure.subplots(1, 2, squeeze=False)[0]
        for ax, lines, ylabel in (
            (axes[0], tau, "Kendall τ between module rankings"),
            (axes[1], overlap, f"top-{k} overlap"),
        ):
            for i, line in enumerate(lines):
                # Lines that agree would hide each other: draw each a few points apart on screen.
                dodge = transforms.offset_copy(
                    ax.transData, fig=figure, x=4.0 * (i - (len(lines) - 1) / 2), units="points"
                )
                ax.errorbar(
                    line.sizes,
                    line.mean,
                    yerr=np.vstack([line.mean - line.low, line.high - line.mean]),
                    marker="o",
                    markersize=4,
                    capsize=3,
                    linestyle="--" if line.dashed else "-",
                    color=colours[i % len(colours)],
                    label=line.label,
                    transform=dodge,
                )
            sizes = sorted({float(s) for line in lines for s in line.sizes})
            ax.set_xscale("log", base=2)
            if sizes:
                ax.set_xlim(sizes[0] / 1.4, sizes[-1] * 1.4)
                ax.set_xticks(sizes)
            ax.xaxis.set_major_formatter(ticker.ScalarFormatter())
            ax.xaxis.set_minor_formatter(ticker.NullFormatter())
            ax.set_xlabel("calibration examples per subset")
            ax.set_ylabel(ylabel)
            if lines is tau:
                # Zoom on the observed range (τ is often close to 1): at least [0.9, 1], never below -1.
                lows = [float(np.nanmin(line.low)) for line in lines if np.isfinite(line.low).any()]
                bottom = min([0.9, *lows])
                ax.set_ylim(max(-1.02, bottom - 0.15 * (1.0 - bottom)), 1.005)
            else:
                ax.set_ylim(-0.02, 1.02)  # an overlap moves in steps of 1/k: keep the whole [0, 1]
            ax.legend(loc="lower right")
        figure.suptitle(title, fontsize=10)
        return _png(figure)


def rank_trajectories(
    history: Sequence[tuple[int, Mapping[str, float]]],
    *,
    title: str,
    end_step: int | None = None,
    order: Sequence[str] | None = None,
) -> bytes:
    """Ranks over training: one panel per module type, one line per layer (colour: layer index).

    ``history`` holds ``(step, ranks per module)`` snapshots in step order; a rank holds from its step to
    the next snapshot (or ``end_step``), drawn as a step function. Names are split into layer and type as
    in :func:`fimlora.reporting.names.parse_module_name`; names that do not parse get a panel each.
    """
    from fimlora.reporting.names import parse_module_name

    steps = np.array([step for step, _ in history], dtype=float)
    if end_step is not None and end_step > steps[-1]:
        steps = np.append(steps, float(end_step))
        history = [*history, (end_step, history[-1][1])]
    names = list(dict.fromkeys([*(n for n in (order or []) if n in history[0][1]), *history[0][1]]))
    parsed = {n: parse_module_name(n) for n in names}
    stacks = list(dict.fromkeys(p.stack for p in parsed.values() if p.layer is not None))
    kinds = list(dict.fromkeys(p.kind if p.layer is not None else n for n, p in parsed.items()))
    rows = sorted({(stacks.index(p.stack), p.layer) for p in parsed.values() if p.layer is not None})
    colours = matplotlib.colormaps["viridis"]
    n_cols = min(4, len(kinds))
    n_rows = math.ceil(len(kinds) / n_cols)
    top = dict.fromkeys(kinds, 0.0)
    for name, p in parsed.items():
        kind = p.kind if p.layer is not None else name
        top[kind] = max(top[kind], *(float(ranks.get(name, 0.0)) for _, ranks in history))
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(3.1 * n_cols + 1.0, 2.4 * n_rows + 0.8)
        # Each panel its own rank scale: a type at ranks 1–3 next to one at 100+ would read as flat.
        axes = figure.subplots(n_rows, n_cols, squeeze=False, sharex=True)
        for ax in axes.flat[len(kinds) :]:
            ax.set_visible(False)
        for name in names:
            p = parsed[name]
            kind = p.kind if p.layer is not None else name
            ax = axes.flat[kinds.index(kind)]
            position = rows.index((stacks.index(p.stack), p.layer)) if p.layer is not None else 0
            colour = colours(position / max(1, len(rows) - 1))
            values = [float(ranks.get(name, math.nan)) for _, ranks in history]
            ax.plot(steps, values, drawstyle="steps-post", color=colour, linewidth=1.2, alpha=0.85)
        for index, kind in enumerate(kinds):
            ax = axes.flat[index]
            ax.set_title(kind, fontsize=9)
            ax.set_ylim(0, top[kind] * 1.08 + 0.5)
            ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            ax.yaxis.set_major_locator(ticker.MaxNLocator(integer=True))
            if index % n_cols == 0:
                ax.set_ylabel("rank")
            if index >= len(kinds) - n_cols:  # the lowest panel of its column: label its x axis
                ax.set_xlabel("optimiser step")
                ax.xaxis.set_tick_params(labelbottom=True)
        if len(rows) > 1:
            mappable = matplotlib.cm.ScalarMappable(
                norm=matplotlib.colors.Normalize(vmin=0, vmax=len(rows) - 1), cmap=colours
            )
            bar = figure.colorbar(mappable, ax=list(axes.flat[: len(kinds)]), shrink=0.85, pad=0.02)
            bar.set_label("layer" if len(stacks) == 1 else "layer (stacks in order)")
            bar.locator = ticker.MaxNLocator(integer=True)
            bar.update_ticks()
        figure.suptitle(title, fontsize=10)
        return _png(figure)


@dataclass
class TrialPoint:
    """One tuning trial: its learning rate, its validation score (a pruned trial: the last one it
    reported; a failed trial: none) and how it ended (complete, pruned, failed)."""

    x: float
    y: float | None
    state: str
    best: bool = False  # the trial the tuning chose


def sensitivity_plot(
    series: Mapping[str, Sequence[TrialPoint]],
    *,
    metric: str,
    higher_is_better: bool,
    title: str,
    xlabel: str = "learning rate",
) -> bytes:
    """Validation score vs learning rate (log x), one curve per method through its completed trials;
    pruned trials hollow at their last reported score, failed trials as × on the bottom edge, each
    method's chosen (``best``) trial as a star."""
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(6.4, 3.9)
        ax = figure.add_subplot()
        colours = method_colours(list(series))
        scores = [p.y for points in series.values() for p in points if p.y is not None and math.isfinite(p.y)]
        low = min(scores) if scores else 0.0
        high = max(scores) if scores else 1.0
        pad = 0.08 * (high - low or abs(high) or 1.0)
        floor = low - pad
        for method, points in series.items():
            colour = colours[method]
            complete = sorted(
                (p for p in points if p.state == "complete" and p.y is not None), key=lambda p: p.x
            )
            pruned = [p for p in points if p.state == "pruned" and p.y is not None]
            failed = [p for p in points if p.state == "failed" or p.y is None]
            n = len(points)
            ax.plot(
                [p.x for p in complete],
                [float(p.y or 0.0) for p in complete],
                marker="o",
                markersize=4,
                linewidth=1.2,
                color=colour,
                label=f"{method} ({n} trial{'s' if n != 1 else ''})",
            )
            if pruned:
                ax.scatter(
                    [p.x for p in pruned],
                    [float(p.y or 0.0) for p in pruned],
                    s=22,
                    facecolors="none",
                    edgecolors=colour,
                )
            if failed:
                ax.scatter([p.x for p in failed], [floor] * len(failed), marker="x", s=24, color=colour)
            best = [p for p in complete if p.best]
            if best:
                ax.scatter(
                    [p.x for p in best],
                    [float(p.y or 0.0) for p in best],
                    marker="*",
                    s=110,
                    color=colour,
                    edgecolors="black",
                    zorder=3,
                )
        ax.set_xscale("log")
        ax.set_ylim(floor - pad / 2, high + pad)
        ax.set_xlabel(f"{xlabel} (log scale)")
        ax.set_ylabel(f"validation {metric} ({'higher' if higher_is_better else 'lower'} is better)")
        ax.set_title(title)
        ax.legend(loc="best")
        ax.yaxis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
        return _png(figure)


@dataclass
class MemoryPoint:
    """One configuration: its peak memory (MiB), mean metric and CI (NaN CI: no error bar)."""

    label: str
    memory_mb: float
    mean: float
    ci_low: float
    ci_high: float


def pareto_front(points: Sequence[MemoryPoint], *, higher_is_better: bool) -> list[MemoryPoint]:
    """The points no other point beats on both axes (less or equal memory and an equal or better mean,
    one of them strictly), by increasing memory."""
    sign = 1.0 if higher_is_better else -1.0
    front = []
    for p in points:
        dominated = any(
            q is not p
            and q.memory_mb <= p.memory_mb
            and sign * q.mean >= sign * p.mean
            and (q.memory_mb < p.memory_mb or sign * q.mean > sign * p.mean)
            for q in points
        )
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p.memory_mb)


def memory_pareto_plot(
    panels: Sequence[tuple[str, Sequence[MemoryPoint]]], *, metric: str, higher_is_better: bool, title: str
) -> bytes:
    """Metric against peak memory, one panel per kind of memory: every method a labelled point with its
    CI, the Pareto front (nothing uses less memory for a better metric) joined by a dashed line."""
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(5.2 * len(panels), 4.0)
        axes = figure.subplots(1, len(panels), squeeze=False)[0]
        colours = method_colours(sorted({p.label for _, points in panels for p in points}))
        for ax, (xlabel, points) in zip(axes, panels, strict=True):
            for p in points:
                low = p.mean - p.ci_low if math.isfinite(p.ci_low) else 0.0
                high = p.ci_high - p.mean if math.isfinite(p.ci_high) else 0.0
                ax.errorbar(
                    [p.memory_mb],
                    [p.mean],
                    yerr=[[max(low, 0.0)], [max(high, 0.0)]],
                    marker="o",
                    markersize=5,
                    capsize=3,
                    color=colours[p.label],
                    linestyle="none",
                )
                ax.annotate(
                    p.label, (p.memory_mb, p.mean), xytext=(4, 3), textcoords="offset points", fontsize=7
                )
            front = pareto_front(points, higher_is_better=higher_is_better)
            if len(front) > 1:
                ax.plot(
                    [p.memory_mb for p in front],
                    [p.mean for p in front],
                    linestyle="--",
                    color="#555555",
                    linewidth=1.0,
                    label="Pareto front",
                )
                ax.legend(loc="best")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric} ({'higher' if higher_is_better else 'lower'} is better)")
            ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:,.0f}"))
            ax.yaxis.set_major_formatter(ticker.ScalarFormatter(useOffset=False))
        figure.suptitle(title, fontsize=10)
        return _png(figure)


@dataclass
class TrajectoryLine:
    """One line of :func:`trajectory_plot`: a statistic at fractions of training."""

    label: str
    fractions: np.ndarray
    values: np.ndarray
    dashed: bool = False


def trajectory_plot(
    tau: Sequence[TrajectoryLine], overlap: Sequence[TrajectoryLine], *, title: str, k: int
) -> bytes:
    """Kendall τ and top-k overlap of the Fisher ranking against references, vs the fraction of training."""
    colours = ["#4c72b0", "#c44e52", *_PALETTE]
    with matplotlib.rc_context(STYLE):
        figure = _new_figure(11.0, 3.8)
        axes = figure.subplots(1, 2, squeeze=False)[0]
        for ax, lines, ylabel, low in (
            (axes[0], tau, "Kendall τ between module rankings", -1.02),
            (axes[1], overlap, f"top-{k} overlap", -0.02),
        ):
            for i, line in enumerate(lines):
                ax.plot(
                    line.fractions * 100,
                    line.values,
                    marker="o",
                    markersize=4,
                    linestyle="--" if line.dashed else "-",
                    color=colours[i % len(colours)],
                    label=line.label,
                )
            ax.axhline(0.0, color="#999999", linewidth=0.8)
            ax.set_ylim(low, 1.02)
            ax.set_xlim(-3, 103)
            ax.set_xlabel("% of training steps done")
            ax.set_ylabel(ylabel)
            ax.legend(loc="lower left")
        figure.suptitle(title, fontsize=10)
        return _png(figure)
