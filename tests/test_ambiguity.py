"""``lidcseg ambiguity`` (Appendix E): counts of samples showing a lesion, threshold, accuracy."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from lidcseg.ambiguity import (
    CRITERIA,
    ambiguity_runs,
    choose_threshold,
    count_lesions,
    graders_marking,
    lesion_counts,
    predict_ambiguous,
    presence_ambiguous,
    scores,
)
from lidcseg.data.eval_split import load_split
from lidcseg.errors import LidcsegError
from lidcseg.evaluation import evaluate_model
from lidcseg.reports.ambiguity import CSV_COLUMNS
from lidcseg_cli.main import app
from tests.test_evaluation import INPUT, DiscModel, NoiseModel, make_run, one_line_error

runner = CliRunner()


def test_presence_truth_and_counts() -> None:
    masks = torch.zeros(4, 4, 5, 5, dtype=torch.bool)
    masks[0, :, 2, 2] = True  # all 4 mark: unambiguous
    masks[1, 0, 2, 2] = True  # 1 of 4: ambiguous
    masks[2, :3, 1:3, 1:3] = True  # 3 of 4: ambiguous
    # crop 3: nobody marks: unambiguous (no lesion)
    assert presence_ambiguous(masks).tolist() == [False, True, True, False]
    assert graders_marking(masks).tolist() == [4, 1, 3, 0]
    samples = torch.zeros(2, 3, 5, 5, dtype=torch.bool)
    samples[0, 0, 0, 0] = True  # 1 px
    samples[0, 1, :2, :2] = True  # 4 px
    samples[1, :, 2, :3] = True  # 3 px each
    assert lesion_counts(samples).tolist() == [2, 3]
    assert lesion_counts(samples, min_pixels=3).tolist() == [1, 3]
    assert lesion_counts(samples, min_pixels=4).tolist() == [1, 0]


def test_scores_hand_case() -> None:
    truth = np.array([1, 1, 1, 1, 0, 0], bool)
    pred = np.array([1, 1, 1, 0, 1, 0], bool)
    s = scores(pred, truth)
    assert s["accuracy"] == pytest.approx(4 / 6)
    assert s["recall_ambiguous"] == pytest.approx(3 / 4) and s["recall_unambiguous"] == pytest.approx(1 / 2)
    assert s["balanced_accuracy"] == pytest.approx(5 / 8)
    assert (s["ambiguous"], s["unambiguous"]) == (4, 2)
    only_pos = scores(np.array([1, 0], bool), np.array([1, 1], bool))
    assert only_pos["balanced_accuracy"] == pytest.approx(0.5) and np.isnan(only_pos["recall_unambiguous"])


def test_threshold_plateau_takes_its_middle() -> None:
    # n = 16; ambiguous crops show a lesion in 2 and 5 samples, unambiguous in 14 and 16:
    # every t in 6..14 separates them perfectly; the middle is 10.
    counts = np.array([2, 5, 14, 16])
    truth = np.array([True, True, False, False])
    choice = choose_threshold(counts, truth, 16)
    assert (choice.threshold, choice.accuracy, choice.balanced_accuracy) == (10, 1.0, 1.0)
    assert predict_ambiguous(counts, choice.threshold).tolist() == truth.tolist()


def test_balanced_accuracy_and_accuracy_choose_differently() -> None:
    # 8 ambiguous crops (counts 10..13 and 16), 2 unambiguous (counts 16).
    counts = np.array([10, 10, 11, 12, 13, 16, 16, 16, 16, 16])
    truth = np.array([True] * 8 + [False] * 2)
    # accuracy: t = 17 (everything ambiguous) is right on 8/10; t in 14..16 gives 5 + 2 = 7/10.
    acc = choose_threshold(counts, truth, 16, "accuracy")
    assert acc.threshold == 17 and acc.accuracy == pytest.approx(0.8)
    # balanced: t in 14..16 gives (5/8 + 1) / 2 = 0.8125 > 0.5 of t = 17; the middle is 15.
    bal = choose_threshold(counts, truth, 16, "balanced")
    assert bal.threshold == 15 and bal.balanced_accuracy == pytest.approx(0.8125)
    assert bal.accuracy == pytest.approx(0.7)
    with pytest.raises(LidcsegError, match="criterion"):
        choose_threshold(counts, truth, 16, "f1")


def test_the_default_criterion_is_the_papers_accuracy() -> None:
    """Appendix E picks the threshold by validation accuracy: the default, where balanced accuracy disagrees."""
    counts = np.array([10, 10, 11, 12, 13, 16, 16, 16, 16, 16])
    truth = np.array([True] * 8 + [False] * 2)
    assert CRITERIA[0] == "accuracy" and "balanced" in CRITERIA
    default = choose_threshold(counts, truth, 16)
    assert (default.criterion, default.threshold, default.accuracy) == ("accuracy", 17, pytest.approx(0.8))
    assert choose_threshold(counts, truth, 16, "balanced").threshold == 15


def test_a_default_run_picks_the_accuracy_threshold(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ambiguity_runs and `lidcseg ambiguity` choose by accuracy unless told otherwise (hand-built counts)."""
    import lidcseg.ambiguity as amb

    val_truth = presence_ambiguous(load_split(disc_data, "val", INPUT).masks)
    assert val_truth.sum() == 3 and (~val_truth).sum() == 1  # disc_data: 3 of 4 val crops ambiguous
    # n = 4: one ambiguous crop shows no lesion, the other three crops all show it in 4 of 4.
    # accuracy: t = 5 (all ambiguous) is right on 3/4, t in 1..4 on 2/4; balanced accuracy:
    # t in 1..4 gives (1/3 + 1) / 2 = 2/3 > 1/2, the middle is t = 2.
    hand = np.full(4, 4)
    hand[np.flatnonzero(val_truth)[0]] = 0
    monkeypatch.setattr(amb, "count_lesions", lambda *a, **kw: hand.copy())
    run = make_run(tmp_path / "pun")
    info = ambiguity_runs(disc_data, [run], n=4, device="cpu")
    assert info["criterion"] == "accuracy"
    assert (info["runs"][0]["threshold"], info["runs"][0]["val_accuracy"]) == (5, 0.75)
    assert ambiguity_runs(disc_data, [run], n=4, device="cpu", criterion="balanced")["runs"][0]["threshold"] == 2
    args = ["ambiguity", "--data", str(disc_data), "--run", str(run), "--device", "cpu", "-n", "4"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "amb")])
    assert result.exit_code == 0, result.output
    saved = json.loads((tmp_path / "amb" / "ambiguity.json").read_text())
    assert saved["criterion"] == "accuracy" and saved["runs"][0]["threshold"] == 5
    md = (tmp_path / "amb" / "ambiguity.md").read_text()
    assert "t chosen on `val` by accuracy" in md and "| val accuracy |" in md
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "amb-b"), "--criterion", "balanced"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "amb-b" / "ambiguity.json").read_text())["runs"][0]["threshold"] == 2
    assert "| val bal. acc. |" in (tmp_path / "amb-b" / "ambiguity.md").read_text()


def test_counts_come_from_the_samples_evaluate_draws(disc_data: Path) -> None:
    """The same seed gives count_lesions the samples that evaluate scores (one generator per run)."""
    split = load_split(disc_data, "test", INPUT)
    counts = count_lesions(NoiseModel(), split, 8, seed=3, batch_size=3)
    _, kept, _ = evaluate_model(NoiseModel(), split, (8,), seed=3, batch_size=3, keep=range(len(split)))
    assert counts.tolist() == [int(kept[i].reshape(8, -1).any(1).sum()) for i in range(len(split))]
    assert count_lesions(DiscModel(), split, 4, min_pixels=40).tolist() == [2] * len(split)  # 12, 32, 52, 80 px


def test_ambiguity_report(disc_data: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "pun")
    out = tmp_path / "amb"
    info = ambiguity_runs(disc_data, [run], out=out, n=4, device="cpu", batch_size=3)
    assert {p.name for p in out.iterdir()} == {".lidcseg-output.json", "ambiguity.json", "ambiguity.md", "per_crop.csv", "histograms.png"}
    saved = json.loads((out / "ambiguity.json").read_text())
    assert saved["runs"][0]["label"] == "pun" and 0 <= saved["runs"][0]["threshold"] <= 5
    assert saved == json.loads(json.dumps(info))
    # disc_data: grader 0 misses every fourth crop, grader 3 is padded for every third
    assert saved["crops"]["test"] == {"total": 4, "ambiguous": 3}
    with (out / "per_crop.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == CSV_COLUMNS and len(rows) == 8  # 4 val + 4 test crops
    assert all(0 <= int(r["count"]) <= 4 for r in rows)
    t = saved["runs"][0]["threshold"]
    assert all(r["predicted"] == str(int(int(r["count"]) < t)) for r in rows)
    assert "| run | model | t |" in (out / "ambiguity.md").read_text()
    assert (out / "histograms.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_ambiguity_and_its_errors(disc_data: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "pun")
    out = tmp_path / "amb"
    args = ["ambiguity", "--data", str(disc_data), "--out", str(out), "--device", "cpu", "-n", "3"]
    result = runner.invoke(app, [*args, "--run", str(run), "--criterion", "accuracy", "--min-pixels", "2"])
    assert result.exit_code == 0, result.output
    assert "accuracy" in result.output and (out / "histograms.png").is_file()
    one_line_error(runner.invoke(app, [*args, "--run", str(tmp_path / "missing")]), "missing", "not found")
    one_line_error(runner.invoke(app, [*args, "--run", str(run), "--val-split", "dev"]), "dev.h5")
    one_line_error(runner.invoke(app, [*args, "--run", str(run), "--criterion", "f1"]), "criterion")
