"""Checkpoints: safetensors + config.json round trip, and refusals with one-line errors."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch

from lidcseg.config import ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.models import create_model
from lidcseg.models.checkpoint import (
    CONFIG_FILE,
    FORMAT_NAME,
    WEIGHTS_FILE,
    load_checkpoint,
    load_model,
    save_checkpoint,
)
from lidcseg.seed import seed_everything

CFG = ModelConfig(
    base_channels=2, num_scales=2, convs_per_block=1, latent_dim=2, fcomb_channels=4, fcomb_layers=1
)


def saved(tmp_path: Path, cfg: ModelConfig = CFG, name: str = "ckpt", seed: int = 0):
    seed_everything(seed)
    model = create_model(cfg)
    folder = save_checkpoint(tmp_path / name, model, meta={"step": 12})
    return model, folder


def test_round_trip_gives_same_outputs(tmp_path: Path) -> None:
    model, folder = saved(tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]  # no temp files
    loaded = load_model(folder)
    assert loaded.config == CFG and not loaded.training
    x = torch.randn(2, 1, 8, 8)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(model.sample(x, 3, generator=g()), loaded.sample(x, 3, generator=g()))
    config = json.loads((folder / CONFIG_FILE).read_text())
    assert config["format"] == FORMAT_NAME and config["meta"] == {"step": 12}
    assert config["model"]["base_channels"] == 2


def test_any_file_of_the_folder_names_it_and_extras_round_trip(tmp_path: Path) -> None:
    seed_everything(0)
    model = create_model(CFG)
    extra = {"ema.mean": torch.arange(3.0)}
    folder = save_checkpoint(
        tmp_path / "c" / WEIGHTS_FILE, model, extra_tensors=extra, meta={"a": [1]}
    )
    assert folder == tmp_path / "c"
    ckpt = load_checkpoint(folder / CONFIG_FILE, expected_name="probunet")
    assert torch.equal(ckpt.extra_tensors["ema.mean"], extra["ema.mean"])
    assert ckpt.meta == {"a": [1]} and ckpt.config == CFG
    assert isinstance(ckpt.model.fcomb.logits.weight, torch.nn.Parameter)


def refused(path: Path, match: str, **kwargs) -> LidcsegError:
    with pytest.raises(LidcsegError, match=match) as info:
        load_model(path, **kwargs)
    assert "\n" not in str(info.value)
    return info.value


def test_corrupt_or_foreign_weights_are_refused(tmp_path: Path) -> None:
    _, folder = saved(tmp_path)
    weights = folder / WEIGHTS_FILE
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    assert refused(folder, "safetensors").path == weights
    weights.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    refused(folder, "safetensors")
    torch.save({"w": torch.zeros(2)}, weights)  # a pickle: never unpickled
    refused(folder, "safetensors")
    weights.write_bytes(data[:-4] + b"\x00\x00\x80\x7f")  # valid file, changed bytes
    refused(folder, "checksum")
    weights.unlink()
    refused(folder, "missing weights")


def test_missing_or_foreign_config_is_refused(tmp_path: Path) -> None:
    _, folder = saved(tmp_path)
    cfg_path = folder / CONFIG_FILE
    text = cfg_path.read_text()
    cfg_path.write_text("{not json")
    assert refused(folder, "unreadable").path == cfg_path
    cfg_path.write_text(json.dumps({"format": "something-else", "model": {}}))
    refused(folder, "not a lidcseg-checkpoint config")
    cfg_path.write_text(json.dumps([1, 2]))
    refused(folder, "not a lidcseg-checkpoint")
    data = json.loads(text)
    cfg_path.write_text(json.dumps({**data, "version": 99}))
    refused(folder, "version 99")
    cfg_path.write_text(json.dumps({**data, "model": {**data["model"], "depth": 3}}))
    refused(folder, "unknown ModelConfig field")
    cfg_path.write_text(json.dumps({**data, "model": {**data["model"], "num_scales": 0}}))
    refused(folder, "num_scales")
    cfg_path.unlink()
    refused(folder, "missing config.json")
    refused(tmp_path / "nowhere", "not found")


def test_weights_of_another_architecture_are_refused(tmp_path: Path) -> None:
    _, small = saved(tmp_path, name="small")
    _, wide = saved(tmp_path, cfg=dataclasses.replace(CFG, base_channels=3), name="wide")
    shutil.copy(wide / WEIGHTS_FILE, small / WEIGHTS_FILE)
    data = json.loads((small / CONFIG_FILE).read_text())
    data.pop("weights_sha256")
    (small / CONFIG_FILE).write_text(json.dumps(data))
    err = refused(small, "do not fit the 'probunet' architecture.*wrong shape")
    assert err.path == small / WEIGHTS_FILE


def test_expected_name_refuses_another_model(tmp_path: Path) -> None:
    _, folder = saved(tmp_path)
    refused(folder, "expected 'dropout'", expected_name="dropout")


def test_loaded_model_keeps_channels_last_weights(tmp_path: Path) -> None:
    model, folder = saved(tmp_path)
    conv = model.unet.decoder[0][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    loaded = load_model(folder)
    weight = loaded.unet.decoder[0][0].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
