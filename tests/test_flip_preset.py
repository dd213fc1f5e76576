"""The quick flip-task preset ``scenes-quick`` (Section 4.2 on the synthetic scenes, issue #13)."""

from __future__ import annotations

import json
from pathlib import Path

from lidcseg.config import TrainConfig
from lidcseg.presets import PRESETS, override, preset


def test_scenes_quick_trains_on_the_stored_scenes_without_weight_decay() -> None:
    """No augmentation (the paper lists no mirroring; H.2's list is the `cityscapes` setting) and no
    weight decay (as the LIDC cpu-quick). Measured (issue #13): without mirroring seed 1 encodes all
    five flips by step 5000 (four in 6000 with it), seed 0 four and a half (five with it).
    """
    _, train = PRESETS["scenes-quick"]
    assert train.augment is False
    assert train.weight_decay == 0.0
    assert preset("cpu-quick", task="flip-scenes") == PRESETS["scenes-quick"]
    # `make flip-demo`'s budget (about 15 minutes per model on 2 cores): 6000 steps of 16 scenes
    # (8 left a flip unlearned on more seeds), one torch thread, then 300 steps of prior refit
    # (README, "Calibration"; 8000 steps of 8 scenes measured no better on seeds 0 and 1).
    assert (train.steps, train.batch_size, train.threads) == (6000, 16, 1)
    assert (train.lr, train.lr_final, train.lr_decay_steps) == (1e-3, 1e-4, 2)
    assert (train.prior_refit_steps, train.prior_refit_samples, train.prior_refit_val_every) == (300, 256, 50)
    # The posterior sample's noise rises from 0 over the first third (issue #13: with Eq. 4's full
    # sample from step 0, seed 0 left its person flip half learned at step 6000; with the warm-up
    # every flip of seed 0 was encoded by step 3000).
    assert train.posterior_noise_warmup_steps == 2000


def test_paper_presets_stay_literal() -> None:
    """The change is the quick preset's: the paper's settings keep augmentation and weight decay 1e-5."""
    for name in ("paper", "cityscapes"):
        _, train = PRESETS[name]
        assert train.augment is True and train.weight_decay == TrainConfig().weight_decay == 1e-5
        assert train.prior_refit_steps == 0  # the refit is not the paper's
        assert train.kl_free_bits == 0.0 and train.beta_warmup_steps == 0
        assert train.posterior_noise_warmup_steps == 0  # Eq. 4's full sample from the first step


def test_scenes_quick_two_steps(tmp_path: Path) -> None:
    """The preset's own model and optimiser settings train (2 steps) and are what the run records."""
    from lidcseg.data.scenes import make_scenes
    from lidcseg.training import train

    data = tmp_path / "scenes"
    make_scenes(data, n_train=4, n_val=2, n_test=2, height=32, width=64, seed=0)
    model_cfg, train_cfg = PRESETS["scenes-quick"]
    train_cfg = override(train_cfg, {"steps": 2, "batch_size": 2, "val_every": 2, "val_samples": 2,
                                     "val_max_crops": 2, "checkpoint_every": 2, "log_every": 1,
                                     "prior_refit_steps": 1, "prior_refit_samples": 4})
    run = train(data, model_cfg, train_cfg, tmp_path / "run")
    config = json.loads((run / "config.json").read_text())
    assert config["train"]["augment"] is False and config["train"]["weight_decay"] == 0.0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in rows if r["split"] == "train")  # finite, not NaN
