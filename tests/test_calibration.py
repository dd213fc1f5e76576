"""Calibration on the flip task: the oracle, calibration of a model in memory, training's
validation on the task, the posterior check, and ``lidcseg calibration`` end to end.

The metric kernels are tested in ``test_metrics_flips.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lidcseg.calibration import (
    FlipOracle,
    calibrate_model,
    calibrate_runs,
    posterior_switch_accuracy,
)
from lidcseg.config import ModelConfig
from lidcseg.data.scenes import SceneEvalDataset, make_scenes
from lidcseg.errors import LidcsegError
from lidcseg.flips import FLIP_PROBS, NUM_CLASSES, SWITCHES
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import create_model
from lidcseg.training.validation import validate_flip_task
from lidcseg_cli.main import app

runner = CliRunner()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on the shared 2-core CI machine two threads spin-wait (see TrainConfig.threads)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- the oracle and calibrate_model -------------------------------------------------------------


@pytest.fixture(scope="module")
def scenes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calib") / "data"
    make_scenes(out, n_train=4, n_val=4, n_test=48, height=32, width=64, seed=2)
    return out


@pytest.fixture(scope="module")
def test_split(scenes: Path) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ds = SceneEvalDataset(scenes / "test.h5")
    images, labels, ignore = (torch.cat(t) for t in zip(*ds.batches(16), strict=True))
    return images, labels, ignore


def test_oracle_is_calibrated(test_split) -> None:
    images, labels, ignore = test_split
    oracle = FlipOracle(images, labels)
    res, kept = calibrate_model(oracle, images, labels, ignore, counts=(1, 4, 16), samples=32,
                                seed=0, batch_size=16, keep=[0, 5])
    modes = res["modes"]
    assert modes["scenes"] == 48 and modes["matched_samples"] == 48 * 32
    assert modes["pearson_r"] > 0.95
    assert modes["mae"] < 0.006
    assert sum(m["frequency"] for m in modes["per_mode"]) == pytest.approx(1.0)
    for row in res["pixels"]["per_class"]:
        assert abs(row["p_twin"] - row["truth"]) < 0.05
        assert row["p_other"] == pytest.approx(0.0, abs=1e-9)  # the oracle never leaves the two
    # A perfect sampler's GED is only the V-statistic's bias, E d(Y,Y') / n.
    g1, g16 = res["ged"]["1"], res["ged"]["16"]
    assert g1["mean"] == pytest.approx(g1["modes"], abs=0.08)
    assert g16["mean"] == pytest.approx(g16["modes"] / 16, abs=0.02)
    assert g1["paper"] == 0.874 and g16["paper"] == 0.206
    assert kept[5].shape == (32, 32, 64)


def test_mode_frequencies_count_every_scene_unless_complete_is_asked(test_split) -> None:
    """Appendix C: a scene lacking one switchable class counts by default, not under ``complete``."""
    images, labels, ignore = (t[:6].clone() for t in test_split)
    person = SWITCHES[1].original
    assert bool(((labels[0] == person) & ~ignore[0]).any())
    labels[0][labels[0] == person] = 2  # scene 0 without a person
    oracle = FlipOracle(images, labels)
    kw = dict(counts=(1,), samples=4, seed=0, batch_size=4)
    every, _ = calibrate_model(oracle, images, labels, ignore, **kw)
    complete, _ = calibrate_model(oracle, images, labels, ignore, mode_scenes="complete", **kw)
    assert (every["modes"]["rule"], every["modes"]["scenes"], every["modes"]["matched_samples"]) == ("all", 6, 24)
    assert every["modes"]["complete_scenes"] == 5
    assert (complete["modes"]["rule"], complete["modes"]["scenes"], complete["modes"]["matched_samples"]) == (
        "complete", 5, 20)
    assert every["per_image_ged"] == complete["per_image_ged"]  # the GED uses every scene either way
    with pytest.raises(LidcsegError, match="--mode-scenes"):
        calibrate_model(oracle, images, labels, ignore, mode_scenes="most", **kw)


def test_uint8_inputs_give_the_same_result(scenes: Path, test_split) -> None:
    images, labels, ignore = test_split
    raw_images, raw_labels = SceneEvalDataset(scenes / "test.h5").arrays()
    u8, lab8 = torch.from_numpy(raw_images), torch.from_numpy(raw_labels)
    assert u8.dtype == torch.uint8 and int(lab8.max()) == 255
    kw = dict(counts=(2,), samples=2, seed=1, batch_size=16)
    a, _ = calibrate_model(FlipOracle(images, labels), images, labels, ignore, **kw)
    b, _ = calibrate_model(FlipOracle(u8, lab8), u8, lab8, lab8 == 255, **kw)
    assert a["per_image_ged"] == b["per_image_ged"]
    assert a["modes"]["per_mode"] == b["modes"]["per_mode"]


def test_miscalibrated_oracle_scores_worse(test_split) -> None:
    images, labels, ignore = test_split
    wrong = FlipOracle(images, labels, probs=FLIP_PROBS[::-1].copy())  # road flips most often
    res, _ = calibrate_model(wrong, images, labels, ignore, counts=(4,), samples=32, seed=0,
                             batch_size=16)
    assert res["modes"]["mae"] > 0.01
    assert res["modes"]["pearson_r"] < 0.8
    assert abs(res["pixels"]["per_class"][0]["p_twin"] - 4 / 17) < 0.06  # sidewalk got road's p


class _WrongClasses(torch.nn.Module):
    """A fake model that samples 2 classes instead of the flip task's 24."""

    def sample(self, x, n, generator=None):
        return torch.zeros((x.shape[0], n, 2, *x.shape[2:]))


def test_calibrate_model_refuses_other_tasks(test_split) -> None:
    images, labels, ignore = test_split
    with pytest.raises(LidcsegError, match=f"the model predicts 2 classes; the flip task has {NUM_CLASSES}"):
        calibrate_model(_WrongClasses(), images[:2], labels[:2], ignore[:2], counts=(1,), samples=1)


def _tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_model(ModelConfig(num_classes=24, in_channels=3, base_channels=4, num_scales=3,
                                    convs_per_block=1, latent_dim=2))


def test_validate_flip_task(scenes: Path) -> None:
    batches = SceneEvalDataset(scenes / "val.h5").batches(2)
    out = validate_flip_task(_tiny_model(), batches, 4, generator=torch.Generator().manual_seed(0))
    for key in ("ged", "diversity", "graders", "cross", "pixels_varying", "mode_r", "mode_mae",
                "flip_mae", "crops", "samples", "time_s"):
        assert key in out
    assert out["crops"] == 4.0 and out["samples"] == 4.0
    assert out["ged"] == pytest.approx(2 * out["cross"] - out["diversity"] - out["graders"], abs=1e-5)


class _Reconstructs:
    """A fake posterior model: reconstructs the shown mode, or one fixed answer whatever it is shown."""

    def __init__(self, blind: bool = False, flip_these=()) -> None:
        self.blind, self.flip_these = blind, flip_these

    def reconstruct(self, x, y, ignore=None):
        if self.blind:  # never sees the flips: always the un-flipped label
            y = y.clone()
            for sw in SWITCHES:
                y[y == sw.flipped] = sw.original
        elif self.flip_these:  # encodes every switch but gets these ones backwards
            y = y.clone()
            for sw in self.flip_these:
                orig, twin = y == sw.original, y == sw.flipped
                y[orig], y[twin] = sw.flipped, sw.original
        return torch.nn.functional.one_hot(y, NUM_CLASSES).permute(0, 3, 1, 2).float()


def test_posterior_switch_accuracy_hand_cases(test_split) -> None:
    images, labels, ignore = test_split
    images, labels, ignore = images[:6], labels[:6], ignore[:6]
    perfect = posterior_switch_accuracy(_Reconstructs(), images, labels, ignore, batch_size=4)
    assert perfect["cases"] == 6 * 32 and perfect["all_right"] == 1.0
    assert [p["accuracy"] for p in perfect["per_switch"]] == [1.0] * 5
    # A decoder that ignores the posterior is right on exactly the 16 of 32 modes that agree with it.
    blind = posterior_switch_accuracy(_Reconstructs(blind=True), images, labels, ignore, batch_size=4)
    assert [p["accuracy"] for p in blind["per_switch"]] == [0.5] * 5
    assert blind["all_right"] == pytest.approx(1 / 32)
    # Getting the car backwards costs the car only.
    car = posterior_switch_accuracy(_Reconstructs(flip_these=(SWITCHES[2],)), images, labels, ignore)
    assert [p["accuracy"] for p in car["per_switch"]] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert car["all_right"] == 0.0


# -- the command ------------------------------------------------------------------------------


def _one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    for n in needles:
        assert n in lines[0], lines[0]


def test_cli_calibration_end_to_end(scenes: Path, tmp_path: Path) -> None:
    run = tmp_path / "tiny-run"
    model = _tiny_model()
    save_checkpoint(run / "last", model, meta={"step": 1})
    save_checkpoint(run / "best", model, meta={"step": 1, "val": {"ged": 1.0}})
    (run / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    out = tmp_path / "report"
    result = runner.invoke(app, ["calibration", "--run", str(run), "--data", str(scenes), "--out", str(out),
                                 "-n", "1,4", "--samples", "4", "--oracle", "--max-images", "6",
                                 "--examples", "2", "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "0.874" in result.output and "tiny-run" in result.output and "oracle" in result.output
    for name in ("ged.png", "modes.png", "marginals.png", "examples.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    report = json.loads((out / "calibration.json").read_text())
    assert [r["label"] for r in report["runs"]] == ["tiny-run", "oracle"]
    assert report["runs"][0]["info"]["checkpoint"].endswith("best")
    assert set(report["runs"][0]["info"]) == {"checkpoint", "name", "step", "val", "config"}
    assert report["runs"][0]["info"]["config"]["num_classes"] == NUM_CLASSES
    assert set(report["runs"][0]["ged"]) == {"1", "4"}
    assert len(report["runs"][0]["modes"]["per_mode"]) == 32
    assert report["data"]["scenes"] == 6
    assert report["settings"]["mode_scenes"] == "all" and report["runs"][0]["modes"]["rule"] == "all"
    md = (out / "calibration.md").read_text()
    assert "Table 2" in md and "Pearson r" in md and "sidewalk → sidewalk 2" in md
    assert "Every scene counts, the authors' rule" in md and "over all scenes" in result.output
    # The Prob. U-Net is checked for what its posterior encodes; the oracle has no posterior.
    post = report["runs"][0]["posterior"]
    assert post["cases"] == 6 * 32 and len(post["per_switch"]) == 5
    assert "posterior" not in report["runs"][1]
    assert "Which flips the posterior encodes" in md and "posterior encodes:" in result.output
    # ... and where its decoder splits each flip (the oracle has no latent space).
    geometry = report["runs"][0]["geometry"]
    assert [p["class"] for p in geometry["per_switch"]] == [sw.name for sw in SWITCHES]
    assert "geometry" not in report["runs"][1]
    assert "Where the decoder splits each flip" in md and "flip boundary - quantile" in result.output


def test_calibrate_runs_labels_repeated_runs(scenes: Path, tmp_path: Path) -> None:
    run = tmp_path / "twice"
    save_checkpoint(run / "best", _tiny_model(), meta={"step": 3})
    report = calibrate_runs(scenes, [run, run / "best"], tmp_path / "report", counts=(1,), samples=1,
                            max_images=2, oracle=True, examples=0, posterior_scenes=0, device="cpu")
    assert [r["label"] for r in report["runs"]] == ["twice", "twice#2", "oracle"]
    assert report["runs"][0]["ged"] == report["runs"][1]["ged"]  # the same model on the same noise
    assert report["runs"][0]["info"]["step"] == 3
    assert not (tmp_path / "report" / "examples.png").exists()
    complete = calibrate_runs(scenes, [], tmp_path / "report2", counts=(1,), samples=1, max_images=2,
                              oracle=True, examples=0, mode_scenes="complete", device="cpu")
    assert complete["settings"]["mode_scenes"] == "complete"
    assert complete["runs"][0]["modes"]["rule"] == "complete"
    assert "(`--mode-scenes complete`; the authors count every scene)" in (
        tmp_path / "report2" / "calibration.md").read_text()


def test_cli_calibration_errors(scenes: Path, tmp_path: Path, disc_data: Path) -> None:
    out = str(tmp_path / "r")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out]), "--run")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(disc_data), "--out", out, "--oracle"]),
                    "manifest")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out, "--run",
                                        str(tmp_path / "missing")]), "not found")
    lidc = tmp_path / "lidc-run"
    torch.manual_seed(0)
    save_checkpoint(lidc / "best", create_model(ModelConfig(base_channels=4, num_scales=3,
                                                            convs_per_block=1, latent_dim=2)))
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out, "--run", str(lidc)]),
                    f"{NUM_CLASSES}")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out, "--oracle",
                                        "-n", "0,4"]), "-n")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out, "--oracle",
                                        "--split", "train2"]), "split")
    _one_line_error(runner.invoke(app, ["calibration", "--data", str(scenes), "--out", out, "--oracle",
                                        "--mode-scenes", "most"]), "--mode-scenes", "all or complete")
    assert not (tmp_path / "r").exists()
