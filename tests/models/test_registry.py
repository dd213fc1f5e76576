"""Model names: what each implies, its defaults, and the errors for unknown names."""

from __future__ import annotations

import importlib

import pytest

from lidcseg.config import ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.models import (
    MODEL_NAMES,
    MODEL_SPECS,
    SegmentationModel,
    create_model,
    model_config,
    resolve_config,
)
from lidcseg.presets import TASKS


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_builds_a_harness_model_with_what_it_implies(name: str) -> None:
    spec = MODEL_SPECS[name]
    module, cls = spec.target.split(":")
    assert issubclass(getattr(importlib.import_module(module), cls), SegmentationModel)
    assert set(spec.defaults) <= set(TASKS), "defaults are keyed by task"
    for task in TASKS:
        cfg = model_config(name, task=task)
        assert cfg.name == name and resolve_config(cfg) == cfg
        for k, v in {**spec.defaults.get(task, {}), **spec.implies}.items():
            assert getattr(cfg, k) == v
    assert model_config(name) == model_config(name, task="lidc")
    assert spec.summary


def test_defaults_are_overridable_and_keep_the_base_architecture() -> None:
    base = ModelConfig(base_channels=16, num_scales=4, beta=3.0)
    cfg = model_config("i2i-vae", base)
    assert (cfg.base_channels, cfg.num_scales, cfg.beta, cfg.latent_dim) == (16, 4, 10.0, 3)
    assert model_config("i2i-vae", base, beta=1.0, latent_dim=6).beta == 1.0
    assert model_config("m-heads", base, num_heads=8).num_heads == 8


def test_i2i_vae_defaults_depend_on_the_task() -> None:
    """Appendix H.1 / H.2: beta = 10, N = 3 on LIDC; beta = 1 on Cityscapes, N kept at 3."""
    base = ModelConfig(in_channels=3, num_classes=24, num_scales=6, beta=5.0, latent_dim=6)
    assert MODEL_SPECS["i2i-vae"].defaults == {"lidc": {"beta": 10.0, "latent_dim": 3},
                                               "flip-scenes": {"beta": 1.0, "latent_dim": 3}}
    cfg = model_config("i2i-vae", base, task="flip-scenes")
    assert (cfg.beta, cfg.latent_dim, cfg.in_channels, cfg.num_scales) == (1.0, 3, 3, 6)
    assert model_config("i2i-vae", base, "flip-scenes", beta=2.0).beta == 2.0
    assert model_config("i2i-vae", base, task="lidc").beta == 10.0
    with pytest.raises(LidcsegError, match="unknown task 'ct'; valid: lidc, flip-scenes"):
        model_config("probunet", task="ct")


def test_unknown_names_list_the_valid_ones() -> None:
    for call in (lambda: model_config("vae"), lambda: create_model(ModelConfig(name="vae"))):
        with pytest.raises(LidcsegError, match="valid names: probunet, fixed-prior, .*i2i-vae"):
            call()
