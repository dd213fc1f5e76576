"""The report of ``lidcseg evaluate`` (Fig. 4): what :mod:`lidcseg.evaluation` computed, written out.

:func:`write_evaluation` writes ``summary.json`` (:func:`summary`),
``summary.md`` (:func:`markdown_report`), ``per_image.csv``
(:func:`per_image_rows`, columns :data:`CSV_COLUMNS`), ``ged.png`` (the GED
distribution per run against n, as Fig. 4a) and ``examples.png`` (grader masks
and samples of the example crops, as Fig. 3a / Appendix F). It writes only into a
new or empty folder, or one ``lidcseg evaluate`` wrote (:data:`EVALUATION_OUTPUT`).

The functions read an evaluation through the small protocols below
(:class:`lidcseg.evaluation.Evaluation` and its ``RunResult`` satisfy them), so
this module never imports the experiment: the experiment calls the writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.io.outputs import OutputKind, has_format, open_output_folder

#: Per-image metrics of ``per_image.csv`` (:data:`lidcseg.metrics.extra.METRIC_NAMES`).
METRIC_COLUMNS: tuple[str, ...] = ("ged", "diversity", "hm_iou", "cross", "grader_diversity")
#: Columns of ``per_image.csv``: ``run`` is the report's row, ``source`` the run that served n
#: (they differ for the M-Heads row, one model per count).
CSV_COLUMNS: tuple[str, ...] = ("run", "model", "source", "image", "patient", "n", *METRIC_COLUMNS)
#: ``lidcseg evaluate``'s report folder: the marker, or a ``summary.json`` of this format.
EVALUATION_OUTPUT = OutputKind("evaluate", noun="report folder",
                               legacy=has_format("summary.json", format="lidcseg-evaluation"))


# What ``lidcseg evaluate`` computed, :class:`lidcseg.evaluation.Evaluation` and one row of it,
# :class:`lidcseg.evaluation.RunResult`. The writers read those records' fields; they are named
# here, not imported, because reports never import the experiments that call them.
EvaluationResult = Any
RunMetrics = Any


def sampling_protocol(n_max: int, m_heads: str = "matched") -> str:
    """How the samples of every count were drawn (``protocol.samples`` of the summary).

    A row's ``sampling`` says which rule it followed: ``prefix`` (the first n of
    one draw), ``per-count`` (models whose ``samples_per_count`` is set) or
    ``model-per-count`` (M-Heads, ``m_heads="matched"``: the run with n heads).
    """
    heads = ("M-Heads (Section 3.2): the run with n heads for each n (n = 1 without a 1-head run: "
             "the first head of the smallest)" if m_heads == "matched" else
             "M-Heads: the first n heads of each run (--m-heads prefix, not the paper's protocol)")
    return (f"{n_max} samples drawn once per image, n uses the first n; models of fixed members "
            f"(samples_per_count, e.g. unet-ensemble): sample(x, n) for each n (n members); {heads}")


def source_of(r: RunMetrics, n: int) -> dict[str, Any]:
    """Which run served ``n`` in row ``r`` (``r.sources[n]``; the row's own run if not recorded)."""
    return r.sources.get(n) or {"run": r.label, "path": r.path, "checkpoint": r.info.get("checkpoint"),
                                "step": r.info.get("step"), "heads": None, "uses": r.sampling}


def legend(r: RunMetrics) -> str:
    """A row's label, with the run serving each n when several runs serve it (ged.png)."""
    served = {n: source_of(r, n) for n in r.counts}
    if len({s["run"] for s in served.values()}) < 2:
        return r.label
    return f"{r.label} (" + ", ".join(
        f"n={n}: {s['run']}" + (" head 1" if s["uses"].startswith("head 1") else "")
        for n, s in served.items()) + ")"


def per_image_rows(evaluation: EvaluationResult) -> list[list[Any]]:
    """Rows of ``per_image.csv`` (:data:`CSV_COLUMNS`): one per run, image and sample count."""
    split = evaluation.split
    rows: list[list[Any]] = []
    for r in evaluation.results:
        for j, n in enumerate(r.counts):
            source = source_of(r, n)["run"]
            for i in range(len(split)):
                rows.append([r.label, r.model, source, int(split.rows[i]), split.patient[i], n,
                             *(float(r.metrics[k][j, i]) for k in METRIC_COLUMNS)])
    return rows


def summary(evaluation: EvaluationResult) -> dict[str, Any]:
    """The JSON summary: settings, per run and count the statistics of every metric, the tests."""
    from lidcseg.metrics.stats import describe

    runs = []
    for r in evaluation.results:
        per_n = {}
        for j, n in enumerate(r.counts):
            per_n[str(n)] = {k: describe(v[j]) for k, v in r.metrics.items()}
        runs.append({
            "label": r.label, "run": r.path or None, "model": r.model, "sampling": r.sampling,
            "checkpoint": r.info.get("checkpoint"), "step": r.info.get("step"),
            "served_by": {str(n): source_of(r, n) for n in r.counts},
            "time_s": round(r.time_s, 3), "metrics": per_n,
        })
    return {
        "format": "lidcseg-evaluation",
        "version": 1,
        "split": evaluation.split_name,
        "split_file": str(evaluation.split.path),
        "images": len(evaluation.split),
        "input_size": evaluation.split.input_size,
        "counts": list(evaluation.counts),
        "protocol": {
            "distance": "d = 1 - IoU of the foreground; d(empty, empty) = 0",
            "ged": _statistic(evaluation),
            "samples": sampling_protocol(max(evaluation.counts), evaluation.settings.get("m_heads", "matched")),
            "hm_iou": "Hungarian matching, both sets replicated to lcm(n, graders)",
            "wilcoxon": "two-sided signed-rank test, paired per image, zero differences dropped",
        },
        "settings": evaluation.settings,
        "runs": runs,
        "reference": evaluation.reference,
        "wilcoxon": evaluation.comparisons,
        "examples": [int(evaluation.split.rows[i]) for i in evaluation.examples],
    }


def markdown_report(evaluation: EvaluationResult, info: dict[str, Any] | None = None) -> str:
    """``summary.md``: the metric table per run and count, and the Wilcoxon tests."""
    from lidcseg.reports.markdown import Markdown
    from lidcseg.reports.tables import fmt

    info = info or summary(evaluation)
    doc = Markdown(f"Evaluation on `{info['split']}` ({info['images']} images, {info['input_size']} px)")
    doc.paragraph(
        f"GED² (Eq. 6, d = 1 − IoU, {info['protocol']['ged']}), sample diversity E[d(S,S′)] and "
        f"Hungarian-matched IoU, per image; mean ± sd over images, median in brackets. "
        f"Samples: {info['protocol']['samples']}."
    )
    rows = []
    for run in info["runs"]:
        for n, m in run["metrics"].items():
            g, src = m["ged"], run.get("served_by", {}).get(n)
            rows.append([run["label"], run["model"], n, f"{src['run']}: {src['uses']}" if src else "–",
                         f"{fmt(g['mean'])} ± {fmt(g['sd'])} [{fmt(g['median'])}]",
                         f"{fmt(m['diversity']['mean'])} ± {fmt(m['diversity']['sd'])}",
                         f"{fmt(m['hm_iou']['mean'])} ± {fmt(m['hm_iou']['sd'])}",
                         fmt(m["grader_diversity"]["mean"])])
    doc.table(["run", "model", "n", "samples from", "GED²", "diversity", "HM-IoU", "graders E[d(Y,Y′)]"], rows)
    if info["wilcoxon"]:
        doc.heading(f"Wilcoxon signed-rank tests against `{info['reference']}` (paired per image)")
        rows = [[t["other"], t["metric"], t["n"], fmt(t["mean_difference"]), fmt(t["median_difference"]),
                 f"{t['statistic']:g}", f"{t['p_value']:.3g}", f"{t['nonzero']}/{t['images']}"]
                for t in info["wilcoxon"]]
        doc.table(["run", "metric", "n", "mean diff (run − ref)", "median diff", "W", "p", "pairs ≠ 0"], rows)
    return doc.text()


def write_evaluation(
    evaluation: EvaluationResult, out: str | Path, inputs: Iterable[str | Path | None] | None = None
) -> list[Path]:
    """Write ``summary.json``, ``summary.md``, ``per_image.csv``, ``ged.png``, ``examples.png`` to ``out``.

    ``examples.png`` only when the evaluation has example crops. Every file is
    replaced atomically. ``out`` is checked first (:func:`lidcseg.io.outputs.open_output_folder`; ``inputs``
    default to the split's folder and the runs) and marked as this command's. Returns the
    paths written.
    """
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports.plots import plot_distributions, plot_examples
    from lidcseg.reports.tables import write_csv

    out = Path(out)
    if inputs is None:
        inputs = [evaluation.split.path.parent,
                  *{source_of(r, n)["path"] for r in evaluation.results for n in r.counts}]
    open_output_folder(out, EVALUATION_OUTPUT, inputs=inputs)
    info = summary(evaluation)
    written = [out / "summary.json", out / "summary.md", out / "per_image.csv", out / "ged.png"]
    write_json_atomic(written[0], info)
    write_bytes_atomic(written[1], markdown_report(evaluation, info).encode())
    write_csv(written[2], CSV_COLUMNS, per_image_rows(evaluation))
    plot_distributions(
        {legend(r): {n: r.values("ged", n) for n in r.counts} for r in evaluation.results},
        written[3],
        title=f"GED² per image on {evaluation.split_name} ({len(evaluation.split)} images, "
              f"{_statistic(evaluation)})",
        ylabel="GED² = 2E[d(S,Y)] − E[d(S,S′)] − E[d(Y,Y′)],  d = 1 − IoU",
    )
    if evaluation.examples:
        split = evaluation.split
        pos = evaluation.examples
        plot_examples(
            images=split.images[pos, 0].numpy(),
            graders=split.masks[pos].numpy(),
            samples={r.label: np.stack([r.examples[p] for p in pos]) for r in evaluation.results},
            titles=[f"crop {int(split.rows[p])} ({split.patient[p]})" for p in pos],
            path=out / "examples.png",
            title=f"Grader masks and samples on {evaluation.split_name}: crops where the graders disagree",
        )
        written.append(out / "examples.png")
    return written


def _statistic(evaluation: EvaluationResult) -> str:
    """Which GED estimator was used: ``V-statistic`` (published) or ``U-statistic``."""
    return "U-statistic" if evaluation.settings.get("unbiased") else "V-statistic"
