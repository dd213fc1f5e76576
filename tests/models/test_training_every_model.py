"""``lidcseg.training.train`` runs every registered model: two steps, validation, checkpoint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from test_harness import TINY  # tests/models is on sys.path (pytest prepend mode)

from lidcseg.config import TrainConfig
from lidcseg.models import MODEL_NAMES
from lidcseg.models.checkpoint import load_model
from lidcseg.training import iter_metrics, train

TRAIN = TrainConfig(
    steps=2, batch_size=2, lr=1e-3, lr_final=1e-4, lr_decay_steps=1, input_size=32,
    aug_max_shift=8, augment=False, num_workers=0, log_every=1, val_every=2, val_samples=2,
    val_max_crops=2, val_batch_size=2, checkpoint_every=2, device="cpu", threads=1,
)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_train_validate_and_reload(name: str, disc_data: Path, tmp_path: Path) -> None:
    cfg = TINY[name]
    # A 1-member U-Net validates on its single hypothesis.
    train_cfg = dataclasses.replace(TRAIN, val_samples=2)  # capped at max_samples by the trainer
    run = train(disc_data, cfg, train_cfg, tmp_path / name)
    rows = list(iter_metrics(run, "train"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    val = list(iter_metrics(run, "val"))
    assert len(val) == 1 and 0 <= val[0]["ged"] <= 2
    model = load_model(run / "best", expected_name=name)
    assert model.config == cfg
    x = torch.zeros(1, 1, 32, 32)
    assert model.sample(x, 1).shape == (1, 1, 2, 32, 32)


@pytest.fixture(scope="module")
def flip_scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lidcseg.data.scenes import make_scenes

    out = tmp_path_factory.mktemp("flip") / "scenes"
    make_scenes(out, n_train=4, n_val=2, n_test=1, height=16, width=32, seed=0)
    return out


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_trains_on_the_flip_task(name: str, flip_scenes: Path, tmp_path: Path) -> None:
    """Section 4.2 through the same `train`: 24 classes, RGB in, ignored pixels, Eq. 7 validation."""
    cfg = dataclasses.replace(TINY[name], in_channels=3, num_classes=24)
    run = train(flip_scenes, cfg, TRAIN, tmp_path / name)
    rows = list(iter_metrics(run, "train"))
    assert [r["step"] for r in rows] == [1, 2] and all(r["loss"] == r["loss"] for r in rows)
    val = list(iter_metrics(run, "val"))
    assert len(val) == 1 and {"ged", "mode_r", "mode_mae", "flip_mae"} <= set(val[0])
    model = load_model(run / "best", expected_name=name)
    assert model.sample(torch.zeros(1, 3, 16, 32), 1).shape == (1, 1, 24, 16, 32)
