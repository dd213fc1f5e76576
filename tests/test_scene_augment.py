"""The flip task's training augmentation (Appendix H.2, issue #13): draws, labels, padding, colour."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.data.scenes import SceneTrainDataset, make_scenes, normalize_rgb, split_path
from lidcseg.data.scenes.augment import (
    AUGMENT_STREAM,
    SceneAugmentation,
    SceneAugmentParams,
    augment_scene,
    colour_gamma,
    control_shape,
    draw_augmentation,
    resample,
    warp_grid,
)
from lidcseg.errors import LidcsegError
from lidcseg.flips import IGNORE_INDEX, apply_flips

H, W = 32, 64


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("aug") / "data"
    make_scenes(out, n_train=4, n_val=2, n_test=2, height=H, width=W, seed=2)
    return out


def _same(a: SceneAugmentation, b: SceneAugmentation) -> bool:
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    oa, ob = da.pop("offsets"), db.pop("offsets")
    return da == db and np.array_equal(oa, ob)


def _warp(**kw: object) -> SceneAugmentation:
    """A hand-made warp: no elastic offsets unless given."""
    spacing = int(kw.pop("spacing", 8))  # type: ignore[call-overload]
    offsets = kw.pop("offsets", np.zeros((2, *control_shape(H, W, spacing)), np.float32))
    return SceneAugmentation(spacing=spacing, offsets=offsets, **kw)  # type: ignore[arg-type]


def _square_scene(cls: int = 13) -> tuple[np.ndarray, np.ndarray]:
    """A dark scene of class 2 with one bright 8 x 12 square of class ``cls``."""
    image = np.full((3, H, W), 20, np.uint8)
    label = np.full((H, W), 2, np.uint8)
    image[:, 10:18, 24:36] = 235
    label[10:18, 24:36] = cls
    return image, label


def test_draws_are_reproducible_and_within_the_ranges() -> None:
    p = SceneAugmentParams()
    a = draw_augmentation(np.random.default_rng([4, AUGMENT_STREAM, 9]), 256, 512)
    b = draw_augmentation(np.random.default_rng([4, AUGMENT_STREAM, 9]), 256, 512)
    c = draw_augmentation(np.random.default_rng([4, AUGMENT_STREAM, 10]), 256, 512)
    assert _same(a, b) and not _same(a, c)
    draws = [draw_augmentation(np.random.default_rng([0, AUGMENT_STREAM, k]), 256, 512) for k in range(400)]
    assert all(abs(d.rotate) <= math.radians(p.rotate_deg) for d in draws)
    assert all(abs(d.scale - 1) <= p.scale and max(map(abs, d.shear)) <= p.shear for d in draws)
    assert all(abs(d.shift[0]) <= 16 and abs(d.shift[1]) <= 32 for d in draws)  # 1/16 of each side
    assert all(d.spacing == 64 and d.offsets is not None for d in draws)
    assert 0.2 < np.mean([d.gammas is not None for d in draws]) < 0.4  # p = 0.3
    gammas = np.array([d.gammas for d in draws if d.gammas is not None])
    assert gammas.min() >= 0.7 and gammas.max() <= 1.5 and (gammas < 1).any() and (gammas > 1).any()
    # The lengths scale with the height: 8 px control spacing at 32 rows.
    assert draw_augmentation(np.random.default_rng(0), H, W).spacing == 8


def test_dataset_draws_are_a_pure_function_of_seed_and_position(scenes: Path) -> None:
    """Resumption needs sample k to be the same from any fresh dataset (no hidden state)."""
    path = split_path(scenes, "train")
    a, b = SceneTrainDataset(path, seed=1), SceneTrainDataset(path, seed=1)
    other = SceneTrainDataset(path, seed=2)
    for k in (0, 7, 5, 7):
        x, y = a[k], b[k]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["mask"], y["mask"])
        assert torch.equal(x["ignore"], y["ignore"])
    assert not _same(a.draw(3)[2], other.draw(3)[2])


def test_labels_stay_in_the_label_set_never_interpolated() -> None:
    """Nearest neighbour: a label of classes 0 and 13 only never shows 1..12 (or 14..23) after a warp."""
    yy, xx = np.mgrid[:H, :W]
    label = np.where((yy // 3 + xx // 5) % 2 == 0, 0, 13).astype(np.uint8)
    label[-3:] = IGNORE_INDEX
    image = np.random.default_rng(0).integers(0, 256, (3, H, W), dtype=np.uint8)
    strong = SceneAugmentParams(elastic_magnitude=40.0)
    for k in range(20):
        aug = draw_augmentation(np.random.default_rng([0, AUGMENT_STREAM, k]), H, W, strong)
        x, out = augment_scene(image, label, aug)
        assert out.dtype == np.uint8 and set(np.unique(out)) <= {0, 13, IGNORE_INDEX}
        assert x.shape == (3, H, W) and x.dtype == torch.float32
        assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_padding_brought_in_is_ignore_and_black() -> None:
    """A scene of class 0 (road) everywhere: what the warp brings in from outside is 255, never 0."""
    image = np.full((3, H, W), 200, np.uint8)
    label = np.zeros((H, W), np.uint8)
    x, out = augment_scene(image, label, _warp(shift=(0.0, 10.0)))  # samples 10 px to the right
    assert (out[:, -10:] == IGNORE_INDEX).all() and (out[:, :-10] == 0).all()
    assert torch.allclose(x[:, :, -9:], torch.tensor(-1.0))  # black outside (bilinear edge at -10)
    _, zoomed_out = augment_scene(image, label, _warp(scale=1.3))
    assert (zoomed_out[0] == IGNORE_INDEX).all() and (zoomed_out[H // 2, W // 2] == 0)


def test_image_and_label_move_together() -> None:
    image, label = _square_scene()
    x, out = augment_scene(image, label, _warp(shift=(3.0, -5.0)))  # samples 3 down, 5 left: exact
    bright, square = x[0] > 0, torch.from_numpy(out == 13)
    assert torch.equal(bright, square) and bool(square[7:15, 29:41].all()) and int(square.sum()) == 96
    for aug in (_warp(rotate=0.5), _warp(rotate=-0.3, shear=(0.1, -0.1), scale=0.85, shift=(1.5, 2.5)),
                draw_augmentation(np.random.default_rng(5), H, W, SceneAugmentParams(elastic_magnitude=20.0))):
        x, out = augment_scene(image, label, aug)
        bright, square = x[0] > 0, torch.from_numpy(out == 13)
        iou = float((bright & square).sum()) / float((bright | square).sum())
        assert iou > 0.85, aug


def test_flips_commute_with_the_warp(scenes: Path) -> None:
    """Flipped before the warp = flipped after it: the flipped classes cover exactly the warped regions."""
    ds = SceneTrainDataset(split_path(scenes, "train"), seed=0)
    for k in range(8):
        index, flips, aug = ds.draw(k)
        image, label = ds.store[index]
        _, before = augment_scene(image, apply_flips(label, flips), aug)
        _, warped = augment_scene(image, label, aug)
        assert np.array_equal(before, apply_flips(warped, flips))


def test_colour_changes_the_image_only() -> None:
    image, label = _square_scene()
    image = image.copy()
    image[1] //= 2  # distinct channels
    plain = normalize_rgb(image)
    x, out = augment_scene(image, label, SceneAugmentation(gammas=(0.7, 1.0, 1.5)))
    assert np.array_equal(out, label)
    assert not torch.equal(x[0], plain[0]) and torch.allclose(x[1], plain[1], atol=1e-5)
    assert not torch.equal(x[2], plain[2])
    assert torch.allclose(x.mean((1, 2)), plain.mean((1, 2)), atol=1e-4)  # channel mean kept
    assert float(x.min()) >= -1 and float(x.max()) <= 1


def test_no_mirroring_by_default_and_none_without_augment(scenes: Path) -> None:
    path = split_path(scenes, "train")
    ds = SceneTrainDataset(path, seed=0)
    assert not any(ds.draw(k)[2].mirror for k in range(50))
    off = SceneTrainDataset(path, seed=0, augment=False, scheme="paper+mirror")
    for k in range(8):
        index, flips, aug = off.draw(k)
        assert aug is None
        image, label = off.store[index]
        item = off[k]
        assert torch.equal(item["image"], normalize_rgb(image))
        assert torch.equal(item["mask"].masked_fill(item["ignore"], IGNORE_INDEX),
                           torch.from_numpy(apply_flips(label, flips).astype(np.int64)))


def test_mirror_schemes_keep_the_old_mirror_stream(scenes: Path) -> None:
    """``mirror`` is the stream before #13 exactly; ``paper+mirror`` adds the warp to the same decisions."""
    path = split_path(scenes, "train")
    old = SceneTrainDataset(path, seed=3, scheme="mirror")
    both = SceneTrainDataset(path, seed=3, scheme="paper+mirror")
    mirrors = [bool(np.random.default_rng([3, 1, k]).random() < 0.5) for k in range(16)]
    assert [old.draw(k)[2].mirror for k in range(16)] == mirrors == [both.draw(k)[2].mirror for k in range(16)]
    assert all(old.draw(k)[2].offsets is None and both.draw(k)[2].offsets is not None for k in range(16))
    for k in range(6):
        index, flips, _ = old.draw(k)
        image, label = old.store[index]
        label = apply_flips(label, flips)
        if mirrors[k]:
            image, label = image[..., ::-1], label[..., ::-1]
        item = old[k]
        assert torch.equal(item["image"], normalize_rgb(np.ascontiguousarray(image)))
        assert torch.equal(item["mask"].masked_fill(item["ignore"], IGNORE_INDEX),
                           torch.from_numpy(label.astype(np.int64)))


def test_train_config_switch(scenes: Path) -> None:
    from lidcseg.training.loop import training_datasets

    assert TrainConfig().scene_augment == "paper"
    with pytest.raises(LidcsegError, match="scene_augment"):
        TrainConfig(scene_augment="mirrors")
    with pytest.raises(LidcsegError, match="scene augmentation"):
        SceneTrainDataset(split_path(scenes, "train"), scheme="flip")
    model = ModelConfig(in_channels=3, num_classes=24)
    for cfg in (TrainConfig(scene_augment="mirror"), TrainConfig(augment=False)):
        ds = training_datasets(scenes, split_path(scenes, "train"), split_path(scenes, "val"), model, cfg)[0]
        assert (ds.augment, ds.scheme) == (cfg.augment, cfg.scene_augment)


def test_sampling_and_colour_are_monais() -> None:
    """:func:`resample` and :func:`colour_gamma` give MONAI's ``Resample`` and ``AdjustContrast``."""
    from monai.transforms import AdjustContrast, Resample

    x = torch.rand(3, H, W) * 2 - 1
    aug = draw_augmentation(np.random.default_rng(3), H, W, SceneAugmentParams(elastic_magnitude=20.0))
    grid = warp_grid(aug, H, W)
    homogeneous = torch.cat([grid, torch.ones(1, H, W)])
    for mode in ("bilinear", "nearest"):
        ref = Resample(mode=mode, padding_mode="zeros", dtype=torch.float32)(x, homogeneous)
        assert torch.allclose(resample(x, grid, mode), ref.as_tensor(), atol=1e-6)
    gammas = (0.7, 1.2, 1.5)
    ref = torch.stack([AdjustContrast(gamma=g, retain_stats=True)(x[c]).as_tensor() for c, g in enumerate(gammas)])
    assert torch.allclose(colour_gamma(x, gammas), ref.clamp(-1, 1), atol=1e-5)


def test_warp_grid_is_monais_rand2delastic() -> None:
    """Control grid + offsets -> affine -> s-fold bicubic upsampling -> centre crop, as ``Rand2DElastic``."""
    from monai.transforms import CenterSpatialCrop
    from monai.transforms.utils import create_control_grid as control_grid
    from monai.transforms.utils import create_rotate, create_scale, create_shear, create_translate

    for h, w, big in ((H, W, draw_augmentation(np.random.default_rng(4), H, W)),
                      (256, 512, draw_augmentation(np.random.default_rng(4), 256, 512))):
        s = big.spacing
        control = torch.as_tensor(control_grid((h, w), (s, s)), dtype=torch.float64)
        control[:2] += torch.from_numpy(big.offsets)
        affine = (create_rotate(2, big.rotate) @ create_shear(2, big.shear) @ create_translate(2, big.shift)
                  @ create_scale(2, (big.scale, big.scale)))
        dense = torch.nn.functional.interpolate((torch.as_tensor(affine) @ control.flatten(1)).view_as(control)[None],
                                                scale_factor=(s, s), mode="bicubic", align_corners=False)[0]
        ref = CenterSpatialCrop((h, w))(dense)[:2]
        assert torch.allclose(warp_grid(big, h, w).double(), torch.as_tensor(ref), atol=1e-3)


def test_resumed_run_sees_the_same_augmented_stream(scenes: Path, tmp_path: Path) -> None:
    """A run stopped after its step-3 checkpoint and resumed ends bit-identical to a straight run."""
    from safetensors.torch import load_file

    from lidcseg.training import iter_metrics, train

    model = ModelConfig(in_channels=3, num_classes=24, base_channels=4, num_scales=3, convs_per_block=1,
                        latent_dim=2, fcomb_channels=8)
    cfg = TrainConfig(steps=6, batch_size=2, lr=1e-3, num_workers=0, log_every=1, val_every=6, val_samples=2,
                      val_max_crops=2, val_batch_size=2, checkpoint_every=3, device="cpu", threads=1)
    straight = train(scenes, model, cfg, tmp_path / "straight")

    def stop(event: object) -> None:
        if getattr(event, "kind", None) == "checkpoint" and getattr(event, "step", None) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(scenes, model, cfg, tmp_path / "stopped", callback=stop)
    resumed = train(scenes, model, cfg, tmp_path / "stopped", resume=True)
    drop = {"it_s", "img_s", "time_s"}
    rows = [[{k: v for k, v in r.items() if k not in drop} for r in iter_metrics(run, "train")]
            for run in (straight, resumed)]
    assert len(rows[0]) == 6 and rows[0] == rows[1]
    a, b = (load_file(str(run / "last" / "model.safetensors")) for run in (straight, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
