"""Calibration on a known distribution: the flip task of Kohl et al. 2018 (Section 4.2, Appendix C).

Each test scene has exactly 32 correct segmentations, the modes Y_k of
:mod:`lidcseg.flips`, with known probabilities w_k. A model's samples are
scored against that exact mixture in three ways.

The metrics (the distance, Eq. 7 against the mixture, mode-wise frequencies of
Fig. 5 and pixel-wise marginals) are :mod:`lidcseg.metrics.flips`.

A model only needs ``sample(x, n, generator=None) -> (B, n, C, H, W)``
logits with C = 24 (drawn through :func:`lidcseg.inference.draw_labels`);
:class:`FlipOracle` is a fake model that samples the true distribution
(correlation ~ 1, small errors: the floor of each number at a finite sample
count). :func:`calibrate_runs` is ``lidcseg calibration``; its report is
:mod:`lidcseg.reports.calibration`. Training's validation on this task is
:func:`lidcseg.training.validation.validate_flip_task`.
Nothing here prints: progress goes to ``progress(stage, done, total)``.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.calibration_geometry import flip_boundaries, has_latent_geometry, scene_batches
from lidcseg.device import resolve_device
from lidcseg.errors import LidcsegError
from lidcseg.flips import (
    CLASS_NAMES,
    EVAL_CLASSES,
    FLIP_PROBS,
    IGNORE_INDEX,
    NUM_CLASSES,
    NUM_MODES,
    NUM_SWITCHES,
    SWITCHES,
    check_unflipped,
    flips_to_mode,
    mode_flips,
    mode_labels,
    mode_probabilities,
)
from lidcseg.inference import (
    OpenRun,
    draw_labels,
    open_run,
    torch_threads,
    unique_labels,
)
from lidcseg.io.outputs import check_output_folder
from lidcseg.metrics.flips import (
    DEFAULT_COUNTS,
    DEFAULT_SAMPLES,
    MODE_SCENES,
    PAPER_GED,
    CalibrationAccumulator,
    switch_counts,
)
from lidcseg.progress import Progress
from lidcseg.reports.calibration import CALIBRATION_OUTPUT, Examples, write_calibration
from lidcseg.reports.examples import choose_examples

#: Label of the oracle's row in the reports.
ORACLE_LABEL = "oracle"



def posterior_switch_accuracy(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    *,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    min_pixels: int = 1,
) -> dict[str, Any]:
    """Which flips the posterior net encodes: a diagnosis of miscalibrated modes.

    For every scene and every one of the 32 modes Y_k, the posterior-mean
    reconstruction S(X, mu_post(X, Y_k)) (``model.reconstruct``) is compared with
    Y_k switch by switch: switch i is *right* when more of its region R_i is
    labelled with Y_k's class for it (original or twin) than with the other one.
    A switch at 0.5 is not encoded at all: the decoder answers the same whatever
    the posterior saw, so the prior's samples cannot get its frequency right
    either. Only switches present with at least ``min_pixels`` pixels count.

    Args:
        model: with ``reconstruct(x, y, ignore) -> (B, C, H, W)`` logits.
        images: (N, 3, H, W) uint8 RGB or normalised float; labels (N, H, W)
            un-flipped trainIds; ignore (N, H, W) bool.

    Returns:
        ``{"per_switch": [{"class", "accuracy", "cases"}], "all_right": share of
        (scene, mode) pairs with every present switch right, "cases": pairs}``.
    """
    bits = torch.as_tensor(mode_flips())  # (32, 5)
    right = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    cases = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    all_right, pairs = 0.0, 0
    if hasattr(model, "eval"):
        model.eval()
    with torch.no_grad():
        for x, lab, ign, modes in scene_batches(images, labels, ignore, batch_size, device):
            for k in range(NUM_MODES):
                rec = model.reconstruct(x, modes[:, k].to(device), ign.to(device)).argmax(1).cpu()
                c = switch_counts(rec[:, None], lab, ign)
                present = c.region >= max(1, min_pixels)  # (b, 5)
                said_twin = c.hit_twin[:, 0] > c.hit_original[:, 0]
                ok = (said_twin == bits[k][None]) & present
                right += ok.sum(0).double()
                cases += present.sum(0).double()
                all_right += float((ok | ~present).all(1).sum())
                pairs += lab.shape[0]
    return {
        "per_switch": [{"class": sw.name, "accuracy": float(right[i] / cases[i]) if cases[i] else math.nan,
                        "cases": int(cases[i])} for i, sw in enumerate(SWITCHES)],
        "all_right": all_right / pairs if pairs else math.nan,
        "cases": pairs,
    }


# -- models ---------------------------------------------------------------------------------


def _image_key(x: torch.Tensor) -> bytes:
    return hashlib.blake2b(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes(),
                           digest_size=16).digest()


class FlipOracle(torch.nn.Module):
    """A fake model that knows every scene's un-flipped label and samples the flips' distribution.

    ``sample(x, n, generator)`` looks each image up (by its exact pixel values),
    draws independent flips with probabilities ``probs`` per sample and returns
    one-hot logits (B, n, 24, H, W). With the true probabilities it is the
    perfectly calibrated model: its numbers are the floor of each metric at a
    finite sample count.

    Args:
        images: (N, 3, H, W) the model inputs it will be asked about (uint8 RGB is
            normalised as the datasets do).
        labels: (N, H, W) un-flipped trainIds (255 at ignored pixels is read as 0).
        probs: (5,) flip probabilities (default: the truth); others give a miscalibrated model.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, probs: np.ndarray | None = None) -> None:
        super().__init__()
        self.labels = labels.to(torch.int64).masked_fill(labels == IGNORE_INDEX, 0)
        self.probs = torch.tensor(np.array(FLIP_PROBS if probs is None else probs, dtype=np.float64))
        from lidcseg.data.scenes import normalize_rgb

        self._index = {_image_key(normalize_rgb(img) if img.dtype == torch.uint8 else img): i
                       for i, img in enumerate(images)}

    @torch.no_grad()
    def sample(self, x: torch.Tensor, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, 3, H, W) -> (B, n, 24, H, W) one-hot logits of flipped labels."""
        rows = []
        for img in x:
            key = _image_key(img)
            if key not in self._index:
                raise LidcsegError("the oracle was asked about an image it does not know")
            rows.append(self._index[key])
        flips = torch.rand((x.shape[0], n, NUM_SWITCHES), generator=generator, dtype=torch.float64) < self.probs
        modes = torch.as_tensor(flips_to_mode(flips.numpy()))  # (B, n)
        every = mode_labels(self.labels[rows])  # (B, 32, H, W)
        chosen = torch.gather(every, 1, modes[:, :, None, None].expand(-1, -1, *every.shape[2:]))
        out = torch.zeros((x.shape[0], n, NUM_CLASSES, *chosen.shape[2:]))
        out.scatter_(2, chosen[:, :, None], 1.0)
        return out.to(x.device)


# -- evaluating runs -----------------------------------------------------------------------------


def _open_flip_run(run: str | Path, device: torch.device) -> OpenRun:
    """:func:`lidcseg.inference.open_run`, checked to be a flip-task model (3 input channels, 24 classes).

    Raises:
        LidcsegError: not a run or checkpoint, or a model of another task.
    """
    opened = open_run(run, device)
    cfg = opened.config
    if cfg.num_classes != NUM_CLASSES or cfg.in_channels != 3:
        raise LidcsegError(f"model has {cfg.in_channels} input channels and {cfg.num_classes} classes; "
                           f"the flip task needs 3 and {NUM_CLASSES}", opened.checkpoint)
    return opened


def _run_info(run: OpenRun) -> dict[str, Any]:
    """The JSON description of a calibrated run: checkpoint, name, step, validation, config."""
    cfg = run.config
    return {"checkpoint": str(run.checkpoint), "name": cfg.name, "step": run.info["step"],
            "val": run.info["val"], "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}


def calibrate_model(
    model: Any,
    images: torch.Tensor,
    labels: torch.Tensor,
    ignore: torch.Tensor,
    *,
    counts: Sequence[int] = DEFAULT_COUNTS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    min_pixels: int = 1,
    mode_scenes: str = "all",
    keep: Sequence[int] = (),
    progress: Progress | None = None,
    stage: str = "sampling",
) -> tuple[dict[str, Any], dict[int, np.ndarray]]:
    """All calibration numbers of one model on scenes in memory.

    Draws ``max(max(counts), samples)`` samples per scene ONCE (latents from a
    ``torch.Generator`` seeded with ``seed``, consumed batch by batch); the GED
    at n uses the first n, the mode and pixel statistics the first ``samples``.

    Args:
        model: ``sample(x, n, generator=None) -> (B, n, 24, H, W)``.
        images: (N, 3, H, W) model inputs, float, or uint8 RGB normalised batch by
            batch (:func:`lidcseg.data.scenes.normalize_rgb`; 6x less memory).
        labels: (N, H, W) un-flipped trainIds (any value at ignored pixels).
        ignore: (N, H, W) bool.
        min_pixels, mode_scenes: which scenes count in the mode frequencies
            (:class:`~lidcseg.metrics.flips.CalibrationAccumulator`; default: all, the authors' rule).
        keep: positions whose samples are returned for the figure.

    Returns:
        ``(result, kept)``: :meth:`CalibrationAccumulator.result` plus ``per_image_ged``
        (count -> list), and position -> (n, H, W) int64 samples for ``keep``.
    """
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0)
    check_unflipped(labels, "labels")
    acc = CalibrationAccumulator(counts, samples, min_pixels, check_mode_scenes(mode_scenes))
    gen = torch.Generator().manual_seed(int(seed))
    keep_set, kept = set(keep), {}
    if hasattr(model, "eval"):
        model.eval()
    n_img = images.shape[0]
    for s in range(0, n_img, batch_size):
        e = min(s + batch_size, n_img)
        x = images[s:e]
        x = normalize_rgb(x) if x.dtype == torch.uint8 else x
        draws = draw_labels(model, x.to(device), acc.n_draw, generator=gen, classes=NUM_CLASSES,
                            task="the flip task").cpu()
        acc.update(draws, labels[s:e].to(torch.int64), ignore[s:e])
        for i in range(s, e):
            if i in keep_set:
                kept[i] = draws[i - s].numpy()
        if progress is not None:
            progress(stage, e, n_img)
    result = acc.result()
    result["per_image_ged"] = {str(n): acc.per_image_ged(n).tolist() for n in acc.counts}
    return result, kept


def check_mode_scenes(mode_scenes: str) -> str:
    """``mode_scenes`` if it is one of :data:`~lidcseg.metrics.flips.MODE_SCENES`.

    Raises:
        LidcsegError: any other value, in one line naming ``--mode-scenes``.
    """
    if mode_scenes not in MODE_SCENES:
        raise LidcsegError(f"--mode-scenes must be {' or '.join(MODE_SCENES)}, got {mode_scenes!r}")
    return mode_scenes


def _example_pool(labels: torch.Tensor, ignore: torch.Tensor) -> np.ndarray:
    """Candidates for the figure: scenes with all five switchable classes present (else every scene).

    Args:
        labels: (N, H, W) un-flipped trainIds; ignore: (N, H, W) bool.
    """
    present = torch.stack([((labels == sw.original) & ~ignore).flatten(1).any(1) for sw in SWITCHES], 1)
    full = torch.nonzero(present.all(1)).flatten().numpy()
    return full if full.size else np.arange(labels.shape[0])


def calibrate_runs(
    data_dir: str | Path,
    runs: Sequence[str | Path],
    out: str | Path,
    *,
    split: str = "test",
    counts: Sequence[int] = DEFAULT_COUNTS,
    samples: int = DEFAULT_SAMPLES,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 4,
    max_images: int | None = None,
    oracle: bool = False,
    min_pixels: int = 1,
    mode_scenes: str = "all",
    examples: int = 3,
    posterior_scenes: int = 20,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``lidcseg calibration``: calibrate every run (and optionally the oracle) and write the report.

    The mode frequencies count every scene (``mode_scenes="all"``, the authors' rule,
    Appendix C) or only those with all five switchable classes (``"complete"``, at
    least ``min_pixels`` pixels each).

    Runs with a posterior net (``reconstruct``) also get
    :func:`posterior_switch_accuracy` on the first ``posterior_scenes`` scenes
    (0: skip), the diagnosis of which flips the model has learned to encode, and
    Prob. U-Nets :func:`~lidcseg.calibration_geometry.flip_boundaries` on the same
    scenes: where the decoder splits each flip in the prior's units, the diagnosis
    of why an encoded flip is still sampled at the wrong frequency.

    Writes ``calibration.json``, ``calibration.md``, ``modes.png`` (Fig. 5),
    ``marginals.png`` (pixel-wise marginals), ``ged.png`` (GED vs samples with
    the paper's Table 2) and ``examples.png`` into ``out``: a new or empty folder, or one
    ``lidcseg calibration`` wrote, apart from the data and the runs
    (:data:`lidcseg.reports.calibration.CALIBRATION_OUTPUT`).

    Returns:
        The JSON report.

    Raises:
        LidcsegError: no runs (and no oracle), an unknown ``mode_scenes``, an ``out`` this
            command may not write, a data folder that is not the flip task, a missing split,
            a run that is not a flip-task model.
    """
    from lidcseg.data.scenes import SceneEvalDataset, read_manifest, split_path

    if not runs and not oracle:
        raise LidcsegError("no run given (--run RUN, or --oracle)")
    check_mode_scenes(mode_scenes)
    inputs = [data_dir, *runs]
    check_output_folder(out, CALIBRATION_OUTPUT, inputs=inputs)  # before the sampling, not after
    manifest = read_manifest(data_dir)
    ds = SceneEvalDataset(split_path(data_dir, split), limit=max_images)
    if len(ds) == 0:
        raise LidcsegError(f"split {split!r} has no scenes", split_path(data_dir, split))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    with torch_threads(threads):
        opened = [_open_flip_run(r, dev) for r in runs]
        # (label, model, info) per row of the report
        models = [(label, r.model, _run_info(r))
                  for r, label in zip(opened, unique_labels([r.label for r in opened]), strict=True)]
        raw_images, raw_labels = ds.arrays()  # uint8: 6x less memory than float inputs
        images, labels = torch.from_numpy(raw_images), torch.from_numpy(raw_labels)
        ignore = labels == IGNORE_INDEX
        if oracle:
            models.append((ORACLE_LABEL, FlipOracle(images, labels),
                           {"name": "oracle", "note": "samples the true flip distribution"}))
        keep = choose_examples(examples, [_example_pool(labels, ignore)], spread=True)
        ex = Examples([int(ds.indices[i]) for i in keep], raw_images[keep],
                      labels[keep].masked_fill(ignore[keep], 0).long().numpy(), ignore[keep].numpy())
        results = []
        for j, (label, model, info) in enumerate(models):
            t_run = time.perf_counter()
            res, kept = calibrate_model(
                model, images, labels, ignore, counts=counts, samples=samples, seed=seed,
                batch_size=batch_size, device=dev, min_pixels=min_pixels, mode_scenes=mode_scenes,
                keep=keep,
                progress=progress, stage=f"{label} ({j + 1}/{len(models)})")
            if keep:
                ex.samples[label] = np.stack([kept[i] for i in keep])
            k = min(posterior_scenes, images.shape[0])  # the scenes of both diagnoses
            if k > 0 and hasattr(model, "reconstruct"):
                if progress is not None:
                    progress(f"{label}: posterior", 0, 1)
                res["posterior"] = posterior_switch_accuracy(
                    model, images[:k], labels[:k], ignore[:k], batch_size=batch_size, device=dev,
                    min_pixels=min_pixels)
            if k > 0 and has_latent_geometry(model):
                if progress is not None:
                    progress(f"{label}: flip boundaries", 0, 1)
                res["geometry"] = flip_boundaries(
                    model, images[:k], labels[:k], ignore[:k], batch_size=batch_size, device=dev,
                    min_pixels=min_pixels, seed=seed)
            results.append({"label": label, "info": info, **res,
                            "time_s": time.perf_counter() - t_run})
    report = {
        "data": {"dir": str(Path(data_dir).resolve()), "split": split, "source": manifest.get("source"),
                 "scenes": len(ds), "height": ds.height, "width": ds.width},
        "protocol": {"switches": [{"class": s.name, "original": s.original, "twin": s.flipped,
                                   "probability": s.probability} for s in SWITCHES],
                     "classes": list(CLASS_NAMES), "eval_classes": list(EVAL_CLASSES),
                     "mode_probabilities": mode_probabilities().tolist()},
        "settings": {"counts": sorted(set(int(c) for c in counts)), "samples": samples, "seed": seed,
                     "min_pixels": min_pixels, "mode_scenes": mode_scenes,
                     "device": str(dev), "ged": "V-statistic (Eq. 7)",
                     "posterior_scenes": posterior_scenes},
        "paper_ged": {str(k): v for k, v in PAPER_GED.items()},
        "runs": results,
        "time_s": time.perf_counter() - t0,
    }
    write_calibration(report, ex, out, inputs)
    return report
