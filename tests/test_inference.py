"""The inference layer: opening runs, the one foreground rule, the noise, threads."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.inference import (
    draw_foreground,
    draw_image_foreground,
    draw_labels,
    draw_logits,
    foreground_of,
    image_noise,
    labels_of,
    lesion_noise,
    noise_dim,
    open_run,
    open_runs,
    require_input_size,
    resolve_checkpoint,
    run_label,
    torch_threads,
    unique_labels,
)
from lidcseg.io.atomic import write_json_atomic
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model
from lidcseg.seed import seed_everything

TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2,
                   fcomb_channels=4, fcomb_layers=1)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run folder with best/ and last/ (different steps) and a config.json recording input size 32."""
    root = tmp_path_factory.mktemp("inference") / "myrun"
    seed_everything(0)
    model = create_model(TINY)
    train = to_dict(TrainConfig(input_size=32))
    save_checkpoint(root / "best", model, meta={"step": 7, "train": train})
    save_checkpoint(root / "last", model, meta={"step": 9, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(TINY), "train": train, "data": {"crop_size": 100}})
    return root


# -- the foreground rule --------------------------------------------------------------------


def test_foreground_is_argmax_not_background_ties_to_background() -> None:
    logits = torch.tensor([
        [0.0, 1.0, -1.0],   # class 1 wins: foreground
        [2.0, 1.0, 1.5],    # background wins
        [1.0, 1.0, 0.0],    # tie background/class 1: argmax takes background
        [0.0, -1.0, 0.5],   # class 2 wins: foreground
    ]).T.reshape(1, 1, 3, 2, 2)  # (B, n, C, H, W)
    fg = foreground_of(logits)
    assert fg.shape == (1, 1, 2, 2)
    assert fg.flatten().tolist() == [True, False, False, True]
    torch.testing.assert_close(fg, labels_of(logits) != 0)


def test_foreground_matches_argmax_on_random_logits() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn((3, 4, 5, 8, 8), generator=gen).round(decimals=1)  # rounding makes ties
    assert torch.equal(foreground_of(logits), logits.argmax(2) != 0)


class _Constant(torch.nn.Module):
    """Not a harness model: returns fixed logits and ignores its generator."""

    def __init__(self, shape_out: tuple[int, ...] | None = None) -> None:
        super().__init__()
        self.shape_out = shape_out

    def sample(self, x: torch.Tensor, n: int, generator=None) -> torch.Tensor:  # noqa: ANN001
        shape = self.shape_out or (x.shape[0], n, 2, *x.shape[2:])
        out = torch.zeros(shape)
        out[:, :, 1, : x.shape[2] // 2] = 1.0  # top half foreground
        return out


def test_draw_helpers_agree_and_check_the_shape() -> None:
    x = torch.zeros(2, 1, 4, 6)
    logits = draw_logits(_Constant(), x, 3)
    assert logits.shape == (2, 3, 2, 4, 6)
    fg = draw_foreground(_Constant(), x, 3)
    assert fg.dtype == torch.bool and fg[:, :, :2].all() and not fg[:, :, 2:].any()
    assert torch.equal(draw_labels(_Constant(), x, 3), fg.long())
    with pytest.raises(LidcsegError, match=r"returned shape \(2, 2, 2, 4, 6\), expected \(2, 3, C, 4, 6\)"):
        draw_logits(_Constant((2, 2, 2, 4, 6)), x, 3)


# -- the noise -----------------------------------------------------------------------------------


def test_noise_dim_comes_from_the_model_protocol() -> None:
    assert noise_dim(create_model(TINY)) == 2
    assert noise_dim(create_model(ModelConfig(name="dropout-unet", base_channels=4, num_scales=3))) >= 1
    assert noise_dim(_Constant()) is None


def test_image_noise_depends_only_on_seed_and_row() -> None:
    a = image_noise(np.array([3, 7, 11]), 4, 2, seed=5)
    b = image_noise(np.array([11]), 4, 2, seed=5)
    assert a.shape == (3, 4, 2)
    torch.testing.assert_close(a[2], b[0])
    assert not torch.equal(a[0], image_noise(np.array([3]), 4, 2, seed=6)[0])


def test_lesion_noise_is_shared_across_a_lesions_tiles() -> None:
    tiles = np.array([0, 0, 1, 1, 1])
    shared = lesion_noise(2, tiles, 4, 3, torch.Generator().manual_seed(0), shared=True)
    assert shared.shape == (5, 4, 3)
    assert torch.equal(shared[0], shared[1]) and torch.equal(shared[2], shared[4])
    assert not torch.equal(shared[0], shared[2])
    own = lesion_noise(2, tiles, 4, 3, torch.Generator().manual_seed(0), shared=False)
    assert not torch.equal(own[0], own[1])


def test_image_foreground_uses_per_image_noise_for_harness_models() -> None:
    seed_everything(0)
    model = create_model(TINY).eval()
    x = torch.randn(3, 1, 32, 32)
    rows = np.array([4, 5, 6])
    full = draw_image_foreground(model, x, 4, rows, seed=1, generator=torch.Generator())
    one = draw_image_foreground(model, x[1:2], 4, rows[1:2], seed=1, generator=torch.Generator())
    assert torch.equal(full[1:2], one)  # independent of the batch around it


# -- opening runs ---------------------------------------------------------------------------------


def test_a_run_folder_opens_its_best_checkpoint(run_dir: Path) -> None:
    run = open_run(run_dir, "cpu")
    assert run.checkpoint == run_dir / "best" and run.run_dir == run_dir
    assert run.label == "myrun" and run.name == "probunet"
    assert run.input_size == 32 and run.data.crop_size == 100 and run.info["step"] == 7
    assert not run.model.training


def test_a_checkpoint_folder_opens_itself(run_dir: Path) -> None:
    assert resolve_checkpoint(run_dir / "last") == (run_dir / "last", None)
    assert resolve_checkpoint(run_dir / "last" / "model.safetensors") == (run_dir / "last", None)
    run = open_run(run_dir / "last", "cpu", input_size=16)
    assert run.label == "myrun" and run.info["step"] == 9 and run.input_size == 16


def test_labels_are_unique() -> None:
    assert unique_labels(["a", "a", "b", "a"]) == ["a", "a#2", "b", "a#3"]
    assert run_label(Path("runs/x/best")) == "x" and run_label(Path("runs/y")) == "y"


def test_open_runs_checks_input_sizes(run_dir: Path, tmp_path: Path) -> None:
    runs = open_runs([run_dir, run_dir / "best"], "cpu")
    assert [r.label for r in runs] == ["myrun", "myrun#2"]
    with pytest.raises(LidcsegError, match="no run given"):
        open_runs([], "cpu")
    bare = tmp_path / "bare"
    save_checkpoint(bare, create_model(TINY), meta={"step": 1})
    with pytest.raises(LidcsegError, match="does not record its training input size"):
        open_runs([bare], "cpu")
    assert open_runs([bare], "cpu", same_input_size=False)[0].input_size is None


def test_bad_run_paths_are_one_line_errors(run_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="not found"):
        open_run(tmp_path / "missing", "cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LidcsegError, match="no best/ or last/ checkpoint"):
        open_run(tmp_path / "empty", "cpu")


def test_input_size_larger_than_the_crop_is_refused(run_dir: Path) -> None:
    run = open_run(run_dir, "cpu", input_size=101)
    with pytest.raises(LidcsegError, match="exceeds the crop size 100"):
        require_input_size(run)


def test_torch_threads_restores_the_setting() -> None:
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with torch_threads(0):
        assert torch.get_num_threads() == before
    with pytest.raises(LidcsegError, match="threads must be >= 0"):
        with torch_threads(-1):
            pass
