"""Dropout U-Net (Fig. 2a): where dropout acts, that it stays on when sampling, prefix reuse."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lidcseg.models.dropout_unet as dropout_unet
from lidcseg.models import DropoutUNet, create_model, model_config
from lidcseg.seed import seed_everything


def make(**overrides: object) -> DropoutUNet:
    seed_everything(0)
    cfg = model_config("dropout-unet", base_channels=2, num_scales=5, convs_per_block=1,
                       fcomb_channels=4, fcomb_layers=1, **overrides)
    model = create_model(cfg)
    assert isinstance(model, DropoutUNet)
    return model


def images(b: int = 2) -> torch.Tensor:
    return torch.randn(b, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def test_paper_default_is_p_half() -> None:
    assert model_config("dropout-unet").dropout == 0.5


def test_dropout_acts_on_the_inputs_of_the_three_innermost_encoder_and_decoder_blocks(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    model = make()
    seen: list[tuple[int, int]] = []
    original = dropout_unet.dropout

    def spy(h: torch.Tensor, p: float, generator: torch.Generator | None) -> torch.Tensor:
        seen.append((h.shape[1], h.shape[2]))
        return original(h, p, generator)

    monkeypatch.setattr(dropout_unet, "dropout", spy)
    model.loss(images(), torch.zeros(2, 32, 32, dtype=torch.long))
    # 5 scales, base 2: encoder blocks 2, 3, 4 get 4@8, 8@4, 16@2 (the pooled output
    # of the block before); decoder blocks at scales 3, 2, 1 get [up; skip].
    assert seen == [(4, 8), (8, 4), (16, 2), (32 + 16, 4), (16 + 8, 8), (8 + 4, 16)]


def test_dropout_is_active_when_sampling_in_eval_mode() -> None:
    model = make().eval()
    s = model.sample(images(), 2, generator=torch.Generator().manual_seed(1))
    assert (s[:, 0] - s[:, 1]).abs().amax() > 1e-4
    # With the global RNG too (no generator).
    assert not torch.equal(model.sample(images(), 1), model.sample(images(), 1))


def test_without_dropout_every_sample_is_the_plain_unet() -> None:
    model = make(dropout=0.0).eval()
    x = images()
    s = model.sample(x, 3, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        plain = model.head(model.unet(x))  # the UNet's own forward: the split forward agrees
    for i in range(3):
        torch.testing.assert_close(s[:, i], plain, rtol=1e-5, atol=1e-6)


def test_dropout_scales_kept_activations() -> None:
    h = torch.ones(1, 4, 16, 16)
    out = dropout_unet.dropout(h, 0.5, torch.Generator().manual_seed(0))
    assert set(out.unique().tolist()) == {0.0, 2.0}
    assert 0.4 < (out == 0).float().mean() < 0.6
    assert torch.equal(dropout_unet.dropout(h, 0.0, None), h)


def test_encoder_prefix_runs_once_per_image_when_sampling() -> None:
    model = make()
    calls: dict[str, list[int]] = {"block0": [], "block1": [], "block2": []}
    hooks = [
        model.unet.encoder.blocks[i].register_forward_hook(
            lambda mod, args, out, k=f"block{i}": calls[k].append(args[0].shape[0])
        )
        for i in range(3)
    ]
    try:
        model.sample(images(b=3), 16, chunk_size=8)
    finally:
        for h in hooks:
            h.remove()
    assert calls["block0"] == calls["block1"] == [3]  # no dropout before block 2: once per image
    assert sum(calls["block2"]) == 3 * 16  # one pass per sample from block 2 on
    assert max(calls["block2"]) <= 8


def test_samples_are_seeded_and_the_training_loss_uses_dropout() -> None:
    model = make()
    x, y = images(), torch.zeros(2, 32, 32, dtype=torch.long)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(model.sample(x, 4, generator=g(3)), model.sample(x, 4, generator=g(3)))
    assert not torch.equal(model.sample(x, 4, generator=g(3)), model.sample(x, 4, generator=g(4)))
    assert model.loss(x, y, generator=g(1))["rec"] != model.loss(x, y, generator=g(2))["rec"]
    assert F.relu(model.loss(x, y)["rec"]) > 0
