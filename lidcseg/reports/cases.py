"""The case viewer's data: every crop of a split with its graders and each run's hypotheses.

:func:`lidcseg.cases.sample_cases` computes; this module writes and reads the folder
(``OUT/cases/``): ``cases.h5`` (one row per crop, read crop by crop by the HTML report)
and ``cases.json`` (what was sampled, for people). It writes only into a new or empty
folder, or one it wrote (:data:`CASES_OUTPUT`).

Layout of ``cases.h5`` (N crops, T = input size, R runs, G graders <= 8, B bytes of
hypothesis bits per pixel):

========================  ==================  =========  =========================================
dataset                   shape               dtype      meaning
========================  ==================  =========  =========================================
``image``                 (N, T, T)           uint8      the CT tile in the display window, 0..255
``graders``               (N, T, T)           uint8      bit g set: grader g marks the pixel
``hypotheses``            (N, R, T, T, B)     uint8      run r, bit k of byte k // 8: hypothesis k
``pixels``                (N, R, 8B)          int32      foreground pixels of each hypothesis (0 beyond
                                                         the run's count)
``ged``                   (N, R)              float32    GED² of run r's hypotheses (V-statistic)
``grader_diversity``      (N,)                float32    mean d = 1 - IoU over distinct grader pairs
``marking``               (N,)                int8       grader masks that are not empty
``row``                   (N,)                int64      the crop's row in ``DATA/<split>.h5``
``patient``, ``lesion``   (N,)                str        patient id, ``patient/scan/lesion`` key
========================  ==================  =========  =========================================

Each row is one LZF chunk, so the report reads one crop at a time. The file attribute
``info`` (JSON) names the split, the seed and each run: its label, registry name,
folder and ``count``, the hypotheses it gives (``min(n, heads or members)``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from lidcseg.data.h5check import Layout
from lidcseg.data.store import AppendH5, LazyH5
from lidcseg.io.outputs import OutputKind, has_format

FORMAT_NAME = "lidcseg-cases"
FORMAT_VERSION = 1
CASES_FILE = "cases.h5"
CASES_JSON = "cases.json"
#: The cases folder of ``lidcseg reproduce``: the marker, or a ``cases.json`` of this format.
CASES_OUTPUT = OutputKind("reproduce cases", noun="cases folder",
                          legacy=has_format(CASES_JSON, format=FORMAT_NAME),
                          foreign="was not written by the cases stage of `lidcseg reproduce`")
#: At most this many graders fit the bit field of ``graders``.
MAX_GRADERS = 8


def hypothesis_bytes(count: int) -> int:
    """Bytes per pixel that hold ``count`` hypothesis bits."""
    return max(1, (int(count) + 7) // 8)


def pack_bits(masks: np.ndarray) -> np.ndarray:
    """(..., K, H, W) bool -> (..., H, W, ceil(K / 8)) uint8: bit k % 8 of byte k // 8 is mask k."""
    m = np.moveaxis(np.asarray(masks, bool), -3, -1)  # (..., H, W, K)
    return np.packbits(m, axis=-1, bitorder="little")


def unpack_bits(bits: np.ndarray, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: (..., H, W, B) uint8 -> (..., count, H, W) bool."""
    m = np.unpackbits(np.asarray(bits, np.uint8), axis=-1, count=count, bitorder="little")
    return np.moveaxis(m.astype(bool), -1, -3)


def display_grey(images: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """Normalised CT (N, T, T) -> uint8 grey, ``window`` mapped to 0..255 (as :func:`mask_overlay`)."""
    lo, hi = window
    grey = np.clip((np.asarray(images, np.float32) - lo) / (hi - lo), 0.0, 1.0)
    return np.round(grey * 255).astype(np.uint8)


class CasesWriter(AppendH5):
    """Stream crops into ``cases.h5``; the file appears only when the block ends without error.

    Args:
        path: the file.
        input_size: T.
        counts: hypotheses per run (R entries).
        graders: G.
        info: the JSON ``info`` attribute (split, seed, runs ...).
    """

    def __init__(self, path: str | Path, input_size: int, counts: list[int], graders: int,
                 info: Mapping[str, Any]) -> None:
        super().__init__(path, {"info": json.dumps(dict(info), sort_keys=True)})
        self.size, self.counts, self.graders = int(input_size), [int(c) for c in counts], int(graders)

    def layout(self) -> tuple[dict[str, Any], dict[str, tuple[tuple[int, ...], Any, bool]]]:
        t, r, b = self.size, len(self.counts), hypothesis_bytes(max(self.counts))
        fixed = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "input_size": t,
                 "n_graders": self.graders, "n_runs": r, "hyp_bytes": b}
        return fixed, _datasets(t, r, b)

    def append(self, image: np.ndarray, graders: np.ndarray, hypotheses: list[np.ndarray],
               ged: np.ndarray, rows: np.ndarray, patient: np.ndarray, lesion: np.ndarray,
               grader_diversity: np.ndarray) -> None:
        """Append a batch of b crops.

        Args:
            image: (b, T, T) uint8 display grey (:func:`display_grey`).
            graders: (b, G, T, T) bool.
            hypotheses: per run, (b, count_r, T, T) bool.
            ged: (b, R) float.
            rows, patient, lesion: (b,) the crops' rows, patients and lesion keys.
            grader_diversity: (b,) mean d over distinct grader pairs.
        """
        b, t = image.shape[0], self.size
        nb = hypothesis_bytes(max(self.counts))
        hyp = np.zeros((b, len(self.counts), t, t, nb), np.uint8)
        pixels = np.zeros((b, len(self.counts), 8 * nb), np.int32)
        for r, h in enumerate(hypotheses):
            packed = pack_bits(h)
            hyp[:, r, :, :, : packed.shape[-1]] = packed
            pixels[:, r, : h.shape[1]] = np.asarray(h, bool).reshape(b, h.shape[1], -1).sum(-1)
        g = np.asarray(graders, bool)
        self._extend({
            "image": image, "graders": pack_bits(g)[..., 0], "hypotheses": hyp, "pixels": pixels,
            "ged": np.asarray(ged, np.float32), "grader_diversity": np.asarray(grader_diversity, np.float32),
            "marking": g.reshape(b, g.shape[1], -1).any(-1).sum(1).astype(np.int8),
            "row": np.asarray(rows, np.int64),
            "patient": np.asarray([str(p) for p in patient], dtype=object),
            "lesion": np.asarray([str(k) for k in lesion], dtype=object),
        })


def _datasets(t: int, r: int, b: int) -> dict[str, tuple[tuple[int, ...], Any, bool]]:
    text = h5py.string_dtype()
    return {
        "image": ((t, t), np.uint8, True),
        "graders": ((t, t), np.uint8, True),
        "hypotheses": ((r, t, t, b), np.uint8, True),
        "pixels": ((r, 8 * b), np.int32, False),
        "ged": ((r,), np.float32, False),
        "grader_diversity": ((), np.float32, False),
        "marking": ((), np.int8, False),
        "row": ((), np.int64, False),
        "patient": ((), text, False),
        "lesion": ((), text, False),
    }


@dataclass
class Case:
    """One crop of the viewer, read back.

    Attributes:
        image: (T, T) uint8 display grey.
        graders: (G, T, T) bool.
        hypotheses: per run, (count_r, T, T) bool.
    """

    image: np.ndarray
    graders: np.ndarray
    hypotheses: list[np.ndarray]


class CasesStore(LazyH5):
    """Read ``cases.h5`` crop by crop (checked against the layout when opened).

    Attributes:
        info: the ``info`` attribute (split, seed, runs ...).
        runs: ``info["runs"]``: label, model, path and count of each run.
        meta: the small per-crop columns (``ged``, ``pixels``, ``grader_diversity``, ``marking``,
            ``row``, ``patient``, ``lesion``), loaded once.
    """

    size_attrs = ("input_size", "n_graders", "n_runs", "hyp_bytes")

    def __init__(self, path: str | Path) -> None:
        self._open_checked(path, "case", FORMAT_NAME, FORMAT_VERSION)
        self.input_size = int(self.attrs["input_size"])
        self.n_graders = int(self.attrs["n_graders"])
        try:
            self.info: dict[str, Any] = json.loads(str(self.attrs.get("info", "")))
            self.runs: list[dict[str, Any]] = list(self.info["runs"])
            if len(self.runs) != int(self.attrs["n_runs"]) or not all(
                    isinstance(r.get("count"), int) and 1 <= r["count"] <= 8 * int(self.attrs["hyp_bytes"])
                    for r in self.runs):
                raise ValueError("runs do not match the layout")
        except (ValueError, KeyError, TypeError, AttributeError):
            from lidcseg.errors import LidcsegError

            raise LidcsegError(f"damaged info attribute; {self.recover(self.attrs)}", self.path) from None
        self._meta: dict[str, np.ndarray] | None = None

    def layout(self, sizes: Mapping[str, int]) -> Layout:
        data = _datasets(sizes["input_size"], sizes["n_runs"], sizes["hyp_bytes"])
        return {name: (row, dtype) for name, (row, dtype, _) in data.items()}

    def recover(self, attrs: Mapping[str, Any]) -> str:
        return "re-run the cases stage of `lidcseg reproduce`"

    @property
    def meta(self) -> dict[str, np.ndarray]:
        if self._meta is None:
            with self._reading("the per-crop columns"):
                f = self._h5()
                meta = {k: f[k][...] for k in ("ged", "pixels", "grader_diversity", "marking", "row")}
                for k in ("patient", "lesion"):
                    meta[k] = np.asarray([x.decode() if isinstance(x, bytes) else str(x) for x in f[k][...]],
                                         dtype=object)
            self._meta = meta
        return self._meta

    def bits(self, i: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crop ``i`` as stored: image (T, T), grader bits (T, T), hypothesis bits (R, T, T, B)."""
        if not 0 <= i < self._len:
            raise IndexError(i)
        image, graders, hyp = self.block(i, i + 1)
        return image[0], graders[0], hyp[0]

    def block(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Crops ``start:stop`` as stored (one read per dataset): image (b, T, T), grader bits
        (b, T, T), hypothesis bits (b, R, T, T, B)."""
        with self._reading(f"cases {start}..{stop - 1}"):
            f = self._h5()
            return f["image"][start:stop], f["graders"][start:stop], f["hypotheses"][start:stop]

    def __getitem__(self, i: int) -> Case:
        return self.unpack(*self.bits(i))

    def unpack(self, image: np.ndarray, graders: np.ndarray, hyp: np.ndarray) -> Case:
        """A :class:`Case` from one crop's :meth:`bits`."""
        g = unpack_bits(graders[..., None], self.n_graders)
        return Case(image, g, [unpack_bits(hyp[r], run["count"]) for r, run in enumerate(self.runs)])

    def __enter__(self) -> CasesStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_info(folder: str | Path, info: Mapping[str, Any]) -> Path:
    """Write ``cases.json`` (format, version and ``info``) atomically."""
    from lidcseg.io.atomic import write_json_atomic

    path = Path(folder) / CASES_JSON
    write_json_atomic(path, {"format": FORMAT_NAME, "version": FORMAT_VERSION, **info})
    return path
