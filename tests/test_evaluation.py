"""``lidcseg evaluate``: per-image GED / diversity / HM-IoU at n = 1, 4, 8, 16, Wilcoxon, reports."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lidcseg.config import DataConfig, ModelConfig, TrainConfig, to_dict
from lidcseg.data.eval_split import load_split, split_file
from lidcseg.errors import LidcsegError
from lidcseg.evaluation import (
    RunResult,
    compare_runs,
    disagreement_examples,
    evaluate_model,
    evaluate_runs,
)
from lidcseg.inference import OpenRun
from lidcseg.io.atomic import write_json_atomic
from lidcseg.metrics import ged_terms, hungarian_iou, sample_diversity
from lidcseg.metrics.extra import hungarian_iou_from_matrix, joint_iou, prefix_metrics
from lidcseg.models.checkpoint import save_checkpoint
from lidcseg.models.registry import SegmentationModel, create_model
from lidcseg.reports.evaluation import CSV_COLUMNS
from lidcseg.seed import seed_everything
from lidcseg_cli.main import app

runner = CliRunner()
TINY = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=2,
                   fcomb_channels=4, fcomb_layers=1)
INPUT = 32


def make_run(root: Path, seed: int = 0, cfg: ModelConfig = TINY, input_size: int = INPUT) -> Path:
    """A `lidcseg train`-style run dir (config.json + best/) of an untrained tiny model."""
    seed_everything(seed)
    train = to_dict(TrainConfig(input_size=input_size))
    save_checkpoint(root / "best", create_model(cfg), meta={"step": 0, "train": train})
    write_json_atomic(root / "config.json", {"model": to_dict(cfg), "train": train, "data": {"crop_size": 180}})
    return root


def one_line_error(result, *needles: str) -> None:
    assert result.exit_code not in (0, None), result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("error: ") and "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("runs")
    return [make_run(root / "pun", 0), make_run(root / "other", 1)]


class DiscModel(nn.Module):
    """Deterministic fake: sample k of every image is a centred disc of radius 2 + k. Records n per call."""

    def __init__(self, name: str = "probunet") -> None:
        super().__init__()
        self.config = ModelConfig(name="probunet", latent_dim=2)
        self.name = name
        self.calls: list[int] = []

    def sample(self, x: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        self.calls.append(n)
        b, _, h, w = x.shape
        yy, xx = torch.meshgrid(torch.arange(h) - h / 2 + 0.5, torch.arange(w) - w / 2 + 0.5, indexing="ij")
        radius = 2.0 + torch.arange(n, dtype=torch.float32)
        fg = (yy.hypot(xx)[None] <= radius[:, None, None]).float() * 2 - 1  # (n, h, w)
        return torch.stack([-fg, fg], dim=1)[None].expand(b, -1, -1, -1, -1)  # (b, n, 2, h, w)


# -- metrics for several counts from one IoU matrix ------------------------------------------------


@pytest.mark.parametrize("unbiased", [False, True])
def test_prefix_metrics_equal_the_metrics_of_the_first_n_samples(unbiased: bool) -> None:
    g = torch.Generator().manual_seed(0)
    samples = torch.rand(3, 8, 9, 9, generator=g) > 0.55
    graders = torch.rand(3, 4, 9, 9, generator=g) > 0.5
    samples[0, 2] = False
    graders[1, 1:3] = False
    counts = [2, 4, 8] if unbiased else [1, 2, 4, 8]
    got = prefix_metrics(joint_iou(samples, graders), 8, counts, unbiased)
    for k in counts:
        terms = ged_terms(samples[:, :k], graders, unbiased)
        np.testing.assert_allclose(got[k]["ged"], terms.ged.numpy(), atol=1e-5)
        np.testing.assert_allclose(got[k]["diversity"], sample_diversity(samples[:, :k], unbiased).numpy(), atol=1e-5)
        np.testing.assert_allclose(got[k]["cross"], terms.cross.numpy(), atol=1e-5)
        np.testing.assert_allclose(got[k]["grader_diversity"], terms.graders.numpy(), atol=1e-5)
        np.testing.assert_allclose(got[k]["hm_iou"], hungarian_iou(samples[:, :k], graders).numpy(), atol=1e-5)


def test_hungarian_from_matrix_hand_case() -> None:
    # 2 samples vs 4 graders: lcm 4, each sample used twice; best matching takes 0.9, 0.8, 0.7, 0.6.
    ious = torch.tensor([[[0.9, 0.8, 0.1, 0.0], [0.0, 0.1, 0.7, 0.6]]])
    assert hungarian_iou_from_matrix(ious)[0] == pytest.approx((0.9 + 0.8 + 0.7 + 0.6) / 4)


# -- the split in memory ---------------------------------------------------------------------------


def test_split_in_memory_and_its_batches(disc_data: Path, tmp_path: Path) -> None:
    split = load_split(disc_data, "test", INPUT, max_images=3)
    assert len(split) == 3 and split.images.shape == (3, 1, INPUT, INPUT) and split.masks.dtype == torch.bool
    assert split.rows.tolist() == [0, 2, 3]  # evenly spaced over the file's 4 crops
    assert all(p.startswith("SYN-") for p in split.patient) and len(set(split.lesion)) <= 3
    batches = list(split.batches(2))
    assert [(s, e) for s, e, _ in batches] == [(0, 2), (2, 3)]
    torch.testing.assert_close(torch.cat([x for _, _, x in batches]), split.images)
    with pytest.raises(LidcsegError, match="data directory not found"):
        split_file(tmp_path / "none", "test")
    with pytest.raises(LidcsegError, match="missing split file holdout.h5"):
        load_split(disc_data, "holdout", INPUT)


# -- the evaluation of one model -----------------------------------------------------------------


def test_counts_use_the_first_n_of_one_draw(disc_data: Path) -> None:
    split = load_split(disc_data, "test", INPUT)
    model = DiscModel()
    metrics, kept, sampling = evaluate_model(model, split, (8, 1, 4), batch_size=3, keep=[2])
    assert sampling == "prefix" and model.calls == [8, 8]  # one draw of max(n) per batch
    all_samples = model.sample(split.images, 8).argmax(2) != 0
    for j, n in enumerate((1, 4, 8)):
        terms = ged_terms(all_samples[:, :n], split.masks)
        np.testing.assert_allclose(metrics["ged"][j], terms.ged.numpy(), atol=1e-5)
        np.testing.assert_allclose(metrics["hm_iou"][j], hungarian_iou(all_samples[:, :n], split.masks).numpy(), atol=1e-5)
    assert list(kept) == [2] and np.array_equal(kept[2], all_samples[2].numpy())


def test_ensemble_is_sampled_once_per_count(disc_data: Path) -> None:
    split = load_split(disc_data, "test", INPUT)
    model = DiscModel()
    model.samples_per_count = True  # the model protocol's flag (UNetEnsemble sets it)
    _, _, sampling = evaluate_model(model, split, (1, 4), batch_size=4)
    assert sampling == "per-count" and model.calls == [1, 4]


def test_the_unet_ensemble_is_evaluated_with_n_members(disc_data: Path) -> None:
    """A real ensemble: n = 1 and 4 use 1 and 4 members, with the members' own masks."""
    split = load_split(disc_data, "test", INPUT)
    seed_everything(0)
    model = create_model(ModelConfig(name="unet-ensemble", ensemble_size=4, base_channels=4, num_scales=3,
                                     convs_per_block=1, fcomb_channels=4, fcomb_layers=1)).eval()
    metrics, _, sampling = evaluate_model(model, split, (1, 4), batch_size=3)
    assert sampling == "per-count"
    with torch.no_grad():
        members = model.sample(split.images, 4).argmax(2) != 0
    for j, n in enumerate((1, 4)):
        terms = ged_terms(members[:, :n], split.masks)
        np.testing.assert_allclose(metrics["ged"][j], terms.ged.numpy(), atol=1e-5)


class EpsDiscModel(SegmentationModel):
    """Harness fake: hypothesis k of image b is a centred disc of radius 8 + 4 eps[b, k, 0]."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(latent_dim=2)

    def loss(self, x, y, ignore=None, generator=None):
        raise NotImplementedError

    def sample(self, x, n, generator=None, eps=None) -> torch.Tensor:
        assert eps is not None and eps.shape == (x.shape[0], n, 2)  # harness models get the noise
        h, w = x.shape[-2:]
        yy, xx = torch.meshgrid(torch.arange(h) - h / 2, torch.arange(w) - w / 2, indexing="ij")
        fg = (yy.hypot(xx) < 8 + 4 * eps[..., :1, None]).float() * 2 - 1  # (b, n, h, w)
        return torch.stack([-fg, fg], dim=2)


def test_harness_noise_is_per_image_whatever_the_batch(disc_data: Path) -> None:
    """A harness model's samples of an image depend on the seed and its row only."""
    split = load_split(disc_data, "test", INPUT)
    keep = range(len(split))
    a = evaluate_model(EpsDiscModel(), split, (2, 8), seed=7, batch_size=1, keep=keep)
    b = evaluate_model(EpsDiscModel(), split, (2, 8), seed=7, batch_size=3, keep=keep)
    c = evaluate_model(EpsDiscModel(), split, (2, 8), seed=8, batch_size=3, keep=keep)
    for k in a[0]:
        np.testing.assert_array_equal(a[0][k], b[0][k])
    assert all(np.array_equal(a[1][i], b[1][i]) for i in keep)
    assert not any(np.array_equal(a[1][i], c[1][i]) for i in keep)
    assert a[0]["diversity"][1].mean() > 0.05  # the noise matters


class NoiseModel(nn.Module):
    """Fake: each sample is a centred disc of a random radius drawn from ``generator``."""

    def __init__(self) -> None:
        super().__init__()
        self.config = ModelConfig(latent_dim=2)

    def sample(self, x: torch.Tensor, n: int, generator=None) -> torch.Tensor:
        b, _, h, w = x.shape
        radius = 12 * torch.rand((b, n, 1, 1), generator=generator)
        yy, xx = torch.meshgrid(torch.arange(h) - h / 2, torch.arange(w) - w / 2, indexing="ij")
        fg = (yy.hypot(xx) < radius).float() * 2 - 1  # (b, n, h, w)
        return torch.stack([-fg, fg], dim=2)


def fake_run(model: nn.Module, run: Path, name: str = "probunet") -> OpenRun:
    """What :func:`lidcseg.inference.open_run` gives, around any model."""
    return OpenRun(label=run.name, path=run, checkpoint=run / "best", run_dir=run, model=model,
                   config=ModelConfig(name=name), input_size=INPUT, data=DataConfig(),
                   device=torch.device("cpu"), info={"name": name})


def test_seeded_samples(disc_data: Path, runs: list[Path], monkeypatch) -> None:
    """Same seed, same numbers; another seed, other samples."""
    import lidcseg.inference

    def load(run, device="auto", input_size=None) -> OpenRun:
        return fake_run(NoiseModel(), Path(run))

    monkeypatch.setattr(lidcseg.inference, "open_run", load)
    a, b, c = (evaluate_runs(disc_data, runs[:1], counts=(2, 8), seed=s, device="cpu", examples=0).results[0]
               for s in (3, 3, 4))
    for k, v in a.metrics.items():
        np.testing.assert_array_equal(v, b.metrics[k])
    assert a.values("diversity", 8).mean() > 0.1  # the samples differ from one another
    assert not np.array_equal(a.metrics["ged"], c.metrics["ged"])


def test_choose_examples_prefers_disagreement() -> None:
    m = torch.zeros(5, 4, 6, 6, dtype=torch.bool)
    m[0, :, :2, :2] = True  # all agree: score 0
    m[1, 0, :2, :2] = True  # 1 of 4 marked: presence ambiguous
    m[2, 0, :2, :2] = True
    m[2, 1, 3:, 3:] = True  # 2 of 4 marked, disjoint: the most ambiguous
    m[3, :, :2, :2] = True
    m[3, 3, :3, :3] = True  # all marked, one larger: shape disagreement
    # crop 4: all empty
    assert disagreement_examples(m, 2) == [2, 3]
    assert disagreement_examples(m, 3) == [2, 1, 3]
    lesion = np.array(["a", "b", "b", "c", "d"])  # crops 1 and 2: slices of one lesion
    assert disagreement_examples(m, 3, lesion) == [2, 3, 0]
    assert disagreement_examples(m, 0) == [] and len(disagreement_examples(m, 9)) == 5
    assert disagreement_examples(m[:0], 3) == []


# -- Wilcoxon ------------------------------------------------------------------------------------


def test_wilcoxon_is_called_on_paired_per_image_arrays(monkeypatch) -> None:
    import scipy.stats

    calls = []

    def fake(x, y, **kwargs):
        calls.append((np.array(x), np.array(y)))
        return SimpleNamespace(statistic=1.0, pvalue=0.5)

    monkeypatch.setattr(scipy.stats, "wilcoxon", fake)
    counts = (4, 16)
    rng = np.random.default_rng(0)

    def result(label: str, model: str) -> RunResult:
        metrics = {k: rng.random((2, 5)) for k in ("ged", "diversity", "hm_iou", "cross", "grader_diversity")}
        return RunResult(label, label, model, counts, metrics)

    other, pun, third = result("ens", "unet-ensemble"), result("pun", "probunet"), result("drop", "dropout")
    rows = compare_runs([other, pun, third])
    assert [(r["reference"], r["other"], r["metric"], r["n"]) for r in rows] == [
        ("pun", "ens", "ged", 16), ("pun", "ens", "hm_iou", 16),
        ("pun", "drop", "ged", 16), ("pun", "drop", "hm_iou", 16),
    ]
    x, y = calls[0]
    np.testing.assert_array_equal(x, pun.values("ged", 16))  # the reference first, image by image
    np.testing.assert_array_equal(y, other.values("ged", 16))
    # no probunet run: the first run is the reference
    assert compare_runs([other, third])[0]["reference"] == "ens"


# -- the report, the command line ----------------------------------------------------------------


def test_evaluate_writes_the_report(disc_data: Path, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    ev = evaluate_runs(disc_data, runs, counts=(1, 4), out=out, device="cpu", examples=2, batch_size=2)
    assert {p.name for p in out.iterdir()} == {".lidcseg-output.json", "summary.json", "summary.md", "per_image.csv", "ged.png", "examples.png"}
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 2 * 2 * 4  # runs x counts x images
    assert {r["run"] for r in rows} == {"pun", "other"} and {r["n"] for r in rows} == {"1", "4"}
    assert rows[0]["patient"].startswith("SYN-")
    first = [r for r in rows if r["run"] == "pun" and r["n"] == "4"]
    assert [float(r["ged"]) for r in first] == pytest.approx(ev.results[0].values("ged", 4).tolist())
    info = json.loads((out / "summary.json").read_text())
    assert info["counts"] == [1, 4] and info["images"] == 4 and info["protocol"]["ged"] == "V-statistic"
    assert [r["label"] for r in info["runs"]] == ["pun", "other"]
    assert info["wilcoxon"][0]["n"] == 4 and info["wilcoxon"][0]["reference"] == "pun"
    assert set(info["runs"][0]["metrics"]["4"]["ged"]) >= {"mean", "sd", "median"}
    md = (out / "summary.md").read_text()
    assert "| run | model | n | GED² |" in md and "Wilcoxon" in md
    for png in ("ged.png", "examples.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_evaluate(disc_data: Path, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "r"
    result = runner.invoke(app, ["evaluate", "--data", str(disc_data), "--run", str(runs[0]), "-n", "2,4",
                                 "--out", str(out), "--device", "cpu", "--examples", "1", "--threads", "1",
                                 "--max-images", "3", "--unbiased"])
    assert result.exit_code == 0, result.output
    assert "GED@4" in result.output
    info = json.loads((out / "summary.json").read_text())
    assert info["images"] == 3 and info["protocol"]["ged"] == "U-statistic" and info["wilcoxon"] == []


def test_cli_errors_are_one_line(disc_data: Path, runs: list[Path], tmp_path: Path) -> None:
    base = ["evaluate", "--data", str(disc_data), "--out", str(tmp_path / "o"), "--device", "cpu"]
    one_line_error(runner.invoke(app, [*base, "--run", str(tmp_path / "nope")]), "nope", "not found")
    one_line_error(runner.invoke(app, [*base, "--run", str(disc_data)]), "not a run directory")
    one_line_error(runner.invoke(app, [*base, "--run", str(runs[0]), "--split", "holdout"]),
                   "holdout.h5", "missing split")
    one_line_error(runner.invoke(app, [*base, "--run", str(runs[0]), "-n", "1,x"]), "-n")
    one_line_error(runner.invoke(app, [*base, "--run", str(runs[0]), "-n", "1,4", "--unbiased"]), "U-statistic")
    # a checkpoint of a model kind this lidcseg does not know
    alien = make_run(tmp_path / "alien")
    cfg = json.loads((alien / "best" / "config.json").read_text())
    cfg["model"]["name"] = "no-such-model"
    (alien / "best" / "config.json").write_text(json.dumps(cfg))
    one_line_error(runner.invoke(app, [*base, "--run", str(alien)]), "no-such-model")
    other_size = make_run(tmp_path / "big", input_size=64)
    one_line_error(runner.invoke(app, [*base, "--run", str(runs[0]), "--run", str(other_size)]), "input sizes")
    assert not (tmp_path / "o").exists()


def test_joint_iou_equals_pairwise_iou_of_both_sets() -> None:
    from lidcseg.metrics import pairwise_iou

    g = torch.Generator().manual_seed(1)
    samples = torch.rand(2, 5, 7, 6, generator=g) > 0.6
    graders = torch.rand(2, 3, 7, 6, generator=g) > 0.6
    samples[0, :2] = False
    graders[0, 0] = False
    both = torch.cat([samples, graders], 1)
    torch.testing.assert_close(joint_iou(samples, graders), pairwise_iou(both, both))
    torch.testing.assert_close(joint_iou(samples, graders, 0.0), pairwise_iou(both, both, 0.0))
