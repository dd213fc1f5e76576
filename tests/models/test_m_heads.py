"""M-Heads (Fig. 2c): the loss weights on hand-computed cases, heads as hypotheses."""

from __future__ import annotations

import math

import pytest
import torch

from lidcseg.errors import LidcsegError
from lidcseg.losses import m_heads_loss, m_heads_weights, pixel_cross_entropy
from lidcseg.models import MHeadsUNet, create_model, model_config
from lidcseg.seed import seed_everything


def make(num_heads: int = 4, **overrides: object) -> MHeadsUNet:
    seed_everything(0)
    model = create_model(model_config(
        "m-heads", base_channels=2, num_scales=3, convs_per_block=1, fcomb_channels=4,
        fcomb_layers=2, num_heads=num_heads, **overrides,
    ))
    assert isinstance(model, MHeadsUNet)
    return model


def test_weights_best_head_one_minus_epsilon_others_share_epsilon() -> None:
    ce = torch.tensor([[3.0, 1.0, 2.0, 5.0], [0.5, 0.7, 0.2, 0.9]])
    w = m_heads_weights(ce, 0.05)
    e = 0.05 / 3
    torch.testing.assert_close(w, torch.tensor([[e, 0.95, e, e], [e, e, 0.95, e]]))
    torch.testing.assert_close(w.sum(1), torch.ones(2))
    assert torch.equal(m_heads_weights(torch.tensor([[4.0]]), 0.05), torch.ones(1, 1))
    # Ties go to the lowest index.
    assert m_heads_weights(torch.tensor([[1.0, 1.0]]), 0.1).tolist() == [[pytest.approx(0.9), pytest.approx(0.1)]]


def test_loss_on_a_hand_computed_one_pixel_case() -> None:
    # One image, one pixel of class 1, three heads with logits (0, 0), (0, 1), (1, 0):
    # CE = log 2, log(1 + e^-1) (the best), log(1 + e).
    logits = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0]])[None, :, :, None, None]
    target = torch.ones(1, 1, 1, dtype=torch.long)
    out = m_heads_loss(logits, target, 0.05)
    expected = 0.95 * math.log(1 + math.exp(-1)) + 0.025 * (math.log(2) + math.log(1 + math.e))
    assert out["rec"].item() == pytest.approx(expected, rel=1e-6)
    assert out["rec_best"].item() == pytest.approx(math.log(1 + math.exp(-1)), rel=1e-6)
    assert out["best_head"].tolist() == [0.0, 1.0, 0.0]


def test_loss_matches_per_head_cross_entropy_with_ignored_pixels() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 4, 2, 6, 5, generator=g, requires_grad=True)
    target = (torch.rand(3, 6, 5, generator=g) > 0.5).long()
    ignore = torch.rand(3, 6, 5, generator=g) > 0.7
    out = m_heads_loss(logits, target, 0.2, ignore)
    ce = torch.stack([pixel_cross_entropy(logits[:, m], target, ignore) for m in range(4)], 1)
    torch.testing.assert_close(out["rec"], (m_heads_weights(ce, 0.2) * ce).sum(1).mean())
    out["rec"].backward()
    assert (logits.grad.abs().flatten(2).sum(2) > 0).all()  # every head learns a little


def test_model_heads_are_the_hypotheses_and_share_one_unet_pass() -> None:
    model = make(4)
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    calls: list[int] = []
    hook = model.unet.register_forward_hook(lambda m, a, o: calls.append(a[0].shape[0]))
    try:
        s = model.sample(x, 3)
    finally:
        hook.remove()
    assert calls == [2]  # the U-Net once per image, whatever n
    with torch.no_grad():
        features = model.unet(x)
        for m in range(3):
            torch.testing.assert_close(s[:, m], model.heads[m](features))
    assert model.max_samples == 4
    with pytest.raises(LidcsegError, match="at most 4 hypotheses .*head"):
        model.sample(x, 5)


def test_paper_settings() -> None:
    cfg = model_config("m-heads")
    assert (cfg.num_heads, cfg.head_epsilon) == (16, 0.05)
    for m in (4, 8, 16):
        assert len(make(m).heads) == m
    y = torch.zeros(2, 16, 16, dtype=torch.long)
    out = make(4, head_epsilon=0.0).loss(torch.randn(2, 1, 16, 16), y)
    torch.testing.assert_close(out["rec"], out["rec_best"])  # epsilon 0: only the best head
