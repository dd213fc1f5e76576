"""DICOM and NIfTI headers: every value the readers use is checked once, where the file is read.

DICOM (:func:`lidcseg.io.dicom.read_header`, used by ``prepare`` and by ``sample``):
geometry tags that are not finite or have the wrong number of values, pixel spacing that
is not > 0, a transfer syntax SimpleITK cannot decode, an image that is not one grey
frame, a RescaleSlope of 0, pixel data the header does not describe. NIfTI
(:func:`lidcseg.io.nifti.read_nifti`, ``sample``): voxels that are not real numbers,
voxel sizes that are zero, negative or in metres, a shape memory cannot hold.

Each hostile series is the phantom series of ``fault_root("")`` linked file by file into
tmp_path, with one file replaced by a patched copy; the phantom stays unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import UID

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.scan import read_scan
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model
from tests.bad_input.conftest import cli, refused
from tests.conftest import FAULT_PATIENT

pytestmark = pytest.mark.filterwarnings("ignore:Invalid value for VR DS")

TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2, fcomb_channels=4,
                   fcomb_layers=1)
#: The file every case patches (the 10th slice of the phantom series).
VICTIM = "1-010.dcm"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny untrained run (never reached: the scan is refused first)."""
    root = tmp_path_factory.mktemp("run") / "run"
    train = to_dict(TrainConfig(input_size=64))
    save_checkpoint(root / "best", create_model(TINY), meta={"step": 0, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(TINY), "train": train, "data": {"crop_size": 180}})
    return root


def linked_tree(src_root: Path, dst_root: Path) -> Path:
    """``dst_root`` mirrors ``src_root``: the same folders, every file a symbolic link."""
    for p in sorted(src_root.rglob("*")):
        q = dst_root / p.relative_to(src_root)
        if p.is_dir():
            q.mkdir(parents=True, exist_ok=True)
        else:
            q.parent.mkdir(parents=True, exist_ok=True)
            q.symlink_to(p)
    return dst_root


def patch(file: Path, change: Callable[[pydicom.Dataset], None], **write: object) -> Path:
    """Replace the link ``file`` by a patched copy of what it points to (the original stays)."""
    ds = pydicom.dcmread(file.resolve())
    file.unlink()
    change(ds)
    pydicom.dcmwrite(file, ds, **write)
    return file


def series_of(root: Path) -> Path:
    return next((root / FAULT_PATIENT).glob("*/*"))


def setter(**values: object) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        for k, v in values.items():
            setattr(ds, k, v)
    return change


def ts(uid: str, encapsulated: bool = True) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        ds.file_meta.TransferSyntaxUID = UID(uid)
        if encapsulated:
            ds.PixelData = encapsulate([b"\x00" * 64])
    return change


def delete(keyword: str) -> Callable[[pydicom.Dataset], None]:
    def change(ds: pydicom.Dataset) -> None:
        delattr(ds, keyword)
    return change


NAN, INF = "nan", "inf"
CASES = {
    "position-nan": (setter(ImagePositionPatient=[NAN, 0, 0]), ["ImagePositionPatient (0020,0032)", "non-finite"]),
    "position-inf": (setter(ImagePositionPatient=[0, 0, INF]), ["ImagePositionPatient", "non-finite"]),
    "position-2-values": (setter(ImagePositionPatient=[0, 0]), ["ImagePositionPatient", "expected 3"]),
    "orientation-5-values": (setter(ImageOrientationPatient=[1, 0, 0, 0, 1]),
                             ["ImageOrientationPatient (0020,0037)", "expected 6"]),
    "orientation-nan": (setter(ImageOrientationPatient=[1, 0, 0, 0, NAN, 0]), ["ImageOrientationPatient", "non-finite"]),
    "spacing-zero": (setter(PixelSpacing=[0, 0]), ["PixelSpacing (0028,0030)", "(0, 100] mm"]),
    "spacing-negative": (setter(PixelSpacing=[-0.7, -0.7]), ["PixelSpacing", "-0.7"]),
    "spacing-1-value": (setter(PixelSpacing=[0.7]), ["PixelSpacing", "expected 2"]),
    "spacing-missing": (delete("PixelSpacing"), ["missing", "PixelSpacing"]),
    "slope-zero": (setter(RescaleSlope=0), ["RescaleSlope (0028,1053) = 0"]),
    "intercept-inf": (setter(RescaleIntercept=INF), ["RescaleIntercept", "non-finite"]),
    "multi-frame": (setter(NumberOfFrames=2), ["NumberOfFrames (0028,0008) = 2", "multi-frame"]),
    "rows-zero": (setter(Rows=0), ["Rows (0028,0010) = 0"]),
    "rgb": (setter(PhotometricInterpretation="RGB"), ["not a grey CT image", "'RGB'"]),
    "bits-12": (setter(BitsAllocated=12), ["BitsAllocated", "12"]),
    "pixels-not-described": (setter(BitsAllocated=8, BitsStored=8, HighBit=7), ["Pixel Data holds 524288 bytes"]),
    "syntax-unknown": (ts("1.2.3.4.5"), ["transfer syntax 1.2.3.4.5 (unknown)", "gdcmconv"]),
    "syntax-mpeg2": (ts("1.2.840.10008.1.2.4.100"), ["1.2.840.10008.1.2.4.100 (MPEG2"]),
    "syntax-htj2k": (ts("1.2.840.10008.1.2.4.201"), ["High-Throughput JPEG 2000"]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sample_refuses_a_bad_dicom_header(case: str, fault_root, run_dir: Path, tmp_path: Path, unchanged) -> None:
    change, needles = CASES[case]
    phantom = fault_root("")
    series = series_of(linked_tree(phantom, tmp_path / "lidc"))
    victim = patch(series / VICTIM, change)
    out = tmp_path / "out"
    with unchanged(phantom, run_dir):
        result = cli("sample", series, "--run", run_dir, "--out", out, "--at-voxel", "256,256,30")
    refused(result, str(victim), *needles)
    assert not out.exists()


@pytest.mark.parametrize("case", ["position-nan", "slope-zero", "multi-frame", "syntax-unknown"])
def test_prepare_refuses_a_bad_dicom_header(case: str, fault_root, tmp_path: Path, unchanged) -> None:
    """The same reader in prepare: the scan is skipped with that line; --strict makes it fatal."""
    change, needles = CASES[case]
    phantom = fault_root("")
    root = linked_tree(phantom, tmp_path / "lidc")
    victim = patch(series_of(root) / VICTIM, change)
    with unchanged(phantom):
        result = cli("prepare", "--lidc-root", root, "--out", tmp_path / "data", "--strict")
    refused(result, FAULT_PATIENT, str(victim), *needles)
    assert not (tmp_path / "data" / "manifest.json").exists()


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.5", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2"])
def test_decodable_transfer_syntaxes_are_read(syntax: str, fault_root, tmp_path: Path) -> None:
    """RLE, deflated and implicit-VR slices read to the same HU as the original."""
    phantom = fault_root("")
    series = series_of(linked_tree(phantom, tmp_path / "lidc"))

    def change(ds: pydicom.Dataset) -> None:
        if syntax == "1.2.840.10008.1.2.5":
            ds.compress(syntax)
        else:
            ds.file_meta.TransferSyntaxUID = UID(syntax)

    patch(series / VICTIM, change, implicit_vr=syntax == "1.2.840.10008.1.2")
    original = read_scan(series_of(phantom))
    scan = read_scan(series)
    k = [f.name for f in scan.files].index(VICTIM)
    np.testing.assert_array_equal(scan.slice_hu(k), original.slice_hu(k))


def test_header_values_are_not_silently_repaired(fault_root, tmp_path: Path) -> None:
    """The checked values reach the geometry unchanged (spacing, position, slope)."""
    phantom = fault_root("")
    series = series_of(linked_tree(phantom, tmp_path / "lidc"))
    patch(series / VICTIM, setter(RescaleSlope=2, RescaleIntercept=-2048))
    original, scan = read_scan(series_of(phantom)), read_scan(series)
    k = [f.name for f in scan.files].index(VICTIM)
    raw = original.slice_hu(k) + 1024  # the phantom's stored values, slope 1, intercept -1024
    np.testing.assert_allclose(scan.slice_hu(k), 2 * raw - 2048)
    assert scan.spacing_xy == original.spacing_xy and math.isclose(scan.z[0], original.z[0])


# -- NIfTI ------------------------------------------------------------------------------------


def nifti(path: Path, data: np.ndarray, affine: np.ndarray | None = np.eye(4), **header: object) -> Path:
    img = nib.Nifti1Image(data, affine)
    for k, v in header.items():
        img.header[k] = v
    nib.save(img, path)
    return path


def raw_pixdim(path: Path, pixdim: list[float], sform_code: int = 0) -> Path:
    """Write ``pixdim[1:4]`` (and sform_code) into an uncompressed NIfTI-1 file as given."""
    raw = bytearray(path.read_bytes())
    pd = np.frombuffer(bytes(raw[76:108]), np.float32).copy()
    pd[1:4] = pixdim
    raw[76:108] = pd.tobytes()
    raw[254:256] = np.int16(sform_code).tobytes()
    path.write_bytes(bytes(raw))
    return path


def raw_dims(path: Path, dims: list[int]) -> Path:
    raw = bytearray(path.read_bytes())
    dim = np.frombuffer(bytes(raw[40:56]), np.int16).copy()
    dim[1 : 1 + len(dims)] = dims
    raw[40:56] = dim.tobytes()
    path.write_bytes(bytes(raw))
    return path


def no_sform(path: Path) -> Path:
    img = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), np.eye(4))
    img.header.set_sform(None, code=0)
    img.header.set_qform(np.eye(4), code=1)
    nib.save(img, path)
    return path


NIFTI_CASES = {
    "complex": (lambda p: nifti(p, np.zeros((8, 8, 4), np.complex64)), ["voxel type complex64"]),
    "rgb": (lambda p: nifti(p, np.zeros((8, 8, 4), [("R", "u1"), ("G", "u1"), ("B", "u1")])),
            ["is not real numbers"]),
    "pixdim-zero": (lambda p: raw_pixdim(no_sform(p), [0, 1, 1]), ["pixdim[1:4] = [0.0, 1.0, 1.0]"]),
    "pixdim-negative": (lambda p: raw_pixdim(no_sform(p), [-1, 1, 2]), ["pixdim", "-1.0"]),
    "metres": (lambda p: nifti(p, np.zeros((8, 8, 4), np.int16), xyzt_units=1), ["spatial unit is meter"]),
    "huge-shape": (lambda p: raw_dims(nifti(p, np.zeros((8, 8, 4), np.int16)), [30000, 30000, 30000]),
                   ["30000 x 30000 x 30000 voxels", "memory"]),
    "voxel-1e30-mm": (lambda p: nifti(p, np.zeros((8, 8, 4), np.int16), np.diag([1e30, 1e30, 1e30, 1.0])),
                      ["voxel size 1e+30", "100 mm"]),
    "5-d": (lambda p: nifti(p, np.zeros((8, 8, 4, 1, 2), np.int16)), ["3-D volume"]),
}


@pytest.mark.parametrize("case", list(NIFTI_CASES))
def test_sample_refuses_a_bad_nifti_header(case: str, run_dir: Path, tmp_path: Path, unchanged) -> None:
    make, needles = NIFTI_CASES[case]
    scan = make(tmp_path / "scan.nii")
    out = tmp_path / "out"
    with unchanged(scan, run_dir):
        result = cli("sample", scan, "--run", run_dir, "--out", out, "--at-voxel", "4,4,2")
    refused(result, str(scan), *needles)
    assert not out.exists()
