"""This process's place in a run: DistributedDataParallel under ``torchrun``, its device, autocast.

A run is single-process unless ``WORLD_SIZE`` > 1 (``torchrun`` sets it with
``RANK`` and ``LOCAL_RANK``); then every rank joins one process group (NCCL on
CUDA, gloo on CPU) and uses its local GPU.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Any

import torch

from lidcseg.config import TrainConfig
from lidcseg.device import resolve_device


@dataclass
class Dist:
    """This process's place in a (possibly single-process) run.

    Attributes:
        rank: global rank (0: the process that writes the run directory).
        world: number of processes.
        local_rank: rank on this machine (its GPU index).
        owns_group: whether :func:`init_distributed` created the process group
            (and the trainer must destroy it).
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    owns_group: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: writes files and reports events."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait for every rank (nothing to wait for in a single process)."""
        if self.world > 1:
            torch.distributed.barrier()


def init_distributed(cfg: TrainConfig) -> Dist:
    """Join the process group when started by ``torchrun`` (``WORLD_SIZE`` > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", str(rank)))
    owns = False
    if not torch.distributed.is_initialized():
        use_cuda = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        if use_cuda:
            torch.cuda.set_device(local_rank)
        torch.distributed.init_process_group(backend="nccl" if use_cuda else "gloo")
        owns = True
    return Dist(rank=rank, world=world, local_rank=local_rank, owns_group=owns)


def run_device(name: str, dist: Dist) -> torch.device:
    """:func:`lidcseg.device.resolve_device`; a CUDA device gets an index (0), and under
    DDP it is the rank's local GPU."""
    dev = resolve_device(name)
    if dev.type == "cpu":
        return dev
    if dist.world > 1:
        return torch.device("cuda", dist.local_rank)
    return dev if dev.index is not None else torch.device("cuda", 0)


def autocast_for(device: torch.device, cfg: TrainConfig) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA when ``cfg.bf16``; otherwise a context that does nothing."""
    if device.type == "cuda" and cfg.bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
