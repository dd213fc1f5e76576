"""Report building blocks: statistics, markdown/CSV tables, overlays and PNG figures."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from lidcseg.metrics.stats import describe, wilcoxon_paired
from lidcseg.reports import ambiguity as ambiguity_report
from lidcseg.reports import evaluation as evaluation_report
from lidcseg.reports.plots import (
    SAMPLE_COLOR,
    mask_overlay,
    plot_distributions,
    plot_examples,
    plot_latent_grid,
    plot_presence_histograms,
    view_box,
)
from lidcseg.reports.tables import fmt, markdown_table, write_csv


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_describe_fmt_markdown_csv(tmp_path: Path) -> None:
    d = describe([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert d["mean"] == 2.5 and d["median"] == 2.5 and d["count"] == 4
    assert d["sd"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert d["sem"] == pytest.approx(d["sd"] / 2)
    assert math.isnan(describe([])["mean"]) and describe([5.0])["sd"] == 0.0
    assert fmt(0.12345) == "0.123" and fmt(float("nan")) == "–" and fmt(None) == "–"
    assert markdown_table(["a", "b"], [[1, "x|y"]]) == "| a | b |\n|---|---|\n| 1 | x\\|y |"
    write_csv(tmp_path / "t.csv", ["name", "value"], [["a", np.float64(0.1)], ["b", 2]])
    assert (tmp_path / "t.csv").read_text() == "name,value\na,0.1\nb,2\n"


def test_wilcoxon_paired_values_and_all_zero_case() -> None:
    ref = np.array([0.5, 0.4, 0.3, 0.6, 0.2, 0.7])
    other = ref + np.array([0.1, 0.2, 0.05, 0.3, 0.15, 0.25])
    t = wilcoxon_paired(ref, other)
    assert t["statistic"] == 0 and t["p_value"] == pytest.approx(0.03125)  # exact: 2 / 2^6
    assert t["nonzero"] == 6 and t["mean_difference"] == pytest.approx(0.175)
    z = wilcoxon_paired(ref, ref)
    assert (z["p_value"], z["nonzero"]) == (1.0, 0)
    with pytest.raises(ValueError, match="paired"):
        wilcoxon_paired(ref, ref[:3])


def _stats(mean: float, sd: float = 0.1, median: float = 0.5) -> dict[str, float]:
    return {"mean": mean, "sd": sd, "median": median}


def test_evaluation_markdown_layout() -> None:
    """``summary.md`` from a summary: title, protocol paragraph, metric table, Wilcoxon table."""
    metrics = {"ged": _stats(0.25), "diversity": _stats(0.5), "hm_iou": _stats(0.75), "grader_diversity": _stats(0.4)}
    info = {
        "split": "test", "images": 3, "input_size": 64,
        "protocol": {"ged": "V-statistic", "samples": evaluation_report.sampling_protocol(16)},
        "runs": [{"label": "a", "model": "probunet", "metrics": {"16": metrics},
                  "served_by": {"16": {"run": "a", "uses": "first 16 of 16 samples drawn once"}}},
                 {"label": "b", "model": "m-heads", "metrics": {"16": metrics},
                  "served_by": {"16": {"run": "mh16", "uses": "all 16 heads"}}}],
        "reference": "a",
        "wilcoxon": [{"other": "b", "metric": "ged", "n": 16, "mean_difference": 0.1, "median_difference": 0.2,
                      "statistic": 3.0, "p_value": 0.0123456, "nonzero": 3, "images": 3}],
    }
    md = evaluation_report.markdown_report(None, info)  # type: ignore[arg-type]  # info given: not read
    row = "0.250 ± 0.100 [0.500] | 0.500 ± 0.100 | 0.750 ± 0.100 | 0.400 |"
    assert md == (
        "# Evaluation on `test` (3 images, 64 px)\n\n"
        "GED² (Eq. 6, d = 1 − IoU, V-statistic), sample diversity E[d(S,S′)] and Hungarian-matched IoU, "
        f"per image; mean ± sd over images, median in brackets. Samples: {info['protocol']['samples']}.\n\n"
        "| run | model | n | samples from | GED² | diversity | HM-IoU | graders E[d(Y,Y′)] |\n"
        "|---|---|---|---|---|---|---|---|\n"
        f"| a | probunet | 16 | a: first 16 of 16 samples drawn once | {row}\n"
        f"| b | m-heads | 16 | mh16: all 16 heads | {row}\n\n"
        "## Wilcoxon signed-rank tests against `a` (paired per image)\n\n"
        "| run | metric | n | mean diff (run − ref) | median diff | W | p | pairs ≠ 0 |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| b | ged | 16 | 0.100 | 0.200 | 3 | 0.0123 | 3/3 |\n"
    )
    assert "16 samples" in info["protocol"]["samples"] and "samples_per_count" in info["protocol"]["samples"]
    assert "the run with n heads" in info["protocol"]["samples"]
    assert "--m-heads prefix" in evaluation_report.sampling_protocol(16, "prefix")
    info["wilcoxon"] = []
    assert "Wilcoxon" not in evaluation_report.markdown_report(None, info)  # type: ignore[arg-type]


def test_ambiguity_markdown_layout() -> None:
    info = {
        "rule": "ambiguous iff fewer than t of 16 samples show a lesion (>= 1 px)",
        "truth": "ambiguous iff some grader masks are empty and some are not",
        "criterion": "balanced accuracy", "threshold_split": "val", "test_split": "test",
        "crops": {"val": {"total": 4, "ambiguous": 3}, "test": {"total": 5, "ambiguous": 2}},
        "runs": [{"label": "a", "model": "probunet", "threshold": 7, "val_balanced_accuracy": 0.5,
                  "test": {"accuracy": 0.6, "balanced_accuracy": 0.55, "recall_ambiguous": 0.5,
                           "recall_unambiguous": float("nan")}}],
    }
    assert ambiguity_report.markdown_report(info) == (
        "# Lesion-presence ambiguity detection (Appendix E, Table 1)\n\n"
        f"Rule: {info['rule']}; t chosen on `val` by balanced accuracy. Truth: {info['truth']}. "
        "`val`: 3/4 ambiguous, `test`: 2/5 ambiguous.\n\n"
        "| run | model | t | val bal. acc. | test accuracy | test bal. acc. | recall ambiguous | recall unambiguous |\n"
        "|---|---|---|---|---|---|---|---|\n"
        "| a | probunet | 7 | 0.500 | 0.600 | 0.550 | 0.500 | – |\n"
    )


def test_view_box_zooms_on_the_masks() -> None:
    m = np.zeros((2, 64, 64), bool)
    m[0, 30:34, 40:44] = True
    rows, cols = view_box(m, 64, min_side=16, margin=0.5)
    assert rows.stop - rows.start == cols.stop - cols.start == 16
    assert rows.start <= 30 and rows.stop >= 34 and cols.start <= 40 and cols.stop >= 44
    m[1, 0:2, 60:64] = True  # a far mask widens the window, clipped to the tile
    rows, cols = view_box(m, 64, min_side=16, margin=0.5)
    assert rows.start == 0 and cols.stop == 64
    assert view_box(np.zeros((1, 64, 64), bool), 64, min_side=16) == (slice(16, 48), slice(16, 48))


def test_overlay_fills_and_outlines() -> None:
    img = np.full((8, 8), -1.0)
    mask = np.zeros((8, 8), bool)
    mask[2:6, 2:6] = True
    rgb = mask_overlay(img, mask)
    assert rgb.shape == (8, 8, 3) and rgb.min() >= 0 and rgb.max() <= 1
    np.testing.assert_allclose(rgb[2, 2], SAMPLE_COLOR)  # outline: the colour itself
    np.testing.assert_allclose(rgb[3, 3], 0.35 * np.asarray(SAMPLE_COLOR))  # fill over black
    np.testing.assert_allclose(rgb[0, 0], 0.0)
    np.testing.assert_allclose(mask_overlay(img, None), 0.0)


def test_figures_are_pngs(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    values = {"pun": {n: rng.random(20) for n in (1, 4, 8, 16)}, "ens": {n: rng.random(20) for n in (1, 4, 8, 16)}}
    w, h = png_size(plot_distributions(values, tmp_path / "d.png", title="t", ylabel="GED"))
    assert w > 600 and h > 400
    images = rng.uniform(-1, 1, (2, 32, 32))
    graders = np.zeros((2, 4, 32, 32), bool)
    graders[:, :2, 10:20, 10:20] = True
    samples = {"pun": rng.random((2, 5, 32, 32)) > 0.9}
    w, h = png_size(plot_examples(images, graders, samples, ["a", "b"], tmp_path / "e.png", title="x"))
    assert w > 400 and h > 400
    panels = {"pun": {"ambiguous": [0, 3, 5], "unambiguous": [16, 16], "threshold": 9, "subtitle": "s"}}
    png_size(plot_presence_histograms(panels, 16, tmp_path / "h.png", title="t"))
    grid = rng.random((3, 3, 32, 32)) > 0.5
    png_size(plot_latent_grid(images[0], graders[0], grid, np.array([-1.0, 0.0, 1.0]),
                              rng.normal(size=(4, 2)), tmp_path / "l.png", title="t"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.png", "e.png", "h.png", "l.png"]
