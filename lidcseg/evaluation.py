"""Per-image evaluation of trained runs on one split (the paper's Section 4.2 and Fig. 4).

``evaluate_runs(data_dir, runs, out=...)`` is what ``lidcseg evaluate`` runs. For
each run (a ``lidcseg train`` run directory or a checkpoint folder) and each
image of the split:

1. **Input.** The split in memory (:func:`lidcseg.data.eval_split.load_split`):
   the centre ``input_size`` tile of each crop, HU normalised exactly as in
   training, and all G = 4 grader masks cut to the same tile (padded graders are
   empty masks, as in the paper). ``max_images`` takes that many crops evenly
   spaced over the file (the file is ordered by patient). All runs must share
   one input size: their metrics would otherwise score different tiles.
2. **Samples.** ``model.sample(x, n_max)`` draws ``n_max = max(counts)`` (16)
   hypotheses per image ONCE; the metrics at n = 1, 4, 8, 16 use the FIRST n
   of them, so the n-sample values are nested, as the paper's Fig. 4 is usually
   computed. Foreground is any class but 0 (:func:`lidcseg.inference.foreground_of`).
   Models whose ``samples_per_count`` is set (the U-Net ensemble, whose
   ``sample(x, n)`` returns its first n members, no randomness) are instead
   called with ``sample(x, n)`` for every n: an ensemble is evaluated with as
   many members as samples.
3. **Metrics** per image and sample count (:mod:`lidcseg.metrics.extra`, one IoU
   matrix per image for every n), with d = 1 - IoU and d(empty, empty) = 0
   (Appendix B): D^2_GED (Eq. 6; V-statistic by default, the published
   convention, or the U-statistic with ``unbiased``), the sample diversity
   E[d(S, S')] (the same statistic) and the Hungarian-matched IoU (both sets
   replicated to lcm(n, 4)).
4. **Comparison.** A two-sided Wilcoxon signed-rank test, paired per image,
   between the reference run (the first Prob. U-Net run, else the first run)
   and each other run, on GED and HM-IoU at 16 samples (the largest count if 16
   is not evaluated).

**Seeding** (:func:`lidcseg.inference.draw_image_foreground`). Every run's
latents come from the same seed. A model whose ``sample`` takes ``eps`` gets
per-image noise drawn from ``SeedSequence([seed, row])`` (independent of batch
size and ``max_images``, and the same noise for every such run); other models
get one ``torch.Generator`` seeded with ``seed`` per run, consumed batch by
batch (the same seed and batch size give the same samples).

Outputs (written by :func:`lidcseg.reports.evaluation.write_evaluation`):
``summary.json``, ``summary.md``, ``per_image.csv`` (run, model, row, patient,
n, ged, diversity, hm_iou, cross, grader_diversity), ``ged.png`` (the GED
distribution per model against n, as Fig. 4a) and ``examples.png`` (grader
masks and samples of crops where the graders disagree, as Fig. 3a / Appendix
F). Nothing here prints: progress goes to the ``progress(stage, done, total)``
callback.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
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
from lidcseg.metrics.stats import wilcoxon_paired
from lidcseg.progress import Progress

#: Sample counts of the paper's Fig. 4.
DEFAULT_COUNTS: tuple[int, ...] = (1, 4, 8, 16)
#: The Prob. U-Net's registry name: the reference of the Wilcoxon tests.
PROBUNET = "probunet"
#: Sample count of the Wilcoxon comparison (the paper's Fig. 4 highlights 16).
COMPARE_AT = 16
#: Metrics compared with the Wilcoxon test.
COMPARED_METRICS: tuple[str, ...] = ("ged", "hm_iou")


# -- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Per-image metrics of one run.

    Attributes:
        label, path, model: display name, run folder, registry name.
        counts: the sample counts, ascending.
        metrics: name (:data:`lidcseg.metrics.extra.METRIC_NAMES`) -> (len(counts), N) float64.
        examples: position in the split -> (max(counts), T, T) bool samples kept for the figure.
        sampling: ``prefix`` (first n of one draw) or ``per-count`` (``sample(x, n)`` per n).
        info: checkpoint description; time_s: wall time of sampling + metrics.
    """

    label: str
    path: str
    model: str
    counts: tuple[int, ...]
    metrics: dict[str, np.ndarray]
    examples: dict[int, np.ndarray] = field(default_factory=dict)
    sampling: str = "prefix"
    info: dict[str, Any] = field(default_factory=dict)
    time_s: float = 0.0

    def values(self, metric: str, n: int) -> np.ndarray:
        """(N,) per-image values of ``metric`` at ``n`` samples."""
        return self.metrics[metric][self.counts.index(n)]


def evaluate_model(
    model: torch.nn.Module,
    split: EvalSplit,
    counts: Sequence[int] = DEFAULT_COUNTS,
    *,
    seed: int = 0,
    unbiased: bool = False,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
    keep: Sequence[int] = (),
    progress: Progress | None = None,
    stage: str = "evaluate",
) -> tuple[dict[str, np.ndarray], dict[int, np.ndarray], str]:
    """Sample and score one model on every image of ``split``.

    Args:
        model: a harness model (``sample(x, n, generator=...) -> (B, n, C, T, T)``), on
            ``device``; its ``samples_per_count`` (default False) decides the sampling.
        split: from :func:`lidcseg.data.eval_split.load_split`.
        counts: sample counts n (each >= 1; >= 2 with ``unbiased``).
        seed: seed of the latents (module docstring).
        unbiased: U-statistic GED and diversity instead of the V-statistic.
        batch_size: images per model call.
        device: where the model runs (and the IoU matrices are computed).
        keep: split positions whose max(counts) samples are returned.
        progress: ``progress(stage, images done, N)``.

    Returns:
        ``(metrics, kept, sampling)``: metrics name -> (len(counts), N) float64;
        kept position -> (max(counts), T, T) bool; ``prefix`` or ``per-count``.
    """
    from lidcseg.metrics.extra import METRIC_NAMES, joint_iou, prefix_metrics

    counts = tuple(sorted({int(c) for c in counts}))
    if not counts or counts[0] < 1:
        raise LidcsegError(f"sample counts must be >= 1, got {counts}")
    if unbiased and counts[0] < 2:
        raise LidcsegError("the unbiased (U-statistic) GED needs at least 2 samples; drop n = 1")
    n_max, total = counts[-1], len(split)
    per_count = bool(getattr(model, "samples_per_count", False))
    metrics = {k: np.empty((len(counts), total)) for k in METRIC_NAMES}
    kept: dict[int, np.ndarray] = {}
    keep_set = set(int(k) for k in keep)
    gen = torch.Generator().manual_seed(int(seed))  # one per run, consumed batch by batch
    with torch.no_grad():
        for s, e, x in split.batches(batch_size, device):
            graders = split.masks[s:e].to(device)
            rows = split.rows[s:e]
            if per_count:
                by_count = {}
                for c in counts:
                    samples = draw_image_foreground(model, x, c, rows, seed=seed, generator=gen)
                    by_count[c] = prefix_metrics(joint_iou(samples, graders), c, [c], unbiased)[c]
            else:
                samples = draw_image_foreground(model, x, n_max, rows, seed=seed, generator=gen)
                by_count = prefix_metrics(joint_iou(samples, graders), n_max, counts, unbiased)
            for j, c in enumerate(counts):
                for k in METRIC_NAMES:
                    metrics[k][j, s:e] = by_count[c][k]
            for pos in keep_set.intersection(range(s, e)):
                kept[pos] = samples[pos - s].cpu().numpy()
            if progress is not None:
                progress(stage, e, total)
    return metrics, kept, "per-count" if per_count else "prefix"


# -- example crops ------------------------------------------------------------------------------


def grader_disagreement(masks: torch.Tensor) -> torch.Tensor:
    """Mean d = 1 - IoU over the distinct pairs of grader masks: (N, G, T, T) -> (N,)."""
    from lidcseg.metrics.ged import sample_diversity

    return sample_diversity(masks, unbiased=True)


def disagreement_examples(masks: torch.Tensor, k: int, lesion: np.ndarray | None = None) -> list[int]:
    """``k`` crops where the graders disagree, for the qualitative figure.

    Half (rounded up) from crops where the graders disagree on the lesion's
    presence (some masks empty, some not), the rest from crops that all
    graders marked differently, each group ordered by :func:`grader_disagreement`
    (ties: file order); short groups are filled from all crops in that order.
    One crop per lesion (``lesion`` keys) as long as possible
    (:func:`lidcseg.reports.examples.choose_examples` picks).

    Args:
        masks: (N, G, T, T) bool grader masks.
        k: crops wanted.
        lesion: (N,) lesion keys, or None (every crop its own lesion).

    Returns:
        Positions, ordered presence-ambiguous first, at most ``min(k, N)``.
    """
    from lidcseg.reports.examples import choose_examples

    n = masks.shape[0]
    if k <= 0 or n == 0:
        return []
    score = grader_disagreement(masks).numpy()
    present = masks.flatten(2).any(-1).numpy()  # (N, G)
    mixed = present.any(1) & ~present.all(1)
    full = present.all(1) & (score > 0)
    order = np.lexsort((np.arange(n), -score))  # by score descending, then position
    return choose_examples(k, [order[mixed[order]], order[full[order]], order],
                           quotas=[(k + 1) // 2, k, k], keys=lesion)


# -- comparison ---------------------------------------------------------------------------------


def reference_index(results: Sequence[RunResult]) -> int:
    """The first Prob. U-Net run, else the first run."""
    return next((i for i, r in enumerate(results) if r.model == PROBUNET), 0)


def compare_runs(results: Sequence[RunResult], at: int = COMPARE_AT) -> list[dict[str, Any]]:
    """Wilcoxon tests of the reference run (:func:`reference_index`) against every other run.

    At ``at`` samples if evaluated, else at the largest common count; on each of
    :data:`COMPARED_METRICS`. Returns one dict per (other run, metric).
    """
    if len(results) < 2:
        return []
    common = sorted(set.intersection(*(set(r.counts) for r in results)))
    n = at if at in common else common[-1]
    ref = results[reference_index(results)]
    rows = []
    for other in results:
        if other is ref:
            continue
        for metric in COMPARED_METRICS:
            test = wilcoxon_paired(ref.values(metric, n), other.values(metric, n))
            rows.append({"reference": ref.label, "other": other.label, "metric": metric, "n": n, **test})
    return rows


# -- the whole evaluation -----------------------------------------------------------------------


@dataclass
class Evaluation:
    """Everything ``lidcseg evaluate`` computed (see :func:`evaluate_runs`).

    Attributes:
        split: the evaluated split (its tiles, masks and ids).
        split_name: ``test``, ``val`` ...
        counts: sample counts.
        results: one :class:`RunResult` per run, in the order given.
        examples: split positions of the example crops.
        comparisons: from :func:`compare_runs`.
        settings: seed, unbiased, device, batch size, max images.
    """

    split: EvalSplit
    split_name: str
    counts: tuple[int, ...]
    results: list[RunResult]
    examples: list[int]
    comparisons: list[dict[str, Any]]
    settings: dict[str, Any]

    @property
    def reference(self) -> str | None:
        """Label of the reference run of the Wilcoxon tests (:func:`reference_index`)."""
        return self.results[reference_index(self.results)].label if self.results else None


def evaluate_runs(
    data_dir: str | Path,
    runs: Sequence[str | Path],
    *,
    split: str = "test",
    counts: Sequence[int] = DEFAULT_COUNTS,
    out: str | Path | None = None,
    seed: int = 0,
    unbiased: bool = False,
    device: str = "auto",
    batch_size: int = 16,
    max_images: int | None = None,
    examples: int = 6,
    threads: int = 0,
    progress: Progress | None = None,
) -> Evaluation:
    """Evaluate every run on ``DATA/<split>.h5`` and (with ``out``) write the report.

    See the module docstring for the protocol and
    :func:`lidcseg.reports.evaluation.write_evaluation` for the files.

    Args:
        data_dir: folder of ``lidcseg prepare``.
        runs: run directories or checkpoint folders.
        split: the split file's name.
        counts: sample counts (default 1, 4, 8, 16).
        out: report folder (created; its files are replaced); None writes nothing. Only a
            new or empty folder, or one ``lidcseg evaluate`` wrote, apart from the data and
            the runs (:data:`lidcseg.reports.evaluation.EVALUATION_OUTPUT`).
        seed: latent noise seed, the same for every run.
        unbiased: U-statistic GED and diversity.
        device: ``auto``, ``cpu`` or ``cuda``.
        batch_size: images per model call.
        max_images: evaluate at most this many crops (evenly spaced).
        examples: crops in the qualitative figure (0: no figure).
        threads: torch CPU threads (0: unchanged).
        progress: ``progress(stage, done, total)``.
    """
    counts = tuple(sorted({int(c) for c in counts}))
    if not counts or counts[0] < 1:
        raise LidcsegError(f"sample counts must be >= 1, got {','.join(map(str, counts))}")
    if unbiased and counts[0] < 2:
        raise LidcsegError("the unbiased (U-statistic) GED needs at least 2 samples; drop n = 1")
    if batch_size < 1:
        raise LidcsegError(f"batch size must be >= 1, got {batch_size}")
    split_file(data_dir, split)  # a missing split fails before any model loads
    inputs = [data_dir, *runs]
    if out is not None:
        from lidcseg.io.outputs import check_output_folder
        from lidcseg.reports.evaluation import EVALUATION_OUTPUT

        check_output_folder(out, EVALUATION_OUTPUT, inputs=inputs)  # before the sampling, not after
    with torch_threads(threads):
        opened = open_runs(runs, device, in_channels=CT_CHANNELS)
        data = load_split(data_dir, split, require_input_size(opened[0]), max_images, progress)
        chosen = disagreement_examples(data.masks, examples, data.lesion)
        results = []
        for run in opened:
            t0 = time.perf_counter()
            metrics, kept, sampling = evaluate_model(
                run.model, data, counts, seed=seed, unbiased=unbiased, batch_size=batch_size,
                device=run.device, keep=chosen, progress=progress, stage=f"evaluate {run.label}",
            )
            results.append(RunResult(run.label, str(run.path), run.name, counts, metrics, kept, sampling,
                                     dict(run.info), time.perf_counter() - t0))
    evaluation = Evaluation(
        data, split, counts, results, chosen, compare_runs(results),
        {"seed": seed, "unbiased": unbiased, "device": str(opened[0].device),
         "batch_size": batch_size, "max_images": max_images, "data": str(Path(data_dir))},
    )
    if out is not None:
        from lidcseg.reports.evaluation import write_evaluation

        if progress is not None:
            progress("write report", 0, 1)
        write_evaluation(evaluation, out, inputs)
        if progress is not None:
            progress("write report", 1, 1)
    return evaluation
