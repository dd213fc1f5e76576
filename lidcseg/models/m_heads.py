"""M-Heads baseline (Kohl et al. 2018, Fig. 2c; Rupprecht et al. 2017, Ilg et al. 2018).

One U-Net core and M output heads on its last feature map. Each head is a
whole :class:`~lidcseg.models.unet.OutputHead` (``fcomb_layers`` 1x1 convs and
ReLU, then 1x1 logits: f_comb without a latent), so the shared part is the
entire U-Net and each head has the depth of the Prob. U-Net's f_comb.

Loss (:func:`lidcseg.losses.m_heads_loss`): per image, the head with the lowest
cross-entropy is weighted 1 - epsilon and each other head epsilon / (M - 1)
(paper: epsilon = 0.05). The paper trains models with 4, 8 and 16 heads
(``num_heads``).

Sampling cost: the U-Net runs once per image; one more sample is one more head
(``fcomb_layers`` 1x1 convs over H x W). ``sample(x, n)`` returns the first
``n`` heads and refuses ``n > M``; ``generator`` and ``eps`` are ignored.
"""

from __future__ import annotations

import torch
from torch import nn

from lidcseg.config import ModelConfig
from lidcseg.losses import m_heads_loss
from lidcseg.models.blocks import check_input_size, init_weights
from lidcseg.models.prob_unet import DEFAULT_CHUNK_SIZE
from lidcseg.models.registry import SegmentationModel, check_labels, check_sample_count
from lidcseg.models.unet import OutputHead, UNet


class MHeadsUNet(SegmentationModel):
    """A U-Net with ``num_heads`` output heads (Fig. 2c); see the module docstring.

    Args:
        cfg: the U-Net architecture, the heads (``fcomb_channels``, ``fcomb_layers``),
            ``num_heads`` (M) and ``head_epsilon``.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.unet = UNet(cfg.in_channels, cfg.base_channels, cfg.num_scales, cfg.convs_per_block)
        self.heads = nn.ModuleList(
            OutputHead(self.unet.out_channels, cfg.fcomb_channels, cfg.fcomb_layers, cfg.num_classes)
            for _ in range(cfg.num_heads)
        )
        init_weights(self)
        self.to(memory_format=torch.channels_last)

    @property
    def max_samples(self) -> int:
        """M: one hypothesis per head."""
        return len(self.heads)

    def _heads(self, features: torch.Tensor, n: int) -> torch.Tensor:
        """The first ``n`` heads on (B, F, H, W) features: (B, n, C, H, W) logits."""
        return torch.stack([head(features) for head in self.heads[:n]], dim=1)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ignore: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """The M-Heads loss (best head 1 - epsilon, others epsilon / (M - 1)).

        ``generator`` is unused. Returns ``rec`` (the weighted cross-entropy, the
        whole loss: no KL), ``rec_best`` and ``best_head`` (see
        :func:`lidcseg.losses.m_heads_loss`).
        """
        check_labels(x, y)
        logits = self._heads(self.unet(x), len(self.heads))  # (B, M, C, H, W)
        return m_heads_loss(logits, y, self.config.head_epsilon, ignore)

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """The first ``n`` heads' logits: (B, C_in, H, W) -> (B, n, C, H, W).

        Raises:
            LidcsegError: ``n`` is larger than the number of heads.
        """
        check_sample_count(n, len(self.heads), self.config.name, "head")
        check_input_size(x, self.config.num_scales)
        b, _, h, w = x.shape
        out = x.new_empty((b, n, self.config.num_classes, h, w))
        for s in range(0, b, chunk_size):
            out[s : s + chunk_size] = self._heads(self.unet(x[s : s + chunk_size]), n)
        return out
