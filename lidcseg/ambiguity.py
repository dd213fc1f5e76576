"""Detecting lesion-presence ambiguity from samples (the paper's Appendix E, Fig. 12, Table 1).

For some crops the graders disagree on whether there is a lesion at all. A
model that captures this ambiguity should disagree with itself in the same way.

1. **Counts.** For every crop, ``n`` samples (16) are drawn once (seeded as in
   ``lidcseg evaluate``: :func:`lidcseg.inference.draw_image_foreground`) and
   ``count`` = the number of samples that show a lesion: at least
   ``min_pixels`` foreground pixels (default 1: non-empty).
2. **Truth.** A crop is *ambiguous* when its graders disagree on presence: some
   of its G = 4 masks (padded graders included, as in the paper) are empty and
   some are not. Otherwise it is *unambiguous*: all masks show a lesion, or
   (rarely, 52 of 15,729 LIDC crops) none does.
3. **Rule.** A crop is predicted ambiguous when fewer than ``t`` of its ``n``
   samples show a lesion: ``count < t``, t in 0..n+1 (t = 0: never, t = n + 1:
   always). The threshold is chosen on the validation split to maximise the
   **accuracy**, as the paper does (Appendix E: the threshold with the best
   validation accuracy, test accuracy reported). ``criterion="balanced"``
   maximises the balanced accuracy instead (mean of the recalls of the two
   classes): LIDC has about two ambiguous crops for each unambiguous one, so plain
   accuracy can reward always answering "ambiguous" (t = n + 1), which balanced
   accuracy scores 0.5. Ties: the middle of the first run of best thresholds.
4. **Report.** Each model's accuracy and balanced accuracy on the test split with
   its own validation threshold (as Table 1), histograms of the counts per class
   (as Fig. 12, one panel per model), ``ambiguity.json``, ``ambiguity.md`` and
   ``per_crop.csv`` (written by :func:`lidcseg.reports.ambiguity.write_ambiguity`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.data.eval_split import EvalSplit, load_split, split_file
from lidcseg.errors import LidcsegError
from lidcseg.inference import (
    CT_CHANNELS,
    draw_image_foreground,
    open_runs,
    require_input_size,
    torch_threads,
)
from lidcseg.progress import Progress

#: Threshold selection criteria, the default (the paper's, Appendix E) first.
CRITERIA: tuple[str, ...] = ("accuracy", "balanced")


def presence_ambiguous(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """Whether the graders disagree on presence: (N, G, H, W) bool -> (N,) bool (some empty, some not)."""
    present = graders_marking(masks)
    g = np.asarray(masks).shape[1] if not isinstance(masks, torch.Tensor) else masks.shape[1]
    return (present > 0) & (present < g)


def graders_marking(masks: torch.Tensor | np.ndarray) -> np.ndarray:
    """How many grader masks are non-empty: (N, G, H, W) -> (N,) int."""
    m = torch.as_tensor(np.asarray(masks)) if not isinstance(masks, torch.Tensor) else masks
    return m.flatten(2).any(-1).sum(1).cpu().numpy().astype(np.int64)


def lesion_counts(samples: torch.Tensor, min_pixels: int = 1) -> torch.Tensor:
    """Samples that show a lesion: (B, n, H, W) bool -> (B,) int64, a sample counting when it
    has at least ``min_pixels`` foreground pixels."""
    if min_pixels < 1:
        raise ValueError(f"min_pixels must be >= 1, got {min_pixels}")
    return (samples.flatten(2).sum(-1) >= min_pixels).sum(1)


def predict_ambiguous(counts: np.ndarray, threshold: int) -> np.ndarray:
    """The rule: ambiguous iff ``count < threshold``."""
    return np.asarray(counts) < threshold


def scores(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Accuracy, balanced accuracy, and the recall of each class.

    Balanced accuracy is the mean of the recalls of the classes present (one
    recall if only one class occurs; NaN with no crops).
    """
    predicted, truth = np.asarray(predicted, bool), np.asarray(truth, bool)
    total = truth.size
    pos, neg = int(truth.sum()), int((~truth).sum())
    tp = int((predicted & truth).sum())
    tn = int((~predicted & ~truth).sum())
    recalls = [r for r, c in ((tp / pos if pos else None, pos), (tn / neg if neg else None, neg)) if c]
    return {
        "accuracy": (tp + tn) / total if total else float("nan"),
        "balanced_accuracy": float(np.mean(recalls)) if recalls else float("nan"),
        "recall_ambiguous": tp / pos if pos else float("nan"),
        "recall_unambiguous": tn / neg if neg else float("nan"),
        "ambiguous": pos,
        "unambiguous": neg,
    }


@dataclass(frozen=True)
class ThresholdChoice:
    """The chosen rule ``count < threshold`` and its validation scores."""

    threshold: int
    criterion: str
    accuracy: float
    balanced_accuracy: float


def choose_threshold(
    counts: np.ndarray, ambiguous: np.ndarray, n: int, criterion: str = "accuracy"
) -> ThresholdChoice:
    """The threshold t in 0..n+1 of ``count < t`` that best separates the classes.

    Args:
        counts: (N,) samples showing a lesion, each in 0..n.
        ambiguous: (N,) bool truth.
        n: samples per crop.
        criterion: ``accuracy`` (the paper's, Appendix E) or ``balanced`` (balanced
            accuracy, which does not reward always answering the majority class).

    Returns:
        The best threshold; ties go to the middle (rounded down) of the first
        run of consecutive best thresholds.
    """
    if criterion not in CRITERIA:
        raise LidcsegError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if np.asarray(counts).size == 0:
        raise LidcsegError("no crops to choose an ambiguity threshold on")
    key = "balanced_accuracy" if criterion == "balanced" else "accuracy"
    table = [scores(predict_ambiguous(counts, t), ambiguous) for t in range(n + 2)]
    values = np.array([row[key] for row in table])
    best = np.nanmax(values)
    is_best = np.isclose(values, best, rtol=0, atol=1e-12)
    first = int(np.argmax(is_best))
    last = first
    while last + 1 < len(values) and is_best[last + 1]:
        last += 1
    t = (first + last) // 2
    return ThresholdChoice(t, criterion, table[t]["accuracy"], table[t]["balanced_accuracy"])


def count_lesions(
    model: torch.nn.Module,
    split: EvalSplit,
    n: int = 16,
    *,
    min_pixels: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stage: str = "sample",
) -> np.ndarray:
    """For every crop of ``split``, how many of ``n`` samples show a lesion: (N,) int64.

    The samples are drawn as in ``lidcseg evaluate``
    (:func:`lidcseg.inference.draw_image_foreground`: per-image noise, else one
    generator seeded with ``seed`` consumed batch by batch).
    """
    out = np.empty(len(split), np.int64)
    gen = torch.Generator().manual_seed(int(seed))  # one per run, consumed batch by batch
    for s, e, x in split.batches(batch_size, device):
        samples = draw_image_foreground(model, x, n, split.rows[s:e], seed=seed, generator=gen)
        out[s:e] = lesion_counts(samples, min_pixels).cpu().numpy()
        if progress is not None:
            progress(stage, e, len(split))
    return out


@dataclass
class AmbiguityResult:
    """One run: its threshold (chosen on validation), and per split its counts and predictions.

    Attributes:
        label, path, model: display name, run folder, registry name.
        choice: the rule ``count < threshold`` chosen on the validation split.
        counts: split name -> (N,) samples showing a lesion.
        predicted: split name -> (N,) bool, the rule applied to ``counts``.
        test: :func:`scores` on the test split.
    """

    label: str
    path: str
    model: str
    choice: ThresholdChoice
    counts: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]
    test: dict[str, float]


@dataclass
class Ambiguity:
    """Everything ``lidcseg ambiguity`` computed (see :func:`ambiguity_runs`).

    Attributes:
        splits: split name -> its tiles (validation first, then test).
        truth: split name -> (N,) bool, the graders disagree on presence.
        marking: split name -> (N,) how many grader masks are non-empty.
        results: one :class:`AmbiguityResult` per run, in the order given.
        val_split, test_split: where the threshold is chosen, where it is scored.
        n, min_pixels, criterion, seed: the settings.
    """

    splits: dict[str, EvalSplit]
    truth: dict[str, np.ndarray]
    marking: dict[str, np.ndarray]
    results: list[AmbiguityResult]
    val_split: str
    test_split: str
    n: int
    min_pixels: int
    criterion: str
    seed: int


def ambiguity_runs(
    data_dir: str | Path,
    runs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    val_split: str = "val",
    test_split: str = "test",
    n: int = 16,
    min_pixels: int = 1,
    criterion: str = "accuracy",
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    max_images: int | None = None,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Appendix E for every run: threshold on ``val_split``, accuracy on ``test_split`` (module docstring).

    Args:
        data_dir: folder of ``lidcseg prepare``.
        runs: run directories or checkpoint folders.
        out: report folder (``ambiguity.json``, ``ambiguity.md``, ``per_crop.csv``,
            ``histograms.png``); None writes nothing. Only a new or empty folder, or one
            ``lidcseg ambiguity`` wrote, apart from the data and the runs
            (:data:`lidcseg.reports.ambiguity.AMBIGUITY_OUTPUT`).
        val_split, test_split: split names.
        n: samples per crop.
        min_pixels: foreground pixels for a sample to show a lesion.
        criterion: ``accuracy`` (the paper's) or ``balanced`` (:func:`choose_threshold`).
        seed, device, batch_size, max_images, threads: as :func:`lidcseg.evaluation.evaluate_runs`.
        progress: ``progress(stage, done, total)``.

    Returns:
        The JSON summary (also ``ambiguity.json``): :func:`lidcseg.reports.ambiguity.summary`.
    """
    from lidcseg.io.outputs import check_output_folder
    from lidcseg.reports.ambiguity import AMBIGUITY_OUTPUT, summary, write_ambiguity

    if criterion not in CRITERIA:
        raise LidcsegError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if n < 1 or min_pixels < 1:
        raise LidcsegError(f"need n >= 1 and min_pixels >= 1, got n={n}, min_pixels={min_pixels}")
    for name in (val_split, test_split):
        split_file(data_dir, name)
    inputs = [data_dir, *runs]
    if out is not None:
        check_output_folder(out, AMBIGUITY_OUTPUT, inputs=inputs)  # before the sampling, not after
    with torch_threads(threads):
        opened = open_runs(runs, device, in_channels=CT_CHANNELS)
        size = require_input_size(opened[0])
        splits = {name: load_split(data_dir, name, size, max_images, progress)
                  for name in (val_split, test_split)}
        truth = {name: presence_ambiguous(s.masks) for name, s in splits.items()}
        results = []
        for run in opened:
            counts = {
                name: count_lesions(run.model, s, n, min_pixels=min_pixels, seed=seed,
                                    batch_size=batch_size, device=run.device, progress=progress,
                                    stage=f"{run.label} on {name}")
                for name, s in splits.items()
            }
            choice = choose_threshold(counts[val_split], truth[val_split], n, criterion)
            predicted = {name: predict_ambiguous(c, choice.threshold) for name, c in counts.items()}
            test = scores(predicted[test_split], truth[test_split])
            results.append(AmbiguityResult(run.label, str(run.path), run.name, choice, counts, predicted, test))
    marking = {name: graders_marking(s.masks) for name, s in splits.items()}
    study = Ambiguity(splits, truth, marking, results, val_split, test_split, n, min_pixels, criterion, seed)
    info = summary(study)
    if out is not None:
        write_ambiguity(study, out, info, inputs)
    return info
