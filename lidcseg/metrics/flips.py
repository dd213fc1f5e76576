"""Metrics of the flip task (Kohl et al. 2018, Section 4.2, Appendix C): a model against the exact mixture.

Each test scene has exactly 32 correct segmentations, the modes Y_k of
:mod:`lidcseg.flips`, with known probabilities w_k. These functions score a
model's sampled label maps against that mixture; :mod:`lidcseg.calibration`
runs them over trained runs, and training's validation on the flip task
(:mod:`lidcseg.training.validation`) over the validation scenes.

**Distance.** d(A, B) = 1 - mean IoU over the 10 switchable classes (the five
originals and their five twins, :data:`~lidcseg.flips.EVAL_CLASSES`) that are
present in A or B; ignored pixels are left out (:func:`pairwise_flip_distance`).
This is the authors' evaluation: a per-class IoU, NaN for classes absent in
both, averaged with ``nanmean``. Where none of the 10 is present in either map
the authors' mean is NaN (``nanmean`` of an empty set); here d = 0: such a pair
counts as identical. It happens between two samples that both show none of the
10 classes, and in a scene without any (non-ignored) switchable pixel between
its modes (all of them the label itself) and between a mode and such a sample.
The authors' per-image GED is then NaN (a plain mean over those pairs); ours is
finite. In the mode matching the convention changes nothing: a NaN d(S, Y_k)
only occurs in a scene without switchable pixels, where every mode has the
same distance to a sample (0 or 1 here, NaN or 1 there), and both ``argmin``
conventions give mode 0, nothing flipped.

**GED against the mixture (Eq. 7).**

    D^2_GED = 2 E[d(S, Y)] - E[d(S, S')] - E[d(Y, Y')],   Y ~ sum_k w_k delta(Y_k)

The expectations over Y are exact sums with the mode weights:
E[d(S, Y)] = (1/n) sum_s sum_k w_k d(S_s, Y_k) and
E[d(Y, Y')] = sum_{a,b} w_a w_b d(Y_a, Y_b); E[d(S, S')] averages all n x n
pairs of samples (the V-statistic, the published convention, so it is 0 for
one sample). d(S, Y_k) and d(Y_a, Y_b) for all 32 modes come in closed form
from a few pixel counts per switch (:func:`switch_counts`,
:func:`mode_distances`, :func:`mode_self_distances`), exactly equal to the
pixel-wise definition (checked in the tests). The paper's Prob. U-Net
(Table 2): 0.874 / 0.337 / 0.248 / 0.206 at 1 / 4 / 8 / 16 samples
(:data:`PAPER_GED`).

**Mode-wise frequencies (Fig. 5, Appendix C).** Each sample is matched to its
closest mode, argmin_k d(S, Y_k) (ties to the lowest k, as ``np.argmin`` in the
authors' code). The predicted frequency of mode k is the share of samples
matched to it, compared with w_k: Pearson correlation and mean absolute error
over the 32 modes. Which scenes count is ``mode_scenes`` (:data:`MODE_SCENES`):

- ``all`` (default, the authors' rule): every scene. In a scene without, say, a
  person, the modes that differ only in the person's flip are identical, so a
  sample matches the one with the person un-flipped (the lowest index, exactly
  as the authors' ``argmin``); a scene without any switchable class gives mode 0
  (nothing flipped). This biases every mode with a flipped absent class
  downwards; the paper's Fig. 5 was counted this way.
- ``complete``: only scenes where all five switchable classes are present (at
  least ``min_pixels`` non-ignored pixels each), which avoids that bias.

**Pixel-wise marginals (Figs. 8-10).** For each switch, p(twin | original) =
the share of the original class's pixels (all scenes, all samples pooled, as
the authors' code) that a sample labels as the twin, against the truth
8/17 ... 4/17; ``p_original`` and ``p_other`` complete it.

Pure functions on tensors, and :class:`CalibrationAccumulator`, which gathers
them over batches of scenes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np
import torch

from lidcseg.flips import (
    EVAL_CLASSES,
    NUM_CLASSES,
    NUM_MODES,
    NUM_SWITCHES,
    SWITCHES,
    mode_flips,
    mode_name,
    mode_probabilities,
)

#: The paper's Prob. U-Net on the Cityscapes flip task (Table 2): GED at 1, 4, 8, 16 samples.
PAPER_GED: dict[int, float] = {1: 0.874, 4: 0.337, 8: 0.248, 16: 0.206}
#: Sample counts of Table 2.
DEFAULT_COUNTS: tuple[int, ...] = (1, 4, 8, 16)
#: Samples per scene for the mode frequencies and pixel marginals (Appendix C: 16).
DEFAULT_SAMPLES = 16
#: Which scenes count in the mode frequencies: ``all`` (the authors' rule, the default) or
#: ``complete`` (only scenes with all five switchable classes).
MODE_SCENES: tuple[str, ...] = ("all", "complete")


# -- the distance ------------------------------------------------------------------------------


def _valid(ignore: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """(B, 1, P) float mask of the pixels that count."""
    b = like.shape[0]
    if ignore is None:
        return torch.ones((b, 1, like[0, 0].numel()), device=like.device)
    return (~ignore.bool()).reshape(b, 1, -1).to(torch.float32)


def pairwise_flip_distance(
    a: torch.Tensor,
    b: torch.Tensor,
    ignore: torch.Tensor | None = None,
    classes: Sequence[int] = EVAL_CLASSES,
) -> torch.Tensor:
    """d = 1 - mean IoU over the ``classes`` present in either map, for every pair.

    Args:
        a: (B, n, H, W) integer label maps.
        b: (B, m, H, W) integer label maps.
        ignore: (B, H, W) bool, True for pixels left out, or None.
        classes: the classes whose IoU is averaged (default: the task's 10).

    Returns:
        (B, n, m) float32 in [0, 1]; 0 where none of the classes is present in either map.
    """
    if a.ndim != 4 or b.ndim != 4 or a.shape[0] != b.shape[0] or a.shape[2:] != b.shape[2:]:
        raise ValueError(f"a {tuple(a.shape)} and b {tuple(b.shape)} must be (B, n, H, W), (B, m, H, W)")
    valid = _valid(ignore, a).bool()
    fa, fb = a.flatten(2), b.flatten(2)
    total = torch.zeros((a.shape[0], a.shape[1], b.shape[1]), device=a.device)
    present = torch.zeros_like(total)
    for c in classes:
        ma = ((fa == c) & valid).to(torch.float32)  # (B, n, P)
        mb = ma if b is a else ((fb == c) & valid).to(torch.float32)  # (B, m, P)
        inter = torch.matmul(ma, mb.transpose(1, 2))  # (B, n, m)
        union = ma.sum(2)[:, :, None] + mb.sum(2)[:, None, :] - inter
        here = union > 0
        total += torch.where(here, inter / union.clamp_min(1.0), torch.zeros_like(inter))
        present += here.to(torch.float32)
    return torch.where(present > 0, 1.0 - total / present.clamp_min(1.0), torch.zeros_like(total))


class SwitchCounts(NamedTuple):
    """Pixel counts from which every d(S, Y_k) follows (non-ignored pixels only).

    R_i is the region of switch i's original class in the un-flipped label.

    Attributes:
        region: (B, 5) |R_i|.
        sample_original: (B, n, 5) pixels a sample labels as switch i's original class.
        sample_twin: (B, n, 5) pixels a sample labels as switch i's twin.
        hit_original: (B, n, 5) pixels of R_i a sample labels as the original class.
        hit_twin: (B, n, 5) pixels of R_i a sample labels as the twin.
    """

    region: torch.Tensor
    sample_original: torch.Tensor
    sample_twin: torch.Tensor
    hit_original: torch.Tensor
    hit_twin: torch.Tensor


def switch_counts(
    samples: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None = None
) -> SwitchCounts:
    """The counts of :class:`SwitchCounts` for (B, n, H, W) samples and (B, H, W) un-flipped labels.

    Labels must hold un-flipped trainIds (no twin class): the modes are built from them.
    One joint histogram of (region of the pixel, sampled class) per sample does it:
    region codes 0 (no switchable class), 1..5 (switch i's original class) and 6 (ignored).
    """
    b, n = samples.shape[:2]
    dev = samples.device
    if int(samples.min()) < 0 or int(samples.max()) >= NUM_CLASSES:
        raise ValueError(f"samples must hold classes 0..{NUM_CLASSES - 1}")
    code = torch.zeros(256, dtype=torch.int64, device=dev)
    for i, sw in enumerate(SWITCHES):
        code[sw.original] = i + 1
    region = code[labels.flatten(1).to(torch.int64).clamp(0, 255)]  # (B, P)
    if ignore is not None:
        region = region.masked_fill(ignore.flatten(1).bool(), NUM_SWITCHES + 1)
    k = NUM_SWITCHES + 2
    cell = torch.arange(b * n, device=dev).view(b, n, 1) * (k * NUM_CLASSES)
    idx = cell + region[:, None, :] * NUM_CLASSES + samples.flatten(2).to(torch.int64)
    hist = torch.bincount(idx.flatten(), minlength=b * n * k * NUM_CLASSES)
    hist = hist.view(b, n, k, NUM_CLASSES)[:, :, : NUM_SWITCHES + 1].to(torch.float32)
    orig = torch.tensor([sw.original for sw in SWITCHES], device=dev)
    twin = torch.tensor([sw.flipped for sw in SWITCHES], device=dev)
    rows = torch.arange(1, NUM_SWITCHES + 1, device=dev)
    return SwitchCounts(
        region=hist[:, 0, 1:].sum(-1),  # every pixel of R_i, whatever sample 0 says
        sample_original=hist[:, :, :, orig].sum(2),
        sample_twin=hist[:, :, :, twin].sum(2),
        hit_original=hist[:, :, rows, orig],
        hit_twin=hist[:, :, rows, twin],
    )


def _bits(device: torch.device) -> torch.Tensor:
    return torch.as_tensor(mode_flips(), dtype=torch.float32, device=device)  # (32, 5)


def mode_distances(counts: SwitchCounts) -> torch.Tensor:
    """d(S_s, Y_k) of every sample and every mode, in closed form: (B, n, 32).

    In mode k with bit b_i, the original class of switch i covers R_i (1 - b_i)
    and its twin R_i b_i, so for the original class the intersection is
    ``hit_original (1 - b_i)`` and the union ``sample_original + |R_i| (1 - b_i) - inter``;
    likewise for the twin with b_i.
    """
    b = _bits(counts.region.device)[None, None]  # (1, 1, 32, 5)
    r = counts.region[:, None, None, :]  # (B, 1, 1, 5)
    inter_o = counts.hit_original[:, :, None, :] * (1 - b)
    union_o = counts.sample_original[:, :, None, :] + r * (1 - b) - inter_o
    inter_t = counts.hit_twin[:, :, None, :] * b
    union_t = counts.sample_twin[:, :, None, :] + r * b - inter_t
    inter, union = torch.cat([inter_o, inter_t], -1), torch.cat([union_o, union_t], -1)
    here = union > 0
    iou_sum = torch.where(here, inter / union.clamp_min(1.0), torch.zeros_like(inter)).sum(-1)
    present = here.sum(-1).to(torch.float32)
    return torch.where(present > 0, 1.0 - iou_sum / present.clamp_min(1.0), torch.zeros_like(iou_sum))


def mode_self_distances(region: torch.Tensor) -> torch.Tensor:
    """d(Y_a, Y_b) of every pair of modes: (B, 5) region sizes -> (B, 32, 32).

    Over the switches whose class is present (|R_i| > 0): where a and b agree
    one class is present with IoU 1; where they differ two classes are present
    with IoU 0. So d = 1 - agree / (agree + 2 disagree), and 0 with no switch present.
    """
    b = _bits(region.device)
    differ = (b[:, None, :] != b[None, :, :]).to(torch.float32)  # (32, 32, 5)
    present = (region > 0).to(torch.float32)[:, None, None, :]  # (B, 1, 1, 5)
    disagree = (differ[None] * present).sum(-1)
    agree = present.sum(-1) - disagree
    denom = agree + 2 * disagree
    return torch.where(denom > 0, 1.0 - agree / denom.clamp_min(1.0), torch.zeros_like(denom))


class MixtureGED(NamedTuple):
    """The terms of Eq. 7 for each image, each (B,).

    Attributes:
        ged: 2 cross - samples - modes.
        cross: E[d(S, Y)], exact over the modes.
        samples: E[d(S, S')] over all n x n pairs (the sample diversity).
        modes: E[d(Y, Y')], exact over pairs of modes.
    """

    ged: torch.Tensor
    cross: torch.Tensor
    samples: torch.Tensor
    modes: torch.Tensor


def mixture_ged_terms(
    d_modes: torch.Tensor,
    d_samples: torch.Tensor,
    d_mode_pairs: torch.Tensor,
    weights: torch.Tensor | np.ndarray | None = None,
) -> MixtureGED:
    """Eq. 7 from distance matrices.

    Args:
        d_modes: (B, n, K) d(S_s, Y_k).
        d_samples: (B, n, n) d(S_s, S_t).
        d_mode_pairs: (B, K, K) d(Y_a, Y_b).
        weights: (K,) mode probabilities (default: the 32 of the flip protocol).

    Returns:
        :class:`MixtureGED` of (B,) tensors.
    """
    w = torch.as_tensor(mode_probabilities() if weights is None else weights,
                        dtype=torch.float32, device=d_modes.device)
    cross = (d_modes * w).sum(-1).mean(-1)
    ss = d_samples.mean(dim=(1, 2))
    yy = (d_mode_pairs * w[:, None] * w[None, :]).sum(dim=(1, 2))
    return MixtureGED(2 * cross - ss - yy, cross, ss, yy)


def mixture_ged(
    samples: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None = None
) -> MixtureGED:
    """D^2_GED (Eq. 7) of (B, n, H, W) sample label maps against the 32 modes of (B, H, W) labels."""
    counts = switch_counts(samples, labels, ignore)
    d_ss = pairwise_flip_distance(samples, samples, ignore)
    return mixture_ged_terms(mode_distances(counts), d_ss, mode_self_distances(counts.region))


def nearest_modes(d_modes: torch.Tensor) -> torch.Tensor:
    """Index of each sample's closest mode (ties to the lowest index): (B, n, 32) -> (B, n) int64."""
    return d_modes.argmin(dim=-1)


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two vectors; NaN when either is constant."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


# -- accumulation over scenes --------------------------------------------------------------------


class CalibrationAccumulator:
    """Accumulates Eq. 7 per image, mode matches and pixel counts over batches.

    Args:
        counts: sample counts of the GED (each uses the first n samples).
        samples: samples per scene for mode frequencies and pixel marginals (the first ones).
        min_pixels: non-ignored pixels each switchable class needs for a scene to be
            complete (all five classes present).
        mode_scenes: the scenes of the mode frequencies (:data:`MODE_SCENES`): ``all``
            (the authors' rule) or ``complete``. The GED and the pixel marginals use every scene.
    """

    def __init__(
        self,
        counts: Sequence[int] = DEFAULT_COUNTS,
        samples: int = DEFAULT_SAMPLES,
        min_pixels: int = 1,
        mode_scenes: str = "all",
    ) -> None:
        if not counts or min(counts) < 1 or samples < 1 or min_pixels < 1:
            raise ValueError(f"need counts >= 1, samples >= 1, min_pixels >= 1; got {counts}, {samples}, {min_pixels}")
        if mode_scenes not in MODE_SCENES:
            raise ValueError(f"mode_scenes must be one of {', '.join(MODE_SCENES)}, got {mode_scenes!r}")
        self.counts = tuple(sorted(set(int(c) for c in counts)))
        self.samples = int(samples)
        self.min_pixels = int(min_pixels)
        self.mode_scenes = mode_scenes
        self.n_draw = max(max(self.counts), self.samples)
        self.ged: dict[int, list[torch.Tensor]] = {n: [] for n in self.counts}
        self.terms: dict[int, list[torch.Tensor]] = {n: [] for n in self.counts}
        self.mode_counts = np.zeros(NUM_MODES, np.int64)
        self.eligible = 0  # scenes counted in the mode frequencies
        self.complete = 0  # scenes with all five switchable classes
        self.images = 0
        self.pixels = np.zeros((3, NUM_SWITCHES), np.float64)  # region * n, twin hits, original hits

    def update(self, samples: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None) -> None:
        """Add a batch: samples (B, n_draw, H, W) int label maps, labels (B, H, W) un-flipped, ignore (B, H, W)."""
        if samples.shape[1] < self.n_draw:
            raise ValueError(f"need {self.n_draw} samples per scene, got {samples.shape[1]}")
        cnt = switch_counts(samples, labels, ignore)
        d_modes = mode_distances(cnt)  # (B, n, 32)
        first = samples[:, : max(self.counts)]
        d_ss = pairwise_flip_distance(first, first, ignore)
        d_yy = mode_self_distances(cnt.region)
        for n in self.counts:
            t = mixture_ged_terms(d_modes[:, :n], d_ss[:, :n, :n], d_yy)
            self.ged[n].append(t.ged.cpu())
            self.terms[n].append(torch.stack([t.cross, t.samples, t.modes], 1).cpu())
        k = self.samples
        complete = (cnt.region >= self.min_pixels).all(dim=1).cpu()  # (B,)
        eligible = complete if self.mode_scenes == "complete" else torch.ones_like(complete)
        matched = nearest_modes(d_modes[:, :k]).cpu()[eligible]
        self.mode_counts += np.bincount(matched.flatten().numpy(), minlength=NUM_MODES)
        self.eligible += int(eligible.sum())
        self.complete += int(complete.sum())
        self.images += samples.shape[0]
        self.pixels[0] += (cnt.region * k).sum(0).cpu().double().numpy()
        self.pixels[1] += cnt.hit_twin[:, :k].sum((0, 1)).cpu().double().numpy()
        self.pixels[2] += cnt.hit_original[:, :k].sum((0, 1)).cpu().double().numpy()

    def per_image_ged(self, n: int) -> np.ndarray:
        """(N,) GED at ``n`` samples of every scene so far."""
        return torch.cat(self.ged[n]).double().numpy() if self.ged[n] else np.zeros(0)

    def result(self) -> dict[str, Any]:
        """Every number of the report, JSON-ready (see :func:`summarise_modes`, :func:`summarise_pixels`)."""
        from lidcseg.metrics.stats import describe

        ged = {}
        for n in self.counts:
            terms = torch.cat(self.terms[n]).double().mean(0).tolist() if self.terms[n] else [math.nan] * 3
            ged[str(n)] = {**describe(self.per_image_ged(n)), "cross": terms[0],
                           "diversity": terms[1], "modes": terms[2],
                           "paper": PAPER_GED.get(n)}
        return {
            "images": self.images,
            "samples": self.samples,
            "ged": ged,
            "modes": summarise_modes(self.mode_counts, self.eligible, self.min_pixels,
                                     self.mode_scenes, self.complete),
            "pixels": summarise_pixels(self.pixels),
        }


def summarise_modes(
    mode_counts: np.ndarray,
    eligible: int,
    min_pixels: int = 1,
    rule: str = "all",
    complete: int | None = None,
) -> dict[str, Any]:
    """Mode frequencies against the truth: per mode, Pearson r and mean absolute error.

    Args:
        mode_counts: (32,) samples matched to each mode.
        eligible: scenes counted (``scenes``); rule: which ones (:data:`MODE_SCENES`).
        min_pixels: pixels per class for a complete scene; complete: how many of all
            the scenes seen were complete (None: not known).
    """
    truth = mode_probabilities()
    total = int(mode_counts.sum())
    freq = mode_counts / total if total else np.full(NUM_MODES, np.nan)
    err = np.abs(freq - truth)
    return {
        "rule": rule,
        "scenes": int(eligible),
        "complete_scenes": None if complete is None else int(complete),
        "matched_samples": total,
        "min_pixels": min_pixels,
        "pearson_r": pearson(freq, truth) if total else float("nan"),
        "mae": float(err.mean()),
        "max_abs_error": float(err.max()),
        "per_mode": [
            {"mode": k, "flipped": mode_name(k), "probability": float(truth[k]),
             "frequency": float(freq[k]), "count": int(mode_counts[k])}
            for k in range(NUM_MODES)
        ],
    }


def summarise_pixels(pixels: np.ndarray) -> dict[str, Any]:
    """Pixel-wise marginals p(twin | original class) per switch against the truth."""
    rows = []
    for i, sw in enumerate(SWITCHES):
        total = pixels[0, i]
        twin = pixels[1, i] / total if total else math.nan
        orig = pixels[2, i] / total if total else math.nan
        rows.append({"class": sw.name, "original": sw.original, "twin": sw.flipped,
                     "truth": sw.probability, "p_twin": twin, "p_original": orig,
                     "p_other": 1.0 - twin - orig if total else math.nan,
                     "abs_error": abs(twin - sw.probability) if total else math.nan,
                     "pixels": int(total)})
    errs = [r["abs_error"] for r in rows if not math.isnan(r["abs_error"])]
    return {"per_class": rows, "mae": float(np.mean(errs)) if errs else math.nan}
