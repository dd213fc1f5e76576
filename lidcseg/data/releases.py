"""Import the two public preprocessed LIDC releases into the crop format of :mod:`lidcseg.data.store`.

Published LIDC numbers are quoted on one of two preprocessings (FIELD-NOTES, "Published
LIDC numbers"), so results are only comparable on the same data:

* **LIDCv1**, the pickle of the PyTorch port (stefanknegt/Probabilistic-Unet-Pytorch,
  ``data_lidc.pickle``; also used by PHiSeg, SSN, MoSE, CCDM). One dict keyed by slice name
  ``<patient>_<rest>`` (e.g. ``LIDC-IDRI-0001_...``); each value is a dict with ``'image'``
  (128 x 128 float in [0, 1]), ``'masks'`` (a list of 4 128 x 128 arrays, 0/1) and
  ``'series_uid'``. The release has no split. Read from the port's ``load_LIDC_data.py``
  (it asserts images and masks lie in [0, 1]), PHiSeg's ``data/lidc_data_loader.py``
  (splits by ``series_uid``) and the generalized Prob. U-Net's split script (patient =
  ``key.split('_')[0]``).
* **LIDCv2**, the 180 x 180 PNG crops of the hierarchical Prob. U-Net
  (google-deepmind/deepmind-research ``hierarchical_probabilistic_unet/README.md``): one
  archive per split that unpacks to ``[lidc_crops_<split>/]<split>/images/<patient>/
  z-<z>_c<crop>.png`` and ``.../gt/<patient>/z-<z>_c<crop>_l<grader>.png`` (graders
  numbered 0..3 in the files in use, 1..4 in the README; any integer is accepted and
  sorted). Pixels are 0.5 mm; the images are 8-bit windowed CT, not Hounsfield units.

Intensity convention (file attribute ``intensity``, also in ``manifest.json``):

============================  ==============================================================
``intensity``                 meaning of the int16 ``image``
============================  ==============================================================
``"HU"``                      Hounsfield units (``lidcseg prepare``)
``"png-uint8"``               LIDCv2: the PNG's 8-bit grey value 0..255, stored as is
``"unit-float-x255"``         LIDCv1: ``round(255 * x)`` of the pickle's float ``x`` in [0, 1]
============================  ==============================================================

For both imports ``image / intensity_scale`` (attribute, 255.0) gives the release's own
[0, 1] image. LIDCv1 loses at most 1/510 to the rounding; the largest error actually met is
recorded as ``quantisation_max_error`` in the manifest.

Metadata columns of imported crops: ``patient_id`` from the names; ``scan_id`` -1;
``lesion_id`` the crop number ``c<k>`` of the name where there is one (LIDCv2: crop number
within the slice), else a running index within the patient; ``slice_index`` a parsed
``slice<k>`` where there is one, else a running index within the patient in name order;
``z_mm`` the ``z-<z>`` of the name where there is one (LIDCv2), else NaN; ``n_graders`` the
number of masks the release gives; ``centre_mm`` NaN. Masks are binarised (> 0) and padded
to 4 graders with empty masks.

The pickle is read by :func:`safe_load_pickle`, which never runs code from the file.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import pickle
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.data.split import SPLITS, split_patients
from lidcseg.data.store import META_COLUMNS, N_GRADERS, CropBatch, write_crops
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_json_atomic

__all__ = [
    "ImportSummary",
    "import_hpunet_png",
    "import_pytorch_pickle",
    "safe_load_pickle",
]

MANIFEST = "manifest.json"
INTENSITY_SCALE = 255.0
#: Patients per split of the full 1010-patient LIDC-IDRI (``DataConfig.split_patients``).
SPLIT_PROPORTIONS = (722, 144, 144)

#: Called as ``progress(stage, done, total)``; library code never prints.
Progress = Callable[[str, int, int], None]


# --------------------------------------------------------------------------- safe pickle

def _numpy_attr(modules: tuple[str, ...], name: str) -> Any:
    for mod in modules:
        with contextlib.suppress(ImportError, AttributeError):
            return getattr(importlib.import_module(mod), name)
    raise AttributeError(name)  # pragma: no cover - numpy always has one of them


_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")

#: The only globals a pickle of numpy arrays in plain containers needs. Each is resolved
#: here, never by importing the module the file names.
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    **{(m, "_reconstruct"): (lambda: _numpy_attr(_MULTIARRAY, "_reconstruct")) for m in _MULTIARRAY},
    **{(m, "scalar"): (lambda: _numpy_attr(_MULTIARRAY, "scalar")) for m in _MULTIARRAY},
    **{(m, "_frombuffer"): (lambda: _numpy_attr(_NUMERIC, "_frombuffer")) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    ("_codecs", "encode"): lambda: __import__("_codecs").encode,  # bytes in protocol <= 2
    ("collections", "OrderedDict"): lambda: __import__("collections").OrderedDict,
    **{
        (mod, name): (lambda name=name: getattr(__import__("builtins"), name))
        for mod in ("builtins", "__builtin__")
        for name in ("list", "dict", "tuple", "set", "frozenset", "bytearray", "bytes",
                     "str", "int", "float", "complex", "bool")
    },
}


class _SafeUnpickler(pickle.Unpickler):
    """An unpickler that builds numpy arrays and plain containers, and nothing else."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        make = _SAFE_GLOBALS.get((module, name))
        if make is None:
            raise LidcsegError(
                f"refusing to load: the pickle calls {module}.{name}, which is not part of "
                "numpy array data (possibly malicious)",
                self._path,
            )
        return make()

    def persistent_load(self, pid: Any) -> Any:
        raise LidcsegError("refusing to load: the pickle uses persistent ids", self._path)


class _CountingReader(io.RawIOBase):
    """A read-only file wrapper that reports the bytes read so far."""

    def __init__(self, f: Any, total: int, report: Callable[[int], None]) -> None:
        self._f, self._total, self._report, self._done, self._last = f, total, report, 0, 0

    def readable(self) -> bool:
        return True

    def _count(self, n: int) -> None:
        self._done += n
        if self._done - self._last >= (1 << 24) or self._done >= self._total:
            self._last = self._done
            self._report(self._done)

    def read(self, size: int = -1) -> bytes:
        data = self._f.read(size)
        self._count(len(data))
        return data

    def readinto(self, b: Any) -> int:
        n = self._f.readinto(b)
        self._count(n or 0)
        return n

    def readline(self, size: int = -1) -> bytes:
        data = self._f.readline(size)
        self._count(len(data))
        return data


def safe_load_pickle(path: str | Path, progress: Progress | None = None) -> Any:
    """Load a pickle of numpy arrays in dicts/lists **without running code from the file**.

    :func:`pickle.load` calls whatever global the file names (``os.system``,
    ``builtins.eval``...). Here only the globals numpy arrays need are admitted (see
    ``_SAFE_GLOBALS``); any other raises :class:`LidcsegError` naming the file and the
    global, before it is called.

    Raises:
        LidcsegError: missing file, not a pickle, or a forbidden global.
    """
    path = Path(path)
    if not path.exists():
        raise LidcsegError("no such file", path)
    if not path.is_file():
        raise LidcsegError("not a file", path)
    total = path.stat().st_size
    try:
        with open(path, "rb") as raw:
            f: Any = raw
            if progress is not None:
                f = _CountingReader(raw, total, lambda done: progress("reading pickle", done, total))
                progress("reading pickle", 0, total)
            return _SafeUnpickler(f, path).load()
    except LidcsegError:
        raise
    except MemoryError:
        raise LidcsegError("out of memory while reading the pickle", path) from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError,
            AttributeError, UnicodeDecodeError, OverflowError) as e:
        raise LidcsegError(f"not a readable pickle ({e.__class__.__name__}: {e})", path) from None


# --------------------------------------------------------------------------- shared pieces

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


def _natural(s: str) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in _NUM.split(s)]


def _parse_name(name: str) -> tuple[float, int | None, int | None]:
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


def _alloc(n: int, size: int) -> CropBatch:
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


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise LidcsegError("output exists and is not a folder", out)
    if (out / MANIFEST).exists() and not overwrite:
        raise LidcsegError(
            f"already holds a data set ({MANIFEST}); use --overwrite to replace it", out
        )


def _write_dataset(
    out: Path,
    overwrite: bool,
    batches: Iterator[tuple[str, CropBatch]],
    attrs: dict[str, Any],
    manifest: dict[str, Any],
) -> ImportSummary:
    """Write every ``(split, batch)`` into a staging folder, then move them into ``out``.

    Nothing appears in ``out`` unless every split was converted: on any error the staging
    folder (and ``out``, if this call created it empty) is removed and an existing data set
    is left untouched. ``manifest.json`` is written last.
    """
    _check_out(out, overwrite)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
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
        _check_out(out, overwrite)  # someone may have written there meanwhile
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
        write_json_atomic(out / MANIFEST, manifest)
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        if created:
            with contextlib.suppress(OSError):
                out.rmdir()
        raise
    shutil.rmtree(stage, ignore_errors=True)
    return ImportSummary(out, manifest)


def _base_manifest(source: str, release: str, input_path: Path, intensity: str) -> dict[str, Any]:
    from lidcseg import __version__

    return {
        "format": "lidcseg-data",
        "kind": "import",
        "source": source,
        "release": release,
        "input": str(input_path.resolve()),
        "intensity": intensity,
        "intensity_scale": INTENSITY_SCALE,
        "n_graders": N_GRADERS,
        "lidcseg_version": __version__,
    }


# --------------------------------------------------------------------------- LIDCv1 pickle

_LIDC_ID = re.compile(r"LIDC-IDRI-\d{4}", re.IGNORECASE)


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
            raise LidcsegError(f"slice key {key!r} is not a string", path)
        where = f"slice {key!r}"
        if not isinstance(value, dict) or "image" not in value or "masks" not in value:
            raise LidcsegError(f"{where}: expected a dict with 'image' and 'masks'", path)
        image = value["image"]
        if not isinstance(image, np.ndarray) or image.ndim != 2 or image.shape[0] != image.shape[1]:
            shape = getattr(image, "shape", type(image).__name__)
            raise LidcsegError(f"{where}: 'image' must be a square 2-D array, got {shape}", path)
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
        scaled = np.clip(img, 0.0, 1.0) * INTENSITY_SCALE
        quant_err = max(quant_err, float(np.abs(scaled - np.rint(scaled)).max()) / INTENSITY_SCALE)
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
            patient, rest = (uid.decode() if isinstance(uid, bytes) else uid), key
        else:
            raise LidcsegError(f"{where}: no patient id in the key and no 'series_uid'", path)
        entries.append(_Slice(key, patient, rest, image, masks))
    return entries, quant_err


def import_pytorch_pickle(
    path: str | Path,
    out: str | Path,
    *,
    seed: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ImportSummary:
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
    _check_out(out, overwrite)
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
                for i, e in enumerate(sorted(by_patient[pid], key=lambda e: _natural(e.rest)))
            ]
            batch = _alloc(len(rows), size)
            for r, (pid, i, e) in enumerate(rows):
                x = np.clip(e.image.astype(np.float64), 0.0, 1.0) * INTENSITY_SCALE
                batch.image[r] = np.rint(x).astype(np.int16)
                for g, m in enumerate(e.masks):
                    batch.masks[r, g] = m > 0
                z, lesion, sl = _parse_name(e.rest)
                batch.meta["patient_id"][r] = pid
                batch.meta["lesion_id"][r] = i if lesion is None else lesion
                batch.meta["slice_index"][r] = i if sl is None else sl
                batch.meta["z_mm"][r] = z
                batch.meta["n_graders"][r] = len(e.masks)
                if progress is not None:
                    progress(f"converting {split}", r + 1, len(rows))
            yield split, batch

    manifest = _base_manifest("pytorch-pickle", "LIDCv1", path, "unit-float-x255")
    manifest.update(
        crop_size=size,
        spacing_mm=None,
        seed=seed,
        split_rule=(
            "by patient (LIDC-IDRI-#### in the key, else the key up to its first '_', else "
            "series_uid); sorted ids permuted by numpy default_rng(seed); val and test "
            "round(n*144/1010) each (>= 1 once n >= 3), train the rest"
        ),
        input_bytes=path.stat().st_size,
        quantisation_max_error=quant_err,
    )
    attrs = {"source": "pytorch-pickle", "release": "LIDCv1", "intensity": "unit-float-x255",
             "intensity_scale": INTENSITY_SCALE, "seed": seed}
    return _write_dataset(out, overwrite, batches(), attrs, manifest)


# --------------------------------------------------------------------------- LIDCv2 PNGs

_SPLIT_ALIASES = {
    "train": "train", "training": "train",
    "val": "val", "valid": "val", "validation": "val",
    "test": "test", "testing": "test",
}
_MASK_NAME = re.compile(r"^(?P<base>.+)_l(?P<grader>\d+)$")


def _split_of(name: str) -> str | None:
    n = name.lower()
    for prefix in ("lidc_crops_", "lidc-crops-", "lidc_crops-"):
        if n.startswith(prefix):
            n = n[len(prefix):]
    return _SPLIT_ALIASES.get(n)


def _find_png_splits(root: Path) -> dict[str, Path]:
    """Folders holding ``images/`` and ``gt/``, by split (searched 3 levels deep)."""
    if not root.exists():
        raise LidcsegError("no such folder", root)
    if not root.is_dir():
        raise LidcsegError("not a folder", root)
    found: list[Path] = []
    level = [root]
    for _ in range(4):
        nxt = []
        for d in level:
            if (d / "images").is_dir() and (d / "gt").is_dir():
                found.append(d)
                continue
            with contextlib.suppress(OSError):
                nxt += sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))
        level = nxt
    if not found:
        raise LidcsegError(
            "no images/ and gt/ folders found: expected <split>/images/<patient>/*.png "
            "and <split>/gt/<patient>/*_l<grader>.png (the HPU-Net LIDC crops)", root
        )
    splits: dict[str, Path] = {}
    for d in found:
        chain = [d, *d.relative_to(root).parents]
        names = [p.name if p != Path(".") else root.resolve().name for p in chain]
        split = next((s for s in map(_split_of, names) if s), None)
        if split is None:
            raise LidcsegError("cannot tell the split of this folder: name it train, val or test", d)
        if split in splits:
            raise LidcsegError(f"two folders for split {split}: {splits[split]} and {d}", root)
        splits[split] = d
    return splits


def _pngs_by_patient(folder: Path) -> dict[str, list[Path]]:
    out: dict[str, list[Path]] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() == ".png":
            raise LidcsegError(f"PNG directly in {folder.name}/: expected {folder.name}/<patient>/<name>.png", p)
        if p.is_dir() and not p.name.startswith("."):
            files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() == ".png")
            if files:
                out[p.name] = files
    return out


def _read_png(path: Path, kind: str) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise LidcsegError(f"{kind} PNG has mode {im.mode}, expected 8-bit grey", path)
            if im.mode != "L":
                im = im.convert("L")
            return np.asarray(im)
    except LidcsegError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise LidcsegError(f"not a readable PNG ({e.__class__.__name__})", path) from None


@dataclass
class _Crop:
    patient: str
    image: Path
    masks: list[Path]
    z: float
    lesion: int | None


def _pair_split(folder: Path) -> list[_Crop]:
    images = _pngs_by_patient(folder / "images")
    gts = _pngs_by_patient(folder / "gt")
    if not images:
        raise LidcsegError("no PNG images found in images/<patient>/", folder / "images")
    masks: dict[tuple[str, str], dict[int, Path]] = {}
    for patient, files in gts.items():
        for f in files:
            m = _MASK_NAME.match(f.stem)
            if m is None:
                raise LidcsegError("grader mask name lacks the _l<grader> suffix", f)
            masks.setdefault((patient, m.group("base")), {})[int(m.group("grader"))] = f
    crops: list[_Crop] = []
    for patient in sorted(images, key=_natural):
        for f in images[patient]:
            graders = masks.pop((patient, f.stem), None)
            if not graders:
                raise LidcsegError(f"no grader masks gt/{patient}/{f.stem}_l<grader>.png for this image", f)
            if len(graders) > N_GRADERS:
                raise LidcsegError(f"{len(graders)} grader masks for this image, at most {N_GRADERS}", f)
            z, lesion, _ = _parse_name(f.stem)
            crops.append(_Crop(patient, f, [graders[k] for k in sorted(graders)], z, lesion))
    if masks:
        (patient, base), graders = sorted(masks.items())[0]
        raise LidcsegError(f"grader mask without an image images/{patient}/{base}.png", next(iter(graders.values())))
    crops.sort(key=lambda c: (_natural(c.patient), math.isnan(c.z), 0.0 if math.isnan(c.z) else c.z,
                              c.lesion if c.lesion is not None else -1, _natural(c.image.name)))
    return crops


def import_hpunet_png(
    root: str | Path,
    out: str | Path,
    *,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ImportSummary:
    """Convert the HPU-Net LIDC crops (LIDCv2, 180 x 180 PNGs) into ``out``, keeping their split.

    ``root`` is the folder the archives were unpacked into; every folder up to three levels
    below it that holds ``images/`` and ``gt/`` is one split, named by itself or a parent
    (``train``/``val``/``test``, also ``lidc_crops_<split>``, ``training``, ``validation``,
    ``testing``). Splits not present are not written (e.g. only the test archive).

    Writes ``out/<split>.h5`` (``image`` is the PNG's grey value 0..255 as int16, attribute
    ``intensity="png-uint8"``) and ``out/manifest.json``.

    Raises:
        LidcsegError: missing or empty folder, unpaired images or masks, more than 4
            graders, unreadable or 16-bit PNGs, size mismatches, or ``out`` already in use.
    """
    root, out = Path(root), Path(out)
    _check_out(out, overwrite)
    split_dirs = _find_png_splits(root)
    paired = {s: _pair_split(split_dirs[s]) for s in SPLITS if s in split_dirs}  # names first
    first = next(iter(paired.values()))[0].image
    h, w = _read_png(first, "image").shape
    if h != w:
        raise LidcsegError(f"image is {w}x{h}, expected square", first)
    size = int(h)

    def batches() -> Iterator[tuple[str, CropBatch]]:
        for split, crops in paired.items():
            batch = _alloc(len(crops), size)
            running: dict[str, int] = {}
            for r, c in enumerate(crops):
                img = _read_png(c.image, "image")
                if img.shape != (size, size):
                    raise LidcsegError(f"image is {img.shape[1]}x{img.shape[0]}, others {size}x{size}", c.image)
                batch.image[r] = img
                for g, mp in enumerate(c.masks):
                    m = _read_png(mp, "mask")
                    if m.shape != img.shape:
                        raise LidcsegError(
                            f"mask is {m.shape[1]}x{m.shape[0]}, its image {img.shape[1]}x{img.shape[0]}", mp
                        )
                    batch.masks[r, g] = m > 0
                i = running.get(c.patient, 0)
                running[c.patient] = i + 1
                batch.meta["patient_id"][r] = c.patient
                batch.meta["lesion_id"][r] = i if c.lesion is None else c.lesion
                batch.meta["slice_index"][r] = i
                batch.meta["z_mm"][r] = c.z
                batch.meta["n_graders"][r] = len(c.masks)
                if progress is not None:
                    progress(f"converting {split}", r + 1, len(crops))
            yield split, batch

    manifest = _base_manifest("hpunet-png", "LIDCv2", root, "png-uint8")
    manifest.update(
        crop_size=size,
        spacing_mm=0.5,
        seed=None,
        split_rule="the release's own split (one folder per split)",
        split_folders={s: str(d.resolve()) for s, d in split_dirs.items()},
    )
    attrs = {"source": "hpunet-png", "release": "LIDCv2", "intensity": "png-uint8",
             "intensity_scale": INTENSITY_SCALE, "spacing_mm": 0.5}
    return _write_dataset(out, overwrite, batches(), attrs, manifest)
