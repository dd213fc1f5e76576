"""``lidcseg sample``: scan in, hypotheses in the scan's geometry out (lidcseg.sampling)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lidcseg.config import DataConfig, ModelConfig, TrainConfig, to_dict
from lidcseg.data.transforms import apply_transform, eval_transform, normalize_hu
from lidcseg.errors import LidcsegError
from lidcseg.inference import OpenRun, noise_dim
from lidcseg.io.atomic import write_json_atomic
from lidcseg.io.nifti import RAS_TO_LPS
from lidcseg.io.scan import read_scan
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import SegmentationModel, create_model
from lidcseg.sampling import (
    cut_tiles,
    draw_hypotheses,
    locate_lesions,
    output_folder,
    sample_scan,
)
from lidcseg.seed import seed_everything
from lidcseg_cli.main import app
from lidcseg_cli.sample import parse_slices, parse_triple

runner = CliRunner()
TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2,
                   fcomb_channels=4, fcomb_layers=1)
INPUT = 64
FAULT_PATIENT = "LIDC-IDRI-0957"
#: Put into the input's patient and series tags; must appear in no SEG label or description.
SENTINEL = "SENTINELTAG"
#: The threshold model's cut: -400 HU, normalised as in training.
THR = float(normalize_hu(np.array(-400.0)))


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `lidcseg train`-style run: config.json and best/ holding a tiny untrained Prob. U-Net."""
    root = tmp_path_factory.mktemp("run") / "run"
    seed_everything(0)
    train = to_dict(TrainConfig(input_size=INPUT))
    save_checkpoint(root / "best", create_model(TINY), meta={"step": 0, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(TINY), "train": train, "data": {"crop_size": 180}})
    return root


#: Voxel axes permuted and flipped against RAS: i runs posterior, j right, k down.
AFFINE = np.array([[0.0, 0.75, 0.0, -30.0], [-0.8, 0.0, 0.0, 35.0], [0.0, 0.0, -2.0, 20.0], [0, 0, 0, 1]])
SHAPE = (80, 90, 12)
#: The disc's centre (LPS mm), radius and half height.
DISC = (np.array([5.0, 3.0, 6.0]), 5.0, 4.0)


def world_lps(shape: tuple[int, ...], affine: np.ndarray) -> np.ndarray:
    """(I, J, K, 3) LPS world position of every voxel."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).astype(float)
    return ijk @ (RAS_TO_LPS @ affine)[:3, :3].T + (RAS_TO_LPS @ affine)[:3, 3]


def disc_mask(centre: np.ndarray = DISC[0]) -> np.ndarray:
    xyz = world_lps(SHAPE, AFFINE)
    d = np.hypot(xyz[..., 0] - centre[0], xyz[..., 1] - centre[1])
    return (d <= DISC[1]) & (np.abs(xyz[..., 2] - centre[2]) <= DISC[2])


@pytest.fixture(scope="module")
def disc_scan(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A NIfTI of lung (-850 HU) with a soft-tissue disc (+50 HU) at DISC and a distractor 25 mm away."""
    vol = np.full(SHAPE, -850, np.int16)
    vol[disc_mask()] = 50
    vol[disc_mask(DISC[0] + [25.0, 0.0, 0.0])] = 50  # outside the 32 mm footprint of a 64 tile
    path = tmp_path_factory.mktemp("disc") / "scan.nii.gz"
    nib.save(nib.Nifti1Image(vol, AFFINE), path)
    return path


@pytest.fixture(scope="module")
def series_dir(fault_root) -> Path:
    """The phantom DICOM series of LIDC-IDRI-0957 (65 slices, real LIDC geometry)."""
    return next((fault_root("") / FAULT_PATIENT).glob("*/*"))


class ThresholdModel(SegmentationModel):
    """A fake harness model: foreground where the input exceeds -400 HU + ``spread`` * eps[..., 0].

    Records the eps of every call. Output logits (B, n, 2, H, W).
    """

    def __init__(self, spread: float = 0.0) -> None:
        super().__init__()
        self.config = ModelConfig(latent_dim=2)
        self.spread = spread
        self.calls: list[torch.Tensor] = []

    def sample(self, x: torch.Tensor, n: int, generator=None, eps: torch.Tensor | None = None) -> torch.Tensor:
        assert eps is not None and eps.shape == (x.shape[0], n, 2)
        self.calls.append(eps.clone())
        thr = THR + self.spread * eps[..., 0]  # (B, n)
        fg = x[:, None, 0] - thr[..., None, None]  # (B, n, H, W)
        return torch.stack([-fg, fg], dim=2)

    def loss(self, x, y, ignore=None, generator=None):  # noqa: ANN001, ANN201
        raise NotImplementedError


class OwnNoiseModel(nn.Module):
    """Not a harness model: its ``sample`` takes no eps and draws its noise from the generator."""

    def sample(self, x: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        thr = THR + torch.randn((x.shape[0], n), generator=generator)  # (B, n)
        fg = x[:, None, 0] - thr[..., None, None]
        return torch.stack([-fg, fg], dim=2)


def fake_open_run(model: nn.Module):
    def open_run(run, device="auto", input_size=None, in_channels=None) -> OpenRun:
        return OpenRun(label="fake", path=Path(str(run)), checkpoint=Path(str(run)), run_dir=None, model=model,
                       config=ModelConfig(), input_size=INPUT, data=DataConfig(),
                       device=torch.device("cpu"), info={"name": "threshold", "checkpoint": None})

    return open_run


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def cli(*args: object):
    return runner.invoke(app, ["sample", *[str(a) for a in args], "--threads", "1"])


# -- NIfTI in, NIfTI out --------------------------------------------------------------------------


def test_nifti_outputs_keep_the_input_geometry(disc_scan: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(disc_scan, "--run", run_dir, "--out", out, "-n", 3, "--at", "5,3,6", "--at-voxel", "10,20,5")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".lidcseg-output.json", "frequency.nii.gz", "hypotheses.nii.gz", "summary.json"]
    hyp, freq = nib.load(out / "hypotheses.nii.gz"), nib.load(out / "frequency.nii.gz")
    assert hyp.shape == (*SHAPE, 3) and hyp.get_data_dtype() == np.uint8
    assert freq.shape == SHAPE and freq.get_data_dtype() == np.float32
    np.testing.assert_allclose(hyp.affine, AFFINE, atol=1e-6)
    np.testing.assert_allclose(freq.affine, AFFINE, atol=1e-6)
    h = np.asarray(hyp.dataobj)
    np.testing.assert_allclose(freq.get_fdata(), h.mean(axis=3), atol=1e-6)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["n"] == 3 and summary["seed"] == 0 and len(summary["lesions"]) == 2
    assert summary["model"]["run"] == str(run_dir) and summary["model"]["checkpoint"].endswith("best")
    assert summary["protocol"]["input_size"] == INPUT
    first, second = summary["lesions"]
    assert first["centre_world_lps_mm"] == [5.0, 3.0, 6.0]
    # World (5, 3, 6) LPS is voxel (i, j, k) = ((35 - 3) / 0.8, (5 + 30) / 0.75... ) through the RAS affine.
    expected = np.linalg.solve(AFFINE, [*(RAS_TO_LPS @ [5.0, 3.0, 6.0, 1.0])[:3], 1.0])[:3]
    np.testing.assert_allclose(first["centre_voxel"], expected, atol=1e-3)
    assert first["slices"] == sorted(first["slices"]) and len(first["slices"]) == 5  # default -2..+2
    assert second["centre_voxel"] == [10.0, 20.0, 5.0] and second["slices"] == [3, 4, 5, 6, 7]
    for les in summary["lesions"]:
        assert len(les["volume_mm3"]) == 3
        assert les["volume_mm3_min"] <= les["volume_mm3_mean"] <= les["volume_mm3_max"]


def test_pasted_disc_lands_on_its_voxels(disc_scan: Path, tmp_path: Path, monkeypatch) -> None:
    """A model that thresholds its input gives back exactly the disc, in the input's voxel order."""
    monkeypatch.setattr("lidcseg.sampling.open_run", fake_open_run(ThresholdModel()))
    out = tmp_path / "out"
    # Two overlapping lesions: OR-ed per hypothesis, so the disc comes back once, unchanged.
    result = sample_scan(disc_scan, "unused", out, at=[tuple(DISC[0]), tuple(DISC[0] + [2.0, -1.0, 0.0])],
                         slices=(-3, 3), n=2, threads=1)
    hyp = np.asarray(nib.load(out / "hypotheses.nii.gz").dataobj)
    scan = read_scan(disc_scan)
    ks = [int(round(scan.input_to_canonical((0, 0, k))[0])) for k in range(SHAPE[2])]
    sampled = np.isin(ks, [int(round(scan.world_to_canonical(DISC[0])[0])) + d for d in range(-3, 4)])
    expected = disc_mask() & sampled[None, None, :]  # the distractor lies outside the footprint
    for h in range(2):
        np.testing.assert_array_equal(hyp[..., h].astype(bool), expected)
    xyz = world_lps(SHAPE, AFFINE)[expected]
    np.testing.assert_allclose(xyz.mean(0)[:2], DISC[0][:2], atol=0.4)  # within a voxel
    les = result.summary["lesions"][0]
    assert les["presence_frequency"] == 1.0
    assert les["volume_mm3"][0] == pytest.approx(expected.sum() * 0.75 * 0.8 * 2.0, rel=1e-6)


def test_tiles_are_the_training_evaluation_input(disc_scan: Path) -> None:
    """Same crop, same int16 rounding, same centre tile (MONAI) and same normalisation as validation."""
    from lidcseg.data.crops import resample_to_grid
    from lidcseg.lidc.series import Series

    scan = read_scan(disc_scan)
    lesions = locate_lesions(scan, at=[tuple(DISC[0])], slices=(0, 0))
    tiles = cut_tiles(scan, lesions, DataConfig(), INPUT)
    k = lesions[0].slices[0]
    geometry = Series([], scan.z, scan.origin_xy, scan.spacing_xy, scan.shape[1:])
    import SimpleITK as sitk

    crop = resample_to_grid(scan.slice_hu(k), geometry, tuple(DISC[0][:2]), DataConfig(), "linear", -1024,
                            sitk.sitkFloat32)
    crop16 = np.clip(np.rint(crop), -32768, 32767).astype(np.int16)
    img, _ = apply_transform(eval_transform(INPUT), normalize_hu(crop16)[None], torch.zeros(1, 180, 180))
    torch.testing.assert_close(tiles.images[0], img, rtol=0, atol=0)


def test_lesion_mask_gives_one_lesion_per_component(disc_scan: Path, run_dir: Path, tmp_path: Path) -> None:
    mask = np.zeros(SHAPE, np.uint8)
    mask[40:44, 45:48, 2:5] = 1
    mask[20:22, 20:22, 8] = 1
    nib.save(nib.Nifti1Image(mask, AFFINE), tmp_path / "mask.nii.gz")
    out = tmp_path / "out"
    result = cli(disc_scan, "--run", run_dir, "--out", out, "-n", 2, "--lesions", tmp_path / "mask.nii.gz")
    assert result.exit_code == 0, result.output
    lesions = json.loads((out / "summary.json").read_text())["lesions"]
    assert [sorted(les["slices"]) for les in lesions] in ([[2, 3, 4], [8]], [[8], [2, 3, 4]])
    centres = sorted(tuple(les["centre_voxel"]) for les in lesions)
    np.testing.assert_allclose(centres, [(20.5, 20.5, 8.0), (41.5, 46.0, 3.0)], atol=1e-6)


# -- the noise: shared per lesion, seeded ---------------------------------------------------------


def test_shared_eps_is_one_draw_per_lesion_and_hypothesis(disc_scan: Path) -> None:
    scan = read_scan(disc_scan)
    lesions = locate_lesions(scan, at=[tuple(DISC[0])], at_voxel=[(30, 40, 6)], slices=(-2, 2))
    tiles = cut_tiles(scan, lesions, DataConfig(), INPUT)
    model = ThresholdModel(spread=0.5)
    masks, noise = draw_hypotheses(model, tiles, 4, seed=3, batch_size=3)
    assert noise == "shared" and masks.shape == (10, 4, INPUT, INPUT)
    eps = torch.cat(model.calls)  # (10, 4, 2), chunked over 4 calls
    for lesion in (0, 1):
        rows = eps[torch.as_tensor(tiles.lesion == lesion)]
        assert torch.equal(rows, rows[:1].expand_as(rows))  # hypothesis k: the same eps on every slice
    assert not torch.equal(eps[0], eps[-1])  # lesions differ
    assert len(set(eps[0, :, 0].tolist())) == 4  # hypotheses differ

    model = ThresholdModel(spread=0.5)
    _, noise = draw_hypotheses(model, tiles, 4, seed=3, shared_eps=False)
    eps = torch.cat(model.calls)
    assert noise == "independent" and not torch.equal(eps[0], eps[1])


def test_noise_is_drawn_eps_first_then_batch_by_batch(disc_scan: Path) -> None:
    """One CPU generator seeded with the seed: eps (lesions, n, N) first, then the models' own draws."""
    scan = read_scan(disc_scan)
    lesions = locate_lesions(scan, at=[tuple(DISC[0])], at_voxel=[(30, 40, 6)], slices=(-2, 2))
    tiles = cut_tiles(scan, lesions, DataConfig(), INPUT)
    model = ThresholdModel(spread=0.5)
    draw_hypotheses(model, tiles, 4, seed=3, batch_size=3)
    expected = torch.randn((2, 4, 2), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(torch.cat(model.calls), expected[torch.as_tensor(tiles.lesion)], rtol=0, atol=0)


def test_model_without_eps_draws_its_own_noise(disc_scan: Path, tmp_path: Path, monkeypatch) -> None:
    scan = read_scan(disc_scan)
    lesions = locate_lesions(scan, at=[tuple(DISC[0])], slices=(-2, 2))
    tiles = cut_tiles(scan, lesions, DataConfig(), INPUT)
    masks, noise = draw_hypotheses(OwnNoiseModel(), tiles, 3, seed=5, batch_size=2)
    assert noise == "model" and masks.shape == (5, 3, INPUT, INPUT)
    gen = torch.Generator().manual_seed(5)
    thr = torch.cat([THR + torch.randn((min(2, 5 - s), 3), generator=gen) for s in range(0, 5, 2)])  # (5, 3)
    expected = tiles.images[:, None, 0] > thr[..., None, None]
    np.testing.assert_array_equal(masks, expected.numpy())

    monkeypatch.setattr("lidcseg.sampling.open_run", fake_open_run(OwnNoiseModel()))
    result = sample_scan(disc_scan, "unused", tmp_path / "out", at=[tuple(DISC[0])], n=2, threads=1)
    assert result.summary["noise"] == "model" and "eps" in result.summary["warnings"][0]


def test_prob_unet_latents_share_eps_across_slices(disc_scan: Path) -> None:
    """With the real model: z = mu_slice + sigma_slice * eps with one eps for the whole lesion."""
    from lidcseg.models.prob_unet import ProbUNet

    assert noise_dim(ProbUNet(TINY)) == TINY.latent_dim  # it takes eps (B, n, N)
    seed_everything(0)
    model = create_model(TINY).eval()
    scan = read_scan(disc_scan)
    lesions = locate_lesions(scan, at=[tuple(DISC[0])], slices=(-1, 1))
    tiles = cut_tiles(scan, lesions, DataConfig(), INPUT)
    eps = torch.randn(1, 5, TINY.latent_dim).expand(3, 5, TINY.latent_dim)
    out = model.sample_with_latents(tiles.images, 5, eps=eps)
    mu, logsigma = model.prior(tiles.images)
    recovered = (out.z - mu[:, None]) / logsigma.exp()[:, None]
    torch.testing.assert_close(recovered, eps, atol=1e-4, rtol=1e-4)


def test_same_seed_same_bytes(disc_scan: Path, run_dir: Path, tmp_path: Path) -> None:
    args = ["--run", run_dir, "-n", 3, "--at", "5,3,6", "--seed", 7]
    assert cli(disc_scan, *args, "--out", tmp_path / "a").exit_code == 0
    assert cli(disc_scan, *args, "--out", tmp_path / "b").exit_code == 0
    for name in ("hypotheses.nii.gz", "frequency.nii.gz", "summary.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_seed_changes_the_hypotheses(disc_scan: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("lidcseg.sampling.open_run", fake_open_run(ThresholdModel(spread=0.3)))

    def run(seed: int, name: str) -> np.ndarray:
        sample_scan(disc_scan, "unused", tmp_path / name, at=[tuple(DISC[0])], n=4, seed=seed, threads=1)
        return np.asarray(nib.load(tmp_path / name / "hypotheses.nii.gz").dataobj)

    a, b, c = run(1, "a"), run(1, "b"), run(2, "c")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    # Shared eps: each hypothesis is one threshold, so it is a nested family across hypotheses.
    sizes = a.reshape(-1, 4).sum(0)
    for i in range(4):
        for j in range(4):
            if sizes[i] <= sizes[j]:
                assert not (a[..., i] & ~a[..., j]).any()


# -- DICOM in: SEG out ---------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)")
def test_lidc_dicom_series_gives_a_valid_seg(series_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli(series_dir, "--run", run_dir, "--out", out, "-n", 2, "--lidc")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir()) == [
        ".lidcseg-output.json", "frequency.nii.gz", "frequency.seg.dcm", "hypotheses.nii.gz", "hypotheses.seg.dcm",
        "summary.json"]
    for name in ("hypotheses.seg.dcm", "frequency.seg.dcm"):
        proc = subprocess.run(["dciodvfy", str(out / name)], capture_output=True, text=True)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], name
    seg = pydicom.dcmread(out / "hypotheses.seg.dcm")
    src = pydicom.dcmread(next(series_dir.glob("*.dcm")), stop_before_pixels=True)
    assert seg.Modality == "SEG" and seg.SegmentationType == "BINARY" and len(seg.SegmentSequence) == 2
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert seg.StudyInstanceUID == src.StudyInstanceUID
    assert seg.SegmentSequence[1].SegmentLabel == "hypothesis 2 of 2"
    assert seg.SegmentSequence[1].SegmentDescription == (
        f"lidcseg probunet, run {run_dir.name}, checkpoint best, seed 0: hypothesis 2 of 2")
    freq_seg = pydicom.dcmread(out / "frequency.seg.dcm", stop_before_pixels=True)
    assert freq_seg.SegmentationType == "FRACTIONAL" and freq_seg.SegmentationFractionalType == "PROBABILITY"
    assert freq_seg.ReferencedSeriesSequence[0].SeriesInstanceUID == src.SeriesInstanceUID
    assert freq_seg.FrameOfReferenceUID == seg.FrameOfReferenceUID
    assert freq_seg.SeriesInstanceUID not in (seg.SeriesInstanceUID, src.SeriesInstanceUID)
    hyp = nib.load(out / "hypotheses.nii.gz")
    assert hyp.shape == (512, 512, 65, 2)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["input"]["kind"] == "dicom" and summary["lesions"]
    for les in summary["lesions"]:
        assert les["source"] == "lidc" and les["slices"] == sorted(les["slices"])
        # The centre lies on the series' grid: voxel -> world through the output affine.
        world = (RAS_TO_LPS @ hyp.affine @ [*les["centre_voxel"], 1.0])[:3]
        np.testing.assert_allclose(world[:2], les["centre_world_lps_mm"][:2], atol=1e-3)


def test_hostile_dicom_tags_never_name_files(series_dir: Path, run_dir: Path, tmp_path: Path) -> None:
    evil = tmp_path / "series"
    evil.mkdir()
    for src in series_dir.glob("*.dcm"):
        ds = pydicom.dcmread(src)
        ds.PatientID = "../../evil"
        ds.SeriesDescription = "../../evil/" + "x" * 10 + SENTINEL
        ds.PatientName = f"{SENTINEL}^Name"
        ds.StudyDescription = SENTINEL
        ds.save_as(evil / src.name)
    work = tmp_path / "work"
    work.mkdir()
    out = work / "out"
    result = cli(evil, "--run", run_dir, "--out", out, "-n", 1, "--at-voxel", "256,256,30", "--slices=0:0")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in work.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [
        ".lidcseg-output.json", "frequency.nii.gz", "frequency.seg.dcm", "hypotheses.nii.gz", "hypotheses.seg.dcm",
        "summary.json"]
    assert not list(tmp_path.rglob("evil*"))
    assert pydicom.dcmread(out / "hypotheses.seg.dcm").PatientID == "../../evil"
    for name in ("hypotheses.seg.dcm", "frequency.seg.dcm"):  # labels and descriptions: our values only
        seg = pydicom.dcmread(out / name, stop_before_pixels=True)
        text = [str(seg.SeriesDescription), str(seg.ContentDescription)]
        text += [str(e.value) for item in seg.SegmentSequence for e in item.iterall() if e.VR != "SQ"]
        assert not any(SENTINEL in t for t in text), name
        assert seg.SegmentSequence[0].SegmentDescription.startswith(
            f"lidcseg probunet, run {run_dir.name}, checkpoint best, seed 0: "), name


@pytest.mark.skipif(shutil.which("dciodvfy") is None, reason="dciodvfy not installed (Debian package dicom3tools)")
def test_frequency_seg_reads_back_as_the_frequency_map(series_dir: Path, tmp_path: Path, monkeypatch) -> None:
    """frequency.seg.dcm (FRACTIONAL) holds frequency.nii.gz within half a step of 1/255."""
    import highdicom as hd

    monkeypatch.setattr("lidcseg.sampling.open_run", fake_open_run(ThresholdModel(spread=0.3)))
    out = tmp_path / "out"
    sample_scan(series_dir, "unused", out, at_voxel=[(256.0, 256.0, 30.0)], slices=(-1, 1), n=7, threads=1)
    proc = subprocess.run(["dciodvfy", str(out / "frequency.seg.dcm")], capture_output=True, text=True)
    assert [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")] == []
    scan = read_scan(series_dir)
    freq = scan.to_canonical(np.asarray(nib.load(out / "frequency.nii.gz").dataobj))  # (K, R, C)
    assert ((freq > 0) & (freq < 1)).any()  # k / 7: rounded to 1/255 steps in the SEG
    seg = hd.seg.segread(out / "frequency.seg.dcm")
    item = seg.SegmentSequence[0]
    assert item.SegmentLabel == "lesion probability"
    assert item.SegmentDescription == "lidcseg threshold, seed 0: share of 7 hypotheses marking a lesion"
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): k for k, f in enumerate(scan.files)}
    referenced = [sop for _, _, sop in seg.get_source_image_uids()]
    frames = [uids[u] for u in referenced]
    assert sorted(frames) == list(range(min(frames), min(frames) + 3))  # --slices=-1:1
    back = seg.get_pixels_by_source_instance(referenced, segment_numbers=[1], rescale_fractional=True)[..., 0]
    assert np.abs(back - freq[frames]).max() <= 0.5 / 255 + 1e-6
    others = np.ones(len(freq), bool)
    others[frames] = False
    assert not freq[others].any()  # nothing outside the SEG's frames


# -- bad input: one line, no traceback, no output -------------------------------------------------


def _nifti(path: Path, data: np.ndarray) -> Path:
    nib.save(nib.Nifti1Image(data, np.eye(4)), path)
    return path


@pytest.mark.parametrize(
    "case, needle",
    [
        ("text", "not a readable NIfTI"),
        ("txt-suffix", "not a scan"),
        ("2d", "3-D"),
        ("4d", "3-D"),
        ("nan", "NaN"),
        ("outside-world", "outside the scan"),
        ("outside-voxel", "outside the scan"),
        ("foreign-checkpoint", "lidcseg-checkpoint"),
        ("no-location", "no lesion location"),
        ("lidc-on-nifti", "needs a DICOM series"),
        ("bad-slices", "--slices"),
        ("bad-at", "--at expects"),
        ("mask-shape", "mask shape"),
        pytest.param("no-cuda", "CUDA is not available",
                     marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    ],
)
def test_bad_input_is_one_line(case: str, needle: str, disc_scan: Path, run_dir: Path, tmp_path: Path) -> None:
    scan, run, extra = disc_scan, run_dir, ["--at", "5,3,6"]
    if case == "text":
        scan = tmp_path / "scan.nii.gz"
        scan.write_text("hello")
    elif case == "txt-suffix":
        scan = tmp_path / "scan.txt"
        scan.write_text("hello")
    elif case == "2d":
        scan = _nifti(tmp_path / "s.nii", np.zeros((8, 8), np.int16))
    elif case == "4d":
        scan = _nifti(tmp_path / "s.nii", np.zeros((8, 8, 4, 2), np.int16))
    elif case == "nan":
        data = np.zeros((8, 8, 4), np.float32)
        data[0, 0, 0] = np.nan
        scan = _nifti(tmp_path / "s.nii", data)
    elif case == "outside-world":
        extra = ["--at", "500,3,6"]
    elif case == "outside-voxel":
        extra = ["--at-voxel", f"10,10,{SHAPE[2]}"]
    elif case == "foreign-checkpoint":
        run = tmp_path / "ckpt"
        run.mkdir()
        (run / "config.json").write_text(json.dumps({"format": "something-else"}))
    elif case == "no-location":
        extra = []
    elif case == "lidc-on-nifti":
        extra = ["--lidc"]
    elif case == "bad-slices":
        extra = ["--at", "5,3,6", "--slices", "2:1"]
    elif case == "bad-at":
        extra = ["--at", "5,3"]
    elif case == "no-cuda":
        extra = ["--at", "5,3,6", "--device", "cuda"]
    elif case == "mask-shape":
        extra = ["--lesions", str(_nifti(tmp_path / "m.nii", np.ones((4, 4, 4), np.uint8)))]
    out = tmp_path / "out"
    one_line_error(cli(scan, "--run", run, "--out", out, "-n", 2, *extra), needle)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_needs_overwrite(disc_scan: Path, run_dir: Path, tmp_path: Path) -> None:
    """Our own output needs --overwrite; a folder that sample did not write is never replaced."""
    out = tmp_path / "out"
    args = [disc_scan, "--run", run_dir, "--out", out, "-n", 1, "--at", "5,3,6"]
    assert cli(*args).exit_code == 0
    before = (out / "summary.json").read_bytes()
    one_line_error(cli(*args), "exists", "--overwrite")
    assert (out / "summary.json").read_bytes() == before
    assert cli(*args, "--overwrite").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        ".lidcseg-output.json", "frequency.nii.gz", "hypotheses.nii.gz", "summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    one_line_error(cli(*args[:3], "--out", foreign, *args[5:], "--overwrite"), "not written by `lidcseg sample`")
    assert sorted(p.name for p in foreign.iterdir()) == ["keep.txt"]


def test_output_that_appears_meanwhile_is_refused(tmp_path: Path) -> None:
    """The output is checked again before the swap: a folder made meanwhile is kept, ours removed."""
    out = tmp_path / "out"
    with pytest.raises(LidcsegError, match="--overwrite"), output_folder(out, overwrite=False) as tmp:
        (tmp / "new.txt").write_text("ours")
        out.mkdir()
        (out / "summary.json").write_text('{"format": "lidcseg-sample"}')  # an earlier sample's
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["summary.json"]
    with output_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("ours")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == [".lidcseg-output.json", "new.txt"]
    other = tmp_path / "other"
    with pytest.raises(LidcsegError, match="not written by"), output_folder(other, overwrite=True) as tmp:
        other.mkdir()
        (other / "keep.txt").write_text("theirs")  # someone else's, even with overwrite
    assert sorted(p.name for p in other.iterdir()) == ["keep.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(LidcsegError, match="not a folder"), output_folder(tmp_path / "file", overwrite=True):
        pass


def test_cli_parses_points_and_slices() -> None:
    assert parse_triple(" -10.5, 20,3e1 ", "--at") == (-10.5, 20.0, 30.0)
    assert parse_slices("-3:3") == (-3, 3) and parse_slices("0:0") == (0, 0)
    for bad in ("1,2", "1,2,3,4", "a,b,c", "1,nan,2", "1,inf,2", ""):
        with pytest.raises(LidcsegError, match="--at-voxel expects three numbers"):
            parse_triple(bad, "--at-voxel")
    for bad in ("2:1", "3", "a:b", "1:", ":1", "1.5:2"):
        with pytest.raises(LidcsegError, match="--slices expects"):
            parse_slices(bad)


def test_failure_midway_leaves_nothing(disc_scan: Path, tmp_path: Path, monkeypatch) -> None:
    class Broken(ThresholdModel):
        def sample(self, *a, **k):  # noqa: ANN002, ANN003
            raise RuntimeError("boom")

    monkeypatch.setattr("lidcseg.sampling.open_run", fake_open_run(Broken()))
    with pytest.raises(RuntimeError):
        sample_scan(disc_scan, "unused", tmp_path / "out", at=[tuple(DISC[0])], n=1)
    assert list(tmp_path.iterdir()) == []
