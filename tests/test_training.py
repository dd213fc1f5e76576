"""Training: loss falls, run directory, exact resume after kill -9, NaN stop, DDP, CLI."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.presets import apply_overrides, preset
from lidcseg.training import (
    TrainEvent,
    beta_at,
    elbo,
    iter_metrics,
    lr_at,
    lr_schedule,
    noise_scale_at,
    objective,
    train,
)

TINY_MODEL = ModelConfig(base_channels=4, num_scales=3, fcomb_channels=8, latent_dim=2)
TINY_TRAIN = TrainConfig(
    steps=6, batch_size=4, lr=1e-3, lr_final=1e-4, lr_decay_steps=1, input_size=32,
    aug_max_shift=8, num_workers=0, log_every=1, val_every=3, val_samples=4, val_max_crops=4,
    val_batch_size=4, checkpoint_every=3, device="cpu", threads=1,
)


def _weights(run: Path, which: str = "last") -> dict[str, torch.Tensor]:
    return load_file(str(run / which / "model.safetensors"))


def _train_rows(run: Path) -> list[dict]:
    drop = {"it_s", "img_s", "time_s"}
    return [{k: v for k, v in r.items() if k not in drop} for r in iter_metrics(run, "train")]


def test_paper_lr_schedule() -> None:
    _, cfg = preset("paper")
    bounds, values = lr_schedule(cfg)
    assert bounds == [40_000, 80_000, 120_000, 160_000, 200_000]
    assert values[0] == pytest.approx(1e-4) and values[-1] == pytest.approx(1e-6)
    assert values[1] == pytest.approx(1e-4 * 10**-0.4)
    assert lr_at(39_999, cfg) == values[0] and lr_at(40_000, cfg) == values[1]
    assert lr_at(239_999, cfg) == pytest.approx(1e-6)


def test_presets_and_overrides() -> None:
    m, t = preset("paper")
    assert (m.base_channels, m.num_scales, m.latent_dim, m.beta) == (32, 5, 6, 1.0)
    assert (t.batch_size, t.lr, t.weight_decay, t.input_size, t.kl_free_bits) == (32, 1e-4, 1e-5, 128, 0.0)
    m2, t2 = apply_overrides(m, t, ["lr=3e-4", "model.beta=2", "augment=false", "train.steps=7"])
    assert (t2.lr, m2.beta, t2.augment, t2.steps) == (3e-4, 2.0, False, 7)
    for bad in (["nope=1"], ["lr"], ["steps=abc"], ["foo.lr=1"]):
        with pytest.raises(LidcsegError):
            apply_overrides(m, t, bad)
    with pytest.raises(LidcsegError, match="unknown preset"):
        preset("fast")


def test_free_bits_objective_stops_kl_gradient_below_floor() -> None:
    rec = torch.tensor(10.0, requires_grad=True)
    kl = torch.tensor(0.1, requires_grad=True)
    out = {"rec": rec, "kl": kl}
    cfg = TrainConfig(kl_free_bits=0.25)
    obj = objective(out, 1.0, ModelConfig(latent_dim=6), cfg)  # floor 1.5 nats > kl
    obj.backward()
    assert obj.item() == pytest.approx(11.5) and kl.grad.item() == 0.0 and rec.grad.item() == 1.0
    # Paper: the ELBO's own arithmetic, rec + beta * kl, bit for bit.
    assert torch.equal(objective(out, 1.0, ModelConfig(), TrainConfig()), rec + 1.0 * kl)


def test_objective_weights_the_terms_with_the_trainers_beta() -> None:
    rec, kl = torch.tensor(10.0), torch.tensor(0.1)
    terms = {"rec": rec, "kl": kl, "kl_per_dim": torch.tensor([0.04, 0.06])}
    model = ModelConfig(latent_dim=2, beta=2.0)
    paper = TrainConfig()
    assert objective(terms, 2.0, model, paper).item() == pytest.approx(10.2)  # 10 + 2 * 0.1
    assert elbo(terms, 2.0).item() == pytest.approx(10.2)
    # Free bits: the KL term is max(kl, N * free_bits) = max(0.1, 2 * 0.5) = 1.
    free = TrainConfig(kl_free_bits=0.5)
    assert objective(terms, 2.0, model, free).item() == pytest.approx(12.0)
    assert objective({"rec": rec, "kl": torch.tensor(3.0)}, 2.0, model, free).item() == pytest.approx(16.0)
    # Warm-up over 4 steps: beta_t = 2 * (step + 1) / 4, then 2.
    warm = TrainConfig(beta_warmup_steps=4)
    assert [beta_at(s, 2.0, warm) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert beta_at(0, 2.0, paper) == 2.0
    assert objective(terms, beta_at(0, 2.0, warm), model, warm).item() == pytest.approx(10.05)
    assert objective(terms, beta_at(3, 2.0, warm), model, warm).item() == pytest.approx(10.2)
    # Both: 10 + 0.5 * max(0.1, 1).
    both = TrainConfig(beta_warmup_steps=4, kl_free_bits=0.5)
    assert objective(terms, beta_at(0, 2.0, both), model, both).item() == pytest.approx(10.5)
    # Models without a latent minimise their reconstruction term, whatever beta.
    assert objective({"rec": rec}, 0.5, model, both) is rec and elbo({"rec": rec}, 2.0) is rec
    with pytest.raises(LidcsegError, match="no 'rec' term"):
        objective({"kl": kl}, 1.0, model, paper)


def test_logged_loss_is_the_objective_and_elbo_the_models_beta(disc_data: Path, tmp_path: Path) -> None:
    model, cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["model.beta=2", "steps=3", "val_every=0",
                                                          "checkpoint_every=3", "beta_warmup_steps=2",
                                                          "kl_free_bits=0.5"])
    rows = list(iter_metrics(train(disc_data, model, cfg, tmp_path / "run"), "train"))
    assert [r["beta"] for r in rows] == [1.0, 2.0, 2.0]
    floor = 0.5 * model.latent_dim
    for r in rows:
        assert r["loss"] == pytest.approx(r["rec"] + r["beta"] * max(r["kl"], floor), rel=1e-6)
        assert r["elbo"] == pytest.approx(r["rec"] + 2.0 * r["kl"], rel=1e-6)
        assert sum(r["kl_per_dim"]) == pytest.approx(r["kl"], rel=1e-5)


def test_tiny_run_learns_and_writes_run_dir(disc_data: Path, tmp_path: Path) -> None:
    events: list[TrainEvent] = []
    cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["steps=40", "lr=1e-2", "lr_decay_steps=0",
                                                   "val_every=20", "checkpoint_every=20",
                                                   "augment=false"])[1]
    run = train(disc_data, TINY_MODEL, cfg, tmp_path / "run", callback=events.append)
    rows = list(iter_metrics(run, "train"))
    assert len(rows) == 40 and rows[-1]["step"] == 40
    first = sum(r["loss"] for r in rows[:5]) / 5
    last = sum(r["loss"] for r in rows[-10:]) / 10
    assert last < 0.8 * first, (first, last)
    assert len(rows[0]["kl_per_dim"]) == TINY_MODEL.latent_dim
    assert {"rec", "kl", "lr", "it_s", "img_s", "beta"} <= set(rows[0])
    for r in rows:  # the paper's setting: the objective is the ELBO at the model's beta
        assert r["loss"] == r["elbo"] == pytest.approx(r["rec"] + TINY_MODEL.beta * r["kl"], rel=1e-6)
    val = list(iter_metrics(run, "val"))
    assert [v["step"] for v in val] == [20, 40] and {"ged", "diversity"} <= set(val[0])
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["base_channels"] == 4 and config["train"]["steps"] == 40
    assert config["data"]["dir"] == str(disc_data.resolve())
    env = json.loads((run / "env.json").read_text())
    assert {"python", "torch", "lidcseg", "monai"} <= set(env)
    for d in ("last", "best"):
        assert (run / d / "model.safetensors").is_file() and (run / d / "config.json").is_file()
    state = json.loads((run / "last" / "state.json").read_text())
    assert state["step"] == 40 and state["data_order"]["samples_consumed"] == 160
    assert "rank0/rng/torch_cpu" in load_file(str(run / "last" / "state.safetensors"))
    from lidcseg.models.checkpoint import load_checkpoint

    assert load_checkpoint(run / "best").model.config == TINY_MODEL
    kinds = [e.kind for e in events]
    assert kinds[0] == "start" and kinds[-1] == "done" and kinds.count("step") == 40
    # No stray temporary folders from the atomic swaps.
    assert sorted(p.name for p in run.iterdir()) == [
        ".lidcseg-output.json", "best", "config.json", "env.json", "last", "metrics.jsonl"]


_KILL_SCRIPT = """
import os, signal, sys
from lidcseg.config import ModelConfig, TrainConfig, from_dict
from lidcseg.training import train
import json
cfg = json.loads(sys.argv[3])
def cb(e):
    if e.kind == "checkpoint" and e.step == 3 and e.path.name == "last":
        os.kill(os.getpid(), signal.SIGKILL)
train(sys.argv[1], from_dict(ModelConfig, cfg["model"]), from_dict(TrainConfig, cfg["train"]),
      sys.argv[2], callback=cb)
"""


def test_resume_after_kill_equals_uninterrupted_run(disc_data: Path, tmp_path: Path) -> None:
    from lidcseg.config import to_dict

    straight = train(disc_data, TINY_MODEL, TINY_TRAIN, tmp_path / "straight")
    killed = tmp_path / "killed"
    cfg = json.dumps({"model": to_dict(TINY_MODEL), "train": to_dict(TINY_TRAIN)})
    proc = subprocess.run([sys.executable, "-c", _KILL_SCRIPT, str(disc_data), str(killed), cfg],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert json.loads((killed / "last" / "state.json").read_text())["step"] == 3
    with pytest.raises(LidcsegError, match="run directory exists"):
        train(disc_data, TINY_MODEL, TINY_TRAIN, killed)
    train(disc_data, TINY_MODEL, TINY_TRAIN, killed, resume=True)

    a, b = _weights(straight), _weights(killed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    sa = load_file(str(straight / "last" / "state.safetensors"))
    sb = load_file(str(killed / "last" / "state.safetensors"))
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert _train_rows(straight) == _train_rows(killed)  # metrics.jsonl continues seamlessly


def test_resume_refuses_other_config_and_missing_checkpoint(disc_data: Path, tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="nothing to resume"):
        train(disc_data, TINY_MODEL, TINY_TRAIN, tmp_path / "none", resume=True)
    run = train(disc_data, TINY_MODEL, apply_overrides(TINY_MODEL, TINY_TRAIN, ["steps=3"])[1],
                tmp_path / "r")
    with pytest.raises(LidcsegError, match="train.lr"):
        train(disc_data, TINY_MODEL, apply_overrides(TINY_MODEL, TINY_TRAIN, ["lr=0.5"])[1], run,
              resume=True)


def poison_loss_at(monkeypatch: pytest.MonkeyPatch, step: int) -> list[int]:
    """The model built next returns a NaN ``rec`` from its ``step``-th loss call on.

    Returns the one-element list that counts its loss calls.
    """
    from lidcseg.models import registry

    real, calls = registry.create_model, [0]

    def poisoned(cfg: ModelConfig):
        model = real(cfg)
        loss = model.loss

        def nan_loss(x, y, ignore=None):
            out = loss(x, y, ignore)
            calls[0] += 1
            return {**out, "rec": out["rec"] * float("nan")} if calls[0] >= step else out

        model.loss = nan_loss
        return model

    monkeypatch.setattr(registry, "create_model", poisoned)
    return calls


def test_non_finite_loss_stops_and_keeps_checkpoint(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    poison_loss_at(monkeypatch, 5)
    run = tmp_path / "nan"
    with pytest.raises(LidcsegError, match=r"non-finite loss at step 5; last good checkpoint kept at .*last"):
        train(disc_data, TINY_MODEL, TINY_TRAIN, run)
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    assert all(torch.isfinite(v).all() for v in _weights(run).values())


def test_bad_inputs(disc_data: Path, tmp_path: Path) -> None:
    with pytest.raises(LidcsegError, match="data directory not found"):
        train(tmp_path / "nodata", TINY_MODEL, TINY_TRAIN, tmp_path / "r")
    (tmp_path / "partial").mkdir()
    with pytest.raises(LidcsegError, match="missing split file val.h5"):
        (tmp_path / "partial" / "train.h5").symlink_to(disc_data / "train.h5")
        train(tmp_path / "partial", TINY_MODEL, TINY_TRAIN, tmp_path / "r")
    with pytest.raises(LidcsegError, match="unknown model"):
        train(disc_data, ModelConfig(name="nope"), TINY_TRAIN, tmp_path / "r2")
    (tmp_path / "notarun").mkdir()
    (tmp_path / "notarun" / "precious.txt").write_text("x")
    with pytest.raises(LidcsegError, match="not a lidcseg run"):
        train(disc_data, TINY_MODEL, TINY_TRAIN, tmp_path / "notarun", overwrite=True)


# -- DDP on CPU: 2 processes, gloo ---------------------------------------------------------


def _ddp_worker(rank: int, port: int, data: str, out: str, sums: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2",
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    from lidcseg.models import registry

    made = []
    real = registry.create_model
    registry.create_model = lambda cfg: made.append(real(cfg)) or made[-1]
    cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["steps=2", "val_every=0", "checkpoint_every=2"])[1]
    train(data, TINY_MODEL, cfg, out)
    total = sum(float(p.double().sum()) for p in made[0].parameters())
    Path(sums, f"rank{rank}.json").write_text(json.dumps(total))


def test_ddp_two_processes_gloo(disc_data: Path, tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp"
    torch.multiprocessing.spawn(_ddp_worker, args=(port, str(disc_data), str(out), str(tmp_path)),
                                nprocs=2, join=True)
    state = json.loads((out / "last" / "state.json").read_text())
    assert state["world_size"] == 2 and state["step"] == 2 and len(state["rng"]) == 2
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    # Each rank saw different images and noise, yet DDP kept the weights identical.
    s0 = json.loads((tmp_path / "rank0.json").read_text())
    s1 = json.loads((tmp_path / "rank1.json").read_text())
    assert s0 == s1
    assert len(list(iter_metrics(out, "train"))) == 2


# -- CLI -----------------------------------------------------------------------------------

_CLI_TINY = ["--preset", "cpu-quick", "--set", "base_channels=4", "--set", "num_scales=3",
             "--set", "fcomb_channels=8", "--set", "batch_size=4", "--set", "input_size=32",
             "--set", "val_max_crops=4", "--set", "val_samples=4", "--device", "cpu"]


def _cli(*args: str):
    from lidcseg_cli.main import app

    return CliRunner().invoke(app, ["train", *args])


def test_cli_trains_and_resumes(disc_data: Path, tmp_path: Path) -> None:
    run = tmp_path / "cli"
    r = _cli("--data", str(disc_data), "--out", str(run), "--steps", "2", *_CLI_TINY)
    assert r.exit_code == 0, r.output
    assert "trained 2 steps" in r.output
    assert json.loads((run / "config.json").read_text())["preset"] == "cpu-quick"  # provenance
    r = _cli("--data", str(disc_data), "--out", str(run), "--steps", "3", "--resume")
    assert r.exit_code == 0, r.output
    assert json.loads((run / "last" / "state.json").read_text())["step"] == 3
    assert json.loads((run / "config.json").read_text())["preset"] == "cpu-quick"  # kept on resume


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "{tmp}/missing"], "data directory not found"),
        (["--data", "{tmp}/exists"], "missing split file train.h5"),
        (["--data", "{data}", "--model", "nope"], "unknown model 'nope'"),
        (["--data", "{data}", "--set", "nope=1"], "unknown field"),
        (["--data", "{data}", "--preset", "fast"], "unknown preset"),
        (["--data", "{data}", "--out", "{tmp}/exists"], "run directory exists"),
        (["--data", "{data}", "--resume"], "nothing to resume"),
    ],
)
def test_cli_errors_are_one_line(disc_data: Path, tmp_path: Path, args: list[str], message: str) -> None:
    (tmp_path / "exists").mkdir()
    (tmp_path / "exists" / "config.json").write_text(json.dumps({"model": {}, "train": {}}))
    args = [a.format(tmp=tmp_path, data=disc_data) for a in args]
    if "--out" not in args:
        args += ["--out", str(tmp_path / "run")]
    if "--resume" in args:
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "config.json").write_text(
            json.dumps({"model": {}, "train": {}})
        )
    r = _cli(*args, "--steps", "1", *(_CLI_TINY if "--preset" not in args else []))
    assert r.exit_code == 2, r.output
    lines = r.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], r.output


def test_cli_module_imports_no_torch() -> None:
    code = "import sys, lidcseg_cli.train; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_config_file_and_interrupted_swap_recovery(tmp_path: Path) -> None:
    from lidcseg.io.atomic import atomic_dir, recover_dir
    from lidcseg.presets import apply_config_file

    f = tmp_path / "c.json"
    f.write_text(json.dumps({"model": {"latent_dim": 3}, "train": {"lr": 0.01}}))
    m, t = apply_config_file(*preset("paper"), f)
    assert (m.latent_dim, t.lr, t.batch_size) == (3, 0.01, 32)
    f.write_text(json.dumps({"train": {"bogus": 1}}))
    with pytest.raises(LidcsegError, match="bogus"):
        apply_config_file(*preset("paper"), f)

    run = tmp_path / "run"
    with atomic_dir(run / "last") as d:
        (d / "a").write_text("1")
    with atomic_dir(run / "last") as d:
        (d / "a").write_text("2")
    assert (run / "last" / "a").read_text() == "2" and sorted(os.listdir(run)) == ["last"]
    os.rename(run / "last", run / ".last.old")  # killed between the two renames
    recover_dir(run / "last")
    assert (run / "last" / "a").read_text() == "2"


def test_device_augmentation_trains_reproducibly(disc_data: Path, tmp_path: Path) -> None:
    """``augment_on=device``: the loop augments whole crops batched on the device; seeded."""
    from lidcseg.data.device_augment import DeviceAugment
    from lidcseg.training.loop import device_augment_for, training_datasets
    from lidcseg.training.run_state import check_data

    _, cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, ["augment_on=device", "steps=3", "val_every=0"])
    ds = training_datasets(disc_data, *check_data(disc_data), TINY_MODEL, cfg)[0]
    assert isinstance(device_augment_for(ds), DeviceAugment)
    assert {"crop", "crop_mask", "aug_seed"} <= set(ds[0])  # workers only slice and normalise
    loader_cfg = apply_overrides(TINY_MODEL, cfg, ["augment_on=loader"])[1]
    assert device_augment_for(training_datasets(disc_data, *check_data(disc_data), TINY_MODEL,
                                                loader_cfg)[0]) is None
    a = train(disc_data, TINY_MODEL, cfg, tmp_path / "a")
    b = train(disc_data, TINY_MODEL, cfg, tmp_path / "b")
    c = train(disc_data, TINY_MODEL, loader_cfg, tmp_path / "c")
    rows = _train_rows(a)
    assert rows == _train_rows(b) and all(math.isfinite(r["loss"]) for r in rows)
    assert rows != _train_rows(c)  # other tiles than the loader path's draws
    wa, wb = _weights(a), _weights(b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_posterior_noise_warm_up_reaches_the_loss_at_every_step(
    disc_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """a_t = min(1, t / K) (0-based t) is what the Prob. U-Net's loss gets; with K = 0 (the paper)
    the loss is called as before, without a scale; a model without a posterior net ignores it."""
    from lidcseg.models import ProbUNet

    assert noise_scale_at(0, TrainConfig()) is None
    warm = TrainConfig(posterior_noise_warmup_steps=4)
    assert [noise_scale_at(s, warm) for s in range(6)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0]
    seen: list[float | None] = []
    original = ProbUNet.loss

    def spy(self: ProbUNet, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        scale = kwargs.get("noise_scale")
        seen.append(None if scale is None else float(scale))  # type: ignore[arg-type]
        return original(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ProbUNet, "loss", spy)
    common = ["steps=3", "val_every=0", "checkpoint_every=3"]
    model, cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, [*common, "posterior_noise_warmup_steps=2"])
    train(disc_data, model, cfg, tmp_path / "warm")
    assert seen == [0.0, 0.5, 1.0]
    seen.clear()
    model, cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, common)
    train(disc_data, model, cfg, tmp_path / "paper")
    assert seen == [None, None, None]
    model, cfg = apply_overrides(TINY_MODEL, TINY_TRAIN, [*common, "posterior_noise_warmup_steps=2",
                                                         "model.name=dropout-unet"])
    rows = list(iter_metrics(train(disc_data, model, cfg, tmp_path / "dropout"), "train"))
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) for r in rows)
