"""U-Net core and encoder: shapes per scale, input-size errors, registry."""

from __future__ import annotations

import pytest
import torch

from lidcseg.errors import LidcsegError
from lidcseg.models import Encoder, UNet


def test_encoder_features_per_scale() -> None:
    enc = Encoder(in_channels=2, base_channels=3, num_scales=4, convs_per_block=1)
    feats = enc(torch.randn(2, 2, 48, 80))
    assert [tuple(f.shape) for f in feats] == [
        (2, 3, 48, 80),
        (2, 6, 24, 40),
        (2, 12, 12, 20),
        (2, 24, 6, 10),
    ]


def test_unet_returns_last_feature_map_at_input_resolution() -> None:
    net = UNet(in_channels=1, base_channels=4, num_scales=4, convs_per_block=2)
    out = net(torch.randn(1, 1, 48, 80))
    assert out.shape == (1, 4, 48, 80) and net.out_channels == 4
    assert (out >= 0).all()  # last op is a ReLU


def test_single_scale_unet_is_one_block() -> None:
    net = UNet(in_channels=1, base_channels=4, num_scales=1, convs_per_block=1)
    assert net(torch.randn(1, 1, 5, 7)).shape == (1, 4, 5, 7)


def test_invalid_size_message_names_shape_and_multiple() -> None:
    net = UNet(in_channels=1, base_channels=2, num_scales=5, convs_per_block=1)
    with pytest.raises(LidcsegError, match=r"\(1, 1, 100, 128\).*multiples of 16"):
        net(torch.zeros(1, 1, 100, 128))
