"""Config composition: preset -> model name defaults -> --config file -> --set, and the --resume rule."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from lidcseg.config import MODEL_SUMMARIES, ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.models.registry import MODEL_NAMES, MODEL_SPECS, model_config
from lidcseg.presets import PRESET_SUMMARIES, PRESETS, TASKS, compose


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
        compose(model_defaults=lambda name, base, task: dataclasses.replace(base, name=name), model="bogus")


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


def test_cityscapes_lowers_the_lr_to_1e5_in_3_steps() -> None:
    """Appendix H.2: 1e-4 lowered to 1e-5 in 3 step-downs; the LIDC `paper` preset keeps H.1's 1e-6 in 5."""
    from lidcseg.training.schedule import lr_schedule

    _, city = PRESETS["cityscapes"]
    bounds, values = lr_schedule(city)
    assert (city.steps, city.lr, city.lr_final, city.lr_decay_steps) == (240_000, 1e-4, 1e-5, 3)
    assert bounds == [60_000, 120_000, 180_000]  # round(steps * i / (n + 1)), i = 1..3
    assert values == pytest.approx([1e-4, 1e-4 * 10 ** (-1 / 3), 1e-4 * 10 ** (-2 / 3), 1e-5])
    assert PRESETS["paper"] == (ModelConfig(), TrainConfig())
    bounds, values = lr_schedule(PRESETS["paper"][1])
    assert bounds == [40_000, 80_000, 120_000, 160_000, 200_000]
    assert len(values) == 6 and values[0] == pytest.approx(1e-4) and values[-1] == pytest.approx(1e-6)


def test_model_defaults_depend_on_the_task() -> None:
    """H.2: the Image2Image VAE is beta = 10, N = 3 on LIDC but beta = 1 on Cityscapes (N stays 3)."""
    from lidcseg.data.scenes import TASK

    assert TASK in TASKS and "lidc" in TASKS
    m, _ = compose("cpu-quick", model_defaults=model_config, task=TASK, model="i2i-vae")
    assert (m.name, m.beta, m.latent_dim, m.prior, m.injection) == ("i2i-vae", 1.0, 3, "fixed", "early")
    assert (m.in_channels, m.num_classes) == (3, 24)  # the scene preset's architecture stays
    m, _ = compose("paper", model_defaults=model_config, task=TASK, model="i2i-vae")
    assert (m.beta, m.latent_dim, m.num_scales) == (1.0, 3, 6)
    m, _ = compose("paper", model_defaults=model_config, task="lidc", model="i2i-vae")
    assert (m.beta, m.latent_dim) == (10.0, 3)
    # --set (and a file) still win over the task's defaults.
    m, _ = compose("cpu-quick", model_defaults=model_config, task=TASK, model="i2i-vae",
                   overrides=["model.beta=4", "latent_dim=2"])
    assert (m.beta, m.latent_dim) == (4.0, 2)
    # Models without task defaults are the same on both tasks.
    assert compose(model_defaults=model_config, task=TASK, model="probunet") == PRESETS["cityscapes"]
    with pytest.raises(LidcsegError, match="unknown task 'cxr'; valid: lidc, flip-scenes"):
        compose(model_defaults=model_config, task="cxr")
    with pytest.raises(LidcsegError, match="unknown task 'cxr'; valid: lidc, flip-scenes"):
        model_config("i2i-vae", task="cxr")


def test_cli_train_gives_i2i_vae_the_defaults_of_the_datas_task(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`lidcseg train --model i2i-vae`: beta 1 on scene data, 10 on LIDC crops; --set wins."""
    from typer.testing import CliRunner

    from lidcseg.data.scenes import make_scenes
    from lidcseg_cli.main import app

    seen: list[ModelConfig] = []
    monkeypatch.setattr("lidcseg.training.train", lambda data, m, t, out, **kw: seen.append(m))
    scenes = tmp_path / "scenes"
    make_scenes(scenes, n_train=2, n_val=1, n_test=1, height=32, width=64, seed=0)
    for i, (data, extra) in enumerate([(scenes, []), (disc_data, []), (scenes, ["--set", "model.beta=3"])]):
        args = ["train", "--data", str(data), "--out", str(tmp_path / f"run{i}"), "--model", "i2i-vae", *extra]
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 0, result.output
    assert [(m.beta, m.latent_dim, m.in_channels) for m in seen] == [(1.0, 3, 3), (10.0, 3, 1), (3.0, 3, 3)]


def test_train_help_states_the_task_defaults() -> None:
    """The models list of `lidcseg train --help` names i2i-vae's beta on each task."""
    from typer.testing import CliRunner

    from lidcseg_cli.main import app

    result = CliRunner().invoke(app, ["train", "--help"], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    text = " ".join(ln.strip(" │") for ln in result.output.splitlines())
    assert " ".join(MODEL_SUMMARIES["i2i-vae"].split()) in " ".join(text.split())
    assert "beta 10 on LIDC, 1 on flip scenes" in MODEL_SUMMARIES["i2i-vae"]
