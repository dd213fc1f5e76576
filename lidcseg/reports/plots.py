"""Figures of the reports (matplotlib, the Agg canvas; no pyplot state is touched).

- :func:`plot_distributions`: a metric's per-image distribution per model against
  the number of samples (the paper's Fig. 4a).
- :func:`plot_examples`: image, grader masks and samples of a few crops (Fig. 3a, Appendix F).
- :func:`plot_presence_histograms`: how many samples show a lesion, for ambiguous and
  unambiguous crops (Fig. 12, Appendix E).
- :func:`plot_latent_grid`: segmentations decoded on a grid of a 2-D latent plane (Fig. 6, Appendix A).

Masks are drawn over the CT tile as a translucent fill with an opaque outline
(:func:`mask_overlay`), zoomed on the lesion (:func:`view_box`). Every file is
written atomically as PNG.
"""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.io.atomic import atomic_path

#: Overlay colour of grader masks and of samples (RGB in [0, 1]).
GRADER_COLOR = (0.15, 0.85, 0.25)
SAMPLE_COLOR = (1.0, 0.25, 0.2)
#: Display window of normalised CT (the training's [-1, 1] scale): lung to soft tissue.
DISPLAY_WINDOW = (-1.0, 0.8)


def _figure(width: float, height: float, dpi: int = 100) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=dpi, layout=None)


def save_png(fig: Any, path: str | Path, dpi: int | None = None) -> Path:
    """Save a matplotlib figure as PNG, atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi or fig.dpi, facecolor="white")
    return path


def mask_overlay(
    image: np.ndarray,
    mask: np.ndarray | None,
    color: tuple[float, float, float] = SAMPLE_COLOR,
    alpha: float = 0.35,
    window: tuple[float, float] = DISPLAY_WINDOW,
) -> np.ndarray:
    """An RGB picture of a CT tile with a mask: translucent fill and opaque one-pixel outline.

    Args:
        image: (H, W) normalised CT (training scale, [-1, 1]).
        mask: (H, W) bool, or None for the bare image.
        color: RGB of the mask.
        alpha: opacity of the fill.
        window: values mapped to black and white.

    Returns:
        (H, W, 3) float in [0, 1].
    """
    lo, hi = window
    grey = np.clip((np.asarray(image, float) - lo) / (hi - lo), 0.0, 1.0)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    if mask is None or not mask.any():
        return rgb
    m = np.asarray(mask, bool)
    c = np.asarray(color, float)
    rgb[m] = (1 - alpha) * rgb[m] + alpha * c
    inner = m.copy()  # erosion by the 4-neighbourhood; pixels at the border count as outline
    inner[1:] &= m[:-1]
    inner[:-1] &= m[1:]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    inner[[0, -1], :] = False
    inner[:, [0, -1]] = False
    rgb[m & ~inner] = c
    return rgb


def view_box(
    masks: np.ndarray, size: int, min_side: int = 32, margin: float = 0.3
) -> tuple[slice, slice]:
    """A square window around every foreground pixel of ``masks``, to zoom on the lesion.

    Args:
        masks: (..., H, W) bool, all the masks that will be shown (H = W = ``size``).
        size: side of the tile.
        min_side: smallest window side in pixels.
        margin: added on each side, as a fraction of the union's bounding box side.

    Returns:
        ``(rows, cols)`` slices of a square of side in [min_side, size]; the centre
        half of the tile when every mask is empty.
    """
    union = np.asarray(masks, bool).reshape(-1, size, size).any(0)
    if not union.any():
        side = max(min(size, min_side), size // 2)
        centre = size / 2
    else:
        rr, cc = np.nonzero(union)
        r0, r1, c0, c1 = rr.min(), rr.max() + 1, cc.min(), cc.max() + 1
        side = max(r1 - r0, c1 - c0)
        side = int(min(size, max(min_side, round(side * (1 + 2 * margin)))))
        centre = None
    if centre is not None:
        r_start = c_start = int(round(centre - side / 2))
    else:
        r_start = int(round((r0 + r1) / 2 - side / 2))
        c_start = int(round((c0 + c1) / 2 - side / 2))
    r_start = min(max(r_start, 0), size - side)
    c_start = min(max(c_start, 0), size - side)
    return slice(r_start, r_start + side), slice(c_start, c_start + side)


def _colors(k: int) -> list[Any]:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(k)]


def plot_distributions(
    values: Mapping[str, Mapping[int, np.ndarray]],
    path: str | Path,
    *,
    title: str,
    ylabel: str,
    xlabel: str = "number of samples n",
) -> Path:
    """Box plots of a per-image metric, one box per model and sample count (as Fig. 4a).

    Boxes show the quartiles, whiskers 1.5 IQR, dots the images beyond; a white
    diamond marks the mean and a line joins one model's means over n.

    Args:
        values: model label -> {n: (N,) per-image values}.
        path: the PNG.
        title, ylabel, xlabel: texts of the plot.
    """
    from matplotlib.patches import Patch

    labels = list(values)
    counts = sorted({n for v in values.values() for n in v})
    m = max(1, len(labels))
    width = 0.8 / m
    colors = _colors(m)
    fig = _figure(max(6.0, 1.1 + 1.2 * len(counts) * max(1, m / 2)) + 1.8, 4.8)
    ax = fig.add_subplot(1, 1, 1)
    for i, label in enumerate(labels):
        xs, means = [], []
        for j, n in enumerate(counts):
            if n not in values[label]:
                continue
            v = np.asarray(values[label][n], float)
            v = v[~np.isnan(v)]
            x = j + (i - (m - 1) / 2) * width
            if v.size:
                ax.boxplot(
                    [v], positions=[x], widths=width * 0.85, patch_artist=True, manage_ticks=False,
                    boxprops={"facecolor": colors[i], "alpha": 0.55, "edgecolor": colors[i]},
                    medianprops={"color": "black", "linewidth": 1.2},
                    whiskerprops={"color": colors[i]}, capprops={"color": colors[i]},
                    flierprops={"marker": ".", "markersize": 2.5, "markerfacecolor": colors[i],
                                "markeredgecolor": "none", "alpha": 0.6},
                )
                xs.append(x)
                means.append(float(v.mean()))
        if xs:
            ax.plot(xs, means, color=colors[i], linewidth=1.0, alpha=0.9, zorder=3)
            ax.scatter(xs, means, marker="D", s=22, color="white", edgecolor="black", zorder=4)
    ax.set_xticks(range(len(counts)), [str(n) for n in counts])
    ax.set_xlim(-0.6, len(counts) - 0.4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_title(title, fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    # Long labels (a row served by several runs names them all) wrap, so the plot keeps its width.
    handles = [Patch(facecolor=colors[i], alpha=0.55, edgecolor=colors[i],
                     label=textwrap.fill(lab, 34, break_on_hyphens=False))
               for i, lab in enumerate(labels)]
    handles.append(ax.scatter([], [], marker="D", s=22, color="white", edgecolor="black", label="mean"))
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0),
              framealpha=0.85)
    fig.tight_layout()
    return save_png(fig, path)


def plot_examples(
    images: np.ndarray,
    graders: np.ndarray,
    samples: Mapping[str, np.ndarray],
    titles: Sequence[str],
    path: str | Path,
    *,
    title: str = "",
    cell: float = 0.85,
) -> Path:
    """Image, grader masks and samples of a few crops (as Fig. 3a / Appendix F).

    One block per crop: a row with the image and the G grader masks (green),
    then one row per model with its samples (red). Every picture of a block is
    zoomed on the same window: :func:`view_box` of the graders' masks (of the
    samples when every grader mask is empty), so a sample reaching beyond it
    fills the picture to its edge.

    Args:
        images: (k, T, T) normalised CT tiles.
        graders: (k, G, T, T) bool.
        samples: model label -> (k, n, T, T) bool.
        titles: k crop captions.
        path: the PNG.
        title: the figure's title.
        cell: side of one picture in inches.
    """
    k, g, size = graders.shape[0], graders.shape[1], graders.shape[-1]
    labels = list(samples)
    n = max((s.shape[1] for s in samples.values()), default=0)
    cols = max(n, g + 1)
    per_block = 1 + len(labels)
    gap = 0.45  # height of the spacer row between blocks, in cells
    ratios: list[float] = []
    for b in range(k):
        ratios += ([gap] if b else []) + [1.0] * per_block
    # Row labels: a row served by several runs ("m-heads-4+m-heads-8") breaks after each "+".
    label_text = {lab: "\n".join(textwrap.fill(part, 16, break_on_hyphens=False)
                                 for part in lab.replace("+", "+\n").split("\n")) for lab in labels}
    label_w = 0.25 + 0.075 * max((len(line) for t in label_text.values() for line in t.split("\n")), default=8)
    head = 0.9 if title else 0.6  # the title above the first crop's own title, not beside it
    width = cols * cell + label_w
    height = sum(ratios) * (cell + 0.2) + head
    fig = _figure(width, height)
    grid = fig.add_gridspec(len(ratios), cols, height_ratios=ratios, left=label_w / width,
                            right=0.995, top=1 - head / height, bottom=0.005, hspace=0.3, wspace=0.06)
    for b in range(k):
        focus = graders[b] if graders[b].any() else np.concatenate([samples[lab][b] for lab in labels])
        rs, cs = view_box(focus, size, min_side=40, margin=0.6)
        img = images[b][rs, cs]
        r0 = b * (per_block + 1)
        for c in range(cols):
            ax = fig.add_subplot(grid[r0, c])
            ax.set_axis_off()
            if c == 0:
                ax.imshow(mask_overlay(img, None), interpolation="nearest")
                ax.set_title("image", fontsize=7)
                ax.text(0, 1.32, f"{titles[b]}, view {rs.stop - rs.start} px of {size}",
                        transform=ax.transAxes, fontsize=8.5, fontweight="bold", va="bottom")
            elif c <= g:
                mk = graders[b, c - 1][rs, cs]
                ax.imshow(mask_overlay(img, mk, GRADER_COLOR), interpolation="nearest")
                empty = "" if graders[b, c - 1].any() else " (empty)"
                ax.set_title(f"grader {c}{empty}", fontsize=7)
        for i, lab in enumerate(labels):
            for c in range(cols):
                ax = fig.add_subplot(grid[r0 + 1 + i, c])
                ax.set_xticks([])
                ax.set_yticks([])
                for spine in ax.spines.values():
                    spine.set_visible(False)
                if c >= samples[lab].shape[1]:
                    ax.set_axis_off()
                    continue
                ax.imshow(mask_overlay(img, samples[lab][b, c][rs, cs]), interpolation="nearest")
                if c == 0:
                    ax.set_ylabel(label_text[lab], fontsize=8, rotation=0, ha="right", va="center")
                if i == 0:
                    ax.set_title(f"sample {c + 1}", fontsize=6)
    if title:
        fig.suptitle(title, fontsize=10, y=1 - 0.12 / height, va="top")
    return save_png(fig, path)


def plot_presence_histograms(
    panels: Mapping[str, Mapping[str, Any]],
    n: int,
    path: str | Path,
    *,
    title: str = "",
) -> Path:
    """Histograms of the number of samples (0..n) that show a lesion (as Fig. 12).

    One panel per model; bars give the fraction of ambiguous crops (graders
    disagree on presence) and of unambiguous crops with each count; a dashed
    line marks the decision threshold.

    Args:
        panels: model label -> ``{"ambiguous": (A,) counts, "unambiguous": (U,) counts,
            "threshold": t (ambiguous iff count < t) or None, "subtitle": str}``.
        n: samples per crop.
        path: the PNG.
        title: the figure's title.
    """
    labels = list(panels)
    m = max(1, len(labels))
    cols = min(m, 3)
    rows = (m + cols - 1) // cols
    fig = _figure(4.6 * cols, 3.4 * rows + 0.4)
    bins = np.arange(n + 2) - 0.5
    for i, lab in enumerate(labels):
        p = panels[lab]
        ax = fig.add_subplot(rows, cols, i + 1)
        top = 0.0
        for key, color, shift, name in (("ambiguous", "tab:red", -0.2, "ambiguous (graders disagree)"),
                                        ("unambiguous", "tab:blue", 0.2, "unambiguous (graders agree)")):
            c = np.asarray(p.get(key, []), int)
            hist = np.histogram(c, bins=bins)[0] / max(1, c.size)
            ax.bar(np.arange(n + 1) + shift, hist, width=0.4, color=color, alpha=0.8,
                   label=f"{name}, {c.size} crops")
            top = max(top, float(hist.max()) if hist.size else 0.0)
        t = p.get("threshold")
        if t is not None:
            ax.axvline(t - 0.5, color="black", linestyle="--", linewidth=1,
                       label=f"threshold: ambiguous if count < {t}")
        ax.set_xlim(-0.8, n + 0.8)
        ax.set_ylim(0, max(top, 0.05) * 1.6)  # headroom for the legend
        ax.set_xticks(range(0, n + 1, max(1, n // 8)))
        ax.set_xlabel(f"samples showing a lesion (of {n})")
        ax.set_ylabel("fraction of crops")
        sub = p.get("subtitle")
        ax.set_title(f"{lab}\n{sub}" if sub else lab, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", framealpha=0.85)
    if title:
        fig.suptitle(title, fontsize=10, wrap=True)
    fig.tight_layout()
    return save_png(fig, path)


def plot_latent_grid(
    image: np.ndarray,
    graders: np.ndarray,
    grid_masks: np.ndarray,
    u: np.ndarray,
    posterior_u: np.ndarray,
    path: str | Path,
    *,
    dims: tuple[int, int] = (0, 1),
    title: str = "",
    circles: Sequence[float] = (1, 2, 3, 4),
) -> Path:
    """Segmentations decoded on a grid of a 2-D latent plane (as Fig. 6).

    Cell (i, j) shows the mask decoded at u = (u[j], u[i]) in prior standard
    deviations (u[0] at the bottom left); circles mark 1..4 sigma of the prior,
    markers the graders' posterior means in the same units. Beside it: the
    image and the grader masks.

    Args:
        image: (T, T) normalised CT tile.
        graders: (G, T, T) bool.
        grid_masks: (S, S, T, T) bool, ``grid_masks[i, j]`` decoded at u = (u[j], u[i]).
        u: (S,) grid coordinates in prior sigmas.
        posterior_u: (G, 2) graders' posterior means in prior sigmas.
        path: the PNG.
        dims: the two latent dimensions of the plane (for the axis labels).
        title: the figure's title.
        circles: radii (in sigmas) of the circles.
    """
    from matplotlib.patches import Circle

    s, size = grid_masks.shape[0], grid_masks.shape[-1]
    g = graders.shape[0]
    focus = graders if graders.any() else grid_masks[s // 2, s // 2][None]
    rs, cs = view_box(focus, size, min_side=32, margin=0.75)
    v = rs.stop - rs.start
    gap = 1
    mosaic = np.full((s * (v + gap) - gap, s * (v + gap) - gap, 3), 0.55)  # grey cell borders
    img = image[rs, cs]
    for i in range(s):  # i: row of the grid, u[i] along the vertical axis (bottom = i 0)
        top = (s - 1 - i) * (v + gap)
        for j in range(s):
            left = j * (v + gap)
            mosaic[top:top + v, left:left + v] = mask_overlay(img, grid_masks[i, j][rs, cs], alpha=0.45)
    step = float(u[1] - u[0]) if s > 1 else 1.0
    lo, hi = float(u[0]) - step / 2, float(u[-1]) + step / 2
    fig = _figure(13.0, 11.0, dpi=120)
    grid = fig.add_gridspec(g + 1, 2, width_ratios=[5.2, 1], left=0.06, right=0.98, top=0.92,
                            bottom=0.14, wspace=0.12, hspace=0.3)
    ax = fig.add_subplot(grid[:, 0])
    ax.imshow(mosaic, extent=(lo, hi, lo, hi), origin="upper", interpolation="nearest")
    for r in circles:
        ax.add_patch(Circle((0, 0), r, fill=False, color="cyan", linewidth=1.3, alpha=0.9))
        ax.annotate(f"{r:g}σ", (r * 0.7071, r * 0.7071), color="cyan", fontsize=9,
                    fontweight="bold", xytext=(3, 3), textcoords="offset points")
    markers = ["o", "s", "^", "D", "v", "P", "X", "*"]
    colors = _colors(g)
    reach = max(hi, float(np.abs(posterior_u).max()) + 0.5 if posterior_u.size else hi)
    for k in range(g):
        empty = "" if graders[k].any() else ", empty mask"
        ax.scatter(posterior_u[k, 0], posterior_u[k, 1], marker=markers[k % len(markers)], s=110,
                   color=colors[k], edgecolor="white", linewidth=1.5, zorder=5,
                   label=f"grader {k + 1} posterior mean ({posterior_u[k, 0]:.2f}, {posterior_u[k, 1]:.2f}){empty}")
    ax.set_xlim(-reach, reach)
    ax.set_ylim(-reach, reach)
    ax.set_aspect("equal")
    ax.set_xlabel(f"u{dims[0]} = (z{dims[0]} − μ_prior) / σ_prior")
    ax.set_ylabel(f"u{dims[1]} = (z{dims[1]} − μ_prior) / σ_prior")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(0.0, -0.07), ncol=2, framealpha=0.9,
              title=f"zoomed on the graders' masks: {v} of {size} px per cell", title_fontsize=8)
    side = fig.add_subplot(grid[0, 1])
    side.imshow(mask_overlay(img, None), interpolation="nearest")
    side.set_title("image", fontsize=9)
    side.set_axis_off()
    for k in range(g):
        a = fig.add_subplot(grid[k + 1, 1])
        a.imshow(mask_overlay(img, graders[k][rs, cs], GRADER_COLOR), interpolation="nearest")
        empty = "" if graders[k].any() else " (empty)"
        a.set_title(f"grader {k + 1}{empty}", fontsize=9, color=colors[k])
        a.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=11, wrap=True)
    return save_png(fig, path)
