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
from lidcseg.models.registry import SegmentationModel, create_model, model_config
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

    def load(run, device="auto", input_size=None, in_channels=None) -> OpenRun:
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


# -- M-Heads: one model per sample count (Section 3.2) ----------------------------------------------


def m_heads_cfg(heads: int) -> ModelConfig:
    return model_config("m-heads", TINY, num_heads=heads)


@pytest.fixture(scope="module")
def m_heads_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Untrained tiny M-Heads runs with 4 and 8 heads (different weights)."""
    root = tmp_path_factory.mktemp("m_heads")
    return {k: make_run(root / f"mh{k}", k, m_heads_cfg(k)) for k in (4, 8)}


def alone(run: Path, split, counts) -> dict[str, np.ndarray]:
    """The metrics of one checkpoint evaluated by itself at ``counts``."""
    from lidcseg.inference import open_run

    return evaluate_model(open_run(run, "cpu").model, split, counts, batch_size=3)[0]


def test_m_heads_runs_form_one_row_each_count_from_its_own_model(
    disc_data: Path, m_heads_runs: dict[int, Path], tmp_path: Path
) -> None:
    """n = 4 comes from the 4-head model, n = 8 from the 8-head model; the report names them."""
    out = tmp_path / "report"
    ev = evaluate_runs(disc_data, [m_heads_runs[8], m_heads_runs[4]], counts=(4, 8), out=out, device="cpu",
                       examples=1, batch_size=3)
    assert len(ev.results) == 1
    row = ev.results[0]
    assert (row.label, row.model, row.sampling) == ("mh4+mh8", "m-heads", "model-per-count")
    split = load_split(disc_data, "test", INPUT)
    for n in (4, 8):
        own = alone(m_heads_runs[n], split, (n,))
        for k in own:
            np.testing.assert_array_equal(row.values(k, n), own[k][0])
        assert row.sources[n]["run"] == f"mh{n}" and row.sources[n]["heads"] == n
        assert row.sources[n]["uses"] == f"all {n} heads"
        assert row.sources[n]["checkpoint"].endswith(f"mh{n}/best")
    # The 8-head model's first 4 heads are not what n = 4 scores.
    assert not np.array_equal(row.values("ged", 4), alone(m_heads_runs[8], split, (4, 8))["ged"][0])
    info = json.loads((out / "summary.json").read_text())
    served = info["runs"][0]["served_by"]
    assert {n: (s["run"], s["heads"]) for n, s in served.items()} == {"4": ("mh4", 4), "8": ("mh8", 8)}
    assert info["settings"]["m_heads"] == "matched" and "n heads" in info["protocol"]["samples"]
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["run"], r["n"], r["source"]) for r in rows} == {("mh4+mh8", "4", "mh4"), ("mh4+mh8", "8", "mh8")}
    md = (out / "summary.md").read_text()
    assert "| mh4+mh8 | m-heads | 4 | mh4: all 4 heads |" in md and "| mh4+mh8 | m-heads | 8 | mh8: all 8 heads |" in md
    assert row.examples and next(iter(row.examples.values())).shape[0] == 8  # the figure shows the 8-head model
    from lidcseg.reports.evaluation import legend

    assert legend(row) == "mh4+mh8 (n=4: mh4, n=8: mh8)"  # ged.png's legend


def test_cli_evaluate_m_heads(disc_data: Path, m_heads_runs: dict[int, Path], tmp_path: Path) -> None:
    base = ["evaluate", "--data", str(disc_data), "--device", "cpu", "--examples", "0", "--max-images", "2"]
    result = runner.invoke(app, [*base, "--run", str(m_heads_runs[4]), "--run", str(m_heads_runs[8]),
                                 "-n", "1,4,8", "--out", str(tmp_path / "a")])
    assert result.exit_code == 0, result.output
    assert "mh4+mh8 (m-heads): GED@8" in result.output
    assert ("n = 1: mh4, head 1 of 4 (no 1-head run); n = 4: mh4, all 4 heads; n = 8: mh8, all 8 heads"
            in " ".join(result.output.split()))
    result = runner.invoke(app, [*base, "--run", str(m_heads_runs[8]), "-n", "4,8", "--m-heads", "prefix",
                                 "--out", str(tmp_path / "b")])
    assert result.exit_code == 0, result.output
    info = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert info["runs"][0]["served_by"]["4"]["uses"].startswith("first 4 of 8 heads (--m-heads prefix")
    one_line_error(runner.invoke(app, [*base, "--run", str(m_heads_runs[8]), "--m-heads", "all",
                                       "--out", str(tmp_path / "c")]), "--m-heads", "matched or prefix")


def test_m_heads_n1_is_the_first_head_of_the_smallest_model(disc_data: Path, m_heads_runs: dict[int, Path]) -> None:
    ev = evaluate_runs(disc_data, [m_heads_runs[4], m_heads_runs[8]], counts=(1, 4, 8), device="cpu", examples=0)
    row = ev.results[0]
    split = load_split(disc_data, "test", INPUT)
    np.testing.assert_array_equal(row.values("ged", 1), alone(m_heads_runs[4], split, (1,))["ged"][0])
    assert row.sources[1]["run"] == "mh4" and row.sources[1]["uses"] == "head 1 of 4 (no 1-head run)"


def test_m_heads_without_a_model_of_n_heads_is_refused(
    disc_data: Path, m_heads_runs: dict[int, Path], tmp_path: Path
) -> None:
    with pytest.raises(LidcsegError, match=r"M-Heads at n = 4 needs a model with 4 heads.*"
                                           r"lidcseg train --model m-heads --set model.num_heads=4"):
        evaluate_runs(disc_data, [m_heads_runs[8]], counts=(4, 8), device="cpu", examples=0)
    base = ["evaluate", "--data", str(disc_data), "--out", str(tmp_path / "o"), "--device", "cpu"]
    one_line_error(runner.invoke(app, [*base, "--run", str(m_heads_runs[8]), "-n", "1,4,8,16"]),
                   "n = 4, 16", "model.num_heads=4", "--m-heads prefix")
    # two runs with the same head count, and a run that serves no count
    one_line_error(runner.invoke(app, [*base, "--run", str(m_heads_runs[8]), "--run", str(m_heads_runs[8]),
                                       "-n", "8"]), "mh8", "mh8#2", "8 heads")
    one_line_error(runner.invoke(app, [*base, "--run", str(m_heads_runs[8]), "--run", str(m_heads_runs[4]),
                                       "-n", "8"]), "mh4", "serves none")
    assert not (tmp_path / "o").exists()


def test_m_heads_prefix_is_an_explicit_labelled_option(disc_data: Path, m_heads_runs: dict[int, Path]) -> None:
    """``--m-heads prefix``: every run its own row, n = its first n heads (not the paper's protocol)."""
    ev = evaluate_runs(disc_data, [m_heads_runs[8], m_heads_runs[4]], counts=(2, 4), device="cpu", examples=0,
                       m_heads="prefix")
    assert [r.label for r in ev.results] == ["mh8", "mh4"]
    split = load_split(disc_data, "test", INPUT)
    np.testing.assert_array_equal(ev.results[0].metrics["ged"], alone(m_heads_runs[8], split, (2, 4))["ged"])
    assert ev.results[0].sources[2]["uses"] == "first 2 of 8 heads (--m-heads prefix, not the paper's protocol)"
    assert ev.settings["m_heads"] == "prefix"
    with pytest.raises(LidcsegError, match="--m-heads"):
        evaluate_runs(disc_data, [m_heads_runs[8]], counts=(4,), device="cpu", m_heads="first")


def test_m_heads_row_in_the_wilcoxon_test(disc_data: Path, runs: list[Path], m_heads_runs: dict[int, Path]) -> None:
    """The grouped row is compared with the Prob. U-Net per image at the compare count (its 8-head model)."""
    ev = evaluate_runs(disc_data, [m_heads_runs[4], runs[0], m_heads_runs[8]], counts=(4, 8), device="cpu",
                       examples=0)
    assert [r.label for r in ev.results] == ["mh4+mh8", "pun"] and ev.reference == "pun"
    ged = [t for t in ev.comparisons if t["metric"] == "ged"]
    assert [(t["other"], t["n"]) for t in ged] == [("mh4+mh8", 8)]
    split = load_split(disc_data, "test", INPUT)
    diff = alone(m_heads_runs[8], split, (8,))["ged"][0] - ev.results[1].values("ged", 8)
    assert ged[0]["mean_difference"] == pytest.approx(float(diff.mean()))


def test_ensembles_and_prob_unets_keep_their_numbers(disc_data: Path, runs: list[Path]) -> None:
    """A run that is not M-Heads is one row served by itself, exactly as ``evaluate_model`` scores it."""
    ev = evaluate_runs(disc_data, runs[:1], counts=(1, 4), device="cpu", examples=0, batch_size=3)
    split = load_split(disc_data, "test", INPUT)
    from lidcseg.inference import open_run

    own = evaluate_model(open_run(runs[0], "cpu").model, split, (1, 4), batch_size=3)[0]
    for k in own:
        np.testing.assert_array_equal(ev.results[0].metrics[k], own[k])
    assert ev.results[0].sources[4] | {"checkpoint": None} == {
        "run": "pun", "path": str(runs[0]), "checkpoint": None, "step": 0, "heads": None,
        "uses": "first 4 of 4 samples drawn once"}


def test_evaluate_writes_the_report(disc_data: Path, runs: list[Path], tmp_path: Path) -> None:
    out = tmp_path / "report"
    ev = evaluate_runs(disc_data, runs, counts=(1, 4), out=out, device="cpu", examples=2, batch_size=2)
    assert {p.name for p in out.iterdir()} == {".lidcseg-output.json", "summary.json", "summary.md", "per_image.csv", "ged.png", "examples.png"}
    with (out / "per_image.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS
    assert len(rows) == 2 * 2 * 4  # runs x counts x images
    assert {r["source"] for r in rows if r["run"] == "pun"} == {"pun"}
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
    assert "| run | model | n | samples from | GED² |" in md and "Wilcoxon" in md
    assert "| pun | probunet | 4 | pun: first 4 of 4 samples drawn once |" in md
    assert info["runs"][0]["served_by"]["1"]["run"] == "pun" and info["runs"][0]["run"] == str(runs[0])
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
