"""The batched device augmentation: MONAI's transform given its draws; the same distribution."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from monai.transforms.utils import create_rotate, create_scale, create_shear
from scipy.stats import ks_2samp

from lidcseg.data.device_augment import (
    DeviceAugment,
    WarpParams,
    affine_matrices,
    control_points,
    draw_warp_params,
    warp_batch,
)
from lidcseg.data.transforms import AugmentParams, apply_transform, tile_context, train_transform


def _disc_batch(b: int, size: int = 180) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, 1, S, S) images that follow (B, S, S) disc masks (radius 8..20, off centre)."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    r = 8 + 12 * torch.linspace(0, 1, b)[:, None, None]
    mask = ((yy - size / 2 - 9) ** 2 + (xx - size / 2 + 7) ** 2 <= r**2).to(torch.uint8)
    return (mask.float() * 2 - 1)[:, None], mask


def _ramps(size: int) -> torch.Tensor:
    """(2, S, S) float32: each pixel's (row, col) offset from the crop centre, in px."""
    axis = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"))


# --- the same transform as MONAI's, given the same draws ------------------------------------------


@pytest.mark.parametrize(
    ("input_size", "params"),
    [
        (128, AugmentParams()),  # the paper preset: 128 tiles from 180 crops
        (64, AugmentParams(rotate_deg=30, shear=0.2, scale=0.2, max_shift=20)),  # context 104 < 180
        (100, AugmentParams(elastic_spacing=17, elastic_magnitude=4, max_shift=11)),
    ],
)
def test_warp_equals_monai_given_its_draws(input_size: int, params: AugmentParams) -> None:
    image, mask = _disc_batch(1)
    image = torch.cat([image[0], _ramps(180) / 90])  # (3, S, S): a disc and two ramps
    t = train_transform(input_size, 180, params)
    context = tile_context(input_size, 180, params)
    for seed in range(3):
        img, msk = apply_transform(t, image, mask, seed)
        # Read back what MONAI drew for this sample and replay it batched.
        elastic = t.transforms[0].rand_2d_elastic
        affine = elastic.rand_affine_grid.get_transformation_matrix()[:2, :2].float()
        offsets = torch.as_tensor(elastic.deform_grid.rand_mag * elastic.deform_grid.random_offset)
        rows, cols = t.transforms[1].cropper._slices
        corner = torch.tensor([[rows.start, cols.start]])
        warp = WarpParams(affine[None], offsets[None].float(), corner)
        assert offsets.shape[-1] == control_points(context, params.elastic_spacing)
        out, out_mask = warp_batch(image[None], mask[None], warp, params.elastic_spacing, context,
                                   input_size)
        assert out.shape == (1, 3, input_size, input_size)
        torch.testing.assert_close(out[0], img, atol=3e-4, rtol=0)  # float32 vs MONAI's float64
        assert torch.equal((out_mask[0] > 0.5).to(torch.uint8), msk)


def test_affine_matrices_follow_monai() -> None:
    g = torch.Generator().manual_seed(0)
    theta, shear, zoom = torch.rand(5, generator=g) - 0.5, torch.rand(5, 2, generator=g) - 0.5, \
        0.8 + 0.4 * torch.rand(5, 2, generator=g)
    got = affine_matrices(theta, shear, zoom)
    for i in range(5):
        want = (create_rotate(2, float(theta[i])) @ create_shear(2, shear[i].tolist())
                @ create_scale(2, zoom[i].tolist()))[:2, :2]
        np.testing.assert_allclose(got[i].numpy(), want, atol=1e-12)


def test_control_points_match_monai_grid() -> None:
    # create_control_grid: even d: ceil((d-1) / 2s + 0.5) * 2 + 2; odd d: ceil((d-1) / 2s) * 2 + 3.
    assert control_points(180, 24) == 12 and control_points(64, 12) == 10
    assert control_points(63, 12) == 9 and control_points(180, 1) == 182


# --- the same distribution as the loader path ----------------------------------------------------

#: A scaled-down preset (MONAI costs about 30 ms a draw at 180 px): 64 tiles from 96 crops.
S, T, N = 96, 64, 200
_OFF = AugmentParams(rotate_deg=0, shear=0, scale=0, elastic_spacing=12, elastic_magnitude=0,
                     max_shift=0)

#: One part switched on at a time (and all of them); the quantities that part moves; a
#: change of its magnitude that the test must detect.
CASES = {
    "rotation": (replace(_OFF, rotate_deg=15), ("angle",), {"rotate_deg": 30}),
    "scale": (replace(_OFF, scale=0.1), ("z0", "z1"), {"scale": 0.2}),
    "shear": (replace(_OFF, shear=0.1), ("s01", "s10"), {"shear": 0.2}),
    "shift": (replace(_OFF, max_shift=16), ("t0", "t1"), {"max_shift": 8}),
    "elastic": (replace(_OFF, elastic_magnitude=2), ("rms",), {"elastic_magnitude": 3}),
    "spacing": (replace(_OFF, elastic_magnitude=2), ("rough",), {"elastic_spacing": 6}),
    "all": (replace(AugmentParams(), elastic_spacing=12, max_shift=16),
            ("angle", "z0", "z1", "s01", "s10", "t0", "t1", "rms", "rough"), {"rotate_deg": 30}),
}


def _measure(out: torch.Tensor) -> dict[str, float]:
    """Geometry of one augmented ramp tile (2, T, T): where each tile pixel was sampled from.

    A least-squares affine fit ``src = M @ dst + t`` gives the rotation angle, zooms ``M[i, i]``,
    shears ``M[0, 1], M[1, 0]`` and the shift ``t`` of the tile centre; the residual gives the
    elastic part: its RMS (px) and the RMS of its row-to-row change (roughness, ~ 1 / spacing).
    """
    axis = torch.arange(T, dtype=torch.float64) - (T - 1) / 2
    dr, dc = torch.meshgrid(axis, axis, indexing="ij")
    x = torch.stack([dr.flatten(), dc.flatten(), torch.ones(T * T, dtype=torch.float64)], 1)
    src = out.reshape(2, -1).T.double()
    inside = (src.abs() < (S - 1) / 2 - 1).all(1)  # away from the border padding
    sol = torch.linalg.lstsq(x[inside], src[inside]).solution  # (3, 2)
    m, t = sol[:2].T, sol[2]
    res = torch.zeros_like(src)
    res[inside] = src[inside] - x[inside] @ sol
    res_img = res.T.reshape(2, T, T)
    return {
        "angle": float(torch.atan2(m[1, 0] - m[0, 1], m[0, 0] + m[1, 1])),
        "z0": float(m[0, 0]), "z1": float(m[1, 1]), "s01": float(m[0, 1]), "s10": float(m[1, 0]),
        "t0": float(t[0]), "t1": float(t[1]),
        "rms": float(res[inside].pow(2).mean().sqrt()),
        "rough": float((res_img[:, 1:] - res_img[:, :-1]).pow(2).mean().sqrt()),
    }


def _loader_draws(params: AugmentParams) -> list[dict[str, float]]:
    t = train_transform(T, S, params)
    mask = torch.zeros(1, S, S, dtype=torch.uint8)
    return [_measure(apply_transform(t, _ramps(S), mask, seed)[0]) for seed in range(N)]


def _device_draws(params: AugmentParams) -> list[dict[str, float]]:
    image = _ramps(S).expand(N, 2, S, S)
    out, _ = DeviceAugment(params, T)(image, torch.zeros(N, S, S), torch.arange(N) + 1_000_000)
    return [_measure(o) for o in out]


@pytest.fixture(scope="module")
def loader_draws() -> dict[str, list[dict[str, float]]]:
    """The loader path's (MONAI per tile) measurements, once per case."""
    cache: dict[AugmentParams, list[dict[str, float]]] = {}
    for params, _, _ in CASES.values():
        if params not in cache:
            cache[params] = _loader_draws(params)
    return {name: cache[params] for name, (params, _, _) in CASES.items()}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_same_distribution_as_loader_path(case: str, loader_draws: dict) -> None:
    params, quantities, changed = CASES[case]
    ref = loader_draws[case]
    same = _device_draws(params)
    other = _device_draws(replace(params, **changed))
    for q in quantities:
        a, b = [d[q] for d in ref], [d[q] for d in same]
        assert ks_2samp(a, b).pvalue > 0.01, (case, q, np.mean(a), np.mean(b), np.std(a), np.std(b))
    # The test has power: the changed magnitude is told apart from the loader path.
    p_other = min(ks_2samp([d[q] for d in ref], [d[q] for d in other]).pvalue for q in quantities)
    assert p_other < 1e-4, (case, changed, p_other)


# --- properties -----------------------------------------------------------------------------------


def test_shapes_dtypes_and_binary_masks() -> None:
    image, mask = _disc_batch(4)
    aug = DeviceAugment(None, 128)
    out, out_mask = aug(image, mask, torch.arange(4))
    assert out.shape == (4, 1, 128, 128) and out.dtype == torch.float32
    assert out_mask.shape == (4, 128, 128) and out_mask.dtype == torch.int64
    assert set(torch.unique(out_mask).tolist()) <= {0, 1}
    assert (out_mask.sum((1, 2)) > 0).all()
    # The image was drawn from its mask: thresholded, they agree but on a thin boundary.
    agree = ((out[:, 0] > 0) == (out_mask > 0)).float().mean().item()
    assert agree > 0.99
    # (B, K, S, S) masks keep their K.
    _, multi = aug(image, torch.stack([mask, 1 - mask], 1), torch.arange(4))
    assert multi.shape == (4, 2, 128, 128) and torch.equal(multi[:, 0], out_mask)
    assert ((multi[:, 1] == 1 - out_mask) | (multi[:, 1] == 0)).all()  # 0 only where padded


def test_seeded_and_independent_of_batch_mates() -> None:
    image, mask = _disc_batch(3)
    aug = DeviceAugment(None, 128)
    a = aug(image, mask, torch.tensor([5, 6, 7]))
    b = DeviceAugment(None, 128)(image, mask, torch.tensor([5, 6, 7]))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = aug(image[1:2], mask[1:2], [6])  # sample 1 alone: the same tile
    torch.testing.assert_close(c[0][0], a[0][1], atol=1e-5, rtol=0)
    assert torch.equal(c[1][0], a[1][1])
    d = aug(image, mask, torch.tensor([8, 9, 10]))
    assert not torch.equal(a[0], d[0])
    w1 = draw_warp_params([1, 2], AugmentParams(), 180, 128)
    w2 = draw_warp_params([1], AugmentParams(), 180, 128)
    assert torch.equal(w1.affine[:1], w2.affine) and torch.equal(w1.offsets[:1], w2.offsets)


def test_draws_stay_in_their_ranges() -> None:
    p = AugmentParams(rotate_deg=10, shear=0, scale=0, elastic_magnitude=0, max_shift=5)
    w = draw_warp_params(torch.arange(500), p, tile_context(128, 180, p), 128)
    angle = torch.atan2(w.affine[:, 1, 0], w.affine[:, 0, 0])
    assert angle.abs().max() <= np.radians(10) + 1e-6 and angle.abs().max() > np.radians(9)
    assert w.corner.min() == 0 and w.corner.max() == 10  # context 138: corners 0..10
    assert torch.equal(w.offsets, torch.zeros_like(w.offsets))  # magnitude 0: no elastic field


def test_no_nans_and_loader_padding_at_the_border() -> None:
    # Large rotation and zoom-out on a full-size tile: many samples fall outside the crop.
    image = (5 + _ramps(180)[:1] / 100).expand(8, 1, 180, 180)  # 4.1 .. 5.9, no zero inside
    ones = torch.ones(8, 180, 180, dtype=torch.uint8)
    p = AugmentParams(rotate_deg=45, scale=0.5, elastic_magnitude=8, max_shift=0)
    for out, out_mask in (
        DeviceAugment(p, 180)(image, ones, torch.arange(8)),
        apply_transform(train_transform(180, 180, p), image[0], ones[:1], 3),  # the loader path
    ):
        assert torch.isfinite(out).all()
        outside = out_mask == 0  # masks: zero padding
        assert outside.any() and (~outside).any()
        # Images: border padding, so no value leaves the crop's range and edge values repeat.
        assert out.min() >= image.min() - 1e-5 and out.max() <= image.max() + 1e-5
        assert ((out - image.min()).abs() < 1e-5).any() or ((out - image.max()).abs() < 1e-5).any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    image, mask = _disc_batch(4)
    aug = DeviceAugment(None, 128)
    cpu = aug(image, mask, torch.arange(4))
    gpu = aug(image.cuda(), mask.cuda(), torch.arange(4))
    assert gpu[0].is_cuda and gpu[1].is_cuda
    torch.testing.assert_close(gpu[0].cpu(), cpu[0], atol=1e-4, rtol=0)
    assert (gpu[1].cpu() != cpu[1]).float().mean() < 1e-3
