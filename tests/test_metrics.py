"""IoU with the empty-empty rule, GED (Eq. 6) as V- and U-statistic, diversity, Hungarian IoU."""

from __future__ import annotations

import itertools

import pytest
import torch

from lidcseg.metrics import (
    DistributionMetric,
    ged_terms,
    generalized_energy_distance,
    hungarian_iou,
    iou,
    pairwise_distance,
    pairwise_iou,
    sample_diversity,
)


def grid(*cells: tuple[int, int], size: int = 4) -> torch.Tensor:
    m = torch.zeros(size, size, dtype=torch.bool)
    for r, c in cells:
        m[r, c] = True
    return m


A = grid((0, 0), (0, 1), (1, 0), (1, 1))  # top-left block
B = grid((2, 0), (2, 1), (3, 0), (3, 1))  # bottom-left block, disjoint from A
C = grid((2, 0), (3, 0))  # half of B: IoU(B, C) = 1/2
E = grid()  # empty
TOP_ROW = grid((0, 0), (0, 1))
LEFT_COL = grid((0, 0), (1, 0))


def sets(*masks: torch.Tensor) -> torch.Tensor:
    return torch.stack(masks)[None]  # (1, k, H, W)


def test_hand_computed_iou_and_the_empty_rule() -> None:
    got = pairwise_iou(sets(TOP_ROW, E), sets(LEFT_COL, E, A))
    expected = torch.tensor([[[1 / 3, 0.0, 0.5], [0.0, 1.0, 0.0]]])
    torch.testing.assert_close(got, expected)
    assert pairwise_iou(sets(E), sets(E), empty_value=0.0).item() == 0.0
    torch.testing.assert_close(
        pairwise_distance(sets(TOP_ROW), sets(LEFT_COL)), torch.tensor([[[2 / 3]]])
    )
    assert iou(E, E).item() == 1.0 and iou(A, E).item() == 0.0
    torch.testing.assert_close(iou(TOP_ROW, LEFT_COL), torch.tensor(1 / 3))


def test_pairwise_iou_agrees_with_elementwise_iou() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, 7, generator=g) > 0.6
    b = torch.rand(2, 4, 5, 7, generator=g) > 0.6
    a[0, 1] = False
    b[0, 2] = False
    b[1, 0] = False
    got = pairwise_iou(a, b)
    for i, j, k in itertools.product(range(2), range(3), range(4)):
        torch.testing.assert_close(got[i, j, k], iou(a[i, j], b[i, k]))


def test_hand_computed_ged() -> None:
    # One sample, one grader, d = 2/3: GED = 2 * 2/3.
    torch.testing.assert_close(
        generalized_energy_distance(sets(TOP_ROW), sets(LEFT_COL)), torch.tensor([4 / 3])
    )
    # Samples {A, B}, graders {A}: cross 1/2, samples 2/4, graders 0 -> 1/2.
    terms = ged_terms(sets(A, B), sets(A))
    torch.testing.assert_close(torch.stack(terms), torch.tensor([[0.5], [0.5], [0.5], [0.0]]))
    # Equal sets of masks: the V-statistic is exactly 0.
    assert generalized_energy_distance(sets(A, B, E), sets(E, B, A)).item() == 0.0
    # The empty-empty rule: both sets empty means distance 0.
    assert generalized_energy_distance(sets(E, E), sets(E)).item() == 0.0


def test_identical_distributions_u_statistic_unbiased_v_statistic_biased() -> None:
    """Samples and graders both drawn from {A: 1/2, B: 1/2} with d(A, B) = 1.

    Enumerating all 2^(n+m) equally likely draws gives the exact expectations:
    E[U-statistic] = 0 (the true GED), E[V-statistic] = d/2 * (1/n + 1/m).
    """
    n, m = 2, 3
    draws = list(itertools.product((A, B), repeat=n + m))
    samples = torch.stack([torch.stack(d[:n]) for d in draws])  # (32, n, H, W)
    graders = torch.stack([torch.stack(d[n:]) for d in draws])  # (32, m, H, W)
    v = generalized_energy_distance(samples, graders).double().mean()
    u = generalized_energy_distance(samples, graders, unbiased=True).double().mean()
    torch.testing.assert_close(v, torch.tensor(0.5 * (1 / n + 1 / m), dtype=torch.float64))
    assert abs(u.item()) < 1e-6


def reference_ged(samples: torch.Tensor, graders: torch.Tensor, unbiased: bool) -> float:
    """Eq. 6 written directly with Python loops over pairs, for one image."""

    def d(x: torch.Tensor, y: torch.Tensor) -> float:
        inter, union = (x & y).sum().item(), (x | y).sum().item()
        return 0.0 if union == 0 else 1.0 - inter / union

    def mean_self(s: torch.Tensor) -> float:
        pairs = [(i, j) for i in range(len(s)) for j in range(len(s)) if not (unbiased and i == j)]
        return sum(d(s[i], s[j]) for i, j in pairs) / len(pairs)

    cross = sum(d(s, y) for s in samples for y in graders) / (len(samples) * len(graders))
    return 2 * cross - mean_self(samples) - mean_self(graders)


@pytest.mark.parametrize("unbiased", [False, True])
def test_ged_agrees_with_a_slow_reference_loop(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(1)
    samples = torch.rand(3, 5, 6, 6, generator=g) > 0.7
    graders = torch.rand(3, 4, 6, 6, generator=g) > 0.7
    samples[0, :2] = False  # some empty masks
    graders[1, 0] = False
    got = generalized_energy_distance(samples, graders, unbiased=unbiased)
    expected = torch.tensor(
        [reference_ged(s, y, unbiased) for s, y in zip(samples, graders, strict=True)]
    )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_v_statistic_ged_is_non_negative_on_random_masks() -> None:
    g = torch.Generator().manual_seed(2)
    samples = torch.rand(200, 4, 5, 5, generator=g) > torch.rand(200, 4, 1, 1, generator=g)
    graders = torch.rand(200, 3, 5, 5, generator=g) > torch.rand(200, 3, 1, 1, generator=g)
    assert (generalized_energy_distance(samples, graders) >= -1e-6).all()


def test_v_self_term_is_fraction_of_distinct_pair_mean() -> None:
    g = torch.Generator().manual_seed(3)
    graders = torch.rand(4, 4, 8, 8, generator=g) > 0.5
    v, u = sample_diversity(graders), sample_diversity(graders, unbiased=True)
    torch.testing.assert_close(v, 3 / 4 * u)


def test_sample_diversity_hand_case_and_unbiased_needs_two() -> None:
    torch.testing.assert_close(sample_diversity(sets(A, A, B)), torch.tensor([4 / 9]))
    torch.testing.assert_close(
        sample_diversity(sets(A, A, B), unbiased=True), torch.tensor([2 / 3])
    )
    with pytest.raises(ValueError, match="at least 2"):
        generalized_energy_distance(sets(A), sets(A, B), unbiased=True)


def test_hungarian_iou_replicates_to_lcm() -> None:
    # n = 2 samples {A, B}, m = 3 graders {A, A, C}; L = 6: samples A,A,A,B,B,B and
    # graders A,A,A,A,C,C. Best matching: 3x (A, A) = 1, 2x (B, C) = 1/2, 1x (B, A) = 0.
    got = hungarian_iou(sets(A, B), sets(A, A, C))
    torch.testing.assert_close(got, torch.tensor([4 / 6]))
    assert hungarian_iou(sets(A, B, E), sets(E, A, B)).item() == pytest.approx(1.0)
    assert hungarian_iou(sets(A), sets(B)).item() == 0.0


def test_accumulator_collects_per_image_values() -> None:
    metric = DistributionMetric()
    first = metric(sets(A, B), sets(A))
    metric(torch.cat([sets(A, A), sets(B, B)]), torch.cat([sets(A), sets(A)]))
    per_image = metric.per_image()
    assert per_image["ged"].tolist() == pytest.approx([0.5, 0.0, 2.0])
    assert per_image["hungarian_iou"].tolist() == pytest.approx([0.5, 1.0, 0.0])
    assert metric.aggregate()["ged"] == pytest.approx(2.5 / 3)
    assert set(first) == {
        "ged",
        "cross_distance",
        "sample_diversity",
        "grader_diversity",
        "hungarian_iou",
    }
    metric.reset()
    assert metric.per_image() == {}
