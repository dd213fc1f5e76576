"""f_comb of the Probabilistic U-Net (Kohl et al., NeurIPS 2018, Eq. 2 and Appendix H.1).

f_comb combines the U-Net's last feature map with a latent sample: z broadcast
to an N-channel map, concatenated to the features, a few 1x1 convs with ReLU,
and 1x1 conv logits. It is written for *late injection*: because the first
1x1 conv is linear, W [F; z] + b = W_F F + (W_z z + b), so W_F F is computed
once per image and each sample only adds its bias W_z z + b
(:class:`~lidcseg.models.prob_unet.ProbUNet` samples through it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: Pixels per step of f_comb on CPU: 16384 x 32 float32 activations (2 MiB) stay
#: in cache. 16 samples of a 128x128 crop, one thread: 0.029 s tiled vs 0.106 s in
#: one batched call vs 0.125 s CPU as 16 per-sample 1x1 convs (benchmarks/sample.py).
CPU_TILE = 16384


class FComb(nn.Module):
    """f_comb: combines the U-Net's last feature map with latent samples (Eq. 2).

    ``num_layers`` 1x1 convs, each followed by ReLU, then a 1x1 conv to
    ``num_classes`` logits. The first conv sees ``[features; z]`` with z tiled
    over the image. Parameters are stored as ``nn.Conv2d`` (the reference
    :meth:`forward_naive` uses them as such); :meth:`forward` computes the same
    function with ``F.linear`` on channels-last data and late injection of z:
    W [F; z] + b = W_F F + (W_z z + b), with W_F F computed once per image.
    """

    def __init__(
        self,
        feature_channels: int,
        latent_dim: int,
        channels: int = 32,
        num_layers: int = 3,
        num_classes: int = 2,
    ) -> None:
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"f_comb needs at least one hidden 1x1 conv, got {num_layers}")
        self.feature_channels = feature_channels
        self.latent_dim = latent_dim
        ins = [feature_channels + latent_dim] + [channels] * (num_layers - 1)
        self.layers = nn.ModuleList(nn.Conv2d(i, channels, 1) for i in ins)
        self.logits = nn.Conv2d(channels, num_classes, 1)

    def project_features(self, features: torch.Tensor) -> torch.Tensor:
        """W_F F: the feature half of the first 1x1 conv, once per image.

        (B, F, H, W) -> (B, H, W, c), channels-last.
        """
        w = self.layers[0].weight.flatten(1)[:, : self.feature_channels]  # (c, F)
        return F.linear(features.permute(0, 2, 3, 1), w)

    def combine(
        self, projected: torch.Tensor, z: torch.Tensor, tile: int | None = -1
    ) -> torch.Tensor:
        """Add the per-sample term W_z z + b to W_F F and run the remaining layers.

        Args:
            projected: (B, H, W, c) from :meth:`project_features`.
            z: (B, n, N) latents.
            tile: pixels per step. ``None`` runs every image and sample in one
                batched call; a positive value loops over images and over groups
                of samples (or tiles of one sample) of about that many pixels, so
                activations stay in cache and no (B, n, H, W, c) tensor is ever
                allocated; -1 (default) picks :data:`CPU_TILE` on CPU without
                autograd (sampling) and ``None`` otherwise (training, GPU). All
                give the same result.

        Returns:
            (B, n, C, H, W) logits.
        """
        b, h, w, c = projected.shape
        n, p = z.shape[1], h * w
        if tile == -1:  # tiles only pay off without autograd, on CPU
            cpu_inference = projected.device.type == "cpu" and not torch.is_grad_enabled()
            tile = CPU_TILE if cpu_inference else None
        first = self.layers[0]
        w_z = first.weight.flatten(1)[:, self.feature_channels :]  # (c, N)
        shift = F.linear(z, w_z, first.bias)  # (B, n, c)
        flat = projected.reshape(b, p, c)
        if tile is None:
            out = self._layers_after_shift(flat[:, None] + shift[:, :, None])  # (B, n, C, P)
        else:
            out = projected.new_empty((b, n, self.logits.out_channels, p))
            per_step = max(1, tile // p)  # samples per step; pixel tiles if one image > tile
            for i in range(b):
                for j in range(0, n, per_step):
                    for s in range(0, p, tile):
                        pre = flat[i, None, s : s + tile] + shift[i, j : j + per_step, None]
                        out[i, j : j + per_step, :, s : s + tile] = self._layers_after_shift(pre)
        return out.view(b, n, -1, h, w)

    def _layers_after_shift(self, pre: torch.Tensor) -> torch.Tensor:
        """First layer's pre-activation (..., P, c) -> logits (..., C, P)."""
        a = pre.relu_()
        for layer in self.layers[1:]:
            a = F.linear(a, layer.weight.flatten(1), layer.bias).relu_()
        logits = torch.matmul(self.logits.weight.flatten(1), a.transpose(-1, -2))  # (..., C, P)
        return logits + self.logits.bias[:, None]

    def forward(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Late-injection f_comb: (B, F, H, W) features and (B, n, N) latents -> (B, n, C, H, W)."""
        return self.combine(self.project_features(features), z)

    def forward_naive(self, features: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Reference f_comb for one latent per image, exactly as Eq. 2 reads.

        Tiles z (B, N) to (B, N, H, W), concatenates it to features (B, F, H, W)
        and applies the 1x1 convs. Returns (B, C, H, W) logits.
        """
        b, _, h, w = features.shape
        x = torch.cat([features, z[:, :, None, None].expand(b, -1, h, w)], dim=1)
        for layer in self.layers:
            x = F.relu(layer(x))
        return self.logits(x)
