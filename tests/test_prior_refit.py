"""The prior refit by marginal likelihood after training (lidcseg.training.prior_refit, issue #13)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.models.prob_unet import ProbUNet
from lidcseg.training.prior_refit import (
    candidate_shares,
    hypothesis_distances,
    mass_error_weights,
    prior_refit_loss,
    quasi_normal,
    refit_is_current,
    refit_prior,
)


def test_quasi_normal_is_stratified_in_every_dimension() -> None:
    """Scrambled Sobol points of a power-of-2 count put exactly one point in each of the n
    equal-probability strata of every coordinate (i.i.d. draws almost never do)."""
    n, dim = 256, 6
    eps = quasi_normal(n, dim, seed=3)
    assert eps.shape == (n, dim) and eps.dtype == torch.float32
    strata = torch.floor(torch.special.ndtr(eps.double()) * n).long()
    for d in range(dim):
        assert sorted(strata[:, d].tolist()) == list(range(n))
    assert not torch.equal(eps, quasi_normal(n, dim, seed=4))  # the seed scrambles


def test_distances_by_hand() -> None:
    """Disagreeing pixels per (hypothesis, candidate), ignored pixels left out."""
    hyp = torch.tensor([[[[0, 1, 1]], [[1, 1, 1]]]])  # (B=1, K=2, H=1, W=3)
    cands = torch.tensor([[[[0, 1, 1]], [[0, 0, 0]], [[1, 1, 0]]]])  # (B=1, G=3, 1, 3)
    assert hypothesis_distances(hyp, cands).tolist() == [[[0.0, 2.0, 2.0], [1.0, 3.0, 1.0]]]
    ignore = torch.tensor([[[True, False, False]]])
    assert hypothesis_distances(hyp, cands, ignore).tolist() == [[[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]]]


def test_a_draw_counts_for_a_candidate_only_when_clearly_it() -> None:
    """Candidates A = 0000, B = 1111 (4 apart) and A' = A. A draw counts for its nearest candidate if it
    is nearer to it than to every other distinct one by half their separation (sides with it on >= 3/4
    of the pixels where they differ); identical candidates share it; a blend is none (a zero row)."""
    cands = torch.tensor([[[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0]]])[:, :, None]  # (1, 3, 1, 4)
    hyp = torch.tensor([[[0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [1, 1, 1, 1]]])[:, :, None]  # (1, 4, 1, 4)
    shares = candidate_shares(hypothesis_distances(hyp, cands), hypothesis_distances(cands, cands))
    assert shares.tolist() == [[[0.5, 0.0, 0.5],  # exactly A: shared with its copy A'
                                [0.5, 0.0, 0.5],  # 3 of 4 like A: margin 2 = 4 / 2, still A
                                [0.0, 0.0, 0.0],  # half and half: none
                                [0.0, 1.0, 0.0]]]


def test_mass_error_weights_by_hand() -> None:
    """P^_g = share of all draws that are candidate g; W_k = sum_g a_kg (P^_g - pi_g) / pi_g: draws of
    an over-sampled candidate get positive weight (their density is pushed down), of an under-sampled
    one negative, of none zero (they count for no candidate); errors count relative to pi_g."""
    shares = torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]])  # A, A, none, B
    weights, mass = mass_error_weights(shares, torch.tensor([[0.25, 0.75]]))
    assert mass.tolist() == [[0.5, 0.25]]
    assert weights[0].tolist() == pytest.approx([1.0, 1.0, 0.0, -2 / 3])  # (0.5-0.25)/0.25, (0.25-0.75)/0.75


def test_estimator_follows_the_exact_gradient_of_the_mass_error() -> None:
    """One latent dimension cut at 0.5 into R_0 = {z < 0.5} and R_1: P(R_1) = 1 - Phi((0.5 - mu) / sigma).
    The surrogate's gradient (times 2) with many quasi-random draws matches the exact gradient of
    chi^2 = (P_0 - pi_0)^2 / pi_0 + (P_1 - pi_1)^2 / pi_1 in mu and log sigma."""
    mu0, ls0, pi = 0.3, math.log(1.5), torch.tensor([[0.2, 0.8]])

    def exact(mu: torch.Tensor, ls: torch.Tensor) -> torch.Tensor:
        p0 = torch.special.ndtr((0.5 - mu) / ls.exp())
        return (p0 - pi[0, 0]) ** 2 / pi[0, 0] + (1 - p0 - pi[0, 1]) ** 2 / pi[0, 1]

    mu, ls = torch.tensor(mu0, dtype=torch.float64, requires_grad=True), torch.tensor(ls0, dtype=torch.float64,
                                                                                         requires_grad=True)
    exact(mu, ls).backward()
    k = 2**14
    z = (mu0 + math.exp(ls0) * quasi_normal(k, 1, seed=0).double())[None]  # (1, K, 1); no draw is "none"
    shares = torch.stack([(z[..., 0] < 0.5), (z[..., 0] >= 0.5)], dim=2).double()
    weights, _ = mass_error_weights(shares, pi.double())
    m, s = torch.tensor([[mu0]], dtype=torch.float64, requires_grad=True), torch.tensor([[ls0]], dtype=torch.float64,
                                                                                          requires_grad=True)
    (2 * prior_refit_loss(m, s, z, weights)).backward()
    assert m.grad.item() == pytest.approx(mu.grad.item(), rel=0.03)
    assert s.grad.item() == pytest.approx(ls.grad.item(), rel=0.03)
    assert abs(mu.grad.item()) > 0.1 and abs(ls.grad.item()) > 0.05  # not a vanishing case


class _PlantedDecoder(ProbUNet):
    """A Prob. U-Net with a planted decoder of three modes along z_0 (steep boundaries at -1 and 1):
    every pixel is class 0 for z_0 < -1, class 1 between, class 2 for z_0 > 1."""

    def decode(self, x: torch.Tensor, z: torch.Tensor, chunk_size: int = 1) -> torch.Tensor:
        b, n = z.shape[:2]
        z0 = z[..., 0][:, :, None, None, None].expand(b, n, 1, *x.shape[-2:])
        return torch.cat([40.0 * (-z0 - 1.0), torch.zeros_like(z0), 40.0 * (z0 - 1.0)], dim=2)  # (B, n, 3, H, W)


def _tiny_cfg(num_classes: int = 3) -> ModelConfig:
    return ModelConfig(in_channels=1, num_classes=num_classes, base_channels=4, num_scales=2, convs_per_block=1,
                       latent_dim=2, fcomb_channels=4)


@pytest.mark.parametrize("seed", [0, 1])
def test_refit_moves_the_prior_mass_to_the_label_frequencies(seed: int) -> None:
    """The planted decoder's modes have frequencies 0.2 / 0.5 / 0.3 in the labels. The prior starts
    near N(0, 1) (masses 0.16 / 0.68 / 0.16); the refit must move its mass on the three regions of
    z_0 to the frequencies (the unique mu = 0.23, sigma = 1.46), changing nothing but the prior net."""
    torch.manual_seed(seed)
    model = _PlantedDecoder(_tiny_cfg())
    x = torch.zeros(16, 1, 8, 8)
    frozen = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith("prior.")}

    def masses() -> torch.Tensor:
        with torch.no_grad():
            mu, logsigma = model.prior(x)
        lo, hi = (torch.special.ndtr((t - mu[:, 0]) / logsigma[:, 0].exp()).mean() for t in (-1.0, 1.0))
        return torch.stack([lo, hi - lo, 1 - hi])

    freq = torch.tensor([0.2, 0.5, 0.3])
    assert (masses() - freq).abs().max() > 0.1
    candidates = torch.arange(3)[None, :, None, None].expand(16, 3, 8, 8)  # the three modes, every image
    batches = [(x, candidates, freq.expand(16, 3), None)] * 200

    result = refit_prior(model, batches, samples=64, lr=1e-2, seed=seed, log_every=50)
    assert [r["step"] for r in result["trace"]] == [50, 100, 150, 200] and result["kept_step"] == 200
    assert (masses() - freq).abs().max() < 0.06
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in frozen.items())
    assert all(p.requires_grad for p in model.parameters())  # given back as they were


def test_refit_needs_a_learned_prior() -> None:
    model = ProbUNet(ModelConfig(**{**_tiny_cfg().__dict__, "prior": "fixed"}))
    with pytest.raises(LidcsegError, match="no learned prior"):
        refit_prior(model, [], samples=4, lr=1e-3, seed=0)


def _scenes(tmp_path: Path) -> Path:
    from lidcseg.data.scenes import make_scenes

    data = tmp_path / "scenes"
    make_scenes(data, n_train=4, n_val=2, n_test=2, height=32, width=64, seed=0)
    return data


def _quick(**changes: object) -> tuple[ModelConfig, TrainConfig]:
    from lidcseg.presets import PRESETS, override

    model_cfg, train_cfg = PRESETS["scenes-quick"]
    return model_cfg, override(train_cfg, {"steps": 2, "batch_size": 2, "val_every": 2, "val_samples": 2,
                                           "val_max_crops": 2, "checkpoint_every": 2, "log_every": 1,
                                           "prior_refit_samples": 8, "prior_refit_val_every": 2, **changes})


def test_train_writes_refit_that_runs_are_read_from(tmp_path: Path) -> None:
    """``prior_refit_steps`` > 0: after training, ``refit/`` holds ``best/`` with only its prior net
    changed, records its source and trace, and is the checkpoint a run folder resolves to. Resuming
    the finished run refits again only when the refit's settings change."""
    from lidcseg.inference import resolve_checkpoint
    from lidcseg.models.checkpoint import load_checkpoint
    from lidcseg.training import train

    data = _scenes(tmp_path)
    model_cfg, train_cfg = _quick(prior_refit_steps=3)
    run = train(data, model_cfg, train_cfg, tmp_path / "run")
    assert resolve_checkpoint(run)[0] == run / "refit"
    refit, best = load_checkpoint(run / "refit"), load_checkpoint(run / "best")
    info = refit.meta["prior_refit"]
    assert info["source"] == "best" and info["source_step"] == best.meta["step"] == 2
    assert [r["step"] for r in info["trace"]] == [1, 2, 3] and "ged" in refit.meta["val"]
    assert [v["step"] for v in info["val"]] == [0, 2, 3]  # val_every 2: the start, step 2, the end
    kept = min(info["val"], key=lambda v: v["mode_mae"])  # the flip task keeps the lowest mode MAE
    assert info["settings"]["criterion"] == "mode_mae"
    assert info["kept_step"] == kept["step"] and refit.meta["val"]["mode_mae"] == kept["mode_mae"]
    rw, bw = refit.model.state_dict(), best.model.state_dict()
    assert all(torch.equal(rw[k], bw[k]) for k in bw if not k.startswith("prior."))
    assert any(not torch.equal(rw[k], bw[k]) for k in bw if k.startswith("prior.")) == (info["kept_step"] > 0)

    before = (run / "refit" / "config.json").read_bytes()
    train(data, model_cfg, train_cfg, run, resume=True)  # nothing left to do
    assert (run / "refit" / "config.json").read_bytes() == before
    _, other = _quick(prior_refit_steps=3, prior_refit_lr=1e-3)
    train(data, model_cfg, other, run, resume=True)
    meta = json.loads((run / "refit" / "config.json").read_text())["meta"]
    assert meta["prior_refit"]["settings"]["lr"] == 1e-3
    assert meta["prior_refit"]["settings"]["objective"] == "chi2"
    assert refit_is_current(run, meta["prior_refit"]["source_step"], other, "mode_mae")
    old = json.loads((run / "refit" / "config.json").read_text())  # a refit of the plain sum of squares
    del old["meta"]["prior_refit"]["settings"]["objective"]
    (run / "refit" / "config.json").write_text(json.dumps(old))
    assert not refit_is_current(run, meta["prior_refit"]["source_step"], other, "mode_mae")  # redone
    _, longer = _quick(steps=4, prior_refit_steps=0)  # training further: the old refit is stale
    train(data, model_cfg, longer, run, resume=True)
    assert not (run / "refit").exists() and resolve_checkpoint(run)[0] == run / "best"


def test_models_without_a_prior_net_skip_the_refit(tmp_path: Path) -> None:
    """A preset's refit is the Prob. U-Net's: a baseline trained with it writes no ``refit/``."""
    from lidcseg.models.registry import model_config
    from lidcseg.training import train

    data = _scenes(tmp_path)
    _, train_cfg = _quick(prior_refit_steps=1)
    run = train(data, model_config("m-heads", _quick()[0], task="flip-scenes"), train_cfg, tmp_path / "run")
    assert (run / "best").is_dir() and not (run / "refit").exists()


def test_lidc_runs_refit_on_the_graders_masks(disc_data: Path, tmp_path: Path) -> None:
    """On LIDC crops the candidates are a crop's grader masks (1/G each): the stage runs, validates with
    the LIDC GED and ``lidcseg train``'s run folder resolves to ``refit/``."""
    from lidcseg.inference import resolve_checkpoint
    from lidcseg.models.checkpoint import load_checkpoint
    from lidcseg.training import train

    model = ModelConfig(base_channels=4, num_scales=3, fcomb_channels=8, latent_dim=2)
    cfg = TrainConfig(steps=2, batch_size=2, input_size=32, num_workers=0, log_every=1, val_every=0,
                      val_samples=2, val_max_crops=2, checkpoint_every=2, device="cpu",
                      prior_refit_steps=2, prior_refit_samples=4, prior_refit_val_every=1)
    run = train(disc_data, model, cfg, tmp_path / "run")
    assert resolve_checkpoint(run)[0] == run / "refit"
    info = load_checkpoint(run / "refit").meta["prior_refit"]
    assert [v["step"] for v in info["val"]] == [0, 1, 2] and all("ged" in v for v in info["val"])
    kept = min(info["val"], key=lambda v: v["ged"])  # no modes on LIDC: the lowest GED is kept
    assert info["settings"]["criterion"] == "ged" and info["kept_step"] == kept["step"]
    assert all(r["mass_error"] >= 0 for r in info["trace"])
