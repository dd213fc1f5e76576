"""Exports of a trained run for use outside lidcseg (``lidcseg export RUN --format ...``).

* ``monai-bundle``: :func:`export_monai_bundle` writes a MONAI Bundle
  (:mod:`lidcseg.export.monai_bundle`): metadata, an inference config that calls
  :func:`bundle_infer` (``lidcseg sample``'s hypotheses, as NIfTI), the state dict, a
  TorchScript sampler of the Prob. U-Net family (:mod:`lidcseg.export.torchscript`) and a
  model card (:mod:`lidcseg.export.metadata`).
"""

from __future__ import annotations

from pathlib import Path

from lidcseg.errors import LidcsegError
from lidcseg.export.monai_bundle import EXPORT_OUTPUT, bundle_infer, check_run, export_monai_bundle

#: ``--format`` values of ``lidcseg export``.
EXPORT_FORMATS: tuple[str, ...] = ("monai-bundle",)

__all__ = ["EXPORT_FORMATS", "EXPORT_OUTPUT", "bundle_infer", "check_run", "export_monai_bundle", "export_run"]


def export_run(run: str | Path, out: str | Path, *, format: str = "monai-bundle", overwrite: bool = False) -> Path:
    """Export ``run`` to ``out`` in ``format`` (one of :data:`EXPORT_FORMATS`).

    Raises:
        LidcsegError: an unknown format, or what the format's exporter refuses.
    """
    if format not in EXPORT_FORMATS:
        raise LidcsegError(f"unknown export format {format!r}; valid: {', '.join(EXPORT_FORMATS)}")
    return export_monai_bundle(run, out, overwrite=overwrite)
