"""Step numbers kept on the device between sync points: same means, NaN caught, checkpoints safe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.presets import apply_overrides
from lidcseg.training import iter_metrics, train
from lidcseg.training.distributed import Dist
from lidcseg.training.loop import batch_to_device
from lidcseg.training.stats import StatsWindow, defer_sync, step_vector
from tests.test_training import poison_loss_at

TINY_MODEL = ModelConfig(base_channels=4, num_scales=3, fcomb_channels=8, latent_dim=2)
TINY_TRAIN = TrainConfig(
    steps=6, batch_size=4, lr=1e-3, lr_final=1e-4, lr_decay_steps=1, input_size=32,
    aug_max_shift=8, num_workers=0, log_every=3, val_every=3, val_samples=4, val_max_crops=4,
    val_batch_size=4, checkpoint_every=3, device="cpu", threads=1,
)
NAMES = ("loss", "elbo", "rec", "kl")


def _vec(loss: float, kl_dims: tuple[float, float] = (0.25, 0.5)) -> torch.Tensor:
    return torch.tensor([loss, loss + 1.0, loss - 1.0, 0.75, *kl_dims])


def _window(values: list[float], sync_each: bool) -> tuple[StatsWindow, dict]:
    w = StatsWindow()
    for i, v in enumerate(values, start=1):
        w.record(i, NAMES, _vec(v))
        if sync_each:
            assert w.sync() is None
        w.tick(1e-3, 1.0, 4)
    assert w.sync() is None
    return w, w.flush()


def test_window_means_do_not_depend_on_the_sync_cadence() -> None:
    values = [1.0, 2.0, 4.5]
    w, once = _window(values, sync_each=False)
    _, each = _window(values, sync_each=True)
    assert once["loss"] == (1.0 + 2.0 + 4.5) / 3 and once["elbo"] == (2.0 + 3.0 + 5.5) / 3
    assert once["kl_per_dim"] == [0.25, 0.5] and once["steps_in_mean"] == 3
    drop = ("it_s", "img_s")
    assert {k: v for k, v in once.items() if k not in drop} == {k: v for k, v in each.items() if k not in drop}
    assert w.latest == {"loss": 4.5, "elbo": 5.5, "rec": 3.5, "kl": 0.75}
    assert (once["lr"], once["beta"]) == (1e-3, 1.0)


def test_sync_names_the_first_non_finite_step_and_flush_needs_a_sync() -> None:
    w = StatsWindow(sync_every=4)
    assert [w.due(s) for s in (1, 4, 7, 8)] == [False, True, False, True]
    for step, v in ((1, 1.0), (2, float("nan")), (3, float("inf"))):
        w.record(step, NAMES, _vec(v))
    assert w.pending == 3
    with pytest.raises(RuntimeError, match="before sync"):
        w.flush()
    assert w.sync() == 2 and w.pending == 0


def test_step_vector_lays_out_scalars_then_kl_per_dim() -> None:
    terms = {"rec": torch.tensor(3.0), "kl": torch.tensor(0.5), "kl_per_dim": torch.tensor([0.2, 0.3])}
    names, vec = step_vector(torch.tensor(3.5), terms, 2.0, Dist())
    assert names == NAMES and vec.tolist() == [3.5, 4.0, 3.0, 0.5, pytest.approx(0.2), pytest.approx(0.3)]
    names, vec = step_vector(torch.tensor(3.0), {"rec": torch.tensor(3.0)}, 1.0, Dist())
    assert names == ("loss", "elbo", "rec") and vec.tolist() == [3.0, 3.0, 3.0]
    assert not defer_sync(torch.device("cpu")) and defer_sync(torch.device("cuda", 0))


def test_batch_to_device_is_the_one_crossing() -> None:
    batch = {"image": torch.rand(2, 3, 8, 8), "mask": torch.zeros(2, 8, 8, dtype=torch.long)}
    x, y, ignore = batch_to_device(batch, torch.device("cpu"), channels_last=True)
    assert x.is_contiguous(memory_format=torch.channels_last) and torch.equal(x, batch["image"])
    assert ignore is None and y.dtype == torch.long
    batch["ignore"] = torch.ones(2, 8, 8, dtype=torch.bool)
    assert batch_to_device(batch, torch.device("cpu"))[2] is batch["ignore"]


def _rows(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("it_s", "img_s", "time_s")}
            for r in iter_metrics(run)]


def test_deferred_sync_logs_the_same_numbers_as_per_step_sync(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["log_every=2", "checkpoint_every=5"])[1]
    plain_events: list = []
    plain = train(disc_data, TINY_MODEL, cfg, tmp_path / "plain", callback=plain_events.append)
    from lidcseg.training import loop

    monkeypatch.setattr(loop, "defer_sync", lambda device: True)  # the CUDA path, on the CPU
    events: list = []
    deferred = train(disc_data, TINY_MODEL, cfg, tmp_path / "deferred", callback=events.append)
    assert _rows(deferred) == _rows(plain)
    a, b = load_file(str(plain / "last" / "model.safetensors")), load_file(str(deferred / "last" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Step events carry the numbers of the last step read back. Sync points: every 2nd step
    # (log_every), 3 and 6 (validation), 5 (checkpoint); step 1 is none, so its event has no loss.
    p = {e.step: e.metrics for e in plain_events if e.kind == "step"}
    d = {e.step: e.metrics for e in events if e.kind == "step"}
    assert "loss" not in d[1] and "lr" in d[1] and "loss" in p[1]
    assert all(d[s]["loss"] == p[s]["loss"] for s in (2, 3, 4, 5, 6))


def test_deferred_sync_catches_nan_before_the_next_checkpoint(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from lidcseg.training import loop

    calls = poison_loss_at(monkeypatch, 4)
    monkeypatch.setattr(loop, "defer_sync", lambda device: True)
    cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["log_every=6", "val_every=0"])[1]
    run = tmp_path / "nan"
    with pytest.raises(LidcsegError, match=r"non-finite loss at step 4; last good checkpoint kept at .*last"):
        train(disc_data, TINY_MODEL, cfg, run)
    assert calls[0] == 6  # steps 5 and 6 ran before the sync point at the step-6 checkpoint
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    assert all(torch.isfinite(v).all() for v in load_file(str(run / "last" / "model.safetensors")).values())
