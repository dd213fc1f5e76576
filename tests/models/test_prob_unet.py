"""Probabilistic U-Net specifics: late injection, one U-Net pass per image, latents, init."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lidcseg.config import ModelConfig
from lidcseg.models import FComb, ProbUNet, create_model
from lidcseg.models.blocks import BIAS_INIT_STD
from lidcseg.models.prob_unet import LOGSIGMA_MAX, LOGSIGMA_MIN, encode_mask, soft_clamp
from lidcseg.seed import seed_everything

CFG = ModelConfig(
    base_channels=4, num_scales=3, convs_per_block=2, latent_dim=3, fcomb_channels=8, fcomb_layers=3
)


@pytest.fixture(scope="module")
def model() -> ProbUNet:
    seed_everything(0)
    m = create_model(CFG)
    assert isinstance(m, ProbUNet)
    # Perturb biases so that the equivalence tests also exercise them.
    with torch.no_grad():
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return m


def images(b: int = 3, h: int = 32, w: int = 24) -> torch.Tensor:
    return torch.randn(b, 1, h, w, generator=torch.Generator().manual_seed(11))


def test_fcomb_late_injection_equals_concatenation() -> None:
    seed_everything(1)
    fc = FComb(feature_channels=5, latent_dim=3, channels=7, num_layers=3, num_classes=2)
    for p in fc.parameters():
        nn.init.normal_(p)
    features, z = torch.randn(2, 5, 6, 10), torch.randn(2, 4, 3)
    naive = torch.stack([fc.forward_naive(features, z[:, i]) for i in range(4)], dim=1)
    late = fc(features, z)
    assert late.shape == naive.shape == (2, 4, 2, 6, 10)
    torch.testing.assert_close(late, naive, rtol=1e-5, atol=1e-5)
    projected = fc.project_features(features)
    for tile in (None, 7, 60, 1000):
        torch.testing.assert_close(fc.combine(projected, z, tile=tile), naive, rtol=1e-5, atol=1e-5)


def test_late_injection_sample_equals_naive_sample(model: ProbUNet) -> None:
    x = images()
    late = model.sample(x, 5, generator=torch.Generator().manual_seed(3))
    naive = model.sample_naive(x, 5, generator=torch.Generator().manual_seed(3))
    assert late.shape == (3, 5, 2, 32, 24)
    torch.testing.assert_close(late, naive, rtol=1e-5, atol=1e-5)
    assert (late[:, 0] - late[:, 1]).abs().max() > 0  # the latents do matter


def test_sample_runs_unet_and_prior_once_per_image(model: ProbUNet) -> None:
    calls: dict[str, list[int]] = {"unet": [], "prior": [], "posterior": []}
    hooks = [
        getattr(model, name).register_forward_hook(
            lambda mod, args, out, name=name: calls[name].append(args[0].shape[0])
        )
        for name in calls
    ]
    try:
        model.sample(images(b=3), 16)
        assert calls == {"unet": [3], "prior": [3], "posterior": []}
        for v in calls.values():
            v.clear()
        model.sample(images(b=5), 16, chunk_size=2)
        assert calls == {"unet": [2, 2, 1], "prior": [2, 2, 1], "posterior": []}
    finally:
        for h in hooks:
            h.remove()


def test_chunk_size_does_not_change_samples(model: ProbUNet) -> None:
    x = images(b=5)
    a = model.sample(x, 4, generator=torch.Generator().manual_seed(9), chunk_size=8)
    b = model.sample(x, 4, generator=torch.Generator().manual_seed(9), chunk_size=2)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_latents_and_their_prior_log_probability(model: ProbUNet) -> None:
    x = images()
    hyp = model.sample_with_latents(x, 6, generator=torch.Generator().manual_seed(4))
    assert hyp.logits.shape == (3, 6, 2, 32, 24)
    assert hyp.z.shape == (3, 6, 3) and hyp.log_prob.shape == (3, 6)
    with torch.no_grad():
        mu, logsigma = model.prior(x)
        expected = torch.distributions.Normal(mu[:, None], logsigma.exp()[:, None])
        torch.testing.assert_close(
            hyp.log_prob, expected.log_prob(hyp.z).sum(-1), rtol=1e-5, atol=1e-4
        )
        # Each hypothesis is f_comb at its own latent.
        torch.testing.assert_close(
            hyp.logits, model.fcomb(model.unet(x), hyp.z), rtol=1e-5, atol=1e-5
        )


def test_prior_mean_and_posterior_mean_predictions(model: ProbUNet) -> None:
    x = images()
    y = (torch.rand(3, 32, 24, generator=torch.Generator().manual_seed(2)) > 0.7).long()
    with torch.no_grad():
        mu_p, _ = model.prior(x)
        mu_q, _ = model.posterior(torch.cat([x, encode_mask(y, 2)], dim=1))
        features = model.unet(x)
        torch.testing.assert_close(
            model.predict_prior_mean(x), model.fcomb(features, mu_p[:, None])[:, 0]
        )
        torch.testing.assert_close(
            model.reconstruct(x, y), model.fcomb(features, mu_q[:, None])[:, 0]
        )


def test_encode_mask_is_one_hot_minus_half_and_zero_where_ignored() -> None:
    y = torch.tensor([[[0, 1], [1, 255]]])
    ignore = torch.tensor([[[False, False], [False, True]]])
    enc = encode_mask(y, 2, ignore)
    assert enc.shape == (1, 2, 2, 2)
    assert enc[0, :, 0, 0].tolist() == [0.5, -0.5]
    assert enc[0, :, 0, 1].tolist() == [-0.5, 0.5]
    assert enc[0, :, 1, 1].tolist() == [0.0, 0.0]


def test_logsigma_is_softly_bounded() -> None:
    raw = torch.tensor([-1e4, -50.0, -5.0, -3.0, 0.0, 50.0, 1e4], requires_grad=True)
    out = soft_clamp(raw, LOGSIGMA_MIN, LOGSIGMA_MAX)
    assert torch.isfinite(out).all()
    assert (out >= LOGSIGMA_MIN - 1e-4).all() and (out <= LOGSIGMA_MAX).all()
    assert (out.diff() >= 0).all()
    torch.testing.assert_close(out[2:5], raw[2:5], atol=0.01, rtol=0)
    out.sum().backward()
    assert torch.isfinite(raw.grad).all()


def test_orthogonal_weights_and_small_truncated_biases(model: ProbUNet) -> None:
    seed_everything(0)
    fresh = create_model(CFG)
    convs = [m for m in fresh.modules() if isinstance(m, nn.Conv2d)]
    assert convs
    for conv in convs:
        w = conv.weight.detach().flatten(1)  # (out, in * k * k)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w
        torch.testing.assert_close(gram, torch.eye(gram.shape[0]), atol=1e-4, rtol=0)
        assert conv.bias.abs().max() <= 2 * BIAS_INIT_STD


def test_paper_architecture_channels_and_parameter_layout() -> None:
    with torch.device("meta"):
        paper = create_model(ModelConfig())
    assert paper.unet.encoder.channels == [32, 64, 128, 256, 512]
    assert len(paper.unet.decoder) == 4
    assert paper.posterior.encoder.blocks[0][0].in_channels == 1 + 2  # image + one-hot mask
    assert paper.prior.head.out_channels == 2 * 6
    convs_per_block = sum(isinstance(m, nn.Conv2d) for m in paper.unet.encoder.blocks[0])
    assert convs_per_block == 3
    assert [m.out_channels for m in paper.fcomb.layers] == [32, 32, 32]
    assert paper.fcomb.layers[0].in_channels == 32 + 6 and paper.fcomb.logits.out_channels == 2
    # Checkpoints name the weights by these paths (f_comb lives in its own module now).
    assert {"unet.encoder.blocks.0.0.weight", "prior.head.weight", "posterior.head.bias",
            "fcomb.layers.0.weight", "fcomb.logits.bias"} <= set(paper.state_dict())


def test_sampling_uses_the_prior_spread(model: ProbUNet) -> None:
    x = images(b=1)
    hyp = model.sample_with_latents(x, 400, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        mu, logsigma = model.prior(x)
    std = hyp.z[0].std(0)
    assert torch.allclose(
        hyp.z[0].mean(0), mu[0], atol=4 * logsigma.exp().max().item() / math.sqrt(400)
    )
    assert torch.allclose(std, logsigma.exp()[0], rtol=0.2)


def test_noise_scale_scales_the_posterior_samples_noise(model: ProbUNet) -> None:
    """z = mu_q + a sigma_q eps: a = 0 decodes the posterior mean whatever the noise, a = 1 is
    Eq. 4's sample (the default, bit for bit), and the KL is Q's own at every a."""
    from lidcseg.losses import pixel_cross_entropy

    x = images()
    y = (torch.rand(3, 32, 24, generator=torch.Generator().manual_seed(2)) > 0.7).long()

    def loss(seed: int, **kw: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return model.loss(x, y, generator=torch.Generator().manual_seed(seed), **kw)

    mean_a, mean_b = loss(1, noise_scale=0.0), loss(2, noise_scale=0.0)
    assert torch.equal(mean_a["rec"], mean_b["rec"])
    with torch.no_grad():
        mu_q, _ = model.posterior_params(x, y)
        expected = pixel_cross_entropy(model.fcomb(model.unet(x), mu_q[:, None])[:, 0], y).mean()
    torch.testing.assert_close(mean_a["rec"], expected, rtol=1e-5, atol=1e-4)
    full, default, half = loss(1, noise_scale=1.0), loss(1), loss(1, noise_scale=0.5)
    assert torch.equal(full["rec"], default["rec"])
    assert len({float(mean_a["rec"]), float(half["rec"]), float(full["rec"])}) == 3
    for terms in (mean_a, half, full):
        assert torch.equal(terms["kl"], default["kl"])
