"""What scan sampling writes: the hypotheses and their frequency in the scan's geometry, a summary.

An output folder ``lidcseg sample --out`` holds :data:`HYPOTHESES_FILE` (I, J, K, n)
uint8, :data:`FREQUENCY_FILE` (I, J, K) float32, :data:`SUMMARY_FILE` (format
:data:`SUMMARY_FORMAT`: input, model, protocol, noise and per-lesion statistics)
and, for a DICOM input, two DICOM SEGs: :data:`SEG_FILE` (BINARY, a segment per
hypothesis) and :data:`FREQUENCY_SEG_FILE` (FRACTIONAL/PROBABILITY, the frequency map;
a SEG has one type, and viewers that reject fractional SEGs still open the binary one).
It is filled in a temporary folder (:func:`output_folder`), marked as ``lidcseg sample``'s and swapped in whole at the end;
only a folder that ``lidcseg sample`` wrote is ever replaced. File names are fixed,
never built from DICOM tags.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager as ContextManager
from pathlib import Path
from typing import Any

import numpy as np

from lidcseg import __version__
from lidcseg.config import DataConfig
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.outputs import OutputKind, check_output_folder, has_format, replaced_folder
from lidcseg.io.scan import ScanVolume, scan_info
from lidcseg.sampling.lesions import Lesion
from lidcseg.sampling.tiles import Pasted, hypothesis_volume

#: Output file names (fixed; never built from DICOM tags).
HYPOTHESES_FILE = "hypotheses.nii.gz"
FREQUENCY_FILE = "frequency.nii.gz"
SUMMARY_FILE = "summary.json"
SEG_FILE = "hypotheses.seg.dcm"
FREQUENCY_SEG_FILE = "frequency.seg.dcm"
SUMMARY_FORMAT = "lidcseg-sample"


# -- the summary ------------------------------------------------------------------------------


def lesion_stats(scan: ScanVolume, les: Lesion, p: Pasted) -> dict[str, Any]:
    """Presence frequency and volume (mm^3) per hypothesis of one pasted lesion."""
    area = scan.spacing_xy[0] * scan.spacing_xy[1]
    thick = scan.slice_thickness[p.slices]  # (s,)
    counts = p.masks.reshape(p.masks.shape[0], p.masks.shape[1], -1).sum(-1)  # (n, s)
    volumes = (counts * thick[None] * area).sum(1)  # (n,)
    centre_in = scan.canonical_to_input(les.centre_canonical)
    z_axis = scan.axes[0]
    pairs = sorted((int(round(scan.canonical_to_input((k, 0, 0))[z_axis])), float(scan.z[k])) for k in les.slices)
    return {
        "source": les.source,
        "label": les.label,
        "centre_world_lps_mm": [round(v, 4) for v in les.centre_world],
        "centre_voxel": [round(float(v), 4) for v in centre_in],
        "slices": [k for k, _ in pairs],
        "slices_z_mm": [round(z, 4) for _, z in pairs],
        "presence_frequency": float((volumes > 0).mean()),
        "volume_mm3": [round(float(v), 4) for v in volumes],
        "volume_mm3_mean": round(float(volumes.mean()), 4),
        "volume_mm3_std": round(float(volumes.std()), 4),
        "volume_mm3_min": round(float(volumes.min()), 4),
        "volume_mm3_max": round(float(volumes.max()), 4),
    }


def output_files(scan: ScanVolume) -> list[str]:
    """The names of the files written for ``scan`` (the SEGs only for a DICOM input)."""
    segs = [SEG_FILE, FREQUENCY_SEG_FILE] if scan.kind == "dicom" else []
    return [HYPOTHESES_FILE, FREQUENCY_FILE, SUMMARY_FILE, *segs]


def build_summary(
    scan_path: str | Path,
    scan: ScanVolume,
    lesions: Sequence[Lesion],
    pasted: Sequence[Pasted],
    *,
    model_info: dict[str, Any],
    data: DataConfig,
    input_size: int,
    n: int,
    seed: int,
    noise: str,
    shared_eps: bool,
) -> dict[str, Any]:
    """The content of ``summary.json``.

    Args:
        scan_path: the input as the caller named it.
        lesions, pasted: the lesions and their pasted hypotheses (:func:`~lidcseg.sampling.tiles.paste_back`).
        model_info: :attr:`lidcseg.inference.OpenRun.info`.
        data, input_size: the crop protocol and the model's input tile side T.
        n, seed: hypotheses per lesion and the seed of the noise.
        noise: how the noise was drawn (:func:`~lidcseg.sampling.tiles.draw_hypotheses`).
        shared_eps: whether shared noise was asked for (a warning if the model could not share it).
    """
    summary = {
        "format": SUMMARY_FORMAT,
        "version": 1,
        "lidcseg_version": __version__,
        "input": {"path": str(scan_path), **scan_info(scan)},
        "model": model_info,
        "protocol": {
            "spacing_mm": data.spacing_mm,
            "crop_size": data.crop_size,
            "input_size": input_size,
            "pad_hu": data.pad_hu,
            "image_interpolation": data.image_interpolation,
            "paste_back": "nearest",
            "world_coordinates": "LPS mm (DICOM patient coordinates)",
        },
        "n": n,
        "seed": seed,
        "noise": noise,
        "lesions": [lesion_stats(scan, les, p) for les, p in zip(lesions, pasted, strict=True)],
        "files": output_files(scan),
    }
    if noise == "model" and shared_eps:
        summary["warnings"] = ["the model's sample() takes no eps: its noise is drawn independently per slice"]
    return summary


# -- the files --------------------------------------------------------------------------------


def _output_header(scan: ScanVolume, shape: tuple[int, ...], dtype: type, description: str) -> Any:
    from lidcseg.io.nifti import make_header

    sform, scode = scan.sform
    qform, qcode = scan.qform
    if not scode and not qcode:  # neither set: keep the affine nibabel read (as the sform)
        sform, scode = scan.affine_ras, 1
    return make_header(shape, dtype, sform if scode else scan.affine_ras, sform_code=scode,
                       qform=qform, qform_code=qcode, description=description)


def seg_about(summary: dict[str, Any]) -> str:
    """What made the hypotheses, for the SEGs' segment descriptions: our own values only.

    ``"lidcseg <model>, run <run folder>, checkpoint <best|last|...>, seed <seed>"``
    from ``summary["model"]`` and ``summary["seed"]`` (the run as the user named it,
    never a tag of the input).
    """
    model = summary.get("model") or {}
    parts = [f"lidcseg {model.get('name', 'model')}"]
    if model.get("run"):
        parts.append(f"run {Path(model['run']).name or Path(model['run']).resolve().name}")
    if model.get("checkpoint"):
        parts.append(f"checkpoint {Path(model['checkpoint']).name}")
    if summary.get("seed") is not None:
        parts.append(f"seed {summary['seed']}")
    return ", ".join(parts)


def write_outputs(
    folder: Path,
    scan: ScanVolume,
    pasted: Sequence[Pasted],
    n: int,
    summary: dict[str, Any],
    *,
    seg_uid_parts: Sequence[object] | None = None,
    algorithm: tuple[str, str] = ("lidcseg", ""),
) -> None:
    """Write hypotheses.nii.gz, frequency.nii.gz, summary.json (and the two SEGs) into ``folder``.

    The NIfTIs are in the input's voxel order with its affine: hypotheses
    (I, J, K, n) uint8, streamed one hypothesis at a time; frequency (I, J, K)
    float32, the fraction of hypotheses containing each voxel. A DICOM input also
    gets, over the slices that were sampled, hypotheses.seg.dcm (BINARY, a segment
    per hypothesis) and frequency.seg.dcm (FRACTIONAL/PROBABILITY, the frequency in
    steps of 1/255). Their segment labels and descriptions name the model, the run
    and n from ``summary`` (:func:`seg_about`), never the input's tags.
    """
    from lidcseg.io.nifti import write_nifti, write_nifti_volumes

    count = np.zeros(scan.shape, np.uint16)

    def volumes() -> Iterator[np.ndarray]:
        for h in range(n):
            vol = hypothesis_volume(scan, pasted, h)
            count[...] += vol
            yield scan.to_input(vol)

    shape = tuple(scan.input_shape)
    write_nifti_volumes(folder / HYPOTHESES_FILE,
                        _output_header(scan, (*shape, n), np.uint8, "lidcseg hypotheses"), volumes())
    freq = (count.astype(np.float32) / np.float32(n)).astype(np.float32)
    write_nifti(folder / FREQUENCY_FILE, scan.to_input(freq),
                _output_header(scan, shape, np.float32, "lidcseg hypothesis frequency"))
    if scan.kind == "dicom":
        from lidcseg.io.dicom_seg import write_frequency_seg, write_hypotheses_seg

        frames = sorted({int(k) for p in pasted for k in p.slices})
        where = {k: f for f, k in enumerate(frames)}
        seg = np.zeros((len(frames), scan.shape[1], scan.shape[2], n), bool)
        for p in pasted:
            for s, k in enumerate(p.slices):
                view = seg[where[int(k)], p.rows, p.cols]
                seg[where[int(k)], p.rows, p.cols] = view | p.masks[:, s].transpose(1, 2, 0)
        files = [scan.files[k] for k in frames]
        common = dict(uid_parts=list(seg_uid_parts or ()), algorithm_name=algorithm[0],
                      algorithm_version=algorithm[1], about=seg_about(summary))
        write_hypotheses_seg(folder / SEG_FILE, files, seg, description=f"lidcseg {n} hypotheses", **common)
        del seg
        write_frequency_seg(folder / FREQUENCY_SEG_FILE, files, freq[frames], n=n,
                            description=f"lidcseg frequency of {n} hypotheses", **common)
    write_json_atomic(folder / SUMMARY_FILE, summary)


#: ``lidcseg sample``'s output folder: the marker, or a ``summary.json`` of :data:`SUMMARY_FORMAT`.
SAMPLE_OUTPUT = OutputKind("sample", legacy=has_format(SUMMARY_FILE, format=SUMMARY_FORMAT))


def output_folder(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> ContextManager[Path]:
    """Yield a fresh temporary folder beside ``out``; on success it becomes ``out``.

    On any error the temporary folder is removed and ``out`` is untouched. An existing
    ``out`` is replaced only if ``lidcseg sample`` wrote it, only with ``overwrite``, and
    never when it is, holds or is inside one of the ``inputs``
    (:func:`lidcseg.io.outputs.replaced_folder`: checked again before the swap).
    """
    return replaced_folder(out, SAMPLE_OUTPUT, inputs=inputs, overwrite=overwrite)


def check_output(out: Path, overwrite: bool, inputs: Iterable[str | Path | None] = ()) -> None:
    """Refuse an output folder ``lidcseg sample`` may not replace (see :func:`output_folder`)."""
    check_output_folder(out, SAMPLE_OUTPUT, inputs=inputs, replace=True, overwrite=overwrite)
