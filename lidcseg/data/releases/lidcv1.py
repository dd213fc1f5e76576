"""LIDCv1: the PyTorch port's ``data_lidc.pickle`` (128 x 128), split by patient on import.

One dict keyed by slice name ``<patient>_<rest>``; each value is a dict with ``'image'``
(128 x 128 float in [0, 1]), ``'masks'`` (a list of 4 128 x 128 arrays, 0/1) and
``'series_uid'`` (see :mod:`lidcseg.data.releases`). The file is read by
:func:`~lidcseg.data.releases.safe_pickle.safe_load_pickle`, which never runs code from it.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.data.releases import common
from lidcseg.data.releases.safe_pickle import safe_load_pickle
from lidcseg.data.split import SPLITS, split_patients
from lidcseg.data.store import N_GRADERS, CropBatch
from lidcseg.errors import LidcsegError

__all__ = ["import_pytorch_pickle"]

_LIDC_ID = re.compile(r"LIDC-IDRI-\d{4}", re.IGNORECASE)
#: Smallest crop side admitted (``DataConfig.crop_size`` >= 8).
_MIN_SIZE = 8


@dataclass
class _Slice:
    key: str
    patient: str
    rest: str
    image: np.ndarray
    masks: list[np.ndarray]


def _v1_entries(data: Any, path: Path) -> tuple[list[_Slice], float]:
    """Validate the pickle's structure.

    Returns:
        The entries (arrays not yet converted) and the largest error of storing the images
        as ``round(255 x) / 255``.
    """
    if not isinstance(data, dict):
        raise LidcsegError(
            f"expected a dict of slices (the PyTorch port's data_lidc.pickle), got {type(data).__name__}", path
        )
    if not data:
        raise LidcsegError("the pickle holds no slices", path)
    entries: list[_Slice] = []
    size: tuple[int, ...] | None = None
    quant_err = 0.0
    for key, value in data.items():
        if not isinstance(key, str):
            raise LidcsegError(f"a slice key is a {type(key).__name__}, not a string", path)
        where = f"slice {key[:80]!a}" + ("..." if len(key) > 80 else "")
        if not isinstance(value, dict) or "image" not in value or "masks" not in value:
            raise LidcsegError(f"{where}: expected a dict with 'image' and 'masks'", path)
        image = value["image"]
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.shape[0] != image.shape[1]:
            shape = getattr(image, "shape", type(image).__name__)
            raise LidcsegError(f"{where}: 'image' must be a square 2-D array, got {shape}", path)
        if image.shape[0] < _MIN_SIZE:
            raise LidcsegError(f"{where}: image is {image.shape[1]}x{image.shape[0]}, at least "
                               f"{_MIN_SIZE}x{_MIN_SIZE} expected", path)
        if size is None:
            size = image.shape
        elif image.shape != size:
            raise LidcsegError(f"{where}: image shape {image.shape} differs from {size}", path)
        if image.dtype.kind not in "fiub":
            raise LidcsegError(f"{where}: 'image' has dtype {image.dtype}, expected numbers", path)
        img = image.astype(np.float64, copy=False)
        if not np.isfinite(img).all():
            raise LidcsegError(f"{where}: image has NaN or infinite values", path)
        lo, hi = float(img.min()), float(img.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise LidcsegError(f"{where}: image values span [{lo:g}, {hi:g}], expected [0, 1]", path)
        scaled = np.clip(img, 0.0, 1.0) * common.INTENSITY_SCALE
        quant_err = max(quant_err, float(np.abs(scaled - np.rint(scaled)).max()) / common.INTENSITY_SCALE)
        raw_masks = value["masks"]
        if isinstance(raw_masks, np.ndarray) and raw_masks.ndim == 3:
            raw_masks = list(raw_masks)
        if not isinstance(raw_masks, list | tuple) or not 1 <= len(raw_masks) <= N_GRADERS:
            n = len(raw_masks) if isinstance(raw_masks, list | tuple) else type(raw_masks).__name__
            raise LidcsegError(f"{where}: 'masks' must be a list of 1 to {N_GRADERS} arrays, got {n}", path)
        masks = []
        for g, m in enumerate(raw_masks):
            if not isinstance(m, np.ndarray) or m.shape != image.shape:
                shape = getattr(m, "shape", type(m).__name__)
                raise LidcsegError(f"{where}: mask {g} has shape {shape}, image {image.shape}", path)
            if m.dtype.kind not in "fiub":
                raise LidcsegError(f"{where}: mask {g} has dtype {m.dtype}, expected numbers", path)
            if m.dtype.kind == "f" and not np.isfinite(m).all():
                raise LidcsegError(f"{where}: mask {g} has NaN values", path)
            masks.append(m)
        if m_id := _LIDC_ID.search(key):
            patient = m_id.group(0).upper()
            rest = (key[: m_id.start()] + key[m_id.end():]).strip("_")
        elif "_" in key:
            patient, rest = key.split("_", 1)
        elif isinstance(value.get("series_uid"), str | bytes) and value["series_uid"]:
            uid = value["series_uid"]
            patient, rest = (uid.decode("latin-1") if isinstance(uid, bytes) else uid), key
        else:
            raise LidcsegError(f"{where}: no patient id in the key and no 'series_uid'", path)
        try:
            patient.encode("utf-8")
        except UnicodeEncodeError:
            raise LidcsegError(f"{where}: the patient id is not valid text (lone surrogates)", path) from None
        entries.append(_Slice(key, patient, rest, image, masks))
    return entries, quant_err


def import_pytorch_pickle(
    path: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: common.Progress | None = None,
) -> common.ImportSummary:
    """Convert the PyTorch port's ``data_lidc.pickle`` (LIDCv1, 128 x 128) into ``out``.

    Writes ``out/{train,val,test}.h5`` (see :mod:`lidcseg.data.store`; ``image`` is
    ``round(255 x)`` as int16, attribute ``intensity="unit-float-x255"``) and
    ``out/manifest.json``. The release has no split, so patients are split with
    :func:`split_patients` (722/144/144 proportions, ``seed``): no patient is in two splits,
    unlike the port's random split by slice.

    Args:
        path: the pickle; loaded with :func:`safe_load_pickle` (no code from the file runs).
        out: the data folder to write.
        seed: seed of the patient split.
        overwrite: replace a data set already in ``out``.
        progress: optional ``progress(stage, done, total)`` callback.

    Raises:
        LidcsegError: missing file, not a pickle, wrong structure or shapes, NaN or
            out-of-range images, forbidden pickle content, or ``out`` already in use.
    """
    path, out = Path(path), Path(out)
    common.check_out(out, overwrite, [path])
    entries, quant_err = _v1_entries(safe_load_pickle(path, progress), path)
    size = int(entries[0].image.shape[0])
    by_patient: dict[str, list[_Slice]] = {}
    for e in entries:
        by_patient.setdefault(e.patient, []).append(e)
    assigned = split_patients(list(by_patient), seed)
    split_ids = {k: sorted(p for p, v in assigned.items() if v == k) for k in SPLITS}

    def batches() -> Iterator[tuple[str, CropBatch]]:
        for split in SPLITS:
            rows = [
                (pid, i, e)
                for pid in split_ids[split]
                for i, e in enumerate(sorted(by_patient[pid], key=lambda e: common.natural_key(e.rest)))
            ]
            batch = common.new_batch(len(rows), size)
            for r, (pid, i, e) in enumerate(rows):
                x = np.clip(e.image.astype(np.float64), 0.0, 1.0) * common.INTENSITY_SCALE
                z, lesion, sl = common.parse_name(e.rest)
                common.put_crop(batch, r, np.rint(x).astype(np.int16), e.masks, patient=pid,
                                lesion=i if lesion is None else lesion,
                                slice_index=i if sl is None else sl, z_mm=z)
                if progress is not None:
                    progress(f"converting {split}", r + 1, len(rows))
            yield split, batch

    manifest = {
        "crop_size": size,
        "spacing_mm": None,
        "seed": seed,
        "split_rule": (
            "by patient (LIDC-IDRI-#### in the key, else the key up to its first '_', else "
            "series_uid); sorted ids permuted by numpy default_rng(seed); val and test "
            "round(n*144/1010) each (>= 1 once n >= 3), train the rest"
        ),
        "input_bytes": path.stat().st_size,
        "quantisation_max_error": quant_err,
    }
    return common.write_dataset(out, overwrite, batches(), source="pytorch-pickle", release="LIDCv1",
                                input_path=path, intensity="unit-float-x255", attrs={"seed": seed},
                                manifest=manifest)
