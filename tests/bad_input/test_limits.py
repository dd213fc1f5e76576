"""Resource requests refused with the limit named before anything is allocated, and checkpoints
whose weights are of another dtype or not finite.

* ``sample -n``: 1 to 32767 (the 4th axis of hypotheses.nii.gz is a 16-bit NIfTI-1 dimension),
  no more than a DICOM SEG holds (65535 segments, 2^32 - 2 bytes of pixel data), and no
  model call larger than memory (:func:`lidcseg.resources.check_model_call`);
* ``evaluate -n``: no pairwise comparison larger than memory;
* ``latent --grid``: 2 to 101 points per axis (decoded in chunks of bounded memory);
* a model config: every integer field within :data:`lidcseg.resources.MODEL_LIMITS`, at most
  :data:`lidcseg.resources.MAX_PARAMETERS` parameters; a train config within its limits, floats finite;
* checkpoints (:func:`lidcseg.models.checkpoint.load_checkpoint`): weights of another dtype than
  the model's (float64, int8) and NaN/inf weights are refused, naming the file and the tensor.

Memory limits are made deterministic by fixing the machine's memory at 4 GiB.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.nifti import make_header
from lidcseg.models.checkpoint import load_checkpoint, save_checkpoint
from lidcseg.models.registry import create_model
from lidcseg.resources import MAX_PARAMETERS, parameter_estimate
from tests.bad_input.conftest import cli, refused

TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2, fcomb_channels=4,
                   fcomb_layers=1)
MEMORY = 4 << 30


@pytest.fixture(autouse=True)
def four_gib(monkeypatch: pytest.MonkeyPatch) -> None:
    """This machine has 4 GiB, whatever it really has (the limits do not depend on the host)."""
    monkeypatch.setattr("lidcseg.resources.memory_bytes", lambda device=None: MEMORY)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `lidcseg train`-style run holding a tiny untrained Prob. U-Net (64 x 64 tiles)."""
    root = tmp_path_factory.mktemp("run") / "run"
    torch.manual_seed(0)
    train = to_dict(TrainConfig(input_size=64))
    save_checkpoint(root / "best", create_model(TINY), meta={"step": 0, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(TINY), "train": train, "data": {"crop_size": 180}})
    return root


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 40 x 40 x 8 NIfTI of lung with a small soft-tissue blob in the middle, 1 mm voxels."""
    vol = np.full((40, 40, 8), -850, np.int16)
    vol[16:24, 16:24, 2:6] = 40
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, np.eye(4)), path)
    return path


def sample(scan: Path, run: Path, out: Path, *extra: object):
    return cli("sample", scan, "--run", run, "--out", out, "--at-voxel", "20,20,4", "--threads", 1, *extra)


# -- sample -n, evaluate -n, latent --grid ------------------------------------------------------


@pytest.mark.parametrize(("n", "needles"), [
    (32768, ["-n 32768", "1 to 32767", "NIfTI-1"]),
    (0, ["-n 0", "1 to 32767"]),
    (-5, ["-n -5"]),
])
def test_sample_n_outside_what_nifti_holds(n: int, needles: list[str], scan: Path, run_dir: Path,
                                           tmp_path: Path, unchanged) -> None:
    out = tmp_path / "out"
    with unchanged(scan, run_dir):
        refused(sample(scan, run_dir, out, "-n", n), *needles)
    assert not out.exists()


def test_sample_n_beyond_memory_is_refused_before_the_model_runs(scan: Path, run_dir: Path, tmp_path: Path,
                                                                 unchanged) -> None:
    out = tmp_path / "out"
    with unchanged(scan, run_dir):
        line = refused(sample(scan, run_dir, out, "-n", 20000),
                       "-n 20000 samples of 5 64x64 images per model call", "of memory", "4 GiB",
                       "lower -n or --batch-size")
    assert "GiB" in line and not out.exists()


def test_sample_n_beyond_a_dicom_seg_is_refused_before_the_model_runs(fault_root, run_dir: Path, tmp_path: Path,
                                                                     unchanged) -> None:
    """5 slices of 512 x 512: 30000 bit-packed segments are 4.9 GB, over the 32-bit Pixel Data length."""
    from tests.conftest import FAULT_PATIENT

    series = next((fault_root("") / FAULT_PATIENT).glob("*/*"))
    out = tmp_path / "out"
    with unchanged(series, run_dir):
        refused(cli("sample", series, "--run", run_dir, "--out", out, "--at-voxel", "256,256,30", "-n", 30000),
                "-n 30000", "bytes of SEG pixel data", "4294967294", "lower -n")
    assert not out.exists()


def test_seg_segment_limit() -> None:
    from lidcseg.io.dicom_seg import check_seg_size

    check_seg_size(4, 65535)
    with pytest.raises(LidcsegError, match="1 to 65535 segments"):
        check_seg_size(4, 65536)


def test_sample_with_a_large_batch_size_is_not_refused(scan: Path, run_dir: Path, tmp_path: Path) -> None:
    """--batch-size only caps the tiles per call: a huge one costs nothing with 5 tiles."""
    out = tmp_path / "out"
    result = sample(scan, run_dir, out, "-n", 2, "--batch-size", 10**9)
    assert result.exit_code == 0, result.stderr
    assert (out / "hypotheses.nii.gz").is_file()


def test_evaluate_n_beyond_memory(disc_data: Path, run_dir: Path, tmp_path: Path, unchanged) -> None:
    out = tmp_path / "report"
    with unchanged(disc_data, run_dir):
        refused(cli("evaluate", "--data", disc_data, "--run", run_dir, "--out", out, "-n", "4,1000000"),
                "-n 1000000 samples", "compared pairwise", "lower -n")
    assert not out.exists()


@pytest.mark.parametrize(("args", "needles"), [
    (["--grid", 102], ["--grid 102", "2 to 101"]),
    (["--grid", 100000], ["--grid 100000", "2 to 101"]),
    (["--extent", "inf"], ["--extent inf", "finite"]),
    (["--extent", "nan"], ["--extent"]),
])
def test_latent_grid_limits(args: list[object], needles: list[str], disc_data: Path, run_dir: Path,
                            tmp_path: Path, unchanged) -> None:
    png = tmp_path / "latent.png"
    with unchanged(disc_data, run_dir):
        refused(cli("latent", "--run", run_dir, "--data", disc_data, "--index", 0, "--out", png, *args), *needles)
    assert not png.exists()


def test_latent_grid_is_decoded_in_bounded_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """A grid larger than one chunk decodes to the same masks as one call."""
    from lidcseg import latent

    torch.manual_seed(0)
    model = create_model(TINY).eval()
    image = torch.randn(1, 1, 32, 32)
    graders = torch.zeros(4, 32, 32, dtype=torch.bool)
    whole = latent.decode_grid(model, image, graders, size=5)
    monkeypatch.setattr(latent, "DECODE_CHUNK_BYTES", 1)  # one grid point per model call
    calls = []
    decode = model.decode
    monkeypatch.setattr(model, "decode", lambda x, z: calls.append(z.shape[1]) or decode(x, z))
    chunked = latent.decode_grid(model, image, graders, size=5)
    assert calls == [1] * 25
    np.testing.assert_array_equal(chunked.masks, whole.masks)


# -- model and train configs ----------------------------------------------------------------------


@pytest.mark.parametrize(("sets", "needles"), [
    (["base_channels=100000"], ["ModelConfig.base_channels must be 1 to 4096, got 100000"]),
    (["num_scales=20"], ["ModelConfig.num_scales must be 1 to 12"]),
    (["latent_dim=5000"], ["ModelConfig.latent_dim must be 1 to 1024"]),
    (["base_channels=1024", "num_scales=8"], ["parameters", f"{MAX_PARAMETERS:.3g}", "lower base_channels"]),
    (["model.name=unet-ensemble", "ensemble_size=256", "base_channels=256"], ["parameters"]),
    (["lr=nan"], ["TrainConfig.lr must be a finite number"]),
    (["batch_size=1000000"], ["TrainConfig.batch_size must be 1 to 65536"]),
    (["num_workers=100000"], ["TrainConfig.num_workers must be 0 to 1024"]),
])
def test_train_refuses_absurd_sizes(sets: list[str], needles: list[str], disc_data: Path, tmp_path: Path,
                                    unchanged) -> None:
    out = tmp_path / "run"
    args = [a for s in sets for a in ("--set", s)]
    with unchanged(disc_data):
        refused(cli("train", "--data", disc_data, "--out", out, "--preset", "cpu-quick", *args), *needles)
    assert not out.exists() or not any(out.iterdir())


def test_parameter_estimate_bounds_the_real_models() -> None:
    """The estimate is an upper bound of every harness model, within a factor of 3."""
    from lidcseg.config import MODEL_SUMMARIES
    from lidcseg.models.registry import model_config

    for name in MODEL_SUMMARIES:
        cfg = model_config(name, ModelConfig(base_channels=8, num_scales=4, convs_per_block=2))
        with torch.device("meta"):
            real = sum(p.numel() for p in create_model(cfg).parameters())
        assert real <= parameter_estimate(cfg) <= 3 * real, name


def test_nifti_header_refuses_an_axis_beyond_32767() -> None:
    with pytest.raises(LidcsegError, match="every axis must be 1 to 32767"):
        make_header((8, 8, 4, 40000), np.uint8, np.eye(4))


# -- checkpoints ----------------------------------------------------------------------------------


def tamper(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> Path:
    """Rewrite ``folder/model.safetensors`` through ``change`` and update the config's checksum,
    as someone who knows the format would: only the content check can catch it."""
    from safetensors.torch import load_file, save_file

    weights = folder / "model.safetensors"
    tensors = load_file(str(weights))
    change(tensors)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["weights_sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (folder / "config.json").write_text(json.dumps(config))
    return weights


def first_weight(tensors: dict[str, torch.Tensor]) -> str:
    return next(k for k, v in tensors.items() if v.is_floating_point() and v.ndim == 4)


def as_dtype(dtype: torch.dtype) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        k = first_weight(tensors)
        tensors[k] = tensors[k].to(dtype)
    return change


def with_value(value: float, key: str | None = None) -> Callable[[dict[str, torch.Tensor]], None]:
    def change(tensors: dict[str, torch.Tensor]) -> None:
        k = key or first_weight(tensors)
        tensors[k] = tensors[k].clone()
        tensors[k].view(-1)[-1] = value
    return change


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    meta = {"step": 0, "train": to_dict(TrainConfig(input_size=64))}
    return save_checkpoint(tmp_path / "ckpt", create_model(TINY), extra_tensors={"stats": torch.ones(3)}, meta=meta)


@pytest.mark.parametrize(("change", "needles"), [
    (as_dtype(torch.float64), ["is float64, the model's is float32", "does not convert"]),
    (as_dtype(torch.float16), ["is float16"]),
    (as_dtype(torch.int8), ["is int8"]),
    (with_value(float("nan")), ["1 NaN or infinite value(s)", "use another checkpoint"]),
    (with_value(float("-inf")), ["NaN or infinite"]),
    (with_value(float("inf"), "__extra__/stats"), ["'__extra__/stats'", "NaN or infinite"]),
])
def test_checkpoint_weights_of_another_dtype_or_not_finite(change, needles: list[str], ckpt: Path, scan: Path,
                                                           tmp_path: Path, unchanged) -> None:
    weights = tamper(ckpt, change)
    out = tmp_path / "out"
    with unchanged(ckpt, scan):
        line = refused(sample(scan, ckpt, out, "-n", 2), str(weights), *needles)
    assert "tensor '" in line and not out.exists()
    with pytest.raises(LidcsegError):
        load_checkpoint(ckpt)


def test_checkpoint_config_of_an_absurd_model(ckpt: Path, scan: Path, tmp_path: Path, unchanged) -> None:
    """A config.json asking for a model of 10^14 parameters is refused before anything is built."""
    config = json.loads((ckpt / "config.json").read_text())
    config["model"]["base_channels"] = 100000
    (ckpt / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    with unchanged(ckpt, scan):
        refused(sample(scan, ckpt, out, "-n", 2), str(ckpt / "config.json"), "base_channels must be 1 to 4096")
    assert not out.exists()
