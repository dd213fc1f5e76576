"""Config composition: preset -> model name defaults -> --config file -> --set, and the --resume rule."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lidcseg.config import (
    MODEL_SUMMARIES,
    PRESET_SUMMARIES,
    PRESETS,
    ModelConfig,
    TrainConfig,
    compose,
)
from lidcseg.errors import LidcsegError
from lidcseg.models.registry import MODEL_NAMES, MODEL_SPECS, model_config


def _file(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return path


def test_the_preset_alone() -> None:
    assert compose(model_defaults=model_config) == PRESETS["paper"]
    assert compose("cpu-quick", model_defaults=model_config) == PRESETS["cpu-quick"]
    # On flip-task scenes the LIDC names mean the scene presets.
    assert compose("cpu-quick", model_defaults=model_config, task="flip-scenes") == PRESETS["scenes-quick"]
    assert compose("paper", model_defaults=model_config, task="flip-scenes") == PRESETS["cityscapes"]
    with pytest.raises(LidcsegError, match="unknown preset 'nope'; valid: paper, cpu-quick"):
        compose("nope", model_defaults=model_config)


def test_a_later_source_wins(tmp_path: Path) -> None:
    quick_model, quick_train = PRESETS["cpu-quick"]
    # The model name's defaults over the preset: i2i-vae sets beta 10 and N = 3, the
    # preset's architecture stays.
    m, t = compose("cpu-quick", model_defaults=model_config, model="i2i-vae")
    assert (m.name, m.beta, m.latent_dim, m.prior, m.injection) == ("i2i-vae", 10.0, 3, "fixed", "early")
    assert (m.base_channels, m.num_scales) == (quick_model.base_channels, quick_model.num_scales)
    assert t == quick_train
    # The file over the name's defaults.
    f = _file(tmp_path, {"model": {"beta": 5.0, "base_channels": 8}, "train": {"steps": 7, "lr": 0.01}})
    m, t = compose("cpu-quick", model_defaults=model_config, model="i2i-vae", config_file=f)
    assert (m.beta, m.latent_dim, m.base_channels, t.steps, t.lr) == (5.0, 3, 8, 7, 0.01)
    # --set over the file; --steps and --device over --set.
    m, t = compose("cpu-quick", model_defaults=model_config, model="i2i-vae", config_file=f,
                   overrides=["beta=2", "steps=8", "lr=0.02", "device=cuda"], steps=9, device="cpu")
    assert (m.beta, m.base_channels, t.steps, t.lr, t.device) == (2.0, 8, 9, 0.02, "cpu")


def test_i2i_vae_defaults_to_beta_10_unless_set() -> None:
    assert compose(model_defaults=model_config, model="i2i-vae")[0].beta == 10.0
    assert compose(model_defaults=model_config, model="i2i-vae", overrides=["beta=3"])[0].beta == 3.0
    assert compose(model_defaults=model_config, model="i2i-vae", overrides=["model.beta=0"])[0].beta == 0.0
    # A model given by --set only is not a --model: no name defaults.
    assert compose(model_defaults=model_config, overrides=["model.name=i2i-vae"])[0].beta == 1.0


def test_resume_uses_the_saved_config(tmp_path: Path) -> None:
    saved = (ModelConfig(base_channels=4, latent_dim=2), TrainConfig(steps=11, lr=0.5, lr_final=0.1))

    def load() -> tuple[ModelConfig, TrainConfig]:
        return saved

    def refuse() -> tuple[ModelConfig, TrainConfig]:
        raise AssertionError("the saved config must not be read")

    # No preset and no file: the run's own config, with the later sources on top.
    assert compose(model_defaults=model_config, saved=load) == saved
    m, t = compose(model_defaults=model_config, saved=load, overrides=["lr=0.2"], steps=20)
    assert (m, t) == (saved[0], dataclasses.replace(saved[1], lr=0.2, steps=20))
    m, _ = compose(model_defaults=model_config, saved=load, model="i2i-vae")
    assert (m.base_channels, m.beta, m.latent_dim) == (4, 10.0, 3)
    # A preset or a file replaces the saved config as the base.
    assert compose("cpu-quick", model_defaults=model_config, saved=refuse) == PRESETS["cpu-quick"]
    f = _file(tmp_path, {"train": {"steps": 3}})
    m, t = compose(model_defaults=model_config, saved=refuse, config_file=f)
    assert (m, t) == (PRESETS["paper"][0], dataclasses.replace(PRESETS["paper"][1], steps=3))


def test_unknown_model_lists_the_valid_names() -> None:
    valid = re.escape(", ".join(MODEL_NAMES))
    with pytest.raises(LidcsegError, match=f"unknown model 'bogus'; valid names: {valid}"):
        compose(model_defaults=model_config, model="bogus")
    with pytest.raises(LidcsegError, match=f"unknown model 'bogus'; valid names: {valid}"):
        compose(model_defaults=model_config, overrides=["model.name=bogus"])
    with pytest.raises(LidcsegError, match=f"unknown model 'bogus'; valid names: {valid}"):
        # compose checks the final name itself, whatever the name-defaults function did.
        compose(model_defaults=lambda name, base: dataclasses.replace(base, name=name), model="bogus")


def test_name_tables_match_the_registry() -> None:
    """The torch-free tables of --help are the registry's names and summaries, in order."""
    assert list(MODEL_SUMMARIES) == list(MODEL_SPECS) == list(MODEL_NAMES)
    assert MODEL_SUMMARIES == {name: spec.summary for name, spec in MODEL_SPECS.items()}
    assert list(PRESET_SUMMARIES) == list(PRESETS)


def test_an_input_size_the_u_net_cannot_halve_is_refused_up_front() -> None:
    with pytest.raises(LidcsegError, match=r"train.input_size 100 must be a multiple of 16"):
        compose("paper", model_defaults=model_config, overrides=["train.input_size=100"])
    model_cfg, train_cfg = compose("paper", model_defaults=model_config,
                                   overrides=["train.input_size=96", "model.num_scales=4"])
    assert train_cfg.input_size == 96 and model_cfg.num_scales == 4
