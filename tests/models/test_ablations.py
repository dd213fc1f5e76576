"""Appendix D ablations as Prob. U-Net options: fixed prior, no posterior context, early injection."""

from __future__ import annotations

import pytest
import torch

from lidcseg.config import ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.models import FixedGaussian, ProbUNet, create_model, model_config
from lidcseg.seed import seed_everything

ARCH = dict(base_channels=2, num_scales=3, convs_per_block=1, latent_dim=2, fcomb_channels=4,
            fcomb_layers=2)


def make(name: str, **overrides: object) -> ProbUNet:
    seed_everything(0)
    model = create_model(model_config(name, **ARCH, **overrides))
    assert isinstance(model, ProbUNet)
    return model


def data(b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 1, 16, 16, generator=g), (torch.rand(b, 16, 16, generator=g) > 0.6).long()


def test_names_imply_their_options_even_from_a_plain_config() -> None:
    seed_everything(0)
    model = create_model(ModelConfig(name="fixed-prior-no-context", **ARCH))
    assert (model.config.prior, model.config.posterior_context) == ("fixed", False)
    assert model_config("early-injection").injection == "early"
    assert model_config("probunet") == ModelConfig()  # the paper's model is unchanged
    with pytest.raises(LidcsegError, match="implies prior='fixed'"):
        model_config("fixed-prior", prior="learned")
    # The generic name takes the options too.
    assert make("probunet", prior="fixed").config.prior == "fixed"


def test_fixed_prior_has_no_prior_parameters_and_a_standard_normal_kl() -> None:
    model = make("fixed-prior")
    assert isinstance(model.prior, FixedGaussian) and not list(model.prior.parameters())
    x, y = data()
    out = model.loss(x, y, generator=torch.Generator().manual_seed(0))
    mu, logsigma = model.posterior_params(x, y)
    kl = (0.5 * (mu**2 + (2 * logsigma).exp() - 1) - logsigma).sum(1).mean()
    torch.testing.assert_close(out["kl"], kl)
    # Samples are z ~ N(0, I): log-probabilities are the standard normal's.
    hyp = model.sample_with_latents(x, 4, generator=torch.Generator().manual_seed(1))
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(hyp.z).sum(-1)
    torch.testing.assert_close(hyp.log_prob, expected)
    # The posterior still sees the image.
    assert model.posterior.encoder.blocks[0][0].in_channels == 1 + 2
    assert not torch.equal(model.posterior_params(x, y)[0], model.posterior_params(-x, y)[0])


def test_no_context_posterior_ignores_the_image() -> None:
    model = make("fixed-prior-no-context")
    x, y = data()
    assert model.posterior.encoder.blocks[0][0].in_channels == 2
    a, b = model.posterior_params(x, y), model.posterior_params(torch.randn_like(x), y)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], model.posterior_params(x, 1 - y)[0])


def test_early_injection_keeps_the_learned_prior_and_runs_the_unet_per_sample() -> None:
    model = make("early-injection")
    assert not isinstance(model.prior, FixedGaussian)
    assert model.unet.encoder.blocks[0][0].in_channels == 1 + 2 and not hasattr(model, "fcomb")
    x, _ = data(b=3)
    calls: dict[str, list[int]] = {"unet": [], "prior": []}
    hooks = [getattr(model, k).register_forward_hook(
        lambda mod, args, out, k=k: calls[k].append(args[0].shape[0])) for k in calls]
    try:
        a = model.sample(x, 6, generator=torch.Generator().manual_seed(2), chunk_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls["prior"] == [3] and sum(calls["unet"]) == 3 * 6
    b = model.sample_naive(x, 6, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    c = model.sample(x, 6, generator=torch.Generator().manual_seed(2), chunk_size=1)
    torch.testing.assert_close(a, c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["fixed-prior", "fixed-prior-no-context", "early-injection"])
def test_prior_mean_and_reconstruction_use_the_same_decoder(name: str) -> None:
    model = make(name)
    x, y = data()
    with torch.no_grad():
        mu_p, _ = model.prior(x)
        mu_q, _ = model.posterior_params(x, y)
        torch.testing.assert_close(model.predict_prior_mean(x), model.decode(x, mu_p[:, None])[:, 0])
        torch.testing.assert_close(model.reconstruct(x, y), model.decode(x, mu_q[:, None])[:, 0])
