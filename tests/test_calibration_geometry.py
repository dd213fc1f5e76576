"""Where a Prob. U-Net splits each flip (``lidcseg.calibration_geometry``): a planted latent
geometry is recovered, and the threshold search is checked by hand."""

from __future__ import annotations

import math
from pathlib import Path
from statistics import NormalDist

import pytest
import torch

from lidcseg.calibration_geometry import best_threshold, flip_boundaries, has_latent_geometry
from lidcseg.data.scenes import SceneEvalDataset, make_scenes, normalize_rgb
from lidcseg.flips import NUM_CLASSES, SWITCHES

#: Planted geometry, one latent dimension per switch: posterior means at +A (flipped) and
#: -C (not), posterior sigma 0.1 against the prior's 1, decoder boundary at TAU.
A = (1.0, 1.5, 2.0, 1.2, 1.8)
C = (1.0, 0.5, 0.8, 0.4, 0.3)
TAU = (0.0, 0.3, -0.4, 0.9, 0.6)


class _Planted:
    """A fake Prob. U-Net with the planted geometry above (prior N(mu, diag(sigma^2)) per scene)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        x = normalize_rgb(images)
        self.labels = {x[i].numpy().tobytes(): labels[i] for i in range(len(x))}
        self.mu_p = torch.tensor([0.5, -1.0, 0.0, 2.0, 0.25])
        self.sigma_p = torch.tensor([1.0, 2.0, 0.5, 1.5, 3.0])

    def prior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = x.shape[0]
        return self.mu_p.expand(b, -1), self.sigma_p.log().expand(b, -1)

    def posterior_params(self, x, y, ignore=None) -> tuple[torch.Tensor, torch.Tensor]:
        flipped = torch.stack([(y == sw.flipped).flatten(1).any(1) for sw in SWITCHES], 1)  # (b, 5)
        u = torch.where(flipped, torch.tensor(A), -torch.tensor(C))
        return self.mu_p + self.sigma_p * u, (0.1 * self.sigma_p).log().expand(x.shape[0], -1)

    def decode(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        u = (z - self.mu_p) / self.sigma_p  # (b, n, 5)
        out = []
        for i in range(x.shape[0]):
            lab = self.labels[x[i].numpy().tobytes()].long()
            samples = lab.expand(z.shape[1], -1, -1).clone()  # (n, H, W)
            for k, sw in enumerate(SWITCHES):
                flip = (u[i, :, k] > TAU[k])[:, None, None] & (lab == sw.original)
                samples[flip] = sw.flipped
            out.append(torch.nn.functional.one_hot(samples, NUM_CLASSES).permute(0, 3, 1, 2).float())
        return torch.stack(out)  # (b, n, C, H, W)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    out: Path = tmp_path_factory.mktemp("geometry") / "data"
    make_scenes(out, n_train=2, n_val=2, n_test=12, height=32, width=64, seed=4)
    images, labels = (torch.from_numpy(a) for a in SceneEvalDataset(out / "test.h5").arrays())
    return images, labels, labels == 255


def test_planted_geometry_is_recovered(scenes) -> None:
    images, labels, ignore = scenes
    model = _Planted(images, labels.masked_fill(ignore, 0))
    assert has_latent_geometry(model)
    res = flip_boundaries(model, images, labels, ignore, prior_samples=256, batch_size=5, seed=1)
    assert res["sigma_ratio"] == pytest.approx(0.1, rel=1e-5)
    for k, row in enumerate(res["per_switch"]):
        assert row["class"] == SWITCHES[k].name and row["scenes"] > 0
        assert row["flipped_at"] == pytest.approx(A[k], abs=1e-5)
        assert row["unflipped_at"] == pytest.approx(-C[k], abs=1e-5)
        assert row["midpoint"] == pytest.approx((A[k] - C[k]) / 2, abs=1e-5)
        assert row["agreement"] == 1.0  # the planted boundary is flat across the separating axis
        assert row["boundary"] == pytest.approx(TAU[k], abs=0.05)
        # The prior samples the flip at its mass beyond the boundary.
        n = row["scenes"] * 256
        expected = 1 - NormalDist().cdf(TAU[k])
        assert row["sampled"] == pytest.approx(expected, abs=4 * math.sqrt(expected * (1 - expected) / n))
        assert row["quantile"] == pytest.approx(NormalDist().inv_cdf(1 - SWITCHES[k].probability))


def test_a_switch_in_no_scene_gets_nan(scenes) -> None:
    images, labels, ignore = scenes
    model = _Planted(images, labels.masked_fill(ignore, 0))
    res = flip_boundaries(model, images[:2], labels[:2], ignore[:2], prior_samples=8,
                          min_pixels=10**6)  # no class is that large
    assert all(row["scenes"] == 0 and math.isnan(row["boundary"]) for row in res["per_switch"])


def test_best_threshold_hand_cases() -> None:
    proj = torch.tensor([3.0, 0.0, 2.0, 1.0])
    assert best_threshold(proj, torch.tensor([True, False, True, False])) == (1.5, 1.0)
    assert best_threshold(proj, torch.ones(4, dtype=torch.bool)) == (-1.0, 1.0)  # below the lowest
    assert best_threshold(proj, torch.zeros(4, dtype=torch.bool)) == (4.0, 1.0)  # above the highest
    tau, agreement = best_threshold(proj, torch.tensor([False, True, False, True]))  # 0:T 1:T 2:F 3:F
    assert agreement == 0.5 and tau in (-1.0, 0.5, 1.5, 2.5, 4.0)
    tau, agreement = best_threshold(torch.arange(4.0), torch.tensor([False, True, False, True]))
    assert agreement == 0.75 and tau in (0.5, 2.5)
