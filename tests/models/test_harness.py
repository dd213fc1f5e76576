"""Checks every registered model passes: shapes, odd sizes, backward, determinism, sample
count, sample diversity, eps, train/eval independence, checkpoint round trip, no NaN.

Adding a model to the registry means adding its tiny config to ``TINY`` below.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

import lidcseg.models.prob_unet as prob_unet
from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.models import MODEL_NAMES, ProbUNet, SegmentationModel, create_model, model_config
from lidcseg.models.checkpoint import load_model, save_checkpoint
from lidcseg.seed import seed_everything
from lidcseg.training import objective

#: Architecture shared by the tiny models (4 scales: sizes must be multiples of 8).
TINY_BASE = ModelConfig(
    base_channels=4,
    num_scales=4,
    convs_per_block=2,
    latent_dim=3,
    fcomb_channels=8,
    fcomb_layers=2,
    ensemble_size=4,
    num_heads=4,
)

#: A tiny configuration of each registered model.
TINY: dict[str, ModelConfig] = {name: model_config(name, TINY_BASE) for name in MODEL_NAMES}

#: Overrides that make a model's loss free of noise other than the posterior sample.
NOISE_FREE: dict[str, dict[str, float]] = {"dropout-unet": {"dropout": 0.0}}


def make(name: str, seed: int = 0, **overrides: object) -> SegmentationModel:
    seed_everything(seed)
    return create_model(dataclasses.replace(TINY[name], **overrides))


def batch(b: int = 2, h: int = 48, w: int = 80, seed: int = 1, empty: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 1, h, w, generator=g)
    y = torch.zeros(b, h, w, dtype=torch.long)
    if not empty:
        y[:, h // 4 : h // 2, w // 4 : w // 2] = 1
    return x, y


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def capped(model: SegmentationModel, n: int) -> int:
    """``n``, or the model's sample capacity when it has fewer (a 1-member U-Net)."""
    return n if model.max_samples is None else min(n, model.max_samples)


def test_every_registered_model_has_a_tiny_config() -> None:
    assert set(TINY) == set(MODEL_NAMES)
    assert {"probunet", "fixed-prior", "fixed-prior-no-context", "early-injection",
            "dropout-unet", "unet-ensemble", "m-heads", "i2i-vae"} <= set(MODEL_NAMES)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_and_sample_shapes_on_odd_valid_size(name: str) -> None:
    model = make(name)
    assert model.config == TINY[name]
    x, y = batch(h=48, w=80)
    out = model.loss(x, y)
    assert out["rec"].ndim == 0 and torch.isfinite(out["rec"]) and out["rec"].requires_grad
    assert "loss" not in out  # the terms only: the trainer owns beta
    if "kl" in out:  # latent models
        assert out["kl"].ndim == 0 and out["kl"].requires_grad
        assert out["kl_per_dim"].shape == (model.config.latent_dim,)
    n = capped(model, 3)
    samples = model.sample(x, n, generator=gen())
    assert samples.shape == (2, n, model.config.num_classes, 48, 80)
    assert not samples.requires_grad


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_number_of_samples(name: str) -> None:
    model = make(name).eval()
    x, _ = batch(b=1, h=16, w=24)
    for n in (1, 2, 4):
        if model.max_samples is not None and n > model.max_samples:
            with pytest.raises(LidcsegError, match=f"at most {model.max_samples}"):
                model.sample(x, n)
        else:
            assert model.sample(x, n, generator=gen()).shape[:2] == (1, n)
    with pytest.raises(ValueError):
        model.sample(x, 0)


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize("shape", [(50, 80), (48, 44), (48,)])
def test_invalid_input_size_is_refused_naming_the_shape(name: str, shape: tuple[int, ...]) -> None:
    model = make(name)
    x = torch.zeros(1, 1, *shape)
    with pytest.raises(LidcsegError, match=r"shape \(1, 1, "):
        model.sample(x, 1)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_backward_reaches_every_parameter(name: str) -> None:
    model = make(name)
    x, y = batch()
    objective(model.loss(x, y), model.config.beta, model.config, TrainConfig()).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, pname
        assert torch.isfinite(p.grad).all(), pname
    assert any(p.grad.abs().sum() > 0 for p in model.parameters())


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_seeded_construction_loss_and_sampling_are_deterministic(name: str) -> None:
    a, b = make(name, seed=3), make(name, seed=3)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    assert not all(
        torch.equal(va, vc)
        for va, vc in zip(
            a.state_dict().values(), make(name, seed=4).state_dict().values(), strict=True
        )
    )
    x, y = batch()
    la, lb = a.loss(x, y, generator=gen(5)), b.loss(x, y, generator=gen(5))
    assert la.keys() == lb.keys() and all(torch.equal(la[k], lb[k]) for k in la)
    n = capped(a, 4)
    sa = a.sample(x, n, generator=gen(7))
    sb = b.sample(x, n, generator=gen(7))
    assert torch.equal(sa, sb)


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if n != "unet"])
def test_hypotheses_of_one_image_differ(name: str) -> None:
    """Every model but the 1-member U-Net gives distinct hypotheses (in eval mode)."""
    model = make(name).eval()
    x, _ = batch(b=2)
    s = model.sample(x, 3, generator=gen(1))
    for i in range(3):
        for j in range(i):
            assert (s[:, i] - s[:, j]).abs().amax(dim=(1, 2, 3)).min() > 1e-6, (i, j)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_sampling_does_not_depend_on_train_or_eval_mode(name: str) -> None:
    model = make(name)
    x, _ = batch(b=1)
    n = capped(model, 3)
    a = model.train().sample(x, n, generator=gen(2))
    b = model.eval().sample(x, n, generator=gen(2))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_eps_is_honoured_by_latent_models_and_ignored_by_the_others(name: str) -> None:
    model = make(name).eval()
    x, _ = batch(b=2, h=16, w=24)
    n = capped(model, 3)
    dim = model.config.latent_dim
    eps = torch.randn(2, n, dim, generator=gen(3))
    if isinstance(model, ProbUNet):
        a = model.sample(x, n, generator=gen(1), eps=eps)
        b = model.sample(x, n, generator=gen(2), eps=eps)
        assert torch.equal(a, b)  # the noise, not the generator, decides
        assert not torch.equal(a, model.sample(x, n, eps=-eps))
        with pytest.raises(ValueError, match="eps must be"):
            model.sample(x, n, eps=eps[:, :, :1])
    else:
        a = model.sample(x, n, generator=gen(1), eps=eps)
        assert torch.equal(a, model.sample(x, n, generator=gen(1)))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_checkpoint_round_trip(name: str, tmp_path: Path) -> None:
    model = make(name)
    folder = save_checkpoint(tmp_path / name, model, meta={"step": 1})
    loaded = load_model(folder, expected_name=name)
    assert type(loaded) is type(model) and loaded.config == model.config
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x, _ = batch(b=1, h=16, w=24)
    n = capped(model, 3)
    assert torch.equal(model.sample(x, n, generator=gen()), loaded.sample(x, n, generator=gen()))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_empty_masks_and_fully_ignored_images_give_finite_loss(name: str) -> None:
    model = make(name)
    x, y = batch(empty=True)
    out = model.loss(x, y)
    assert all(torch.isfinite(v).all() for v in out.values())
    ignore = torch.zeros_like(y, dtype=torch.bool)
    ignore[0] = True  # first image: every pixel ignored
    y = y.masked_fill(ignore, 255)  # labels under the ignore mask are never read
    out = model.loss(x, y, ignore=ignore)
    assert all(torch.isfinite(v).all() for v in out.values())
    objective(out, model.config.beta, model.config, TrainConfig()).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_loss_is_the_mean_per_image_loss(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same image repeated k times gives the same loss: beta does not depend on B."""
    # Remove the sampling noise so that repeated images see the same latent.
    monkeypatch.setattr(
        prob_unet,
        "standard_normal",
        lambda shape, generator, device, dtype=torch.float32: torch.zeros(shape, dtype=dtype),
    )
    model = make(name, **NOISE_FREE.get(name, {}))
    x, y = batch(b=1)
    one = model.loss(x, y)
    four = model.loss(x.repeat(4, 1, 1, 1), y.repeat(4, 1, 1))
    for key in ("rec", "kl"):
        if key in one:
            torch.testing.assert_close(one[key], four[key], rtol=1e-5, atol=1e-5)


def test_config_is_kept_and_validated() -> None:
    model = make("probunet")
    assert model.config == TINY["probunet"]
    with pytest.raises(LidcsegError, match="num_scales"):
        dataclasses.replace(TINY["probunet"], num_scales=0)
    for field, bad in (("prior", "flat"), ("injection", "middle"), ("dropout", 1.0),
                       ("ensemble_size", 0), ("num_heads", 0), ("head_epsilon", 1.5)):
        with pytest.raises(LidcsegError, match=field):
            dataclasses.replace(TINY["probunet"], **{field: bad})
    with pytest.raises(LidcsegError, match="valid names: .*probunet"):
        create_model(dataclasses.replace(TINY["probunet"], name="no-such-model"))
