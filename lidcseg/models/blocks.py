"""Building blocks shared by the U-Net, the prior/posterior nets and the baselines.

Appendix H.1 of Kohl et al. (2018): every block is ``convs_per_block`` 3x3
convolutions, each followed by a ReLU; down-sampling is 2x2 average pooling and
up-sampling is bilinear.
"""

from __future__ import annotations

import torch
from torch import nn

from lidcseg.errors import LidcsegError

#: Standard deviation of the truncated-normal bias initialisation.
BIAS_INIT_STD = 1e-3


def conv_block(in_channels: int, out_channels: int, num_convs: int) -> nn.Sequential:
    """``num_convs`` 3x3 convolutions (padding 1), each followed by a ReLU.

    (B, in_channels, H, W) -> (B, out_channels, H, W).
    """
    if num_convs < 1:
        raise ValueError(f"a block needs at least one convolution, got {num_convs}")
    layers: list[nn.Module] = []
    for i in range(num_convs):
        layers.append(
            nn.Conv2d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
        )
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def scale_channels(base_channels: int, num_scales: int) -> list[int]:
    """Channels at each scale: ``base_channels`` doubled at every down-sampling."""
    return [base_channels * 2**i for i in range(num_scales)]


def check_input_size(x: torch.Tensor, num_scales: int, what: str = "input") -> None:
    """Refuse a (B, C, H, W) input whose H or W is not divisible by 2^(num_scales-1).

    Raises:
        LidcsegError: naming the shape and the required multiple.
    """
    if x.ndim != 4:
        raise LidcsegError(f"{what} must be (B, C, H, W), got shape {tuple(x.shape)}")
    factor = 2 ** (num_scales - 1)
    h, w = x.shape[-2:]
    if h % factor or w % factor or h == 0 or w == 0:
        raise LidcsegError(
            f"{what} of shape {tuple(x.shape)}: H and W must be positive multiples of "
            f"{factor} (2^(num_scales-1) with num_scales={num_scales})"
        )


@torch.no_grad()
def init_weights(module: nn.Module) -> None:
    """Initialise every conv/linear layer of ``module`` in place.

    Weights are orthogonal with gain 1 (``nn.init.orthogonal_`` on the weight
    flattened to (out, in*k*k)); biases are drawn from a normal with
    sigma = 0.001 truncated at +-2 sigma. (The official TF release used He-normal;
    this project follows the paper's orthogonal initialisation.) Uses torch's
    global RNG: call :func:`lidcseg.seed.seed_everything` first.
    """
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.orthogonal_(m.weight, gain=1.0)
            if m.bias is not None:
                nn.init.trunc_normal_(
                    m.bias, std=BIAS_INIT_STD, a=-2 * BIAS_INIT_STD, b=2 * BIAS_INIT_STD
                )


def standard_normal(
    shape: tuple[int, ...],
    generator: torch.Generator | None,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Standard-normal noise of ``shape`` on ``device``, drawn from ``generator``.

    The noise is drawn on the generator's own device (a CPU generator works for
    a CUDA model) and then moved, so a seeded CPU generator gives the same
    latents on every device. ``generator=None`` uses torch's global RNG.
    """
    draw_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
