"""Detecting lesion-presence ambiguity from samples (the paper's Appendix E, Fig. 12, Table 1).

For some crops the graders disagree on whether there is a lesion at all. A
model that captures this ambiguity should disagree with itself in the same way.

1. **Counts.** For every crop, ``n`` samples (16) are drawn once (seeded, as in
   :mod:`lidcseg.evaluation`) and ``count`` = the number of samples that show a
   lesion: at least ``min_pixels`` foreground pixels (default 1: non-empty).
2. **Truth.** A crop is *ambiguous* when its graders disagree on presence: some
   of its G = 4 masks (padded graders included, as in the paper) are empty and
   some are not. Otherwise it is *unambiguous*: all masks show a lesion, or
   (rarely, 52 of 15,729 LIDC crops) none does.
3. **Rule.** A crop is predicted ambiguous when fewer than ``t`` of its ``n``
   samples show a lesion: ``count < t``, t in 0..n+1 (t = 0: never, t = n + 1:
   always). The threshold is chosen on the validation split to maximise the
   **balanced accuracy** (mean of the recalls of the two classes; LIDC has about
   two ambiguous crops for each unambiguous one, so plain accuracy would reward
   always answering "ambiguous") or, with ``criterion="accuracy"``, the accuracy.
   Ties: the middle of the first run of best thresholds.
4. **Report.** Each model's accuracy and balanced accuracy on the test split with
   its own validation threshold (as Table 1), histograms of the counts per class
   (as Fig. 12, one panel per model), ``ambiguity.json``, ``ambiguity.md`` and
   ``per_crop.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.errors import LidcsegError
from lidcseg.evaluation import (
    Progress,
    iter_samples,
    load_runs,
    load_split,
    split_file,
    torch_threads,
)

#: Threshold selection criteria.
CRITERIA: tuple[str, ...] = ("balanced", "accuracy")
#: Columns of ``per_crop.csv``.
CSV_COLUMNS: tuple[str, ...] = (
    "run", "model", "split", "image", "patient", "graders_marking", "ambiguous", "count", "predicted",
)


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
    counts: np.ndarray, ambiguous: np.ndarray, n: int, criterion: str = "balanced"
) -> ThresholdChoice:
    """The threshold t in 0..n+1 of ``count < t`` that best separates the classes.

    Args:
        counts: (N,) samples showing a lesion, each in 0..n.
        ambiguous: (N,) bool truth.
        n: samples per crop.
        criterion: ``balanced`` (balanced accuracy) or ``accuracy``.

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


@torch.no_grad()
def count_lesions(
    model: torch.nn.Module,
    split: Any,
    n: int = 16,
    *,
    min_pixels: int = 1,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    progress: Progress | None = None,
    stage: str = "sample",
) -> np.ndarray:
    """For every crop of ``split`` (:class:`~lidcseg.evaluation.EvalSplit`), how many of ``n``
    samples show a lesion: (N,) int64."""
    out = np.empty(len(split), np.int64)
    for s, e, samples in iter_samples(model, split, n, seed=seed, batch_size=batch_size, device=device):
        out[s:e] = lesion_counts(samples, min_pixels).cpu().numpy()
        if progress is not None:
            progress(stage, e, len(split))
    return out


@dataclass
class AmbiguityResult:
    """One run: its threshold (chosen on validation) and its counts and scores on both splits."""

    label: str
    path: str
    model: str
    choice: ThresholdChoice
    counts: dict[str, np.ndarray]
    test: dict[str, float]


def ambiguity_runs(
    data_dir: str | Path,
    runs: Sequence[str | Path],
    *,
    out: str | Path | None = None,
    val_split: str = "val",
    test_split: str = "test",
    n: int = 16,
    min_pixels: int = 1,
    criterion: str = "balanced",
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
            ``histograms.png``); None writes nothing.
        val_split, test_split: split names.
        n: samples per crop.
        min_pixels: foreground pixels for a sample to show a lesion.
        criterion: ``balanced`` or ``accuracy``.
        seed, device, batch_size, max_images, threads: as :func:`lidcseg.evaluation.evaluate_runs`.
        progress: ``progress(stage, done, total)``.

    Returns:
        The JSON summary (also ``ambiguity.json``).
    """
    if criterion not in CRITERIA:
        raise LidcsegError(f"unknown criterion {criterion!r}; valid: {', '.join(CRITERIA)}")
    if n < 1 or min_pixels < 1:
        raise LidcsegError(f"need n >= 1 and min_pixels >= 1, got n={n}, min_pixels={min_pixels}")
    for name in (val_split, test_split):
        split_file(data_dir, name)
    with torch_threads(threads):
        models = load_runs(runs, device)
        splits = {name: load_split(data_dir, name, models[0].input_size, max_images, progress)
                  for name in (val_split, test_split)}
        truth = {name: presence_ambiguous(s.masks) for name, s in splits.items()}
        results = []
        for rm in models:
            counts = {
                name: count_lesions(rm.model, s, n, min_pixels=min_pixels, seed=seed,
                                    batch_size=batch_size, device=rm.device, progress=progress,
                                    stage=f"{rm.label} on {name}")
                for name, s in splits.items()
            }
            choice = choose_threshold(counts[val_split], truth[val_split], n, criterion)
            test = scores(predict_ambiguous(counts[test_split], choice.threshold), truth[test_split])
            results.append(AmbiguityResult(rm.label, str(rm.path), rm.name, choice, counts, test))
    info = _summary(results, splits, truth, val_split, test_split, n, min_pixels, criterion, seed)
    if out is not None:
        _write(Path(out), info, results, splits, truth, val_split, test_split, n)
    return info


def _summary(
    results: list[AmbiguityResult], splits: dict[str, Any], truth: dict[str, np.ndarray],
    val_split: str, test_split: str, n: int, min_pixels: int, criterion: str, seed: int,
) -> dict[str, Any]:
    return {
        "format": "lidcseg-ambiguity",
        "version": 1,
        "rule": f"ambiguous iff fewer than t of {n} samples show a lesion (>= {min_pixels} px)",
        "truth": "ambiguous iff some grader masks are empty and some are not",
        "criterion": "balanced accuracy" if criterion == "balanced" else "accuracy",
        "threshold_split": val_split,
        "test_split": test_split,
        "samples": n,
        "min_pixels": min_pixels,
        "seed": seed,
        "crops": {name: {"total": len(s), "ambiguous": int(truth[name].sum())} for name, s in splits.items()},
        "runs": [
            {"label": r.label, "run": r.path, "model": r.model, "threshold": r.choice.threshold,
             "val_accuracy": r.choice.accuracy, "val_balanced_accuracy": r.choice.balanced_accuracy,
             "test": r.test}
            for r in results
        ],
    }


def _write(
    out: Path, info: dict[str, Any], results: list[AmbiguityResult], splits: dict[str, Any],
    truth: dict[str, np.ndarray], val_split: str, test_split: str, n: int,
) -> None:
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports.plots import plot_presence_histograms
    from lidcseg.reports.tables import fmt, markdown_table, write_csv

    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "ambiguity.json", info)
    rows = [[r["label"], r["model"], r["threshold"], fmt(r["val_balanced_accuracy"]),
             fmt(r["test"]["accuracy"]), fmt(r["test"]["balanced_accuracy"]),
             fmt(r["test"]["recall_ambiguous"]), fmt(r["test"]["recall_unambiguous"])]
            for r in info["runs"]]
    crops = info["crops"]
    md = "\n".join([
        "# Lesion-presence ambiguity detection (Appendix E, Table 1)",
        "",
        f"Rule: {info['rule']}; t chosen on `{val_split}` by {info['criterion']}. Truth: {info['truth']}. "
        f"`{val_split}`: {crops[val_split]['ambiguous']}/{crops[val_split]['total']} ambiguous, "
        f"`{test_split}`: {crops[test_split]['ambiguous']}/{crops[test_split]['total']} ambiguous.",
        "",
        markdown_table(["run", "model", "t", f"{val_split} bal. acc.", f"{test_split} accuracy",
                        f"{test_split} bal. acc.", "recall ambiguous", "recall unambiguous"], rows),
        "",
    ])
    write_bytes_atomic(out / "ambiguity.md", md.encode())
    csv_rows = []
    for r in results:
        for name, s in splits.items():
            present = graders_marking(s.masks)
            pred = predict_ambiguous(r.counts[name], r.choice.threshold)
            for i in range(len(s)):
                csv_rows.append([r.label, r.model, name, int(s.rows[i]), s.patient[i], int(present[i]),
                                 int(truth[name][i]), int(r.counts[name][i]), int(pred[i])])
    write_csv(out / "per_crop.csv", CSV_COLUMNS, csv_rows)
    t = truth[test_split]
    panels = {
        r.label: {
            "ambiguous": r.counts[test_split][t],
            "unambiguous": r.counts[test_split][~t],
            "threshold": r.choice.threshold,
            "subtitle": f"{test_split}: accuracy {fmt(r.test['accuracy'])}, "
                        f"balanced {fmt(r.test['balanced_accuracy'])} (t = {r.choice.threshold})",
        }
        for r in results
    }
    plot_presence_histograms(
        panels, n, out / "histograms.png",
        title=f"Samples showing a lesion per {test_split} crop, ambiguous vs unambiguous (threshold from {val_split})",
    )
