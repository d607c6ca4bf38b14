"""Plots of the report: heatmaps over depth × module type and log–log eigen spectra per module type.

Figures are drawn with matplotlib's object-oriented API on an Agg canvas (no pyplot, no global backend change)
and returned as PNG bytes, so the HTML report can embed them and the Markdown report can link the files.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .metrics import layer_position


@dataclass
class Plot:
    """One figure of the report.

    Attributes:
        id: unique, file-name-safe identifier (``plots/<id>.png``).
        title: caption.
        section: ``"model:<index>"`` or ``"comparison:<index>"``.
        png: the image.

    """

    id: str
    title: str
    section: str
    png: bytes

    @property
    def file(self) -> str:
        """Relative path of the PNG file next to the reports."""
        return f"plots/{self.id}.png"

    def to_dict(self) -> dict[str, str]:
        """JSON description (without the image)."""
        return {"id": self.id, "title": self.title, "section": self.section, "file": self.file}


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 (optional dependency, imported when used)
    from matplotlib.figure import Figure  # noqa: PLC0415 (optional dependency, imported when used)

    fig = Figure(figsize=(width, height), dpi=90, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def grid(rows: Mapping[str, Mapping[str, Any]], key: str) -> tuple[np.ndarray, list[str], list[str]]:
    """Values of ``key`` on a depth × module-type grid (NaN where absent).

    Layers without a depth (for example ``lm_head``) get their own column and a last row labelled ``—``.
    """
    depths: set[int] = set()
    types: list[str] = []
    has_other = False
    for name in rows:
        d, t = layer_position(name)
        if d is None:
            has_other = True
        else:
            depths.add(d)
        if t not in types:
            types.append(t)
    ylabels = [str(d) for d in sorted(depths)] + (["—"] if has_other else [])
    index = {d: i for i, d in enumerate(sorted(depths))}
    data = np.full((len(ylabels), len(types)), np.nan)
    for name, row in rows.items():
        value = row.get(key)
        if value is None or not isinstance(value, (int, float)):
            continue
        d, t = layer_position(name)
        data[index[d] if d is not None else len(ylabels) - 1, types.index(t)] = float(value)
    return data, ylabels, types


def heatmap(
    rows: Mapping[str, Mapping[str, Any]], key: str, title: str, *, log: bool = False, vmin: float | None = None
) -> bytes:
    """A depth × module-type heatmap of one metric (``log``: log10 of positive values; others blank)."""
    data, ylabels, xlabels = grid(rows, key)
    label = key
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            data = np.where(data > 0, np.log10(np.where(data > 0, data, 1.0)), np.nan)
        label = f"log10 {key}"
    fig = _figure(1.6 + 0.75 * len(xlabels), 1.6 + 0.16 * len(ylabels))
    ax = fig.add_subplot()
    masked = np.ma.masked_invalid(data)
    finite = data[np.isfinite(data)]
    lo = vmin if vmin is not None else (float(finite.min()) if finite.size else 0.0)
    hi = float(finite.max()) if finite.size else 1.0
    if hi <= lo:
        hi = lo + 1e-12 if lo == 0 else lo + abs(lo) * 1e-6
    im = ax.imshow(masked, aspect="auto", cmap="viridis", interpolation="nearest", vmin=lo, vmax=hi)
    ax.set_xticks(range(len(xlabels)), [x.split(".")[-1] for x in xlabels], rotation=45, ha="right", fontsize=8)
    step = max(1, math.ceil(len(ylabels) / 16))
    ax.set_yticks(range(0, len(ylabels), step), ylabels[::step], fontsize=8)
    ax.set_ylabel("depth")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, label=label, shrink=0.9)
    return _png(fig)


def spectra(series: Mapping[str, Any], factor: str, title: str) -> bytes:
    """Log–log eigen spectra (eigenvalue vs rank) of one factor, a panel per module type, a line per depth.

    Args:
        series: layer name → eigenvalues (any order; zeros are dropped).
        factor: ``"A"``, ``"G"`` or ``"F"`` (axis label).
        title: figure title.

    """
    by_type: dict[str, list[tuple[int, np.ndarray]]] = {}
    for name, values in series.items():
        d, t = layer_position(name)
        v = np.sort(np.asarray(values, dtype=np.float64))[::-1]
        v = v[v > 0]
        if v.size:
            by_type.setdefault(t, []).append((-1 if d is None else d, v))
    types = list(by_type)
    cols = min(4, max(1, len(types)))
    nrows = max(1, math.ceil(len(types) / cols))
    fig = _figure(3.2 * cols, 2.6 * nrows + 0.4)
    from matplotlib import colormaps  # noqa: PLC0415 (optional dependency, imported when used)
    from matplotlib.cm import ScalarMappable  # noqa: PLC0415 (optional dependency, imported when used)
    from matplotlib.colors import Normalize  # noqa: PLC0415 (optional dependency, imported when used)

    cmap = colormaps["viridis"]
    all_depths = [d for lines in by_type.values() for d, _ in lines if d >= 0]
    norm = Normalize(vmin=min(all_depths, default=0), vmax=max(max(all_depths, default=1), 1))
    for i, t in enumerate(types):
        ax = fig.add_subplot(nrows, cols, i + 1)
        for d, v in sorted(by_type[t], key=lambda x: x[0]):
            ranks = np.arange(1, v.size + 1)
            ax.loglog(ranks, v, color="black" if d < 0 else cmap(norm(d)), linewidth=0.9)
        ax.set_title(t.split(".")[-1], fontsize=9)
        ax.set_xlabel("rank", fontsize=8)
        ax.set_ylabel(f"eigenvalue of {factor}", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(True, which="major", alpha=0.3)
    fig.suptitle(title, fontsize=10)
    if all_depths:
        fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=fig.axes, label="depth", shrink=0.8)
    return _png(fig)


HEATMAPS: tuple[tuple[str, str, bool, float | None], ...] = (
    ("trace_A", "tr A", True, None),
    ("trace_G", "tr G", True, None),
    ("effective_rank_A", "effective rank of A", True, None),
    ("effective_rank_G", "effective rank of G", True, None),
    ("condition_number_damped", "condition number of F + damping", True, None),
    ("top1pct_trace_share", "share of tr F in the top 1% eigenvalues", False, None),
    ("grad_norm", "gradient norm ‖g‖", True, None),
    ("natgrad_norm", "natural-gradient norm ‖(F+δ)⁻¹g‖", True, None),
    ("cosine_grad_natgrad", "cosine(g, (F+δ)⁻¹g)", False, None),
)

COMPARISON_HEATMAPS: tuple[tuple[str, str, bool, float | None], ...] = (
    ("quadratic_form", "½ ΔθᵀF_base Δθ", True, None),
    ("relative_change", "‖ΔV‖ / ‖V_base‖", True, None),
    ("overlap_A", "top-k subspace overlap of A", False, 0.0),
    ("overlap_G", "top-k subspace overlap of G", False, 0.0),
)


def _scale(rows: Mapping[str, Mapping[str, Any]], key: str, log: bool) -> bool | None:
    """None when nothing is plottable; else whether to use a log scale (linear when no value is positive)."""
    vals = [r.get(key) for r in rows.values()]
    vals = [v for v in vals if isinstance(v, (int, float)) and math.isfinite(v)]
    if not vals:
        return None
    return log and any(v > 0 for v in vals)


def model_plots(
    index: int, label: str, rows: Mapping[str, Mapping[str, Any]], spectra_data: Mapping[str, Mapping[str, Any]]
) -> list[Plot]:
    """Heatmaps of the per-layer metrics and spectra of ``A`` and ``G`` for one model."""
    plots = []
    section = f"model:{index}"
    for key, title, log, vmin in HEATMAPS:
        scale = _scale(rows, key, log)
        if scale is not None:
            png = heatmap(rows, key, f"{label}: {title}", log=scale, vmin=vmin)
            plots.append(Plot(f"m{index}-{key}", f"{title}", section, png))
    for factor in ("A", "G"):
        series = {n: s[factor] for n, s in spectra_data.items() if factor in s}
        if series:
            png = spectra(series, factor, f"{label}: eigenvalues of {factor} per module type (colour: depth)")
            plots.append(Plot(f"m{index}-spectra-{factor}", f"eigen spectra of {factor} (log–log)", section, png))
    return plots


def comparison_plots(index: int, label: str, rows: Mapping[str, Mapping[str, Any]]) -> list[Plot]:
    """Heatmaps of the comparison metrics of one model against the base."""
    plots = []
    section = f"comparison:{index}"
    for key, title, log, vmin in COMPARISON_HEATMAPS:
        scale = _scale(rows, key, log)
        if scale is not None:
            png = heatmap(rows, key, f"{label}: {title}", log=scale, vmin=vmin)
            plots.append(Plot(f"c{index}-{key}", title, section, png))
    return plots
