"""Calibration on a known distribution: the flip task of Kohl et al. 2018 (Section 4.2, Appendix C).

Each test scene has exactly 32 correct segmentations, the modes Y_k of
:mod:`lidcseg.flips`, with known probabilities w_k. A model's samples are
scored against that exact mixture in three ways.

**Distance.** d(A, B) = 1 - mean IoU over the 10 switchable classes (the five
originals and their five twins, :data:`~lidcseg.flips.EVAL_CLASSES`) that are
present in A or B; ignored pixels are left out; d = 0 when none of the 10 is
present in either (:func:`pairwise_flip_distance`). This is the authors'
evaluation: a per-class IoU, NaN for classes absent in both, averaged with
``nanmean``.

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
closest mode, argmin_k d(S, Y_k) (ties to the lowest k, as the authors' code).
The predicted frequency of mode k is the share of samples matched to it,
compared with w_k: Pearson correlation and mean absolute error over the 32
modes. Only scenes where all five switchable classes are present (at least
``min_pixels`` non-ignored pixels each) count: in a scene without, say, a
person, the modes that differ only in the person's flip are identical and the
match would always pick the un-flipped one (the authors' code counts such
scenes, which biases every mode with a flipped absent class downwards).

**Pixel-wise marginals (Figs. 8-10).** For each switch, p(twin | original) =
the share of the original class's pixels (all scenes, all samples pooled, as
the authors' code) that a sample labels as the twin, against the truth
8/17 ... 4/17; ``p_original`` and ``p_other`` complete it.

A model only needs ``sample(x, n, generator=None) -> (B, n, C, H, W)``
logits with C = 24; :class:`FlipOracle` is a fake model that samples the true
distribution (correlation ~ 1, small errors: the floor of each number at a
finite sample count). :func:`validate_flip_task` is the validation ``lidcseg
train`` runs on this task; :func:`calibrate_runs` is ``lidcseg calibration``.
Nothing here prints: progress goes to ``progress(stage, done, total)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

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
    mode_name,
    mode_probabilities,
)

#: The paper's Prob. U-Net on the Cityscapes flip task (Table 2): GED at 1, 4, 8, 16 samples.
PAPER_GED: dict[int, float] = {1: 0.874, 4: 0.337, 8: 0.248, 16: 0.206}
#: Sample counts of Table 2.
DEFAULT_COUNTS: tuple[int, ...] = (1, 4, 8, 16)
#: Samples per scene for the mode frequencies and pixel marginals (Appendix C: 16).
DEFAULT_SAMPLES = 16
#: Label of the oracle's row in the reports.
ORACLE_LABEL = "oracle"

Progress = Callable[[str, int, int], None]


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
        min_pixels: non-ignored pixels each switchable class needs for a scene to
            count in the mode frequencies.
    """

    def __init__(
        self, counts: Sequence[int] = DEFAULT_COUNTS, samples: int = DEFAULT_SAMPLES, min_pixels: int = 1
    ) -> None:
        if not counts or min(counts) < 1 or samples < 1 or min_pixels < 1:
            raise ValueError(f"need counts >= 1, samples >= 1, min_pixels >= 1; got {counts}, {samples}, {min_pixels}")
        self.counts = tuple(sorted(set(int(c) for c in counts)))
        self.samples = int(samples)
        self.min_pixels = int(min_pixels)
        self.n_draw = max(max(self.counts), self.samples)
        self.ged: dict[int, list[torch.Tensor]] = {n: [] for n in self.counts}
        self.terms: dict[int, list[torch.Tensor]] = {n: [] for n in self.counts}
        self.mode_counts = np.zeros(NUM_MODES, np.int64)
        self.eligible = 0
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
        eligible = (cnt.region >= self.min_pixels).all(dim=1).cpu()  # (B,)
        matched = nearest_modes(d_modes[:, :k]).cpu()[eligible]
        self.mode_counts += np.bincount(matched.flatten().numpy(), minlength=NUM_MODES)
        self.eligible += int(eligible.sum())
        self.images += samples.shape[0]
        self.pixels[0] += (cnt.region * k).sum(0).cpu().double().numpy()
        self.pixels[1] += cnt.hit_twin[:, :k].sum((0, 1)).cpu().double().numpy()
        self.pixels[2] += cnt.hit_original[:, :k].sum((0, 1)).cpu().double().numpy()

    def per_image_ged(self, n: int) -> np.ndarray:
        """(N,) GED at ``n`` samples of every scene so far."""
        return torch.cat(self.ged[n]).double().numpy() if self.ged[n] else np.zeros(0)

    def result(self) -> dict[str, Any]:
        """Every number of the report, JSON-ready (see :func:`summarise_modes`, :func:`summarise_pixels`)."""
        from lidcseg.reports.tables import describe

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
            "modes": summarise_modes(self.mode_counts, self.eligible, self.min_pixels),
            "pixels": summarise_pixels(self.pixels),
        }


def summarise_modes(mode_counts: np.ndarray, eligible: int, min_pixels: int = 1) -> dict[str, Any]:
    """Mode frequencies against the truth: per mode, Pearson r and mean absolute error."""
    truth = mode_probabilities()
    total = int(mode_counts.sum())
    freq = mode_counts / total if total else np.full(NUM_MODES, np.nan)
    err = np.abs(freq - truth)
    return {
        "scenes": int(eligible),
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
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0).to(torch.int64)
    check_unflipped(labels, "labels")
    bits = torch.as_tensor(mode_flips())  # (32, 5)
    right = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    cases = torch.zeros(NUM_SWITCHES, dtype=torch.float64)
    all_right, pairs = 0.0, 0
    if hasattr(model, "eval"):
        model.eval()
    with torch.no_grad():
        for s in range(0, labels.shape[0], batch_size):
            x = images[s : s + batch_size]
            x = (normalize_rgb(x) if x.dtype == torch.uint8 else x).to(device)
            lab, ign = labels[s : s + batch_size], ignore[s : s + batch_size]
            modes = mode_labels(lab)  # (b, 32, H, W)
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


def draw_label_samples(
    model: Any, x: torch.Tensor, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n`` sampled label maps per image: (B, 3, H, W) -> (B, n, H, W) int64 (argmax of the logits).

    Raises:
        LidcsegError: the model returns another shape or not the task's 24 classes.
    """
    logits = model.sample(x, n, generator=generator)
    if logits.ndim != 5 or logits.shape[:2] != (x.shape[0], n) or logits.shape[3:] != x.shape[2:]:
        raise LidcsegError(f"{type(model).__name__}.sample returned shape {tuple(logits.shape)}, "
                           f"expected ({x.shape[0]}, {n}, {NUM_CLASSES}, {x.shape[2]}, {x.shape[3]})")
    if logits.shape[2] != NUM_CLASSES:
        raise LidcsegError(f"the model predicts {logits.shape[2]} classes; the flip task has {NUM_CLASSES}")
    return logits.argmax(dim=2)


# -- validation during training ------------------------------------------------------------------


@torch.no_grad()
def validate_flip_task(
    model: Any,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    n_samples: int,
    *,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Validation of ``lidcseg train`` on the flip task: Eq. 7 at ``n_samples`` and calibration.

    Args:
        model: a harness model (``sample``), put in eval mode here.
        batches: ``(images (b, 3, H, W), labels (b, H, W) un-flipped, ignore (b, H, W))``
            (:meth:`lidcseg.data.scenes.SceneEvalDataset.batches`).
        n_samples: samples per scene (the paper: 16).
        device: where the model runs.
        generator: the latent noise (seed it identically at every call to compare checkpoints).
        autocast: e.g. ``torch.autocast("cuda", dtype=torch.bfloat16)``.
        channels_last: feed the images channels-last.

    Returns:
        ``ged``, ``diversity`` (E d(S,S')), ``graders`` (E d(Y,Y') over the modes),
        ``cross`` (E d(S,Y)), ``pixels_varying``, ``mode_r``, ``mode_mae``,
        ``flip_mae``, ``crops``, ``samples``, ``time_s`` - the keys of the LIDC
        validation plus the calibration numbers.
    """
    t0 = time.perf_counter()
    if hasattr(model, "eval"):
        model.eval()
    acc = CalibrationAccumulator(counts=(n_samples,), samples=n_samples)
    varying = 0.0
    for images, labels, ignore in batches:
        x = images.to(device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast if autocast is not None else contextlib.nullcontext():
            samples = draw_label_samples(model, x, n_samples, generator).cpu()
        acc.update(samples, labels, ignore)
        varying += float(((samples != samples[:, :1]).any(1) & ~ignore).flatten(1).float().mean(1).sum())
    res = acc.result()
    g = res["ged"][str(n_samples)]
    return {"ged": g["mean"], "diversity": g["diversity"], "graders": g["modes"], "cross": g["cross"],
            "pixels_varying": varying / max(acc.images, 1), "mode_r": res["modes"]["pearson_r"],
            "mode_mae": res["modes"]["mae"], "flip_mae": res["pixels"]["mae"],
            "crops": float(acc.images), "samples": float(n_samples), "time_s": time.perf_counter() - t0}


# -- evaluating runs -----------------------------------------------------------------------------


@dataclass
class FlipModel:
    """A model to calibrate.

    Attributes:
        label: display name (the run folder's name, or ``oracle``).
        model: anything with ``sample(x, n, generator=None) -> (B, n, 24, H, W)``.
        info: JSON-ready description (checkpoint, step, config).
    """

    label: str
    model: Any
    info: dict[str, Any] = field(default_factory=dict)


def load_flip_model(run: str | Path, device: torch.device | str = "cpu") -> FlipModel:
    """Load a ``lidcseg train`` run (``best/``, else ``last/``) or a checkpoint folder.

    Raises:
        LidcsegError: not a run or checkpoint, or a model that is not of the
            flip task (24 classes, 3 input channels).
    """
    from lidcseg.io.checkpoint import CONFIG_FILE, checkpoint_dir, load_checkpoint

    path = Path(run)
    if not path.exists():
        raise LidcsegError("run directory or checkpoint not found", path)
    folder = checkpoint_dir(path)
    if not _is_checkpoint(folder / CONFIG_FILE):
        for name in ("best", "last"):
            if _is_checkpoint(folder / name / CONFIG_FILE):
                folder = folder / name
                break
        else:
            raise LidcsegError("not a run directory (no best/ or last/ checkpoint) nor a checkpoint", path)
    ckpt = load_checkpoint(folder, device=device)
    cfg = ckpt.config
    if cfg.num_classes != NUM_CLASSES or cfg.in_channels != 3:
        raise LidcsegError(f"model has {cfg.in_channels} input channels and {cfg.num_classes} classes; "
                           f"the flip task needs 3 and {NUM_CLASSES}", folder)
    label = (path.parent.name if path.name in ("best", "last") else path.name) or str(path)
    info = {"checkpoint": str(folder), "name": cfg.name, "step": ckpt.meta.get("step"),
            "val": ckpt.meta.get("val"), "config": {k: getattr(cfg, k) for k in cfg.__dataclass_fields__}}
    return FlipModel(label, ckpt.model, info)


def _is_checkpoint(path: Path) -> bool:
    import json

    try:
        return json.loads(path.read_text()).get("format") == "lidcseg-checkpoint"
    except (OSError, ValueError, AttributeError):
        return False


@dataclass
class Examples:
    """Scenes kept for the figure.

    Attributes:
        rows: row of each scene in the split file.
        images: (k, 3, H, W) uint8 RGB.
        labels: (k, H, W) int64 un-flipped; ignore: (k, H, W) bool.
        samples: run label -> (k, n, H, W) int64 sampled label maps.
    """

    rows: list[int]
    images: np.ndarray
    labels: np.ndarray
    ignore: np.ndarray
    samples: dict[str, np.ndarray] = field(default_factory=dict)


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
        keep: positions whose samples are returned for the figure.

    Returns:
        ``(result, kept)``: :meth:`CalibrationAccumulator.result` plus ``per_image_ged``
        (count -> list), and position -> (n, H, W) int64 samples for ``keep``.
    """
    from lidcseg.data.scenes import normalize_rgb

    labels = labels.masked_fill(ignore, 0)
    check_unflipped(labels, "labels")
    acc = CalibrationAccumulator(counts, samples, min_pixels)
    gen = torch.Generator().manual_seed(int(seed))
    keep_set, kept = set(keep), {}
    if hasattr(model, "eval"):
        model.eval()
    n_img = images.shape[0]
    for s in range(0, n_img, batch_size):
        e = min(s + batch_size, n_img)
        x = images[s:e]
        x = normalize_rgb(x) if x.dtype == torch.uint8 else x
        draws = draw_label_samples(model, x.to(device), acc.n_draw, gen).cpu()
        acc.update(draws, labels[s:e].to(torch.int64), ignore[s:e])
        for i in range(s, e):
            if i in keep_set:
                kept[i] = draws[i - s].numpy()
        if progress is not None:
            progress(stage, e, n_img)
    result = acc.result()
    result["per_image_ged"] = {str(n): acc.per_image_ged(n).tolist() for n in acc.counts}
    return result, kept


def choose_examples(labels: torch.Tensor, ignore: torch.Tensor, k: int) -> list[int]:
    """``k`` scenes for the figure: evenly spaced among those with all five classes present."""
    if k <= 0:
        return []
    present = torch.stack([((labels == sw.original) & ~ignore).flatten(1).any(1) for sw in SWITCHES], 1)
    full = torch.nonzero(present.all(1)).flatten().numpy()
    pool = full if full.size else np.arange(labels.shape[0])
    idx = np.unique(np.linspace(0, pool.size - 1, min(k, pool.size)).round().astype(int))
    return [int(pool[i]) for i in idx]


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
    examples: int = 3,
    posterior_scenes: int = 20,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """``lidcseg calibration``: calibrate every run (and optionally the oracle) and write the report.

    Runs with a posterior net (``reconstruct``) also get
    :func:`posterior_switch_accuracy` on the first ``posterior_scenes`` scenes
    (0: skip), the diagnosis of which flips the model has learned to encode.

    Writes ``calibration.json``, ``calibration.md``, ``modes.png`` (Fig. 5),
    ``marginals.png`` (pixel-wise marginals), ``ged.png`` (GED vs samples with
    the paper's Table 2) and ``examples.png`` into ``out``.

    Returns:
        The JSON report.

    Raises:
        LidcsegError: no runs (and no oracle), a data folder that is not the flip
            task, a missing split, a run that is not a flip-task model.
    """
    from lidcseg.data.scenes import SceneEvalDataset, read_manifest, split_path
    from lidcseg.evaluation import torch_threads

    if not runs and not oracle:
        raise LidcsegError("no run given (--run RUN, or --oracle)")
    manifest = read_manifest(data_dir)
    ds = SceneEvalDataset(split_path(data_dir, split), limit=max_images)
    if len(ds) == 0:
        raise LidcsegError(f"split {split!r} has no scenes", split_path(data_dir, split))
    dev = resolve_device(device)
    t0 = time.perf_counter()
    with torch_threads(threads):
        models = [load_flip_model(r, dev) for r in runs]
        _unique_labels(models)
        raw_images, raw_labels = ds.arrays()  # uint8: 6x less memory than float inputs
        images, labels = torch.from_numpy(raw_images), torch.from_numpy(raw_labels)
        ignore = labels == IGNORE_INDEX
        if oracle:
            models.append(FlipModel(ORACLE_LABEL, FlipOracle(images, labels),
                                    {"name": "oracle", "note": "samples the true flip distribution"}))
        keep = choose_examples(labels, ignore, examples)
        ex = Examples([int(ds.indices[i]) for i in keep], raw_images[keep],
                      labels[keep].masked_fill(ignore[keep], 0).long().numpy(), ignore[keep].numpy())
        results = []
        for j, m in enumerate(models):
            t_run = time.perf_counter()
            res, kept = calibrate_model(
                m.model, images, labels, ignore, counts=counts, samples=samples, seed=seed,
                batch_size=batch_size, device=dev, min_pixels=min_pixels, keep=keep,
                progress=progress, stage=f"{m.label} ({j + 1}/{len(models)})")
            if keep:
                ex.samples[m.label] = np.stack([kept[i] for i in keep])
            if posterior_scenes > 0 and hasattr(m.model, "reconstruct"):
                if progress is not None:
                    progress(f"{m.label}: posterior", 0, 1)
                k = min(posterior_scenes, images.shape[0])
                res["posterior"] = posterior_switch_accuracy(
                    m.model, images[:k], labels[:k], ignore[:k], batch_size=batch_size, device=dev,
                    min_pixels=min_pixels)
            results.append({"label": m.label, "info": m.info, **res,
                            "time_s": time.perf_counter() - t_run})
    report = {
        "data": {"dir": str(Path(data_dir).resolve()), "split": split, "source": manifest.get("source"),
                 "scenes": len(ds), "height": ds.height, "width": ds.width},
        "protocol": {"switches": [{"class": s.name, "original": s.original, "twin": s.flipped,
                                   "probability": s.probability} for s in SWITCHES],
                     "classes": list(CLASS_NAMES), "eval_classes": list(EVAL_CLASSES),
                     "mode_probabilities": mode_probabilities().tolist()},
        "settings": {"counts": sorted(set(int(c) for c in counts)), "samples": samples, "seed": seed,
                     "min_pixels": min_pixels, "device": str(dev), "ged": "V-statistic (Eq. 7)",
                     "posterior_scenes": posterior_scenes},
        "paper_ged": {str(k): v for k, v in PAPER_GED.items()},
        "runs": results,
        "time_s": time.perf_counter() - t0,
    }
    write_calibration(report, ex, out)
    return report


def _unique_labels(models: list[FlipModel]) -> None:
    seen: dict[str, int] = {}
    for m in models:
        seen[m.label] = seen.get(m.label, 0) + 1
        if seen[m.label] > 1:
            m.label = f"{m.label}#{seen[m.label]}"


# -- the report -----------------------------------------------------------------------------------


def markdown_report(report: Mapping[str, Any]) -> str:
    """The report as markdown: GED table with the paper's Table 2, modes, marginals."""
    from lidcseg.reports.tables import fmt, markdown_table

    d, runs = report["data"], report["runs"]
    counts = report["settings"]["counts"]
    lines = [
        "# Calibration on the flip task (Kohl et al. 2018, Section 4.2, Appendix C)",
        "",
        f"Data: {d['source']} `{d['split']}` split, {d['scenes']} scenes of {d['height']}x{d['width']}. "
        f"Samples per scene: {report['settings']['samples']} (modes and marginals); "
        f"seed {report['settings']['seed']}.",
        "",
        "## GED against the exact 32-mode mixture (Eq. 7)",
        "",
        "d = 1 - mean IoU over the 10 switchable classes present; V-statistic for E[d(S,S')]. "
        "Mean over scenes (± s.e.m.).",
        "",
    ]
    headers = ["model", *[f"GED@{n}" for n in counts]]
    rows = [[r["label"], *[f"{fmt(r['ged'][str(n)]['mean'])} ± {fmt(r['ged'][str(n)]['sem'])}"
                           for n in counts]] for r in runs]
    rows.append(["paper Prob. U-Net (Table 2)", *[fmt(PAPER_GED.get(n)) if n in PAPER_GED else "–"
                                                   for n in counts]])
    lines += [markdown_table(headers, rows), ""]
    lines += ["## Mode-wise frequencies (Fig. 5)", "",
              "Each sample matched to its closest mode by d; scenes with all five switchable classes "
              "present only.", ""]
    rows = [[r["label"], r["modes"]["scenes"], r["modes"]["matched_samples"],
             fmt(r["modes"]["pearson_r"]), fmt(r["modes"]["mae"], 4), fmt(r["modes"]["max_abs_error"], 4)]
            for r in runs]
    lines += [markdown_table(["model", "scenes", "samples", "Pearson r", "MAE", "max |error|"], rows), ""]
    mode_rows = []
    for k in np.argsort(-np.asarray(report["protocol"]["mode_probabilities"]), kind="stable"):
        row = runs[0]["modes"]["per_mode"][k] if runs else None
        mode_rows.append([int(k), row["flipped"] if row else mode_name(int(k)),
                          f"{100 * report['protocol']['mode_probabilities'][k]:.2f}%",
                          *[f"{100 * r['modes']['per_mode'][k]['frequency']:.2f}%" for r in runs]])
    lines += [markdown_table(["mode", "flipped", "true", *[r["label"] for r in runs]], mode_rows), ""]
    lines += ["## Pixel-wise marginals p(twin | original class) (Figs. 8-10)", ""]
    headers = ["class", "truth", *[r["label"] for r in runs]]
    rows = []
    for i, sw in enumerate(SWITCHES):
        rows.append([f"{sw.name} → {sw.name} 2", f"{sw.probability:.3f}",
                     *[fmt(r["pixels"]["per_class"][i]["p_twin"]) for r in runs]])
    rows.append(["mean abs error", "", *[fmt(r["pixels"]["mae"], 4) for r in runs]])
    lines += [markdown_table(headers, rows), ""]
    with_post = [r for r in runs if r.get("posterior")]
    if with_post:
        lines += ["## Which flips the posterior encodes", "",
                  "Share of (scene, mode) pairs where the posterior-mean reconstruction S(X, mu_post(X, Y_k)) "
                  "gets the switch right (0.5: not encoded, so the prior's samples cannot be calibrated "
                  f"for it); first {report['settings'].get('posterior_scenes')} scenes, all 32 modes.", ""]
        rows = [[sw.name, *[fmt(r["posterior"]["per_switch"][i]["accuracy"]) for r in with_post]]
                for i, sw in enumerate(SWITCHES)]
        rows.append(["all five right", *[fmt(r["posterior"]["all_right"]) for r in with_post]])
        lines += [markdown_table(["switch", *[r["label"] for r in with_post]], rows), ""]
    lines += ["Figures: `ged.png`, `modes.png`, `marginals.png`, `examples.png`.", ""]
    return "\n".join(lines)


def write_calibration(report: Mapping[str, Any], examples: Examples | None, out: str | Path) -> list[Path]:
    """Write ``calibration.json``, ``calibration.md`` and the figures into ``out``."""
    from lidcseg.io.atomic import write_bytes_atomic, write_json_atomic
    from lidcseg.reports import calibration_plots as plots

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = report["runs"]
    truth = np.asarray(report["protocol"]["mode_probabilities"])
    written = [out / "calibration.json", out / "calibration.md"]
    write_json_atomic(written[0], _json_safe(report))
    write_bytes_atomic(written[1], markdown_report(report).encode())
    counts = report["settings"]["counts"]
    written.append(plots.plot_ged(
        counts, {r["label"]: [r["ged"][str(n)]["mean"] for n in counts] for r in runs},
        {r["label"]: [r["ged"][str(n)]["sem"] for n in counts] for r in runs}, PAPER_GED,
        out / "ged.png"))
    written.append(plots.plot_mode_frequencies(
        truth, {r["label"]: np.asarray([m["frequency"] for m in r["modes"]["per_mode"]]) for r in runs},
        {r["label"]: (r["modes"]["pearson_r"], r["modes"]["mae"]) for r in runs}, out / "modes.png"))
    written.append(plots.plot_pixel_marginals(
        [s.name for s in SWITCHES], FLIP_PROBS,
        {r["label"]: np.asarray([p["p_twin"] for p in r["pixels"]["per_class"]]) for r in runs},
        out / "marginals.png"))
    if examples is not None and examples.rows and examples.samples:
        written.append(plots.plot_flip_examples(examples, out / "examples.png"))
    return written


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None, recursively (JSON has no NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj
