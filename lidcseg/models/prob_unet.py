"""The Probabilistic U-Net (Kohl et al., NeurIPS 2018, Section 2 and Appendix H.1).

Reading order, top to bottom:

1. :func:`encode_mask` - how a segmentation enters the posterior net.
2. :class:`AxisAlignedGaussianNet` - prior net P(z|X) (Eq. 1) and posterior
   net Q(z|X,Y): the U-Net's encoder, global average pooling, and a 1x1 conv
   giving the mean and log sigma of an axis-aligned Gaussian in R^N.
3. :class:`~lidcseg.models.fcomb.FComb` (its own module) - f_comb: z broadcast to
   an N-channel map, concatenated to the U-Net's last feature map, a few 1x1
   convs with ReLU, and 1x1 conv logits (Eq. 2).
4. :class:`ProbUNet` - the terms of the training loss (Eq. 4; the trainer
   weights the KL with beta) and sampling (Eq. 1-3).

Sampling uses *late injection*: the U-Net and prior net run once per image,
and only f_comb runs per sample. Because f_comb's first 1x1 conv is linear,
W [F; z] + b = W_F F + (W_z z + b): W_F F is computed once per image and the
per-sample term W_z z + b is a bias added to it.

The ablations of Appendix D are options of the same class (``ModelConfig``):
``prior="fixed"`` replaces the prior net by N(0, I) (:class:`FixedGaussian`),
``posterior_context=False`` gives a posterior Q(z|Y) that sees the mask only,
and ``injection="early"`` concatenates z to the input image instead (the U-Net
then runs once per sample, and an :class:`~lidcseg.models.unet.OutputHead`
replaces f_comb). All three together, with beta = 10 and N = 3, are the
Image2Image VAE baseline (Fig. 2d, :mod:`lidcseg.models.i2i_vae`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from lidcseg.config import ModelConfig
from lidcseg.losses import elbo_terms, std_normal_log_prob
from lidcseg.models.blocks import check_input_size, init_weights, standard_normal
from lidcseg.models.fcomb import FComb
from lidcseg.models.registry import SegmentationModel, check_labels
from lidcseg.models.unet import Encoder, OutputHead, UNet

#: log sigma of the prior/posterior is softly bounded to (LOGSIGMA_MIN, LOGSIGMA_MAX)
#: (sigma in [4.5e-5, 148]) so that exp() and the KL never overflow (the public
#: PyTorch port's NaN losses came from an unbounded log sigma).
LOGSIGMA_MIN = -10.0
LOGSIGMA_MAX = 5.0

#: Images per forward pass in :meth:`ProbUNet.sample` (bounds memory).
DEFAULT_CHUNK_SIZE = 8

def soft_clamp(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """Smooth, monotone map of R onto (lo, hi) that is nearly the identity inside.

    ``hi - softplus(hi - (lo + softplus(x - lo)))``: within 0.01 of ``x`` for
    x in [lo + 5, hi - 5], and it never has a zero gradient (unlike a hard clamp,
    a saturated log sigma can still be pulled back by the KL).
    """
    return hi - F.softplus(hi - (lo + F.softplus(x - lo)))


def encode_mask(
    y: torch.Tensor, num_classes: int, ignore: torch.Tensor | None = None
) -> torch.Tensor:
    """A label map as the posterior net's extra input channels.

    One-hot minus 0.5 (as in the official TF implementation): each pixel has
    +0.5 in its class channel and -0.5 elsewhere; ignored pixels are 0 in
    every channel.

    Args:
        y: (B, H, W) int64 labels in [0, num_classes).
        num_classes: C.
        ignore: (B, H, W) bool or None.

    Returns:
        (B, C, H, W) float32.
    """
    if ignore is not None:
        y = y.masked_fill(ignore, 0)
    enc = F.one_hot(y, num_classes).permute(0, 3, 1, 2).float() - 0.5
    if ignore is not None:
        enc = enc.masked_fill(ignore[:, None], 0.0)
    return enc


class AxisAlignedGaussianNet(nn.Module):
    """Prior net P(z|X) or posterior net Q(z|X,Y).

    The U-Net's encoder path (same channels and scales), global average pooling
    of its last feature map, and a 1x1 conv to 2N numbers: the mean and
    (soft-clamped, see :data:`LOGSIGMA_MIN`) log sigma of an axis-aligned
    Gaussian in R^N.

    Input (B, skip_channels + in_channels, H, W); output ``(mu, logsigma)``, each
    (B, N). The first ``skip_channels`` input channels are not seen: the posterior
    always receives [X; Y], and the posterior without context (Appendix D) skips X.
    """

    def __init__(
        self,
        in_channels: int,
        latent_dim: int,
        base_channels: int = 32,
        num_scales: int = 5,
        convs_per_block: int = 3,
        skip_channels: int = 0,
    ) -> None:
        super().__init__()
        self.latent_dim = latent_dim
        self.skip_channels = skip_channels
        self.encoder = Encoder(in_channels, base_channels, num_scales, convs_per_block)
        self.head = nn.Conv2d(self.encoder.channels[-1], 2 * latent_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x[:, self.skip_channels :]  # (B, in_channels, H, W)
        h = self.encoder(x)[-1].mean(dim=(2, 3), keepdim=True)  # (B, C_last, 1, 1)
        out = self.head(h).flatten(1)  # (B, 2N)
        mu, raw = out[:, : self.latent_dim], out[:, self.latent_dim :]
        return mu, soft_clamp(raw, LOGSIGMA_MIN, LOGSIGMA_MAX)


class FixedGaussian(nn.Module):
    """The fixed prior N(0, I) in R^N, called like a prior net: no parameters.

    Input (B, ...) (only B is read); output ``(mu, logsigma)``, zeros (B, N).
    """

    def __init__(self, latent_dim: int) -> None:
        super().__init__()
        self.latent_dim = latent_dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        zeros = x.new_zeros((x.shape[0], self.latent_dim))
        return zeros, zeros


class Hypotheses(NamedTuple):
    """Samples of :meth:`ProbUNet.sample_with_latents`.

    Attributes:
        logits: (B, n, C, H, W) segmentation logits.
        z: (B, n, N) latents drawn from the prior.
        log_prob: (B, n) log N(z; mu_prior, sigma_prior), summed over the N dimensions.
    """

    logits: torch.Tensor
    z: torch.Tensor
    log_prob: torch.Tensor


class ProbUNet(SegmentationModel):
    """The Probabilistic U-Net: U-Net + prior/posterior nets + f_comb (Fig. 1).

    Args:
        cfg: architecture (``base_channels``, ``num_scales``, ``convs_per_block``,
            ``latent_dim``, ``fcomb_channels``, ``fcomb_layers``) and the
            Appendix D options ``prior`` (``learned`` | ``fixed``),
            ``posterior_context`` and ``injection`` (``late`` | ``early``).

    Inputs: images (B, cfg.in_channels, H, W) with H, W multiples of
    2^(num_scales-1); labels (B, H, W) int64 in [0, cfg.num_classes).
    Weights are initialised orthogonally (see :func:`init_weights`) from torch's global RNG.

    Sampling cost: with late injection (the paper's model) the U-Net and the
    prior net run once per image, and one more sample costs one f_comb pass
    (``fcomb_layers`` 1x1 convs over H x W); with early injection one more
    sample costs a whole U-Net pass and the output head (the prior net still
    runs once per image). ``benchmarks/sample.py`` measures both.
    """

    scales_posterior_noise = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        arch = dict(
            base_channels=cfg.base_channels,
            num_scales=cfg.num_scales,
            convs_per_block=cfg.convs_per_block,
        )
        n, c = cfg.latent_dim, cfg.num_classes
        self.early = cfg.injection == "early"
        # Registration order fixes the order of the initialisation draws: keep it.
        self.unet = UNet(cfg.in_channels + (n if self.early else 0), **arch)
        self.prior: nn.Module = (
            AxisAlignedGaussianNet(cfg.in_channels, n, **arch)
            if cfg.prior == "learned"
            else FixedGaussian(n)
        )
        # The posterior always receives [X; Y]; without context it skips X.
        self.posterior = (
            AxisAlignedGaussianNet(cfg.in_channels + c, n, **arch)
            if cfg.posterior_context
            else AxisAlignedGaussianNet(c, n, **arch, skip_channels=cfg.in_channels)
        )
        head_args = dict(channels=cfg.fcomb_channels, num_layers=cfg.fcomb_layers, num_classes=c)
        if self.early:
            self.head = OutputHead(self.unet.out_channels, **head_args)
        else:
            self.fcomb = FComb(self.unet.out_channels, n, **head_args)
        init_weights(self)
        # Channels-last conv weights make every activation channels-last (NHWC):
        # oneDNN's native layout, measured 15-20% faster for the U-Net on CPU, and
        # f_comb then reads the U-Net's output without a copy.
        self.to(memory_format=torch.channels_last)

    # -- the network, for given latents -----------------------------------------------------

    def posterior_params(
        self, x: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q(z|X,Y) (or Q(z|Y) without context): mean and log sigma, each (B, N)."""
        return self.posterior(
            torch.cat([x, encode_mask(y, self.config.num_classes, ignore)], dim=1)
        )

    def decode(
        self, x: torch.Tensor, z: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
    ) -> torch.Tensor:
        """S(X, z) of Eq. 2 for given latents: (B, C_in, H, W), (B, n, N) -> (B, n, C, H, W).

        Late injection: the U-Net once, f_comb on all n latents. Early injection:
        one U-Net pass per latent, about ``chunk_size`` passes per forward call.
        """
        if not self.early:
            return self.fcomb(self.unet(x), z)
        b, n = z.shape[:2]
        out = x.new_empty((b, n, self.config.num_classes, *x.shape[-2:]))
        group = max(1, chunk_size // b)  # latents per forward call
        for j in range(0, n, group):
            zj = z[:, j : j + group]  # (B, g, N)
            g = zj.shape[1]
            xj = x[:, None].expand(-1, g, -1, -1, -1).reshape(b * g, *x.shape[1:])
            logits = self.head(self.unet(concat_latent(xj, zj.reshape(b * g, -1))))
            out[:, j : j + g] = logits.view(b, g, *logits.shape[1:])
        return out

    def _logits(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One latent per image: (B, C_in, H, W), (B, N) -> (B, C, H, W) logits."""
        if self.early:
            return self.head(self.unet(concat_latent(x, z)))
        return self.fcomb(self.unet(x), z[:, None])[:, 0]

    # -- training ---------------------------------------------------------------------------

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ignore: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        noise_scale: float | torch.Tensor = 1.0,
    ) -> dict[str, torch.Tensor]:
        """The terms of the ELBO of Eq. 4 with one reparameterised posterior sample.

        The trainer weights them: ``rec + beta * kl``
        (:func:`lidcseg.training.schedule.objective`). With ``prior="fixed"`` the
        KL is against N(0, I) (closed form, :func:`lidcseg.losses.kl_diag_gaussians`
        at mu_p = 0, log sigma_p = 0).

        Args:
            x: (B, C_in, H, W) images.
            y: (B, H, W) int64 labels (one grader's mask).
            ignore: (B, H, W) bool, pixels excluded from the cross-entropy.
            generator: RNG of the posterior sample (None: torch's global RNG).
            noise_scale: a in z = mu_q + a * sigma_q * eps (Eq. 4's sample: 1; 0 decodes
                the posterior mean). The KL is always that of Q itself. The trainer's
                ``posterior_noise_warmup_steps`` raises it from 0 to 1
                (:func:`lidcseg.training.schedule.noise_scale_at`).

        Returns:
            ``rec``, ``kl`` (scalars) and ``kl_per_dim`` (N,); see
            :func:`lidcseg.losses.elbo_terms` for the reductions.
        """
        check_labels(x, y)
        mu_p, logsigma_p = self.prior(x)  # (B, N) each
        mu_q, logsigma_q = self.posterior_params(x, y, ignore)
        eps = standard_normal(tuple(mu_q.shape), generator, x.device, mu_q.dtype)
        z = mu_q + noise_scale * logsigma_q.exp() * eps  # (B, N), reparameterised
        logits = self._logits(x, z)  # (B, C, H, W)
        return elbo_terms(logits, y, mu_q, logsigma_q, mu_p, logsigma_p, ignore)

    # -- inference --------------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """``n`` hypotheses per image from the prior (Eq. 1-3), as logits (B, n, C, H, W).

        See :meth:`sample_with_latents`.
        """
        return self.sample_with_latents(x, n, generator, chunk_size, eps=eps).logits

    @torch.no_grad()
    def sample_with_latents(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        eps: torch.Tensor | None = None,
    ) -> Hypotheses:
        """Hypotheses with their latents and log-probabilities under the prior.

        The prior net runs once per image. With late injection so does the
        U-Net, and f_comb runs on all ``n`` latents of an image in one batch
        (module docstring); with early injection the U-Net runs once per latent.
        Images are processed ``chunk_size`` at a time so memory stays bounded.
        All noise (B, n, N) is drawn before the first chunk, so the result does
        not depend on ``chunk_size``.

        Args:
            x: (B, C_in, H, W) images.
            n: hypotheses per image (>= 1).
            generator: RNG of the latents (None: torch's global RNG).
            chunk_size: images per forward pass.
            eps: (B, n, N) standard-normal noise to use instead of drawing it
                (z = mu + sigma * eps); ``generator`` is then unused.

        Returns:
            :class:`Hypotheses` with logits (B, n, C, H, W), z (B, n, N), log_prob (B, n).
        """
        if n < 1 or chunk_size < 1:
            raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
        check_input_size(x, self.config.num_scales)
        b, _, h, w = x.shape
        cfg = self.config
        if eps is None:
            eps = standard_normal((b, n, cfg.latent_dim), generator, x.device, x.dtype)
        elif tuple(eps.shape) != (b, n, cfg.latent_dim):
            raise ValueError(f"eps must be (B, n, N) = {(b, n, cfg.latent_dim)}, got {tuple(eps.shape)}")
        else:
            eps = eps.to(device=x.device, dtype=x.dtype)
        logits = x.new_empty((b, n, cfg.num_classes, h, w))
        z = torch.empty_like(eps)
        logsigma_sum = x.new_empty((b,))  # sum over N of the prior's log sigma
        for s in range(0, b, chunk_size):
            xc = x[s : s + chunk_size]
            mu, logsigma = self.prior(xc)  # (b', N)
            z[s : s + chunk_size] = mu[:, None] + logsigma.exp()[:, None] * eps[s : s + chunk_size]
            logits[s : s + chunk_size] = self.decode(xc, z[s : s + chunk_size], chunk_size)
            logsigma_sum[s : s + chunk_size] = logsigma.sum(1)
        # log N(z; mu, sigma) = log N(eps; 0, I) - sum log sigma, as z = mu + sigma * eps.
        log_prob = std_normal_log_prob(eps) - logsigma_sum[:, None]
        return Hypotheses(logits, z, log_prob)

    @torch.no_grad()
    def sample_naive(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """Reference sampler: ``n`` full forward passes (U-Net, prior net, tiled-z f_comb).

        Draws the same noise as :meth:`sample` for the same generator state, so
        both give the same hypotheses up to float rounding. Only for the
        equivalence test and ``benchmarks/sample.py``. Returns (B, n, C, H, W).
        """
        check_input_size(x, self.config.num_scales)
        b, _, h, w = x.shape
        cfg = self.config
        eps = standard_normal((b, n, cfg.latent_dim), generator, x.device, x.dtype)
        logits = x.new_empty((b, n, cfg.num_classes, h, w))
        for s in range(0, b, chunk_size):
            xc = x[s : s + chunk_size]
            for i in range(n):
                mu, logsigma = self.prior(xc)
                z = mu + logsigma.exp() * eps[s : s + chunk_size, i]
                if self.early:
                    logits[s : s + chunk_size, i] = self._logits(xc, z)
                else:
                    logits[s : s + chunk_size, i] = self.fcomb.forward_naive(self.unet(xc), z)
        return logits

    @torch.no_grad()
    def predict_prior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """Logits at z = mu_prior(X): (B, C_in, H, W) -> (B, C, H, W)."""
        mu, _ = self.prior(x)
        return self._logits(x, mu)

    @torch.no_grad()
    def reconstruct(
        self, x: torch.Tensor, y: torch.Tensor, ignore: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Posterior-mean reconstruction: logits at z = mu_posterior(X, Y), (B, C, H, W)."""
        check_labels(x, y)
        mu, _ = self.posterior_params(x, y, ignore)
        return self._logits(x, mu)


def concat_latent(x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Early injection: z tiled over the image and concatenated to it.

    (B, C_in, H, W), (B, N) -> (B, C_in + N, H, W).
    """
    b, _, h, w = x.shape
    return torch.cat([x, z[:, :, None, None].expand(b, -1, h, w).to(x.dtype)], dim=1)

