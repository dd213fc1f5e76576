"""``lidcseg latent`` (Appendix A, Fig. 6): a latent plane decoded on a grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

from lidcseg.config import ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.inference import OpenRun
from lidcseg.latent import check_latent_model, decode_grid, latent_figure, parse_dims
from lidcseg.models.prob_unet import encode_mask
from lidcseg.models.registry import create_model
from lidcseg.seed import seed_everything
from lidcseg_cli.main import app
from tests.test_evaluation import INPUT, TINY, fake_run, make_run, one_line_error

runner = CliRunner()
TINY3 = ModelConfig(base_channels=4, num_scales=3, convs_per_block=1, latent_dim=3,
                    fcomb_channels=4, fcomb_layers=1)


def test_grid_decodes_prior_mean_at_the_centre_and_posterior_means_in_sigmas() -> None:
    seed_everything(0)
    model = create_model(TINY3).eval()
    with torch.no_grad():
        model.prior.head.bias[3:] = 0.0  # sigma about 1, so the grid spans distinct z
    x = torch.randn(1, 1, INPUT, INPUT)
    graders = torch.zeros(4, INPUT, INPUT, dtype=torch.bool)
    graders[0, 10:20, 10:20] = True
    graders[1, 12:18, 12:18] = True
    grid = decode_grid(model, x, graders, dims=(2, 0), size=5, extent=2.0)
    assert grid.masks.shape == (5, 5, INPUT, INPUT) and grid.u.tolist() == [-2, -1, 0, 1, 2]
    with torch.no_grad():
        centre = model.predict_prior_mean(x).argmax(1)[0] != 0
        mu, logsigma = model.prior(x)
        sigma = logsigma.exp()
        # cell (i, j) = (u[i] on dim 0, u[j] on dim 2); dim 1 stays at the prior mean
        z = mu.clone()
        z[0, 2] += sigma[0, 2] * 1.0
        z[0, 0] += sigma[0, 0] * -2.0
        corner = model.fcomb(model.unet(x), z[:, None])[0, 0].argmax(0) != 0
        post, _ = model.posterior(torch.cat([x.expand(4, -1, -1, -1), encode_mask(graders.long(), 2)], 1))
    assert np.array_equal(grid.masks[2, 2], centre.numpy())
    assert np.array_equal(grid.masks[0, 3], corner.numpy())
    expected = ((post - mu) / sigma)[:, [2, 0]]
    np.testing.assert_allclose(grid.posterior_u, expected.numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(grid.sigma_prior, sigma[0].numpy(), rtol=1e-6)


def test_dims_and_models_without_latent_are_refused() -> None:
    assert parse_dims("1,2", 3) == (1, 2)
    for bad in ("0", "0,0", "0,3", "a,b", "0,1,2"):
        with pytest.raises(LidcsegError, match="--dims"):
            parse_dims(bad, 3)
    with pytest.raises(LidcsegError, match="no latent space"):
        check_latent_model(nn.Conv2d(1, 2, 1))
    seed_everything(0)
    with pytest.raises(LidcsegError, match="1 dimension"):
        check_latent_model(create_model(ModelConfig(base_channels=4, num_scales=3, latent_dim=1)))


def test_latent_figure_writes_a_png(disc_data: Path, tmp_path: Path) -> None:
    run = make_run(tmp_path / "pun", cfg=TINY)
    png, grid = latent_figure(run, disc_data, 1, tmp_path / "fig" / "latent.png", size=4, device="cpu")
    assert png.read_bytes()[:4] == b"\x89PNG" and grid.masks.shape[:2] == (4, 4)
    assert grid.posterior_u.shape == (4, 2)


def test_cli_latent_and_its_errors(disc_data: Path, tmp_path: Path, monkeypatch) -> None:
    run = make_run(tmp_path / "pun", cfg=TINY)
    out = tmp_path / "latent.png"
    base = ["latent", "--data", str(disc_data), "--device", "cpu", "--out", str(out)]
    result = runner.invoke(app, [*base, "--run", str(run), "--index", "2", "--grid", "3"])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:4] == b"\x89PNG" and "3×3 grid" in result.output
    one_line_error(runner.invoke(app, [*base, "--run", str(run), "--index", "4"]), "--index 4", "test.h5")
    one_line_error(runner.invoke(app, [*base, "--run", str(run), "--index", "0", "--dims", "0,2"]), "--dims")
    one_line_error(runner.invoke(app, [*base, "--run", str(tmp_path / "gone"), "--index", "0"]), "gone")
    one_line_error(runner.invoke(app, [*base, "--run", str(run), "--index", "0", "--split", "x"]), "x.h5")

    # a baseline (no latent space) -> one line naming the run
    import lidcseg.inference

    baseline = nn.Conv2d(1, 2, 1)
    baseline.config = ModelConfig(name="unet-ensemble")  # type: ignore[assignment]

    def load(r, device="auto", input_size=None, in_channels=None) -> OpenRun:
        return fake_run(baseline, Path(r), "unet-ensemble")

    monkeypatch.setattr(lidcseg.inference, "open_run", load)
    one_line_error(runner.invoke(app, [*base, "--run", str(run), "--index", "0"]),
                   "'unet-ensemble' has no latent space", str(run))
