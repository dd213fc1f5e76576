"""Hypotheses for a whole CT scan: lesion crops, sampling, and paste-back into the scan.

``sample_scan(scan, run, out, ...)`` is what ``lidcseg sample`` runs:

1. **Read** the scan (:func:`lidcseg.io.scan.read_scan`): a NIfTI volume (values
   taken as HU) or a DICOM series folder (rescaled to HU), held as axial slices
   in canonical LPS order.
2. **Open** the run (:func:`lidcseg.inference.open_run`): its model, input tile
   size and crop protocol.
3. **Locate** the lesions (:func:`~lidcseg.sampling.lesions.locate_lesions`): world
   points (``at``, LPS mm), voxel indices (``at_voxel``, in the input's own voxel
   order), the connected components of a lesion mask (``lesions_mask``), or
   pylidc's lesion clusters of a LIDC series (``lidc``). Each lesion is an
   in-plane centre and a set of axial slices.
4. **Resample** every slice of every lesion exactly as ``lidcseg prepare`` cut the
   training crops (:func:`lidcseg.data.crops.resample_to_grid`: linear, onto a
   ``crop_size`` grid of ``spacing_mm`` pixels centred on the lesion, padded with
   air, rounded to integer HU as the crop files store it), then take the centre
   ``input_size`` tile and normalise it with the training's
   :func:`lidcseg.data.transforms.normalize_hu` (:func:`~lidcseg.sampling.tiles.cut_tiles`).
5. **Sample** ``n`` hypotheses of all tiles of all lesions in a few batched model
   calls (:func:`~lidcseg.sampling.tiles.draw_hypotheses`). A hypothesis is the
   argmax class map; foreground is any class other than 0
   (:func:`lidcseg.inference.foreground_of`).
6. **Paste back** each tile into the scan's voxel grid with nearest neighbour, only
   within the tile's footprint; overlapping lesions are OR-ed per hypothesis
   (:func:`~lidcseg.sampling.tiles.paste_back`), and **write** the outputs
   (:func:`~lidcseg.sampling.outputs.write_outputs`) into a temporary folder that
   is swapped onto ``out`` at the very end.

**3-D coherence (shared noise).** The Probabilistic U-Net draws a hypothesis as
z = mu(X) + sigma(X) * eps with eps ~ N(0, I) (Eq. 1-3). Drawn independently per
slice, hypothesis k of slice 12 and hypothesis k of slice 13 are unrelated: a
stack of them mixes interpretations (a large contour above a small one), and
per-lesion statistics across hypotheses (presence, volume) mean nothing. So by
default eps is drawn **once per lesion and hypothesis** and shared by all its
slices: z_slice = mu_slice + sigma_slice * eps_k, i.e. hypothesis k takes the same
quantile of every slice's prior - one consistent interpretation of the lesion.
``shared_eps=False`` (``--independent``) draws eps per slice. Models without a
latent space ignore eps.

Coordinates: world points are DICOM patient coordinates, LPS mm (NIfTI RAS
affines are converted: x and y change sign). Slice indices in the summary are
indices along the input array's axis that runs along z (for the usual NIfTI and
for DICOM, ``k``; DICOM slices sorted by ascending z).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lidcseg import __version__
from lidcseg.errors import LidcsegError
from lidcseg.inference import CT_CHANNELS, open_run, require_input_size, torch_threads
from lidcseg.io.scan import read_scan
from lidcseg.progress import Progress
from lidcseg.sampling.lesions import DEFAULT_POINT_SLICES, Lesion, locate_lesions
from lidcseg.sampling.outputs import (
    FREQUENCY_FILE,
    FREQUENCY_SEG_FILE,
    HYPOTHESES_FILE,
    SAMPLE_OUTPUT,
    SEG_FILE,
    SUMMARY_FILE,
    SUMMARY_FORMAT,
    build_summary,
    check_output,
    lesion_stats,
    output_folder,
    write_outputs,
)
from lidcseg.sampling.tiles import (
    DEFAULT_BATCH_SIZE,
    Pasted,
    Tiles,
    centre_tile_offset,
    check_hypothesis_count,
    cut_tiles,
    draw_hypotheses,
    hypothesis_volume,
    paste_back,
)

__all__ = [
    "DEFAULT_BATCH_SIZE", "DEFAULT_POINT_SLICES", "FREQUENCY_FILE", "FREQUENCY_SEG_FILE", "HYPOTHESES_FILE", "SAMPLE_OUTPUT", "SEG_FILE",
    "SUMMARY_FILE", "SUMMARY_FORMAT", "Lesion", "Pasted", "Progress", "SampleResult", "Tiles",
    "build_summary", "centre_tile_offset", "check_output", "cut_tiles", "draw_hypotheses",
    "hypothesis_volume", "lesion_stats", "locate_lesions", "output_folder", "paste_back",
    "sample_scan", "write_outputs",
]

#: ``(stage, done, total)``: the progress callback of :func:`sample_scan`.


@dataclass
class SampleResult:
    """What :func:`sample_scan` did.

    Attributes:
        out: the output folder.
        summary: the content of ``summary.json``.
        timings: seconds per stage: read (headers, and the pixels of the slices used),
            load (the checkpoint), locate, resample, model (sampling), write, total.
        files: the files written (names inside ``out``).
    """

    out: Path
    summary: dict[str, Any]
    timings: dict[str, float] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)


def sample_scan(
    scan_path: str | Path,
    run: str | Path,
    out: str | Path,
    *,
    at: Sequence[tuple[float, float, float]] = (),
    at_voxel: Sequence[tuple[float, float, float]] = (),
    lesions_mask: str | Path | None = None,
    lidc: bool = False,
    slices: tuple[int, int] | None = None,
    n: int = 16,
    seed: int = 0,
    shared_eps: bool = True,
    device: str = "auto",
    batch_size: int = DEFAULT_BATCH_SIZE,
    input_size: int | None = None,
    threads: int = 0,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> SampleResult:
    """Sample ``n`` hypotheses of every located lesion of a scan and write them in its geometry.

    See the module docstring for the steps and conventions, and
    :func:`~lidcseg.sampling.lesions.locate_lesions` for the location arguments.

    Args:
        scan_path: a NIfTI CT volume or a DICOM series folder.
        run: a ``lidcseg train`` run directory or a checkpoint folder.
        out: the output folder (written whole at the end). An existing one is replaced
            only with ``overwrite`` and only if ``lidcseg sample`` wrote it; one that is,
            holds or is inside an input (scan, run, lesion mask) is refused
            (:func:`~lidcseg.sampling.outputs.output_folder`).
        n: hypotheses per lesion.
        seed: seed of the noise; the same seed gives identical arrays.
        shared_eps: share eps across a lesion's slices (default) or draw per slice.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: tiles per model call.
        input_size: override the model input size recorded with the checkpoint.
        threads: torch intra-op CPU threads while sampling (0: torch's default;
            :func:`lidcseg.inference.torch_threads`).
        progress: ``(stage, done, total)`` callback.

    Returns:
        A :class:`SampleResult`.

    Raises:
        LidcsegError: any bad input; then nothing is written.
    """
    out = Path(out)
    check_hypothesis_count(n)
    if batch_size < 1:
        raise LidcsegError(f"batch size must be >= 1, got {batch_size}")
    if seed < 0:
        raise LidcsegError(f"seed must be >= 0, got {seed}")
    inputs = (scan_path, run, lesions_mask)
    check_output(out, overwrite, inputs)

    def report(stage: str, done: int = 0, total: int = 1) -> None:
        if progress is not None:
            progress(stage, done, total)

    timings: dict[str, float] = {}
    t0 = t = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t
        now = time.perf_counter()
        timings[name] = timings.get(name, 0.0) + now - t
        t = now

    with torch_threads(threads):
        report("read")
        scan = read_scan(scan_path)
        lap("read")
        opened = open_run(run, device, input_size, in_channels=CT_CHANNELS)
        size = require_input_size(opened)
        lap("load")
        report("locate")
        lesions = locate_lesions(scan, at=at, at_voxel=at_voxel, lesions_mask=lesions_mask, lidc=lidc,
                                 slices=slices, data=opened.data)
        lap("locate")
        for k in sorted({k for les in lesions for k in les.slices}):
            scan.slice_hu(k)  # DICOM pixels are read on demand: only the slices needed
        lap("read")
        report("resample", 0, 1)
        tiles = cut_tiles(scan, lesions, opened.data, size)
        lap("resample")
        masks, noise = draw_hypotheses(
            opened.model, tiles, n, seed=seed, shared_eps=shared_eps, batch_size=batch_size,
            device=opened.device, on_batch=lambda d, tot: report("model", d, tot),
        )
        lap("model")
        report("write")
        pasted = paste_back(scan, lesions, tiles, masks, opened.data)
        summary = build_summary(scan_path, scan, lesions, pasted, model_info=opened.info, data=opened.data,
                                input_size=size, n=n, seed=seed, noise=noise, shared_eps=shared_eps)
        digest = json.dumps(summary, sort_keys=True)
        with output_folder(out, overwrite, inputs) as tmp:
            write_outputs(tmp, scan, pasted, n, summary, seg_uid_parts=[digest],
                          algorithm=(f"lidcseg {opened.info['name']}", __version__))
        lap("write")
        timings["total"] = time.perf_counter() - t0
    return SampleResult(out, summary, timings, list(summary["files"]))
