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


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_name_builds_a_harness_model_with_what_it_implies(name: str) -> None:
    spec = MODEL_SPECS[name]
    module, cls = spec.target.split(":")
    assert issubclass(getattr(importlib.import_module(module), cls), SegmentationModel)
    cfg = model_config(name)
    assert cfg.name == name and resolve_config(cfg) == cfg
    for k, v in {**spec.defaults, **spec.implies}.items():
        assert getattr(cfg, k) == v
    assert spec.summary


def test_defaults_are_overridable_and_keep_the_base_architecture() -> None:
    base = ModelConfig(base_channels=16, num_scales=4, beta=3.0)
    cfg = model_config("i2i-vae", base)
    assert (cfg.base_channels, cfg.num_scales, cfg.beta, cfg.latent_dim) == (16, 4, 10.0, 3)
    assert model_config("i2i-vae", base, beta=1.0, latent_dim=6).beta == 1.0
    assert model_config("m-heads", base, num_heads=8).num_heads == 8


def test_unknown_names_list_the_valid_ones() -> None:
    for call in (lambda: model_config("vae"), lambda: create_model(ModelConfig(name="vae"))):
        with pytest.raises(LidcsegError, match="valid names: probunet, fixed-prior, .*i2i-vae"):
            call()
