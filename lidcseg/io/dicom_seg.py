"""Hypotheses as DICOM Segmentations (highdicom): two instances, as a SEG has one type.

- :func:`write_hypotheses_seg`: BINARY, one segment per hypothesis;
- :func:`write_frequency_seg`: FRACTIONAL (PROBABILITY), one segment, the share of
  hypotheses marking each pixel (its own file: viewers that reject fractional SEGs,
  as OHIF long has, still open the binary one).

Segment labels and descriptions are built from the caller's own values (model,
run, n, hypothesis index), never from the input's tags.

The SEG references the CT images it was computed on (highdicom's
``source_images``: the headers of the source series' DICOM files) and copies
their patient and study attributes, as DICOM requires. Those copied strings
come from outside; they are only ever *values* in the SEG, never file names,
and are made safe for their value representation first: control characters
and backslashes removed, truncated to the VR's maximum length (LO 64, SH 16,
PN 64 per component group, CS 16, ...). Type 2 attributes the source lacks
(Patient's Birth Date, Study ID, ...) are added empty, as the standard allows.

UIDs are derived from the caller's ``uid_parts`` (e.g. the source series UID,
the checkpoint digest, the seed and the options), so the same inputs give the
same SeriesInstanceUID and SOPInstanceUID. ContentDate/ContentTime are the
time of writing, as the standard means them.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_path

#: Maximum value length (characters) per string VR (DICOM PS3.5 Table 6.2-1).
VR_MAX_LENGTH: dict[str, int] = {
    "AE": 16, "AS": 4, "CS": 16, "DA": 8, "DS": 16, "DT": 26, "IS": 12, "LO": 64,
    "LT": 10240, "PN": 64, "SH": 16, "ST": 1024, "TM": 14, "UC": 1024, "UI": 64,
}
#: Type 2 attributes of the patient and study modules highdicom copies from the source.
TYPE2_COPIED = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber",
    "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName",
)
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_DATE = re.compile(r"^\d{8}$")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def sanitize_text(value: Any, vr: str) -> str:
    """A string safe for ``vr``: no control characters or backslashes, at most the VR's length.

    ``PN`` keeps its ``^`` and ``=`` separators and limits each component group to 64.
    """
    text = _CONTROL.sub(" ", str(value)).strip()
    if vr == "PN":
        return "=".join(g[:64].rstrip() for g in text.split("=")[:3])
    if vr == "CS":
        text = re.sub(r"[^A-Z0-9 _]", "_", text.upper())
    limit = VR_MAX_LENGTH.get(vr)
    return text[:limit].rstrip() if limit else text


def _sanitize_dataset(ds: Any) -> None:
    """Make every top-level single-valued text element of ``ds`` safe for its VR, in place."""
    for elem in ds:
        if elem.VR in ("SQ", "UI") or elem.VR not in VR_MAX_LENGTH or elem.value is None:
            continue
        if elem.VM > 1 or elem.value == "":
            continue
        if elem.VR == "DA" and not _DATE.match(str(elem.value)):
            elem.value = ""
        elif elem.VR == "TM" and not _TIME.match(str(elem.value)):
            elem.value = ""
        elif elem.VR in ("LO", "SH", "PN", "CS", "LT", "ST", "UC"):
            elem.value = sanitize_text(elem.value, elem.VR)


def read_source_headers(files: Sequence[Path]) -> list[Any]:
    """The headers (no pixel data) of ``files``, made fit to be SEG source images.

    Missing Type 2 patient/study attributes are added empty; copied strings are
    sanitised (module docstring).
    """
    import pydicom

    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the very values we sanitise
        for path in files:
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except (pydicom.errors.InvalidDicomError, OSError, EOFError, ValueError) as e:
                raise LidcsegError(f"not a readable DICOM file ({type(e).__name__})", path) from None
            for kw in TYPE2_COPIED:
                if kw not in ds or ds[kw].value is None:
                    setattr(ds, kw, "")
            _sanitize_dataset(ds)
            out.append(ds)
    return out


#: Most segments of a SEG: Segment Number is an unsigned 16-bit value.
MAX_SEGMENTS = 65535
#: Most bytes of native Pixel Data: its length is a 32-bit value.
MAX_PIXEL_DATA_BYTES = 0xFFFFFFFE
#: The default Maximum Fractional Value of the probability SEG: 8-bit values, steps of 1/255.
MAX_FRACTIONAL_VALUE = 255


def check_seg_size(pixels: int, segments: int, bits: int = 1) -> None:
    """Refuse a SEG of more than :data:`MAX_SEGMENTS` segments, or whose frames
    (``pixels`` = source frames x rows x columns per segment, all frames at most;
    ``bits`` per pixel: 1 for BINARY, bit-packed, 8 for FRACTIONAL) exceed
    :data:`MAX_PIXEL_DATA_BYTES`."""
    if not 1 <= segments <= MAX_SEGMENTS:
        raise LidcsegError(f"-n {segments}: a DICOM SEG holds 1 to {MAX_SEGMENTS} segments (hypotheses)")
    size = -(-pixels * segments * bits // 8)
    if size > MAX_PIXEL_DATA_BYTES:
        raise LidcsegError(
            f"-n {segments}: {segments} segments of {pixels} pixels each make {size} bytes of SEG pixel "
            f"data, more than the {MAX_PIXEL_DATA_BYTES} a DICOM file can hold; lower -n"
        )


def uid_from(*parts: object) -> str:
    """A deterministic DICOM UID from ``parts`` (pydicom's root and a hash of the parts)."""
    from pydicom.uid import generate_uid

    return str(generate_uid(entropy_srcs=[str(p) for p in parts]))


def _segment(number: int, label: str, description: str, algo: Any) -> Any:
    """One nodule segment, labelled (LO) and described (ST) from the caller's own values."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    seg = hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=sanitize_text(label, "LO"),
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Nodule,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algo,
    )
    seg.SegmentDescription = sanitize_text(description, "ST")  # (0062,0006), Type 3
    return seg


def _write_seg(
    path: str | Path,
    source_files: Sequence[Path],
    pixel_array: np.ndarray,
    segments: Sequence[tuple[str, str]],
    *,
    uid_parts: Sequence[object],
    algorithm_name: str,
    algorithm_version: str,
    series_number: int,
    description: str,
    content_label: str,
    content_description: str,
    **seg_type: Any,
) -> None:
    """Build one SEG on ``source_files`` with ``segments`` (label, description) and write it atomically.

    ``seg_type`` holds highdicom's ``segmentation_type`` (and, for FRACTIONAL, its
    ``fractional_type`` and ``max_fractional_value``); the UIDs come from ``uid_parts`` as
    given (each writer makes its kind's own).
    """
    import highdicom as hd
    from pydicom.sr.codedict import codes

    sources = read_source_headers(source_files)
    algo = hd.AlgorithmIdentificationSequence(
        name=sanitize_text(algorithm_name, "LO"),
        version=sanitize_text(algorithm_version, "LO"),
        family=codes.DCM.ArtificialIntelligence,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # single-component PatientName, all-empty frames
        seg = hd.seg.Segmentation(
            source_images=sources,
            pixel_array=pixel_array,
            segment_descriptions=[_segment(i, *s, algo) for i, s in enumerate(segments, 1)],
            series_instance_uid=uid_from("series", *uid_parts),
            series_number=series_number,
            sop_instance_uid=uid_from("sop", *uid_parts),
            instance_number=1,
            manufacturer="lidcseg",
            manufacturer_model_name=sanitize_text(algorithm_name, "LO"),
            software_versions=sanitize_text(algorithm_version, "LO"),
            device_serial_number="0",
            series_description=sanitize_text(description, "LO"),
            content_label=sanitize_text(content_label, "CS"),
            content_description=sanitize_text(content_description, "LO"),
            **seg_type,
        )
    _sanitize_dataset(seg)
    with atomic_path(path) as tmp:
        seg.save_as(tmp)


def write_hypotheses_seg(
    path: str | Path,
    source_files: Sequence[Path],
    masks: np.ndarray,
    *,
    uid_parts: Sequence[object],
    algorithm_name: str,
    algorithm_version: str,
    description: str = "",
    about: str = "",
) -> None:
    """Write ``n`` hypotheses as one BINARY DICOM SEG with one segment per hypothesis.

    Segment ``k`` is labelled ``hypothesis k of n`` and described ``"{about}: hypothesis k of n"``.

    Args:
        path: the output file (written atomically).
        source_files: the ``F`` CT images the frames belong to (one frame each).
        masks: ``(F, R, C, n)`` bool, frame ``f`` on ``source_files[f]``'s pixel grid
            (row, column as in its Pixel Data).
        uid_parts: what the SEG's UIDs are derived from (the same parts, the same UIDs).
        algorithm_name, algorithm_version: the Algorithm Identification (e.g. ``lidcseg probunet``).
        description: SeriesDescription (sanitised and truncated to 64 characters).
        about: what made the hypotheses (model, run), from the caller's own values, never
            from the input's tags; it opens each Segment Description (ST, 1024 characters).

    Raises:
        LidcsegError: an unreadable source file, or more segments or pixel data than a SEG
            holds (:func:`check_seg_size`); ValueError: masks of the wrong shape.
    """
    import highdicom as hd

    if masks.ndim != 4 or masks.shape[0] != len(source_files):
        raise ValueError(f"masks must be (F, R, C, n) with F = {len(source_files)}, got {masks.shape}")
    check_seg_size(int(np.prod(masks.shape[:3])), masks.shape[3])
    n = masks.shape[3]
    lead = f"{about}: " if about else ""
    segments = [(f"hypothesis {k} of {n}", f"{lead}hypothesis {k} of {n}") for k in range(1, n + 1)]
    _write_seg(
        path, source_files, np.ascontiguousarray(masks, dtype=bool), segments,
        uid_parts=uid_parts, algorithm_name=algorithm_name, algorithm_version=algorithm_version,
        series_number=900, description=description, content_label="HYPOTHESES",
        content_description=f"{n} segmentation hypotheses",
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
    )


def write_frequency_seg(
    path: str | Path,
    source_files: Sequence[Path],
    frequency: np.ndarray,
    *,
    n: int,
    uid_parts: Sequence[object],
    algorithm_name: str,
    algorithm_version: str,
    description: str = "",
    about: str = "",
    max_fractional_value: int = MAX_FRACTIONAL_VALUE,
) -> None:
    """Write the hypotheses' frequency map as one FRACTIONAL (PROBABILITY) DICOM SEG, one segment.

    A SEG has one Segmentation Type, so the frequency lives in an instance of its own,
    beside the BINARY hypotheses (:func:`write_hypotheses_seg`): same source series and
    frame of reference, its own series (number 901) and UIDs. The segment is labelled
    ``lesion probability`` and described ``"{about}: share of n hypotheses marking a
    lesion"``. Stored values are ``round(frequency * max_fractional_value)``, so a
    reader gets the frequency back within ``1 / (2 * max_fractional_value)``.

    Args:
        path: the output file (written atomically).
        source_files: the ``F`` CT images the frames belong to (one frame each).
        frequency: ``(F, R, C)`` float in [0, 1], the share of hypotheses containing each pixel.
        n: how many hypotheses the frequency is over (named in the description).
        uid_parts: as :func:`write_hypotheses_seg` (the UIDs differ from its: they also
            derive from this SEG's content label).
        algorithm_name, algorithm_version, description, about: as :func:`write_hypotheses_seg`.
        max_fractional_value: 1 to 255, the stored value that means probability 1.

    Raises:
        LidcsegError: an unreadable source file or too much pixel data; ValueError: a frequency
            of the wrong shape or outside [0, 1], or a max_fractional_value outside 1..255.
    """
    import highdicom as hd

    if frequency.ndim != 3 or frequency.shape[0] != len(source_files):
        raise ValueError(f"frequency must be (F, R, C) with F = {len(source_files)}, got {frequency.shape}")
    if not np.all((frequency >= 0) & (frequency <= 1)):  # NaN fails too
        raise ValueError("frequency must lie in [0, 1]")
    if not 1 <= max_fractional_value <= 255:
        raise ValueError(f"max_fractional_value must be 1 to 255 (8-bit frames), got {max_fractional_value}")
    check_seg_size(int(np.prod(frequency.shape)), 1, bits=8)
    lead = f"{about}: " if about else ""
    share = f"share of {n} hypotheses marking a lesion" if n != 1 else "share of 1 hypothesis marking a lesion"
    _write_seg(
        path, source_files, np.ascontiguousarray(frequency, dtype=np.float32),
        [("lesion probability", f"{lead}{share}")],
        uid_parts=["FREQUENCY", *uid_parts], algorithm_name=algorithm_name,
        algorithm_version=algorithm_version, series_number=901, description=description, content_label="FREQUENCY",
        content_description=share,
        segmentation_type=hd.seg.SegmentationTypeValues.FRACTIONAL,
        fractional_type=hd.seg.SegmentationFractionalTypeValues.PROBABILITY,
        max_fractional_value=int(max_fractional_value),
    )
