"""Training's validation: LIDC GED through the one foreground rule, the flip task's checks, sample caps."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch

from lidcseg.config import TrainConfig
from lidcseg.data.dataset import CropEvalDataset
from lidcseg.errors import LidcsegError
from lidcseg.metrics.ged import ged_terms
from lidcseg.models.registry import create_model, model_config
from lidcseg.seed import seed_everything
from lidcseg.training.validation import load_val, validate, validate_flip_task

ARCH = dict(base_channels=4, num_scales=3, convs_per_block=1, fcomb_channels=8, latent_dim=2)
CFG = TrainConfig(val_samples=4, seed=3, device="cpu")


def _model(name: str = "probunet", **overrides: object):
    seed_everything(0)
    return create_model(model_config(name, **ARCH, **overrides))


@pytest.fixture(scope="module")
def val_batches(disc_data: Path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return load_val(CropEvalDataset(disc_data / "val.h5", input_size=32), 3)


def test_load_val_holds_the_split_in_batches(val_batches) -> None:
    assert [b[0].shape[0] for b in val_batches] == [3, 1]  # 4 crops, batches of 3
    images, masks = val_batches[0]
    assert images.shape == (3, 1, 32, 32) and masks.dtype == torch.bool and masks.shape[-2:] == (32, 32)


def test_lidc_validation_is_the_ged_of_the_argmax_foreground(val_batches) -> None:
    model = _model()
    out = validate(model, val_batches, CFG, torch.device("cpu"), contextlib.nullcontext())
    assert not model.training
    assert (out["crops"], out["samples"]) == (4.0, 4.0)
    assert out["ged"] == pytest.approx(2 * out["cross"] - out["diversity"] - out["graders"], abs=1e-5)
    # The same numbers from the model's logits by hand: argmax == 1, noise seeded with cfg.seed.
    gen, geds = torch.Generator().manual_seed(CFG.seed), []
    for images, masks in val_batches:
        with torch.no_grad():
            samples = model.sample(images, 4, generator=gen).argmax(2) == 1
        geds.append(ged_terms(samples, masks).ged)
    assert out["ged"] == pytest.approx(float(torch.cat(geds).mean()), rel=1e-6)
    # The seeded generator makes two calls equal; the training RNG is not touched.
    state = torch.get_rng_state()
    again = validate(model, val_batches, CFG, torch.device("cpu"), contextlib.nullcontext())
    assert torch.equal(state, torch.get_rng_state())
    assert {k: v for k, v in again.items() if k != "time_s"} == {k: v for k, v in out.items() if k != "time_s"}


def test_samples_are_capped_at_the_models_members(val_batches) -> None:
    ensemble = _model("unet-ensemble", ensemble_size=2)
    out = validate(ensemble, val_batches, CFG, torch.device("cpu"), contextlib.nullcontext())
    assert out["samples"] == 2.0


def test_flip_task_validation_refuses_a_model_without_the_24_classes() -> None:
    model = _model()  # 2 classes
    x = torch.zeros(1, 1, 16, 16)
    batches = [(x, torch.zeros(1, 16, 16, dtype=torch.long), torch.zeros(1, 16, 16, dtype=torch.bool))]
    with pytest.raises(LidcsegError, match="predicts 2 classes; the flip task has 24"):
        validate_flip_task(model, batches, 2)
