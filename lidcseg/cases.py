"""The crops of the report's case viewer: image, graders and every run's hypotheses, stored small.

``sample_cases(data_dir, runs, out_dir)`` is the cases stage of ``lidcseg reproduce``.
For each crop of the split (all of them, or ``max_crops`` evenly spaced, as
``lidcseg evaluate``'s ``max_images``):

1. **Input.** The evaluation tile of the crop (:func:`lidcseg.data.eval_split.load_split`:
   the centre ``input_size`` tile, HU normalised as in training) and its G = 4 grader
   masks (padded graders are empty masks, as in the paper).
2. **Hypotheses.** Each run draws ``count = min(n, max_samples)`` hypotheses: ``n`` (16)
   from a model with a latent (its noise per image from ``SeedSequence([seed, row])``,
   :func:`lidcseg.inference.draw_image_foreground`, the same noise as ``lidcseg
   evaluate`` with the same seed), its heads or members from an M-Heads model or an
   ensemble (``m-heads-4`` gives 4). Foreground is the one rule of
   :func:`lidcseg.inference.foreground_of`.
3. **Scores.** GED² (Eq. 6, V-statistic, d = 1 - IoU) of each run's ``count`` hypotheses
   against the graders, the graders' own disagreement (mean d over distinct pairs) and
   how many grader masks are not empty (the graders disagree on presence when some are
   and some are not).

Written by :mod:`lidcseg.reports.cases`: ``cases.h5`` (bit-packed masks, the image in the
display window; a few kB per crop) and ``cases.json``. Nothing here prints: progress
goes to ``callback(stage, done, total)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from lidcseg.data.eval_split import load_split, split_file
from lidcseg.errors import LidcsegError
from lidcseg.inference import (
    CT_CHANNELS,
    draw_image_foreground,
    open_runs,
    require_input_size,
    torch_threads,
)
from lidcseg.progress import Progress

#: Most hypotheses per run the viewer stores.
MAX_HYPOTHESES = 64


def sample_cases(
    data_dir: Path,
    runs: Mapping[str, Path],
    out_dir: Path,
    *,
    n: int = 16,
    split: str = "test",
    max_crops: int | None = None,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    threads: int = 0,
    callback: Progress | None = None,
) -> Path:
    """Sample every run on the crops of ``DATA/<split>.h5`` and store them for the case viewer.

    Args:
        data_dir: folder of ``lidcseg prepare`` (or ``lidcseg import``).
        runs: label -> run folder (or checkpoint folder); the labels name the viewer's rows.
        out_dir: the cases folder: new, empty, or one this function wrote
            (:data:`lidcseg.reports.cases.CASES_OUTPUT`), apart from the data and the runs.
        n: hypotheses per run (fewer from a model with fewer heads or members), 1..64.
        split: the split file's name.
        max_crops: at most this many crops, evenly spaced over the file (None: all).
        seed: the latent noise seed (the same as ``lidcseg evaluate``'s gives the same samples).
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: crops per model call.
        threads: torch CPU threads (0: unchanged).
        callback: ``callback(stage, done, total)``.

    Returns:
        ``out_dir``.

    Raises:
        LidcsegError: no runs, bad ``n``/``batch_size``, a missing split, runs of different
            input sizes or another task, more than 8 graders, or an ``out_dir`` that may not
            be written.
    """
    from lidcseg.io.outputs import check_output_folder, claim_output
    from lidcseg.metrics import generalized_energy_distance, sample_diversity
    from lidcseg.reports.cases import (
        CASES_FILE,
        CASES_OUTPUT,
        MAX_GRADERS,
        CasesWriter,
        display_grey,
        write_info,
    )
    from lidcseg.reports.plots import DISPLAY_WINDOW

    if not runs:
        raise LidcsegError("no run given for the case viewer")
    if not 1 <= n <= MAX_HYPOTHESES:
        raise LidcsegError(f"hypotheses per run must be in 1..{MAX_HYPOTHESES}, got {n}")
    if batch_size < 1:
        raise LidcsegError(f"batch size must be >= 1, got {batch_size}")
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    split_file(data_dir, split)
    labels, paths = list(runs), [Path(p) for p in runs.values()]
    check_output_folder(out_dir, CASES_OUTPUT, inputs=[data_dir, *paths])
    with torch_threads(threads):
        opened = open_runs(paths, device, in_channels=CT_CHANNELS)
        size = require_input_size(opened[0])
        data = load_split(data_dir, split, size, max_crops, callback)
        if data.masks.shape[1] > MAX_GRADERS:
            raise LidcsegError(f"the viewer stores at most {MAX_GRADERS} graders, the split has "
                               f"{data.masks.shape[1]}", data.path)
        counts = [min(n, getattr(r.model, "max_samples", None) or n) for r in opened]
        info = {
            "split": split, "data": str(data_dir.resolve()), "split_file": str(data.path),
            "crops": len(data), "max_crops": max_crops, "input_size": size, "seed": seed, "n": n,
            "graders": int(data.masks.shape[1]), "display_window": list(DISPLAY_WINDOW),
            "ged": "V-statistic, d = 1 - IoU, d(empty, empty) = 0, over each run's count hypotheses",
            "runs": [{"label": label, "model": r.name, "path": str(r.path), "checkpoint": str(r.checkpoint),
                      "step": r.info.get("step"), "count": c}
                     for label, r, c in zip(labels, opened, counts, strict=True)],
        }
        claim_output(out_dir, CASES_OUTPUT)
        gens = [torch.Generator().manual_seed(int(seed)) for _ in opened]
        with CasesWriter(out_dir / CASES_FILE, size, counts, int(data.masks.shape[1]), info) as writer:
            for s, e, x in data.batches(batch_size):
                graders = data.masks[s:e]
                rows = data.rows[s:e]
                hyps, geds = [], []
                for r, c, gen in zip(opened, counts, gens, strict=True):
                    fg = draw_image_foreground(r.model, x.to(r.device), c, rows, seed=seed, generator=gen).cpu()
                    hyps.append(fg.numpy())
                    geds.append(generalized_energy_distance(fg, graders).numpy())
                diversity = (sample_diversity(graders, unbiased=True).numpy() if graders.shape[1] > 1
                             else np.zeros(e - s, np.float32))
                writer.append(display_grey(data.images[s:e, 0].numpy(), DISPLAY_WINDOW), graders.numpy(),
                              hyps, np.stack(geds, axis=1), rows, data.patient[s:e], data.lesion[s:e], diversity)
                if callback is not None:
                    callback("cases", e, len(data))
        write_info(out_dir, info)
    return out_dir
