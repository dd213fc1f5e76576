"""The latent space of a Probabilistic U-Net, decoded on a grid (the paper's Appendix A, Fig. 6).

For one crop X the prior net gives N(mu_prior(X), diag sigma_prior(X)^2) (Eq. 1).
A plane of two latent dimensions (a, b) is sampled on a ``size`` x ``size`` grid
(19 x 19 as in Fig. 6) in units of the prior's standard deviations::

    u_i = -extent + 2 * extent * i / (size - 1),     i = 0 .. size - 1
    z   = mu_prior + sigma_prior * u                  in dims a and b,
    z_k = mu_prior_k                                  in every other dim k,

so u in [-extent, extent]^2 (default extent 3: +-3 sigma; the 4-sigma circle
then shows only in the corners). Each z is decoded with f_comb on the U-Net's
features of X (Eq. 2; the U-Net runs once) into a mask (argmax class != 0,
:func:`lidcseg.inference.foreground_of`).
The graders' posterior means mu_post(X, Y_g) (the posterior net of Eq. 4 on
each grader mask Y_g, padded empty ones included) are drawn in the same units,
u_g = (mu_post - mu_prior) / sigma_prior, with circles at 1 to 4 sigma.

Models without a latent space (the baselines) are refused with a
:class:`~lidcseg.errors.LidcsegError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lidcseg.data.eval_split import split_file
from lidcseg.errors import LidcsegError
from lidcseg.inference import CT_CHANNELS, foreground_of
from lidcseg.io.outputs import check_output_file
from lidcseg.resources import hypothesis_bytes

#: Grid side of Fig. 6.
DEFAULT_GRID = 19
#: Half width of the grid in prior standard deviations.
DEFAULT_EXTENT = 3.0
#: Largest grid side: 101 x 101 = 10201 decoded masks, cells of a few pixels in the figure.
MAX_GRID = 101
#: Memory of one chunk of the grid decoded in one model call (bytes).
DECODE_CHUNK_BYTES = 1 << 30


@dataclass
class LatentGrid:
    """Masks decoded on a latent plane.

    Attributes:
        u: (S,) grid coordinates in prior sigmas.
        masks: (S, S, T, T) bool; ``masks[i, j]`` decoded at (u[j], u[i]) in ``dims``.
        mu_prior, sigma_prior: (N,) of the image.
        posterior_mu: (G, N) the graders' posterior means.
        posterior_u: (G, 2) the same in the plane, in prior sigmas.
        dims: the plane's two latent dimensions.
    """

    u: np.ndarray
    masks: np.ndarray
    mu_prior: np.ndarray
    sigma_prior: np.ndarray
    posterior_mu: np.ndarray
    posterior_u: np.ndarray
    dims: tuple[int, int]


def check_latent_model(model: torch.nn.Module, where: str | Path | None = None) -> int:
    """The latent dimension N of a Prob. U-Net; a one-line error for a model without a latent space."""
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    if not all(hasattr(model, a) for a in ("prior", "posterior_params", "decode")):
        raise LidcsegError(
            f"model {name!r} has no latent space (no prior/posterior net); "
            "`lidcseg latent` needs a Probabilistic U-Net run", where,
        )
    n = int(model.config.latent_dim)
    if n < 2:
        raise LidcsegError(f"the latent space has {n} dimension; a latent plane needs at least 2", where)
    return n


def check_grid(size: int, extent: float) -> None:
    """Refuse a grid side outside 2..:data:`MAX_GRID` or an extent that is not a finite number > 0."""
    if not 2 <= size <= MAX_GRID:
        raise LidcsegError(f"--grid {size}: expected 2 to {MAX_GRID} points per axis ({MAX_GRID}^2 decoded masks at most)")
    if not 0 < extent < float("inf"):
        raise LidcsegError(f"--extent {extent}: expected a finite number > 0")


def parse_dims(text: str | Sequence[int], latent_dim: int) -> tuple[int, int]:
    """Two distinct latent dimensions from ``"0,1"`` (or a pair), each in [0, N)."""
    try:
        dims = [int(v) for v in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise LidcsegError(f"--dims expects two integers like 0,1, got {text!r}") from None
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < latent_dim for d in dims):
        raise LidcsegError(
            f"--dims needs two distinct dimensions in 0..{latent_dim - 1}, got {text!r}"
        )
    return dims[0], dims[1]


@torch.no_grad()
def decode_grid(
    model: torch.nn.Module,
    image: torch.Tensor,
    graders: torch.Tensor,
    dims: tuple[int, int] = (0, 1),
    size: int = DEFAULT_GRID,
    extent: float = DEFAULT_EXTENT,
) -> LatentGrid:
    """Decode a ``size`` x ``size`` grid of a latent plane of one image (module docstring).

    Args:
        model: a latent model (``prior``, ``posterior_params``, ``decode``): the Prob. U-Net,
            its ablations or the Image2Image VAE, in eval mode.
        image: (1, C_in, T, T) on the model's device.
        graders: (G, T, T) bool grader masks.
        dims: the plane's latent dimensions.
        size: S, points per axis, 2..:data:`MAX_GRID`; decoded in chunks of about
            :data:`DECODE_CHUNK_BYTES` (:func:`lidcseg.resources.hypothesis_bytes` each).
        extent: the grid covers [-extent, extent] prior sigmas.

    Returns:
        :class:`LatentGrid`.
    """
    n_latent = check_latent_model(model)
    check_grid(size, extent)
    a, b = dims
    mu, logsigma = model.prior(image)  # (1, N) each
    sigma = logsigma.exp()
    u = torch.linspace(-extent, extent, size, dtype=mu.dtype)
    uu_row, uu_col = torch.meshgrid(u, u, indexing="ij")  # row i -> u[i] on dim b, col j -> u[j] on dim a
    z = mu.expand(size * size, n_latent).clone()  # (S*S, N)
    z[:, a] = mu[0, a] + sigma[0, a] * uu_col.reshape(-1).to(mu.device)
    z[:, b] = mu[0, b] + sigma[0, b] * uu_row.reshape(-1).to(mu.device)
    # Decoded in chunks of about DECODE_CHUNK_BYTES, so that memory does not grow with S^2.
    chunk = max(1, DECODE_CHUNK_BYTES // hypothesis_bytes(image.shape[-1], getattr(model, "config", None)))
    masks = torch.cat([foreground_of(model.decode(image, z[None, i : i + chunk]))[0].cpu()
                       for i in range(0, size * size, chunk)]).reshape(size, size, *image.shape[-2:])
    g = graders.shape[0]
    y = graders.to(image.device).long()  # (G, T, T)
    x = image.expand(g, -1, -1, -1)
    post_mu, _ = model.posterior_params(x, y)
    post_u = (post_mu - mu) / sigma  # (G, N)
    return LatentGrid(
        u=u.numpy(),
        masks=masks.cpu().numpy(),
        mu_prior=mu[0].cpu().numpy(),
        sigma_prior=sigma[0].cpu().numpy(),
        posterior_mu=post_mu.cpu().numpy(),
        posterior_u=post_u[:, [a, b]].cpu().numpy(),
        dims=(a, b),
    )


def latent_figure(
    run: str | Path,
    data_dir: str | Path,
    index: int,
    out: str | Path,
    *,
    split: str = "test",
    dims: str | Sequence[int] = (0, 1),
    size: int = DEFAULT_GRID,
    extent: float = DEFAULT_EXTENT,
    device: str = "auto",
) -> tuple[Path, LatentGrid]:
    """Fig. 6 for crop ``index`` (row of ``DATA/<split>.h5``) and a run: decode the grid, save the PNG.

    Returns:
        ``(png path, grid)``.

    Raises:
        LidcsegError: a missing run or split, a model without a latent space,
            bad ``dims``, an index outside the split, an ``out`` that is a folder, under a
            file, inside an input, or an existing file that is not a PNG
            (:func:`lidcseg.io.outputs.check_output_file`).
    """
    from lidcseg.data.dataset import CropEvalDataset
    from lidcseg.inference import open_run, require_input_size
    from lidcseg.reports.plots import plot_latent_grid

    path = split_file(data_dir, split)
    check_output_file(out, inputs=[run, data_dir])  # a PNG: apart from the inputs, under a folder
    opened = open_run(run, device, in_channels=CT_CHANNELS)
    input_size = require_input_size(opened)
    n_latent = check_latent_model(opened.model, run)
    plane = parse_dims(dims, n_latent)
    ds = CropEvalDataset(path, input_size=input_size)
    if not 0 <= index < len(ds):
        raise LidcsegError(f"--index {index} outside the split's {len(ds)} crops (0..{len(ds) - 1})", path)
    item = ds[index]
    image = item["image"][None].to(opened.device)
    graders = item["masks"].bool()
    grid = decode_grid(opened.model, image, graders, plane, size, extent)
    patient = ds.store.meta["patient_id"][index]
    sigmas = ", ".join(f"{s:.2g}" for s in grid.sigma_prior[list(plane)])
    others = f"; other {n_latent - 2} dims at the prior mean" if n_latent > 2 else ""
    title = (f"{opened.label}: crop {index} ({patient}, {split}), masks decoded on a {size}×{size} grid\n"
             f"z = μ_prior + σ_prior·u in latent dims {plane[0]},{plane[1]} (σ_prior = {sigmas}){others}")
    png = plot_latent_grid(
        image[0, 0].cpu().numpy(), graders.numpy(), grid.masks, grid.u, grid.posterior_u, out,
        dims=plane, title=title,
    )
    return png, grid
