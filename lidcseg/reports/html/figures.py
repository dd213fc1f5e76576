"""Figures drawn for the report itself (the stages' own PNGs are embedded as they are).

- :func:`ged_panels`: Fig. 4a as the paper lays it out, one panel per number of samples n
  with a box per model, read from the evaluation's ``per_image.csv``. The evaluation's
  own ``ged.png`` puts every model and n on one axis, which gets wide with ten models.

matplotlib's Agg canvas via the helpers of :mod:`lidcseg.reports.plots`; PNG bytes out.
"""

from __future__ import annotations

import csv
import io
import textwrap
from collections.abc import Sequence
from pathlib import Path

import numpy as np


def read_ged(per_image: Path) -> dict[str, dict[int, np.ndarray]]:
    """``per_image.csv`` -> run label -> {n: (N,) GED² per crop}, in the file's order."""
    values: dict[str, dict[int, list[float]]] = {}
    with per_image.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            try:
                n, ged = int(row["n"]), float(row["ged"])
            except (KeyError, TypeError, ValueError):
                continue
            values.setdefault(row.get("run", "?"), {}).setdefault(n, []).append(ged)
    return {label: {n: np.asarray(v) for n, v in sorted(per_n.items())} for label, per_n in values.items()}


def ged_panels(values: dict[str, dict[int, np.ndarray]], order: Sequence[str], *,
               reference: tuple[str, float] | None = None, title: str = "") -> bytes:
    """Box plots of GED² per crop: one panel per n, one box per run (in ``order``), as Fig. 4a.

    Args:
        values: run label -> {n: (N,) per-crop GED²}.
        order: the runs' labels, in the order of the boxes.
        reference: ``(label, value)`` of a published GED² at n = 16, drawn as a dashed line
            in that panel (None: none).
        title: the figure's title.

    Returns:
        The PNG.
    """
    from matplotlib.patches import Patch

    from lidcseg.reports.plots import _colors, _figure

    labels = [lab for lab in order if lab in values]
    counts = sorted({n for lab in labels for n in values[lab]})
    colors = _colors(len(labels))
    width = min(15.0, max(8.0, 1.2 + len(counts) * (0.9 + 0.28 * len(labels))))
    legend_rows = (len(labels) + 2) // 3 + (1 if reference else 0)
    fig = _figure(width, 4.2 + 0.22 * legend_rows, dpi=110)
    axes = fig.subplots(1, max(1, len(counts)), sharey=True, squeeze=False)[0]
    for ax, n in zip(axes, counts, strict=False):
        for i, lab in enumerate(labels):
            v = values[lab].get(n)
            if v is None or not np.isfinite(v).any():
                continue
            v = v[np.isfinite(v)]
            ax.boxplot([v], positions=[i], widths=0.7, patch_artist=True, manage_ticks=False,
                       boxprops={"facecolor": colors[i], "alpha": 0.6, "edgecolor": colors[i]},
                       medianprops={"color": "black", "linewidth": 1.2},
                       whiskerprops={"color": colors[i]}, capprops={"color": colors[i]},
                       flierprops={"marker": ".", "markersize": 2.5, "markerfacecolor": colors[i],
                                   "markeredgecolor": "none", "alpha": 0.6})
            ax.scatter([i], [float(v.mean())], marker="D", s=20, color="white", edgecolor="black", zorder=4)
        if reference is not None and n == 16:
            ax.axhline(reference[1], color="black", linestyle="--", linewidth=1.0)
        ax.set_xticks([])
        ax.set_xlim(-0.7, len(labels) - 0.3)
        ax.set_title(f"n = {n}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("GED² per crop (d = 1 − IoU)")
    handles = [Patch(facecolor=colors[i], alpha=0.6, edgecolor=colors[i],
                     label=textwrap.shorten(lab, 40, placeholder="…")) for i, lab in enumerate(labels)]
    handles.append(axes[0].scatter([], [], marker="D", s=20, color="white", edgecolor="black", label="mean"))
    if reference is not None:
        from matplotlib.lines import Line2D

        handles.append(Line2D([], [], color="black", linestyle="--", label=reference[0]))
    fig.legend(handles=handles, loc="lower center", ncol=3, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06 + 0.045 * legend_rows, 1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()
