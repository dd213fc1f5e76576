"""The ELBO's terms (Eq. 4) as pure functions: KL in closed form, reductions, ignore masks, empty masks.

The trainer weights them with beta: tests/test_training.py checks the objective."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lidcseg.losses import elbo_terms, kl_diag_gaussians, pixel_cross_entropy


def gaussians(b: int = 3, n: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(b, n, generator=g) * s for s in (1.0, 0.5, 1.0, 0.5))


def test_kl_closed_form_matches_monte_carlo() -> None:
    mu_q, ls_q, mu_p, ls_p = (t.double() for t in gaussians(b=2, n=3))
    q = torch.distributions.Normal(mu_q, ls_q.exp())
    p = torch.distributions.Normal(mu_p, ls_p.exp())
    z = q.sample((200_000,))  # (S, B, N)
    log_ratio = q.log_prob(z) - p.log_prob(z)
    mc, stderr = log_ratio.mean(0), log_ratio.std(0) / 200_000**0.5
    closed = kl_diag_gaussians(mu_q, ls_q, mu_p, ls_p)
    assert closed.shape == (2, 3)
    assert ((closed - mc).abs() < 5 * stderr + 1e-3).all()
    torch.testing.assert_close(closed, torch.distributions.kl_divergence(q, p))


def test_kl_is_zero_for_equal_gaussians_and_positive_otherwise() -> None:
    mu, ls, mu2, ls2 = gaussians()
    assert kl_diag_gaussians(mu, ls, mu, ls).abs().max() < 1e-6
    assert (kl_diag_gaussians(mu, ls, mu2, ls2) > 0).all()


def test_kl_stays_finite_at_the_logsigma_bounds() -> None:
    mu = torch.zeros(1, 2)
    kl = kl_diag_gaussians(mu + 100.0, torch.full((1, 2), 5.0), mu, torch.full((1, 2), -10.0))
    assert torch.isfinite(kl).all()


def random_case(b: int = 2, c: int = 2, h: int = 6, w: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, c, h, w, generator=g, requires_grad=True)
    target = torch.randint(0, c, (b, h, w), generator=g)
    return logits, target


def test_cross_entropy_is_summed_over_pixels_and_averaged_over_batch() -> None:
    logits, target = random_case()
    per_pixel = F.cross_entropy(logits, target, reduction="none")
    torch.testing.assert_close(pixel_cross_entropy(logits, target), per_pixel.sum((1, 2)))
    out = elbo_terms(logits, target, *gaussians(b=2))
    torch.testing.assert_close(out["rec"], per_pixel.sum() / 2)


def test_loss_does_not_scale_with_batch_size() -> None:
    logits, target = random_case(b=1)
    stats = gaussians(b=1)
    one = elbo_terms(logits, target, *stats)
    k = 5
    rep = elbo_terms(
        logits.repeat(k, 1, 1, 1),
        target.repeat(k, 1, 1),
        *(t.repeat(k, 1) for t in stats),
    )
    assert set(one) == {"rec", "kl", "kl_per_dim"}  # the terms only: no beta here
    for key in ("rec", "kl", "kl_per_dim"):
        torch.testing.assert_close(one[key], rep[key])


def test_terms_are_rec_and_kl_with_per_dim_kl() -> None:
    logits, target = random_case()
    stats = gaussians(b=2, n=4)
    out = elbo_terms(logits, target, *stats)
    torch.testing.assert_close(out["rec"], pixel_cross_entropy(logits, target).mean())
    torch.testing.assert_close(out["kl"], kl_diag_gaussians(*stats).sum(1).mean())
    assert out["kl_per_dim"].shape == (4,) and not out["kl_per_dim"].requires_grad
    torch.testing.assert_close(out["kl_per_dim"].sum(), out["kl"])
    torch.testing.assert_close(out["kl_per_dim"], kl_diag_gaussians(*stats).mean(0))
    (out["rec"] + 2.5 * out["kl"]).backward()
    assert torch.isfinite(logits.grad).all()


def test_ignore_mask_excludes_pixels_and_their_labels() -> None:
    logits, target = random_case(b=1)
    ignore = torch.zeros_like(target, dtype=torch.bool)
    ignore[0, :2] = True
    bad_target = target.masked_fill(ignore, 255)  # never read
    got = pixel_cross_entropy(logits, bad_target, ignore)
    expected = F.cross_entropy(logits, target, reduction="none")[~ignore].sum()
    torch.testing.assert_close(got, expected[None])
    got.sum().backward()
    assert (logits.grad[:, :, :2] == 0).all()


def test_empty_and_fully_ignored_targets_give_no_nan() -> None:
    logits, _ = random_case()
    empty = torch.zeros(2, 6, 5, dtype=torch.long)
    out = elbo_terms(logits, empty, *gaussians(b=2))
    assert all(torch.isfinite(v).all() for v in out.values())
    all_ignored = torch.ones_like(empty, dtype=torch.bool)
    out = elbo_terms(logits, empty, *gaussians(b=2), ignore=all_ignored)
    assert out["rec"] == 0 and torch.isfinite(out["kl"])
