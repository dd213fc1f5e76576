"""Synthetic street scenes, the scene file format and the flip-task datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lidcseg.data.dataset import StreamSampler
from lidcseg.data.scenes import (
    MIN_SWITCH_PIXELS,
    SCENE_COLORS,
    SceneEvalDataset,
    SceneStore,
    SceneTrainDataset,
    augment_scene,
    is_scene_data,
    make_scene,
    make_scenes,
    read_manifest,
)
from lidcseg.errors import LidcsegError
from lidcseg.flips import FLIP_PROBS, IGNORE_INDEX, SWITCHES, apply_flips, mode_flips
from lidcseg_cli.main import app

runner = CliRunner()


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("scenes") / "data"
    make_scenes(out, n_train=6, n_val=3, n_test=4, height=32, width=64, seed=5)
    return out


def test_make_scene_is_seeded() -> None:
    a = make_scene(np.random.default_rng([1, 0, 3]), 64, 128)
    b = make_scene(np.random.default_rng([1, 0, 3]), 64, 128)
    c = make_scene(np.random.default_rng([1, 0, 4]), 64, 128)
    assert a[0].shape == (3, 64, 128) and a[0].dtype == np.uint8
    assert a[1].shape == (64, 128) and a[1].dtype == np.uint8
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])


@pytest.mark.parametrize("seed", range(6))
def test_scene_class_roles(seed: int) -> None:
    image, label = make_scene(np.random.default_rng([seed, 0, 0]), 64, 128)
    for s in SWITCHES:  # every switchable class is there
        assert (label == s.original).sum() >= MIN_SWITCH_PIXELS, s.name
    rows = np.arange(64)[:, None].repeat(128, 1)

    def mean_row(c: int) -> float:
        return float(rows[label == c].mean())

    assert mean_row(10) < mean_row(2) < mean_row(0)  # sky above buildings above the road
    assert mean_row(1) > mean_row(10)  # sidewalks on the ground
    assert (label[-1] == IGNORE_INDEX).all()  # the ego-vehicle bonnet is ignored
    assert (label[0] != 0).all()  # no road at the top
    # Sidewalks border the road, persons stand low in the picture (on the ground).
    road = label == 0
    beside = np.zeros_like(road)
    beside[:, 1:] |= road[:, :-1]
    beside[:, :-1] |= road[:, 1:]
    assert ((label == 1) & beside).any()
    horizon = int(rows[label == 0].min())
    assert rows[label == 11].max() > horizon


def test_image_determines_unflipped_class() -> None:
    image, label = make_scene(np.random.default_rng(7), 64, 128)
    classes = np.array(sorted(SCENE_COLORS))
    colors = np.array([SCENE_COLORS[c] for c in classes], float)
    pix = image.reshape(3, -1).T.astype(float)
    nearest = classes[((pix[:, None] - colors[None]) ** 2).sum(-1).argmin(1)]
    assert (nearest == label.ravel()).mean() > 0.95


def test_make_scenes_files_and_manifest(scenes: Path) -> None:
    manifest = read_manifest(scenes)
    assert manifest["task"] == "flip-scenes" and manifest["num_classes"] == 24
    assert manifest["counts"] == {"train": 6, "val": 3, "test": 4}
    assert (manifest["height"], manifest["width"]) == (32, 64)
    assert [s["flipped"] for s in manifest["switches"]] == [19, 20, 21, 22, 23]
    assert is_scene_data(scenes) and not is_scene_data(scenes / "nope")
    store = SceneStore(scenes / "test.h5")
    assert len(store) == 4 and store.names[0] == "synthetic/test/000000"
    images, labels = store.read_all()
    assert images.shape == (4, 3, 32, 64) and labels.shape == (4, 32, 64)
    assert labels.max() == IGNORE_INDEX and labels[labels != IGNORE_INDEX].max() < 19


def test_make_scenes_deterministic_and_refuses_existing(scenes: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    make_scenes(again, n_train=6, n_val=3, n_test=2, height=32, width=64, seed=5)
    a, b = SceneStore(scenes / "val.h5").read_all(), SceneStore(again / "val.h5").read_all()
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    # The test split's first scenes do not depend on its size.
    assert np.array_equal(SceneStore(scenes / "test.h5")[1][1], SceneStore(again / "test.h5")[1][1])
    with pytest.raises(LidcsegError, match="overwrite"):
        make_scenes(again, n_train=1, n_val=1, n_test=1, height=32, width=64)
    make_scenes(again, n_train=1, n_val=1, n_test=1, height=32, width=64, overwrite=True)
    assert read_manifest(again)["counts"]["train"] == 1
    with pytest.raises(LidcsegError, match="multiples of 16"):
        make_scenes(tmp_path / "bad", n_train=1, n_val=1, n_test=1, height=30, width=64)


def test_train_stream_flips_fresh_each_step(scenes: Path) -> None:
    ds = SceneTrainDataset(scenes / "train.h5", seed=3)
    assert len(ds) == 6
    a, b = ds[11], ds[11]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["mask"], b["mask"])
    assert a["image"].shape == (3, 32, 64) and a["image"].dtype == torch.float32
    assert -1.0 <= float(a["image"].min()) and float(a["image"].max()) <= 1.0
    assert a["mask"].dtype == torch.int64 and a["ignore"].dtype == torch.bool
    # The target is the stored label under the drawn flips, then the drawn augmentation
    # (Appendix H.2 since #13; it was a left-right mirror with probability 1/2).
    for k in range(12):
        item = ds[k]
        index, flips, aug = ds.draw(k)
        image, label = ds.store[index]
        image, label = augment_scene(image, apply_flips(label, flips), aug)
        assert torch.equal(item["image"], image)
        label = torch.from_numpy(label.copy()).long()
        assert torch.equal(item["ignore"], label == IGNORE_INDEX)
        assert torch.equal(item["mask"][~item["ignore"]], label[~item["ignore"]])
        assert int((item["mask"][item["ignore"]]).abs().sum()) == 0
        assert np.array_equal(mode_flips()[item["mode"]], flips)
    # Over many steps each class flips with its probability.
    modes = np.array([ds.draw(k)[1] for k in range(3000)])
    assert np.all(np.abs(modes.mean(0) - FLIP_PROBS) < 4 * np.sqrt(FLIP_PROBS * (1 - FLIP_PROBS) / 3000))


def test_train_stream_batches_with_stream_sampler(scenes: Path) -> None:
    ds = SceneTrainDataset(scenes / "train.h5", seed=0, augment=False)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, sampler=StreamSampler(4, 0, 2))
    batches = list(loader)
    assert len(batches) == 2
    b = batches[0]
    assert b["image"].shape == (4, 3, 32, 64) and b["mask"].shape == (4, 32, 64)
    assert b["ignore"].shape == (4, 32, 64) and b["mode"].shape == (4,)


def test_eval_dataset_unflipped(scenes: Path) -> None:
    ds = SceneEvalDataset(scenes / "test.h5", limit=3)
    assert len(ds) == 3 and list(ds.indices) == [0, 2, 3]
    item = ds[1]
    raw = torch.from_numpy(ds.store[2][1]).long()
    assert torch.equal(item["ignore"], raw == IGNORE_INDEX)
    assert torch.equal(item["label"], raw.masked_fill(raw == IGNORE_INDEX, 0))
    images, labels, ignore = ds.batches(2)[0]
    assert images.shape == (2, 3, 32, 64) and labels.shape == ignore.shape == (2, 32, 64)


def test_store_refuses_other_files(tmp_path: Path, disc_data: Path) -> None:
    with pytest.raises(LidcsegError, match="no such scene file"):
        SceneStore(tmp_path / "x.h5")
    with pytest.raises(LidcsegError, match="not a lidcseg-scenes file"):
        SceneStore(disc_data / "train.h5")
    assert not is_scene_data(disc_data)


def test_cli_scenes_make(tmp_path: Path) -> None:
    out = tmp_path / "d"
    args = ["scenes", "make", "--out", str(out), "--n-train", "2", "--n-val", "1", "--n-test", "1",
            "--size", "32x64", "--seed", "1"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "4 scenes" in result.output
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1
    again = runner.invoke(app, args)
    assert again.exit_code == 2
    lines = [ln for ln in again.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]
    bad = runner.invoke(app, ["scenes", "make", "--out", str(tmp_path / "e"), "--size", "64by128"])
    assert bad.exit_code == 2 and "HEIGHTxWIDTH" in bad.output


def test_lidcseg_train_runs_on_the_flip_task(tmp_path) -> None:
    """`train` picks the scene dataset from the manifest, uses the ignore mask, and validates with Eq. 7."""
    import json

    from lidcseg.calibration import calibrate_runs
    from lidcseg.config import ModelConfig, TrainConfig
    from lidcseg.data.scenes import make_scenes
    from lidcseg.training import train

    data = tmp_path / "scenes"
    make_scenes(data, n_train=8, n_val=4, n_test=4, height=32, width=64, seed=0)
    model_cfg = ModelConfig(in_channels=3, num_classes=24, base_channels=4, num_scales=3,
                            convs_per_block=1, latent_dim=2, fcomb_channels=8)
    train_cfg = TrainConfig(steps=2, batch_size=2, lr=1e-3, num_workers=0, log_every=1, val_every=2,
                            val_samples=2, val_max_crops=4, checkpoint_every=2, threads=1)
    run = train(data, model_cfg, train_cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if r["split"] == "val"]
    assert val and {"ged", "mode_r", "flip_mae"} <= set(val[-1])
    report = calibrate_runs(data, [run], tmp_path / "report", counts=(1, 2), samples=2)
    assert report is not None and (tmp_path / "report" / "calibration.json").exists()


def test_cli_cpu_quick_on_scenes_means_scenes_quick(tmp_path) -> None:
    """`--preset cpu-quick` on flip scenes trains the 24-class RGB model of `scenes-quick`, and its
    prior refit (two steps of few draws here) says which prior it kept."""
    import json

    from lidcseg.data.scenes import make_scenes
    from lidcseg.presets import PRESETS

    data = tmp_path / "scenes"
    make_scenes(data, n_train=4, n_val=2, n_test=2, height=32, width=64, seed=0)
    tiny = ["--set", "base_channels=4", "--set", "num_scales=3", "--set", "batch_size=2",
            "--set", "val_samples=2", "--set", "val_max_crops=2", "--set", "prior_refit_steps=2",
            "--set", "prior_refit_samples=4"]
    result = runner.invoke(app, ["train", "--data", str(data), "--out", str(tmp_path / "run"),
                                 "--preset", "cpu-quick", "--steps", "2", *tiny])
    assert result.exit_code == 0, result.output
    assert "refitting the prior net" in result.output and "prior refit: GED@2" in result.output
    assert (tmp_path / "run" / "refit" / "config.json").is_file()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    quick_model, quick_train = PRESETS["scenes-quick"]
    assert config["model"]["num_classes"] == 24 and config["model"]["in_channels"] == 3
    assert config["model"]["latent_dim"] == quick_model.latent_dim
    assert config["train"]["lr"] == quick_train.lr


def test_train_stream_augments_as_the_paper_not_by_mirroring(scenes: Path) -> None:
    """Appendix H.2 by default: elastic/affine warps with ignore padding, never mirroring alone (#13)."""
    ds = SceneTrainDataset(scenes / "train.h5", seed=0)
    warped = padded = 0
    for k in range(12):
        item = ds[k]
        index, flips = ds.draw(k)[:2]
        label = torch.from_numpy(apply_flips(ds.store[index][1], flips).astype(np.int64))
        target = item["mask"].masked_fill(item["ignore"], IGNORE_INDEX)
        warped += not (torch.equal(target, label) or torch.equal(target, label.flip(-1)))
        padded += int(item["ignore"].sum()) > int((label == IGNORE_INDEX).sum())
    assert warped >= 10 and padded >= 1
