"""U-Net ensemble (Fig. 2b): members differ, n > M refused, independent gradients, assembly."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from lidcseg.errors import LidcsegError
from lidcseg.losses import pixel_cross_entropy
from lidcseg.models import UNetEnsemble, assemble, create_model, model_config
from lidcseg.models.checkpoint import load_checkpoint, save_checkpoint
from lidcseg.seed import seed_everything

ARCH = dict(base_channels=2, num_scales=3, convs_per_block=1, fcomb_channels=4, fcomb_layers=1)


def make(name: str = "unet-ensemble", seed: int = 0, **overrides: object) -> UNetEnsemble:
    seed_everything(seed)
    model = create_model(model_config(name, **ARCH, **overrides))
    assert isinstance(model, UNetEnsemble)
    return model


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 16, 16, generator=torch.Generator().manual_seed(0))


def test_members_are_independently_initialised_and_give_different_hypotheses() -> None:
    model = make(ensemble_size=3)
    w = [m.unet.encoder.blocks[0][0].weight for m in model.members]
    assert not torch.equal(w[0], w[1]) and not torch.equal(w[1], w[2])
    s = model.sample(images(), 3)
    with torch.no_grad():
        for m in range(3):
            torch.testing.assert_close(s[:, m], model.members[m](images()))
    assert (s[:, 0] - s[:, 1]).abs().amax() > 1e-6


def test_more_samples_than_members_are_refused() -> None:
    model = make(ensemble_size=3)
    assert model.max_samples == 3
    assert model.sample(images(), 2).shape[1] == 2  # the first n members
    with pytest.raises(LidcsegError, match="at most 3 hypotheses .* 4 were asked"):
        model.sample(images(), 4)


def test_the_one_member_ensemble_is_the_deterministic_unet() -> None:
    unet = make("unet", ensemble_size=1)
    assert unet.config.ensemble_size == 1 and len(unet.members) == 1
    assert model_config("unet", ensemble_size=1).ensemble_size == 1
    with pytest.raises(LidcsegError, match="implies ensemble_size=1"):
        model_config("unet", ensemble_size=4)
    x = images()
    assert torch.equal(unet.sample(x, 1), unet.sample(x, 1, generator=torch.Generator()))
    with pytest.raises(LidcsegError, match="at most 1"):
        unet.sample(x, 2)


def test_each_member_gets_exactly_its_own_gradient() -> None:
    model = make(ensemble_size=2)
    x = images()
    y = (torch.rand(2, 16, 16, generator=torch.Generator().manual_seed(1)) > 0.5).long()
    out = model.loss(x, y)
    ce = torch.stack([pixel_cross_entropy(m(x), y).mean() for m in model.members])
    torch.testing.assert_close(out["rec"], ce.sum())  # the whole loss: no KL
    torch.testing.assert_close(out["rec_per_member"], ce.detach())
    out["rec"].backward()
    together = model.members[1].head.logits.weight.grad.clone()
    model.zero_grad()
    pixel_cross_entropy(model.members[1](x), y).mean().backward()
    torch.testing.assert_close(together, model.members[1].head.logits.weight.grad)


def _saved(tmp_path: Path, name: str, seed: int, **overrides: object) -> tuple[UNetEnsemble, Path]:
    model = make(name, seed=seed, **overrides)
    return model, save_checkpoint(tmp_path / f"{name}-{seed}", model, meta={"step": 10 + seed})


def test_assemble_independently_trained_unets_into_one_checkpoint(tmp_path: Path) -> None:
    a, pa = _saved(tmp_path, "unet", 0)
    b, pb = _saved(tmp_path, "unet", 1)
    c, pc = _saved(tmp_path, "unet-ensemble", 2, ensemble_size=2)
    folder = assemble([pa, pb, pc], tmp_path / "ens")
    ckpt = load_checkpoint(folder, expected_name="unet-ensemble")
    ens = ckpt.model
    assert ens.config == dataclasses.replace(a.config, name="unet-ensemble", ensemble_size=4)
    assert [s["step"] for s in ckpt.meta["assembled_from"]] == [10, 11, 12, 12]
    x = images()
    s = ens.sample(x, 4)
    torch.testing.assert_close(s[:, 0], a.sample(x, 1)[:, 0])
    torch.testing.assert_close(s[:, 1], b.sample(x, 1)[:, 0])
    torch.testing.assert_close(s[:, 2:], c.sample(x, 2))


def test_assemble_refuses_duplicates_other_models_and_other_architectures(tmp_path: Path) -> None:
    _, pa = _saved(tmp_path, "unet", 0)
    with pytest.raises(LidcsegError, match="identical weights"):
        assemble([pa, pa], tmp_path / "dup")
    assert assemble([pa, pa], tmp_path / "dup", allow_identical=True).is_dir()
    seed_everything(0)
    other = create_model(model_config("m-heads", **ARCH, num_heads=2))
    po = save_checkpoint(tmp_path / "mh", other)
    with pytest.raises(LidcsegError, match="assemble takes unet or unet-ensemble"):
        assemble([pa, po], tmp_path / "bad")
    seed_everything(1)
    wide = create_model(model_config("unet", **{**ARCH, "base_channels": 3}))
    pw = save_checkpoint(tmp_path / "wide", wide)
    with pytest.raises(LidcsegError, match="base_channels"):
        assemble([pa, pw], tmp_path / "bad")
    with pytest.raises(LidcsegError, match="at least one"):
        assemble([], tmp_path / "bad")
