"""Per-image evaluation of trained runs on one split (the paper's Section 4.2 and Fig. 4).

``evaluate_runs(data_dir, runs, out=...)`` is what ``lidcseg evaluate`` runs. For
each run (a ``lidcseg train`` run directory or a checkpoint folder) and each
image of the split:

1. **Input.** The evaluation dataset of training (:class:`~lidcseg.data.dataset.CropEvalDataset`):
   the centre ``input_size`` tile of each crop, HU normalised exactly as in
   training, and all G = 4 grader masks cut to the same tile (padded graders are
   empty masks, as in the paper). ``max_images`` takes that many crops evenly
   spaced over the file (the file is ordered by patient). All runs must share
   one input size: their metrics would otherwise score different tiles.
2. **Samples.** ``model.sample(x, n_max)`` draws ``n_max = max(counts)`` (16)
   hypotheses per image ONCE; the metrics at n = 1, 4, 8, 16 use the FIRST n
   of them, so the n-sample values are nested, as the paper's Fig. 4 is usually
   computed. A hypothesis is the argmax class map; foreground is any class but 0.
   Models in :data:`PER_COUNT_MODELS` (the U-Net ensemble, whose ``sample(x, n)``
   returns its first n members, no randomness) are instead called with
   ``sample(x, n)`` for every n: an ensemble is evaluated with as many members
   as samples.
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

**Seeding.** Every run's latents come from the same seed. A model whose
``sample`` takes ``eps`` gets per-image noise drawn from
``SeedSequence([seed, row])`` (independent of batch size and ``max_images``,
and the same noise for every such run); other models get one
``torch.Generator`` seeded with ``seed`` per run, consumed batch by batch (the
same seed and batch size give the same samples).

Outputs (:func:`write_evaluation`): ``summary.json``, ``summary.md``,
``per_image.csv`` (run, model, row, patient, n, ged, diversity, hm_iou, cross,
grader_diversity), ``ged.png`` (the GED distribution per model against n, as
Fig. 4a) and ``examples.png`` (grader masks and samples of crops where the
graders disagree, as Fig. 3a / Appendix F). Nothing here prints: progress goes
to the ``progress(stage, done, total)`` callback.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lidcseg.errors import LidcsegError

#: Sample counts of the paper's Fig. 4.
DEFAULT_COUNTS: tuple[int, ...] = (1, 4, 8, 16)
#: The Prob. U-Net's registry name: the reference of the Wilcoxon tests.
PROBUNET = "probunet"
#: Models without sampling noise whose ``sample(x, n)`` gives n members (called per count).
PER_COUNT_MODELS: frozenset[str] = frozenset({"unet-ensemble"})
#: Sample count of the Wilcoxon comparison (the paper's Fig. 4 highlights 16).
COMPARE_AT = 16
#: Metrics compared with the Wilcoxon test.
COMPARED_METRICS: tuple[str, ...] = ("ged", "hm_iou")
#: Columns of ``per_image.csv``.
CSV_COLUMNS: tuple[str, ...] = (
    "run", "model", "image", "patient", "n", "ged", "diversity", "hm_iou", "cross", "grader_diversity",
)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``: what the library reports instead of printing."""


# -- the split in memory ------------------------------------------------------------------------


@dataclass
class EvalSplit:
    """Evaluation tiles of one split, in memory (about 130 MB per 1000 crops at 128 x 128).

    Attributes:
        path: the split file.
        input_size: T.
        images: (N, 1, T, T) float32, HU normalised as in training.
        masks: (N, G, T, T) bool grader masks (padded graders empty).
        rows: (N,) int64 row of each crop in the file (the ``image`` column of the CSV).
        patient: (N,) str patient id.
        lesion: (N,) str ``patient/scan/lesion`` key (one per lesion, shared by its slices).
    """

    path: Path
    input_size: int
    images: torch.Tensor
    masks: torch.Tensor
    rows: np.ndarray
    patient: np.ndarray
    lesion: np.ndarray

    def __len__(self) -> int:
        return int(self.images.shape[0])


def split_file(data_dir: str | Path, split: str) -> Path:
    """``DATA/<split>.h5``, or a one-line error naming what is missing."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LidcsegError("data directory not found", data_dir)
    path = data_dir / f"{split}.h5"
    if not path.is_file():
        raise LidcsegError(f"missing split file {path.name} (run `lidcseg prepare` first)", path)
    return path


def load_split(
    data_dir: str | Path,
    split: str,
    input_size: int,
    max_images: int | None = None,
    progress: Progress | None = None,
) -> EvalSplit:
    """Load the evaluation tiles of ``DATA/<split>.h5`` (see :class:`EvalSplit`).

    Args:
        data_dir: folder of ``lidcseg prepare``.
        split: ``train``, ``val`` or ``test``.
        input_size: T, the models' input tile size.
        max_images: at most this many crops, evenly spaced over the file.
        progress: ``progress("load <split>", done, total)``.
    """
    from lidcseg.data.dataset import CropEvalDataset

    path = split_file(data_dir, split)
    ds = CropEvalDataset(path, input_size=input_size, limit=max_images)
    if len(ds) == 0:
        raise LidcsegError("split has no crops", path)
    images, masks = [], []
    for i in range(len(ds)):
        item = ds[i]
        images.append(item["image"])
        masks.append(item["masks"].bool())
        if progress is not None and (i + 1 == len(ds) or (i + 1) % 64 == 0):
            progress(f"load {split}", i + 1, len(ds))
    meta = ds.store.meta
    rows = ds.indices.astype(np.int64)
    patient = np.asarray([str(p) for p in meta["patient_id"][rows]], dtype=object)
    lesion = np.asarray(
        [f"{p}/{s}/{k}" for p, s, k in zip(patient, meta["scan_id"][rows], meta["lesion_id"][rows], strict=True)],
        dtype=object,
    )
    return EvalSplit(path, int(input_size), torch.stack(images), torch.stack(masks), rows, patient, lesion)


# -- runs ---------------------------------------------------------------------------------------


@dataclass
class RunModel:
    """A loaded run: ``label`` (unique display name), ``name`` (registry name) and the model."""

    label: str
    path: Path
    name: str
    model: torch.nn.Module
    input_size: int
    device: torch.device
    info: dict[str, Any] = field(default_factory=dict)


def load_runs(runs: Sequence[str | Path], device: str = "auto") -> list[RunModel]:
    """Load every run (best/, else last/) with :func:`lidcseg.sampling.load_for_sampling`.

    Labels are the run folders' names (the parent's for a ``best``/``last``
    checkpoint folder), made unique with ``#2``, ``#3``.

    Raises:
        LidcsegError: no runs, a missing or unreadable run, or runs of different input sizes.
    """
    from lidcseg.sampling import load_for_sampling

    if not runs:
        raise LidcsegError("no run given (--run RUN)")
    out: list[RunModel] = []
    seen: dict[str, int] = {}
    for run in runs:
        loaded = load_for_sampling(run, device)
        path = Path(run)
        base = path.parent.name if path.name in ("best", "last") else path.name
        base = base or str(path)
        seen[base] = seen.get(base, 0) + 1
        label = base if seen[base] == 1 else f"{base}#{seen[base]}"
        out.append(RunModel(label, path, str(loaded.info.get("name")), loaded.model,
                            loaded.input_size, loaded.device, dict(loaded.info)))
    sizes = {r.input_size for r in out}
    if len(sizes) > 1:
        listing = ", ".join(f"{r.label}: {r.input_size}" for r in out)
        raise LidcsegError(f"runs have different input sizes ({listing}); evaluate them separately")
    return out


@contextlib.contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op CPU threads for a block (0 keeps the current setting)."""
    before = torch.get_num_threads()
    if threads > 0:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- sampling -----------------------------------------------------------------------------------


def image_noise(rows: np.ndarray, n: int, dim: int, seed: int) -> torch.Tensor:
    """Standard-normal latent noise (B, n, N), image ``rows[i]`` drawn from ``SeedSequence([seed, rows[i]])``."""
    out = torch.empty((len(rows), n, dim))
    for i, row in enumerate(rows):
        state = np.random.SeedSequence([int(seed), int(row)]).generate_state(2, np.uint32)
        gen = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
        out[i] = torch.randn((n, dim), generator=gen)
    return out


@torch.no_grad()
def draw_masks(
    model: torch.nn.Module,
    x: torch.Tensor,
    n: int,
    rows: np.ndarray,
    *,
    seed: int,
    generator: torch.Generator,
) -> torch.Tensor:
    """``n`` foreground masks per image: (B, 1, T, T) -> (B, n, T, T) bool on ``x``'s device.

    Per-image noise (:func:`image_noise`) when ``model.sample`` takes ``eps``;
    else ``generator`` is passed on.
    """
    from lidcseg.sampling import accepts_eps, latent_dim

    kwargs: dict[str, Any] = {"generator": generator}
    if accepts_eps(model):
        kwargs["eps"] = image_noise(rows, n, latent_dim(model), seed).to(x.device, x.dtype)
    logits = model.sample(x, n, **kwargs)  # (B, n, C, T, T)
    if logits.ndim != 5 or logits.shape[:2] != (x.shape[0], n):
        raise LidcsegError(
            f"{type(model).__name__}.sample returned shape {tuple(logits.shape)}, "
            f"expected ({x.shape[0]}, {n}, C, H, W)"
        )
    return logits.argmax(dim=2) != 0


def iter_samples(
    model: torch.nn.Module,
    split: EvalSplit,
    n: int,
    *,
    seed: int = 0,
    batch_size: int = 16,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Batches ``(start, stop, masks)`` of ``n`` samples per image, masks (b, n, T, T) bool on ``device``."""
    gen = torch.Generator().manual_seed(int(seed))
    device = torch.device(device)
    for s in range(0, len(split), batch_size):
        e = min(s + batch_size, len(split))
        x = split.images[s:e].to(device)
        yield s, e, draw_masks(model, x, n, split.rows[s:e], seed=seed, generator=gen)


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
    name: str = PROBUNET,
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
        model: a harness model (``sample(x, n, generator=...) -> (B, n, C, T, T)``), on ``device``.
        split: from :func:`load_split`.
        counts: sample counts n (each >= 1; >= 2 with ``unbiased``).
        name: the model's registry name (decides :data:`PER_COUNT_MODELS`).
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
    per_count = name in PER_COUNT_MODELS
    metrics = {k: np.empty((len(counts), total)) for k in METRIC_NAMES}
    kept: dict[int, np.ndarray] = {}
    keep_set = set(int(k) for k in keep)
    device = torch.device(device)
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for s in range(0, total, batch_size):
            e = min(s + batch_size, total)
            x = split.images[s:e].to(device)
            graders = split.masks[s:e].to(device)
            rows = split.rows[s:e]
            if per_count:
                by_count = {}
                for c in counts:
                    samples = draw_masks(model, x, c, rows, seed=seed, generator=gen)
                    by_count[c] = prefix_metrics(joint_iou(samples, graders), c, [c], unbiased)[c]
            else:
                samples = draw_masks(model, x, n_max, rows, seed=seed, generator=gen)
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


def choose_examples(masks: torch.Tensor, k: int, lesion: np.ndarray | None = None) -> list[int]:
    """``k`` crops where the graders disagree, for the qualitative figure.

    Half (rounded up) from crops where the graders disagree on the lesion's
    presence (some masks empty, some not), the rest from crops that all
    graders marked differently, each group ordered by :func:`grader_disagreement`
    (ties: file order); short groups are filled from all crops in that order.
    One crop per lesion (``lesion`` keys) as long as possible.

    Args:
        masks: (N, G, T, T) bool grader masks.
        k: crops wanted.
        lesion: (N,) lesion keys, or None (every crop its own lesion).

    Returns:
        Positions, ordered presence-ambiguous first, at most ``min(k, N)``.
    """
    n = masks.shape[0]
    if k <= 0 or n == 0:
        return []
    score = grader_disagreement(masks).numpy()
    present = masks.flatten(2).any(-1).numpy()  # (N, G)
    mixed = present.any(1) & ~present.all(1)
    full = present.all(1) & (score > 0)
    order = np.lexsort((np.arange(n), -score))  # by score descending, then position
    keys = lesion if lesion is not None else np.arange(n)

    def take(candidates: np.ndarray, want: int, unique: bool) -> None:
        used = {keys[i] for i in chosen}
        for i in candidates:
            if len(chosen) >= want:
                return
            if i in chosen or (unique and keys[i] in used):
                continue
            chosen.append(int(i))
            used.add(keys[i])

    chosen: list[int] = []
    for unique in (True, False):
        take(order[mixed[order]], (k + 1) // 2, unique)
        take(order[full[order]], k, unique)
        take(order, k, unique)
    return chosen


# -- statistics ---------------------------------------------------------------------------------


def wilcoxon_paired(reference: np.ndarray, other: np.ndarray) -> dict[str, float]:
    """Two-sided Wilcoxon signed-rank test on per-image pairs (``scipy.stats.wilcoxon``).

    Zero differences are dropped (``zero_method="wilcox"``); with no non-zero
    difference the test is not defined and ``p_value`` is 1.

    Args:
        reference, other: (N,) values of the same images.

    Returns:
        ``statistic``, ``p_value``, ``images``, ``nonzero`` (pairs that differ),
        ``mean_difference`` and ``median_difference`` (other - reference).
    """
    from scipy.stats import wilcoxon

    reference, other = np.asarray(reference, float), np.asarray(other, float)
    if reference.shape != other.shape or reference.ndim != 1:
        raise ValueError(f"paired arrays must be (N,) alike, got {reference.shape} and {other.shape}")
    diff = other - reference
    nonzero = int(np.count_nonzero(diff))
    if nonzero == 0:
        stat, p = 0.0, 1.0
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            res = wilcoxon(reference, other, zero_method="wilcox", alternative="two-sided")
        stat, p = float(res.statistic), float(res.pvalue)
    return {
        "statistic": stat,
        "p_value": p,
        "images": int(diff.size),
        "nonzero": nonzero,
        "mean_difference": float(diff.mean()) if diff.size else float("nan"),
        "median_difference": float(np.median(diff)) if diff.size else float("nan"),
    }


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

    See the module docstring for the protocol and :func:`write_evaluation` for the files.

    Args:
        data_dir: folder of ``lidcseg prepare``.
        runs: run directories or checkpoint folders.
        split: the split file's name.
        counts: sample counts (default 1, 4, 8, 16).
        out: report folder (created; its files are replaced); None writes nothing.
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
    with torch_threads(threads):
        models = load_runs(runs, device)
        data = load_split(data_dir, split, models[0].input_size, max_images, progress)
        chosen = choose_examples(data.masks, examples, data.lesion)
        results = []
        for rm in models:
            t0 = time.perf_counter()
            metrics, kept, sampling = evaluate_model(
                rm.model, data, counts, name=rm.name, seed=seed, unbiased=unbiased,
                batch_size=batch_size, device=rm.device, keep=chosen, progress=progress,
                stage=f"evaluate {rm.label}",
            )
            results.append(RunResult(rm.label, str(rm.path), rm.name, counts, metrics, kept, sampling,
                                     rm.info, time.perf_counter() - t0))
    evaluation = Evaluation(
        data, split, counts, results, chosen, compare_runs(results),
        {"seed": seed, "unbiased": unbiased, "device": str(models[0].device),
         "batch_size": batch_size, "max_images": max_images, "data": str(Path(data_dir))},
    )
    if out is not None:
        if progress is not None:
            progress("write report", 0, 1)
        write_evaluation(evaluation, out)
        if progress is not None:
            progress("write report", 1, 1)
    return evaluation


# -- the report ---------------------------------------------------------------------------------


def per_image_rows(evaluation: Evaluation) -> list[list[Any]]:
    """Rows of ``per_image.csv`` (:data:`CSV_COLUMNS`): one per run, image and sample count."""
    split = evaluation.split
    rows: list[list[Any]] = []
    for r in evaluation.results:
        for j, n in enumerate(r.counts):
            for i in range(len(split)):
                rows.append([r.label, r.model, int(split.rows[i]), split.patient[i], n,
                             *(float(r.metrics[k][j, i]) for k in CSV_COLUMNS[5:])])
    return rows


def summary(evaluation: Evaluation) -> dict[str, Any]:
    """The JSON summary: settings, per run and count the statistics of every metric, the tests."""
    from lidcseg.metrics.stats import describe

    runs = []
    for r in evaluation.results:
        per_n = {}
        for j, n in enumerate(r.counts):
            per_n[str(n)] = {k: describe(v[j]) for k, v in r.metrics.items()}
        runs.append({
            "label": r.label, "run": r.path, "model": r.model, "sampling": r.sampling,
            "checkpoint": r.info.get("checkpoint"), "step": r.info.get("step"),
            "time_s": round(r.time_s, 3), "metrics": per_n,
        })
    ref = evaluation.results[reference_index(evaluation.results)].label if evaluation.results else None
    return {
        "format": "lidcseg-evaluation",
        "version": 1,
        "split": evaluation.split_name,
        "split_file": str(evaluation.split.path),
        "images": len(evaluation.split),
        "input_size": evaluation.split.input_size,
        "counts": list(evaluation.counts),
        "protocol": {
            "distance": "d = 1 - IoU of the foreground; d(empty, empty) = 0",
            "ged": "U-statistic" if evaluation.settings.get("unbiased") else "V-statistic",
            "samples": f"{max(evaluation.counts)} samples drawn once per image, n uses the first n; "
                       f"{', '.join(sorted(PER_COUNT_MODELS))}: sample(x, n) for each n (n members)",
            "hm_iou": "Hungarian matching, both sets replicated to lcm(n, graders)",
            "wilcoxon": "two-sided signed-rank test, paired per image, zero differences dropped",
        },
        "settings": evaluation.settings,
        "runs": runs,
        "reference": ref,
        "wilcoxon": evaluation.comparisons,
        "examples": [int(evaluation.split.rows[i]) for i in evaluation.examples],
    }


def markdown_report(evaluation: Evaluation, info: dict[str, Any] | None = None) -> str:
    """``summary.md``: the metric table per run and count, and the Wilcoxon tests."""
    from lidcseg.reports.tables import fmt, markdown_table

    info = info or summary(evaluation)
    stat = info["protocol"]["ged"]
    lines = [
        f"# Evaluation on `{info['split']}` ({info['images']} images, {info['input_size']} px)",
        "",
        f"GED² (Eq. 6, d = 1 − IoU, {stat}), sample diversity E[d(S,S′)] and Hungarian-matched IoU, "
        f"per image; mean ± sd over images, median in brackets. Samples: {info['protocol']['samples']}.",
        "",
    ]
    rows = []
    for run in info["runs"]:
        for n, m in run["metrics"].items():
            g = m["ged"]
            rows.append([run["label"], run["model"], n,
                         f"{fmt(g['mean'])} ± {fmt(g['sd'])} [{fmt(g['median'])}]",
                         f"{fmt(m['diversity']['mean'])} ± {fmt(m['diversity']['sd'])}",
                         f"{fmt(m['hm_iou']['mean'])} ± {fmt(m['hm_iou']['sd'])}",
                         fmt(m["grader_diversity"]["mean"])])
    lines.append(markdown_table(
        ["run", "model", "n", "GED²", "diversity", "HM-IoU", "graders E[d(Y,Y′)]"], rows))
    if info["wilcoxon"]:
        lines += ["", f"## Wilcoxon signed-rank tests against `{info['reference']}` (paired per image)", ""]
        rows = [[t["other"], t["metric"], t["n"], fmt(t["mean_difference"]), fmt(t["median_difference"]),
                 f"{t['statistic']:g}", f"{t['p_value']:.3g}", f"{t['nonzero']}/{t['images']}"]
                for t in info["wilcoxon"]]
        lines.append(markdown_table(
            ["run", "metric", "n", "mean diff (run − ref)", "median diff", "W", "p", "pairs ≠ 0"], rows))
    return "\n".join(lines) + "\n"


def write_evaluation(evaluation: Evaluation, out: str | Path) -> list[Path]:
    """Write ``summary.json``, ``summary.md``, ``per_image.csv``, ``ged.png``, ``examples.png`` to ``out``.

    Every file is replaced atomically. Returns the paths written.
    """
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports.plots import plot_distributions, plot_examples
    from lidcseg.reports.tables import write_csv

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = summary(evaluation)
    written = [out / "summary.json", out / "summary.md", out / "per_image.csv", out / "ged.png"]
    write_json_atomic(written[0], info)
    write_bytes_atomic(written[1], markdown_report(evaluation, info).encode())
    write_csv(written[2], CSV_COLUMNS, per_image_rows(evaluation))
    stat = "U-statistic" if evaluation.settings.get("unbiased") else "V-statistic"
    plot_distributions(
        {r.label: {n: r.values("ged", n) for n in r.counts} for r in evaluation.results},
        written[3],
        title=f"GED² per image on {evaluation.split_name} ({len(evaluation.split)} images, {stat})",
        ylabel="GED² = 2E[d(S,Y)] − E[d(S,S′)] − E[d(Y,Y′)],  d = 1 − IoU",
    )
    if evaluation.examples:
        split = evaluation.split
        pos = evaluation.examples
        plot_examples(
            images=split.images[pos, 0].numpy(),
            graders=split.masks[pos].numpy(),
            samples={r.label: np.stack([r.examples[p] for p in pos]) for r in evaluation.results},
            titles=[f"crop {int(split.rows[p])} ({split.patient[p]})" for p in pos],
            path=out / "examples.png",
            title=f"Grader masks and samples on {evaluation.split_name}: crops where the graders disagree",
        )
        written.append(out / "examples.png")
    return written
