"""The report of ``lidcseg ambiguity`` (Appendix E, Table 1 and Fig. 12), written out.

:func:`write_ambiguity` writes ``ambiguity.json`` (:func:`summary`),
``ambiguity.md`` (the table of each run's threshold, its validation score by the
criterion that chose it, and its test scores),
``per_crop.csv`` (:data:`CSV_COLUMNS`: one row per run, split and crop) and
``histograms.png`` (samples showing a lesion per test crop, ambiguous vs
unambiguous, one panel per run, as Fig. 12). It writes only into a new or empty
folder, or one ``lidcseg ambiguity`` wrote (:data:`AMBIGUITY_OUTPUT`).

The functions read the study through the small protocols below
(:class:`lidcseg.ambiguity.Ambiguity` and its results satisfy them), so this
module never imports the experiment: the experiment calls the writer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lidcseg.io.outputs import OutputKind, has_format, open_output_folder

#: Columns of ``per_crop.csv``.
CSV_COLUMNS: tuple[str, ...] = (
    "run", "model", "split", "image", "patient", "graders_marking", "ambiguous", "count", "predicted",
)
#: ``lidcseg ambiguity``'s report folder: the marker, or an ``ambiguity.json`` of this format.
AMBIGUITY_OUTPUT = OutputKind("ambiguity", noun="report folder",
                              legacy=has_format("ambiguity.json", format="lidcseg-ambiguity"))


# What ``lidcseg ambiguity`` computed, :class:`lidcseg.ambiguity.Ambiguity` with its
# :class:`lidcseg.ambiguity.AmbiguityResult` runs. The writers read those records' fields; they are
# named here, not imported, because reports never import the experiments that call them.
AmbiguityStudy = Any


def summary(study: AmbiguityStudy) -> dict[str, Any]:
    """The JSON summary (``ambiguity.json``): the rule, the crops per split, each run's threshold and scores."""
    return {
        "format": "lidcseg-ambiguity",
        "version": 1,
        "rule": f"ambiguous iff fewer than t of {study.n} samples show a lesion (>= {study.min_pixels} px)",
        "truth": "ambiguous iff some grader masks are empty and some are not",
        "criterion": "balanced accuracy" if study.criterion == "balanced" else "accuracy",
        "threshold_split": study.val_split,
        "test_split": study.test_split,
        "samples": study.n,
        "min_pixels": study.min_pixels,
        "seed": study.seed,
        "crops": {name: {"total": len(s), "ambiguous": int(study.truth[name].sum())}
                  for name, s in study.splits.items()},
        "runs": [
            {"label": r.label, "run": r.path, "model": r.model, "threshold": r.choice.threshold,
             "val_accuracy": r.choice.accuracy, "val_balanced_accuracy": r.choice.balanced_accuracy,
             "test": r.test}
            for r in study.results
        ],
    }


def markdown_report(info: dict[str, Any]) -> str:
    """``ambiguity.md``: the rule, the class balance and one table row per run (Table 1).

    The validation column is the score the threshold was chosen by (``info["criterion"]``:
    ``accuracy``, the paper's, or ``balanced accuracy``); the test columns give both.
    """
    from lidcseg.reports.markdown import Markdown
    from lidcseg.reports.tables import fmt

    val, test = info["threshold_split"], info["test_split"]
    crops = info["crops"]
    by_accuracy = info["criterion"] == "accuracy"
    val_key, val_head = ("val_accuracy", "accuracy") if by_accuracy else ("val_balanced_accuracy", "bal. acc.")
    rows = [[r["label"], r["model"], r["threshold"], fmt(r[val_key]),
             fmt(r["test"]["accuracy"]), fmt(r["test"]["balanced_accuracy"]),
             fmt(r["test"]["recall_ambiguous"]), fmt(r["test"]["recall_unambiguous"])]
            for r in info["runs"]]
    return (
        Markdown("Lesion-presence ambiguity detection (Appendix E, Table 1)")
        .paragraph(
            f"Rule: {info['rule']}; t chosen on `{val}` by {info['criterion']}. Truth: {info['truth']}. "
            f"`{val}`: {crops[val]['ambiguous']}/{crops[val]['total']} ambiguous, "
            f"`{test}`: {crops[test]['ambiguous']}/{crops[test]['total']} ambiguous."
        )
        .table(["run", "model", "t", f"{val} {val_head}", f"{test} accuracy",
                f"{test} bal. acc.", "recall ambiguous", "recall unambiguous"], rows)
        .text()
    )


def per_crop_rows(study: AmbiguityStudy) -> list[list[Any]]:
    """Rows of ``per_crop.csv`` (:data:`CSV_COLUMNS`): one per run, split and crop."""
    rows: list[list[Any]] = []
    for r in study.results:
        for name, s in study.splits.items():
            marking, truth = study.marking[name], study.truth[name]
            for i in range(len(s)):
                rows.append([r.label, r.model, name, int(s.rows[i]), s.patient[i], int(marking[i]),
                             int(truth[i]), int(r.counts[name][i]), int(r.predicted[name][i])])
    return rows


def write_ambiguity(
    study: AmbiguityStudy,
    out: str | Path,
    info: dict[str, Any] | None = None,
    inputs: Iterable[str | Path | None] | None = None,
) -> list[Path]:
    """Write ``ambiguity.json``, ``ambiguity.md``, ``per_crop.csv`` and ``histograms.png`` to ``out``.

    ``info`` is :func:`summary` of ``study`` (computed when None). Every file is
    replaced atomically. ``out`` is checked first (:func:`lidcseg.io.outputs.open_output_folder`; ``inputs``
    default to the splits' folders and the runs) and marked as this command's. Returns
    the paths written.
    """
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports.plots import plot_presence_histograms
    from lidcseg.reports.tables import fmt, write_csv

    out = Path(out)
    if inputs is None:
        inputs = [*(s.path.parent for s in study.splits.values()), *(r.path for r in study.results)]
    open_output_folder(out, AMBIGUITY_OUTPUT, inputs=inputs)
    info = info or summary(study)
    written = [out / "ambiguity.json", out / "ambiguity.md", out / "per_crop.csv", out / "histograms.png"]
    write_json_atomic(written[0], info)
    write_bytes_atomic(written[1], markdown_report(info).encode())
    write_csv(written[2], CSV_COLUMNS, per_crop_rows(study))
    test = study.test_split
    t = study.truth[test]
    panels = {
        r.label: {
            "ambiguous": r.counts[test][t],
            "unambiguous": r.counts[test][~t],
            "threshold": r.choice.threshold,
            "subtitle": f"{test}: accuracy {fmt(r.test['accuracy'])}, "
                        f"balanced {fmt(r.test['balanced_accuracy'])} (t = {r.choice.threshold})",
        }
        for r in study.results
    }
    plot_presence_histograms(
        panels, study.n, written[3],
        title=f"Samples showing a lesion per {test} crop, ambiguous vs unambiguous "
              f"(threshold from {study.val_split})",
    )
    return written
