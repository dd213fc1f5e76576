"""Image2Image VAE baseline (Kohl et al. 2018, Fig. 2d; BicycleGAN's cVAE-GAN without the GAN).

A conditional VAE whose latent enters at the U-Net's *input*:

- prior: fixed N(0, I) in R^N, no parameters (:class:`~lidcseg.models.prob_unet.FixedGaussian`);
- posterior Q(z|Y): the U-Net encoder on the mask alone (one-hot minus 0.5),
  global average pooling, a 1x1 conv to mean and log sigma;
- decoder: z tiled over the image and concatenated to its channels, then the
  U-Net core and an output head (f_comb without a latent);
- loss: cross-entropy + beta * KL(Q(z|Y) || N(0, I)) (Eq. 4 with the fixed prior);
  ``loss`` returns the two terms and the trainer weights them with ``cfg.beta``.

This is exactly the Prob. U-Net with all three Appendix D options set
(``prior="fixed"``, ``posterior_context=False``, ``injection="early"``), so the
class is :class:`~lidcseg.models.prob_unet.ProbUNet` with those options forced.
The name ``i2i-vae`` also defaults to the paper's setting per task: beta = 10 and a
3-D latent on LIDC, beta = 1 (N = 3) on the flip task (Appendix H.2); those defaults live
in :data:`lidcseg.models.registry.MODEL_SPECS`
and are applied by :func:`lidcseg.models.registry.model_config` (``lidcseg
train --model i2i-vae``); an explicit ``--set beta=...`` still wins.

Sampling cost: one more sample is a whole U-Net pass and the head (the latent
enters at the input, so nothing can be reused across samples); there is no
prior net to run. ``sample(..., eps=...)`` takes the (B, n, N) noise: z = eps.
"""

from __future__ import annotations

import dataclasses

from lidcseg.config import ModelConfig
from lidcseg.models.prob_unet import ProbUNet
from lidcseg.models.registry import MODEL_SPECS

#: The Appendix D options that make a Prob. U-Net the Image2Image VAE (what the name implies).
I2I_OPTIONS = dict(MODEL_SPECS["i2i-vae"].implies)


class Image2ImageVAE(ProbUNet):
    """The Image2Image VAE (Fig. 2d): a Prob. U-Net with the options of :data:`I2I_OPTIONS`.

    Args:
        cfg: as :class:`ProbUNet`; ``prior``, ``posterior_context`` and ``injection``
            are set to :data:`I2I_OPTIONS` whatever they were. Build the config with
            ``model_config("i2i-vae")`` for the paper's beta = 10 and N = 3.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__(dataclasses.replace(cfg, **I2I_OPTIONS))
