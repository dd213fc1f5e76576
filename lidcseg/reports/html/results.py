"""The result sections of the report: Fig. 4a, Table 1, the ablations, Fig. 6 and the flip task.

Each function reads what one stage of ``lidcseg reproduce`` wrote (``OUT/evaluate``,
``OUT/ambiguity``, ``OUT/latent``, ``OUT/flip/calibration``) and returns a section;
a stage that did not run gives a section that says so. The paper's values stand
beside ours (:mod:`lidcseg.reports.paper_values`), each with its data version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lidcseg.io.jsonfile import read_json_object
from lidcseg.reports.html.markup import Raw, figure, join, missing, para, section, table, tag
from lidcseg.reports.paper_values import (
    DATA_VERSIONS,
    HM_IOU_NOTE,
    NOT_TRANSCRIBED,
    PAPER,
    PAPER_ABLATIONS,
    PAPER_FLIP_SOURCE,
    PAPER_TABLE1,
    PUBLISHED_LIDC,
    paper_flip_ged,
    published_for,
)
from lidcseg.reports.tables import fmt

#: The Prob. U-Net and its Appendix D ablations, in the order of the ablations table.
ABLATIONS: tuple[str, ...] = ("probunet", "fixed-prior", "fixed-prior-no-context", "early-injection")
#: What each ablation changes.
ABLATION_TEXT: dict[str, str] = {
    "probunet": "the Prob. U-Net (reference)",
    "fixed-prior": "prior fixed to N(0, I)",
    "fixed-prior-no-context": "fixed prior; posterior sees the mask only",
    "early-injection": "z concatenated to the input image",
}


def _ours(data: dict[str, Any] | None) -> str:
    """How our data is named next to published values."""
    if not data:
        return "our data (version unknown)"
    phantom = " — the PHANTOM, not LIDC-IDRI" if data.get("phantom") else ""
    return f"{data['version_text']}{phantom}"


def _stat(m: dict[str, Any] | None, digits: int = 3) -> str:
    if not m:
        return "–"
    return f"{fmt(m.get('mean'), digits)} ± {fmt(m.get('sd'), digits)}"


def _p(tests: list[dict[str, Any]], label: str, metric: str) -> str:
    t = next((t for t in tests if t.get("other") == label and t.get("metric") == metric), None)
    return "–" if t is None else f"{t['p_value']:.3g}"


def _compare_n(summary: dict[str, Any]) -> int | None:
    tests = summary.get("wilcoxon") or []
    if tests:
        return int(tests[0]["n"])
    counts = summary.get("counts") or []
    return 16 if 16 in counts else (max(counts) if counts else None)


def evaluation_summary(folder: Path) -> dict[str, Any] | None:
    """``evaluate/summary.json`` (None when the evaluation did not run), read once per report."""
    return read_json_object(folder / "summary.json", 64 * 2**20)


def fig4a_section(folder: Path, summary: dict[str, Any] | None, data: dict[str, Any] | None) -> Raw:
    """Fig. 4a: GED² box plots per model and n, the table with Wilcoxon p-values, published values.

    ``summary``: :func:`evaluation_summary` of ``folder``.
    """
    title = "Fig. 4a: GED² per model and number of samples (LIDC)"
    if summary is None:
        return section("fig4a", title, missing("The evaluation did not run (no evaluate/summary.json)."))
    counts = [int(n) for n in summary.get("counts", [])]
    at, ref, tests = _compare_n(summary), summary.get("reference"), summary.get("wilcoxon") or []
    rows = []
    for r in summary.get("runs", []):
        metrics = r.get("metrics", {})
        top = metrics.get(str(at), {}) if at is not None else {}
        pub = published_for(r.get("model", ""))
        published = "; ".join(f"{p.ged16:.3f} ({p.data})" for p in pub if p.ged16 is not None) or "–"
        rows.append([r["label"], r.get("model", "?"),
                     *[_stat(metrics.get(str(n), {}).get("ged")) for n in counts],
                     _stat(top.get("hm_iou")),
                     "reference" if r["label"] == ref else _p(tests, r["label"], "ged"),
                     "reference" if r["label"] == ref else _p(tests, r["label"], "hm_iou"),
                     published])
    headers = ["run", "model", *[f"GED² n={n}" for n in counts], f"HM-IoU n={at}",
               f"p GED² n={at}", f"p HM-IoU n={at}", "published GED² n=16"]
    protocol = summary.get("protocol", {})
    caption = (f"Mean ± sd over {summary.get('images')} {summary.get('split')} crops of {summary.get('input_size')} px "
               f"({protocol.get('ged', 'V-statistic')}; d = 1 − IoU, d(empty, empty) = 0). p: two-sided Wilcoxon "
               f"signed-rank test against {ref}, paired per crop. Ours: {_ours(data)}.")
    context = [[p.method, fmt(p.ged16), fmt(p.ged100), fmt(p.hm_iou), DATA_VERSIONS.get(p.data, p.data)]
               for p in PUBLISHED_LIDC]
    png = _boxes(folder, summary, data)
    return section(
        "fig4a", title,
        figure(png if png is not None else folder / "ged.png",
               "Box plots of the per-crop GED² of each model, one panel per number of samples n; lower is better.",
               f"GED² per crop, one panel per n, one box per model (quartiles, whiskers 1.5 IQR, diamond: mean). "
               f"Data: {_ours(data)}.", missing="evaluate/per_image.csv and evaluate/ged.png are missing."),
        table(headers, rows, caption=caption, numeric_from=2),
        para(f"The paper ({PAPER}) shows Fig. 4a as box plots without numbers. The published GED² beside the Prob. U-Net "
             "comes from later papers' tables, on other preprocessings of LIDC-IDRI than ours; the table "
             "below lists them with their data version. They are not comparable number for number: "
             "the crops, splits and grader handling differ.", class_="note"),
        table(["method", "GED² n=16", "GED² n=100", "HM-IoU", "data version"], context,
              caption="Published LIDC numbers (context; " + HM_IOU_NOTE + ")"),
        tag("details", Raw(tag("summary", "The evaluation's example crops (as Fig. 3a)") + figure(
            folder / "examples.png",
            "Example crops where the graders disagree: the image, the four grader masks in green "
            "and each model's samples in red.",
            "Grader masks (green) and samples (red) of crops where the graders disagree (as Fig. 3a).",
            missing="No example figure (evaluate/examples.png)."))),
    )


def _boxes(folder: Path, summary: dict[str, Any], data: dict[str, Any] | None) -> bytes | None:
    """Fig. 4a drawn from ``per_image.csv`` (:func:`lidcseg.reports.html.figures.ged_panels`),
    with the published Prob. U-Net GED² at n = 16; None without the file."""
    from lidcseg.reports.html.figures import ged_panels, read_ged

    path = folder / "per_image.csv"
    if not path.is_file():
        return None
    values = read_ged(path)
    if not values:
        return None
    pub = next((p for p in PUBLISHED_LIDC if p.model == "probunet" and p.ged16 is not None), None)
    reference = None if pub is None else (f"published Prob. U-Net, n = 16: {pub.ged16:.3f} ({pub.data}, not our data)",
                                          pub.ged16)
    title = (f"GED² per crop on {summary.get('split')} ({summary.get('images')} crops, "
             f"{summary.get('protocol', {}).get('ged', 'V-statistic')})")
    return ged_panels(values, [r["label"] for r in summary.get("runs", [])], reference=reference, title=title)


def table1_section(folder: Path, data: dict[str, Any] | None) -> Raw:
    """Table 1 (Appendix E): lesion-presence ambiguity detection, with Fig. 12's histograms."""
    info = read_json_object(folder / "ambiguity.json", 64 * 2**20)
    title = "Table 1: detecting lesion-presence ambiguity (Appendix E)"
    if info is None:
        return section("table1", title, missing("The ambiguity stage did not run (no ambiguity/ambiguity.json)."))
    val, test = info.get("threshold_split", "val"), info.get("test_split", "test")
    crops = info.get("crops", {})
    by_accuracy = info.get("criterion") == "accuracy"
    rows = []
    for r in info.get("runs", []):
        t = r.get("test", {})
        paper = PAPER_TABLE1.get(r.get("model", ""), PAPER_TABLE1.get(r.get("label", "")))
        rows.append([r["label"], r.get("model", "?"), r.get("threshold", "–"),
                     fmt(r.get("val_accuracy" if by_accuracy else "val_balanced_accuracy")),
                     fmt(t.get("accuracy")), fmt(t.get("balanced_accuracy")),
                     fmt(t.get("recall_ambiguous")), fmt(t.get("recall_unambiguous")),
                     fmt(paper) if paper is not None else NOT_TRANSCRIBED])

    def balance(split: str) -> str:
        c = crops.get(split, {})
        return f"{c.get('ambiguous', '?')} of {c.get('total', '?')} {split} crops ambiguous"

    caption = (f"Rule: {info.get('rule')}; t chosen on {val} by {info.get('criterion')}. Truth: {info.get('truth')}. "
               f"{balance(val)}; {balance(test)}. Ours: {_ours(data)}.")
    return section(
        "table1", title,
        table(["run", "model", "t", f"{val} {'accuracy' if by_accuracy else 'bal. acc.'}", f"{test} accuracy",
               f"{test} bal. acc.", "recall ambiguous", "recall unambiguous", "paper test accuracy"],
              rows, caption=caption, numeric_from=2),
        para("Paper values: Table 1 of the paper's Appendix E, on the paper's own split (not released); "
             f"'{NOT_TRANSCRIBED}' where the value has not been copied into lidcseg yet.", class_="note"),
        figure(folder / "histograms.png",
               "Histograms per model of how many of the samples of each test crop show a lesion, for "
               "ambiguous and unambiguous crops, with the decision threshold.",
               "Samples showing a lesion per test crop, ambiguous vs unambiguous (as Fig. 12).",
               missing="ambiguity/histograms.png is missing."),
    )


def ablations_section(summary: dict[str, Any] | None, data: dict[str, Any] | None) -> Raw:
    """The Appendix D ablations beside the Prob. U-Net, from the evaluation's ``summary``."""
    title = "Ablations (Appendix D)"
    if summary is None:
        return section("ablations", title, missing("The evaluation did not run (no evaluate/summary.json)."))
    at, ref, tests = _compare_n(summary), summary.get("reference"), summary.get("wilcoxon") or []

    def kind(r: dict[str, Any]) -> str | None:
        for name in (r.get("model"), r.get("label")):
            if name in ABLATIONS:
                return name
        return None

    chosen = sorted((r for r in summary.get("runs", []) if kind(r)), key=lambda r: ABLATIONS.index(kind(r)))
    if not any(kind(r) != "probunet" for r in chosen):
        return section("ablations", title, missing("No ablation run (fixed-prior, fixed-prior-no-context, "
                                                   "early-injection) was evaluated."))
    rows = []
    for r in chosen:
        m = r.get("metrics", {}).get(str(at), {})
        paper = PAPER_ABLATIONS.get(kind(r) or "")
        rows.append([r["label"], ABLATION_TEXT[kind(r) or "probunet"], _stat(m.get("ged")), _stat(m.get("hm_iou")),
                     _stat(m.get("diversity")),
                     "reference" if r["label"] == ref else _p(tests, r["label"], "ged"),
                     fmt(paper) if paper is not None else NOT_TRANSCRIBED])
    return section(
        "ablations", title,
        table(["run", "change", f"GED² n={at}", f"HM-IoU n={at}", f"diversity n={at}", f"p GED² vs {ref}",
               "paper GED² n=16"], rows, numeric_from=2,
              caption=f"Mean ± sd over {summary.get('images')} {summary.get('split')} crops. Ours: {_ours(data)}."),
        para("Paper values: the paper's Appendix D, on its own split; "
             f"'{NOT_TRANSCRIBED}' where the value has not been copied into lidcseg yet.", class_="note"),
    )


def latent_section(folder: Path, plan: dict[str, Any] | None = None) -> Raw:
    """Fig. 6: every PNG of ``OUT/latent``, captioned from the ``latent`` stage of ``plan.json``
    (its run, crop, split and latent dims) when it records them."""
    title = "Fig. 6: the latent space decoded on a grid (Appendix A)"
    pngs = sorted(folder.glob("*.png")) if folder.is_dir() else []
    if not pngs:
        return section("fig6", title, missing("The latent stage did not run (no latent/*.png)."))
    stages = (plan or {}).get("stages") or []
    detail = next((s.get("detail") for s in stages if isinstance(s, dict) and s.get("name") == "latent"), None)
    detail = detail if isinstance(detail, dict) else {}
    figures = []
    for png in pngs:
        what = png.stem
        if detail.get("png") == png.name:
            dims = detail.get("dims") or []
            what = (f"the Prob. U-Net on crop {detail.get('index', '?')} of the {detail.get('split', '?')} split, "
                    f"latent dims {', '.join(map(str, dims)) or '?'}")
        figures.append(figure(
            png, "Segmentations decoded on a grid over two latent dimensions of the prior, with circles at 1 to "
                 "4 prior standard deviations and the graders' posterior means marked.",
            f"Fig. 6 ({what}): masks decoded at z = μ_prior + σ_prior·u on a grid of u, in prior "
            "standard deviations; markers: the graders' posterior means."))
    return section("fig6", title, join(figures))


def flip_section(folder: Path) -> Raw | None:
    """Fig. 5 and the mode table of the flip task (``--flip``); None when the stage did not run."""
    report = read_json_object(folder / "calibration.json", 64 * 2**20)
    if report is None:
        return None
    runs = report.get("runs", [])
    counts = [int(n) for n in report.get("settings", {}).get("counts", [])]
    ged_rows = [[r["label"], *[_stat(r.get("ged", {}).get(str(n))) for n in counts]] for r in runs]
    paper = paper_flip_ged()
    ged_rows.append(["paper: Prob. U-Net (Table 2)", *[fmt(paper.get(n)) for n in counts]])
    truth = report.get("protocol", {}).get("mode_probabilities", [])
    order = sorted(range(len(truth)), key=lambda k: -truth[k])
    mode_rows = []
    for k in order:
        first = runs[0]["modes"]["per_mode"][k] if runs else {}
        mode_rows.append([k, first.get("flipped", "") or "none", f"{100 * truth[k]:.2f}%",
                          *[f"{100 * r['modes']['per_mode'][k]['frequency']:.2f}%" for r in runs]])
    summary_rows = [[r["label"], fmt(r["modes"].get("pearson_r")), fmt(r["modes"].get("mae"), 4),
                     fmt(r["modes"].get("max_abs_error"), 4)] for r in runs]
    d = report.get("data", {})
    scenes = ("Cityscapes images" if d.get("source") == "cityscapes"
              else "synthetic scenes (`lidcseg scenes make`), not Cityscapes images")
    return section(
        "fig5", "Fig. 5: calibration on the flip task (Section 4.2)",
        para(f"Data: {scenes}; the {d.get('split')} split, {d.get('scenes')} scenes of "
             f"{d.get('height')}×{d.get('width')}, with the paper's five class flips."),
        figure(folder / "modes.png",
               "Predicted against true frequency of the 32 modes of the flip task, on log axes with the "
               "bisector, and the modes as bars sorted by their true probability.",
               "Mode frequencies, predicted against true (as Fig. 5).", missing="calibration/modes.png is missing."),
        table(["model", "Pearson r", "MAE", "max |error|"], summary_rows, caption="Mode-wise calibration"),
        table(["model", *[f"GED n={n}" for n in counts]], ged_rows,
              caption="GED against the exact 32-mode mixture (Eq. 7), mean ± sd over scenes; "
                      f"paper: {PAPER_FLIP_SOURCE}."),
        tag("details", Raw(tag("summary", "The 32 modes: true and predicted frequency")
                           + table(["mode", "flipped classes", "true", *[r["label"] for r in runs]], mode_rows,
                                   numeric_from=2)), open=True),
        figure(folder / "ged.png", "GED of each model against the number of samples, with the paper's Table 2.",
               "GED against the number of samples, with the paper's Table 2.", missing=None),
    )
