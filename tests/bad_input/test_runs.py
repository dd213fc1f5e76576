"""A checkpoint of another model: a run of the flip task (RGB scenes, 24 classes) given to the
LIDC commands, and an LIDC run given to the flip task, are refused before any model call."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model
from tests.bad_input.conftest import cli, refused

FLIP = ModelConfig(in_channels=3, num_classes=24, base_channels=4, num_scales=3, convs_per_block=1,
                   latent_dim=2, fcomb_channels=4, fcomb_layers=1)


@pytest.fixture(scope="module")
def flip_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("flip") / "best"
    save_checkpoint(folder, create_model(FLIP), meta={"step": 1, "train": to_dict(TrainConfig(input_size=64))})
    return folder


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("scan") / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.full((40, 40, 6), -800, np.int16), np.diag([0.7, 0.7, 2.0, 1.0])), path)
    return path


NEEDLE = "takes 3-channel images, these inputs have 1"


@pytest.mark.parametrize("command", ["evaluate", "ambiguity", "latent", "sample"])
def test_a_flip_task_run_is_refused_by_the_lidc_commands(command: str, flip_run: Path, disc_data: Path,
                                                          scan: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = {
        "evaluate": ["evaluate", "--data", disc_data, "--run", flip_run, "--out", out],
        "ambiguity": ["ambiguity", "--data", disc_data, "--run", flip_run, "--out", out],
        "latent": ["latent", "--data", disc_data, "--run", flip_run, "--index", "0", "--out", tmp_path / "l.png"],
        "sample": ["sample", scan, "--at", "0,0,0", "--run", flip_run, "--out", out],
    }[command]
    refused(cli(*args), str(flip_run), NEEDLE)
    assert not out.exists() and not (tmp_path / "l.png").exists()
