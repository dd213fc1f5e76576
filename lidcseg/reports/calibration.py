"""The report of ``lidcseg calibration`` (the flip task, Kohl et al. 2018, Section 4.2, Appendix C).

:func:`write_calibration` writes what :func:`lidcseg.calibration.calibrate_runs`
computed: ``calibration.json``, ``calibration.md`` (:func:`markdown_report`) and
the figures:

- :func:`plot_ged`: GED (Eq. 7) against the number of samples, with the paper's Table 2.
- :func:`plot_mode_frequencies`: predicted against true frequency of the 32 modes (Fig. 5):
  a log-log scatter with the bisector, and the modes as bars sorted by probability.
- :func:`plot_pixel_marginals`: p(twin | original class) per switchable class against the truth.
- :func:`plot_flip_examples`: scenes, their labels, samples and the maps of p(twin) (Figs. 8-10).

matplotlib's Agg canvas only (no pyplot state); files are written atomically, only into a
new or empty folder or one ``lidcseg calibration`` wrote (:data:`CALIBRATION_OUTPUT`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.flips import (
    CLASS_COLORS,
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_MODES,
    SWITCHES,
    mode_flips,
    mode_name,
)
from lidcseg.io.outputs import OutputKind, has_format, open_output_folder
from lidcseg.metrics.flips import PAPER_GED
from lidcseg.reports.markdown import Markdown
from lidcseg.reports.plots import _colors, _figure, save_png
from lidcseg.reports.tables import fmt

#: One letter per switch for compact mode names (S = sidewalk, P = person, C = car,
#: V = vegetation, R = road).
SWITCH_LETTERS: tuple[str, ...] = ("S", "P", "C", "V", "R")
#: Where zero frequencies are drawn on log axes.
LOG_FLOOR = 1e-3


@dataclass
class Examples:
    """Scenes kept for the figure.

    Attributes:
        rows: row of each scene in the split file.
        images: (k, 3, H, W) uint8 RGB.
        labels: (k, H, W) int64 un-flipped; ignore: (k, H, W) bool.
        samples: run label -> (k, n, H, W) int64 sampled label maps.
    """

    rows: list[int]
    images: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    samples: dict[str, np.ndarray] = field(default_factory=dict)


def mode_code(k: int) -> str:
    """Compact name of mode k: the letters of the flipped classes, ``-`` for none."""
    return "".join(c for c, b in zip(SWITCH_LETTERS, mode_flips()[k], strict=True) if b) or "-"


def plot_ged(
    counts: Sequence[int],
    means: Mapping[str, Sequence[float]],
    sems: Mapping[str, Sequence[float]],
    paper: Mapping[int, float],
    path: str | Path,
) -> Path:
    """GED (Eq. 7) against the number of samples per model, with the paper's Table 2 dashed."""
    fig = _figure(6.0, 4.2)
    ax = fig.add_subplot(1, 1, 1)
    colors = _colors(max(len(means), 1))
    for (label, m), color in zip(means.items(), colors, strict=False):
        ax.errorbar(counts, m, yerr=sems.get(label), marker="o", capsize=3, color=color, label=label)
    ref = sorted(paper.items())
    ax.plot([k for k, _ in ref], [v for _, v in ref], "k--", marker="s", label="paper Prob. U-Net (Table 2)")
    ax.set_xscale("log", base=2)
    ticks = sorted(set(counts) | set(paper))
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.set_xlabel("samples per scene")
    ax.set_ylabel("D²_GED against the 32-mode mixture")
    ax.set_title("GED (Eq. 7) on the flip task")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def plot_mode_frequencies(
    truth: np.ndarray,
    freqs: Mapping[str, np.ndarray],
    stats: Mapping[str, tuple[float, float]],
    path: str | Path,
) -> Path:
    """Predicted vs true frequency of the 32 modes (Fig. 5).

    Left: log-log scatter with the bisector (zero frequencies drawn at
    :data:`LOG_FLOOR`, hollow). Right: bars per mode, sorted by true
    probability, the truth as black ticks.

    Args:
        truth: (32,) mode probabilities.
        freqs: model label -> (32,) predicted frequencies.
        stats: model label -> (Pearson r, mean absolute error).
    """
    fig = _figure(15.0, 5.2)
    ax = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    colors = _colors(max(len(freqs), 1))
    top = max([float(np.nanmax(f)) for f in freqs.values() if np.size(f)] + [float(truth.max())])
    lo, hi = LOG_FLOOR * 0.7, min(1.0, max(0.2, 1.3 * top))
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=1, ls="--", label="bisector (perfect calibration)")
    order = np.argsort(-truth, kind="stable")
    width = 0.8 / max(len(freqs), 1)
    x = np.arange(NUM_MODES)
    for j, ((label, f), color) in enumerate(zip(freqs.items(), colors, strict=False)):
        f = np.asarray(f, dtype=float)
        r, mae = stats.get(label, (float("nan"), float("nan")))
        zero = ~(f > 0)
        ax.scatter(truth[~zero], f[~zero], color=color, s=28, label=f"{label}: r = {r:.3f}, MAE = {mae:.4f}")
        if zero.any():
            ax.scatter(truth[zero], np.full(int(zero.sum()), LOG_FLOOR), facecolors="none",
                       edgecolors=color, s=28)
        ax2.bar(x + (j - (len(freqs) - 1) / 2) * width, np.maximum(f[order], LOG_FLOOR), width,
                color=color, label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel("true mode probability")
    ax.set_ylabel("predicted mode frequency (hollow: 0)")
    ax.set_title("Mode-wise frequencies: 32 modes")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="upper left")

    ax2.scatter(x, truth[order], marker="_", s=200, color="k", zorder=3, label="true probability")
    ax2.set_yscale("log")
    ax2.set_ylim(lo, hi)
    ax2.set_xticks(x, [mode_code(int(k)) for k in order], rotation=90, fontsize=7)
    ax2.set_xlim(-0.6, NUM_MODES - 0.4)
    ax2.set_xlabel("mode (flipped classes: S sidewalk, P person, C car, V vegetation, R road)")
    ax2.set_ylabel("frequency (bars at the floor: 0)")
    ax2.set_title("Modes sorted by true probability")
    ax2.grid(alpha=0.3, axis="y", which="both")
    ax2.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return save_png(fig, path)


def plot_pixel_marginals(
    names: Sequence[str], truth: np.ndarray, predicted: Mapping[str, np.ndarray], path: str | Path
) -> Path:
    """p(twin | original class) per switchable class: bars per model, the truth as black lines."""
    fig = _figure(8.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    x = np.arange(len(names))
    width = 0.8 / max(len(predicted), 1)
    colors = _colors(max(len(predicted), 1))
    for j, ((label, p), color) in enumerate(zip(predicted.items(), colors, strict=False)):
        ax.bar(x + (j - (len(predicted) - 1) / 2) * width, p, width, color=color, label=label)
    for i, t in enumerate(truth):
        ax.plot([i - 0.45, i + 0.45], [t, t], color="k", lw=2, label="truth" if i == 0 else None)
    ax.set_xticks(x, [f"{n}\n→ {n} 2\n(truth {t:.3f})" for n, t in zip(names, truth, strict=True)],
                  fontsize=9)
    ax.set_ylim(0, max(0.6, float(np.nanmax([np.nanmax(p) for p in predicted.values()] + [0])) + 0.05))
    ax.set_ylabel("p(flipped class | original class)")
    ax.set_title("Pixel-wise marginals: share of each class's pixels sampled as its twin")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return save_png(fig, path)


def colorize(label: np.ndarray, ignore: np.ndarray | None = None) -> np.ndarray:
    """(H, W) trainIds 0..23 -> (H, W, 3) float RGB; ignored pixels and 255 black."""
    palette = np.zeros((256, 3))
    palette[: len(CLASS_COLORS)] = np.asarray(CLASS_COLORS) / 255.0
    rgb = palette[np.clip(label, 0, 255).astype(np.int64)]
    mask = label == IGNORE_INDEX if ignore is None else ignore | (label == IGNORE_INDEX)
    rgb[mask] = 0.0
    return rgb


def twin_maps(label: np.ndarray, ignore: np.ndarray, samples: np.ndarray | None) -> np.ndarray:
    """p(twin) per pixel of the switchable classes: the truth, or the share of samples; NaN elsewhere.

    Args:
        label: (H, W) un-flipped trainIds; ignore: (H, W) bool.
        samples: (n, H, W) sampled label maps, or None for the true map.
    """
    out = np.full(label.shape, np.nan)
    for sw in SWITCHES:
        region = (label == sw.original) & ~ignore
        if samples is None:
            out[region] = sw.probability
        else:
            out[region] = (samples[:, region] == sw.flipped).mean(0)
    return out


def plot_flip_examples(examples: Examples, path: str | Path, n_show: int = 2, max_runs: int = 3) -> Path:
    """Scenes with label, true p(twin), and per model ``n_show`` samples and the sampled p(twin).

    Args:
        examples: the scenes and their samples (:class:`Examples`).
        n_show: samples shown per model.
        max_runs: models shown at most (the first ones).
    """
    from matplotlib import colormaps

    runs = list(examples.samples.items())[:max_runs]
    n_rows = len(examples.rows)
    n_cols = 3 + len(runs) * (n_show + 1)
    h, w = examples.labels.shape[1:]
    panel = 2.0  # inches per panel's width
    fig = _figure(panel * n_cols + 0.6, (panel * h / w + 0.3) * n_rows + 0.6)
    cmap = colormaps["viridis"].with_extremes(bad="0.85")
    im = None
    for r in range(n_rows):
        label, ign = examples.labels[r], examples.ignore[r]
        panels: list[tuple[str, Any, dict[str, Any]]] = [
            ("image", examples.images[r].transpose(1, 2, 0), {}),
            ("label (un-flipped)", colorize(label, ign), {}),
            ("true p(twin)", twin_maps(label, ign, None), {"cmap": cmap, "vmin": 0, "vmax": 1}),
        ]
        for name, s in runs:
            for j in range(min(n_show, s.shape[1])):
                panels.append((f"{name}: sample {j + 1}", colorize(s[r, j], ign), {}))
            panels.append((f"{name}: p(twin)", twin_maps(label, ign, s[r]),
                           {"cmap": cmap, "vmin": 0, "vmax": 1}))
        for c, (title, data, kw) in enumerate(panels):
            ax = fig.add_subplot(n_rows, n_cols, r * n_cols + c + 1)
            shown = ax.imshow(data, interpolation="nearest", **kw)
            if kw:
                im = shown
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(title, fontsize=7)
            if c == 0:
                ax.set_ylabel(f"row {examples.rows[r]}", fontsize=7)
    fig.suptitle("Flip task: samples and p(flipped class) per pixel (grey: not switchable)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.97, 0.94))
    if im is not None:
        cax = fig.add_axes((0.975, 0.1, 0.008, 0.75))
        fig.colorbar(im, cax=cax).ax.tick_params(labelsize=7)
    return save_png(fig, path)


# -- the report -----------------------------------------------------------------------------------


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as markdown: GED table with the paper's Table 2, modes, marginals, posterior."""
    d, runs, settings = report["data"], report["runs"], report["settings"]
    counts = settings["counts"]
    truth = report["protocol"]["mode_probabilities"]
    doc = Markdown("Calibration on the flip task (Kohl et al. 2018, Section 4.2, Appendix C)")
    doc.paragraph(f"Data: {d['source']} `{d['split']}` split, {d['scenes']} scenes of {d['height']}x{d['width']}. "
                  f"Samples per scene: {settings['samples']} (modes and marginals); seed {settings['seed']}.")

    doc.heading("GED against the exact 32-mode mixture (Eq. 7)")
    doc.paragraph("d = 1 - mean IoU over the 10 switchable classes present; V-statistic for E[d(S,S')]. "
                  "Mean over scenes (± s.e.m.).")
    rows = [[r["label"], *[f"{fmt(r['ged'][str(n)]['mean'])} ± {fmt(r['ged'][str(n)]['sem'])}"
                           for n in counts]] for r in runs]
    rows.append(["paper Prob. U-Net (Table 2)", *[fmt(PAPER_GED.get(n)) if n in PAPER_GED else "–"
                                                   for n in counts]])
    doc.table(["model", *[f"GED@{n}" for n in counts]], rows)

    doc.heading("Mode-wise frequencies (Fig. 5)")
    doc.paragraph("Each sample matched to its closest mode by d (ties to the lowest mode). "
                  + mode_scenes_text(settings.get("mode_scenes", "complete"), settings.get("min_pixels", 1)))
    rows = [[r["label"], _scenes_cell(r["modes"]), r["modes"]["matched_samples"],
             fmt(r["modes"]["pearson_r"]), fmt(r["modes"]["mae"], 4), fmt(r["modes"]["max_abs_error"], 4)]
            for r in runs]
    doc.table(["model", "scenes", "samples", "Pearson r", "MAE", "max |error|"], rows)
    rows = []
    for k in np.argsort(-np.asarray(truth), kind="stable"):
        row = runs[0]["modes"]["per_mode"][k] if runs else None
        rows.append([int(k), row["flipped"] if row else mode_name(int(k)), f"{100 * truth[k]:.2f}%",
                     *[f"{100 * r['modes']['per_mode'][k]['frequency']:.2f}%" for r in runs]])
    doc.table(["mode", "flipped", "true", *[r["label"] for r in runs]], rows)

    doc.heading("Pixel-wise marginals p(twin | original class) (Figs. 8-10)")
    rows = [[f"{sw.name} → {sw.name} 2", f"{sw.probability:.3f}",
             *[fmt(r["pixels"]["per_class"][i]["p_twin"]) for r in runs]] for i, sw in enumerate(SWITCHES)]
    rows.append(["mean abs error", "", *[fmt(r["pixels"]["mae"], 4) for r in runs]])
    doc.table(["class", "truth", *[r["label"] for r in runs]], rows)

    with_post = [r for r in runs if r.get("posterior")]
    if with_post:
        doc.heading("Which flips the posterior encodes")
        doc.paragraph("Share of (scene, mode) pairs where the posterior-mean reconstruction S(X, mu_post(X, Y_k)) "
                      "gets the switch right (0.5: not encoded, so the prior's samples cannot be calibrated "
                      f"for it); first {settings.get('posterior_scenes')} scenes, all 32 modes.")
        rows = [[sw.name, *[fmt(r["posterior"]["per_switch"][i]["accuracy"]) for r in with_post]]
                for i, sw in enumerate(SWITCHES)]
        rows.append(["all five right", *[fmt(r["posterior"]["all_right"]) for r in with_post]])
        doc.table(["switch", *[r["label"] for r in with_post]], rows)
    with_geometry = [r for r in runs if r.get("geometry")]
    if with_geometry:
        _geometry_section(doc, with_geometry, settings.get("posterior_scenes"))
    doc.paragraph("Figures: `ged.png`, `modes.png`, `marginals.png`, `examples.png`.")
    return doc.text()


def _geometry_section(doc: Markdown, runs: Sequence[Mapping[str, Any]], scenes: Any) -> None:
    """Where each run's decoder splits every flip, in the prior's units (:mod:`lidcseg.calibration_geometry`)."""
    doc.heading("Where the decoder splits each flip (latent space, prior's units)")
    doc.paragraph("u = (z - mu_prior) / sigma_prior along the direction that separates the posterior means of "
                  "the modes with and without the flip. A flip is sampled at its probability p when the "
                  "decoder's boundary sits at the quantile Phi^-1(1 - p); a boundary beyond it under-samples "
                  "the flip, one short of it over-samples it. 'agreement': share of the prior's samples a "
                  f"flat boundary explains (low: the flip also depends on other directions). First {scenes} "
                  "scenes.")
    for r in runs:
        g = r["geometry"]
        rows = [[p["class"], fmt(p["probability"]), fmt(p["sampled"]), fmt(p["unflipped_at"], 2),
                 fmt(p["flipped_at"], 2), fmt(p["midpoint"], 2), fmt(p["boundary"], 2), fmt(p["quantile"], 2),
                 fmt(p["boundary"] - p["quantile"], 2), fmt(p["agreement"], 2)] for p in g["per_switch"]]
        doc.paragraph(f"**{r['label']}**: posterior sigma / prior sigma {fmt(g['sigma_ratio'], 3)}; "
                      f"{g['prior_samples']} prior samples per scene.")
        doc.table(["switch", "p", "sampled", "unflipped at", "flipped at", "midpoint", "boundary", "quantile",
                   "boundary - quantile", "agreement"], rows)


def mode_scenes_text(rule: str, min_pixels: int = 1) -> str:
    """Which scenes the mode frequencies count, in words (``rule``: ``all`` or ``complete``)."""
    if rule == "complete":
        return (f"Scenes with all five switchable classes present (>= {min_pixels} px each) only "
                "(`--mode-scenes complete`; the authors count every scene).")
    return ("Every scene counts, the authors' rule (Appendix C): in a scene without some switchable "
            "class a sample matches the mode with that class un-flipped, which lowers the frequency "
            "of every mode that flips it (`--mode-scenes complete` counts only scenes with all five).")


def _scenes_cell(modes: Mapping[str, Any]) -> str:
    """Scenes counted, and how many of them have all five switchable classes."""
    complete = modes.get("complete_scenes")
    if modes.get("rule", "complete") == "complete" or complete is None:
        return str(modes["scenes"])
    return f"{modes['scenes']} ({complete} complete)"


def _is_calibration(folder: Path) -> bool:
    """A report of an earlier version: ``calibration.json`` with its runs and protocol."""
    return has_format("calibration.json", runs=..., protocol=...)(folder)


#: ``lidcseg calibration``'s report folder (:mod:`lidcseg.io.outputs`).
CALIBRATION_OUTPUT = OutputKind("calibration", noun="report folder", legacy=_is_calibration)


def write_calibration(
    report: Mapping[str, Any],
    examples: Examples | None,
    out: str | Path,
    inputs: Iterable[str | Path | None] | None = None,
) -> list[Path]:
    """Write ``calibration.json``, ``calibration.md`` and the figures into ``out``.

    Args:
        report: what :func:`lidcseg.calibration.calibrate_runs` returns.
        examples: the scenes of ``examples.png`` (None or no samples: no such figure).
        out: the report folder: new, empty, or one this command wrote
            (:func:`lidcseg.io.outputs.open_output_folder`); it is marked as this command's.
        inputs: the data folder and runs, which ``out`` must keep apart from (default:
            those the report names).

    Returns:
        The files written.
    """
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic

    out = Path(out)
    if inputs is None:
        inputs = [report.get("data", {}).get("dir"),
                  *(r.get("info", {}).get("checkpoint") for r in report.get("runs", []))]
    open_output_folder(out, CALIBRATION_OUTPUT, inputs=inputs)
    runs = report["runs"]
    truth = np.asarray(report["protocol"]["mode_probabilities"])
    written = [out / "calibration.json", out / "calibration.md"]
    write_json_atomic(written[0], _json_safe(report))
    write_bytes_atomic(written[1], markdown_report(report).encode())
    counts = report["settings"]["counts"]
    written.append(plot_ged(
        counts, {r["label"]: [r["ged"][str(n)]["mean"] for n in counts] for r in runs},
        {r["label"]: [r["ged"][str(n)]["sem"] for n in counts] for r in runs}, PAPER_GED,
        out / "ged.png"))
    written.append(plot_mode_frequencies(
        truth, {r["label"]: np.asarray([m["frequency"] for m in r["modes"]["per_mode"]]) for r in runs},
        {r["label"]: (r["modes"]["pearson_r"], r["modes"]["mae"]) for r in runs}, out / "modes.png"))
    written.append(plot_pixel_marginals(
        [s.name for s in SWITCHES], FLIP_PROBS,
        {r["label"]: np.asarray([p["p_twin"] for p in r["pixels"]["per_class"]]) for r in runs},
        out / "marginals.png"))
    if examples is not None and examples.rows and examples.samples:
        written.append(plot_flip_examples(examples, out / "examples.png"))
    return written


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
