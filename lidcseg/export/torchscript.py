"""A TorchScript sampler of the Probabilistic U-Net, for users without lidcseg (``models/model.ts``).

:func:`script_sampler` turns a :class:`~lidcseg.models.prob_unet.ProbUNet` (the paper's
model and the Appendix D ablations: fixed prior, no posterior context, early injection,
and the Image2Image VAE) into a scripted :class:`ScriptedSampler` with two methods:

* ``sample_eps(x, eps)``: (B, C_in, H, W) images and (B, n, N) standard-normal noise ->
  (B, n, C, H, W) logits, z = mu(X) + sigma(X) * eps (Eq. 1-3). For the same ``eps`` it
  gives the logits of :func:`lidcseg.inference.draw_logits` (up to float rounding).
* ``sample(x, n)``: the same with eps drawn by ``torch.randn`` (torch's global RNG).

The U-Net and the prior net are traced (pure convolutions, pooling and bilinear
up-sampling: any batch and any H, W that are multiples of 2^(num_scales-1)); f_comb (or the
early-injection output head) is scripted as Eq. 2 reads: z tiled over the image,
concatenated, 1x1 convs. Models whose sampling is not a function of (x, eps) - the
Dropout U-Net (dropout masks), the U-Net ensemble and M-Heads - get no ``model.ts``:
:func:`script_sampler` says why in :class:`NotScriptable`.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

#: Model names whose sampler :func:`script_sampler` scripts (the Prob. U-Net family).
SCRIPTABLE_CLASSES = ("ProbUNet", "Image2ImageVAE")


class NotScriptable(Exception):
    """The model has no TorchScript sampler; the message says why (one line)."""


class ScriptedSampler(nn.Module):
    """``sample(x, n)`` / ``sample_eps(x, eps)`` of a Prob. U-Net, scriptable (module docstring).

    Args:
        unet: the traced U-Net, (B, C_in [+ N if early], H, W) -> (B, F, H, W).
        prior: the traced prior net, (B, C_in, H, W) -> (mu, logsigma), each (B, N).
        layers: the hidden 1x1 convs of f_comb (late: first takes F + N channels) or of the
            output head (early: first takes F channels).
        logits: the last 1x1 conv, -> C channels.
        latent_dim: N.
        early: z concatenated to the image (early injection) instead of to the features.
    """

    def __init__(
        self, unet: nn.Module, prior: nn.Module, layers: nn.ModuleList, logits: nn.Module,
        latent_dim: int, early: bool,
    ) -> None:
        super().__init__()
        self.unet = unet
        self.prior = prior
        self.layers = layers
        self.logits = logits
        self.latent_dim = latent_dim
        self.early = early

    def _head(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = F.relu(layer(h))
        return self.logits(h)

    @torch.jit.export
    def sample_eps(self, x: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        """(B, C_in, H, W) images, (B, n, N) noise -> (B, n, C, H, W) logits."""
        b, h, w = x.shape[0], x.shape[2], x.shape[3]
        mu, logsigma = self.prior(x)  # (B, N) each
        z = mu[:, None] + logsigma.exp()[:, None] * eps.to(x.dtype)  # (B, n, N)
        features = torch.empty(0)
        if not self.early:
            features = self.unet(x)  # (B, F, H, W): once per image (late injection)
        out: list[torch.Tensor] = []
        for i in range(eps.shape[1]):
            tiled = z[:, i, :, None, None].expand(b, self.latent_dim, h, w)  # (B, N, H, W)
            if self.early:
                out.append(self._head(self.unet(torch.cat([x, tiled], dim=1))))
            else:
                out.append(self._head(torch.cat([features, tiled], dim=1)))
        return torch.stack(out, dim=1)

    @torch.jit.export
    def sample(self, x: torch.Tensor, n: int) -> torch.Tensor:
        """(B, C_in, H, W) images -> (B, n, C, H, W) logits, eps ~ N(0, I) from torch's global RNG."""
        eps = torch.randn([x.shape[0], n, self.latent_dim], dtype=x.dtype, device=x.device)
        return self.sample_eps(x, eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """One hypothesis per image: (B, C_in, H, W) -> (B, 1, C, H, W)."""
        return self.sample(x, 1)


def script_sampler(model: nn.Module, input_size: int) -> torch.jit.ScriptModule:
    """The scripted :class:`ScriptedSampler` of a Prob. U-Net (on CPU, float32, eval mode).

    Args:
        model: a :class:`~lidcseg.models.prob_unet.ProbUNet` (or subclass).
        input_size: T, the side of the tiles the trace example uses (the run's input size).

    Raises:
        NotScriptable: a model of another family (the message names it and why).
    """
    name = getattr(getattr(model, "config", None), "name", type(model).__name__)
    if type(model).__name__ not in SCRIPTABLE_CLASSES:
        raise NotScriptable(
            f"model {name!r} ({type(model).__name__}) draws its hypotheses from members, heads or "
            "dropout masks, not from a latent eps: no TorchScript sampler; use lidcseg")
    cfg = model.config
    early = bool(model.early)
    head = model.head if early else model.fcomb
    device = next(model.parameters()).device
    model = model.cpu().eval()
    n = cfg.latent_dim
    x = torch.zeros((2, cfg.in_channels, input_size, input_size))
    unet_in = torch.zeros((2, cfg.in_channels + (n if early else 0), input_size, input_size))
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # TracerWarnings of the input-size check (plain ints)
            unet = torch.jit.trace(model.unet, unet_in, check_trace=False)
            prior = torch.jit.trace(model.prior, x, check_trace=False)
            sampler = ScriptedSampler(unet, prior, head.layers, head.logits, n, early)
            scripted = torch.jit.script(sampler.eval())
    except (RuntimeError, torch.jit.Error) as e:  # pragma: no cover - depends on torch
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise NotScriptable(f"model {name!r} could not be scripted ({first})") from None
    finally:
        model.to(device)
    return scripted
