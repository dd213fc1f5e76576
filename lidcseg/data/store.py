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

import contextlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.data.h5check import Layout, check_split_file
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import LatchedFile, atomic_path

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

    A full disk raises :class:`lidcseg.io.atomic.NoSpaceError` naming ``path`` (from the
    append that hit it, or from the close); the temporary file is removed, so ``path``
    keeps its previous content. Before the rename the file is read back and checked.
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
        self._f: h5py.File | None = None
        try:
            # HDF5 writes through a LatchedFile: a full disk must never reach HDF5, whose
            # close after a failed write crashes the interpreter (SIGSEGV).
            self._io = LatchedFile(tmp)
            self._f = f = h5py.File(self._io, "w", track_order=True)
            fixed, datasets = self.layout()
            for k, v in {**fixed, **self.attrs}.items():
                f.attrs[k] = v
            for name, (row, dtype, per_row) in datasets.items():
                opts: dict[str, Any] = dict(compression="lzf") if per_row else {}
                f.create_dataset(name, (0, *row), dtype, maxshape=(None, *row),
                                 chunks=(1 if per_row else 1024, *row), track_times=False, **opts)
            self._io.raise_error(self.path)
        except BaseException as e:
            self._close_quietly()
            self._atomic.__exit__(type(e), e, e.__traceback__)
            raise
        return self

    def _extend(self, columns: Mapping[str, Any]) -> None:
        """Append the same number of rows to every named dataset.

        Raises:
            NoSpaceError: the disk filled up (the file is then discarded on close).
        """
        n = len(next(iter(columns.values())))
        if n == 0:
            return
        a, b = self.count, self.count + n
        for name, data in columns.items():
            self._f[name].resize(b, axis=0)
            self._f[name][a:b] = data
            self._io.raise_error(self.path)
        self.count = b

    def _close_quietly(self) -> BaseException | None:
        """Close the HDF5 file and the file under it; the first error, not raised."""
        first: BaseException | None = None
        if self._f is not None:
            try:
                self._f.close()
            except Exception as e:
                first = e
        if getattr(self, "_io", None) is not None:
            self._io.close()
        return first

    def _check_written(self) -> None:
        """Read the closed temporary file back: every dataset must hold :attr:`count` rows."""
        try:
            with h5py.File(self._io.path, "r") as f:
                rows = {name: int(f[name].shape[0]) for name in f}
        except OSError as e:
            raise LidcsegError(f"the written file does not read back ({e.__class__.__name__})", self.path) from None
        if any(n != self.count for n in rows.values()):
            raise LidcsegError(f"the written file does not read back: rows {rows}, expected {self.count}", self.path)

    def __exit__(self, *exc: Any) -> None:
        error = self._close_quietly()
        if exc[1] is None:
            try:
                self._io.raise_error(self.path)
                if error is not None:
                    raise LidcsegError(f"cannot write HDF5 ({error.__class__.__name__}: {error})", self.path)
                self._check_written()
            except BaseException as e:
                self._atomic.__exit__(type(e), e, e.__traceback__)  # removes the temporary file
                raise
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

    #: Integer attributes (>= 1) that the layout depends on; set by subclasses.
    size_attrs: tuple[str, ...] = ()

    def layout(self, sizes: Mapping[str, int]) -> Layout:
        """The datasets of a valid file, ``name -> (row shape, dtype)``, given its size attributes."""
        raise NotImplementedError

    def recover(self, attrs: Mapping[str, Any]) -> str:
        """How to re-create a damaged file (the writing command, with ``--overwrite``)."""
        raise NotImplementedError

    def _open_checked(self, path: str | Path, what: str, format_name: str, format_version: int) -> None:
        """Check ``path`` against ``format_name`` of ``format_version`` and :meth:`layout`
        (:func:`lidcseg.data.h5check.check_split_file`); set ``path``, ``attrs`` (plain Python
        values) and ``_len`` (rows of every dataset).

        Raises:
            LidcsegError: missing, not HDF5 or truncated, another format or version, missing
                attributes or datasets, wrong shapes or dtypes, datasets of different
                lengths; one line naming the file and how to re-create it.
        """
        self.path = Path(path)
        if not self.path.is_file():
            raise LidcsegError(f"no such {what} file", self.path)
        self.attrs, self._len = check_split_file(
            self.path, what=what, format_name=format_name, format_version=format_version,
            size_attrs=self.size_attrs, layout=self.layout, recover=self.recover)
        self._reset_handle()

    @contextlib.contextmanager
    def _reading(self, what: str) -> Iterator[None]:
        """Turn a failed read of a file that passed the open check (a damaged chunk) into one line."""
        try:
            yield
        except (OSError, UnicodeDecodeError) as e:
            raise LidcsegError(f"cannot read {what}, the file is damaged ({e.__class__.__name__}); "
                               f"{self.recover(self.attrs)}", self.path) from None

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

    size_attrs = ("crop_size", "n_graders")

    def __init__(self, path: str | Path) -> None:
        self._open_checked(path, "crop", FORMAT_NAME, FORMAT_VERSION)
        self.crop_size = int(self.attrs["crop_size"])
        self.n_graders = int(self.attrs["n_graders"])
        self._meta: dict[str, np.ndarray] | None = None

    def layout(self, sizes: Mapping[str, int]) -> Layout:
        _, datasets = CropWriter(self.path, sizes["crop_size"], sizes["n_graders"]).layout()
        return {name: (row, dtype) for name, (row, dtype, _) in datasets.items()}

    def recover(self, attrs: Mapping[str, Any]) -> str:
        source = attrs.get("source")
        if source in ("pytorch-pickle", "hpunet-png"):
            return f"re-run `lidcseg import {source}` with --overwrite"
        if attrs.get("intensity") == "HU":
            return "re-run `lidcseg prepare` with --overwrite"
        return "re-run `lidcseg prepare` (or `lidcseg import`) with --overwrite"

    def __getitem__(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Return ``(image (S, S) int16 HU, masks (G, S, S) uint8)`` of crop ``i``."""
        if not -self._len <= i < self._len:
            raise IndexError(i)
        with self._reading(f"crop {i}"):
            f = self._h5()
            return f["image"][i], f["masks"][i]

    @property
    def meta(self) -> dict[str, np.ndarray]:
        """All metadata columns, loaded once (small: a few numbers per crop)."""
        if self._meta is None:
            with self._reading("the metadata columns"):
                f = self._h5()
                meta = {}
                for k in META_COLUMNS:
                    col = f[k][...]
                    if k == "patient_id":
                        col = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in col], dtype=object)
                    meta[k] = col
            self._meta = meta
        return self._meta

    def read_all(self) -> CropBatch:
        """Load the whole split into memory (tests and small imports only)."""
        with self._reading("the crops"):
            f = self._h5()
            return CropBatch(f["image"][...], f["masks"][...], dict(self.meta))

    def __enter__(self) -> CropStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

