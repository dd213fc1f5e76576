"""NIfTI and DICOM reading/writing: scan geometry, deterministic NIfTI files, a valid DICOM SEG."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from lidcseg.errors import LidcsegError
from lidcseg.io.dicom_seg import sanitize_text, write_frequency_seg, write_hypotheses_seg
from lidcseg.io.nifti import RAS_TO_LPS, make_header, read_nifti, write_nifti, write_nifti_volumes
from lidcseg.io.scan import read_scan

FAULT_PATIENT = "LIDC-IDRI-0957"


def dciodvfy_errors(path: Path) -> list[str]:
    """The "Error" lines of dciodvfy (dicom3tools) about ``path``."""
    proc = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=120)
    return [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]


needs_dciodvfy = pytest.mark.skipif(
    shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)"
)


@pytest.fixture(scope="module")
def series_dir(fault_root) -> Path:
    """The phantom DICOM series of LIDC-IDRI-0957 (65 slices)."""
    return next((fault_root("") / FAULT_PATIENT).glob("*/*"))


# -- NIfTI --------------------------------------------------------------------------------------


def test_read_nifti_refuses_bad_files(tmp_path: Path) -> None:
    junk = tmp_path / "junk.nii.gz"
    junk.write_text("not an image")
    with pytest.raises(LidcsegError, match="not a readable NIfTI"):
        read_nifti(junk)
    flat = tmp_path / "flat.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5), np.int16), np.eye(4)), flat)
    with pytest.raises(LidcsegError, match="3-D"):
        read_nifti(flat)
    four = tmp_path / "four.nii"
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.int16), np.eye(4)), four)
    with pytest.raises(LidcsegError, match="3-D"):
        read_nifti(four)
    nan = tmp_path / "nan.nii"
    data = np.zeros((4, 5, 6), np.float32)
    data[1, 2, 3] = np.nan
    nib.save(nib.Nifti1Image(data, np.eye(4)), nan)
    with pytest.raises(LidcsegError, match="1 NaN"):
        read_nifti(nan)


def test_streamed_4d_nifti_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    data = (rng.random((5, 6, 7, 3)) > 0.5).astype(np.uint8)
    affine = np.array([[0, -0.7, 0, 10], [0.8, 0, 0, -5], [0, 0, 2.5, 3], [0, 0, 0, 1]], float)
    hdr = make_header(data.shape, np.uint8, affine)
    write_nifti_volumes(tmp_path / "a.nii.gz", hdr, (data[..., t] for t in range(3)))
    write_nifti_volumes(tmp_path / "b.nii.gz", make_header(data.shape, np.uint8, affine),
                        (data[..., t] for t in range(3)))
    img = nib.load(tmp_path / "a.nii.gz")
    assert img.shape == data.shape and img.get_data_dtype() == np.uint8
    np.testing.assert_array_equal(np.asarray(img.dataobj), data)
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    assert (tmp_path / "a.nii.gz").read_bytes() == (tmp_path / "b.nii.gz").read_bytes()
    with pytest.raises(ValueError):
        write_nifti_volumes(tmp_path / "c.nii.gz", hdr, [data[..., 0]])
    assert not (tmp_path / "c.nii.gz").exists()


def _random_orientation_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI whose voxel axes are permuted and flipped against RAS; returns (data, affine)."""
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 400, size=(9, 7, 5)).astype(np.int16)
    affine = np.zeros((4, 4))
    affine[1, 0] = -0.9  # i runs towards posterior (RAS y decreasing)
    affine[0, 1] = 0.7  # j runs towards the patient's right... in RAS: +x
    affine[2, 2] = -2.5  # k runs downwards
    affine[:3, 3] = [-12.0, 40.0, 60.0]
    affine[3, 3] = 1.0
    nib.save(nib.Nifti1Image(data, affine), path)
    return data, affine


def test_scan_canonical_order_matches_the_affine(tmp_path: Path) -> None:
    data, affine = _random_orientation_nifti(tmp_path / "s.nii.gz")
    scan = read_scan(tmp_path / "s.nii.gz")
    assert scan.kind == "nifti" and scan.input_shape == data.shape
    assert scan.shape == (5, 9, 7)  # (z, y, x)
    assert np.all(np.diff(scan.z) > 0)
    lps = RAS_TO_LPS @ affine
    for ijk in [(0, 0, 0), (8, 6, 4), (3, 2, 1), (5, 0, 3)]:
        krc = scan.input_to_canonical(ijk)
        np.testing.assert_allclose(scan.canonical_to_world(krc), (lps @ [*ijk, 1])[:3], atol=1e-6)
        np.testing.assert_allclose(scan.world_to_canonical((lps @ [*ijk, 1])[:3]), krc, atol=1e-6)
        np.testing.assert_allclose(scan.canonical_to_input(krc), ijk)
        k, r, c = (int(v) for v in krc)
        assert scan.slice_hu(k)[r, c] == data[ijk]
    canon = np.arange(np.prod(scan.shape)).reshape(scan.shape)
    np.testing.assert_array_equal(scan.to_canonical(scan.to_input(canon)), canon)


def test_oblique_nifti_is_refused(tmp_path: Path) -> None:
    theta = np.deg2rad(10)
    affine = np.eye(4)
    affine[:2, :2] = [[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]]
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), affine), tmp_path / "o.nii")
    with pytest.raises(LidcsegError, match="oblique"):
        read_scan(tmp_path / "o.nii")


def test_not_a_scan(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(LidcsegError, match="not a scan"):
        read_scan(tmp_path / "notes.txt")
    with pytest.raises(LidcsegError, match="notes.txt: not a readable DICOM file"):
        read_scan(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LidcsegError, match="no DICOM files"):
        read_scan(tmp_path / "empty")


def test_nifti_writer_keeps_the_affine(tmp_path: Path) -> None:
    data, affine = _random_orientation_nifti(tmp_path / "s.nii.gz")
    write_nifti(tmp_path / "f.nii.gz", data.astype(np.float32), make_header(data.shape, np.float32, affine))
    img = nib.load(tmp_path / "f.nii.gz")
    np.testing.assert_allclose(img.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(img.get_fdata(), data)


# -- DICOM ----------------------------------------------------------------------------------------


def test_dicom_scan_in_hu_sorted_by_z(series_dir: Path) -> None:
    scan = read_scan(series_dir)
    assert scan.kind == "dicom" and scan.shape == (65, 512, 512)
    assert scan.input_shape == (512, 512, 65)
    assert np.all(np.diff(scan.z) > 0)
    ds = pydicom.dcmread(scan.files[10])
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(scan.slice_hu(10), hu)
    assert float(ds.ImagePositionPatient[2]) == scan.z[10]
    # Output affine: input order (column, row, slice) in RAS.
    ijk = np.array([100, 200, 10, 1.0])
    lps = RAS_TO_LPS @ scan.affine_ras @ ijk
    ipp = np.array([float(v) for v in ds.ImagePositionPatient])
    sp = [float(v) for v in ds.PixelSpacing]
    np.testing.assert_allclose(lps[:3], ipp + [100 * sp[1], 200 * sp[0], 0], atol=1e-6)


@pytest.mark.parametrize(
    "value, vr, expected",
    [
        ("../../evil", "LO", "../../evil"),
        ("a\\b\nc\x00d", "LO", "a b c d"),
        ("x" * 100, "SH", "x" * 16),
        ("x" * 100, "LO", "x" * 64),
        ("Doe^John=" + "y" * 80, "PN", "Doe^John=" + "y" * 64),
        ("seg-label!", "CS", "SEG_LABEL_"),
    ],
)
def test_sanitize_text(value: str, vr: str, expected: str) -> None:
    assert sanitize_text(value, vr) == expected


def _evil_copy(series_dir: Path, dest: Path, count: int) -> list[Path]:
    """``count`` slices of the series with hostile patient/series tags (too long, path-like)."""
    dest.mkdir(parents=True)
    files = []
    for i, src in enumerate(sorted(series_dir.glob("*.dcm"))[:count]):
        ds = pydicom.dcmread(src)
        ds.PatientID = "../../evil"
        ds.PatientName = "../" * 30 + "evil"
        ds.SeriesDescription = "../../" + "D" * 120 + "\\x"
        ds.AccessionNumber = "A" * 30
        files.append(dest / f"{i}.dcm")
        ds.save_as(files[-1])
    return files


@needs_dciodvfy
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_seg_passes_dciodvfy_with_hostile_tags(series_dir: Path, tmp_path: Path) -> None:
    files = _evil_copy(series_dir, tmp_path / "evil", 4)
    masks = np.zeros((4, 512, 512, 3), bool)
    masks[1:3, 200:220, 250:260, 0] = True
    masks[2, 200:230, 240:260, 2] = True
    out = tmp_path / "o" / "h.seg.dcm"
    write_hypotheses_seg(out, files, masks, uid_parts=["x", 1], algorithm_name="lidcseg test",
                         algorithm_version="0.1.0", description="../../" + "S" * 100)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["h.seg.dcm"]
    assert dciodvfy_errors(out) == []
    seg = pydicom.dcmread(out)
    assert seg.Modality == "SEG" and len(seg.SegmentSequence) == 3
    assert len(str(seg.PatientName)) <= 64 and len(seg.AccessionNumber) <= 16
    assert seg.PatientID == "../../evil"  # kept as a value, never used as a name
    assert len(seg.SeriesDescription) <= 64
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == pydicom.dcmread(files[0]).SeriesInstanceUID
    # The same parts give the same UIDs.
    write_hypotheses_seg(tmp_path / "again.dcm", files, masks, uid_parts=["x", 1],
                         algorithm_name="lidcseg test", algorithm_version="0.1.0")
    again = pydicom.dcmread(tmp_path / "again.dcm")
    assert again.SOPInstanceUID == seg.SOPInstanceUID and again.SeriesInstanceUID == seg.SeriesInstanceUID


SENTINEL = "SENTINELTAG"


def _sentinel_copy(series_dir: Path, dest: Path, count: int) -> list[Path]:
    """``count`` slices whose patient, study and series text tags all carry :data:`SENTINEL`."""
    files = _evil_copy(series_dir, dest, count)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientName = f"{SENTINEL}^Name"
        ds.SeriesDescription = f"{SENTINEL} series"
        ds.StudyDescription = f"{SENTINEL} study"
        ds.ProtocolName = SENTINEL
        ds.save_as(f)
    return files


def _segment_text(seg: pydicom.Dataset) -> str:
    """Every value in the Segment Sequence, the series description and the content texts."""
    text = [str(seg.SeriesDescription), str(seg.ContentLabel), str(seg.ContentDescription)]
    for item in seg.SegmentSequence:
        text.extend(str(elem.value) for elem in item.iterall() if elem.VR != "SQ")
    return "\n".join(text)


@needs_dciodvfy
@pytest.mark.filterwarnings("ignore::UserWarning")
def test_frequency_seg_is_fractional_valid_and_reads_back(series_dir: Path, tmp_path: Path) -> None:
    import highdicom as hd

    files = _sentinel_copy(series_dir, tmp_path / "src", 3)
    n = 7  # k / 7 is no multiple of 1 / 255: the stored values are rounded
    rng = np.random.default_rng(0)
    freq = np.zeros((3, 512, 512), np.float32)
    freq[0, 200:230, 240:270] = rng.integers(0, n + 1, (30, 30)) / n
    freq[2, 100:104, 100:103] = 1.0  # frame 1 stays empty (highdicom omits it)
    about = "lidcseg probunet, run myrun, checkpoint best, seed 3"
    out = tmp_path / "o" / "f.seg.dcm"
    kw = dict(uid_parts=["x", 1], algorithm_name="lidcseg probunet", algorithm_version="0.1.0", about=about)
    write_frequency_seg(out, files, freq, n=n, description=f"lidcseg frequency of {n} hypotheses", **kw)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["f.seg.dcm"]
    assert dciodvfy_errors(out) == []
    ds = pydicom.dcmread(out)
    assert ds.Modality == "SEG" and ds.SegmentationType == "FRACTIONAL"
    assert ds.SegmentationFractionalType == "PROBABILITY" and ds.MaximumFractionalValue == 255
    assert ds.BitsAllocated == 8 and len(ds.SegmentSequence) == 1
    src = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert ds.FrameOfReferenceUID == src.FrameOfReferenceUID and ds.SeriesInstanceUID != src.SeriesInstanceUID
    item = ds.SegmentSequence[0]
    assert item.SegmentLabel == "lesion probability"
    assert item.SegmentDescription == f"{about}: share of 7 hypotheses marking a lesion"
    assert SENTINEL not in _segment_text(ds)
    # Read back: the frequency within half a step of 1/255 (highdicom rescales to [0, 1]).
    seg = hd.seg.segread(out)
    uids = [str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files]
    back = seg.get_pixels_by_source_instance(uids, segment_numbers=[1], rescale_fractional=True)
    assert back.shape == (3, 512, 512, 1)
    assert np.abs(back[..., 0] - freq).max() <= 0.5 / 255 + 1e-6
    np.testing.assert_array_equal(back[..., 0] > 0, freq > 0)
    # Beside the BINARY SEG of the same inputs: its own UIDs, series number and labels.
    masks = np.zeros((3, 512, 512, 2), bool)
    masks[0, 200:210, 240:250, 1] = True
    write_hypotheses_seg(tmp_path / "h.seg.dcm", files, masks, description="lidcseg 2 hypotheses", **kw)
    hyp = pydicom.dcmread(tmp_path / "h.seg.dcm")
    assert hyp.SeriesInstanceUID != ds.SeriesInstanceUID and hyp.SOPInstanceUID != ds.SOPInstanceUID
    assert (hyp.SeriesNumber, ds.SeriesNumber) == (900, 901)
    assert [s.SegmentLabel for s in hyp.SegmentSequence] == ["hypothesis 1 of 2", "hypothesis 2 of 2"]
    assert hyp.SegmentSequence[1].SegmentDescription == f"{about}: hypothesis 2 of 2"
    assert SENTINEL not in _segment_text(hyp)


def test_frequency_seg_refuses_bad_values(series_dir: Path, tmp_path: Path) -> None:
    files = sorted(series_dir.glob("*.dcm"))[:2]
    kw = dict(n=2, uid_parts=[1], algorithm_name="a", algorithm_version="b")
    good = np.zeros((2, 512, 512), np.float32)
    for bad, match in [(good[:1], "F = 2"), (good + 1.5, r"\[0, 1\]"), (good * np.nan, r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=match):
            write_frequency_seg(tmp_path / "f.dcm", files, bad, **kw)
    with pytest.raises(ValueError, match="1 to 255"):
        write_frequency_seg(tmp_path / "f.dcm", files, good, max_fractional_value=256, **kw)
    assert not list(tmp_path.iterdir())
