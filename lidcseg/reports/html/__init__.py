"""``OUT/report.html``: the self-contained report of ``lidcseg reproduce``.

:func:`write_report` reads what the stages wrote into the reproduction folder ``OUT``
and writes one HTML file with everything inline (figures as base64 PNG, data as JSON,
style and script): it opens from disk, fetches nothing, and renders the same without
JavaScript except for the case viewer's interaction. Its sections:

1. **Provenance** (:mod:`~lidcseg.reports.html.provenance`): the data version (ours,
   LIDCv1 or LIDCv2; the phantom flagged), counts per split and a content fingerprint;
   the machine, package versions and commit (``plan.json``); each run's config; the wall
   time of every stage.
2. **Fig. 4a**, **Table 1**, the **ablations** (:mod:`~lidcseg.reports.html.results`), each
   with the published values and their data version (:mod:`lidcseg.reports.paper_values`).
3. The **case viewer** (:mod:`~lidcseg.reports.html.viewer`): every crop of ``OUT/cases``,
   its graders and each model's hypotheses as outlines, a slider (and the arrow keys)
   through the hypotheses, the per-pixel frequency maps, the list sortable by GED² and
   filterable by grader disagreement.
4. **Fig. 6** (``OUT/latent``) and, when the flip task ran, **Fig. 5** with the mode table
   (``OUT/flip/calibration``).

A stage that did not run leaves a note in its section, not an error.
"""

from __future__ import annotations

from pathlib import Path

from lidcseg.errors import LidcsegError

REPORT = "report.html"

__all__ = ["REPORT", "write_report"]


def write_report(out_dir: Path, *, fingerprint: bool = True) -> Path:
    """Write ``out_dir/report.html`` (atomically) from the reproduction folder ``out_dir``.

    Args:
        out_dir: the folder of ``lidcseg reproduce`` (``plan.json``, ``data/``, ``runs/``,
            ``evaluate/``, ``ambiguity/``, ``latent/``, ``cases/``, ``flip/calibration/``;
            any of them may be missing).
        fingerprint: hash the crops' content for the provenance (reads every split file once).

    Returns:
        The report's path.

    Raises:
        LidcsegError: ``out_dir`` is not a folder, or a file it holds is damaged.
    """
    from lidcseg.io.atomic import write_bytes_atomic
    from lidcseg.reports.html.assets import CSS, VIEWER_JS
    from lidcseg.reports.html.markup import join, page
    from lidcseg.reports.html.provenance import (
        data_folder,
        data_provenance,
        provenance_section,
        read_plan,
        run_summaries,
    )
    from lidcseg.reports.html.results import (
        ablations_section,
        evaluation_summary,
        fig4a_section,
        flip_section,
        latent_section,
        table1_section,
    )
    from lidcseg.reports.html.viewer import cases_section

    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        raise LidcsegError("reproduction folder not found", out_dir)
    plan = read_plan(out_dir)
    data_dir = data_folder(out_dir, plan)
    data = data_provenance(data_dir, fingerprint=fingerprint) if (data_dir / "manifest.json").is_file() \
        or any(data_dir.glob("*.h5")) else None
    cases, has_viewer = cases_section(out_dir / "cases", data)
    flip = flip_section(out_dir / "flip" / "calibration")
    summary = evaluation_summary(out_dir / "evaluate")
    sections = [
        ("provenance", "Provenance", provenance_section(data, plan, run_summaries(out_dir, plan))),
        ("fig4a", "Fig. 4a", fig4a_section(out_dir / "evaluate", summary, data)),
        ("table1", "Table 1", table1_section(out_dir / "ambiguity", data)),
        ("ablations", "Ablations", ablations_section(summary, data)),
        ("cases", "Case viewer", cases),
        ("fig6", "Fig. 6", latent_section(out_dir / "latent", plan)),
    ]
    if flip is not None:
        sections.append(("fig5", "Fig. 5 (flip task)", flip))
    title = "lidcseg reproduction of the Probabilistic U-Net (Kohl et al. 2018)"
    if data and data.get("phantom"):
        title += " — PHANTOM data"
    html = page(title, [(anchor, text) for anchor, text, _ in sections],
                join(body for _, _, body in sections), css=CSS, script=VIEWER_JS if has_viewer else "")
    path = out_dir / REPORT
    write_bytes_atomic(path, html.encode("utf-8"))
    return path
