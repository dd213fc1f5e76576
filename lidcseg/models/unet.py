"""The U-Net core of the Probabilistic U-Net (Kohl et al. 2018, Section 2, Appendix H.1).

``num_scales`` resolution levels (5 for LIDC: 4 down- and 4 up-sampling
operations). Channels start at ``base_channels`` and double at each
down-sampling. Down-sampling is 2x2 average pooling, up-sampling is bilinear
(``align_corners=False``) followed by concatenation of the skip connection and
a block of 3x3 conv + ReLU.

:class:`Encoder` is the contracting path on its own; the prior and posterior
nets reuse it. :class:`UNet` returns the last decoder feature map
(``base_channels`` channels), which f_comb (or a baseline's :class:`OutputHead`)
turns into logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lidcseg.models.blocks import check_input_size, conv_block, scale_channels


class Encoder(nn.Module):
    """Contracting path: block, then (avg-pool 2x2, block) at every coarser scale.

    Args:
        in_channels: input channels.
        base_channels: channels at the finest scale, doubled per scale.
        num_scales: resolution levels (>= 1).
        convs_per_block: 3x3 conv + ReLU pairs per block.

    Input (B, in_channels, H, W) with H, W multiples of 2^(num_scales-1).
    Output: list of ``num_scales`` feature maps, finest first; scale ``i`` is
    (B, base_channels * 2^i, H / 2^i, W / 2^i).
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 32,
        num_scales: int = 5,
        convs_per_block: int = 3,
    ) -> None:
        super().__init__()
        if num_scales < 1:
            raise ValueError(f"num_scales must be >= 1, got {num_scales}")
        self.num_scales = num_scales
        self.channels = scale_channels(base_channels, num_scales)
        ins = [in_channels, *self.channels[:-1]]
        self.blocks = nn.ModuleList(
            conv_block(i, o, convs_per_block) for i, o in zip(ins, self.channels, strict=True)
        )

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        check_input_size(x, self.num_scales)
        features = []
        for i, block in enumerate(self.blocks):
            if i > 0:
                x = F.avg_pool2d(x, 2)  # (B, C, H/2^i, W/2^i)
            x = block(x)
            features.append(x)
        return features


class UNet(nn.Module):
    """U-Net without an output head: (B, in_channels, H, W) -> (B, base_channels, H, W).

    Args:
        in_channels: image channels.
        base_channels: channels of the first block (paper: 32).
        num_scales: resolution levels (paper LIDC: 5).
        convs_per_block: 3x3 conv + ReLU pairs per block (paper: 3).
    """

    def __init__(
        self,
        in_channels: int,
        base_channels: int = 32,
        num_scales: int = 5,
        convs_per_block: int = 3,
    ) -> None:
        super().__init__()
        self.encoder = Encoder(in_channels, base_channels, num_scales, convs_per_block)
        ch = self.encoder.channels
        # decoder[j] works at scale num_scales-2-j: in = upsampled coarser + skip.
        self.decoder = nn.ModuleList(
            conv_block(ch[s + 1] + ch[s], ch[s], convs_per_block)
            for s in reversed(range(num_scales - 1))
        )
        self.out_channels = base_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.encoder(x)
        h = skips[-1]  # (B, C_last, H/2^(S-1), W/2^(S-1))
        for block, skip in zip(self.decoder, reversed(skips[:-1]), strict=True):
            h = F.interpolate(h, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            h = block(torch.cat([h, skip], dim=1))  # (B, C_s, H_s, W_s)
        return h


class OutputHead(nn.Module):
    """Logits from the U-Net's last feature map: f_comb (Eq. 2) without a latent.

    ``num_layers`` 1x1 convs, each followed by ReLU, then a 1x1 conv to
    ``num_classes`` logits: (B, F, H, W) -> (B, C, H, W). The deterministic
    baselines (Fig. 2a-c) and the early-injection models end in it, so every
    model of the harness has the same depth after the U-Net as the Prob. U-Net.

    Args:
        in_channels: F, the U-Net's output channels.
        channels: channels of the hidden 1x1 convs (``ModelConfig.fcomb_channels``).
        num_layers: hidden 1x1 convs (``ModelConfig.fcomb_layers``).
        num_classes: C.
    """

    def __init__(
        self, in_channels: int, channels: int = 32, num_layers: int = 3, num_classes: int = 2
    ) -> None:
        super().__init__()
        ins = [in_channels] + [channels] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Conv2d(i, channels, 1) for i in ins)
        self.logits = nn.Conv2d(channels, num_classes, 1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        h = features
        for layer in self.layers:
            h = F.relu(layer(h))
        return self.logits(h)
