"""Refitting the prior net after training so that it samples each mode as often as the labels show it
(an option; not in the paper).

Eq. 4 trains the prior net only through KL(Q(z|X,Y) || P(z|X)): the prior is pulled
towards the posterior's clusters, one per mode of the labels. Where the decoder puts
the boundary between two modes is left to wherever training happened to put it,
since posterior samples stay inside their (tight) clusters, so the prior's mass on
each side of a boundary, the frequency at which a mode is sampled, is what no term
fits (README, "Calibration"; issue #13). This stage fits exactly that, with the
U-Net, the posterior net and f_comb frozen.

Each training image comes with candidate labels Y_1..Y_G and their probabilities
pi_g: the 32 modes of a flip-task scene with the modes' probabilities (Section 4.2),
or the graders' masks of a LIDC crop, 1/G each. The decoder splits latent space into
regions R_g = {z : S(X, z) is clearly Y_g} and the rest, R_none, where it draws none
of them (a blend of two modes, or what it makes of latents far from anything it was
trained on). With d the pixels where two labels disagree, S is clearly Y_g when Y_g is
its nearest candidate and, against every other candidate Y_h that differs from Y_g,

    d(S, Y_h) - d(S, Y_g) >= d(Y_g, Y_h) / 2

(on the pixels where Y_g and Y_h differ, S sides with Y_g on at least 3/4 when it takes
one of the two; identical candidates share their draws evenly). The stage minimises
Pearson's chi^2 between the sampled and the labels' frequencies,

    L(theta) = E_X sum_g ( P_theta(R_g | X) - pi_g )^2 / pi_g,

by stochastic gradient descent on the prior net's weights theta. With K prior draws
z_k ~ P_theta(z|X), P_theta(R_g) is estimated by the share a_kg of draws in R_g, and
grad P_theta(R_g) = E[1_{R_g}(z) grad log P_theta(z|X)] by the score function
(no gradient through the decoder):

    grad L ~= (2/K) sum_k W_k grad log P_theta(z_k|X),   W_k = sum_g a_kg (P^_g - pi_g) / pi_g.

Dividing by pi_g weighs each mode's error relative to its frequency. Without it (a plain
sum of squares) the rare modes hardly counted: the 16 flip-task modes that flip road
have pi_g <= 0.11, and seed 1's road stayed sampled at 0.12 against 0.235; with it 0.17,
and the test mode MAE of seeds 0 and 1 went from 0.0112 / 0.0101 to 0.0072 / 0.0077
(issue #13). With equal pi_g (a LIDC crop's graders) the two differ by a constant factor,
which Adam's steps do not see.

Regions sampled too often lose mass and regions sampled too rarely gain it; at the
optimum each mode is drawn at its frequency as closely as an axis-aligned Gaussian
allows. A draw of none of the candidates counts for no mode (W_k = 0). Counted for
its nearest mode instead, mass spread into latents where the decoder draws garbage
passed for a rare mode, and the prior's sigma grew fourfold while the validation GED
went from 0.06-0.07 to 0.3-0.5; a target of 0 for R_none instead pulled the prior into the
cores of the modes at the expense of their frequencies (issue #13). The K draws are
randomised quasi-Monte Carlo (scrambled Sobol points through the normal quantile),
spread evenly over the prior.

A mode the decoder never learned to draw (a flip learned late) cannot be placed. The
stage validates every ``prior_refit_val_every`` steps and keeps the prior that validates
best, the refit's start included, so the refit never delivers a prior that validates worse
than the one it started from. On the flip task "best" is the lowest validation mode MAE,
the error the stage fits (the validation GED of 32 scenes x 16 samples is noisy: on seed 2
it kept step 100 of 300, test mode r 0.898, where the step of the lowest validation mode MAE
gave 0.936; issue #13); on LIDC, whose crops have no modes, the lowest validation GED.

The stage (:func:`run_prior_refit`) refits the checkpoint the run delivers
(``best/``, else ``last/``) on ``prior_refit_steps`` batches of training images and
writes ``refit/``, which every command reading a run then uses
(:data:`lidcseg.inference.RUN_CHECKPOINTS`).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lidcseg.config import ModelConfig, TrainConfig
from lidcseg.errors import LidcsegError
from lidcseg.io.atomic import atomic_dir

#: Added to the run's seed for the refit's image order and quasi-random draws.
REFIT_SEED_OFFSET = 7_919
#: Logits held at once while labelling the K draws (elements; 2**25 floats = 128 MiB).
SCORE_BUDGET = 2**25
#: What the stage minimises (``refit/config.json`` records it; a refit/ of another objective,
#: the plain sum of squares before it, is redone by ``lidcseg train --resume``).
REFIT_OBJECTIVE = "chi2"
#: The checkpoint folder the stage writes.
REFIT_DIR = "refit"
#: The checkpoints it refits, the first that exists: the one the run delivers without it.
SOURCES: tuple[str, ...] = ("best", "last")

#: One refit batch: images (B, C_in, H, W), candidate labels (B, G, H, W) int64, their
#: probabilities (B, G) summing to 1, ignored pixels (B, H, W) bool or None.
RefitBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, "torch.Tensor | None"]


def has_prior_net(model_cfg: ModelConfig) -> bool:
    """Whether the model has a prior net to refit: a Prob. U-Net with a learned prior. Other
    models (the baselines, the fixed-prior ablation) skip the stage."""
    return model_cfg.name == "probunet" and model_cfg.prior == "learned"


def quasi_normal(n: int, dim: int, seed: int) -> torch.Tensor:
    """``n`` standard-normal points in ``dim`` dimensions by randomised QMC: (n, dim).

    Scrambled Sobol points (balanced for ``n`` a power of 2) mapped through the
    normal quantile Phi^-1; each point is marginally N(0, I), and together they
    cover the distribution more evenly than i.i.d. draws.
    """
    u = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed).draw(n, dtype=torch.float64)
    eps = torch.special.ndtri(u.clamp(1e-9, 1 - 1e-9))
    return eps.to(torch.float32)


def hypothesis_distances(
    labels: torch.Tensor, candidates: torch.Tensor, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """Pixels where each hypothesis disagrees with each candidate label.

    Args:
        labels: (B, K, H, W) int64 hypotheses (the decoder's argmax).
        candidates: (B, G, H, W) int64 candidate labels.
        ignore: (B, H, W) bool, pixels left out, or None.

    Returns:
        (B, K, G) float counts.
    """
    differ = labels[:, :, None] != candidates[:, None]  # (B, K, G, H, W)
    if ignore is not None:
        differ &= ~ignore[:, None, None]
    return differ.flatten(3).sum(3).to(torch.float32)


def candidate_shares(dist: torch.Tensor, separation: torch.Tensor) -> torch.Tensor:
    """a_kg: 1 when hypothesis k is clearly candidate g (module docstring), shared evenly among
    identical candidates; a row of zeros when it is none of them.

    Args:
        dist: (B, K, G) hypothesis-candidate distances (:func:`hypothesis_distances`).
        separation: (B, G, G) candidate-candidate distances.

    Returns:
        (B, K, G); each row sums to 1 or 0 (``1 - sum_g a_kg`` is a_k,none).
    """
    nearest = dist.argmin(2, keepdim=True)  # (B, K, 1)
    d_near = dist.gather(2, nearest)  # (B, K, 1)
    sep = separation.gather(1, nearest.expand(-1, -1, separation.shape[2]))  # (B, K, G): d(Y_near, Y_h)
    clear = ((dist - d_near) >= sep / 2).all(2, keepdim=True)  # (B, K, 1)
    ties = (dist == d_near).to(torch.float32)  # the nearest and the candidates identical to it
    return ties / ties.sum(2, keepdim=True) * clear


def mass_error_weights(shares: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W_k = sum_g a_kg (P^_g - pi_g) / pi_g of the estimator above, with P^_g = mean_k a_kg
    (draws of none of the candidates count in the mean, for no candidate, and get W_k = 0).

    Args:
        shares: (B, K, G) from :func:`candidate_shares`.
        probs: (B, G) the candidates' probabilities pi_g (> 0).

    Returns:
        ``(W (B, K), P^ (B, G))``; ``1 - P^.sum(1)`` is the share of none.
    """
    mass = shares.mean(1)  # (B, G)
    return (shares * ((mass - probs) / probs)[:, None]).sum(2), mass


def prior_refit_loss(
    mu: torch.Tensor, logsigma: torch.Tensor, z: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The surrogate whose gradient is the estimate of grad L / 2 (module docstring):
    mean_b (1/K) sum_k W_bk log N(z_bk; mu_b, sigma_b).

    Args:
        mu, logsigma: (B, N) the prior net's output (with gradient).
        z: (B, K, N) the draws (no gradient).
        weights: (B, K) W from :func:`mass_error_weights` (no gradient).
    """
    from lidcseg.losses import diag_gaussian_log_prob

    log_prob = diag_gaussian_log_prob(z, mu[:, None], logsigma[:, None])  # (B, K)
    return (weights * log_prob).mean(1).mean()


def draw_and_measure(
    model: Any, x: torch.Tensor, candidates: torch.Tensor, ignore: torch.Tensor | None, eps: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The draws z = mu + sigma * eps of the prior and their distances to the candidates, without gradient.

    Args:
        model: a :class:`~lidcseg.models.prob_unet.ProbUNet`.
        x: (B, C_in, H, W) images; candidates: (B, G, H, W); ignore: (B, H, W) bool or None.
        eps: (K, N) standard-normal points, shared by the images.

    Returns:
        ``(z (B, K, N), distances (B, K, G))``; the logits are made ``SCORE_BUDGET`` elements
        at a time, so memory does not grow with K.
    """
    b, (k, _) = x.shape[0], eps.shape
    per_draw = b * model.config.num_classes * x.shape[-2] * x.shape[-1]
    step = max(1, SCORE_BUDGET // per_draw)
    zs, dists = [], []
    with torch.no_grad():
        for j in range(0, k, step):
            e = eps[j : j + step].to(x.device)[None].expand(b, -1, -1)
            hyp = model.sample_with_latents(x, e.shape[1], eps=e)
            zs.append(hyp.z)
            dists.append(hypothesis_distances(hyp.logits.argmax(2), candidates, ignore))
    return torch.cat(zs, 1), torch.cat(dists, 1)


def refit_prior(
    model: Any,
    batches: Iterable[RefitBatch],
    *,
    samples: int,
    lr: float,
    seed: int,
    validate: Callable[[Any], Mapping[str, float]] | None = None,
    val_every: int = 0,
    criterion: str = "ged",
    log_every: int = 20,
    callback: Callable[[int, Mapping[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Fit ``model.prior`` to the candidates' frequencies (module docstring); everything else frozen.

    Adam at ``lr``, one step per batch; the rest of the model keeps its weights (no
    gradient, eval mode), so the decoder's modes stay where training put them.

    Args:
        model: a :class:`~lidcseg.models.prob_unet.ProbUNet` with a learned prior.
        batches: :data:`RefitBatch` es on the model's device.
        samples: K, prior draws per image (a power of 2 balances the Sobol points).
        lr: Adam's learning rate.
        seed: seeds the scrambling of the quasi-random draws (one scrambling per step).
        validate: the validation of a model (numbers, ``criterion`` among them); with
            ``val_every`` > 0 it runs before the first step, every ``val_every`` steps and
            after the last, and the prior of the lowest ``criterion`` is the one kept.
        val_every: steps between validations (0: none; the last prior is kept).
        criterion: the validation number that selects the prior (lower is better).
        log_every: steps averaged into one row of the trace.
        callback: ``callback(step, numbers)`` after each step (``loss``, ``mass_error``).

    Returns:
        ``trace`` (rows of ``step``, ``loss``, ``mass_error``: half the L1 distance between
        sampled and target frequencies of the batch's candidates, a draw of none counted as a
        miss, ``sigma``: the prior's mean sigma), ``val`` (rows of ``step`` and the validation
        numbers), ``kept_step`` (the step whose prior was kept; 0: the one it started from) and
        ``kept_val`` (its validation numbers; None without validation).
    """
    prior = model.prior
    params = list(prior.parameters())
    if not params:
        raise LidcsegError("the model has no learned prior net to refit")
    model.eval()  # no dropout or batch statistics anywhere; the prior net too is used in eval mode
    frozen = [p for p in model.parameters() if all(p is not q for q in params)]
    was = [p.requires_grad for p in frozen]
    for p in frozen:
        p.requires_grad_(False)
    optimizer = torch.optim.Adam(params, lr=lr)
    trace: list[dict[str, float]] = []
    vals: list[dict[str, float]] = []
    best: tuple[dict[str, float], int, dict[str, torch.Tensor]] | None = None

    def check(step: int) -> None:
        nonlocal best
        numbers = dict(validate(model))  # type: ignore[misc]
        vals.append({"step": step, **numbers})
        if best is None or numbers[criterion] < best[0][criterion]:
            best = (numbers, step, copy.deepcopy(prior.state_dict()))

    sums = {"loss": 0.0, "mass_error": 0.0, "sigma": 0.0}
    n_in_row = step = 0
    use_val = validate is not None and val_every > 0
    try:
        if use_val:
            check(0)
        for step, (x, candidates, probs, ignore) in enumerate(batches, start=1):
            eps = quasi_normal(samples, model.config.latent_dim, seed=seed * 1_000_003 + step)
            z, dist = draw_and_measure(model, x, candidates, ignore, eps)
            separation = hypothesis_distances(candidates, candidates, ignore)  # (B, G, G)
            weights, mass = mass_error_weights(candidate_shares(dist, separation), probs)
            mu, logsigma = prior(x)
            loss = prior_refit_loss(mu, logsigma, z, weights)
            if not math.isfinite(float(loss.detach())):
                raise LidcsegError(f"non-finite loss at step {step} of the prior refit (the run's "
                                   "checkpoints are kept; no refit/ was written)")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            mass_error = (mass - probs).abs().sum(1) + (1.0 - mass.sum(1))  # L1; a draw of none is a miss
            numbers = {"loss": float(loss.detach()), "mass_error": float(0.5 * mass_error.mean()),
                       "sigma": float(logsigma.detach().exp().mean())}
            for key, v in numbers.items():
                sums[key] += v
            n_in_row += 1
            if step % log_every == 0:
                trace.append({"step": step, **{k: v / n_in_row for k, v in sums.items()}})
                sums, n_in_row = dict.fromkeys(sums, 0.0), 0
            if use_val and step % val_every == 0:
                check(step)
            if callback is not None:
                callback(step, numbers)
        if n_in_row:
            trace.append({"step": step, **{k: v / n_in_row for k, v in sums.items()}})
        if use_val and (not vals or vals[-1]["step"] != step):
            check(step)
    finally:
        for p, r in zip(frozen, was, strict=True):
            p.requires_grad_(r)
    if best is None:
        return {"trace": trace, "val": vals, "kept_step": step, "kept_val": None}
    prior.load_state_dict(best[2])
    return {"trace": trace, "val": vals, "kept_step": best[1], "kept_val": best[0]}


# -- the stage of ``lidcseg train`` ---------------------------------------------------------


def refit_criterion(scenes: bool) -> str:
    """The validation number that selects the refit's prior (module docstring): the mode MAE on
    flip-task scenes, the GED on LIDC crops."""
    return "mode_mae" if scenes else "ged"


def refit_settings(cfg: TrainConfig, criterion: str) -> dict[str, Any]:
    """The settings that make a ``refit/`` checkpoint (``refit/config.json`` records them)."""
    return {"objective": REFIT_OBJECTIVE, "criterion": criterion, "steps": cfg.prior_refit_steps,
            "samples": cfg.prior_refit_samples, "batch_size": cfg.prior_refit_batch_size,
            "lr": cfg.prior_refit_lr, "val_every": cfg.prior_refit_val_every, "seed": cfg.seed}


def refit_is_current(out_dir: Path, source_step: int, cfg: TrainConfig, criterion: str) -> bool:
    """Whether ``out_dir/refit`` is the refit of the source checkpoint at ``source_step`` with
    ``cfg``'s settings and ``criterion`` (a resumed run then has nothing left to do)."""
    from lidcseg.io.jsonfile import read_json_object

    meta = (read_json_object(out_dir / REFIT_DIR / "config.json") or {}).get("meta")
    info = meta.get("prior_refit") if isinstance(meta, dict) else None
    if not isinstance(info, dict):
        return False
    return info.get("source_step") == source_step and info.get("settings") == refit_settings(cfg, criterion)


def candidate_batches(
    dataset: Any, scenes: bool, cfg: TrainConfig, device: torch.device
) -> Iterator[RefitBatch]:
    """The refit's batches: ``prior_refit_batch_size`` training images a step, for
    ``prior_refit_steps`` steps, in seeded random order (epoch after epoch), without augmentation.

    Args:
        dataset: the training split as an evaluation dataset: flip-task scenes
            (:class:`~lidcseg.data.scenes.SceneEvalDataset`: their 32 modes, with the modes'
            probabilities) or LIDC crops (:class:`~lidcseg.data.dataset.CropEvalDataset`: the
            centre tile's grader masks, 1/G each).
        scenes: which of the two.
        cfg: ``prior_refit_*`` and ``seed``.
        device: where the batches go.
    """
    from lidcseg.flips import mode_labels, mode_probabilities

    n, b = len(dataset), cfg.prior_refit_batch_size
    seed = cfg.seed + REFIT_SEED_OFFSET
    order: np.ndarray = np.zeros(0, dtype=np.int64)
    epoch = 0
    modes = torch.as_tensor(mode_probabilities(), dtype=torch.float32)
    for _ in range(cfg.prior_refit_steps):
        while order.shape[0] < b:
            order = np.concatenate([order, np.random.default_rng([seed, epoch]).permutation(n)])
            epoch += 1
        items = [dataset[int(i)] for i in order[:b]]
        order = order[b:]
        x = torch.stack([it["image"] for it in items])
        if scenes:
            labels = torch.stack([it["label"] for it in items])
            ignore: torch.Tensor | None = torch.stack([it["ignore"] for it in items]).to(device)
            candidates = mode_labels(labels)  # (B, 32, H, W)
            probs = modes.expand(len(items), -1)
        else:
            candidates = torch.stack([it["masks"] for it in items]).long()  # (B, G, T, T)
            probs = torch.full(candidates.shape[:2], 1.0 / candidates.shape[1])
            ignore = None
        yield x.to(device), candidates.to(device), probs.to(device), ignore


def run_prior_refit(
    model_cfg: ModelConfig,
    cfg: TrainConfig,
    out_dir: Path,
    device: torch.device,
    *,
    batches: Iterable[RefitBatch],
    validate: Callable[[nn.Module], dict[str, float]],
    criterion: str = "ged",
    callback: Callable[[str, int, Mapping[str, float], Path | None], None] | None = None,
) -> Path | None:
    """Refit the prior of the run's delivered checkpoint and write ``out_dir/refit``.

    Nothing happens when ``cfg.prior_refit_steps`` is 0, the model has no prior net
    (:func:`has_prior_net`) or ``refit/`` is already the refit of the current source with
    these settings (:func:`refit_is_current`).

    Args:
        model_cfg, cfg, out_dir: as :func:`lidcseg.training.train`.
        device: where the refit runs.
        batches: the refit's batches (:func:`candidate_batches`; read only when the refit runs).
        validate: the run's validation of a model.
        criterion: its number that selects the prior kept (:func:`refit_criterion`).
        callback: ``callback(kind, step, numbers, path)``: ``refit`` after each step,
            ``checkpoint`` once ``refit/`` is written (numbers: its validation and
            ``kept_step``).

    Returns:
        The ``refit/`` folder, or None when there was nothing to do.
    """
    from lidcseg.models.checkpoint import first_checkpoint, load_checkpoint
    from lidcseg.training.run_state import save_model

    if cfg.prior_refit_steps == 0 or not has_prior_net(model_cfg):
        return None
    source = first_checkpoint(out_dir, SOURCES)
    if source is None:
        raise LidcsegError("no best/ or last/ checkpoint to refit the prior of", out_dir)
    ckpt = load_checkpoint(source, device="cpu", expected_name=model_cfg.name)
    source_step = int(ckpt.meta.get("step", -1))
    if refit_is_current(out_dir, source_step, cfg, criterion):
        return None
    t0 = time.perf_counter()
    model = ckpt.model.to(device)

    def on_step(step: int, numbers: Mapping[str, float]) -> None:
        if callback is not None:
            callback("refit", step, numbers, None)

    result = refit_prior(model, batches, samples=cfg.prior_refit_samples, lr=cfg.prior_refit_lr,
                         seed=cfg.seed + REFIT_SEED_OFFSET, validate=validate,
                         val_every=cfg.prior_refit_val_every, criterion=criterion,
                         log_every=max(1, cfg.log_every), callback=on_step)
    val = result["kept_val"] or validate(model)
    folder = out_dir / REFIT_DIR
    with atomic_dir(folder) as d:
        save_model(d, model, source_step, val, cfg, extra={"prior_refit": {
            "source": source.name, "source_step": source_step, "settings": refit_settings(cfg, criterion),
            "kept_step": result["kept_step"], "trace": result["trace"], "val": result["val"],
            "time_s": round(time.perf_counter() - t0, 3)}})
    if callback is not None:
        callback("checkpoint", cfg.prior_refit_steps, {**val, "kept_step": float(result["kept_step"])}, folder)
    return folder
