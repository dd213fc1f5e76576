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
   **M-Heads** (Section 3.2: "We train M-Heads models with the corresponding
   number of heads"): the M-Heads runs form ONE row (``mh4+mh8+...``) whose value
   at n comes from the run with n heads (:func:`plan_methods`); n = 1 without a
   1-head run is the first head of the smallest model, labelled so. A count no
   run has heads for is refused, naming what to train. ``m_heads="prefix"``
   (not the paper's) makes each M-Heads run a row scored on its first n heads.
   Every row records which run served each n, and how (``RunResult.sources``).
3. **Metrics** per image and sample count (:mod:`lidcseg.metrics.extra`, one IoU
   matrix per image for every n), with d = 1 - IoU and d(empty, empty) = 0
   (Appendix B): D^2_GED (Eq. 6; V-statistic by default, the published
   convention, or the U-statistic with ``unbiased``), the sample diversity
   E[d(S, S')] (the same statistic) and the Hungarian-matched IoU (both sets
   replicated to lcm(n, 4)).
4. **Comparison.** A two-sided Wilcoxon signed-rank test, paired per image,
   between the reference row (the first Prob. U-Net run, else the first row)
   and each other row, on GED and HM-IoU at 16 samples (the largest count if 16
   is not evaluated); the M-Heads row with the values of its model for that n.

**Seeding** (:func:`lidcseg.inference.draw_image_foreground`). Every run's
latents come from the same seed. A model whose ``sample`` takes ``eps`` gets
per-image noise drawn from ``SeedSequence([seed, row])`` (independent of batch
size and ``max_images``, and the same noise for every such run); other models
get one ``torch.Generator`` seeded with ``seed`` per run, consumed batch by
batch (the same seed and batch size give the same samples).

Outputs: ``summary.json``, ``summary.md``, ``per_image.csv``, ``ged.png`` (Fig. 4a)
and ``examples.png`` (Fig. 3a), by :func:`lidcseg.reports.evaluation.write_evaluation`.
Nothing here prints: progress goes to the ``progress(stage, done, total)`` callback.
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
    OpenRun,
    draw_image_foreground,
    open_runs,
    require_input_size,
    torch_threads,
    unique_labels,
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
#: The M-Heads registry name; its runs are grouped by head count (Section 3.2).
M_HEADS = "m-heads"
#: How M-Heads runs are scored (``--m-heads``): ``matched`` (the run with n heads serves n,
#: the paper's) or ``prefix`` (each run its own row, its first n heads).
M_HEADS_RULES: tuple[str, ...] = ("matched", "prefix")


# -- one run ------------------------------------------------------------------------------------


@dataclass
class RunResult:
    """Per-image metrics of one run.

    Attributes:
        label, path, model: display name, run folder ("" for a row of several runs), registry name.
        counts: the sample counts, ascending.
        metrics: name (:data:`lidcseg.metrics.extra.METRIC_NAMES`) -> (len(counts), N) float64.
        examples: position in the split -> (max(counts), T, T) bool samples kept for the figure.
        sampling: ``prefix`` (first n of one draw), ``per-count`` (``sample(x, n)`` per n) or
            ``model-per-count`` (M-Heads: the run with n heads per n).
        info: checkpoint description; time_s: wall time of sampling + metrics.
        sources: n -> which run served n: ``run`` (label), ``path``, ``checkpoint``,
            ``step``, ``heads`` (M-Heads, else None) and ``uses`` (e.g. ``all 4 heads``).
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
    sources: dict[int, dict[str, Any]] = field(default_factory=dict)

    def values(self, metric: str, n: int) -> np.ndarray:
        """(N,) per-image values of ``metric`` at ``n`` samples."""
        return self.metrics[metric][self.counts.index(n)]


def check_counts(counts: Sequence[int], unbiased: bool = False) -> tuple[int, ...]:
    """The distinct sample counts, ascending; each >= 1 (>= 2 for the U-statistic), else LidcsegError."""
    counts = tuple(sorted({int(c) for c in counts}))
    if not counts or counts[0] < 1:
        raise LidcsegError(f"sample counts must be >= 1, got {','.join(map(str, counts))}")
    if unbiased and counts[0] < 2:
        raise LidcsegError("the unbiased (U-statistic) GED needs at least 2 samples; drop n = 1")
    return counts


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

    counts = check_counts(counts, unbiased)
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


# -- rows of the report: which run serves which count ----------------------------------------------


@dataclass
class Method:
    """One row of the report: ``serve[n] = (run, how)`` for every sample count n; ``sampling``:
    ``model-per-count`` for the M-Heads row, else None (the run's own, from :func:`evaluate_model`)."""

    label: str
    model: str
    serve: dict[int, tuple[OpenRun, str]]
    sampling: str | None = None

    @property
    def runs(self) -> list[OpenRun]:
        """The distinct runs serving this row, in order of the counts."""
        return list({id(r): r for r, _ in self.serve.values()}.values())


def _heads(run: OpenRun) -> int:
    return int(run.config.num_heads)


def _m_heads_row(runs: Sequence[OpenRun], counts: tuple[int, ...]) -> Method:
    """One row for all M-Heads runs: n is served by the run with n heads (Section 3.2).

    Raises:
        LidcsegError: a count (other than 1) without a run of that many heads (naming what
            to train), a run that serves no count (e.g. a second run with the same heads).
    """
    by_heads: dict[int, OpenRun] = {}
    for r in runs:
        by_heads.setdefault(_heads(r), r)
    missing = [n for n in counts if n not in by_heads and n != 1]
    if missing:
        given = ", ".join(f"{r.label} with {_heads(r)}" for r in sorted(runs, key=_heads))
        ns = ", ".join(map(str, missing))
        more = f" (likewise {', '.join(map(str, missing[1:]))})" if len(missing) > 1 else ""
        models = f"models with {' and '.join(map(str, missing))}" if more else f"a model with {ns}"
        raise LidcsegError(
            f"M-Heads at n = {ns} needs {models} heads "
            f"(Section 3.2; given: {given} heads): train `lidcseg train --model m-heads --set "
            f"model.num_heads={missing[0]}`{more} and add it with --run, drop the count from -n, "
            "or pass --m-heads prefix to take the first n heads of one model")
    smallest = by_heads[min(by_heads)]
    serve = {n: (by_heads[n], f"all {n} heads") if n in by_heads
             else (smallest, f"head 1 of {_heads(smallest)} (no 1-head run)") for n in counts}
    unused = [r for r in runs if all(r is not s for s, _ in serve.values())]
    if unused:
        r, k = unused[0], _heads(unused[0])
        why = (f"{by_heads[k].label} has {k} heads too (one model per count, Section 3.2); evaluate it "
               "separately, or pass --m-heads prefix" if by_heads[k] is not r else f"drop it, or add {k} to -n")
        raise LidcsegError(f"M-Heads run {r.label} ({k} heads) serves none of n = "
                           f"{', '.join(map(str, counts))}: {why}")
    label = "+".join(r.label for r in sorted(runs, key=_heads))
    return Method(label, M_HEADS, serve, "model-per-count")


def plan_methods(opened: Sequence[OpenRun], counts: Sequence[int], m_heads: str = "matched") -> list[Method]:
    """The rows of the report, in the order of the runs (the M-Heads row where its first run is).

    Each run is its own row, serving every count as :func:`evaluate_model` samples it, except
    the M-Heads runs with ``m_heads="matched"`` (default): one row (:func:`_m_heads_row`).

    Raises:
        LidcsegError: ``m_heads`` not in :data:`M_HEADS_RULES`; the M-Heads runs cannot serve ``counts``.
    """
    if m_heads not in M_HEADS_RULES:
        raise LidcsegError(f"--m-heads must be {' or '.join(M_HEADS_RULES)}, got {m_heads!r}")
    counts = tuple(sorted({int(c) for c in counts}))
    grouped = [r for r in opened if r.name == M_HEADS] if m_heads == "matched" else []
    rows = []
    for r in opened:
        if any(r is g for g in grouped):
            if r is grouped[0]:
                rows.append(_m_heads_row(grouped, counts))
            continue
        how = (f"first {{n}} of {_heads(r)} heads (--m-heads prefix, not the paper's protocol)"
               if r.name == M_HEADS else "first {n} members" if getattr(r.model, "samples_per_count", False)
               else f"first {{n}} of {counts[-1]} samples drawn once")
        rows.append(Method(r.label, r.name, {n: (r, how.format(n=n)) for n in counts}))
    for row, label in zip(rows, unique_labels([m.label for m in rows]), strict=True):
        row.label = label
    return rows


def evaluate_method(
    method: Method,
    split: EvalSplit,
    *,
    seed: int = 0,
    unbiased: bool = False,
    batch_size: int = 16,
    keep: Sequence[int] = (),
    progress: Progress | None = None,
) -> RunResult:
    """Score one row: :func:`evaluate_model` once per serving run, on the counts it serves.

    A row of one run is exactly ``evaluate_model(run.model, split, counts)``; the examples come
    from the run serving max(counts)."""
    from lidcseg.metrics.extra import METRIC_NAMES

    t0 = time.perf_counter()
    counts = tuple(sorted(method.serve))
    metrics = {k: np.empty((len(counts), len(split))) for k in METRIC_NAMES}
    kept: dict[int, np.ndarray] = {}
    sampling = method.sampling
    for run in method.runs:
        served = tuple(n for n in counts if method.serve[n][0] is run)
        top = counts[-1] in served
        got, k, sampling_of_run = evaluate_model(
            run.model, split, served, seed=seed, unbiased=unbiased, batch_size=batch_size,
            device=run.device, keep=keep if top else (), progress=progress, stage=f"evaluate {run.label}")
        for j, n in enumerate(served):
            for name in METRIC_NAMES:
                metrics[name][counts.index(n)] = got[name][j]
        kept = k if top else kept
        sampling = sampling or sampling_of_run
    first, single = method.runs[0], len(method.runs) == 1
    sources = {n: {"run": r.label, "path": str(r.path), "checkpoint": str(r.checkpoint),
                   "step": r.info.get("step"), "heads": _heads(r) if r.name == M_HEADS else None,
                   "uses": uses} for n, (r, uses) in method.serve.items()}
    info = dict(first.info) if single else {"runs": [dict(r.info) for r in method.runs]}
    return RunResult(method.label, str(first.path) if single else "", method.model, counts, metrics, kept,
                     sampling, info, time.perf_counter() - t0, sources)


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
    m_heads: str = "matched",
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
        m_heads: ``matched`` (one row of all M-Heads runs, n served by the run with n heads,
            Section 3.2) or ``prefix`` (each its own row, its first n heads); :func:`plan_methods`.
        progress: ``progress(stage, done, total)``.
    """
    counts = check_counts(counts, unbiased)
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
        methods = plan_methods(opened, counts, m_heads)  # before any sampling
        data = load_split(data_dir, split, require_input_size(opened[0]), max_images, progress)
        chosen = disagreement_examples(data.masks, examples, data.lesion)
        results = [evaluate_method(m, data, seed=seed, unbiased=unbiased, batch_size=batch_size,
                                   keep=chosen, progress=progress) for m in methods]
    evaluation = Evaluation(
        data, split, counts, results, chosen, compare_runs(results),
        {"seed": seed, "unbiased": unbiased, "device": str(opened[0].device),
         "batch_size": batch_size, "max_images": max_images, "data": str(Path(data_dir)),
         "m_heads": m_heads},
    )
    if out is not None:
        from lidcseg.reports.evaluation import write_evaluation

        if progress is not None:
            progress("write report", 0, 1)
        write_evaluation(evaluation, out, inputs)
        if progress is not None:
            progress("write report", 1, 1)
    return evaluation
