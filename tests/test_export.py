"""``lidcseg export --format monai-bundle``: layout, metadata, model.pt, MONAI run == lidcseg sample, model.ts."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lidcseg.config import ModelConfig, TrainConfig, to_dict
from lidcseg.errors import LidcsegError
from lidcseg.export import export_monai_bundle
from lidcseg.export.metadata import REQUIRED_KEYS, TENSOR_KEYS
from lidcseg.export.torchscript import script_sampler
from lidcseg.inference import draw_logits
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.nifti import RAS_TO_LPS
from lidcseg.models.checkpoint import load_model, save_checkpoint
from lidcseg.models.registry import create_model
from lidcseg.sampling import sample_scan
from lidcseg.seed import seed_everything
from lidcseg_cli.main import app

runner = CliRunner()
TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2, fcomb_channels=4, fcomb_layers=1)
INPUT = 64
AFFINE = np.array([[0.0, 0.75, 0.0, -30.0], [-0.8, 0.0, 0.0, 35.0], [0.0, 0.0, -2.0, 20.0], [0, 0, 0, 1]])
LESION_VOXEL = (40, 45, 6)


def make_run(root: Path, cfg: ModelConfig = TINY, data_dir: Path | None = None) -> Path:
    """A `lidcseg train`-style run (config.json + best/) of an untrained tiny model, val GED 0.5."""
    seed_everything(0)
    train = to_dict(TrainConfig(input_size=INPUT))
    save_checkpoint(root / "best", create_model(cfg), meta={"step": 7, "train": train, "val": {"ged": 0.5}})
    data = {"crop_size": 180, **({"dir": str(data_dir)} if data_dir else {})}
    write_json_atomic(root / "config.json", {"model": to_dict(cfg), "train": train, "data": data})
    return root


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("export")
    data = root / "data"  # a prepared-data manifest that says: the phantom
    write_json_atomic(data / "manifest.json", {"format": "lidcseg-prepared", "phantom": True, "fingerprint": {}})
    return make_run(root / "run", data_dir=data)


@pytest.fixture(scope="module")
def bundle(run_dir: Path) -> Path:
    return export_monai_bundle(run_dir, run_dir.parent / "bundle")


@pytest.fixture(scope="module")
def scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A phantom-like NIfTI: lung (-850 HU) with a soft-tissue block around LESION_VOXEL."""
    vol = np.full((80, 90, 12), -850, np.int16)
    i, j, k = LESION_VOXEL
    vol[i - 5 : i + 5, j - 5 : j + 5, k - 2 : k + 2] = 50
    path = tmp_path_factory.mktemp("scan") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, AFFINE), path)
    return path


def lesion_lps() -> list[float]:
    """LESION_VOXEL in world mm, LPS (``lidcseg sample --at``)."""
    return [float(v) for v in (RAS_TO_LPS @ AFFINE @ np.array([*LESION_VOXEL, 1.0]))[:3]]


# -- layout and metadata ------------------------------------------------------------------------


def test_layout_metadata_and_readme(bundle: Path) -> None:
    for name in ("configs/metadata.json", "configs/inference.json", "models/model.pt", "models/model.ts",
                 "docs/README.md", "models/lidcseg-run/config.json", "models/lidcseg-run/best/model.safetensors"):
        assert (bundle / name).is_file(), name
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    assert set(REQUIRED_KEYS) <= set(meta) and meta["schema"].startswith("https://")
    assert meta["monai_version"] and meta["pytorch_version"] and meta["numpy_version"]
    assert "lidcseg" in meta["required_packages_version"]
    for kind in ("inputs", "outputs"):
        for spec in meta["network_data_format"][kind].values():
            assert set(TENSOR_KEYS) <= set(spec)
    image = meta["network_data_format"]["inputs"]["image"]
    assert (image["modality"], image["format"], image["spatial_shape"]) == ("CT", "hounsfield", [INPUT, INPUT])
    assert "0.5 mm" in image["channel_def"]["0"] and "180x180" in image["channel_def"]["0"]
    pred = meta["network_data_format"]["outputs"]["pred"]
    assert pred["num_channels"] == 2 and pred["num_hypotheses"]["default"] == 16
    info = meta["lidcseg"]
    assert info["validation_ged"] == 0.5 and info["step"] == 7 and info["model"] == "probunet"
    assert info["data"]["phantom"] is True and info["preset"] == "not recorded by the run"
    assert info["crop"] == {"size": 180, "spacing_mm": 0.5, "input_size": INPUT}
    readme = (bundle / "docs/README.md").read_text()
    assert readme.startswith("# ⚠ TRAINED ON THE PHANTOM")
    assert "PHANTOM" in meta["description"] and "PHANTOM" in meta["intended_use"]
    assert json.loads((bundle / ".lidcseg-output.json").read_text())["command"] == "export"


def test_model_pt_loads_weights_only(bundle: Path, run_dir: Path) -> None:
    state = torch.load(bundle / "models/model.pt", weights_only=True)
    meta = json.loads((bundle / "configs/metadata.json").read_text())
    model = create_model(ModelConfig(**meta["lidcseg"]["model_config"]))
    model.load_state_dict(state, strict=True)
    reference = load_model(run_dir / "best").state_dict()
    assert all(torch.equal(model.state_dict()[k], reference[k]) for k in reference)


# -- the bundle runs: MONAI's run == lidcseg sample ---------------------------------------------


def monai_run(bundle: Path, scan: Path, out: Path, *, cli: bool) -> None:
    """``monai.bundle run`` on the bundle in a fresh, offline process (the CLI needs MONAI's `fire`)."""
    args = {"image": str(scan), "points": [lesion_lps()], "output_dir": str(out), "n": 4, "seed": 3}
    if cli:
        cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(bundle / "configs/inference.json"),
               "--bundle_root", str(bundle)] + [a for k, v in args.items() for a in (f"--{k}", json.dumps(v)
                                                                                      if k == "points" else str(v))]
    else:
        call = (f"from monai.bundle import run; run(config_file={str(bundle / 'configs/inference.json')!r}, "
                f"bundle_root={str(bundle)!r}, **{args!r})")
        cmd = [sys.executable, "-c", call]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_PROXY": "*", "HTTPS_PROXY": "http://0.0.0.0:9", "HTTP_PROXY":
           "http://0.0.0.0:9"}  # no network: a download would fail
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("cli", [False, True], ids=["api", "cli"])
def test_monai_run_writes_the_hypotheses_of_lidcseg_sample(
    bundle: Path, run_dir: Path, scan: Path, tmp_path: Path, cli: bool
) -> None:
    if cli and importlib.util.find_spec("fire") is None:
        pytest.skip("`python -m monai.bundle` needs MONAI's optional dependency `fire`")
    monai_run(bundle, scan, tmp_path / "monai", cli=cli)
    sample_scan(scan, run_dir, tmp_path / "sample", at=[tuple(lesion_lps())], n=4, seed=3, device="cpu")
    for name in ("hypotheses.nii.gz", "frequency.nii.gz"):
        a = np.asarray(nib.load(tmp_path / "monai" / name).dataobj)
        b = np.asarray(nib.load(tmp_path / "sample" / name).dataobj)
        assert a.shape == b.shape and np.array_equal(a, b), name
    hyp = np.asarray(nib.load(tmp_path / "sample" / "hypotheses.nii.gz").dataobj)
    assert hyp.shape[-1] == 4 and hyp.any()  # the comparison is not of empty volumes


# -- model.ts -----------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:DeprecationWarning")
def test_torchscript_logits_equal_the_run(bundle: Path, run_dir: Path) -> None:
    ts = torch.jit.load(str(bundle / "models/model.ts"))
    model = load_model(run_dir / "best")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((3, 1, INPUT, INPUT), generator=gen) * 2 - 1  # batch 3: the trace used 2
    eps = torch.randn((3, 5, TINY.latent_dim), generator=gen)
    expected = draw_logits(model, x, 5, eps=eps)
    torch.testing.assert_close(ts.sample_eps(x, eps), expected, atol=1e-5, rtol=1e-5)
    torch.manual_seed(1)
    drawn = ts.sample(x, 4)
    assert drawn.shape == (3, 4, 2, INPUT, INPUT)
    torch.manual_seed(1)
    torch.testing.assert_close(drawn, draw_logits(model, x, 4, eps=torch.randn((3, 4, TINY.latent_dim))),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["fixed-prior", "early-injection", "i2i-vae"])
def test_torchscript_ablations(name: str) -> None:
    seed_everything(0)
    model = create_model(ModelConfig(**{**to_dict(TINY), "name": name})).eval()
    ts = script_sampler(model, 32)
    x = torch.rand((1, 1, 48, 48)) * 2 - 1  # another size than the trace's
    eps = torch.randn((1, 3, model.config.latent_dim))
    torch.testing.assert_close(ts.sample_eps(x, eps), draw_logits(model, x, 3, eps=eps), atol=1e-5, rtol=1e-5)


def test_unscriptable_model_has_no_model_ts(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", ModelConfig(**{**to_dict(TINY), "name": "dropout-unet"}))
    out = export_monai_bundle(run, tmp_path / "bundle")
    assert not (out / "models/model.ts").exists() and (out / "models/model.pt").is_file()
    meta = json.loads((out / "configs/metadata.json").read_text())
    assert meta["lidcseg"]["torchscript"].startswith("none: model 'dropout-unet'")
    readme = (out / "docs/README.md").read_text()
    assert "There is no `models/model.ts`" in readme and readme.startswith("# ⚠ TRAINING DATA UNKNOWN")


# -- refusals -----------------------------------------------------------------------------------


def _break(run: Path, how: str) -> None:
    if how == "no-config":
        (run / "config.json").unlink()
    elif how == "no-checkpoint":
        for f in (run / "best").iterdir():
            f.unlink()
        (run / "best").rmdir()
    elif how == "no-weights":
        (run / "best" / "model.safetensors").unlink()
    elif how == "unknown-model":
        cfg = json.loads((run / "config.json").read_text())
        cfg["model"]["name"] = "transformer"
        write_json_atomic(run / "config.json", cfg)


@pytest.mark.parametrize(("how", "needle"), [
    ("no-config", "incomplete run folder: no run config.json"),
    ("no-checkpoint", "no best/ or last/ checkpoint"),
    ("no-weights", "incomplete checkpoint: no model.safetensors"),
    ("unknown-model", "unknown model 'transformer'"),
])
def test_incomplete_or_unknown_run_is_refused(tmp_path: Path, how: str, needle: str) -> None:
    run = make_run(tmp_path / "run")
    _break(run, how)
    result = runner.invoke(app, ["export", str(run), "--format", "monai-bundle", "--out", str(tmp_path / "b")])
    one_line_error(result, needle)
    assert not (tmp_path / "b").exists()


def test_out_rules(run_dir: Path, tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite"]):
        result = runner.invoke(app, ["export", str(run_dir), "--out", str(foreign), *extra])
        one_line_error(result, "was not written by `lidcseg export`")
    assert (foreign / "notes.txt").read_text() == "mine"
    one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(run_dir / "b")]), "inside the input")
    one_line_error(runner.invoke(app, ["export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]),
                   "unknown export format 'onnx'")
    out = tmp_path / "bundle"
    assert runner.invoke(app, ["export", str(run_dir), "--out", str(out)]).exit_code == 0
    (out / "docs" / "stale.txt").write_text("old")
    one_line_error(runner.invoke(app, ["export", str(run_dir), "--out", str(out)]), "pass --overwrite")
    result = runner.invoke(app, ["export", str(run_dir), "--out", str(out), "--overwrite"])
    assert result.exit_code == 0, result.output
    assert not (out / "docs" / "stale.txt").exists() and (out / "configs/metadata.json").is_file()


def test_check_run_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="run folder not found"):
        export_monai_bundle(tmp_path / "nothing", tmp_path / "b")
