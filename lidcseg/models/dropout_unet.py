"""Dropout U-Net baseline (Kohl et al. 2018, Fig. 2a; MC dropout as in Kendall et al. 2015).

The harness's U-Net core and output head (:class:`~lidcseg.models.unet.OutputHead`,
f_comb without a latent) with dropout of probability ``cfg.dropout`` (paper: 0.5)
on the *incoming activations* of the three innermost encoder blocks and the
three innermost decoder blocks. Dropout is active in training **and** in
sampling, whatever the module's train/eval mode: each hypothesis is the U-Net
under one random dropout mask.

Which activations, for ``S = num_scales`` scales (S = 5 for LIDC):

- encoder block ``i`` (scale i) receives the pooled output of block ``i - 1``;
  the innermost three are ``i = S-3, S-2, S-1`` (2, 3, 4), never the image
  itself (``i >= 1``);
- decoder block ``j`` works at scale ``S-2-j`` and receives
  [upsampled coarser features; skip]; the innermost three are ``j = 0, 1, 2``
  (scales 3, 2, 1), the concatenation is dropped as a whole.

Sampling cost: the encoder blocks before the first dropout (blocks 0 .. S-4,
i.e. 0 and 1 at 5 scales) run once per image; one more sample costs the rest of
the U-Net (the three innermost encoder blocks and every decoder block) and the
head, about 90% of a full U-Net pass at the paper's size.

Randomness: with a ``generator``, the dropout masks are drawn from a generator
on the model's device seeded by one draw from it, so a seeded call is
reproducible on one device (not across devices, unlike the latent models'
noise) and for one ``chunk_size``. Without one, ``F.dropout`` uses torch's
global RNG. ``eps`` is ignored: the model has no latent space.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lidcseg.config import ModelConfig
from lidcseg.losses import pixel_cross_entropy
from lidcseg.models.blocks import check_input_size, init_weights
from lidcseg.models.prob_unet import DEFAULT_CHUNK_SIZE
from lidcseg.models.registry import SegmentationModel, check_labels
from lidcseg.models.unet import OutputHead, UNet

#: Innermost encoder blocks and innermost decoder blocks with dropout on their input (paper: 3).
DROPOUT_BLOCKS = 3


def derived_generator(
    generator: torch.Generator | None, device: torch.device
) -> torch.Generator | None:
    """A generator on ``device`` seeded by one draw from ``generator`` (None stays None).

    Dropout masks are as large as the activations: drawing them on a CPU
    generator and copying them to a GPU would cost more than the U-Net.
    """
    if generator is None:
        return None
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    return torch.Generator(device=device).manual_seed(seed)


def dropout(h: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
    """Inverted dropout that is always active: zero with probability p, scale by 1 / (1 - p).

    (B, C, H, W) -> (B, C, H, W), same memory format. ``generator`` (on ``h``'s
    device) draws the mask; None uses ``F.dropout(training=True)``.
    """
    if p == 0:
        return h
    if generator is None:
        return F.dropout(h, p, training=True)
    # uniform_ + compare: half the time of bernoulli_ on CPU (measured), same memory format.
    keep = torch.empty_like(h).uniform_(generator=generator) >= p
    return (h * keep).mul_(1 / (1 - p))


class DropoutUNet(SegmentationModel):
    """U-Net with always-on dropout in its innermost blocks (Fig. 2a); see the module docstring.

    Args:
        cfg: ``base_channels``, ``num_scales``, ``convs_per_block``, ``fcomb_channels``,
            ``fcomb_layers`` (the output head) and ``dropout`` (paper: 0.5).

    Inputs: images (B, cfg.in_channels, H, W), H and W multiples of 2^(num_scales-1);
    labels (B, H, W) int64.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.unet = UNet(cfg.in_channels, cfg.base_channels, cfg.num_scales, cfg.convs_per_block)
        self.head = OutputHead(
            self.unet.out_channels, cfg.fcomb_channels, cfg.fcomb_layers, cfg.num_classes
        )
        #: Encoder blocks before this one run without dropout (once per image when sampling).
        self.first_dropped = max(1, cfg.num_scales - DROPOUT_BLOCKS)
        init_weights(self)
        self.to(memory_format=torch.channels_last)

    def _prefix(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Encoder blocks 0 .. first_dropped-1 (no dropout): their outputs, finest first."""
        skips: list[torch.Tensor] = []
        h = x
        for i in range(self.first_dropped):
            if i > 0:
                h = F.avg_pool2d(h, 2)
            h = self.unet.encoder.blocks[i](h)
            skips.append(h)
        return skips

    def _rest(self, skips: list[torch.Tensor], generator: torch.Generator | None) -> torch.Tensor:
        """The remaining encoder blocks and the decoder, with dropout: -> (B, C, H, W) logits."""
        p = self.config.dropout
        skips = list(skips)
        h = skips[-1]
        for i in range(self.first_dropped, self.config.num_scales):
            h = dropout(F.avg_pool2d(h, 2), p, generator)  # incoming activations of block i
            h = self.unet.encoder.blocks[i](h)
            skips.append(h)
        h = skips[-1]
        for j, (block, skip) in enumerate(zip(self.unet.decoder, reversed(skips[:-1]), strict=True)):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = torch.cat([h, skip], dim=1)  # (B, C_s+1 + C_s, H_s, W_s)
            if j < DROPOUT_BLOCKS:
                h = dropout(h, p, generator)
            h = block(h)
        return self.head(h)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ignore: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Cross-entropy (summed over pixels, mean over the batch) under one dropout mask.

        Returns ``rec`` (the whole loss; no KL).
        """
        check_labels(x, y)
        check_input_size(x, self.config.num_scales)
        logits = self._rest(self._prefix(x), derived_generator(generator, x.device))
        rec = pixel_cross_entropy(logits, y, ignore).mean()
        return {"rec": rec}

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """``n`` hypotheses per image, one dropout mask each: (B, n, C, H, W) logits.

        Dropout is on even in eval mode. The dropout-free encoder prefix runs
        once per image; the rest runs on about ``chunk_size`` (image, sample)
        pairs per forward call. ``eps`` is ignored (no latent).
        """
        if n < 1 or chunk_size < 1:
            raise ValueError(f"n and chunk_size must be >= 1, got n={n}, chunk_size={chunk_size}")
        check_input_size(x, self.config.num_scales)
        rng = derived_generator(generator, x.device)
        b, _, h, w = x.shape
        out = x.new_empty((b, n, self.config.num_classes, h, w))
        for s in range(0, b, chunk_size):
            skips = self._prefix(x[s : s + chunk_size])  # once per image
            bc = skips[0].shape[0]
            group = max(1, chunk_size // bc)  # samples per forward call
            for j in range(0, n, group):
                g = min(group, n - j)
                logits = self._rest([t.repeat_interleave(g, 0) for t in skips], rng)  # (bc*g, C, H, W)
                out[s : s + bc, j : j + g] = logits.view(bc, g, *logits.shape[1:])
        return out
