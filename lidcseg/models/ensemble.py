"""U-Net ensemble baseline (Kohl et al. 2018, Fig. 2b; Lakshminarayanan et al. 2017).

M deterministic U-Nets (the harness's U-Net core and output head), each giving
one hypothesis: ``sample(x, n)`` returns the first ``n`` members' outputs, and
refuses ``n > M``. The 1-member ensemble is the plain deterministic U-Net
(registered as ``unet``).

**Training, two routes.** The paper trains the members *independently*:
independent initialisations *and* independent minibatches (data order,
augmentation and, on LIDC, which grader's mask each image is drawn with).

1. Faithful (the paper's): train M runs of the 1-member model with distinct
   seeds, then put them in one checkpoint with :func:`assemble`::

       for m in 0 .. M-1:  lidcseg train --model unet --set train.seed=m --out runs/unet-m
       python -c "from lidcseg.models.ensemble import assemble; \\
                  assemble([f'runs/unet-{m}/best' for m in range(M)], 'runs/ensemble')"

   The members are exactly M independently trained U-Nets, and each one's
   ``best/`` was chosen on its own validation loss curve (GED of 1 sample).
2. One command: ``lidcseg train --model unet-ensemble --set ensemble_size=M``
   trains all members in one run. Their initialisations are independent (drawn
   one after another), and the loss is the *sum* of the members' losses, so
   every member's parameters receive exactly the gradient they would receive
   alone. But the members share every minibatch (same images, augmentation and
   grader draws), and ``best/`` is chosen on the ensemble's GED: the members
   are more alike than in route 1. Use it for quick experiments.

Sampling cost: one more sample is one more member, a whole U-Net pass and head
(M times the parameters of one U-Net). ``generator`` and ``eps`` are ignored:
the hypotheses are deterministic.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from lidcseg.config import ModelConfig
from lidcseg.errors import LidcsegError
from lidcseg.losses import pixel_cross_entropy
from lidcseg.models.blocks import check_input_size, init_weights
from lidcseg.models.prob_unet import DEFAULT_CHUNK_SIZE
from lidcseg.models.registry import SegmentationModel, check_labels, check_sample_count
from lidcseg.models.unet import OutputHead, UNet

#: Model names :func:`assemble` accepts as sources.
MEMBER_SOURCES = ("unet", "unet-ensemble")


class UNetMember(nn.Module):
    """One deterministic U-Net with its output head: (B, C_in, H, W) -> (B, C, H, W) logits."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.unet = UNet(cfg.in_channels, cfg.base_channels, cfg.num_scales, cfg.convs_per_block)
        self.head = OutputHead(
            self.unet.out_channels, cfg.fcomb_channels, cfg.fcomb_layers, cfg.num_classes
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.unet(x))


class UNetEnsemble(SegmentationModel):
    """M independently initialised deterministic U-Nets (Fig. 2b); see the module docstring.

    Args:
        cfg: the U-Net architecture, the head (``fcomb_channels``, ``fcomb_layers``)
            and ``ensemble_size`` (M).
    """

    #: ``sample(x, n)`` is the first n members: evaluated with n members per count.
    samples_per_count = True

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.config = cfg
        self.members = nn.ModuleList(UNetMember(cfg) for _ in range(cfg.ensemble_size))
        init_weights(self)  # members one after another: independent draws
        self.to(memory_format=torch.channels_last)

    @property
    def max_samples(self) -> int:
        """M: one hypothesis per member."""
        return len(self.members)

    def loss(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ignore: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> dict[str, torch.Tensor]:
        """Sum over members of each member's cross-entropy (pixel sum, batch mean).

        ``generator`` is unused (no noise). Returns ``rec`` (the sum: the whole
        loss, so every member gets exactly its own gradient) and ``rec_per_member``
        (M,), detached.
        """
        check_labels(x, y)
        check_input_size(x, self.config.num_scales)
        ce = torch.stack(
            [pixel_cross_entropy(member(x), y, ignore).mean() for member in self.members]
        )  # (M,)
        return {"rec": ce.sum(), "rec_per_member": ce.detach()}

    @torch.no_grad()
    def sample(
        self,
        x: torch.Tensor,
        n: int,
        generator: torch.Generator | None = None,
        eps: torch.Tensor | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> torch.Tensor:
        """The first ``n`` members' logits: (B, C_in, H, W) -> (B, n, C, H, W).

        Raises:
            LidcsegError: ``n`` is larger than the ensemble.
        """
        check_sample_count(n, len(self.members), self.config.name, "member")
        check_input_size(x, self.config.num_scales)
        b, _, h, w = x.shape
        out = x.new_empty((b, n, self.config.num_classes, h, w))
        for s in range(0, b, chunk_size):
            for m in range(n):
                out[s : s + chunk_size, m] = self.members[m](x[s : s + chunk_size])
        return out


def assemble(
    checkpoints: Sequence[str | Path],
    out: str | Path,
    *,
    allow_identical: bool = False,
) -> Path:
    """Put independently trained U-Nets into one ``unet-ensemble`` checkpoint.

    Each source is a checkpoint folder (or a file in it) of a ``unet`` or a
    ``unet-ensemble``; its members are appended in order, so the ensemble's
    member k is the k-th U-Net over all sources. Every source must have the
    same architecture (everything but ``name`` and ``ensemble_size``).

    Args:
        checkpoints: the sources, e.g. ``runs/unet-0/best``, ``runs/unet-1/best``.
        out: the checkpoint folder to write.
        allow_identical: accept members with identical weights (by default
            refused: two runs with the same seed are not independent).

    Returns:
        The written checkpoint folder; its ``meta`` lists each member's source.

    Raises:
        LidcsegError: no source, a source of another model or architecture, or
            identical members.
    """
    from lidcseg.models.checkpoint import load_checkpoint, save_checkpoint

    if not checkpoints:
        raise LidcsegError("assemble needs at least one checkpoint")
    members: list[nn.Module] = []
    sources: list[dict[str, object]] = []
    arch: ModelConfig | None = None
    for source in checkpoints:
        ckpt = load_checkpoint(source)
        if ckpt.config.name not in MEMBER_SOURCES:
            raise LidcsegError(
                f"checkpoint of model {ckpt.config.name!r}; assemble takes "
                f"{' or '.join(MEMBER_SOURCES)}", ckpt.path,
            )
        this = dataclasses.replace(ckpt.config, name="unet-ensemble", ensemble_size=1)
        if arch is None:
            arch = this
        elif this != arch:
            diff = [f.name for f in dataclasses.fields(arch) if getattr(arch, f.name) != getattr(this, f.name)]
            raise LidcsegError(
                f"architecture differs from the first checkpoint's ({', '.join(diff)})", ckpt.path
            )
        for k, member in enumerate(ckpt.model.members):
            members.append(member)
            sources.append({"checkpoint": str(ckpt.path), "member": k, "step": ckpt.meta.get("step")})
    assert arch is not None
    if not allow_identical:
        _refuse_identical(members, sources)
    cfg = dataclasses.replace(arch, ensemble_size=len(members))
    with torch.device("meta"):  # no initialisation: every weight comes from a source
        ensemble = UNetEnsemble(cfg)
    ensemble.members = nn.ModuleList(members)
    return save_checkpoint(out, ensemble, meta={"assembled_from": sources})


def _refuse_identical(members: Sequence[nn.Module], sources: Sequence[dict[str, object]]) -> None:
    first = [next(iter(m.state_dict().values())) for m in members]  # cheap pre-filter
    for i in range(len(members)):
        for j in range(i):
            if torch.equal(first[i], first[j]) and all(
                torch.equal(a, b)
                for a, b in zip(members[i].state_dict().values(), members[j].state_dict().values(), strict=True)
            ):
                raise LidcsegError(
                    f"members {j} ({sources[j]['checkpoint']}) and {i} ({sources[i]['checkpoint']}) "
                    "have identical weights (trained with the same seed?); pass allow_identical=True "
                    "to keep both"
                )
