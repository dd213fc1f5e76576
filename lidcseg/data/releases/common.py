"""What both release importers share: the folder they write, its manifest, and name parsing.

An import writes ``out/{train,val,test}.h5`` (:mod:`lidcseg.data.store`) and
``out/manifest.json`` into a staging folder first and moves them in only when every split
was converted (:func:`write_dataset`). See :mod:`lidcseg.data.releases` for the intensity
convention and the metadata columns.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.data.split import SPLITS
from lidcseg.data.store import META_COLUMNS, N_GRADERS, CropBatch, write_crops
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import NoSpaceError, remove_temporaries, write_json_atomic
from lidcseg.io.outputs import OutputKind, check_output_folder, has_format, mark_output

MANIFEST = "manifest.json"
INTENSITY_SCALE = 255.0
#: Patients per split of the full 1010-patient LIDC-IDRI (``DataConfig.split_patients``).
SPLIT_PROPORTIONS = (722, 144, 144)

#: Called as ``progress(stage, done, total)``; library code never prints.


@dataclass(frozen=True)
class ImportSummary:
    """What an import wrote.

    Attributes:
        out: the data folder.
        manifest: the content of ``out/manifest.json``.
    """

    out: Path
    manifest: dict[str, Any]

    def crops(self, split: str) -> int:
        """Number of crops written for ``split`` (0 if the split is absent)."""
        return int(self.manifest["splits"].get(split, {}).get("crops", 0))


_NUM = re.compile(r"(\d+)")
_TOKEN_Z = re.compile(r"^z-(-?\d+(?:\.\d+)?)$", re.IGNORECASE)
_TOKEN_SLICE = re.compile(r"^slice-?(\d+)$", re.IGNORECASE)
_TOKEN_LESION = re.compile(r"^(?:c|crop|lesion|nodule|nod|les)-?(\d+)$", re.IGNORECASE)


def natural_key(s: str) -> list[Any]:
    """Sort key of a name with its digit runs as numbers (``slice2`` before ``slice10``)."""
    return [int(t) if t.isdigit() else t for t in _NUM.split(s)]


def parse_name(name: str) -> tuple[float, int | None, int | None]:
    """``(z_mm, lesion, slice)`` from ``_``-separated tokens like ``z-105.0``, ``c0``, ``slice12``."""
    z, lesion, sl = math.nan, None, None
    for tok in name.split("_"):
        if m := _TOKEN_Z.match(tok):
            z = float(m.group(1))
        elif m := _TOKEN_SLICE.match(tok):
            sl = int(m.group(1))
        elif m := _TOKEN_LESION.match(tok):
            lesion = int(m.group(1))
    return z, lesion, sl


def new_batch(n: int, size: int) -> CropBatch:
    """An empty batch of ``n`` crops: image (n, S, S) int16, masks (n, 4, S, S) uint8, metadata."""
    meta = {
        "patient_id": np.empty(n, dtype=object),
        "scan_id": np.full(n, -1, np.int32),
        "lesion_id": np.zeros(n, np.int32),
        "slice_index": np.zeros(n, np.int32),
        "z_mm": np.full(n, np.nan, np.float64),
        "n_graders": np.zeros(n, np.int8),
        "centre_mm": np.full((n, 3), np.nan, np.float64),
    }
    assert set(meta) == set(META_COLUMNS)
    return CropBatch(np.zeros((n, size, size), np.int16), np.zeros((n, N_GRADERS, size, size), np.uint8), meta)


def put_crop(
    batch: CropBatch,
    r: int,
    image: np.ndarray,
    masks: Sequence[np.ndarray],
    *,
    patient: str,
    lesion: int,
    slice_index: int,
    z_mm: float,
) -> None:
    """Row ``r`` of ``batch``: ``image`` (S, S) as stored, ``masks`` (each (S, S)) binarised
    (> 0) into the first graders (the rest stay empty), and the metadata columns."""
    batch.image[r] = image
    for g, m in enumerate(masks):
        batch.masks[r, g] = m > 0
    batch.meta["patient_id"][r] = patient
    batch.meta["lesion_id"][r] = lesion
    batch.meta["slice_index"][r] = slice_index
    batch.meta["z_mm"][r] = z_mm
    batch.meta["n_graders"][r] = len(masks)


def _is_import(folder: Path) -> bool:
    """A data folder of any version's import: its manifest, or a staging folder of a killed one."""
    return has_format(MANIFEST, format="lidcseg-data", kind="import")(folder) or any(
        p.name.startswith(".import-") and p.is_dir() for p in folder.iterdir())


#: ``lidcseg import``'s data folder (:mod:`lidcseg.io.outputs`).
IMPORT_OUTPUT = OutputKind("import", legacy=_is_import, noun="data folder")


def check_out(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an ``out`` that import may not write: a file or under one, a folder that import
    did not write, one that is, holds or is inside one of the ``inputs``
    (:func:`lidcseg.io.outputs.check_output_folder`), or a data set unless ``overwrite``."""
    check_output_folder(out, IMPORT_OUTPUT, inputs=inputs)
    if (out / MANIFEST).exists() and not overwrite:
        raise LidcsegError(
            f"already holds a data set ({MANIFEST}); use --overwrite to replace it", out
        )


def write_dataset(
    out: Path,
    overwrite: bool,
    batches: Iterator[tuple[str, CropBatch]],
    *,
    source: str,
    release: str,
    input_path: Path,
    intensity: str,
    attrs: dict[str, Any],
    manifest: dict[str, Any],
) -> ImportSummary:
    """Write every ``(split, batch)`` into a staging folder, then move them into ``out``.

    Every split file's attributes and ``manifest.json`` name the ``source``, ``release`` and
    ``intensity`` (with ``intensity_scale``), then the importer's own ``attrs`` and
    ``manifest`` entries; the manifest also the resolved ``input_path``.

    Nothing appears in ``out`` unless every split was converted: on any error the staging
    folder (and ``out``, if this call created it empty) is removed and an existing data set
    is left untouched; a full disk is one :class:`lidcseg.io.atomic.NoSpaceError` naming
    the file in ``out``. ``manifest.json`` is written last. Staging folders and temporary
    files of a killed import are removed first and named in the manifest's ``warnings``.
    """
    from lidcseg import __version__

    manifest = {
        "format": "lidcseg-data",
        "kind": "import",
        "source": source,
        "release": release,
        "input": str(input_path.resolve()),
        "intensity": intensity,
        "intensity_scale": INTENSITY_SCALE,
        "n_graders": N_GRADERS,
        "lidcseg_version": __version__,
        **manifest,
    }
    attrs = {"source": source, "release": release, "intensity": intensity,
             "intensity_scale": INTENSITY_SCALE, **attrs}
    check_out(out, overwrite, [input_path])
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    stale = remove_temporaries(out, [MANIFEST, *(f"{s}.h5" for s in SPLITS)], ".import-")
    stage = Path(tempfile.mkdtemp(prefix=".import-", dir=out))
    try:
        splits: dict[str, dict[str, Any]] = {}
        for split, batch in batches:
            write_crops(stage / f"{split}.h5", batch, {**attrs, "split": split})
            pids = sorted({str(p) for p in batch.meta["patient_id"]})
            splits[split] = {
                "file": f"{split}.h5",
                "crops": len(batch),
                "patients": len(pids),
                "patient_ids": pids,
            }
        check_out(out, overwrite, [input_path])  # someone may have written there meanwhile
        mark_output(out, IMPORT_OUTPUT)
        with contextlib.suppress(FileNotFoundError):
            (out / MANIFEST).unlink()  # from here on, the folder reads as incomplete
        for split in SPLITS:
            dest = out / f"{split}.h5"
            if split in splits:
                os.replace(stage / f"{split}.h5", dest)
            else:
                with contextlib.suppress(FileNotFoundError):
                    dest.unlink()  # a stale split of the data set being replaced
        manifest = {**manifest, "splits": splits}
        if stale:
            manifest["warnings"] = [{"file": str(out / n), "warning": "removed what an interrupted "
                                     "import left behind"} for n in stale]
        write_json_atomic(out / MANIFEST, manifest)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        if isinstance(e, NoSpaceError):
            raise e.moved(stage, out) from None  # name the output, not its staging copy
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return ImportSummary(out, manifest)
