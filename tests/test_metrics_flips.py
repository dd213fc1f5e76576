"""The flip task's metrics (:mod:`lidcseg.metrics.flips`): the distance, Eq. 7 against the exact
mixture in closed form, mode matching, Pearson r and the accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lidcseg.flips import mode_labels, mode_probabilities
from lidcseg.metrics.flips import (
    CalibrationAccumulator,
    mixture_ged,
    mixture_ged_terms,
    mode_distances,
    mode_self_distances,
    nearest_modes,
    pairwise_flip_distance,
    pearson,
    switch_counts,
)


def _d(a, b, ignore=None) -> float:
    a = torch.as_tensor(a)[None, None]
    b = torch.as_tensor(b)[None, None]
    ign = None if ignore is None else torch.as_tensor(ignore, dtype=torch.bool)[None]
    return float(pairwise_flip_distance(a, b, ign)[0, 0, 0])


# -- the distance ---------------------------------------------------------------------------


def test_distance_hand_cases() -> None:
    road = [[0, 0, 0, 0]]
    assert _d(road, road) == 0.0
    assert _d([[0, 0, 2, 2]], [[0, 0, 0, 0]]) == pytest.approx(0.5)  # road IoU 2/4
    assert _d([[0, 0, 1, 1]], [[0, 1, 1, 1]]) == pytest.approx(1 - (1 / 2 + 2 / 3) / 2)
    assert _d([[0, 0, 0, 0]], [[23, 23, 23, 23]]) == 1.0  # road vs road 2: both IoU 0
    # A class absent in both does not count; one present in only one map counts with IoU 0.
    assert _d([[0, 0, 10, 10]], [[0, 0, 10, 10]]) == 0.0
    assert _d([[0, 0, 13, 10]], [[0, 0, 10, 10]]) == pytest.approx(0.5)
    # No switchable class in either map: d = 0, whatever else differs.
    assert _d([[2, 3, 10, 10]], [[4, 5, 6, 7]]) == 0.0
    # Non-switchable classes never count.
    assert _d([[0, 0, 2, 2]], [[0, 0, 3, 3]]) == 0.0


def test_distance_ignores_pixels() -> None:
    a, b = [[0, 0, 13, 13]], [[0, 0, 1, 1]]
    assert _d(a, b) == pytest.approx(2 / 3)
    assert _d(a, b, [[False, False, True, True]]) == 0.0
    # Only ignored pixels carry a switchable class: none present, d = 0.
    assert _d([[13, 2]], [[1, 2]], [[True, False]]) == 0.0


def test_distance_symmetric_and_batched() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 24, (2, 3, 5, 6), generator=g)
    b = torch.randint(0, 24, (2, 4, 5, 6), generator=g)
    ign = torch.rand((2, 5, 6), generator=g) < 0.2
    d = pairwise_flip_distance(a, b, ign)
    assert d.shape == (2, 3, 4)
    assert torch.allclose(d.transpose(1, 2), pairwise_flip_distance(b, a, ign))
    assert torch.allclose(pairwise_flip_distance(a, a, ign).diagonal(dim1=1, dim2=2), torch.zeros(2, 3))
    assert float(pairwise_flip_distance(a[:1, :1], b[:1, :1], ign[:1])) == pytest.approx(float(d[0, 0, 0]))


# -- closed forms vs the pixel-wise definition -------------------------------------------------


def _random_case(seed: int, b: int = 3, n: int = 5, h: int = 6, w: int = 7):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 19, (b, h, w), generator=g)
    labels[0][labels[0] == 11] = 2  # image 0 has no person
    labels[1] = 10  # image 1 has no switchable class
    samples = torch.randint(0, 24, (b, n, h, w), generator=g)
    ignore = torch.rand((b, h, w), generator=g) < 0.15
    labels[2, 0, :5] = torch.tensor([1, 11, 13, 8, 0])  # image 2 has every switchable class
    ignore[2, 0, :5] = False
    return samples, labels, ignore


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mode_distances_equal_pixelwise(seed: int) -> None:
    samples, labels, ignore = _random_case(seed)
    closed = mode_distances(switch_counts(samples, labels, ignore))
    brute = pairwise_flip_distance(samples, mode_labels(labels), ignore)
    assert closed.shape == (3, 5, 32)
    assert torch.allclose(closed, brute, atol=1e-6)
    yy = mode_self_distances(switch_counts(samples, labels, ignore).region)
    brute_yy = pairwise_flip_distance(mode_labels(labels), mode_labels(labels), ignore)
    assert torch.allclose(yy, brute_yy, atol=1e-6)
    assert float(yy[1].abs().max()) == 0.0  # no switchable class: every mode is the same


def test_nearest_mode_of_exact_modes() -> None:
    _, labels, ignore = _random_case(4)
    modes = mode_labels(labels)  # (B, 32, H, W)
    d = mode_distances(switch_counts(modes, labels, ignore))
    assert torch.equal(nearest_modes(d)[2], torch.arange(32))
    assert float(d[2].diagonal().abs().max()) == 0.0


def test_ged_hand_case_single_switch() -> None:
    # Only road in the scene: modes are "road" (p = 13/17) and "road 2" (q = 4/17).
    labels = torch.zeros((1, 2, 2), dtype=torch.long)
    p, q = 13 / 17, 4 / 17
    one = mixture_ged(torch.zeros((1, 1, 2, 2), dtype=torch.long), labels)
    assert float(one.cross) == pytest.approx(q)  # d(road, road 2) = 1
    assert float(one.modes) == pytest.approx(2 * p * q)
    assert float(one.samples) == 0.0
    assert float(one.ged) == pytest.approx(2 * q - 2 * p * q)
    # Two samples, one of each: E d(S, S') = 1/2 (V-statistic), E d(S, Y) = 1/2.
    two = torch.stack([torch.zeros((2, 2)), torch.full((2, 2), 23)]).long()[None]
    t = mixture_ged(two, labels)
    assert float(t.cross) == pytest.approx(0.5)
    assert float(t.samples) == pytest.approx(0.5)
    assert float(t.ged) == pytest.approx(1 - 0.5 - 2 * p * q)


def test_ged_terms_against_brute_force_mixture() -> None:
    samples, labels, ignore = _random_case(7)
    t = mixture_ged(samples, labels, ignore)
    w = torch.as_tensor(mode_probabilities(), dtype=torch.float32)
    modes = mode_labels(labels)
    d_sy = pairwise_flip_distance(samples, modes, ignore)
    d_yy = pairwise_flip_distance(modes, modes, ignore)
    d_ss = pairwise_flip_distance(samples, samples, ignore)
    cross = (d_sy * w).sum(-1).mean(-1)
    yy = (d_yy * w[:, None] * w[None]).sum((1, 2))
    assert torch.allclose(t.ged, 2 * cross - d_ss.mean((1, 2)) - yy, atol=1e-6)
    # Uniform weights give the plain GED between the samples and the 32 modes.
    uni = mixture_ged_terms(d_sy, d_ss, d_yy, np.full(32, 1 / 32))
    assert torch.allclose(uni.cross, d_sy.mean((1, 2)), atol=1e-6)


def test_pearson() -> None:
    assert pearson(np.array([1, 2, 3]), np.array([2, 4, 6])) == pytest.approx(1.0)
    assert np.isnan(pearson(np.ones(3), np.array([1, 2, 3])))


# -- the accumulator ---------------------------------------------------------------------------


def test_accumulator_counts_every_scene_by_default_or_only_complete_ones() -> None:
    """Appendix C: the authors count every test image; ``complete`` keeps only scenes with all five classes."""
    samples, labels, ignore = _random_case(3, n=4)
    acc = CalibrationAccumulator(counts=(1, 2), samples=4)
    acc.update(samples, labels, ignore)
    res = acc.result()
    assert res["images"] == 3
    assert res["modes"]["rule"] == "all" and res["modes"]["complete_scenes"] == 1
    assert res["modes"]["scenes"] == 3 and res["modes"]["matched_samples"] == 12  # images 0 (no person), 1, 2
    complete = CalibrationAccumulator(counts=(1, 2), samples=4, mode_scenes="complete")
    complete.update(samples, labels, ignore)
    modes = complete.result()["modes"]
    assert modes["rule"] == "complete" and modes["scenes"] == 1 and modes["matched_samples"] == 4  # image 2
    assert set(res["ged"]) == {"1", "2"}
    assert res["ged"] == complete.result()["ged"] and res["pixels"] == complete.result()["pixels"]
    with pytest.raises(ValueError):
        acc.update(samples[:, :2], labels, ignore)
    with pytest.raises(ValueError, match="mode_scenes"):
        CalibrationAccumulator(mode_scenes="some")


def _hand_scenes() -> tuple[torch.Tensor, torch.Tensor]:
    """Three 1 x 5 scenes with two samples each: (3, 2, 1, 5) samples, (3, 1, 5) labels.

    Scene 0 has all five switchable classes; scene 1 no person (11); scene 2 none of them.
    """
    labels = torch.tensor([[[1, 11, 13, 8, 0]], [[1, 13, 8, 0, 2]], [[2, 3, 4, 5, 6]]])
    samples = torch.tensor([
        [[[1, 11, 21, 8, 0]], [[1, 11, 13, 8, 0]]],  # car flipped (mode 4); nothing flipped (0)
        [[[19, 13, 8, 0, 2]], [[1, 21, 8, 23, 2]]],  # sidewalk (1); car + road (4 + 16), person: absent
        [[[2, 3, 4, 5, 6]], [[13, 3, 4, 5, 6]]],  # no switchable class / a car the scene lacks: mode 0
    ])
    return samples, labels


def _authors_mode_counts(samples: torch.Tensor, labels: torch.Tensor, ignore: torch.Tensor | None) -> np.ndarray:
    """A port of the official ``get_mode_counts``: per-class 1 - IoU (NaN when the class is in neither
    map), ``nanmean`` over the 10 classes, ``argmin`` over the modes (an all-NaN row gives index 0),
    every image counted."""
    import warnings

    from lidcseg.flips import EVAL_CLASSES

    counts = np.zeros(32, np.int64)
    modes = mode_labels(labels).numpy()
    valid = np.ones(labels.shape, bool) if ignore is None else ~ignore.numpy()
    for b in range(labels.shape[0]):
        d = np.empty((32, samples.shape[1], len(EVAL_CLASSES)))
        for k in range(32):
            for s in range(samples.shape[1]):
                for j, c in enumerate(EVAL_CLASSES):
                    y, x = (modes[b, k] == c) & valid[b], (samples[b, s].numpy() == c) & valid[b]
                    union = (y | x).sum()
                    d[k, s, j] = 1 - (y & x).sum() / union if union else np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN slice
            mean_d = np.nanmean(d, axis=-1)
        for m in np.argmin(mean_d, axis=0):
            counts[m] += 1
    return counts


def test_mode_frequencies_hand_table_count_every_scene() -> None:
    samples, labels = _hand_scenes()
    acc = CalibrationAccumulator(counts=(1,), samples=2)
    acc.update(samples, labels, None)
    modes = acc.result()["modes"]
    table = {m["mode"]: m["frequency"] for m in modes["per_mode"] if m["count"]}
    assert table == {0: pytest.approx(3 / 6), 1: pytest.approx(1 / 6), 4: pytest.approx(1 / 6),
                     20: pytest.approx(1 / 6)}
    assert (modes["scenes"], modes["matched_samples"], modes["complete_scenes"]) == (3, 6, 1)
    np.testing.assert_array_equal(acc.mode_counts, _authors_mode_counts(samples, labels, None))
    # Only the complete scene 0 under the option: car flipped and nothing flipped, half each.
    complete = CalibrationAccumulator(counts=(1,), samples=2, mode_scenes="complete")
    complete.update(samples, labels, None)
    modes = complete.result()["modes"]
    assert {m["mode"]: m["frequency"] for m in modes["per_mode"] if m["count"]} == {0: 0.5, 4: 0.5}
    assert (modes["scenes"], modes["matched_samples"]) == (1, 2)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mode_counts_equal_the_authors_code(seed: int) -> None:
    """Scenes without some switchable class (or any): ties to the lowest mode, as ``np.argmin`` there."""
    samples, labels, ignore = _random_case(seed, n=4)
    acc = CalibrationAccumulator(counts=(1,), samples=4)
    acc.update(samples, labels, ignore)
    np.testing.assert_array_equal(acc.mode_counts, _authors_mode_counts(samples, labels, ignore))
